"""Independent formulations used as test oracles: per-node loops written straight from the
paper's equations, sharing nothing with the library but the parameters they read."""
import math

import torch


def _gelu(t):
    return 0.5 * t * (1.0 + torch.erf(t / math.sqrt(2.0)))


def _incoming(edge_index, node):
    """Source ids of the edges that end at ``node``, with multiplicity, in edge order."""
    return [int(j) for j, i in edge_index.t().tolist() if i == node]


def _incoming_edges(edge_index, node):
    """(edge position, source id) of the edges that end at ``node``, in edge order."""
    return [(e, int(j)) for e, (j, i) in enumerate(edge_index.t().tolist()) if i == node]


def cross_attention(conv, x_src, x_dst, edge_index, edge_attr=None):
    """Eq. 2-7 of the AttentionViG paper, one target node at a time; with ``edge_attr``, the
    edge's projected features added to its key and value (TransformerConv's rule)."""
    H = conv.heads
    D = conv.out_channels // H
    beta = math.exp(conv.log_beta.item())
    lin = {name: getattr(conv, f"lin_{name}") for name in ("query", "key", "value", "out")}

    def project(name, vec):
        layer = lin[name]
        out = layer.weight @ vec
        return out + layer.bias if layer.bias is not None else out

    outputs = []
    for i in range(x_dst.size(0)):
        q = project("query", x_dst[i])
        neighbours = _incoming_edges(edge_index, i)
        weights = torch.zeros(len(neighbours), H, dtype=x_dst.dtype)
        values = torch.zeros(len(neighbours), H, D, dtype=x_dst.dtype)
        for n, (e, j) in enumerate(neighbours):
            k = project("key", x_src[j])
            v = project("value", x_src[j])
            if edge_attr is not None:
                k = k + conv.lin_edge.weight @ edge_attr[e]
                v = v + conv.lin_edge.weight @ edge_attr[e]
            values[n] = v.view(H, D)
            for h in range(H):
                qh, kh = q[h * D:(h + 1) * D], k[h * D:(h + 1) * D]
                s = torch.dot(qh, kh) / (qh.norm() * kh.norm())      # Eq. 4
                weights[n, h] = torch.exp(-beta * (1 - s))            # Eq. 5
        if conv.normalize == "softmax" and neighbours:
            weights = weights / weights.sum(dim=0, keepdim=True)
        elif conv.normalize == "mean" and neighbours:
            weights = weights / len(neighbours)
        message = (weights.unsqueeze(-1) * values).sum(dim=0).reshape(-1)   # Eq. 6-7
        outputs.append(_gelu(project("out", torch.cat([x_dst[i], message]))))
    return torch.stack(outputs)


def max_relative(conv, x_src, x_dst, edge_index):
    """Eq. 1 with Vision GNN's grouped 1x1 map over channel-interleaved [x_i, r_i]."""
    weight = conv.lin.weight                        # [out, 2C / groups]
    bias = conv.lin.bias
    groups = conv.groups
    out_per_group = conv.out_channels // groups
    in_per_group = weight.size(1)
    outputs = []
    for i in range(x_dst.size(0)):
        relative = torch.zeros_like(x_dst[i])
        neighbours = _incoming(edge_index, i)
        if neighbours:
            relative = torch.stack([x_src[j] - x_dst[i] for j in neighbours]).max(dim=0).values
        features = []
        for c in range(x_dst.size(1)):
            features += [x_dst[i, c], relative[c]]
        features = torch.stack(features)
        out = torch.cat([
            weight[g * out_per_group:(g + 1) * out_per_group]
            @ features[g * in_per_group:(g + 1) * in_per_group] for g in range(groups)])
        outputs.append(out + bias if bias is not None else out)
    return torch.stack(outputs)
