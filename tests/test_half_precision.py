"""Half precision (bfloat16, float16 autocast, as on GPUs; here torch's CPU autocast): the conv at
its numeric ends stays finite forward and backward, and a model's training step gives a finite
loss and finite gradients close to float32's."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import attvig_pyg.models  # noqa: F401
from attvig_pyg import CrossAttnConv
from attvig_pyg.adjacency import CyclicAdjacency, CyclicNeighbours
from torch_geometric import EdgeIndex
from families import first_output

DTYPES = [torch.bfloat16, torch.float16]


def lonely_graph(form: str):
    """Six nodes; node 0 receives nothing, node 5 only from node 0."""
    edge_index = torch.tensor([[1, 2, 3, 4, 0, 2], [2, 3, 4, 1, 5, 1]])
    if form == "edge_index":
        return edge_index
    if form == "EdgeIndex":
        return EdgeIndex(edge_index, sparse_size=(6, 6)).sort_by("col")[0]
    # Two cycles of three; every candidate of node 0 masked out.
    mask = torch.ones(2, 3, 2, dtype=torch.bool)
    mask[0, 0] = False
    return CyclicAdjacency([CyclicNeighbours(torch.arange(6).view(2, 3), (1, 2), mask)], 6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["edge_index", "EdgeIndex", "cyclic"])
@pytest.mark.parametrize("normalize", ["none", "softmax", "mean"])
def test_conv_finite_at_its_ends(dtype, form, normalize):
    """Zero feature vectors (a zero query or key), beta = 200 (weights down to exp(-400)) and a
    node without neighbours, forward and backward."""
    x = torch.randn(6, 16)
    x[1] = 0.0
    x[3] = 0.0
    x.requires_grad_(True)
    conv = CrossAttnConv(16, 16, heads=4, bias=False, normalize=normalize)
    with torch.no_grad():
        conv.log_beta.fill_(math.log(200.0))
    with torch.autocast("cpu", dtype=dtype):
        out = conv(x, lonely_graph(form))
    assert out.dtype == dtype
    out.float().square().sum().backward()
    assert torch.isfinite(out.float()).all()
    assert torch.isfinite(x.grad).all()
    for name, parameter in conv.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    with torch.no_grad():
        full = conv(x, lonely_graph(form))
    assert (out.float() - full).abs().max() < 0.1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,graph", [("attentionvig_s", "svga"), ("attentionvig_s", "dagc"),
                                        ("attentionvig_s", "knn"), ("greedyvig_s", "dagc")])
def test_training_step_finite_and_close_to_float32(dtype, name, graph):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, graph=graph).train()
    # (Batch 8: with 2 images the last stage's BatchNorm normalises 8 values per channel, and
    # bf16's 8-bit mantissa then turns float32's gradients around for any network.)
    images, labels = torch.randn(8, 3, 64, 64), torch.arange(8)
    F.cross_entropy(first_output(model(images)), labels).backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        loss = F.cross_entropy(first_output(model(images)), labels)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    scaler.scale(loss).backward()
    assert torch.isfinite(loss)
    scale = scaler.get_scale() if scaler.is_enabled() else 1.0
    half = {n: p.grad / scale for n, p in model.named_parameters() if p.grad is not None}
    assert half.keys() == full.keys()
    assert all(torch.isfinite(g).all() for g in half.values())
    flat_full = torch.cat([g.flatten() for g in full.values()])
    flat_half = torch.cat([half[n].flatten() for n in full])
    cosine = F.cosine_similarity(flat_full, flat_half, dim=0)
    assert cosine > 0.99, float(cosine)


@pytest.mark.parametrize("normalize", ["none", "softmax", "mean"])
def test_masked_candidates_above_the_peak_stay_out_of_the_exponent(normalize):
    """In float32 too: a masked candidate far more similar than its node's kept ones, at beta =
    200, once gave exp(400) = inf times its zero mask, NaN (and a NaN gradient for beta)."""
    x = torch.randn(6, 16)
    x[0] = x[1]  # node 1's masked candidate (node 0, one behind it) is x[1] itself
    mask = torch.tensor([[[True, False], [False, True], [True, True]],
                         [[True, True], [True, True], [True, True]]])
    cycles = torch.tensor([[0, 1, 2], [3, 4, 5]])
    adjacency = CyclicAdjacency([CyclicNeighbours(cycles, (1, 2), mask)], 6)
    conv = CrossAttnConv(16, 16, heads=2, normalize=normalize)
    with torch.no_grad():
        conv.log_beta.fill_(math.log(200.0))
        conv.lin_key.weight.copy_(conv.lin_query.weight)  # equal features: similarity 1
        conv.lin_key.bias.copy_(conv.lin_query.bias)
    x.requires_grad_(True)
    out = conv(x, adjacency)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(conv.log_beta.grad)
    expected = conv(x, adjacency.to_edge_index())
    torch.testing.assert_close(out, expected)
