import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall on a shared CPU
os.environ.setdefault("KEOPS_CACHE_FOLDER", str(Path(__file__).resolve().parent.parent / ".keops_cache"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _fused_build():
    """With $S4_CFLAGS set (make test's second pass builds the other vector width, -DS4_VW=…), the fused
    library must build with those flags and have that width: a failed build would fall back to the torch
    ops, and the pass would test those instead."""
    flags = os.environ.get("S4_CFLAGS", "")
    if flags:
        from model import fused

        lib = fused.library()
        assert lib is not None, f"the fused library did not build with S4_CFLAGS={flags!r}"
        widths = [word.split("=", 1)[1] for word in flags.split() if word.startswith("-DS4_VW=")]
        if widths:  # the last definition is the compiler's
            assert lib.ssm_prefill_width() == int(widths[-1]), flags


def devices() -> list:
    """CPU always; CUDA too when present (marked `cuda`: `pytest -m cuda` selects it)."""
    return ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)] if torch.cuda.is_available() else [])


from server_support import client, limited, model_dirs, server  # noqa: E402, F401  (server test fixtures)
