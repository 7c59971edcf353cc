"""The training program (experiments/imagenet.py on experiments/engine.py), on tiny runs."""
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import engine
import imagenet
from conftest import QUICK_TRAINING

TESTS = Path(__file__).resolve().parent
EXPERIMENTS = TESTS.parent / "experiments"

TINY = dict(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32], head_hidden_size=16, heads=4)
TINY_MODEL = json.dumps(TINY)
QUICK = ["--model-kwargs", TINY_MODEL, *QUICK_TRAINING]


def run(args, tmp_path, name="run"):
    return imagenet.main([*QUICK, "--output", str(tmp_path / name), *map(str, args)])


def checkpoint(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(first: Path, second: Path):
    a, b = checkpoint(first)["model"], checkpoint(second)["model"]
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def program(args, env=None, **options):
    """imagenet.py in a process group of its own (tests/run_and_signal.py)."""
    return subprocess.run([sys.executable, str(TESTS / "run_and_signal.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600, start_new_session=True,
                          env=dict(os.environ, **(env or {})), **options)


# ---- a run and what it writes ---------------------------------------------------------------

def test_one_epoch_and_evaluation_on_the_embedded_data(tmp_path, capsys):
    run(["--epochs", "1", "--batch-size", "128", "--figures"], tmp_path)
    printed = capsys.readouterr().out
    assert re.search(r"top-1 \d+\.\d+%, top-5 \d+\.\d+% on 10000 images on the Fashion-MNIST "
                     r"official test split",
                     printed)
    output = tmp_path / "run"
    for name in ("last.pth", "best.pth", "metrics.csv", "curves.png", "results.json",
                 "train.log", "figures/attention_0.png", "figures/betas.png", "figures/betas.md"):
        assert (output / name).is_file(), name
    assert not (output / "run.lock").exists()
    assert not list(output.glob(".*.tmp"))
    assert any((output / "tensorboard").iterdir())
    results = json.loads((output / "results.json").read_text())
    assert results["final"]["eval"]["top1"] > 10  # better than chance on 10 classes
    assert results["config"]["model_kwargs"] == TINY
    header = (output / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("epoch,train_loss,") and "eval_top1" in header
    log = (output / "train.log").read_text()
    assert "10000 training and 10000 evaluation items" in log
    assert "graph stage 1: 8x8 nodes, svga" in log


def test_augmentation_does_not_depend_on_the_loader_processes(image_folder, tmp_path):
    """Every image has its own seed: 0 or 2 loader processes train the same weights."""
    common = ["--data-dir", image_folder, "--epochs", "1", "--batch-size", "4", "--scale", "0.3",
              "1", "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.5"]
    run([*common, "--workers", "0"], tmp_path, "in_process")
    run([*common, "--workers", "2"], tmp_path, "two_loaders")
    assert_same_weights(tmp_path / "in_process" / "last.pth", tmp_path / "two_loaders" / "last.pth")


# ---- exact continuation ---------------------------------------------------------------------

def test_sigterm_mid_epoch_then_resume_equals_the_uninterrupted_run(image_folder, tmp_path,
                                                                    monkeypatch):
    common = ["--data-dir", image_folder, "--epochs", "3", "--seed", "3", "--batch-size", "4",
              "--model-ema", "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25"]
    run(common, tmp_path, "straight")

    train_step = engine.TrainingRun.train_step

    def signal_after_step_4_of_epoch_2(self, batch):
        train_step(self, batch)
        if (self.epoch, self.step) == (1, 4):
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(engine.TrainingRun, "train_step", signal_after_step_4_of_epoch_2)
    with pytest.raises(SystemExit) as stopped:
        run(common, tmp_path, "interrupted")
    assert stopped.value.code == 128 + signal.SIGTERM
    monkeypatch.setattr(engine.TrainingRun, "train_step", train_step)
    interrupted = tmp_path / "interrupted"
    state = checkpoint(interrupted / "last.pth")
    assert (state["epoch"], state["step"]) == (1, 4)
    assert not (interrupted / "run.lock").exists()

    imagenet.main([*QUICK, *map(str, common), "--resume", str(interrupted / "last.pth")])
    assert_same_weights(tmp_path / "straight" / "last.pth", interrupted / "last.pth")
    straight_rows = (tmp_path / "straight" / "metrics.csv").read_text().splitlines()
    resumed_rows = (interrupted / "metrics.csv").read_text().splitlines()
    assert len(resumed_rows) == 1 + 3
    for straight, resumed in zip(straight_rows, resumed_rows):  # epoch, loss: equal; timings: not
        assert straight.split(",")[:2] == resumed.split(",")[:2]


def test_sigterm_to_the_process_group_with_two_loader_processes(image_folder, tmp_path):
    """The signal reaches the loader processes too (a scheduler stopping the job): they ignore
    it, the main process writes a checkpoint mid-epoch 2, and --resume ends bit for bit where the
    uninterrupted run ends."""
    common = [*QUICK, "--data-dir", image_folder, "--epochs", "3", "--seed", "5",
              "--batch-size", "4", "--workers", "2", "--reprob", "0.25"]
    stop_step = 2  # of the 6 steps of epoch 2 (24 images, batch 4)
    straight = program([*common, "--output", tmp_path / "straight"])
    assert straight.returncode == 0, straight.stderr[-3000:]

    stopped = program([*common, "--output", tmp_path / "stopped"],
                      env=dict(STOP_AT=f"2:{stop_step}"))
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "received SIGTERM" in stopped.stderr
    assert "DataLoader worker" not in stopped.stderr
    state = checkpoint(tmp_path / "stopped" / "last.pth")
    assert state["epoch"] == 1 and stop_step <= state["step"] < 6, (state["epoch"], state["step"])

    resumed = program([*common, "--resume", tmp_path / "stopped" / "last.pth"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / 'stopped' / 'last.pth'} at epoch 2 of 3, step " \
        f"{state['step']} of 6" in resumed.stderr
    checksums = [re.search(r"weights checksum (\w+)", p.stderr)[1] for p in (straight, resumed)]
    assert checksums[0] == checksums[1]
    assert_same_weights(tmp_path / "straight" / "last.pth", tmp_path / "stopped" / "last.pth")


def test_resume_refuses_changed_settings(image_folder, tmp_path):
    run(["--data-dir", image_folder, "--epochs", "2"], tmp_path)
    last = tmp_path / "run" / "last.pth"
    before = last.read_bytes()
    other_model = json.dumps(dict(TINY, heads=2))
    with pytest.raises(SystemExit, match=r"--model-kwargs: the run has .*\"heads\": 4"):
        imagenet.main([*QUICK_TRAINING, "--model-kwargs", other_model, "--resume", str(last)])
    with pytest.raises(SystemExit, match=r"--epochs: the run has 2, this command 3(.|\n)*longer "
                                         r"--epochs would change the learning-rate schedule"):
        imagenet.main([*QUICK, "--epochs", "3", "--resume", str(last)])
    with pytest.raises(SystemExit, match="--graph: the run has null, this command \"dagc\""):
        imagenet.main(["--graph", "dagc", "--resume", str(last)])
    assert last.read_bytes() == before
    # Only the flags that say where it runs may change; the rest comes from the checkpoint.
    summary = imagenet.main(["--resume", str(last), "--workers", "1"])
    assert summary["epochs"] == 2 and last.read_bytes() == before  # nothing left to train


def test_a_run_saved_before_a_setting_existed_resumes_with_its_default():
    args = imagenet.parse_args([*QUICK])
    saved = engine.run_config(args)
    del saved["torch_compile"]  # a setting added to the program after the run started
    saved["epochs"] = 7
    resumed = engine.settings_from_checkpoint(args, saved, [], "--resume")
    assert resumed.torch_compile is None and resumed.epochs == 7


def test_resume_with_other_training_data_is_refused(image_folder, tmp_path):
    run(["--data-dir", image_folder, "--epochs", "1"], tmp_path)
    (image_folder / "train" / "class_0" / "0.png").unlink()
    with pytest.raises(SystemExit, match="the data differs from the run's: train_images: the "
                                         "run had 24, now 23"):
        imagenet.main(["--resume", str(tmp_path / "run" / "last.pth")])


# ---- what a checkpoint is evaluated with ----------------------------------------------------

def test_eval_only_rebuilds_the_model_from_the_checkpoint(image_folder, tmp_path, capsys):
    """A dagc / one-head / softmax run: --eval-only with no model flag reproduces its accuracy."""
    model = json.dumps(dict(TINY, heads=1, normalize="softmax"))
    imagenet.main([*QUICK_TRAINING, "--model-kwargs", model, "--graph", "dagc", "--data-dir",
                   str(image_folder), "--epochs", "2", "--output", str(tmp_path / "run")])
    best = json.loads((tmp_path / "run" / "results.json").read_text())["best"]
    capsys.readouterr()
    imagenet.main(["--eval-only", "--checkpoint", str(tmp_path / "run" / "best.pth")])
    printed = capsys.readouterr().out
    assert best["metric"] == "top1"
    assert f"(model weights, epoch {best['epoch']}): top-1 {best['score']:.2f}%" in printed
    assert "on 12 images" in printed
    assert "(runtime eager)" in printed
    # The same accuracy in ONNX Runtime, and the runtime named.
    imagenet.main(["--eval-only", "--checkpoint", str(tmp_path / "run" / "best.pth"),
                   "--runtime", "onnxruntime"])
    printed = capsys.readouterr().out
    assert f"top-1 {best['score']:.2f}%" in printed and "(runtime onnxruntime)" in printed
    with pytest.raises(SystemExit, match=r"--eval-only(.|\n)*--graph: the run has \"dagc\", this "
                                         r"command \"svga\""):
        imagenet.main(["--eval-only", "--checkpoint", str(tmp_path / "run" / "best.pth"),
                       "--graph", "svga"])


def test_eval_only_evaluates_the_weights_the_checkpoint_names(image_folder, tmp_path, capsys):
    """best.pth says whether its best result came from the raw or the EMA weights; --eval-only
    evaluates those. Here the raw weights always answer class 0 and the EMA weights class 2, on an
    evaluation set of 1 + 4 + 4 images."""
    run(["--data-dir", image_folder, "--epochs", "1", "--model-ema"], tmp_path)
    state = checkpoint(tmp_path / "run" / "best.pth")
    for weights, answer in (("model", 0), ("ema", 2)):
        for head in ("head", "head_dist"):
            state[weights][f"{head}.weight"].zero_()
            state[weights][f"{head}.bias"].copy_(torch.eye(3)[answer] * 10)
    state["weights"] = "ema"
    torch.save(state, tmp_path / "ema.pth")
    for image in ("1.png", "2.png", "3.png"):
        (image_folder / "val" / "class_0" / image).unlink()
    imagenet.main(["--eval-only", "--checkpoint", str(tmp_path / "ema.pth")])
    assert "(ema weights, epoch 1): top-1 44.44%" in capsys.readouterr().out
    state["weights"] = "model"
    torch.save(state, tmp_path / "raw.pth")
    imagenet.main(["--eval-only", "--checkpoint", str(tmp_path / "raw.pth")])
    assert "(model weights, epoch 1): top-1 11.11%" in capsys.readouterr().out


def test_unsafe_or_broken_checkpoints_are_refused(image_folder, tmp_path):
    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)
    torch.save(dict(format=2, model=RunsCode()), tmp_path / "evil.pth")
    for flag in ("--checkpoint", "--resume"):
        argv = [flag, str(tmp_path / "evil.pth")] + (["--eval-only"] if flag == "--checkpoint"
                                                      else [])
        with pytest.raises(SystemExit, match="refused: it holds Python objects besides tensors"):
            imagenet.main(argv)
    assert not (tmp_path / "pwned").exists()

    run(["--data-dir", image_folder, "--epochs", "1"], tmp_path)
    whole = (tmp_path / "run" / "last.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(SystemExit, match="cut.pth is not a readable checkpoint \\(truncated or "
                                         "corrupt\\)"):
        imagenet.main(["--eval-only", "--checkpoint", str(tmp_path / "cut.pth")])
    torch.save(dict(model=checkpoint(tmp_path / "run" / "last.pth")["model"]),
               tmp_path / "bare.pth")
    # A bare state dict is weights from elsewhere: it must fit the model the flags describe.
    with pytest.raises(SystemExit, match="bare.pth does not fit AttentionViG"):
        imagenet.main(["--eval-only", "--checkpoint", str(tmp_path / "bare.pth")])


def test_weights_from_elsewhere_evaluate_in_the_model_the_flags_describe(image_folder, tmp_path,
                                                                        capsys):
    run(["--data-dir", image_folder, "--epochs", "1"], tmp_path)
    own = checkpoint(tmp_path / "run" / "last.pth")
    torch.save(dict(state_dict={f"module.{k}": v for k, v in own["model"].items()}),
               tmp_path / "foreign.pth")
    capsys.readouterr()
    quick_eval = ["--data-dir", str(image_folder), "--model-kwargs", TINY_MODEL, "--img-size", "32",
                  "--workers", "0", "--eval-only"]
    mine = imagenet.main([*quick_eval, "--checkpoint", str(tmp_path / "run" / "last.pth")])
    foreign = imagenet.main([*quick_eval, "--checkpoint", str(tmp_path / "foreign.pth")])
    assert "weights from elsewhere in attentionvig_s" in capsys.readouterr().out
    assert foreign == mine


# ---- one run per folder ---------------------------------------------------------------------

def test_a_second_run_on_a_locked_folder_fails_and_the_first_is_intact(image_folder, tmp_path):
    folder = tmp_path / "run"
    with open(tmp_path / "first.log", "w") as first_log:
        first = subprocess.Popen(
            [sys.executable, str(TESTS / "run_and_signal.py"), *QUICK, "--data-dir",
             image_folder, "--epochs", "1000", "--seed", "7", "--output", folder],
            stderr=first_log, start_new_session=True)
    errors = lambda: (tmp_path / "first.log").read_text()[-3000:]  # noqa: E731
    try:
        deadline = time.time() + 120
        while not (folder / "last.pth").exists():  # it holds the lock and has a checkpoint
            assert first.poll() is None and time.time() < deadline, errors()
            time.sleep(0.2)
        with pytest.raises(SystemExit, match=re.escape(
                f"{folder} is in use by another run: pid {first.pid} on {socket.gethostname()}")):
            run(["--data-dir", image_folder, "--epochs", "1", "--seed", "8"], tmp_path)
        with pytest.raises(SystemExit, match="is in use by another run"):
            imagenet.main(["--resume", str(folder / "last.pth")])
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, errors()
    state = checkpoint(folder / "last.pth")
    assert state["config"]["seed"] == 7 and state["config"]["epochs"] == 1000
    assert "seed 8" not in (folder / "train.log").read_text()
    assert not (folder / "run.lock").exists()


def test_a_stale_lock_is_reported_and_taken_over(image_folder, tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.lock").write_text(json.dumps(
        dict(pid=gone.pid, host=socket.gethostname(), started="yesterday", command="x")))
    run(["--data-dir", image_folder, "--epochs", "1"], tmp_path)
    assert f"took over the stale lock of pid {gone.pid}" in \
        (tmp_path / "run" / "train.log").read_text()
    assert not (tmp_path / "run" / "run.lock").exists()


def test_a_lock_held_on_another_host_is_respected(image_folder, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.lock").write_text(json.dumps(
        dict(pid=1, host="another-host", started="now", command="x")))
    with pytest.raises(SystemExit, match="in use by another run: pid 1 on another-host"):
        run(["--data-dir", image_folder, "--epochs", "1"], tmp_path)
    assert (tmp_path / "run" / "run.lock").exists()


def test_output_folder_of_another_run_is_not_overwritten(image_folder, tmp_path):
    run(["--data-dir", image_folder, "--epochs", "1"], tmp_path)
    with pytest.raises(SystemExit, match="already holds a run"):
        run(["--data-dir", image_folder, "--epochs", "1"], tmp_path)


# ---- processes, data, teacher ---------------------------------------------------------------

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
    assert len(checkpoint(tmp_path / "ddp" / "last.pth")["processes"]) == 2
    # DDP's buckets laid out like the channels-last gradients: no copy, no warning per step
    assert "Grad strides do not match" not in result.stderr


def torchrun(args, env=None):
    """imagenet.py under torchrun with 2 CPU processes, in a process group of its own."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(TESTS / "run_and_signal.py"),
                           *map(str, args)], capture_output=True, text=True, timeout=900,
                          start_new_session=True, env=dict(os.environ, **(env or {})))


def test_a_refusal_on_rank_0_stops_every_rank_with_its_message(image_folder, tmp_path):
    run(["--data-dir", image_folder, "--epochs", "1"], tmp_path)  # the folder holds a run
    result = torchrun([*QUICK, "--data-dir", image_folder, "--epochs", "1", "--output",
                       tmp_path / "run"])
    assert result.returncode != 0
    assert "already holds a run" in result.stderr
    # rank 1 stops quietly instead of crashing in DDP's set-up
    for symptom in ("Connection closed by peer", "gloo", "DistBackendError", "DistStoreError",
                    "DistributedDataParallel"):
        assert symptom not in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_sigterm_mid_epoch_then_resume_equals_the_uninterrupted_run(image_folder,
                                                                             tmp_path):
    common = [*QUICK, "--data-dir", image_folder, "--epochs", "3", "--seed", "5",
              "--batch-size", "2"]  # 24 images, 2 processes: 6 steps per epoch
    straight = torchrun([*common, "--output", tmp_path / "straight"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = torchrun([*common, "--output", tmp_path / "stopped"], env=dict(STOP_AT="2:2"))
    assert stopped.returncode != 0
    state = checkpoint(tmp_path / "stopped" / "last.pth")
    assert state["epoch"] == 1 and 2 <= state["step"] < 6, (state["epoch"], state["step"])
    resumed = torchrun([*common, "--resume", tmp_path / "stopped" / "last.pth"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    checksums = [dict(re.findall(r"rank (\d) weights checksum (\w+)", p.stderr))
                 for p in (straight, resumed)]
    assert checksums[0] == checksums[1] and set(checksums[0]) == {"0", "1"}
    assert_same_weights(tmp_path / "straight" / "last.pth", tmp_path / "stopped" / "last.pth")


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
    assert "skipped 1 unreadable training items" in (tmp_path / "run" / "train.log").read_text()


def test_a_failing_transform_is_not_an_unreadable_image(image_folder):
    from attvig_pyg.data import SafeImageFolder

    def broken_augmentation(image):
        raise ValueError("bits must be between or equal to 1 and 8")
    folder = SafeImageFolder(image_folder / "train", transform=broken_augmentation)
    with pytest.raises(ValueError, match="bits must be"):
        folder[0]


def test_data_folder_problems_are_named_before_any_work(image_folder, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(["--data-dir", tmp_path / "nowhere", "--epochs", "1"], tmp_path)
    assert "nowhere/train is missing" in capsys.readouterr().err
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(FileNotFoundError, match="No class folders in"):
        run(["--data-dir", tmp_path / "empty", "--epochs", "1"], tmp_path, "a")
    (image_folder / "train" / "class_3").mkdir()
    with pytest.raises(FileNotFoundError, match="class folder\\(s\\) without images: class_3"):
        run(["--data-dir", image_folder, "--epochs", "1"], tmp_path, "b")
    (image_folder / "train" / "class_3").rmdir()
    (image_folder / "val" / "class_2").rename(image_folder / "val" / "class_9")
    with pytest.raises(SystemExit, match=r"missing \['class_2'\], extra \['class_9'\]"):
        run(["--data-dir", image_folder, "--epochs", "1"], tmp_path, "c")
    assert not list(tmp_path.glob("*/last.pth"))


def test_warmup_longer_than_the_run_is_clamped(image_folder, tmp_path):
    run(["--data-dir", image_folder, "--epochs", "2", "--warmup-epochs", "20"], tmp_path)
    assert "warmup of 20 epochs clamped to 1 for a 2-epoch run" in \
        (tmp_path / "run" / "train.log").read_text()


def test_output_under_a_file_is_named(image_folder, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match=f"cannot create the run folder: {tmp_path / 'a_file'} "
                                         "is a file"):
        imagenet.main([*QUICK, "--data-dir", str(image_folder), "--epochs", "1",
                       "--output", str(tmp_path / "a_file" / "run")])


@pytest.mark.parametrize("args, message", [
    (["--eval-only"], "--eval-only needs --checkpoint"),
    (["--runtime", "onnxruntime"], "--runtime onnxruntime is for --eval-only"),
    (["--runtime", "tensorrt"], "invalid choice: 'tensorrt'"),
    (["--eval-only", "--checkpoint", __file__, "--runtime", "onnxruntime", "--amp"],
     "--runtime onnxruntime computes in float32: drop --amp"),
    (["--eval-only", "--checkpoint", __file__, "--runtime", "onnxruntime", "--device", "cuda"],
     "--runtime onnxruntime runs on the CPU: --device cpu"),
    (["--teacher-model", "resnet10t"], "needs both --teacher-model"),
    (["--resume", "none.pth"], "no such file"),
    (["--graph", "grid"], "invalid choice: 'grid'"),
    (["--epochs", "0"], "--epochs must be at least 1 (got 0)"),
    (["--img-size", "8"], "--img-size must be at least 32 (got 8)"),
    (["--batch-size", "1"], "--batch-size must be at least 2 to train (got 1): BatchNorm"),
    (["--device", "gpu"], "--device: 'gpu' is not a device (expected cpu, cuda or cuda:N)"),
    (["--device", "cuda:1"], "--device: 'cuda:1': CUDA is not available"),
    (["--device", "tpu"], "is not a device"),
])
def test_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit):
        imagenet.parse_args([*QUICK, *map(str, args)])
    assert message in capsys.readouterr().err


def test_device_index_under_torchrun_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="under torchrun every process uses cuda:LOCAL_RANK"):
        engine.check_device("cuda:1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    engine.check_device("cuda:1")
    with pytest.raises(ValueError, match="this machine has 2 GPU"):
        engine.check_device("cuda:2")


# ---- half precision, determinism ------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("graph", ["svga", "dagc", "knn"])
def test_amp_trains_with_a_finite_loss(dtype, graph, image_folder, tmp_path):
    """--amp on the CPU: torch's CPU autocast, and for float16 GradScaler("cpu")."""
    run(["--data-dir", image_folder, "--epochs", "1", "--graph", graph, "--amp",
         "--amp-dtype", dtype], tmp_path)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert math.isfinite(results["final"]["train"]["loss"])
    assert results["config"]["amp_dtype"] == dtype


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("graph", ["svga", "dagc"])
def test_amp_trains_attentionvig_s_an_epoch_of_the_embedded_data(dtype, graph, tmp_path):
    imagenet.main(["--preset", "cpu-demo", "--epochs", "1", "--workers", "0",
                   "--graph", graph, "--amp", "--amp-dtype", dtype,
                   "--output", str(tmp_path / "run")])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert math.isfinite(results["final"]["train"]["loss"])
    assert results["final"]["eval"]["top1"] > 50  # learning, not just finite


@pytest.mark.parametrize("graph", ["svga", "dagc", "knn"])
def test_deterministic_runs_repeat_exactly(graph, image_folder, tmp_path):
    common = ["--data-dir", image_folder, "--epochs", "1", "--graph", graph, "--deterministic"]
    run(common, tmp_path, "first")
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run
    run(common, tmp_path, "second")
    assert_same_weights(tmp_path / "first" / "last.pth", tmp_path / "second" / "last.pth")
    assert checkpoint(tmp_path / "first" / "last.pth")["config"]["deterministic"] is True


def test_optimizer_state_takes_its_parameters_layout_on_resume():
    """torch's fused AdamW reads a parameter and its moments as flat memory: moments loaded in
    another layout than a channels-last weight (a DDP run's) would be applied misplaced."""
    torch.manual_seed(0)
    weight, grads = torch.randn(8, 4, 3, 3), [torch.randn(8, 4, 3, 3) for _ in range(2)]

    def trained(channels_last: bool, fix: bool):
        parameter = torch.nn.Parameter(weight.clone())
        optimizer = torch.optim.AdamW([parameter], lr=0.1, fused=True)
        parameter.grad = grads[0].clone()
        optimizer.step()
        saved = optimizer.state_dict()  # contiguous moments
        if channels_last:
            parameter.data = parameter.data.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW([parameter], lr=0.1, fused=True)
        optimizer.load_state_dict(saved)
        if fix:
            engine._match_parameter_layouts(optimizer)
        parameter.grad = torch.empty_like(parameter).copy_(grads[1])  # autograd's layout rule
        optimizer.step()
        return parameter.detach().contiguous()

    expected = trained(channels_last=False, fix=False)
    assert not torch.equal(trained(channels_last=True, fix=False), expected)  # torch's pitfall
    assert torch.equal(trained(channels_last=True, fix=True), expected)
