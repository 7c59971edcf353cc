"""Object detection and instance segmentation with Mask R-CNN on an AttentionViG feature
pyramid (paper Table 2, left; Table 9), fine-tuned from classification weights with every beta
frozen.

    python experiments/detection.py --preset cpu-table9 --pretrained runs/x/best.pth   # CPU
    torchrun --nproc-per-node 8 experiments/detection.py --data-dir /data/coco \\
        --pretrained attentionvig_s.pth --amp                  # the paper's recipe, 8 x 2 images
    python experiments/detection.py --eval-only --checkpoint runs/y/best.pth

Data: the COCO layout (DATA/train2017, DATA/val2017, DATA/annotations/instances_{train,val}2017
.json). Without --data-dir: synthetic layouts of real Fashion-MNIST items, written once by
attvig_pyg.data.scenes. Metrics: COCO box and mask AP, AP50, AP75 (pycocotools). The recipe,
and where each setting comes from: docs/dense-prediction.md. The engine (exact resume, locks,
checkpoints): experiments/engine.py and docs/training.md.
"""
import argparse
import contextlib
import io
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from timm.scheduler import create_scheduler_v2
from torchvision.models.detection import MaskRCNN
from torchvision.transforms.functional import pil_to_tensor

import engine
from attvig_pyg.data.scenes import fashion_scenes
from attvig_pyg.models.dense import attentionvig_fpn_backbone

PROGRAM = "detection"
# 2 cores: Table 9's pair of runs (beta frozen, beta trained) in an hour: 256 px scenes, 400
# training and 100 validation scenes, batch 4, 128 proposals per image for the heads.
PRESETS = {
    "cpu-table9": dict(min_size=256, max_size=256, epochs=3, batch_size=4, milestones=[2],
                       warmup_iters=50, workers=2, scenes=[400, 100],
                       box_batch_size_per_image=128),
}


# ---- arguments ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Mask R-CNN on an AttentionViG feature pyramid (COCO detection and instance "
                    "segmentation). Without --data-dir: synthetic layouts of real Fashion-MNIST "
                    "items.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", type=Path, default=None,
                       help="COCO layout: DATA/{train2017,val2017}/ and DATA/annotations/"
                            "instances_{train2017,val2017}.json")
    group.add_argument("--fashion-mnist-full", action="store_true",
                       help="without --data-dir: scenes of the Debian package's items")
    group.add_argument("--scenes", type=int, nargs=2, default=(2000, 300),
                       metavar=("TRAIN", "VAL"), help="without --data-dir: scenes per split")
    group.add_argument("--min-size", type=int, default=800,
                       help="shorter image side after resizing (Mask R-CNN's transform)")
    group.add_argument("--max-size", type=int, default=1333, help="longer side at most")
    engine.add_backbone_arguments(parser)
    parser.add_argument_group("model").add_argument(
        "--box-batch-size-per-image", type=int, default=512,
        help="proposals sampled per image to train the box and mask heads (torchvision's "
             "default; RoIAlign's backward over them dominates a CPU training step)")
    group = engine.add_training_arguments(parser, epochs=12, batch_size=2, weight_decay=0.05)
    group.add_argument("--lr", type=float, default=2e-4,
                       help="AdamW learning rate (GreedyViG's config; the paper prints 2e-2)")
    group.add_argument("--milestones", type=int, nargs="+", default=[8, 11],
                       help="epochs after which the learning rate drops 10x")
    group.add_argument("--warmup-iters", type=int, default=500, help="linear warmup, in steps")
    group.add_argument("--warmup-ratio", type=float, default=0.001,
                       help="learning rate at the start of the warmup, as a fraction of --lr")
    engine.add_run_arguments(parser, PRESETS)
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return engine.parse_args(build_parser, argv, PRESETS, _problems)


def _problems(args):
    yield from engine.backbone_problems(args)
    if args.data_dir is not None:
        for path in coco_paths(args.data_dir).values():
            if not path.exists():
                yield (f"--data-dir: {path} is missing (expected DATA/train2017/, DATA/val2017/ "
                       "and DATA/annotations/instances_{train2017,val2017}.json)")
    for flag, value in (("--min-size", args.min_size), ("--max-size", args.max_size),
                        ("--warmup-iters", args.warmup_iters + 1),
                        ("--box-batch-size-per-image", args.box_batch_size_per_image)):
        if value < 1:
            yield f"{flag} must be positive (got {value})"


# ---- data -----------------------------------------------------------------------------------

def coco_paths(root: Path) -> Dict[str, Path]:
    return {"train_images": root / "train2017", "val_images": root / "val2017",
            "train_annotations": root / "annotations" / "instances_train2017.json",
            "val_annotations": root / "annotations" / "instances_val2017.json"}


def data_root(args) -> Path:
    if args.data_dir is not None:
        return args.data_dir
    train, val = args.scenes
    engine.log.info("data: synthetic layouts of real Fashion-MNIST items (%d training and %d "
                    "validation scenes; attvig_pyg.data.scenes)", train, val)
    return fashion_scenes(full=args.fashion_mnist_full, train_scenes=train,
                          val_scenes=val) / "coco"


class CocoInstances(Dataset):
    """COCO instances (pycocotools) as Mask R-CNN takes them: an image tensor in [0, 1] and a
    target dict of ``boxes`` (x1, y1, x2, y2), ``labels`` (1..K, contiguous), ``masks`` and
    ``image_id``. Crowd regions are left out of the targets; with ``train``, images without
    instances are left out and every item is flipped horizontally with probability 0.5."""

    def __init__(self, images: Path, annotations: Path, train: bool):
        from pycocotools.coco import COCO

        if not annotations.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {annotations}")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                self.coco = COCO(str(annotations))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{annotations} is not a COCO instances file ({error})") from error
        self.images, self.train = images, train
        self.category_ids = sorted(self.coco.getCatIds())
        self.label_of = {category: i + 1 for i, category in enumerate(self.category_ids)}
        unknown = {a["category_id"] for a in self.coco.dataset.get("annotations", [])
                   } - set(self.label_of)
        if unknown:
            raise ValueError(f"{annotations}: annotations of category ids {sorted(unknown)} that "
                             "its 'categories' do not list")
        self.ids = sorted(self.coco.getImgIds())
        if train:
            self.ids = [i for i in self.ids if any(not a.get("iscrowd", 0) for a in
                                                   self.coco.imgToAnns[i])]
        absent = [self.coco.imgs[i]["file_name"] for i in self.ids
                  if not (images / self.coco.imgs[i]["file_name"]).is_file()]
        if absent:
            raise FileNotFoundError(f"{len(absent)} image(s) listed in {annotations} are absent "
                                    f"from {images}, e.g. {absent[0]}")

    @property
    def categories(self) -> List[List]:
        return [[c, self.coco.cats[c]["name"]] for c in self.category_ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = pil_to_tensor(Image.open(self.images / info["file_name"]).convert("RGB"))
        annotations = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in
                              (a["bbox"] for a in annotations)], dtype=torch.float32).view(-1, 4)
        masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in annotations])
                                 if annotations else
                                 np.zeros((0, info["height"], info["width"]), dtype=np.uint8))
        if masks.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"{info['file_name']}: its annotations are {tuple(masks.shape[-2:])}"
                             f" pixels, the image {tuple(image.shape[-2:])}")
        target = dict(boxes=boxes, masks=masks, image_id=image_id,
                      labels=torch.tensor([self.label_of[a["category_id"]] for a in annotations],
                                          dtype=torch.int64))
        if self.train and torch.rand(()) < 0.5:  # the per-item random state (SeededSamples)
            width = image.size(-1)
            image, target["masks"] = image.flip(-1), target["masks"].flip(-1)
            target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0],
                                           boxes[:, 3]], dim=1)
        return image.float() / 255, target


def collate(items):
    images, targets = zip(*items)
    return list(images), list(targets), 0


# ---- model, loss, evaluation ----------------------------------------------------------------

def build_detector(args, num_classes: int) -> MaskRCNN:
    """Mask R-CNN (torchvision) on the AttentionViG feature pyramid; ``num_classes`` without the
    background."""
    model = engine.pretrained_backbone(args)
    backbone = attentionvig_fpn_backbone(model, trainable_stages=args.trainable_stages,
                                         norm=args.norm, train_beta=args.train_beta)
    config = model.pretrained_cfg
    return MaskRCNN(backbone, num_classes=num_classes + 1, min_size=args.min_size,
                    max_size=args.max_size, image_mean=list(config["mean"]),
                    image_std=list(config["std"]),
                    box_batch_size_per_image=args.box_batch_size_per_image)


def coco_metrics(coco_gt, results: List[Dict]) -> Dict[str, float]:
    """COCO box and mask AP, AP50 and AP75 (in %) of ``results`` (COCO's result format) against
    ``coco_gt`` (a pycocotools COCO); 0 for no result at all."""
    from pycocotools.cocoeval import COCOeval

    metrics = {}
    for kind, other in (("bbox", "segmentation"), ("segm", "bbox")):
        if not results:
            metrics.update({f"{kind}_{name}": 0.0 for name in ("AP", "AP50", "AP75")})
            continue
        # One list per kind (loadRes takes a result with a box for a box, and fills in areas).
        of_kind = [{k: v for k, v in r.items() if k != other} for r in results]
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
            evaluation = COCOeval(coco_gt, coco_gt.loadRes(of_kind), kind)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        ap, ap50, ap75 = (100 * max(float(v), 0.0) for v in evaluation.stats[:3])
        metrics.update({f"{kind}_AP": ap, f"{kind}_AP50": ap50, f"{kind}_AP75": ap75})
    return metrics


def coco_results(output: Dict[str, torch.Tensor], image_id: int,
                 category_ids: List[int]) -> List[Dict]:
    """One image's Mask R-CNN output in COCO's result format (masks binarised at 0.5, RLE)."""
    from pycocotools import mask as mask_utils

    results = []
    masks = (output["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
    for box, label, score, mask in zip(output["boxes"].tolist(), output["labels"].tolist(),
                                       output["scores"].tolist(), masks):
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode("ascii")
        results.append(dict(image_id=image_id, category_id=category_ids[label - 1],
                            bbox=[box[0], box[1], box[2] - box[0], box[3] - box[1]],
                            score=score, segmentation=rle))
    return results


class DetectionTask(engine.ModelTask):
    """Mask R-CNN's losses (RPN, box, mask) summed; evaluated by COCO AP."""

    score = "bbox_AP"

    def __init__(self, model: MaskRCNN, evaluation: CocoInstances):
        super().__init__(model)
        self.evaluation = evaluation

    def loss(self, batch, device):
        images, targets = batch
        images = [image.to(device) for image in images]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()}
                   for t in targets]
        losses = self.trained(images, targets)
        return sum(losses.values()), len(images)

    @torch.no_grad()
    def evaluate(self, model, loader, world, args) -> Dict[str, float]:
        model.eval()
        results = []
        for images, targets, _ in engine.batches(loader):
            with engine.autocast_for(args, world.device):
                outputs = model([image.to(world.device) for image in images])
            for output, target in zip(outputs, targets):
                output = {k: v.float() if v.is_floating_point() else v  # from autocast
                          for k, v in output.items()}
                results += coco_results(output, target["image_id"], self.evaluation.category_ids)
        gathered = world.gather(results)
        metrics = (coco_metrics(self.evaluation.coco, [r for part in gathered for r in part])
                   if world.main else None)
        return world.broadcast(metrics)


def build_datasets(args):
    paths = coco_paths(data_root(args))
    return (CocoInstances(paths["train_images"], paths["train_annotations"], train=True),
            CocoInstances(paths["val_images"], paths["val_annotations"], train=False))


def build_run(args, world) -> engine.Setup:
    train_set, eval_set = build_datasets(args)
    if train_set.categories != eval_set.categories:
        raise SystemExit("the training and validation annotations list different categories")
    model = build_detector(args, len(train_set.categories))
    engine.log.info("categories: %d; images: %d training (with instances), %d validation; "
                    "inputs resized to %d..%d px", len(train_set.categories), len(train_set),
                    len(eval_set), args.min_size, args.max_size)
    engine.log.info("beta %s; BatchNorm %s; %d trainable stage(s)",
                    "trained" if args.train_beta else "frozen", args.norm, args.trainable_stages)

    def schedule(optimizer, updates_per_epoch: int):
        return create_scheduler_v2(optimizer, sched="multistep", num_epochs=args.epochs,
                                   decay_milestones=args.milestones, decay_rate=0.1,
                                   warmup_epochs=args.warmup_iters / updates_per_epoch,
                                   warmup_lr=args.lr * args.warmup_ratio, step_on_epochs=False,
                                   updates_per_epoch=updates_per_epoch)[0]
    return engine.Setup(model=model, task=DetectionTask(model, eval_set), train_set=train_set,
                        eval_set=eval_set, collate=collate, lr=args.lr, schedule=schedule,
                        info=dict(categories=train_set.categories,
                                  train_images=len(train_set)))


def build_evaluation(args, world, info: Optional[Dict]):
    if info is None:
        raise SystemExit(f"--eval-only takes a checkpoint of experiments/{PROGRAM}.py")
    _, evaluation = build_datasets(args)
    if evaluation.categories != info["categories"]:
        raise SystemExit("the evaluation data's categories differ from the checkpoint's")
    model = build_detector(dict_args(args, pretrained=None), len(info["categories"]))
    return model, DetectionTask(model, evaluation), evaluation, collate


def dict_args(args, **changes) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def describe(metrics: Dict[str, float]) -> str:
    return ", ".join(f"{kind} AP {metrics[f'{kind}_AP']:.1f} (AP50 {metrics[f'{kind}_AP50']:.1f}, "
                     f"AP75 {metrics[f'{kind}_AP75']:.1f})" for kind in ("bbox", "segm"))


def main(argv=None) -> Dict:
    args = parse_args(argv)
    data = str(args.data_dir) if args.data_dir else "synthetic layouts of real Fashion-MNIST items"
    return engine.main(PROGRAM, args, build_run, build_evaluation, describe, data)


if __name__ == "__main__":
    main()
