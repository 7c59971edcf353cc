"""experiments/visualize.py: the figures and tables of a trained checkpoint, and its errors."""
import csv
import json

import pytest
import torch
from PIL import Image

import imagenet
import visualize
from conftest import QUICK_TRAINING

TINY = json.dumps(dict(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32], head_hidden_size=16, heads=4))


@pytest.fixture
def trained(image_folder, tmp_path):
    imagenet.main([*QUICK_TRAINING, "--model-kwargs", TINY, "--data-dir", str(image_folder),
                   "--epochs", "1", "--output", str(tmp_path / "run")])
    return tmp_path / "run" / "best.pth"


def test_figures_and_tables_of_a_checkpoint(trained, image_folder, tmp_path):
    images = sorted((image_folder / "val").glob("*/0.png"))[:2]
    output = visualize.main(["--checkpoint", str(trained), "--images", *map(str, images),
                             "--points", "3,30", "60,2", "--img-size", "64",
                             "--output", str(tmp_path / "figures")])
    for name in ("attention_0.png", "attention_1.png", "betas.png"):
        with Image.open(output / name) as picture:
            assert picture.format == "PNG" and min(picture.size) > 300, name
    saved = torch.load(trained, map_location="cpu", weights_only=True)
    betas = {name: value.exp().item() for name, value in saved[saved["weights"]].items()
             if name.endswith("log_beta")}
    rows = list(csv.DictReader((output / "betas.csv").open()))
    # One row per cross-attention layer, in order: the tiny model has 1 inverted residual and
    # 2 Graphers per stage.
    assert [row["layer"] for row in rows] == [f"stage {s}, block {b}" for s in (1, 2, 3, 4)
                                              for b in (2, 3)]
    assert [float(row["beta"]) for row in rows] == pytest.approx(list(betas.values()), abs=1e-6)
    assert (output / "betas.md").read_text().count("| stage ") == len(betas)


def test_default_images_come_from_the_runs_test_split(trained):
    output = visualize.main(["--checkpoint", str(trained), "--count", "3"])
    assert output == trained.parent / "figures"
    assert sorted(p.name for p in output.glob("attention_*.png")) == [
        "attention_0.png", "attention_1.png", "attention_2.png"]


def test_clear_errors(trained, image_folder, tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        visualize.main(["--checkpoint", str(tmp_path / "missing.pth")])
    with pytest.raises(SystemExit, match="outside the 32x32 image"):
        visualize.main(["--checkpoint", str(trained), "--points", "40,1"])
    with pytest.raises(SystemExit, match="ROW,COL"):
        visualize.main(["--checkpoint", str(trained), "--points", "centre"])
    imagenet.main([*QUICK_TRAINING, "--model-kwargs", TINY, "--aggregator", "max_relative",
                   "--data-dir", str(image_folder), "--epochs", "1",
                   "--output", str(tmp_path / "max")])
    with pytest.raises(SystemExit, match="no cross-attention Grapher"):
        visualize.main(["--checkpoint", str(tmp_path / "max" / "best.pth")])
