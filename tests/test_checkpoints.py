"""Official GreedyViG and Vision GNN checkpoints: every key of the official layouts (written down
here from the official model code as facts: names and shapes) has exactly one place, the graph
conv's re-ordering computes the official max-relative conv, and timm's pretrained path loads the
files. The released files themselves cannot be fetched here: state dicts of the official layout
with random tensors stand in for them."""
import math
from collections import OrderedDict

import pytest
import timm
import torch
import torch.nn.functional as F

from attvig_pyg.models import greedyvig, vig
from attvig_pyg.models.complexity import multiply_adds


def batch_norm(prefix, channels):
    return {f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,),
            f"{prefix}.running_mean": (channels,), f"{prefix}.running_var": (channels,),
            f"{prefix}.num_batches_tracked": ()}


def conv(prefix, out, inputs, kernel=1):
    return {f"{prefix}.weight": (out, inputs, kernel, kernel), f"{prefix}.bias": (out,)}


def official_greedyvig_layout(blocks, channels, emb=768, classes=1000):
    """GreedyViG's official state dict (models/greedyvig.py): names and shapes."""
    layout = {**conv("stem.stem.0", channels[0] // 2, 3, 3), **batch_norm("stem.stem.1",
                                                                           channels[0] // 2),
              **conv("stem.stem.3", channels[0], channels[0] // 2, 3),
              **batch_norm("stem.stem.4", channels[0])}
    for i, ((irbs, graphers), c) in enumerate(zip(blocks, channels)):
        j = 0
        if i > 0:
            layout.update({**conv(f"backbone.{i}.0.conv.0", c, channels[i - 1], 3),
                           **batch_norm(f"backbone.{i}.0.conv.1", c)})
            j = 1
        for _ in range(irbs):
            p = f"backbone.{i}.{j}"
            layout.update({**conv(f"{p}.dws.pw1", 4 * c, c), **batch_norm(f"{p}.dws.norm1", 4 * c),
                           **conv(f"{p}.dws.dw", 4 * c, 1, 3),
                           **batch_norm(f"{p}.dws.norm2", 4 * c),
                           **conv(f"{p}.dws.pw2", c, 4 * c), **batch_norm(f"{p}.dws.norm3", c),
                           f"{p}.layer_scale_2": (c,)})
            j += 1
        for _ in range(graphers):
            p = f"backbone.{i}.{j}"
            layout.update({**conv(f"{p}.mixer.cpe.pe", c, 1, 7), **conv(f"{p}.mixer.fc1.0", c, c),
                           **batch_norm(f"{p}.mixer.fc1.1", c),
                           **conv(f"{p}.mixer.graph_conv.nn.0", c, 2 * c),
                           **batch_norm(f"{p}.mixer.graph_conv.nn.1", c),
                           **conv(f"{p}.mixer.fc2.0", c, c), **batch_norm(f"{p}.mixer.fc2.1", c),
                           **conv(f"{p}.ffn.0", 4 * c, c), **batch_norm(f"{p}.ffn.1", 4 * c),
                           **conv(f"{p}.ffn.3", c, 4 * c), **batch_norm(f"{p}.ffn.4", c),
                           f"{p}.layer_scale_1": (c,), f"{p}.layer_scale_2": (c,)})
            j += 1
    layout.update({**conv("prediction.1", emb, channels[-1]), **batch_norm("prediction.2", emb),
                   **conv("head", classes, emb), **conv("dist_head", classes, emb)})
    return layout


def official_vig_ti_layout(classes=1000):
    """Vision GNN's official vig_ti_224_gelu state dict (vig_pytorch/vig.py, gcn_lib)."""
    layout, width = {}, 3
    for index, out in zip((0, 3, 6, 9), (24, 48, 96, 192)):
        layout.update({**conv(f"stem.convs.{index}", out, width, 3),
                       **batch_norm(f"stem.convs.{index + 1}", out)})
        width = out
    layout.update({**conv("stem.convs.12", 192, 192, 3), **batch_norm("stem.convs.13", 192),
                   "pos_embed": (1, 192, 14, 14)})
    for i in range(12):
        p = f"backbone.{i}"
        layout.update({**conv(f"{p}.0.fc1.0", 192, 192), **batch_norm(f"{p}.0.fc1.1", 192),
                       **conv(f"{p}.0.graph_conv.gconv.nn.0", 384, 96),  # groups=4
                       **batch_norm(f"{p}.0.graph_conv.gconv.nn.1", 384),
                       **conv(f"{p}.0.fc2.0", 192, 384), **batch_norm(f"{p}.0.fc2.1", 192),
                       **conv(f"{p}.1.fc1.0", 768, 192), **batch_norm(f"{p}.1.fc1.1", 768),
                       **conv(f"{p}.1.fc2.0", 192, 768), **batch_norm(f"{p}.1.fc2.1", 192)})
    layout.update({**conv("prediction.0", 1024, 192), **batch_norm("prediction.1", 1024),
                   **conv("prediction.4", classes, 1024)})
    return layout


def random_state(layout, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return OrderedDict((name, torch.randint(0, 5, shape, generator=generator) if
                        name.endswith("num_batches_tracked") else
                        torch.rand(shape, generator=generator) + 0.5 if name.endswith("running_var")
                        else torch.randn(shape, generator=generator))
                       for name, shape in layout.items())


GREEDYVIG = {"greedyvig_s": ([[2, 2], [2, 2], [6, 2], [2, 2]], [48, 96, 192, 384]),
             "greedyvig_m": ([[3, 3], [3, 3], [9, 3], [3, 3]], [56, 112, 224, 448]),
             "greedyvig_b": ([[4, 4], [4, 4], [12, 4], [3, 3]], [64, 128, 256, 512])}


@pytest.mark.parametrize("name", list(GREEDYVIG))
def test_every_official_greedyvig_key_has_exactly_one_place(name):
    official = random_state(official_greedyvig_layout(*GREEDYVIG[name]))
    model = timm.create_model(name)
    mapped = greedyvig.checkpoint_filter_fn(official, model)
    assert len(mapped) == len(official) == len(model.state_dict())
    model.load_state_dict(mapped, strict=True)
    # The filter passes this layout through unchanged (what timm's path needs).
    assert greedyvig.checkpoint_filter_fn(mapped, model) is not None
    assert torch.equal(model.stem[0][0].weight, official["stem.stem.0.weight"])
    assert torch.equal(model.head.weight, official["head.weight"].flatten(1))


def test_the_reordered_graph_conv_computes_the_official_one():
    """The official Grapher applies a 1x1 conv to [x, x_j] (two channel blocks); ours to the
    interleaved pairs. Same input, same numbers."""
    official = random_state(official_greedyvig_layout(*GREEDYVIG["greedyvig_s"]))
    model = timm.create_model("greedyvig_s")
    model.load_state_dict(greedyvig.checkpoint_filter_fn(official, model))
    conv = model.stages[0].blocks[2].mixer.conv  # the first Grapher of stage 1
    x, relative = torch.randn(30, 48), torch.randn(30, 48)
    weight = official["backbone.0.2.mixer.graph_conv.nn.0.weight"]
    bias = official["backbone.0.2.mixer.graph_conv.nn.0.bias"]
    expected = F.conv2d(torch.cat([x, relative], 1)[..., None, None], weight, bias)[..., 0, 0]
    interleaved = torch.stack([x, relative], dim=-1).flatten(1)
    assert torch.allclose(conv.lin(interleaved), expected, atol=1e-5)


def test_official_files_load_through_timm_wrapped_or_prefixed(tmp_path):
    official = random_state(official_greedyvig_layout(*GREEDYVIG["greedyvig_s"]))
    for name, content in (("plain.pth", official), ("wrapped.pth", {"model": official}),
                          ("prefixed.pth", {"state_dict": {f"module.{k}": v
                                                           for k, v in official.items()}})):
        torch.save(content, tmp_path / name)
        model = timm.create_model("greedyvig_s", pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / name)))
        assert torch.equal(model.stages[3].blocks[-1].layer_scale_2,
                           official["backbone.3.4.layer_scale_2"]), name
    # Another number of classes: timm re-initialises the classifiers, the rest loads.
    model = timm.create_model("greedyvig_s", pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "plain.pth")))
    assert model.head.weight.shape == (10, 768)


def test_a_checkpoint_of_another_architecture_is_refused_naming_keys():
    official = random_state(official_greedyvig_layout(*GREEDYVIG["greedyvig_s"]))
    with pytest.raises(ValueError, match="GreedyViG checkpoint key "
                                         "'backbone.0.2.mixer.cpe.pe.weight' has no place"):
        greedyvig.checkpoint_filter_fn(official, timm.create_model("greedyvig_m"))
    del official["backbone.1.3.ffn.0.bias"]
    with pytest.raises(ValueError, match="missing stages.1.blocks.2.ffn.0.0.bias"):
        greedyvig.checkpoint_filter_fn(official, timm.create_model("greedyvig_s"))
    with pytest.raises(ValueError, match="Expected a state dict of tensors"):
        greedyvig.checkpoint_filter_fn({"model": "weights"}, timm.create_model("greedyvig_s"))


def test_official_vig_ti_loads_into_the_max_relative_harness(tmp_path):
    official = random_state(official_vig_ti_layout())
    model = timm.create_model("vig_ti", aggregator="max_relative")
    mapped = vig.checkpoint_filter_fn(official, model)
    assert len(mapped) == len(official) == len(model.state_dict())
    model.load_state_dict(mapped, strict=True)
    torch.save({"model": official}, tmp_path / "vig_ti.pth")
    loaded = timm.create_model("vig_ti", aggregator="max_relative", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "vig_ti.pth")))
    assert torch.equal(loaded.pos_embed, official["pos_embed"])
    with pytest.raises(ValueError, match="aggregates with 'cross_attn'"):
        vig.checkpoint_filter_fn(official, timm.create_model("vig_ti", aggregator="cross_attn"))


def test_greedyvig_keeps_k_8_4_2_1_at_any_input_size():
    model = timm.create_model("greedyvig_s")
    for size in (224, (256, 320), 512):
        assert [stage["k"] for stage in model.graph_summary(size)] == [
            (8, 8), (4, 4), (2, 2), (1, 1)]
    b = timm.create_model("greedyvig_b")
    assert [sum(1 for block in stage.blocks if hasattr(block, "mixer"))
            for stage in b.stages] == [4, 4, 4, 3]


@pytest.mark.parametrize("name, params, macs", [("greedyvig_s", 11.98, 1.60),
                                                ("greedyvig_m", 21.93, 3.15),
                                                ("greedyvig_b", 30.91, 5.12)])
def test_greedyvig_sizes_are_the_official_ones(name, params, macs):
    model = timm.create_model(name)
    assert math.isclose(sum(p.numel() for p in model.parameters()) / 1e6, params, abs_tol=0.005)
    assert abs(multiply_adds(model, 224) / 1e9 / macs - 1) < 0.02
