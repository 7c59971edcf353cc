"""AttentionViG under torch.compile: one graph, no break, the eager result."""
import pytest
import timm
import torch

import attvig_pyg.models  # noqa: F401  (registers the models with timm)

TINY = dict(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32], head_hidden_size=16, heads=4)


@pytest.mark.parametrize("graph", ["svga", "dagc", "knn"])
@pytest.mark.parametrize("training", [False, True])
def test_attentionvig_traces_without_graph_breaks(graph, training):
    model = timm.create_model("attentionvig_s", graph=graph, num_classes=5, **TINY)
    model.train(training)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("graph", ["svga", "dagc", "knn"])
def test_compiled_attentionvig_equals_eager(graph):
    torch.manual_seed(0)
    model = timm.create_model("attentionvig_s", graph=graph, num_classes=5, **TINY).eval()
    images = torch.randn(2, 3, 64, 96)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert (compiled(images) - model(images)).abs().max() < 1e-5
    model.train()
    compiled_train = torch.compile(model, fullgraph=True)
    torch.manual_seed(1)
    loss = compiled_train(images).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch.manual_seed(1)
    model(images).sum().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[name], p.grad, atol=1e-4, rtol=1e-4), name
