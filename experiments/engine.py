"""The training engine shared by the programs of experiments/: imagenet.py (classification),
detection.py (Mask R-CNN), segmentation.py (Semantic FPN) and ablation.py.

A program describes its run (its arguments, data, model, loss and evaluation: a :class:`Setup`
with a :class:`Task`); the engine does the rest the same way for all of them: data-parallel
training over ``torchrun`` processes, per-image random states, one object that owns the run's
state (:class:`TrainingRun`, whose ``state_dict`` is the checkpoint), checkpoints written
atomically, exact resume, clean stops on signals, one run per output folder, and what a person
reads (log, metrics.csv, TensorBoard, curves.png, results.json). What a run guarantees:
docs/training.md.
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
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from tqdm import tqdm

import timm
from timm.data.distributed_sampler import RepeatAugSampler
from timm.optim import create_optimizer_v2
from timm.utils import (ModelEmaV3, dispatch_clip_grad, distribute_bn, init_distributed_device,
                        is_distributed_env, random_seed, setup_default_logging, unwrap_model,
                        update_summary)

import allocator
import attvig_pyg.models  # noqa: F401  (registers the models with timm)
from attvig_pyg.models.deployment import RUNTIMES, inference_model

log = logging.getLogger("engine")

# What a checkpoint holds: the version of TrainingRun.state_dict.
CHECKPOINT_FORMAT = 3
# Flags that say where or with what a run computes, not what it computes: a continued run may
# change them (the data folder may move; what the program records in Setup.info is checked).
RUN_LOCAL = ("workers", "device", "data_dir", "output", "resume", "eval_only", "checkpoint",
             "preset", "runtime")
# Flags that build the network: --eval-only takes them from the checkpoint.
MODEL_FLAGS = ("model", "graph", "aggregator", "model_kwargs", "drop_path")
FUSED_OPTIMIZERS = ("adam", "adamw")  # --opt names whose torch optimizer has a fused kernel
PATH_FLAGS = ("data_dir", "teacher_checkpoint", "output", "resume", "checkpoint", "pretrained")


# ---- arguments ------------------------------------------------------------------------------

def add_model_arguments(parser: argparse.ArgumentParser, model: str = "attentionvig_s") -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=model,
                       help="attentionvig_s|m|b, vig_ti, or any timm model name")
    group.add_argument("--graph", choices=["svga", "dagc", "knn"], default=None,
                       help="graph policy of a graph model (default: the model's)")
    group.add_argument("--aggregator", default=None,
                       help="aggregator of a graph model (AttentionViG: cross_attn, max_relative;"
                            " ViG: gin, sage, edge, max_relative, cross_attn)")
    group.add_argument("--model-kwargs", type=json.loads, default={},
                       help="more model constructor arguments, as JSON")
    group.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate")
    group.add_argument("--pretrained", type=Path, default=None,
                       help="initial weights: a checkpoint of these programs (the weights it "
                            "names), a timm state dict, or an official GreedyViG / Vision GNN "
                            "file (mapped; docs/checkpoints.md); classifiers of another size are "
                            "left out")


def add_training_arguments(parser: argparse.ArgumentParser, epochs: int, batch_size: int,
                           weight_decay: float) -> argparse._ArgumentGroup:
    """The optimization flags every program has (timm's train.py names); returns the group so
    that a program can add its own."""
    group = parser.add_argument_group("optimization")
    group.add_argument("--epochs", type=int, default=epochs)
    group.add_argument("--batch-size", type=int, default=batch_size, help="per process")
    group.add_argument("--opt", default="adamw")
    group.add_argument("--weight-decay", type=float, default=weight_decay)
    group.add_argument("--clip-grad", type=float, default=None, help="gradient norm clip")
    group.add_argument("--clip-mode", default="norm", choices=["norm", "value", "agc"])
    group.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=False,
                       help="keep and evaluate an exponential moving average of the weights")
    group.add_argument("--model-ema-decay", type=float, default=0.9998)
    group.add_argument("--amp", action="store_true", help="mixed precision (autocast)")
    group.add_argument("--amp-dtype", choices=["bfloat16", "float16"], default="bfloat16")
    group.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes")
    group.add_argument("--deterministic", action="store_true",
                       help="deterministic algorithms only (torch.use_deterministic_algorithms, "
                            "cuDNN without benchmarking): the same run gives the same weights "
                            "on a GPU too (docs/training.md names the slower ops)")
    group.add_argument("--torch-compile", nargs="?", const="inductor", default=None,
                       metavar="BACKEND",
                       help="train and evaluate the torch.compile'd model (default backend: "
                            "inductor); the first step's time, the compilation, is logged")
    group.add_argument("--workers", type=int, default=min(4, len(os.sched_getaffinity(0))),
                       help="data loading processes (4, or fewer on a machine with fewer cores "
                            "this process may use: more workers than cores only contend)")
    return group


def add_run_arguments(parser: argparse.ArgumentParser, presets: Dict[str, Dict],
                      runtimes: bool = False) -> None:
    """The run's flags; ``runtimes``: the program evaluates images of ``--img-size`` and offers
    ``--runtime`` for ``--eval-only``."""
    group = parser.add_argument_group("run")
    if presets:
        group.add_argument("--preset", choices=sorted(presets), default=None,
                           help="; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in
                                                                   values.items())
                                          for name, values in presets.items()))
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
    if runtimes:
        group.add_argument("--runtime", choices=RUNTIMES, default="eager",
                           help="for --eval-only: eager PyTorch, torch.compile with freezing, or "
                                "ONNX Runtime on the CPU (docs/deployment.md; which is fastest "
                                "for which model: docs/benchmarks.md)")
    group.add_argument("--device", default=None,
                       help="cpu, cuda or cuda:N (default: cuda if available); under torchrun "
                            "every process takes cuda:LOCAL_RANK")


def parse_args(build_parser: Callable[[], argparse.ArgumentParser], argv: Optional[List[str]],
               presets: Dict[str, Dict],
               problems: Callable[[argparse.Namespace], Iterable[str]] = lambda args: ()
               ) -> argparse.Namespace:
    """A program's command line, checked by the engine's rules and the program's ``problems``;
    ``args.given`` holds the flags it names explicitly (what ``--resume`` and ``--eval-only``
    compare with a checkpoint's settings)."""
    parser = build_parser()
    preset = getattr(parser.parse_known_args(argv)[0], "preset", None)
    if preset:
        parser.set_defaults(**presets[preset])
    args = parser.parse_args(argv)
    args.given = given_flags(build_parser, argv, vars(args), presets)
    for problem in [*_problems(args), *problems(args)]:
        parser.error(problem)
    return args


def given_flags(build_parser: Callable[[], argparse.ArgumentParser], argv: Optional[List[str]],
                dests: Iterable[str], presets: Dict[str, Dict]) -> set:
    """The settings named on the command line (a preset names all of its settings)."""
    unset = object()  # not a string: argparse would pass a string default through `type`
    parser = build_parser()
    parser.set_defaults(**{dest: unset for dest in dests})
    named = parser.parse_args(argv)
    given = {k for k, v in vars(named).items() if v is not unset}
    if "preset" in given:
        given |= set(presets[named.preset])
    return given


def _problems(args) -> Iterator[str]:
    runtime = getattr(args, "runtime", "eager")
    if runtime != "eager" and not args.eval_only:
        yield f"--runtime {runtime} is for --eval-only (training runs eager or --torch-compile)"
    if runtime == "onnxruntime" and (args.device or "cpu") != "cpu":
        yield "--runtime onnxruntime runs on the CPU: --device cpu"
    if runtime == "onnxruntime" and args.amp:
        yield "--runtime onnxruntime computes in float32: drop --amp"
    if args.eval_only and args.checkpoint is None:
        yield "--eval-only needs --checkpoint PATH"
    if args.eval_only and args.resume:
        yield "--eval-only and --resume exclude each other"
    for flag, path in (("--checkpoint", args.checkpoint), ("--resume", args.resume),
                       ("--pretrained", args.pretrained)):
        if path is not None and not path.is_file():
            yield f"{flag}: no such file: {path}"
    if args.resume and "output" in args.given and args.output.resolve() != \
            args.resume.parent.resolve():
        yield (f"--resume continues a run in its own folder ({args.resume.parent}); "
               f"--output {args.output} names another")
    for flag, value, low in (("--epochs", args.epochs, 1), ("--workers", args.workers, 0),
                             ("--seed", args.seed, 0), ("--batch-size", args.batch_size, 1)):
        if value < low:
            yield f"{flag} must be at least {low} (got {value})"
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
    # A setting added to the program after the run started takes this command's default.
    settings = argparse.Namespace(**{**vars(args), **saved})
    for key in args.given:
        setattr(settings, key, getattr(args, key))
    for key in PATH_FLAGS:
        if getattr(settings, key, None) is not None:
            setattr(settings, key, Path(getattr(settings, key)))
    settings.eval_only, settings.checkpoint, settings.resume = (args.eval_only, args.checkpoint,
                                                                args.resume)
    settings.given = args.given
    return settings


def series_run(folder: Path, argv: List[str],
               parse: Callable[[List[str]], argparse.Namespace]) -> Optional[argparse.Namespace]:
    """One run of a series (a table of runs, each in its own folder): the settings that start
    ``argv``'s run in ``folder`` or continue it there, or None if it has finished. A finished
    run trained with other settings than ``argv``'s is refused (an interrupted one is checked
    by --resume)."""
    if (folder / "results.json").exists():
        saved = json.loads((folder / "results.json").read_text()).get("config")
        if saved is None:
            raise SystemExit(f"{folder}/results.json states no settings (an older version of "
                             "this program wrote it); delete the folder to train the run again")
        current = parse([*argv, "--output", str(folder)])
        differences = config_differences(saved, current,
                                         [key for key in saved if key not in RUN_LOCAL])
        if differences:
            raise SystemExit(f"{folder} holds a finished run with other settings than this "
                             "command:\n  " + "\n  ".join(differences) + "\nUse another "
                             "--output, or delete the folder to train the run again")
        return None
    if (folder / "last.pth").exists():
        return parse([*argv, "--resume", str(folder / "last.pth")])
    return parse([*argv, "--output", str(folder)])


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
        umask = os.umask(0)
        os.umask(umask)
        temporary.chmod(0o666 & ~umask)  # the permissions of a file made by open(), not mkstemp's
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_checkpoint(path: Path, program: str) -> Dict:
    """A checkpoint of ``program``, loaded with ``weights_only=True``; anything else is refused
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
    if state.get("program") != program:
        raise SystemExit(f"{path} is a checkpoint of experiments/{state.get('program')}.py, not "
                         f"of experiments/{program}.py (its weights can seed this program: "
                         "--pretrained)")
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

    def broadcast(self, value):
        """Rank 0's ``value`` on every process (a collective)."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextmanager
    def agreeing(self) -> Iterator[None]:
        """Runs the block on every process and agrees on its outcome: if it fails on any
        process (a refusal, an error), every process stops here, before the others would wait
        forever in a collective or crash in one. Rank 0 exits with the first failure's message
        (or its own error); the others exit quietly, with status 1 unless they failed themselves."""
        error = None
        try:
            yield
        except (Exception, SystemExit) as caught:
            error = caught
        if self.world_size == 1:
            if error is not None:
                raise error
            return
        failures = [(rank, message) for rank, message in enumerate(self.gather(
            None if error is None else _failure_message(error))) if message is not None]
        if not failures:
            return
        if self.main and error is None:
            rank, message = failures[0]
            raise SystemExit(f"rank {rank} stopped before training: {message}")
        if self.main or not isinstance(error, SystemExit):
            raise error  # (a non-main rank's own traceback is worth showing)
        raise SystemExit(1)

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _failure_message(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        return str(error.code)
    return f"{type(error).__name__}: {error}"


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


# ---- data, models, weights -----------------------------------------------------------------

def make_loader(dataset: Dataset, args, world: Distributed, collate: Callable,
                **options) -> DataLoader:
    """A loader whose processes ignore stop signals. The private generator keeps the loader's own
    draw (a seed for its processes, unused since every item has its own) out of the global random
    stream. ``collate`` returns a batch whose last element is the number of items skipped."""
    return DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                      collate_fn=collate, worker_init_fn=_loader_process_init,
                      pin_memory=world.device.type == "cuda", generator=torch.Generator(),
                      **options)


def eval_loader(evaluation: Dataset, args, world: Distributed, collate: Callable) -> DataLoader:
    """Each process evaluates its own disjoint share; programs sum the counts, nothing is padded."""
    shard = Subset(evaluation, range(world.rank, len(evaluation), world.world_size))
    return make_loader(shard, args, world, collate, shuffle=False)


def batches(loader: DataLoader) -> Iterator:
    """Iterates a loader whose processes start with the stop signals held back."""
    with stop_signals_held():
        iterator = iter(loader)
    return iterator


def autocast_for(args, device: torch.device):
    if not args.amp:
        return nullcontext()
    dtype = torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def create_model(args, **kwargs) -> torch.nn.Module:
    """The timm model a run's model flags describe, with the program's ``kwargs``."""
    kwargs = dict(args.model_kwargs, drop_path_rate=args.drop_path, **kwargs)
    graph_kwargs = {k: v for k, v in dict(graph=args.graph, aggregator=args.aggregator).items()
                    if v is not None}
    try:
        return timm.create_model(args.model, **kwargs, **graph_kwargs)
    except TypeError as error:
        if graph_kwargs and any(f"'{k}'" in str(error) for k in graph_kwargs):
            raise SystemExit(f"--graph / --aggregator apply to graph models (attentionvig_*, "
                             f"vig_*); {args.model} does not take them") from error
        raise


def log_graphs(model: torch.nn.Module, img_size) -> None:
    """States the neighbours per node of every stage, so that nobody trains without a graph."""
    if not hasattr(model, "graph_summary"):
        log.info("graph: none (%s is not a graph model)", type(model).__name__)
        return
    for index, stage in enumerate(model.graph_summary(img_size)):
        details = ", ".join(f"{k}={v}" for k, v in stage.items() if k not in ("grid", "graph"))
        log.info("graph stage %d: %dx%d nodes, %s, %s", index + 1, *stage["grid"],
                 stage["graph"], details)


def load_weights(path: Path) -> Dict[str, torch.Tensor]:
    """The weights of a file: a checkpoint of any program here (the weights it names, raw or
    EMA), or a state dict from elsewhere (timm's, an official GreedyViG / Vision GNN file, with
    their ``model`` / ``state_dict`` wrappers and ``module.`` prefixes), loaded with
    ``weights_only=True``."""
    from attvig_pyg.models.checkpoints import unwrap_state_dict

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (every way a file can fail to hold weights)
        if "Weights only load failed" in str(error):
            raise SystemExit(f"{path}: refused: it holds Python objects besides tensors, "
                             "numbers and strings, and unpickling them could run arbitrary "
                             "code") from None
        raise SystemExit(f"{path} holds no readable weights: {type(error).__name__}: "
                         f"{str(error)[:200]}") from None
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        return state[state["weights"]]
    try:
        return unwrap_state_dict(state)
    except ValueError as error:
        raise SystemExit(f"{path}: {error}") from None


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of an AttentionViG fine-tuned for dense prediction (detection, segmentation)."""
    add_model_arguments(parser)
    group = parser.add_argument_group("backbone fine-tuning (the paper: beta frozen, Table 9)")
    group.add_argument("--train-beta", action="store_true",
                       help="let the cross-attention betas learn (default: frozen, as the paper)")
    group.add_argument("--trainable-stages", type=int, default=5,
                       help="stages trained, counted from the last (5: every layer, the stem "
                            "too, as GreedyViG)")
    group.add_argument("--norm", choices=["eval", "frozen", "train"], default="eval",
                       help="BatchNorm while fine-tuning: statistics fixed (eval, GreedyViG's "
                            "norm_eval), frozen entirely, or trained")


def backbone_problems(args) -> Iterator[str]:
    if not 0 <= args.trainable_stages <= 5:
        yield f"--trainable-stages must be in 0..5 (got {args.trainable_stages})"


def load_pretrained(model: torch.nn.Module, path: Path, classifier: bool = False) -> None:
    """Loads ``path``'s weights (:func:`load_weights`) into ``model``, official GreedyViG and
    Vision GNN files mapped by the model family's ``checkpoint_filter_fn``. The classifiers
    load where they fit; without ``classifier`` they may be missing or of another size (a
    backbone, another number of classes). Anything else that does not fit is an error."""
    from attvig_pyg.models import AttentionViG, ViG, greedyvig, vig
    from attvig_pyg.models.checkpoints import check_fits

    weights = load_weights(path)
    family = {AttentionViG: greedyvig, ViG: vig}.get(type(model))
    heads = () if classifier else _classifiers(model)
    try:
        if family is not None:
            weights = family.checkpoint_filter_fn(weights, model)
        check_fits(weights, model, str(path), classifiers=heads)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    expected = model.state_dict()
    model.load_state_dict({k: v for k, v in weights.items()
                           if k in expected and expected[k].shape == v.shape},
                          strict=not heads)
    log.info("weights from %s", path)


def _classifiers(model: torch.nn.Module) -> Tuple[str, ...]:
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def pretrained_backbone(args) -> torch.nn.Module:
    """The classification model the backbone flags describe (an AttentionViG, GreedyViG
    included), with --pretrained's weights (its classifiers left out)."""
    from attvig_pyg.models import AttentionViG

    model = create_model(args, num_classes=0)
    if not isinstance(model, AttentionViG):
        raise SystemExit(f"--model {args.model}: dense prediction takes an AttentionViG backbone "
                         "(attentionvig_s/m/b, greedyvig_s/m/b)")
    if args.pretrained is not None:
        load_pretrained(model, args.pretrained)
    return model


# ---- a program's run ------------------------------------------------------------------------

class Task:
    """What a program computes: the loss of a training batch and the evaluation of a model. The
    engine handles everything around them. ``score`` names the evaluation metric that chooses
    best.pth (higher is better)."""

    score: str = ""

    def train(self) -> None:
        """Puts the modules that train in training mode."""
        raise NotImplementedError

    def loss(self, batch, device: torch.device) -> Tuple[torch.Tensor, int]:
        """The loss of a collated batch (without its skipped count) and how many items it
        averaged over (0: nothing to learn from, the step is skipped)."""
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, loader: DataLoader, world: Distributed,
                 args) -> Dict[str, float]:
        """Metrics of ``model`` on this process's share of the evaluation data, summed over all
        processes."""
        raise NotImplementedError

    def prepare_distributed(self, device_ids: Optional[List[int]]) -> None:
        """Wraps what trains in DistributedDataParallel."""
        raise NotImplementedError

    def compile(self, backend: str) -> torch.nn.Module:
        """Compiles what trains (before DistributedDataParallel, as timm's tasks do); returns
        the compiled model for evaluation."""
        raise NotImplementedError



class ModelTask(Task):
    """A task that trains one module, ``self.model``, through ``self.trained`` (the module itself,
    or its compiled or DistributedDataParallel wrapper); subclasses give ``loss`` and
    ``evaluate``."""

    def __init__(self, model: torch.nn.Module):
        self.model = self.trained = model

    def train(self) -> None:
        self.trained.train()

    def prepare_distributed(self, device_ids: Optional[List[int]]) -> None:
        self.trained = torch.nn.parallel.DistributedDataParallel(self.trained,
                                                                 device_ids=device_ids)

    def compile(self, backend: str) -> torch.nn.Module:
        self.trained = torch.compile(self.model, backend=backend)
        return self.trained

@dataclass
class Setup:
    """What a program builds for a run; the engine trains it. ``model`` is the network whose
    weights checkpoints hold; ``info`` what a resumed run must find again (class names, data
    size); ``schedule(optimizer, updates_per_epoch)`` gives the timm scheduler."""

    model: torch.nn.Module
    task: Task
    train_set: Dataset
    eval_set: Dataset
    collate: Callable
    lr: float
    schedule: Callable
    info: Dict = field(default_factory=dict)
    aug_repeats: int = 0
    eval_collate: Optional[Callable] = None  # default: collate


class TrainingRun:
    """One training run at any step: the model, its EMA, optimizer, schedule and gradient scaler,
    where it is (``epoch`` in progress, ``step``: optimizer steps done in it), each process's
    random states and running totals of the epoch, the finished epochs' rows and the best result.
    :meth:`state_dict` is the checkpoint format, the one place where it is written."""

    def __init__(self, program: str, args, world: Distributed, setup: Setup, optimizer,
                 scheduler, scaler, ema, steps_per_epoch: int):
        self.program, self.args, self.world, self.setup = program, args, world, setup
        self.model, self.task = setup.model, setup.task
        self.eval_model = setup.model  # the compiled model with --torch-compile
        self.compile_logged = False
        self.optimizer, self.scheduler, self.scaler, self.ema = optimizer, scheduler, scaler, ema
        self.steps_per_epoch = steps_per_epoch
        self.epoch = self.step = 0
        self.totals = self._new_totals()
        self.history: List[Dict] = []
        self.best = dict(score=-math.inf, epoch=0, weights="model")

    @staticmethod
    def _new_totals() -> Dict[str, float]:
        return dict(loss=0.0, items=0.0, skipped=0.0, seconds=0.0)

    def state_dict(self, weights: str = "model") -> Dict:
        """The checkpoint; ``weights`` names the weights it is meant to be evaluated with
        (``"model"`` or ``"ema"``). A collective under torchrun: it gathers every process's
        random states and totals."""
        processes = self.world.gather(dict(rng=rng_states(), totals=dict(self.totals)))
        return dict(format=CHECKPOINT_FORMAT, program=self.program, config=run_config(self.args),
                    info=self.setup.info, epoch=self.epoch, step=self.step,
                    history=self.history, best=self.best, weights=weights,
                    model=unwrap_model(self.model).state_dict(),
                    ema=self.ema.module.state_dict() if self.ema is not None else None,
                    optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                    scaler=self.scaler.state_dict(), processes=processes)

    def load_state_dict(self, state: Dict) -> None:
        if state["info"] != self.setup.info:
            differences = {k: (state["info"].get(k), self.setup.info.get(k))
                           for k in {*state["info"], *self.setup.info}
                           if state["info"].get(k) != self.setup.info.get(k)}
            raise SystemExit("--resume: the data differs from the run's: " + "; ".join(
                f"{key}: the run had {_short(old)}, now {_short(new)}"
                for key, (old, new) in sorted(differences.items())))
        if len(state["processes"]) != self.world.world_size:
            raise SystemExit(f"--resume: the run had {len(state['processes'])} process(es); "
                             f"continue it with as many (this one has {self.world.world_size})")
        unwrap_model(self.model).load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        _match_parameter_layouts(self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # a disabled scaler saves an empty state
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.history, self.best = state["history"], state["best"]
        mine = state["processes"][self.world.rank]
        set_rng_states(mine["rng"])
        self.totals = dict(mine["totals"])

    def train_step(self, batch) -> None:
        """One optimizer step on a collated batch; advances :attr:`step` and the totals."""
        args, device = self.args, self.world.device
        with autocast_for(args, device):
            loss, items = self.task.loss(batch, device)
        if items:
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {self.epoch + 1}, step "
                                         f"{self.step + 1}; last.pth holds the last checkpoint")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if args.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                dispatch_clip_grad(self.model.parameters(), args.clip_grad, mode=args.clip_mode)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.totals["loss"] += loss.item() * items
            self.totals["items"] += items
        self.step += 1
        updates = self.epoch * self.steps_per_epoch + self.step
        self.scheduler.step_update(num_updates=updates)
        if self.ema is not None:
            self.ema.update(self.model, step=updates)

    def finish_epoch(self, loader: DataLoader) -> Tuple[Dict, bool]:
        """Ends the epoch in progress: schedule, evaluation, its row, the best result. Returns
        the row and whether it is the new best."""
        loss, items, skipped, seconds = self.world.sum(*self.totals.values())
        if skipped:
            log.warning("epoch %d skipped %d unreadable training items", self.epoch + 1, skipped)
        if self.world.world_size > 1:
            distribute_bn(self.model, self.world.world_size)  # rank 0's BatchNorm statistics
        started = time.perf_counter()
        evaluation = self.task.evaluate(self.eval_model, loader, self.world, self.args)
        if self.ema is not None:
            ema = self.task.evaluate(self.ema.module, loader, self.world, self.args)
            evaluation.update({f"ema_{key}": value for key, value in ema.items()})
        evaluation["seconds"] = time.perf_counter() - started
        # The score is the metric of a plateau schedule; every other schedule ignores it.
        self.scheduler.step(self.epoch + 1, evaluation[self.task.score])
        seconds /= self.world.world_size
        row = dict(epoch=self.epoch + 1, lr=self.optimizer.param_groups[0]["lr"],
                   train=dict(loss=loss / max(items, 1), skipped_items=skipped,
                              items_per_second=items / max(seconds, 1e-9), seconds=seconds),
                   eval=evaluation)
        self.history.append(row)
        score = self.task.score
        weights, value = max(("model", evaluation[score]),
                             ("ema", evaluation.get(f"ema_{score}", -math.inf)),
                             key=lambda candidate: candidate[1])
        improved = value > self.best["score"]
        if improved:
            self.best = dict(score=value, epoch=self.epoch + 1, weights=weights)
        self.epoch, self.step, self.totals = self.epoch + 1, 0, self._new_totals()
        return row, improved


def _match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Gives every per-parameter state tensor its parameter's memory layout: torch's fused
    AdamW kernel walks a parameter and its moments as flat memory, so a channels-last weight
    (DDP runs) with moments in another layout would be updated with misplaced values."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == parameter.shape and \
                        value.stride() != parameter.stride():
                    state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) < 80 else text[:77] + "..."


def train(program: str, args, build_run: Callable[..., Setup]) -> Dict:
    """Runs (or resumes) one training run of ``program`` (its name in checkpoints) with the
    :class:`Setup` ``build_run(args, world)`` gives; returns the summary also written to
    results.json."""
    saved = None
    if args.resume:
        saved = load_checkpoint(args.resume, program)
        args = settings_from_checkpoint(args, saved["config"],
                                        [k for k in saved["config"] if k not in RUN_LOCAL],
                                        "--resume")
        args.output = args.resume.parent
    output = args.output or Path("runs") / f"{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    args.output = output
    world = Distributed(args.device)
    try:
        with ExitStack() as held:
            lock = None
            with world.agreeing():  # rank 0 owns the folder; every rank stops if it refuses
                if world.main:
                    make_folder(output)
                    lock = held.enter_context(RunLock(output))
                    if not args.resume and any((output / n).exists() for n in ("last.pth",
                                                                               "results.json")):
                        raise SystemExit(f"{output} already holds a run; resume it with --resume "
                                         f"{output / 'last.pth'} or choose another --output")
            with deterministic_algorithms(args.deterministic):
                return _train(program, args, world, output, saved, build_run, lock)
    finally:
        world.close()


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``--deterministic``: torch's deterministic algorithms only (an op without one raises),
    cuDNN without autotuning, and the cuBLAS workspace setting CUDA needs for determinism;
    the previous settings are restored afterwards (a program may run several runs)."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1:]


def _train(program: str, args, world: Distributed, output: Path, saved: Optional[Dict],
           build_run: Callable[..., Setup], lock: Optional[RunLock]) -> Dict:
    _setup_logging(output / "train.log" if world.main else None)
    if lock is not None and lock.stale is not None:
        log.warning("took over the stale lock of pid %s on %s (started %s), which no longer runs",
                    lock.stale.get("pid"), lock.stale.get("host"), lock.stale.get("started"))
    log.info("command: %s", " ".join(sys.argv))
    log.info("output: %s; %d process(es) on %s", output, world.world_size, world.device)
    if not allocator.apply(allocator.FAST):  # freed memory reused, not faulted in anew
        log.info("not glibc: the allocator keeps its own settings")
    random_seed(args.seed, world.rank)
    with world.agreeing():  # data, model, checkpoint: a failure anywhere stops every rank
        setup = build_run(args, world)
        run, sampler, train_loader, evaluation_loader = _prepare(program, args, world, setup)
        if saved is not None:
            run.load_state_dict(saved)
    if saved is not None:
        log.info("resumed from %s at epoch %d of %d, step %d of %d", args.resume, run.epoch + 1,
                 args.epochs, run.step, len(train_loader))
    if world.world_size > 1:
        setup.task.prepare_distributed([world.device.index] if world.device.index is not None
                                       else None)

    writer = _tensorboard(output) if world.main else None
    with StopRequest() as stop:
        while run.epoch < args.epochs:
            if run.step == 0:  # an epoch's randomness is a function of (seed, epoch, process)
                random_seed(mix_seed(args.seed, run.epoch) % 2**31, world.rank)
            finished = _train_epoch(run, train_loader, sampler, stop)
            if finished:
                row, improved = run.finish_epoch(evaluation_loader)
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
    summary = dict(program=program, model=args.model, graph=args.graph,
                   aggregator=args.aggregator, epochs=args.epochs, final=run.history[-1],
                   best=dict(run.best, metric=setup.task.score),
                   train_seconds=sum(r["train"]["seconds"] + r["eval"]["seconds"]
                                     for r in run.history), config=run_config(args))
    if world.main:
        with atomic_file(output / "results.json") as temporary:
            temporary.write_text(json.dumps(summary, indent=2))
        _plot(output, run.history, setup.task.score)
        writer.close()
    log.info("rank %d weights checksum %s", world.rank, weights_checksum(run.model))
    log.info("done: final %s %.2f, best %.2f (epoch %d, %s weights), %.0f s of training",
             setup.task.score, summary["final"]["eval"][setup.task.score], run.best["score"],
             run.best["epoch"], run.best["weights"], summary["train_seconds"])
    return summary


def _prepare(program: str, args, world: Distributed, setup: Setup):
    """The run of a Setup at its start: the run, its sampler and its two loaders."""
    model = setup.model
    if args.sync_bn and world.world_size > 1:
        model = setup.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(world.device)
    if world.world_size > 1:
        # DDP lays its gradient buckets out like the parameters, and the convs' weight
        # gradients come in the channels-last layout the networks compute in: 4-d weights take
        # it too (else a copy per bucket per step, and a warning at every step).
        model.to(memory_format=torch.channels_last)
    log.info("data: %d training and %d evaluation items", len(setup.train_set),
             len(setup.eval_set))
    log.info("model: %s, %.2f M parameters (%.2f M trainable)", args.model,
             sum(p.numel() for p in model.parameters()) / 1e6,
             sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6)
    sampler = EpochSampler(setup.train_set, args.seed, world, setup.aug_repeats)
    train_loader = make_loader(SeededSamples(setup.train_set), args, world, setup.collate,
                               sampler=sampler, drop_last=True)
    evaluation_loader = eval_loader(setup.eval_set, args, world,
                                    setup.eval_collate or setup.collate)
    if len(train_loader) == 0:
        raise SystemExit(f"{len(setup.train_set)} training items make no batch of "
                         f"{args.batch_size} per process")
    # torch's fused Adam(W) kernel: on the CPU the default per-parameter loop took 5-20x the
    # time of a fused step for AttentionViG-S's 12 M parameters (docs/benchmarks.md).
    fused = dict(fused=True) if args.opt.lower() in FUSED_OPTIMIZERS else {}
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=setup.lr,
                                    weight_decay=args.weight_decay, **fused)
    scheduler = setup.schedule(optimizer, len(train_loader))
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    eval_model = model
    if args.torch_compile:
        log.info("torch.compile with backend %s: the first training step compiles",
                 args.torch_compile)
        eval_model = setup.task.compile(args.torch_compile)
    scaler = torch.amp.GradScaler(world.device.type,
                                  enabled=args.amp and args.amp_dtype == "float16")
    run = TrainingRun(program, args, world, setup, optimizer, scheduler, scaler, ema,
                      len(train_loader))
    run.eval_model = eval_model
    return run, sampler, train_loader, evaluation_loader


def _train_epoch(run: TrainingRun, loader: DataLoader, sampler: EpochSampler,
                 stop: StopRequest) -> bool:
    """Trains from ``run.step`` to the end of the epoch; False if a stop request came first."""
    run.task.train()
    sampler.set_position(run.epoch, run.step * run.args.batch_size)
    started, items_before = time.perf_counter(), run.totals["items"]
    bar = tqdm(batches(loader), total=len(loader), initial=run.step, leave=False,
               dynamic_ncols=True, desc=f"epoch {run.epoch + 1}/{run.args.epochs}",
               disable=not run.world.main)
    try:
        for *batch, skipped in bar:
            if _stop_requested(stop, run.world):
                return False
            run.totals["skipped"] += skipped
            step_started = time.perf_counter()
            run.train_step(batch)
            if run.args.torch_compile and not run.compile_logged:
                run.compile_logged = True
                log.info("first step of this process (compilation included): %.1f s",
                         time.perf_counter() - step_started)
            elapsed = time.perf_counter() - started
            bar.set_postfix(lr=f"{run.optimizer.param_groups[0]['lr']:.2e}",
                            items_s=f"{(run.totals['items'] - items_before) / elapsed:.1f}")
        return True
    finally:
        run.totals["seconds"] += time.perf_counter() - started
        bar.close()


def _stop_requested(stop: StopRequest, world: Distributed) -> bool:
    # Every process must stop at the same step, or the others wait forever in the next reduce.
    return world.sum(float(stop.requested))[0] > 0 if world.world_size > 1 else stop.requested


def evaluate_checkpoint(program: str, args, model_flags: Iterable[str],
                        build_evaluation: Callable) -> Tuple[Dict[str, float], Optional[Dict]]:
    """``--eval-only``: the checkpoint's model, rebuilt from its own settings with
    ``build_evaluation(args, world, info) -> (model, task, eval_set, collate)``, with the weights
    it names (raw or EMA) and its BatchNorm folded for inference, on the evaluation data. Weights
    from elsewhere (official GreedyViG / Vision GNN files, timm state dicts) go into the model the
    flags describe (``info`` None). Returns the metrics and the checkpoint (None for those)."""
    saved = load_checkpoint(args.checkpoint, program) if is_checkpoint(args.checkpoint) else None
    if saved is not None:
        args = settings_from_checkpoint(args, saved["config"], model_flags, "--eval-only")
    world = Distributed(args.device)
    try:
        model, task, evaluation, collate = build_evaluation(
            args, world, saved["info"] if saved is not None else None)
        if saved is not None:
            model.load_state_dict(saved[saved["weights"]])
        else:
            load_pretrained(model, args.checkpoint, classifier=True)
        model.to(world.device)
        # BatchNorm folded, in the runtime of --runtime (programs of --img-size images).
        runtime = getattr(args, "runtime", "eager")
        log.info("evaluating in runtime %s", runtime)
        model = inference_model(model, runtime, (3, args.img_size, args.img_size)
                                if runtime == "onnxruntime" else None)
        return task.evaluate(model, eval_loader(evaluation, args, world, collate), world,
                             args), saved
    finally:
        world.close()


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a checkpoint of these programs (or unreadable: it then fails where
    it is loaded, with the reason), not a file of weights from elsewhere."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 (load_checkpoint reports it)
        return True
    return isinstance(state, dict) and "format" in state


def main(program: str, args, build_run: Callable[..., Setup], build_evaluation: Callable,
         describe: Callable[[Dict[str, float]], str], data: str) -> Dict:
    """A program's command: ``--eval-only`` evaluates a checkpoint, otherwise a run trains; the
    outcome is printed with ``describe(metrics)`` and ``data`` (what was evaluated) and returned
    (the metrics, or the run's summary)."""
    if args.eval_only:
        metrics, saved = evaluate_checkpoint(program, args, MODEL_FLAGS, build_evaluation)
        origin = (f"{saved['weights']} weights, epoch {saved['epoch']}" if saved is not None
                  else f"weights from elsewhere in {args.model}")
        runtime = getattr(args, "runtime", "eager")
        print(f"{args.checkpoint} ({origin}): {describe(metrics)} on {data} (runtime {runtime})")
        return metrics
    summary = train(program, args, build_run)
    best = summary["best"]
    print(f"{args.model} after {summary['epochs']} epochs ({summary['train_seconds'] / 60:.1f} "
          f"min of training): {describe(summary['final']['eval'])} on {data}; best "
          f"{best['metric']} {best['score']:.2f} at epoch {best['epoch']} ({best['weights']} "
          "weights)")
    return summary


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
    evaluation = {k: v for k, v in row["eval"].items() if k != "seconds"}
    log.info("epoch %d/%d: train loss %.4f, eval %s, lr %.2e, %.1f items/s, %.0f s",
             row["epoch"], run.args.epochs, row["train"]["loss"],
             ", ".join(f"{k} {v:.2f}" for k, v in evaluation.items()), row["lr"],
             row["train"]["items_per_second"], row["train"]["seconds"] + row["eval"]["seconds"])


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


def _plot(output: Path, history: List[Dict], score: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [row["train"]["loss"] for row in history], marker="o")
    loss_axis.set(xlabel="epoch", ylabel="training loss", title="loss")
    metrics = [k for k in history[-1]["eval"] if k != "seconds"]
    for key in [score, *(k for k in metrics if k != score)][:4]:
        metric_axis.plot(epochs, [row["eval"][key] for row in history], marker="o", label=key)
    metric_axis.set(xlabel="epoch", ylabel="evaluation", title="evaluation")
    metric_axis.legend()
    figure.tight_layout()
    with atomic_file(output / "curves.png") as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)
