"""Runs experiments/imagenet.py with the given arguments, for tests that need a process of their
own. With ``STOP_AT=EPOCH:STEP`` in the environment (epoch counted from 1), SIGTERM goes to the
whole process group, loader processes included, right after that optimizer step, sent by another
process as Slurm, systemd and a shell's kill of a job do (PyTorch's loader processes treat a
SIGTERM from their own parent differently). Start it in a new session so that the group is its
own. Under torchrun, rank 0 sends it (to torchrun and every rank)."""
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import engine  # noqa: E402
import imagenet  # noqa: E402

if "STOP_AT" in os.environ:
    epoch, step = map(int, os.environ["STOP_AT"].split(":"))
    train_step = engine.TrainingRun.train_step

    def train_step_then_signal(run, batch):
        train_step(run, batch)
        if (run.epoch + 1, run.step) == (epoch, step) and os.environ.get("RANK", "0") == "0":
            subprocess.run(["sh", "-c", f"kill -TERM -{os.getpgrp()}"])
    engine.TrainingRun.train_step = train_step_then_signal

imagenet.main(sys.argv[1:])
