"""The training engine shared by experiments/imagenet.py and experiments/ablation.py.

One run: data (ImageNet folder layout or the embedded Fashion-MNIST), any timm model (AttentionViG
and the ViG harness register themselves on ``import attvig_pyg``), the paper's recipe built from
timm's parts (transforms, Mixup/CutMix, optimizer factory with weight-decay groups, cosine
schedule with warmup, EMA, classification and DeiT hard-distillation tasks), data-parallel
training over ``torchrun`` processes, complete checkpoints written atomically every epoch, resume,
and a clean stop on SIGTERM or Ctrl-C. Flag names follow timm's train.py.
"""
import argparse
import csv
import hashlib
import json
import logging
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import timm
from timm.data import Mixup, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.task import ClassificationTask, TokenDistillationTask
from timm.utils import ModelEmaV3, accuracy, dispatch_clip_grad, unwrap_model

import attvig_pyg  # noqa: F401  (registers AttentionViG and the ViG harness with timm)
from attvig_pyg.data import FashionMNIST, SafeImageFolder, collate_skipping_failed

log = logging.getLogger("engine")

# Settings for 28x28 Fashion-MNIST upscaled to 32 px on a 2-core CPU; explicit flags override.
PRESETS = {
    "cpu-demo": dict(model="attentionvig_s", img_size=32, epochs=4, batch_size=64,
                     lr=2e-3, warmup_epochs=1, weight_decay=0.05, smoothing=0.1, aa=None,
                     mixup=0.0, cutmix=0.0, reprob=0.0, drop_path=0.05, scale=(0.6, 1.0),
                     crop_pct=1.0, model_ema=False, workers=2),
}


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
    group.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    group.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    group.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
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
                       help="run folder (default: runs/<model>-<time>)")
    group.add_argument("--resume", type=Path, default=None,
                       help="a last.pth to continue from, into its own folder")
    group.add_argument("--seed", type=int, default=42)
    group.add_argument("--eval-only", action="store_true",
                       help="only evaluate --checkpoint on the evaluation set")
    group.add_argument("--checkpoint", type=Path, default=None, help="weights for --eval-only")
    group.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    if args.aa is not None and args.aa.lower() == "none":
        args.aa = None
    if args.eval_only and args.checkpoint is None:
        parser.error("--eval-only needs --checkpoint PATH")
    if bool(args.teacher_model) != bool(args.teacher_checkpoint):
        parser.error("distillation needs both --teacher-model and --teacher-checkpoint (a local "
                     "file; nothing is downloaded)")
    for flag, path in (("--checkpoint", args.checkpoint), ("--resume", args.resume),
                       ("--teacher-checkpoint", args.teacher_checkpoint)):
        if path is not None and not path.is_file():
            parser.error(f"{flag}: no such file: {path}")
    if args.data_dir is not None:
        for split in ("train", "val"):
            if not (args.data_dir / split).is_dir():
                parser.error(f"--data-dir: {args.data_dir / split} is missing (expected "
                             "DATA_DIR/train/<class>/* and DATA_DIR/val/<class>/*)")
    return args


# ---- processes, randomness, files -----------------------------------------------------------

class Distributed:
    """This process's place among the ``torchrun`` processes (one process: rank 0 of 1)."""

    def __init__(self, device: Optional[str]):
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
        self.device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.world_size > 1:
            dist.init_process_group("nccl" if use_cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> List[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def share_buffers(self, model: torch.nn.Module) -> None:
        """Gives every process rank 0's buffers (BatchNorm statistics), which DDP only does at
        the start of a forward: evaluation then uses what rank 0 saves."""
        if self.world_size > 1:
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)

    def close(self) -> None:
        if self.world_size > 1:
            dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(_: int) -> None:  # numpy and random in loader processes, from torch's seed
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def save_atomically(state: Dict, path: Path) -> None:
    """Writes beside the target then renames, so that a crash never leaves half a checkpoint."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def rng_states() -> Dict:
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(),
                python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_states(states: Dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class StopRequest:
    """Turns SIGTERM and Ctrl-C into a request that the loop honours between steps, for as long
    as the ``with`` block lasts."""

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
        if self.requested:  # a second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: stopping after this step and writing a checkpoint",
                    signal.Signals(signum).name)


# ---- data and model -------------------------------------------------------------------------

def build_datasets(args, data_cfg: Dict):
    train_transform = create_transform(
        data_cfg["input_size"], is_training=True, scale=tuple(args.scale),
        auto_augment=args.aa, re_prob=args.reprob, interpolation=data_cfg["interpolation"],
        mean=data_cfg["mean"], std=data_cfg["std"])
    eval_transform = create_transform(
        data_cfg["input_size"], is_training=False, interpolation=data_cfg["interpolation"],
        mean=data_cfg["mean"], std=data_cfg["std"], crop_pct=data_cfg["crop_pct"])
    if args.data_dir is None:
        train = FashionMNIST("train", full=args.fashion_mnist_full, transform=train_transform)
        evaluation = FashionMNIST("test", full=args.fashion_mnist_full, transform=eval_transform)
        return train, evaluation, list(train.classes)
    train = SafeImageFolder(args.data_dir / "train", transform=train_transform)
    evaluation = SafeImageFolder(args.data_dir / "val", transform=eval_transform)
    if train.classes != evaluation.classes:
        raise ValueError(f"{args.data_dir}/train and {args.data_dir}/val hold different classes "
                         f"({len(train.classes)} and {len(evaluation.classes)})")
    return train, evaluation, train.classes


def _loader_options(args, world: Distributed) -> Dict:
    return dict(batch_size=args.batch_size, num_workers=args.workers,
                collate_fn=collate_skipping_failed, worker_init_fn=_seed_worker,
                pin_memory=world.device.type == "cuda")


def build_train_loader(args, train, world: Distributed, generator: torch.Generator) -> DataLoader:
    if world.world_size == 1:
        return DataLoader(train, shuffle=True, generator=generator, drop_last=True,
                          **_loader_options(args, world))
    sampler = (RepeatAugSampler(train, num_repeats=args.aug_repeats, seed=args.seed)
               if args.aug_repeats else torch.utils.data.DistributedSampler(
                   train, shuffle=True, seed=args.seed, drop_last=True))
    return DataLoader(train, sampler=sampler, drop_last=True, **_loader_options(args, world))


def build_eval_loader(args, evaluation, world: Distributed) -> DataLoader:
    # Each process evaluates its own disjoint share; the counts are summed, nothing is padded.
    shard = Subset(evaluation, range(world.rank, len(evaluation), world.world_size))
    return DataLoader(shard, shuffle=False, **_loader_options(args, world))


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


# ---- evaluation -----------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, loader, world: Distributed, autocast) -> Dict[str, float]:
    model.eval()
    correct1 = correct5 = count = skipped = 0.0
    for images, targets, missing in loader:
        skipped += missing
        if not len(targets):
            continue
        images, targets = images.to(world.device), targets.to(world.device)
        with autocast():
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
    """``--eval-only``: top-1 and top-5 of a checkpoint's weights on the evaluation set."""
    world = Distributed(args.device)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    weights = state.get("model", state) if isinstance(state, dict) else state
    model = build_model(args, count_classes(args))
    model.load_state_dict(weights)
    model.to(world.device)
    _, evaluation, _ = build_datasets(args, _data_config(args, model))
    metrics = evaluate(model, build_eval_loader(args, evaluation, world), world, nullcontext)
    if world.main:
        print(f"{args.checkpoint}: top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}% "
              f"on {int(metrics['images'])} images")
    world.close()
    return metrics


def count_classes(args) -> int:
    if args.data_dir is None:
        return len(FashionMNIST.classes)
    return len([p for p in (args.data_dir / "train").iterdir() if p.is_dir()])


def _data_config(args, model) -> Dict:
    config = timm.data.resolve_data_config({}, model=unwrap_model(model))
    config["input_size"] = (3, args.img_size, args.img_size)
    if args.crop_pct is not None:
        config["crop_pct"] = args.crop_pct
    return config


# ---- training -------------------------------------------------------------------------------

def train(args) -> Dict:
    """Runs (or resumes) one training run; returns the summary also written to results.json."""
    world = Distributed(args.device)
    resumed = None
    if args.resume:
        resumed = torch.load(args.resume, map_location="cpu", weights_only=False)
        args.output = args.resume.parent
    output = args.output or Path("runs") / f"{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    if world.main:
        output.mkdir(parents=True, exist_ok=True)
        if not args.resume and (output / "last.pth").exists():
            raise SystemExit(f"{output} already holds a run (last.pth); resume it with --resume "
                             f"{output / 'last.pth'} or choose another --output")
    _setup_logging(output if world.main else None)
    log.info("command: %s", " ".join(sys.argv))
    log.info("output: %s; %d process(es) on %s", output, world.world_size, world.device)

    seed_everything(args.seed)
    model = build_model(args, count_classes(args))
    if args.sync_bn and world.world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(world.device)
    data_cfg = _data_config(args, model)
    train_set, eval_set, classes = build_datasets(args, data_cfg)
    log.info("data: %d training and %d evaluation images, %d classes (%s)", len(train_set),
             len(eval_set), len(classes), args.data_dir or "embedded Fashion-MNIST")
    log.info("model: %s, %.2f M parameters", args.model,
             sum(p.numel() for p in model.parameters()) / 1e6)
    log_graphs(model, args.img_size)

    generator = torch.Generator()
    train_loader = build_train_loader(args, train_set, world, generator)
    eval_loader = build_eval_loader(args, eval_set, world)
    if len(train_loader) == 0:
        raise SystemExit(f"{len(train_set)} training images make no batch of {args.batch_size}")
    global_batch = args.batch_size * world.world_size
    lr = args.lr if args.lr is not None else args.lr_base * global_batch / args.lr_base_size
    log.info("lr %.3g for a global batch of %d (%s)", lr, global_batch,
             "--lr" if args.lr is not None else
             f"{args.lr_base:g} * {global_batch} / {args.lr_base_size}")
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay)
    warmup = min(args.warmup_epochs, max(args.epochs - 1, 0))
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
    amp_dtype = torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16

    def autocast():
        return (torch.autocast(world.device.type, dtype=amp_dtype) if args.amp
                else nullcontext())
    scaler = torch.amp.GradScaler(world.device.type,
                                  enabled=args.amp and amp_dtype == torch.float16)

    start_epoch, history, best = 0, [], dict(top1=-1.0, epoch=-1)
    if resumed is not None:
        _check_compatible(resumed["args"], args)
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        if resumed["scaler"]:  # a disabled scaler saves an empty state
            scaler.load_state_dict(resumed["scaler"])
        if ema is not None and resumed["ema"] is not None:
            ema.load_state_dict(resumed["ema"])
        start_epoch, history, best = resumed["epoch"] + 1, resumed["history"], resumed["best"]
        set_rng_states(resumed["rng"])
        log.info("resumed from %s: continuing at epoch %d of %d%s", args.resume,
                 start_epoch + 1, args.epochs,
                 " (that epoch was interrupted and restarts)" if resumed["interrupted"] else "")

    def checkpoint(epoch: int, interrupted: bool = False) -> Dict:
        return dict(model=unwrap_model(model).state_dict(),
                    ema=ema.state_dict() if ema is not None else None,
                    optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    scaler=scaler.state_dict(), epoch=epoch, history=history, best=best,
                    args=_plain(vars(args)), rng=rng_states(), interrupted=interrupted)

    writer = _tensorboard(output) if world.main else None
    with StopRequest() as stop:
        for epoch in range(start_epoch, args.epochs):
            # Randomness is a function of (seed, epoch): a resumed run repeats what it missed.
            seed_everything(args.seed + 1000 * epoch + world.rank)
            generator.manual_seed(args.seed + epoch)
            if hasattr(train_loader.sampler, "set_epoch"):
                train_loader.sampler.set_epoch(epoch)
            started = time.perf_counter()
            train_metrics = _train_epoch(args, epoch, task, model, train_loader, optimizer,
                                         scheduler, scaler, mixup, ema, autocast, world, stop)
            if train_metrics is None:  # stopped by a signal: save and leave
                if world.main:
                    save_atomically(checkpoint(epoch - 1, interrupted=True), output / "last.pth")
                    log.warning("checkpoint written; resume with --resume %s",
                                output / "last.pth")
                world.close()
                raise SystemExit(128 + stop.signum)
            world.share_buffers(model)
            row = dict(epoch=epoch + 1, **train_metrics, **_prefixed(
                "eval", evaluate(model, eval_loader, world, autocast)))
            if ema is not None:
                row.update(_prefixed("ema", evaluate(ema.module, eval_loader, world, autocast)))
            row["epoch_seconds"] = time.perf_counter() - started
            history.append(row)
            top1 = max(row["eval_top1"], row.get("ema_top1", -1.0))
            improved = top1 > best["top1"]
            if improved:
                best = dict(top1=top1, epoch=epoch + 1)
            log.info("epoch %d/%d: train loss %.4f, eval top-1 %.2f%% top-5 %.2f%%%s, lr %.2e, "
                     "%.0f img/s, %.0f s", epoch + 1, args.epochs, row["train_loss"],
                     row["eval_top1"], row["eval_top5"],
                     f", EMA top-1 {row['ema_top1']:.2f}%" if ema is not None else "",
                     row["lr"], row["images_per_second"], row["epoch_seconds"])
            if world.main:
                state = checkpoint(epoch)
                save_atomically(state, output / "last.pth")
                if improved:
                    save_atomically(state, output / "best.pth")
                _write_metrics(output, history, writer)
    summary = dict(model=args.model, graph=args.graph, aggregator=args.aggregator,
                   epochs=args.epochs, final=history[-1] if history else {}, best=best,
                   train_seconds=sum(r["epoch_seconds"] for r in history))
    if world.main:
        (output / "results.json").write_text(json.dumps(summary, indent=2))
        _plot(output, history)
        writer.close()
    log.info("rank %d weights checksum %s", world.rank, _checksum(model))
    log.info("done: final top-1 %.2f%%, best %.2f%% (epoch %d), %.0f s of training",
             summary["final"].get("eval_top1", float("nan")), best["top1"], best["epoch"],
             summary["train_seconds"])
    world.close()
    return summary


def _train_epoch(args, epoch, task, model, loader, optimizer, scheduler, scaler, mixup, ema,
                 autocast, world, stop) -> Optional[Dict[str, float]]:
    task.train()
    loss_sum = images_seen = skipped = 0.0
    updates = epoch * len(loader)
    started = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not world.main,
               dynamic_ncols=True, leave=False)
    for images, targets, missing in bar:
        if _stop_requested(stop, world):
            return None
        skipped += missing
        if mixup is not None and len(targets) % 2:  # Mixup pairs images: drop an odd one
            images, targets = images[:-1], targets[:-1]
        if not len(targets):
            continue
        images, targets = images.to(world.device), targets.to(world.device)
        if mixup is not None:
            images, targets = mixup(images, targets)
        with autocast():
            loss = task(images, targets)["loss"]
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1}, step "
                                     f"{updates - epoch * len(loader) + 1}; last.pth holds the "
                                     "last finished epoch")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_grad is not None:
            scaler.unscale_(optimizer)
            dispatch_clip_grad(model.parameters(), args.clip_grad, mode=args.clip_mode)
        scaler.step(optimizer)
        scaler.update()
        updates += 1
        scheduler.step_update(num_updates=updates)
        if ema is not None:
            ema.update(model, step=updates)
        loss_sum += loss.item() * len(targets)
        images_seen += len(targets)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                        img_s=f"{images_seen * world.world_size / (time.perf_counter() - started):.0f}")
    scheduler.step(epoch + 1)
    loss_sum, images_seen, skipped = world.sum(loss_sum, images_seen, skipped)
    if skipped:
        log.warning("epoch %d skipped %d unreadable training images", epoch + 1, skipped)
    return dict(train_loss=loss_sum / max(images_seen, 1), lr=optimizer.param_groups[0]["lr"],
                images_per_second=images_seen / (time.perf_counter() - started),
                skipped_images=skipped)


def _stop_requested(stop: StopRequest, world: Distributed) -> bool:
    # Every process must stop at the same step, or the others wait forever in the next reduce.
    return world.sum(float(stop.requested))[0] > 0 if world.world_size > 1 else stop.requested


def _check_compatible(saved: Dict, args) -> None:
    for key in ("model", "graph", "aggregator", "img_size", "data_dir", "batch_size"):
        if str(saved.get(key)) != str(getattr(args, key)):
            raise SystemExit(f"--resume: the checkpoint was made with {key}={saved.get(key)}, "
                             f"this run has {key}={getattr(args, key)}")


def _checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha1()
    for parameter in model.parameters():
        digest.update(parameter.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _prefixed(prefix: str, metrics: Dict[str, float]) -> Dict[str, float]:
    return {f"{prefix}_{k}": v for k, v in metrics.items() if k != "images"}


def _plain(values: Dict) -> Dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


# ---- what a person reads --------------------------------------------------------------------

def _setup_logging(output: Optional[Path]) -> None:
    handlers = [logging.StreamHandler()]
    if output is not None:
        handlers.append(logging.FileHandler(output / "train.log"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", handlers=handlers,
                        force=True)


def _tensorboard(output: Path):
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(str(output / "tensorboard"))


def _write_metrics(output: Path, history: List[Dict], writer) -> None:
    with open(output / "metrics.csv", "w", newline="") as handle:
        table = csv.DictWriter(handle, fieldnames=list(history[-1]))
        table.writeheader()
        table.writerows(history)
    row = history[-1]
    for key, value in row.items():
        if key != "epoch":
            writer.add_scalar(key, value, row["epoch"])
    writer.flush()


def _plot(output: Path, history: List[Dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [row["train_loss"] for row in history], marker="o")
    loss_axis.set(xlabel="epoch", ylabel="training loss", title="loss")
    for key, label in (("eval_top1", "top-1"), ("eval_top5", "top-5"), ("ema_top1", "EMA top-1")):
        if key in history[-1]:
            accuracy_axis.plot(epochs, [row[key] for row in history], marker="o", label=label)
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy (%)", title="evaluation")
    accuracy_axis.legend()
    figure.tight_layout()
    figure.savefig(output / "curves.png", dpi=100)
    plt.close(figure)
