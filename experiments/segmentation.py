"""Semantic segmentation with Semantic FPN on an AttentionViG feature pyramid (paper Table 2,
right; Table 9), fine-tuned from classification weights with every beta frozen.

    python experiments/segmentation.py --preset cpu --pretrained runs/x/best.pth      # CPU
    torchrun --nproc-per-node 8 experiments/segmentation.py --data-dir /data/ADEChallengeData2016 \\
        --pretrained attentionvig_s.pth --amp                  # the paper's recipe, 8 x 4 images
    python experiments/segmentation.py --eval-only --checkpoint runs/y/best.pth

Data: the ADE20K layout (DATA/images/{training,validation}/*, DATA/annotations/{training,
validation}/*.png label maps, 0 = ignore, 1..N = the classes). Without --data-dir: synthetic
layouts of real Fashion-MNIST items (attvig_pyg.data.scenes; 11 classes: background and the ten
items). Metric: mIoU over the classes (and pixel accuracy). The recipe and where each setting
comes from: docs/dense-prediction.md. The engine: experiments/engine.py, docs/training.md.
"""
import argparse
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from timm.scheduler import create_scheduler_v2

import engine
from attvig_pyg.data.scenes import SCENE_CLASSES, fashion_scenes
from attvig_pyg.models.dense import SemanticFPN, attentionvig_fpn_backbone

PROGRAM = "segmentation"
IGNORE = 255
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# 2 cores: 128 px crops of the 256 px scenes, batch 8.
PRESETS = {
    "cpu": dict(crop_size=128, base_size=128, epochs=4, batch_size=8, workers=2,
                scenes=[600, 150]),
}


# ---- arguments ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Semantic FPN on an AttentionViG feature pyramid (ADE20K layout). Without "
                    "--data-dir: synthetic layouts of real Fashion-MNIST items.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", type=Path, default=None,
                       help="ADE20K layout: DATA/images/{training,validation}/, "
                            "DATA/annotations/{training,validation}/ (PNG label maps)")
    group.add_argument("--num-classes", type=int, default=150,
                       help="classes of the label maps (ids 1..N; 0 is ignored)")
    group.add_argument("--fashion-mnist-full", action="store_true",
                       help="without --data-dir: scenes of the Debian package's items")
    group.add_argument("--scenes", type=int, nargs=2, default=(2000, 300),
                       metavar=("TRAIN", "VAL"), help="without --data-dir: scenes per split")
    group.add_argument("--crop-size", type=int, default=512, help="training crops (square)")
    group.add_argument("--base-size", type=int, default=512,
                       help="shorter side an image is resized to (x0.5 to x2 in training)")
    engine.add_backbone_arguments(parser)
    group = engine.add_training_arguments(parser, epochs=64, batch_size=4, weight_decay=1e-4)
    group.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    group.add_argument("--power", type=float, default=0.9, help="poly decay power (to 0)")
    engine.add_run_arguments(parser, PRESETS)
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    args = engine.parse_args(build_parser, argv, PRESETS, _problems)
    if args.data_dir is None:
        args.num_classes = len(SCENE_CLASSES)
    return args


def _problems(args):
    yield from engine.backbone_problems(args)
    if args.data_dir is not None:
        for kind in ("images", "annotations"):
            for split in ("training", "validation"):
                if not (args.data_dir / kind / split).is_dir():
                    yield (f"--data-dir: {args.data_dir / kind / split} is missing (expected "
                           "DATA/images/{training,validation}/ and "
                           "DATA/annotations/{training,validation}/)")
    for flag, value in (("--crop-size", args.crop_size), ("--base-size", args.base_size),
                        ("--num-classes", args.num_classes)):
        if value < 1:
            yield f"{flag} must be positive (got {value})"
    if args.crop_size % 32:
        yield f"--crop-size must be a multiple of 32, the backbone's stride (got {args.crop_size})"


# ---- data -----------------------------------------------------------------------------------

def data_root(args) -> Path:
    if args.data_dir is not None:
        return args.data_dir
    train, val = args.scenes
    engine.log.info("data: synthetic layouts of real Fashion-MNIST items (%d training and %d "
                    "validation scenes; attvig_pyg.data.scenes)", train, val)
    return fashion_scenes(full=args.fashion_mnist_full, train_scenes=train,
                          val_scenes=val) / "ade"


class LabelMaps(Dataset):
    """Images and label maps in the ADE20K layout: ``(image [3, H, W] float, labels [H, W]
    long)`` with classes 0..N-1 and 255 for ignored pixels (the maps' 0). In training an image
    is rescaled by a random factor in [0.5, 2] of ``base_size`` (its shorter side), randomly
    cropped to ``crop_size`` (padded with ignored pixels where smaller) and flipped with
    probability 0.5; in evaluation it is rescaled to ``base_size`` and its labels kept at full
    resolution."""

    def __init__(self, root: Path, split: str, num_classes: int, train: bool, base_size: int,
                 crop_size: int, mean, std):
        images, maps = root / "images" / split, root / "annotations" / split
        self.items = [(path, maps / f"{path.stem}.png") for path in sorted(images.iterdir())
                      if path.suffix.lower() in IMAGE_EXTENSIONS]
        if not self.items:
            raise FileNotFoundError(f"No images in {images}")
        absent = [str(label) for _, label in self.items if not label.is_file()]
        if absent:
            raise FileNotFoundError(f"{len(absent)} label map(s) missing from {maps}, e.g. "
                                    f"{absent[0]}")
        self.num_classes, self.train = num_classes, train
        self.base_size, self.crop_size = base_size, crop_size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        image_path, label_path = self.items[index]
        image = pil_to_tensor(Image.open(image_path).convert("RGB")).float() / 255
        labels = torch.from_numpy(np.array(Image.open(label_path), dtype=np.int64))
        if labels.dim() != 2 or labels.shape != image.shape[-2:]:
            raise ValueError(f"{label_path}: a label map of shape {tuple(labels.shape)} for an "
                             f"image of {tuple(image.shape[-2:])} pixels")
        if int(labels.max()) > self.num_classes:
            raise ValueError(f"{label_path} holds class id {int(labels.max())}, outside 1.."
                             f"{self.num_classes} (--num-classes)")
        labels = torch.where(labels == 0, IGNORE, labels - 1)
        image = (image - self.mean) / self.std
        scale = self.base_size / min(image.shape[-2:])
        if not self.train:
            return _resize(image, scale), labels
        scale *= float(torch.empty(()).uniform_(0.5, 2.0))  # the per-item random state
        image, labels = _resize(image, scale), _resize(labels, scale)
        image, labels = _random_crop(image, labels, self.crop_size)
        if torch.rand(()) < 0.5:
            image, labels = image.flip(-1), labels.flip(-1)
        return image, labels


def _resize(x: torch.Tensor, scale: float) -> torch.Tensor:
    size = [max(1, round(s * scale)) for s in x.shape[-2:]]
    if x.dtype == torch.int64:  # labels: nearest neighbour
        return F.interpolate(x[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


def _random_crop(image: torch.Tensor, labels: torch.Tensor, size: int):
    height, width = labels.shape
    pad = (0, max(0, size - width), 0, max(0, size - height))
    image, labels = F.pad(image, pad), F.pad(labels, pad, value=IGNORE)
    top = int(torch.randint(0, labels.size(0) - size + 1, ()))
    left = int(torch.randint(0, labels.size(1) - size + 1, ()))
    return (image[:, top:top + size, left:left + size],
            labels[top:top + size, left:left + size])


def collate_train(items):
    images, labels = zip(*items)
    return torch.stack(images), torch.stack(labels), 0


def collate_eval(items):  # images of any size: a list, evaluated one by one
    images, labels = zip(*items)
    return list(images), list(labels), 0


# ---- model, loss, evaluation ----------------------------------------------------------------

def build_segmenter(args) -> SemanticFPN:
    model = engine.pretrained_backbone(args)
    backbone = attentionvig_fpn_backbone(model, trainable_stages=args.trainable_stages,
                                         norm=args.norm, train_beta=args.train_beta)
    return SemanticFPN(backbone, args.num_classes)


def confusion(prediction: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[num_classes, num_classes]`` counts of (true class, predicted class) over the pixels
    that are not ignored."""
    keep = labels != IGNORE
    pairs = labels[keep] * num_classes + prediction[keep]
    return torch.bincount(pairs, minlength=num_classes ** 2).view(num_classes, num_classes)


def segmentation_metrics(matrix: torch.Tensor) -> Dict[str, float]:
    """mIoU (mean over the classes that occur in the labels or the predictions), mean class
    accuracy and pixel accuracy, in %, from a confusion matrix."""
    matrix = matrix.double()
    hits = matrix.diag()
    truth, predicted = matrix.sum(1), matrix.sum(0)
    union = truth + predicted - hits
    seen = union > 0
    iou = hits[seen] / union[seen]
    accuracy = hits[truth > 0] / truth[truth > 0]
    return dict(mIoU=100 * float(iou.mean()) if seen.any() else 0.0,
                mAcc=100 * float(accuracy.mean()) if (truth > 0).any() else 0.0,
                aAcc=100 * float(hits.sum() / matrix.sum().clamp_min(1)))


class SegmentationTask(engine.ModelTask):
    """Pixel cross-entropy (ignored pixels left out); evaluated by mIoU at full resolution."""

    score = "mIoU"

    def __init__(self, model: SemanticFPN, num_classes: int):
        super().__init__(model)
        self.num_classes = num_classes
        self.criterion = torch.nn.CrossEntropyLoss(ignore_index=IGNORE)

    def loss(self, batch, device):
        images, labels = (t.to(device) for t in batch)
        return self.criterion(self.trained(images).float(), labels), len(images)

    @torch.no_grad()
    def evaluate(self, model, loader, world, args) -> Dict[str, float]:
        model.eval()
        matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        for images, labels, _ in engine.batches(loader):
            for image, label in zip(images, labels):
                with engine.autocast_for(args, world.device):
                    logits = model(_padded(image).to(world.device)[None])
                logits = logits[..., :image.size(-2), :image.size(-1)].float()
                prediction = F.interpolate(logits, size=label.shape, mode="bilinear",
                                           align_corners=False).argmax(1)[0].cpu()
                matrix += confusion(prediction, label, self.num_classes)
        totals = world.sum(*matrix.flatten().tolist())
        return segmentation_metrics(torch.tensor(totals).view_as(matrix))


def _padded(image: torch.Tensor, stride: int = 32) -> torch.Tensor:
    """Padded on the bottom and right to a multiple of the backbone's stride."""
    height, width = image.shape[-2:]
    return F.pad(image, (0, -width % stride, 0, -height % stride))


def build_run(args, world) -> engine.Setup:
    model = build_segmenter(args)
    train_set, eval_set = build_datasets(args)
    engine.log.info("classes: %d; images: %d training, %d validation; crops %d px, base size "
                    "%d px", args.num_classes, len(train_set), len(eval_set), args.crop_size,
                    args.base_size)
    engine.log.info("beta %s; BatchNorm %s; %d trainable stage(s)",
                    "trained" if args.train_beta else "frozen", args.norm, args.trainable_stages)

    def schedule(optimizer, updates_per_epoch: int):
        engine.log.info("%d iterations of %d images per process", args.epochs * updates_per_epoch,
                        args.batch_size)
        return create_scheduler_v2(optimizer, sched="poly", num_epochs=args.epochs,
                                   decay_rate=args.power, min_lr=0.0, step_on_epochs=False,
                                   updates_per_epoch=updates_per_epoch)[0]
    return engine.Setup(model=model, task=SegmentationTask(model, args.num_classes),
                        train_set=train_set, eval_set=eval_set, collate=collate_train,
                        eval_collate=collate_eval, lr=args.lr, schedule=schedule,
                        info=dict(num_classes=args.num_classes, train_images=len(train_set)))


def build_datasets(args):
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    root = data_root(args)
    common = dict(num_classes=args.num_classes, base_size=args.base_size,
                  crop_size=args.crop_size, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    return (LabelMaps(root, "training", train=True, **common),
            LabelMaps(root, "validation", train=False, **common))


def build_evaluation(args, world, info: Optional[Dict]):
    if info is None:
        raise SystemExit(f"--eval-only takes a checkpoint of experiments/{PROGRAM}.py")
    if args.num_classes != info["num_classes"]:
        raise SystemExit(f"--num-classes {args.num_classes}: the checkpoint segments "
                         f"{info['num_classes']} classes")
    model = build_segmenter(argparse.Namespace(**{**vars(args), "pretrained": None}))
    _, evaluation = build_datasets(args)
    return model, SegmentationTask(model, args.num_classes), evaluation, collate_eval


def describe(metrics: Dict[str, float]) -> str:
    return f"mIoU {metrics['mIoU']:.1f}, mAcc {metrics['mAcc']:.1f}, aAcc {metrics['aAcc']:.1f}"


def main(argv=None) -> Dict:
    args = parse_args(argv)
    data = str(args.data_dir) if args.data_dir else "synthetic layouts of real Fashion-MNIST items"
    return engine.main(PROGRAM, args, build_run, build_evaluation, describe, data)


if __name__ == "__main__":
    main()
