from typing import Any, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from torch_geometric.nn.conv import MessagePassing
from torch_geometric.nn.resolver import activation_resolver, normalization_resolver
from torch_geometric.typing import Adj, PairTensor

from attvig_pyg.adjacency import CyclicAdjacency
from attvig_pyg.nn.checks import check_adjacency, check_node_features, unshared_adjacency
from attvig_pyg.nn.functional import cyclic_max_relative
from attvig_pyg.nn.grouped_linear import GroupedLinear


class MaxRelativeConv(MessagePassing):
    r"""The max-relative graph convolution from the `"DeepGCNs: Making GCNs Go as Deep as CNNs"
    <https://arxiv.org/abs/1910.06849>`_ paper, as used by Vision GNN, MobileViG and GreedyViG
    (Eq. 1 of the AttentionViG paper):

    .. math::
        \mathbf{x}^{\prime}_i = \sigma\left(\mathrm{norm}\left(\mathbf{W}\left[\mathbf{x}_i,\
        \max_{j \in \mathcal{N}(i)} \left(\mathbf{x}_j - \mathbf{x}_i\right)\right]\right)\right)

    with an element-wise max. A node without incoming edges gets a zero relative feature (PyG's
    max aggregation over nothing). The conv uses the edges exactly as given; with a self-loop on
    every node the max is never negative, which is the roll-and-max form of MobileViG/GreedyViG.

    :math:`\mathbf{W}` is a (grouped) 1x1 map. Its input interleaves the two halves per channel,
    :math:`(x_0, r_0, x_1, r_1, \ldots)`, as Vision GNN does, so that with :obj:`groups > 1` each
    group sees a node's features together with their relative maxima. With :obj:`groups=1` this is
    Eq. 1 with the columns of :math:`\mathbf{W}` permuted.

    Args:
        in_channels (int or tuple): Size of each input sample, or :obj:`-1` to derive it from the
            first input. A tuple gives the sizes of source and target features, which must be
            equal (the relative term subtracts them).
        out_channels (int): Size of each output sample.
        groups (int, optional): Number of groups of the 1x1 map; Vision GNN uses :obj:`4`.
            (default: :obj:`1`)
        norm (str or torch.nn.Module, optional): Normalization after :math:`\mathbf{W}`, resolved
            by :func:`torch_geometric.nn.resolver.normalization_resolver` (e.g.
            :obj:`"batch_norm"`). (default: :obj:`None`)
        act (str or torch.nn.Module, optional): Activation after the normalization, resolved by
            :func:`torch_geometric.nn.resolver.activation_resolver` (e.g. :obj:`"gelu"`).
            (default: :obj:`None`)
        bias (bool, optional): If :obj:`False`, :math:`\mathbf{W}` learns no additive bias.
            (default: :obj:`True`)
        **kwargs (optional): Additional arguments of
            :class:`torch_geometric.nn.conv.MessagePassing`.

    Shapes:
        - **input:**
          node features :math:`(|\mathcal{V}|, F_{in})` or
          :math:`((|\mathcal{V_s}|, F_{in}), (|\mathcal{V_t}|, F_{in}))` if bipartite,
          edge indices :math:`(2, |\mathcal{E}|)` (or a sparse adjacency)
        - **output:** node features :math:`(|\mathcal{V}|, F_{out})` or
          :math:`(|\mathcal{V}_t|, F_{out})` if bipartite
    """

    def __init__(
        self,
        in_channels: Union[int, Tuple[int, int]],
        out_channels: int,
        groups: int = 1,
        norm: Union[str, nn.Module, None] = None,
        act: Union[str, nn.Module, None] = None,
        bias: bool = True,
        **kwargs: Any,
    ):
        kwargs.setdefault("aggr", "max")
        super().__init__(node_dim=0, **kwargs)

        if isinstance(in_channels, tuple):
            if in_channels[0] != in_channels[1]:
                raise ValueError("Source and target features must have the same size for the "
                                 f"relative term x_j - x_i (got {in_channels})")
            channels = in_channels[0]
        else:
            channels = in_channels

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups
        self.channels = channels

        self.lin = GroupedLinear(2 * channels if channels > 0 else -1, out_channels, groups,
                                 bias)
        self.norm = normalization_resolver(norm, out_channels) if norm is not None else None
        self.act = activation_resolver(act) if act is not None else None

        self.reset_parameters()

    def reset_parameters(self):
        super().reset_parameters()
        self.lin.reset_parameters()
        if self.norm is not None:
            self.norm.reset_parameters()

    @torch.no_grad()
    def reparameterize(self) -> "MaxRelativeConv":
        """For inference: folds a BatchNorm :obj:`norm` into the linear map before it, with its
        running statistics (the conv then computes the same in eval mode, one pass fewer)."""
        # PyG's BatchNorm (what norm="batch_norm" resolves to) holds a torch BatchNorm1d.
        norm = getattr(self.norm, "module", self.norm)
        if isinstance(norm, torch.nn.BatchNorm1d):
            self.lin.conv = fuse_conv_bn_eval(self.lin.conv.eval(), norm.eval())
            self.norm = None
        return self

    def forward(self, x: Union[Tensor, PairTensor],
                edge_index: Union[Adj, CyclicAdjacency]) -> Tensor:
        r"""Runs the forward pass of the module.

        Args:
            x (torch.Tensor or (torch.Tensor, torch.Tensor)): The input node features.
            edge_index (torch.Tensor, EdgeIndex, SparseTensor, torch.sparse.Tensor or
                CyclicAdjacency): The edges (:obj:`edge_index[0]` sends to
                :obj:`edge_index[1]`), the transposed sparse adjacency, or a cyclic adjacency
                (homogeneous graphs only; computed with a shift per offset, no edge list).
        """
        if isinstance(x, Tensor):
            x = (x, x)
        x_src, x_dst = x
        check_node_features(x_src, self.channels, "source")
        check_node_features(x_dst, x_src.size(-1), "target")
        check_adjacency(edge_index, x_src, x_dst)
        if isinstance(edge_index, CyclicAdjacency):
            relative = cyclic_max_relative(x_src, edge_index)
        else:
            relative = self.propagate(unshared_adjacency(edge_index), x=(x_src, x_dst),
                                      size=(x_src.size(0), x_dst.size(0)))
        interleaved = torch.stack([x_dst, relative], dim=-1).flatten(1)
        out = self.lin(interleaved)
        if self.norm is not None:
            out = self.norm(out)
        if self.act is not None:
            out = self.act(out)
        return out

    def message(self, x_i: Tensor, x_j: Tensor) -> Tensor:
        return x_j - x_i

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"groups={self.groups})")
