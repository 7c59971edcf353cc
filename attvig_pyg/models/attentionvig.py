"""AttentionViG, from "AttentionViG: Cross-Attention-Based Dynamic Neighbor Aggregation in Vision
GNNs" (Gedik et al., 2025, https://arxiv.org/abs/2509.25570).

A four-stage CNN-GNN hybrid: a convolutional stem, then per stage inverted residual blocks for
local mixing and two Grapher blocks for global mixing over an image-grid graph (SVGA by default),
whose aggregation is the paper's cross-attention (:class:`attvig_pyg.nn.CrossAttnConv`). The
reading of the paper behind every choice here is written down in docs/architecture.md.
"""
import logging
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, calculate_drop_path_rates, trunc_normal_
from timm.models import (build_model_with_cfg, checkpoint_seq, generate_default_cfgs,
                         register_model)

from attvig_pyg.graphs import GRAPH_POLICIES, build_graph
from attvig_pyg.graphs.grid import IntOrPair, as_pair, default_steps
from attvig_pyg.models.fusion import fuse_batchnorm
from attvig_pyg.models.recompute import recompute_in_backward
from attvig_pyg.nn import CrossAttnConv, MaxRelativeConv, checks

__all__ = ["AttentionViG"]

log = logging.getLogger(__name__)

AGGREGATORS = ("cross_attn", "max_relative")
MIN_INPUT_SIZE = 32  # the network's total stride: below it, stages collapse to 1x1 maps


def conv_bn(in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1,
            groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2,
                                   groups=groups), nn.BatchNorm2d(out_chs))


def cyclic_form(aggregator: str, device: torch.device) -> bool:
    """Whether a Grapher hands its SVGA or DAGC graph to its conv in the cyclic form (else as
    an edge list). The rule, from measurement (docs/architecture.md, "Where inputs are
    checked"): cross-attention always (its dense blocks beat an edge list on the CPU); the
    per-edge aggregators (max-relative, the ViG harness's PyG convs) only where the host
    cannot read values for free (:func:`~attvig_pyg.nn.checks.host_reads_are_free`). On the
    CPU their edge list is 3-4x faster: DAGC keeps about a quarter of its candidates, and
    listing the kept ones costs no wait. On an accelerator that list's size, which depends on
    the masks, would make the host wait for the device every forward."""
    return aggregator == "cross_attn" or not checks.host_reads_are_free(device)


def run_branch(branch: nn.Sequential, x: Tensor, recompute: Optional[str]) -> Tensor:
    """``branch(x)`` for a block's chain conv_bn, GELU, ..., conv_bn, keeping less of it for
    backward, where the rest runs again (:mod:`attvig_pyg.models.recompute`): ``"branch"``
    keeps only ``x``; ``"activations"`` keeps the first conv's output and the last conv's input
    and recomputes the BatchNorms, GELUs and depthwise conv between them; ``None`` keeps all."""
    if recompute is None:
        return branch(x)
    if recompute == "branch":
        return recompute_in_backward(branch, x, branch)
    if recompute == "activations":
        def between(h: Tensor) -> Tensor:
            h = branch[0][1](h)
            for layer in branch[1:-1]:
                h = layer(h)
            return h
        return branch[-1](recompute_in_backward(between, branch[0][0](x), branch))
    raise ValueError(f"Unknown recompute mode {recompute!r} (expected 'branch', "
                     "'activations' or None)")


class Stem(nn.Sequential):
    """Two 3x3 stride-2 convs, each followed by BN and GELU: 1/4 resolution.

    The network computes in the channels-last memory layout from here on (values unchanged):
    its depthwise and 1x1 convs are fastest in it on the CPU, and the Grapher's node view of a
    map ([B * H * W, C]) is then free.
    """

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__(conv_bn(in_chs, out_chs // 2, 3, 2), nn.GELU(),
                         conv_bn(out_chs // 2, out_chs, 3, 2), nn.GELU())

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.contiguous(memory_format=torch.channels_last))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand (x4), depthwise 3x3, 1x1 project, with a residual."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 layer_scale_init_value: float = 1e-5):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(conv_bn(dim, hidden), nn.GELU(),
                                 conv_bn(hidden, hidden, 3, groups=hidden), nn.GELU(),
                                 conv_bn(hidden, dim))
        self.layer_scale = nn.Parameter(torch.full((dim,), layer_scale_init_value))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.recompute: Optional[str] = None  # AttentionViG.set_activation_recompute

    def forward(self, x: Tensor) -> Tensor:
        mlp = run_branch(self.mlp, x, self.recompute)
        return x + self.drop_path(self.layer_scale.view(-1, 1, 1) * mlp)


class GraphMixer(nn.Module):
    """The Grapher's token mixer: conditional position encoding, then graph aggregation.

    ``cross_attn`` (AttentionViG): CPE, then :class:`CrossAttnConv` on the image graph (which ends
    in its own projection and GELU, Eq. 7). ``max_relative`` (GreedyViG's Grapher): CPE, a 1x1
    conv + BN, :class:`MaxRelativeConv` (+ BN + GELU) over the graph with self-loops (GreedyViG's
    running max starts at zero), and a 1x1 conv + BN.
    """

    def __init__(self, dim: int, graph: str = "svga", aggregator: str = "cross_attn",
                 k: Optional[IntOrPair] = None, knn_k: int = 9, knn_dilation: int = 1,
                 heads: Optional[int] = 8, head_dim: Optional[int] = None,
                 normalize: str = "none", beta_init: float = 1.0):
        super().__init__()
        if graph not in GRAPH_POLICIES:
            raise ValueError(f"Unknown graph policy '{graph}' (expected one of "
                             f"{', '.join(GRAPH_POLICIES)})")
        if aggregator not in AGGREGATORS:
            raise ValueError(f"Unknown aggregator '{aggregator}' (expected one of "
                             f"{', '.join(AGGREGATORS)})")
        self.graph = graph
        self.aggregator = aggregator
        self.recompute = False  # the aggregation in backward: AttentionViG.set_activation_recompute
        self.k = None if k is None else as_pair(k, "k")
        self.knn_k = knn_k
        self.knn_dilation = knn_dilation
        self._warned = set()  # map sizes warned about
        self.cpe = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        if aggregator == "cross_attn":
            self.fc1 = self.fc2 = nn.Identity()
            self.conv = CrossAttnConv(dim, dim, heads=None if head_dim else heads,
                                      head_dim=head_dim, normalize=normalize, beta_init=beta_init)
        else:
            self.fc1, self.fc2 = conv_bn(dim, dim), conv_bn(dim, dim)
            self.conv = MaxRelativeConv(dim, dim, norm="batch_norm", act="gelu")

    def shift(self, height: int, width: int) -> Tuple[int, int]:
        """SVGA/DAGC shift step per axis: the explicit K, or max(1, size // 7). An explicit K
        that leaves a map of several nodes without a single neighbour is warned about, once per
        map size."""
        if self.k is None:
            return default_steps(height, width)
        kh, kw = self.k
        if isinstance(height, int) and isinstance(width, int) and height * width > 1 and \
                kh >= height and kw >= width and (height, width) not in self._warned \
                and not torch.compiler.is_compiling():
            self._warned.add((height, width))
            log.warning("graph_k=%s leaves the nodes of a %dx%d map without neighbours (a "
                        "step K reaches no other node of an axis shorter than or as long as K)",
                        self.k, height, width)
        return self.k

    def knn_params(self, height: int, width: int) -> Tuple[int, int]:
        """k and dilation of the kNN graph, with k * dilation clamped to the nodes of a map."""
        nodes = height * width
        if self.knn_k * self.knn_dilation <= nodes:
            return self.knn_k, self.knn_dilation
        k = min(self.knn_k, nodes)
        dilation = max(1, min(self.knn_dilation, nodes // k))
        # (The warning comes from eager runs: logging would break a compiled graph.)
        if (height, width) not in self._warned and not torch.compiler.is_compiling():
            self._warned.add((height, width))
            log.warning("kNN: k=%d, dilation=%d needs %d nodes but a %dx%d map has %d; using "
                        "k=%d, dilation=%d", self.knn_k, self.knn_dilation,
                        self.knn_k * self.knn_dilation, height, width, nodes, k, dilation)
        return k, dilation

    def build(self, x: Tensor):
        """The graph over the nodes of feature map ``x``: an EdgeIndex (kNN); SVGA and DAGC in
        the form :func:`cyclic_form` chooses."""
        height, width = x.shape[-2:]
        if self.graph == "knn":
            k, dilation = self.knn_params(height, width)
            return build_graph("knn", x, k=k, dilation=dilation)
        return build_graph(self.graph, x, k=self.shift(height, width),
                           self_loops=self.aggregator == "max_relative",
                           cyclic=cyclic_form(self.aggregator, x.device))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.cpe(x)
        x = self.fc1(x)
        batch_size, channels, height, width = x.shape
        nodes = x.permute(0, 2, 3, 1).reshape(-1, channels)
        graph = self.build(x.detach())
        if self.recompute and self.training:
            # The aggregation's intermediates (gathered blocks, scores, weights) are large:
            # keep only its input and run it again in backward (without moving the max-relative
            # conv's BatchNorm statistics a second time, as torch.utils.checkpoint would).
            out = recompute_in_backward(lambda n: self.conv(n, graph), nodes, self.conv)
        else:
            out = self.conv(nodes, graph)
        return self.fc2(out.view(batch_size, height, width, channels).permute(0, 3, 1, 2))


class GrapherBlock(nn.Module):
    """Graph mixing then an FFN (1x1 x4 + BN + GELU + 1x1 + BN), each a residual branch with
    layer scale and drop path (Eq. 11 of the paper)."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-5,
                 **mixer_kwargs):
        super().__init__()
        self.mixer = GraphMixer(dim, **mixer_kwargs)
        self.ffn = nn.Sequential(conv_bn(dim, 4 * dim), nn.GELU(), conv_bn(4 * dim, dim))
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), layer_scale_init_value))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), layer_scale_init_value))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.recompute: Optional[str] = None  # AttentionViG.set_activation_recompute

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.layer_scale_1.view(-1, 1, 1) * self.mixer(x))
        ffn = run_branch(self.ffn, x, self.recompute)
        return x + self.drop_path(self.layer_scale_2.view(-1, 1, 1) * ffn)


class Stage(nn.Module):
    """Optional stride-2 downsampling (3x3 conv + BN), inverted residuals, Grapher blocks."""

    def __init__(self, in_dim: int, dim: int, depth: int, graphers: int, downsample: bool,
                 drop_path: Sequence[float], layer_scale_init_value: float, **mixer_kwargs):
        super().__init__()
        self.downsample = conv_bn(in_dim, dim, 3, 2) if downsample else nn.Identity()
        self.blocks = nn.Sequential(
            *[InvertedResidual(dim, drop_path=drop_path[i],
                               layer_scale_init_value=layer_scale_init_value)
              for i in range(depth)],
            *[GrapherBlock(dim, drop_path=drop_path[depth + i],
                           layer_scale_init_value=layer_scale_init_value, **mixer_kwargs)
              for i in range(graphers)])
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class AttentionViG(nn.Module):
    """AttentionViG: stem, four stages of inverted residual and Grapher blocks, and a head with a
    classifier and a distillation classifier.

    Args:
        depths: Inverted residual blocks per stage.
        dims: Channels per stage.
        graphers: Grapher blocks per stage, an int for every stage or one per stage (the paper
            uses two everywhere; GreedyViG-B 4, 4, 4, 3).
        in_chans: Input channels.
        num_classes: Classes of both classifiers (0: no classifier, features only).
        global_pool: ``"avg"`` or ``""`` (no pooling in :meth:`forward_head`).
        graph: Graph policy, ``"svga"`` (default), ``"dagc"`` or ``"knn"``.
        aggregator: ``"cross_attn"`` (default) or ``"max_relative"`` (GreedyViG's Grapher).
        graph_k: SVGA/DAGC shift step per stage (an int or an (h, w) pair per stage); ``None``
            takes max(1, size // 7) per axis from the actual stage size (8, 4, 2, 1 at 224 px).
        knn_k, knn_dilation: kNN neighbours and dilation (clamped, with a warning, where a stage
            has fewer nodes).
        heads, head_dim: Cross-attention heads (8 by default, Table 6) or channels per head.
        normalize: Cross-attention normalisation, ``"none"`` (default, Table 4), ``"softmax"`` or
            ``"mean"``.
        beta_init: Initial value of every cross-attention :math:`\\beta`.
        head_hidden_size: Width of the 1x1 conv + BN + GELU before the classifiers.
        drop_rate: Dropout before the classifiers.
        drop_path_rate: Stochastic depth, rising linearly over all blocks to this value.
        layer_scale_init_value: Initial layer scale of every residual branch.
        distillation: Add the distillation classifier (``head_dist``).
    """

    def __init__(
            self,
            depths: Sequence[int] = (2, 2, 6, 2),
            dims: Sequence[int] = (48, 96, 192, 384),
            graphers: Union[int, Sequence[int]] = 2,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            graph: str = "svga",
            aggregator: str = "cross_attn",
            graph_k: Optional[Sequence[IntOrPair]] = None,
            knn_k: int = 9,
            knn_dilation: int = 1,
            heads: Optional[int] = 8,
            head_dim: Optional[int] = None,
            normalize: str = "none",
            beta_init: float = 1.0,
            head_hidden_size: int = 768,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            layer_scale_init_value: float = 1e-5,
            distillation: bool = True,
    ):
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f"'depths' and 'dims' need one entry per stage (got {len(depths)} "
                             f"and {len(dims)})")
        if graph_k is not None and len(graph_k) != len(dims):
            raise ValueError(f"'graph_k' needs one entry per stage ({len(dims)}), got {graph_k}")
        graphers = [graphers] * len(dims) if isinstance(graphers, int) else list(graphers)
        if len(graphers) != len(dims) or any(g < 0 for g in graphers):
            raise ValueError(f"'graphers' needs an int >= 0 or one per stage ({len(dims)}), got "
                             f"{graphers}")
        check_pool(global_pool)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = dims[-1]
        self.head_hidden_size = head_hidden_size
        self.graph = graph
        self.aggregator = aggregator
        self.distilled_training = False

        self.stem = Stem(in_chans, dims[0])
        # Rising linearly over all blocks in order, inverted residuals then Graphers per stage.
        rates = calculate_drop_path_rates(drop_path_rate, [d + g for d, g in zip(depths, graphers)],
                                          stagewise=True)
        stages, self.feature_info = [], []
        for i, (depth, dim, count, block_rates) in enumerate(zip(depths, dims, graphers, rates)):
            stages.append(Stage(
                dims[max(i - 1, 0)], dim, depth, count, i > 0, block_rates,
                layer_scale_init_value,
                graph=graph, aggregator=aggregator, k=None if graph_k is None else graph_k[i],
                knn_k=knn_k, knn_dilation=knn_dilation, heads=heads, head_dim=head_dim,
                normalize=normalize, beta_init=beta_init))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i,
                                          module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)

        self.pre_logits = nn.Sequential(nn.Conv2d(dims[-1], head_hidden_size, 1),
                                        nn.BatchNorm2d(head_hidden_size), nn.GELU())
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(head_hidden_size, num_classes) if num_classes else nn.Identity()
        self.head_dist = None
        if distillation:
            self.head_dist = (nn.Linear(head_hidden_size, num_classes) if num_classes
                              else nn.Identity())
        self.apply(self._init_weights)
        self.set_activation_recompute(True)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):  # as GreedyViG
            nn.init.kaiming_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    # ---- timm interface ------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Parameters AdamW must not decay besides what timm's optimizer factory already skips
        (every parameter with at most one dimension: biases, norms, layer scales, and log_beta
        too): every ``log_beta``, named so that the rule does not rest on its shape."""
        return {name for name, _ in self.named_parameters() if name.endswith("log_beta")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            (r"^pre_logits", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        """In training, return ``(classifier, distillation classifier)`` logits instead of their
        mean, for a distillation loss."""
        self.distilled_training = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes else nn.Identity()
        if self.head_dist is not None:
            self.head_dist = (nn.Linear(self.head_hidden_size, num_classes) if num_classes
                              else nn.Identity())

    def reparameterize(self) -> "AttentionViG":
        """For inference: every BatchNorm folded into the convolution before it, in place, with
        the running statistics (eval mode). The outputs stay the same; the model runs faster.
        (timm's ``reparameterize_model`` cannot walk a model holding PyG convs: see
        :mod:`attvig_pyg.models.fusion`.)"""
        return fuse_batchnorm(self)

    def set_activation_recompute(self, enable: bool = True) -> "AttentionViG":
        """Whether the blocks recompute activations in backward instead of keeping them (default
        on; the gradients and BatchNorm statistics are the plain path's bit for bit). In the
        first two stages, whose maps are large and channels few and where most of the memory
        lies, each inverted residual's and FFN's whole branch keeps only its input, and each
        Grapher's aggregation (gathered blocks, scores, weights) runs again. In the last
        two the 1x1 convs are compute-bound and the aggregation is cheaper kept: only the
        BatchNorms, GELUs and depthwise conv between a branch's first and last conv run again.
        Unlike :meth:`set_grad_checkpointing` the stem, the downsampling convs and the
        Graphers' position encodings run once. It costs AttentionViG-S about a fifth of its
        training step on the CPU for a quarter of the memory; docs/benchmarks.md has what each
        choice costs and saves."""
        for index, stage in enumerate(self.stages):
            early = enable and index < 2
            for block in stage.blocks:
                block.recompute = None if not enable else "branch" if early else "activations"
                if isinstance(block, GrapherBlock):
                    block.mixer.recompute = early
        return self

    # ---- cross-attention temperatures ----------------------------------------------------

    def freeze_beta(self) -> "AttentionViG":
        """Stops every cross-attention beta from learning (downstream fine-tuning, Table 9)."""
        for module in self.modules():
            if isinstance(module, CrossAttnConv):
                module.freeze_beta()
        return self

    def learned_betas(self) -> Dict[str, float]:
        """Every cross-attention layer's beta, by module name (the paper's Table 8)."""
        return {name: module.beta.item() for name, module in self.named_modules()
                if isinstance(module, CrossAttnConv)}

    # ---- graphs --------------------------------------------------------------------------

    def stage_sizes(self, img_size: IntOrPair) -> List[Tuple[int, int]]:
        """Grid size of every stage for an input of ``img_size`` pixels."""
        size = as_pair(img_size, "img_size")
        size = tuple((s + 3) // 4 for s in size)  # the stem: two stride-2 convs (ceil each)
        sizes = []
        for i, _ in enumerate(self.stages):
            if i > 0:
                size = tuple((s + 1) // 2 for s in size)
            sizes.append(size)
        return sizes

    def graph_summary(self, img_size: IntOrPair = 224) -> List[Dict]:
        """Per stage: grid size, graph policy, its parameters and the neighbours per node."""
        summary = []
        for stage, (height, width) in zip(self.stages, self.stage_sizes(img_size)):
            graphers = [block for block in stage.blocks if isinstance(block, GrapherBlock)]
            if not graphers:
                summary.append(dict(grid=(height, width), graph="none", neighbours=0))
                continue
            mixer = graphers[-1].mixer
            entry = dict(grid=(height, width), graph=mixer.graph)
            if mixer.graph == "knn":
                k, dilation = mixer.knn_params(height, width)
                entry.update(k=k, dilation=dilation, neighbours=k)
            else:
                kh, kw = mixer.shift(height, width)
                candidates = len(range(kh, height, kh)) + len(range(kw, width, kw))
                entry.update(k=(kh, kw), neighbours=candidates)
                if mixer.graph == "dagc":
                    entry["neighbours"] = f"<= {candidates} (filtered per image)"
            if mixer.aggregator == "max_relative":
                entry["self_loops"] = True
            summary.append(entry)
        return summary

    # ---- forward -------------------------------------------------------------------------

    def _check_images(self, x: Tensor) -> None:
        if torch.jit.is_tracing():
            raise RuntimeError("AttentionViG cannot be traced by TorchScript (torch.jit.trace, "
                               "torch.onnx.export(..., dynamo=False)): export it with "
                               "torch.export.export or torch.onnx.export(..., dynamo=True) "
                               "(docs/deployment.md)")
        if x.dim() != 4 or x.size(1) != self.in_chans:
            raise ValueError(f"Expected images of shape [batch, {self.in_chans}, height, width] "
                             f"(got {tuple(x.shape)})")
        if min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise ValueError(f"AttentionViG needs inputs of at least {MIN_INPUT_SIZE}x"
                             f"{MIN_INPUT_SIZE} pixels (total stride 32 over four stages); "
                             f"got {x.size(-2)}x{x.size(-1)}")

    def forward_features(self, x: Tensor) -> Tensor:
        self._check_images(x)
        return self.stages(self.stem(x))

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """timm's feature interface: the output maps of the stages in ``indices`` (all for
        ``None``, the last n for an int n; NCHW at strides 4 to 32) and, unless
        ``intermediates_only``, the final features. There is no final norm: ``norm`` changes
        nothing."""
        self._check_images(x)
        x, intermediates = run_taking(self.stem(x), self.stages, indices, stop_early,
                                      output_fmt)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1,
                                  prune_norm: bool = False, prune_head: bool = True) -> List[int]:
        """Drops the stages after the last of ``indices`` (and with ``prune_head`` the head:
        pre-logits and both classifiers); returns the absolute indices."""
        taken, max_index = take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_head:
            self.pre_logits = nn.Identity()
            self.head_hidden_size = self.num_features = self.feature_info[-1]["num_chs"]
            self.reset_classifier(0, "")
        return taken

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Union[Tensor, Tuple[Tensor,
                                                                                       Tensor]]:
        """Pooling (``global_pool="avg"``), the pre-logits conv + BN + GELU and the classifiers.
        Without pooling (``global_pool=""``) the result keeps its map: ``[B, C, H, W]``, the
        classifiers applied at every location."""
        pooled = self.global_pool == "avg"
        if pooled:
            x = x.mean(dim=(2, 3), keepdim=True)
        x = self.head_drop(self.pre_logits(x))
        x = x.flatten(1) if pooled else x.permute(0, 2, 3, 1)  # channels last for the classifiers
        if pre_logits:
            return x if pooled else x.permute(0, 3, 1, 2)
        logits = self.head(x)
        if self.head_dist is not None:
            logits_dist = self.head_dist(x)
            if self.distilled_training and self.training and not torch.jit.is_scripting():
                return logits, logits_dist
            logits = (logits + logits_dist) / 2
        return logits if pooled else logits.permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        return self.forward_head(self.forward_features(x))


def take_indices(count: int, indices: Optional[Union[int, Sequence[int]]]) -> Tuple[List[int],
                                                                                  int]:
    """timm's convention for the stages ``forward_intermediates`` returns: ``None`` all of
    ``count``, an int n the last n, a sequence those indices (negative ones from the end).
    Returns the absolute indices and the largest. (timm's own helper for this lives in a
    private module.)"""
    if indices is None:
        indices = count
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise ValueError(f"Expected the last n of {count} stages, 1 <= n <= {count} (got "
                             f"{indices})")
        absolute = list(range(count - indices, count))
    else:
        absolute = [i + count if i < 0 else i for i in indices]
        if not absolute or not all(0 <= i < count for i in absolute):
            raise ValueError(f"Expected stage indices in [{-count}, {count - 1}] (got "
                             f"{list(indices)})")
    return absolute, max(absolute)


def run_taking(x: Tensor, layers: nn.Sequential, indices, stop_early: bool,
               output_fmt: str) -> Tuple[Tensor, List[Tensor]]:
    """``layers`` on ``x``, keeping the outputs of those in ``indices`` (:func:`take_indices`;
    with ``stop_early`` the layers after the last of them do not run): what
    ``forward_intermediates`` computes. Returns the last output and the kept ones."""
    if output_fmt != "NCHW":
        raise ValueError(f"The intermediates are NCHW maps (got output_fmt='{output_fmt}')")
    taken, last = take_indices(len(layers), indices)
    kept = []
    for index, layer in enumerate(layers[:last + 1] if stop_early else layers):
        x = layer(x)
        if index in taken:
            kept.append(x)
    return x, kept


def check_pool(global_pool: str) -> None:
    if global_pool not in ("avg", ""):
        raise ValueError(f"Unknown global_pool '{global_pool}' (expected 'avg', or '' for no "
                         "pooling)")


def _cfg(**kwargs) -> Dict:
    return dict(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.9,
                interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv="stem.0.0", classifier=("head", "head_dist"), license="mit",
                **kwargs)


default_cfgs = generate_default_cfgs({
    "attentionvig_s": _cfg(),
    "attentionvig_m": _cfg(),
    "attentionvig_b": _cfg(),
})


def create_model(variant: str, pretrained: bool = False, **kwargs) -> AttentionViG:
    """timm's builder for every registered AttentionViG skeleton (``features_only`` through
    :meth:`AttentionViG.forward_intermediates`)."""
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(AttentionViG, variant, pretrained,
                                feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
                                **kwargs)


@register_model
def attentionvig_s(pretrained: bool = False, **kwargs) -> AttentionViG:
    """AttentionViG-S: 12.3 M parameters, 1.6 G multiply-adds at 224 px (Table 1)."""
    return create_model("attentionvig_s", pretrained, **dict(dict(depths=(2, 2, 6, 2),
                                                             dims=(48, 96, 192, 384)), **kwargs))


@register_model
def attentionvig_m(pretrained: bool = False, **kwargs) -> AttentionViG:
    """AttentionViG-M: 22.2 M parameters, 3.2 G multiply-adds at 224 px (Table 1)."""
    return create_model("attentionvig_m", pretrained, **dict(dict(depths=(4, 4, 12, 4),
                                                             dims=(56, 112, 224, 448)), **kwargs))


@register_model
def attentionvig_b(pretrained: bool = False, **kwargs) -> AttentionViG:
    """AttentionViG-B: 32.3 M parameters, 4.8 G multiply-adds at 224 px (Table 1)."""
    return create_model("attentionvig_b", pretrained, **dict(dict(depths=(5, 5, 15, 5),
                                                             dims=(64, 128, 256, 512)), **kwargs))
