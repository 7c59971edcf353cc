"""SVGA, the static criss-cross graph of MobileViG (Munir et al., CVPRW 2023)."""
import functools
from typing import Optional

import torch
from torch import Tensor

from attvig_pyg.adjacency import CyclicAdjacency
from attvig_pyg.graphs.grid import IntOrPair, as_pair, axial_parts


def svga_adjacency(batch_size: int, height: int, width: int, k: IntOrPair, *,
                   self_loops: bool = False,
                   device: Optional[torch.device] = None) -> CyclicAdjacency:
    """The SVGA graph as a :class:`~attvig_pyg.adjacency.CyclicAdjacency` (the form that
    :class:`~attvig_pyg.nn.CrossAttnConv` aggregates at a cost proportional to its edges): per
    column and per row, cycles of positions K apart, every node receiving from the 1, 2, ...
    places behind it.

    Arguments as in :func:`svga_graph`. Cached like it; the returned tensors are shared.
    """
    return _cached(_svga_adjacency, batch_size, height, width, k, self_loops, device)


def svga_graph(batch_size: int, height: int, width: int, k: IntOrPair, *,
               self_loops: bool = False, device: Optional[torch.device] = None) -> Tensor:
    r"""The SVGA edges of :obj:`batch_size` images of :obj:`height` x :obj:`width` nodes.

    Node (h, w) receives from ((h - s) mod H, w) for s = K_h, 2 K_h, ... < H and from
    (h, (w - s) mod W) for s = K_w, 2 K_w, ... < W: cyclic shifts along its column and its row,
    never across images. A 1x1 grid, or K >= H and W, gives no edges (only self-loops if asked).

    Args:
        batch_size (int): Number of images; image b owns nodes b*H*W ... (b+1)*H*W - 1.
        height (int), width (int): Grid size.
        k (int or (int, int)): Shift step K, or (K_h, K_w).
        self_loops (bool, optional): Also join every node to itself, once.
            (default: :obj:`False`)
        device (torch.device, optional): Device of the result. (default: CPU)

    Returns:
        LongTensor :obj:`[2, num_edges]`, image by image. Static: one image's edges are built once
        per (H, W, K, self_loops, device), a batch adds offsets, and both are cached (the returned
        tensor is shared: do not modify it in place).
    """
    return _cached(_svga_edges, batch_size, height, width, k, self_loops, device)


def _cached(build, batch_size, height, width, k, self_loops, device):
    """``build``'s cached result. Cached tensors are ordinary ones even when the first call
    comes under ``torch.inference_mode`` (an inference tensor could never be saved for a later
    backward); while torch.compile or torch.export traces, or in a mode whose tensors are not
    plain ones (a FakeTensorMode), nothing is cached: the tensors are placeholders."""
    if batch_size < 0 or height < 1 or width < 1:
        raise ValueError(f"Expected a batch size >= 0 and a grid of at least 1x1 "
                         f"(got batch_size={batch_size}, height={height}, width={width})")
    key = (batch_size, height, width, as_pair(k, "k"), self_loops, torch.device(device or "cpu"))
    if torch.compiler.is_compiling() or type(torch.empty(0, device="meta")) is not Tensor:
        return build.__wrapped__(*key)
    with torch.inference_mode(False):
        return build(*key)


@functools.lru_cache(maxsize=32)
def _svga_adjacency(batch_size, height, width, k, self_loops, device) -> CyclicAdjacency:
    parts = axial_parts(batch_size, height, width, k, self_loops, device)
    # Correct by construction (tests/test_graphs.py): no data-dependent check.
    return CyclicAdjacency(parts, num_nodes=batch_size * height * width, check_invariants=False)


@functools.lru_cache(maxsize=32)
def _svga_edges(batch_size, height, width, k, self_loops, device) -> Tensor:
    edges = _cached(_svga_adjacency, 1, height, width, k, self_loops, device).to_edge_index()
    offsets = torch.arange(batch_size, device=device).view(-1, 1, 1) * (height * width)
    return (edges.unsqueeze(1) + offsets.transpose(0, 1)).flatten(1)
