"""The training engine shared by experiments/imagenet.py and experiments/ablation.py.

One run: data (ImageNet folder layout or the embedded Fashion-MNIST), any timm model (AttentionViG
and the ViG harness register themselves on ``import attvig_pyg``), the paper's recipe built from
timm's parts, data-parallel training over ``torchrun`` processes, and one object that owns the
run's state (:class:`TrainingRun`), whose ``state_dict`` is the checkpoint. Flag names follow
timm's train.py. What a run guarantees (docs/training.md):

- It continues exactly: stopped at any step (SIGTERM or Ctrl-C, to the process or to its whole
  process group), it writes a checkpoint that says where in the epoch it stopped, and
  ``--resume`` ends with the weights of the run that was never stopped, bit for bit. Every image
  is augmented with its own seed (run seed, epoch, process, position in the epoch), so what it
  becomes depends neither on the loader process that reads it nor on what was read before.
- A checkpoint carries the run's complete settings: ``--resume`` and ``--eval-only`` rebuild the
  model from them and refuse flags that contradict them.
- An output folder belongs to one run at a time (``run.lock`` names its owner).
- Checkpoints hold only tensors, numbers and strings and load with ``weights_only=True``.
"""
import argparse
import hashlib
import json
import logging
import math
import os
import random
import signal
import socket
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from tqdm import tqdm

import timm
from timm.data import Mixup, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.task import ClassificationTask, TokenDistillationTask
from timm.utils import (ModelEmaV3, accuracy, dispatch_clip_grad, distribute_bn,
                        init_distributed_device, is_distributed_env, random_seed,
                        setup_default_logging, unwrap_model, update_summary)

import attvig_pyg  # noqa: F401  (registers AttentionViG and the ViG harness with timm)
from attvig_pyg.data import CLASSES, FashionMNIST, SafeImageFolder, collate_skipping_failed

log = logging.getLogger("engine")

# Settings for 28x28 Fashion-MNIST upscaled to 32 px on a 2-core CPU; explicit flags override.
PRESETS = {
    "cpu-demo": dict(model="attentionvig_s", img_size=32, epochs=4, batch_size=64,
                     lr=2e-3, warmup_epochs=1, weight_decay=0.05, smoothing=0.1, aa=None,
                     mixup=0.0, cutmix=0.0, reprob=0.0, drop_path=0.05, scale=(0.6, 1.0),
                     crop_pct=1.0, model_ema=False, workers=2),
}

# What a checkpoint holds: the version of TrainingRun.state_dict.
CHECKPOINT_FORMAT = 2
# Flags that say where or with what a run computes, not what it computes: a continued run may
# change them (the data folder may move; its classes and size are checked).
RUN_LOCAL = ("workers", "device", "data_dir", "output", "resume", "eval_only", "checkpoint",
             "preset")
# Flags that build the network: --eval-only takes them from the checkpoint.
MODEL_FLAGS = ("model", "graph", "aggregator", "model_kwargs", "drop_path")
PATH_FLAGS = ("data_dir", "teacher_checkpoint", "output", "resume", "checkpoint")


# ---- arguments ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train an image classifier (AttentionViG by default) with the AttentionViG "
                    "paper's recipe. Without --data-dir it trains on the embedded Fashion-MNIST.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", type=Path, default=None,
                       help="ImageNet folder layout: DATA_DIR/train/<class>/*, DATA_DIR/val/<class>/*;"
                            " default: the embedded Fashion-MNIST (10,000 training images, the "
                            "complete 10,000-image official test split)")
    group.add_argument("--fashion-mnist-full", action="store_true",
                       help="without --data-dir: the official 60,000 training images from the "
                            "Debian package dataset-fashion-mnist instead of the embedded subset")
    group.add_argument("--img-size", type=int, default=224, help="input size in pixels")
    group.add_argument("--crop-pct", type=float, default=None,
                       help="evaluation center-crop fraction (default: the model's)")
    group.add_argument("--workers", type=int, default=4, help="data loading processes")
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="attentionvig_s",
                       help="attentionvig_s|m|b, vig_ti, or any timm model name")
    group.add_argument("--graph", choices=["svga", "dagc", "knn"], default=None,
                       help="graph policy of a graph model (default: the model's)")
    group.add_argument("--aggregator", default=None,
                       help="aggregator of a graph model (AttentionViG: cross_attn, max_relative;"
                            " ViG: gin, sage, edge, max_relative, cross_attn)")
    group.add_argument("--model-kwargs", type=json.loads, default={},
                       help="more model constructor arguments, as JSON")
    group.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate")
    group = parser.add_argument_group("optimization (AdamW, cosine schedule)")
    group.add_argument("--epochs", type=int, default=300)
    group.add_argument("--batch-size", type=int, default=128, help="per process")
    group.add_argument("--lr", type=float, default=None,
                       help="learning rate; default: lr-base * global batch / lr-base-size")
    group.add_argument("--lr-base", type=float, default=2e-3)
    group.add_argument("--lr-base-size", type=int, default=2048)
    group.add_argument("--opt", default="adamw")
    group.add_argument("--weight-decay", type=float, default=0.05)
    group.add_argument("--warmup-epochs", type=int, default=20)
    group.add_argument("--warmup-lr", type=float, default=1e-6)
    group.add_argument("--min-lr", type=float, default=1e-5)
    group.add_argument("--clip-grad", type=float, default=None, help="gradient norm clip")
    group.add_argument("--clip-mode", default="norm", choices=["norm", "value", "agc"])
    group.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=True,
                       help="keep and evaluate an exponential moving average of the weights")
    group.add_argument("--model-ema-decay", type=float, default=0.9998)
    group.add_argument("--amp", action="store_true", help="mixed precision (autocast)")
    group.add_argument("--amp-dtype", choices=["bfloat16", "float16"], default="bfloat16")
    group.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes")
    group = parser.add_argument_group("augmentation and regularisation")
    group.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    group.add_argument("--aa", default="rand-m9-mstd0.5-inc1",
                       help="timm auto-augment policy, or none")
    group.add_argument("--train-interpolation", default="random",
                       help="resize interpolation in training (random: bilinear or bicubic per "
                            "image, as DeiT)")
    group.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    group.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    group.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    group.add_argument("--remode", default="pixel", choices=["pixel", "rand", "const"],
                       help="random erasing fill (pixel: per-pixel normal noise, as DeiT)")
    group.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0),
                       help="random resized crop scale range")
    group.add_argument("--aug-repeats", type=int, default=0,
                       help="repeated augmentation (distributed runs): copies of each image")
    group = parser.add_argument_group("distillation (DeiT hard distillation)")
    group.add_argument("--teacher-model", default=None, help="e.g. regnety_160")
    group.add_argument("--teacher-checkpoint", type=Path, default=None,
                       help="the teacher's weights, a local file (nothing is downloaded)")
    group = parser.add_argument_group("run")
    group.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="cpu-demo: " + ", ".join(f"{k}={v}"
                                                    for k, v in PRESETS["cpu-demo"].items()))
    group.add_argument("--output", type=Path, default=None,
                       help="run folder (default: runs/<model>-<time>); one run at a time")
    group.add_argument("--resume", type=Path, default=None,
                       help="a last.pth to continue from, exactly where it stopped, in its own "
                            "folder and with its own settings")
    group.add_argument("--seed", type=int, default=42)
    group.add_argument("--eval-only", action="store_true",
                       help="only evaluate --checkpoint (the model is rebuilt from its settings)")
    group.add_argument("--checkpoint", type=Path, default=None,
                       help="a checkpoint of this program, for --eval-only")
    group.add_argument("--device", default=None,
                       help="cpu, cuda or cuda:N (default: cuda if available); under torchrun "
                            "every process takes cuda:LOCAL_RANK")
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line, checked; ``args.given`` holds the flags it names explicitly (what
    ``--resume`` and ``--eval-only`` compare with the checkpoint's settings)."""
    parser = build_parser()
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    args.given = given_flags(argv, vars(args))
    if args.aa is not None and args.aa.lower() == "none":
        args.aa = None
    for problem in _problems(args):
        parser.error(problem)
    return args


def given_flags(argv: Optional[List[str]], dests: Iterable[str]) -> set:
    """The settings named on the command line (a preset names all of its settings)."""
    unset = object()  # not a string: argparse would pass a string default through `type`
    parser = build_parser()
    parser.set_defaults(**{dest: unset for dest in dests})
    named = parser.parse_args(argv)
    given = {k for k, v in vars(named).items() if v is not unset}
    if "preset" in given:
        given |= set(PRESETS[named.preset])
    return given


def _problems(args) -> Iterator[str]:
    if args.eval_only and args.checkpoint is None:
        yield "--eval-only needs --checkpoint PATH"
    if args.eval_only and args.resume:
        yield "--eval-only and --resume exclude each other"
    if bool(args.teacher_model) != bool(args.teacher_checkpoint):
        yield ("distillation needs both --teacher-model and --teacher-checkpoint (a local file; "
               "nothing is downloaded)")
    for flag, path in (("--checkpoint", args.checkpoint), ("--resume", args.resume),
                       ("--teacher-checkpoint", args.teacher_checkpoint)):
        if path is not None and not path.is_file():
            yield f"{flag}: no such file: {path}"
    if args.resume and "output" in args.given and args.output.resolve() != \
            args.resume.parent.resolve():
        yield (f"--resume continues a run in its own folder ({args.resume.parent}); "
               f"--output {args.output} names another")
    if args.data_dir is not None:
        for split in ("train", "val"):
            if not (args.data_dir / split).is_dir():
                yield (f"--data-dir: {args.data_dir / split} is missing (expected "
                       "DATA_DIR/train/<class>/* and DATA_DIR/val/<class>/*)")
    for flag, value, low in (("--epochs", args.epochs, 1), ("--img-size", args.img_size, 1),
                             ("--workers", args.workers, 0), ("--seed", args.seed, 0),
                             ("--warmup-epochs", args.warmup_epochs, 0),
                             ("--aug-repeats", args.aug_repeats, 0)):
        if value < low:
            yield f"{flag} must be at least {low} (got {value})"
    if args.batch_size < (1 if args.eval_only else 2):
        yield (f"--batch-size must be at least 2 to train (got {args.batch_size}): BatchNorm needs "
               "more than one value per channel, and mixup/cutmix mix images in pairs"
               if not args.eval_only else f"--batch-size must be positive (got {args.batch_size})")
    try:
        check_device(args.device)
    except ValueError as error:
        yield f"--device: {error}"


def check_device(text: Optional[str]) -> None:
    """Raises ValueError unless ``text`` names a device this program can use (None: automatic)."""
    if text is None:
        return
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"'{text}' is not a device (expected cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise ValueError(f"'{text}': this program runs on cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"'{text}': CUDA is not available on this machine")
        if device.index is not None and is_distributed_env():
            raise ValueError(f"'{text}': under torchrun every process uses cuda:LOCAL_RANK; give "
                             "--device cuda (and choose GPUs with CUDA_VISIBLE_DEVICES)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"'{text}': this machine has {torch.cuda.device_count()} GPU(s)")


# ---- the settings a checkpoint carries ------------------------------------------------------

def run_config(args) -> Dict:
    """A run's settings as JSON values: what checkpoints and results.json store."""
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k != "given"},
                                 default=str))


def config_differences(saved: Dict, args, keys: Iterable[str]) -> List[str]:
    """``--flag`` lines for the settings among ``keys`` where ``args`` differs from ``saved``."""
    current = run_config(args)
    return [f"--{key.replace('_', '-')}: the run has {json.dumps(saved.get(key))}, this command "
            f"{json.dumps(current.get(key))}"
            for key in keys if current.get(key) != saved.get(key)]


def settings_from_checkpoint(args, saved: Dict, must_agree: Iterable[str],
                             purpose: str) -> argparse.Namespace:
    """The settings saved with a run, with the flags of this command line applied. A flag given
    here among ``must_agree`` that contradicts the run is an error naming the difference."""
    conflicts = config_differences(saved, args, [k for k in must_agree if k in args.given])
    if conflicts:
        hint = (" A run continues with the settings it started with (a longer --epochs would "
                "change the learning-rate schedule of the epochs already trained); start a new "
                "run in another --output instead." if purpose == "--resume" else
                " The model is rebuilt from the checkpoint: leave these flags out.")
        raise SystemExit(f"{purpose}: this command contradicts the run's settings:\n  " +
                         "\n  ".join(conflicts) + "\n" + hint)
    settings = argparse.Namespace(**saved)
    for key in args.given:
        setattr(settings, key, getattr(args, key))
    for key in PATH_FLAGS:
        if getattr(settings, key) is not None:
            setattr(settings, key, Path(getattr(settings, key)))
    settings.scale = tuple(settings.scale)
    settings.eval_only, settings.checkpoint, settings.resume = (args.eval_only, args.checkpoint,
                                                                args.resume)
    settings.given = args.given
    return settings


# ---- files ----------------------------------------------------------------------------------

@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A fresh temporary file beside ``path`` that replaces ``path`` (synced to disk) when the
    block ends without error, so that no reader ever sees half a file."""
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> Dict:
    """A checkpoint of this program, loaded with ``weights_only=True``; anything else is refused
    with a message that says what is wrong with the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (every way a file can fail to be a checkpoint)
        if "Weights only load failed" in str(error):
            raise SystemExit(
                f"{path}: refused: it holds Python objects besides tensors, numbers and strings, "
                "and unpickling them could run arbitrary code (checkpoints of this program hold "
                "none)") from None
        raise SystemExit(f"{path} is not a readable checkpoint (truncated or corrupt): "
                         f"{type(error).__name__}: {str(error)[:200]}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"{path} is not a checkpoint of this program (format "
                         f"{CHECKPOINT_FORMAT}; found "
                         f"{state.get('format') if isinstance(state, dict) else type(state)})")
    return state


class RunLock:
    """Makes a run folder belong to one run at a time: ``run.lock`` names the owner (pid, host,
    start time, command) while it runs. A second run on the folder fails with the owner's name; a
    lock whose owner no longer runs on this host is stale: it is reported and taken over."""

    def __init__(self, folder: Path):
        self.path = folder / "run.lock"
        self.owner = dict(pid=os.getpid(), host=socket.gethostname(),
                          started=time.strftime("%Y-%m-%d %H:%M:%S"), command=" ".join(sys.argv))
        self.stale: Optional[Dict] = None  # the previous owner, if its lock was taken over

    def __enter__(self) -> "RunLock":
        while True:
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                holder = self._holder()
                if self.stale is not None or not self._gone(holder):
                    raise SystemExit(self._message(holder)) from None
                self.stale = holder
                self.path.unlink(missing_ok=True)
        with os.fdopen(handle, "w") as lock:
            json.dump(self.owner, lock)
        return self

    def __exit__(self, *_) -> None:
        if self._holder() == self.owner:
            self.path.unlink(missing_ok=True)

    def _holder(self) -> Optional[Dict]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _gone(holder: Optional[Dict]) -> bool:
        if not holder or holder.get("host") != socket.gethostname():
            return False  # another machine's process (or an unreadable lock): cannot tell
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _message(self, holder: Optional[Dict]) -> str:
        folder = self.path.parent
        if holder is None:
            return (f"{folder} is locked by an unreadable {self.path}; if no run uses this folder, "
                    "delete that file")
        return (f"{folder} is in use by another run: pid {holder.get('pid')} on "
                f"{holder.get('host')}, started {holder.get('started')} ({holder.get('command')})."
                f" Wait for it to end or choose another --output; if that run is gone, delete "
                f"{self.path}")


def make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next(p for p in [folder, *folder.parents] if p.exists() and not p.is_dir())
        raise SystemExit(f"--output {folder}: cannot create the run folder: {blocker} is a file, "
                         "not a folder") from None


# ---- processes and signals ------------------------------------------------------------------

class Distributed:
    """This process's place among the ``torchrun`` (or Slurm) processes, from timm's
    ``init_distributed_device`` (one process: rank 0 of 1)."""

    def __init__(self, device: Optional[str]):
        place = SimpleNamespace(device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.device = init_distributed_device(place)
        self.world_size, self.rank = place.world_size, place.rank

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> List[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value) -> List:
        """Every process's ``value``, in rank order (a collective)."""
        if self.world_size == 1:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


class StopRequest:
    """Turns SIGTERM and Ctrl-C into a request that the loop honours between steps, for as long
    as the ``with`` block lasts. A second Ctrl-C gives up at once; further SIGTERMs (torchrun
    forwards the one it gets to processes that got it too) change nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = None
        self.previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopRequest":
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *_) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame):
        if self.requested:
            if signum == signal.SIGINT and self.signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        log.warning("received %s: stopping after this step and writing a checkpoint",
                    signal.Signals(signum).name)


@contextmanager
def stop_signals_held() -> Iterator[None]:
    """Holds SIGTERM and SIGINT back while loader processes start: they inherit the blocked
    mask and unblock only once they ignore both (:func:`_loader_process_init`), so that a signal
    to the whole process group reaches the main process alone."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, StopRequest.SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _loader_process_init(_worker_id: int) -> None:
    for sig in StopRequest.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, StopRequest.SIGNALS)


# ---- randomness -----------------------------------------------------------------------------

def mix_seed(*numbers: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (run seed, epoch, process, position)."""
    return int(np.random.SeedSequence(numbers).generate_state(1, np.uint64)[0] >> np.uint64(1))


def rng_states() -> Dict:
    """This process's random states as tensors and numbers (``weights_only``-loadable)."""
    _, key, position, has_gauss, gauss = np.random.get_state()
    return dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                numpy=dict(key=torch.from_numpy(key.astype(np.int64)), position=int(position),
                           has_gauss=int(has_gauss), gauss=float(gauss)),
                python=random.getstate())


def set_rng_states(states: Dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy = states["numpy"]
    np.random.set_state(("MT19937", numpy["key"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["gauss"]))
    random.setstate(states["python"])


@contextmanager
def own_random_state(seed: int) -> Iterator[None]:
    """Runs the block with the CPU generators of torch, numpy and random seeded by ``seed``,
    and puts their previous states back afterwards."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


class SeededSamples(Dataset):
    """``dataset[index]`` drawn with its own random state: items are asked for as
    ``(index, seed)`` pairs (:class:`EpochSampler` makes them)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        with own_random_state(seed):
            return self.dataset[index]


class EpochSampler(Sampler):
    """This process's share of an epoch, in an order that is a function of (seed, epoch) alone,
    as ``(index, seed of the draw)`` pairs, from any position in the epoch on."""

    def __init__(self, dataset: Dataset, seed: int, world: Distributed, repeats: int = 0):
        self.order = (RepeatAugSampler(dataset, num_replicas=world.world_size, rank=world.rank,
                                       num_repeats=repeats) if repeats else
                      DistributedSampler(dataset, num_replicas=world.world_size, rank=world.rank,
                                         shuffle=True, drop_last=True))
        self.seed, self.rank = seed, world.rank
        self.epoch = self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        self.order.set_epoch(mix_seed(self.seed, self.epoch))
        for position, index in enumerate(self.order):
            if position >= self.start:
                yield index, mix_seed(self.seed, self.epoch, self.rank, position)


# ---- data and model -------------------------------------------------------------------------

def class_names(args) -> List[str]:
    if args.data_dir is None:
        return list(CLASSES)
    return SafeImageFolder.classes_in(args.data_dir / "train")


def build_transforms(args, data_cfg: Dict):
    """The paper's training augmentation and the evaluation resize / center crop."""
    train = create_transform(
        data_cfg["input_size"], is_training=True, scale=tuple(args.scale),
        auto_augment=args.aa, re_prob=args.reprob, re_mode=args.remode,
        interpolation=args.train_interpolation, mean=data_cfg["mean"], std=data_cfg["std"])
    evaluation = create_transform(
        data_cfg["input_size"], is_training=False, interpolation=data_cfg["interpolation"],
        mean=data_cfg["mean"], std=data_cfg["std"], crop_pct=data_cfg["crop_pct"])
    return train, evaluation


def build_dataset(args, split: str, transform) -> Dataset:
    """``split`` "train" or "eval" of the run's data; raises if its classes are not the run's."""
    if args.data_dir is None:
        return FashionMNIST("train" if split == "train" else "test", full=args.fashion_mnist_full,
                            transform=transform)
    folder = args.data_dir / ("train" if split == "train" else "val")
    dataset = SafeImageFolder(folder, transform=transform)
    expected = class_names(args)
    if dataset.classes != expected:
        missing = sorted(set(expected) - set(dataset.classes))
        extra = sorted(set(dataset.classes) - set(expected))
        raise SystemExit(f"{folder} and {args.data_dir / 'train'} hold different classes: "
                         f"missing {missing or 'none'}, extra {extra or 'none'}")
    return dataset


def _loader(dataset: Dataset, args, world: Distributed, **options) -> DataLoader:
    # The private generator keeps the loader's own draw (a seed for its processes, unused since
    # every item has its own) out of the global random stream.
    return DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                      collate_fn=collate_skipping_failed, worker_init_fn=_loader_process_init,
                      pin_memory=world.device.type == "cuda", generator=torch.Generator(),
                      **options)


def build_eval_loader(args, evaluation: Dataset, world: Distributed) -> DataLoader:
    # Each process evaluates its own disjoint share; the counts are summed, nothing is padded.
    shard = Subset(evaluation, range(world.rank, len(evaluation), world.world_size))
    return _loader(shard, args, world, shuffle=False)


def build_model(args, num_classes: int) -> torch.nn.Module:
    kwargs = dict(args.model_kwargs, num_classes=num_classes, drop_path_rate=args.drop_path)
    graph_kwargs = {k: v for k, v in dict(graph=args.graph, aggregator=args.aggregator).items()
                    if v is not None}
    try:
        return timm.create_model(args.model, **kwargs, **graph_kwargs)
    except TypeError as error:
        if graph_kwargs and any(f"'{k}'" in str(error) for k in graph_kwargs):
            raise SystemExit(f"--graph / --aggregator apply to graph models (attentionvig_*, "
                             f"vig_*); {args.model} does not take them") from error
        raise


def log_graphs(model: torch.nn.Module, img_size: int) -> None:
    """States the neighbours per node of every stage, so that nobody trains without a graph."""
    if not hasattr(model, "graph_summary"):
        log.info("graph: none (%s is not a graph model)", type(model).__name__)
        return
    for index, stage in enumerate(model.graph_summary(img_size)):
        details = ", ".join(f"{k}={v}" for k, v in stage.items() if k not in ("grid", "graph"))
        log.info("graph stage %d: %dx%d nodes, %s, %s", index + 1, *stage["grid"],
                 stage["graph"], details)


def build_task(args, model, num_classes: int, mixup_active: bool, device):
    criterion_kwargs = dict(smoothing=args.smoothing, soft_targets=mixup_active)
    if not args.teacher_model:
        return ClassificationTask(model, criterion_kwargs=criterion_kwargs, device=device,
                                  verbose=False)
    teacher = timm.create_model(args.teacher_model, num_classes=num_classes,
                                checkpoint_path=str(args.teacher_checkpoint))
    log.info("distillation: hard, teacher %s from %s", args.teacher_model,
             args.teacher_checkpoint)
    # DeiT's hard distillation: 0.5 CE(classifier, label) + 0.5 CE(distillation head, teacher).
    return TokenDistillationTask(model, teacher, criterion_kwargs=criterion_kwargs,
                                 distill_type="hard", task_loss_weight=0.5, device=device,
                                 verbose=False)


def data_config(args, model) -> Dict:
    config = timm.data.resolve_data_config({}, model=unwrap_model(model))
    config["input_size"] = (3, args.img_size, args.img_size)
    if args.crop_pct is not None:
        config["crop_pct"] = args.crop_pct
    return config


def autocast_for(args, device: torch.device):
    if not args.amp:
        return nullcontext()
    dtype = torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


# ---- evaluation -----------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, loader, world: Distributed, args) -> Dict[str, float]:
    model.eval()
    correct1 = correct5 = count = skipped = 0.0
    with stop_signals_held():
        batches = iter(loader)
    for images, targets, missing in batches:
        skipped += missing
        if not len(targets):
            continue
        images, targets = images.to(world.device), targets.to(world.device)
        with autocast_for(args, world.device):
            output = model(images)
        top1, top5 = accuracy(output.float(), targets, topk=(1, min(5, output.size(1))))
        correct1 += top1.item() * len(targets) / 100
        correct5 += top5.item() * len(targets) / 100
        count += len(targets)
    correct1, correct5, count, skipped = world.sum(correct1, correct5, count, skipped)
    if skipped:
        log.warning("evaluation skipped %d unreadable images", skipped)
    return dict(top1=100 * correct1 / max(count, 1), top5=100 * correct5 / max(count, 1),
                images=count)


def evaluate_checkpoint(args) -> Dict[str, float]:
    """``--eval-only``: the checkpoint's model, rebuilt from its own settings, with the weights it
    names (raw or EMA), on the evaluation set."""
    saved = load_checkpoint(args.checkpoint)
    args = settings_from_checkpoint(args, saved["config"], MODEL_FLAGS, "--eval-only")
    world = Distributed(args.device)
    try:
        model = build_model(args, len(saved["classes"]))
        model.load_state_dict(saved[saved["weights"]])
        model.to(world.device)
        evaluation = build_dataset(args, "eval", build_transforms(args, data_config(args,
                                                                                  model))[1])
        if list(evaluation.classes) != saved["classes"]:
            raise SystemExit(f"the evaluation data's classes differ from the checkpoint's "
                             f"({len(evaluation.classes)} and {len(saved['classes'])})")
        metrics = evaluate(model, build_eval_loader(args, evaluation, world), world, args)
        if world.main:
            print(f"{args.checkpoint} ({saved['weights']} weights, epoch {saved['epoch']}): "
                  f"top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}% on "
                  f"{int(metrics['images'])} images")
        return metrics
    finally:
        world.close()


# ---- training -------------------------------------------------------------------------------

class TrainingRun:
    """One training run at any step: the model, its EMA, optimizer, schedule and gradient scaler,
    where it is (``epoch`` in progress, ``step``: optimizer steps done in it), each process's
    random states and running totals of the epoch, the finished epochs' rows and the best result.
    :meth:`state_dict` is the checkpoint format, the one place where it is written."""

    def __init__(self, args, world: Distributed, classes: List[str], train_images: int, model,
                 task, optimizer, scheduler, scaler, ema, mixup, steps_per_epoch: int):
        self.args, self.world, self.classes, self.train_images = args, world, classes, train_images
        self.model, self.task, self.optimizer, self.scheduler = model, task, optimizer, scheduler
        self.scaler, self.ema, self.mixup = scaler, ema, mixup
        self.steps_per_epoch = steps_per_epoch
        self.epoch = self.step = 0
        self.totals = self._new_totals()
        self.history: List[Dict] = []
        self.best = dict(top1=-1.0, epoch=0, weights="model")

    @staticmethod
    def _new_totals() -> Dict[str, float]:
        return dict(loss=0.0, images=0.0, skipped=0.0, seconds=0.0)

    def state_dict(self, weights: str = "model") -> Dict:
        """The checkpoint; ``weights`` names the weights it is meant to be evaluated with
        (``"model"`` or ``"ema"``). A collective under torchrun: it gathers every process's
        random states and totals."""
        processes = self.world.gather(dict(rng=rng_states(), totals=dict(self.totals)))
        return dict(format=CHECKPOINT_FORMAT, config=run_config(self.args), classes=self.classes,
                    train_images=self.train_images, epoch=self.epoch, step=self.step,
                    history=self.history, best=self.best, weights=weights,
                    model=unwrap_model(self.model).state_dict(),
                    ema=self.ema.module.state_dict() if self.ema is not None else None,
                    optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                    scaler=self.scaler.state_dict(), processes=processes)

    def load_state_dict(self, state: Dict) -> None:
        if state["classes"] != self.classes or state["train_images"] != self.train_images:
            raise SystemExit(f"--resume: the run trained on {state['train_images']} images of "
                             f"{len(state['classes'])} classes; the data now has "
                             f"{self.train_images} images of {len(self.classes)} classes")
        if len(state["processes"]) != self.world.world_size:
            raise SystemExit(f"--resume: the run had {len(state['processes'])} process(es); "
                             f"continue it with as many (this one has {self.world.world_size})")
        unwrap_model(self.model).load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # a disabled scaler saves an empty state
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.history, self.best = state["history"], state["best"]
        mine = state["processes"][self.world.rank]
        set_rng_states(mine["rng"])
        self.totals = dict(mine["totals"])

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        """One optimizer step on a batch; advances :attr:`step` and the epoch's totals."""
        args = self.args
        if self.mixup is not None and len(targets) % 2:  # Mixup pairs images: drop an odd one
            images, targets = images[:-1], targets[:-1]
        if len(targets):
            images, targets = images.to(self.world.device), targets.to(self.world.device)
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            with autocast_for(args, self.world.device):
                loss = self.task(images, targets)["loss"]
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {self.epoch + 1}, step "
                                         f"{self.step + 1}; last.pth holds the last finished epoch")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if args.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                dispatch_clip_grad(self.model.parameters(), args.clip_grad, mode=args.clip_mode)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.totals["loss"] += loss.item() * len(targets)
            self.totals["images"] += len(targets)
        self.step += 1
        updates = self.epoch * self.steps_per_epoch + self.step
        self.scheduler.step_update(num_updates=updates)
        if self.ema is not None:
            self.ema.update(self.model, step=updates)

    def finish_epoch(self, eval_loader: DataLoader) -> Tuple[Dict, bool]:
        """Ends the epoch in progress: schedule, evaluation, its row, the best result. Returns
        the row and whether it is the new best."""
        self.scheduler.step(self.epoch + 1)
        loss, images, skipped, seconds = self.world.sum(*self.totals.values())
        if skipped:
            log.warning("epoch %d skipped %d unreadable training images", self.epoch + 1, skipped)
        if self.world.world_size > 1:
            distribute_bn(self.model, self.world.world_size)  # rank 0's BatchNorm statistics
        started = time.perf_counter()
        evaluation = evaluate(self.model, eval_loader, self.world, self.args)
        if self.ema is not None:
            ema = evaluate(self.ema.module, eval_loader, self.world, self.args)
            evaluation.update(ema_top1=ema["top1"], ema_top5=ema["top5"])
        evaluation.pop("images")
        evaluation["seconds"] = time.perf_counter() - started
        row = dict(epoch=self.epoch + 1, lr=self.optimizer.param_groups[0]["lr"],
                   train=dict(loss=loss / max(images, 1), skipped_images=skipped,
                              images_per_second=images / max(seconds / self.world.world_size,
                                                              1e-9),
                              seconds=seconds / self.world.world_size),
                   eval=evaluation)
        self.history.append(row)
        weights, top1 = max(("model", evaluation["top1"]),
                            ("ema", evaluation.get("ema_top1", -1.0)), key=lambda w: w[1])
        improved = top1 > self.best["top1"]
        if improved:
            self.best = dict(top1=top1, epoch=self.epoch + 1, weights=weights)
        self.epoch, self.step, self.totals = self.epoch + 1, 0, self._new_totals()
        return row, improved


def train(args) -> Dict:
    """Runs (or resumes) one training run; returns the summary also written to results.json."""
    saved = None
    if args.resume:
        saved = load_checkpoint(args.resume)
        args = settings_from_checkpoint(args, saved["config"],
                                        [k for k in saved["config"] if k not in RUN_LOCAL],
                                        "--resume")
        args.output = args.resume.parent
    output = args.output or Path("runs") / f"{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    args.output = output
    world = Distributed(args.device)
    try:
        if not world.main:
            return _train(args, world, output, saved, lock=None)
        make_folder(output)
        with RunLock(output) as lock:
            if not args.resume and any((output / n).exists() for n in ("last.pth",
                                                                       "results.json")):
                raise SystemExit(f"{output} already holds a run; resume it with --resume "
                                 f"{output / 'last.pth'} or choose another --output")
            return _train(args, world, output, saved, lock)
    finally:
        world.close()


def _train(args, world: Distributed, output: Path, saved: Optional[Dict],
           lock: Optional[RunLock]) -> Dict:
    _setup_logging(output / "train.log" if world.main else None)
    if lock is not None and lock.stale is not None:
        log.warning("took over the stale lock of pid %s on %s (started %s), which no longer runs",
                    lock.stale.get("pid"), lock.stale.get("host"), lock.stale.get("started"))
    log.info("command: %s", " ".join(sys.argv))
    log.info("output: %s; %d process(es) on %s", output, world.world_size, world.device)
    run, sampler, train_loader, eval_loader = build_run(args, world)
    if saved is not None:
        run.load_state_dict(saved)
        log.info("resumed from %s at epoch %d of %d, step %d of %d", args.resume, run.epoch + 1,
                 args.epochs, run.step, len(train_loader))

    writer = _tensorboard(output) if world.main else None
    with StopRequest() as stop:
        while run.epoch < args.epochs:
            if run.step == 0:  # an epoch's randomness is a function of (seed, epoch, process)
                random_seed(mix_seed(args.seed, run.epoch) % 2**31, world.rank)
            finished = _train_epoch(run, train_loader, sampler, stop)
            if finished:
                row, improved = run.finish_epoch(eval_loader)
                _log_epoch(run, row)
            state = run.state_dict()
            if world.main:
                with atomic_file(output / "last.pth") as temporary:
                    torch.save(state, temporary)
                if finished and improved:
                    with atomic_file(output / "best.pth") as temporary:
                        torch.save(dict(state, weights=run.best["weights"]), temporary)
                if finished:
                    _write_metrics(output / "metrics.csv", run.history)
                    _add_scalars(writer, row)
            if _stop_requested(stop, world):
                log.warning("checkpoint written at epoch %d, step %d; continue with --resume %s",
                            run.epoch + 1, run.step, output / "last.pth")
                raise SystemExit(128 + stop.signum)
    summary = dict(model=args.model, graph=args.graph, aggregator=args.aggregator,
                   epochs=args.epochs, final=run.history[-1], best=run.best,
                   train_seconds=sum(r["train"]["seconds"] + r["eval"]["seconds"]
                                     for r in run.history), config=run_config(args))
    if world.main:
        with atomic_file(output / "results.json") as temporary:
            temporary.write_text(json.dumps(summary, indent=2))
        _plot(output, run.history)
        writer.close()
    log.info("rank %d weights checksum %s", world.rank, weights_checksum(run.model))
    log.info("done: final top-1 %.2f%%, best %.2f%% (epoch %d, %s weights), %.0f s of training",
             summary["final"]["eval"]["top1"], run.best["top1"], run.best["epoch"],
             run.best["weights"], summary["train_seconds"])
    return summary


def build_run(args, world: Distributed):
    """A new run at its start: returns it, its sampler and its two loaders."""
    random_seed(args.seed, world.rank)
    classes = class_names(args)
    model = build_model(args, len(classes))
    if args.sync_bn and world.world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(world.device)
    train_transform, eval_transform = build_transforms(args, data_config(args, model))
    train_set = build_dataset(args, "train", train_transform)
    eval_set = build_dataset(args, "eval", eval_transform)
    log.info("data: %d training and %d evaluation images, %d classes (%s)", len(train_set),
             len(eval_set), len(classes), args.data_dir or "embedded Fashion-MNIST")
    log.info("model: %s, %.2f M parameters", args.model,
             sum(p.numel() for p in model.parameters()) / 1e6)
    log_graphs(model, args.img_size)

    sampler = EpochSampler(train_set, args.seed, world, args.aug_repeats)
    train_loader = _loader(SeededSamples(train_set), args, world, sampler=sampler,
                           drop_last=True)
    eval_loader = build_eval_loader(args, eval_set, world)
    if len(train_loader) == 0:
        raise SystemExit(f"{len(train_set)} training images make no batch of {args.batch_size} "
                         f"per process")
    global_batch = args.batch_size * world.world_size
    lr = args.lr if args.lr is not None else args.lr_base * global_batch / args.lr_base_size
    log.info("lr %.3g for a global batch of %d (%s)", lr, global_batch,
             "--lr" if args.lr is not None else
             f"{args.lr_base:g} * {global_batch} / {args.lr_base_size}")
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay)
    warmup = min(args.warmup_epochs, args.epochs - 1)
    if warmup != args.warmup_epochs:
        log.warning("warmup of %d epochs clamped to %d for a %d-epoch run", args.warmup_epochs,
                    warmup, args.epochs)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.epochs,
                                       warmup_epochs=warmup, warmup_lr=args.warmup_lr,
                                       min_lr=args.min_lr, step_on_epochs=False,
                                       updates_per_epoch=len(train_loader))
    mixup = (Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
                   label_smoothing=args.smoothing, num_classes=len(classes))
             if args.mixup > 0 or args.cutmix > 0 else None)
    task = build_task(args, model, len(classes), mixup is not None, world.device)
    if world.world_size > 1:
        task.prepare_distributed(device_ids=[world.device.index] if world.device.index is not None
                                 else None)
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    scaler = torch.amp.GradScaler(world.device.type,
                                  enabled=args.amp and args.amp_dtype == "float16")
    run = TrainingRun(args, world, classes, len(train_set), model, task, optimizer, scheduler,
                      scaler, ema, mixup, len(train_loader))
    return run, sampler, train_loader, eval_loader


def _train_epoch(run: TrainingRun, loader: DataLoader, sampler: EpochSampler,
                 stop: StopRequest) -> bool:
    """Trains from ``run.step`` to the end of the epoch; False if a stop request came first."""
    run.task.train()
    sampler.set_position(run.epoch, run.step * run.args.batch_size)
    with stop_signals_held():
        batches = iter(loader)
    started, images_before = time.perf_counter(), run.totals["images"]
    bar = tqdm(batches, total=len(loader), initial=run.step, leave=False, dynamic_ncols=True,
               desc=f"epoch {run.epoch + 1}/{run.args.epochs}", disable=not run.world.main)
    try:
        for images, targets, skipped in bar:
            if _stop_requested(stop, run.world):
                return False
            run.totals["skipped"] += skipped
            run.train_step(images, targets)
            elapsed = time.perf_counter() - started
            bar.set_postfix(lr=f"{run.optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{(run.totals['images'] - images_before) / elapsed:.0f}")
        return True
    finally:
        run.totals["seconds"] += time.perf_counter() - started
        bar.close()


def _stop_requested(stop: StopRequest, world: Distributed) -> bool:
    # Every process must stop at the same step, or the others wait forever in the next reduce.
    return world.sum(float(stop.requested))[0] > 0 if world.world_size > 1 else stop.requested


def weights_checksum(model: torch.nn.Module) -> str:
    """A short digest of every parameter and buffer, to compare runs bit for bit."""
    digest = hashlib.sha1()
    for tensor in unwrap_model(model).state_dict().values():
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# ---- what a person reads --------------------------------------------------------------------

def _setup_logging(log_file: Optional[Path]) -> None:
    for handler in logging.root.handlers[:]:  # a previous run in this process (the ablation)
        logging.root.removeHandler(handler)
        handler.close()
    setup_default_logging(log_path=str(log_file) if log_file else "")


def _log_epoch(run: TrainingRun, row: Dict) -> None:
    evaluation = row["eval"]
    log.info("epoch %d/%d: train loss %.4f, eval top-1 %.2f%% top-5 %.2f%%%s, lr %.2e, "
             "%.0f img/s, %.0f s", row["epoch"], run.args.epochs, row["train"]["loss"],
             evaluation["top1"], evaluation["top5"],
             f", EMA top-1 {evaluation['ema_top1']:.2f}%" if "ema_top1" in evaluation else "",
             row["lr"], row["train"]["images_per_second"],
             row["train"]["seconds"] + evaluation["seconds"])


def _write_metrics(path: Path, history: List[Dict]) -> None:
    """metrics.csv, one row per finished epoch, rewritten whole from the run's history."""
    with atomic_file(path) as temporary:
        for row in history:
            update_summary(row["epoch"], row["train"], row["eval"], temporary, lr=row["lr"],
                           write_header=row is history[0])


def _tensorboard(output: Path):
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(str(output / "tensorboard"))


def _add_scalars(writer, row: Dict) -> None:
    for part in ("train", "eval"):
        for key, value in row[part].items():
            writer.add_scalar(f"{part}/{key}", value, row["epoch"])
    writer.add_scalar("lr", row["lr"], row["epoch"])
    writer.flush()


def _plot(output: Path, history: List[Dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [row["train"]["loss"] for row in history], marker="o")
    loss_axis.set(xlabel="epoch", ylabel="training loss", title="loss")
    for key, label in (("top1", "top-1"), ("top5", "top-5"), ("ema_top1", "EMA top-1")):
        if key in history[-1]["eval"]:
            accuracy_axis.plot(epochs, [row["eval"][key] for row in history], marker="o",
                               label=label)
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy (%)", title="evaluation")
    accuracy_axis.legend()
    figure.tight_layout()
    with atomic_file(output / "curves.png") as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)
