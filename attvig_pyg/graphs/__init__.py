"""Graph builders for image grids: SVGA (MobileViG), DAGC (GreedyViG) and kNN (Vision GNN).

Node (h, w) of image b has id ``b * H * W + h * W + w``; edges never join two images;
``edge_index[0]`` sends and ``edge_index[1]`` receives (PyG's ``source_to_target`` flow).
"""
from typing import Union

from torch import Tensor

from attvig_pyg.adjacency import CyclicAdjacency, CyclicNeighbours
from attvig_pyg.graphs.dagc import dagc_adjacency, dagc_filter, dagc_graph, dagc_threshold
from attvig_pyg.graphs.grid import as_feature_map
from attvig_pyg.graphs.knn import knn_graph
from attvig_pyg.graphs.svga import svga_adjacency, svga_graph

GRAPH_POLICIES = ("svga", "dagc", "knn")


def build_graph(name: str, x: Tensor, *, cyclic: bool = False,
                **params) -> Union[Tensor, CyclicAdjacency]:
    """The graph of policy ``name`` for the feature map ``x`` ``[B, C, H, W]`` (or node features
    with ``grid_size=(H, W)``), the one entry point a model needs.

    Args:
        name: ``"svga"`` (:func:`svga_graph`; ``x`` only gives the sizes and the device),
            ``"dagc"`` (:func:`dagc_graph`) or ``"knn"`` (:func:`knn_graph`).
        x: The features the graph is for.
        cyclic: Return the :class:`~attvig_pyg.adjacency.CyclicAdjacency` form instead of an
            ``edge_index`` (SVGA and DAGC only; kNN returns an ``EdgeIndex`` sorted by target).
        **params: The builder's own arguments (``k``, ``self_loops``, ``dilation``, ...).
    """
    if name not in GRAPH_POLICIES:
        raise ValueError(f"Unknown graph policy '{name}' (expected one of "
                         f"{', '.join(GRAPH_POLICIES)})")
    if name == "knn":
        if cyclic:
            raise ValueError("The kNN graph has no cyclic form; use its edge_index (cyclic=False)")
        return knn_graph(x, **params)
    if name == "dagc":
        return (dagc_adjacency if cyclic else dagc_graph)(x, **params)
    batch_size, _, height, width = as_feature_map(x, params.pop("grid_size", None)).shape
    return (svga_adjacency if cyclic else svga_graph)(batch_size, height, width,
                                                      device=x.device, **params)


__all__ = ["CyclicAdjacency", "CyclicNeighbours", "GRAPH_POLICIES", "build_graph",
           "dagc_adjacency", "dagc_filter", "dagc_graph", "dagc_threshold", "knn_graph",
           "svga_adjacency", "svga_graph"]
