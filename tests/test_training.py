"""The training program (experiments/imagenet.py on experiments/engine.py), on tiny runs."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine
import imagenet
from conftest import QUICK_TRAINING

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"

TINY_MODEL = json.dumps(dict(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32], head_hidden_size=16,
                             heads=4))
QUICK = ["--model-kwargs", TINY_MODEL, *QUICK_TRAINING]


def run(args, tmp_path, name="run"):
    return imagenet.main([*QUICK, "--output", str(tmp_path / name), *map(str, args)])


def final_weights(folder: Path):
    return torch.load(folder / "last.pth", map_location="cpu", weights_only=False)["model"]


def test_one_epoch_and_evaluation_on_the_embedded_data(tmp_path, capsys):
    run(["--epochs", "1", "--batch-size", "128"], tmp_path)
    printed = capsys.readouterr().out
    assert re.search(r"top-1 \d+\.\d+% / top-5 \d+\.\d+% on Fashion-MNIST official test split",
                     printed)
    output = tmp_path / "run"
    for name in ("last.pth", "best.pth", "metrics.csv", "curves.png", "results.json",
                 "train.log"):
        assert (output / name).is_file(), name
    assert any((output / "tensorboard").iterdir())
    results = json.loads((output / "results.json").read_text())
    assert results["final"]["eval_top1"] > 10  # better than chance on 10 classes
    log = (output / "train.log").read_text()
    assert "10000 training and 10000 evaluation images" in log
    assert "graph stage 1: 8x8 nodes, svga" in log


def test_resume_from_an_epoch_boundary_reproduces_the_run(image_folder, tmp_path, monkeypatch):
    common = ["--data-dir", image_folder, "--epochs", "3", "--seed", "3"]
    run(common, tmp_path, "straight")

    write_metrics = engine._write_metrics

    def stop_after_first_epoch(output, history, writer):  # a real SIGTERM, after epoch 1 saved
        write_metrics(output, history, writer)
        if len(history) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(engine, "_write_metrics", stop_after_first_epoch)
    with pytest.raises(SystemExit) as stopped:
        run(common, tmp_path, "interrupted")
    assert stopped.value.code == 128 + signal.SIGTERM
    monkeypatch.setattr(engine, "_write_metrics", write_metrics)
    interrupted = tmp_path / "interrupted"
    assert torch.load(interrupted / "last.pth", weights_only=False)["epoch"] == 0

    imagenet.main([*QUICK, *map(str, common), "--resume", str(interrupted / "last.pth")])
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(interrupted)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert len((interrupted / "metrics.csv").read_text().splitlines()) == 1 + 3


def test_two_process_torchrun(image_folder, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(EXPERIMENTS / "imagenet.py"), *QUICK,
               "--data-dir", str(image_folder), "--epochs", "1", "--batch-size", "4",
               "--output", str(tmp_path / "ddp")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    checksums = dict(re.findall(r"rank (\d) weights checksum (\w+)", result.stderr))
    assert set(checksums) == {"0", "1"}
    assert checksums["0"] == checksums["1"]
    assert "2 process(es)" in result.stderr
    assert "global batch of 8" in result.stderr
    assert (tmp_path / "ddp" / "last.pth").is_file()


def test_hard_distillation_with_a_local_teacher(image_folder, tmp_path):
    import timm
    teacher = timm.create_model("resnet10t", num_classes=3)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    run(["--data-dir", image_folder, "--epochs", "1", "--teacher-model", "resnet10t",
         "--teacher-checkpoint", tmp_path / "teacher.pth"], tmp_path)
    assert "distillation: hard, teacher resnet10t" in (tmp_path / "run" / "train.log").read_text()


def test_corrupt_images_are_skipped_and_counted(image_folder, tmp_path):
    (image_folder / "train" / "class_0" / "broken.png").write_bytes(b"not an image at all")
    run(["--data-dir", image_folder, "--epochs", "1"], tmp_path)
    assert "skipped 1 unreadable training images" in (tmp_path / "run" / "train.log").read_text()


def test_missing_or_empty_data_folder_fails_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(["--data-dir", tmp_path / "nowhere", "--epochs", "1"], tmp_path)
    assert "nowhere/train is missing" in capsys.readouterr().err
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(FileNotFoundError, match="No images in"):
        run(["--data-dir", tmp_path / "empty", "--epochs", "1"], tmp_path)
    assert not (tmp_path / "run" / "last.pth").exists()


def test_eval_only(image_folder, tmp_path, capsys):
    run(["--data-dir", image_folder, "--epochs", "1"], tmp_path)
    capsys.readouterr()
    imagenet.main([*QUICK, "--data-dir", str(image_folder), "--eval-only", "--checkpoint",
                   str(tmp_path / "run" / "best.pth")])
    assert re.search(r"best\.pth: top-1 \d+\.\d+%, top-5 \d+\.\d+% on 12 images",
                     capsys.readouterr().out)


def test_warmup_longer_than_the_run_is_clamped(image_folder, tmp_path):
    run(["--data-dir", image_folder, "--epochs", "2", "--warmup-epochs", "20"], tmp_path)
    assert "warmup of 20 epochs clamped to 1 for a 2-epoch run" in \
        (tmp_path / "run" / "train.log").read_text()


def test_output_folder_of_another_run_is_not_overwritten(image_folder, tmp_path):
    run(["--data-dir", image_folder, "--epochs", "1"], tmp_path)
    with pytest.raises(SystemExit, match="already holds a run"):
        run(["--data-dir", image_folder, "--epochs", "1"], tmp_path)


def test_bad_arguments(tmp_path, capsys):
    for args, message in ((["--eval-only"], "--eval-only needs --checkpoint"),
                          (["--teacher-model", "resnet10t"], "needs both --teacher-model"),
                          (["--resume", tmp_path / "none.pth"], "no such file"),
                          (["--graph", "grid"], "invalid choice: 'grid'")):
        with pytest.raises(SystemExit):
            engine.parse_args([*QUICK, *map(str, args)])
        assert message in capsys.readouterr().err
