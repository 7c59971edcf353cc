"""AttentionViG for dense prediction: a feature pyramid backbone for torchvision's detection models
(the counterpart of torchvision's ``resnet_fpn_backbone``) and a Semantic FPN segmentation model
(Kirillov et al., "Panoptic Feature Pyramid Networks", 2019), both on torchvision's
``FeaturePyramidNetwork``.

The paper fine-tunes with every cross-attention beta frozen (Section 5.4, Table 9); GreedyViG,
from the same lab, keeps BatchNorm in eval mode while fine-tuning and trains every stage. Those
are the defaults here; docs/dense-prediction.md says which settings come from where.
"""
from collections import OrderedDict
from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from timm.layers import freeze_batch_norm_2d

from attvig_pyg.models.attentionvig import AttentionViG

__all__ = ["AttentionViGFPN", "attentionvig_fpn_backbone", "SemanticFPN"]

NORM_MODES = ("eval", "frozen", "train")


class AttentionViGFPN(BackboneWithFPN):
    """torchvision's ``BackboneWithFPN`` on the stem and stages of an AttentionViG: an ordered dict
    of feature maps, ``"0"``... at strides 4, 8, 16, 32 (and ``"pool"`` from ``LastLevelMaxPool``),
    each with :attr:`out_channels` channels. With ``norm_eval`` its BatchNorm layers stay in eval
    mode when the module is put in training mode (their statistics do not change; their affine
    weights still learn)."""

    def __init__(self, *args, norm_eval: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm_eval = norm_eval

    def train(self, mode: bool = True) -> "AttentionViGFPN":
        super().train(mode)
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
                    module.eval()
        return self


def attentionvig_fpn_backbone(
        model: AttentionViG,
        trainable_stages: int = 5,
        norm: str = "eval",
        train_beta: bool = False,
        returned_stages: Sequence[int] = (1, 2, 3, 4),
        out_channels: int = 256,
        extra_blocks: Optional[ExtraFPNBlock] = None,
) -> AttentionViGFPN:
    """An AttentionViG as the backbone of a torchvision detection model (``MaskRCNN``,
    ``FasterRCNN``, ``RetinaNet``...), built the way torchvision's ``resnet_fpn_backbone`` builds
    a ResNet's.

    Args:
        model: An :class:`AttentionViG` (e.g. ``timm.create_model("attentionvig_s")`` with its
            classification weights loaded); its head is not used.
        trainable_stages: How many of the stages, counted from the last, stay trainable: 0 to 4,
            or 5 for the stem too (every layer; GreedyViG's setting). The others are frozen.
        norm: ``"eval"``: BatchNorm statistics fixed, affine weights trained (GreedyViG's
            ``norm_eval``); ``"frozen"``: BatchNorm replaced by timm's ``FrozenBatchNorm2d``
            (torchvision's detection backbones); ``"train"``: ordinary BatchNorm.
        train_beta: Let every cross-attention beta learn (the paper freezes them, Table 9).
        returned_stages: Stages (1 to 4) whose outputs feed the pyramid.
        out_channels: Channels of every pyramid level.
        extra_blocks: torchvision's extra FPN block (default: ``LastLevelMaxPool``, a stride-64
            level, as Mask R-CNN expects).
    """
    if not isinstance(model, AttentionViG):
        raise TypeError(f"Expected an AttentionViG (got {type(model).__name__})")
    if not 0 <= trainable_stages <= 5:
        raise ValueError(f"'trainable_stages' must be in 0..5 (got {trainable_stages})")
    if norm not in NORM_MODES:
        raise ValueError(f"Unknown 'norm' mode '{norm}' (expected one of {', '.join(NORM_MODES)})")
    stages = len(model.stages)
    if not returned_stages or any(not 1 <= s <= stages for s in returned_stages):
        raise ValueError(f"'returned_stages' must name stages in 1..{stages} "
                         f"(got {tuple(returned_stages)})")
    body = nn.Sequential(OrderedDict([("stem", model.stem), *(
        (f"stage{i + 1}", stage) for i, stage in enumerate(model.stages))]))
    frozen = ["stem", *(f"stage{i + 1}" for i in range(stages))][:5 - trainable_stages]
    for name in frozen:
        body.get_submodule(name).requires_grad_(False)
    if train_beta:
        # Only the trainable stages' betas learn.
        for name, parameter in body.named_parameters():
            if name.endswith("log_beta"):
                parameter.requires_grad_(name.split(".")[0] not in frozen)
    else:
        model.freeze_beta()
    if norm == "frozen":
        body = freeze_batch_norm_2d(body)
    channels = [model.feature_info[s - 1]["num_chs"] for s in returned_stages]
    return AttentionViGFPN(body, {f"stage{s}": str(i) for i, s in enumerate(returned_stages)},
                           channels, out_channels, extra_blocks=extra_blocks or LastLevelMaxPool(),
                           norm_eval=norm == "eval")


class SemanticFPN(nn.Module):
    """Semantic FPN (Kirillov et al., 2019) on a feature pyramid backbone: every level of strides
    4, 8, 16, 32 goes through conv 3x3 + GroupNorm + ReLU blocks, each but the stride-4 level's
    followed by 2x upsampling, until it reaches stride 4; the four are summed, and a 1x1
    classifier (after dropout) gives per-class logits, upsampled bilinearly to the input.

    Args:
        backbone: Returns an ordered dict of at least four maps at strides 4, 8, 16, 32 with
            ``backbone.out_channels`` channels (e.g. :func:`attentionvig_fpn_backbone`; further
            levels are ignored).
        num_classes: Classes of the logits (150 for ADE20K).
        channels: Width of the head (128, as the paper's head).
        dropout: Dropout before the classifier.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, channels: int = 128,
                 dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.scale_heads = nn.ModuleList()
        for level in range(4):
            blocks = []
            for step in range(max(1, level)):
                blocks += [nn.Conv2d(backbone.out_channels if step == 0 else channels, channels, 3,
                                     padding=1, bias=False),
                           nn.GroupNorm(32, channels), nn.ReLU(inplace=True)]
                if level > 0:
                    blocks.append(nn.Upsample(scale_factor=2, mode="bilinear",
                                              align_corners=False))
            self.scale_heads.append(nn.Sequential(*blocks))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, images: Tensor) -> Tensor:
        features = list(self.backbone(images).values())[:4]
        out = self.scale_heads[0](features[0])
        for head, feature in zip(self.scale_heads[1:], features[1:]):
            # Odd sizes: a level's upsampled map may be one pixel larger than stride 4's.
            out = out + _crop_or_resize(head(feature), out.shape[-2:])
        logits = self.classifier(self.dropout(out))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def _crop_or_resize(x: Tensor, size) -> Tensor:
    if x.shape[-2:] == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
