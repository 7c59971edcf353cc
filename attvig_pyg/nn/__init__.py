"""Graph convolutions (PyG ``MessagePassing`` subclasses)."""
from attvig_pyg.nn.cross_attn_conv import CrossAttnConv
from attvig_pyg.nn.max_relative_conv import MaxRelativeConv

__all__ = ["CrossAttnConv", "MaxRelativeConv"]
