import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# The programs of experiments/ (engine, imagenet, ablation) are imported by the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))

# One compile cache per checkout, so the first torch.compile (~15 s here) is paid once.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      str(Path(__file__).resolve().parent.parent / ".venv" / "inductor-cache"))

from torch_geometric.typing import WITH_TORCH_SCATTER, WITH_TORCH_SPARSE  # noqa: E402

requires_torch_sparse = pytest.mark.skipif(
    not WITH_TORCH_SPARSE,
    reason="torch-sparse is not installed: SparseTensor path not tested "
           "(pip install --no-build-isolation torch-sparse)")


def pytest_report_header(config):
    return (f"torch {torch.__version__}; torch-scatter: "
            f"{'yes' if WITH_TORCH_SCATTER else 'NO (PyG fallback)'}; torch-sparse: "
            f"{'yes' if WITH_TORCH_SPARSE else 'NO (SparseTensor tests skipped)'}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(12345)


# Training options for runs of a few seconds (tiny images, no augmentation, no warmup).
QUICK_TRAINING = ["--img-size", "32", "--batch-size", "8", "--workers", "0", "--aa", "none",
                  "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--no-model-ema",
                  "--warmup-epochs", "0", "--lr", "1e-3"]


@pytest.fixture
def image_folder(tmp_path):
    """ImageNet layout with 3 classes of coloured 32x32 images: 8 per class to train, 4 to test."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for split, count in (("train", 8), ("val", 4)):
        for label, colour in enumerate(((200, 30, 30), (30, 200, 30), (30, 30, 200))):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(colour, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root
