import math

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_torch_sparse
from reference import cross_attention

from attvig_pyg import CrossAttnConv, MaxRelativeConv
from attvig_pyg.adjacency import CyclicAdjacency, CyclicNeighbours
from attvig_pyg.graphs import build_graph, dagc_filter
from attvig_pyg.graphs.grid import as_feature_map, axial_parts
from torch_geometric import EdgeIndex
from torch_geometric.explain.algorithm.utils import clear_masks, set_masks
from torch_geometric.typing import SparseTensor
from torch_geometric.utils import coalesce, to_torch_csr_tensor


def random_graph(num_src, num_dst, num_edges, dtype=torch.float64, channels=(8, 8)):
    x_src = torch.randn(num_src, channels[0], dtype=dtype)
    x_dst = torch.randn(num_dst, channels[1], dtype=dtype)
    edge_index = torch.stack([torch.randint(0, num_src, (num_edges,)),
                              torch.randint(0, num_dst, (num_edges,))])
    return x_src, x_dst, edge_index


def make_conv(*args, **kwargs):
    conv = CrossAttnConv(*args, **kwargs).double()
    with torch.no_grad():  # a beta away from 1 so that a missing beta would show
        conv.log_beta.fill_(math.log(2.7))
    return conv


def on_path(edge_index, num_src, num_dst, path):
    """The adjacency that takes ``path``: a plain edge_index goes through propagate (per-edge
    messages), an EdgeIndex sorted by target through the fused kernels (PyG's rule)."""
    if path == "propagate":
        return edge_index
    return EdgeIndex(edge_index, sparse_size=(num_src, num_dst)).sort_by("col")[0]


PATHS = ["fused", "propagate"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("normalize", ["none", "softmax", "mean"])
@pytest.mark.parametrize("head_args", [{}, {"heads": 4}, {"head_dim": 2}])
def test_matches_reference_homogeneous(normalize, head_args, path):
    x, _, edge_index = random_graph(12, 12, 50)
    edge_index[:, :3] = torch.tensor([[5, 5, 5], [0, 0, 0]])  # repeated edges count repeatedly
    conv = make_conv(8, 8, normalize=normalize, **head_args)
    out = conv(x, on_path(edge_index, 12, 12, path))
    expected = cross_attention(conv, x, x, edge_index)
    assert (out - expected).abs().max() < 1e-9


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("normalize", ["none", "softmax", "mean"])
@pytest.mark.parametrize("heads", [1, 3])
def test_matches_reference_bipartite(normalize, heads, path):
    x_src, x_dst, edge_index = random_graph(9, 5, 30, channels=(7, 4))
    conv = make_conv((7, 4), 6, heads=heads, normalize=normalize)
    out = conv((x_src, x_dst), on_path(edge_index, 9, 5, path))
    assert out.shape == (5, 6)
    expected = cross_attention(conv, x_src, x_dst, edge_index)
    assert (out - expected).abs().max() < 1e-9


@pytest.mark.parametrize("path", PATHS)
def test_edge_permutation_invariance(path):
    x, _, edge_index = random_graph(20, 20, 120)
    conv = make_conv(8, 16, heads=4, normalize="softmax")
    perm = torch.randperm(edge_index.size(1))
    out, (edges, alpha) = conv(x, on_path(edge_index, 20, 20, path),
                               return_attention_weights=True)
    out_perm, (edges_perm, alpha_perm) = conv(x, on_path(edge_index[:, perm], 20, 20, path),
                                              return_attention_weights=True)
    assert torch.allclose(out, out_perm, atol=1e-12)
    by_edge = {tuple(e): a for e, a in zip(edges.t().tolist(), alpha)}  # no repeated edges here
    assert all(torch.allclose(by_edge[tuple(e)], a, atol=1e-12)
               for e, a in zip(edges_perm.t().tolist(), alpha_perm))


@pytest.mark.parametrize("path", PATHS)
def test_isolated_nodes_and_empty_graph(path):
    x, _, _ = random_graph(6, 6, 0)
    conv = make_conv(8, 8, heads=2, normalize="mean")
    out = conv(x, on_path(torch.tensor([[1, 2], [0, 0]]), 6, 6, path))
    # Nodes 1..5 receive nothing: their aggregated message is zero.
    lonely = F.gelu(conv.lin_out(torch.cat([x[1:], torch.zeros(5, 8, dtype=x.dtype)], dim=-1)))
    assert torch.allclose(out[1:], lonely, atol=1e-12)
    empty = conv(x, on_path(torch.empty(2, 0, dtype=torch.long), 6, 6, path))
    lonely_all = F.gelu(conv.lin_out(torch.cat([x, torch.zeros(6, 8, dtype=x.dtype)], dim=-1)))
    assert torch.allclose(empty, lonely_all, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("normalize", ["none", "softmax", "mean"])
def test_zero_features_are_finite(normalize, path):
    x = torch.zeros(5, 8, requires_grad=True)
    edge_index = torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 4, 0]])
    conv = make_conv(8, 8, heads=2, bias=False, normalize=normalize).float()
    out = conv(x, on_path(edge_index, 5, 5, path))
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters() if p.grad is not None)


def test_zero_features_finite_under_bfloat16_autocast():
    x = torch.zeros(5, 8)
    x[0] = 1.0
    edge_index = torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 4, 0]])
    conv = CrossAttnConv(8, 8, heads=2, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x, edge_index)
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("path", PATHS)
def test_gradcheck(path):
    x, _, edge_index = random_graph(6, 6, 14, channels=(4, 4))
    x.requires_grad_(True)
    edge_index = on_path(edge_index, 6, 6, path)
    conv = make_conv(4, 4, heads=2, normalize="softmax")
    assert torch.autograd.gradcheck(lambda t: conv(t, edge_index), (x,))
    conv.normalize = "none"
    assert torch.autograd.gradcheck(lambda t: conv(t, edge_index), (x,))


def test_attention_weights_range_without_normalization():
    x, _, edge_index = random_graph(30, 30, 200, dtype=torch.float32)
    conv = CrossAttnConv(8, 16, heads=4)
    with torch.no_grad():
        conv.log_beta.fill_(math.log(1.7))
    _, (returned_index, alpha) = conv(x, edge_index, return_attention_weights=True)
    assert returned_index is edge_index
    assert alpha.shape == (200, 4)
    beta = conv.beta.item()
    assert alpha.min() >= math.exp(-2 * beta) - 1e-6
    assert alpha.max() <= 1 + 1e-6


def test_softmax_and_mean_weights_sum_as_documented():
    x, _, edge_index = random_graph(10, 10, 60, dtype=torch.float32)
    ones = torch.ones(60)
    degree = torch.zeros(10).index_add_(0, edge_index[1], ones)
    for normalize in ("softmax", "mean"):
        conv = CrossAttnConv(8, 8, heads=2, normalize=normalize)
        _, (_, alpha) = conv(x, edge_index, return_attention_weights=True)
        per_node = torch.zeros(10, 2).index_add_(0, edge_index[1], alpha)
        if normalize == "softmax":
            assert torch.allclose(per_node[degree > 0], torch.ones(1), atol=1e-5)
        else:  # mean of values in [exp(-2 beta), 1]
            assert (per_node[degree > 0] <= 1 + 1e-6).all()
            assert (per_node[degree > 0] >= math.exp(-2 * conv.beta.item()) - 1e-6).all()


@pytest.mark.parametrize("path", PATHS)
def test_torch_sparse_csr_matches_edge_index(path):
    x, _, edge_index = random_graph(25, 25, 150, dtype=torch.float32)
    edge_index = coalesce(edge_index)  # a sparse adjacency cannot hold repeated edges
    conv = make_conv(8, 16, heads=4).float()
    expected = conv(x, edge_index)
    conv.fuse = path == "fused"  # PyG's switch: off, the sparse adjacency goes through message()
    adj = to_torch_csr_tensor(edge_index.flip(0), size=(25, 25))
    out, (adj_alpha, alpha) = conv(x, adj, return_attention_weights=True)
    assert torch.allclose(out, expected, atol=1e-6)
    assert adj_alpha.layout == torch.sparse_csr and alpha.shape == (edge_index.size(1), 4)


@requires_torch_sparse
@pytest.mark.parametrize("path", PATHS)
def test_sparse_tensor_matches_edge_index(path):
    x, _, edge_index = random_graph(25, 25, 150, dtype=torch.float32)
    edge_index = coalesce(edge_index)  # a sparse adjacency cannot hold repeated edges
    conv = make_conv(8, 16, heads=4, normalize="softmax").float()
    expected = conv(x, edge_index)
    conv.fuse = path == "fused"
    adj = SparseTensor.from_edge_index(edge_index.flip(0), sparse_sizes=(25, 25))
    out, adj_alpha = conv(x, adj, return_attention_weights=True)
    assert torch.allclose(out, expected, atol=1e-6)
    assert adj_alpha.storage.value().shape == (edge_index.size(1), 4)


def test_lazy_in_channels():
    conv = CrossAttnConv(-1, 12, heads=3)
    x, _, edge_index = random_graph(7, 7, 20, dtype=torch.float32, channels=(5, 5))
    assert conv(x, edge_index).shape == (7, 12)
    assert conv.lin_out.weight.shape == (12, 17)
    bipartite = CrossAttnConv((-1, -1), 6)
    x_src, x_dst, edge_index = random_graph(7, 3, 20, dtype=torch.float32, channels=(5, 2))
    assert bipartite((x_src, x_dst), edge_index).shape == (3, 6)


@pytest.mark.parametrize("path", PATHS)
def test_dropout_acts_on_attention_only_in_training(path):
    x, _, edge_index = random_graph(10, 10, 40, dtype=torch.float32)
    edge_index = on_path(edge_index, 10, 10, path)
    conv = make_conv(8, 8, dropout=1.0).float()
    without_dropout = make_conv(8, 8, dropout=0.0).float()
    without_dropout.load_state_dict(conv.state_dict())
    no_message = F.gelu(conv.lin_out(torch.cat([x, torch.zeros_like(x)], dim=-1)))
    conv.eval()  # dropout off: the messages arrive
    assert torch.allclose(conv(x, edge_index), without_dropout(x, edge_index), atol=1e-6)
    assert not torch.allclose(conv(x, edge_index), no_message, atol=1e-3)
    conv.train()  # every attention weight dropped: no message arrives
    assert torch.allclose(conv(x, edge_index), no_message, atol=1e-6)


def test_reset_parameters_resets():
    conv = CrossAttnConv(8, 8, heads=2, beta_init=3.0)
    assert math.isclose(conv.beta.item(), 3.0, rel_tol=1e-6)
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    with torch.no_grad():
        for p in conv.parameters():
            p.add_(1.0)
    conv.reset_parameters()
    after = conv.state_dict()
    assert math.isclose(conv.beta.item(), 3.0, rel_tol=1e-6)
    for name, value in after.items():
        if name == "log_beta":
            continue
        assert not torch.equal(value, before[name] + 1.0), name
        assert not torch.equal(value, before[name]), f"{name} was not re-drawn"


@pytest.mark.parametrize("how", ["method", "flag"])
def test_freeze_beta(how):
    if how == "method":
        conv = CrossAttnConv(8, 8, beta_init=2.0).freeze_beta()
    else:
        conv = CrossAttnConv(8, 8, beta_init=2.0, train_beta=False)
    x, _, edge_index = random_graph(10, 10, 40, dtype=torch.float32)
    optimizer = torch.optim.AdamW(conv.parameters(), lr=0.1, weight_decay=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        conv(x, edge_index).square().sum().backward()
        optimizer.step()
    assert conv.log_beta.grad is None
    assert math.isclose(conv.beta.item(), 2.0, rel_tol=1e-6)


def test_beta_learns_by_default():
    conv = CrossAttnConv(8, 8, beta_init=2.0)
    x, _, edge_index = random_graph(10, 10, 40, dtype=torch.float32)
    conv(x, edge_index).square().sum().backward()
    assert conv.log_beta.grad is not None and conv.log_beta.grad.abs() > 0


def test_fused_and_propagate_paths_agree_in_values_and_gradients():
    x, _, edge_index = random_graph(40, 40, 300)
    x.requires_grad_(True)
    conv = make_conv(8, 16, heads=4, normalize="mean")
    results = []
    for adjacency in (on_path(edge_index, 40, 40, "fused"), edge_index):
        out = conv(x, adjacency)
        results.append([out, *torch.autograd.grad(out.square().sum(), [x, *conv.parameters()])])
    for a, b in zip(*results):
        assert (a - b).abs().max() < 1e-9


def test_which_path_runs_follows_pyg_rule():
    """Per-edge messages (which hooks and explainers see) on a plain edge_index, or with
    conv.fuse = False; message_and_aggregate on an EdgeIndex sorted by target."""
    x, _, edge_index = random_graph(10, 10, 40, dtype=torch.float32)
    conv = CrossAttnConv(8, 8, heads=2)
    seen = []
    conv.register_message_forward_hook(lambda module, inputs, output:
                                       seen.append(("message", inputs[0]["alpha"].shape)))
    conv.register_message_and_aggregate_forward_hook(lambda module, inputs, output:
                                                     seen.append(("fused", output.shape)))
    sorted_edges = on_path(edge_index, 10, 10, "fused")
    conv(x, edge_index)
    conv(x, sorted_edges)
    conv.fuse = False
    conv(x, sorted_edges)
    assert seen == [("message", (40, 2)), ("fused", (10, 2, 4)), ("message", (40, 2))]
    conv.fuse = True
    set_masks(conv, torch.ones(40), sorted_edges, apply_sigmoid=False)  # as explainers do
    seen.clear()
    conv(x, sorted_edges)
    clear_masks(conv)
    assert [kind for kind, _ in seen] == ["message"]


def test_repr():
    assert repr(CrossAttnConv(8, 16, heads=4)) == \
        "CrossAttnConv(8, 16, heads=4, normalize='none')"


@pytest.mark.parametrize("kwargs, message", [
    ({"heads": 3}, "divisible by 'heads'"),
    ({"head_dim": 5}, "multiple of 'head_dim'"),
    ({"heads": 2, "head_dim": 4}, "not both"),
    ({"normalize": "sigmoid"}, "Unknown 'normalize' mode 'sigmoid'"),
    ({"beta_init": 0.0}, "'beta_init' must be a positive finite number"),
    ({"beta_init": float("nan")}, "'beta_init' must be a positive finite number"),
])
def test_bad_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CrossAttnConv(8, 16, **kwargs)


def test_bad_inputs():
    conv = CrossAttnConv(8, 8)
    x = torch.randn(5, 8)
    good = torch.tensor([[0, 1], [1, 2]])
    with pytest.raises(IndexError, match="source node id 5, outside the valid range"):
        conv(x, torch.tensor([[0, 5], [1, 2]]))
    with pytest.raises(IndexError, match="target node id -1"):
        conv(x, torch.tensor([[0, 1], [1, -1]]))
    with pytest.raises(IndexError, match="target node id 3, outside the valid range \\[0, 2\\]"):
        CrossAttnConv((8, 8), 8)((x, torch.randn(3, 8)), torch.tensor([[4], [3]]))
    with pytest.raises(ValueError, match="with 8 channels \\(got 7\\)"):
        conv(torch.randn(5, 7), good)
    with pytest.raises(ValueError, match="3 dimensions"):
        conv(torch.randn(1, 5, 8), good)
    with pytest.raises(ValueError, match="shape \\[2, num_edges\\]"):
        conv(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer dtype"):
        conv(x, good.float())
    with pytest.raises(ValueError, match="integer dtype \\(got torch.bool\\)"):
        conv(x, good.bool())  # would read as node ids 0 and 1
    with pytest.raises(ValueError, match="'beta_init' must be a positive finite number"):
        CrossAttnConv(8, 8, beta_init=float("nan"))
    with pytest.raises(ValueError, match="sparse adjacency of size \\[5, 5\\]"):
        conv(x, to_torch_csr_tensor(good, size=(6, 6)))
    with pytest.raises(TypeError, match="or CyclicAdjacency \\(got list\\)"):
        conv(x, [[0, 1], [1, 2]])


def test_no_graph_break_under_dynamo():
    conv = CrossAttnConv(8, 16, heads=4)
    x, _, edge_index = random_graph(20, 20, 80, dtype=torch.float32)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(conv)(x, edge_index)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_compiled_matches_eager():
    conv = CrossAttnConv(8, 16, heads=4)
    x, _, edge_index = random_graph(20, 20, 80, dtype=torch.float32)
    compiled = torch.compile(conv, fullgraph=True)
    assert torch.allclose(compiled(x, edge_index), conv(x, edge_index), atol=1e-5)


# (batch, height, width, K): K divides the grid, does not, per-axis K, degenerate grids.
CYCLIC_GRIDS = [(1, 80, 80, 11), (3, 128, 96, (18, 13)), (3, 7, 5, 3), (1, 1, 1, 1),
                (3, 8, 8, 2), (1, 6, 10, (2, 4))]


def grid_adjacency(policy, x, k, self_loops, grid_size, form):
    """The builders' cyclic form, or the line form torch.export traces at symbolic sizes."""
    if form == "cycles":
        return build_graph(policy, x, k=k, self_loops=self_loops, cyclic=True,
                           grid_size=grid_size)
    height, width = grid_size
    batch_size = x.size(0) // (height * width)
    steps = (k, k) if isinstance(k, int) else k
    lines = CyclicAdjacency(axial_parts(batch_size, height, width, steps, self_loops,
                                        lines=True), x.size(0))
    return lines if policy == "svga" else dagc_filter(as_feature_map(x, grid_size), lines)


@pytest.mark.parametrize("policy", ["svga", "dagc"])
@pytest.mark.parametrize("normalize", ["none", "softmax", "mean"])
@pytest.mark.parametrize("heads", [1, 8])
@pytest.mark.parametrize("form", ["cycles", "lines"])
def test_cyclic_adjacency_equals_its_edge_index(policy, normalize, heads, form):
    """Forward, every returned weight and the gradients of the input and of every parameter, in
    float64, on grids where K divides the size and where it does not, with and without
    self-loops; for both forms of the axial graphs."""
    for (batch_size, height, width, k), self_loops in zip(CYCLIC_GRIDS * 2,
                                                         [False] * 6 + [True] * 6):
        if height * width > 1000 and (self_loops or form == "lines"):
            continue  # the large grids once per combination are enough (lines: T^2 per line)
        conv = make_conv(16, 16, heads=heads, normalize=normalize)
        x = torch.randn(batch_size * height * width, 16, dtype=torch.float64, requires_grad=True)
        adjacency = grid_adjacency(policy, x.detach(), k, self_loops, (height, width), form)
        edge_index = adjacency.to_edge_index()
        out, (edges, alpha) = conv(x, adjacency, return_attention_weights=True)
        expected, (_, expected_alpha) = conv(x, edge_index, return_attention_weights=True)
        assert torch.equal(edges, edge_index)
        assert (out - expected).abs().max() < 1e-9
        assert alpha.shape == expected_alpha.shape == (edge_index.size(1), heads)
        assert alpha.numel() == 0 or (alpha - expected_alpha).abs().max() < 1e-9
        inputs = [x, *conv.parameters()]
        grads = torch.autograd.grad(out.square().sum(), inputs, materialize_grads=True)
        expected_grads = torch.autograd.grad(expected.square().sum(), inputs,
                                             materialize_grads=True)
        for grad, expected_grad in zip(grads, expected_grads):
            assert (grad - expected_grad).abs().max() < 1e-9


@pytest.mark.parametrize("policy", ["svga", "dagc"])
def test_permutation_parts_equal_the_general_path(policy):
    """Parts that know their inverse (the builders') move values by gathering alone; the same
    parts without it take index_add: equal outputs and gradients."""
    x = torch.randn(2 * 9 * 7, 16, dtype=torch.float64, requires_grad=True)
    adjacency = build_graph(policy, x.detach(), k=(2, 3), self_loops=True, cyclic=True,
                            grid_size=(9, 7))
    assert all(part.inverse is not None for part in adjacency.parts)
    general = CyclicAdjacency([CyclicNeighbours(part.cycles, part.offsets, part.mask)
                               for part in adjacency.parts], adjacency.num_nodes)
    conv = make_conv(16, 16, heads=4)
    inputs = [x, *conv.parameters()]
    outs = [conv(x, graph) for graph in (adjacency, general)]
    grads = [torch.autograd.grad(out.square().sum(), inputs) for out in outs]
    assert (outs[0] - outs[1]).abs().max() < 1e-12
    for fast, plain in zip(*grads):
        assert (fast - plain).abs().max() < 1e-12


def test_cyclic_adjacency_matches_the_reference():
    """Against the per-node loop of tests/reference.py, a masked part included."""
    x = torch.randn(12, 8, dtype=torch.float64)
    mask = torch.rand(3, 4, 2) > 0.3
    adjacency = CyclicAdjacency([CyclicNeighbours(torch.randperm(12).view(3, 4), (1, 3), mask),
                                 CyclicNeighbours(torch.arange(12).view(2, 6), (0, 2))], 12)
    for normalize in ("none", "softmax", "mean"):
        conv = make_conv(8, 8, heads=2, normalize=normalize)
        expected = cross_attention(conv, x, x, adjacency.to_edge_index())
        assert (conv(x, adjacency) - expected).abs().max() < 1e-9


def test_softmax_at_large_beta_is_finite_and_sums_to_one_on_every_path():
    x = torch.randn(2 * 9 * 11, 16, dtype=torch.float64)
    adjacency = build_graph("svga", x, k=(2, 3), cyclic=True, grid_size=(9, 11))
    edge_index = adjacency.to_edge_index()
    conv = make_conv(16, 16, heads=4, normalize="softmax")
    with torch.no_grad():
        conv.log_beta.fill_(math.log(200.0))
    for adjacency_form in (adjacency, edge_index, on_path(edge_index, 198, 198, "fused")):
        out, (edges, alpha) = conv(x, adjacency_form, return_attention_weights=True)
        assert torch.isfinite(out).all() and torch.isfinite(alpha).all()
        per_node = torch.zeros(198, 4, dtype=alpha.dtype).index_add_(0, edges[1], alpha)
        assert (per_node - 1).abs().max() < 1e-12


def test_cyclic_adjacency_dropout_only_in_training():
    x = torch.randn(2 * 36, 8)
    adjacency = build_graph("svga", x, k=2, cyclic=True, grid_size=(6, 6))
    conv = CrossAttnConv(8, 8, dropout=1.0)
    no_message = F.gelu(conv.lin_out(torch.cat([x, torch.zeros_like(x)], dim=-1)))
    assert torch.allclose(conv(x, adjacency), no_message, atol=1e-6)
    conv.eval()
    assert torch.allclose(conv(x, adjacency), conv(x, adjacency.to_edge_index()), atol=1e-6)
    assert not torch.allclose(conv(x, adjacency), no_message, atol=1e-3)


def test_cyclic_adjacency_bad_input():
    conv = CrossAttnConv(8, 8)
    adjacency = build_graph("svga", torch.randn(36, 8), k=2, cyclic=True, grid_size=(6, 6))
    with pytest.raises(ValueError, match="graph on 36 nodes, but the node features hold 30"):
        conv(torch.randn(30, 8), adjacency)
    with pytest.raises(ValueError, match="single node feature tensor"):
        CrossAttnConv((8, 8), 8)((torch.randn(36, 8), torch.randn(36, 8)), adjacency)


def test_cyclic_adjacency_no_graph_break_under_dynamo():
    conv = CrossAttnConv(8, 16, heads=4)
    x = torch.randn(2 * 48, 8)
    adjacency = build_graph("dagc", x, k=2, cyclic=True, grid_size=(6, 8))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(conv)(x, adjacency)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("convolution", [CrossAttnConv(8, 8, heads=2), MaxRelativeConv(8, 8)])
def test_an_uncoalesced_coo_adjacency_is_left_as_it_was(convolution):
    """PyG's to_edge_index flags a COO tensor coalesced in place; the convs must not let it
    (another layer would then read the repeated entries as one edge less)."""
    edge_index = torch.tensor([[0, 1, 2, 2, 0], [1, 2, 0, 0, 1]])
    adjacency = torch.sparse_coo_tensor(edge_index.flip(0), torch.ones(5), (3, 3))
    indices = adjacency._indices().clone()
    out = convolution(torch.randn(3, 8), adjacency)
    assert not adjacency.is_coalesced() and torch.equal(adjacency._indices(), indices)
    # The conv read it as a sparse tensor means it: repeated entries are one edge.
    x = torch.randn(3, 8)
    assert torch.allclose(convolution(x, adjacency), convolution(x, coalesce(edge_index)),
                          atol=1e-6)
    assert out.shape == (3, 8)


# ---- edge features (edge_dim), an extension beyond the paper ---------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("normalize", ["none", "softmax", "mean"])
@pytest.mark.parametrize("heads", [1, 4])
def test_edge_features_match_the_reference(path, normalize, heads):
    x, _, edge_index = random_graph(12, 12, 50)
    edge_index[:, :3] = torch.tensor([[5, 5, 5], [0, 0, 0]])  # repeated edges, own features
    edge_attr = torch.randn(50, 3, dtype=torch.float64)
    conv = make_conv(8, 8, heads=heads, normalize=normalize, edge_dim=3)
    adjacency, order = edge_index, torch.arange(50)
    if path == "fused":  # an EdgeIndex sorted by target: the features follow the edges
        adjacency, order = EdgeIndex(edge_index, sparse_size=(12, 12)).sort_by("col")
    out, (edges, alpha) = conv(x, adjacency, edge_attr[order], return_attention_weights=True)
    assert (out - cross_attention(conv, x, x, edge_index, edge_attr)).abs().max() < 1e-9
    assert torch.equal(torch.as_tensor(edges), edge_index[:, order])
    # Bipartite too.
    x_src, x_dst, bipartite = random_graph(9, 5, 30, channels=(7, 4))
    conv = make_conv((7, 4), 8, heads=heads, normalize=normalize, edge_dim=2)
    features = torch.randn(30, 2, dtype=torch.float64)
    assert (conv((x_src, x_dst), bipartite, features) -
            cross_attention(conv, x_src, x_dst, bipartite, features)).abs().max() < 1e-9


@pytest.mark.parametrize("form", ["torch_csr", pytest.param("torch_sparse",
                                                            marks=requires_torch_sparse)])
def test_edge_features_on_sparse_adjacencies(form):
    """A sparse adjacency takes the features in the order of its stored entries."""
    from torch_geometric.utils import to_edge_index

    x, _, edge_index = random_graph(15, 15, 70)
    edge_index = coalesce(edge_index)
    features = {tuple(e): f for e, f in zip(edge_index.t().tolist(),
                                            torch.randn(edge_index.size(1), 3,
                                                        dtype=torch.float64))}
    conv = make_conv(8, 8, heads=2, normalize="softmax", edge_dim=3)
    if form == "torch_csr":
        adjacency = to_torch_csr_tensor(edge_index.flip(0), size=(15, 15))
    else:
        adjacency = SparseTensor.from_edge_index(edge_index.flip(0), sparse_sizes=(15, 15))
    stored, _ = to_edge_index(adjacency)  # rows: targets, columns: sources
    edge_attr = torch.stack([features[(j, i)] for i, j in stored.t().tolist()])
    expected = cross_attention(conv, x, x, edge_index, torch.stack(list(features.values())))
    for fuse in (True, False):
        conv.fuse = fuse
        assert (conv(x, adjacency, edge_attr) - expected).abs().max() < 1e-9


def test_without_edge_features_the_conv_is_the_papers():
    conv = CrossAttnConv(8, 8, heads=2)
    assert conv.lin_edge is None and conv.edge_dim is None
    assert sorted(conv.state_dict()) == sorted(
        f"lin_{name}.{p}" for name in ("query", "key", "value", "out")
        for p in ("weight", "bias")) + ["log_beta"]


def test_bad_edge_features():
    x, _, edge_index = random_graph(6, 6, 10, dtype=torch.float32)
    with_edges, without = CrossAttnConv(8, 8, edge_dim=3), CrossAttnConv(8, 8)
    with pytest.raises(ValueError, match=r"shape \[10, 3\]"):
        with_edges(x, edge_index, torch.randn(9, 3))
    with pytest.raises(ValueError, match="floating point"):
        with_edges(x, edge_index, torch.ones(10, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="pass edge_attr"):
        with_edges(x, edge_index)
    with pytest.raises(ValueError, match="without edge features"):
        without(x, edge_index, torch.randn(10, 3))
    adjacency = build_graph("svga", torch.randn(36, 8), k=2, cyclic=True, grid_size=(6, 6))
    with pytest.raises(ValueError, match="CyclicAdjacency carries no edge features"):
        with_edges(torch.randn(36, 8), adjacency, torch.randn(adjacency.num_edges(), 3))
