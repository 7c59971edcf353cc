"""Multiply-adds of a model as the paper counts them (fvcore's convention: one per
multiply-accumulate), with what torch's counter cannot see."""
import torch
from torch.utils.flop_counter import FlopCounterMode

from attvig_pyg.adjacency import CyclicAdjacency
from attvig_pyg.nn import CrossAttnConv
from attvig_pyg.nn.functional import scores_densely


def multiply_adds(model: torch.nn.Module, size) -> float:
    """Multiply-adds of one image of ``size`` (an int or (height, width); batch 1, eval mode):
    torch's FlopCounterMode total / 2, plus CrossAttnConv's aggregation over the parts of a
    CyclicAdjacency scored by shifts, elementwise products that FlopCounterMode (like fvcore, the
    paper's counter) does not see: 2 per channel and candidate, for the score and the weighted
    sum. (Parts scored as dense blocks are batched matrix products: FlopCounterMode counts them.)
    """
    height, width = (size, size) if isinstance(size, int) else size
    aggregation = []

    def count(conv, inputs, _):
        if isinstance(inputs[1], CyclicAdjacency):
            aggregation.append(2 * conv.out_channels * sum(
                part.num_candidates for part in inputs[1].parts if not scores_densely(part)))
    hooks = [module.register_forward_hook(count) for module in model.modules()
             if isinstance(module, CrossAttnConv)]
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.eval()(torch.randn(1, 3, height, width))
    finally:
        for hook in hooks:
            hook.remove()
    return counter.get_total_flops() / 2 + sum(aggregation)
