"""Can a session's state be smaller? A 16-bit state, and a reduced SSM order, measured on the shipped models.

The GPU's audio streams are bound by the state's memory traffic: a step reads and writes every
stream's state once at least (docs/gpu.md, "the goal of ≥ 1,000 streams at 16 kHz sits at the
memory-bandwidth bound"). Two ways to move fewer bytes, each measured here:

  * **A 16-bit state** (as vLLM's `mamba_ssm_cache_dtype` offers for Mamba): the state is stored in
    float16 or bfloat16 between steps and the step's arithmetic stays float32. Emulated exactly: after
    every float32 step the state is rounded to the 16-bit dtype and back (a SaShiMi's phase counter
    excepted). Each shipped model reads its checkpoint's `eval_slice` (held-out data) teacher-forced
    through `rec.step` (this machine's step: the C step on CPU) once per state dtype; reported are the
    bits per token, the total-variation distance TV(p16, p32) = ½ Σ|p16 − p32| between the next-token
    distributions at every position (mean, 99th percentile, max; the mean per quarter of the sequence)
    and the share of positions whose most likely token differs.
  * **A reduced order by balanced truncation** (Moore 1981; Glover 1984 for the bound): each channel's
    SSM of 2M real coordinates (M slots of the diagonal form) kept at order r has an H∞ error of at most
    2 Σ_{j>r} σ_j, σ the Hankel singular values, from the Gramians of the diagonal system
    (P_ij = b_i b̄_j / (1 − λ_i λ̄_j), Q_ij = c̄_i c_j / (1 − λ̄_i λ_j), σ = svd(L_Qᴴ L_P), P = L_P L_Pᴴ)
    in float64. Reported per layer: the order each channel needs for 2 Σ_{j>r} σ_j ≤ ε σ₁ (ε = 1e-2, 1e-3,
    1e-4), mean and max over the channels. Also how slowly the modes decay against the 16-bit rounding
    (`decay_margins`). The form's own kernel K_t = wᵀ Aᵗ b checks the complex
    representation first (t < 64, relative error ≤ 1e-9, else RuntimeError).

JSON + PNG in bench/results (quick: bench/results/quick, fewer tokens).

    python -m bench.state_precision [--quick]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

import model
from bench.common import ROOT, bench_main, save_figure, subplots
from model.data import Dataset

NAME = "state_precision"
MODELS = ("text-shakespeare", "audio-digits-s4", "audio-digits")
DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
EPS = (1e-2, 1e-3, 1e-4)
SIZES: dict[bool, dict[str, int]] = {  # keyed by quick: rows and tokens per row of the eval slice
    False: {"rows": 8, "tokens": 8000, "text_rows": 4, "text_tokens": 4096},
    True: {"rows": 2, "tokens": 400, "text_rows": 2, "text_tokens": 256},
}
GPU_COPY_TBPS = 4.2  # bench.gpu's measured H200 copy bandwidth (docs/gpu.md), for the streams bound
STREAM_HZ = 16_000


def eval_batch(ckpt: Path, sz: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's eval slice as (inputs, targets), both (B, T) int64: audio clips fed as [BOS, x…]
    (as in training), text as consecutive windows."""
    data = Dataset(ckpt / "eval_slice")
    test = data.split("test")
    if data.kind == "audio":
        n = min(sz["rows"], test.shape[0])
        x, y = data.batch(test, np.arange(n), data.clip_len)
        return x[:, : sz["tokens"]], y[:, : sz["tokens"]]
    B, T = sz["text_rows"], sz["text_tokens"]
    if test.size < B * T + 1:
        raise RuntimeError(f"{ckpt}/eval_slice holds {test.size} tokens, fewer than {B} × {T} + 1")
    a = torch.from_numpy(test[: B * T + 1].astype(np.int64))
    return a[:-1].view(B, T), a[1:].view(B, T)


def stored_parts(rec) -> list[tuple[int, int]]:
    """The (start, stop) column ranges of a state row a 16-bit state would store at 16 bits: all of an
    isotropic model's state; a SaShiMi's row but its phase counter."""
    if not hasattr(rec, "layout"):
        return []
    phase = rec.layout.slots["phase"]
    return [(0, phase.offset), (phase.offset + phase.numel, rec.layout.numel)]


@torch.inference_mode()
def teacher_forced(rec, x: torch.Tensor, y: torch.Tensor, dtype) -> dict[str, Any]:
    """Step x through `rec.step` from the zero state, the state rounded to `dtype` after each step (None:
    kept float32) → log-probabilities (B, T, V) float64 and the bits per token of y."""
    B, T = x.shape
    st = rec.init_state(B).clone()
    parts = stored_parts(rec)
    logp = []
    for t in range(T):
        logits, st = rec.step(x[:, t].contiguous(), st)
        if dtype is not None:
            if parts:
                for a, b in parts:
                    st[:, a:b] = st[:, a:b].to(dtype).float()
            else:
                st = st.to(dtype).float()
        logp.append(torch.log_softmax(logits.double(), -1))
    lp = torch.stack(logp, 1)
    bits = -lp.gather(2, y[..., None]).mean().item() / np.log(2)
    return {"logp": lp, "bits_per_token": bits, "state_max_abs": st.abs().max().item()}


def compare(lp: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    tv = 0.5 * (lp.exp() - ref.exp()).abs().sum(-1)  # (B, T)
    flat = tv.flatten()
    return {
        "tv_mean": flat.mean().item(),
        "tv_p99": flat.quantile(0.99).item(),
        "tv_max": flat.max().item(),
        "tv_mean_by_quarter": [q.mean().item() for q in tv.chunk(4, dim=1)],
        "argmax_differs": (lp.argmax(-1) != ref.argmax(-1)).double().mean().item(),
    }


def diagonal_forms(rec) -> list[tuple[str, Any]]:
    named = list(rec.forms.items()) if hasattr(rec, "forms") else list(enumerate(rec.layers))
    return [(str(n), f) for n, f in named if getattr(f, "form", "diagonal") == "diagonal"]


def complex_modes(f, h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Channel h of a diagonal form as a complex diagonal system (λ, b, c) of its 2M real coordinates:
    a complex slot (x₁ + i x₂ driven by b₁ + i b₂, read by w₁x₁ + w₂x₂) is the pair λ, λ̄ with
    b̂ = b₁ + i b₂, ĉ = (w₁ − i w₂)/2 and their conjugates; a real slot its two real modes."""
    lam1, lam2 = (lam[h].numpy() for lam in f.lam64)
    b, w, cplx = f.b64[h].numpy(), f.w64[h].numpy(), f.is_cplx[h].numpy()
    bh, ch = b[0] + 1j * b[1], (w[0] - 1j * w[1]) / 2
    lam = np.concatenate([np.where(cplx, lam1, lam1.real), np.where(cplx, lam1.conj(), lam2.real)])
    bb = np.concatenate([np.where(cplx, bh, b[0]), np.where(cplx, bh.conj(), b[1])])
    cc = np.concatenate([np.where(cplx, ch, w[0]), np.where(cplx, ch.conj(), w[1])])
    return lam.astype(complex), bb.astype(complex), cc.astype(complex)


def decay_margins(forms) -> dict[str, Any]:
    """How slowly the modes decay against the 16-bit dtypes' rounding: a mode whose |λ| is within half a
    unit in the last place of 1 (1 − |λ| < 2⁻⁹ for bfloat16, 2⁻¹¹ for float16) moves a stored coordinate by
    less than its rounding a step, so round-to-nearest stalls its decay. The share of such modes (each
    complex pair and each real mode one) and the smallest 1 − |λ|."""
    gaps = []
    for _, f in forms:
        cplx = f.is_cplx
        gaps += [(1 - f.lam64[0].abs())[cplx], (1 - f.lam64[0].abs())[~cplx], (1 - f.lam64[1].abs())[~cplx]]
    g = torch.cat(gaps)
    return {"modes": g.numel(), "min_1_minus_abs_lambda": g.min().item(),
            **{f"share_below_half_ulp_{dt}": (g < 2.0**-e).double().mean().item()
               for dt, e in (("bfloat16", 9), ("float16", 11))}}  # fmt: skip


def check_modes(f, T: int = 64) -> float:
    """max over channels and t < T of |K_t(modes) − K_t(form)| / max|K(form)|, K_t = wᵀ Aᵗ b."""
    A = f.block_powers(torch.arange(T, dtype=torch.float64))  # (H, M, T, 2, 2)
    b = f.b64.transpose(1, 2)[:, :, None, :, None]
    w = f.w64.transpose(1, 2)[:, :, None, None, :]
    K = (w @ A @ b)[..., 0, 0].sum(1).numpy()  # (H, T)
    worst = 0.0
    for h in range(f.H):
        lam, bb, cc = complex_modes(f, h)
        Km = (cc[:, None] * lam[:, None] ** np.arange(T) * bb[:, None]).sum(0)
        worst = max(worst, np.abs(Km - K[h]).max() / max(np.abs(K[h]).max(), 1e-300))
    return float(worst)


def hankel_singular_values(lam: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The Hankel singular values of x' = diag(λ) x + b u, y = c x (|λ| < 1), descending, float64."""
    P = np.outer(b, b.conj()) / (1 - np.outer(lam, lam.conj()))
    Q = np.outer(c.conj(), c) / (1 - np.outer(lam.conj(), lam))

    def factor(G: np.ndarray) -> np.ndarray:
        e, U = np.linalg.eigh((G + G.conj().T) / 2)
        return U * np.sqrt(np.clip(e, 0, None))

    return np.linalg.svd(factor(Q).conj().T @ factor(P), compute_uv=False)


def orders(f) -> dict[str, Any]:
    """Per ε: the balanced-truncation order each channel needs (mean, max) of the 2M coordinates."""
    need = {eps: [] for eps in EPS}
    for h in range(f.H):
        lam, b, c = complex_modes(f, h)
        keep = (np.abs(b) > 0) & (np.abs(c) > 0) & (np.abs(lam) < 1)
        s = hankel_singular_values(lam[keep], b[keep], c[keep])
        tail = 2 * np.concatenate([np.cumsum(s[::-1])[::-1], [0.0]])  # tail[r] = 2 Σ_{j ≥ r} σ_j
        for eps in EPS:
            need[eps].append(int(np.argmax(tail <= eps * s[0])) if s.size else 0)
    return {"coordinates": 2 * f.M, **{f"{eps:g}": {"mean": float(np.mean(v)), "max": int(max(v))}
                                       for eps, v in need.items()}}  # fmt: skip


def run(quick: bool) -> dict[str, Any]:
    sz = SIZES[quick]
    torch.manual_seed(0)
    out = []
    for name in MODELS:
        ckpt = ROOT / "checkpoints" / name
        rec = model.load(ckpt).to_recurrent()
        x, y = eval_batch(ckpt, sz)
        runs = {dt: teacher_forced(rec, x, y, d) for dt, d in DTYPES.items()}
        ref = runs["float32"]["logp"]
        numel = rec.layout.numel if hasattr(rec, "layout") else rec.init_state(1).numel()
        low = sum(b - a for a, b in stored_parts(rec)) if hasattr(rec, "layout") else numel  # 16-bit
        row: dict[str, Any] = {
            "model": name,
            "rows": x.shape[0],
            "tokens_per_row": x.shape[1],
            "state_bytes": {"float32": 4 * numel, "16-bit": 2 * low + 4 * (numel - low)},
            "dtypes": {},
        }
        if not hasattr(rec, "layout"):  # every coordinate steps every sample: one read + one write a step
            row["streams_bound_16khz"] = {
                k: GPU_COPY_TBPS * 1e12 / (2 * v * STREAM_HZ) for k, v in row["state_bytes"].items()
            }
        for dt, r in runs.items():
            row["dtypes"][dt] = {
                "bits_per_token": r["bits_per_token"],
                "delta_bits": r["bits_per_token"] - runs["float32"]["bits_per_token"],
                "state_max_abs": r["state_max_abs"],
                **(compare(r["logp"], ref) if dt != "float32" else {}),
            }
            print(f"bench.state_precision: {name} state {dt}: {r['bits_per_token']:.4f} bits/token"
                  + (f", TV mean {row['dtypes'][dt]['tv_mean']:.2e} max {row['dtypes'][dt]['tv_max']:.3f}"
                     if dt != "float32" else ""), flush=True)  # fmt: skip
        forms = diagonal_forms(rec)
        row["modes_check_rel_err"] = max(check_modes(f) for _, f in forms)
        if row["modes_check_rel_err"] > 1e-9:
            raise RuntimeError(f"{name}: the complex modes' kernel differs from the form's by "
                               f"{row['modes_check_rel_err']:.1e}")  # fmt: skip
        row["decay"] = decay_margins(forms)
        print(f"bench.state_precision: {name}: modes with 1 − |λ| below half an ulp: "
              f"bfloat16 {row['decay']['share_below_half_ulp_bfloat16']:.1%}, "
              f"float16 {row['decay']['share_below_half_ulp_float16']:.1%}", flush=True)  # fmt: skip
        row["balanced_truncation"] = {n: orders(f) for n, f in (forms[:1] if quick else forms)}
        for n, o in row["balanced_truncation"].items():
            e3 = o["0.001"]
            print(f"bench.state_precision: {name} layer {n}: order for ε = 1e-3: mean {e3['mean']:.1f}, "
                  f"max {e3['max']} of {o['coordinates']}", flush=True)  # fmt: skip
        out.append(row)
    return {"sizes": sz, "gpu_copy_tbps": GPU_COPY_TBPS, "stream_hz": STREAM_HZ, "models": out}


def plot(data: dict[str, Any], quick: bool) -> None:
    fig, (ax1, ax2) = subplots(2)
    names = [r["model"] for r in data["models"]]
    xs = np.arange(len(names))
    for i, dt in enumerate(("float16", "bfloat16")):
        at = xs + (i - 0.5) * 0.35
        ax1.bar(at, [max(r["dtypes"][dt]["tv_mean"], 1e-9) for r in data["models"]], 0.35,
                label=f"state {dt}: mean TV")  # fmt: skip
        ax1.plot(at, [r["dtypes"][dt]["tv_max"] for r in data["models"]], "kv" if i else "k^",
                 label=f"state {dt}: max TV")  # fmt: skip
    ax1.set_yscale("log")
    ax1.set_xticks(xs, names)
    ax1.set_ylabel("TV distance to the float32 state's next-token distribution")
    ax1.set_title("a 16-bit state (stored between float32 steps)")
    ax1.legend(fontsize=8)
    for r in data["models"]:
        for j, eps in enumerate(f"{e:g}" for e in EPS):
            vals = [o[eps]["mean"] / o["coordinates"] for o in r["balanced_truncation"].values()]
            ax2.plot([j] * len(vals), vals, "o", alpha=0.6, label=r["model"] if j == 0 else None,
                     color=f"C{names.index(r['model'])}")  # fmt: skip
    ax2.set_xticks(range(len(EPS)), [f"ε = {e:g}" for e in EPS])
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("order kept ÷ full order (mean over channels; a dot a layer)")
    ax2.set_title("balanced truncation: 2 Σ_{j>r} σ_j ≤ ε σ₁")
    ax2.legend(fontsize=8)
    save_figure(fig, NAME, quick, title="can the state be smaller? the shipped models")


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, __doc__, NAME, run, plot)


if __name__ == "__main__":
    main()
