import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GroupedLinear(nn.Module):
    r"""A linear map of node features ``[N, in_channels]`` whose channels are split into
    :obj:`groups` groups, each mapped on its own: Vision GNN's grouped 1x1 convolution
    (``groups=4`` there) for PyG-style node features. With ``groups=1`` it is a plain linear map.

    Args:
        in_channels (int): Input channels, or :obj:`-1` to derive them from the first input.
        out_channels (int): Output channels.
        groups (int, optional): Number of groups; must divide both sizes. (default: :obj:`1`)
        bias (bool, optional): Learn an additive bias. (default: :obj:`True`)
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int = 1, bias: bool = True):
        super().__init__()
        if groups < 1 or out_channels % groups or (in_channels > 0 and in_channels % groups):
            raise ValueError(f"'groups' ({groups}) must divide both in_channels ({in_channels}) "
                             f"and out_channels ({out_channels})")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.conv = (nn.Conv1d(in_channels, out_channels, 1, groups=groups, bias=bias)
                     if in_channels > 0 else
                     nn.LazyConv1d(out_channels, 1, groups=groups, bias=bias))

    @property
    def weight(self) -> Tensor:
        """``[out_channels, in_channels // groups]``."""
        return self.conv.weight.squeeze(-1)

    @property
    def bias(self) -> Tensor:
        return self.conv.bias

    def reset_parameters(self) -> None:
        if not isinstance(self.conv, nn.LazyConv1d):
            self.conv.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.conv, nn.LazyConv1d):  # the first call materialises the weights
            self.conv(x[:1].unsqueeze(-1))
        if self.groups == 1:
            return F.linear(x, self.weight, self.bias)
        # A grouped matrix product: with many rows (nodes, edges) and a length-1 signal, a
        # grouped Conv1d is about ten times slower on the CPU.
        weight = self.weight.view(self.groups, self.out_channels // self.groups, -1)
        out = torch.einsum("ngi,goi->ngo", x.view(x.size(0), self.groups, -1), weight)
        out = out.reshape(x.size(0), self.out_channels)
        return out if self.bias is None else out + self.bias

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"groups={self.groups})")
