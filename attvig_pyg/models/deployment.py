"""A model ready for inference in one of three runtimes, with one call: eager PyTorch,
``torch.compile`` with inductor's freezing, or ONNX Runtime. Each folds BatchNorm first
(``reparameterize()``; timm's ``reparameterize_model`` for other models) and computes what the
eager model computes (tested to 1e-5 in float32). Which is fastest, model by model and at batch
16 and batch 1, is measured in docs/benchmarks.md; the recipe behind each is in
docs/deployment.md.
"""
import importlib.util
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch_geometric.nn.conv import MessagePassing

from attvig_pyg.models.fusion import fuse_batchnorm

__all__ = ["RUNTIMES", "inference_model"]

RUNTIMES = ("eager", "compiled", "onnxruntime")


def inference_model(model: nn.Module, runtime: str = "eager",
                    input_size: Optional[Sequence[int]] = None,
                    onnx_path: Optional[Union[str, Path]] = None) -> nn.Module:
    """``model`` for inference in ``runtime``: a module that takes images ``[B, C, H, W]`` and
    returns what ``model`` returns (``"compiled"`` and ``"onnxruntime"`` without gradients;
    call the eager one under ``torch.no_grad()``).

    Args:
        model: An image classifier or feature extractor (its BatchNorms are folded in place).
        runtime: ``"eager"`` (the folded model itself), ``"compiled"`` (``torch.compile`` with
            ``freezing``: weights pre-packed, constants folded; the first call compiles) or
            ``"onnxruntime"`` (exported with torch's dynamo exporter, run by ONNX Runtime's
            CPU provider at every graph optimisation, with torch's thread count).
        input_size: ``(C, H, W)`` of the images, for ``"onnxruntime"`` (the graph is exported
            for this size and any batch; other sizes are refused by name).
        onnx_path: Where ``"onnxruntime"`` writes the exported model (default: a temporary
            file, removed once the session holds it).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"Unknown runtime '{runtime}' (expected one of {', '.join(RUNTIMES)})")
    if runtime == "onnxruntime":  # (before the model is folded in place)
        OnnxRuntimeModel.check(model, input_size)
    model = _fold_batchnorm(model)
    if runtime == "eager":
        return model
    if runtime == "compiled":
        return _WithoutGradients(torch.compile(model, options={"freezing": True}))
    return OnnxRuntimeModel.export(model, tuple(input_size), onnx_path)


def _fold_batchnorm(model: nn.Module) -> nn.Module:
    """The model's own ``reparameterize()``; for a model holding PyG convs (a detector around
    this library's backbone), :func:`~attvig_pyg.models.fusion.fuse_batchnorm`, which timm's
    walker cannot replace there (it takes PyG's ``fuse`` flag for a method); timm's
    ``reparameterize_model`` for the others (it also merges their reparameterisable branches)."""
    model.eval()
    if hasattr(model, "reparameterize"):
        return model.reparameterize()
    if any(isinstance(module, MessagePassing) for module in model.modules()):
        return fuse_batchnorm(model)
    from timm.utils.model import reparameterize_model
    return reparameterize_model(model, inplace=True)


class _WithoutGradients(nn.Module):
    """Runs ``module`` under ``torch.no_grad()``: inductor freezes parameters only there."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: Tensor):
        with torch.no_grad():
            return self.module(x)


class OnnxRuntimeModel(nn.Module):
    """An ONNX Runtime session on the CPU behind a module's interface: torch tensors in and
    out, one input, one output."""

    def __init__(self, session, input_size: Sequence[int]):
        super().__init__()
        self.session = session
        self.input_size = tuple(input_size)
        self.input_name = session.get_inputs()[0].name

    @staticmethod
    def check(model: nn.Module, input_size: Optional[Sequence[int]]) -> None:
        """Raises unless ONNX Runtime is installed, ``model`` is on the CPU and ``input_size``
        is ``(channels, height, width)``."""
        if importlib.util.find_spec("onnxruntime") is None or \
                importlib.util.find_spec("onnxscript") is None:
            raise ImportError("runtime='onnxruntime' needs onnxruntime and onnxscript (pip "
                              "install 'attvig_pyg[deploy]')")
        if any(p.device.type != "cpu" for p in model.parameters()):
            raise ValueError("runtime='onnxruntime' runs on the CPU: move the model there first")
        if input_size is None or len(input_size) != 3:
            raise ValueError(f"runtime='onnxruntime' exports the model for one image size: "
                             f"pass input_size=(channels, height, width) (got {input_size})")

    @classmethod
    def export(cls, model: nn.Module, input_size: Sequence[int],
               onnx_path: Optional[Union[str, Path]] = None) -> "OnnxRuntimeModel":
        """Exports ``model`` (on the CPU) for images of ``input_size`` and any batch, and opens
        an ONNX Runtime session on it: every graph optimisation, as many threads as torch."""
        cls.check(model, input_size)
        import onnxruntime
        # Batch 2, not 1: the exporter would take a batch of 1 for a constant.
        example = torch.randn(2, *input_size)
        batch = torch.export.Dim("batch", min=1, max=4096)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(onnx_path) if onnx_path is not None else Path(folder) / "model.onnx"
            torch.onnx.export(model, (example,), str(path), dynamo=True,
                              dynamic_shapes=({0: batch},), verbose=False)
            options = onnxruntime.SessionOptions()
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = torch.get_num_threads()
            session = onnxruntime.InferenceSession(str(path), options,
                                                   providers=["CPUExecutionProvider"])
        return cls(session, input_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_size:
            raise ValueError(f"This ONNX Runtime model was exported for images [batch, "
                             f"{', '.join(map(str, self.input_size))}] (got {tuple(x.shape)})")
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out, = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(out).to(x.device)
