"""Activation recomputation: the same gradients and BatchNorm statistics as the plain path, bit
for bit, with fewer activations kept for backward."""
import copy

import pytest
import timm
import torch

import attvig_pyg.models  # noqa: F401  (registers the models with timm)
from attvig_pyg.models.attentionvig import InvertedResidual
from attvig_pyg.models.recompute import recompute_in_backward


def saved_bytes(function, model) -> int:
    """Bytes of the activations (not ``model``'s parameters) autograd keeps for backward while
    ``function`` runs."""
    total = 0
    parameters = {p.data_ptr() for p in model.parameters()}

    def pack(tensor):
        nonlocal total
        if tensor.data_ptr() not in parameters:
            total += tensor.numel() * tensor.element_size()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return total


def train_step(model, images):
    torch.manual_seed(1)  # the same drop-path draws on both paths
    model.train()
    loss = model(images).square().mean()
    loss.backward()
    return loss


@pytest.mark.parametrize("aggregator", ["cross_attn", "max_relative"])
def test_recomputation_gives_the_plain_gradients_and_statistics_bit_for_bit(aggregator):
    torch.manual_seed(0)
    recomputing = timm.create_model("attentionvig_s", num_classes=10, aggregator=aggregator,
                                    drop_path_rate=0.1)
    plain = copy.deepcopy(recomputing).set_activation_recompute(False)
    images = torch.randn(2, 3, 64, 64)
    assert torch.equal(train_step(recomputing, images), train_step(plain, images))
    for (name, a), b in zip(recomputing.named_parameters(), plain.parameters()):
        assert torch.equal(a.grad, b.grad), name
    # BatchNorm's running statistics moved once, not once more in the recomputation.
    for (name, a), b in zip(recomputing.named_buffers(), plain.buffers()):
        assert torch.equal(a, b), name


def test_recomputation_keeps_fewer_activations():
    torch.manual_seed(0)
    model = timm.create_model("attentionvig_s", num_classes=10).train()
    images = torch.randn(2, 3, 96, 96)
    recomputing = saved_bytes(lambda: model(images).sum(), model)
    model.set_activation_recompute(False)
    plain = saved_bytes(lambda: model(images).sum(), model)
    assert recomputing < 0.35 * plain, (recomputing, plain)


@pytest.mark.parametrize("mode, most", [("branch", 2.5), ("activations", 12), (None, 30)])
def test_what_each_recompute_mode_keeps(mode, most):
    """In units of the block's input: "branch" keeps the input and the branch's output (for the
    layer scale); "activations" also the first conv's output and the last conv's input (4x
    wide each) and the last BatchNorm's input; None every intermediate (about 28)."""
    block = InvertedResidual(8).train()
    block.recompute = mode
    x = torch.randn(2, 8, 5, 5)
    kept = saved_bytes(lambda: block(x).sum(), block) / (x.numel() * x.element_size())
    assert most - 3 < kept < most, kept


def test_recompute_in_backward_under_autocast_matches_the_plain_path():
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = recompute_in_backward(layers, x, layers)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    grads = [x.grad.clone(), *[p.grad.clone() for p in layers.parameters()]]
    x.grad = None
    layers.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layers(x).float().sum().backward()
    for a, b in zip(grads, [x.grad, *[p.grad for p in layers.parameters()]]):
        assert torch.equal(a, b)


def test_without_gradients_nothing_is_wrapped():
    layers = torch.nn.Linear(3, 3)
    with torch.no_grad():
        out = recompute_in_backward(layers, torch.randn(2, 3), layers)
    assert out.grad_fn is None


@pytest.mark.parametrize("aggregator, most", [("cross_attn", 2.5), ("max_relative", 6.5)])
def test_a_recomputing_grapher_keeps_only_the_aggregations_input(aggregator, most):
    from attvig_pyg.models.attentionvig import GraphMixer
    mixer = GraphMixer(16, aggregator=aggregator).train()
    x = torch.randn(2, 16, 14, 14)
    kept = {}
    for recompute in (False, True):
        mixer.recompute = recompute
        kept[recompute] = saved_bytes(lambda: mixer(x).sum(), mixer) / (x.numel() * 4)
    # In units of x: the position encoding keeps x, the aggregation its input (max-relative:
    # also the 1x1 conv + BN around it, 4 more); the aggregation's intermediates (dozens) go.
    assert kept[True] <= most < 3 * most < kept[False], kept


def test_an_unknown_recompute_mode_is_named():
    block = InvertedResidual(8).train()
    block.recompute = "everything"
    with pytest.raises(ValueError, match="Unknown recompute mode 'everything'"):
        block(torch.randn(1, 8, 3, 3))
