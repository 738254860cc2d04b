"""Time and peak memory of computing the S4 convolution kernel K̄ (H, L) — the shape of the S4 paper's
Table 2 — for S4 (Cauchy kernel, keops and torch backends) and a dense LSSL-style baseline.

The dense baseline builds the bilinear-discretized Ā (H, N, N) of the same DPLR matrix and computes
K_k = C Ā^k B̄ (k < L) by Krylov doubling in float32: V ← [V, Ā V], Ā ← Ā², starting from V = B̄,
i.e. O(H·N²·L) for the Krylov matrix plus O(H·N³·log L) for the squarings, and O(H·N·L) memory for the
Krylov matrix itself. It uses C directly as C̄ (LSSL parametrizes C̄); `dense_matches_s4` checks, in
float64 at a small size, that with C̄ recovered from S4's C̃ it gives S4's kernel.

Each (method, N, mode) runs in a fresh subprocess so peak memory is per configuration.

    python -m bench.kernel [--quick]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bench.common import (
    MB,
    PeakMemory,
    bench_main,
    log2_axis,
    matmul_gflops_by_size,
    run_child,
    save_figure,
    subplots,
    time_samples,
)
from model import linalg
from model.kernel import SSMKernel, s4_kernel, training_arithmetic

NAME = "kernel"
METHODS = ("s4-keops", "s4-torch", "dense")
MODES = ("fwd", "fwd+bwd")
DENSE_LIMIT_BYTES = 8e9  # dense configurations estimated above this are skipped
SIZES: dict[bool, dict[str, Any]] = {  # keyed by quick
    False: {"H": 256, "L": 4096, "Ns": [64, 128, 256, 512], "warmup": 1, "repeat": 3, "max_seconds": 15.0},
    True: {"H": 8, "L": 256, "Ns": [16, 32], "warmup": 1, "repeat": 2, "max_seconds": 2.0},
}


# ---------------------------------------------------------------------------------------------
# Dense LSSL-style baseline


def dense_system(s: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Differentiable bilinear discretization of the DPLR SSM in real coordinates ξ = [Re x; Im x].

    s: SSMKernel.ssm() dict (Λ, P, B, C complex (H, N/2) / (r, H, N/2), dt (H,)). Returns Ā (H, N, N),
    B̄ (H, N) and γ (H, N) with y = γᵀ ξ = 2 Re(C x), in the real dtype of dt."""
    Lam, P, B, C, dt = s["Lambda"], s["P"], s["B"], s["C"], s["dt"]
    re, im = torch.diag_embed(Lam.real), torch.diag_embed(Lam.imag)
    A = torch.cat([torch.cat([re, -im], -1), torch.cat([im, re], -1)], -2)  # Λ on the real pairs
    cols = torch.cat([P.real, P.imag], -1)  # (r, H, N)
    A = A - 2 * torch.einsum("rhn,rhm->hnm", cols, cols)  # − P̃ · 2Re(P̃ᴴ ·)
    beta = torch.cat([B.real, B.imag], -1)
    gamma = torch.cat([2 * C.real, -2 * C.imag], -1)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    half = dt[:, None, None] / 2 * A
    lhs = eye - half
    Abar = linalg.solve(lhs, eye + half)
    Bbar = linalg.solve(lhs, (dt[:, None] * beta)[..., None])[..., 0]
    return Abar, Bbar, gamma


def krylov_doubling(Abar: torch.Tensor, Bbar: torch.Tensor, L: int) -> torch.Tensor:
    """Krylov matrix [B̄, ĀB̄, …, Ā^{L−1}B̄] (H, N, L) by doubling: V ← [V, Ā^{2^j} V], Ā^{2^j} squared."""
    V, A = Bbar[..., None], Abar
    while V.shape[-1] < L:
        V = torch.cat([V, A @ V], dim=-1)
        if V.shape[-1] < L:
            A = A @ A
    return V[..., :L]


def dense_kernel(kernel: SSMKernel, L: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """K_k = γᵀ Ā^k B̄ (H, L) from the dense discretized matrix of `kernel`'s SSM."""
    Abar, Bbar, gamma = dense_system(kernel.ssm(dtype))
    return (gamma[:, None, :] @ krylov_doubling(Abar, Bbar, L))[:, 0]


def dense_bytes_estimate(H: int, N: int, L: int, mode: str) -> int:
    """Rough float32 peak of `dense_kernel`: forward holds a few N×N matrices per channel and the
    Krylov matrix while it is concatenated (2·N·L); forward+backward also keeps every squared power
    (log₂L of them) and every Krylov block for autograd, plus their gradients."""
    log_l = math.ceil(math.log2(L))
    if mode == "fwd":
        floats = 6 * N * N + 2 * N * L
    else:
        floats = (log_l + 8) * N * N + 4 * N * L
    return 4 * H * floats


def dense_matches_s4(H: int = 4, N: int = 64, L: int = 1024) -> float:
    """Relative error (float64) between S4's Algorithm-1 kernel and the dense kernel with C̄ recovered
    from the generating-function C̃ = C̄ (I − Ā^L); ~1e-12 when the two compute the same thing."""
    torch.manual_seed(0)
    k = SSMKernel(H, N, L, kind="s4", backend="torch")
    with torch.no_grad():
        s = k.ssm(torch.float64)
        K_s4 = s4_kernel(s["Lambda"], s["P"], s["B"], s["C"], s["dt"], L, backend="torch")
        Abar, Bbar, gamma_t = dense_system(s)
        eye = torch.eye(N, dtype=torch.float64)
        AL = torch.linalg.matrix_power(Abar, L)
        gamma = linalg.solve((eye - AL).transpose(-1, -2), gamma_t[..., None])[..., 0]
        K_dense = (gamma[:, None, :] @ krylov_doubling(Abar, Bbar, L))[:, 0]
    return float((K_dense - K_s4).norm() / K_s4.norm())


# ---------------------------------------------------------------------------------------------
# One configuration (child process)


def float32_kernel(kernel: SSMKernel, L: int) -> torch.Tensor:
    """S4's kernel (H, L) in float32 arithmetic, as training computes it (with a gradient), whether or not a
    gradient is wanted (`training_arithmetic`): SSMKernel.forward computes it in float64 without one (since
    3d57c1e), which timed as the "fwd" rows would be another dtype's work than the float32 dense
    baseline's and than the fwd+bwd rows'."""
    with training_arithmetic():
        return kernel(L)


def _work(method: str, mode: str, H: int, N: int, L: int) -> Callable[[], object]:
    torch.manual_seed(0)
    backend = "torch" if method == "dense" else method.removeprefix("s4-")
    k = SSMKernel(H, N, L, kind="s4", backend=backend)
    compute: Callable[[], torch.Tensor] = (
        (lambda: dense_kernel(k, L)) if method == "dense" else (lambda: float32_kernel(k, L))
    )
    if mode == "fwd":

        def fn() -> object:
            with torch.no_grad():
                return compute()

        return fn
    weight = torch.randn(H, L)

    def fn_bwd() -> object:
        k.zero_grad(set_to_none=True)
        loss = (compute() * weight).sum()
        loss.backward()
        return loss

    return fn_bwd


def child(spec: dict[str, Any]) -> dict[str, Any]:
    # A tiny instance first: pages in the library code (FFT, LAPACK, the compiled KeOps formulas) so
    # the memory baseline below already includes it and the peak is the work's own.
    _work(spec["method"], spec["mode"], 2, min(spec["N"], 16), 64)()
    fn = _work(spec["method"], spec["mode"], spec["H"], spec["N"], spec["L"])
    with PeakMemory() as mem:
        samples = time_samples(fn, spec["warmup"], spec["repeat"], spec["max_seconds"])
    warmup_timed = samples.warmup_timed  # (the single sample is the warm-up call: over max_seconds)
    samples.sort()
    return {"time_s": samples[len(samples) // 2], "samples_s": list(samples), "warmup_timed": warmup_timed,
            **mem.as_dict()}  # fmt: skip


# ---------------------------------------------------------------------------------------------


def run(quick: bool) -> dict[str, Any]:
    cfg = SIZES[quick]
    H, L = cfg["H"], cfg["L"]
    rows: list[dict[str, Any]] = []
    for mode in MODES:
        for method in METHODS:
            for N in cfg["Ns"]:
                row: dict[str, Any] = {"method": method, "mode": mode, "N": N, "H": H, "L": L}
                if method == "dense":
                    est = dense_bytes_estimate(H, N, L, mode)
                    row["dense_estimate_mb"] = est / MB
                    if est > DENSE_LIMIT_BYTES:
                        row["skipped"] = (
                            f"estimated {est / 1e9:.1f} GB > {DENSE_LIMIT_BYTES / 1e9:.0f} GB limit"
                        )
                        print(f"{method:9s} {mode:8s} N={N:4d}  skipped ({row['skipped']})", flush=True)
                        rows.append(row)
                        continue
                spec = {
                    **row,
                    "warmup": cfg["warmup"],
                    "repeat": cfg["repeat"],
                    "max_seconds": cfg["max_seconds"],
                }
                row.update(run_child(f"bench.{NAME}", spec))
                if "error" in row:
                    print(f"{method:9s} {mode:8s} N={N:4d}  ERROR {row['error']}", flush=True)
                else:
                    print(
                        f"{method:9s} {mode:8s} N={N:4d}  {row['time_s'] * 1e3:9.1f} ms "
                        f"(n={len(row['samples_s'])})  peak +{row['peak_rss_delta_mb']:8.1f} MiB",
                        flush=True,
                    )
                rows.append(row)
    check = dense_matches_s4(N=16, L=256) if quick else dense_matches_s4()
    return {
        "description": "S4 convolution kernel K (H, L): median wall time and peak RSS above the "
        "pre-work baseline, forward only (no_grad; float32 arithmetic, as training's forward, not the "
        "float64 SSMKernel computes without gradients) and forward+backward of sum(K * W), each "
        "configuration in a fresh subprocess",
        "sizes": {**cfg, "dense_limit_bytes": DENSE_LIMIT_BYTES},
        "methods": {
            "s4-keops": "S4 Algorithm 1, Cauchy kernel via pykeops (CPU, compiled with g++)",
            "s4-torch": "S4 Algorithm 1, Cauchy kernel in chunked torch ops (recomputed in backward)",
            "dense": "LSSL-style: dense bilinear Abar (H,N,N), Krylov doubling K_k = C Abar^k Bbar, float32",
        },
        "dense_vs_s4_rel_err_float64": check,
        "matmul_gflops": matmul_gflops_by_size(),
        "results": rows,
        "errors": [f"{r['method']} {r['mode']} N={r['N']}: {r['error']}" for r in rows if "error" in r],
    }


def plot(data: dict[str, Any], quick: bool) -> None:
    fig, (ax_t, ax_m) = subplots(2)
    colors = {"s4-keops": "tab:blue", "s4-torch": "tab:orange", "dense": "tab:red"}
    styles = {"fwd": ("-", "o"), "fwd+bwd": ("--", "s")}
    Ns = data["sizes"]["Ns"]
    for method in METHODS:
        for mode in MODES:
            pts = [
                r for r in data["results"] if r["method"] == method and r["mode"] == mode and "time_s" in r
            ]
            if not pts:
                continue
            ls, marker = styles[mode]
            kw = {"color": colors[method], "linestyle": ls, "marker": marker, "label": f"{method} {mode}"}
            ax_t.plot([r["N"] for r in pts], [r["time_s"] for r in pts], **kw)
            ax_m.plot([r["N"] for r in pts], [max(r["peak_rss_delta_mb"], 1e-1) for r in pts], **kw)
    for r in (r for r in data["results"] if "skipped" in r):  # the estimate, as an open marker
        est = r["dense_estimate_mb"]
        ax_m.plot([r["N"]], [est], marker="x", color=colors[r["method"]], linestyle="none")
        ax_m.annotate(
            f"{r['method']} {r['mode']}: skipped\n(estimated {est / 1024:.1f} GiB)",
            (r["N"], est),
            textcoords="offset points",
            xytext=(-8, -4),
            ha="right",
            va="top",
            fontsize=8,
            color=colors[r["method"]],
        )
    for ax in (ax_t, ax_m):
        log2_axis(ax, Ns)
        ax.set_yscale("log")
        ax.set_xlabel("state size N")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_ylabel("time per kernel (s)")
    ax_m.set_ylabel("peak RSS above baseline (MiB)")
    sz = data["sizes"]
    ax_t.set_title("time")
    ax_m.set_title("peak memory")
    save_figure(fig, NAME, quick, title=f"S4 kernel, H={sz['H']}, L={sz['L']} (CPU, fp32)")


def main(argv: Sequence[str] | None = None) -> None:
    bench_main(argv, __doc__, NAME, run, plot, child)


if __name__ == "__main__":
    main()
