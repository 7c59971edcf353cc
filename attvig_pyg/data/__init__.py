"""Dataset loaders that read local files only."""
from attvig_pyg.data.fashion_mnist import CLASSES, FashionMNIST, load_fashion_mnist
from attvig_pyg.data.image_folder import SafeImageFolder, collate_skipping_failed
from attvig_pyg.data.scenes import SCENE_CLASSES, fashion_scenes

__all__ = ["CLASSES", "FashionMNIST", "SCENE_CLASSES", "SafeImageFolder",
           "collate_skipping_failed", "fashion_scenes", "load_fashion_mnist"]
