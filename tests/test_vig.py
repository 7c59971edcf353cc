import pytest
import timm
import torch

from attvig_pyg.models.vig import AGGREGATORS, ViG, vig_ti

SMALL = dict(channels=32, depth=4, img_size=32, patch_size=4, k=3, head_hidden_size=64,
             num_classes=10)
# ViG-Ti at 224 px, as stated in docs/ablation.md.
VIG_TI_PARAMS = {"gin": 6_963_572, "sage": 8_956_520, "edge": 7_184_744,
                 "max_relative": 7_184_744, "cross_attn": 8_507_252}


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_each_aggregator_trains_and_has_the_documented_size(aggregator):
    model = ViG(aggregator=aggregator, **SMALL).train()
    model(torch.randn(3, 3, 32, 32)).square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing
    assert sum(p.numel() for p in vig_ti(aggregator=aggregator).parameters()) == \
        VIG_TI_PARAMS[aggregator]


def test_shared_parts_start_from_the_same_weights():
    states = {}
    for aggregator in AGGREGATORS:
        torch.manual_seed(7)
        states[aggregator] = ViG(aggregator=aggregator, **SMALL).state_dict()
    shared = [name for name in states["gin"]
              if ".conv." not in name and ".fc2." not in name]
    assert any(name.startswith("stem") for name in shared)
    assert any(".1.mlp." in name for name in shared)  # the FFNs
    assert any(name.startswith(("head", "pre_logits")) for name in shared)
    for aggregator in AGGREGATORS:
        for name in shared:
            assert torch.equal(states[aggregator][name], states["gin"][name]), (aggregator, name)
    assert not torch.equal(states["gin"]["blocks.0.0.fc2.0.weight"],
                           ViG(aggregator="gin", **SMALL).state_dict()["blocks.0.0.fc2.0.weight"])


@pytest.mark.parametrize("graph", ["svga", "dagc"])
def test_axial_graphs(graph):
    model = ViG(aggregator="cross_attn", graph=graph, **SMALL).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model.graph_summary(32)[0]["k"] == (1, 1)


def test_knn_schedule_and_timm_registration():
    model = timm.create_model("vig_ti", aggregator="gin", num_classes=5)
    summary = model.graph_summary(224)
    assert [s["k"] for s in summary] == [9, 9, 10, 11, 12, 13, 13, 14, 15, 16, 17, 18]
    assert [s["dilation"] for s in summary] == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    assert model.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 5)


def test_other_input_sizes_interpolate_the_position_embedding():
    model = ViG(**SMALL).eval()
    assert model(torch.randn(1, 3, 48, 40)).shape == (1, 10)


def test_bad_input():
    with pytest.raises(ValueError, match="Unknown aggregator 'gat'"):
        ViG(aggregator="gat", **SMALL)
    with pytest.raises(ValueError, match="Unknown graph policy 'grid'"):
        ViG(graph="grid", **SMALL)
    with pytest.raises(ValueError, match="power of two"):
        ViG(**dict(SMALL, patch_size=6))
    with pytest.raises(ValueError, match="\\[batch, 3, height, width\\]"):
        ViG(**SMALL)(torch.randn(1, 1, 32, 32))


def test_graph_corruption_reaches_every_grapher():
    model = timm.create_model("vig_ti", aggregator="gin", channels=16, depth=2, img_size=32,
                              patch_size=4, graph_corruption=0.5, num_classes=3)
    assert all(block[0].corruption == 0.5 for block in model.blocks)
    torch.manual_seed(0)
    clean = timm.create_model("vig_ti", aggregator="gin", channels=16, depth=2, img_size=32,
                              patch_size=4, num_classes=3).eval()
    torch.manual_seed(0)
    noisy = timm.create_model("vig_ti", aggregator="gin", channels=16, depth=2, img_size=32,
                              patch_size=4, num_classes=3, graph_corruption=1.0).eval()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(clean(x), noisy(x))  # same weights, another graph
    with pytest.raises(ValueError, match="corrupts kNN graphs"):
        timm.create_model("vig_ti", graph="svga", graph_corruption=0.5)


@pytest.mark.parametrize("aggregator", ["gin", "sage", "edge", "max_relative"])
def test_pyg_convs_on_the_masked_cyclic_graph_equal_the_edge_list(aggregator):
    """DAGC reaches the harness's convs in its cyclic form, every candidate an edge and the
    masked ones made neutral (no edge list whose size depends on the masks): outputs, gradients
    and BatchNorm statistics equal the edge list's."""
    from attvig_pyg.graphs import build_graph
    from attvig_pyg.models.vig import GraphConv
    torch.manual_seed(0)
    feature_map = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    cyclic = build_graph("dagc", feature_map, k=2, self_loops=True, cyclic=True)
    assert cyclic.density() < 1  # some candidates masked
    x = feature_map.permute(0, 2, 3, 1).reshape(-1, 16)
    weights = torch.randn(128, 16 if aggregator == "cross_attn" else 32, dtype=torch.float64)
    results = []
    for graph in (cyclic, cyclic.to_edge_index()):
        torch.manual_seed(1)
        conv = GraphConv(aggregator, 16).double().train()
        inputs = x.clone().requires_grad_(True)
        out = conv(inputs, graph)
        (out * weights).sum().backward()
        results.append((out, inputs.grad, {n: p.grad for n, p in conv.named_parameters()},
                        {n: b.clone() for n, b in conv.named_buffers()}))
    (out, grad, params, buffers), (out_ref, grad_ref, params_ref, buffers_ref) = results
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-10)
    for name in params_ref:
        torch.testing.assert_close(params[name], params_ref[name], rtol=1e-9, atol=1e-9,
                                   msg=name)
    for name in buffers_ref:
        torch.testing.assert_close(buffers[name], buffers_ref[name], msg=name)
