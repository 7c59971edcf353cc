"""A graph given as dense blocks: the structured adjacency that grid graph builders produce and
that :class:`attvig_pyg.nn.CrossAttnConv` aggregates with batched matrix products."""
from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class BlockAdjacency:
    r"""The union of dense blocks of a graph on :obj:`num_nodes` nodes.

    Each part is a pair :obj:`(index, mask)`: :obj:`index` of shape :obj:`[num_blocks, S]` lists
    the node ids of every block, and the boolean :obj:`mask` of shape :obj:`[S, S]` (shared by all
    blocks) or :obj:`[num_blocks, S, S]` says which pairs are edges: node :obj:`index[b, j]` sends
    to node :obj:`index[b, i]` where :obj:`mask[b, i, j]`. The edge set is the union over all parts
    and blocks (a pair listed twice is two edges, as in an :obj:`edge_index` with a repeated
    column). :meth:`to_edge_index` gives the same graph as an :obj:`edge_index`.
    """

    parts: Tuple[Tuple[Tensor, Tensor], ...]
    num_nodes: int

    def __post_init__(self):
        for index, mask in self.parts:
            if index.dim() != 2 or index.dtype != torch.long:
                raise ValueError(f"Expected a long block index of shape [num_blocks, S] "
                                 f"(got {index.dtype} {tuple(index.shape)})")
            size = index.size(1)
            if mask.dtype != torch.bool or mask.shape[-2:] != (size, size) or mask.dim() not in (
                    2, 3) or (mask.dim() == 3 and mask.size(0) != index.size(0)):
                raise ValueError(f"Expected a boolean mask of shape [{size}, {size}] or "
                                 f"[{index.size(0)}, {size}, {size}] for a block index of shape "
                                 f"{tuple(index.shape)} (got {mask.dtype} {tuple(mask.shape)})")

    @property
    def device(self) -> torch.device:
        return self.parts[0][0].device if self.parts else torch.device("cpu")

    def num_edges(self) -> int:
        return sum(int(mask.expand(index.size(0), -1, -1).sum()) for index, mask in self.parts)

    def to_edge_index(self) -> Tensor:
        """The edges as a :obj:`[2, num_edges]` tensor, part by part, block by block, in the
        row-major order of the mask (the order in which the conv returns attention weights)."""
        edges = [torch.empty(2, 0, dtype=torch.long, device=self.device)]
        for index, mask in self.parts:
            block, target, source = mask.expand(index.size(0), -1, -1).nonzero(as_tuple=True)
            edges.append(torch.stack([index[block, source], index[block, target]]))
        return torch.cat(edges, dim=1)
