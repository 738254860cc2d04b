"""The GPU path on a CUDA device: the decode step's CUDA graphs (model/cuda_graphs.py), bfloat16 weights
with float32 states, and the server generating on CUDA with the graphs captured.

Every test here is marked `cuda` and skipped where torch sees no CUDA device (the repo's convention, as
tests/test_recurrent.py::test_cuda_recurrent_matches_cpu). `scripts/gpu-check` runs them (`pytest -m cuda`).
The CPU side of the same code (buckets, padding, buffers, the setting) is tests/test_cuda_graphs.py.

Tolerances. A replay runs the kernels that were captured, on the same shapes: against the eager step of
the same padded batch it must agree to 1e-6 relative (expected: bit for bit). Against the eager step of
the unpadded batch, matmuls at another batch size may round differently: float32 within 1e-5.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import httpx
import pytest
import torch

from model import ModelConfig, SequenceModel, load, save
from model.cuda_graphs import BLOCK_STEPS, PLAIN, bucket_sizes
from model.recurrent import LOGITS_TOL

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=256, d_model=32, n_layers=2, d_state=16, l_max=256, cauchy_backend="torch")
SAME = dict(rtol=1e-6, atol=1e-6)  # graph replay vs eager, same shapes
F32 = dict(rtol=1e-5, atol=1e-5)  # another batch size


def tiny_net(kernel: str = "s4") -> SequenceModel:
    torch.manual_seed(0)
    return SequenceModel(ModelConfig(**TINY, kernel=kernel))


@pytest.fixture(scope="module", params=["s4", "s4d"])
def rec(request):
    r = tiny_net(request.param).to_recurrent(device="cuda")
    r.use_cuda_graphs(bucket_sizes(64))
    yield r
    r.use_cuda_graphs(None)


def reached_state(rec, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 256, (n, 16), generator=g).cuda()
    _, state = rec.prefill(prompt, rec.init_state(n))
    return torch.randint(0, 256, (n,), generator=g).cuda(), state


# A greedy token from one path may be another than the other path's argmax only where two logits nearly
# tie: the graphs step the batch at a bucket's shape (other matmul kernels than the eager batch), and a
# float16 state rounds such a difference to its 2⁻¹¹ (top-two margins of 5e-4 occur in 40 text-shakespeare
# tokens; the smooth logits of mu-law audio put neighbouring values closer still).
NEAR_TIE = {torch.float32: 1e-4, torch.float16: 1e-2}  # of the logits' spread (max − min)


def near_argmax(logits: torch.Tensor, tokens: torch.Tensor, dtype: torch.dtype = torch.float32) -> int:
    """Assert each row's token is the argmax of its `logits` (B, V) or within NEAR_TIE[dtype] of the row's
    maximum (relative to the row's spread); returns how many rows are the argmax. A greedy run compared
    step by step with another feeds both the same token (teacher-forced), so one near-tie cannot fork the
    runs, and a wrong token still fails here: one past NEAR_TIE."""
    z, tokens = logits.double(), tokens.reshape(-1, 1).to(logits.device)
    top = z.amax(-1)
    gap = (top - z.gather(-1, tokens)[:, 0]) / (top - z.amin(-1))
    bad = (gap > NEAR_TIE[dtype]).nonzero()
    assert bad.numel() == 0, [(int(r), int(tokens[r]), int(z[r].argmax()), float(gap[r])) for r in bad[:, 0]]
    return int((z.argmax(-1) == tokens[:, 0]).sum())


def at_scale(b: torch.Tensor) -> dict:
    """F32's tolerance for another evaluation of the same float32 arithmetic (another order of a sum, FMA
    contraction): rtol 1e-5, and atol 1e-5 of the largest |value| of the reference `b` rather than an
    absolute 1e-5. A state entry near 0 is the difference of products near the largest values (50-100
    in audio-digits-s4), and the compiled Triton kernel contracts p·x₁ − m·x₂ + b·u into FMAs where the
    torch step rounds each product: emulated in float64 on that model, FMA against the torch step is 4-10×
    an element-wise 1e-5 + 1e-5·|value| at the first step, and 0.15-0.45 of this (rows 1, 64, 200)."""
    return dict(rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def greedy_steps_agree(rec, plain, tok, state, steps: int = 8, in_place: bool = False) -> None:
    """`steps` greedy steps of rec and plain from (tok, state): logits and states within float32 of each
    other at every step (`at_scale`); rec's greedy tokens, fed to both, are plain's argmax or a near-tie
    (`near_argmax`). rec steps in place (out=state) when `in_place`."""
    s_a, s_b = state.clone(), state.clone()
    t = tok.clone()
    for _ in range(steps):
        la, s_a = rec.step(t, s_a, out=s_a if in_place else None)
        lb, s_b = plain.step(t, s_b)
        torch.testing.assert_close(la, lb, **at_scale(lb))
        torch.testing.assert_close(s_a, s_b, **at_scale(s_b))
        t = la.argmax(-1)
        near_argmax(lb, t)


def padded(tok, state, b):
    n = tok.shape[0]
    big = torch.zeros(state.shape[0], b, *state.shape[2:], device=state.device)
    big[:, :n] = state
    return torch.cat([tok, tok.new_zeros(b - n)]), big


def test_the_graphs_are_captured_for_every_bucket(rec):
    """At `use_cuda_graphs`: each bucket's step graph, and its decode-block graphs of every size for plain
    sampling (BLOCK_STEPS, sharing one memory pool)."""
    assert rec._graphs is not None and rec._graphs.capture
    assert sorted(rec._graphs.buffers) == list(bucket_sizes(64))
    assert all(buf.graph is not None for buf in rec._graphs.buffers.values())
    assert sorted(rec._graphs.blocks) == list(bucket_sizes(64))
    for bb in rec._graphs.blocks.values():
        assert sorted(bb.graphs) == [(k, PLAIN) for k in BLOCK_STEPS] and bb.pool is not None


@pytest.mark.parametrize("n", [1, 3, 8, 33, 64])
def test_graph_step_equals_the_eager_step(rec, n):
    tok, state = reached_state(rec, n)
    b = rec._graphs.buckets[[bb >= n for bb in rec._graphs.buckets].index(True)]
    calls = rec._graphs.buffers[b].calls
    logits, new = rec.step(tok, state)
    assert rec._graphs.buffers[b].calls == calls + 1  # it did replay bucket b's graph
    assert logits.dtype == new.dtype == torch.float32 and new.shape == state.shape
    eager_logits, eager_state = rec._step_eager(*padded(tok, state, b), None)
    torch.testing.assert_close(logits, eager_logits[:n], **SAME)
    torch.testing.assert_close(new, eager_state[:, :n], **SAME)
    alone_logits, alone_state = rec._step_eager(tok, state, None)
    torch.testing.assert_close(logits, alone_logits, **F32)
    torch.testing.assert_close(new, alone_state, **F32)


def test_greedy_decoding_through_the_graphs_gives_the_eager_tokens(rec):
    """32 greedy steps of 5 rows (bucket 8), in place as the engine steps, then the eager step of the 5 rows
    teacher-forced on the graphs' tokens: each is the eager argmax or a near-tie (`near_argmax`), and
    95 % are the argmax."""
    tok, state = reached_state(rec, 5, seed=3)
    t, s, served = tok.clone(), state.clone(), []
    for _ in range(32):
        logits, _ = rec.step(t, s, out=s)
        t = logits.argmax(-1)
        served.append(t)
    t, s, exact = tok.clone(), state.clone(), 0
    for want in served:
        logits, _ = rec._step_eager(t, s, s)
        exact += near_argmax(logits, want)
        t = want
    assert exact >= 0.95 * 5 * 32, exact


def test_padded_rows_of_a_graph_cannot_change_real_rows(rec):
    """Replay bucket 8's graph with 3 real rows beside zero rows, then beside garbage (huge, NaN, inf):
    the real rows' logits and states come out bit for bit the same."""
    tok, state = reached_state(rec, 3, seed=1)
    buf = rec._graphs.bucket(8)
    results = []
    for junk in ("zero", "huge", "nan"):
        with torch.inference_mode():  # the static buffers are inference tensors
            buf.tok[:3] = tok
            buf.state[:, :3] = state
            buf.tok[3:] = 0 if junk == "zero" else 255
            if junk == "zero":
                buf.state[:, 3:] = 0
            elif junk == "huge":
                buf.state[:, 3:] = 1e30 * torch.randn_like(buf.state[:, 3:])
            else:
                buf.state[:, 3:5], buf.state[:, 5:] = float("nan"), float("inf")
            buf.graph.replay()
            results.append((buf.logits[:3].clone(), buf.state[:, :3].clone()))
    for logits, st in results[1:]:
        assert torch.equal(logits, results[0][0]) and torch.equal(st, results[0][1])
    assert torch.isfinite(results[0][0]).all()


def test_buffers_are_static_and_a_batch_past_the_largest_bucket_runs_eager(rec):
    buf = rec._graphs.bucket(4)
    ptrs = buf.tok.data_ptr(), buf.state.data_ptr(), buf.logits.data_ptr()
    for n in (3, 4, 3):
        tok, state = reached_state(rec, n)
        rec.step(tok, state)
    assert (buf.tok.data_ptr(), buf.state.data_ptr(), buf.logits.data_ptr()) == ptrs
    eager = rec._graphs.eager_calls
    tok, state = reached_state(rec, 65)  # buckets end at 64
    logits, new = rec.step(tok, state)
    assert rec._graphs.eager_calls == eager + 1
    want_logits, want_state = rec._step_eager(tok, state, None)
    assert torch.equal(logits, want_logits) and torch.equal(new, want_state)


def test_a_resident_batch_replays_its_graph_in_place_without_copies(rec):
    """The engine's way (`resident_state`, then step(view, out=view)): 8 steps of 5 rows (bucket 8) replay
    the graph on the bucket's buffer with no copy in or out, within float32 of the eager step of the
    unpadded batch (which, the bucket being resident, is what a second caller's batch of 5 runs)."""
    graphs = rec._graphs
    tok, state = reached_state(rec, 5)
    ref = state.clone()
    try:
        view = rec.resident_state(state)
        assert view.data_ptr() == graphs.buffers[8].state.data_ptr()
        copied, replays = graphs.copied_calls, graphs.buffers[8].calls
        for _ in range(8):
            la, same = rec.step(tok, view, out=view)
            lb, ref = rec.step(tok, ref)
            assert same is view
            torch.testing.assert_close(la, lb, **F32)
            torch.testing.assert_close(view, ref, **F32)
            tok = la.argmax(-1)  # fed to both (`near_argmax`)
            near_argmax(lb, tok)
        assert graphs.copied_calls == copied and graphs.buffers[8].calls == replays + 8
    finally:
        graphs.release()


def test_bfloat16_weights_through_the_graphs_stay_within_the_dtype_tolerance():
    """S4_DTYPE=bfloat16 on CUDA: weights bfloat16, states float32, the graph-stepped logits of 2
    sequences × 64 tokens within LOGITS_TOL[bfloat16] (4u, 1.6e-2) of float64 conv mode."""
    net = tiny_net("s4")
    rec = net.to_recurrent(device="cuda", dtype=torch.bfloat16)
    assert {p.dtype for p in rec.net.parameters()} == {torch.bfloat16}
    rec.use_cuda_graphs(bucket_sizes(4), blocks=False)
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = copy.deepcopy(net).double()(tokens)  # (2, 64, V) float64 conv mode
    state, stepped = rec.init_state(2), []
    for t in range(64):
        logits, state = rec.step(tokens[:, t].cuda(), state, out=state)
        assert state.dtype == torch.float32 and logits.dtype == torch.float32
        stepped.append(logits)
    assert rec._graphs.buffers[2].calls == 64
    got = torch.stack(stepped, 1).double().cpu()
    err = float((got - ref).norm() / ref.norm())
    assert err <= LOGITS_TOL[torch.bfloat16], err
    assert rec.verification["dtype"] == "bfloat16"
    assert rec.verification["step_rel_err"] <= LOGITS_TOL[torch.bfloat16]


def test_a_bfloat16_sashimi_through_its_graphs_stays_within_the_dtype_tolerance():
    """A SaShiMi served in bfloat16 on CUDA (its torch ops in bfloat16, states float32; no CUDA test ran a
    16-bit SaShiMi before): verified at load, and its dense step through the graphs, 3 rows at different
    pooling phases (prompts of 5, 10 and 19 tokens) for 40 steps, within LOGITS_TOL[bfloat16] (4u,
    1.6e-2) of float64 conv mode of each row's sequence; `check_graphs` within it too."""
    from model import build

    torch.manual_seed(6)
    cfg = dict(arch="sashimi", vocab_size=256, d_model=32, n_layers=1, d_state=16, l_max=256,
               cauchy_backend="torch")  # fmt: skip
    net = build(ModelConfig(**cfg)).eval()
    rec = net.to_recurrent(device="cuda", dtype=torch.bfloat16)
    assert rec.verification["dtype"] == "bfloat16"
    assert rec.verification["step_rel_err"] <= LOGITS_TOL[torch.bfloat16]
    rec.use_cuda_graphs(bucket_sizes(4), blocks=False)
    try:
        assert max(rec.graphs_check.values()) <= LOGITS_TOL[torch.bfloat16], rec.graphs_check
        g = torch.Generator().manual_seed(6)
        prompts = [torch.randint(0, 256, (1, n), generator=g) for n in (5, 10, 19)]
        state = torch.cat([rec.prefill(p.cuda(), rec.init_state(1))[1] for p in prompts])
        tokens = torch.randint(0, 256, (3, 40), generator=g)
        stepped = []
        for t in range(40):
            logits, state = rec.step(tokens[:, t].cuda(), state, out=state)
            stepped.append(logits)
        assert rec._graphs.buffers[4].calls >= 40
        got = torch.stack(stepped, 1).double().cpu()
        with torch.no_grad():
            net64 = copy.deepcopy(net).double()
            for i, p in enumerate(prompts):
                ref = net64(torch.cat([p, tokens[i : i + 1]], 1))[:, p.shape[1] :]
                err = float((got[i : i + 1] - ref).norm() / ref.norm())
                assert err <= LOGITS_TOL[torch.bfloat16], (i, err)
    finally:
        rec.use_cuda_graphs(None)


@pytest.fixture(scope="module")
def cuda_server(tmp_path_factory):
    from server_support import ServerThread, make_text_model

    from server import Settings

    d = tmp_path_factory.mktemp("cuda") / "tiny-text"
    save(make_text_model(), d)
    settings = Settings(checkpoints=[str(d)], device="cuda", cuda_graphs=True, max_sessions=16,
                        max_batch_size=8, drain_timeout_s=1)  # fmt: skip
    s = ServerThread(settings).start()
    yield s
    s.stop()


def served_greedy_agrees(rec, prompt: list[int], served: list[int]) -> int:
    """A served greedy generation against the library alone on the same device, without the graphs, in the
    server's order: the prompt but its last token prefilled (float32), the state stored in the model's
    `state_dtype` as the row joins the decode batch (float16: rounded), the last token the first step,
    each next state stored so; stepped on the served tokens. Each served token is the eager argmax or
    within NEAR_TIE of the eager maximum; returns how many are the argmax."""
    _, state = rec.prefill(torch.tensor([prompt[:-1]], device="cuda"), rec.init_state(1))
    state, tok, exact = state.to(rec.state_dtype), torch.tensor(prompt[-1:], device="cuda"), 0
    for want in served:
        logits, state = rec._step_eager(tok, state, None)
        assert state.dtype == rec.state_dtype
        tok = torch.tensor([want], device="cuda")
        exact += near_argmax(logits, tok, rec.state_dtype)
    return exact


def test_the_server_generates_on_cuda_through_the_graphs(cuda_server):
    """End to end on CUDA: the model is served with its graphs captured (buckets 1..8); 6 concurrent
    greedy generations (one batch, decoded in block graphs: K steps with their sampling) each give the
    tokens of the eager library step (`served_greedy_agrees`: another only at a near-tie, 95 % the same),
    and a seeded sampled request repeats itself."""
    import concurrent.futures

    served = cuda_server.state.models["tiny-text"]
    rec = served.rec
    assert rec.device.type == "cuda" and rec._graphs is not None
    assert sorted(rec._graphs.buffers) == [1, 2, 4, 8]
    prompts = ["to be, or", "whether", "the slings", "a sea of", "nobler in", "outrageous"]
    with httpx.Client(base_url=cuda_server.url, timeout=120) as c:

        def gen(p: str) -> list[int]:
            r = c.post("/v1/generate", json={"model": "tiny-text", "prompt": p, "max_new_tokens": 40,
                                             "temperature": 0})  # fmt: skip
            assert r.status_code == 200, r.text
            return r.json()["tokens"]

        def blocks() -> int:  # decode blocks run through the block graphs (the engine's way with graphs)
            return sum(bb.calls for bb in rec._graphs.blocks.values())

        before = blocks()
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(gen, prompts))
        assert blocks() > before  # decoded by replays of the block graphs
        exact = [served_greedy_agrees(rec, list(p.encode()), tokens) for p, tokens in zip(prompts, got)]
        assert all(len(t) == 40 for t in got) and sum(exact) >= 0.95 * 40 * len(prompts), exact
        req = {"model": "tiny-text", "prompt": "to be", "max_new_tokens": 32, "seed": 11, "temperature": 0.9}
        first = c.post("/v1/generate", json=req).json()["tokens"]
        assert len(first) == 32 and c.post("/v1/generate", json=req).json()["tokens"] == first
        # staggered: while a long generation decodes, short ones finish and others join their holes (the
        # resident rows, written outside inference mode), with OpenAI's penalties (counts on the device)
        pen = [{"model": "tiny-text", "prompt": "nymph", "max_tokens": 24, "seed": 30 + k, "temperature": 1.0,
                "presence_penalty": 0.5, "frequency_penalty": 0.3} for k in range(4)]  # fmt: skip

        def post(r) -> str:
            resp = c.post("/v1/completions", json=r)
            assert resp.status_code == 200, resp.text
            return resp.json()["choices"][0]["text"]

        before = blocks()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            long = pool.submit(lambda: c.post("/v1/generate", json={**req, "max_new_tokens": 400}).json())
            waves = [list(pool.map(post, pen[:2])), list(pool.map(post, pen[2:]))]
            assert len(long.result()["tokens"]) == 400
        # (not compared with the requests alone: batch 1 and batch 2-4 may round a logit apart, cuBLAS and
        # the scans choosing their kernels by shape, and one flipped draw changes the rest)
        assert all(waves[0] + waves[1]) and blocks() > before


@pytest.fixture(scope="module")
def cuda_server16():
    """The shipped text-shakespeare served on CUDA as a user would ask for the float16 state:
    S4_STATE_DTYPE=float16, graphs captured (buckets 1..8), the Triton step."""
    from server_support import ServerThread

    from server import Settings

    settings = Settings(checkpoints=[str(ROOT / "checkpoints/text-shakespeare")], device="cuda",
                        cuda_graphs=True, state_dtype="float16", max_sessions=16, max_batch_size=8,
                        drain_timeout_s=1)  # fmt: skip
    s = ServerThread(settings).start()
    yield s
    s.stop()


def test_a_server_with_float16_states_decodes_as_the_library_and_restores_its_sessions(cuda_server16):
    """End to end on CUDA with S4_STATE_DTYPE=float16: the setting applied (proven bound, check passed,
    float16 graph buffers, the Triton step reading 16 bits); /v1/models reports it; 6 concurrent greedy
    generations, decoded in block graphs, give the tokens of the library's eager step of a float16 state
    in the server's order (`served_greedy_agrees`: another only at a near-tie, 95 % the same; prefilling the
    whole prompt instead diverged at a 0.002-logit near-tie in a dry run on CPU, the state rounded at another
    point); a session decoded
    in float16 continues identically after export and import (its state within `state_limit`) and after a
    fork."""
    import concurrent.futures

    from model.recurrent import FLOAT16_MAX, STATE16_TOL

    rec = cuda_server16.state.models["text-shakespeare"].rec
    assert rec.state_dtype == torch.float16 and rec.state16_native and rec._graphs is not None
    assert rec._graphs.buffers[8].state.dtype == torch.float16

    prompts = ["ROMEO:\n", "To be, or", "KING HENRY", "What light", "Now is the", "O, what a"]
    with httpx.Client(base_url=cuda_server16.url, timeout=120) as c:
        info = c.get("/v1/models").json()["data"][0]
        check = info["verification"]["state_dtype_check"]
        assert info["state_dtype"] == "float16" and check["tv_mean"] <= STATE16_TOL
        assert check["bound_over"] == 0 and check["state_max_abs"] < check["state_bound_max"] < FLOAT16_MAX

        def gen(p: str) -> list[int]:
            r = c.post("/v1/generate", json={"model": "text-shakespeare", "prompt": p, "max_new_tokens": 40,
                                             "temperature": 0})  # fmt: skip
            assert r.status_code == 200, r.text
            return r.json()["tokens"]

        before = sum(bb.calls for bb in rec._graphs.blocks.values())
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(gen, prompts))
        assert sum(bb.calls for bb in rec._graphs.blocks.values()) > before
        exact = [served_greedy_agrees(rec, list(p.encode()), tokens) for p, tokens in zip(prompts, got)]
        assert all(len(t) == 40 for t in got) and sum(exact) >= 0.95 * 40 * len(prompts), exact

        def turn(sid: str, seed: int) -> list[int]:
            req = {"model": "text-shakespeare", "session_id": sid, "max_new_tokens": 24, "seed": seed,
                   "temperature": 1.0}  # fmt: skip
            r = c.post("/v1/generate", json=req)
            assert r.status_code == 200, r.text
            return r.json()["tokens"]

        sid = c.post("/v1/sessions", json={"model": "text-shakespeare", "prompt": "JULIET:\n"}).json()
        sid = sid["session_id"]
        turn(sid, 1)
        blob = c.get(f"/v1/sessions/{sid}/export").content
        r = c.post("/v1/sessions/import", content=blob)
        assert r.status_code == 201, r.text
        fork = c.post(f"/v1/sessions/{sid}/fork").json()["session_id"]
        after = [turn(x, 2) for x in (sid, r.json()["session_id"], fork)]
        assert after[0] == after[1] == after[2] and len(after[0]) == 24


AUDIO = Path(__file__).resolve().parents[1] / "checkpoints"


@pytest.mark.parametrize("name", ["s4d", "audio-digits-s4"])
def test_the_triton_step_matches_the_torch_step_eager_and_through_the_graphs(name):
    """The Triton step (model/triton_step.py, the CUDA default) against the plain torch step: 8 steps at
    batch 1, 5, 64 (buckets) and 200 (past them: eager), graphs off then on; float32 within 1e-5 (FMA and
    the sum's order differ), greedy tokens equal. audio-digits-s4: the shipped model (4 diagonal layers,
    H = 128, 32 slots)."""
    net = tiny_net("s4d") if name == "s4d" else load(AUDIO / name)
    plain = net.to_recurrent(device="cuda", triton_step=False)
    rec = net.to_recurrent(device="cuda", triton_step=True)
    assert rec._triton and not plain._triton
    try:
        for buckets in (None, bucket_sizes(64)):
            rec.use_cuda_graphs(buckets, blocks=False)
            for n in (1, 5, 64, 200):
                greedy_steps_agree(rec, plain, *reached_state(plain, n), in_place=True)
    finally:
        rec.use_cuda_graphs(None)


@functools.cache
def shipped_sashimi(triton: bool):
    """The shipped SaShiMi (audio-digits) converted on CUDA once per Triton setting, for the tests below
    (each turns its graphs off when done)."""
    return load(AUDIO / "audio-digits").to_recurrent(device="cuda", triton_step=triton)


def test_sashimi_on_cuda_steps_with_the_triton_kernel_as_with_torch_ops():
    """The shipped SaShiMi (audio-digits) on CUDA: the Triton step (its top level's layers in place) against
    the torch step, 3 rows at different pooling phases over 64 steps. The difference grows through its
    levels' blocks and over the steps, so the test is on the whole: relative error (Frobenius norm) of
    the logits and of the final state ≤ 1e-5. The same test on CPU with Triton's interpreter (the
    same arithmetic, another order of the sum; no FMA): 4.4e-7 and 1.0e-7 (2026-12-04)."""
    rec, plain = shipped_sashimi(True), shipped_sashimi(False)
    g = torch.Generator().manual_seed(0)
    states = [plain.prefill(torch.randint(0, 256, (1, k), generator=g).cuda(), plain.init_state(1))[1]
              for k in (5, 11)]  # fmt: skip
    state = torch.cat([states[0], plain.init_state(1), states[1]])
    tokens = torch.randint(0, 256, (3, 64), generator=g).cuda()
    s_a, s_b, la, lb = state.clone(), state.clone(), [], []
    for t in range(tokens.shape[1]):
        a, s_a = rec.step(tokens[:, t], s_a)
        b, s_b = plain.step(tokens[:, t], s_b)
        la.append(a)
        lb.append(b)
    la, lb = torch.stack(la), torch.stack(lb)
    rel_logits = float((la - lb).norm() / lb.norm())
    rel_state = float((s_a - s_b).norm() / s_b.norm())
    assert rel_logits <= 1e-5 and rel_state <= 1e-5, (rel_logits, rel_state)


@pytest.mark.parametrize("triton", [True, False])
def test_sashimi_steps_through_the_graphs_of_its_dense_step(triton):
    """The shipped SaShiMi (audio-digits) through its CUDA graphs (the dense step: every level of every
    row, the updates of rows that do not step there masked out; captured per bucket) against its sparse
    eager step (each level steps only its rows), rows at every pooling phase, batches 1, 5 and 64
    (buckets; 5 padded to 8) and 200 (past them: eager), 40 steps (2.5 pooling periods), copied in and out
    and resident: relative error (Frobenius norm) of the logits and the final state ≤ 1e-5 (other GEMM
    sizes at the coarse levels; on CPU, torch ops, ≤ 3e-6 on tiny SaShiMis, `test_sashimi.py`), the
    phases equal."""
    rec = shipped_sashimi(triton)
    rec.use_cuda_graphs(bucket_sizes(64), blocks=False)
    assert max(rec.graphs_check.values()) <= 1e-5, rec.graphs_check  # (use_cuda_graphs' own check)
    g = torch.Generator().manual_seed(0)
    try:
        for n in (1, 5, 64, 200):
            lengths = [3 + k % 16 for k in range(n)]  # every pooling phase; prefilled by length
            state = torch.cat([rec.prefill(torch.randint(0, 256, (lengths.count(L), L), generator=g).cuda(),
                                           rec.init_state(lengths.count(L)))[1]
                               for L in sorted(set(lengths))])  # fmt: skip
            tokens = torch.randint(0, 256, (n, 40), generator=g).cuda()
            for resident in (False, True):
                s_a = rec.resident_state(state.clone()) if resident else state.clone()
                s_b, la, lb = state.clone(), [], []
                for t in range(tokens.shape[1]):  # graphs, and the sparse eager step (`_step_eager`)
                    la.append(rec.step(tokens[:, t], s_a, out=s_a)[0])
                    lb.append(rec._step_eager(tokens[:, t], s_b, out=s_b)[0])
                la, lb = torch.stack(la), torch.stack(lb)
                rel_logits = float((la - lb).norm() / lb.norm())
                rel_state = float((s_a - s_b).norm() / s_b.norm())
                assert rel_logits <= 1e-5 and rel_state <= 1e-5, (n, resident, rel_logits, rel_state)
                assert torch.equal(rec.phases(s_a), rec.phases(s_b))
                rec._graphs.release()
        assert all(buf.graph is not None for buf in rec._graphs.buffers.values())
        assert rec._graphs.eager_calls > 0  # (batch 200)
    finally:
        rec.use_cuda_graphs(None)


@pytest.mark.parametrize(
    ("name", "triton"), [("s4d", True), ("s4d", False), ("audio-digits-s4", True), ("audio-digits", True)]
)
def test_the_captured_decode_block_gives_the_one_step_paths_tokens_and_states(name, triton):
    """K steps with their sampling replayed as captured graphs (`BucketedStep.decode_block`) against the
    GPU engine's one-step path (`step` through the same buckets' graphs, `RowSampler`): 9 rows with every
    sampling setting (bucket 16) in blocks of 77 steps, 9 rows of plain temperature in blocks of 200 (the
    same bucket, other graphs in its shared pool), limits 0 … 90 (segments ending where a row reaches
    its limit: graphs of 1 … 64 steps back to back, rows kept there): the same tokens, states, seen sets
    and counts, bit for bit (the same kernels on the same shapes; the sampler's ops are row by row). A
    tiny S4D model with the Triton step and with the torch ops; the shipped audio-digits-s4 with the
    Triton step (the CUDA default); the shipped SaShiMi (audio-digits: its dense step, rows at different
    pooling phases) with the Triton step."""
    from test_graph_block import LIMITS, MIXED, STOPS, assert_blocks_are_the_one_step_path

    from model.sampling import SamplingParams

    plain = [SamplingParams(temperature=0.9, seed=200 + s) for s in range(9)]  # bucket 16, as MIXED

    if name == "audio-digits":
        rec = shipped_sashimi(triton)
    else:
        net = tiny_net("s4d") if name == "s4d" else load(AUDIO / name)
        rec = net.to_recurrent(device="cuda", triton_step=triton)
    rec.use_cuda_graphs(bucket_sizes(16))
    try:
        for params, K in ((MIXED, 77), (plain, 200)):  # two sampler settings' graphs in one bucket
            assert_blocks_are_the_one_step_path(rec, params, LIMITS[len(params)], K)
        assert_blocks_are_the_one_step_path(rec, STOPS, LIMITS[len(STOPS)], 64)  # rows with stop sequences
        flags = {f for k, f in rec._graphs.blocks[16].graphs}
        assert len(flags) == 2 and rec._graphs.eager_blocks == 0
    finally:
        rec.use_cuda_graphs(None)


@pytest.mark.parametrize("name", ["audio-digits-s4", "audio-digits"])
def test_a_float16_state_passes_its_check_and_the_captured_graphs_step_it_as_the_one_step_path(name):
    """S4_STATE_DTYPE=float16 on CUDA, the shipped audio models with the Triton step: `use_state_dtype`
    passes its check (within STATE16_TOL of the float32 step); the captured graphs' buffers are float16; a
    resident float16 batch replays as the same batch copied in and out of its bucket (bit for bit); the
    captured decode blocks give the one-step path's tokens, float16 states and seen sets bit for bit."""
    from test_graph_block import PLAIN as PLAIN_ROWS
    from test_graph_block import blocks, one_step, row, start

    from model.recurrent import STATE16_TOL

    if name == "audio-digits":
        rec = shipped_sashimi(True)
    else:
        rec = load(AUDIO / name).to_recurrent(device="cuda", triton_step=True)
    try:
        report = rec.use_state_dtype("float16", proven=name != "audio-digits")  # (SaShiMi: no bound)
        assert report["tv_mean"] <= STATE16_TOL and rec.state_dtype == torch.float16
        rec.use_cuda_graphs(bucket_sizes(16))
        assert rec._graphs.buffers[8].state.dtype == torch.float16
        state, tok, seen = start(rec, len(PLAIN_ROWS))
        state = state.half()
        copied = state.clone()  # copied in and out of bucket 8, then the same rows resident there
        want = [rec.step(tok, copied, out=copied)[0] for _ in range(6)]
        view = rec.resident_state(state.clone())
        for t in range(6):
            assert torch.equal(rec.step(tok, view, out=view)[0], want[t]), f"step {t}"
        assert torch.equal(view, copied) and view.dtype == torch.float16
        rec._graphs.release()
        limits = [90, 64, 0, 90, 77]
        ref = one_step(rec, state, tok, seen, PLAIN_ROWS, limits)
        toks, new_state, new_seen, _ = blocks(rec, state, tok, seen, PLAIN_ROWS, limits, 64)
        for r in range(len(PLAIN_ROWS)):
            assert toks[r] == ref[r][0] and torch.equal(row(rec, new_state, r), ref[r][1]), f"row {r}"
            assert torch.equal(new_seen[r], ref[r][2]), f"row {r}"
    finally:
        rec.use_cuda_graphs(None)
        rec.use_state_dtype("float32")


@pytest.mark.parametrize("name", ["s4d", "audio-digits"])
def test_the_captured_decode_block_reports_the_one_step_paths_log_probabilities(name):
    """Log-probabilities from the captured block graphs (their own graphs: log_softmax, topk, gather on the
    raw logits) against `token_logprobs` of the one-step path through the same buckets, bit for bit, with
    stop rows stepped again to their stop: tests/test_graph_block.py's check, captured; a tiny S4D model
    and the shipped SaShiMi."""
    from test_graph_block import assert_logprobs_are_the_one_step_paths

    rec = tiny_net("s4d").to_recurrent(device="cuda") if name == "s4d" else shipped_sashimi(True)
    rec.use_cuda_graphs(bucket_sizes(16), blocks=False)
    try:
        assert_logprobs_are_the_one_step_paths(rec)
        assert any(flags[5] for bb in rec._graphs.blocks.values() for _, flags in bb.graphs)
    finally:
        rec.use_cuda_graphs(None)


def test_a_failed_block_capture_is_logged_and_blocks_run_without_graphs(monkeypatch, caplog):
    """A block graph whose capture raises (here the sampler, made to fail while capturing) leaves the step's
    graphs captured, the current stream the default one, a warning naming why, and blocks that run their
    ops without graphs with the one-step path's tokens; the step's graphs still replay."""
    from test_graph_block import LIMITS, PLAIN, assert_blocks_are_the_one_step_path

    import model.cuda_graphs as cg

    real = cg.sample_with

    def fails_in_capture(*args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("planted: not capturable")
        return real(*args, **kwargs)

    monkeypatch.setattr(cg, "sample_with", fails_in_capture)
    rec = tiny_net("s4d").to_recurrent(device="cuda")
    with caplog.at_level("WARNING", logger="model.cuda_graphs"):
        rec.use_cuda_graphs(bucket_sizes(8))
    try:
        graphs = rec._graphs
        assert "planted: not capturable" in (graphs.block_capture_error or "")
        assert (
            "was not captured" in caplog.text and torch.cuda.current_stream() == torch.cuda.default_stream()
        )
        assert all(buf.graph is not None for buf in graphs.buffers.values())
        assert not any(bb.graphs for bb in graphs.blocks.values())
        assert_blocks_are_the_one_step_path(rec, PLAIN, LIMITS[len(PLAIN)], 77)
        calls = graphs.buffers[8].calls
        rec.step(*reached_state(rec, 5))
        assert graphs.buffers[8].calls == calls + 1
    finally:
        rec.use_cuda_graphs(None)


# Last in the module: S4_COMPILE_STEP is off by default, and its compiles (two a kernel) take the longest, so
# where scripts/gpu-check's time limit stops the tests it cuts this one, not the decode blocks' before it.
@pytest.mark.parametrize("kernel", ["s4", "s4d"])
def test_the_compiled_step_through_the_graphs_matches_the_plain_step(kernel):
    """S4_COMPILE_STEP on CUDA: torch.compile of the torch step, captured in the graphs. The logits and
    states of 8 steps at batch 1, 5 and 64 (buckets 1, 8, 64; two compiles: batch 1 and the dynamic rest)
    within 1e-5 of the plain eager step (Inductor may order a sum differently), and greedy tokens equal."""
    net = tiny_net(kernel)
    plain = net.to_recurrent(device="cuda", triton_step=False)
    rec = net.to_recurrent(device="cuda")
    rec.compile_step(True)
    rec.use_cuda_graphs(bucket_sizes(64), blocks=False)
    try:
        for n in (1, 5, 64):
            greedy_steps_agree(rec, plain, *reached_state(rec, n))
    finally:
        rec.use_cuda_graphs(None)
