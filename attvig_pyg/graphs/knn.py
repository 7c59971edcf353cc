"""The dynamic k-nearest-neighbour graph of Vision GNN (Han et al., NeurIPS 2022), in pure torch."""
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric import EdgeIndex

from attvig_pyg.graphs.grid import as_feature_map, is_symbolic

DEFAULT_MEMORY_BUDGET = 256 * 2**20


@torch.no_grad()
def knn_graph(x: Tensor, k: int, *, dilation: int = 1, self_loops: bool = True,
              relative_pos: Optional[Tensor] = None, stochastic_epsilon: float = 0.0,
              memory_budget: int = DEFAULT_MEMORY_BUDGET,
              grid_size: Optional[Tuple[int, int]] = None, corruption: float = 0.0,
              generator: Optional[torch.Generator] = None) -> EdgeIndex:
    r"""Vision GNN's dilated kNN edges, within each image, computed without gradient.

    Features are L2-normalised over channels; the distance between nodes i and j of one image is
    :math:`\|x_i\|^2 - 2 x_i^\top x_j + \|x_j\|^2` (plus :obj:`relative_pos[i, j]` if given). Each
    node takes its :obj:`k * dilation` nearest nodes, itself included, and keeps every
    :obj:`dilation`-th of them, nearest first.

    Args:
        x (Tensor): Feature map :obj:`[B, C, H, W]`, or node features :obj:`[B * H * W, C]` with
            :obj:`grid_size`.
        k (int): Neighbours per node.
        dilation (int, optional): Keep every :obj:`dilation`-th of the :obj:`k * dilation` nearest.
            (default: :obj:`1`)
        self_loops (bool, optional): If :obj:`True`, a node is a candidate neighbour of itself (and,
            at distance zero, normally its nearest) as in Vision GNN; if :obj:`False` it never is.
            (default: :obj:`True`)
        relative_pos (Tensor, optional): :obj:`[H * W, H * W]` term added to the distances, the
            same for every image. (default: :obj:`None`)
        stochastic_epsilon (float, optional): Probability of Vision GNN's stochastic dilation: the
            same :obj:`k` random positions of the :obj:`k * dilation` nearest for every node instead
            of every :obj:`dilation`-th. Pass :obj:`0` outside training. (default: :obj:`0.0`)
        memory_budget (int, optional): Bytes the distance computation may allocate at once; the
            rows of the distance matrices are processed in chunks that fit. (default: 256 MiB)
        grid_size ((int, int), optional): (H, W) when :obj:`x` holds node features.
        corruption (float, optional): A deliberately imperfect graph: in every node's list of
            :obj:`k` neighbours, :obj:`round(corruption * k)` entries at random places are
            replaced by uniformly random nodes of the same image (any node, itself included;
            repeats possible), so that every node keeps :obj:`k` neighbours. :obj:`1` is a
            random graph. Drawn anew at every call, from :obj:`generator` (default: torch's
            global generator, so that a seeded run is reproducible). (default: :obj:`0.0`)
        generator (torch.Generator, optional): The corruption's random numbers.

    Returns:
        :class:`~torch_geometric.EdgeIndex` :obj:`[2, B * H * W * k]` (a LongTensor), grouped by
        receiving node and marked as sorted by target, so that convs with fused message passing
        (:class:`~attvig_pyg.nn.CrossAttnConv`) take their fused path on it. While
        :func:`torch.compile` traces: the same edges as a plain LongTensor.
    """
    x = as_feature_map(x, grid_size)
    batch_size, channels, height, width = x.shape
    nodes = height * width
    candidates = nodes if self_loops else nodes - 1
    if k < 1 or dilation < 1:
        raise ValueError(f"'k' and 'dilation' must be positive (got k={k}, dilation={dilation})")
    if k * dilation > candidates:
        raise ValueError(f"k * dilation = {k} * {dilation} = {k * dilation} exceeds the "
                         f"{candidates} candidate neighbours of a node in a {height}x{width} image "
                         f"(at most {candidates} with self_loops={self_loops})")
    if not 0.0 <= corruption <= 1.0:
        raise ValueError(f"'corruption' is a fraction of the neighbours, in [0, 1] (got "
                         f"{corruption})")
    if relative_pos is not None and relative_pos.shape != (nodes, nodes):
        raise ValueError(f"Expected 'relative_pos' of shape [{nodes}, {nodes}] for a "
                         f"{height}x{width} grid (got {tuple(relative_pos.shape)})")

    features = F.normalize(x.flatten(2).transpose(1, 2), dim=-1)       # [B, N, C]
    squared = features.square().sum(dim=-1)                            # [B, N]
    nearest = torch.empty(batch_size, nodes, k * dilation, dtype=torch.long, device=x.device)
    # While torch.export traces with symbolic sizes, one chunk (the chunks' count would fix the
    # sizes): the exported program does not keep to the memory budget.
    chunks = ([(slice(0, batch_size), slice(0, nodes))] if is_symbolic(batch_size, nodes) else
              _chunks(batch_size, nodes, features.element_size(), memory_budget))
    for images, rows in chunks:
        query = features[images, rows]
        distance = torch.bmm(query, features[images].transpose(1, 2)).mul_(-2)
        distance.add_(squared[images, rows].unsqueeze(-1)).add_(squared[images].unsqueeze(1))
        if relative_pos is not None:
            distance.add_(relative_pos[rows])
        if not self_loops:
            distance[:, torch.arange(rows.stop - rows.start), torch.arange(rows.start, rows.stop)] = \
                float("inf")
        nearest[images, rows] = distance.topk(k * dilation, dim=-1, largest=False).indices

    if stochastic_epsilon > 0 and torch.rand(()) < stochastic_epsilon:
        nearest = nearest[..., torch.randperm(k * dilation, device=x.device)[:k]]
    else:
        nearest = nearest[..., ::dilation]
    replaced = int(corruption * k + 0.5)  # round half up
    if replaced:
        places = torch.rand(nearest.shape, generator=generator, device=x.device).argsort(
            dim=-1)[..., :replaced]
        strangers = torch.randint(0, nodes, (*nearest.shape[:2], replaced), generator=generator,
                                  device=x.device)
        nearest = nearest.scatter(-1, places, strangers)
    offsets = (torch.arange(batch_size, device=x.device) * nodes).view(-1, 1, 1)
    source = nearest + offsets
    target = (torch.arange(nodes, device=x.device).view(1, -1, 1) + offsets).expand_as(source)
    edges = torch.stack([source.reshape(-1), target.reshape(-1)])
    if torch.compiler.is_compiling():
        # EdgeIndex, a tensor subclass, does not trace; compiled convs do not fuse on it anyway.
        return edges
    return EdgeIndex(edges, sparse_size=(batch_size * nodes, batch_size * nodes),
                     sort_order="col")


def _chunks(batch_size: int, nodes: int, element_size: int,
            memory_budget: int) -> Iterator[Tuple[slice, slice]]:
    """(images, rows) slices whose distance block, and topk's copy of it, fit the budget."""
    rows_per_chunk = max(1, memory_budget // (2 * nodes * element_size))
    if rows_per_chunk >= nodes:
        images_per_chunk = rows_per_chunk // nodes
        for start in range(0, batch_size, images_per_chunk):
            yield slice(start, start + images_per_chunk), slice(0, nodes)
    else:
        for image in range(batch_size):
            for start in range(0, nodes, rows_per_chunk):
                yield slice(image, image + 1), slice(start, min(start + rows_per_chunk, nodes))
