"""The library's inputs, as a user calls it from Python (a fresh-user trial of the library): token ids of
every integer dtype on every path, and arguments it cannot use refused by name (ValueError) before any
work, instead of torch's errors from deep inside (or a verification "failure" for a NaN tolerance)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model import ModelConfig, build, load
from model.sampling import SamplingParams, sample

V = 64
INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


def _net(arch: str):
    extra = {"arch": "sashimi", "pool": [4, 4]} if arch == "sashimi" else {}
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=V, d_model=16, n_layers=2, d_state=8, l_max=64, cauchy_backend="torch", **extra
    )
    return build(cfg).eval()


@pytest.mark.parametrize("arch", ["isotropic", "sashimi"])
def test_token_ids_of_every_integer_dtype_give_the_int64_results_on_every_path(arch):
    """uint8 (bytes: `torch.frombuffer`, `np.fromfile`), int8, int16, int32 and int64 ids, the same values:
    conv mode, the recurrent step, a short prefill (the C path), a long one (past 512 tokens: the parallel
    torch path), and a float64 recurrent form's step and prefill all give the int64 results bit for bit.
    (Before, uint8/int8/int16 failed in torch's embedding on conv mode, the long prefill, SaShiMi's prefill
    and every float64 path: "Expected tensor for argument #1 'indices' to have one of the following scalar
    types: Long, Int".)"""
    net = _net(arch)
    rec, rec64 = net.to_recurrent(), net.to_recurrent(dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 600), generator=g)  # (< 128: int8 holds them too)

    def run(t):
        out = [net(t[:, :64])]
        for r in (rec, rec64):
            s = r.init_state(2)
            out.append(r.prefill(t[:, :32], s)[0])
            out.append(r.prefill(t, s)[0])
            out.append(r.step(t[:, 0], s)[0])
        return out

    want = run(ids)
    for dtype in INT_DTYPES[:-1]:
        got = run(ids.to(dtype))
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), dtype
    with pytest.raises(ValueError, match=r"token id 200 at index \[0, 0\] is outside the vocabulary"):
        net(torch.tensor([[200, 1]], dtype=torch.uint8))  # the range check still sees the values


@pytest.mark.parametrize("arch", ["isotropic", "sashimi"])
def test_a_decode_blocks_pending_tokens_of_another_dtype_are_refused_not_left_stale(arch):
    """`decode_block` updates its pending tokens in place to each row's last token (its docstring; the
    caller feeds them to the next block). Tokens of another integer dtype were converted to an int64 copy,
    which the block updated instead: uint8, int8 and int16 tokens ran and came back unchanged, so the next
    block fed every row its old pending token again (a wrong continuation, silently); int32 was refused
    as "decode block: expected (2,) torch.int64 contiguous CPU tensors", naming no argument. Each is now a
    ValueError naming the tokens and int64 before anything runs (the state unchanged); int64 tokens are
    updated in place as before."""
    from model.sampling import row_settings, uint64_bits

    rec = _net(arch).to_recurrent()
    B = 2

    def args():
        return dict(settings=row_settings([SamplingParams(seed=r) for r in range(B)], V), counts=None,
                    key=uint64_bits([1, 2]), counter=uint64_bits([0, 0]), limit=torch.full((B,), 3),
                    stops=[[]] * B, history=[b""] * B, seen=torch.zeros(B, V, dtype=torch.bool))  # fmt: skip

    state = rec.init_state(B)
    for dtype in INT_DTYPES[:-1]:
        tokens = torch.tensor([3, 5], dtype=dtype)
        with pytest.raises(
            ValueError, match=rf"decode_block updates tokens in place: they must be int64, got {dtype}"
        ):
            rec.decode_block(3, state, tokens, **args())
        assert tokens.tolist() == [3, 5] and not bool(state.any())
    tokens = torch.tensor([3, 5])
    res = rec.decode_block(3, state, tokens, **args())
    assert res.steps == 3 and torch.equal(tokens, res.tokens[-1]) and bool(state.any())


@pytest.mark.parametrize("arch", ["isotropic", "sashimi"])
def test_arguments_the_library_cannot_use_are_refused_by_name(arch, tmp_path):
    """A list or an array of ids, an `out` of another dtype, a tolerance that is NaN, negative or
    infinite, a device torch does not know or has not got: ValueErrors naming them (an AttributeError,
    "out has shape S, expected S", a VerificationError "within rel. err nan", torch's AssertionError 8
    frames deep). A dtype may be named as a string."""
    from model import save

    net = _net(arch)
    rec = net.to_recurrent()
    s = rec.init_state(1)
    for bad in ([3], np.array([3])):
        with pytest.raises(ValueError, match="tokens must be a torch tensor of integer ids, got"):
            rec.step(bad, s)
    with pytest.raises(ValueError, match=r"out has shape .* torch.float64, expected .* torch.float32"):
        rec.step(torch.tensor([3]), s, out=s.double())
    for tol in (float("nan"), -1.0, 0.0, float("inf"), True):  # (True was taken as 1.0)
        with pytest.raises(ValueError, match=r"tol must be a finite relative error > 0, got"):
            net.to_recurrent(tol=tol)
    # check_state takes the states step takes: a float64 or int64 one passed it and step refused it, a
    # list was an AttributeError
    from model.recurrent import StateRangeError

    for bad in (s.double(), s.long(), [1]):
        with pytest.raises(StateRangeError, match=r"state must be a float32 \(or float16\) tensor, got"):
            rec.check_state(bad)
    rec.check_state(s)
    # verify_len: -5, 3.5 and l_max + 1 failed deep in the check, 10**9 looped for as many steps
    for n in (-5, 0, 3.5, True, net.config.l_max + 1, 10**9):
        with pytest.raises(ValueError, match=r"verify_len must be null or an integer in \[1, l_max = "):
            net.to_recurrent(verify_len=n)
    assert net.to_recurrent(verify_len=net.config.l_max // 2).verification["dtype"] == "float32"
    with pytest.raises(ValueError, match=r"logits_tol must be a finite relative error > 0"):
        net.to_recurrent(logits_tol=float("nan"))
    assert net.to_recurrent(dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="weights dtype must be one of .*, got torch.int8"):
        net.to_recurrent(dtype="int8")
    save(net, tmp_path / "ck")
    with pytest.raises(ValueError, match=r"device 'gpu': not a torch device \(cpu, cuda, cuda:N, ...\)"):
        load(tmp_path / "ck", device="gpu")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        with pytest.raises(ValueError, match=f"device 'cuda:{n}': there are {n} CUDA devices"):
            net.to_recurrent(device=f"cuda:{n}")
    else:
        for call in (lambda: load(tmp_path / "ck", device="cuda"), lambda: net.to_recurrent(device="cuda")):
            with pytest.raises(ValueError, match=r"device 'cuda': this torch sees no CUDA device"):
                call()


@pytest.mark.parametrize("arch", ["isotropic", "sashimi"])
def test_a_buffer_on_another_device_than_the_c_paths_is_refused(arch):
    """The buffers the C code writes or reads through their pointers must be where its other tensors are:
    `step`'s `out` on the state's device, `sample`'s seen and counts on the logits', the decode block's
    on the CPU. One of the right shape and dtype on another device (a CUDA buffer beside a CPU model;
    here the meta device, which every machine has, whose tensors' address is 0) is a ValueError naming
    both devices. Before, `out` and the decode block's seen passed the shape and dtype checks and the C
    step wrote through the pointer (a segmentation fault: the calls run in a child process, whose crash
    fails the test instead of ending the run), and sample()'s seen and counts became NULL pointers, read
    as no repetition, presence or frequency penalty: tokens drawn without them, silently."""
    script = f"""
import torch
from tests.test_library_inputs import V, _net
from model.sampling import SamplingParams, row_settings, sample, uint64_bits

rec = _net({arch!r}).to_recurrent()
s = rec.init_state(2)


def attempt(what, call):
    try:
        call()
        print(what, "taken")
    except ValueError as exc:
        print(what, "refused:", exc)


attempt("out", lambda: rec.step(torch.tensor([1, 2]), s, out=torch.empty(s.shape, device="meta")))
p = SamplingParams(repetition_penalty=1.5, frequency_penalty=0.5, seed=1)
seen, counts = torch.zeros(2, V, dtype=torch.bool), torch.zeros(2, V)
for name in ("seen", "counts"):
    bufs = {{"seen": seen, "counts": counts}}
    bufs[name] = bufs[name].to("meta")
    gens = [p.generator(), p.generator()]
    attempt("sample " + name, lambda: sample(torch.randn(2, V), [p, p], gens, **bufs))
    block = dict(settings=row_settings([p, p], V), key=uint64_bits([1, 2]), counter=uint64_bits([0, 0]),
                 limit=torch.tensor([3, 3]), stops=[[], []], history=[b"", b""], **bufs)
    attempt("block " + name, lambda: rec.decode_block(4, rec.init_state(2), torch.tensor([1, 2]), **block))
"""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    child = [sys.executable, "-c", script]
    run = subprocess.run(child, check=False, capture_output=True, text=True, cwd=root, env=env, timeout=300)
    assert run.returncode == 0, (run.returncode, run.stdout, run.stderr[-2000:])
    want = [
        "out refused: out is on meta, expected the state's device (cpu)",
        f"sample seen refused: seen must be (B, V) = (2, {V}) on the logits' device (cpu), got (2, {V}) "
        "on meta",
        "block seen refused: decode block: seen must be on the CPU, got meta",
        f"sample counts refused: counts must be (B, V) = (2, {V}) on the logits' device (cpu), got (2, {V}) "
        "on meta",
        f"block counts refused: decode block: counts must be (2, {V}) float32 contiguous on the CPU",
    ]
    assert run.stdout.splitlines() == want, run.stdout


def test_sampling_arguments_are_checked_by_name():
    """SamplingParams.stop must be a list of bytes (a str was accepted, and find_stop raised TypeError
    later); sample() names a logit_bias id past the vocabulary (an IndexError from inside) and a generator
    that is not one (an AttributeError)."""
    for stop in ("\n", b"\n", ["\n"]):
        with pytest.raises(ValueError, match="stop must be a list of bytes"):
            SamplingParams(stop=stop)
    assert SamplingParams(stop=(b"\n",)).stop == [b"\n"]
    logits = torch.zeros(1, V)
    p = SamplingParams(seed=1, logit_bias={V: 1.0})
    with pytest.raises(
        ValueError, match=rf"params\[0\].logit_bias names token id {V}: the vocabulary has {V}"
    ):
        sample(logits, [p], [p.generator()])
    p = SamplingParams(seed=1)
    with pytest.raises(ValueError, match=r"generators\[0\] must be a CounterRNG .* got NoneType"):
        sample(logits, [p], [None])
    assert 0 <= int(sample(logits, [p], [p.generator()])[0]) < V


def test_library_calls_a_docstring_audit_found_lax_refuse_or_behave_as_documented(tmp_path):
    """A helper's docstring audit (2026-12-06) found these where the code did not do what its docstring
    said: `load` returned a network in training mode (its dropout made `net(tokens)` random);
    SequenceModel.forward read an unknown `logits` as "last"; ByteTokenizer.decode read 1.5 as byte 1;
    Vocab.decode read a negative id from the end of the vocabulary; CounterRNG took a float key and failed
    at the first draw; read_audio returned a resampler's overshoot past ±1 and passed any target_rate to
    soxr."""
    import io
    import wave

    from model.codecs import ByteTokenizer, read_audio
    from model.sampling import CounterRNG
    from model.vocab import VocabError, WordVocab

    cfg = ModelConfig(vocab_size=16, d_model=8, n_layers=1, d_state=4, l_max=16, dropout=0.5,
                      cauchy_backend="torch")  # fmt: skip
    from model import save

    save(build(cfg), tmp_path / "ck")
    net = load(tmp_path / "ck")
    tokens = torch.randint(0, 16, (2, 12), generator=torch.Generator().manual_seed(0))
    assert net.training is False
    assert torch.equal(net(tokens), net(tokens))  # dropout 0.5 is off
    with pytest.raises(ValueError, match='logits must be "all", "last" or "none"'):
        net(tokens, logits="bogus")
    for bad in ([1.5], [300], [-1]):
        with pytest.raises(ValueError, match="is not an integer in 0 … 255"):
            ByteTokenizer().decode(bad)
    assert ByteTokenizer().decode([104, 0xFF, np.int64(105)]) == "h\ufffdi"
    vocab = WordVocab(["<eos>", "a", "b"])
    assert vocab.decode([1, 2]) == " a b"
    for bad in ([-1], [3], [1.5]):
        with pytest.raises(VocabError, match="is not an integer in 0 … 2"):
            vocab.decode(bad)
    with pytest.raises(ValueError, match="integers in"):
        CounterRNG(1.5)
    assert CounterRNG(np.int64(3)).uniform() == CounterRNG(3).uniform()
    # a full-scale 440 Hz square wave at 16 kHz, resampled to 8 kHz: soxr's overshoot went to 1.2
    t = np.arange(16000) / 16000
    square = np.where(np.sin(2 * np.pi * 440 * t) >= 0, 32767, -32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(square.tobytes())
    y, rate = read_audio(buf.getvalue(), target_rate=8000)
    assert rate == 8000 and np.abs(y).max() <= 1.0 and np.abs(y).max() > 0.99
    for bad in (0, -5, 1.5, 10**9):
        with pytest.raises(ValueError, match="target_rate"):
            read_audio(buf.getvalue(), target_rate=bad)
