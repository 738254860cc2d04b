"""The recurrent-form cache (model/form_cache.py): a layer read from it is the layer converted, bit for bit;
its key changes with everything the conversion depends on; an entry that is damaged, another's, or wrong is
never served; the server reads it at a restart and says so."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.arch.sashimi import SaShiMi
from model.form_cache import FormCache, layer_key, tensors_sha256, to_recurrent
from model.network import ModelConfig, SequenceModel
from model.recurrent import VERIFY_TOKENS, VerificationError

F64 = torch.float64


def trained(net):
    """`net` with its SSM parameters moved off their initialization, as training moves them (an S4 layer at
    its exact HiPPO initialization may not diagonalize; moved, every one here does)."""
    with torch.no_grad():
        for k in net.kernels():
            for name in ("log_neg_re", "im", "P", "B"):
                if hasattr(k, name):
                    getattr(k, name).add_(0.05 * torch.randn_like(getattr(k, name)))
    return net


def s4_model(kernel: str = "s4", init: str = "legs", **dt) -> SequenceModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, d_state=16, kernel=kernel, init=init, l_max=512,
                      d_ff=64, cauchy_backend="torch", **dt)  # fmt: skip
    return trained(SequenceModel(cfg).eval())


def sashimi_model() -> SaShiMi:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="sashimi", vocab_size=64, d_model=16, n_layers=1, d_state=8, l_max=128, pool=[4],
                      cauchy_backend="torch")  # fmt: skip
    return trained(SaShiMi(cfg).eval())


MODELS = {
    "s4-diagonal": s4_model,
    "s4d": lambda: s4_model(kernel="s4d", init="diag-lin"),
    # float64's Cauchy kernel is 1.6e-8 (relative) from dense powers here: the taps check allowed 1e-9, and
    # such a model was converted again at every start (a hit never happened)
    "s4-fout-small-dt": lambda: s4_model(init="fout", dt_min=1e-6, dt_max=1e-5),
    # s4/legt at its initialization does not diagonalize within the tolerance: the DPLR step serves
    "s4-dplr": lambda: SequenceModel(
        ModelConfig(
            vocab_size=64,
            d_model=32,
            n_layers=2,
            d_state=16,
            kernel="s4",
            init="legt",
            l_max=256,
            cauchy_backend="torch",
        )
    ).eval(),  # fmt: skip
    "sashimi": sashimi_model,
}


def state_tensors(form) -> list[torch.Tensor]:
    """Every tensor a form steps and prefills with (its C tables where the C prefill serves)."""
    out = list(form._fused_params)
    out += [t for t in (form._prefill_c or ()) if isinstance(t, torch.Tensor)]
    out += [getattr(form, n) for n in ("in_tab", "out_tab", "conv_tab", "Kf", "pow_bin")
            if isinstance(getattr(form, n, None), torch.Tensor)]  # fmt: skip
    return out + list(getattr(form, "A_bin_t", []))


def forms_of(rec) -> list:
    return list(rec.forms.values()) if hasattr(rec, "forms") else rec.layers


def assert_same_model(a, b) -> None:
    """Two recurrent forms of one network: every layer's tensors, the verification, and the logits and state
    of a stepped and a prefilled sequence, bit for bit."""
    for fa, fb in zip(forms_of(a), forms_of(b), strict=True):
        assert fa.form == fb.form and fa.M == fb.M
        ta, tb = state_tensors(fa), state_tensors(fb)
        assert len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb, strict=True))
    assert a.verification == b.verification
    assert [{k: v for k, v in r.items() if k != "cached"} for r in a.report] == [
        {k: v for k, v in r.items() if k != "cached"} for r in b.report
    ]
    tokens = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(3))
    for rec in (a, b):
        rec.prefill_by_steps_max_tokens = 0  # the parallel prefill
    (la, sa), (lb, sb) = a.prefill(tokens, a.init_state(2)), b.prefill(tokens, b.init_state(2))
    assert torch.equal(la, lb) and torch.equal(sa, sb)
    (la, sa), (lb, sb) = a.step(tokens[:, 0], sa), b.step(tokens[:, 0], sb)
    assert torch.equal(la, lb) and torch.equal(sa, sb)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_layer_read_from_the_cache_is_the_layer_converted_bit_for_bit(name, tmp_path):
    """Each model kind: converted without a cache, into a cache (a miss per layer, one entry each), and from
    it (a hit per layer). The three recurrent forms are the same: every step and prefill table, the network
    check's figures (it ran again on the hit, against float64 conv mode with the cached taps), the logits."""
    net = MODELS[name]()
    plain = net.to_recurrent()
    cache = FormCache(tmp_path / "cache")
    first = net.to_recurrent(cache=cache)
    n = len(first.report)
    assert (cache.hits, cache.misses) == (0, n) and not any(r["cached"] for r in first.report)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == n
    second = net.to_recurrent(cache=cache)
    assert (cache.hits, cache.misses) == (n, n) and all(r["cached"] for r in second.report)
    forms = [r["form"] for r in second.report]
    assert forms == [r["form"] for r in plain.report]
    assert set(forms) == ({"dplr"} if name == "s4-dplr" else {"diagonal"})
    assert_same_model(plain, first)
    assert_same_model(plain, second)


def test_an_entry_holds_the_modes_and_the_kernel_taps_with_a_checksum_and_no_pickle(tmp_path):
    net = s4_model()
    cache = FormCache(tmp_path)
    rec = net.to_recurrent(cache=cache)
    kernel = net.kernels()[0]
    s = {k: v.detach().cpu() for k, v in kernel.ssm(F64).items()}
    path = cache.path(layer_key(kernel, s, "cpu", 1e-4, kernel.L))
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert meta["form"] == "diagonal" and meta["key"] == path.stem
    report = {k: v for k, v in rec.report[0].items() if k not in ("cached", "layer")}
    assert json.loads(meta["report"]) == report
    assert meta["tensors_sha256"] == tensors_sha256(tensors)
    # K: the float64 conv kernel's first taps, as conv mode computes them now
    with torch.no_grad():
        want = kernel(kernel.L, dtype=F64, backend="torch")[:, :VERIFY_TOKENS]
    assert tensors["K"].dtype == F64 and torch.equal(tensors["K"], want)
    shapes = {k: (v.dtype, *v.shape) for k, v in tensors.items() if k != "K"}  # (H, modes, real pairs)
    assert shapes.keys() == {"mu", "b", "c"} and len(set(shapes.values())) == 1
    dtype, H, modes, pair = shapes["mu"]
    assert (dtype, H, pair) == (F64, 32, 2) and modes >= rec.report[0]["modes"]  # (2 real modes share a slot)
    assert path.stat().st_mode & 0o777 == 0o644
    assert not list(tmp_path.glob(".tmp-*"))


def test_the_key_changes_with_every_input_of_the_conversion_and_only_the_changed_layer_misses(tmp_path):
    net = s4_model()
    cache = FormCache(tmp_path)
    net.to_recurrent(cache=cache)
    kernel = net.kernels()[1]
    s = {k: v.detach().cpu() for k, v in kernel.ssm(F64).items()}
    key = layer_key(kernel, s, "cpu", 1e-4, kernel.L)
    assert key == layer_key(kernel, {k: v.clone() for k, v in s.items()}, "cpu", 1e-4, kernel.L)
    others = {layer_key(kernel, s, "cpu", 2e-4, kernel.L), layer_key(kernel, s, "cpu", 1e-4, kernel.L // 2),
              layer_key(kernel, s, "meta", 1e-4, kernel.L)}  # fmt: skip
    for name in s:  # one element of one parameter, by one part in 1e12
        t = {k: v.clone() for k, v in s.items()}
        t[name][(0,) * t[name].dim()] *= 1 + 1e-12
        others.add(layer_key(kernel, t, "cpu", 1e-4, kernel.L))
    assert key not in others and len(others) == 3 + len(s)
    # a checkpoint whose second layer changed: its first layer hits, its second converts
    with torch.no_grad():
        kernel.B.view(-1)[0] += 1e-6
    hits, misses = cache.hits, cache.misses
    rec = net.to_recurrent(cache=cache)
    assert [r["cached"] for r in rec.report] == [True, False]
    assert (cache.hits - hits, cache.misses - misses) == (1, 1)
    assert_same_model(rec, net.to_recurrent())
    rec = net.to_recurrent(cache=cache, tol=2e-4)  # another tolerance: every layer converts
    assert not any(r["cached"] for r in rec.report)


def _entries(folder):
    return sorted(folder.glob("*.safetensors"))


def _cached_s4_model(folder):
    """An S4 model converted with a cache in `folder`: (net, cache, its recurrent form, the first entry, that
    entry's metadata and tensors, read)."""
    net = s4_model()
    cache = FormCache(folder)
    plain = net.to_recurrent(cache=cache)
    first = _entries(folder)[0]
    with safe_open(str(first), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118
    return net, cache, plain, first, meta, tensors


@pytest.mark.parametrize("damage", ["a flipped byte", "truncated", "another layer's", "not safetensors"])
def test_a_damaged_or_foreign_entry_is_logged_converted_again_and_rewritten(damage, tmp_path, caplog):
    net = s4_model()
    cache = FormCache(tmp_path)
    plain = net.to_recurrent(cache=cache)
    first, second = _entries(tmp_path)
    data = first.read_bytes()
    if damage == "a flipped byte":
        first.write_bytes(data[:-100] + bytes([data[-100] ^ 0x10]) + data[-99:])  # inside the last tensor
        why = "checksum mismatch"
    elif damage == "truncated":
        first.write_bytes(data[: len(data) // 2])
        why = "not used"
    elif damage == "another layer's":
        first.write_bytes(second.read_bytes())
        why = "its key is another's"
    else:
        first.write_bytes(b"\x00" * 64)
        why = "not used"
    with caplog.at_level(logging.WARNING, logger="model.form_cache"):
        rec = net.to_recurrent(cache=cache)
    assert sum(not r["cached"] for r in rec.report) == 1
    assert any(why in m and first.name in m for m in caplog.messages), caplog.messages
    assert_same_model(plain, rec)
    again = net.to_recurrent(cache=cache)  # rewritten: every layer hits again
    assert all(r["cached"] for r in again.report)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_an_entry_holding_a_tensor_numpy_has_no_dtype_for_is_a_miss_and_scan_calls_it_damaged(
    dtype, tmp_path, caplog
):
    """An entry whose kernel taps were rewritten in a dtype numpy cannot hold (bfloat16, float8), its metadata
    left as it was: its checksum is computed over the raw bytes, so it is a logged miss and the layer is
    converted again, and `scan` (python -m model.form_cache) lists it as damaged. (The checksum went through
    numpy, whose TypeError escaped the read: the model was not served, and scan stopped on it.)"""
    net, cache, plain, first, meta, tensors = _cached_s4_model(tmp_path)
    tensors["K"] = tensors["K"].to(dtype)
    save_file(tensors, str(first), metadata=meta)
    with caplog.at_level(logging.WARNING, logger="model.form_cache"):
        rec = net.to_recurrent(cache=cache)
    assert [r["cached"] for r in rec.report] == [False, True]
    assert any("checksum mismatch" in m and first.name in m for m in caplog.messages), caplog.messages
    assert_same_model(plain, rec)
    save_file(tensors, str(first), metadata=meta)  # (the rewrite above replaced it)
    from model.form_cache import scan  # noqa: PLC0415

    assert {p.name: s for p, s, _ in scan(tmp_path)}[first.name] == "damaged"


REPORT_CHANGES = ["no rel_err", "rel_err a string", "rel_err above the tolerance", "modes not the form's",
                  "a layer index"]  # fmt: skip


@pytest.mark.parametrize("change", REPORT_CHANGES)
def test_an_entry_whose_report_is_not_one_the_converter_writes_is_a_miss(change, tmp_path, caplog):
    """The report in an entry's metadata (not under its checksum) must be the converter's: its form, a finite
    rel_err within the tolerance and the form's modes, nothing else; any other is a logged miss and the layer
    is converted again. (One without rel_err was a hit, and the server's load then failed on it, "KeyError:
    'rel_err'": the model was not served; one with a "layer" key renamed that layer in the report.)"""
    net, cache, plain, first, meta, tensors = _cached_s4_model(tmp_path)
    report = json.loads(meta["report"])
    if change == "no rel_err":
        del report["rel_err"]
    elif change == "rel_err a string":
        report["rel_err"] = "small"
    elif change == "rel_err above the tolerance":
        report["rel_err"] = 0.5
    elif change == "modes not the form's":
        report["modes"] += 1
    else:
        report["layer"] = 7
    save_file(tensors, str(first), metadata={**meta, "report": json.dumps(report)})
    with caplog.at_level(logging.WARNING, logger="model.form_cache"):
        rec = net.to_recurrent(cache=cache)
    assert [r["cached"] for r in rec.report] == [False, True]
    assert any("not used" in m and first.name in m for m in caplog.messages), caplog.messages
    assert [sorted(r) for r in rec.report] == [["cached", "form", "layer", "modes", "rel_err"]] * 2
    assert [r["layer"] for r in rec.report] == [0, 1]
    assert_same_model(plain, rec)


def _rewrite(path, change) -> None:
    """Rewrite an entry with `change` applied to its tensors and a checksum that matches them."""
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118
    change(tensors)
    save_file(tensors, str(path), metadata={**meta, "tensors_sha256": tensors_sha256(tensors)})


@pytest.mark.parametrize("arch", ["s4-diagonal", "sashimi"])
def test_a_wrong_entry_with_a_valid_checksum_fails_the_network_check_and_to_recurrent_converts_again(
    arch, tmp_path, caplog
):
    """The modes of every entry scaled by 0.9998 (as an entry written by other code would be), within the
    layers' own tolerance (S4_VERIFY_TOLERANCE 1e-2 here: each entry's step passes its taps) but not the
    network check's 1e-4, which runs at every load and refuses the model; form_cache.to_recurrent (what the
    server calls) then converts without reading the cache, and rewrites it."""
    net = MODELS[arch]()
    cache = FormCache(tmp_path)
    plain = net.to_recurrent(cache=cache, tol=1e-2)

    def scale(t):
        t["mu"] *= 0.9998

    for path in _entries(tmp_path):
        _rewrite(path, scale)
    with pytest.raises(VerificationError, match="does not reproduce"):
        net.to_recurrent(cache=cache, tol=1e-2)
    with caplog.at_level(logging.WARNING, logger="model.form_cache"):
        rec = to_recurrent(net, cache, tol=1e-2)
    assert not any(r["cached"] for r in rec.report)
    assert any("came from the recurrent-form cache" in m for m in caplog.messages), caplog.messages
    assert_same_model(plain, rec)
    assert all(r["cached"] for r in to_recurrent(net, cache, tol=1e-2).report)  # the entries were rewritten


@pytest.mark.parametrize("arch", ["s4-diagonal", "s4-dplr", "s4d", "sashimi"])
def test_an_entry_wrong_in_modes_and_taps_alike_is_refused_by_the_layer_s_own_taps(arch, tmp_path, caplog):
    """An entry whose output scale c and kernel taps K are both ×1.5, with a checksum that matches (what a
    fresh-user trial wrote by hand: the network check, which convolves with the cached taps, passed it, and
    the logits were 13 % off): the taps are checked against the layer's own by dense powers of its state
    matrix, so each such entry is a miss, logged, and the model converted is the model."""
    net = MODELS[arch]()
    cache = FormCache(tmp_path)
    plain = net.to_recurrent(cache=cache)

    def scale(t):
        t["K"] *= 1.5
        if "c" in t:  # (a DPLR entry holds its taps only)
            t["c"] *= 1.5

    for path in _entries(tmp_path):
        _rewrite(path, scale)
    with caplog.at_level(logging.WARNING, logger="model.form_cache"):
        rec = net.to_recurrent(cache=cache)  # no VerificationError: every entry is refused before
    assert not any(r["cached"] for r in rec.report)
    refused = [m for m in caplog.messages if "from the layer's own, by dense powers of its state matrix" in m]
    assert len(refused) == len(rec.report), caplog.messages
    assert_same_model(plain, rec)


def test_an_entry_whose_modes_are_slightly_wrong_is_refused_by_its_own_impulse_response(tmp_path, caplog):
    """Channel 0's slowest mode turned by 1e-4 rad, the taps and checksum left right: its kernel is then
    more than the tolerance (1e-4) off over its first 256 taps (5.7e-4, 3.2e-4 here), yet the network check
    passed the model (its logits 1.5e-5 off over 256 tokens) and each layer was served reported at 1e-6.
    The form an entry makes is now stepped over the taps against them: each such entry is a miss, logged,
    and the model converted is the model."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, d_state=16, kernel="s4d", init="diag-lin",
                      l_max=1024, cauchy_backend="torch")  # fmt: skip
    net = SequenceModel(cfg).eval()
    cache = FormCache(tmp_path)
    plain = net.to_recurrent(cache=cache)
    turn = torch.polar(torch.tensor(1.0, dtype=F64), torch.tensor(1e-4, dtype=F64))
    wrong = []

    def rotate(t):
        mu = torch.view_as_complex(t["mu"]).clone()
        mu[0, mu[0].abs().argmax()] *= turn
        b, c = (torch.view_as_complex(t[k]) for k in ("b", "c"))
        v, taps = c * b, torch.empty_like(t["K"])  # the modes' kernel 2 Re Σ c b μᵗ, in float64
        for n in range(taps.shape[1]):
            taps[:, n], v = 2 * v.real.sum(-1), v * mu
        wrong.append(float((taps - t["K"]).norm() / t["K"].norm()))
        t["mu"] = torch.view_as_real(mu).contiguous()

    for path in _entries(tmp_path):
        _rewrite(path, rotate)
    assert min(wrong) > 1e-4, wrong  # every entry is wrong by more than the tolerance
    with caplog.at_level(logging.WARNING, logger="model.form_cache"):
        rec = net.to_recurrent(cache=cache)
    assert not any(r["cached"] for r in rec.report)
    refused = [m for m in caplog.messages if "the impulse response of its form is" in m]
    assert len(refused) == len(rec.report), caplog.messages
    assert_same_model(plain, rec)


def test_the_taps_by_dense_powers_are_the_cauchy_kernel_s_in_float64():
    """model.recurrent.dense_taps, the check of a cache entry's taps, against the float64 conv kernel (Cauchy
    + Woodbury for S4, Vandermonde for S4D) of several inits, within 1e-12 at the default Δ ≥ 1e-3
    (CACHED_TAPS_TOL is 1e-6: see s4-fout-small-dt)."""
    from model.recurrent import CACHED_TAPS_TOL, dense_taps  # noqa: PLC0415

    for kernel_kind, init, d_state in [("s4", "legs", 64), ("s4", "legt", 16), ("s4", "fout", 32),
                                       ("s4d", "diag-lin", 64), ("s4d", "diag-inv", 16)]:  # fmt: skip
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, d_state=d_state, kernel=kernel_kind,
                          init=init, l_max=1024, cauchy_backend="torch")  # fmt: skip
        net = SequenceModel(cfg)
        k = net.kernels()[0]
        s = {name: t.detach() for name, t in k.ssm(F64).items()}
        with torch.no_grad():
            want = k(k.L, dtype=F64, backend="torch")[:, :VERIFY_TOKENS]
        got = dense_taps(k, s, VERIFY_TOKENS)
        assert float((got - want).norm() / want.norm()) < 1e-12 < CACHED_TAPS_TOL, (kernel_kind, init)


@pytest.mark.parametrize("init", ["legs", "legt", "fout"])
def test_the_float64_kernel_stays_within_the_taps_check_at_small_steps(init):
    """The README's float64 figures by Δ range (the first 256 taps, N 64, L 1,024): within 1e-10 of dense
    powers down to Δ = 1e-4, and within CACHED_TAPS_TOL (1e-6, with room: 1.6e-8 measured for fout) at Δ
    in [1e-6, 1e-5], where the Cauchy kernel loses digits (a tenth of it asserted)."""
    from model.kernel import SSMKernel  # noqa: PLC0415
    from model.recurrent import CACHED_TAPS_TOL, dense_taps  # noqa: PLC0415

    for dt_min, dt_max, bound in [(1e-4, 1e-3, 1e-10), (1e-6, 1e-5, CACHED_TAPS_TOL / 10)]:
        torch.manual_seed(0)
        k = SSMKernel(16, 64, 1024, kind="s4", init=init, dt_min=dt_min, dt_max=dt_max, backend="torch")
        with torch.no_grad():
            s = {name: t.detach() for name, t in k.ssm(F64).items()}
            want = dense_taps(k, s, VERIFY_TOKENS)
            got = k(k.L, dtype=F64, backend="torch")[:, :VERIFY_TOKENS]
        err = float((got - want).norm() / want.norm())
        assert err <= bound, (init, dt_min, err)


def test_a_folder_safetensors_cannot_write_is_logged_once_and_the_model_converts(tmp_path, caplog,
                                                                                monkeypatch):  # fmt: skip
    """safetensors reports a read-only folder (a volume mounted :ro, chmod 555 for the server's user) as a
    SafetensorError, not an OSError: it stopped a fresh-user trial's server from serving anything."""
    from safetensors import SafetensorError  # noqa: PLC0415

    from model import form_cache  # noqa: PLC0415

    def read_only(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: Read-only file system (os error 30)")

    monkeypatch.setattr(form_cache, "save_file", read_only)
    cache = FormCache(tmp_path)
    with caplog.at_level(logging.WARNING, logger="model.form_cache"):
        rec = s4_model().to_recurrent(cache=cache)
    assert not any(r["cached"] for r in rec.report) and not list(tmp_path.iterdir())
    assert sum("cannot be written" in m and "Read-only file system" in m for m in caplog.messages) == 1


def test_entries_of_the_wrong_shape_are_refused_naming_what_is_wrong(tmp_path, caplog):
    net = s4_model()
    cache = FormCache(tmp_path)
    net.to_recurrent(cache=cache)
    first, second = _entries(tmp_path)
    _rewrite(first, lambda t: t.update(K=t["K"][:, :-1].clone()))
    _rewrite(second, lambda t: t.update(c=t["c"][:, :-1].clone()))
    hits, misses = cache.hits, cache.misses
    with caplog.at_level(logging.WARNING, logger="model.form_cache"):
        rec = net.to_recurrent(cache=cache)
    assert not any(r["cached"] for r in rec.report)
    assert (cache.hits - hits, cache.misses - misses) == (0, 2)  # (a misfit entry is a miss, not a hit)
    text = "\n".join(caplog.messages)
    assert "its kernel taps are torch.float64[32, 255], the layer needs float64[32, 256]" in text
    assert "its modes are" in text and "not float64 (32, M, 2) each" in text


def test_a_cache_that_cannot_be_written_is_logged_once_and_the_model_converts(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = FormCache(blocker / "cache")
    with caplog.at_level(logging.WARNING, logger="model.form_cache"):
        rec = s4_model().to_recurrent(cache=cache)
    assert not any(r["cached"] for r in rec.report) and cache.misses == 2
    assert sum("cannot be written" in m for m in caplog.messages) == 1, caplog.messages


def test_the_server_reads_the_cache_at_a_restart_and_reports_it(tmp_path, caplog):
    """Two starts of a server on one checkpoint and one cache folder: the first converts every layer, the
    second reads every one; the log line, the metrics and the generated tokens say so."""
    from model.checkpoint import save  # noqa: PLC0415
    from server.config import Settings  # noqa: PLC0415
    from server.metrics import Metrics  # noqa: PLC0415
    from server.registry import load_models  # noqa: PLC0415
    from server.sessions import SessionTable  # noqa: PLC0415

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, d_state=16, l_max=512, cauchy_backend="torch")
    folder = save(SequenceModel(cfg).eval(), tmp_path / "m")
    settings = Settings(checkpoints=[str(folder)], recurrent_cache=str(tmp_path / "cache"), max_sessions=2,
                        torch_threads=1)  # fmt: skip
    runs = []
    for _ in range(2):
        metrics = Metrics()
        with caplog.at_level(logging.INFO, logger="server.models"):
            caplog.clear()
            models, failed = load_models(settings, SessionTable(), metrics)
        assert failed == {}
        rec = models["m"].rec
        line = next(m for m in caplog.messages if m.startswith("model m:"))
        gauge = metrics.recurrent_form_layers
        layers = [gauge.labels("m", src)._value.get() for src in ("cache", "converted")]
        runs.append((line, *layers))
        assert metrics.load_seconds.labels("m", "convert")._value.get() > 0
        runs[-1] += (rec,)
    (line1, hit1, conv1, rec1), (line2, hit2, conv2, rec2) = runs
    assert "(0 of 2 layers from the recurrent-form cache)" in line1 and (hit1, conv1) == (0, 2)
    assert "(2 of 2 layers from the recurrent-form cache)" in line2 and (hit2, conv2) == (2, 0)
    assert_same_model(rec1, rec2)
    off = Settings(checkpoints=[str(folder)], recurrent_cache="", max_sessions=2, torch_threads=1)
    with caplog.at_level(logging.INFO, logger="server.models"):
        caplog.clear()
        models, _ = load_models(off, SessionTable(), Metrics())
    assert "(recurrent-form cache off)" in next(m for m in caplog.messages if m.startswith("model m:"))
    assert "recurrent-form cache: off (S4_RECURRENT_CACHE is empty)" in caplog.messages
    assert_same_model(rec1, models["m"].rec)


def test_the_server_builds_the_fused_step_before_it_times_any_model_s_load(tmp_path, monkeypatch):
    """The first model's "converted in … s" (and s4_model_load_seconds{phase="convert"}) counted the fused
    C step's compilation, 5–6 s at a start without a build (a fresh-user trial took a 7.2 s load from the
    cache for a slow cache): the server builds or loads the library before the first model."""
    from model import fused  # noqa: PLC0415
    from model.checkpoint import save  # noqa: PLC0415
    from server import registry  # noqa: PLC0415
    from server.config import Settings  # noqa: PLC0415
    from server.metrics import Metrics  # noqa: PLC0415
    from server.sessions import SessionTable  # noqa: PLC0415

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, d_state=16, l_max=512, cauchy_backend="torch")
    folder = save(SequenceModel(cfg).eval(), tmp_path / "m")
    calls = []
    library, load_model = fused.library, registry.load_model
    monkeypatch.setattr(fused, "library", lambda: calls.append("library") or library())
    monkeypatch.setattr(
        registry, "load_model", lambda *a, **k: calls.append("load_model") or load_model(*a, **k)
    )
    settings = Settings(checkpoints=[str(folder)], recurrent_cache="", max_sessions=2, torch_threads=1)
    models, failed = registry.load_models(settings, SessionTable(), Metrics())
    assert failed == {} and list(models) == ["m"]
    assert calls[0] == "library" and calls.index("load_model") > 0, calls


def test_the_server_reports_what_the_cache_holds_and_how_to_prune_it(tmp_path, caplog):
    """After loading, the server logs what its recurrent-form cache holds (entries it reads; stale ones, of
    another converter or torch, which it never reads and an upgrade leaves behind; crashed writes) with the
    command that deletes the latter, and exports the bytes of each as s4_recurrent_cache_bytes{status}."""
    import os  # noqa: PLC0415
    import time  # noqa: PLC0415

    from model import form_cache  # noqa: PLC0415
    from model.checkpoint import save  # noqa: PLC0415
    from server.config import Settings  # noqa: PLC0415
    from server.metrics import Metrics  # noqa: PLC0415
    from server.registry import load_models  # noqa: PLC0415
    from server.sessions import SessionTable  # noqa: PLC0415

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, d_state=16, l_max=512, cauchy_backend="torch")
    folder, cache = save(SequenceModel(cfg).eval(), tmp_path / "m"), tmp_path / "cache"
    settings = Settings(
        checkpoints=[str(folder)], recurrent_cache=str(cache), max_sessions=2, torch_threads=1
    )

    def start() -> tuple[str, dict[str, float]]:
        metrics = Metrics()
        with caplog.at_level(logging.INFO, logger="server.models"):
            caplog.clear()
            assert load_models(settings, SessionTable(), metrics)[1] == {}
        line = next(m for m in caplog.messages if m.startswith(f"recurrent-form cache {cache}: "))
        gauge = metrics.recurrent_cache_bytes
        return line, {st: gauge.labels(st)._value.get() for st in form_cache.STATUSES}

    line, got = start()
    entries = _entries(cache)
    size = sum(p.stat().st_size for p in entries)
    assert line == f"recurrent-form cache {cache}: 2 current entries ({size / 1e6:.1f} MB)"
    assert got == {**dict.fromkeys(form_cache.STATUSES, 0.0), "current": size}
    stale = cache / ("a" * 64 + ".safetensors")  # an entry of another torch, as an upgrade leaves them
    with safe_open(str(entries[0]), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(stale), metadata={**meta, "key": stale.stem, "torch": "1.0.0"})
    crashed = cache / ".tmp-000000000000.safetensors"
    crashed.write_bytes(b"\0" * 10)
    os.utime(crashed, (time.time() - 2 * form_cache.TMP_AGE_S,) * 2)
    line, got = start()
    mb = stale.stat().st_size / 1e6
    assert line == (
        f"recurrent-form cache {cache}: 2 current entries ({size / 1e6:.1f} MB); 1 stale ({mb:.1f} MB: "
        "another converter or torch, never read here), 1 partial (0.0 MB: crashed writes): `python -m "
        f"model.form_cache {cache} --prune` deletes them"
    )
    assert got == {**dict.fromkeys(form_cache.STATUSES, 0.0), "current": size, "stale": stale.stat().st_size,
                   "partial": 10}  # fmt: skip


def test_the_command_lists_what_a_folder_holds_and_prunes_all_but_current_entries(tmp_path, capsys):
    """python -m model.form_cache FOLDER [--prune]: a model's entries are current; an entry of another torch
    (its metadata says so) is stale, a truncated one damaged, a write's temporary file partial once older than
    TMP_AGE_S (else being written), a file of something else other. --prune deletes the stale, damaged and
    partial ones only, and the model still loads every layer from what is left."""
    import os  # noqa: PLC0415
    import time  # noqa: PLC0415

    from model import form_cache  # noqa: PLC0415

    net = s4_model()
    cache = FormCache(tmp_path)
    net.to_recurrent(cache=cache)  # 2 current entries
    first, second = _entries(tmp_path)
    stale, damaged = tmp_path / ("a" * 64 + ".safetensors"), tmp_path / ("b" * 64 + ".safetensors")
    stale.write_bytes(first.read_bytes())
    with safe_open(str(stale), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(stale), metadata={**meta, "key": stale.stem, "torch": "1.0.0"})
    damaged.write_bytes(second.read_bytes()[:1000])
    old, young = tmp_path / ".tmp-000000000000.safetensors", tmp_path / ".tmp-111111111111.safetensors"
    for path in (old, young):
        path.write_bytes(b"\0" * 10)
    os.utime(old, (time.time() - 2 * form_cache.TMP_AGE_S,) * 2)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    status = {path.name: s for path, s, _ in form_cache.scan(tmp_path)}
    assert status == {first.name: "current", second.name: "current", stale.name: "stale",
                      damaged.name: "damaged", old.name: "partial", young.name: "writing",
                      "notes.txt": "other", "dangling": "other"}  # fmt: skip
    assert form_cache.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 current (" in out and "1 stale (" in out and "1 damaged (" in out and "1 partial (" in out
    for name, s in status.items():  # each file that is not a current entry or a write in progress, named
        assert (f"  {s}: {name}" in out) == (s not in ("current", "writing")), name
    assert form_cache.main([str(tmp_path), "--prune"]) == 0
    assert "pruned 3 files" in capsys.readouterr().out
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([first.name, second.name, young.name, "notes.txt", "dangling"])
    assert all(r["cached"] for r in net.to_recurrent(cache=FormCache(tmp_path)).report)
    for name, why in [("none", "no such folder"), ("notes.txt", "a file, not a folder")]:
        folder = tmp_path / name
        with pytest.raises(SystemExit) as exc:
            form_cache.main([str(folder)])
        assert exc.value.code == 2 and why in capsys.readouterr().err
