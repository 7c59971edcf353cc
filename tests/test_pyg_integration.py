"""CrossAttnConv inside PyG's own machinery: explainers, heterogeneous models, mini-batch loaders."""
import pytest
import torch
import torch.nn.functional as F
from conftest import requires_torch_sparse

from attvig_pyg import CrossAttnConv, MaxRelativeConv
from torch_geometric.data import Data, HeteroData
from torch_geometric.explain import AttentionExplainer, Explainer
from torch_geometric.nn import to_hetero


class TwoLayerGNN(torch.nn.Module):
    def __init__(self, in_channels, hidden, out_channels):
        super().__init__()
        self.conv1 = CrossAttnConv(in_channels, hidden, heads=4)
        self.conv2 = CrossAttnConv(hidden, out_channels)

    def forward(self, x, edge_index):
        return self.conv2(self.conv1(x, edge_index), edge_index)


def random_data(num_nodes=60, num_edges=300, channels=8, classes=3):
    x = torch.randn(num_nodes, channels)
    edge_index = torch.randint(0, num_nodes, (2, num_edges))
    y = torch.randint(0, classes, (num_nodes,))
    return Data(x=x, edge_index=edge_index, y=y)


def test_attention_explainer_reads_the_attention_weights():
    data = random_data()
    model = TwoLayerGNN(8, 16, 4).eval()
    explainer = Explainer(
        model=model, algorithm=AttentionExplainer(reduce="max"), explanation_type="model",
        edge_mask_type="object",
        model_config=dict(mode="multiclass_classification", task_level="node", return_type="raw"))
    explanation = explainer(data.x, data.edge_index)

    _, (_, alpha1) = model.conv1(data.x, data.edge_index, return_attention_weights=True)
    hidden = model.conv1(data.x, data.edge_index)
    _, (_, alpha2) = model.conv2(hidden, data.edge_index, return_attention_weights=True)
    expected = torch.maximum(alpha1.max(dim=-1).values, alpha2.max(dim=-1).values)
    assert explanation.edge_mask.shape == (data.num_edges,)
    assert torch.allclose(explanation.edge_mask, expected, atol=1e-6)


@pytest.mark.parametrize("conv", [CrossAttnConv, MaxRelativeConv])
def test_to_hetero(conv):
    class GNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = conv((-1, -1), 16) if conv is CrossAttnConv else conv((8, 8), 8)
            self.lin = torch.nn.Linear(16 if conv is CrossAttnConv else 8, 3)

        def forward(self, x, edge_index):
            return self.lin(self.conv1(x, edge_index))

    data = HeteroData()
    data["paper"].x = torch.randn(20, 8)
    data["author"].x = torch.randn(10, 8)
    data["author", "writes", "paper"].edge_index = torch.stack(
        [torch.randint(0, 10, (40,)), torch.randint(0, 20, (40,))])
    data["paper", "cites", "paper"].edge_index = torch.randint(0, 20, (2, 50))
    data["paper", "rev_writes", "author"].edge_index = \
        data["author", "writes", "paper"].edge_index.flip(0)

    model = to_hetero(GNN(), data.metadata(), aggr="sum")
    out = model(data.x_dict, data.edge_index_dict)
    assert out["paper"].shape == (20, 3) and out["author"].shape == (10, 3)
    sum(o.sum() for o in out.values()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@requires_torch_sparse
def test_neighbor_loader_mini_batch_training_step():
    from torch_geometric.loader import NeighborLoader

    data = random_data(num_nodes=200, num_edges=1200)
    model = TwoLayerGNN(8, 16, 3)
    full = model(data.x, data.edge_index)

    # With complete 2-hop neighbourhoods, a mini-batch reproduces the full-graph output.
    loader = NeighborLoader(data, num_neighbors=[-1, -1], batch_size=32, shuffle=True)
    batch = next(iter(loader))
    out = model(batch.x, batch.edge_index)[:batch.batch_size]
    assert torch.allclose(out, full[batch.n_id[:batch.batch_size]], atol=1e-5)

    sampled = NeighborLoader(data, num_neighbors=[5, 5], batch_size=32, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    batch = next(iter(sampled))
    loss = F.cross_entropy(model(batch.x, batch.edge_index)[:batch.batch_size],
                           batch.y[:batch.batch_size])
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


CONVS = [lambda: CrossAttnConv(8, 16, heads=4), lambda: CrossAttnConv(8, 16, normalize="softmax"),
         lambda: MaxRelativeConv(8, 16, groups=4)]


@pytest.mark.parametrize("make", CONVS)
def test_pyg_assert_module(make):
    """PyG's own check: output size, edge permutation, and the torch_sparse, CSC and COO
    layouts of the same adjacency (repeated edges removed: a sparse adjacency holds each
    once)."""
    from torch_geometric.testing import assert_module
    from torch_geometric.utils import coalesce

    conv = make().double()
    x = torch.randn(20, 8, dtype=torch.float64)
    edge_index = coalesce(torch.randint(0, 20, (2, 90)))
    assert_module(conv, x, edge_index, expected_size=(20, 16), atol=1e-10)


@pytest.mark.parametrize("make", CONVS)
def test_node_permutation(make):
    """Renumbering the nodes renumbers the output rows, nothing else (PyG's assert_module does
    not test this yet)."""
    conv = make().double()
    x = torch.randn(20, 8, dtype=torch.float64)
    edge_index = torch.randint(0, 20, (2, 90))
    perm = torch.randperm(20)
    position = torch.empty_like(perm).scatter_(0, perm, torch.arange(20))  # new id of each node
    out = conv(x[perm], position[edge_index])
    assert torch.allclose(out, conv(x, edge_index)[perm], atol=1e-10)
