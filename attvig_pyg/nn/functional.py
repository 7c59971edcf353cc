"""The kernels of :class:`~attvig_pyg.nn.CrossAttnConv`: attention weights and their
normalisation (one implementation for every adjacency form), the aggregation over a
:class:`~attvig_pyg.adjacency.CyclicAdjacency`, and the fused edge-list products.

Shapes: queries, keys and values are ``[num_nodes, heads, head_dim]``; similarities and weights
are ``[*rows, heads, candidates]`` (candidates last, so that the elementwise passes over a dense
block run along contiguous memory). Over a cyclic adjacency, the rows are ``[num_cycles, T]``
and the tensors are views of ``[num_cycles, heads, T, ...]`` ones: node values are gathered
straight into that layout (one permutation of the node-head rows), where a cycle's products
are batched matmuls with no transpose around them. What this layout is worth in each runtime
is measured in docs/deployment.md.
"""
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from attvig_pyg.adjacency import CyclicAdjacency, CyclicNeighbours

NORMALIZE_MODES = ("none", "softmax", "mean")
FUSED_DTYPES = (torch.float32, torch.float64)  # what torch's CSR kernels support


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    r"""Like :func:`torch.nn.functional.normalize` over the last dimension, but with the norm and
    the division in at least float32 whatever the input dtype (so that half precision keeps zero
    vectors finite), cast back to the input dtype. At a zero vector the gradient is the incoming
    one divided by the floor on the norm, so the floor is at least 64 / the dtype's largest
    value: float16's gradients stay finite (a floor of 9.8e-4, float16's resolution; 1e-12 would
    turn them into inf), every other dtype keeps ``eps``."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    norm = torch.linalg.vector_norm(wide, dim=-1, keepdim=True)
    return (wide / norm.clamp_min(max(eps, 64 / torch.finfo(x.dtype).max))).to(x.dtype)


# ---- attention weights ----------------------------------------------------------------------

def attention_weights(similarities: Sequence[Tensor], targets: Sequence[Tensor],
                      masks: Sequence[Optional[Tensor]], log_beta: Tensor, normalize: str,
                      num_nodes: int) -> List[Tensor]:
    r"""Eq. 5, :math:`\alpha = \exp(-\beta (1 - s))`, and the optional normalisation over each
    node's incoming edges, for edges given as groups of rows of candidates.

    Group g holds rows of candidates: ``similarities[g]`` ``[*rows, heads, candidates]``,
    ``targets[g]`` ``[*rows]`` (the node the candidates of a row send to) and ``masks[g]``,
    broadcastable to ``[*rows, candidates]`` (which candidates are edges; ``None``: all). An edge
    list is one group of single-candidate rows. A node's edges may lie in several groups: the
    normalisation spans them all.

    ``"softmax"`` divides by the sum over the node's edges after subtracting their maximum
    (stable for any beta); ``"mean"`` divides by the node's in-degree. Masked candidates get
    weight zero. Returns the weights in the shapes of ``similarities``.
    """
    if not similarities:
        return []
    beta = log_beta.exp()
    if normalize == "softmax":
        peak = similarities[0].new_full((num_nodes, similarities[0].size(-2)), float("-inf"))
        for similarity, target, mask in zip(similarities, targets, masks):
            if not similarity.size(-1):
                continue
            # The subtracted maximum cancels out: no gradient flows through it.
            candidates = similarity.detach()
            if mask is not None:
                candidates = candidates.masked_fill(~mask.unsqueeze(-2), float("-inf"))
            row_peak = candidates.amax(dim=-1).reshape(-1, candidates.size(-2))
            peak.scatter_reduce_(0, target.reshape(-1, 1).expand_as(row_peak), row_peak, "amax")
        peak = peak.masked_fill(peak == float("-inf"), 0.0)  # nodes without edges
        weights = [torch.exp(_masked_out(beta * (similarity - peak[target].unsqueeze(-1)), mask))
                   for similarity, target, mask in zip(similarities, targets, masks)]
        total = _per_node(weights, targets, num_nodes)
        total = total.masked_fill(total == 0, 1.0)  # nodes whose candidates are all masked
        return [weight / total[target].unsqueeze(-1) for weight, target in zip(weights, targets)]
    weights = [torch.exp(_masked_out(beta * (similarity - 1.0), mask))
               for similarity, mask in zip(similarities, masks)]
    if normalize == "mean":
        counts = [weight.new_ones(*weight.shape[:-2], 1, weight.size(-1)) if mask is None else
                  mask.expand(*weight.shape[:-2], weight.size(-1)).unsqueeze(-2).to(weight.dtype)
                  for weight, mask in zip(weights, masks)]
        degree = _per_node(counts, targets, num_nodes).clamp_min(1)
        weights = [weight / degree[target].unsqueeze(-1)
                   for weight, target in zip(weights, targets)]
    return weights


def _masked_out(exponent: Tensor, mask: Optional[Tensor]) -> Tensor:
    """-inf (a weight of zero) at masked candidates, in the exponent: a masked candidate may
    lie far above its node's peak, where exp would overflow and inf times a zero mask is NaN.
    (After beta: beta times -inf would give beta a NaN gradient.)"""
    return exponent if mask is None else exponent.masked_fill(~mask.unsqueeze(-2),
                                                              float("-inf"))


def _per_node(values: Sequence[Tensor], targets: Sequence[Tensor], num_nodes: int) -> Tensor:
    """Sums ``[*rows, k, candidates]`` groups over candidates and rows of the same target."""
    total = values[0].new_zeros(num_nodes, values[0].size(-2))
    for value, target in zip(values, targets):
        total = total.index_add(0, target.reshape(-1),
                                value.sum(dim=-1).reshape(-1, value.size(-2)))
    return total


# ---- a CyclicAdjacency ----------------------------------------------------------------------
# Two ways to score a part, one rule to choose (measured in docs/benchmarks.md): where the
# candidates fill at least half of each cycle (SVGA/DAGC when K divides the grid), score every
# pair of a cycle at once, a [T, T] block per cycle in batched matrix products; elsewhere (K
# does not divide the grid: a few candidates along long cycles), one shift of the cycles per
# offset, which costs what the candidates cost.

def scores_densely(part: CyclicNeighbours) -> bool:
    """The rule: dense blocks when the candidates fill at least half of every cycle (always
    for a part whose candidates are every member, ``offsets=None``)."""
    return part.offsets is None or 2 * len(part.offsets) >= part.cycles.size(1)


class _PermuteRows(torch.autograd.Function):
    """``x[index]`` for a permutation ``index`` whose inverse is known: the backward pass
    gathers too (``grad[inverse]``) instead of scattering (index_select's backward, an
    index_add that is several times slower on the CPU)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        inverse, = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def _head_rows(part: CyclicNeighbours, heads: int) -> Tuple[Tensor, Optional[Tensor]]:
    """Where the rows of ``[num_nodes * heads, head_dim]`` (node-major) go in the
    ``[num_cycles, heads, T]`` order of the kernels, and (for a part with an ``inverse``) the
    inverse permutation: one gather moves node values into the layout of the batched matmuls,
    with no transpose before or after it."""
    length = part.cycles.size(1)
    if heads == 1:
        return part.cycles.flatten(), part.inverse
    head = torch.arange(heads, device=part.cycles.device)
    index = (part.cycles.unsqueeze(1) * heads + head.view(1, -1, 1)).flatten()
    if part.inverse is None:
        return index, None
    # (The divisor as a tensor: ONNX's exporter takes no symbolic scalar divisor.)
    cycle = torch.div(part.inverse, part.inverse.new_full((), length), rounding_mode="floor")
    position = part.inverse - cycle * length
    inverse = ((cycle.unsqueeze(1) * heads + head) * length + position.unsqueeze(1)).flatten()
    return index, inverse


def _in_cycles(x: Tensor, part: CyclicNeighbours, rows: Tuple[Tensor, Optional[Tensor]]
               ) -> Tensor:
    """``[num_nodes, heads, head_dim]`` node values as ``[num_cycles, heads, T, head_dim]``
    (``rows``: :func:`_head_rows`)."""
    index, inverse = rows
    flat = x.reshape(-1, x.size(-1))
    gathered = (_PermuteRows.apply(flat, index, inverse) if inverse is not None else
                flat.index_select(0, index))
    return gathered.view(part.cycles.size(0), x.size(1), part.cycles.size(1), x.size(-1))


def _to_nodes(values: Tensor, rows: Tuple[Tensor, Optional[Tensor]], num_nodes: int) -> Tensor:
    """Values in the layout of :func:`_in_cycles` as ``[num_nodes, heads, head_dim]`` (zero at
    nodes no cycle of the part holds)."""
    index, inverse = rows
    flat = values.reshape(-1, values.size(-1))
    if inverse is not None:
        nodes = _PermuteRows.apply(flat, inverse, index)
    else:
        nodes = flat.new_zeros(num_nodes * values.size(1), flat.size(1)).index_add_(0, index, flat)
    return nodes.view(num_nodes, values.size(1), values.size(-1))


def _dense_mask(part: CyclicNeighbours) -> Tensor:
    """``[num_cycles or 1, T, T]``: which (position, member) pairs of a cycle are edges."""
    if part.offsets is None:
        return part.mask
    length = part.cycles.size(1)
    behind = part.behind()
    if part.mask is None:
        return torch.zeros(1, length, length, dtype=torch.bool, device=behind.device).scatter_(
            2, behind.unsqueeze(0), True)
    return torch.zeros(*part.cycles.shape, length, dtype=torch.bool,
                       device=behind.device).scatter_(2, behind.expand_as(part.mask), part.mask)


def cyclic_scores(query: Tensor, key: Tensor, part: CyclicNeighbours,
                  rows: Tuple[Tensor, Optional[Tensor]]) -> Tuple[Tensor, Optional[Tensor]]:
    """Every node's query against the keys of its candidates: scores
    ``[num_cycles, T, heads, candidates]`` (a view of a ``[num_cycles, heads, T,
    candidates]`` tensor) and the mask, broadcastable to ``[num_cycles, T, candidates]``, of
    which are edges (``None``: all). Dense parts (:func:`scores_densely`) score all T members
    of the cycle; the others one shift per offset, in the order of ``part.offsets``.
    ``rows``: :func:`_head_rows` of the part."""
    at_node, keys = _in_cycles(query, part, rows), _in_cycles(key, part, rows)  # [P, H, T, d]
    if scores_densely(part):
        return torch.matmul(at_node, keys.transpose(-1, -2)).transpose(1, 2), _dense_mask(part)
    if not part.offsets:  # no candidates: an empty result that is still part of the autograd
        empty = (at_node * keys).sum(dim=-1).unsqueeze(-1)[..., :0]  # graph (DDP)
        return empty.transpose(1, 2), part.mask
    shifts = [(at_node * keys.roll(offset, dims=2)).sum(dim=-1) for offset in part.offsets]
    return torch.stack(shifts, dim=-1).transpose(1, 2), part.mask


def cyclic_sum(weight: Tensor, value: Tensor, part: CyclicNeighbours,
               rows: Tuple[Tensor, Optional[Tensor]]) -> Tensor:
    """``[num_cycles, heads, T, head_dim]``: every node's sum of its candidates' values, with
    ``weight`` in the layout of :func:`cyclic_scores` (``rows``: :func:`_head_rows`)."""
    values = _in_cycles(value, part, rows)
    weight = weight.transpose(1, 2)  # [P, H, T, candidates]
    if scores_densely(part):
        return torch.matmul(weight, values)
    out = values * weight.sum(dim=-1).unsqueeze(-1) if not part.offsets else None  # zeros
    for i, offset in enumerate(part.offsets):
        term = weight[..., i].unsqueeze(-1) * values.roll(offset, dims=2)
        out = term if out is None else out + term
    return out


def cyclic_attention(query: Tensor, key: Tensor, value: Tensor, adjacency: CyclicAdjacency,
                     log_beta: Tensor, normalize: str, dropout: float,
                     training: bool) -> Tuple[Tensor, List[Tensor]]:
    """Eq. 4-6 over a :class:`~attvig_pyg.adjacency.CyclicAdjacency`: the aggregated messages
    ``[num_nodes, heads, head_dim]`` and every part's weights before dropout, in the layout of
    :func:`cyclic_scores` (:func:`cyclic_edge_weights` lists them per edge)."""
    rows = [_head_rows(part, query.size(1)) for part in adjacency.parts]
    scored = [cyclic_scores(query, key, part, part_rows)
              for part, part_rows in zip(adjacency.parts, rows)]
    weights = attention_weights([scores for scores, _ in scored],
                                [part.cycles for part in adjacency.parts],
                                [mask for _, mask in scored], log_beta, normalize,
                                adjacency.num_nodes)
    out = None
    for part, part_rows, weight in zip(adjacency.parts, rows, weights):
        dropped = torch.nn.functional.dropout(weight, p=dropout, training=training)
        summed = _to_nodes(cyclic_sum(dropped, value, part, part_rows), part_rows,
                           adjacency.num_nodes)
        out = summed if out is None else out + summed
    if out is None:  # no parts
        out = value.new_zeros(adjacency.num_nodes, *value.shape[1:])
    return out, weights


def cyclic_max_relative(x: Tensor, adjacency: CyclicAdjacency) -> Tensor:
    r"""Eq. 1's relative term over a :class:`~attvig_pyg.adjacency.CyclicAdjacency`:
    :math:`\max_{j \in \mathcal{N}(i)} (x_j - x_i)` element-wise, ``[num_nodes, channels]``
    (zeros for a node without edges, as PyG's max over nothing), computed as the official
    GreedyViG computes it: a shift of the cycles per offset, masked candidates left out. As
    :math:`(\max_j x_j) - x_i`: the same values (a rounded difference grows with
    :math:`x_j`) and gradients, one subtraction per node instead of one per candidate. The
    maximum over a node's candidates is one reduction, so that tied maxima share the gradient
    as in PyG's scatter-max."""
    best = []
    for part in adjacency.parts:
        if not part.candidates_per_node:
            continue
        at_node = _in_cycles(x.unsqueeze(1), part, _head_rows(part, 1)).squeeze(1)  # [P, T, C]
        if part.offsets is None:  # every member a candidate: [P, T, T, C]
            candidates = at_node.unsqueeze(1).expand(-1, at_node.size(1), -1, -1)
        else:                     # [P, T, M, C]
            candidates = torch.stack([at_node.roll(offset, dims=1) for offset in part.offsets],
                                     dim=2)
        if part.mask is not None:
            candidates = candidates.masked_fill(~part.mask.unsqueeze(-1), float("-inf"))
        per_cycle = candidates.amax(dim=2).flatten(0, 1)                  # [P * T, C]
        if part.inverse is not None:
            best.append(_PermuteRows.apply(per_cycle, part.inverse, part.cycles.flatten()))
        else:
            best.append(x.new_full(x.shape, float("-inf")).scatter_reduce(
                0, part.cycles.flatten().view(-1, 1).expand_as(per_cycle), per_cycle, "amax"))
    if not best:
        return torch.zeros_like(x)
    out = (best[0] if len(best) == 1 else torch.stack(best).amax(dim=0)) - x
    return out.masked_fill(out == float("-inf"), 0.0)


def cyclic_edge_weights(weights: Sequence[Tensor], adjacency: CyclicAdjacency) -> Tensor:
    """``[num_edges, heads]``: :func:`cyclic_attention`'s weights in the edge order of
    :meth:`CyclicAdjacency.to_edge_index`."""
    per_edge = []
    for part, weight in zip(adjacency.parts, weights):
        if part.offsets is not None and scores_densely(part):  # [P, T, H, T] -> [P, T, H, M]
            behind = part.behind()
            index = behind.view(1, behind.size(0), 1, -1).expand(*weight.shape[:-1], -1)
            weight = weight.gather(-1, index)
        weight = weight.transpose(-1, -2)  # [P, T, M, H]: an edge per (cycle, position, offset)
        per_edge.append(weight.flatten(0, 2) if part.mask is None else
                        weight[part.edge_mask()])
    return torch.cat(per_edge)


# ---- an edge list, fused --------------------------------------------------------------------
# Per-edge message passing writes [num_edges, heads, head_dim] tensors (gathered features,
# products) and keeps them for backward, and on a CPU that memory traffic dominates. Here the
# weighted sum over neighbours is a CSR sparse-dense product (SpMM), and backward propagates
# through SpMMs as well, so that no per-edge feature tensor is kept.

def index_pointer(sorted_index: Tensor, size: int) -> Tensor:
    """The CSR pointer ``[size + 1]`` of a sorted index: where each value's run starts. A
    search, not a count (``bincount``), so that its size does not depend on the values and the
    host never waits for an accelerator."""
    return torch.searchsorted(sorted_index, torch.arange(size + 1, device=sorted_index.device))


class EdgeList:
    """The edges ``source[e] -> target[e]`` of a (bipartite) graph, sorted by target, in both
    CSR orders: by target as given (``target_pointer``, when the adjacency has it: an
    :class:`~torch_geometric.EdgeIndex` caches its own), by source sorted when first needed
    (in backward)."""

    def __init__(self, source: Tensor, target: Tensor, num_sources: int, num_targets: int,
                 target_pointer: Optional[Tensor] = None):
        self.source, self.target = source, target
        self.num_sources, self.num_targets = num_sources, num_targets
        if target_pointer is None:
            target_pointer = index_pointer(target, num_targets)
        self.by_target = None, target_pointer, source
        self._by_source = None

    @property
    def by_source(self) -> Tuple[Tensor, Tensor, Tensor]:
        if self._by_source is None:
            ordered, order = torch.sort(self.source, stable=True)
            self._by_source = (order, index_pointer(ordered, self.num_sources),
                               self.target.index_select(0, order))
        return self._by_source

    def gather_dot(self, at_target: Tensor, at_source: Tensor) -> Tensor:
        """``out[e, h] = <at_target[target[e], h], at_source[source[e], h]>`` (SDDMM)."""
        return torch.einsum("ehd,ehd->eh", at_target.index_select(0, self.target),
                            at_source.index_select(0, self.source))

    def weighted_sum(self, weight: Tensor, x: Tensor, to_sources: bool = False) -> Tensor:
        """``out[i, h] = sum over edges e into i of weight[e, h] * x[source[e], h]`` (SpMM), or
        the transposed product (edges out of each source, ``x`` indexed by target)."""
        order, crow, col = self.by_source if to_sources else self.by_target
        num_rows = self.num_sources if to_sources else self.num_targets
        values = weight if order is None else weight.index_select(0, order)
        with warnings.catch_warnings():  # torch calls its CSR support beta, once per process
            warnings.simplefilter("ignore", UserWarning)
            matrices = [torch.sparse_csr_tensor(crow, col, values[:, h], (num_rows, x.size(0)),
                                                check_invariants=False)
                        for h in range(x.size(1))]
        heads = [torch.sparse.mm(matrix, x[:, h].contiguous())
                 for h, matrix in enumerate(matrices)]
        return torch.stack(heads, dim=1)


class _GatherDot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, at_target: Tensor, at_source: Tensor, edges: EdgeList) -> Tensor:
        ctx.save_for_backward(at_target, at_source)
        ctx.edges = edges
        return edges.gather_dot(at_target, at_source)

    @staticmethod
    def backward(ctx, grad: Tensor):
        at_target, at_source = ctx.saved_tensors
        edges = ctx.edges
        grad_target = edges.weighted_sum(grad, at_source) if ctx.needs_input_grad[0] else None
        grad_source = (edges.weighted_sum(grad, at_target, to_sources=True)
                       if ctx.needs_input_grad[1] else None)
        return grad_target, grad_source, None


class _WeightedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, x: Tensor, edges: EdgeList) -> Tensor:
        ctx.save_for_backward(weight, x)
        ctx.edges = edges
        return edges.weighted_sum(weight, x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, x = ctx.saved_tensors
        edges = ctx.edges
        grad_weight = edges.gather_dot(grad, x) if ctx.needs_input_grad[0] else None
        grad_x = (edges.weighted_sum(weight, grad, to_sources=True)
                  if ctx.needs_input_grad[1] else None)
        return grad_weight, grad_x, None


def gather_dot(at_target: Tensor, at_source: Tensor, edges: EdgeList) -> Tensor:
    """Per-edge, per-head dot products ``[E, H]`` of ``[N, H, D]`` node tensors."""
    return _GatherDot.apply(at_target, at_source, edges)


def weighted_sum(weight: Tensor, x: Tensor, edges: EdgeList) -> Tensor:
    """Per-head weighted sums ``[num_targets, H, D]`` of source features ``[num_sources, H, D]``
    with edge weights ``[E, H]``."""
    return _WeightedSum.apply(weight, x, edges)
