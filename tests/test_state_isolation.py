"""Session isolation against states from outside (issue: public bug reports, kind 2).

(a) Every state that enters a slot is validated: finite, and within the largest value the model can
    reach from the zero state (RecurrentModel.state_limit: its float32 state_bound, or its float16 one
    where derived). (b) No decision for a batch is taken from
    one row's data: a poisoned row (NaN, inf, huge) leaves every other row bit-identical, in prefill
    (parallel and stepped), in the step (whole-network C step, fused per-layer step, torch ops) and in
    the engine's decode batch.
"""

import hashlib
import json
import struct
import threading

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numerics import real_system_with_eigenvalues
from server_support import reference, wait_for

from model import ModelConfig, SequenceModel
from model.recurrent import (
    STATE_BOUND_SLACK,
    DiagonalSSM,
    DPLRStep,
    StateRangeError,
    diagonalize,
    s4_real_system,
)
from model.sampling import SamplingParams
from server.sessions import StateFormatError, pack_state, unpack_state

TEXT = "tiny-text"
SMALL = dict(vocab_size=64, d_model=16, n_layers=2, d_state=8, l_max=128, cauchy_backend="torch")


def _nets() -> dict[str, SequenceModel]:
    torch.manual_seed(0)
    return {
        "s4": SequenceModel(ModelConfig(**SMALL, kernel="s4")),
        "s4d": SequenceModel(ModelConfig(**SMALL, kernel="s4d")),
    }


@pytest.fixture(scope="module")
def recs():
    out = {}
    for name, net in _nets().items():
        out[name] = net.to_recurrent()
        out[name + "-torch"] = net.to_recurrent(fused_step=False)
    # the exact DPLR step (the fallback for ill-conditioned eigenvectors) for every layer
    dplr = _nets()["s4"].to_recurrent(fused_network=False)
    for i, kernel in enumerate(dplr.net.kernels()):
        s = {k: v.detach().cpu() for k, v in kernel.ssm(torch.float64).items()}
        dplr.layers[i] = DPLRStep(s, *s4_real_system(s, kernel.L), dplr.device)
    dplr.M = max(f.M for f in dplr.layers)
    dplr._fused = None  # the torch ops around the DPLR forms (the fused step expects padded params)
    out["s4-dplr"] = dplr
    return out


# --- (a) the bound ------------------------------------------------------------------------------------


def test_dplr_state_bound_dominates_the_brute_force_l1_norm_of_the_state_impulse_response(recs):
    """|ξ_n| ≤ U Σ_j |(Āʲ B̄)_n|: the eigen-decomposition bound is ≥ the sum of brute-force powers
    (float64, 20000 terms: a partial sum is a lower bound of the series), and finite. It is loose
    where the eigenvectors are ill-conditioned (the reason a layer runs the DPLR step at all): up to
    ~3e4× the partial sum on this LegS model, so for this form the check is mostly one of finiteness."""
    rec = recs["s4-dplr"]
    for form in rec.layers:
        ones = torch.ones(form.H, dtype=torch.float64)
        bound = form.state_bound(ones).flatten(-2)  # (H, N)
        v, l1 = form.Bbar64.clone(), torch.zeros_like(form.Bbar64)
        for _ in range(20000):
            l1 += v.abs()
            v = (form.Abar64 @ v[..., None])[..., 0]
        assert bool((bound >= l1 * (1 - 1e-9)).all())
        assert bool(torch.isfinite(bound).all())


def _mixed_modes_form(H: int = 6) -> DiagonalSSM:
    """A diagonal form (`diagonalize`) of a random real system with 2 complex eigenvalue pairs and 3 real
    eigenvalues per channel (one of them negative): N = 7, slots 2 + 2 (the last half-filled)."""
    Abar, Bbar, gamma = real_system_with_eigenvalues(H, [(0.97, 0.3), (0.9, 2.0)], [0.95, -0.5, 0.6], seed=3)
    return DiagonalSSM(*diagonalize(Abar, Bbar, gamma), torch.device("cpu"))


@pytest.mark.parametrize("name", ["s4d", "mixed"])
def test_diagonal_state_bound_is_the_geometric_series_of_each_slot(recs, name):
    """Per slot of the real block-diagonal form: a complex mode's coordinates are bounded by
    |b| u Σ_j |μ|^j, a real mode's coordinate by |b_q| u Σ_j |λ_q|^j (its impulse response λ_q^j b_q: the
    bound is reached). Against the series summed term by term (400k terms) and the ℓ1 norm of each
    coordinate's impulse response from 2×2 block products in float64 (a lower bound)."""
    form = recs[name].layers[0] if name in recs else _mixed_modes_form()
    u = torch.rand(form.H, dtype=torch.float64) + 0.5
    amp = torch.stack([lam.abs() for lam in form.lam64], dim=1)[..., None]  # (H, 2, M, 1)
    series = torch.zeros(form.H, 2, form.M, dtype=torch.float64)
    for start in range(0, 400_000, 20_000):  # Σ_j |λ|^j term by term
        series += (amp ** torch.arange(start, start + 20_000, dtype=torch.float64)).sum(-1)
    assert float(amp.max()) ** 400_000 < 1e-12
    cplx = form.is_cplx[:, None]
    bmag = torch.where(cplx, form.b64.norm(dim=1, keepdim=True), form.b64.abs())
    bound = form.state_bound(u)
    torch.testing.assert_close(bound, series * bmag * u[:, None, None], rtol=1e-9, atol=0)
    # each coordinate's impulse response by repeated 2×2 block products: Σ_j |(A^j b)_q| ≤ the bound
    A1 = form.block_powers(torch.tensor([1.0]))[:, :, 0]  # (H, M, 2, 2)
    v, l1 = form.b64.transpose(1, 2)[..., None].clone(), torch.zeros(form.H, form.M, 2, dtype=torch.float64)
    for _ in range(20_000):
        l1 += v[..., 0].abs()
        v = A1 @ v
    l1 = l1.transpose(1, 2) * u[:, None, None]  # (H, 2, M)
    assert bool((bound >= l1 * (1 - 1e-9)).all())
    real = ~cplx.expand_as(bound)  # a real coordinate's bound is its impulse response's ℓ1 norm
    torch.testing.assert_close(bound[real], l1[real], rtol=1e-6, atol=1e-12)
    if name == "mixed":  # 2 complex slots, then 3 real modes in 2 slots: coordinates 1, 2 of slot 3, 1 of 4
        assert form.M == 4 and int((real & (form.b64 != 0)).sum()) == 3 * form.H


@pytest.mark.parametrize("name", ["s4", "s4d", "s4-dplr"])
def test_every_reachable_state_passes_and_an_adversarial_input_gets_close_to_the_bound(recs, name):
    rec = recs[name]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (3, 300), generator=g)
    _, x = rec.prefill(tokens, rec.init_state(3))
    rec.check_state(x)  # random prompts
    x = rec.init_state(1)
    for _ in range(300):  # the same token forever: a constant input, the DC gain
        _, x = rec.step(torch.tensor([5]), x)
    rec.check_state(x)
    # Layer 0 driven directly at |u| = U with the sign pattern that maximizes Re x of one mode
    form = rec.layers[0]
    U = rec.ssm_input_bound(0)
    bound = rec.state_bound()[0]  # (H, 2, M)
    h, m = 3, 1
    T = 2000
    if form.form == "diagonal":  # coordinate 1 of A^{T−1−t} b, slot m's 2×2 block
        A = form.block_powers(torch.arange(T - 1, -1, -1, dtype=torch.float64))[h, m]  # (T, 2, 2)
        signs = torch.sign((A @ form.b64[h, :, m])[:, 0])
    else:
        A, B = form.Abar64[h], form.Bbar64[h]
        rows, v = [], B.clone()
        for _ in range(T):
            rows.append(v[m])
            v = A @ v
        signs = torch.sign(torch.stack(rows[::-1]))
    u = torch.zeros(T, 1, form.H)
    u[:, 0, h] = (signs * U[h]).float()
    x = torch.zeros(1, form.H, 2, form.M)
    for t in range(T):
        _, x = form.step(u[t], x)
    reached = float(x[0, h, 0, m].abs())
    assert reached <= float(bound[h, 0, m]) * STATE_BOUND_SLACK
    if form.form == "diagonal":  # the diagonal bound is the mode's own ℓ1 gain: nearly reached
        assert reached >= 0.3 * float(bound[h, 0, m]), (reached, float(bound[h, 0, m]))


def test_check_state_refuses_non_finite_and_out_of_range_values_naming_the_entry(recs):
    rec = recs["s4"]
    _, x = rec.prefill(torch.randint(0, 64, (2, 40)), rec.init_state(2))
    x = x.clone()
    limit = rec.state_limit().float()
    for value, words in [
        (float("nan"), "NaN or infinite"),
        (float("inf"), "NaN or infinite"),
        (-float("inf"), "NaN or infinite"),
        (1e30, "exceeds"),
        (float(limit[1, 4, 0, 2]) * 1.001, "exceeds"),
    ]:
        y = x.clone()
        y[1, 1, 4, 0, 2] = value
        with pytest.raises(StateRangeError, match=words) as err:
            rec.check_state(y)
        assert "layer 1, row 1, channel 4" in str(err.value)
    y = x.clone()
    y[1, 1, 4, 0, 2] = float(limit[1, 4, 0, 2]) * 0.999  # just inside
    rec.check_state(y)
    with pytest.raises(StateRangeError, match="shape"):
        rec.check_state(x[:, :, :, :, :-1])


def bound_message_numbers(message: str) -> tuple[str, str]:
    """The value and the bound as a StateRangeError's "state value V … exceeds B, …" writes them."""
    import re

    m = re.search(r"state value (\S+) .* exceeds (\S+), the largest", message)
    assert m, message
    return m.group(1), m.group(2)


def test_a_value_just_over_its_bound_prints_digits_that_tell_the_two_apart(recs):
    """A value one float32 step past its bound was written "-54.2178 ... exceeds 54.2178" (6 digits);
    the message now gives each number in the fewest digits that read back as its float32."""
    rec = recs["s4d"]
    limit = rec.state_limit().float()
    x = rec.init_state(1)
    over = torch.nextafter(limit[1, 3, 0, 1], torch.tensor(float("inf")))
    x[1, 0, 3, 0, 1] = -over
    with pytest.raises(StateRangeError) as err:
        rec.check_state(x)
    value, bound = bound_message_numbers(str(err.value))
    assert value != "-" + bound, str(err.value)
    assert torch.tensor(float(value)) == -over and torch.tensor(float(bound)) == limit[1, 3, 0, 1]


# --- (b) no batch decision from one row -------------------------------------------------------------


def _batch_state(rec, rows: int, prompt_len: int = 30) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    _, x = rec.prefill(torch.randint(0, 64, (rows, prompt_len), generator=g), rec.init_state(rows))
    x = x.clone()
    x[:, 2] = 0  # one row fresh (all zeros), the others mid-sequence
    return x


POISONS = [float("nan"), float("inf"), -float("inf"), 1e30]


@pytest.mark.parametrize("name", ["s4", "s4-torch", "s4d", "s4d-torch", "s4-dplr"])
@pytest.mark.parametrize("prompt_len", [8, 200])  # the stepped short-prompt path, the parallel one
def test_a_poisoned_row_leaves_every_other_row_of_a_prefill_bit_identical(recs, name, prompt_len):
    rec = recs[name]
    x = _batch_state(rec, 4)
    tokens = torch.randint(0, 64, (4, prompt_len), generator=torch.Generator().manual_seed(3))
    clean_logits, clean_x = rec.prefill(tokens, x)
    for poison in POISONS:
        for bad in (1, 2):  # a mid-sequence row, and the fresh row (the others then are not all zero)
            y = x.clone()
            y[:, bad] = poison
            logits, new = rec.prefill(tokens, y)
            keep = [r for r in range(4) if r != bad]
            assert torch.equal(logits[keep], clean_logits[keep]), (poison, bad)
            assert torch.equal(new[:, keep], clean_x[:, keep]), (poison, bad)


def test_a_fresh_batch_and_a_fresh_row_among_used_ones_give_the_same_prefill(recs):
    """The all-zero shortcut and the general path agree bit for bit on a zero row, so whether the
    shortcut is taken (it depends on the other rows) changes no row's result."""
    for name in ("s4", "s4d", "s4-dplr"):
        rec = recs[name]
        tokens = torch.randint(0, 64, (4, 200), generator=torch.Generator().manual_seed(4))
        x = _batch_state(rec, 4)
        mixed_logits, mixed_x = rec.prefill(tokens, x)
        alone_logits, alone_x = rec.prefill(tokens, torch.zeros_like(x))
        assert torch.equal(mixed_logits[2], alone_logits[2]), name
        assert torch.equal(mixed_x[:, 2], alone_x[:, 2]), name


@pytest.mark.parametrize("name", ["s4", "s4-torch", "s4d", "s4-dplr"])
def test_a_poisoned_row_leaves_every_other_row_of_a_step_bit_identical(recs, name):
    rec = recs[name]
    x = _batch_state(rec, 4)
    tok = torch.tensor([1, 2, 3, 4])
    clean_logits, clean_x = rec.step(tok, x)
    paths = [{}] if rec._net_step is None else [{}, {"batch": 200}]  # NetStep, then the per-layer path
    for path in paths:
        saved = rec.net_step_max_batch
        rec.net_step_max_batch = 0 if path else saved
        try:
            ref_logits, ref_x = rec.step(tok, x)
            for poison in POISONS:
                y = x.clone()
                y[:, 0] = poison
                logits, new = rec.step(tok, y)
                assert torch.equal(logits[1:], ref_logits[1:]), (poison, path)
                assert torch.equal(new[:, 1:], ref_x[:, 1:]), (poison, path)
                out = y.clone()
                logits, _ = rec.step(tok, out, out=out)  # in place, as the engine steps
                assert torch.equal(logits[1:], ref_logits[1:]) and torch.equal(out[:, 1:], ref_x[:, 1:])
        finally:
            rec.net_step_max_batch = saved
        torch.testing.assert_close(ref_logits, clean_logits, rtol=1e-5, atol=1e-5)


# --- the server: imports, restores, and the engine's batches -------------------------------------------


def _create(client, prompt) -> str:
    r = client.post("/v1/sessions", json={"model": TEXT, "prompt": prompt})
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def _export(client, sid) -> tuple[dict, torch.Tensor]:
    header, raw = unpack_state(client.get(f"/v1/sessions/{sid}/export").content)
    return header, torch.frombuffer(bytearray(raw), dtype=torch.float32).clone()


def _import(client, header: dict, x: torch.Tensor) -> httpx.Response:
    return client.post("/v1/sessions/import", content=pack_state(header, x.numpy().tobytes()))


def test_import_refuses_states_the_model_cannot_reach_with_422_naming_state(client, server):
    sid = _create(client, "to sleep, perchance to dream")
    header, x = _export(client, sid)
    rec = server.state.models[TEXT].engine.rec
    limit = rec.state_limit().float().flatten()
    assert _import(client, header, x).status_code == 201  # the export itself is fine
    pool = server.state.models[TEXT].engine.pool
    in_use = pool.in_use
    i = int(limit.argmax())
    for name, edit, words in [
        ("all NaN (the report)", lambda v: v.fill_(float("nan")), "NaN or infinite"),
        ("one NaN", lambda v: v.__setitem__(7, float("nan")), "NaN or infinite"),
        ("one +inf", lambda v: v.__setitem__(3, float("inf")), "NaN or infinite"),
        ("one -inf", lambda v: v.__setitem__(3, -float("inf")), "NaN or infinite"),
        ("huge", lambda v: v.__setitem__(0, 3e38), "exceeds"),
        ("just over the bound", lambda v: v.__setitem__(i, float(limit[i]) * 1.01), "exceeds"),
    ]:
        y = x.clone()
        edit(y)
        r = _import(client, header, y)
        assert r.status_code == 422, (name, r.text)
        err = r.json()["error"]
        assert err["param"] == "state" and words in err["message"], (name, err)
        assert pool.in_use == in_use, name  # the slot went back
    y = x.clone()
    y[i] = float(limit[i]) * 0.99
    assert _import(client, header, y).status_code == 201


def test_import_refuses_malformed_headers_with_422_never_500(client):
    sid = _create(client, "ay, there's the rub")
    blob = client.get(f"/v1/sessions/{sid}/export").content
    header, raw = unpack_state(blob)

    def _sealed(body: bytes) -> bytes:
        return body + hashlib.sha256(body).digest()

    def raw_header(text: bytes) -> bytes:  # a header that json.dumps would never write
        return _sealed(struct.pack("<8sHI", b"S4STATE\n", 1, len(text)) + text + raw)

    cases = {
        "pending true": pack_state({**header, "pending": True}, raw),
        "pending -1": pack_state({**header, "pending": -1}, raw),
        "n_tokens 2^60": pack_state({**header, "n_tokens": 2**60}, raw),
        "n_tokens -5": pack_state({**header, "n_tokens": -5}, raw),
        "n_tokens 1.5": pack_state({**header, "n_tokens": 1.5}, raw),
        "seen duplicates": pack_state({**header, "seen": [1, 1]}, raw),
        "seen too many": pack_state({**header, "seen": list(range(300))}, raw),
        "seen bools": pack_state({**header, "seen": [True]}, raw),
        "shape bool": pack_state({**header, "shape": [True, *header["shape"][1:]]}, raw),
        "5000-digit int": raw_header(b'{"n_tokens": 1' + b"0" * 5000 + b"}"),
        "deep nesting": raw_header(b"[" * 100_000 + b"]" * 100_000),
        "header length past the end": _sealed(struct.pack("<8sHI", b"S4STATE\n", 1, 2**31) + b"{}" + raw),
        "NaN in header": raw_header(json.dumps({**header, "n_tokens": float("nan")}).encode()),
    }
    for name, data in cases.items():
        r = client.post("/v1/sessions/import", content=data)
        assert r.status_code == 422, (name, r.status_code, r.text[:200])
        assert r.json()["error"]["param"] == "state", name


def _held_turns(client, server, poison: float | None, seed: int) -> tuple[list[int], bytes, list[tuple]]:
    """Two sessions on the same prompt; the second one's slot is overwritten with `poison` (bypassing
    the validation, as a future path or a bug might). Both take a turn queued while the engine thread
    is held, so their prompts are prefilled in one batched prefill and their tokens decoded in one
    batch. Returns the first session's tokens, its exported state after the turn, and the prefill
    batch shapes seen."""
    engine = server.state.models[TEXT].engine
    good, bad = _create(client, POISON_BASE), _create(client, POISON_BASE)
    if poison is not None:
        slot = server.state.sessions.get(bad).slot

        def poison_slot(e):
            e.pool.state[:, slot] = poison

        engine.call(poison_slot).result(10)
    gate = threading.Event()
    held = engine.call(lambda e: gate.wait(30))  # the engine thread waits here
    results: dict[str, httpx.Response] = {}

    def turn(sid):
        body = {"model": TEXT, "session_id": sid, "prompt": POISON_MORE, "max_new_tokens": 40, "seed": seed,
                "temperature": 0.9}  # fmt: skip
        results[sid] = httpx.post(server.url + "/v1/generate", json=body, timeout=60)

    shapes: list[tuple] = []
    rec = engine.rec
    real_prefill = rec.prefill

    def recorded(tokens, state, **kw):
        shapes.append(tuple(tokens.shape))
        return real_prefill(tokens, state, **kw)

    rec.prefill = recorded
    threads = [threading.Thread(target=turn, args=(s,)) for s in (good, bad)]
    for t in threads:
        t.start()
    try:
        assert wait_for(lambda: engine.queued >= 2, 10)  # both turns are in the engine's inbox
    finally:
        gate.set()
        held.result(10)
        for t in threads:
            t.join(60)
        del rec.prefill
    assert results[good].status_code == 200, results[good].text
    state = client.get(f"/v1/sessions/{good}/export").content
    client.delete(f"/v1/sessions/{good}")
    client.delete(f"/v1/sessions/{bad}")
    return results[good].json()["tokens"], unpack_state(state)[1], shapes


POISON_BASE = "thus conscience does make cowards of us all"
POISON_MORE = " and enterprises of great pitch and moment" * 2  # > 64 tokens: the parallel prefill


def test_a_poisoned_slot_never_changes_another_sessions_output_in_prefill_or_decode(
    client, server, model_dirs
):
    """The report's scenario: the good session's tokens equal the reference continuation, and its
    state after the turn is bit-identical to the same scenario with a clean second session."""
    tokens, clean_state, shapes = _held_turns(client, server, None, seed=0)
    assert (2, len(POISON_MORE)) in shapes, shapes  # one batched prefill of both turns (pending + 83)
    prompt = list((POISON_BASE + POISON_MORE).encode())
    assert tokens == reference(model_dirs["text"], prompt, SamplingParams(seed=0, temperature=0.9), 40)
    for poison in [float("nan"), float("inf"), -float("inf"), 1e30]:
        got, state, shapes = _held_turns(client, server, poison, seed=0)
        assert (2, len(POISON_MORE)) in shapes, shapes
        assert got == tokens, poison
        assert state == clean_state, poison


# --- hypothesis: the state importer ------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_blob(recs):
    rec = recs["s4"]
    _, x = rec.prefill(torch.randint(0, 64, (1, 50)), rec.init_state(1))
    x = x[:, 0].contiguous()
    header = {"model": "m", "fingerprint": "f", "shape": list(x.shape), "dtype": "float32", "n_tokens": 50,
              "pending": 1, "seen": [1, 2]}  # fmt: skip
    return rec, header, x


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_any_blob_is_a_valid_state_or_a_clear_refusal(small_blob, data):
    """Random edits of a valid blob (bytes flipped, cut, extended; header fields replaced; float
    payloads with NaN/inf/huge/denormal values) either unpack and pass the range check, or raise
    StateFormatError / StateRangeError: never another exception, never a state out of range."""
    rec, header, x = small_blob
    kind = data.draw(st.sampled_from(["bytes", "header", "floats"]))
    if kind == "bytes":
        blob = bytearray(pack_state(header, x.numpy().tobytes()))
        for _ in range(data.draw(st.integers(1, 4))):
            op = data.draw(st.sampled_from(["flip", "cut", "extend"]))
            if op == "flip" and blob:
                blob[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
            elif op == "cut":
                del blob[data.draw(st.integers(0, len(blob))) :]
            else:
                blob += data.draw(st.binary(max_size=64))
        blob = bytes(blob)
        if data.draw(st.booleans()) and len(blob) > 32:  # recompute the checksum, as an attacker would
            blob = blob[:-32] + hashlib.sha256(blob[:-32]).digest()
    elif kind == "header":
        json_values = st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
            lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
            max_leaves=10,
        )
        key = data.draw(st.sampled_from(sorted(header)))
        blob = pack_state({**header, key: data.draw(json_values)}, x.numpy().tobytes())
    else:
        y = x.clone().flatten()
        n = data.draw(st.integers(1, 5))
        for _ in range(n):
            y[data.draw(st.integers(0, y.numel() - 1))] = data.draw(st.floats(width=32))
        blob = pack_state(header, y.numpy().tobytes())
    try:
        h, raw = unpack_state(blob)
    except StateFormatError:
        return
    if h.get("shape") != list(x.shape):
        return  # refused by the server's shape check (tested above)
    state = torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(x.shape)
    try:
        rec.check_state(state.unsqueeze(1))
    except StateRangeError:
        return
    assert bool(torch.isfinite(state).all())
    assert bool((state.abs() <= rec.state_limit().float()).all())


def test_json_bodies_with_huge_integers_or_deep_nesting_get_4xx_on_every_json_route(client):
    """Python's json refuses integers of over 4,300 digits (ValueError) and nesting deeper than the
    recursion limit (RecursionError): neither may escape as a 500."""
    sid = _create(client, "x")
    routes = ["/v1/generate", "/v1/completions", "/v1/sessions", f"/v1/sessions/{sid}/append"]
    bodies = {
        "huge int": b'{"model": "tiny-text", "prompt": "x", "max_new_tokens": 1' + b"0" * 5000 + b"}",
        "deep nesting": b'{"model": "tiny-text", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    }
    for route in routes:
        for name, body in bodies.items():
            r = client.post(route, content=body, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (route, name, r.status_code, r.text[:200])
    assert client.get("/healthz").status_code == 200


def test_websocket_frames_with_huge_integers_or_deep_nesting_get_error_frames(server):
    from websockets.sync.client import connect

    with connect(server.ws_url) as ws:
        for frame in (
            '{"type": "generate", "model": "tiny-text", "prompt": "x", "max_new_tokens": 1'
            + "0" * 5000
            + "}",
            '{"type": "generate", "model": "tiny-text", "prompt": ' + "[" * 10_000 + "]" * 10_000 + "}",
            '{"type": "generate", "model": "tiny-text", "prompt": "x", "seed": 1' + "0" * 30 + "}",
        ):
            ws.send(frame)
            reply = json.loads(ws.recv(10))
            assert reply["type"] == "error" and 400 <= reply["code"] < 500, reply
        ws.send(json.dumps({"type": "generate", "model": TEXT, "prompt": "x", "max_new_tokens": 2}))
        kinds = []
        while not kinds or kinds[-1] != "done":
            kinds.append(json.loads(ws.recv(10))["type"])
        assert "error" not in kinds
