"""inference_model: the model in eager PyTorch, compiled and frozen, and in ONNX Runtime computes
what the eager model computes (float32, 1e-5), at a dynamic batch; what it refuses."""
import copy
import importlib.util

import pytest
import timm
import torch

import attvig_pyg.models  # noqa: F401  (registers the models with timm)
from attvig_pyg.models.deployment import RUNTIMES, inference_model

TINY = dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), head_hidden_size=32, num_classes=5)
needs_onnxruntime = pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("onnxruntime", "onnxscript")),
    reason="onnxruntime and onnxscript: extra 'deploy'")


def assert_runtime_equals_eager(model, runtime, size, batches=(1, 3)):
    """``model`` (eval) in ``runtime`` against itself eager, unfolded, at every batch."""
    model.eval()
    images = {batch: torch.randn(batch, 3, *size) for batch in batches}
    with torch.no_grad():
        expected = {batch: model(x) for batch, x in images.items()}
    # Dynamo stops compiling a frame after its recompile limit and runs it eagerly: start afresh,
    # and count the graphs, so that the compiled check cannot pass on the eager model.
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    deployed = inference_model(copy.deepcopy(model), runtime, (3, *size))
    for batch, x in images.items():
        difference = (deployed(x) - expected[batch]).abs().max().item()
        assert difference < 1e-5, (runtime, size, batch, difference)
    if runtime == "compiled":
        assert counters["stats"]["unique_graphs"] >= 1


@pytest.mark.parametrize("runtime", [
    "eager", pytest.param("onnxruntime", marks=needs_onnxruntime), "compiled"])
@pytest.mark.parametrize("graph", ["svga", pytest.param("dagc", marks=pytest.mark.slow)])
def test_every_runtime_computes_what_eager_computes(runtime, graph):
    torch.manual_seed(0)
    model = timm.create_model("attentionvig_s", graph=graph, **TINY)
    assert_runtime_equals_eager(model, runtime, (96, 128))


# The full models at 224 px (K divides every stage: the dense blocks) and 256 px (K = 9 does
# not divide 64: the shifted candidates along long cycles), at batches 1 and 2 (ONNX Runtime:
# one export for both; torch.compile: the second batch compiles a dynamic one).
PAPER_MODELS = [(name, size) for name in ("attentionvig_s", "attentionvig_m", "attentionvig_b")
                for size in (224, 256)]


@pytest.mark.slow
@needs_onnxruntime
@pytest.mark.parametrize("graph", ["svga", "dagc"])
@pytest.mark.parametrize("name, size", PAPER_MODELS)
def test_the_paper_models_in_onnxruntime(name, size, graph):
    torch.manual_seed(0)
    model = timm.create_model(name, graph=graph)
    assert_runtime_equals_eager(model, "onnxruntime", (size, size), batches=(1, 2))


@pytest.mark.slow
@pytest.mark.parametrize("graph", ["svga", "dagc"])
@pytest.mark.parametrize("name, size", [(name, size) for name, size in PAPER_MODELS
                                        if size == 224 or name == "attentionvig_s"])
def test_the_paper_models_compiled(name, size, graph):
    torch.manual_seed(0)
    model = timm.create_model(name, graph=graph)
    assert_runtime_equals_eager(model, "compiled", (size, size), batches=(1, 2))


def test_peers_fold_with_timms_reparameterisation():
    torch.manual_seed(0)
    model = timm.create_model("fastvit_t8", num_classes=5)
    assert_runtime_equals_eager(model, "eager", (64, 64))
    folded = inference_model(copy.deepcopy(model), "eager")

    def norms(module):
        return sum(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())
    assert norms(folded) < norms(model) / 2  # the reparameterisable branches merged


def test_unknown_runtime_is_named():
    with pytest.raises(ValueError, match="Unknown runtime 'tensorrt' .*eager, compiled, "
                                         "onnxruntime"):
        inference_model(timm.create_model("attentionvig_s", **TINY), "tensorrt")
    assert RUNTIMES == ("eager", "compiled", "onnxruntime")


@needs_onnxruntime
def test_onnxruntime_needs_a_size_and_refuses_others(tmp_path):
    model = timm.create_model("attentionvig_s", **TINY)
    with pytest.raises(ValueError, match="input_size=.channels, height, width."):
        inference_model(copy.deepcopy(model), "onnxruntime")
    with pytest.raises(ValueError, match="runs on the CPU"):
        inference_model(copy.deepcopy(model).to("meta"), "onnxruntime", (3, 64, 64))
    path = tmp_path / "model.onnx"
    deployed = inference_model(model, "onnxruntime", (3, 64, 96), onnx_path=path)
    assert path.is_file()
    assert deployed(torch.randn(2, 3, 64, 96)).shape == (2, 5)
    with pytest.raises(ValueError, match=r"exported for images \[batch, 3, 64, 96\] "
                                         r"\(got \(2, 3, 96, 64\)\)"):
        deployed(torch.randn(2, 3, 96, 64))

