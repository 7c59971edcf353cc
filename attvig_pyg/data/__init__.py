"""Dataset loaders that read local files only."""
from attvig_pyg.data.fashion_mnist import CLASSES, FashionMNIST, load_fashion_mnist
from attvig_pyg.data.image_folder import SafeImageFolder, collate_skipping_failed

__all__ = ["CLASSES", "FashionMNIST", "SafeImageFolder", "collate_skipping_failed",
           "load_fashion_mnist"]
