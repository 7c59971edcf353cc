"""What the cross-attention layers of a model do on given images (the paper's Fig. 6): per
layer, a location's query against every location's key, the location's graph neighbours and the
weights the model gave them."""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from attvig_pyg.nn import CrossAttnConv


@dataclass
class LayerAttention:
    """One cross-attention layer on a batch of images.

    Attributes:
        name: The :class:`~attvig_pyg.nn.CrossAttnConv`'s module name.
        grid: ``(H, W)``, the size of the layer's feature map.
        beta: The layer's :math:`\\beta`.
        points: ``[B, 2]`` (row, column) of each image's chosen location in the map.
        similarity: ``[B, heads, H, W]``: the cosine similarity of the location's query with the
            key of every location of its image (Eq. 4), over the whole map.
        neighbours: Per image ``[n, 2]``: (row, column) of the graph neighbours that send to the
            location, in the graph's edge order (a node may be its own neighbour).
        weights: Per image ``[n, heads]``: the attention weight of each of those edges as the
            layer computed it (Eq. 5-6, before dropout).
    """

    name: str
    grid: Tuple[int, int]
    beta: float
    points: Tensor
    similarity: Tensor
    neighbours: List[Tensor]
    weights: List[Tensor]


def _graphers(model: nn.Module) -> Dict[str, Tuple[nn.Module, str]]:
    """Each CrossAttnConv's name -> the module that builds its graph from a feature map (a
    module with a ``build(x)`` method: AttentionViG's GraphMixer, the ViG harness's Grapher),
    and that module's name."""
    builders = {name: module for name, module in model.named_modules()
                if callable(getattr(module, "build", None))}
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, CrossAttnConv):
            owners = [owner for owner in builders if name.startswith(owner + ".")]
            if owners:
                owner = max(owners, key=len)
                found[name] = (builders[owner], owner)
    return found


def _as_points(points, images: Tensor) -> Tensor:
    batch_size, _, height, width = images.shape
    if points is None:
        return torch.tensor([[height // 2, width // 2]]).expand(batch_size, 2)
    points = torch.as_tensor(points, dtype=torch.float64)
    if points.dim() == 1 or (points.dim() == 2 and points.size(0) == 1):
        points = points.reshape(1, -1).expand(batch_size, -1)  # one point for every image
    if points.shape != (batch_size, 2):
        raise ValueError(f"Expected one (row, column) point per image: shape [{batch_size}, 2] "
                         f"or one for all, [2] (got {list(points.shape)})")
    outside = (points < 0).any(dim=1) | (points[:, 0] >= height) | (points[:, 1] >= width)
    if outside.any():
        raise ValueError(f"Point {points[outside][0].tolist()} lies outside the "
                         f"{height}x{width} image (rows 0..{height - 1}, columns 0..{width - 1})")
    return points


@torch.no_grad()
def attention_maps(model: nn.Module, images: Tensor,
                   points: Optional[Union[Tensor, Sequence]] = None) -> List[LayerAttention]:
    """Runs ``model`` on ``images`` ``[B, C, H, W]`` in eval mode and returns, for every
    cross-attention layer in forward order, a :class:`LayerAttention` at one location per
    image.

    Args:
        model: A model of this library with cross-attention Graphers (``attentionvig_*``, or
            the ViG harness with ``aggregator="cross_attn"``), any graph policy.
        images: The batch, preprocessed as the model expects.
        points: (row, column) in input pixels, one per image (``[B, 2]``) or one for all
            (``[2]`` or ``[1, 2]``); each layer takes the map location under it. (default: the
            centre)

    The similarities come from the conv's own projections (:meth:`CrossAttnConv.project`), the
    neighbours and weights from its ``return_attention_weights``. The model is left as it was:
    hooks removed, every module's training mode restored.
    """
    if images.dim() != 4:
        raise ValueError(f"Expected images [batch, channels, height, width] (got shape "
                         f"{list(images.shape)})")
    graphers = _graphers(model)
    if not graphers:
        raise ValueError(f"{type(model).__name__} has no cross-attention Grapher (aggregator "
                         "'cross_attn'): nothing to show")
    pixel_points = _as_points(points, images)
    grids, layers, inside = {}, [], []

    def record_grid(owner_name):
        def hook(_module, args):
            grids[owner_name] = tuple(args[0].shape[-2:])
        return hook

    def inspect(conv_name, owner_name):
        def hook(conv, args, _output):
            if inside:  # the second call below
                return
            x, graph = args[0], args[1]
            height, width = grids[owner_name]
            nodes = height * width
            batch_size = x.size(0) // nodes
            rows = (pixel_points[:, 0] * height / images.size(2)).long().clamp(max=height - 1)
            cols = (pixel_points[:, 1] * width / images.size(3)).long().clamp(max=width - 1)
            at = rows * width + cols  # the location's node in its image
            query, key, _ = conv.project(x, x)
            key = key.view(batch_size, nodes, *key.shape[1:])
            query = query.view(batch_size, nodes, *query.shape[1:])[torch.arange(batch_size), at]
            similarity = torch.einsum("bhd,bnhd->bhn", query, key)
            inside.append(True)
            try:
                _, (edge_index, alpha) = conv(x, graph, return_attention_weights=True)
            finally:
                inside.clear()
            neighbours, weights = [], []
            for image in range(batch_size):
                into = edge_index[1] == image * nodes + at[image]
                sources = edge_index[0][into] - image * nodes
                neighbours.append(torch.stack([sources // width, sources % width], dim=1))
                weights.append(alpha[into])
            layers.append(LayerAttention(
                name=conv_name, grid=(height, width), beta=conv.beta.item(),
                points=torch.stack([rows, cols], dim=1),
                similarity=similarity.view(batch_size, -1, height, width),
                neighbours=neighbours, weights=weights))
        return hook

    modes = {module: module.training for module in model.modules()}
    handles = []
    try:
        for conv_name, (owner, owner_name) in graphers.items():
            handles.append(owner.register_forward_pre_hook(record_grid(owner_name)))
            handles.append(model.get_submodule(conv_name).register_forward_hook(
                inspect(conv_name, owner_name)))
        model.eval()(images)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return layers
