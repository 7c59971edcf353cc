"""AttentionViG and its cross-attention graph convolution for PyTorch Geometric and timm."""
from attvig_pyg.nn import CrossAttnConv, MaxRelativeConv
from attvig_pyg import models  # noqa: F401  (registers attentionvig_s/m/b with timm)

__version__ = "0.1.0"

__all__ = ["CrossAttnConv", "MaxRelativeConv", "__version__"]
