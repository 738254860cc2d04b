import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall on a shared CPU

import httpx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from model.cauchy import keops_cache_folder  # noqa: E402

# Without CUDA, Triton kernels (model/triton_step.py) run in Triton's interpreter on CPU tensors. It must be
# chosen before triton is imported (its library functions, tl.sum among them, are made then); nothing has
# imported it yet (model/triton_step.py imports it at its first kernel call).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (make test runs 2 workers) one KeOps cache per worker: KeOps writes a formula's source
# and library in place, without a lock, so two workers compiling the same formula at once could load a
# half-written library. The modules that compile most formulas share one worker (KEOPS_MODULES below), so
# few formulas are compiled twice. Set in the environment for the subprocesses too (servers, training).
_worker = os.environ.get("PYTEST_XDIST_WORKER")
os.environ["KEOPS_CACHE_FOLDER"] = str(keops_cache_folder() / _worker if _worker else keops_cache_folder())

# Servers started by the tests (in this process or as subprocesses) keep their layers' recurrent forms in a
# folder of this run, never in the user's ~/.cache: the first server of a model converts it, later ones read
# it (tests/test_form_cache.py checks that both give the same bits).
_form_cache = tempfile.mkdtemp(prefix="s4-recurrent-cache-")
atexit.register(shutil.rmtree, _form_cache, ignore_errors=True)
os.environ["S4_RECURRENT_CACHE"] = _form_cache

# Modules that compile KeOps formulas of their own (gradients, the Vandermonde kernel, the official code's
# kernels): one xdist group, so one worker compiles them.
KEOPS_MODULES = {
    "test_cauchy",
    "test_kernel",
    "test_official_import",
    "test_model_config",
    "test_train_config",
}


# httpx's default timeout, 5 s, for the test requests that name none (most, to the servers the tests start in
# this process): on a loaded CI machine a generation, a model's first request or a session's import there can
# take longer, and a ReadTimeout then failed a sound test. 60 s: a bound a loaded machine does not reach; a
# request that names its timeout keeps it.
TEST_HTTP_TIMEOUT = httpx.Timeout(60.0)
_HTTPX_CALLS = ("request", "get", "options", "head", "post", "put", "patch", "delete")
for _fn in [getattr(httpx, name) for name in _HTTPX_CALLS] + [httpx.stream.__wrapped__]:
    _fn.__kwdefaults__["timeout"] = TEST_HTTP_TIMEOUT
for _client in (httpx.Client, httpx.AsyncClient):
    _client.__init__.__kwdefaults__["timeout"] = TEST_HTTP_TIMEOUT


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """For pytest-xdist's `--dist loadgroup` (make test): each module's tests in one group, so they run on one
    worker in order and a module-scoped fixture (a served model, a trained checkpoint) is made once; the
    KEOPS_MODULES in one group. Runs before xdist reads the groups (tryfirst); without xdist, inert."""
    for item in items:
        stem = item.path.stem
        item.add_marker(pytest.mark.xdist_group("keops" if stem in KEOPS_MODULES else stem))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_torch_thread():
    """One torch (OpenMP) thread for the test, the count restored after: single-sample steps are
    latency-bound, and a second thread only contends on the shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


VERSES = [
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n",
    "To be, or not to be, that is the question.\n",
    "All the world's a stage, and all the men and women merely players.\n",
]


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    """Four tiny "plays" prepared as model.data does (validation gamma, test delta), for the trainer tests."""
    from model.data import prepare_text

    tmp = tmp_path_factory.mktemp("plays")
    src = tmp / "texts"
    src.mkdir()
    for i, name in enumerate(["alpha", "beta", "gamma", "delta"]):
        (src / f"{name}_gut.txt").write_text("".join(VERSES[(i + k) % 3] for k in range(60)))
    prepare_text(tmp / "data", src, held_out={"val": ["gamma"], "test": ["delta"]})
    return tmp / "data"


def devices() -> list:
    """CPU always; CUDA too when present (marked `cuda`: `pytest -m cuda` selects it)."""
    return ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)] if torch.cuda.is_available() else [])


from server_support import client, limited, model_dirs, server  # noqa: E402, F401  (server test fixtures)
