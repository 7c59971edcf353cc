"""Input checks shared by the convs: clear errors instead of a failed gather deep inside PyG;
and inputs the convs must not modify.

What is checked where (docs/architecture.md, "Where inputs are checked"): shapes, dtypes and
sizes on every call (they are metadata: free); node ids, which must be read from the tensor
(on an accelerator the host then waits for the device), only where that costs nothing or was
asked for."""
import torch
from torch import Tensor

import torch_geometric
from torch_geometric import EdgeIndex
from torch_geometric.typing import SparseTensor
from torch_geometric.utils import is_torch_sparse_tensor

from attvig_pyg.adjacency import CyclicAdjacency


def host_reads_are_free(device: torch.device) -> bool:
    """Whether the host can read a tensor's values on ``device`` without waiting: on the CPU,
    the host is the device; an accelerator would have to finish its queue first. The one rule
    behind every choice that depends on the device: the node-id checks below, and which graph
    form a model hands its convs (:func:`attvig_pyg.models.attentionvig.cyclic_form`)."""
    return device.type == "cpu"



def check_node_features(x: Tensor, channels: int, role: str) -> None:
    """Raises if ``x`` is not ``[num_nodes, channels]`` (``channels < 0``: any width)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"Expected {role} node features to be a Tensor (got {type(x).__name__})")
    if x.dim() != 2:
        raise ValueError(f"Expected {role} node features of shape [num_nodes, channels] "
                         f"(got a tensor with {x.dim()} dimensions, shape {tuple(x.shape)})")
    if channels > 0 and x.size(-1) != channels:
        raise ValueError(f"Expected {role} node features with {channels} channels "
                         f"(got {x.size(-1)})")


def check_adjacency(edge_index, x_src: Tensor, x_dst: Tensor) -> None:
    """Raises unless ``edge_index`` is a graph on the given source and target nodes.

    ``edge_index[0]`` indexes the source nodes, ``edge_index[1]`` the target nodes; a sparse
    adjacency is the transposed one, of size ``[num_targets, num_sources]``; a
    :class:`~attvig_pyg.adjacency.CyclicAdjacency` joins the nodes of one set (its node ids were
    checked when it was made, or it came from a builder).

    The node ids of an ``edge_index`` (a plain tensor or an :class:`~torch_geometric.EdgeIndex`,
    whose sparse size is checked too) are read and checked where that costs no wait
    (:func:`host_reads_are_free`: the CPU), and on an accelerator only under
    :func:`torch_geometric.debug` (as PyG's own convs do); never while :func:`torch.compile`
    traces. (An EdgeIndex with ids beyond its sparse size corrupts memory in PyG's own
    ``get_indptr``: on the CPU it never gets that far.)
    """
    num_src, num_dst = x_src.size(0), x_dst.size(0)
    if isinstance(edge_index, CyclicAdjacency):
        if x_src is not x_dst:
            raise ValueError("A CyclicAdjacency joins the nodes of one set: pass a single node "
                             "feature tensor, not a (source, target) pair")
        if edge_index.num_nodes != num_src:
            raise ValueError(f"The CyclicAdjacency is a graph on {edge_index.num_nodes} nodes, "
                             f"but the node features hold {num_src}")
        return
    if isinstance(edge_index, SparseTensor) or is_torch_sparse_tensor(edge_index):
        rows, cols = edge_index.size(0), edge_index.size(1)
        if (rows, cols) != (num_dst, num_src):
            raise ValueError(f"Expected a sparse adjacency of size [{num_dst}, {num_src}] "
                             f"([num_target_nodes, num_source_nodes]), got [{rows}, {cols}]")
        return
    if not isinstance(edge_index, Tensor):
        raise TypeError("Expected 'edge_index' to be a Tensor, SparseTensor, torch.sparse Tensor "
                        f"or CyclicAdjacency (got {type(edge_index).__name__})")
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"Expected 'edge_index' of shape [2, num_edges] "
                         f"(got {tuple(edge_index.shape)})")
    if edge_index.is_floating_point() or edge_index.is_complex() or \
            edge_index.dtype == torch.bool:
        raise ValueError(f"Expected 'edge_index' of an integer dtype (got {edge_index.dtype})")
    if isinstance(edge_index, EdgeIndex):
        size = edge_index.sparse_size()
        for row, name, count in ((0, "source", num_src), (1, "target", num_dst)):
            if size[row] is not None and size[row] != count:
                raise ValueError(f"The EdgeIndex has {size[row]} {name} nodes (its sparse "
                                 f"size), but the {name} node features hold {count}")
    if edge_index.numel() == 0 or torch.compiler.is_compiling() or not (
            host_reads_are_free(edge_index.device) or torch_geometric.is_debug_enabled()):
        return
    for row, name, count in ((0, "source", num_src), (1, "target", num_dst)):
        low, high = int(edge_index[row].min()), int(edge_index[row].max())
        if low < 0 or high >= count:
            bad = low if low < 0 else high
            raise IndexError(f"'edge_index[{row}]' holds {name} node id {bad}, outside the valid "
                             f"range [0, {count - 1}] of the {count} {name} nodes")


def unshared_adjacency(edge_index):
    """``edge_index``, or for an uncoalesced ``torch.sparse`` COO adjacency a coalesced copy:
    PyG's ``to_edge_index`` would flag the caller's tensor coalesced in place, so that its
    other layers would read repeated entries as one. (A sparse tensor means its coalesced form:
    repeated entries are one edge.)"""
    if is_torch_sparse_tensor(edge_index) and edge_index.layout == torch.sparse_coo and \
            not edge_index.is_coalesced():
        return edge_index.coalesce()
    return edge_index
