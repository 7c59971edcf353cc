"""What every image-grid builder shares: argument checks, node numbering and axial blocks.

Node (h, w) of image b has id ``b * H * W + h * W + w``; ``edge_index[0]`` is the neighbour that
sends, ``edge_index[1]`` the node that receives (PyG's ``source_to_target`` flow).
"""
import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

IntOrPair = Union[int, Tuple[int, int]]


def as_pair(value: IntOrPair, name: str) -> Tuple[int, int]:
    """``K`` or ``(K_h, K_w)`` as a pair of positive ints."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise ValueError(f"'{name}' must be a positive int or a pair of positive ints "
                         f"(got {value!r})")
    return pair


def default_steps(height: int, width: int) -> Tuple[int, int]:
    """The SVGA/DAGC shift step per axis when none is given: max(1, size // 7), which is
    GreedyViG's K = 8, 4, 2, 1 at 224 px and keeps small grids connected."""
    return max(1, height // 7), max(1, width // 7)


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


def axis_blocks(length: int, step: int, self_loops: bool) -> Tuple[Tensor, Tensor]:
    """The candidates along one axis of a cyclic grid, as dense blocks.

    Position p receives from ``(p - s) mod length`` for ``s = step, 2 * step, ... < length``
    (and from itself if ``self_loops``). Those positions share p's residue modulo
    ``g = gcd(length, step)``, so the axis splits into g blocks of ``length // g`` positions with
    every candidate pair inside a block. Returns ``positions [g, length // g]`` (block r holds
    ``r, r + g, r + 2g, ...``) and ``mask [length // g, length // g]`` with ``mask[i, j]`` true where
    block slot j sends to slot i. When ``step`` divides ``length``, a block is complete.
    """
    groups = math.gcd(length, step)
    size = length // groups
    positions = torch.arange(length).view(size, groups).t()
    slots = torch.arange(size)
    shift = ((slots.view(-1, 1) - slots.view(1, -1)) * groups) % length
    mask = (shift > 0) & (shift % step == 0)
    if self_loops:
        mask |= shift == 0
    return positions.contiguous(), mask


def axial_parts(height: int, width: int, steps: Tuple[int, int],
                self_loops: bool) -> Tuple[Tuple[Tensor, Tensor], ...]:
    """The column part and the row part of one image's axial graph as ``(index, mask)`` blocks.

    Self-loops, if asked for, go into the column part only, so that every node has exactly one.
    """
    along_h, mask_h = axis_blocks(height, steps[0], self_loops)
    along_w, mask_w = axis_blocks(width, steps[1], False)
    # Column part, blocks ordered (w, r): node along_h[r, t] * W + w.
    column_index = along_h.view(1, *along_h.shape) * width + torch.arange(width).view(-1, 1, 1)
    # Row part, blocks ordered (h, r): node h * W + along_w[r, t].
    row_index = torch.arange(height).view(-1, 1, 1) * width + along_w.view(1, *along_w.shape)
    return (column_index.flatten(0, 1), mask_h), (row_index.flatten(0, 1), mask_w)


def batch_parts(parts, batch_size: int, nodes_per_image: int,
                device: Optional[torch.device] = None) -> Tuple[Tuple[Tensor, Tensor], ...]:
    """One image's ``(index, mask)`` blocks repeated for a batch: image b's ids offset by
    ``b * nodes_per_image``, blocks ordered image-major."""
    offsets = torch.arange(batch_size).view(-1, 1, 1) * nodes_per_image
    return tuple(((index.unsqueeze(0) + offsets).flatten(0, 1).to(device), mask.to(device))
                 for index, mask in parts)
