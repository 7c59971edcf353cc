"""An ImageFolder that survives unreadable files, and the collate function that drops them."""
import logging
import os
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import (IMG_EXTENSIONS, find_classes,
                                         has_file_allowed_extension)

log = logging.getLogger(__name__)

# What PIL raises for a file it cannot decode (UnidentifiedImageError is an OSError).
DECODING_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class SafeImageFolder(ImageFolder):
    """:class:`torchvision.datasets.ImageFolder` (``root/<class>/<image>``) whose items are
    ``None`` for files that cannot be read or decoded, so that one corrupt file costs one image,
    not the epoch. Pair it with :func:`collate_skipping_failed`.

    Only reading and decoding are guarded: an error raised by ``transform`` propagates, so that a
    broken augmentation is never mistaken for a broken file.

    Raises :class:`FileNotFoundError` at construction if ``root`` is missing, holds no class
    folder, or holds a class folder without images (it would silently shift every label).
    """

    def __init__(self, root, transform=None):
        self.classes_in(root)
        super().__init__(str(root), transform=transform)

    @staticmethod
    def classes_in(root) -> List[str]:
        """The class names of ``root`` (its sub-folders, sorted), after checking that each
        holds at least one image."""
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"Image folder not found: {root} (expected "
                                    f"{root}/<class>/<image> with images ending in "
                                    f"{', '.join(IMG_EXTENSIONS)})")
        try:
            classes, _ = find_classes(str(root))
        except FileNotFoundError as error:
            raise FileNotFoundError(f"No class folders in {root}: expected {root}/<class>/<image>"
                                    f" ({error})") from error
        empty = [name for name in classes if not _holds_images(root / name)]
        if empty:
            raise FileNotFoundError(
                f"{root}: class folder(s) without images: {', '.join(empty)} (every folder under "
                f"{root} is a class; images end in {', '.join(IMG_EXTENSIONS)})")
        return classes

    def __getitem__(self, index: int) -> Optional[Tuple[Tensor, int]]:
        path, target = self.samples[index]
        try:
            image = self.loader(path)  # opens and decodes (convert("RGB") reads every pixel)
        except DECODING_ERRORS as error:
            log.debug("skipping unreadable image %s: %s", path, error)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, target


def _holds_images(folder: Path) -> bool:
    return any(has_file_allowed_extension(name, IMG_EXTENSIONS)
               for _, _, names in os.walk(folder, followlinks=True) for name in names)


def collate_skipping_failed(batch: List[Optional[Tuple[Tensor, int]]]):
    """Collates the readable items; returns ``(images, targets, number_skipped)``."""
    items = [item for item in batch if item is not None]
    skipped = len(batch) - len(items)
    if not items:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, targets = default_collate(items)
    return images, targets, skipped
