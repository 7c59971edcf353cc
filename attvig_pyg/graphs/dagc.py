"""DAGC, the dynamic axial graph of GreedyViG (Munir et al., CVPR 2024)."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from attvig_pyg.adjacency import CyclicAdjacency
from attvig_pyg.graphs.grid import IntOrPair, as_feature_map
from attvig_pyg.graphs.svga import svga_adjacency


@torch.no_grad()
def dagc_threshold(x: Tensor) -> Tensor:
    """GreedyViG's per-image threshold: mean - std (unbiased) over the grid of the L1 distance
    between a feature map ``[B, C, H, W]`` and itself rolled by half the grid, ``(H//2, W//2)``."""
    rolled = x
    for dim in (2, 3):  # torch.roll by size // 2, as a gather (ONNX takes it at symbolic sizes)
        position = torch.arange(x.size(dim), device=x.device)
        size = position.new_full((), x.size(dim))
        rolled = rolled.index_select(dim, (position - size // 2) % size)
    distance = (x - rolled).abs().sum(dim=1).flatten(1)
    if distance.size(1) < 2:  # one node: no std, and no candidate to keep either
        return distance.new_full((distance.size(0),), float("-inf"))
    return distance.mean(dim=1) - distance.std(dim=1)


@torch.no_grad()
def dagc_adjacency(x: Tensor, k: IntOrPair, *, self_loops: bool = False,
                   grid_size: Optional[Tuple[int, int]] = None) -> CyclicAdjacency:
    """The DAGC graph of :func:`dagc_graph` as a :class:`~attvig_pyg.adjacency.CyclicAdjacency`:
    SVGA's candidates (:func:`~attvig_pyg.graphs.svga_adjacency`) with a mask per candidate."""
    x = as_feature_map(x, grid_size)
    batch_size, _, height, width = x.shape
    return dagc_filter(x, svga_adjacency(batch_size, height, width, k, self_loops=self_loops,
                                         device=x.device))


@torch.no_grad()
def dagc_filter(x: Tensor, candidates: CyclicAdjacency) -> CyclicAdjacency:
    """DAGC's per-image filter on the axial candidates of a feature map ``x`` ``[B, C, H, W]``
    (SVGA's, in either form of :func:`~attvig_pyg.graphs.grid.axial_parts`): a candidate stays
    where its L1 distance to the node is below :func:`dagc_threshold`; self-loops always stay."""
    batch_size, channels, height, width = x.shape
    threshold = dagc_threshold(x)
    nodes = x.permute(0, 2, 3, 1).reshape(-1, channels)
    masks = []
    for part in candidates.parts:
        features = nodes[part.cycles]                                  # [cycles, T, C]
        limit = threshold[part.cycles[:, :1] // (height * width)]     # a cycle's image
        if part.offsets is None:  # every member a candidate (symbolic sizes): all pairs
            distance = (features.unsqueeze(2) - features.unsqueeze(1)).abs().sum(dim=-1)
            self_loop = torch.eye(features.size(1), dtype=torch.bool, device=x.device)
            masks.append(part.mask & ((distance < limit.unsqueeze(-1)) | self_loop))
            continue
        # Self-loops (offset 0) are kept unconditionally.
        kept = [(features - features.roll(offset, dims=1)).abs().sum(dim=-1) < limit if offset
                else torch.ones_like(part.cycles, dtype=torch.bool) for offset in part.offsets]
        masks.append(torch.stack(kept, dim=-1) if kept else
                     torch.zeros(*part.cycles.shape, 0, dtype=torch.bool, device=x.device))
    return candidates.with_masks(masks)


def dagc_graph(x: Tensor, k: IntOrPair, *, self_loops: bool = False,
               grid_size: Optional[Tuple[int, int]] = None) -> Tensor:
    r"""The DAGC edges of a feature map: SVGA's candidates kept where they are close.

    A candidate j of node i (as in :func:`~attvig_pyg.graphs.svga_graph`) is kept if the L1
    distance over channels :math:`\|x_i - x_j\|_1` is strictly below the threshold of its image,
    :func:`dagc_threshold`. Computed without gradient, per image.

    Args:
        x (Tensor): Feature map :obj:`[B, C, H, W]`, or node features :obj:`[B * H * W, C]` with
            :obj:`grid_size`.
        k (int or (int, int)): Shift step K, or (K_h, K_w).
        self_loops (bool, optional): Also join every node to itself, once and unconditionally.
            With a max-relative conv this reproduces GreedyViG's roll-and-max, whose running
            maximum starts at zero. (default: :obj:`False`)
        grid_size ((int, int), optional): (H, W) when :obj:`x` holds node features.

    Returns:
        LongTensor :obj:`[2, num_edges]`.
    """
    return dagc_adjacency(x, k, self_loops=self_loops, grid_size=grid_size).to_edge_index()
