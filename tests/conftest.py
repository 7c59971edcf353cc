import os
from pathlib import Path

import pytest
import torch

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
