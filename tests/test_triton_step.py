"""The diagonal SSM step as one Triton kernel (model/triton_step.py), the GPU's step, tested without a GPU.

Without CUDA the kernel runs in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported); where CUDA is, the same tests run the compiled kernel on
CUDA tensors (marked `triton`: scripts/gpu-check runs them there), and tests/test_cuda.py compares it with
the torch step on the shipped models. What is checked:
- the kernel against the recurrence in float64 from the float64 slots (λ₁, λ₂, b, w of
  `real_block_slots`), not from the float32 copies it reads: batches that end mid-program, a state with
  more slots than the layer's (those written as 0 whatever was there), in place, a strided batch;
- a row's result does not depend on the rows beside it (bit for bit);
- the models (RecurrentModel, SaShiMi) stepping with it agree with their torch step, a DPLR layer among
  diagonal ones included, and their load-time verification runs through it;
- the kernel compiles to machine code for the H100/H200 (sm_90) and the A100 (sm_80) here, with
  Triton's own ptxas (a subprocess without the interpreter);
- when it is chosen: CUDA only, `S4_TRITON_STEP=0` turns it off, the server's setting.

Tolerances: float32 arithmetic on float32 parameters rounded from float64 (each ≤ 2⁻²⁴ relative): a
coordinate within 8·2⁻²⁴ of the sum of its terms' magnitudes, y within 4(M + 4)·2⁻²⁴ of Σ|terms|. Against
the torch step (the same float32 parameters, another order of the sum and FMA): 1e-5 relative.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from numerics import step_all

from model import ModelConfig, SequenceModel, build, triton_step
from model.cuda_graphs import BucketedStep, bucket_sizes
from model.recurrent import DiagonalSSM, DPLRStep, s4_real_system

pytestmark = pytest.mark.triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel's tensors: compiled, or interpreted
F64 = torch.float64
U = 2.0**-24
ROOT = Path(__file__).resolve().parents[1]
SAME = dict(rtol=1e-5, atol=1e-5)  # against the torch step: float32, another summation order


def _form(H: int = 8, n_complex: int = 5, n_real: int = 3, seed: int = 0) -> DiagonalSSM:
    """A DiagonalSSM of H channels with complex modes |μ| in [0.3, 0.99) and real ones of both signs (two
    real modes share a slot: `real_block_slots`)."""
    g = torch.Generator().manual_seed(seed)
    r = 0.3 + 0.69 * torch.rand(H, n_complex, generator=g, dtype=F64)
    mu_c = torch.polar(r, 0.1 + 3 * torch.rand(H, n_complex, generator=g, dtype=F64))
    mu_r = ((torch.rand(H, n_real, generator=g, dtype=F64) * 1.9) - 0.95).to(torch.complex128)
    mu = torch.cat([mu_c, mu_r], 1)
    b = torch.randn(H, mu.shape[1], generator=g, dtype=torch.complex128)
    c = torch.randn(H, mu.shape[1], generator=g, dtype=torch.complex128)
    b[:, n_complex:], c[:, n_complex:] = b[:, n_complex:].real, c[:, n_complex:].real  # real modes: real b, c
    return DiagonalSSM(mu, b, c, DEV)


def _reference(form: DiagonalSSM, u: torch.Tensor, x: torch.Tensor):
    """float64: (y, x₁', x₂', bound_y, bound₁, bound₂) from the slots' float64 blocks, and the error
    bounds of the tolerances above."""
    M = form.M
    l1, l2 = form.lam64
    p, m, s = l1.real, l1.imag, l2.real
    b1, b2 = form.b64[:, 0], form.b64[:, 1]
    w1, w2 = form.w64[:, 0], form.w64[:, 1]
    x1, x2, uu = x[..., 0, :M].double(), x[..., 1, :M].double(), u.double()[..., None]
    n1 = p * x1 - m * x2 + b1 * uu
    n2 = m * x1 + s * x2 + b2 * uu
    y = (w1 * n1 + w2 * n2).sum(-1)
    t1 = (p * x1).abs() + (m * x2).abs() + (b1 * uu).abs()
    t2 = (m * x1).abs() + (s * x2).abs() + (b2 * uu).abs()
    ty = (w1.abs() * t1 + w2.abs() * t2).sum(-1)
    return y, n1, n2, 4 * (M + 4) * U * ty, 8 * U * t1, 8 * U * t2


@pytest.mark.parametrize(
    ("B", "extra_slots", "in_place", "strided"),
    [
        (1, 0, False, False),
        (5, 0, True, False),
        (37, 3, False, False),
        (37, 3, True, True),
        (2, 9, False, True),
    ],
)
def test_the_kernel_is_the_float64_recurrence_within_float32_rounding(B, extra_slots, in_place, strided):
    """B·H pairs that end mid-program (ROWS = 16: 5·8 = 40, 37·8 = 296); a state wider than the layer (its
    extra slots written as 0 over NaN); in place (xo is x); a batch stride that is not H·2·M."""
    form = _form()
    H, M = form.H, form.M
    Ms = M + extra_slots
    g = torch.Generator().manual_seed(1)
    big = (torch.randn(B, 3, H, 2, Ms, generator=g) * 4).to(DEV)
    big[..., M:] = 0  # a state's slots past the layer's own hold 0
    x = big[:, 1] if strided else big[:, 1].contiguous()
    u = (torch.randn(B, H, generator=g) * 2).to(DEV)
    xin, around = x.clone(), big[:, [0, 2]].clone()
    xo = x if in_place else torch.full_like(x, float("nan"))
    y = torch.full((B, H), float("nan"), device=DEV)
    triton_step.diag_step(form, u, x, xo, y)
    y64, n1, n2, ey, e1, e2 = (t.cpu() for t in _reference(form, u, xin))
    y, xo = y.cpu(), xo.cpu()
    assert bool(((y.double() - y64).abs() <= ey).all()), (y.double() - y64).abs().max()
    assert bool(((xo[..., 0, :M].double() - n1).abs() <= e1).all())
    assert bool(((xo[..., 1, :M].double() - n2).abs() <= e2).all())
    assert bool((xo[..., M:] == 0).all())  # the slots past the layer's: 0 (they were NaN)
    assert torch.equal(big[:, [0, 2]], around)  # the rows beside the view untouched


def test_a_rows_result_is_the_same_bits_alone_and_in_any_batch():
    form = _form(H=6, seed=3)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, form.H, 2, form.M, generator=g).to(DEV)
    u = torch.randn(9, form.H, generator=g).to(DEV)
    xo, y = torch.empty_like(x), torch.empty(9, form.H, device=DEV)
    triton_step.diag_step(form, u, x, xo, y)
    for i in (0, 4, 8):
        xi, yi = torch.empty_like(x[i : i + 1]), torch.empty(1, form.H, device=DEV)
        triton_step.diag_step(form, u[i : i + 1], x[i : i + 1], xi, yi)
        assert torch.equal(xi, xo[i : i + 1]) and torch.equal(yi, y[i : i + 1])


@pytest.mark.parametrize("in_place", [True, False])
def test_a_row_mask_steps_its_rows_and_leaves_the_others_unread_and_unwritten(in_place):
    """`rows` (SaShiMi's dense step: the rows that step a coarse level): those rows get the unmasked
    kernel's bits; the others' xo keeps what it held (not even the slots past the layer's are written)
    and their y is 0; their x is never read (NaN there changes nothing)."""
    form = _form(H=6, seed=4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, form.H, 2, form.M + 2, generator=g).to(DEV)
    x[..., form.M :] = 0
    u = torch.randn(9, form.H, generator=g).to(DEV)
    rows = torch.tensor([True, False, False, True, True, False, True, False, True], device=DEV)
    want_x, want_y = torch.empty_like(x), torch.empty(9, form.H, device=DEV)
    triton_step.diag_step(form, u, x, want_x, want_y)
    x[~rows] = float("nan")  # never read
    held = torch.full_like(x, 7.0)
    xo = x if in_place else held.clone()
    y = torch.full((9, form.H), float("nan"), device=DEV)
    before = xo.clone()
    triton_step.diag_step(form, u, x, xo, y, rows)
    assert torch.equal(xo[rows], want_x[rows]) and torch.equal(y[rows], want_y[rows])
    assert torch.equal(xo[~rows].isnan(), before[~rows].isnan())  # (NaN ≠ NaN: compared by pattern)
    assert torch.equal(xo[~rows].nan_to_num(), before[~rows].nan_to_num()) and bool((y[~rows] == 0).all())
    with pytest.raises(ValueError, match="rows must be"):
        triton_step.diag_step(form, u, x, xo, y, rows[:-1])
    with pytest.raises(ValueError, match="rows must be"):
        triton_step.diag_step(form, u, x, xo, y, rows.long())
    with pytest.raises(ValueError, match="unit stride"):  # (the kernel reads rows[b] at k_ptr + b)
        triton_step.diag_step(form, u, x, xo, y, torch.stack([rows, rows], 1)[:, 0])


def test_it_refuses_what_it_does_not_compute_and_an_empty_batch_is_a_no_op():
    form = _form(H=4)
    x, u, y = (torch.zeros(*shape, device=DEV) for shape in ((2, 4, 2, form.M), (2, 4), (2, 4)))
    with pytest.raises(ValueError, match="float32"):
        triton_step.diag_step(form, u.double(), x, x, y)
    with pytest.raises(ValueError, match=r"expected"):
        wrong = torch.zeros(2, 5, 2, form.M, device=DEV)
        triton_step.diag_step(form, u, wrong, wrong, y)
    with pytest.raises(ValueError, match=r"≥"):  # fewer slots than the layer has
        triton_step.diag_step(form, u, x[..., :-1], x[..., :-1], y)
    strided = torch.zeros(2, 4, 2, 2 * form.M, device=DEV)[..., ::2]
    with pytest.raises(ValueError, match="unit stride"):
        triton_step.diag_step(form, u, strided, strided, y)
    triton_step.diag_step(form, u[:0], x[:0], x[:0], y[:0])


@pytest.mark.parametrize("value", ["1", "TRUE", "on", "yes", "0", "off", "false", "2"])
def test_the_interpreter_is_on_exactly_where_triton_reads_triton_interpret_as_on(monkeypatch, value):
    """`interpreting` reads TRITON_INTERPRET as triton does (`triton.knobs`, the switch its `jit` takes),
    so a value triton reads as off (off, false, 2) is the compiled kernel's CUDA tensors here too: such a
    GPU server kept the kernel (its probe's CUDA tensors were refused: the torch step served), and CPU
    tensors are refused by name before a launch (they reached the compiled kernel: "0 active drivers")."""
    from triton import knobs  # noqa: PLC0415

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert triton_step.interpreting() == bool(knobs.runtime.interpret)
    form = _form(H=4)
    x, u, y = (torch.zeros(*shape, device=DEV) for shape in ((2, 4, 2, form.M), (2, 4), (2, 4)))
    if (DEV == "cuda") == triton_step.interpreting():  # (interpreted: CPU tensors; compiled: CUDA's)
        with pytest.raises(ValueError, match=f"tensors on {x.device.type} with TRITON_INTERPRET {value}"):
            triton_step.diag_step(form, u, x, x, y)
    else:  # the kernel runs on them
        u.fill_(1.0)
        triton_step.diag_step(form, u, x, x, y)
        assert bool(y.ne(0).any())


def _mixed(net: SequenceModel, s4: SequenceModel, **kw):
    """net's recurrent form (C step off) with layer 0's SSM the exact DPLR step (the fallback for
    ill-conditioned eigenvectors) of the S4 network `s4`'s layer 0 (same H, no more modes), the others as
    converted (diagonal)."""
    rec = net.to_recurrent(device=DEV, fused_step=False, **kw)
    kernel = s4.kernels()[0]
    s = {k: v.detach().cpu() for k, v in kernel.ssm(F64).items()}
    rec.layers[0] = DPLRStep(s, *s4_real_system(s, kernel.L), rec.device)
    assert rec.layers[0].M <= rec.M
    return rec


SMALL = dict(vocab_size=32, d_model=16, n_layers=2, d_state=8, l_max=64, cauchy_backend="torch")


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return {
        "s4d-ff": SequenceModel(ModelConfig(**SMALL, kernel="s4d", d_ff=32)),
        "s4d-s4": SequenceModel(ModelConfig(**{**SMALL, "n_layers": 3}, kernel="s4d")),
        "s4": SequenceModel(ModelConfig(**SMALL, kernel="s4")),
    }


@pytest.mark.parametrize("name", ["s4d-ff", "s4d-s4"])
def test_a_model_stepping_with_the_kernel_agrees_with_its_torch_step(nets, name, monkeypatch):
    """20 steps of 3 rows from reached states; s4d-s4: its layer 0 a DPLR step (the torch step serves it,
    writing its state into the same output). In place (out=state) the same values; out=None leaves the
    state passed in untouched. The load-time verification (stepped probe against conv mode) ran through
    the kernel."""
    calls = []
    real = triton_step.diag_step
    monkeypatch.setattr(triton_step, "diag_step", lambda *a: calls.append(1) or real(*a))
    net = nets[name]
    if name == "s4d-s4":
        rec, plain = _mixed(net, nets["s4"], triton_step=True), _mixed(net, nets["s4"], triton_step=False)
        assert [f.form for f in rec.layers] == ["dplr", "diagonal", "diagonal"]
    else:
        rec = net.to_recurrent(device=DEV, fused_step=False, triton_step=True)
        plain = net.to_recurrent(device=DEV, fused_step=False, triton_step=False)
        assert calls, "the verification did not step through the kernel"
        assert rec.verification["step_rel_err"] <= rec.verification["tol"]
    assert rec.triton_step_active and not plain.triton_step_active and rec._fused is None
    tokens = torch.randint(0, SMALL["vocab_size"], (3, 24)).to(DEV)
    _, state = step_all(plain, tokens[:, :4], plain.init_state(3))
    calls.clear()
    a, sa = step_all(rec, tokens[:, 4:], state)
    assert len(calls) == 20 * sum(f.form == "diagonal" for f in rec.layers)
    b, sb = step_all(plain, tokens[:, 4:], state)
    torch.testing.assert_close(a, b, **SAME)
    torch.testing.assert_close(sa, sb, **SAME)
    before = state.clone()
    logits, new = rec.step(tokens[:, 0], state)
    assert torch.equal(state, before) and new is not state
    inplace = state.clone()
    logits2, out = rec.step(tokens[:, 0], inplace, out=inplace)
    assert out is inplace and torch.equal(out, new) and torch.equal(logits2, logits)


def test_the_buckets_pad_and_copy_around_the_kernel_step(nets):
    """BucketedStep (the CUDA graphs' buffers; capture off here) over the kernel's step: every batch size
    gives the plain step's values (padded rows cannot reach real ones: the kernel is row-wise)."""
    rec = nets["s4d-ff"].to_recurrent(device=DEV, fused_step=False, triton_step=True)
    buckets = BucketedStep(rec, bucket_sizes(8), capture=False)
    for n in (1, 3, 8, 11):
        tok = torch.randint(0, SMALL["vocab_size"], (n,)).to(DEV)
        state = (torch.randn(len(rec.layers), n, rec.H, 2, rec.M) * 0.1).to(DEV)
        la, sa = buckets(tok, state)
        lb, sb = rec._step_eager(tok, state, None)
        torch.testing.assert_close(la, lb, **SAME)
        torch.testing.assert_close(sa, sb, **SAME)


def test_sashimi_steps_its_diagonal_layers_in_place_with_the_kernel(monkeypatch):
    """SaShiMi (S4D layers) with the kernel against its torch step: 3 rows at different pooling phases
    over 40 steps (at the top level every row steps: the kernel updates the state's view in place; a
    coarser level steps only the rows whose phase emits: the torch step); and the dense step with it."""
    calls = []
    real = triton_step.diag_step
    monkeypatch.setattr(triton_step, "diag_step", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(1)
    cfg = dict(arch="sashimi", vocab_size=32, d_model=16, n_layers=1, d_state=8, l_max=64, kernel="s4d",
               init="legs", cauchy_backend="torch")  # fmt: skip
    net = build(ModelConfig(**cfg)).eval()
    rec = net.to_recurrent(device=DEV, fused_step=False, triton_step=True)
    plain = net.to_recurrent(device=DEV, fused_step=False, triton_step=False)
    assert rec._triton and not plain._triton and {r["form"] for r in rec.report} == {"diagonal"}
    _, s1 = plain.prefill(torch.randint(0, 32, (1, 5)).to(DEV), plain.init_state(1))
    _, s2 = plain.prefill(torch.randint(0, 32, (1, 11)).to(DEV), plain.init_state(1))
    state = torch.cat([s1, plain.init_state(1), s2])
    tokens = torch.randint(0, 32, (3, 40)).to(DEV)
    calls.clear()
    a, sa = step_all(rec, tokens, state)
    assert calls
    b, sb = step_all(plain, tokens, state)
    torch.testing.assert_close(a, b, **SAME)
    torch.testing.assert_close(sa, sb, **SAME)
    # the dense step (what the CUDA graphs capture): every level of every row, the kernel stepping in place
    # only the rows that step the level (its row mask: the others' states neither read nor written)
    calls.clear()
    dense, c = state.clone(), []
    for t in range(tokens.shape[1]):
        c.append(rec._step_eager(tokens[:, t], dense, out=dense, ids_checked=True)[0])
    assert len(calls) == 3 * tokens.shape[1]  # every S4 layer every step
    torch.testing.assert_close(torch.stack(c, 1), b, **SAME)
    torch.testing.assert_close(dense, sb, **SAME)


def compiled_in_a_subprocess(script: str, tmp_path: Path) -> dict:
    """Run `script` (which compiles the kernel with triton.compile and prints one JSON line) in a Python
    without TRITON_INTERPRET (the compiled path's library functions), its Triton cache in tmp_path, FMA
    fusion on as the served kernel has it; its JSON. Fails the test with the script's stderr."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(ROOT))
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_kernel_compiles_for_hopper_and_ampere(tmp_path):
    """The compiled path the interpreter does not take: Triton lowers the kernel to PTX and ptxas (shipped
    in the triton wheel) assembles it for sm_90 and sm_80, in a subprocess without TRITON_INTERPRET (its
    library functions must be the compiled ones), without and with the row mask. The loads of x are
    predicated global loads."""
    script = """
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import model.triton_step as ts
fn = ts._kernel()
sig = {n: ("*u8" if n == "k_ptr" else "*fp32" if n.endswith("_ptr") else "i32") for n in fn.arg_names}
sig.update(ROWS="constexpr", BLOCK_M="constexpr", MASKED="constexpr")
out = {}
for cc in (90, 80):
    for masked in (False, True):
        k = triton.compile(ASTSource(fn, sig, constexprs={"ROWS": ts.ROWS, "BLOCK_M": 32, "MASKED": masked}),
                           target=GPUTarget("cuda", cc, 32))
        out[f"{cc}{'m' if masked else ''}"] = {
            "cubin": len(k.asm["cubin"]), "ld": k.asm["ptx"].count("ld.global"),
            "st": k.asm["ptx"].count("st.global"), "target": f"sm_{cc}" in k.asm["ptx"]}
print(json.dumps(out))
"""
    out = compiled_in_a_subprocess(script, tmp_path)
    for cc in ("90", "80", "90m", "80m"):  # (m: with the row mask, SaShiMi's dense step)
        assert out[cc]["cubin"] > 1000 and out[cc]["target"], out
        assert out[cc]["ld"] > 0 and out[cc]["st"] > 0, out


def test_the_kernel_is_chosen_on_cuda_unless_turned_off_or_it_does_not_run_there(monkeypatch):
    monkeypatch.delenv("S4_TRITON_STEP", raising=False)
    assert triton_step.available()
    monkeypatch.setattr(triton_step, "probe", lambda device: None)  # (this machine may have no GPU)
    assert triton_step.wanted("cuda") and triton_step.wanted(torch.device("cuda", 0))
    assert not triton_step.wanted("cpu")
    for off in ("0", "false", "No", " off "):  # as the server's setting parses them (pydantic's booleans)
        monkeypatch.setenv("S4_TRITON_STEP", off)
        assert not triton_step.wanted("cuda"), off
    for on in ("1", "TRUE", "yes", "on"):
        monkeypatch.setenv("S4_TRITON_STEP", on)
        assert triton_step.wanted("cuda"), on
    monkeypatch.setenv("S4_TRITON_STEP", "maybe")
    with pytest.raises(ValueError, match="S4_TRITON_STEP='maybe': expected a boolean"):
        triton_step.wanted("cuda")
    monkeypatch.delenv("S4_TRITON_STEP")
    monkeypatch.setattr(triton_step, "probe", lambda device: "RuntimeError: no C compiler")
    assert not triton_step.wanted("cuda")
    # the CPU default: the C step, not the kernel (and never the kernel unless asked)
    torch.manual_seed(0)
    rec = SequenceModel(ModelConfig(**SMALL, kernel="s4d")).to_recurrent()
    assert not rec._triton and not rec.triton_step_active
    # asked for where it cannot run: an error at once, naming why (not from inside the verification)
    with pytest.raises(ValueError, match=r"triton_step=True: the Triton kernel does not run on cpu: .*no C"):
        SequenceModel(ModelConfig(**SMALL, kernel="s4d")).to_recurrent(triton_step=True)
    with pytest.raises(ValueError, match=r"use_triton_step\(True\): the Triton kernel does not run"):
        rec.use_triton_step(True)


def test_a_model_without_a_diagonal_layer_keeps_the_torch_step_and_says_so(nets):
    rec = nets["s4"].to_recurrent(device=DEV, fused_step=False, triton_step=True)
    assert {f.form for f in rec.layers} == {"dplr"}, "the untrained S4 layers were expected to stay DPLR"
    assert not rec.triton_step_active
    rec.use_triton_step(True)
    assert not rec.triton_step_active


def test_the_probe_runs_the_kernel_once_and_names_what_failed(monkeypatch):
    """`probe` launches the kernel on one slot and checks the value (None: it runs and is right); a
    failure is one line naming the exception (Triton needs a C compiler for its launcher, which a slim
    image may lack), or the wrong values."""
    triton_step._probe.cache_clear()
    try:
        assert triton_step.probe(DEV) is None
        triton_step._probe.cache_clear()

        def broken():
            raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.\nmore")

        monkeypatch.setattr(triton_step, "_kernel", broken)
        why = triton_step.probe(DEV)
        assert why == "RuntimeError: Failed to find C compiler. Please specify via CC environment variable."
        triton_step._probe.cache_clear()
        monkeypatch.setattr(triton_step, "diag_step", lambda form, u, x, xo, y: y.fill_(7.0))
        assert "one step gave y, x₁', x₂' = (7.0, 1.0, 0.0)" in triton_step.probe(DEV)
    finally:
        triton_step._probe.cache_clear()


def test_the_server_uses_the_kernel_on_cuda_only_where_it_runs(monkeypatch, caplog):
    """server.registry.use_triton_step: on with the setting on a CUDA device when the probe passes; a
    failed probe is a warning naming why, and the torch step serves; never on CPU or with the setting
    off."""
    from server.config import Settings  # noqa: PLC0415
    from server.registry import use_triton_step  # noqa: PLC0415

    on, off = Settings(triton_step=True), Settings(triton_step=False)
    monkeypatch.setattr(triton_step, "probe", lambda device: None)
    assert use_triton_step(on, "cuda", "m") and not use_triton_step(off, "cuda", "m")
    assert not use_triton_step(on, "cpu", "m")
    monkeypatch.setattr(triton_step, "probe", lambda device: "RuntimeError: no C compiler")
    with caplog.at_level("WARNING", logger="server.models"):
        assert not use_triton_step(on, "cuda", "m")
    assert "the Triton kernel does not run here (RuntimeError: no C compiler)" in caplog.text


def test_the_server_setting_defaults_on_and_reads_s4_triton_step(monkeypatch):
    from server.config import Settings  # noqa: PLC0415

    monkeypatch.delenv("S4_TRITON_STEP", raising=False)
    assert Settings().triton_step is True
    monkeypatch.setenv("S4_TRITON_STEP", "0")
    assert Settings().triton_step is False
