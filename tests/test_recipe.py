"""The paper's training recipe (RandAugment rand-m9-mstd0.5-inc1, mixup 0.8 / cutmix 1.0, random
erasing 0.25) on real images, through the training program's own data path: a dependency update
that breaks it (Pillow 13 refuses RandAugment's zero-bit posterize) fails here, not in a user's
first epoch."""
import copy
import json

import pytest
import torch
from PIL import Image
from timm.data import Mixup
from timm.data.auto_augment import RandAugment

import engine
import imagenet
from attvig_pyg.data import FashionMNIST, collate_skipping_failed

RECIPE = imagenet.parse_args([])  # the defaults are the paper's recipe


def recipe_transform(img_size: int = 32):
    model = imagenet.build_model(imagenet.parse_args(["--model", "resnet10t"]), 10)
    args = imagenet.parse_args(["--img-size", str(img_size)])
    return imagenet.build_transforms(args, imagenet.data_config(args, model))[0]


def test_the_defaults_are_the_paper_recipe():
    assert (RECIPE.aa, RECIPE.mixup, RECIPE.cutmix, RECIPE.reprob, RECIPE.remode,
            RECIPE.smoothing, RECIPE.model_ema) == ("rand-m9-mstd0.5-inc1", 0.8, 1.0, 0.25,
                                                    "pixel", 0.1, True)


@pytest.mark.parametrize("magnitude", [0, 10])
def test_every_randaugment_op_of_the_recipe_works_at_the_ends_of_its_range(magnitude):
    """m9 with std 0.5 draws magnitudes clipped to [0, 10]: every op of the recipe, applied at
    both ends of that range to real images, returns an image."""
    augment = next(t for t in recipe_transform().transforms if isinstance(t, RandAugment))
    images = [Image.fromarray(image.numpy()).convert("RGB") for image in
              FashionMNIST("test").images[:4]]
    assert len(augment.ops) == 15
    for op in augment.ops:
        op = copy.copy(op)
        op.prob, op.magnitude, op.magnitude_std = 1.0, magnitude, 0.0
        for image in images:
            out = op(image)
            assert isinstance(out, Image.Image) and out.size == image.size, op.name


def test_the_recipe_over_three_hundred_real_images():
    train = FashionMNIST("test", transform=recipe_transform())
    train.images, train.targets = train.images[:320], train.targets[:320]
    mixup = Mixup(mixup_alpha=RECIPE.mixup, cutmix_alpha=RECIPE.cutmix,
                  label_smoothing=RECIPE.smoothing, num_classes=10)
    args = imagenet.parse_args(["--batch-size", "64", "--workers", "0"])
    world = engine.Distributed("cpu")
    loader = engine.make_loader(engine.SeededSamples(train), args, world,
                                collate_skipping_failed, drop_last=True,
                                sampler=engine.EpochSampler(train, 0, world))
    batches = 0
    for images, targets, skipped in loader:
        images, targets = mixup(images, targets)
        assert images.shape == (64, 3, 32, 32) and skipped == 0
        assert torch.isfinite(images).all()
        assert torch.allclose(targets.sum(1), torch.ones(64))  # soft labels of mixed pairs
        batches += 1
    assert batches == 5


def test_the_default_recipe_trains_and_evaluates(image_folder, tmp_path):
    """Every default of the recipe (RandAugment, mixup, cutmix, random erasing, EMA), on a tiny
    AttentionViG."""
    model = json.dumps(dict(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32], head_hidden_size=16,
                            heads=4))
    imagenet.main(["--data-dir", str(image_folder), "--model-kwargs", model, "--img-size", "32",
                   "--epochs", "1", "--batch-size", "8", "--workers", "0",
                   "--output", str(tmp_path / "run")])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"]["aa"] == "rand-m9-mstd0.5-inc1"
    assert {"top1", "ema_top1"} <= set(results["final"]["eval"])


@pytest.mark.slow
def test_the_headline_command_on_the_embedded_data(tmp_path, capsys):
    """`imagenet.py --model attentionvig_s --graph svga --img-size 32 --epochs 1 --batch-size 32`
    with the paper's recipe (about 4 minutes on 2 cores)."""
    imagenet.main(["--model", "attentionvig_s", "--graph", "svga", "--img-size", "32",
                   "--epochs", "1", "--batch-size", "32", "--output", str(tmp_path / "run")])
    assert "on the Fashion-MNIST official test split; best top1" in capsys.readouterr().out
