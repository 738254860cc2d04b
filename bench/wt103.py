"""The official WikiText-103 recipe at full size on this machine: what serving it costs.

configs/experiment/lm/s4-wt103.yaml (state-spaces/s4 at e757cef): 16 × [s4, s4, ffn] (32 S4 layers, S4-LegS
DPLR, N = 64, GLU; 16 FF blocks of expand 4), d_model 1024, l_max 8192, task adaptivelm (cutoffs 19997,
39997, 199997; div_val 4; tied tables and tail projections) over WikiText-103's 267,735 words. Built
here by our own code with random weights of those shapes (the released weights cannot be downloaded on
this machine): what is measured depends on the shapes, not on the weights, except in one place. The
conversion verifies each layer's step form by its impulse response over l_max = 8,192 steps; a trained
S4-LegS layer diagonalizes (every shipped model's does) and is stepped in its diagonal form, but the
exact LegS initialization at N = 64 does not, and its DPLR step took 15 minutes of this CPU for part of
the 32 layers (the run was stopped). So the SSM parameters are moved off their initialization first
(+ 0.05 · N(0, 1) on log(−Re Λ), Im Λ, P and B, as the official fixtures do to stand in for training).

Measured, in one process: building the model, `to_recurrent` (the conversion and its verification against
float64 conv mode), the peak RSS after each; `to_recurrent` again from the recurrent-form cache the first
one wrote (model/form_cache.py; the network check runs again); the recurrent step's tokens/s at batch 1, 4
and 16 (the C whole-network step, its adaptive input and softmax included; and, alternated with it in the
same run, the torch ops around each layer's fused SSM step, which these models took before 2026-12-05),
the C adaptive log-softmax alone on the same rows (its share of the step) and the torch module's; decoding
16 tokens a row with plain sampling, by the native decode block (ssm_step.c: step, sample and stop checks in
one C call, which these models have had since 2026-12-05) and by the one-step loop (`step`, then
`model.sampling.sample`), alternated; the sampler over
the 267,735 words (`model.sampling.sample`: plain, and top-p 0.9; on logits of Zipf's law over the whole
vocabulary, p ∝ rank^−1.1, the shape of unigram word frequencies, a heavier tail than a trained LM's
next-word distribution, whose smallest set of mass 0.9 holds about 25,000 words; and on this random model's
own, nearly flat); the parallel prefill of 1,024 tokens at batch 1; and a server restart: the model saved as
a checkpoint and loaded by `server.registry.load_models` from that cache. JSON + PNG in bench/results
(quick, a smoke test of this code: a model of the same pattern, 8× narrower, 4 S4 layers, 20,000 words, in
bench/results/quick).

    python -m bench.wt103 [--quick]
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import bench_main, peak_rss_bytes, save_figure, subplots, time_samples
from model.checkpoint import save
from model.form_cache import FormCache
from model.network import ModelConfig, SequenceModel
from model.sampling import SamplingParams, row_settings, sample, uint64_bits
from server.config import Settings
from server.metrics import Metrics
from server.registry import load_models
from server.sessions import SessionTable

NAME = "wt103"
BATCHES = (1, 4, 16)


def recipe(quick: bool) -> ModelConfig:
    """The s4-wt103 shapes (quick, a smoke test: 2 repeats of the pattern, d_model 128, l_max 512, 20,000
    words in the same proportions of cutoffs)."""
    H, repeats, L = (128, 2, 512) if quick else (1024, 16, 8192)
    V, cutoffs = (20_000, [1_494, 2_988, 14_945]) if quick else (267_735, [19_997, 39_997, 199_997])
    return ModelConfig(
        vocab_size=V, d_model=H, n_layers=2 * repeats, d_state=64, kernel="s4", init="legs", l_max=L,
        d_ff=[0, 4 * H] * repeats, head_bias=True, cutoffs=cutoffs, div_val=4, tie_embeddings=True,
        tie_projs=[False, True, True, True], embed_scale=H**0.5, re_lambda_max=None, cauchy_backend="torch",
    )  # fmt: skip


def zipf_logits(B: int, V: int, gen: torch.Generator, s: float = 1.1) -> torch.Tensor:
    """(B, V) logits whose distribution is Zipf's law (p ∝ rank^−s, the shape of word frequencies and of a
    trained LM's next-word distribution), each row's ranks in a random order of the ids."""
    lp = -s * torch.log(torch.arange(1, V + 1, dtype=torch.float32))
    return torch.stack([lp[torch.randperm(V, generator=gen)] for _ in range(B)])


def median_s(fn, repeat: int) -> float:
    return float(sorted(time_samples(fn, repeat=repeat, warmup=1))[repeat // 2])


def decode(rec, state: torch.Tensor, tok: torch.Tensor, K: int, native: bool) -> list[list[int]]:
    """K tokens a row from `state` (not modified) with plain sampling (seed r for row r): by the native decode
    block (one call) or by the one-step loop (`step`, then `sample`); each row's tokens."""
    B, V = tok.shape[0], rec.config.vocab_size
    params = [SamplingParams(seed=r) for r in range(B)]
    gens = [p.generator() for p in params]
    state, tok, seen = state.clone(), tok.clone(), torch.zeros(B, V, dtype=torch.bool)
    if native:
        key, counter = uint64_bits([g.key for g in gens]), uint64_bits([g.counter for g in gens])
        res = rec.decode_block(
            K, state, tok, settings=row_settings(params, V), counts=None, key=key, counter=counter,
            limit=torch.full((B,), K), stops=[[]] * B, history=[b""] * B, seen=seen,
        )  # fmt: skip
        return res.tokens[: res.steps].t().tolist()
    out = []
    for _ in range(K):
        logits, state = rec.step(tok, state, out=state)
        tok = sample(logits, params, gens, seen)
        seen[torch.arange(B), tok] = True
        out.append(tok.tolist())
    return [list(r) for r in zip(*out, strict=True)]


def run(quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-wt103-") as folder:
        out, net = measure(quick, Path(folder))
        gc.collect()  # (measure's recurrent form is gone: the server builds its own)
        out["server_restart"] = server_restart(net, Path(folder))
    out["rss_end_mb"] = peak_rss_bytes() / 2**20
    return out


def measure(quick: bool, folder: Path) -> tuple[dict[str, Any], SequenceModel]:
    """The figures of the model itself (module docstring), and the model; `folder`: where the
    recurrent-form cache is kept (folder/forms)."""
    torch.manual_seed(0)
    repeat = 3 if quick else 7
    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    cfg = recipe(quick)
    net = SequenceModel(cfg).eval()
    with torch.no_grad():  # off the exact HiPPO initialization, as training moves them (see the doc)
        for k in net.kernels():
            for name in ("log_neg_re", "im", "P", "B"):
                p = getattr(k, name)
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    out["build_s"] = time.perf_counter() - t0
    out["params"] = net.num_params()
    out["weights_mb"] = sum(p.numel() * p.element_size() for p in net.parameters()) / 2**20
    out["rss_after_build_mb"] = peak_rss_bytes() / 2**20
    cache = FormCache(folder / "forms")
    t0 = time.perf_counter()
    rec = net.to_recurrent(cache=cache)  # every layer converted (and written to the cache)
    out["to_recurrent_s"] = time.perf_counter() - t0
    out["rss_after_convert_mb"] = peak_rss_bytes() / 2**20
    out["verification"] = {k: v for k, v in rec.verification.items() if isinstance(v, int | float | str)}
    out["form_cache_mb"] = sum(f.stat().st_size for f in cache.folder.iterdir()) / 2**20
    del rec
    gc.collect()
    t0 = time.perf_counter()
    rec = net.to_recurrent(cache=cache)  # a restart: every layer read from the cache
    out["to_recurrent_cached_s"] = time.perf_counter() - t0
    out["cached_layers"] = sum(r["cached"] for r in rec.report)
    out["verification_cached"] = {k: v for k, v in rec.verification.items()
                                  if isinstance(v, int | float | str)}  # fmt: skip
    out["state_bytes_per_session"] = rec.state_bytes_per_sequence
    print(f"bench.wt103: {out['params'] / 1e6:.1f} M params, built in {out['build_s']:.1f} s, converted "
          f"and verified in {out['to_recurrent_s']:.1f} s (peak RSS {out['rss_after_convert_mb']:.0f} MiB); "
          f"from the recurrent-form cache ({out['cached_layers']} of {len(rec.report)} layers, "
          f"{out['form_cache_mb']:.0f} MiB) in {out['to_recurrent_cached_s']:.1f} s", flush=True)  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    steps = []
    for B in BATCHES:
        tok = torch.randint(0, cfg.vocab_size, (B,), generator=gen)
        state = rec.init_state(B)
        both = {}
        for _ in range(2):  # alternated: the C step, then the torch ops (net_step_max_batch 0), twice
            for path, most in (("c", rec.net_step_max_batch), ("torch", 0)):
                rec.net_step_max_batch, keep = most, rec.net_step_max_batch
                try:
                    t = median_s(lambda tok=tok, state=state: rec.step(tok, state), repeat)
                finally:
                    rec.net_step_max_batch = keep
                both[path] = min(both.get(path, t), t)
        step_s = both["c"]
        h = torch.randn(B, cfg.d_model, generator=gen)
        head_s = median_s(lambda h=h: rec._net_step.adaptive_logprobs(h), repeat)
        with torch.no_grad():
            head_torch_s = median_s(lambda h=h: rec._net_ops.head(h), repeat)
        K, dec = 16, {}
        for _ in range(2):  # alternated: the native decode block, then the one-step loop, twice
            for native in (True, False):
                run_k = lambda native=native, tok=tok, state=state: decode(rec, state, tok, K, native)  # noqa: E731
                t = median_s(run_k, 3)
                dec[native] = min(dec.get(native, t), t)
        same = decode(rec, state, tok, K, True) == decode(rec, state, tok, K, False)
        seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool)
        row = {"batch": B, "step_ms": 1e3 * step_s, "tokens_per_s": B / step_s, "head_ms": 1e3 * head_s,
               "head_torch_ms": 1e3 * head_torch_s, "step_torch_ops_ms": 1e3 * both["torch"],
               "c_step": rec._net_step is not None and rec._net_step.adaptive is not None,
               "decode_tokens": K, "block_tokens_per_s": B * K / dec[True],
               "loop_tokens_per_s": B * K / dec[False], "block_same_tokens": same}  # fmt: skip
        shapes = {"flat": rec.step(tok, state)[0], "zipf": zipf_logits(B, cfg.vocab_size, gen)}
        for shape, logits in shapes.items():
            for label, p in (("plain", SamplingParams(seed=0)), ("top_p", SamplingParams(seed=0, top_p=0.9))):
                params = [p] * B
                gens = [q.generator() for q in params]
                row[f"sample_{label}_{shape}_ms"] = 1e3 * median_s(
                    lambda logits=logits, params=params, gens=gens: sample(logits, params, gens, seen), repeat
                )
        steps.append(row)
        print(f"bench.wt103: batch {B}: step {row['step_ms']:.1f} ms ({row['tokens_per_s']:.1f} tokens/s; "
              f"the torch ops' {row['step_torch_ops_ms']:.1f} ms), head {row['head_ms']:.1f} ms (torch's "
              f"{row['head_torch_ms']:.1f} ms); decoding {K} tokens a row: the native block "
              f"{row['block_tokens_per_s']:.1f} tokens/s, the one-step loop {row['loop_tokens_per_s']:.1f} "
              f"(the same tokens: {same}); sampling plain / top-p 0.9: "
              f"{row['sample_plain_zipf_ms']:.1f} / {row['sample_top_p_zipf_ms']:.1f} ms (Zipf logits), "
              f"{row['sample_plain_flat_ms']:.1f} / {row['sample_top_p_flat_ms']:.1f} ms (this random "
              "model's, nearly flat)", flush=True)  # fmt: skip
    out["steps"] = steps
    L = 128 if quick else 1024
    tokens = torch.randint(0, cfg.vocab_size, (1, L), generator=gen)
    prefill_s = median_s(lambda: rec.prefill(tokens, rec.init_state(1), logits="last"), max(3, repeat // 2))
    out["prefill"] = {"tokens": L, "s": prefill_s, "tokens_per_s": L / prefill_s}
    print(f"bench.wt103: prefill {L} tokens in {prefill_s:.2f} s ({L / prefill_s:.0f} tokens/s)", flush=True)
    return out, net


def server_restart(net: SequenceModel, folder: Path) -> dict[str, Any]:
    """A server's load of the model saved as a checkpoint, its layers in the recurrent-form cache (a
    restart): `load_models`, what `python -m server` runs before it listens (the checkpoint read and its
    SHA-256 checked, the recurrent form, the warm-up, the engine), and its phases as the server reports
    them (s4_model_load_seconds)."""
    save(net, folder / "wt103")
    settings = Settings(checkpoints=[str(folder / "wt103")], recurrent_cache=str(folder / "forms"),
                        max_sessions=4, torch_threads=torch.get_num_threads())  # fmt: skip
    metrics = Metrics()
    t0 = time.perf_counter()
    models, failed = load_models(settings, SessionTable(), metrics)
    wall = time.perf_counter() - t0
    if failed:
        raise RuntimeError(f"the server did not load the model: {failed}")
    report = models["wt103"].rec.report
    out = {"load_s": wall, "cached_layers": sum(r["cached"] for r in report), "layers": len(report)}
    for phase in ("convert", "total"):
        out[f"{phase}_s"] = metrics.load_seconds.labels("wt103", phase)._value.get()
    print(f"bench.wt103: a server restart loads it in {wall:.1f} s ({out['cached_layers']} of {len(report)} "
          f"layers from the recurrent-form cache; their forms and the network check "
          f"{out['convert_s']:.1f} s)", flush=True)  # fmt: skip
    return out


def plot(data: dict[str, Any], quick: bool) -> None:
    fig, (ax1, ax2) = subplots(2)
    rows = data["steps"]
    xs = range(len(rows))
    labels = [str(r["batch"]) for r in rows]
    parts = [
        ("head (adaptive log-softmax)", "head_ms"),
        ("sampling, top-p 0.9 (Zipf logits)", "sample_top_p_zipf_ms"),
    ]
    rest = [r["step_ms"] - r["head_ms"] for r in rows]
    ax1.bar(xs, rest, label="step without the head")
    bottom = rest
    for label, key in parts:
        vals = [r[key] for r in rows]
        ax1.bar(xs, vals, bottom=bottom, label=label)
        bottom = [a + b for a, b in zip(bottom, vals, strict=True)]
    ax1.set_xticks(list(xs), labels)
    ax1.set_xlabel("batch (rows stepped together)")
    ax1.set_ylabel("ms per step")
    ax1.set_title("one decode step")
    ax1.legend(fontsize=8)
    ax2.plot([r["batch"] for r in rows], [r["tokens_per_s"] for r in rows], "o-")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("batch")
    ax2.set_ylabel("tokens/s (the step alone)")
    ax2.set_title(f"{data['params'] / 1e6:.0f} M parameters, {data['threads']} threads")
    save_figure(
        fig, NAME, quick, title="the s4-wt103 recipe's shapes, served by the recurrent step on this CPU"
    )


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, __doc__, NAME, run, plot)


if __name__ == "__main__":
    main()
