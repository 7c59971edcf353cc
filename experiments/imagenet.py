"""Train AttentionViG (or any timm model) on image classification with the AttentionViG paper's
recipe (DeiT's, as GreedyViG sets it).

    python experiments/imagenet.py --preset cpu-demo                  # embedded Fashion-MNIST, CPU
    python experiments/imagenet.py --data-dir /data/imagenet --graph svga   # ImageNet layout
    torchrun --nproc-per-node 16 experiments/imagenet.py --data-dir ...     # many processes
    python experiments/imagenet.py --resume runs/x/last.pth          # continue where it stopped
    python experiments/imagenet.py --eval-only --checkpoint runs/x/best.pth
    python experiments/imagenet.py --eval-only --checkpoint runs/x/best.pth --runtime onnxruntime

All options: --help. What every run guarantees (exact resume, locks, checkpoints): the engine,
experiments/engine.py, and docs/training.md.
"""
import argparse
import os
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.utils.data import Dataset

import timm
from timm.data import Mixup, create_transform
from timm.scheduler import create_scheduler_v2
from timm.task import ClassificationTask as TimmClassificationTask
from timm.task import TokenDistillationTask
from timm.utils import accuracy, unwrap_model

import engine
from attvig_pyg.data import CLASSES, FashionMNIST, SafeImageFolder, collate_skipping_failed
from attvig_pyg.models.attentionvig import MIN_INPUT_SIZE

PROGRAM = "imagenet"
# Settings for 28x28 Fashion-MNIST upscaled to 32 px on a 2-core CPU; explicit flags override.
PRESETS = {
    "cpu-demo": dict(model="attentionvig_s", img_size=32, epochs=4, batch_size=64,
                     lr=2e-3, warmup_epochs=1, weight_decay=0.05, smoothing=0.1, aa=None,
                     mixup=0.0, cutmix=0.0, reprob=0.0, drop_path=0.05, scale=(0.6, 1.0),
                     crop_pct=1.0, model_ema=False, workers=2, figures=True),
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
    engine.add_model_arguments(parser)
    group = engine.add_training_arguments(parser, epochs=300, batch_size=128, weight_decay=0.05)
    group.add_argument("--lr", type=float, default=None,
                       help="learning rate; default: lr-base * global batch / lr-base-size")
    group.add_argument("--lr-base", type=float, default=2e-3)
    group.add_argument("--lr-base-size", type=int, default=2048)
    group.add_argument("--warmup-epochs", type=int, default=20)
    group.add_argument("--warmup-lr", type=float, default=1e-6)
    group.add_argument("--min-lr", type=float, default=1e-5)
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
    parser.add_argument("--figures", action="store_true",
                        help="at the end, write experiments/visualize.py's figures of the "
                             "cross-attention into RUN/figures (on in --preset cpu-demo)")
    parser.set_defaults(model_ema=True)  # the recipe keeps an EMA
    engine.add_run_arguments(parser, PRESETS, runtimes=True)
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    args = engine.parse_args(build_parser, argv, PRESETS, _problems)
    if args.aa is not None and args.aa.lower() == "none":
        args.aa = None
    return args


def _problems(args):
    if bool(args.teacher_model) != bool(args.teacher_checkpoint):
        yield ("distillation needs both --teacher-model and --teacher-checkpoint (a local file; "
               "nothing is downloaded)")
    if args.teacher_checkpoint is not None and not args.teacher_checkpoint.is_file():
        yield f"--teacher-checkpoint: no such file: {args.teacher_checkpoint}"
    if args.data_dir is not None:
        for split in ("train", "val"):
            if not (args.data_dir / split).is_dir():
                yield (f"--data-dir: {args.data_dir / split} is missing (expected "
                       "DATA_DIR/train/<class>/* and DATA_DIR/val/<class>/*)")
    # (The models' total stride: AttentionViG refuses smaller inputs, the others collapse.)
    for flag, value, low in (("--img-size", args.img_size, MIN_INPUT_SIZE),
                             ("--warmup-epochs", args.warmup_epochs, 0),
                             ("--aug-repeats", args.aug_repeats, 0)):
        if value < low:
            yield f"{flag} must be at least {low} (got {value})"
    if not args.eval_only and args.batch_size < 2:
        yield (f"--batch-size must be at least 2 to train (got {args.batch_size}): BatchNorm needs "
               "more than one value per channel, and mixup/cutmix mix images in pairs")


# ---- data and model -------------------------------------------------------------------------

def class_names(args) -> List[str]:
    if args.data_dir is None:
        return list(CLASSES)
    return SafeImageFolder.classes_in(args.data_dir / "train")


def data_config(args, model) -> Dict:
    config = timm.data.resolve_data_config({}, model=unwrap_model(model))
    config["input_size"] = (3, args.img_size, args.img_size)
    if args.crop_pct is not None:
        config["crop_pct"] = args.crop_pct
    return config


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


def build_model(args, num_classes: int) -> torch.nn.Module:
    return engine.create_model(args, num_classes=num_classes)


class ClassificationTask(engine.Task):
    """Cross-entropy with label smoothing, optional Mixup/CutMix and DeiT hard distillation
    (timm's tasks); evaluated by top-1 and top-5 accuracy."""

    score = "top1"

    def __init__(self, args, model, num_classes: int, device: torch.device):
        self.mixup = (Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
                            label_smoothing=args.smoothing, num_classes=num_classes)
                      if args.mixup > 0 or args.cutmix > 0 else None)
        criterion = dict(smoothing=args.smoothing, soft_targets=self.mixup is not None)
        if not args.teacher_model:
            self.task = TimmClassificationTask(model, criterion_kwargs=criterion, device=device,
                                               verbose=False)
            return
        teacher = timm.create_model(args.teacher_model, num_classes=num_classes,
                                    checkpoint_path=str(args.teacher_checkpoint))
        engine.log.info("distillation: hard, teacher %s from %s", args.teacher_model,
                        args.teacher_checkpoint)
        # DeiT's hard distillation: 0.5 CE(classifier, label) + 0.5 CE(distillation head, teacher).
        self.task = TokenDistillationTask(model, teacher, criterion_kwargs=criterion,
                                          distill_type="hard", task_loss_weight=0.5,
                                          device=device, verbose=False)

    def train(self) -> None:
        self.task.train()

    def prepare_distributed(self, device_ids) -> None:
        self.task.prepare_distributed(device_ids=device_ids)

    def compile(self, backend: str):
        return self.task.compile(backend=backend)

    def loss(self, batch, device):
        images, targets = batch
        if self.mixup is not None and len(targets) % 2:  # Mixup pairs images: drop an odd one
            images, targets = images[:-1], targets[:-1]
        if not len(targets):
            return None, 0
        images, targets = images.to(device), targets.to(device)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return self.task(images, targets)["loss"], len(targets)

    @torch.no_grad()
    def evaluate(self, model, loader, world, args) -> Dict[str, float]:
        model.eval()
        correct1 = correct5 = count = skipped = 0.0
        for images, targets, missing in engine.batches(loader):
            skipped += missing
            if not len(targets):
                continue
            images, targets = images.to(world.device), targets.to(world.device)
            with engine.autocast_for(args, world.device):
                output = model(images)
            top1, top5 = accuracy(output.float(), targets, topk=(1, min(5, output.size(1))))
            correct1 += top1.item() * len(targets) / 100
            correct5 += top5.item() * len(targets) / 100
            count += len(targets)
        correct1, correct5, count, skipped = world.sum(correct1, correct5, count, skipped)
        if skipped:
            engine.log.warning("evaluation skipped %d unreadable images", skipped)
        return dict(top1=100 * correct1 / max(count, 1), top5=100 * correct5 / max(count, 1),
                    images=count)


def build_run(args, world) -> engine.Setup:
    classes = class_names(args)
    model = build_model(args, len(classes))
    if args.pretrained is not None:
        engine.load_pretrained(model, args.pretrained)
    train_transform, eval_transform = build_transforms(args, data_config(args, model))
    train_set = build_dataset(args, "train", train_transform)
    eval_set = build_dataset(args, "eval", eval_transform)
    engine.log.info("classes: %d (%s)", len(classes), args.data_dir or "embedded Fashion-MNIST")
    engine.log_graphs(model, args.img_size)
    global_batch = args.batch_size * world.world_size
    lr = args.lr if args.lr is not None else args.lr_base * global_batch / args.lr_base_size
    engine.log.info("lr %.3g for a global batch of %d (%s)", lr, global_batch,
                    "--lr" if args.lr is not None else
                    f"{args.lr_base:g} * {global_batch} / {args.lr_base_size}")
    warmup = min(args.warmup_epochs, args.epochs - 1)
    if warmup != args.warmup_epochs:
        engine.log.warning("warmup of %d epochs clamped to %d for a %d-epoch run",
                           args.warmup_epochs, warmup, args.epochs)

    def schedule(optimizer, updates_per_epoch: int):
        return create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.epochs,
                                   warmup_epochs=warmup, warmup_lr=args.warmup_lr,
                                   min_lr=args.min_lr, step_on_epochs=False,
                                   updates_per_epoch=updates_per_epoch)[0]
    return engine.Setup(model=model, task=ClassificationTask(args, model, len(classes),
                                                            world.device),
                        train_set=train_set, eval_set=eval_set, collate=collate_skipping_failed,
                        lr=lr, schedule=schedule, aug_repeats=args.aug_repeats,
                        info=dict(classes=classes, train_images=len(train_set)))


def build_evaluation(args, world, info: Optional[Dict]):
    classes = info["classes"] if info is not None else class_names(args)
    model = build_model(args, len(classes))
    evaluation = build_dataset(args, "eval", build_transforms(args, data_config(args, model))[1])
    if list(evaluation.classes) != classes:
        raise SystemExit(f"the evaluation data's classes differ from the checkpoint's "
                         f"({len(evaluation.classes)} and {len(classes)})")
    return model, ClassificationTask(args, model, len(classes), world.device), \
        evaluation, collate_skipping_failed


def train(args) -> Dict:
    return engine.train(PROGRAM, args, build_run)


def describe(metrics: Dict[str, float]) -> str:
    return (f"top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}% on "
            f"{int(metrics['images'])} images")


def main(argv=None) -> Dict:
    args = parse_args(argv)
    data = str(args.data_dir) if args.data_dir else "the Fashion-MNIST official test split"
    result = engine.main(PROGRAM, args, build_run, build_evaluation, describe, data)
    if args.figures and not args.eval_only and int(os.environ.get("RANK", 0)) == 0:
        write_figures(Path(result["config"]["output"]) / "best.pth")
    return result


def write_figures(checkpoint: Path) -> None:
    import visualize

    try:
        print(f"figures of the cross-attention: {visualize.write_figures(checkpoint)}")
    except ValueError as error:  # a model without cross-attention (a baseline)
        print(f"no figures: {error}")


if __name__ == "__main__":
    main()
