"""Per-head sparse products on an edge list, for CrossAttnConv's eager edge-list path.

Per-edge message passing writes ``[num_edges, heads, head_dim]`` tensors (gathered features,
products) and keeps them for backward, and on a CPU that memory traffic dominates. Here the
weighted sum over neighbours is a CSR sparse-dense product (SpMM, fused in the kernel), and
backward propagates through SpMMs as well, so that no per-edge feature tensor is kept.
"""
import warnings
from typing import Tuple

import torch
from torch import Tensor

FUSED_DTYPES = (torch.float32, torch.float64)  # what torch's CSR kernels support


def _csr(rows: Tensor, cols: Tensor, num_rows: int) -> Tuple[Tensor, Tensor, Tensor]:
    order = rows.argsort(stable=True)
    crow = rows.new_zeros(num_rows + 1)
    crow[1:] = torch.bincount(rows, minlength=num_rows).cumsum(0)
    return order, crow, cols.index_select(0, order)


class EdgeList:
    """The edges ``source[e] -> target[e]`` of a (bipartite) graph in both CSR orders."""

    def __init__(self, source: Tensor, target: Tensor, num_sources: int, num_targets: int):
        self.source, self.target = source, target
        self.num_sources, self.num_targets = num_sources, num_targets
        self.by_target = _csr(target, source, num_targets)
        self.by_source = _csr(source, target, num_sources)

    def gather_dot(self, at_target: Tensor, at_source: Tensor) -> Tensor:
        """``out[e, h] = <at_target[target[e], h], at_source[source[e], h]>`` (SDDMM)."""
        return torch.einsum("ehd,ehd->eh", at_target.index_select(0, self.target),
                            at_source.index_select(0, self.source))

    def weighted_sum(self, weight: Tensor, x: Tensor, to_sources: bool = False) -> Tensor:
        """``out[i, h] = sum over edges e into i of weight[e, h] * x[source[e], h]`` (SpMM), or
        the transposed product (edges out of each source, ``x`` indexed by target)."""
        order, crow, col = self.by_source if to_sources else self.by_target
        num_rows = self.num_sources if to_sources else self.num_targets
        values = weight.index_select(0, order)
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
