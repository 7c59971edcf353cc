import io
import logging
import subprocess
import sys

import pytest
import timm
import torch

import attvig_pyg.models  # noqa: F401  (registers the models with timm)
from attvig_pyg.models.attentionvig import AttentionViG, GraphMixer
from attvig_pyg.models.complexity import multiply_adds

TINY = dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), head_hidden_size=32)
# Table 1 of the paper (distillation head included): parameters (M), multiply-adds (G) at 224 px.
TABLE_1 = {"attentionvig_s": (12.3, 1.6), "attentionvig_m": (22.2, 3.2),
           "attentionvig_b": (32.3, 4.8)}


def tiny(**kwargs) -> AttentionViG:
    return AttentionViG(**dict(TINY, num_classes=10, **kwargs))


@pytest.mark.parametrize("name", list(TABLE_1))
def test_sizes_match_table_1(name):
    model = timm.create_model(name).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 224, 224))
    macs = multiply_adds(model, 224) / 1e9
    paper_params, paper_macs = TABLE_1[name]
    assert logits.shape == (1, 1000)
    assert abs(params / paper_params - 1) < 0.02, params
    assert abs(macs / paper_macs - 1) < 0.05, macs


@pytest.mark.parametrize("name", list(TABLE_1))
def test_timm_create_model_passes_arguments(name):
    model = timm.create_model(name, num_classes=7, drop_path_rate=0.1, graph="dagc")
    assert model.head.out_features == 7 and model.head_dist.out_features == 7
    assert model.graph == "dagc"
    assert model.pretrained_cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    assert model.stages[-1].blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_distillation_head_convention():
    model = tiny().train()
    x = torch.randn(2, 3, 64, 64)
    features = model.forward_features(x)
    logits = model.forward_head(features)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 10)  # the mean, in training
    model.set_distilled_training(True)
    cls, dist = model.forward_head(features)
    assert torch.allclose((cls + dist) / 2, logits)
    model.eval()
    assert isinstance(model.forward_head(features), torch.Tensor)  # eval: always the mean
    assert model.forward_head(features, pre_logits=True).shape == (2, 32)


def test_features_only():
    model = timm.create_model("attentionvig_s", features_only=True)
    features = model(torch.randn(2, 3, 224, 192))
    assert [f.shape[1] for f in features] == [48, 96, 192, 384]
    assert [tuple(f.shape[-2:]) for f in features] == [(56, 48), (28, 24), (14, 12), (7, 6)]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    subset = timm.create_model("attentionvig_s", features_only=True, out_indices=(1, 3))
    assert [f.shape[1] for f in subset(torch.randn(1, 3, 64, 64))] == [96, 384]


@pytest.mark.parametrize("size", [(64, 64), (96, 64), (97, 131), (32, 33)])
def test_non_square_and_odd_inputs(size):
    model = tiny().eval()
    assert model(torch.randn(2, 3, *size)).shape == (2, 10)
    expected = model.stage_sizes(size)
    assert [tuple(f.shape[-2:]) for f in _stage_outputs(model, torch.randn(1, 3, *size))] == \
        expected


def _stage_outputs(model, x):
    outputs, x = [], model.stem(x)
    for stage in model.stages:
        x = stage(x)
        outputs.append(x)
    return outputs


@pytest.mark.parametrize("graph", ["svga", "dagc", "knn"])
@pytest.mark.parametrize("aggregator", ["cross_attn", "max_relative"])
def test_every_graph_and_aggregator_trains(graph, aggregator):
    model = tiny(graph=graph, aggregator=aggregator).train()
    model(torch.randn(3, 3, 64, 64)).square().sum().backward()
    missing = [name for name, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any()]
    assert not missing


@pytest.mark.parametrize("graph", ["svga", "dagc"])
@pytest.mark.parametrize("normalize", ["none", "softmax"])
def test_block_fast_path_equals_message_passing(graph, normalize, monkeypatch):
    model = tiny(graph=graph, normalize=normalize).double().eval()
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64)
    fast = model(x)
    build = GraphMixer.build
    monkeypatch.setattr(GraphMixer, "build", lambda self, x: build(self, x).to_edge_index())
    assert (model(x) - fast).abs().max() < 1e-9


def test_freeze_beta():
    model = tiny().freeze_beta()
    before = model.learned_betas()
    assert len(before) == 8 and all(v == pytest.approx(1.0) for v in before.values())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    assert all(m.log_beta.grad is None for m in _cross_attn_convs(model))
    assert model.learned_betas() == before


def _cross_attn_convs(model):
    return [m for m in model.modules() if isinstance(m, attvig_pyg.CrossAttnConv)]


def test_no_weight_decay_lists_every_log_beta():
    model = tiny()
    assert model.no_weight_decay() == {f"stages.{i}.blocks.{j}.mixer.conv.log_beta"
                                       for i in range(4) for j in (1, 2)}


def test_grad_checkpointing_gives_the_same_result():
    model = tiny().train()
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)
    model(x).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing()
    torch.manual_seed(0)
    model(x).sum().backward()
    for grad, p in zip(expected, model.parameters()):
        assert torch.allclose(grad, p.grad, atol=1e-6)


def test_state_dict_round_trip():
    model = tiny(graph="dagc").eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other = tiny(graph="dagc").eval()
    other.load_state_dict(torch.load(buffer))
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(model(x), other(x))


def test_reset_classifier():
    model = tiny()
    model.reset_classifier(3)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    model.reset_classifier(0, global_pool="")
    features = model.forward_features(torch.randn(2, 3, 64, 64))
    assert model.forward_head(features).shape == (2, 32, 2, 2)  # no pooling: the map is kept


def test_graph_summary_at_224():
    summary = AttentionViG().graph_summary(224)
    assert [s["grid"] for s in summary] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert [s["k"] for s in summary] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert [s["neighbours"] for s in summary] == [12, 12, 12, 12]
    assert AttentionViG(graph_k=[2, 2, 2, 2]).graph_summary(224)[0]["neighbours"] == 54


def test_knn_is_clamped_on_small_stages(caplog):
    model = tiny(graph="knn", knn_k=9, knn_dilation=2)
    with caplog.at_level(logging.WARNING):
        summary = model.graph_summary(64)
        model(torch.randn(2, 3, 64, 64))
        model(torch.randn(2, 3, 64, 64))
    assert [(s["k"], s["dilation"]) for s in summary] == [(9, 2), (9, 2), (9, 1), (4, 1)]
    assert "kNN: k=9, dilation=2 needs 18 nodes" in caplog.text
    assert caplog.text.count("a 2x2 map") == 2  # once per Grapher, not once per forward


def test_bad_input():
    model = tiny()
    with pytest.raises(ValueError, match="at least 32x32 pixels"):
        model(torch.randn(1, 3, 16, 64))
    with pytest.raises(ValueError, match="\\[batch, 3, height, width\\]"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="Unknown graph policy 'grid'"):
        tiny(graph="grid")
    with pytest.raises(ValueError, match="Unknown aggregator 'gin'"):
        tiny(aggregator="gin")
    with pytest.raises(ValueError, match="one entry per stage"):
        tiny(graph_k=[1, 2])


@pytest.mark.parametrize("model_name, kwargs", [
    ("attentionvig_s", dict(graph="svga", **TINY)), ("attentionvig_s", dict(graph="dagc", **TINY)),
    ("attentionvig_s", dict(graph="knn", **TINY)),
    ("attentionvig_s", dict(graph="svga", aggregator="max_relative", **TINY)),
    ("vig_ti", dict(aggregator="cross_attn", graph="svga", channels=32, depth=2)),
    ("vig_ti", dict(aggregator="max_relative", channels=32, depth=2))])
def test_a_training_step_after_an_inference_mode_evaluation_works(model_name, kwargs):
    # PyTorch Lightning validates under torch.inference_mode, then trains in the same process.
    model = timm.create_model(model_name, num_classes=3, **kwargs)
    images = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        model.eval()(images)
    model.train()(images).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_conv_alone_does_not_import_timm():
    code = ("import sys; import attvig_pyg.nn, attvig_pyg.graphs; from attvig_pyg import "
            "CrossAttnConv; assert 'timm' not in sys.modules, 'timm imported'; "
            "import attvig_pyg.models, timm; assert 'attentionvig_s' in timm.list_models()")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_graph_k_that_leaves_a_map_without_neighbours_is_warned_once(caplog):
    model = tiny(graph_k=[(16, 16), 4, 2, 1]).eval()  # stage 1 at 64 px: a 16x16 map
    with caplog.at_level(logging.WARNING):
        model(torch.randn(1, 3, 64, 64))
        model(torch.randn(1, 3, 64, 64))
    assert caplog.text.count("leaves the nodes of a 16x16 map without neighbours") == 2  # per
    # Grapher, once each; the 1x1 map of stage 4 (no other node) and the default K are quiet.
    assert "1x1 map" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tiny().eval()(torch.randn(1, 3, 32, 32))
    assert "without neighbours" not in caplog.text
