"""Graph convolutions (PyG ``MessagePassing`` subclasses)."""
from attvig_pyg.nn.cross_attn_conv import CrossAttnConv
from attvig_pyg.nn.grouped_linear import GroupedLinear
from attvig_pyg.nn.max_relative_conv import MaxRelativeConv

__all__ = ["CrossAttnConv", "GroupedLinear", "MaxRelativeConv"]
