import numpy as np
import pytest
import torch

from attvig_pyg import CrossAttnConv, MaxRelativeConv
from torch_geometric import EdgeIndex

from attvig_pyg.graphs import (CyclicAdjacency, CyclicNeighbours, build_graph, dagc_adjacency,
                               dagc_filter, dagc_graph, knn_graph, svga_adjacency, svga_graph)
from attvig_pyg.graphs.grid import axial_parts
from attvig_pyg.graphs.knn import _chunks

GRIDS = [(1, 4, 4, 2), (5, 6, 9, 2), (5, 7, 5, 3), (1, 12, 10, 4)]  # batch, height, width, K


def edge_list(edge_index):
    return sorted(map(tuple, edge_index.t().tolist()))


def roll_svga(batch_size, height, width, k, self_loops=False):
    """SVGA from its definition: node (h, w) receives from x rolled by s along each axis."""
    kh, kw = (k, k) if isinstance(k, int) else k
    ids = torch.arange(batch_size * height * width).view(batch_size, height, width)
    sources = [torch.roll(ids, s, dims=1) for s in range(kh, height, kh)]
    sources += [torch.roll(ids, s, dims=2) for s in range(kw, width, kw)]
    if self_loops:
        sources.append(ids)
    return edge_list(torch.cat([torch.stack([s.flatten(), ids.flatten()]) for s in sources]
                               + [torch.empty(2, 0, dtype=torch.long)], dim=1))


def greedyvig_relative(x, k, dynamic):
    """GreedyViG's roll-and-max on [B, C, H, W]: max(0, max over kept shifts of roll(x) - x)."""
    height, width = x.shape[2:]
    rolled = torch.roll(x, (height // 2, width // 2), dims=(2, 3))
    distance = (x - rolled).abs().sum(dim=1, keepdim=True)
    threshold = distance.mean(dim=(2, 3), keepdim=True) - distance.std(dim=(2, 3), keepdim=True)
    relative = torch.zeros_like(x)
    for dim, size in ((2, height), (3, width)):
        for s in range(0, size, k):
            shifted = torch.roll(x, s, dims=dim)
            keep = ((x - shifted).abs().sum(dim=1, keepdim=True) < threshold) if dynamic else 1
            relative = torch.maximum(relative, (shifted - x) * keep)
    return relative


def as_nodes(x):
    return x.permute(0, 2, 3, 1).reshape(-1, x.size(1))


@pytest.mark.parametrize("batch_size, height, width, k", GRIDS)
@pytest.mark.parametrize("self_loops", [False, True])
def test_svga_equals_roll_definition(batch_size, height, width, k, self_loops):
    edges = svga_graph(batch_size, height, width, k, self_loops=self_loops)
    assert edge_list(edges) == roll_svga(batch_size, height, width, k, self_loops)
    assert edges.dtype == torch.long


@pytest.mark.parametrize("k", [(2, 3), (3, 1), (9, 2), (20, 20)])
def test_svga_per_axis_and_large_k(k):
    assert edge_list(svga_graph(2, 7, 8, k)) == roll_svga(2, 7, 8, k)


def test_svga_degenerate_grids():
    assert svga_graph(3, 1, 1, 1).shape == (2, 0)
    assert edge_list(svga_graph(3, 1, 1, 1, self_loops=True)) == [(i, i) for i in range(3)]
    assert svga_graph(2, 4, 4, 4).shape == (2, 0)  # K >= H and W
    assert edge_list(svga_graph(2, 1, 6, 2)) == roll_svga(2, 1, 6, 2)


def test_svga_is_cached_and_batched_by_offsets():
    first = svga_graph(4, 8, 8, 2)
    assert svga_graph(4, 8, 8, 2) is first
    assert svga_adjacency(4, 8, 8, 2) is svga_adjacency(4, 8, 8, (2, 2))
    single = svga_graph(1, 8, 8, 2)
    per_image = first.size(1) // 4
    for b in range(4):
        assert torch.equal(first[:, b * per_image:(b + 1) * per_image], single + b * 64)


@pytest.mark.parametrize("batch_size, height, width, k", GRIDS)
def test_max_relative_over_svga_equals_roll_and_max(batch_size, height, width, k):
    x = torch.randn(batch_size, 6, height, width, dtype=torch.float64)
    conv = MaxRelativeConv(6, 8).double()
    edges = svga_graph(batch_size, height, width, k, self_loops=True)
    # The same weights, de-interleaved for GreedyViG's concatenation [x, relative].
    weight = conv.lin.weight
    concat_weight = torch.cat([weight[:, 0::2], weight[:, 1::2]], dim=1)
    relative = greedyvig_relative(x, k, dynamic=False)
    expected = as_nodes(torch.cat([x, relative], dim=1)) @ concat_weight.t() + conv.lin.bias
    assert torch.allclose(conv(as_nodes(x), edges), expected, atol=1e-12)


@pytest.mark.parametrize("batch_size, height, width, k", GRIDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_max_relative_over_dagc_equals_greedyvig(batch_size, height, width, k, dtype):
    x = torch.randn(batch_size, 6, height, width, dtype=dtype)
    conv = MaxRelativeConv(6, 6).to(dtype)
    edges = dagc_graph(x, k, self_loops=True)
    relative = greedyvig_relative(x, k, dynamic=True)
    interleaved = torch.stack([as_nodes(x), as_nodes(relative)], dim=-1).flatten(1)
    expected = conv.lin(interleaved)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(conv(as_nodes(x), edges), expected, atol=tolerance)


@pytest.mark.parametrize("batch_size, height, width, k", GRIDS)
def test_dagc_is_a_filtered_svga(batch_size, height, width, k):
    x = torch.randn(batch_size, 5, height, width)
    edges = dagc_graph(x, k)
    assert set(edge_list(edges)) <= set(roll_svga(batch_size, height, width, k))
    assert 0 < edges.size(1) < len(roll_svga(batch_size, height, width, k))
    with_loops = dagc_graph(x, k, self_loops=True)
    nodes = batch_size * height * width
    assert edge_list(with_loops) == sorted(edge_list(edges) + [(i, i) for i in range(nodes)])


def test_dagc_of_a_constant_image_has_no_edges():
    assert dagc_graph(torch.ones(2, 3, 6, 6), 2).shape == (2, 0)


def brute_force_knn(x, k, dilation=1, self_loops=True, relative_pos=None):
    edges = []
    batch_size, _, height, width = x.shape
    nodes = height * width
    for b in range(batch_size):
        features = torch.nn.functional.normalize(x[b].flatten(1).t(), dim=-1)
        distance = torch.cdist(features, features).square()
        if relative_pos is not None:
            distance = distance + relative_pos
        if not self_loops:
            distance.fill_diagonal_(float("inf"))
        nearest = distance.topk(k * dilation, largest=False).indices[:, ::dilation]
        for i in range(nodes):
            edges += [(b * nodes + int(j), b * nodes + i) for j in nearest[i]]
    return sorted(edges)


@pytest.mark.parametrize("batch_size, height, width", [(1, 5, 5), (5, 4, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k, dilation", [(3, 1), (4, 2), (2, 3)])
def test_knn_equals_brute_force(batch_size, height, width, dtype, k, dilation):
    x = torch.randn(batch_size, 6, height, width, dtype=dtype)
    edges = knn_graph(x, k, dilation=dilation)
    assert edge_list(edges) == brute_force_knn(x, k, dilation)
    assert (edges[1].view(-1, k) == edges[1].view(-1, k)[:, :1]).all()  # grouped by target


def test_knn_options_equal_brute_force():
    x = torch.randn(3, 6, 5, 6, dtype=torch.float64)
    relative_pos = torch.rand(30, 30, dtype=torch.float64)
    assert edge_list(knn_graph(x, 4, self_loops=False)) == brute_force_knn(x, 4, self_loops=False)
    assert edge_list(knn_graph(x, 3, dilation=2, relative_pos=relative_pos)) == \
        brute_force_knn(x, 3, 2, relative_pos=relative_pos)


def test_knn_includes_self_first():
    x = torch.randn(2, 8, 6, 6)
    edges = knn_graph(x, 5, dilation=2)
    assert (edges[0].view(-1, 5)[:, 0] == edges[1].view(-1, 5)[:, 0]).all()


def test_knn_chunking_gives_the_same_graph():
    x = torch.randn(3, 6, 8, 8)
    whole = knn_graph(x, 4, dilation=2)
    assert torch.equal(knn_graph(x, 4, dilation=2, memory_budget=2 * 64 * 4 * 5), whole)
    assert torch.equal(knn_graph(x, 4, dilation=2, memory_budget=1), whole)


@pytest.mark.parametrize("batch_size, nodes, budget", [(64, 196, 2**20), (8, 4096, 2**22),
                                                       (8, 4096, 256 * 2**20), (3, 50, 10)])
def test_knn_chunks_cover_every_row_once_within_budget(batch_size, nodes, budget):
    covered = torch.zeros(batch_size, nodes, dtype=torch.int)
    for images, rows in _chunks(batch_size, nodes, 4, budget):
        covered[images, rows] += 1
        block = len(range(batch_size)[images]) * (rows.stop - rows.start) * nodes * 4 * 2
        assert block <= budget or rows.stop - rows.start == 1
    assert (covered == 1).all()


def test_knn_stochastic_dilation_picks_among_the_nearest():
    x = torch.randn(2, 6, 6, 6)
    nearest = knn_graph(x, 12)
    picked = knn_graph(x, 4, dilation=3, stochastic_epsilon=1.0)
    assert set(edge_list(picked)) <= set(edge_list(nearest))
    assert edge_list(knn_graph(x, 4, dilation=3, stochastic_epsilon=0.0)) == \
        brute_force_knn(x, 4, 3)


@pytest.mark.parametrize("policy, params", [("svga", {"k": 2}), ("dagc", {"k": 2}),
                                            ("knn", {"k": 3})])
@pytest.mark.parametrize("batch_size, height, width", [(1, 6, 6), (5, 7, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_edge_joins_two_images(policy, params, batch_size, height, width, dtype):
    x = torch.randn(batch_size, 4, height, width, dtype=dtype)
    edges = build_graph(policy, x, **params)
    nodes = height * width
    assert edges.size(1) > 0
    assert torch.equal(edges[0] // nodes, edges[1] // nodes)
    assert edges.min() >= 0 and edges.max() < batch_size * nodes


def test_build_graph_dispatches_to_the_builders():
    x = torch.randn(2, 4, 6, 8)
    assert torch.equal(build_graph("svga", x, k=2), svga_graph(2, 6, 8, 2))
    assert torch.equal(build_graph("dagc", x, k=2), dagc_graph(x, 2))
    assert torch.equal(build_graph("knn", x, k=3, dilation=2), knn_graph(x, 3, dilation=2))
    nodes = x.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(build_graph("knn", nodes, k=3, grid_size=(6, 8)), knn_graph(x, 3))
    assert torch.equal(build_graph("svga", nodes, k=2, grid_size=(6, 8)), svga_graph(2, 6, 8, 2))
    assert isinstance(build_graph("svga", x, k=2, cyclic=True), CyclicAdjacency)
    assert isinstance(build_graph("dagc", x, k=2, cyclic=True), CyclicAdjacency)


# Grids where K divides the size and where it does not (one cycle per axis, or a few).
CYCLIC_GRIDS = GRIDS + [(1, 80, 80, 11), (2, 128, 96, (18, 13)), (3, 7, 5, 3), (1, 1, 1, 1),
                        (2, 20, 30, (6, 4)), (1, 200, 304, (28, 43))]


@pytest.mark.parametrize("batch_size, height, width, k", CYCLIC_GRIDS)
@pytest.mark.parametrize("self_loops", [False, True])
def test_cyclic_forms_equal_the_roll_definition(batch_size, height, width, k, self_loops):
    adjacency = svga_adjacency(batch_size, height, width, k, self_loops=self_loops)
    edges = adjacency.to_edge_index()
    assert edge_list(edges) == roll_svga(batch_size, height, width, k, self_loops)
    assert adjacency.num_edges() == edges.size(1) == adjacency.num_candidates()
    assert adjacency.density() == 1.0
    x = torch.randn(batch_size, 4, height, width)
    dagc = dagc_adjacency(x, k, self_loops=self_loops)
    assert edge_list(dagc.to_edge_index()) == edge_list(dagc_graph(x, k, self_loops=self_loops))
    assert dagc.num_candidates() == adjacency.num_candidates()
    assert dagc.num_edges() == dagc.to_edge_index().size(1)


def test_cyclic_candidates_cost_what_the_graph_has_at_any_size():
    """The structured form scores exactly the SVGA candidates: as many per node at every size
    (no dense blocks where K does not divide the grid)."""
    for height, width in ((56, 56), (80, 80), (200, 304), (128, 128), (334, 200)):
        k = (max(1, height // 7), max(1, width // 7))
        adjacency = svga_adjacency(1, height, width, k)
        per_node = adjacency.num_candidates() / (height * width)
        assert per_node == len(range(k[0], height, k[0])) + len(range(k[1], width, k[1]))
        assert 12 <= per_node <= 14


def test_cyclic_edge_order_is_part_then_row_major():
    cycles = torch.tensor([[0, 1, 2], [3, 4, 5]])
    mask = torch.ones(2, 3, 2, dtype=torch.bool)
    mask[0, 1, 0] = False
    adjacency = CyclicAdjacency([CyclicNeighbours(cycles, (1, 2), mask),
                                 CyclicNeighbours(torch.tensor([[0, 3]]), (1,))], num_nodes=6)
    # Node cycles[p, t] receives from cycles[p, (t - o) % 3], offsets in order, masked skipped.
    assert adjacency.to_edge_index().t().tolist() == [
        [2, 0], [1, 0], [2, 1], [1, 2], [0, 2], [5, 3], [4, 3], [3, 4], [5, 4], [4, 5], [3, 5],
        [3, 0], [0, 3]]
    assert adjacency.num_edges() == 13 and adjacency.num_candidates() == 14
    assert adjacency.density() == 13 / 14
    assert "CyclicAdjacency(num_nodes=6" in repr(adjacency)


def test_knn_is_an_edge_index_sorted_by_target():
    edges = knn_graph(torch.randn(2, 4, 5, 5), 3)
    assert isinstance(edges, EdgeIndex) and edges.is_sorted_by_col
    assert edges.sparse_size() == (50, 50)
    assert torch.equal(edges[1].as_subclass(torch.Tensor),
                       torch.arange(50).repeat_interleave(3))


def test_bad_input():
    x = torch.randn(2, 4, 6, 6)
    with pytest.raises(ValueError, match="'k' must be a positive int"):
        svga_graph(2, 6, 6, 0)
    with pytest.raises(ValueError, match="'k' must be a positive int"):
        dagc_graph(x, (2, 0))
    with pytest.raises(ValueError, match="at least 1x1"):
        svga_graph(2, 0, 6, 2)
    with pytest.raises(ValueError, match="exceeds the 36 candidate.*at most 36"):
        knn_graph(x, 13, dilation=3)
    with pytest.raises(ValueError, match="at most 35 with self_loops=False"):
        knn_graph(x, 36, self_loops=False)
    with pytest.raises(ValueError, match="must be positive"):
        knn_graph(x, 0)
    with pytest.raises(ValueError, match="Expected a feature map"):
        knn_graph(torch.randn(4, 6, 6), 3)
    with pytest.raises(ValueError, match="Expected a feature map"):
        dagc_graph(torch.randn(72, 4), 2)
    with pytest.raises(ValueError, match="node count 70 is not a multiple of the 6x6"):
        knn_graph(torch.randn(70, 4), 3, grid_size=(6, 6))
    with pytest.raises(ValueError, match="'relative_pos' of shape \\[36, 36\\]"):
        knn_graph(x, 3, relative_pos=torch.zeros(35, 35))
    with pytest.raises(ValueError, match="Unknown graph policy 'grid'"):
        build_graph("grid", x, k=2)
    with pytest.raises(ValueError, match="no cyclic form"):
        build_graph("knn", x, k=2, cyclic=True)


def test_bad_cyclic_adjacency():
    cycles = torch.zeros(3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"'mask' as a bool tensor of shape \[3, 4, 2\]"):
        CyclicNeighbours(cycles, (1, 2), torch.ones(3, 4).bool())
    with pytest.raises(ValueError, match="'mask' as a bool tensor"):
        CyclicNeighbours(cycles, (1, 2), torch.ones(3, 4, 2))
    with pytest.raises(ValueError, match="distinct ints modulo the cycle length 4"):
        CyclicNeighbours(cycles, (1, 5))
    with pytest.raises(ValueError, match="'cycles' as a long tensor"):
        CyclicNeighbours(cycles.float(), (1,))
    with pytest.raises(IndexError, match=r"node ids in \[0, 12\], outside \[0, 11\]"):
        CyclicAdjacency([CyclicNeighbours(torch.arange(13).view(1, -1), (1,))], num_nodes=12)
    with pytest.raises(ValueError, match="'num_nodes' as an int >= 0"):
        CyclicAdjacency([], num_nodes=-1)
    with pytest.raises(TypeError, match="'parts' as CyclicNeighbours"):
        CyclicAdjacency([(cycles, None)], num_nodes=12)
    adjacency = svga_adjacency(1, 4, 4, 2)
    with pytest.raises(ValueError, match="Expected 2 masks, one per part"):
        adjacency.with_masks([None])
    with pytest.raises(ValueError, match=r"'inverse' as a long tensor of shape \[12\]"):
        CyclicNeighbours(torch.arange(12).view(3, 4), (1,), inverse=torch.arange(11))
    repeated = CyclicNeighbours(cycles, (1,), inverse=torch.arange(12))  # node 0, 12 times
    with pytest.raises(ValueError, match="not a permutation of the 12 nodes"):
        CyclicAdjacency([repeated], num_nodes=12)


def test_grid_parts_are_permutations_with_their_inverse():
    for adjacency in (svga_adjacency(2, 7, 5, (3, 2), self_loops=True),
                      build_graph("dagc", torch.randn(2, 4, 6, 6), k=2, cyclic=True)):
        for part in adjacency.parts:
            flat = part.cycles.flatten()
            assert torch.equal(flat.sort().values, torch.arange(adjacency.num_nodes))
            assert torch.equal(flat[part.inverse], torch.arange(adjacency.num_nodes))


@pytest.mark.parametrize("k", [np.int64(2), torch.tensor(2), (np.int32(2), torch.tensor(2))])
def test_integer_like_steps_are_steps(k):
    assert torch.equal(svga_graph(1, 6, 6, k=k), svga_graph(1, 6, 6, k=2))


@pytest.mark.parametrize("k", [True, 2.0, "2", torch.tensor([2, 2]), (2, 2, 2), 0])
def test_other_steps_are_refused_by_name(k):
    with pytest.raises(ValueError, match="'k' must be a positive int or a pair"):
        svga_graph(1, 6, 6, k=k)


def test_graphs_first_built_under_inference_mode_serve_a_later_backward():
    with torch.inference_mode():
        svga_graph(2, 5, 7, k=3)
        build_graph("svga", torch.randn(2, 4, 5, 7), k=3, cyclic=True)
    edges = svga_graph(2, 5, 7, k=3)
    adjacency = build_graph("svga", torch.randn(2, 4, 5, 7), k=3, cyclic=True)
    assert not edges.is_inference()
    assert not any(part.cycles.is_inference() for part in adjacency.parts)
    conv = CrossAttnConv(4, 4, heads=2)
    x = torch.randn(70, 4, requires_grad=True)
    (conv(x, edges).sum() + conv(x, adjacency).sum()).backward()
    assert x.grad is not None


@pytest.mark.parametrize("batch_size, height, width, k", CYCLIC_GRIDS[:-1])
@pytest.mark.parametrize("self_loops", [False, True])
def test_the_line_form_is_the_same_graph(batch_size, height, width, k, self_loops):
    """Whole lines with a mask (the form torch.export traces at symbolic sizes) hold the SVGA
    and DAGC edges of the cyclic form."""
    steps = (k, k) if isinstance(k, int) else k
    lines = CyclicAdjacency(axial_parts(batch_size, height, width, steps, self_loops, lines=True),
                            batch_size * height * width)
    assert all(part.offsets is None for part in lines.parts)
    assert edge_list(lines.to_edge_index()) == roll_svga(batch_size, height, width, k, self_loops)
    assert lines.num_candidates() == batch_size * height * width * (height + width)
    x = torch.randn(batch_size, 4, height, width)
    dagc = dagc_filter(x, lines)
    assert dagc.num_edges() == dagc.to_edge_index().size(1)
    assert edge_list(dagc.to_edge_index()) == edge_list(dagc_graph(x, k, self_loops=self_loops))


def test_a_line_part_checks_its_mask():
    with pytest.raises(ValueError, match="offsets=None"):
        CyclicNeighbours(torch.arange(6).view(2, 3), None)
    with pytest.raises(ValueError, match=r"\[2, 3, 3\] or \[1, 3, 3\]"):
        CyclicNeighbours(torch.arange(6).view(2, 3), None, torch.ones(2, 3, 2, dtype=torch.bool))


@pytest.mark.parametrize("corruption", [0.5, 1.0])
def test_a_corrupted_knn_graph_keeps_its_shape_and_its_images(corruption):
    x = torch.randn(3, 8, 6, 7)
    clean = knn_graph(x, k=6, dilation=2)
    noisy = knn_graph(x, k=6, dilation=2, corruption=corruption,
                      generator=torch.Generator().manual_seed(1))
    nodes = 6 * 7
    # Every node keeps k neighbours, all from its own image; targets unchanged.
    assert torch.equal(noisy[1], clean[1])
    assert torch.equal(noisy[0] // nodes, noisy[1] // nodes)
    # round(p * k) of each node's k entries differ from the clean graph (at most: a random node
    # may by chance be the one it replaced).
    changed = (noisy[0] != clean[0]).view(-1, 6).sum(dim=1)
    assert (changed <= int(corruption * 6 + 0.5)).all()
    assert changed.float().mean() > 0.5 * int(corruption * 6 + 0.5)
    # Reproducible under a seed; another seed draws another graph.
    again = knn_graph(x, k=6, dilation=2, corruption=corruption,
                      generator=torch.Generator().manual_seed(1))
    other = knn_graph(x, k=6, dilation=2, corruption=corruption,
                      generator=torch.Generator().manual_seed(2))
    assert torch.equal(again, noisy) and not torch.equal(other, noisy)
    torch.manual_seed(5)
    first = knn_graph(x, k=6, corruption=corruption)
    torch.manual_seed(5)
    assert torch.equal(knn_graph(x, k=6, corruption=corruption), first)  # the global generator


def test_no_corruption_is_the_clean_graph():
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(knn_graph(x, k=4, corruption=0.0), knn_graph(x, k=4))
    assert torch.equal(knn_graph(x, k=4, corruption=0.1), knn_graph(x, k=4))  # round(0.4) = 0
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        knn_graph(x, k=4, corruption=1.5)
