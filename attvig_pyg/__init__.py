"""AttentionViG and its cross-attention graph convolution for PyTorch Geometric and timm.

``import attvig_pyg`` (or ``attvig_pyg.nn``, ``attvig_pyg.graphs``) needs PyTorch Geometric
only; ``import attvig_pyg.models`` imports timm and registers the models with it
(``attentionvig_s/m/b``, ``greedyvig_s/m/b``, ``vig_ti/s/b``).
"""
import importlib

from attvig_pyg.nn import CrossAttnConv, MaxRelativeConv

__version__ = "0.1.0"

__all__ = ["CrossAttnConv", "MaxRelativeConv", "__version__"]


def __getattr__(name: str):
    # attvig_pyg.models on first use, so that the conv alone does not import timm.
    if name == "models":
        return importlib.import_module("attvig_pyg.models")
    raise AttributeError(f"module 'attvig_pyg' has no attribute '{name}'")
