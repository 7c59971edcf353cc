"""What a GPU user meets, measured on the CPU: the ops that force a device-to-host copy (each
stalls a GPU's launch queue) and runs with FakeTensors on device ``"cuda"`` (no GPU needed), where
a data-dependent op cannot run and every tensor's device is tracked."""
from typing import Dict, List

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten
# Ops whose result the host must wait for: a value read (.item(), int(t), bool(t)) or an output
# whose size depends on the data.
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.equal.default,
            aten.is_nonzero.default, aten.bincount.default, aten.masked_select.default,
            aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
            aten.repeat_interleave.Tensor, aten.allclose.default}


def _has_bool_index(args) -> bool:
    return any(isinstance(t, Tensor) and t.dtype == torch.bool for t in tree_leaves(args[1:]))


class SyncCounter(TorchDispatchMode):
    """Counts, by op name, the ops that force a device-to-host copy; boolean-mask indexing
    (``x[mask]``, ``x[mask] = y``) included."""

    def __init__(self):
        super().__init__()
        self.ops: Dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS or (func in (aten.index.Tensor, aten.index_put.default,
                                         aten.index_put_.default) and _has_bool_index(args)):
            self.ops[str(func)] = self.ops.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


class CpuRecorder(TorchDispatchMode):
    """Records the ops that produce a tensor on the CPU (run inside a FakeTensorMode on cuda:
    what a forward creates on the host and copies over, or computes there)."""

    def __init__(self):
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, Tensor) and t.device.type == "cpu" for t in tree_leaves(out)):
            self.ops.append(str(func))
        return out


def fake_cuda_call(module: torch.nn.Module, *inputs):
    """``module(*inputs)`` with every parameter, buffer and input tensor a FakeTensor on
    ``"cuda"`` (:func:`torch.func.functional_call`; forward only: autograd's engine needs a real
    CUDA context); returns the output and the ops that produced a CPU tensor on the way."""
    mode = FakeTensorMode()
    state = dict(module.named_parameters())
    state.update(module.named_buffers())
    # (Real tensors are detached and made fake outside the mode, which takes fake ones only.)
    state = {name: (mode.from_tensor(t.detach()), t.requires_grad) for name, t in state.items()}
    inputs = [mode.from_tensor(t.detach()) if isinstance(t, Tensor) else t for t in inputs]
    recorder = CpuRecorder()
    with mode:
        state = {name: fake.to("cuda").requires_grad_(grad)
                 for name, (fake, grad) in state.items()}
        inputs = tuple(t.to("cuda") if isinstance(t, Tensor) else t for t in inputs)
        with recorder:
            out = torch.func.functional_call(module, state, inputs)
    return out, recorder.ops
