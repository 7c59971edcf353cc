"""The deployment path: torch.export with a dynamic batch and dynamic height and width, ONNX
(torch's dynamo exporter) run in onnxruntime, and the model's eager use afterwards."""
import pytest
import timm
import torch
from torch.export import Dim

import attvig_pyg.models  # noqa: F401  (registers the models with timm)

TINY = dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), head_hidden_size=32, num_classes=5)
# Batch, height and width dynamic; sizes multiples of 32 from 96 px (kNN's k = 9 neighbours
# need 3x3 nodes at stride 32).
DYNAMIC = {"x": {0: Dim("batch", min=1, max=64), 2: 32 * Dim("h", min=3, max=32),
                 3: 32 * Dim("w", min=3, max=32)}}
EXAMPLE = (2, 3, 128, 128)
BATCHES = [(1, 3, 128, 128), (3, 3, 128, 128), (5, 3, 128, 128)]
SIZES = [(2, 3, 96, 96), (2, 3, 128, 96), (2, 3, 160, 224)]


def model(graph: str):
    torch.manual_seed(0)
    return timm.create_model("attentionvig_s", graph=graph, **TINY).eval()


@pytest.mark.parametrize("graph", ["svga", pytest.param("dagc", marks=pytest.mark.slow),
                                   pytest.param("knn", marks=pytest.mark.slow)])
def test_the_exported_program_equals_eager_at_every_batch_and_size(graph):
    network = model(graph)
    program = torch.export.export(network, (torch.randn(EXAMPLE),), dynamic_shapes=DYNAMIC)
    exported = program.module()
    with torch.no_grad():
        for shape in BATCHES + SIZES:
            x = torch.randn(shape)
            assert (exported(x) - network(x)).abs().max() < 1e-5, shape
        # Nothing the trace made is left behind for eager calls: the traced size and another.
        for shape in ((2, 3, 128, 128), (1, 3, 64, 96)):
            assert torch.isfinite(network(torch.randn(shape))).all()


def test_eager_training_after_export_works():
    network = model("svga")
    torch.export.export(network, (torch.randn(EXAMPLE),))
    network.train()(torch.randn(EXAMPLE)).sum().backward()
    assert network.stem[0][0].weight.grad is not None


@pytest.mark.parametrize("graph", ["svga", pytest.param("dagc", marks=pytest.mark.slow),
                                   pytest.param("knn", marks=pytest.mark.slow)])
def test_onnx_in_onnxruntime_equals_eager(graph, tmp_path):
    pytest.importorskip("onnxscript", reason="the ONNX exporter needs onnxscript (extra 'deploy')")
    onnxruntime = pytest.importorskip("onnxruntime", reason="extra 'deploy'")
    network = model(graph).reparameterize()  # how one deploys: BatchNorm folded, then exported
    path = tmp_path / "attentionvig.onnx"
    torch.onnx.export(network, (torch.randn(EXAMPLE),), str(path), dynamo=True,
                      dynamic_shapes=DYNAMIC, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    with torch.no_grad():
        for shape in (BATCHES + SIZES)[1:5]:
            x = torch.randn(shape)
            out, = session.run(None, {name: x.numpy()})
            assert abs(torch.from_numpy(out) - network(x)).max() < 1e-4, shape


def test_the_torchscript_tracer_is_refused_by_name():
    with pytest.raises(RuntimeError, match="dynamo=True"):
        torch.jit.trace(model("svga"), torch.randn(1, 3, 64, 64))
