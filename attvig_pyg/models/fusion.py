"""Inference-time fusion: BatchNorm folded into the convolution or linear map before it.

timm's own entry point, ``timm.utils.reparameterize_model``, walks a model and calls
``child.fuse()`` on every child that has a ``fuse`` attribute; every PyG ``MessagePassing`` has
one, a boolean (PyG's switch for fused message passing), so the walk fails on any model with a
PyG conv. The models here therefore offer ``reparameterize()`` (timm's method name), built on
:func:`fuse_batchnorm`.
"""
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from attvig_pyg.nn import GroupedLinear

__all__ = ["fuse_batchnorm"]

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@torch.no_grad()
def fuse_batchnorm(module: nn.Module) -> nn.Module:
    """Folds, in place, every BatchNorm that directly follows a ``Conv1d``/``Conv2d``, ``Linear``
    or :class:`~attvig_pyg.nn.GroupedLinear` in an ``nn.Sequential`` into that map (the BatchNorm
    becomes an ``Identity``), and calls ``reparameterize()`` on the submodules that fold their
    own (:class:`~attvig_pyg.nn.MaxRelativeConv`). Puts ``module`` in eval mode first: the fold
    uses the running statistics. Returns ``module``."""
    module.eval()
    for sequential in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        for index in range(len(sequential) - 1):
            norm = sequential[index + 1]
            if isinstance(norm, _BATCHNORMS) and _fold(sequential, index, norm):
                sequential[index + 1] = nn.Identity()
    for child in module.modules():
        if child is not module and hasattr(child, "reparameterize") and \
                not isinstance(child, nn.Sequential):
            child.reparameterize()
    return module


def _fold(parent: nn.Sequential, index: int, norm: nn.Module) -> bool:
    layer = parent[index]
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)) and layer.out_channels == norm.num_features:
        parent[index] = fuse_conv_bn_eval(layer, norm)
    elif isinstance(layer, nn.Linear) and layer.out_features == norm.num_features:
        parent[index] = fuse_linear_bn_eval(layer, norm)
    elif isinstance(layer, GroupedLinear) and layer.out_channels == norm.num_features:
        layer.conv = fuse_conv_bn_eval(layer.conv, norm)
    else:
        return False
    return True
