import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall on a shared CPU
os.environ.setdefault("KEOPS_CACHE_FOLDER", str(Path(__file__).resolve().parent.parent / ".keops_cache"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def devices() -> list:
    """CPU always; CUDA too when present (marked `cuda`: `pytest -m cuda` selects it)."""
    return ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)] if torch.cuda.is_available() else [])


from server_support import client, limited, model_dirs, server  # noqa: E402, F401  (server test fixtures)
