"""16-bit weights in the whole-network C step (model/csrc/ssm_step.c: `ldw`, `w_at`, NetLayer.wfmt;
model/fused.py: NetStep). A bfloat16 or float16 model's linear weights are read in their own dtype and
widened exactly to float32 in registers; everything else is float32 arithmetic. So:
  * a linear layer with 16-bit weights gives, bit for bit, the float32 layer on the widened weights, in
    every row tile and column tail, in every x86 build (AVX-512, AVX2 + F16C, and the portable one);
  * every 16-bit value widens exactly: subnormals, signed zeros, the largest finite values, ±inf, NaN;
  * the network's step is float64 arithmetic on the same 16-bit weights to float32 rounding (≤ 2e-5
    relative; the torch ops, which round every activation to 16 bits, are ~u away), bit-identical to
    its prompt ingestion (`net_prefill`) and to each row alone in any batch."""

from __future__ import annotations

import copy
import platform

import pytest
import torch
from test_conversion_coverage import conv_reference

from model import ModelConfig, SequenceModel, fused, recurrent
from model.recurrent import LOGITS_TOL

HALF = [torch.bfloat16, torch.float16]
FMT = fused.WEIGHT_FORMATS


def linear(lib, tiled: int, dtype: torch.dtype, x: torch.Tensor, Wt: torch.Tensor, bias: torch.Tensor):
    """ssm_step.c `linear_rows`: x (B, K) float32 · Wt (K, N) in `dtype` + bias (N,) float32."""
    assert Wt.dtype == dtype
    return fused.linear_rows(
        lib, tiled, x, fused.pack_linear(Wt, lib.linear_panel_width()), Wt.shape[1], bias
    )


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("K,N", [(16, 32), (18, 40), (7, 50), (256, 512)])
def test_16_bit_weights_give_the_float32_layer_on_the_widened_weights_bit_for_bit(dtype, K, N):
    """Every batch size (8-, 4- and 1-row tiles and their mixes), N with vector and scalar tails: the
    16-bit layer's output is exactly the float32 layer's on Wt.float(), tiled or row by row, so a
    16-bit model keeps the float32 step's guarantees (a row's bits never depend on the batch)."""
    lib = fused.library()
    g = torch.Generator().manual_seed(K + N)
    Wt = torch.randn(K, N, generator=g).to(dtype).contiguous()
    bias = torch.randn(N, generator=g)
    for B in (1, 3, 4, 5, 8, 11, 12, 13, 17, 20, 31, 64):
        x = torch.randn(B, K, generator=g)
        want = linear(lib, 1, torch.float32, x, Wt.float().contiguous(), bias)
        for tiled in (0, 1):
            assert torch.equal(linear(lib, tiled, dtype, x, Wt, bias), want), (B, tiled)
        ref = x.double() @ Wt.double() + bias.double()
        scale = (x.double().abs() @ Wt.double().abs() + bias.double().abs()).max()
        assert float((want.double() - ref).abs().max() / scale) < K * 2**-23


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """Every class of 16-bit value: zeros, the smallest and largest subnormals, the smallest normal,
    ordinary values, the largest finite, infinities and NaN, both signs."""
    fi = torch.finfo(dtype)
    tiny_sub = fi.smallest_normal * fi.eps  # 2^-24 (float16), 2^-133 (bfloat16)
    vals = [0.0, tiny_sub, 3 * tiny_sub, fi.smallest_normal - tiny_sub, fi.smallest_normal, 1.0, 1 / 3,
            -2.5, 1000.1, fi.max, float("inf"), float("nan")]  # fmt: skip
    v = torch.tensor(vals, dtype=torch.float64).to(dtype)
    return torch.cat([v, -v])


def widened(lib, tiled: int, dtype: torch.dtype, vals: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """(got, want) for x = ones (9, 1) times one weight row holding `vals` at column offsets 0 and 8,
    as they are and reversed: out = 0 + 1 · w, exact for every float32 w (0 · inf never arises: K = 1).
    With 16-float vectors (AVX-512) or 8 (AVX2), every value lands in a vector's lanes and in the scalar
    column tail at least once; 9 rows: an 8-row tile and a row alone."""
    pairs = []
    for v in (vals, vals.flip(0)):
        for off in (0, 8):
            Wt = torch.zeros(1, off + v.numel(), dtype=dtype)
            Wt[0, off:] = v
            got = linear(lib, tiled, dtype, torch.ones(9, 1), Wt, torch.zeros(Wt.shape[1]))
            pairs.append((got, Wt.float().expand(9, -1)))
    return pairs


def same_values(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal, NaN where NaN (torch.equal alone fails on NaN)."""
    nan = want.isnan()
    return torch.equal(got.isnan(), nan) and torch.equal(got[~nan], want[~nan])


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_every_16_bit_value_widens_exactly_in_the_vector_and_the_scalar_columns(dtype):
    """Zeros, subnormals, the smallest normal, the largest finite, ±inf and NaN: each comes out of the
    16-bit layer as its exact float32 value, through the vector loads and the scalar `w_at`."""
    lib = fused.library()
    vals = special_values(dtype)
    assert vals.float().isnan().any() and vals.float().isinf().any() and (vals.float().abs() < 6e-5).any()
    for tiled in (0, 1):
        for got, want in widened(lib, tiled, dtype, vals):
            assert same_values(got, want), (tiled, got[0], want[0])


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 target flags")
@pytest.mark.parametrize(
    "extra",
    [("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-f16c")],
    ids=["avx2-f16c", "portable"],
)
def test_16_bit_weights_widen_the_same_in_older_x86_builds(tmp_path, extra):
    """Built without AVX-512 (AVX2 + F16C conversions) and without any of them (the portable `w_at`
    loop, fmaf per lane): the same exact widening, the row tiles still the row loop's bits."""
    out = tmp_path / "ssm_step.so"
    fused.compile_library(out, (*fused.FLAGS, *extra))
    lib = fused.load_library(out)
    g = torch.Generator().manual_seed(3)
    for dtype in HALF:
        for got, want in widened(lib, 1, dtype, special_values(dtype)):
            assert same_values(got, want), (extra, dtype, got[0], want[0])
        for K, N in [(7, 50), (18, 40), (64, 96)]:
            Wt = torch.randn(K, N, generator=g).to(dtype)
            bias = torch.randn(N, generator=g)
            for B in (1, 3, 4, 5, 8, 13, 20, 33):
                x = torch.randn(B, K, generator=g)
                rows_, tiles = (linear(lib, t, dtype, x, Wt, bias) for t in (0, 1))
                assert torch.equal(rows_, tiles), (extra, dtype, K, N, B)
                assert torch.equal(tiles, linear(lib, 1, torch.float32, x, Wt.float().contiguous(), bias))


def tiny(kernel: str, init: str, d_model: int = 24, d_ff: int = 40) -> SequenceModel:
    """H = 24 and d_ff = 40: the linear layers have vector and scalar column tails."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=d_model, n_layers=2, d_state=16, kernel=kernel, init=init,
                      l_max=128, d_ff=d_ff, cauchy_backend="torch")  # fmt: skip
    return SequenceModel(cfg).eval()


def rounded_reference(net: SequenceModel, dtype: torch.dtype, tokens: torch.Tensor) -> torch.Tensor:
    """float64 conv mode of `net` with every weight outside the SSM kernels rounded to `dtype` (what the
    16-bit model holds; its SSM is converted from the float32 kernel parameters, before the cast)."""
    ref = copy.deepcopy(net)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".kernel." not in name:
                p.copy_(p.to(dtype).float())
    return conv_reference(ref, tokens)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kernel,init", [("s4", "legs"), ("s4", "legt"), ("s4d", "diag-lin")])
def test_the_16_bit_c_step_is_float64_arithmetic_on_the_16_bit_weights(kernel, init, dtype):
    """The C step of a 16-bit model against float64 conv mode on the same rounded weights: within
    float32 rounding (≤ 2e-5; measured ~2e-6 on the shipped text model), far inside the dtype's 4u. Its
    prompt ingestion is the step's bits, and a row's bits are its own in any batch (11 rows: 8-row and
    1-row tiles, 4-row ones where vectors are 8 floats)."""
    net = tiny(kernel, init)
    tokens = torch.randint(0, 64, (11, 64), generator=torch.Generator().manual_seed(1))
    want = rounded_reference(net, dtype, tokens)
    rec = copy.deepcopy(net).to_recurrent(dtype=dtype)
    assert rec.dtype == dtype and rec._net_step is not None and rec.decode_block_ready(11)
    assert rec.verification["step_rel_err"] <= LOGITS_TOL[dtype]
    state, outs = rec.init_state(11), []
    for t in range(tokens.shape[1]):
        logits, state = rec.step(tokens[:, t], state)
        outs.append(logits)
    stepped = torch.stack(outs, 1)
    assert rel(stepped, want) <= 2e-5, f"{rel(stepped, want):.2e}"
    prefilled, s_pref = rec.prefill(tokens, rec.init_state(11))  # short: net_prefill, layer by layer
    assert torch.equal(prefilled, stepped) and torch.equal(s_pref, state)
    alone, s1 = rec.prefill(tokens[4:5], rec.init_state(1))
    assert torch.equal(alone, stepped[4:5]) and torch.equal(s1, state[:, 4:5])


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_the_16_bit_c_step_reads_the_weights_in_their_dtype_and_refuses_float64(dtype):
    """The blocks' linear weights are kept as 16-bit transposed copies (half the bytes of float32), the
    rest as float32; float64 weights keep the torch ops (the C step would round them)."""
    net = tiny("s4d", "diag-lin")
    rec = net.to_recurrent(dtype=dtype)
    kept = rec._net_step._weights.keep
    sixteen = [t for t in kept if t.dtype == dtype]
    assert len(sixteen) == 3 * 2 and all(t.dtype in (dtype, torch.float32) for t in kept)  # out, up, down
    assert all(lay.wfmt == FMT[dtype] for lay in rec._net_step.layers)
    assert net.to_recurrent(dtype=torch.float64)._net_step is None
    with pytest.raises(ValueError, match="takes float32, bfloat16, float16 weights of one dtype"):
        fused.NetStep(fused.library(), copy.deepcopy(net).double(), rec.layers)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_the_torch_ops_compute_in_float32_where_the_cpu_has_no_16_bit_matmul(monkeypatch, dtype):
    """The parallel prefill (a long prompt) and the torch-op step (batches beyond the C step) of a 16-bit
    model: on a CPU without native 16-bit matmul they run a float32 copy of the 16-bit weights, float64
    arithmetic on those weights to float32 rounding like the C step (oneDNN's emulated 16-bit matmul is
    ~60x slower than sgemm on such a CPU); where the CPU has it, in the dtype itself, ~u away (≥ 20x
    further) and within the dtype's 4u. Both CPUs are simulated here, so the test holds on either."""
    net = tiny("s4d", "diag-lin")
    tokens = torch.randint(0, 64, (3, 96), generator=torch.Generator().manual_seed(2))
    want = rounded_reference(net, dtype, tokens)
    errs = {}
    for native in (False, True):
        monkeypatch.setattr(recurrent, "native_matmul", lambda d, dev, native=native: native)
        rec = copy.deepcopy(net).to_recurrent(dtype=dtype)
        assert rec.compute_dtype == (dtype if native else torch.float32)
        assert all(p.dtype == rec.compute_dtype for p in rec._net_ops.parameters())
        assert all(p.dtype == dtype for p in rec.net.parameters())  # the served weights stay 16-bit
        rec.prefill_by_steps_max_tokens = 0  # the parallel form
        first, s = rec.prefill(tokens[:, :40], rec.init_state(3))
        second, s = rec.prefill(tokens[:, 40:], s)
        rec.net_step_max_batch = 0  # the torch ops around the fused SSM steps
        state, outs = rec.init_state(3), []
        for t in range(tokens.shape[1]):
            logits, state = rec.step(tokens[:, t], state)
            outs.append(logits)
        errs[native] = (rel(torch.cat([first, second], 1), want), rel(torch.stack(outs, 1), want))
    assert max(errs[False]) <= 2e-5, errs
    assert all(20 * max(errs[False]) <= e <= LOGITS_TOL[dtype] for e in errs[True]), errs


def test_native_matmul_needs_the_16_bit_instructions_not_just_avx512(monkeypatch):
    """bfloat16 is native with AVX512-BF16 or AMX, float16 with AVX512-FP16 or AMX-FP16; plain AVX-512
    is not enough (oneDNN's own bfloat16 probe says yes there, and emulates: slower than float32). Both
    the /proc/cpuinfo flags and torch.cpu's probes count; a probe that raises counts as no."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert recurrent.native_matmul(torch.float32, cpu) and recurrent.native_matmul(torch.float64, cpu)
    assert recurrent.native_matmul(torch.bfloat16, cuda) and recurrent.native_matmul(torch.float16, cuda)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)

    def native(flags: set[str]) -> tuple[bool, bool]:
        monkeypatch.setattr(fused, "cpu_flags", lambda: frozenset(flags))
        return recurrent.native_matmul(torch.bfloat16, cpu), recurrent.native_matmul(torch.float16, cpu)

    assert native(set()) == (False, False)
    assert native({"avx2", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}) == (False, False)
    assert native({"avx512f", "avx512_bf16"}) == (True, False)
    assert native({"amx_bf16", "amx_tile"}) == (True, False)
    assert native({"avx512f", "avx512_bf16", "avx512_fp16"}) == (True, True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert native(set()) == (True, False)

    def broken():
        raise RuntimeError("no cpuinfo")

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", broken)
    assert native(set()) == (False, False)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_a_16_bit_row_is_the_same_in_a_batch_beyond_the_float32_c_step_limit(monkeypatch, dtype):
    """The torch ops around the fused SSM steps (the path of batches past 256 rows until 2026-12-04) would
    round a 16-bit model's activations to 16 bits where the CPU multiplies them natively; the C step
    takes every batch: row 0 alone and in 300 rows, bit for bit, over 8 steps and a short prompt, even on
    a (simulated) CPU with native 16-bit matmul (float32: tests/test_big_batch.py)."""
    monkeypatch.setattr(recurrent, "native_matmul", lambda d, dev: True)
    rec = tiny("s4d", "diag-lin").to_recurrent(dtype=dtype)
    assert rec.compute_dtype == dtype and rec.net_step_max_batch > 300 and rec.decode_block_ready(300)
    tokens = torch.randint(0, 64, (300, 8), generator=torch.Generator().manual_seed(4))
    for B in (1, 300):
        state, outs = rec.init_state(B), []
        for t in range(8):
            logits, state = rec.step(tokens[:B, t], state)
            outs.append(logits[0])
        if B == 1:
            alone = torch.stack(outs)
        else:
            assert torch.equal(torch.stack(outs), alone)
    pre, _ = rec.prefill(tokens, rec.init_state(300), logits="last")
    assert torch.equal(pre[0, 0], alone[-1])
