r"""A graph whose nodes sit in cycles and receive from the nodes a fixed number of places behind
them: the structured adjacency that the SVGA and DAGC builders produce and that
:class:`attvig_pyg.nn.CrossAttnConv` aggregates with dense per-offset tensor operations, at a
cost proportional to the number of candidate edges."""
from dataclasses import InitVar, dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor


@dataclass(eq=False)
class CyclicNeighbours:
    r"""One part of a :class:`CyclicAdjacency`: node :obj:`cycles[p, t]` receives from node
    :obj:`cycles[p, (t - o) % T]` for every offset :obj:`o = offsets[i]` where
    :obj:`mask[p, t, i]` is true (every offset where :obj:`mask` is :obj:`None`).

    With :obj:`offsets=None` every member of a cycle is a candidate: node :obj:`cycles[p, t]`
    receives from :obj:`cycles[p, u]` where :obj:`mask[p, t, u]` (a mask of shape
    :obj:`[1, T, T]` holds for every cycle). No Python value of this form depends on :obj:`T`,
    which is what a trace with symbolic sizes needs (:func:`torch.export.export` with dynamic
    shapes); its cost is :obj:`T` candidates per node.

    Args:
        cycles (LongTensor): :obj:`[num_cycles, T]` node ids, a cycle per row.
        offsets (tuple of int, optional): The places behind a node its candidates sit, distinct
            modulo :obj:`T` (offset 0 is a self-loop); :obj:`None`: every member.
        mask (BoolTensor, optional): :obj:`[num_cycles, T, len(offsets)]`, or with
            :obj:`offsets=None` (then required) :obj:`[num_cycles or 1, T, T]`: which candidates
            are edges. (default: :obj:`None`, all)
        inverse (LongTensor, optional): For a part whose cycles hold every node of the graph
            exactly once (a permutation of the nodes, as the SVGA and DAGC builders make them):
            :obj:`[num_nodes]`, where each node sits in :obj:`cycles.flatten()`. The kernels
            then move values between nodes and cycles by gathering alone, which is faster than
            scattering. :meth:`permutation` builds it; :class:`CyclicAdjacency` checks it.
            (default: :obj:`None`)
    """

    cycles: Tensor
    offsets: Optional[Tuple[int, ...]]
    mask: Optional[Tensor] = None
    inverse: Optional[Tensor] = None

    def __post_init__(self):
        if not isinstance(self.cycles, Tensor) or self.cycles.dim() != 2 or \
                self.cycles.dtype != torch.long:
            raise ValueError(f"Expected 'cycles' as a long tensor [num_cycles, T] (got "
                             f"{_describe(self.cycles)})")
        length = self.cycles.size(1)
        if self.offsets is None:
            shapes = ((1, length, length), (*self.cycles.shape, length))
            if not isinstance(self.mask, Tensor) or self.mask.dtype != torch.bool or \
                    tuple(self.mask.shape) not in shapes:
                raise ValueError(f"Expected 'mask' as a bool tensor of shape {list(shapes[1])} "
                                 f"or {list(shapes[0])} (every member of a cycle a candidate: "
                                 f"offsets=None; got {_describe(self.mask)})")
        else:
            offsets = tuple(self.offsets)
            if not all(isinstance(o, int) for o in offsets) or \
                    len({o % max(length, 1) for o in offsets}) != len(offsets):
                raise ValueError(f"Expected 'offsets' as distinct ints modulo the cycle length "
                                 f"{length} (got {self.offsets})")
            self.offsets = offsets
            expected = (*self.cycles.shape, len(offsets))
            if self.mask is not None and (not isinstance(self.mask, Tensor) or
                                          self.mask.dtype != torch.bool or
                                          tuple(self.mask.shape) != expected):
                raise ValueError(f"Expected 'mask' as a bool tensor of shape {list(expected)} "
                                 f"[num_cycles, T, len(offsets)] (got {_describe(self.mask)})")
        if self.inverse is not None and (not isinstance(self.inverse, Tensor) or
                                         self.inverse.dtype != torch.long or
                                         tuple(self.inverse.shape) != (self.cycles.numel(),)):
            raise ValueError(f"Expected 'inverse' as a long tensor of shape "
                             f"[{self.cycles.numel()}] (one entry per node of the cycles; got "
                             f"{_describe(self.inverse)})")

    @classmethod
    def permutation(cls, cycles: Tensor, offsets: Optional[Sequence[int]],
                    mask: Optional[Tensor] = None) -> "CyclicNeighbours":
        """A part whose :obj:`cycles` hold every node of the graph exactly once, with its
        :obj:`inverse`."""
        flat = cycles.flatten()
        inverse = torch.empty_like(flat).scatter_(0, flat, torch.arange(
            flat.numel(), device=flat.device))
        return cls(cycles, None if offsets is None else tuple(offsets), mask, inverse)

    @property
    def num_candidates(self) -> int:
        """Candidates per node times nodes."""
        return self.cycles.numel() * self.candidates_per_node

    @property
    def candidates_per_node(self) -> int:
        return self.cycles.size(1) if self.offsets is None else len(self.offsets)

    def behind(self) -> Tensor:
        """:obj:`[T, candidates]`: the cycle position of each candidate of each position."""
        length = self.cycles.size(1)
        position = torch.arange(length, device=self.cycles.device)
        if self.offsets is None:
            return position.view(1, -1).expand(length, -1)
        first, count = self.offsets[0] if self.offsets else 0, len(self.offsets)
        if self.offsets == tuple(range(first, first + count)):  # the builders' offsets: made on
            offsets = torch.arange(first, first + count, device=self.cycles.device)  # the device
        else:
            offsets = torch.tensor(self.offsets, dtype=torch.long, device=self.cycles.device)
        return (position.view(-1, 1) - offsets.view(1, -1)) % max(length, 1)

    def sources(self) -> Tensor:
        """:obj:`[num_cycles, T, candidates]`: the node each candidate comes from."""
        return self.cycles[:, self.behind()]

    def edge_mask(self) -> Optional[Tensor]:
        """:obj:`[num_cycles, T, candidates]`: which candidates are edges (:obj:`None`: all)."""
        return None if self.mask is None else self.mask.expand(*self.cycles.shape, -1)


@dataclass(eq=False)
class CyclicAdjacency:
    r"""A graph on :obj:`num_nodes` nodes: the union of the edges of its :class:`CyclicNeighbours`
    parts (an edge listed by two parts is two edges, as in an :obj:`edge_index` with a repeated
    column).

    The order of the edges, in :meth:`to_edge_index` and in the attention weights
    :class:`~attvig_pyg.nn.CrossAttnConv` returns, is part by part, then row-major over
    :obj:`[num_cycles, T, len(offsets)]`, skipping masked candidates.

    Construction checks every invariant: the structure (shapes, dtypes, devices) always, the node
    ids (:meth:`validate`, which reads values and so waits for an accelerator) unless
    :obj:`check_invariants=False`, as :func:`torch.sparse_csr_tensor` has it. The graph
    builders make their adjacencies correct by construction (their tests prove it) and pass
    :obj:`False`; :meth:`with_masks` keeps the validity of the parts it reuses. Nothing is
    checked again when a conv receives one. The builders cache their adjacencies: do not
    modify one in place.
    """

    parts: Tuple[CyclicNeighbours, ...]
    num_nodes: int
    check_invariants: InitVar[bool] = True

    def __post_init__(self, check_invariants: bool):
        self.parts = tuple(self.parts)
        if not all(isinstance(part, CyclicNeighbours) for part in self.parts):
            raise TypeError("Expected 'parts' as CyclicNeighbours")
        # (A torch.SymInt while torch.export traces with a dynamic batch.)
        if isinstance(self.num_nodes, bool) or not (
                isinstance(self.num_nodes, torch.SymInt) or
                (isinstance(self.num_nodes, int) and self.num_nodes >= 0)):
            raise ValueError(f"Expected 'num_nodes' as an int >= 0 (got {self.num_nodes!r})")
        if len({part.cycles.device for part in self.parts}) > 1:
            raise ValueError("Every part of a CyclicAdjacency must be on one device")
        if check_invariants and not torch.compiler.is_compiling():
            self.validate()

    def validate(self) -> "CyclicAdjacency":
        """Raises unless every node id lies in ``[0, num_nodes)`` and every part with an
        ``inverse`` is a permutation of the nodes; returns the adjacency. Reads values: on an
        accelerator it waits for the device."""
        for part in self.parts:
            if part.cycles.numel() and (int(part.cycles.min()) < 0 or
                                        int(part.cycles.max()) >= self.num_nodes):
                raise IndexError(f"A CyclicAdjacency part holds node ids in "
                                 f"[{int(part.cycles.min())}, {int(part.cycles.max())}], outside "
                                 f"[0, {self.num_nodes - 1}]")
            if part.inverse is not None and (
                    part.inverse.numel() != self.num_nodes or not torch.equal(
                        part.cycles.flatten()[part.inverse],
                        torch.arange(self.num_nodes, device=part.inverse.device))):
                raise ValueError("A CyclicAdjacency part has an 'inverse' but its cycles are not "
                                 f"a permutation of the {self.num_nodes} nodes")
        return self

    @property
    def device(self) -> torch.device:
        return self.parts[0].cycles.device if self.parts else torch.device("cpu")

    def with_masks(self, masks: Sequence[Optional[Tensor]]) -> "CyclicAdjacency":
        """The same candidates with other masks, one per part (a dynamic graph over a static
        candidate set: DAGC). The node ids are this adjacency's, already checked: only the masks'
        shapes and dtypes are."""
        if len(masks) != len(self.parts):
            raise ValueError(f"Expected {len(self.parts)} masks, one per part (got {len(masks)})")
        parts = tuple(CyclicNeighbours(part.cycles, part.offsets, mask, part.inverse)
                      for part, mask in zip(self.parts, masks))
        return CyclicAdjacency(parts, self.num_nodes, check_invariants=False)

    def num_edges(self) -> int:
        return sum(part.num_candidates if part.mask is None else int(part.edge_mask().sum())
                   for part in self.parts)

    def num_candidates(self) -> int:
        """The (node, candidate) pairs the conv scores: edges and masked candidates."""
        return sum(part.num_candidates for part in self.parts)

    def density(self) -> float:
        """Edges per scored candidate (1.0 without masks, and for a graph without candidates)."""
        candidates = self.num_candidates()
        return self.num_edges() / candidates if candidates else 1.0

    def candidate_edges(self) -> Tuple[Tensor, Optional[Tensor]]:
        """Every candidate as an edge, :obj:`[2, num_candidates]` (row 0 sends, row 1
        receives), and which are edges, :obj:`[num_candidates]` (:obj:`None`: all): sizes
        that do not depend on the masks' values, so that nothing waits for an accelerator."""
        edges, masks = [torch.empty(2, 0, dtype=torch.long, device=self.device)], []
        for part, sources, targets in self._part_candidates():
            edges.append(torch.stack([sources.reshape(-1), targets.reshape(-1)]))
            masks.append(part.edge_mask().reshape(-1) if part.mask is not None else
                         torch.ones(sources.numel(), dtype=torch.bool, device=self.device))
        masked = any(part.mask is not None for part in self.parts)
        return torch.cat(edges, dim=1), torch.cat(masks) if masked else None

    def to_edge_index(self) -> Tensor:
        """The edges as a :obj:`[2, num_edges]` tensor (row 0 sends, row 1 receives), in the
        order documented above. With masks, its size depends on their values (on an
        accelerator, the host waits for them)."""
        edges = [torch.empty(2, 0, dtype=torch.long, device=self.device)]
        for part, sources, targets in self._part_candidates():
            if part.mask is not None:  # (selected per part: fewer copies than from the whole)
                sources, targets = sources[part.edge_mask()], targets[part.edge_mask()]
            edges.append(torch.stack([sources.reshape(-1), targets.reshape(-1)]))
        return torch.cat(edges, dim=1)

    def _part_candidates(self):
        """Per part: the part, and its candidates' senders and receivers
        ``[num_cycles, T, candidates]``."""
        for part in self.parts:
            sources = part.sources()
            yield part, sources, part.cycles.unsqueeze(-1).expand_as(sources)

    def __repr__(self) -> str:
        parts = ", ".join(f"{tuple(p.cycles.shape)} x "
                          f"{'all' if p.offsets is None else len(p.offsets)} offsets"
                          f"{' masked' if p.mask is not None else ''}" for p in self.parts)
        return f"{self.__class__.__name__}(num_nodes={self.num_nodes}, parts=[{parts}])"


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__
