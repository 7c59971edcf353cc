"""Dataset loaders that read local files only."""
from attvig_pyg.data.fashion_mnist import CLASSES, load_fashion_mnist

__all__ = ["CLASSES", "load_fashion_mnist"]
