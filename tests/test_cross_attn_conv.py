import math

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_torch_sparse
from reference import cross_attention

from attvig_pyg import CrossAttnConv
from attvig_pyg.adjacency import BlockAdjacency
from attvig_pyg.graphs import build_graph
from torch_geometric.typing import SparseTensor
from torch_geometric.utils import coalesce, to_torch_csr_tensor


def random_graph(num_src, num_dst, num_edges, dtype=torch.float64, channels=(8, 8)):
    x_src = torch.randn(num_src, channels[0], dtype=dtype)
    x_dst = torch.randn(num_dst, channels[1], dtype=dtype)
    edge_index = torch.stack([torch.randint(0, num_src, (num_edges,)),
                              torch.randint(0, num_dst, (num_edges,))])
    return x_src, x_dst, edge_index


def make_conv(*args, path="fused", **kwargs):
    conv = CrossAttnConv(*args, **kwargs).double()
    with torch.no_grad():  # a beta away from 1 so that a missing beta would show
        conv.log_beta.fill_(math.log(2.7))
    if path == "propagate":  # an observer of message() makes the conv use propagate()
        conv.register_message_forward_hook(lambda module, inputs, output: None)
    return conv


PATHS = ["fused", "propagate"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("normalize", ["none", "softmax", "mean"])
@pytest.mark.parametrize("head_args", [{}, {"heads": 4}, {"head_dim": 2}])
def test_matches_reference_homogeneous(normalize, head_args, path):
    x, _, edge_index = random_graph(12, 12, 50)
    edge_index[:, :3] = torch.tensor([[5, 5, 5], [0, 0, 0]])  # repeated edges count repeatedly
    conv = make_conv(8, 8, normalize=normalize, path=path, **head_args)
    out = conv(x, edge_index)
    expected = cross_attention(conv, x, x, edge_index)
    assert (out - expected).abs().max() < 1e-9


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("normalize", ["none", "softmax", "mean"])
@pytest.mark.parametrize("heads", [1, 3])
def test_matches_reference_bipartite(normalize, heads, path):
    x_src, x_dst, edge_index = random_graph(9, 5, 30, channels=(7, 4))
    conv = make_conv((7, 4), 6, heads=heads, normalize=normalize, path=path)
    out = conv((x_src, x_dst), edge_index)
    assert out.shape == (5, 6)
    expected = cross_attention(conv, x_src, x_dst, edge_index)
    assert (out - expected).abs().max() < 1e-9


@pytest.mark.parametrize("path", PATHS)
def test_edge_permutation_invariance(path):
    x, _, edge_index = random_graph(20, 20, 120)
    conv = make_conv(8, 16, heads=4, normalize="softmax", path=path)
    perm = torch.randperm(edge_index.size(1))
    out, (_, alpha) = conv(x, edge_index, return_attention_weights=True)
    out_perm, (_, alpha_perm) = conv(x, edge_index[:, perm], return_attention_weights=True)
    assert torch.allclose(out, out_perm, atol=1e-12)
    assert torch.allclose(alpha[perm], alpha_perm, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_isolated_nodes_and_empty_graph(path):
    x, _, _ = random_graph(6, 6, 0)
    conv = make_conv(8, 8, heads=2, normalize="mean", path=path)
    edge_index = torch.tensor([[1, 2], [0, 0]])
    out = conv(x, edge_index)
    # Nodes 1..5 receive nothing: their aggregated message is zero.
    lonely = F.gelu(conv.lin_out(torch.cat([x[1:], torch.zeros(5, 8, dtype=x.dtype)], dim=-1)))
    assert torch.allclose(out[1:], lonely, atol=1e-12)
    empty = conv(x, torch.empty(2, 0, dtype=torch.long))
    lonely_all = F.gelu(conv.lin_out(torch.cat([x, torch.zeros(6, 8, dtype=x.dtype)], dim=-1)))
    assert torch.allclose(empty, lonely_all, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("normalize", ["none", "softmax", "mean"])
def test_zero_features_are_finite(normalize, path):
    x = torch.zeros(5, 8, requires_grad=True)
    edge_index = torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 4, 0]])
    conv = make_conv(8, 8, heads=2, bias=False, normalize=normalize, path=path).float()
    out = conv(x, edge_index)
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
    conv = make_conv(4, 4, heads=2, normalize="softmax", path=path)
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
    conv = make_conv(8, 16, heads=4, path=path).float()
    expected = conv(x, edge_index)
    adj = to_torch_csr_tensor(edge_index.flip(0), size=(25, 25))
    out, (adj_alpha, alpha) = conv(x, adj, return_attention_weights=True)
    assert torch.allclose(out, expected, atol=1e-6)
    assert adj_alpha.layout == torch.sparse_csr and alpha.shape == (edge_index.size(1), 4)


@requires_torch_sparse
@pytest.mark.parametrize("path", PATHS)
def test_sparse_tensor_matches_edge_index(path):
    x, _, edge_index = random_graph(25, 25, 150, dtype=torch.float32)
    edge_index = coalesce(edge_index)  # a sparse adjacency cannot hold repeated edges
    conv = make_conv(8, 16, heads=4, normalize="softmax", path=path).float()
    expected = conv(x, edge_index)
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
    conv = make_conv(8, 8, dropout=1.0, path=path).float()
    conv.eval()
    assert torch.allclose(conv(x, edge_index), conv(x, edge_index))
    conv.train()
    out = conv(x, edge_index)
    no_message = F.gelu(conv.lin_out(torch.cat([x, torch.zeros_like(x)], dim=-1)))
    assert torch.allclose(out, no_message, atol=1e-6)


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
    fused = make_conv(8, 16, heads=4, normalize="mean")
    observed = make_conv(8, 16, heads=4, normalize="mean", path="propagate")
    observed.load_state_dict(fused.state_dict())
    results = []
    for conv in (fused, observed):
        out = conv(x, edge_index)
        results.append([out, *torch.autograd.grad(out.square().sum(), [x, *conv.parameters()])])
    for a, b in zip(*results):
        assert (a - b).abs().max() < 1e-9


def test_message_hooks_see_alpha():
    x, _, edge_index = random_graph(10, 10, 40, dtype=torch.float32)
    conv = CrossAttnConv(8, 8, heads=2)
    seen = []
    conv.register_message_forward_hook(lambda module, inputs, output:
                                       seen.append(inputs[0]["alpha"].shape))
    conv(x, edge_index)
    assert seen == [(40, 2)]


def test_repr():
    assert repr(CrossAttnConv(8, 16, heads=4)) == \
        "CrossAttnConv(8, 16, heads=4, normalize='none')"


@pytest.mark.parametrize("kwargs, message", [
    ({"heads": 3}, "divisible by 'heads'"),
    ({"head_dim": 5}, "multiple of 'head_dim'"),
    ({"heads": 2, "head_dim": 4}, "not both"),
    ({"normalize": "sigmoid"}, "Unknown 'normalize' mode 'sigmoid'"),
    ({"beta_init": 0.0}, "'beta_init' must be positive"),
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
    with pytest.raises(ValueError, match="sparse adjacency of size \\[5, 5\\]"):
        conv(x, to_torch_csr_tensor(good, size=(6, 6)))


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


BLOCK_GRIDS = [(2, 8, 8, 2), (3, 7, 10, 3), (2, 5, 6, (2, 4)), (1, 1, 1, 1)]


@pytest.mark.parametrize("policy", ["svga", "dagc"])
@pytest.mark.parametrize("normalize", ["none", "softmax", "mean"])
@pytest.mark.parametrize("self_loops", [False, True])
def test_block_adjacency_equals_edge_index(policy, normalize, self_loops):
    for batch_size, height, width, k in BLOCK_GRIDS:
        conv = make_conv(8, 8, heads=2, normalize=normalize)
        x = torch.randn(batch_size * height * width, 8, dtype=torch.float64, requires_grad=True)
        blocks = build_graph(policy, x.detach(), k=k, self_loops=self_loops, blocks=True,
                             grid_size=(height, width))
        out, (edges, alpha) = conv(x, blocks, return_attention_weights=True)
        expected, (_, expected_alpha) = conv(x, blocks.to_edge_index(),
                                             return_attention_weights=True)
        assert torch.equal(edges, blocks.to_edge_index())
        assert (out - expected).abs().max() < 1e-9
        assert alpha.shape == expected_alpha.shape
        assert alpha.numel() == 0 or (alpha - expected_alpha).abs().max() < 1e-9
        grads = torch.autograd.grad(out.sum(), [x, conv.log_beta, conv.lin_key.weight])
        expected_grads = torch.autograd.grad(expected.sum(), [x, conv.log_beta,
                                                              conv.lin_key.weight])
        for grad, expected_grad in zip(grads, expected_grads):
            assert (grad - expected_grad).abs().max() < 1e-9


def test_block_adjacency_dropout_only_in_training():
    x = torch.randn(2 * 36, 8)
    blocks = build_graph("svga", x, k=2, blocks=True, grid_size=(6, 6))
    conv = CrossAttnConv(8, 8, dropout=1.0)
    no_message = F.gelu(conv.lin_out(torch.cat([x, torch.zeros_like(x)], dim=-1)))
    assert torch.allclose(conv(x, blocks), no_message, atol=1e-6)
    conv.eval()
    assert torch.allclose(conv(x, blocks), conv(x, blocks.to_edge_index()), atol=1e-6)


def test_block_adjacency_bad_input():
    conv = CrossAttnConv(8, 8)
    blocks = build_graph("svga", torch.randn(36, 8), k=2, blocks=True, grid_size=(6, 6))
    with pytest.raises(ValueError, match="graph on 36 nodes, but the node features hold 30"):
        conv(torch.randn(30, 8), blocks)
    with pytest.raises(ValueError, match="single node feature tensor"):
        CrossAttnConv((8, 8), 8)((torch.randn(36, 8), torch.randn(36, 8)), blocks)
    bad = BlockAdjacency(parts=((torch.tensor([[0, 40]]), torch.ones(2, 2, dtype=torch.bool)),),
                         num_nodes=36)
    with pytest.raises(IndexError, match="outside \\[0, 35\\]"):
        conv(torch.randn(36, 8), bad)


def test_block_adjacency_no_graph_break_under_dynamo():
    conv = CrossAttnConv(8, 16, heads=4)
    x = torch.randn(2 * 48, 8)
    blocks = build_graph("svga", x, k=2, blocks=True, grid_size=(6, 8))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(conv)(x, blocks)
    assert explanation.graph_break_count == 0, explanation.break_reasons
