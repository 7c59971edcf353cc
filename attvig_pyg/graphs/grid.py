"""What every image-grid builder shares: argument checks, node numbering and axial cycles.

Node (h, w) of image b has id ``b * H * W + h * W + w``; ``edge_index[0]`` is the neighbour that
sends, ``edge_index[1]`` the node that receives (PyG's ``source_to_target`` flow).
"""
import math
import operator
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from attvig_pyg.adjacency import CyclicNeighbours

IntOrPair = Union[int, Tuple[int, int]]


def as_pair(value: IntOrPair, name: str) -> Tuple[int, int]:
    """``K`` or ``(K_h, K_w)`` as a pair of positive ints; any integer-like value (a Python
    or NumPy integer, a 0-d integer tensor) counts as an int."""
    def integer(v) -> int:
        if isinstance(v, bool):
            raise TypeError("a bool is not a step")
        if isinstance(v, torch.SymInt):  # symbolic while torch.export traces: kept as it is
            return v
        return operator.index(v)
    try:
        pair = tuple(map(integer, value if isinstance(value, (tuple, list)) else (value, value)))
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(isinstance(v, torch.SymInt) or v >= 1 for v in pair):
        raise ValueError(f"'{name}' must be a positive int or a pair of positive ints "
                         f"(got {value!r})")
    return pair


def default_steps(height: int, width: int) -> Tuple[int, int]:
    """The SVGA/DAGC shift step per axis when none is given: max(1, size // 7), which is
    GreedyViG's K = 8, 4, 2, 1 at 224 px and keeps small grids connected. (torch.sym_max: the
    sizes may be symbolic while torch.export traces.)"""
    return torch.sym_max(1, height // 7), torch.sym_max(1, width // 7)


def as_feature_map(x: Tensor, grid_size: Optional[Tuple[int, int]] = None) -> Tensor:
    """A feature map ``[B, C, H, W]``, or node features ``[B * H * W, C]`` with ``grid_size=(H, W)``
    (nodes numbered as above), as a ``[B, C, H, W]`` tensor."""
    if x.dim() == 4 and grid_size is None:
        return x
    if x.dim() == 2 and grid_size is not None:
        height, width = grid_size
        if height < 1 or width < 1 or x.size(0) % (height * width) != 0:
            raise ValueError(f"The node count {x.size(0)} is not a multiple of the {height}x{width} "
                             f"grid's {height * width} nodes per image")
        return x.view(-1, height, width, x.size(1)).permute(0, 3, 1, 2)
    raise ValueError("Expected a feature map [batch, channels, height, width], or node features "
                     "[num_nodes, channels] together with grid_size=(height, width) "
                     f"(got a tensor of shape {tuple(x.shape)} and grid_size={grid_size})")


def axis_cycles(length: int, step: int, self_loops: bool,
                device: Optional[torch.device] = None) -> Tuple[Tensor, Tuple[int, ...]]:
    """The candidates along one axis of a cyclic grid, as cycles and offsets.

    Position p receives from ``(p - s) mod length`` for ``s = step, 2 * step, ... < length``
    (and from itself if ``self_loops``). With ``g = gcd(length, step)`` the axis splits into g
    cycles of ``length // g`` positions, cycle r visiting ``r, r + step, r + 2 * step, ...``
    (mod length): p's candidates are the positions 1, 2, ... places behind it in its cycle.
    Returns ``cycles [g, length // g]`` and the offsets (0 first for the self-loop).
    """
    groups = math.gcd(length, step)
    cycles = (torch.arange(groups, device=device).view(-1, 1) +
              torch.arange(length // groups, device=device).view(1, -1) * step) % length
    offsets = tuple(range(0 if self_loops else 1, len(range(step, length, step)) + 1))
    return cycles, offsets


def axis_line(length: int, step: int, self_loops: bool,
              device: Optional[torch.device] = None) -> Tuple[Tensor, Tensor]:
    """The candidates of :func:`axis_cycles` as one line of ``length`` positions and a
    ``[1, length, length]`` mask, computed with tensor operations alone: position p receives
    from u where ``(p - u) mod length`` is a positive multiple of ``step`` (or zero, with
    ``self_loops``). The form for sizes that are symbolic while torch.export traces."""
    position = torch.arange(length, device=device)
    # (The divisors as tensors: ONNX's exporter takes no symbolic scalar divisor.)
    behind = (position.view(-1, 1) - position.view(1, -1)) % position.new_full((), length)
    mask = behind % position.new_full((), step) == 0
    if not self_loops:
        mask = mask & (behind != 0)
    return position.view(1, -1), mask.unsqueeze(0)


def is_symbolic(*sizes) -> bool:
    """Whether any size is symbolic: torch.export tracing with dynamic shapes."""
    return any(isinstance(size, torch.SymInt) for size in sizes)


def axial_parts(batch_size: int, height: int, width: int, steps: Tuple[int, int],
                self_loops: bool, device: Optional[torch.device] = None,
                lines: Optional[bool] = None) -> Tuple[CyclicNeighbours, ...]:
    """The column part and the row part of a batch's axial graph (a part may have no
    candidates). Self-loops, if asked for, go into the column part only, so that every node has
    exactly one.

    The rule for the form: cycles with offsets (:func:`axis_cycles`, a cost proportional to the
    edges) where the sizes are numbers; whole lines with a mask (:func:`axis_line`, a cost of H
    + W candidates per node) where torch.export traces with symbolic sizes, since the cycles'
    structure depends on the sizes' values. ``lines`` overrides the rule."""
    if lines is None:
        lines = is_symbolic(height, width, *steps)
    if lines:
        along_h, mask_h = axis_line(height, steps[0], self_loops, device)
        along_w, mask_w = axis_line(width, steps[1], False, device)
        offsets_h = offsets_w = None
    else:
        (along_h, offsets_h), (along_w, offsets_w) = (
            axis_cycles(height, steps[0], self_loops, device),
            axis_cycles(width, steps[1], False, device))
        mask_h = mask_w = None
    # Made on the device itself: nothing is copied from the host.
    image = torch.arange(batch_size, device=device).view(-1, 1, 1, 1) * (height * width)
    # Column cycles, ordered (image, column, cycle): node b*H*W + h*W + w for h along the cycle.
    columns = image + along_h.view(1, 1, *along_h.shape) * width + \
        torch.arange(width, device=device).view(1, -1, 1, 1)
    # Row cycles, ordered (image, row, cycle): node b*H*W + h*W + w for w along the cycle.
    rows = image + torch.arange(height, device=device).view(1, -1, 1, 1) * width + \
        along_w.view(1, 1, *along_w.shape)
    # Each part holds every node once: permutations.
    return (CyclicNeighbours.permutation(columns.flatten(0, 2), offsets_h, mask_h),
            CyclicNeighbours.permutation(rows.flatten(0, 2), offsets_w, mask_w))
