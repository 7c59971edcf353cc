"""Activation memory: a cheap part of a block (1x1 and depthwise convs, BatchNorm, GELU) that
keeps only its input for backward and recomputes its intermediates there.

Unlike ``torch.utils.checkpoint`` the recomputation leaves BatchNorm's running statistics as
the forward pass left them (they are updated once per step, as without recomputation), and the
gradients are the plain path's bit for bit: backward runs the same operations on the same
input. Under ``torch.compile`` the plain path runs: the compiler decides itself which
activations to recompute.
"""
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["recompute_in_backward"]


def recompute_in_backward(function: Callable[[Tensor], Tensor], x: Tensor,
                          owner: nn.Module) -> Tensor:
    """``function(x)``, keeping only ``x`` for backward, where ``function`` runs again.
    ``owner`` holds every parameter and buffer ``function`` uses. Without gradients, or while
    :func:`torch.compile` traces, it is ``function(x)``."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return function(x)
    return _Recompute.apply(function, owner, x, *owner.parameters())


class _Recompute(torch.autograd.Function):

    @staticmethod
    def forward(ctx, function, owner, x, *parameters):
        ctx.function, ctx.owner = function, owner
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device),
                        torch.get_autocast_dtype(device))
        ctx.save_for_backward(x)
        return function(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, = ctx.saved_tensors
        parameters = list(ctx.owner.parameters())
        buffers = [buffer.clone() for buffer in ctx.owner.buffers()]
        device, enabled, dtype = ctx.autocast
        x = x.detach().requires_grad_(ctx.needs_input_grad[2])
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            out = ctx.function(x)
        inputs = [x, *parameters]
        wanted = [t for t, needed in zip(inputs, ctx.needs_input_grad[2:])
                  if needed and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        with torch.no_grad():  # BatchNorm's statistics as the forward pass left them
            for buffer, kept in zip(ctx.owner.buffers(), buffers):
                buffer.copy_(kept)
        return (None, None, *[next(grads) if needed and t.requires_grad else None
                              for t, needed in zip(inputs, ctx.needs_input_grad[2:])])
