"""The isotropic Vision GNN of "Vision GNN: An Image is Worth Graph of Nodes" (Han et al.,
NeurIPS 2022), as the harness of the AttentionViG paper's aggregation ablation (its Table 3):
the same network with the graph convolution chosen by name among PyG's GINConv, SAGEConv and
EdgeConv, this project's MaxRelativeConv and CrossAttnConv.

How each PyG conv is configured to match the original ViG variant, and what still differs, is
written down in docs/ablation.md.
"""
import math
import re
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timm.layers import DropPath, calculate_drop_path_rates
from timm.models import (build_model_with_cfg, checkpoint_seq, generate_default_cfgs,
                         register_model)
from torch_geometric.nn import EdgeConv, GINConv, SAGEConv

from attvig_pyg.adjacency import CyclicAdjacency
from attvig_pyg.graphs import GRAPH_POLICIES, build_graph
from attvig_pyg.graphs.grid import default_steps
from attvig_pyg.models.attentionvig import check_pool, cyclic_form, run_taking, take_indices
from attvig_pyg.models.checkpoints import check_fits, unwrap_state_dict
from attvig_pyg.models.fusion import fuse_batchnorm
from attvig_pyg.nn import CrossAttnConv, GroupedLinear, MaxRelativeConv

__all__ = ["ViG", "vig_ti", "vig_s", "vig_b", "AGGREGATORS"]

AGGREGATORS = ("gin", "sage", "edge", "max_relative", "cross_attn")
GROUPS = 4  # Vision GNN's graph convs use grouped 1x1 maps


def _grouped_bn_gelu(in_channels: int, out_channels: int) -> nn.Sequential:
    """Vision GNN's ``BasicConv``: grouped 1x1 map, BatchNorm, GELU, on node features."""
    return nn.Sequential(GroupedLinear(in_channels, out_channels, GROUPS),
                         nn.BatchNorm1d(out_channels), nn.GELU())


class GraphConv(nn.Module):
    """One of the harness's aggregators, called as ``conv(x, edge_index)`` on node features
    ``[N, C]``. Every one maps C to 2C channels like Vision GNN's, except ``cross_attn``, which
    keeps AttentionViG's C -> C shape (Q, K, V: C -> C, W: 2C -> C)."""

    def __init__(self, aggregator: str, channels: int, heads: int = 8):
        super().__init__()
        if aggregator not in AGGREGATORS:
            raise ValueError(f"Unknown aggregator '{aggregator}' (expected one of "
                             f"{', '.join(AGGREGATORS)})")
        self.aggregator = aggregator
        self.out_channels = channels if aggregator == "cross_attn" else 2 * channels
        self.post = nn.Identity()
        if aggregator == "gin":  # nn((1 + eps) x_i + sum_j x_j), eps learned from 0
            self.conv = GINConv(_grouped_bn_gelu(channels, 2 * channels), eps=0.0,
                                train_eps=True)
        elif aggregator == "sage":  # W [max_j relu(P x_j), x_i], then BN + GELU
            self.conv = SAGEConv(channels, 2 * channels, aggr="max", project=True)
            self.post = nn.Sequential(nn.BatchNorm1d(2 * channels), nn.GELU())
        elif aggregator == "edge":  # max_j nn([x_i, x_j - x_i])
            self.conv = EdgeConv(_grouped_bn_gelu(2 * channels, 2 * channels), aggr="max")
        elif aggregator == "max_relative":
            self.conv = MaxRelativeConv(channels, 2 * channels, groups=GROUPS,
                                        norm="batch_norm", act="gelu")
        else:
            self.conv = CrossAttnConv(channels, channels, heads=heads)

    def forward(self, x: Tensor, graph: Union[Tensor, CyclicAdjacency]) -> Tensor:
        if isinstance(graph, CyclicAdjacency) and self.aggregator in ("gin", "sage", "edge"):
            return self.post(self._on_candidates(x, graph))
        return self.post(self.conv(x, graph))

    def _on_candidates(self, x: Tensor, graph: CyclicAdjacency) -> Tensor:
        """A PyG conv on a cyclic graph (an accelerator's form: :func:`~attvig_pyg.models.
        attentionvig.cyclic_form`), for a masked one (DAGC) without an edge list whose size
        depends on the masks: every candidate is an edge, a masked one made neutral. For GIN's
        sum, an edge from an extra node of zeros; for GraphSAGE's max, a second self-loop (the
        harness's axial graphs give every node one, and a repeated value leaves a max as it
        is); EdgeConv's messages are normalised over the edges, so its BatchNorm takes its
        statistics over the kept candidates alone and the others are left out of the max."""
        edge_index, mask = graph.candidate_edges()
        source, target = edge_index
        if self.aggregator == "edge":  # EdgeConv: max_j nn([x_i, x_j - x_i])
            linear, norm, act = self.conv.nn
            at_target = x.index_select(0, target)
            messages = linear(torch.cat([at_target, x.index_select(0, source) - at_target], -1))
            if mask is None:
                messages = act(norm(messages))
            else:
                messages = act(masked_batch_norm(messages, mask, norm))
                messages = messages.masked_fill(~mask.unsqueeze(-1), float("-inf"))
            # A max started from -inf, not from zeros as PyG's: on these symmetric graphs the
            # normalised self-loop message is zero up to rounding, and a maximum of exactly
            # zero shares its gradient with a zero start.
            return x.new_full((x.size(0), messages.size(1)), float("-inf")).scatter_reduce(
                0, target.view(-1, 1).expand_as(messages), messages, "amax")
        if mask is None:
            return self.conv(x, edge_index)
        if self.aggregator == "gin":
            zeros = x.new_zeros(1, x.size(1))
            source = torch.where(mask, source, x.size(0))
            return self.conv((torch.cat([x, zeros]), x), torch.stack([source, target]))
        return self.conv(x, torch.stack([torch.where(mask, source, target), target]))


def masked_batch_norm(x: Tensor, mask: Tensor, norm: nn.BatchNorm1d) -> Tensor:
    """``norm(x[mask])`` in the rows of ``mask`` (the others normalised alike, to be ignored),
    with training statistics over those rows alone and without reading their count on the
    host."""
    if not norm.training:
        return norm(x)
    weight = mask.to(x.dtype).unsqueeze(-1)
    count = weight.sum()
    mean = (x * weight).sum(dim=0) / count
    variance = ((x - mean).square() * weight).sum(dim=0) / count
    with torch.no_grad():  # as BatchNorm1d: momentum, the unbiased variance
        norm.running_mean.lerp_(mean, norm.momentum)
        norm.running_var.lerp_(variance * count / (count - 1), norm.momentum)
        norm.num_batches_tracked.add_(1)
    return (x - mean) * torch.rsqrt(variance + norm.eps) * norm.weight + norm.bias


class Grapher(nn.Module):
    """fc1 (1x1 + BN), graph conv over the block's graph, fc2 (1x1 + BN back to C), residual."""

    def __init__(self, channels: int, aggregator: str, graph: str, k: int, dilation: int,
                 heads: int, drop_path: float, corruption: float = 0.0):
        super().__init__()
        self.graph, self.k, self.dilation, self.corruption = graph, k, dilation, corruption
        self.fc1 = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))
        self.conv = GraphConv(aggregator, channels, heads)
        self.fc2 = nn.Sequential(nn.Conv2d(self.conv.out_channels, channels, 1),
                                 nn.BatchNorm2d(channels))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def build(self, x: Tensor):
        if self.graph == "knn":
            return build_graph("knn", x, k=self.k, dilation=self.dilation,
                               corruption=self.corruption)
        height, width = x.shape[-2:]
        # Vision GNN's kNN counts a node among its neighbours; the axial graphs do the same here.
        return build_graph(self.graph, x, k=default_steps(height, width), self_loops=True,
                           cyclic=cyclic_form(self.conv.aggregator, x.device))

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.fc1(x)
        batch_size, channels, height, width = x.shape
        nodes = x.permute(0, 2, 3, 1).reshape(-1, channels)
        out = self.conv(nodes, self.build(x.detach()))
        out = out.view(batch_size, height, width, -1).permute(0, 3, 1, 2)
        return self.drop_path(self.fc2(out)) + shortcut


class FFN(nn.Module):
    def __init__(self, channels: int, drop_path: float):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(channels, 4 * channels, 1),
                                 nn.BatchNorm2d(4 * channels), nn.GELU(),
                                 nn.Conv2d(4 * channels, channels, 1), nn.BatchNorm2d(channels))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.drop_path(self.mlp(x)) + x


class ViG(nn.Module):
    """Isotropic Vision GNN: conv stem, position embedding, ``depth`` blocks of Grapher + FFN
    over a dynamic kNN graph (k rising linearly from ``k`` to ``2k``, dilation 1, 2, 3, ... every
    four blocks), pooled head.

    Args:
        aggregator: ``"gin"``, ``"sage"``, ``"edge"``, ``"max_relative"`` (Vision GNN's own) or
            ``"cross_attn"``.
        graph: ``"knn"`` (Vision GNN's), ``"svga"`` or ``"dagc"`` (K = max(1, size // 7)).
        channels, depth: Width and number of blocks (ViG-Ti: 192, 12).
        img_size: Input size the position embedding is made for (it is interpolated for others).
        patch_size: Stride of the stem, a power of two (16 in Vision GNN; 4 suits 32x32 inputs).
        k: Neighbours in the first block.
        heads: Cross-attention heads.
        head_hidden_size: Width of the 1x1 conv + BN + GELU before the classifier.
        graph_corruption: A fraction of every node's kNN neighbours replaced by random nodes of
            its image, in training and evaluation (:func:`~attvig_pyg.graphs.knn_graph`'s
            ``corruption``; the robustness ablation). kNN graphs only.
    """

    def __init__(self, aggregator: str = "max_relative", graph: str = "knn",
                 channels: int = 192, depth: int = 12, num_classes: int = 1000,
                 in_chans: int = 3, img_size: int = 224, patch_size: int = 16, k: int = 9,
                 heads: int = 8, head_hidden_size: int = 1024, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, global_pool: str = "avg",
                 graph_corruption: float = 0.0):
        super().__init__()
        # Drawn before any layer exists, so that it does not depend on the aggregator's layers.
        shared_seed = int(torch.randint(2**62, ()))
        if graph not in GRAPH_POLICIES:
            raise ValueError(f"Unknown graph policy '{graph}' (expected one of "
                             f"{', '.join(GRAPH_POLICIES)})")
        check_pool(global_pool)
        if graph_corruption and graph != "knn":
            raise ValueError(f"'graph_corruption' corrupts kNN graphs (graph='{graph}')")
        if patch_size < 2 or patch_size & (patch_size - 1):
            raise ValueError(f"'patch_size' must be a power of two >= 2 (got {patch_size})")
        self.aggregator, self.graph = aggregator, graph
        self.num_classes, self.in_chans, self.patch_size = num_classes, in_chans, patch_size
        self.num_features, self.head_hidden_size = channels, head_hidden_size
        self.global_pool = global_pool
        grid = math.ceil(img_size / patch_size)
        self.nodes = grid * grid

        convs, width = [], in_chans  # log2(patch) stride-2 convs up to C, then a stride-1 conv
        for i in reversed(range(int(math.log2(patch_size)))):
            convs += [nn.Conv2d(width, channels // 2 ** i, 3, 2, 1),
                      nn.BatchNorm2d(channels // 2 ** i), nn.GELU()]
            width = channels // 2 ** i
        self.stem = nn.Sequential(*convs, nn.Conv2d(channels, channels, 3, 1, 1),
                                  nn.BatchNorm2d(channels))
        self.pos_embed = nn.Parameter(torch.zeros(1, channels, grid, grid))

        ks = [int(v) for v in torch.linspace(k, 2 * k, depth)]
        max_dilation = max(1, self.nodes // max(ks))
        rates = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[nn.Sequential(
            Grapher(channels, aggregator, graph, ks[i], min(i // 4 + 1, max_dilation), heads,
                    rates[i], graph_corruption),
            FFN(channels, rates[i])) for i in range(depth)])
        self.pre_logits = nn.Sequential(nn.Conv2d(channels, head_hidden_size, 1),
                                        nn.BatchNorm2d(head_hidden_size), nn.GELU())
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(head_hidden_size, num_classes) if num_classes else nn.Identity()
        self.feature_info = [dict(num_chs=channels, reduction=patch_size, module=f"blocks.{i}")
                             for i in range(depth)]
        self.grad_checkpointing = False
        self._init_weights(shared_seed)

    def _init_weights(self, shared_seed: int) -> None:
        """Kaiming-normal weights and zero biases for every conv and linear layer (as Vision
        GNN). The parts every aggregator shares are drawn from their own generator, seeded from
        the global one before any layer was made, so that with the same seed they start from the
        same weights whatever the aggregator: only the graph conv (and fc2, sized by it)
        differs."""
        shared = torch.Generator().manual_seed(shared_seed)
        graph_specific = [m for block in self.blocks
                          for m in (block[0].conv, block[0].fc2)]
        own = {id(p) for m in graph_specific for p in m.parameters()}
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and id(module.weight) not in own:
                nn.init.kaiming_normal_(module.weight, generator=shared)
                nn.init.zeros_(module.bias)
        for module in graph_specific:
            for layer in module.modules():
                if isinstance(layer, (nn.Conv2d, nn.Conv1d)):
                    nn.init.kaiming_normal_(layer.weight)
                    if layer.bias is not None:
                        nn.init.zeros_(layer.bias)

    def graph_summary(self, img_size: int = 224) -> List[Dict]:
        """Per block: grid, graph policy and its neighbours per node."""
        grid = math.ceil(img_size / self.patch_size)
        summary = []
        for block in self.blocks:
            grapher = block[0]
            entry = dict(grid=(grid, grid), graph=grapher.graph)
            if grapher.graph == "knn":
                entry.update(k=grapher.k, dilation=grapher.dilation, neighbours=grapher.k)
            else:
                step = default_steps(grid, grid)[0]
                candidates = 2 * len(range(step, grid, step)) + 1  # with the node itself
                entry.update(k=(step, step), neighbours=candidates if grapher.graph == "svga"
                             else f"<= {candidates} (filtered per image)")
            summary.append(entry)
        return summary

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r"^stem|^pos_embed", blocks=r"^blocks\.(\d+)" if coarse else [
            (r"^blocks\.(\d+)", None), (r"^pre_logits", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def reparameterize(self) -> "ViG":
        """For inference: BatchNorm folded into the maps before it, in place (see
        :meth:`AttentionViG.reparameterize`)."""
        return fuse_batchnorm(self)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes else nn.Identity()

    def _embed(self, x: Tensor) -> Tensor:
        """Stem and position embedding (interpolated to other sizes)."""
        if x.dim() != 4 or x.size(1) != self.in_chans:
            raise ValueError(f"Expected images of shape [batch, {self.in_chans}, height, width] "
                             f"(got {tuple(x.shape)})")
        x = self.stem(x)
        pos_embed = self.pos_embed
        if pos_embed.shape[-2:] != x.shape[-2:]:
            pos_embed = F.interpolate(pos_embed, size=x.shape[-2:], mode="bicubic",
                                      align_corners=False)
        return x + pos_embed

    def forward_features(self, x: Tensor) -> Tensor:
        x = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """timm's feature interface over the blocks (see
        :meth:`AttentionViG.forward_intermediates`): NCHW maps at the stem's stride."""
        x, intermediates = run_taking(self._embed(x), self.blocks, indices, stop_early,
                                      output_fmt)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1,
                                  prune_norm: bool = False, prune_head: bool = True) -> List[int]:
        """Drops the blocks after the last of ``indices`` (and with ``prune_head`` the head)."""
        taken, max_index = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_head:
            self.pre_logits = nn.Identity()
            self.head_hidden_size = self.num_features
            self.reset_classifier(0, "")
        return taken

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """As :meth:`AttentionViG.forward_head`: without pooling the map is kept."""
        pooled = self.global_pool == "avg"
        if pooled:
            x = x.mean(dim=(2, 3), keepdim=True)
        x = self.head_drop(self.pre_logits(x))
        if pooled:
            return x.flatten(1) if pre_logits else self.head(x.flatten(1))
        return x if pre_logits else self.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# The official Vision GNN code's names (vig_pytorch/vig.py, gcn_lib) -> this layout's, for the
# max-relative ViG (its "mr" conv, which interleaves [x_c, r_c] before a groups=4 1x1 conv as
# MaxRelativeConv does: no re-ordering, only names and the 1x1 convs' trailing dimensions).
OFFICIAL_LAYERS = [
    (r"stem\.convs\.(\d+)\.", r"stem.\1."),
    (r"backbone\.(\d+)\.0\.(fc1|fc2)\.", r"blocks.\1.0.\2."),
    (r"backbone\.(\d+)\.0\.graph_conv\.gconv\.nn\.0\.", r"blocks.\1.0.conv.conv.lin.conv."),
    (r"backbone\.(\d+)\.0\.graph_conv\.gconv\.nn\.1\.", r"blocks.\1.0.conv.conv.norm.module."),
    (r"backbone\.(\d+)\.1\.fc1\.0\.", r"blocks.\1.1.mlp.0."),
    (r"backbone\.(\d+)\.1\.fc1\.1\.", r"blocks.\1.1.mlp.1."),
    (r"backbone\.(\d+)\.1\.fc2\.0\.", r"blocks.\1.1.mlp.3."),
    (r"backbone\.(\d+)\.1\.fc2\.1\.", r"blocks.\1.1.mlp.4."),
    (r"prediction\.([01])\.", r"pre_logits.\1."),
    (r"prediction\.4\.", r"head."),
    (r"pos_embed$", r"pos_embed"),
]


def checkpoint_filter_fn(state_dict, model: "ViG") -> Dict[str, Tensor]:
    """timm's hook for pretrained weights: an official Vision GNN state dict (``vig_ti_224_gelu``
    and the other isotropic max-relative models; ``model`` / ``state_dict`` wrappers and
    ``module.`` prefixes accepted) in this layout, for ``aggregator="max_relative"``; a state
    dict of this layout passes unchanged. Raises ValueError, naming the keys, where it does not
    fit ``model``."""
    state_dict = unwrap_state_dict(state_dict)
    if "stem.convs.0.weight" not in state_dict:  # already this layout
        return state_dict
    if model.aggregator != "max_relative":
        raise ValueError(f"An official Vision GNN checkpoint holds max-relative graph convs; "
                         f"this model aggregates with '{model.aggregator}'")
    mapped = {}
    for key, value in state_dict.items():
        name = next((re.sub(old, new, key) for old, new in OFFICIAL_LAYERS
                     if re.match(old, key)), None)
        if name is None or name in mapped:
            raise ValueError(f"Vision GNN checkpoint key '{key}' has no place in ViG")
        if value.dim() == 4 and value.shape[-2:] == (1, 1) and (
                name.endswith("lin.conv.weight") or name == "head.weight"):
            value = value.flatten(2) if name.endswith("lin.conv.weight") else value.flatten(1)
        mapped[name] = value
    check_fits(mapped, model, "the Vision GNN checkpoint", classifiers=("head",))
    return mapped


def _cfg(**kwargs) -> Dict:
    # pool_size: the 14x14 patches of 224 px (patch 16) that forward_features returns.
    return dict(num_classes=1000, input_size=(3, 224, 224), pool_size=(14, 14), crop_pct=0.9,
                interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                first_conv="stem.0", classifier="head", **kwargs)


default_cfgs = generate_default_cfgs({
    "vig_ti.in1k": _cfg(
        origin_url="https://github.com/huawei-noah/Efficient-AI-Backbones",
        paper_ids="arXiv:2206.00272",
        notes=("the official vig_ti_224_gelu ImageNet-1K weights (73.9 % top-1) load into "
               "vig_ti(aggregator='max_relative'); nothing is downloaded: pass the local file "
               "with pretrained_cfg_overlay=dict(file=...)",)),
    "vig_s": _cfg(),
    "vig_b": _cfg(),
})


def _create(variant: str, pretrained: bool, defaults: Dict, **kwargs) -> ViG:
    return build_model_with_cfg(ViG, variant, pretrained, feature_cfg=dict(feature_cls="getter"),
                                pretrained_filter_fn=checkpoint_filter_fn,
                                **dict(defaults, **kwargs))


@register_model
def vig_ti(pretrained: bool = False, **kwargs) -> ViG:
    """ViG-Ti: 192 channels, 12 blocks (Max-Relative: 7.2 M parameters, 1.3 G MACs)."""
    return _create("vig_ti", pretrained, dict(channels=192, depth=12), **kwargs)


@register_model
def vig_s(pretrained: bool = False, **kwargs) -> ViG:
    """ViG-S: 320 channels, 16 blocks."""
    return _create("vig_s", pretrained, dict(channels=320, depth=16), **kwargs)


@register_model
def vig_b(pretrained: bool = False, **kwargs) -> ViG:
    """ViG-B: 640 channels, 16 blocks."""
    return _create("vig_b", pretrained, dict(channels=640, depth=16), **kwargs)

