"""An ImageFolder that survives unreadable files, and the collate function that drops them."""
import logging
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.data import default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

log = logging.getLogger(__name__)


class SafeImageFolder(ImageFolder):
    """:class:`torchvision.datasets.ImageFolder` (``root/<class>/<image>``) whose items are
    ``None`` for files that cannot be read or decoded, so that one corrupt file costs one image,
    not the epoch. Pair it with :func:`collate_skipping_failed`.

    Raises :class:`FileNotFoundError` at construction if ``root`` is missing or holds no class
    folder with at least one image.
    """

    def __init__(self, root, transform=None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"Image folder not found: {root} (expected "
                                    f"{root}/<class>/<image> with images ending in "
                                    f"{', '.join(IMG_EXTENSIONS)})")
        try:
            super().__init__(str(root), transform=transform)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"No images in {root}: expected {root}/<class>/<image> "
                                    f"({error})") from error

    def __getitem__(self, index: int) -> Optional[Tuple[Tensor, int]]:
        try:
            return super().__getitem__(index)
        except (OSError, ValueError, SyntaxError) as error:  # what PIL raises for broken files
            log.debug("skipping unreadable image %s: %s", self.samples[index][0], error)
            return None


def collate_skipping_failed(batch: List[Optional[Tuple[Tensor, int]]]):
    """Collates the readable items; returns ``(images, targets, number_skipped)``."""
    items = [item for item in batch if item is not None]
    skipped = len(batch) - len(items)
    if not items:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, targets = default_collate(items)
    return images, targets, skipped
