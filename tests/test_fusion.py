"""Inference-time fusion (BatchNorm folded into the preceding maps): the same outputs."""
import copy

import pytest
import timm
import torch
from torch import nn

from attvig_pyg import MaxRelativeConv
from attvig_pyg.models.fusion import fuse_batchnorm


def with_random_statistics(model: nn.Module) -> nn.Module:
    """BatchNorm running statistics and affine weights away from their initial values (with the
    initial ones, a fold that ignored them would still look exact)."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(size, generator=generator) * 0.1)
    return model.eval()


@pytest.mark.parametrize("variant", ["attentionvig_s",
                                     pytest.param("attentionvig_m", marks=pytest.mark.slow),
                                     pytest.param("attentionvig_b", marks=pytest.mark.slow)])
@pytest.mark.parametrize("graph", ["svga", "dagc", "knn"])
def test_reparameterized_attentionvig_computes_the_same(variant, graph):
    model = with_random_statistics(timm.create_model(variant, graph=graph, num_classes=10))
    fused = copy.deepcopy(model).reparameterize()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    images = torch.randn(2, 3, 64, 64)
    model64 = copy.deepcopy(model).double()
    fused64 = copy.deepcopy(model64).reparameterize()  # folded in float64
    with torch.no_grad():
        assert (fused(images) - model(images)).abs().max() < 1e-5
        assert (fused64(images.double()) - model64(images.double())).abs().max() < 1e-10


def test_reparameterized_max_relative_attentionvig_computes_the_same():
    model = with_random_statistics(timm.create_model(
        "attentionvig_s", aggregator="max_relative", graph="dagc", num_classes=10)).double()
    fused = copy.deepcopy(model).reparameterize()
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in fused.modules())
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert (fused(images) - model(images)).abs().max() < 1e-10


@pytest.mark.parametrize("aggregator", ["gin", "sage", "edge", "max_relative", "cross_attn"])
def test_reparameterized_vig_computes_the_same(aggregator):
    model = with_random_statistics(timm.create_model(
        "vig_ti", aggregator=aggregator, channels=32, depth=2, head_hidden_size=32, img_size=32,
        patch_size=8, k=2, num_classes=10)).double()
    fused = copy.deepcopy(model).reparameterize()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert (fused(images) - model(images)).abs().max() < 1e-10


def test_max_relative_conv_folds_its_norm():
    conv = with_random_statistics(MaxRelativeConv(8, 16, groups=4, norm="batch_norm",
                                                  act="gelu")).double()
    x = torch.randn(10, 8, dtype=torch.float64)
    edge_index = torch.randint(0, 10, (2, 30))
    expected = conv(x, edge_index)
    conv.reparameterize()
    assert conv.norm is None
    assert (conv(x, edge_index) - expected).abs().max() < 1e-10


def test_fuse_batchnorm_leaves_unmatched_pairs_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5), nn.GELU(), nn.BatchNorm2d(5))
    fuse_batchnorm(model)
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[3], nn.BatchNorm2d)
