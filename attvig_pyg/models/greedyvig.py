"""GreedyViG-S/M/B (Munir et al., "GreedyViG: Dynamic Axial Graph Construction for Efficient
Vision GNNs", CVPR 2024) as :class:`~attvig_pyg.models.AttentionViG` configurations: the same lab's
skeleton with a max-relative Grapher over DAGC graphs, K = 8, 4, 2, 1 at every input size. With
:func:`checkpoint_filter_fn` the official ImageNet-1K checkpoints load, so that users get trained
vision GNNs in this PyG- and timm-native form:

    model = timm.create_model("greedyvig_s", pretrained=True,
                              pretrained_cfg_overlay=dict(file="S_GreedyViG_81_1.pth"))

The mapping (docs/checkpoints.md) was checked against the official model code on random weights;
the released files themselves cannot be fetched here.
"""
import re
from typing import Dict, Optional

from torch import Tensor

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model

from attvig_pyg.models.attentionvig import AttentionViG, create_model
from attvig_pyg.models.checkpoints import check_fits, unwrap_state_dict

__all__ = ["checkpoint_filter_fn"]

# GreedyViG's fixed shift steps (both axes, every input size).
GRAPH_K = (8, 4, 2, 1)
VARIANTS = {  # inverted residuals and Grapher blocks per stage, channels (official model code)
    "greedyvig_s": dict(depths=(2, 2, 6, 2), graphers=(2, 2, 2, 2), dims=(48, 96, 192, 384)),
    "greedyvig_m": dict(depths=(3, 3, 9, 3), graphers=(3, 3, 3, 3), dims=(56, 112, 224, 448)),
    "greedyvig_b": dict(depths=(4, 4, 12, 3), graphers=(4, 4, 4, 3), dims=(64, 128, 256, 512)),
}
IRB_LAYERS = {"pw1": "mlp.0.0", "norm1": "mlp.0.1", "dw": "mlp.2.0", "norm2": "mlp.2.1",
              "pw2": "mlp.4.0", "norm3": "mlp.4.1"}
GRAPHER_LAYERS = {"mixer.cpe.pe": "mixer.cpe", "mixer.fc1": "mixer.fc1",
                  "mixer.fc2": "mixer.fc2", "mixer.graph_conv.nn.0": "mixer.conv.lin.conv",
                  "mixer.graph_conv.nn.1": "mixer.conv.norm.module", "ffn.0": "ffn.0.0",
                  "ffn.1": "ffn.0.1", "ffn.3": "ffn.2.0", "ffn.4": "ffn.2.1"}
TOP_LAYERS = {"stem.stem.0": "stem.0.0", "stem.stem.1": "stem.0.1", "stem.stem.3": "stem.2.0",
              "stem.stem.4": "stem.2.1", "prediction.1": "pre_logits.0",
              "prediction.2": "pre_logits.1", "head": "head", "dist_head": "head_dist"}


def checkpoint_filter_fn(state_dict, model: AttentionViG) -> Dict[str, Tensor]:
    """timm's hook for pretrained weights: an official GreedyViG state dict (its ``model`` /
    ``state_dict`` wrappers and ``module.`` prefixes accepted) in this layout; a state dict of
    this layout passes unchanged. Raises ValueError, naming the keys, for a state dict that does
    not fit ``model``."""
    state_dict = unwrap_state_dict(state_dict)
    if "stem.stem.0.weight" not in state_dict:  # already this layout
        return state_dict
    depths = [sum(1 for b in stage.blocks if not hasattr(b, "mixer")) for stage in model.stages]
    mapped = {}
    for key, value in state_dict.items():
        name = _new_name(key, depths)
        if name is None or name in mapped:
            raise ValueError(f"GreedyViG checkpoint key '{key}' has no place in "
                             f"{type(model).__name__} with inverted residuals {depths} per stage")
        if name.endswith("mixer.conv.lin.conv.weight"):
            # [out, 2C, 1, 1] over (x, max-relative) as two channel blocks -> [out, 2C, 1] over
            # the pairs (x_c, r_c) that MaxRelativeConv interleaves.
            out, inputs = value.shape[:2]
            value = value.view(out, 2, inputs // 2).transpose(1, 2).reshape(out, inputs, 1)
        elif name.startswith(("head.", "head_dist.")) and value.dim() == 4:
            value = value.flatten(1)  # 1x1 conv classifier -> linear
        mapped[name] = value
    check_fits(mapped, model, "the GreedyViG checkpoint", classifiers=("head", "head_dist"))
    return mapped


def _new_name(key: str, depths) -> Optional[str]:
    """This layout's name of an official key (None: no place for it)."""
    for old, new in TOP_LAYERS.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    match = re.fullmatch(r"backbone\.(\d+)\.(\d+)\.(.+)", key)
    if not match:
        return None
    stage, index, rest = int(match[1]), int(match[2]), match[3]
    if stage > 0:  # the official stage lists its downsampling first
        if index == 0:
            downsample = re.fullmatch(r"conv\.(.+)", rest)
            return f"stages.{stage}.downsample.{downsample[1]}" if downsample else None
        index -= 1
    prefix = f"stages.{stage}.blocks.{index}."
    if index < depths[stage]:  # an inverted residual
        if rest == "layer_scale_2":
            return prefix + "layer_scale"
        layer = re.fullmatch(r"dws\.(\w+)\.(.+)", rest)
        return prefix + f"{IRB_LAYERS[layer[1]]}.{layer[2]}" \
            if layer and layer[1] in IRB_LAYERS else None
    if rest in ("layer_scale_1", "layer_scale_2"):
        return prefix + rest
    for old, new in GRAPHER_LAYERS.items():
        if rest.startswith(old + "."):
            return prefix + new + rest[len(old):]
    return None


def _cfg(file: str, **kwargs) -> Dict:
    return dict(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.9,
                interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv="stem.0.0", classifier=("head", "head_dist"),
                origin_url="https://huggingface.co/SLDGroup/GreedyViG",
                paper_ids="arXiv:2405.06849", license="unstated by the GreedyViG repository",
                notes=(f"official ImageNet-1K weights: {file}, published on the Hugging Face hub "
                       "(SLDGroup/GreedyViG); nothing is downloaded: pass the local file with "
                       "pretrained_cfg_overlay=dict(file=...)",), **kwargs)


# The repository's README names S's file; M's and B's are the hub's other two.
default_cfgs = generate_default_cfgs({
    "greedyvig_s.in1k": _cfg("S_GreedyViG_81_1.pth (81.1 % top-1)"),
    "greedyvig_m.in1k": _cfg("GreedyViG-M's file (82.9 % top-1)"),
    "greedyvig_b.in1k": _cfg("GreedyViG-B's file (83.9 % top-1)"),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> AttentionViG:
    settings = dict(VARIANTS[variant], aggregator="max_relative", graph="dagc", graph_k=GRAPH_K)
    return create_model(variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                        **dict(settings, **kwargs))


@register_model
def greedyvig_s(pretrained: bool = False, **kwargs) -> AttentionViG:
    """GreedyViG-S: 11.98 M parameters, 1.60 G multiply-adds at 224 px (official: 81.1 %)."""
    return _create("greedyvig_s", pretrained, **kwargs)


@register_model
def greedyvig_m(pretrained: bool = False, **kwargs) -> AttentionViG:
    """GreedyViG-M: 21.93 M parameters, 3.15 G multiply-adds at 224 px (official: 82.9 %)."""
    return _create("greedyvig_m", pretrained, **kwargs)


@register_model
def greedyvig_b(pretrained: bool = False, **kwargs) -> AttentionViG:
    """GreedyViG-B: 30.91 M parameters, 5.12 G multiply-adds at 224 px (official: 83.9 %)."""
    return _create("greedyvig_b", pretrained, **kwargs)
