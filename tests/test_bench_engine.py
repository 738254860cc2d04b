"""The benchmarks that drive the engine without HTTP (bench.server's engine rate, bench.gpu's time to first
token under load, run here on CPU) register their sessions as the server does (`Engine.new_session`): a
job whose session is not in the engine's table is dropped as deleted (b08176f), which made both fail at
once (bench.server: "all 1 session slots are in use" on its second burst; bench.gpu: its load sessions
made no token). Each runs twice on a small model, every slot back in the pool after, and a dropped job's
session frees its slot when its job ends."""

import asyncio

import pytest
import torch

from bench import gpu, server
from model import ModelConfig, SequenceModel
from model.sampling import SamplingParams
from server.config import Settings
from server.engine import Engine, Job, Stream
from server.errors import APIError
from server.metrics import Metrics
from server.sessions import SessionTable


@pytest.fixture(scope="module")
def rec():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, d_state=8, l_max=64, kernel="s4d")
    return SequenceModel(cfg).to_recurrent()


def test_bench_server_engine_rate_serves_every_session_of_both_bursts(rec):
    sz = {"prompt": 8, "tokens": 5}
    for n, lp in ((1, 0), (3, 0), (3, 1)):  # (lp: rows asking for log-probabilities, bench.decode's case)
        out = server.engine_rate(rec, n, sz, logprobs_rows=lp)
        assert out["tokens_per_s"] == pytest.approx(n * 5 / out["wall_s"])
        assert out["wall_s"] > 0 and 0 < out["ttft_p50_ms"] <= out["ttft_p99_ms"] < 1e3 * out["wall_s"]


def test_a_failed_engine_rate_stops_its_engine(rec, monkeypatch):
    """A burst that fails on the consumer's side (here each stream's read raises) ended engine_rate with the
    exception and left its engine thread serving (R15's note): a thread more for each failed call in a
    process. It is stopped now whatever ends the run."""
    import threading  # noqa: PLC0415

    def engines() -> list:
        return [t for t in threading.enumerate() if t.name == "engine-bench" and t.is_alive()]

    async def broken_get(self):
        raise RuntimeError("a consumer that fails")

    before = len(engines())
    monkeypatch.setattr(Stream, "get", broken_get)
    with pytest.raises(RuntimeError, match="a consumer that fails"):
        server.engine_rate(rec, 2, {"prompt": 8, "tokens": 5})
    assert len(engines()) == before


@pytest.mark.parametrize("load", [0, 2])
def test_bench_gpu_ttft_under_load_runs_on_cpu(rec, load):
    out = gpu.ttft_under_load(rec, load, {"prompt": 12, "trials": 3}, graphs=False)
    assert len(out["ttft_ms"]) == 3 and all(t > 0 for t in out["ttft_ms"])
    assert (out["load_tokens_per_s"] > 0) == (load > 0)


def test_bench_gpu_ttft_rows_say_whether_the_graphs_were_captured(rec, monkeypatch, tmp_path):
    """bench.gpu ignored use_cuda_graphs' answer (False: the capture failed, the model runs eager), so a
    TTFT row could say "graphs": true of an eager run. A failed capture is now a skip note, not a row."""
    import server.registry

    sz = {"prompt": 12, "trials": 2, "loads": [0]}
    assert gpu.ttft_under_load(rec, 0, sz, graphs=True) == {"graphs_captured": False}  # (CPU: refused)
    monkeypatch.setattr(server.registry, "use_cuda_graphs", lambda rec, settings, name: True)
    out = gpu.ttft_under_load(rec, 0, sz, graphs=True)
    assert out["graphs_captured"] is True and len(out["ttft_ms"]) == 2
    assert gpu.ttft_under_load(rec, 0, sz, graphs=False)["graphs_captured"] is False

    monkeypatch.setattr(server.registry, "use_cuda_graphs", lambda rec, settings, name: False)
    monkeypatch.setattr(gpu, "modes", lambda device: [False, True])  # as on CUDA
    monkeypatch.setattr(gpu, "load_rec", lambda kind, device, dtype, tmp: (rec, "tiny"))
    out = gpu.bench_ttft(sz, "cpu", gpu.Budget(600), tmp_path)
    assert [(r["graphs"], r["graphs_captured"]) for r in out["rows"]] == [(False, False)]
    assert out["skipped"] == ["graphs=True load 0: the CUDA graphs' capture failed (eager)"]


def test_new_session_registers_a_busy_session_and_refuses_by_429_when_full(rec):
    settings = Settings(max_sessions=2, max_batch_size=2, max_queued_requests=4)
    table = SessionTable()
    engine = Engine("m", rec, settings, table, Metrics().for_model("m"))
    a = engine.new_session("a", ephemeral=True)
    b = engine.new_session("b", ephemeral=False)
    assert table.holds(a) and table.holds(b) and a.busy and b.busy and a.model == "m"
    assert {a.slot, b.slot} == {0, 1} and a.ephemeral and not b.ephemeral
    with pytest.raises(APIError) as exc:
        engine.new_session("c", ephemeral=True)
    assert exc.value.status == 429 and table.store.get("c") is None


def test_a_one_shot_job_frees_its_slot_when_it_ends(rec):
    settings = Settings(max_sessions=1, max_batch_size=1, max_queued_requests=2)
    engine = Engine("m", rec, settings, SessionTable(), Metrics().for_model("m"))
    engine.start()

    async def one(k: int) -> list:
        stream = Stream(asyncio.get_running_loop(), 64)
        engine.submit(Job(engine.new_session(f"s{k}", ephemeral=True), [1, 2, 3], fresh=True, stream=stream,
                          params=SamplingParams(seed=k), max_new_tokens=4))  # fmt: skip
        got = []
        while True:
            items = await stream.get()
            got += items
            if not isinstance(items[-1], int):
                return got

    try:
        for k in range(3):  # one slot: each request needs the previous one's back
            got = asyncio.run(one(k))
            assert sum(isinstance(x, int) for x in got) == 4
    finally:
        engine.stop()
