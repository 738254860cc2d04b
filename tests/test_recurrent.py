"""The recurrent form reproduces conv mode: logits, prefill, states; verification and fallback."""

import logging
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from numerics import (
    assert_refused_for_its_step_alone,
    real_system_with_eigenvalues,
    scramble_transposed_lns,
    step_all,
)

from model import ModelConfig, SequenceModel, VerificationError
from model.kernel import SSMKernel
from model.recurrent import VERIFY_TOKENS, DiagonalSSM, DPLRStep, convert_kernel, s4_real_system

L_LONG = 4096

CPUS = len(os.sched_getaffinity(0))  # OpenMP's default thread count


def make(kernel: str, init: str, l_max=L_LONG, d_state=32, **kw) -> SequenceModel:
    cfg = ModelConfig(vocab_size=32, d_model=32, n_layers=2, d_state=d_state, kernel=kernel, init=init,
                      l_max=l_max, d_ff=64, cauchy_backend="torch", **kw)  # fmt: skip
    return SequenceModel(cfg)


def train_a_few_steps(net: SequenceModel, steps=5, L=L_LONG) -> None:
    opt = torch.optim.AdamW(net.param_groups(lr=3e-3, weight_decay=0.01, ssm_lr=3e-3))
    for _ in range(steps):
        x = torch.randint(0, net.config.vocab_size, (2, L + 1))
        loss = torch.nn.functional.cross_entropy(net(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def assert_logits_close(got, want):
    rel = float((got - want).norm() / want.norm())
    lp_err = float((got.log_softmax(-1) - want.log_softmax(-1)).abs().max())
    assert rel <= 1e-4, f"‖Δ‖/‖step‖ = {rel:.2e}"
    assert lp_err <= 1e-3, f"max |Δ log p| = {lp_err:.2e}"


CASES = [("s4", "legs", False), ("s4", "legs", True), ("s4d", "legs", False), ("s4d", "diag-lin", True)]


@pytest.mark.parametrize("kernel,init,trained", CASES)
def test_conv_mode_equals_step_by_step_over_4096_tokens(kernel, init, trained):
    net = make(kernel, init)
    if trained:
        train_a_few_steps(net)
    net.eval()
    tokens = torch.randint(0, 32, (2, L_LONG))
    with torch.no_grad():
        conv = net(tokens)
    rec = net.to_recurrent()
    stepped, _ = step_all(rec, tokens, rec.init_state(2))
    assert_logits_close(conv, stepped)


@pytest.mark.parametrize("kernel,init", [("s4", "legs"), ("s4d", "diag-inv"), ("s4", "fout")])
def test_prefill_plus_steps_equals_pure_stepping(kernel, init):
    net = make(kernel, init, l_max=1024).eval()
    rec = net.to_recurrent()
    tokens = torch.randint(0, 32, (3, 700))
    stepped, s_step = step_all(rec, tokens, rec.init_state(3))
    # prefill 300 (fresh state), prefill 257 more (continuing: nonzero initial state), then step
    lp1, s = rec.prefill(tokens[:, :300], rec.init_state(3))
    lp2, s = rec.prefill(tokens[:, 300:557], s)
    ls, s = step_all(rec, tokens[:, 557:], s)
    assert_logits_close(torch.cat([lp1, lp2, ls], 1), stepped)
    _, s_pref = rec.prefill(tokens, rec.init_state(3))
    for got in (s, s_pref):
        assert float((got - s_step).norm() / s_step.norm()) <= 1e-4


def test_prefill_longer_than_trained_length():
    net = make("s4d", "diag-lin", l_max=256).eval()
    rec = net.to_recurrent()
    tokens = torch.randint(0, 32, (1, 1000))
    stepped, s_step = step_all(rec, tokens, rec.init_state(1))
    lp, s = rec.prefill(tokens, rec.init_state(1))
    assert_logits_close(lp, stepped)
    assert float((s - s_step).norm() / s_step.norm()) <= 1e-4


def test_forms_chosen_by_verification():
    """HiPPO-LegS is not stably diagonalizable (S4 paper, Lemma 3.2): at N=64 its diagonal form
    fails verification in float32 and the exact DPLR step is used; S4D stays diagonal."""
    s4 = make("s4", "legs", l_max=1024, d_state=64).to_recurrent()
    assert [type(f) for f in s4.layers] == [DPLRStep, DPLRStep]
    s4d = make("s4d", "diag-lin", l_max=1024).to_recurrent()
    assert [type(f) for f in s4d.layers] == [DiagonalSSM, DiagonalSSM]
    for r in s4.report + s4d.report:
        assert r["rel_err"] <= 1e-4


def test_verification_failure_raises_clear_error():
    net = make("s4d", "diag-lin", l_max=256)
    with pytest.raises(VerificationError, match=r"layer 0: .*rel\. err 1e-12 over L=256"):
        net.to_recurrent(tol=1e-12)


def test_the_network_check_decodes_from_the_state_a_prefill_leaves(monkeypatch):
    """A prefill whose state only it can read (here: the two coordinates of every slot swapped in the state
    it returns, and swapped back in the state it takes) reproduces conv mode when prompts are prefilled
    after prompts, but not when decoding goes on from a prompt. The network check steps half its probe
    from the state the first half's prefill left, so it refuses such a model (stepping the probe only from
    the zero state, as before 2026-12-05, passed it); the same model unpatched passes."""
    from model.recurrent import RecurrentModel  # noqa: PLC0415

    net = make("s4d", "diag-lin", l_max=256)
    ok = net.to_recurrent().verification
    assert ok["step_rel_err"] < 1e-5 and ok["prefill_rel_err"] < 1e-5, ok
    prefill = RecurrentModel.prefill

    def swapped(self, tokens, state, logits="all"):
        out, state = prefill(self, tokens, state.flip(-2), logits)
        return out, state.flip(-2)

    monkeypatch.setattr(RecurrentModel, "prefill", swapped)
    assert_refused_for_its_step_alone(net.to_recurrent)


def test_the_network_check_refuses_a_prefill_whose_logits_alone_are_wrong(monkeypatch):
    """The converse: a prefill that leaves the right state but returns each position's logits one position
    late (the first repeated). Decoding after it is right, so only the prefilled probe's error shows, and
    the check must refuse on it alone (a check of the stepped logits only passed this model: nothing in
    this file failed when logits_report compared `errs[:1]`); its message gives the prefilled error over
    1e-2 and the stepped one under 1e-5 (float32 steps against the float64 conv: measured ≤ 1e-6)."""
    import re  # noqa: PLC0415

    from model.recurrent import RecurrentModel  # noqa: PLC0415

    net = make("s4d", "diag-lin", l_max=256)
    prefill = RecurrentModel.prefill

    def late(self, tokens, state, logits="all"):
        out, state = prefill(self, tokens, state, logits)
        return torch.cat([out[:, :1], out[:, :-1]], 1), state

    monkeypatch.setattr(RecurrentModel, "prefill", late)
    errs = r"\(step (\S+), prefill (\S+)\)"
    with pytest.raises(VerificationError, match=errs) as err:
        net.to_recurrent()
    step_err, prefill_err = (float(x) for x in re.search(errs, str(err.value)).groups())
    assert prefill_err > 1e-2 and step_err < 1e-5, str(err.value)


def test_state_is_constant_size_and_inputs_are_not_modified():
    net = make("s4", "legs", l_max=256).eval()
    rec = net.to_recurrent()
    state = rec.init_state(2)
    assert state.dtype == torch.float32 and state.shape[-2] == 2
    assert rec.state_bytes_per_sequence == 2 * 32 * rec.M * 8  # complex64 modes as float32 pairs
    assert state[:, 0].numel() * 4 == rec.state_bytes_per_sequence
    _, s_short = rec.prefill(torch.randint(0, 32, (2, 10)), state)
    _, s_long = rec.prefill(torch.randint(0, 32, (2, 2000)), state)
    assert s_short.shape == s_long.shape == state.shape
    before = s_short.clone()
    rec.step(torch.tensor([1, 2]), s_short)
    rec.prefill(torch.randint(0, 32, (2, 5)), s_short)
    assert torch.equal(before, s_short)


def test_recurrent_form_is_frozen_copy():
    net = make("s4d", "diag-lin", l_max=256).eval()
    snapshot = {k: v.clone() for k, v in net.state_dict().items()}
    rec = net.to_recurrent()
    for k, v in net.state_dict().items():
        assert torch.equal(v, snapshot[k]), f"to_recurrent modified {k}"
    tok = torch.tensor([3])
    before, _ = rec.step(tok, rec.init_state(1))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    after, _ = rec.step(tok, rec.init_state(1))
    assert torch.equal(before, after)
    assert not any(p.requires_grad for p in rec.net.parameters())


def test_bad_shapes_are_rejected():
    rec = make("s4d", "diag-lin", l_max=64).to_recurrent()
    with pytest.raises(ValueError, match="state has shape"):
        rec.step(torch.tensor([1, 2, 3]), rec.init_state(2))
    with pytest.raises(ValueError, match="tokens must have 2 dims"):
        rec.prefill(torch.tensor([1, 2]), rec.init_state(2))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_recurrent_matches_cpu():
    net = make("s4", "legs", l_max=512).eval()
    tokens = torch.randint(0, 32, (4, 512))
    cpu, _ = step_all(net.to_recurrent(), tokens, net.to_recurrent().init_state(4))
    gnet = net.cuda()
    rec = gnet.to_recurrent()
    assert rec.device.type == "cuda"
    got, _ = rec.prefill(tokens.cuda(), rec.init_state(4))
    with torch.no_grad():
        conv = gnet(tokens.cuda())
    assert_logits_close(got.cpu(), cpu)
    assert_logits_close(conv.cpu(), cpu)


@pytest.mark.parametrize("kernel,init", [("s4", "legs"), ("s4d", "diag-lin")])
def test_fused_cpu_step_matches_torch_step_and_updates_in_place(kernel, init):
    net = make(kernel, init, l_max=256).eval()
    fast, ref = net.to_recurrent(), net.to_recurrent(fused_step=False)
    assert fast._fused is not None and ref._fused is None
    tokens = torch.randint(0, 32, (5, 300))
    want, s_want = step_all(ref, tokens, ref.init_state(5))
    got, s_got = step_all(fast, tokens, fast.init_state(5))
    assert float((got - want).norm() / want.norm()) <= 1e-6
    assert float((s_got - s_want).norm() / s_want.norm()) <= 1e-6
    state = fast.init_state(5)  # in place: out=state allocates nothing and gives the same result
    outs = []
    for t in range(tokens.shape[1]):
        logits, same = fast.step(tokens[:, t], state, out=state)
        assert same is state
        outs.append(logits)
    torch.testing.assert_close(torch.stack(outs, 1), got, rtol=0, atol=0)
    torch.testing.assert_close(state, s_got, rtol=0, atol=0)


def test_fused_step_falls_back_to_torch_with_a_warning(monkeypatch):
    from model import fused

    monkeypatch.setattr(fused, "_lib", {})
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("S4_BUILD_CACHE", "/tmp/s4-empty-build-cache-for-test")
    with pytest.warns(RuntimeWarning, match="fused CPU step unavailable"):
        rec = make("s4d", "diag-lin", l_max=64).to_recurrent()
    assert rec._fused is None
    logits, _ = rec.step(torch.tensor([1]), rec.init_state(1))
    assert torch.isfinite(logits).all()


def test_the_build_key_names_the_compiler_and_its_version(monkeypatch, tmp_path):
    """A library another compiler built into a shared S4_BUILD_CACHE (an image with a newer gcc on the same
    volume) is another file, never loaded for this one's: the key hashes the compiler's path and the first
    line of its --version (asked once a process); without a compiler it says "none"."""
    from model import fused

    def fake_cc(name: str, version: str) -> Path:
        cc = tmp_path / name
        cc.write_text(f"#!/bin/sh\necho '{version}'\necho 'Copyright line'\n")
        cc.chmod(0o755)
        return cc

    names = {}
    versions = ("gcc (Debian 12.2.0-14) 12.2.0", "gcc (Debian 13.1.0-1) 13.1.0")
    for name, version in zip(("gcc-a", "gcc-b"), versions, strict=True):
        monkeypatch.setattr(fused, "_lib", {})
        monkeypatch.setenv("CC", str(fake_cc(name, version)))
        assert fused.compiler_signature() == f"{tmp_path / name}: {version}"
        names[name] = fused.library_name()
    monkeypatch.setattr(fused, "_lib", {})
    monkeypatch.setenv("CC", str(fake_cc("gcc-a", versions[0])))
    assert fused.library_name() == names["gcc-a"] != names["gcc-b"]  # the same compiler: the same file
    fake_cc("gcc-a", "gcc (Debian 12.3.0-1) 12.3.0")  # upgraded in place, same path: read once a process
    assert fused.library_name() == names["gcc-a"]
    monkeypatch.setattr(fused, "_lib", {})
    assert fused.library_name() != names["gcc-a"]  # a new process asks again
    monkeypatch.setattr(fused, "_lib", {})
    monkeypatch.setattr(fused, "compiler", lambda: None)
    assert fused.compiler_signature() == "none"


def test_s4_cflags_reach_the_build_and_its_cache_key(monkeypatch, tmp_path):
    """$S4_CFLAGS is split as a shell would (quotes kept together) and appended to the build's flags; the
    library built with them is another file in the cache (a build with other flags is never reused), and
    S4_VW sets the vector width the library reports; an unknown width, or unbalanced quotes, fall back to
    the torch ops with the warning."""
    from model import fused

    monkeypatch.setenv("S4_CFLAGS", "-DS4_VW=16 '-DS4_UNUSED=a b'")
    assert fused.build_flags() == (*fused.FLAGS, "-DS4_VW=16", "-DS4_UNUSED=a b")
    monkeypatch.setenv("S4_BUILD_CACHE", str(tmp_path))
    built = {}
    for width in (16, 8):  # -O0: these builds check the flags, not the code (1.4 s each, not 15 s)
        monkeypatch.setattr(fused, "_lib", {})
        monkeypatch.setenv("S4_CFLAGS", f"-O0 -DS4_VW={width}")
        built[width] = fused.library().ssm_prefill_width(), set(tmp_path.glob("ssm_step_*.so"))
    assert built[16][0] == 16 and built[8][0] == 8
    assert len(built[8][1]) == 2  # two files, one per set of flags
    for bad in ("-DS4_VW=12", "'-DS4_VW=16"):
        monkeypatch.setattr(fused, "_lib", {})
        monkeypatch.setenv("S4_CFLAGS", bad)
        with pytest.warns(RuntimeWarning, match="fused CPU step unavailable"):
            assert fused.library() is None


def test_the_fused_step_is_built_where_it_can_be_and_a_damaged_build_is_compiled_again(
    monkeypatch, tmp_path, caplog
):
    """The image keeps S4_BUILD_CACHE on its cache volume, so a restart loads the library compiled at the
    first start (some 5 s of a container's restart). Where that folder cannot be made or written (the
    image's read-only root without the volume) the library is compiled into the temp dir's fallback, and
    the log says why; a library already in S4_BUILD_CACHE is loaded from it even where it cannot be
    written; a damaged one (a file cut short on a volume) is compiled again; where neither folder can
    serve, build_cache_problem names both (the server stops on it) and library() warns. (Compiling is a
    copy of this process's library here: the choice of folder is under test, not the compiler.)"""
    from model import fused

    built = Path(fused.library()._name)
    name = fused.library_name()
    compiles = []

    def compile_copy(out, flags=fused.FLAGS, source=None):
        compiles.append(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(built, out.with_suffix(".tmp"))
        out.with_suffix(".tmp").replace(out)  # (a new file, as compile_library writes it)

    def load(cache, fallback):
        monkeypatch.setenv("S4_BUILD_CACHE", str(cache))
        monkeypatch.setattr(fused, "fallback_folder", lambda: fallback)
        monkeypatch.setattr(fused, "_lib", {})
        compiles.clear()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="model.fused"):
            return fused.library()

    monkeypatch.setattr(fused, "compile_library", compile_copy)
    (tmp_path / "a-file").write_text("")
    blocked = tmp_path / "a-file" / "build"  # cannot be made: its parent is a file
    assert load(blocked, tmp_path / "tmp") is not None and compiles == [tmp_path / "tmp" / name]
    moved = f"S4_BUILD_CACHE = {blocked} cannot be made (Not a directory): the fused C step is compiled"
    assert any(m == f"{moved} and loaded in {tmp_path / 'tmp'}" for m in caplog.messages), caplog.messages
    assert fused.build_cache_problem() is None

    volume = tmp_path / "volume"
    assert load(volume, tmp_path / "tmp2") is not None and compiles == [volume / name]
    assert len(caplog.messages) == 1 and caplog.messages[0].startswith("the fused C step: compiled in ")
    assert caplog.messages[0].endswith(f" s into {volume / name}")
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: not str(p).startswith(str(volume)) and real_access(p, mode)
    )
    assert load(volume, tmp_path / "tmp2") is not None and compiles == []  # kept: loaded, not compiled
    assert caplog.messages == [f"the fused C step: loaded from {volume / name}"]
    monkeypatch.setattr(os, "access", real_access)

    damaged = tmp_path / "volume2"  # (another path: dlopen would hand back this process's copy by its name)
    damaged.mkdir()
    (damaged / name).write_bytes(b"\x7fELF cut short")
    assert load(damaged, tmp_path / "tmp2") is not None and compiles == [damaged / name]
    assert (damaged / name).read_bytes() == built.read_bytes()
    assert any(m.startswith(f"{damaged / name} cannot be loaded (") and m.endswith("compiling it again")
               for m in caplog.messages)  # fmt: skip
    (tmp_path / "another-file").write_text("")
    also_blocked = tmp_path / "another-file" / "s4serve-build"
    monkeypatch.setenv("S4_BUILD_CACHE", str(blocked))
    monkeypatch.setattr(fused, "fallback_folder", lambda: also_blocked)
    problem = fused.build_cache_problem()
    assert problem.startswith(f"S4_BUILD_CACHE = {blocked} cannot be made (Not a directory); the fallback = "
                              f"{also_blocked} cannot be made (Not a directory): the fused C step cannot be "
                              "compiled and loaded")  # fmt: skip
    with pytest.warns(RuntimeWarning, match="fused CPU step unavailable"):
        assert load(blocked, also_blocked) is None
    assert compiles == []

    def no_temp_dir():  # tempfile.gettempdir() where no temporary folder can be written
        raise FileNotFoundError("No usable temporary directory found in ['/tmp', '/var/tmp', '/usr/tmp']")

    monkeypatch.setattr(fused, "fallback_folder", no_temp_dir)
    assert fused.build_cache_problem().startswith(
        f"S4_BUILD_CACHE = {blocked} cannot be made (Not a directory); the fallback: no temporary folder can "
        "be written (TMPDIR, /tmp, /var/tmp): the fused C step cannot be compiled and loaded"
    )


def test_threads_that_first_ask_for_the_fused_step_at_once_share_one_build(monkeypatch, tmp_path):
    """Two threads of a process whose first sample or step comes at the same time ask `library()` at once:
    one compiles, the other waits for it, and both get the library. Each compiled it into the same
    `.{pid}.tmp` file, and the second rename found it gone: that thread warned "fused CPU step
    unavailable", got None, and left None as the process's library (every C path off from then on). The
    compiler here is a script that copies this process's library and takes a second more (the race is
    under test, not the compiler)."""
    import threading

    from model import fused

    built = Path(fused.library()._name)
    runs = tmp_path / "runs"
    cc = tmp_path / "cc"
    cc.write_text(
        f'#!/bin/sh\n[ "$1" = --version ] && {{ echo fake-cc 1; exit 0; }}\nout=; prev=\n'
        f'for a in "$@"; do [ "$prev" = -o ] && out=$a; prev=$a; done\n'
        f'echo run >> "{runs}"\ncp "{built}" "$out"\nsleep 1\n'
    )
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("S4_BUILD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fused, "_lib", {})
    got = {}

    def first_use(i):
        got[i] = fused.library()

    threads = [threading.Thread(target=first_use, args=(i,)) for i in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert got[0] is not None and got[0] is got[1] is fused.library(), (got, [str(w.message) for w in caught])
    assert runs.read_text().split() == ["run"]  # compiled once


@pytest.mark.parametrize("kernel,init", [("s4", "legs"), ("s4d", "diag-lin")])
@pytest.mark.parametrize("d_ff", [0, 48])  # the shipped text model has FF blocks, audio-digits-s4 none
def test_whole_network_c_step_matches_the_torch_step_at_small_and_large_batches(kernel, init, d_ff):
    cfg = dict(vocab_size=32, d_model=32, n_layers=2, d_state=32, l_max=256, cauchy_backend="torch")
    cfg["d_ff"] = d_ff
    net = SequenceModel(ModelConfig(kernel=kernel, init=init, **cfg)).eval()
    fast, ref = net.to_recurrent(), net.to_recurrent(fused_step=False)
    assert fast._net_step is not None and ref._net_step is None
    tokens = torch.randint(0, 32, (9, 200))  # 9 rows: split between threads in the C step
    want, s_want = step_all(ref, tokens, ref.init_state(9))
    for max_batch in (32, 4):  # one C call per step, then the torch ops around the fused SSM
        fast.net_step_max_batch = max_batch
        state = fast.init_state(9)
        outs = []
        for t in range(tokens.shape[1]):
            logits, same = fast.step(tokens[:, t], state, out=state)
            assert same is state
            outs.append(logits)
        got = torch.stack(outs, 1)
        assert float((got - want).norm() / want.norm()) <= 1e-6
        assert float((state - s_want).norm() / s_want.norm()) <= 1e-6
    fast.net_step_max_batch = 32
    logits, new = fast.step(tokens[:, 0], s_want)  # out of place: the input state is untouched
    assert new is not s_want and torch.equal(s_want, step_all(ref, tokens, ref.init_state(9))[1])


def test_short_prompts_are_stepped_and_match_the_parallel_prefill():
    cfg = dict(vocab_size=32, d_model=32, n_layers=2, d_state=32, l_max=256, cauchy_backend="torch")
    rec = SequenceModel(ModelConfig(kernel="s4", init="legs", **cfg)).eval().to_recurrent()
    tokens = torch.randint(0, 32, (3, 40))
    state = torch.randn(rec.init_state(3).shape) * 0.1
    before = state.clone()
    assert rec.prefill_by_steps_max_tokens >= 40
    stepped = rec.prefill(tokens, state)
    rec.prefill_by_steps_max_tokens = 0  # the parallel form
    parallel = rec.prefill(tokens, state)
    assert torch.equal(state, before)  # the input state is left untouched either way
    for got, want in zip(stepped, parallel):
        assert float((got - want).norm() / want.norm()) <= 1e-5


@pytest.mark.parametrize("kernel,init", [("s4", "legs"), ("s4d", "diag-lin")])
@pytest.mark.parametrize("d_ff", [0, 48])
@pytest.mark.parametrize("B,L", [(1, 1), (1, 37), (3, 64), (2, 300), (13, 9), (17, 12), (8 * CPUS + 5, 3)])
def test_the_c_prefill_is_bit_identical_to_stepping_the_prompt(kernel, init, d_ff, B, L):
    """fused.NetStep.prefill (ssm_step.c `net_prefill`: the prompt layer by layer, the linear layers
    over all positions at once, rows split between the threads, a diagonal layer's SSM up to 8 rows
    together) against L whole-network C steps from the same nonzero states (17 rows: stepped 8 at a time
    in a thread; 2 threads take 13 rows as 6 and 7, 3 rows as 1 and 2; 8 · CPUS + 5 rows give each of
    OpenMP's default threads more than 8 rows on any machine): every position's logits and the final
    state equal bit for bit (DPLR and diagonal layers, with and without FF blocks, one row and several;
    21 modes a channel: two vectors of 8 and a partial one); rec.prefill takes that path up to
    prefill_by_steps_max_tokens and gives the same."""
    cfg = dict(vocab_size=32, d_model=32, n_layers=2, d_state=42, l_max=256, cauchy_backend="torch")
    rec = SequenceModel(ModelConfig(kernel=kernel, init=init, d_ff=d_ff, **cfg)).eval().to_recurrent()
    ns = rec._net_step
    g = torch.Generator().manual_seed(B * 1000 + L)
    tokens = torch.randint(0, 32, (B, L), generator=g)
    state = rec.init_state(B)
    for _ in range(5):  # rows at a nonzero point of their sequences
        ns(torch.randint(0, 32, (B,), generator=g), state, state)
    stepped, want = state.clone(), torch.empty(B, L, 32)
    for t in range(L):
        want[:, t] = ns(tokens[:, t], stepped, stepped)
    got_state = state.clone()
    got = ns.prefill(tokens, got_state)
    assert torch.equal(got, want) and torch.equal(got_state, stepped)
    assert rec.prefill_by_steps_max_tokens >= L
    logits, new = rec.prefill(tokens, state)
    assert torch.equal(logits, want) and torch.equal(new, stepped)
    assert ns.prefill(tokens[:, :0], state.clone()).shape == (B, 0, 32)


@pytest.mark.parametrize("kernel,init", [("s4", "legs"), ("s4d", "diag-lin")])
def test_an_isotropic_model_with_transposed_lns_runs_every_step_path_as_its_conv_mode(kernel, init):
    """norm "tln" (official `transposed: true` backbones): the scalar TransposedLN before each S4 and FF
    block and as the final norm, its m and s drawn far from 0 and 1 so a path that drops one, or runs a
    LayerNorm, differs. Against the float64 conv mode (≤ 1e-5 of the largest logit): the torch step and
    the parallel prefill (no C), and the whole-network C step after the C prefill (logits of every
    position and of the last); the C prefill equals stepping the prompt bit for bit; bfloat16 weights
    convert and verify with the C step."""
    cfg = dict(vocab_size=32, d_model=32, n_layers=2, d_state=16, l_max=64, d_ff=48, cauchy_backend="torch")
    net = SequenceModel(ModelConfig(kernel=kernel, init=init, norm="tln", **cfg)).eval()
    assert scramble_transposed_lns(net) == 5  # 2 S4 blocks, 2 FF blocks, the final norm
    tokens = torch.randint(0, 32, (3, 80), generator=torch.Generator().manual_seed(1))  # past l_max
    with torch.no_grad():
        want = net.double()(tokens).float()
    net.float()

    def rel(got):
        return float((got - want).abs().max() / want.abs().max())

    torch_ops, c_step = net.to_recurrent(fused_step=False), net.to_recurrent()
    assert torch_ops._net_step is None and c_step._net_step is not None
    torch_ops.prefill_by_steps_max_tokens = 0  # the parallel prefill
    first, state = torch_ops.prefill(tokens[:, :30], torch_ops.init_state(3))
    rest, _ = step_all(torch_ops, tokens[:, 30:], state)
    assert rel(torch.cat([first, rest], 1)) <= 1e-5
    first, state = c_step.prefill(tokens[:, :30], c_step.init_state(3))  # the C prefill (≤ 30 tokens)
    rest, _ = step_all(c_step, tokens[:, 30:], state)
    assert rel(torch.cat([first, rest], 1)) <= 1e-5
    stepped, s_want = step_all(c_step, tokens[:, :30], c_step.init_state(3))
    assert torch.equal(first, stepped) and torch.equal(state, s_want)
    last, _ = c_step.prefill(tokens[:, :30], c_step.init_state(3), logits="last")
    assert torch.equal(last, first[:, -1:])
    assert net.to_recurrent(dtype=torch.bfloat16)._net_step is not None  # verified against float64 conv


def test_a_layer_with_fewer_modes_than_the_state_runs_the_fused_step_zero_padded():
    from model import fused
    from model.recurrent import DiagonalSSM, pad_fused_params

    H, M, M_state = 4, 5, 7  # a trained model's layers can keep different numbers of modes
    mu = 0.9 * torch.exp(1j * torch.rand(H, M, dtype=torch.float64))
    b, c = torch.randn(H, M, dtype=torch.complex128), torch.randn(H, M, dtype=torch.complex128)
    form = DiagonalSSM(mu, b, c, torch.device("cpu"))
    u, x = torch.randn(2, H), torch.randn(2, H, 2, M)
    y_want, x_want = form.step(u, x)
    pad_fused_params(form, M_state)
    xp = torch.zeros(2, H, 2, M_state)
    xp[..., :M] = x
    xo, y = torch.full_like(xp, float("nan")), torch.empty(2, H)
    form.step_fused(fused.library(), u, xp, xo, y)
    torch.testing.assert_close(y, y_want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xo[..., :M], x_want, rtol=1e-5, atol=1e-5)
    assert torch.equal(xo[..., M:], torch.zeros(2, H, 2, M_state - M))


def _check_paths_against_stepping(form: DiagonalSSM) -> None:
    """The C step (rows sharing each vector's parameters) against the torch step from a random state, then
    the prefill from it, by the C pass (several channel groups: H a multiple of twice its vector width)
    and by the torch ops, against stepping the prompt with the torch step."""
    from model import fused
    from model.recurrent import CHUNK, pad_fused_params

    H = form.H
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(9, H, 2, form.M, generator=g)
    u = torch.randn(9, H, generator=g)
    y_t, x_t = form.step(u, x0)
    pad_fused_params(form, form.M)
    assert form._prefill_c is not None and H >= 2 * fused.library().ssm_prefill_width()
    xo, y = torch.empty_like(x0), torch.empty(9, H)
    form.step_fused(fused.library(), u, x0, xo, y)
    torch.testing.assert_close(y, y_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xo, x_t, rtol=1e-5, atol=1e-5)
    L = 2 * CHUNK + 5
    us = torch.randn(2, L, H, generator=g)
    xs, ys = x0[:2], []
    for t in range(L):
        yt, xs = form.step(us[:, t], xs)
        ys.append(yt)
    want_y, want_x = torch.stack(ys, 1), xs
    xc = torch.complex(x0[:2, :, 0], x0[:2, :, 1])
    for tables in ("c", "torch"):
        if tables == "torch":
            form._prefill_c = None
            form._prefill_tables(torch.device("cpu"))
        got_y, got_x = form.prefill(us, xc)
        got_x = torch.stack([got_x.real, got_x.imag], dim=-2)
        assert float((got_y - want_y).abs().max()) < 1e-4 * float(want_y.abs().max()), tables
        assert float((got_x - want_x).abs().max()) < 1e-4 * float(want_x.abs().max()), tables


@pytest.mark.parametrize(
    "pairs, reals",
    [
        ([(0.97, 0.3), (0.9, 2.0)], [0.95, -0.5, 0.6]),  # N = 7: 2 complex slots, real modes in 1.5 slots
        ([(0.99, 0.05)], [0.9, 0.8, -0.7, 0.2]),  # N = 6
        ([], [0.99, 0.5, -0.3, 0.1]),  # all real
        ([(0.95, 1.0), (0.5, 3.0)], []),  # all complex: the complex-diagonal form as before
    ],
)
def test_the_real_block_slots_hold_an_n_dimensional_system_in_n_over_2_slots(pairs, reals):
    """A diagonalized real system in the real block-diagonal form: ⌈N/2⌉ slots (a complex mode fills one,
    two real modes share one), and its kernel wᵀ Aᵗ b (2×2 block powers, float64) is the dense system's
    γᵀ Āᵗ B̄ by brute-force matrix-vector products; a real slot's block powers are exactly diagonal; the
    float32 torch step, the C step and the prefill (C and torch ops, from a nonzero state) agree with
    stepping."""
    from model import fused
    from model.recurrent import diagonalize, impulse_response

    H, T = 2 * fused.library().ssm_prefill_width(), 300
    Abar, Bbar, gamma = real_system_with_eigenvalues(H, pairs, reals, seed=len(reals))
    N = Abar.shape[-1]
    form = DiagonalSSM(*diagonalize(Abar, Bbar, gamma), torch.device("cpu"))
    assert form.M == -(-N // 2)
    dense, v = [], Bbar.clone()
    for _ in range(T):  # K_t = γᵀ Āᵗ B̄
        dense.append((gamma * v).sum(-1))
        v = (Abar @ v[..., None])[..., 0]
    dense = torch.stack(dense, 1)  # (H, T)
    A = form.block_powers(torch.arange(T, dtype=torch.float64))  # (H, M, T, 2, 2)
    b, w = form.b64.transpose(1, 2), form.w64.transpose(1, 2)  # (H, M, 2)
    K = torch.einsum("hmq,hmtqr,hmr->ht", w, A, b)
    assert float((K - dense).abs().max() / dense.abs().max()) < 1e-10
    real = ~form.is_cplx
    assert bool((A[real][..., 0, 1] == 0).all() and (A[real][..., 1, 0] == 0).all())
    K32 = impulse_response(form, T).double()
    assert float((K32 - dense).abs().max() / dense.abs().max()) < 1e-5
    _check_paths_against_stepping(form)


def _real_block_slots_by_channel(mu, b, c):
    """real_block_slots as written before it packed every channel at once: one channel at a time, its complex
    modes in order, then its real modes two to a slot (the reference of the test below)."""
    H = mu.shape[0]
    cplx = mu.imag != 0
    real = (mu.imag == 0) & ((mu != 0) | (b * c != 0))
    rot = torch.where(b.abs() > 0, b.conj() / b.abs().clamp(min=1e-300), torch.ones_like(b))
    b_real, w_real = (b * rot).real, 2 * (c / rot).real
    M = max(int((cplx.sum(-1) + (real.sum(-1) + 1) // 2).max()), 1)
    lam1, lam2 = (torch.zeros(H, M, dtype=torch.complex128) for _ in range(2))
    bb, ww = (torch.zeros(H, 2, M, dtype=torch.float64) for _ in range(2))
    is_cplx = torch.zeros(H, M, dtype=torch.bool)
    for h in range(H):
        k = cplx[h].nonzero()[:, 0]
        n = len(k)
        lam1[h, :n] = lam2[h, :n] = mu[h, k]
        bb[h, 0, :n], bb[h, 1, :n] = b[h, k].real, b[h, k].imag
        ww[h, 0, :n], ww[h, 1, :n] = (2 * c[h, k]).real, -(2 * c[h, k]).imag
        is_cplx[h, :n] = True
        for i, m in enumerate(real[h].nonzero()[:, 0].tolist()):
            j, q = n + i // 2, i % 2
            (lam1 if q == 0 else lam2)[h, j] = mu[h, m].real
            bb[h, q, j], ww[h, q, j] = b_real[h, m], w_real[h, m]
    return lam1, lam2, bb, ww, is_cplx


@pytest.mark.parametrize("seed", range(4))
def test_real_block_slots_packs_every_channel_as_one_channel_at_a_time_does(seed):
    """Channels with different mixes of complex, real, zero (a one-step delay) and padded modes, in random
    order: the slots packed for all channels at once equal, bit for bit, the per-channel packing."""
    from model.recurrent import real_block_slots

    g = torch.Generator().manual_seed(seed)
    H, Mc = 37, 12
    kind = torch.randint(0, 4, (H, Mc), generator=g)  # 0 complex, 1 real, 2 zero μ with b·c ≠ 0, 3 padding
    mu = torch.complex(torch.rand(H, Mc, generator=g, dtype=torch.float64) * 2 - 1,
                       torch.rand(H, Mc, generator=g, dtype=torch.float64) + 0.1)  # fmt: skip
    mu = torch.where(kind == 1, mu.real.to(torch.complex128), mu)
    mu = torch.where(kind >= 2, torch.zeros_like(mu), mu)
    b, c = (torch.randn(H, Mc, generator=g, dtype=torch.complex128) for _ in range(2))
    b, c = (torch.where(kind == 3, torch.zeros_like(t), t) for t in (b, c))
    got, want = real_block_slots(mu, b, c), _real_block_slots_by_channel(mu, b, c)
    for x, y in zip(got, want, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    assert got[0].shape[1] >= 6  # (some channel needs several slots of each kind)


def test_real_modes_of_an_s4d_layer_share_slots():
    """S4D with real eigenvalues (μ real, b and c complex, y = 2 Re Σ c x), one of them exactly 0 (a
    one-step delay: K_0 only): each real mode is 1-dimensional (b rotated to |b|, c·b kept), so Mc of
    them take ⌈Mc/2⌉ slots; the float32 step's impulse response is 2 Re Σ c b μᵗ (float64) within float32
    rounding, and the C step and prefills agree with stepping."""
    from model import fused
    from model.recurrent import impulse_response

    g = torch.Generator().manual_seed(2)
    H, Mc, T = 2 * fused.library().ssm_prefill_width(), 5, 200
    mu = (0.5 + 0.45 * torch.rand(H, Mc, generator=g, dtype=torch.float64)).to(torch.complex128)
    mu[:, 2] = 0
    b, c = (torch.randn(H, Mc, generator=g, dtype=torch.complex128) for _ in range(2))
    form = DiagonalSSM(mu, b, c, torch.device("cpu"))
    assert form.M == 3 and not bool(form.is_cplx.any())
    t = torch.arange(T, dtype=torch.float64)
    want = 2 * ((c * b).real[..., None] * mu.real[..., None] ** t).sum(1)  # real μ: a real power, 0⁰ = 1
    assert float(want[:, 1:].abs().max()) > 0 and bool((mu[:, 2] == 0).all())
    got = impulse_response(form, T).double()
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    _check_paths_against_stepping(form)


def test_the_impulse_response_runs_through_denormals_flushed_and_leaves_them_on_after():
    """The verification's impulse response decays through float32 denormals (|λ|^t < 1.2e-38, on x86
    several times slower), flushed to zero while it runs: within 1e-34 of the kernel's scale of the
    unflushed response (4e-36 here), and denormals work again afterwards (the mode is restored)."""
    from model.recurrent import impulse_response

    g = torch.Generator().manual_seed(3)
    H, M, T = 8, 4, 2500
    mu = (0.9 + 0.05 * torch.rand(H, M, generator=g, dtype=torch.float64)) * torch.exp(
        1j * torch.rand(H, M, generator=g, dtype=torch.float64)
    )
    b, c = (torch.randn(H, M, generator=g, dtype=torch.complex128) for _ in range(2))
    form = DiagonalSSM(mu, b, c, torch.device("cpu"))
    got = impulse_response(form, T)
    tiny = torch.tensor([1e-40]) * torch.tensor([1.0])
    assert float(tiny) > 0  # (denormals are not flushed any more)
    assert float(got[:, -1].abs().max()) == 0.0  # 0.95^2500 ≈ 1e-56: flushed on the way
    y, x, want = None, torch.zeros(1, H, 2, form.M), []  # the same steps with denormals kept
    u = torch.ones(1, H)
    for _ in range(T):
        y, x = form.step(u, x)
        want.append(y[0])
        u = torch.zeros_like(u)
    want = torch.stack(want, 1)
    assert float((got - want).abs().max()) <= 1e-34 * float(want.abs().max())


def dense_bilinear_system(Lam, P, B, C, dt, L):
    """Ā, B̄, C̄ of one channel's DPLR SSM on the full complex state [x; x̄] (N = 2·N/2), by dense
    complex128 matrices: A = diag(Λ, Λ̄) − Σⱼ pⱼ pⱼᴴ with pⱼ = [Pⱼ; P̄ⱼ], Ā = (I − Δ/2 A)⁻¹ (I + Δ/2 A),
    B̄ = (I − Δ/2 A)⁻¹ Δ [B; B̄], and C̄ = C̃ (I − Ā^L)⁻¹ from C̃ = [C, C̄] (S4 paper §3.3), Ā^L by L
    explicit products."""
    N = 2 * Lam.shape[-1]
    eye = torch.eye(N, dtype=torch.complex128)
    A = torch.diag(torch.cat([Lam, Lam.conj()]))
    for Pj in P:
        p = torch.cat([Pj, Pj.conj()])[:, None]
        A = A - p @ p.conj().T
    inv = torch.linalg.inv(eye - dt / 2 * A)
    Abar, Bbar = inv @ (eye + dt / 2 * A), inv @ (dt * torch.cat([B, B.conj()]))
    AL = eye
    for _ in range(L):
        AL = AL @ Abar
    return Abar, Bbar, torch.cat([C, C.conj()]) @ torch.linalg.inv(eye - AL)


@pytest.mark.parametrize("init", ["legs", "fout"])
def test_s4_real_system_is_the_dense_complex_system_with_c_bar_recovered_from_c_tilde(init):
    """`s4_real_system` (the DPLR step's Ā, B̄, γ̄ on ξ = [Re x; Im x]) against dense complex matrices in
    float64: ξ = T [x; x̄] with T = [[I, I], [−iI, iI]] / 2, so Ā = T Ā_c T⁻¹, B̄ = T B̄_c, γ̄ᵀ = C̄_c T⁻¹.
    Only the runtime verification caught C̄ recovered with Ā^(L+1), at a 2× margin; here 1e-10."""
    torch.manual_seed(0)
    H, N, L = 3, 8, 64
    kernel = SSMKernel(H, N, L, kind="s4", init=init, dt_min=0.01, dt_max=0.1, backend="torch")
    s = {k: v.detach() for k, v in kernel.ssm(torch.float64).items()}
    Abar, Bbar, gamma = s4_real_system(s, L)
    i = torch.eye(N // 2, dtype=torch.complex128)
    T = torch.cat([torch.cat([i, i], 1), torch.cat([-1j * i, 1j * i], 1)]) / 2
    for h in range(H):
        ch = [s["Lambda"][h], s["P"][:, h], s["B"][h], s["C"][h], s["dt"][h]]
        A_c, B_c, C_c = dense_bilinear_system(*ch, L)
        want = (T @ A_c @ torch.linalg.inv(T), T @ B_c, C_c @ torch.linalg.inv(T))
        for got, ref in zip((Abar[h], Bbar[h], gamma[h]), want, strict=True):
            assert ref.imag.abs().max() <= 1e-12 * ref.abs().max()  # a real system
            err = float((got - ref.real).norm() / ref.real.norm())
            assert got.dtype == torch.float64 and err <= 1e-10, (h, err)


@pytest.mark.parametrize(("kind", "init", "L"), [("s4", "legs", 512), ("s4d", "diag-inv", 128)])
def test_the_conversion_verifies_against_the_float64_conv_kernel(kind, init, L):
    """The conv kernel the conversion verifies the form against, and returns as the network check's
    reference, is the layer's kernel computed in float64 (taps min(L, VERIFY_TOKENS)): one computed in
    float32 (1e-7 off) passed the 1e-4 verification unnoticed."""
    torch.manual_seed(1)
    kernel = SSMKernel(4, 16, L, kind=kind, init=init, backend="torch")
    _, report, K = convert_kernel(kernel, "cpu", tol=1e-4)
    with torch.no_grad():
        want = kernel(L, dtype=torch.float64)[..., : min(L, VERIFY_TOKENS)]
    assert K.dtype == torch.float64 and K.shape == want.shape == (4, min(L, VERIFY_TOKENS))
    assert torch.allclose(K, want, rtol=1e-12, atol=0), float(((K - want) / want).abs().max())
    assert report["rel_err"] <= 1e-4


@pytest.mark.parametrize("init", ["legs", "fout"])
def test_the_dplr_state_bound_holds_the_brute_force_l1_gain(init):
    """`DPLRStep.state_bound` is at least the largest |ξ_n| an input |u| ≤ u_max reaches from ξ = 0, the
    ℓ1 gain u_max Σ_t |(Āᵗ B̄)_n| (u_t = u_max · sign of the term: every term adds), summed over 20,000
    steps in float64 by explicit products (the remaining terms only add to it)."""
    torch.manual_seed(2)
    H, N, L, steps = 3, 8, 64, 20_000
    kernel = SSMKernel(H, N, L, kind="s4", init=init, dt_min=0.01, dt_max=0.1, backend="torch")
    s = {k: v.detach() for k, v in kernel.ssm(torch.float64).items()}
    Abar, Bbar, gamma = s4_real_system(s, L)
    u_max = torch.tensor([1.0, 0.5, 3.0], dtype=torch.float64)
    bound = DPLRStep(s, Abar, Bbar, gamma, "cpu").state_bound(u_max).flatten(1)  # (H, N): [Re x; Im x]
    gain, x = torch.zeros(H, N, dtype=torch.float64), Bbar
    for _ in range(steps):
        gain += x.abs()
        x = (Abar @ x[..., None])[..., 0]
    assert bool((x.abs() <= 1e-6 * gain).all())  # the tail: the sum has converged
    want = gain * u_max[:, None]
    assert bool((bound >= want * (1 - 1e-12)).all()), (bound / want).min()


@pytest.mark.parametrize("fused_step", [True, False])
@pytest.mark.parametrize("init", ["diag-lin", "diag-inv"])
def test_a_slow_mode_never_grows_in_the_float32_step(init, fused_step):
    """Slow modes, Re Λ·Δ ≈ −1e-9 (an imported model's Re Λ = −1e-6, Δ = 1e-3): |μ| = 1 − 1e-9 in float64.
    Rounded to nearest, 10-45 % of the float32 step's blocks had |μ| ≥ 1 (a served recurrence whose
    state grows without bound). The layer's step with no input from each slot's unit states (whose
    products are exact in float32) gives each block's columns: their norms must be below 1, for the torch
    step and the fused C step alike, and each within 2 float32 ulps of the float64 |μ|."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, d_model=32, n_layers=1, d_state=64, kernel="s4d", init=init, l_max=256,
                      dt_min=1e-3, dt_max=1e-2, re_lambda_max=None, cauchy_backend="torch")  # fmt: skip
    net = SequenceModel(cfg).eval()
    with torch.no_grad():
        next(iter(net.kernels())).log_neg_re.fill_(-6 * torch.log(torch.tensor(10.0)).item())  # Re Λ = −1e-6
    rec = net.to_recurrent(fused_step=fused_step)
    form = rec.layers[0]
    assert form.form == "diagonal" and (rec._fused is not None) == fused_step
    lam1, lam2 = (lam.abs() for lam in form.lam64)  # (H, M) float64
    assert float(lam1.max()) > 1 - 1e-8  # the slow modes are there
    H, M = form.H, rec.M
    u = torch.zeros(1, H)
    cols = []
    for q in range(2):  # x₁ = 1 or x₂ = 1 in every slot, the rest 0
        x = torch.zeros(1, H, 2, M)
        x[:, :, q] = 1.0
        if fused_step:
            after = torch.empty_like(x)
            form.step_fused(rec._fused, u, x, after, torch.empty(1, H))
        else:
            _, after = form.step(u, x)
        cols.append(after[0, :, :, : form.M].double())  # (H, 2, M)
    col1, col2 = cols
    cplx = form.is_cplx
    norm1 = col1.norm(dim=1)  # a complex slot's block [[p, −m], [m, p]]: |column| = |μ|
    assert bool((norm1[cplx] < 1).all()), float(norm1[cplx].max() - 1)
    assert float((norm1 - lam1)[cplx].abs().max()) <= 2 * 2.0**-24
    real = ~cplx & (lam1 > 0)
    assert bool((col1[:, 0].abs()[real] < 1).all()) and bool((col2[:, 1].abs()[real] < 1).all())


def test_a_layernorms_output_bound_is_samuelsons_and_attained():
    """`layernorm_output_bound` (the input bound the state bounds of a layer after a LayerNorm start from)
    is |γ_h| √(H − 1) + |β_h|: no input exceeds it (random and spiky inputs, in float64), and a spike ±s·e_h
    (x̂_h = ±√(H − 1) exactly, the eps negligible at s = 1e3: relative 1e-10) attains it within 1e-8 at
    every h. Nothing tested it: √H in place of √(H − 1), a bound never reached, passed test_recurrent.py
    and test_state_dtype.py."""
    from model.recurrent import layernorm_output_bound  # noqa: PLC0415

    H = 12
    g = torch.Generator().manual_seed(0)
    norm = torch.nn.LayerNorm(H).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(H, generator=g, dtype=torch.float64))
        norm.bias.copy_(torch.randn(H, generator=g, dtype=torch.float64))
    bound = layernorm_output_bound(norm)
    assert bound.dtype == torch.float64 and bound.shape == (H,)
    spikes = torch.cat([torch.eye(H, dtype=torch.float64), -torch.eye(H, dtype=torch.float64)]) * 1e3
    x = torch.cat([torch.randn(20000, H, generator=g, dtype=torch.float64) ** 3, spikes])
    with torch.no_grad():
        top = norm(x).abs().max(0).values
    assert bool((top <= bound * (1 + 1e-12)).all()), (top, bound)
    assert bool((top >= bound * (1 - 1e-8)).all()), (top, bound)
