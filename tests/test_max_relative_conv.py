import pytest
import torch
from conftest import requires_torch_sparse
from reference import max_relative

from attvig_pyg import MaxRelativeConv
from torch_geometric.typing import SparseTensor
from torch_geometric.utils import coalesce, to_torch_csr_tensor


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_matches_reference(groups):
    x = torch.randn(15, 8, dtype=torch.float64)
    edge_index = torch.randint(0, 15, (2, 60))
    conv = MaxRelativeConv(8, 12, groups=groups).double()
    expected = max_relative(conv, x, x, edge_index)
    assert (conv(x, edge_index) - expected).abs().max() < 1e-9


def test_matches_reference_bipartite_with_isolated_targets():
    x_src = torch.randn(9, 4, dtype=torch.float64)
    x_dst = torch.randn(6, 4, dtype=torch.float64)
    edge_index = torch.tensor([[0, 3, 8, 2], [0, 0, 1, 4]])  # targets 2, 3, 5 receive nothing
    conv = MaxRelativeConv((4, 4), 6, groups=2).double()
    expected = max_relative(conv, x_src, x_dst, edge_index)
    assert (conv((x_src, x_dst), edge_index) - expected).abs().max() < 1e-9


def test_norm_and_activation_follow_the_map():
    x = torch.randn(30, 8)
    edge_index = torch.randint(0, 30, (2, 100))
    conv = MaxRelativeConv(8, 16, groups=4, norm="batch_norm", act="gelu").eval()
    plain = MaxRelativeConv(8, 16, groups=4)
    plain.lin.load_state_dict(conv.lin.state_dict())
    bn = conv.norm.module
    expected = torch.nn.functional.gelu(
        (plain(x, edge_index) - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
        * bn.weight + bn.bias)
    assert torch.allclose(conv(x, edge_index), expected, atol=1e-5)


def test_torch_sparse_csr_matches_edge_index():
    x = torch.randn(20, 8)
    edge_index = coalesce(torch.randint(0, 20, (2, 80)))
    conv = MaxRelativeConv(8, 8, groups=4)
    adj = to_torch_csr_tensor(edge_index.flip(0), size=(20, 20))
    assert torch.allclose(conv(x, adj), conv(x, edge_index), atol=1e-6)


@requires_torch_sparse
def test_sparse_tensor_matches_edge_index():
    x = torch.randn(20, 8)
    edge_index = coalesce(torch.randint(0, 20, (2, 80)))
    conv = MaxRelativeConv(8, 8, groups=4)
    adj = SparseTensor.from_edge_index(edge_index.flip(0), sparse_sizes=(20, 20))
    assert torch.allclose(conv(x, adj), conv(x, edge_index), atol=1e-6)


def test_lazy_in_channels_and_gradients():
    conv = MaxRelativeConv(-1, 12, groups=4)
    x = torch.randn(10, 6, requires_grad=True)
    out = conv(x, torch.randint(0, 10, (2, 30)))
    out.sum().backward()
    assert out.shape == (10, 12) and torch.isfinite(x.grad).all()
    assert conv.lin.weight.shape == (12, 3)


def test_no_graph_break_under_dynamo():
    conv = MaxRelativeConv(8, 16, groups=4, norm="batch_norm", act="gelu")
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(conv)(torch.randn(20, 8), torch.randint(0, 20, (2, 80)))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_bad_input():
    with pytest.raises(ValueError, match="'groups' \\(3\\) must divide"):
        MaxRelativeConv(8, 16, groups=3)
    with pytest.raises(ValueError, match="same size"):
        MaxRelativeConv((8, 4), 16)
    conv = MaxRelativeConv(8, 16)
    with pytest.raises(ValueError, match="with 8 channels \\(got 5\\)"):
        conv(torch.randn(4, 5), torch.tensor([[0], [1]]))
    with pytest.raises(IndexError, match="source node id 4"):
        conv(torch.randn(4, 8), torch.tensor([[4], [1]]))
