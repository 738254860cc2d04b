"""`RecurrentModel.compile_step` and `S4_COMPILE_STEP`, the CPU side: which step runs, and when the
setting applies. The compiled step itself, on CUDA through the graphs, is tests/test_cuda.py's."""

from __future__ import annotations

import logging

import torch

from model import ModelConfig, SequenceModel
from server.config import Settings
from server.registry import compile_step


def torch_path_rec():
    torch.manual_seed(0)
    net = SequenceModel(ModelConfig(vocab_size=64, d_model=16, n_layers=2, d_state=8, l_max=64,
                                    cauchy_backend="torch"))  # fmt: skip
    return net.to_recurrent(fused_step=False, fused_network=False)  # the torch step, as on a GPU


def test_compile_step_wraps_the_torch_step_with_a_dynamic_batch_and_can_be_undone(monkeypatch):
    rec = torch_path_rec()
    seen = []

    def fake_compile(fn, **kw):  # records what would be compiled; runs it plainly (no Inductor here)
        seen.append((fn, kw))

        def run(*a):
            seen.append("called")
            return fn(*a)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    tok, state = torch.tensor([1, 2, 3]), rec.init_state(3)
    want = rec.step(tok, state)
    rec.compile_step(True)
    assert seen[0][0] == rec._step_torch and seen[0][1] == {"dynamic": True}
    got = rec.step(tok, state)
    assert seen[-1] == "called"
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    rec.compile_step(False)
    n = len(seen)
    rec.step(tok, state)
    assert len(seen) == n  # the plain step again


def test_compile_step_makes_the_bucketed_step_again_so_its_buffers_run_the_compiled_step(monkeypatch):
    """Called after the graphs were made, compile_step makes them again (a captured graph would replay
    the step it captured, not the compiled one); here without capture, on the CPU."""
    from model.cuda_graphs import BucketedStep

    rec = torch_path_rec()
    calls = []
    monkeypatch.setattr(
        torch, "compile", lambda fn, **kw: lambda *a: (calls.append(a[0].shape[0]), fn(*a))[1]
    )
    rec._graphs = first = BucketedStep(rec, (1, 2, 4), capture=False)
    first.warm()
    rec.compile_step(True)
    assert rec._graphs is not first and rec._graphs.buckets == (1, 2, 4) and not rec._graphs.capture
    assert sorted(rec._graphs.buffers) == [1, 2, 4]  # made (warmed) at once
    calls.clear()
    rec.step(torch.tensor([1, 2, 3]), rec.init_state(3))
    assert calls == [4]  # bucket 4's step, through the compiled function


def test_the_setting_is_ignored_on_cpu_with_a_log_line(caplog, monkeypatch):
    rec = torch_path_rec()
    monkeypatch.setattr(torch, "compile", lambda *a, **k: (_ for _ in ()).throw(AssertionError("compiled")))
    with caplog.at_level(logging.INFO, logger="server.models"):
        assert compile_step(rec, Settings(compile_step=True), "m") is False
        assert compile_step(rec, Settings(), "m") is False
    assert rec._compiled_step is None
    lines = [r.getMessage() for r in caplog.records if "S4_COMPILE_STEP" in r.getMessage()]
    assert lines == ["model m: S4_COMPILE_STEP ignored (not on a CUDA device)"]
