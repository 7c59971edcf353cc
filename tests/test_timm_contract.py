"""timm's model contract for both families, checked the way timm's own tests/test_models.py
checks its models: configs, classifier reset, pooling, forward_intermediates and
prune_intermediate_layers against feature_info, features_only, gradient checkpointing,
parameter groups and weight-decay exemptions."""
import pytest
import timm
import torch
from timm.models import group_parameters

import attvig_pyg.models  # noqa: F401  (registers the models with timm)

MODELS = {
    "attentionvig_s": dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), head_hidden_size=32),
    "greedyvig_s": dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), head_hidden_size=32),
    "vig_ti": dict(aggregator="cross_attn", channels=32, depth=4, head_hidden_size=32,
                   heads=4, img_size=64, patch_size=4),
}
SIZE = 64


def create(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=7, **dict(MODELS[name], **kwargs))


@pytest.mark.parametrize("name", list(MODELS))
def test_config_names_real_modules(name):
    model = create(name)
    config = model.pretrained_cfg
    for key in ("input_size", "mean", "std", "crop_pct", "interpolation", "first_conv",
                "classifier"):
        assert key in config, key
    assert model.get_submodule(config["first_conv"]).in_channels == 3
    classifiers = config["classifier"]
    for classifier in (classifiers,) if isinstance(classifiers, str) else classifiers:
        assert model.get_submodule(classifier).out_features == 7


REGISTERED = [f"{family}_{size}" for family in ("attentionvig", "greedyvig")
              for size in "smb"] + ["vig_ti", "vig_s", "vig_b"]


@pytest.mark.parametrize("name", REGISTERED)
def test_default_configs_as_timm_tests_them(name):
    """timm's test_model_default_cfgs: at the default input size, forward_features' map has the
    config's pool_size, and the config's classifier and first conv are parameters."""
    model = timm.create_model(name).eval()
    config = model.pretrained_cfg
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, *config["input_size"]))
    assert tuple(features.shape[-2:]) == tuple(config["pool_size"])
    names = model.state_dict().keys()
    classifiers = config["classifier"]
    for prefix in [config["first_conv"], *((classifiers,) if isinstance(classifiers, str)
                                          else classifiers)]:
        assert any(key.startswith(prefix) for key in names), prefix


@pytest.mark.parametrize("name", list(MODELS))
def test_classifier_reset_and_pooling(name):
    model = create(name).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    assert model(x).shape == (2, 7)
    features = model.forward_features(x)
    assert model.forward_head(features, pre_logits=True).shape == (2, model.head_hidden_size)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.head_hidden_size)
    model.reset_classifier(5, global_pool="")  # no pooling: the map is kept
    assert model(x).shape == (2, 5, *features.shape[-2:])
    with pytest.raises(ValueError, match="Unknown global_pool 'max'"):
        model.reset_classifier(5, global_pool="max")


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_intermediates_follow_feature_info(name):
    model = create(name).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    final, maps = model.forward_intermediates(x)
    assert torch.allclose(final, model.forward_features(x), atol=1e-6)
    assert len(maps) == len(model.feature_info)
    for info, feature in zip(model.feature_info, maps):
        assert feature.shape == (2, info["num_chs"], SIZE // info["reduction"],
                                 SIZE // info["reduction"])
    last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
    chosen = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True,
                                         stop_early=True)
    assert all(torch.equal(a, b) for a, b in zip(last_two, maps[-2:]))
    assert torch.equal(chosen[0], maps[0]) and torch.equal(chosen[1], maps[-1])
    for bad in (len(maps) + 1, [len(maps)], []):
        with pytest.raises(ValueError, match="Expected"):
            model.forward_intermediates(x, indices=bad)
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NLC")


@pytest.mark.parametrize("name", list(MODELS))
def test_pruning_keeps_the_intermediates(name):
    model = create(name).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    maps = model.forward_intermediates(x, intermediates_only=True)
    kept = model.prune_intermediate_layers([0, 1])
    assert kept == [0, 1] and len(model.feature_info) == 2
    pruned = model.forward_intermediates(x, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(pruned, maps[:2]))
    # timm's convention: the head pruned, the model returns the last kept map, unpooled.
    assert torch.allclose(model(x), maps[1], atol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_features_only(name):
    reference = create(name).eval()
    model = create(name, features_only=True, out_indices=(1, -1)).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    maps = model(x)
    assert model.feature_info.channels() == [reference.feature_info[i]["num_chs"]
                                             for i in (1, len(reference.feature_info) - 1)]
    expected = reference.forward_intermediates(x, indices=(1, -1), intermediates_only=True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(maps, expected))
    with pytest.raises(ValueError, match="Expected stage indices|Expected"):
        create(name, features_only=True, out_indices=(0, 99))


@pytest.mark.parametrize("name", list(MODELS))
def test_gradient_checkpointing_gives_the_same_gradients(name):
    model = create(name).train()
    x = torch.randn(2, 3, SIZE, SIZE)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(1)
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))


@pytest.mark.parametrize("name", list(MODELS))
def test_parameter_groups_and_weight_decay_exemptions(name):
    model = create(name)
    groups = group_parameters(model, model.group_matcher())
    named = set(dict(model.named_parameters()))
    assert set().union(*map(set, groups.values())) == named  # every parameter in one group
    assert len(groups) > 2
    coarse = group_parameters(model, model.group_matcher(coarse=True))
    assert len(coarse) <= len(groups)
    assert model.no_weight_decay() <= named
