import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Parameter

from torch_geometric.nn.conv import MessagePassing
from torch_geometric.nn.dense.linear import Linear
from torch_geometric.typing import Adj, OptTensor, PairTensor, SparseTensor
from torch_geometric.utils import is_torch_sparse_tensor, scatter, softmax, to_edge_index
from torch_geometric.utils.sparse import set_sparse_value

from attvig_pyg.adjacency import BlockAdjacency
from attvig_pyg.nn.checks import check_adjacency, check_block_adjacency, check_node_features
from attvig_pyg.nn.functional import FUSED_DTYPES, EdgeList, gather_dot, weighted_sum

NORMALIZE_MODES = ("none", "softmax", "mean")


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    r"""Like :func:`torch.nn.functional.normalize` over the last dimension, but with the norm and the
    division in at least float32 whatever the input dtype (so that half precision keeps zero vectors
    finite), cast back to the input dtype."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    norm = torch.linalg.vector_norm(wide, dim=-1, keepdim=True)
    return (wide / norm.clamp_min(eps)).to(x.dtype)


class CrossAttnConv(MessagePassing):
    r"""The cross-attention neighbour aggregation from the `"AttentionViG: Cross-Attention-Based
    Dynamic Neighbor Aggregation in Vision GNNs" <https://arxiv.org/abs/2509.25570>`_ paper
    (Eq. 2-7).

    The query comes from the receiving node :math:`i`, keys and values from its neighbours
    :math:`j \in \mathcal{N}(i)`; per head :math:`h`,

    .. math::
        s_{i,j}^{h} = \frac{(\mathbf{Q}\mathbf{x}_i)^{h\top} (\mathbf{K}\mathbf{y}_j)^{h}}
        {\|(\mathbf{Q}\mathbf{x}_i)^{h}\|_2 \, \|(\mathbf{K}\mathbf{y}_j)^{h}\|_2},
        \qquad
        \alpha_{i,j}^{h} = \exp\left(-\beta \left(1 - s_{i,j}^{h}\right)\right),

    and the output is

    .. math::
        \mathbf{x}^{\prime}_i = \mathrm{GELU}\left(\mathbf{W}\left[\mathbf{x}_i,\
        \Big\Vert_{h=1}^{H} \sum_{j \in \mathcal{N}(i)} \alpha_{i,j}^{h}
        (\mathbf{V}\mathbf{y}_j)^{h}\right]\right),

    where :math:`\mathbf{y}_j` are source features (equal to :math:`\mathbf{x}_j` on a homogeneous
    graph), :math:`[\cdot, \cdot]` is concatenation and :math:`\beta = \exp(\log\beta)` is one
    learnable scalar per layer, so :math:`\alpha \in [e^{-2\beta}, 1]`. The weights do not compete
    (no softmax) unless :obj:`normalize` asks for it. The conv uses the edges exactly as given: it
    adds no self-loops and removes none.

    Besides the usual adjacency forms, :meth:`forward` accepts a
    :class:`~attvig_pyg.adjacency.BlockAdjacency` (a graph made of dense blocks, as the SVGA and
    DAGC builders of :mod:`attvig_pyg.graphs` produce): the same computation with the same
    parameters, as batched matrix products per block instead of per-edge gathers and scatters.

    In eager mode, with float32/float64 features and nobody observing the message passing
    (no explainer, no message/aggregate hooks), edge lists and sparse adjacencies take a fused
    path (:mod:`attvig_pyg.nn.functional`: per-edge scores, then CSR sparse-dense products) that
    computes the same result as :meth:`propagate` with far less memory; otherwise
    :meth:`propagate` runs as usual, with :obj:`alpha` passed to :meth:`message`.

    Args:
        in_channels (int or tuple): Size of each input sample, or :obj:`-1` to derive it from the
            first input. A tuple gives the sizes of source and target features.
        out_channels (int): Size of each output sample, and of the query, key and value
            projections.
        heads (int, optional): Number of attention heads; the projections are split head-major,
            head :math:`h` owning channels :math:`hD \ldots (h+1)D - 1` with
            :math:`D` = :obj:`out_channels / heads`. Give :obj:`heads` or :obj:`head_dim`, not both.
            (default: :obj:`1`)
        head_dim (int, optional): Channels per head instead of a number of heads.
            (default: :obj:`None`)
        normalize (str, optional): :obj:`"none"` (the paper's exponential affinity),
            :obj:`"softmax"` (:math:`\alpha` divided by its sum over the node's incoming edges,
            which equals a softmax of :math:`\beta s`) or :obj:`"mean"` (:math:`\alpha` divided by
            the node's in-degree). (default: :obj:`"none"`)
        beta_init (float, optional): Initial value of :math:`\beta`, stored as its logarithm.
            (default: :obj:`1.0`)
        train_beta (bool, optional): If :obj:`False`, :math:`\beta` stays at its initial value;
            :meth:`freeze_beta` does the same after construction. (default: :obj:`True`)
        dropout (float, optional): Dropout probability of the attention weights in training.
            (default: :obj:`0.0`)
        bias (bool, optional): If :obj:`False`, no projection learns an additive bias.
            (default: :obj:`True`)
        eps (float, optional): Lower bound on the norm of a query or key head, so that zero vectors
            give a similarity of zero instead of NaN (as in :func:`torch.nn.functional.normalize`).
            (default: :obj:`1e-12`)
        **kwargs (optional): Additional arguments of
            :class:`torch_geometric.nn.conv.MessagePassing`.

    Shapes:
        - **input:**
          node features :math:`(|\mathcal{V}|, F_{in})` or
          :math:`((|\mathcal{V_s}|, F_{s}), (|\mathcal{V_t}|, F_{t}))` if bipartite,
          edge indices :math:`(2, |\mathcal{E}|)` (or a sparse adjacency)
        - **output:** node features :math:`(|\mathcal{V}|, F_{out})` or
          :math:`(|\mathcal{V}_t|, F_{out})` if bipartite. With
          :obj:`return_attention_weights` also :math:`((2, |\mathcal{E}|), (|\mathcal{E}|, H))`,
          the weights before dropout.
    """

    def __init__(
        self,
        in_channels: Union[int, Tuple[int, int]],
        out_channels: int,
        heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        normalize: str = "none",
        beta_init: float = 1.0,
        train_beta: bool = True,
        dropout: float = 0.0,
        bias: bool = True,
        eps: float = 1e-12,
        **kwargs,
    ):
        kwargs.setdefault("aggr", "add")
        super().__init__(node_dim=0, **kwargs)

        if heads is not None and head_dim is not None:
            raise ValueError("Give either 'heads' or 'head_dim', not both "
                             f"(got heads={heads}, head_dim={head_dim})")
        if head_dim is not None:
            if head_dim < 1 or out_channels % head_dim != 0:
                raise ValueError(f"'out_channels' ({out_channels}) must be a positive multiple of "
                                 f"'head_dim' ({head_dim})")
            heads = out_channels // head_dim
        heads = 1 if heads is None else heads
        if heads < 1 or out_channels % heads != 0:
            raise ValueError(f"'out_channels' ({out_channels}) must be divisible by 'heads' "
                             f"({heads})")
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"Unknown 'normalize' mode '{normalize}' (expected one of "
                             f"{', '.join(NORMALIZE_MODES)})")
        if beta_init <= 0:
            raise ValueError(f"'beta_init' must be positive (got {beta_init})")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.heads = heads
        self.normalize = normalize
        self.beta_init = beta_init
        self.dropout = dropout
        self.eps = eps

        if isinstance(in_channels, int):
            in_channels = (in_channels, in_channels)
        self.lin_query = Linear(in_channels[1], out_channels, bias=bias)
        self.lin_key = Linear(in_channels[0], out_channels, bias=bias)
        self.lin_value = Linear(in_channels[0], out_channels, bias=bias)
        out_in = in_channels[1] + out_channels if in_channels[1] > 0 else -1
        self.lin_out = Linear(out_in, out_channels, bias=bias)
        self.log_beta = Parameter(torch.empty(()), requires_grad=train_beta)

        self.reset_parameters()

    def reset_parameters(self):
        super().reset_parameters()
        self.lin_query.reset_parameters()
        self.lin_key.reset_parameters()
        self.lin_value.reset_parameters()
        self.lin_out.reset_parameters()
        with torch.no_grad():
            self.log_beta.fill_(math.log(self.beta_init))

    @property
    def beta(self) -> Tensor:
        r"""The current :math:`\beta = \exp(\log\beta)`."""
        return self.log_beta.exp()

    def freeze_beta(self) -> "CrossAttnConv":
        r"""Stops :math:`\beta` from learning, as the paper does for downstream fine-tuning."""
        self.log_beta.requires_grad_(False)
        return self

    def forward(
        self,
        x: Union[Tensor, PairTensor],
        edge_index: Adj,
        return_attention_weights: Optional[bool] = None,
    ) -> Union[Tensor, Tuple[Tensor, Tuple[Adj, Tensor]]]:
        r"""Runs the forward pass of the module.

        Args:
            x (torch.Tensor or (torch.Tensor, torch.Tensor)): The input node features.
            edge_index (torch.Tensor, SparseTensor, torch.sparse.Tensor or BlockAdjacency): The
                edges (:obj:`edge_index[0]` sends to :obj:`edge_index[1]`), the transposed sparse
                adjacency, or dense blocks (homogeneous graphs only).
            return_attention_weights (bool, optional): If set to any value, also return
                :obj:`(edge_index, alpha)` with :obj:`alpha` of shape :obj:`[num_edges, heads]`
                (for sparse input: the adjacency carrying :obj:`alpha` as its values; for blocks:
                :meth:`BlockAdjacency.to_edge_index` and the weights in its order).
        """
        if isinstance(x, Tensor):
            x = (x, x)
        x_src, x_dst = x
        in_src, in_dst = ((self.in_channels, self.in_channels) if isinstance(
            self.in_channels, int) else self.in_channels)
        check_node_features(x_src, in_src, "source")
        check_node_features(x_dst, in_dst, "target")
        if isinstance(edge_index, BlockAdjacency):
            check_block_adjacency(edge_index, x_src, x_dst)
        elif not torch.compiler.is_compiling():
            check_adjacency(edge_index, x_src.size(0), x_dst.size(0))

        H, D = self.heads, self.out_channels // self.heads
        query = l2_normalize(self.lin_query(x_dst).view(-1, H, D), self.eps)
        key = l2_normalize(self.lin_key(x_src).view(-1, H, D), self.eps)
        value = self.lin_value(x_src).view(-1, H, D)
        size = (x_src.size(0), x_dst.size(0))

        if isinstance(edge_index, BlockAdjacency):
            aggregated, block_alphas = self._aggregate_blocks(edge_index, query, key, value)
        elif self._may_fuse(value):
            edges = EdgeList(*_source_target(edge_index), *size)
            alpha = self.edge_weights(gather_dot(query, key, edges), edges.target, None, size[1])
            dropped = F.dropout(alpha, p=self.dropout, training=self.training)
            aggregated = weighted_sum(dropped, value, edges)
        else:
            alpha = self.edge_updater(edge_index, query=query, key=key, size=size)
            dropped = F.dropout(alpha, p=self.dropout, training=self.training)
            aggregated = self.propagate(edge_index, value=value, alpha=dropped, size=size)

        out = self.lin_out(torch.cat([x_dst, aggregated.view(-1, H * D)], dim=-1))
        out = F.gelu(out)

        if return_attention_weights is not None:
            if isinstance(edge_index, BlockAdjacency):
                per_edge = [alpha.permute(0, 2, 3, 1)[mask.expand(index.size(0), -1, -1)]
                            for (index, mask), alpha in zip(edge_index.parts, block_alphas)]
                return out, (edge_index.to_edge_index(),
                             torch.cat([out.new_empty(0, H)] + per_edge))
            if isinstance(edge_index, SparseTensor):
                return out, edge_index.set_value(alpha, layout="coo")
            if is_torch_sparse_tensor(edge_index):
                return out, (set_sparse_value(edge_index, alpha), alpha)
            return out, (edge_index, alpha)
        return out

    def affinity(self, similarity: Tensor) -> Tensor:
        r"""The exponential affinity :math:`\exp(-\beta (1 - s))` of Eq. 5."""
        return torch.exp(self.log_beta.exp() * (similarity - 1.0))

    def edge_update(self, query_i: Tensor, key_j: Tensor, index: Tensor, ptr: OptTensor,
                    dim_size: Optional[int]) -> Tensor:
        return self.edge_weights(torch.einsum("ehd,ehd->eh", query_i, key_j), index, ptr,
                                 dim_size)

    def edge_weights(self, similarity: Tensor, index: Tensor, ptr: OptTensor,
                     dim_size: Optional[int]) -> Tensor:
        """Eq. 5 and the optional normalisation over each target's incoming edges: weights
        ``[E, H]`` from cosine similarities ``[E, H]`` of edges into targets ``index``."""
        if self.normalize == "softmax":  # max-subtracting, so large beta cannot underflow
            return softmax(self.log_beta.exp() * similarity, index, ptr, dim_size)
        alpha = self.affinity(similarity)
        if self.normalize == "mean":
            ones = torch.ones_like(index, dtype=alpha.dtype)
            degree = scatter(ones, index, 0, dim_size, reduce="sum")
            alpha = alpha / degree[index].unsqueeze(-1)
        return alpha

    def message(self, value_j: Tensor, alpha: Tensor) -> Tensor:
        return value_j * alpha.unsqueeze(-1)

    def _may_fuse(self, value: Tensor) -> bool:
        """Whether the fused edge-list path may stand in for :meth:`propagate`: only where nobody
        could tell the difference (eager mode, no explainer, no hooks) and the sparse kernels
        support the dtype."""
        hooks = (self._propagate_forward_pre_hooks, self._propagate_forward_hooks,
                 self._message_forward_pre_hooks, self._message_forward_hooks,
                 self._aggregate_forward_pre_hooks, self._aggregate_forward_hooks,
                 self._edge_update_forward_pre_hooks, self._edge_update_forward_hooks)
        return (value.dtype in FUSED_DTYPES and not torch.compiler.is_compiling()
                and not self.explain and not any(hooks))

    def _aggregate_blocks(self, adj: BlockAdjacency, query: Tensor, key: Tensor,
                          value: Tensor) -> Tuple[Tensor, List[Tensor]]:
        """Eq. 4-7 on dense blocks: per block, scores, weights and the weighted sum of values are
        batched matrix products; masked pairs get weight zero. Returns the aggregated messages
        ``[N, H, D]`` and every part's weights ``[blocks, H, S, S]`` before dropout."""
        def gather(x: Tensor, index: Tensor) -> Tensor:  # [N, H, D] -> [blocks, S, H, D]
            return x.index_select(0, index.flatten()).view(*index.shape, *x.shape[1:])

        alphas = []
        for index, mask in adj.parts:
            similarity = torch.einsum("bihd,bjhd->bhij", gather(query, index), gather(key, index))
            alphas.append(self.affinity(similarity) * mask.unsqueeze(-3))
        if self.normalize != "none":
            # Softmax and mean divide by a sum over all incoming edges, which spans parts.
            total = query.new_zeros(adj.num_nodes, self.heads)
            for (index, mask), alpha in zip(adj.parts, alphas):
                weight = (alpha if self.normalize == "softmax" else
                          mask.unsqueeze(-3).expand_as(alpha).to(alpha))
                total.index_add_(0, index.flatten(), weight.sum(-1).transpose(1, 2).flatten(0, 1))
            total = total.clamp_min(torch.finfo(total.dtype).tiny)  # nodes without edges
            alphas = [alpha / gather(total, index).transpose(1, 2).unsqueeze(-1)
                      for (index, _), alpha in zip(adj.parts, alphas)]
        out = value.new_zeros(adj.num_nodes, *value.shape[1:])
        for (index, _), alpha in zip(adj.parts, alphas):
            dropped = F.dropout(alpha, p=self.dropout, training=self.training)
            messages = torch.einsum("bhij,bjhd->bihd", dropped, gather(value, index))
            out.index_add_(0, index.flatten(), messages.flatten(0, 1))
        return out, alphas

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"heads={self.heads}, normalize='{self.normalize}')")


def _source_target(edge_index: Adj) -> Tuple[Tensor, Tensor]:
    """Source and target ids of every edge, in the order PyG's propagate visits them."""
    if isinstance(edge_index, Tensor) and not is_torch_sparse_tensor(edge_index):
        return edge_index[0].long(), edge_index[1].long()
    indices, _ = to_edge_index(edge_index)  # rows of the transposed adjacency are targets
    return indices[1], indices[0]
