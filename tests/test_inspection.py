"""attention_maps: what it reports equals what the layers compute, from an independent
computation, and the model is left as it was."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import attvig_pyg.models  # noqa: F401  (registers the models with timm)
from attvig_pyg.adjacency import CyclicAdjacency
from attvig_pyg.models.inspection import attention_maps
from attvig_pyg.nn import CrossAttnConv

TINY = dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), head_hidden_size=32, num_classes=4)


def record_inputs(model):
    """Each CrossAttnConv's node features and graph, as the model passes them."""
    seen, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, CrossAttnConv):
            def hook(_module, args, _output, name=name):
                seen.setdefault(name, (args[0].detach().clone(), args[1]))
            handles.append(module.register_forward_hook(hook))
    return seen, handles


@pytest.mark.parametrize("graph", ["svga", "dagc", "knn"])
def test_the_maps_are_what_the_layers_compute(graph):
    torch.manual_seed(0)
    model = timm.create_model("attentionvig_s", graph=graph, **TINY).double()
    with torch.no_grad():  # betas away from 1 and apart, so that a wrong beta would show
        for i, conv in enumerate(m for m in model.modules() if isinstance(m, CrossAttnConv)):
            conv.log_beta.fill_(math.log(2.0 + i))
    images = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    points = torch.tensor([[5.0, 70.0], [63.0, 0.0]])
    seen, handles = record_inputs(model)
    layers = attention_maps(model, images, points)
    for handle in handles:
        handle.remove()
    assert [layer.name for layer in layers] == list(seen)
    for layer in layers:
        conv = model.get_submodule(layer.name)
        x, adjacency = seen[layer.name]
        height, width = layer.grid
        heads, dim = conv.heads, conv.out_channels // conv.heads
        nodes = height * width
        assert x.size(0) == 2 * nodes
        # The location under each point, by the map's scale.
        expected_points = torch.stack([(points[:, 0] * height / 64).floor(),
                                       (points[:, 1] * width / 96).floor()], 1).long()
        assert torch.equal(layer.points, expected_points)
        # Eq. 4 from lin_query / lin_key by hand, over every location of the image.
        q = F.normalize((x @ conv.lin_query.weight.T + conv.lin_query.bias).view(-1, heads, dim),
                        dim=-1)
        k = F.normalize((x @ conv.lin_key.weight.T + conv.lin_key.bias).view(-1, heads, dim),
                        dim=-1)
        edges = adjacency.to_edge_index() if isinstance(adjacency, CyclicAdjacency) else \
            torch.as_tensor(adjacency)
        for image, (row, col) in enumerate(expected_points.tolist()):
            at = image * nodes + row * width + col
            direct = torch.einsum("hd,nhd->hn", q[at], k[image * nodes:(image + 1) * nodes])
            assert (layer.similarity[image].reshape(heads, -1) - direct).abs().max() < 1e-9
            # The neighbours are exactly the graph's edges into the location.
            sources = edges[0][edges[1] == at] - image * nodes
            expected = torch.stack([sources // width, sources % width], 1)
            assert torch.equal(layer.neighbours[image], expected)
            # The weights are Eq. 5 on those similarities (normalize="none").
            similarity = layer.similarity[image][:, expected[:, 0], expected[:, 1]].T
            assert torch.allclose(layer.weights[image],
                                  torch.exp(-layer.beta * (1 - similarity)), atol=1e-12)
            assert math.isclose(layer.beta, conv.beta.item())


def test_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    model = timm.create_model("attentionvig_s", **TINY)
    model.stages[0].blocks[0].mlp[0][1].eval()  # a mixed state, as in fine-tuning
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    before = model.eval()(x)
    model.train()
    model.stages[0].blocks[0].mlp[0][1].eval()
    attention_maps(model, x)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(model.eval()(x), before)


def test_the_vig_harness_and_larger_inputs():
    model = timm.create_model("vig_ti", aggregator="cross_attn", channels=32, depth=2, heads=4,
                              img_size=32, patch_size=4, num_classes=3)
    layers = attention_maps(model, torch.randn(1, 3, 64, 64))  # twice the training size
    assert [layer.grid for layer in layers] == [(16, 16), (16, 16)]
    assert [len(layer.neighbours[0]) for layer in layers] == [9, 18]  # k rises 9 -> 18


def test_clear_errors():
    model = timm.create_model("attentionvig_s", **TINY)
    with pytest.raises(ValueError, match="outside the 64x64 image"):
        attention_maps(model, torch.randn(1, 3, 64, 64), [64, 3])
    with pytest.raises(ValueError, match=r"one \(row, column\) point per image"):
        attention_maps(model, torch.randn(2, 3, 64, 64), [[1, 2, 3]])
    with pytest.raises(ValueError, match="no cross-attention Grapher"):
        attention_maps(timm.create_model("greedyvig_s", **TINY), torch.randn(1, 3, 64, 64))
