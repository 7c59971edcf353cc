"""Fashion-MNIST from local files only: the subset embedded in this package, or the full official
set from the Debian package ``dataset-fashion-mnist``. Nothing is ever downloaded."""
import gzip
from pathlib import Path
from typing import Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

EMBEDDED_DIR = Path(__file__).resolve().parent / "fashion_mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

FILES = {
    # The complete official test split (verbatim) and a stratified training subset.
    "embedded": {
        "train_images": "train-subset-images-idx3-ubyte.gz",
        "train_labels": "train-subset-labels-idx1-ubyte.gz",
        "test_images": "t10k-images-idx3-ubyte.gz",
        "test_labels": "t10k-labels-idx1-ubyte.gz",
    },
    "full": {
        "train_images": "train-images-idx3-ubyte.gz",
        "train_labels": "train-labels-idx1-ubyte.gz",
        "test_images": "t10k-images-idx3-ubyte.gz",
        "test_labels": "t10k-labels-idx1-ubyte.gz",
    },
}

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")


def read_idx(path: Path) -> np.ndarray:
    """Reads a gzip-compressed IDX file of unsigned bytes into an array of its stated shape."""
    data = gzip.open(path, "rb").read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    rank = data[3]
    shape = tuple(int(v) for v in np.frombuffer(data, ">u4", count=rank, offset=4))
    array = np.frombuffer(data, np.uint8, offset=4 + 4 * rank)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {array.size} values, its header says {shape}")
    return array.reshape(shape)


def load_fashion_mnist(split: str, full: bool = False) -> Tuple[Tensor, Tensor]:
    """Returns ``(images, labels)``: uint8 ``[N, 28, 28]`` and int64 ``[N]``.

    Args:
        split: ``"train"`` or ``"test"``.
        full: If ``False`` (default), the embedded files: 10,000 training images (the first 1,000
            of each class) and the complete official 10,000-image test split. If ``True``, the
            official 60,000 / 10,000 images under ``/usr/share/datasets/fashion-mnist`` (install
            them with ``apt-get install -y dataset-fashion-mnist``).
    """
    if split not in ("train", "test"):
        raise ValueError(f"Unknown Fashion-MNIST split '{split}' (expected 'train' or 'test')")
    folder, names = (DEBIAN_DIR, FILES["full"]) if full else (EMBEDDED_DIR, FILES["embedded"])
    paths = [folder / names[f"{split}_images"], folder / names[f"{split}_labels"]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        hint = ("install them with: apt-get install -y dataset-fashion-mnist" if full else
                "the package's embedded data is incomplete; reinstall attvig_pyg")
        raise FileNotFoundError(f"Fashion-MNIST files not found: {', '.join(missing)} ({hint})")
    images, labels = (read_idx(p) for p in paths)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{paths[0]} has {images.shape[0]} images but {paths[1]} has "
                         f"{labels.shape[0]} labels")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST as RGB PIL images (the grey channel repeated), for image transforms.

    Args:
        split: ``"train"`` or ``"test"``.
        full: The official 60,000 training images instead of the embedded 10,000 (see
            :func:`load_fashion_mnist`).
        transform: Applied to each PIL image.
    """

    classes = CLASSES

    def __init__(self, split: str, full: bool = False, transform=None):
        self.images, self.targets = load_fashion_mnist(split, full=full)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index].numpy()).convert("RGB")  # uint8 2-D: grey
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])
