"""The GPU path: decode-step tokens/s for batch 1…1024, audio streams at 16 kHz, and time to first token
under load, each with CUDA graphs on and off (`S4_CUDA_GRAPHS`).

1. **Step.** `RecurrentModel.step` of the shipped text model (4 layers, H = 256, N = 64, V = 256), in
   place, at batch 1, 2, 4, …, 1024: tokens/s with the graphs (`model/cuda_graphs.py`: copy in, replay,
   copy out) and with the plain torch ops; float32 and bfloat16 weights (`S4_DTYPE`; states float32);
   with the graphs also the replay alone (what the copies in and out cost), the batch resident in its
   bucket's buffer (`resident_state`: stepped in place, no copies; the engine's way since 2026-12-04) and,
   float32, the engine's decode blocks in graphs ("engine_block_steps_per_s": BLOCK_K steps with their
   sampling, one host copy a block);
   each with the Triton step (`model/triton_step.py`, the CUDA default; rows "triton": true) and with
   the torch ops it replaces; float32 also with the step compiled by torch.compile and captured in the
   graphs (`S4_COMPILE_STEP`; rows "compiled": true).
2. **Audio streams at 16 kHz.** The shipped audio-digits-s4 weights (H = 128, 4 layers, N = 64; trained at
   8 kHz: a step costs the same whatever the rate, so it stands for a 16 kHz model of that shape), at
   batch B, with the Triton step and with the torch ops: steps/s of the bare step (with the graphs also
   resident: "step_resident"), and of the engine's whole per-step work (`DecodeBatch.step`: the
   step, sampling with one generator per stream, the one host copy; on CUDA beside it the engine as it
   sampled until 2026-12-04, `sample` per step instead of the `RowSampler` that keeps the rows' settings
   on the device), and with the graphs of its decode blocks (`DecodeBatch.block`: BLOCK_K steps with their
   sampling replayed as graphs, one host copy a block; "engine_block", with the first block's time, which
   captures its graph). A stream needs 16,000 steps/s, so
   the real-time factor is steps/s ÷ 16,000, and "streams at real time" is the largest B with factor ≥ 1.
   Beside it the memory-bandwidth bound: a step reads and writes each stream's float32 state (131 KB for
   this model: 32 slots a channel in the real block-diagonal form) at least once, so at most copy
   bandwidth ÷ (2 × state bytes × 16,000) streams keep up (about 1,025 at the 4.3 TB/s an H200 copies)
   unless states stay on chip between steps. Also the same with the states stored in float16
   (`S4_STATE_DTYPE`, `use_state_dtype`; rows "state_dtype": "float16", keys ending "_float16"), half
   the bytes a step moves, so twice that bound ("bandwidth_bound_streams_float16"), with the Triton step
   where it runs (it reads and writes the 16-bit state itself). Beside it the shipped SaShiMi
   (audio-digits, the default audio model, 8 kHz) at 1 … 1,024 streams at mixed pooling phases
   ("sashimi"): its sparse torch step and engine step (graphs off), and its dense step in graphs,
   resident, and its decode blocks in graphs (graphs on).
3. **Time to first token under load.** The engine (`server/engine.py`, no HTTP) with L sessions
   decoding the text model; one prompt of P tokens at a time arrives, and its TTFT is the time from
   submission to its first token (prefill in chunks interleaved with the decode steps).

Runs only where CUDA is (one line on stderr and exit status 1 elsewhere); bounded: a full run stops
starting new measurements after 240 s (60 s with --quick; `--budget S`: after S s; each section records
what it skipped). The audio section runs first (its goal is the one still unmeasured), then the step,
then TTFT. One measurement's failure is recorded (the section's "errors") and the others go on; a
section's failure is recorded and the next runs. Stopped from outside (SIGTERM: `timeout`, as
scripts/gpu-check stops it), it records what the running section had measured, starts nothing more and
writes the results.

    python -m bench.gpu [--quick] [--budget S]   # stops starting measurements after 240 s (--quick: 60 s)
    scripts/gpu-check                            # the CUDA tests, then this
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from bench.common import ROOT, bench_main, log2_axis, save_figure, subplots, write_results

NAME = "gpu"
RATE = 16000  # samples/s of one audio stream: steps/s it needs
TEXT = ROOT / "checkpoints/text-shakespeare"
AUDIO = ROOT / "checkpoints/audio-digits-s4"
STANDINS = {  # same shapes as the shipped checkpoints, random init, when those are absent
    "text": {"vocab_size": 256, "d_model": 256, "n_layers": 4, "d_state": 64, "l_max": 1024},
    "audio": {"vocab_size": 256, "d_model": 128, "n_layers": 4, "d_state": 64, "l_max": 8000,
              "modality": "audio", "sample_rate": RATE},
}  # fmt: skip
POW2 = [2**k for k in range(11)]  # 1 … 1024
SIZES: dict[bool, dict[str, Any]] = {  # keyed by quick
    False: {
        "batches": POW2,
        "dtypes": ["float32", "bfloat16"],
        "seconds": 0.3,  # timed per configuration (after warm-up), at least MIN_STEPS steps
        "loads": [0, 64, 256],
        "prompt": 2048,
        "trials": 5,
    },
    True: {
        "batches": [1, 8, 64, 512],
        "dtypes": ["float32", "bfloat16"],
        "seconds": 0.1,
        "loads": [0, 64],
        "prompt": 512,
        "trials": 3,
    },
}
BUDGET_S = {False: 240.0, True: 60.0}  # no new measurement starts after this (model loading included)
# the compiled step's variant starts only with this much of the budget left: its compile and captures take
# a minute or more, and scripts/gpu-check stops the benchmark 60 s after the budget
COMPILE_RESERVE_S = 90.0
SECTIONS = ("audio", "step", "ttft")  # in the order they run: the audio streams first (the goal still open)
MIN_STEPS = 10
BLOCK_K = 256  # steps of one engine decode block in the audio section (an audio engine's longest block)
ERRORS: list[str] = []  # sections that raised (recorded in the JSON; exit status 1)
LIVE: dict[str, dict[str, Any]] = {}  # each section's results as it fills them (kept when it is stopped)
BUDGET: dict[str, float] = {}  # "seconds": `--budget`, in place of BUDGET_S
WAIT_S = 60.0  # TTFT: longest wait for any engine event before the run is declared stuck
NO_CUDA = (
    "bench.gpu: no CUDA device (torch {v}, torch.cuda.is_available() is False); "
    "run it on a GPU machine: scripts/gpu-check"
)


class Stopped(BaseException):  # noqa: N818  (not an error: the run's stop from outside; no `except
    # Exception` of a measurement takes it for that measurement's failure)
    """SIGTERM (scripts/gpu-check's `timeout`): the run records what it has and ends."""


def stop_on_sigterm(signum, frame) -> None:
    raise Stopped(f"stopped from outside (signal {signum})")


def live(section: str, out: dict[str, Any]) -> dict[str, Any]:
    """`out`, the results `section` is filling, kept in LIVE (what a stopped section had measured)."""
    LIVE[section] = out
    return out


def failed(out: dict[str, Any], what: str, exc: Exception) -> None:
    """Record in out["errors"] that the measurement `what` raised (the section goes on)."""
    line = f"{what}: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    out.setdefault("errors", []).append(line)
    ERRORS.append(line)
    print(f"bench.gpu: {what} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self, reserve: float = 0.0) -> bool:
        """Whether a measurement may start: more than `reserve` seconds of the budget are left."""
        return time.perf_counter() - self.t0 < self.seconds - reserve


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rate(fn, seconds: float, min_steps: int = MIN_STEPS) -> float:
    """Calls of fn per second: 3 warm-up calls, then timed calls in groups of 5 until `seconds` and
    `min_steps` are both reached (the device synchronized before and after)."""
    for _ in range(3):
        fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        for _ in range(5):
            fn()
        n += 5
        sync()
        dt = time.perf_counter() - t0
        if dt >= seconds and n >= min_steps:
            return n / dt


def load_rec(kind: str, device: str, dtype: str, tmp: Path):
    """(RecurrentModel, what it is) for 'text' or 'audio': the shipped checkpoint, else a stand-in."""
    from model import ModelConfig, SequenceModel, load, save

    path = TEXT if kind == "text" else AUDIO
    if (path / "config.json").exists():
        net, what = load(path), f"shipped checkpoint {path.name}"
    else:
        torch.manual_seed(0)
        cfg = STANDINS[kind]
        save(SequenceModel(ModelConfig(cauchy_backend="torch", **cfg)), tmp / kind)
        net, what = load(tmp / kind), f"stand-in, random init: {cfg}"
    t0 = time.perf_counter()
    rec = net.to_recurrent(device=device, dtype=getattr(torch, dtype))
    return rec, {"model": what, "dtype": dtype, "convert_s": time.perf_counter() - t0,
                 "forms": [r["form"] for r in rec.report], "verification": rec.verification}  # fmt: skip


def capture(rec, on: bool, max_batch: int) -> float | None:
    """Graphs on (captured now, every bucket up to max_batch; seconds) or off (None)."""
    from model.cuda_graphs import bucket_sizes

    if not on or rec.device.type != "cuda":
        rec.use_cuda_graphs(None)
        return None
    return rec.use_cuda_graphs(bucket_sizes(max_batch), blocks=False)  # (block graphs: at first use)


def triton_ok(rec, out: dict[str, Any] | None = None) -> bool:
    """Whether the model can step with the Triton kernel here: triton installed, a diagonal layer, a CUDA
    device (for `--device-cpu`: Triton's interpreter, and no C step, which serves first), and the kernel
    runs there (`triton_step.probe`: not where Triton cannot build its launcher, say; then why is added to
    out["skipped"], and the torch ops are measured)."""
    from model import triton_step

    cpu_ok = triton_step.interpreting() and not rec.decode_block_ready(1)
    diagonal = any(f.form == "diagonal" for f in rec.layers)
    if not (triton_step.available() and diagonal and (rec.device.type == "cuda" or cpu_ok)):
        return False
    why = triton_step.probe(rec.device)
    if why is not None and out is not None:
        out["skipped"].append(f"the Triton step: the kernel does not run on {rec.device}: {why}")
    return why is None


def modes(device: str) -> list[bool]:
    """Graphs off first: a capture that fails can leave the process's CUDA generator unusable (seen on an
    H200: "Offset increment outside graph capture"), and the plain step's figures are measured by then."""
    return [False, True] if device == "cuda" else [False]  # no capture without CUDA


def captured(rec, graphs: bool, max_batch: int, where: dict[str, Any], key: str) -> bool:
    """`capture` with its seconds in where[key] (and `check_graphs`' relative errors in where[key_check]);
    a capture that raises is recorded in where['skipped'] (the mode is then not measured) instead of
    ending the section."""
    try:
        where[key] = capture(rec, graphs, max_batch)
        if graphs and rec.graphs_check:  # the graphs' step against the eager step (`check_graphs`)
            where[key + "_check"] = rec.graphs_check
    except Exception as exc:  # noqa: BLE001  (recorded; the other mode's figures stand)
        where.setdefault("capture_errors", []).append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
        rec.use_cuda_graphs(None)
        return False
    return True


# ---------------------------------------------------------------------------------------------


def bench_step(sz: dict, device: str, budget: Budget, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = live("step", {"rows": [], "models": {}, "skipped": []})
    for dtype in sz["dtypes"]:
        if not budget.left():
            out["skipped"].append(f"{dtype}: time budget")
            continue
        rec, info = load_rec("text", device, dtype, tmp)
        out["models"][dtype] = info
        # (graphs, compiled, triton): the Triton step (model/triton_step.py, the CUDA default) and the
        # torch ops it replaces, each with the graphs off and on; the torch.compile'd step (S4_COMPILE_STEP)
        # last, float32 only (its compile takes a minute or more)
        kernel = triton_ok(rec, out)
        variants = [(g, False, t) for t in ([True, False] if kernel else [False]) for g in modes(device)]
        variants += [(True, True, False)] if device == "cuda" and dtype == "float32" else []
        for graphs, compiled, triton in variants:
            what = f"{dtype} graphs={graphs} compiled={compiled} triton={triton}"
            key = (f"capture_s_graphs_{'on' if graphs else 'off'}" + ("_compiled" if compiled else "")
                   + ("_triton" if triton else ""))  # fmt: skip
            if not budget.left(COMPILE_RESERVE_S if compiled else 0.0):
                out["skipped"].append(f"{what}: time budget")
                continue
            rec.use_cuda_graphs(None)  # (else the switches below capture them again at once)
            if kernel:
                rec.use_triton_step(triton)
            rec.compile_step(compiled)
            if not captured(rec, graphs, max(sz["batches"]), info, key):
                out["skipped"].append(f"{what}: the capture failed ({info['capture_errors'][-1]})")
                continue
            for B in sz["batches"]:
                if not budget.left():
                    out["skipped"].append(f"{what} batch {B}: time budget")
                    continue
                try:
                    out["rows"].append(step_row(rec, B, sz["seconds"], what, out, dtype=dtype, graphs=graphs,
                                                compiled=compiled, triton=triton))  # fmt: skip
                except Exception as exc:  # noqa: BLE001  (recorded: the other rows go on)
                    failed(out, f"step {what} batch {B}", exc)
        rec.use_cuda_graphs(None)  # frees the graphs' memory before the next model
        rec.compile_step(False)
    return out


def step_row(rec, B: int, seconds: float, what: str, out: dict[str, Any], **row) -> dict[str, Any]:
    """One batch size of the step section: `row` (dtype, graphs, compiled, triton) with its figures."""
    state = rec.init_state(B)
    tok = torch.randint(0, rec.config.vocab_size, (B,), device=rec.device)
    steps = rate(lambda: rec.step(tok, state, out=state), seconds)
    row |= {"batch": B, "steps_per_s": steps, "tokens_per_s": B * steps, "us_per_step": 1e6 / steps}
    if row["graphs"]:  # the replay alone, without the copies in and out of the static buffers
        replay = rec._graphs.bucket(B).graph.replay
        row["replay_only_us_per_step"] = 1e6 / rate(replay, seconds)
        row["resident_steps_per_s"] = resident_rate(rec, tok, state, seconds)
        if row["dtype"] == "float32" and not row["compiled"]:  # the engine's decode blocks (tokens/s: × B)
            try:
                row.update(block_row(rec, B, seconds))
            except ImportError as exc:  # (the server's packages absent)
                out["skipped"].append(f"{what} batch {B}: engine blocks ({exc})")
    return row


def decode_batch(rec, B: int):
    """The engine's DecodeBatch with B streams joined (temperature-1 sampling, one seed each; a SaShiMi's
    at mixed pooling phases)."""
    from model.sampling import SamplingParams
    from server.engine import DecodeBatch, Job
    from server.sessions import SessionRecord, SlotPool

    pool = SlotPool(rec.init_state(B), rec.config.vocab_size, rec.batch_dim)
    jobs = []
    for k in range(B):
        session = SessionRecord(id=f"s{k}", model="bench", slot=pool.reserve(), pending=128)
        params = SamplingParams(temperature=1.0, seed=k)
        jobs.append(Job(session, [], params=params, generator=params.generator(rec.device)))
    batch = DecodeBatch(pool, rec.state_dtype)
    batch.join(jobs)
    mixed_phases(rec, batch.state)
    return batch


def copy_bandwidth(device: torch.device, seconds: float) -> float:
    """Bytes moved per second (read + written) by a device-to-device copy of 1 GiB (256 MiB on CPU)."""
    n = (1 << 28) if device.type == "cuda" else (1 << 26)  # float32 elements
    x = torch.ones(n, device=device)
    y = torch.empty_like(x)
    return 2 * x.nbytes * rate(lambda: y.copy_(x), seconds, min_steps=5)


def bench_audio(sz: dict, device: str, budget: Budget, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = live("audio", {"rows": [], "rate_hz": RATE, "skipped": []})
    rec, out["model"] = load_rec("audio", device, "float32", tmp)
    try:
        import server.engine  # noqa: F401  (pydantic-settings etc.: absent on a bare GPU image)
    except ImportError as exc:
        engine_ok = False
        out["skipped"].append(f"engine step: server dependencies missing ({exc})")
    else:
        engine_ok = True
    kernel = triton_ok(rec, out)
    # float32 states with the best step, then a float16 state (S4_STATE_DTYPE) with it, then float32 with the
    # torch ops the Triton step replaces (the budget cuts the last first)
    variants = [(kernel, "float32"), (kernel, "float16")] + ([(False, "float32")] if kernel else [])
    for triton, state_dtype in variants:
        for graphs in modes(device):
            what = f"graphs={graphs} triton={triton} state={state_dtype}"
            if not budget.left():  # (before its capture, not only before its rows)
                out["skipped"].append(f"{what}: time budget")
                continue
            rec.use_cuda_graphs(None)
            if kernel:
                rec.use_triton_step(triton)
            try:
                check = rec.use_state_dtype(state_dtype)
            except Exception as exc:  # noqa: BLE001  (recorded: the float32 figures stand)
                out["skipped"].append(f"{what}: {type(exc).__name__}: {exc}")
                continue
            if check:
                out["model"]["state_float16_check"] = check
            key = f"capture_s_graphs_{'on' if graphs else 'off'}" + variant_suffix(triton, state_dtype)
            if not captured(rec, graphs, max(sz["batches"]), out["model"], key):
                out["skipped"].append(f"{what}: the capture failed ({out['model']['capture_errors'][-1]})")
                continue
            for B in sz["batches"]:
                if not budget.left():
                    out["skipped"].append(f"{what} batch {B}: time budget")
                    continue
                try:
                    row = audio_row(rec, B, graphs, triton, engine_ok, sz["seconds"])
                except Exception as exc:  # noqa: BLE001  (recorded: the other rows go on)
                    failed(out, f"audio {what} batch {B}", exc)
                    continue
                out["rows"].append({**row, "state_dtype": state_dtype})
    rec.use_cuda_graphs(None)
    rec.use_state_dtype("float32")
    out["sashimi"] = {"rows": [], "skipped": []}  # (filled as it runs: kept if the run is stopped)
    try:
        sashimi_rows(device, sz["seconds"], budget, out=out["sashimi"])
    except Exception as exc:  # noqa: BLE001  (recorded: the bandwidth bound and the counts still follow)
        failed(out["sashimi"], "audio sashimi", exc)
    if device == "cuda" and budget.left():  # what a server's load captures: the step's graphs and every
        # bucket's plain-sampling block graphs (7 sizes), of its default step (the Triton kernel where it
        # runs; the variants above ended with the torch ops)
        from model.cuda_graphs import bucket_sizes  # noqa: PLC0415

        try:
            if kernel:
                rec.use_triton_step(True)
            out["model"]["capture_with_blocks_triton"] = kernel
            out["model"]["capture_s_with_blocks"] = rec.use_cuda_graphs(bucket_sizes(max(sz["batches"])))
        except Exception as exc:  # noqa: BLE001  (recorded: the section goes on)
            out["skipped"].append(f"capture with the block graphs failed: {type(exc).__name__}: {exc}")
        rec.use_cuda_graphs(None)
    # The memory-bandwidth bound: a step reads and writes every stream's float32 state at least once, so
    # no batch holds more than (bytes/s the device copies) ÷ (2 × state bytes × 16,000) streams unless the
    # states stay on chip between steps.
    out["state_bytes_per_stream"] = nbytes = rec.state_bytes_per_sequence
    out["copy_bytes_per_s"] = bw = copy_bandwidth(rec.device, sz["seconds"])
    out["bandwidth_bound_streams"] = bw / (2 * nbytes * RATE)
    out["bandwidth_bound_streams_float16"] = bw / (nbytes * RATE)  # (half the bytes a state)
    for triton, state_dtype in {(r["triton"], r["state_dtype"]) for r in out["rows"]}:
        for graphs in modes(device):
            for what in ("step", "step_resident", "engine", "engine_block"):
                want = (graphs, triton, state_dtype)
                mine = [r for r in out["rows"] if (r["graphs"], r["triton"], r["state_dtype"]) == want]
                ok = [r["batch"] for r in mine if r.get(f"{what}_rtf", 0) >= 1]
                key = f"streams_at_real_time_{what}_graphs_{'on' if graphs else 'off'}"
                out[key + variant_suffix(triton, state_dtype)] = max(ok, default=0)
    return out


def variant_suffix(triton: bool, state_dtype: str) -> str:
    """The audio section's key suffix of a variant: "_triton" for the Triton step, "_float16" for a float16
    state (float32 with the torch ops: none)."""
    return ("_triton" if triton else "") + ("_float16" if state_dtype == "float16" else "")


def audio_row(rec, B: int, graphs: bool, triton: bool, engine_ok: bool, seconds: float) -> dict[str, Any]:
    """One batch size of the audio section: the bare step's steps/s, and the engine's (with the per-step
    `sample` beside it on CUDA), with their real-time factors; the states in the model's `state_dtype`."""
    state = rec.init_state(B).to(rec.state_dtype)
    tok = torch.randint(0, 256, (B,), device=rec.device)
    steps = rate(lambda: rec.step(tok, state, out=state), seconds)
    row = {"graphs": graphs, "triton": triton, "batch": B, "step_steps_per_s": steps}
    if graphs:
        row["step_resident_steps_per_s"] = resident_rate(rec, tok, state, seconds)
    if engine_ok:
        batch = decode_batch(rec, B)
        row["engine_steps_per_s"] = rate(lambda: batch.step(rec), seconds)
        if batch.device_sampler:  # beside it, the per-step `sample` of the engine until 2026-12-04
            before = decode_batch(rec, B)
            before.device_sampler = False
            row["engine_sample_per_step_steps_per_s"] = rate(lambda: before.step(rec), seconds)
        if graphs:
            row.update(block_row(rec, B, seconds))
    for what in ("step", "step_resident", "engine", "engine_block"):
        if f"{what}_steps_per_s" in row:
            row[f"{what}_rtf"] = row[f"{what}_steps_per_s"] / RATE
    return row


def sashimi_rows(device: str, seconds: float, budget: Budget, batches=(1, 16, 256, 1024),
                 out: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The shipped SaShiMi (checkpoints/audio-digits, the default audio model; 8 kHz) on the device (its C
    step only runs on CPU), the Triton kernel for its diagonal layers, rows at mixed pooling phases.
    Graphs off: the sparse torch step (each coarser level steps the rows that reach it, picked on the
    host: a sync a level every step). Graphs on: the dense step captured per bucket (every level of every
    row, the updates of the rows that do not step there masked out: about 7× the sparse step's FLOPs for
    this network, no host sync), resident, and the engine's decode blocks in graphs. Steps/s of the bare
    step, of the engine's `DecodeBatch.step` and (graphs) of `DecodeBatch.block`, with the real-time
    factor at 8 kHz. Fills and returns `out` (a new dict by default); a batch size that raises is
    recorded in its "errors"."""
    from model import load

    out = {"rows": [], "skipped": []} if out is None else out
    path = ROOT / "checkpoints/audio-digits"
    if not (path / "config.json").exists() or not budget.left():
        out["skipped"].append("no checkpoints/audio-digits" if budget.left() else "time budget")
        return out
    rec = load(path).to_recurrent(device=device)
    out["rate_hz"] = rec.config.sample_rate
    for graphs in modes(device):
        key = f"capture_s_graphs_{'on' if graphs else 'off'}"
        if not captured(rec, graphs, max(batches), out, key):
            out["skipped"].append(f"graphs={graphs}: the capture failed ({out['capture_errors'][-1]})")
            continue
        for B in batches:
            if not budget.left():
                out["skipped"].append(f"graphs={graphs} batch {B}: time budget")
                continue
            try:
                out["rows"].append(sashimi_row(rec, B, graphs, seconds))
            except Exception as exc:  # noqa: BLE001  (recorded: the other rows go on)
                failed(out, f"sashimi graphs={graphs} batch {B}", exc)
    rec.use_cuda_graphs(None)
    return out


def sashimi_row(rec, B: int, graphs: bool, seconds: float) -> dict[str, Any]:
    """One batch size of `sashimi_rows`."""
    state = rec.init_state(B)
    mixed_phases(rec, state)
    tok = torch.randint(0, 256, (B,), device=rec.device)
    row = {"graphs": graphs, "batch": B,
           "step_steps_per_s": rate(lambda: rec.step(tok, state, out=state), seconds)}  # fmt: skip
    if graphs:
        row["step_resident_steps_per_s"] = resident_rate(rec, tok, state, seconds)
    try:
        batch = decode_batch(rec, B)
    except ImportError:  # (the server's packages absent)
        batch = None
    if batch is not None:
        row["engine_steps_per_s"] = rate(lambda: batch.step(rec), seconds)
        if graphs:
            row.update(block_row(rec, B, seconds))
    for what in ("step", "step_resident", "engine", "engine_block"):
        if f"{what}_steps_per_s" in row:
            row[f"{what}_rtf"] = row[f"{what}_steps_per_s"] / rec.config.sample_rate
    return row


def mixed_phases(rec, state: torch.Tensor) -> None:
    """A SaShiMi batch's rows at pooling phases 0, 1, …, period − 1, 0, … (as streams that started at
    different times); other models' states are left as they are."""
    if hasattr(rec, "period"):
        with torch.inference_mode():
            phase = rec.layout.view(state, "phase")[:, 0]
            phase.copy_(torch.arange(state.shape[0], device=state.device) % rec.period)


def block_row(rec, B: int, seconds: float) -> dict[str, Any]:
    """The engine's decode blocks with the graphs (`DecodeBatch.block`: BLOCK_K steps with their sampling
    replayed as graphs of 64 steps, the tokens copied to the host once a block): steps/s, and the seconds
    the capture of its graphs took (in the first, untimed, block)."""
    batch = decode_batch(rec, B)
    if not batch.native(rec):
        return {}
    limits = [1 << 40] * B
    t0 = time.perf_counter()
    batch.block(rec, BLOCK_K, limits)
    first = time.perf_counter() - t0
    steps = BLOCK_K * rate(lambda: batch.block(rec, BLOCK_K, limits), seconds, min_steps=3)
    bb = rec._graphs.blocks.get(rec._graphs.resident_bucket)
    rec._graphs.release()
    return {"engine_block_steps_per_s": steps, "block_steps": BLOCK_K, "block_first_s": first,
            "block_capture_s": None if bb is None else bb.capture_s}  # fmt: skip


def resident_rate(rec, tok: torch.Tensor, state: torch.Tensor, seconds: float) -> float:
    """Steps/s of the batch made resident in its bucket's buffer (`resident_state`: the graph replays on
    it in place, no copies in or out; the engine's decode batch steps so since 2026-12-04)."""
    view = rec.resident_state(state.clone())
    try:
        return rate(lambda: rec.step(tok, view, out=view), seconds)
    finally:
        rec._graphs.release()


def ttft_under_load(rec, load: int, sz: dict, graphs: bool) -> dict[str, Any]:
    """`load` sessions decode (sampling, endless) while `trials` prompts of sz['prompt'] tokens arrive
    one after another; each prompt's time to first token, and `graphs_captured`: whether the step ran
    with CUDA graphs. With `graphs` and a capture that failed, only {"graphs_captured": False} (not run:
    it would run eager under the graphs' label)."""
    from model.sampling import SamplingParams
    from server.config import Settings
    from server.engine import Engine, Job, Stream
    from server.metrics import Metrics
    from server.registry import use_cuda_graphs
    from server.sessions import SessionTable

    settings = Settings(max_sessions=load + 2, max_batch_size=max(load + 1, 1), max_queued_requests=load + 8,
                        stream_buffer=256, cuda_graphs=graphs)  # fmt: skip
    if graphs:
        # False when the capture failed (the model then serves eager): such a row would be labelled
        # "graphs" while it ran without them; it is not measured
        if not use_cuda_graphs(rec, settings, "bench"):
            rec.use_cuda_graphs(None)
            return {"graphs_captured": False}
    else:
        rec.use_cuda_graphs(None)
    engine = Engine("bench", rec, settings, SessionTable(), Metrics().for_model("bench"))
    engine.start()
    P = sz["prompt"]

    async def run() -> dict[str, Any]:
        loop = asyncio.get_running_loop()

        def submit(k: int, prompt: list[int], n: int) -> Stream:
            stream = Stream(loop, settings.stream_buffer)
            session = engine.new_session(f"s{k}", ephemeral=True)
            engine.submit(Job(session, prompt, fresh=True, stream=stream,
                              params=SamplingParams(temperature=1.0, seed=k), max_new_tokens=n))  # fmt: skip
            return stream

        async def drain(stream: Stream, counter: list[int]) -> None:
            while True:
                items = await stream.get()
                counter[0] += sum(isinstance(x, int) for x in items)
                if not isinstance(items[-1], int):
                    return

        made = [0]
        streams = [submit(k, [(k * 7 + i) % 256 for i in range(16)], 10**9) for k in range(load)]
        tasks = [asyncio.create_task(drain(s, made)) for s in streams]
        t_load = time.perf_counter()
        deadline = time.perf_counter() + WAIT_S
        while load and made[0] < 4 * load:  # every load session decoding
            if time.perf_counter() > deadline:
                raise RuntimeError(f"the {load} load sessions made {made[0]} tokens in {WAIT_S} s")
            await asyncio.sleep(0.005)
        ttfts = []
        for t in range(sz["trials"]):
            prompt = [(t * 13 + i) % 256 for i in range(P)]
            t0 = time.perf_counter()
            s = submit(load + 1 + t, prompt, 1)
            items = await asyncio.wait_for(s.get(), WAIT_S)
            ttfts.append(time.perf_counter() - t0)
            if not isinstance(items[0], int):
                raise RuntimeError(f"the prompt's request failed: {items[0]}")
            while isinstance(items[-1], int):  # until its final event
                items = await asyncio.wait_for(s.get(), WAIT_S)
        decoded = made[0] / (time.perf_counter() - t_load) if load else 0.0
        for s in streams:
            s.cancel()
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
        return {"graphs_captured": graphs, "ttft_ms": [1e3 * x for x in ttfts],
                "ttft_p50_ms": 1e3 * statistics.median(ttfts), "ttft_max_ms": 1e3 * max(ttfts),
                "load_tokens_per_s": decoded}  # fmt: skip

    try:
        return asyncio.run(run())
    finally:
        engine.stop()
        rec.use_cuda_graphs(None)


def bench_ttft(sz: dict, device: str, budget: Budget, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = live("ttft", {"rows": [], "prompt_tokens": sz["prompt"], "skipped": []})
    try:
        import server.engine  # noqa: F401
    except ImportError as exc:
        out["skipped"].append(f"all: server dependencies missing ({exc})")
        return out
    rec, out["model"] = load_rec("text", device, "float32", tmp)
    for graphs in modes(device):
        for load in sz["loads"]:
            if not budget.left():
                out["skipped"].append(f"graphs={graphs} load {load}: time budget")
                continue
            try:
                row = {"graphs": graphs, "load": load, **ttft_under_load(rec, load, sz, graphs)}
            except Exception as exc:  # noqa: BLE001  (recorded: the other loads go on)
                failed(out, f"ttft graphs={graphs} load {load}", exc)
                continue
            if graphs and not row["graphs_captured"]:
                out["skipped"].append(f"graphs=True load {load}: the CUDA graphs' capture failed (eager)")
                continue
            out["rows"].append(row)
    return out


def run(quick: bool, device: str = "cuda") -> dict[str, Any]:
    sz = SIZES[quick]
    seconds = BUDGET.get("seconds", BUDGET_S[quick])
    budget = Budget(seconds)
    t0 = time.perf_counter()
    data: dict[str, Any] = {"device": device, "sizes": sz, "budget_s": seconds}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        data["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "torch": torch.__version__,
                       "cuda": torch.version.cuda, "memory_gib": p.total_memory / 2**30}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        # the audio streams first: the goal still to be measured (a section past the budget is cut short)
        for name, fn in zip(SECTIONS, (bench_audio, bench_step, bench_ttft), strict=True):
            s0 = time.perf_counter()
            stopped = None
            try:  # one section's failure is recorded; the others still run and everything is written
                data[name] = fn(sz, device, budget, Path(tmp))
            except (Exception, Stopped) as exc:  # (with what it had measured)
                stopped = exc if isinstance(exc, Stopped) else None
                ERRORS.append(f"{name}: {type(exc).__name__}: {exc}")
                data[name] = {"rows": [], **LIVE.get(name, {}), "error": ERRORS[-1],
                              "traceback": traceback.format_exc()}  # fmt: skip
                print(f"bench.gpu: {name} FAILED: {ERRORS[-1]}", file=sys.stderr, flush=True)
            data[name]["wall_s"] = time.perf_counter() - s0
            print(f"bench.gpu: {name} done in {data[name]['wall_s']:.1f} s", flush=True)
            # written after each section too (bench_main writes the whole at the end): a run stopped from
            # outside (scripts/gpu-check's limit) keeps the sections it finished
            done = ", ".join(k for k in SECTIONS if k in data)
            write_results(results_name(device), {**data, "partial": f"sections done: {done}"}, quick)
            if stopped is not None:  # nothing more starts; the results are written (bench_main, plot)
                data["stopped"] = str(stopped)
                break
    data["wall_s"] = time.perf_counter() - t0
    return data


def plot(data: dict[str, Any], quick: bool) -> None:
    fig, (a1, a2, a3) = subplots(3, width=5.5)
    data = {**data, **{name: {"rows": [], **data.get(name, {})} for name in SECTIONS}}  # (a stopped run
    # has no sections after the one it stopped in)

    def kind(r):
        return r["dtype"], r["graphs"], r.get("compiled", False), r.get("triton", False)

    for d, g, c, t in sorted({kind(r) for r in data["step"]["rows"]}, reverse=True):
        rows = [r for r in data["step"]["rows"] if kind(r) == (d, g, c, t)]
        label = (
            f"{d}, graphs {'on' if g else 'off'}"
            + (", torch.compile" if c else "")
            + (", Triton" if t else "")
        )
        a1.plot(
            [r["batch"] for r in rows], [r["tokens_per_s"] for r in rows], "o-" if t else "s--", label=label
        )
    a1.set(yscale="log", xlabel="batch", ylabel="tokens/s", title="text model step (H = 256)")
    log2_axis(a1, data["sizes"]["batches"])

    def audio_kind(r):
        return r["graphs"], r.get("triton", False), r.get("state_dtype", "float32")

    for graphs, triton, sd in sorted({audio_kind(r) for r in data["audio"]["rows"]}, reverse=True):
        rows = [r for r in data["audio"]["rows"] if audio_kind(r) == (graphs, triton, sd)]
        for what, style in (
            ("step", "o-"),
            ("step_resident", "^:"),
            ("engine", "s--"),
            ("engine_block", "d-."),
        ):
            pts = [(r["batch"], r[f"{what}_rtf"]) for r in rows if f"{what}_rtf" in r]
            if pts:
                label = f"{what}, graphs {'on' if graphs else 'off'}" + (", Triton" if triton else "")
                a2.plot(*zip(*pts), style, label=label + (", float16 state" if sd == "float16" else ""))
    sash = data["audio"].get("sashimi", {}).get("rows", [])
    for graphs in (False, True):  # the default audio model at its own 8 kHz: the engine's best path
        what = "engine_block" if graphs else "engine"
        pts = [(r["batch"], r[f"{what}_rtf"]) for r in sash if r.get("graphs", False) == graphs
               and f"{what}_rtf" in r]  # fmt: skip
        if pts:
            a2.plot(*zip(*pts), "x:" if graphs else "+:", label=f"SaShiMi {what} (8 kHz), graphs {graphs}")
    a2.axhline(1.0, color="k", lw=0.8)
    bound = data["audio"].get("bandwidth_bound_streams")
    if bound:
        a2.axvline(bound, color="gray", ls=":", label=f"bandwidth bound {bound:,.0f} streams")
    bound16 = data["audio"].get("bandwidth_bound_streams_float16")
    if bound16:
        a2.axvline(bound16, color="gray", ls="--", label=f"float16 state: {bound16:,.0f} streams")
    a2.set(yscale="log", xlabel="concurrent streams", ylabel="real-time factor (steps/s ÷ 16,000)",
           title="audio at 16 kHz (H = 128)")  # fmt: skip
    log2_axis(a2, data["sizes"]["batches"])
    for graphs in (True, False):
        rows = [r for r in data["ttft"]["rows"] if r["graphs"] == graphs]
        if rows:
            a3.plot([r["load"] for r in rows], [r["ttft_p50_ms"] for r in rows], "o-",
                    label=f"graphs {'on' if graphs else 'off'}")  # fmt: skip
    a3.set(xlabel="sessions decoding", ylabel="TTFT p50 (ms)",
           title=f"{data['ttft'].get('prompt_tokens', '?')}-token prompt under load")  # fmt: skip
    for a in (a1, a2, a3):
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    name = data.get("gpu", {}).get("name", data["device"])
    save_figure(fig, results_name(data["device"]), quick, title=f"bench.gpu on {name}")


def measured(data: dict[str, Any]) -> dict[str, Any]:
    """`data`, the run's, once every measurement has ended: from here SIGTERM is ignored, so that writing
    the JSON and drawing the figure are not cut off (`timeout -k 10` still ends a run stuck there)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return data


def budget_option(parser) -> None:
    parser.add_argument("--budget", type=float, metavar="S",
                        help="start no new measurement after S seconds (default 240, 60 with --quick; "
                             "scripts/gpu-check passes what its time limit leaves)")  # fmt: skip


def read_budget(args) -> bool:
    """`--budget`: a finite number of seconds > 0 (else the usage error names it)."""
    BUDGET.clear()
    if args.budget is not None:
        if not 0 < args.budget < float("inf"):
            raise SystemExit(f"bench.gpu: --budget must be a number of seconds > 0, got {args.budget}")
        BUDGET["seconds"] = args.budget
    return True


def results_name(device: str) -> str:
    """gpu (bench/results/gpu.json, .png) on CUDA; gpu-cpu with --device-cpu (it wrote its CPU figures
    over the committed GPU results)."""
    return NAME if device == "cuda" else f"{NAME}-{device}"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    device = "cuda"
    if "--device-cpu" in argv:  # developers only: the whole bench on CPU, without the captures (gpu-cpu.json)
        argv.remove("--device-cpu")
        device = "cpu"
    asks_help = any(a in ("-h", "--help") for a in argv)
    if device == "cuda" and "--replot" not in argv and not asks_help and not torch.cuda.is_available():
        print(NO_CUDA.format(v=torch.__version__), file=sys.stderr)
        raise SystemExit(1)
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)  # (`timeout`: the results still written)
    try:
        bench_main(argv, __doc__, results_name(device), lambda quick: measured(run(quick, device)), plot,
                   prog=f"python -m bench.{NAME}", arguments=budget_option,
                   configure=read_budget)  # fmt: skip
    finally:
        signal.signal(signal.SIGTERM, previous)
    if ERRORS:
        raise SystemExit(f"bench.gpu: {len(ERRORS)} section(s) failed (in the JSON): {'; '.join(ERRORS)}")


if __name__ == "__main__":
    main()
