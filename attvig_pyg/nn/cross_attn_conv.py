import math
from typing import Optional, Tuple, Union, overload

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Parameter

from torch_geometric import EdgeIndex
from torch_geometric.nn.conv import MessagePassing
from torch_geometric.nn.dense.linear import Linear
from torch_geometric.typing import Adj, NoneType, OptTensor, PairTensor, SparseTensor
from torch_geometric.utils import is_sparse, is_torch_sparse_tensor, scatter, to_edge_index
from torch_geometric.utils.sparse import set_sparse_value

from attvig_pyg.adjacency import CyclicAdjacency
from attvig_pyg.nn.checks import check_adjacency, check_node_features, unshared_adjacency
from attvig_pyg.nn.functional import (FUSED_DTYPES, NORMALIZE_MODES, EdgeList,
                                      attention_weights, cyclic_attention,
                                      cyclic_edge_weights, gather_dot, l2_normalize,
                                      weighted_sum)


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

    The adjacency may take three forms, all computing the same result with the same parameters:

    - an :obj:`edge_index` :class:`torch.Tensor`: per-edge message passing (:meth:`edge_update`,
      :meth:`message` with :obj:`alpha`, :meth:`aggregate`), seen by explainers and hooks;
    - a sparse adjacency (:class:`torch_sparse.SparseTensor`, :class:`torch.sparse.Tensor`) or an
      :class:`~torch_geometric.EdgeIndex` sorted by target: fused, following PyG's own rule for
      :meth:`message_and_aggregate` (unless :obj:`conv.fuse = False` or an explainer is on): in
      eager mode with float32/float64 features, per-edge scores and CSR sparse-dense products
      (:mod:`attvig_pyg.nn.functional`) that keep no per-edge feature tensor, with far less
      memory;
    - a :class:`~attvig_pyg.adjacency.CyclicAdjacency` (what the SVGA and DAGC builders of
      :mod:`attvig_pyg.graphs` produce): scores and weighted sums as one shift of keys and values
      per neighbour offset, at a cost proportional to the number of candidate edges.

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
        edge_dim (int, optional): Edge feature dimensionality, an extension beyond the paper:
            edge features :math:`\mathbf{e}_{j,i}` are projected by :math:`\mathbf{E}` and added
            to the edge's key and value, :math:`\mathbf{K}\mathbf{y}_j + \mathbf{E}\mathbf{e}_{j,i}`
            and :math:`\mathbf{V}\mathbf{y}_j + \mathbf{E}\mathbf{e}_{j,i}`, as
            :class:`~torch_geometric.nn.conv.TransformerConv` does. Edge lists and sparse
            adjacencies take them (per-edge kernels); a
            :class:`~attvig_pyg.adjacency.CyclicAdjacency` does not. :obj:`None` is the paper's
            conv. (default: :obj:`None`)
        **kwargs (optional): Additional arguments of
            :class:`torch_geometric.nn.conv.MessagePassing`.

    Shapes:
        - **input:**
          node features :math:`(|\mathcal{V}|, F_{in})` or
          :math:`((|\mathcal{V_s}|, F_{s}), (|\mathcal{V_t}|, F_{t}))` if bipartite,
          edge indices :math:`(2, |\mathcal{E}|)` (or a sparse adjacency),
          edge features :math:`(|\mathcal{E}|, D)` *(optional)*
        - **output:** node features :math:`(|\mathcal{V}|, F_{out})` or
          :math:`(|\mathcal{V}_t|, F_{out})` if bipartite. With
          :obj:`return_attention_weights` also :math:`((2, |\mathcal{E}|), (|\mathcal{E}|, H))`,
          the weights before dropout.
    """

    SUPPORTS_FUSED_EDGE_INDEX = True  # propagate may call message_and_aggregate on an EdgeIndex

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
        edge_dim: Optional[int] = None,
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
        if not beta_init > 0 or not math.isfinite(beta_init):
            raise ValueError(f"'beta_init' must be a positive finite number (got {beta_init})")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.heads = heads
        self.normalize = normalize
        self.beta_init = beta_init
        self.dropout = dropout
        self.eps = eps
        self.edge_dim = edge_dim

        if isinstance(in_channels, int):
            in_channels = (in_channels, in_channels)
        self.lin_query = Linear(in_channels[1], out_channels, bias=bias)
        self.lin_key = Linear(in_channels[0], out_channels, bias=bias)
        self.lin_value = Linear(in_channels[0], out_channels, bias=bias)
        out_in = in_channels[1] + out_channels if in_channels[1] > 0 else -1
        self.lin_out = Linear(out_in, out_channels, bias=bias)
        self.log_beta = Parameter(torch.empty(()), requires_grad=train_beta)
        self.lin_edge = (Linear(edge_dim, out_channels, bias=False) if edge_dim is not None
                         else None)

        self.reset_parameters()

    def reset_parameters(self):
        super().reset_parameters()
        self.lin_query.reset_parameters()
        self.lin_key.reset_parameters()
        self.lin_value.reset_parameters()
        self.lin_out.reset_parameters()
        if self.lin_edge is not None:
            self.lin_edge.reset_parameters()
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

    @overload
    def forward(
        self,
        x: Union[Tensor, PairTensor],
        edge_index: Union[Adj, CyclicAdjacency],
        edge_attr: OptTensor = None,
        return_attention_weights: NoneType = None,
    ) -> Tensor:
        pass

    @overload
    def forward(  # noqa: F811
        self,
        x: Union[Tensor, PairTensor],
        edge_index: Union[Tensor, CyclicAdjacency],
        edge_attr: OptTensor = None,
        return_attention_weights: bool = None,
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        pass

    @overload
    def forward(  # noqa: F811
        self,
        x: Union[Tensor, PairTensor],
        edge_index: SparseTensor,
        edge_attr: OptTensor = None,
        return_attention_weights: bool = None,
    ) -> Tuple[Tensor, SparseTensor]:
        pass

    def forward(  # noqa: F811
        self,
        x: Union[Tensor, PairTensor],
        edge_index: Union[Adj, CyclicAdjacency],
        edge_attr: OptTensor = None,
        return_attention_weights: Optional[bool] = None,
    ):
        r"""Runs the forward pass of the module.

        Args:
            x (torch.Tensor or (torch.Tensor, torch.Tensor)): The input node features.
            edge_index (torch.Tensor, EdgeIndex, SparseTensor, torch.sparse.Tensor or
                CyclicAdjacency): The edges (:obj:`edge_index[0]` sends to
                :obj:`edge_index[1]`), the transposed sparse adjacency, or a cyclic adjacency
                (homogeneous graphs only). The node ids of a plain :obj:`edge_index` are
                checked on each call on the CPU (an :class:`IndexError` naming the id), on an
                accelerator only under :func:`torch_geometric.debug` (reading them would make
                the host wait for the device); an :class:`~torch_geometric.EdgeIndex` is
                checked by its :meth:`validate`, a :class:`CyclicAdjacency` when it is made.
            edge_attr (torch.Tensor, optional): Edge features :obj:`[num_edges, edge_dim]` (with
                :obj:`edge_dim`), in the order of the edges: the columns of an
                :obj:`edge_index`; for a sparse adjacency, the order of its stored entries
                (row-major over targets, as :func:`torch_geometric.utils.to_edge_index` lists
                them).
            return_attention_weights (bool, optional): If set to any value, also return
                :obj:`(edge_index, alpha)` with :obj:`alpha` of shape :obj:`[num_edges, heads]`
                (for sparse input: the adjacency carrying :obj:`alpha` as its values; for a
                cyclic adjacency: :meth:`CyclicAdjacency.to_edge_index` and the weights in its
                order).
        """
        x_src, x_dst = (x, x) if isinstance(x, Tensor) else x
        in_src, in_dst = ((self.in_channels, self.in_channels) if isinstance(
            self.in_channels, int) else self.in_channels)
        check_node_features(x_src, in_src, "source")
        check_node_features(x_dst, in_dst, "target")
        check_adjacency(edge_index, x_src, x_dst)
        edge_index = unshared_adjacency(edge_index)
        edge_emb = self._edge_embedding(edge_index, edge_attr)

        H, D = self.heads, self.out_channels // self.heads
        # With edge features, keys are per edge: normalised after the edge's term is added.
        query, key, value = self.project(x_src, x_dst, normalize_key=edge_emb is None)

        if isinstance(edge_index, CyclicAdjacency):
            aggregated, weights = cyclic_attention(query, key, value, edge_index, self.log_beta,
                                                   self.normalize, self.dropout, self.training)
        else:
            size = (x_src.size(0), x_dst.size(0))
            edges = _edge_list(edge_index, *size) if edge_emb is None and \
                self._fuses(edge_index, value) else None
            if edges is not None:
                alpha = attention_weights([gather_dot(query, key, edges).unsqueeze(-1)],
                                          [edges.target], [None], self.log_beta, self.normalize,
                                          size[1])[0].squeeze(-1)
            else:
                alpha = self.edge_updater(edge_index, query=query, key=key, edge_emb=edge_emb,
                                          size=size)
            dropped = F.dropout(alpha, p=self.dropout, training=self.training)
            aggregated = self.propagate(edge_index, value=value, alpha=dropped, edges=edges,
                                        edge_emb=edge_emb, num_targets=size[1], size=size)

        out = F.gelu(self.lin_out(torch.cat([x_dst, aggregated.view(-1, H * D)], dim=-1)))

        if return_attention_weights is None:
            return out
        if isinstance(edge_index, CyclicAdjacency):
            alpha = (cyclic_edge_weights(weights, edge_index) if weights else
                     out.new_empty(0, H))
            return out, (edge_index.to_edge_index(), alpha)
        if isinstance(edge_index, SparseTensor):
            return out, edge_index.set_value(alpha, layout="coo")
        if is_torch_sparse_tensor(edge_index):
            return out, (set_sparse_value(edge_index, alpha), alpha)
        return out, (edge_index, alpha)

    def project(self, x_src: Tensor, x_dst: Tensor,
                normalize_key: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
        r"""Queries of the targets and keys of the sources, each head scaled to unit length, and
        values of the sources, all :obj:`[num_nodes, heads, head_dim]`: the cosine similarity
        :math:`s_{i,j}^h` (Eq. 4) is the dot product of query :math:`i` and key :math:`j` in
        head :math:`h` (without edge features). ``normalize_key=False`` leaves the keys as
        projected."""
        H, D = self.heads, self.out_channels // self.heads
        query = l2_normalize(self.lin_query(x_dst).view(-1, H, D), self.eps)
        key = self.lin_key(x_src).view(-1, H, D)
        if normalize_key:
            key = l2_normalize(key, self.eps)
        return query, key, self.lin_value(x_src).view(-1, H, D)

    def _edge_embedding(self, edge_index, edge_attr: OptTensor) -> OptTensor:
        """``E e`` per edge ``[num_edges, heads, head_dim]``, or None without edge features;
        clear errors where features and conv or adjacency do not fit."""
        if edge_attr is None:
            if self.lin_edge is not None:
                raise ValueError(f"This conv was built with edge_dim={self.edge_dim}: pass "
                                 "edge_attr")
            return None
        if self.lin_edge is None:
            raise ValueError("edge_attr given, but the conv was built without edge features "
                             "(pass edge_dim to the constructor)")
        if isinstance(edge_index, CyclicAdjacency):
            raise ValueError("A CyclicAdjacency carries no edge features: pass its "
                             "to_edge_index() with edge_attr in that order")
        num_edges = (edge_index.nnz() if isinstance(edge_index, SparseTensor) else
                     edge_index._nnz() if is_torch_sparse_tensor(edge_index) else
                     edge_index.size(1))
        if not isinstance(edge_attr, Tensor) or not edge_attr.is_floating_point() or \
                tuple(edge_attr.shape) not in ((num_edges, self.edge_dim),) and not (
                    self.edge_dim == 1 and tuple(edge_attr.shape) == (num_edges,)):
            raise ValueError(f"Expected edge_attr of shape [{num_edges}, {self.edge_dim}] "
                             f"([num_edges, edge_dim], floating point; got "
                             f"{_describe(edge_attr)})")
        H, D = self.heads, self.out_channels // self.heads
        return self.lin_edge(edge_attr.view(num_edges, -1)).view(-1, H, D)

    def _fuses(self, edge_index: Adj, value: Tensor) -> bool:
        """Whether to use the fused kernels: where :meth:`propagate` calls
        :meth:`message_and_aggregate` by PyG's rule (:obj:`self.fuse`, no explainer, a sparse
        adjacency or an EdgeIndex sorted by target), in eager mode, for the dtypes torch's
        sparse kernels take, on the CPU (where they were measured to win: elsewhere the
        gather/scatter of PyG's convs, see docs/architecture.md)."""
        if not self.fuse or self.explain or torch.compiler.is_compiling() or \
                value.dtype not in FUSED_DTYPES or value.device.type != "cpu":
            return False
        return is_sparse(edge_index) or (isinstance(edge_index, EdgeIndex) and
                                         edge_index.is_sorted_by_col)

    def edge_update(self, query_i: Tensor, key_j: Tensor, edge_emb: OptTensor, index: Tensor,
                    dim_size: Optional[int]) -> Tensor:
        if edge_emb is not None:  # keys as projected: the edge's own key, normalised here
            key_j = l2_normalize(key_j + edge_emb, self.eps)
        similarity = torch.einsum("ehd,ehd->eh", query_i, key_j)
        return attention_weights([similarity.unsqueeze(-1)], [index], [None], self.log_beta,
                                 self.normalize, dim_size)[0].squeeze(-1)

    def message(self, value_j: Tensor, alpha: Tensor, edge_emb: OptTensor) -> Tensor:
        if edge_emb is not None:
            value_j = value_j + edge_emb
        return value_j * alpha.unsqueeze(-1)

    def message_and_aggregate(self, edge_index: Adj, value: Tensor, alpha: Tensor,
                              edges: Optional[EdgeList], edge_emb: OptTensor,
                              num_targets: int) -> Tensor:
        if edges is not None:
            return weighted_sum(alpha, value, edges)
        # Edge features, compiling, or a dtype the sparse kernels do not take: gather, scatter.
        source, target = _source_target(edge_index)
        messages = value.index_select(0, source)
        if edge_emb is not None:
            messages = messages + edge_emb
        return scatter(messages * alpha.unsqueeze(-1), target, 0, dim_size=num_targets,
                       reduce="sum")

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"heads={self.heads}, normalize='{self.normalize}')")


def _edge_list(edge_index: Adj, num_sources: int, num_targets: int) -> EdgeList:
    """The fused kernels' view of a sparse adjacency or an EdgeIndex sorted by target (an
    EdgeIndex gives its cached CSC pointer)."""
    pointer = (edge_index.get_indptr() if isinstance(edge_index, EdgeIndex) and
               edge_index.sparse_size(1) is not None else None)
    return EdgeList(*_source_target(edge_index), num_sources, num_targets, pointer)


def _source_target(edge_index: Adj) -> Tuple[Tensor, Tensor]:
    """Source and target ids of every edge, in the order PyG's propagate visits them."""
    if isinstance(edge_index, EdgeIndex):
        edge_index = edge_index.as_tensor()
    if isinstance(edge_index, Tensor) and not is_torch_sparse_tensor(edge_index):
        return edge_index[0].long(), edge_index[1].long()
    indices, _ = to_edge_index(edge_index)  # rows of the transposed adjacency are targets
    return indices[1], indices[0]


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__
