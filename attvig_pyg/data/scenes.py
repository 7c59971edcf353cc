"""Synthetic layouts of real Fashion-MNIST items, for detection and segmentation on a machine
that downloads nothing.

Each scene is a canvas with one to four real Fashion-MNIST items (the embedded subset, or the
Debian package's full set), each scaled up 2x to 4.5x, tinted and pasted at a random place, later
items occluding earlier ones. Instance masks and boxes come from the items' own visible pixels;
an instance's class is its item's class. Training scenes use training items, validation scenes
the official test split's items, so that no validation item was seen in training.

:func:`fashion_scenes` writes them once, deterministically for a seed, in the layouts real data
comes in: COCO (``train2017/``, ``val2017/``, ``annotations/instances_{train,val}2017.json``,
masks as RLE) and ADE20K (``images/{training,validation}/``, ``annotations/{training,validation}/``
label maps: 0 = ignore, 1 = background, 2 + k = item class k).
"""
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from attvig_pyg.data.fashion_mnist import CLASSES, load_fashion_mnist

__all__ = ["DEFAULT_ROOT", "SCENE_CLASSES", "fashion_scenes"]

DEFAULT_ROOT = Path(os.environ.get("ATTVIG_DATA", Path.home() / ".cache" / "attvig_pyg"))
SCENE_CLASSES = ("background",) + CLASSES  # the label map's classes after dropping 0 (ignore)
VERSION = 1  # of the generator: another version writes another folder
SPLITS = {"train": ("training", "train2017", "train"), "val": ("validation", "val2017", "test")}


def fashion_scenes(root: Optional[Path] = None, *, full: bool = False, train_scenes: int = 2000,
                   val_scenes: int = 300, size: int = 256, seed: int = 0) -> Path:
    """The folder of a scene set, written at first use: ``<root>/fashion-scenes-v1-...`` holding
    ``coco/`` and ``ade/`` (see the module docstring) and ``README.md``.

    Args:
        root: Where scene sets live (default: ``$ATTVIG_DATA`` or ``~/.cache/attvig_pyg``).
        full: Items from the Debian package's 60,000 / 10,000 images instead of the embedded
            subset's 10,000 / 10,000.
        train_scenes, val_scenes: Scenes per split.
        size: Canvas side in pixels.
        seed: The generator's seed; the same arguments always give the same files.

    Concurrent callers are safe: each writes into a temporary folder and the first to finish
    renames it into place.
    """
    root = Path(root or DEFAULT_ROOT)
    name = (f"fashion-scenes-v{VERSION}-{'full' if full else 'embedded'}-{train_scenes}x"
            f"{val_scenes}-{size}px-seed{seed}")
    folder = root / name
    if (folder / "README.md").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        for split, count in (("train", train_scenes), ("val", val_scenes)):
            _write_split(work, split, count, size, full, seed)
        (work / "README.md").write_text(_readme(full, train_scenes, val_scenes, size, seed))
        try:
            os.rename(work, folder)
        except OSError:  # another process finished first: use its identical files
            if not (folder / "README.md").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def _write_split(folder: Path, split: str, count: int, size: int, full: bool, seed: int) -> None:
    ade_split, coco_split, source = SPLITS[split]
    items, labels = load_fashion_mnist(source, full=full)
    items, labels = items.numpy(), labels.numpy()
    images = folder / "ade" / "images" / ade_split
    maps = folder / "ade" / "annotations" / ade_split
    coco_images = folder / "coco" / coco_split
    for path in (images, maps, coco_images, folder / "coco" / "annotations"):
        path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    coco = dict(images=[], annotations=[], categories=[
        dict(id=k + 1, name=name, supercategory="fashion") for k, name in enumerate(CLASSES)])
    for index in range(count):
        canvas, label_map, instances = _scene(rng, items, labels, size)
        file_name = f"{index:06d}.png"
        Image.fromarray(canvas).save(images / file_name)
        Image.fromarray(label_map).save(maps / file_name)
        _link_or_copy(images / file_name, coco_images / file_name)
        coco["images"].append(dict(id=index, file_name=file_name, height=size, width=size))
        for label, mask in instances:
            rows, cols = np.nonzero(mask)
            box = [int(cols.min()), int(rows.min()), int(cols.max() - cols.min() + 1),
                   int(rows.max() - rows.min() + 1)]
            coco["annotations"].append(dict(
                id=len(coco["annotations"]) + 1, image_id=index, category_id=int(label) + 1,
                bbox=box, area=int(mask.sum()), iscrowd=0, segmentation=_rle(mask)))
    (folder / "coco" / "annotations" / f"instances_{coco_split}.json").write_text(
        json.dumps(coco))


def _scene(rng: np.random.Generator, items: np.ndarray, labels: np.ndarray,
           size: int) -> Tuple[np.ndarray, np.ndarray, List[Tuple[int, np.ndarray]]]:
    """One canvas, its label map and its visible instances ``(class, mask)``."""
    background = rng.integers(0, 70, 3)
    canvas = np.clip(background + rng.normal(0, 6, (size, size, 3)), 0, 255)
    placed: List[Tuple[int, np.ndarray, int]] = []  # (class, visible mask, original area)
    for _ in range(int(rng.integers(1, 5))):
        index = int(rng.integers(len(items)))
        side = min(size, int(round(28 * rng.uniform(2.0, 4.5))))
        item = np.asarray(Image.fromarray(items[index]).resize((side, side),
                                                               Image.BILINEAR), dtype=np.float64)
        top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
        tint = rng.uniform(0.55, 1.0, 3) * 255
        alpha = (item / 255.0)[..., None]
        window = canvas[top:top + side, left:left + side]
        canvas[top:top + side, left:left + side] = window * (1 - alpha) + tint * alpha
        mask = np.zeros((size, size), dtype=bool)
        mask[top:top + side, left:left + side] = item > 40
        placed = [(label, visible & ~mask, area) for label, visible, area in placed]
        placed.append((int(labels[index]), mask, int(mask.sum())))
    label_map = np.ones((size, size), dtype=np.uint8)
    instances = []
    for label, visible, area in placed:
        label_map[visible] = 2 + label
        # An item mostly hidden by later ones is not an instance any more (as COCO would
        # not annotate it): its visible pixels stay in the label map.
        if visible.sum() >= max(50, 0.3 * area):
            instances.append((label, visible))
    return canvas.round().astype(np.uint8), label_map, instances


def _rle(mask: np.ndarray) -> Dict:
    """COCO's uncompressed run-length encoding (column-major runs, starting with zeros)."""
    flat = mask.flatten(order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]]))
    counts = runs.tolist() if flat[0] == 0 else [0] + runs.tolist()
    return dict(counts=counts, size=list(mask.shape))


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _readme(full: bool, train_scenes: int, val_scenes: int, size: int, seed: int) -> str:
    return f"""# Synthetic layouts of real Fashion-MNIST items

Written by attvig_pyg.data.scenes.fashion_scenes (generator version {VERSION}, seed {seed}):
{train_scenes} training and {val_scenes} validation scenes of {size}x{size} pixels, each with one
to four real Fashion-MNIST items ({'the Debian package dataset-fashion-mnist' if full else
'the subset embedded in attvig_pyg'}), scaled 2x to 4.5x, tinted and pasted at random places.
Training scenes use training items, validation scenes the official test split's items.
These are synthetic layouts, not photographs: numbers measured on them say that a pipeline
learns, not how it does on COCO or ADE20K.

- coco/: COCO instances format, classes 1-10 = {', '.join(CLASSES)}
- ade/: ADE20K layout; label maps 0 = ignore (unused), 1 = background, 2-11 = the classes above
"""
