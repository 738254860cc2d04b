"""The blocked prefill (model.recurrent, blocks of CHUNK) equals stepping at lengths around the block
boundaries, from a zero and a nonzero state, for the diagonal and the DPLR forms, in its C pass and in its
torch ops; it does no float64 work."""

import pytest
import torch

from model.recurrent import CHUNK, DiagonalSSM, DPLRStep
from tests.test_recurrent import assert_logits_close, make, step_all

# around the block boundaries of CHUNK and of the multiples 128 and 4096
LENGTHS = sorted({1, CHUNK - 1, CHUNK, CHUNK + 1, 127, 128, 129, 1000, 4097})
STATE_TOL = 1e-4  # ‖Δstate‖/‖state‖, as tests/test_recurrent.py


@pytest.fixture(
    scope="module",
    params=[("s4d", "diag-inv", DiagonalSSM), ("s4", "legs", DPLRStep)],
    ids=["diagonal", "dplr"],
)
def converted_pair(request):
    """One net converted twice: with the C step (its prefill the C pass) and without (the torch ops), and
    the cache of `stepped` for this net."""
    kernel, init, form = request.param
    torch.manual_seed(0)
    net = make(kernel, init, l_max=1024).eval()
    r, t = net.to_recurrent(), net.to_recurrent(fused_step=False)
    assert all(type(f) is form for f in r.layers + t.layers)
    assert all(f._prefill_c is not None and f.in_tab is None for f in r.layers), "the C pass should apply"
    assert all(f._prefill_c is None and f.in_tab is not None for f in t.layers)
    return r, t, {}


@pytest.fixture
def converted(converted_pair):
    return converted_pair[0]


@pytest.fixture(params=["c", "matmul", "fft"])
def rec(converted_pair, request):
    """The blocks in one C pass (`_fused_prefill`, the default on CPU), or the torch ops with the in-block
    convolution by the Toeplitz matmul or by the cached-transform FFT."""
    r = converted_pair[0] if request.param == "c" else converted_pair[1]
    tabs = [f.conv_tab for f in r.layers]
    if request.param == "fft":
        for f in r.layers:
            f.conv_tab = None
    r.prefill_by_steps_max_tokens = 0  # the parallel form at every length
    yield r
    for f, t in zip(r.layers, tabs):
        f.conv_tab = t


def stepped(pair, L: int, start: str):
    """Tokens of length L, the state they start from (zero, or 300 tokens already stepped, different per
    row) and the logits and state of stepping them one token at a time, computed once per pair, L and
    start for the three paths: by the C step (`pair[0]`), which equals the torch ops' step to float32
    rounding (tests/test_recurrent.py), so the torch-op paths are held to the same stepped reference
    without stepping 4,400 tokens through the torch ops twice."""
    r, _, cache = pair  # cache: (L, start) -> (tokens, state, logits, state)
    if (L, start) not in cache:
        g = torch.Generator().manual_seed(L)
        tokens = torch.randint(0, 32, (2, 300 + L), generator=g)
        state = r.init_state(2)
        if start == "nonzero":
            _, state = step_all(r, tokens[:, :300], state)
            assert float(state.abs().max()) > 0
        tokens = tokens[:, 300:]
        cache[L, start] = (tokens, state, *step_all(r, tokens, state))
    return cache[L, start]


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("start", ["zero", "nonzero"])
def test_prefill_equals_stepping(converted_pair, rec, L, start):
    tokens, state, want_logits, want_state = stepped(converted_pair, L, start)
    got_logits, got_state = rec.prefill(tokens, state.clone())
    assert_logits_close(got_logits, want_logits)
    assert float((got_state - want_state).norm() / want_state.norm()) <= STATE_TOL


def test_prefill_does_no_float64_work(rec):
    """Every op the prefill runs has float32/complex64 (or integer) tensors only: the float64 work is done
    at conversion."""
    tokens = torch.randint(0, 32, (2, 3 * CHUNK + 5))
    _, state = rec.prefill(tokens, rec.init_state(2))
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            for a in (*args, *kwargs.values()):
                if isinstance(a, torch.Tensor) and a.dtype in (torch.float64, torch.complex128):
                    seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **kwargs)

    with Spy():
        rec.prefill(tokens, state)
    assert not seen, f"float64 tensors reached {sorted(set(seen))}"


@pytest.mark.parametrize("L", [5, 3 * CHUNK + 1])  # the C step's recurrent form, the parallel form
def test_prefill_logits_last_and_none(converted, L):
    """logits="last" is the last position of "all" (bit for bit in the C step's form; in the parallel form
    the head on one row rounds as another GEMM blocking) and "none" returns None; the state is the same bits
    whichever is asked; unknown: ValueError."""
    rec = converted
    rec.prefill_by_steps_max_tokens = 512
    tokens = torch.randint(0, 32, (2, L), generator=torch.Generator().manual_seed(L))
    state = rec.init_state(2)
    every, s_all = rec.prefill(tokens, state)
    last, s_last = rec.prefill(tokens, state, logits="last")
    none, s_none = rec.prefill(tokens, state, logits="none")
    assert every.shape == (2, L, 32) and last.shape == (2, 1, 32) and none is None
    if L <= rec.prefill_by_steps_max_tokens:  # the C step layer by layer: row tiles never change bits
        assert rec._net_step is not None and torch.equal(last, every[:, -1:])
    assert float((last - every[:, -1:]).norm() / every[:, -1:].norm()) <= 1e-6
    assert torch.equal(s_all, s_last) and torch.equal(s_all, s_none)
    with pytest.raises(ValueError, match="logits"):
        rec.prefill(tokens, state, logits="first")
