"""The server takes checkpoints of the official state-spaces/s4 code directly: an S4_CHECKPOINTS entry
that is a .ckpt (or a .pt with its config beside it) is converted at load time, cached by the source's
SHA-256 in S4_CONVERT_CACHE, served under its stem or NAME=PATH, and streams over the WebSocket."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import httpx
import pytest
from server_support import ServerThread, reference
from websockets.asyncio.client import connect

from model.checkpoint import load
from model.codecs import MuLaw, to_pcm16
from model.convert import CONVERTER_VERSION
from model.sampling import SamplingParams
from server.config import Settings
from server.launch import free_port
from server.registry import parse_entry, resolve_entry

FIX = Path(__file__).resolve().parent / "fixtures" / "official"


@pytest.fixture(scope="module")
def official_server(tmp_path_factory):
    cache = tmp_path_factory.mktemp("convert-cache")
    settings = Settings(
        checkpoints=[f"bytes-lm={FIX / 's4_bytes.ckpt'}", str(FIX / "s4_bidirectional.ckpt"),
                     str(FIX / "s4d_zoh.pt"), f"sc09-unet={FIX / 'sashimi_sc09_unet.ckpt'}",
                     f"sc09-s4d={FIX / 'sashimi_s4d.ckpt'}", f"sc09-iso={FIX / 's4_sc09.ckpt'}"],
        convert_cache=str(cache), device="cpu", max_sessions=8, torch_threads=1,
    )  # fmt: skip
    srv = ServerThread(settings).start()
    yield srv, cache, settings
    srv.stop()


def test_an_official_ckpt_is_converted_cached_and_streams_over_the_websocket(official_server):
    srv, cache, settings = official_server
    ready = httpx.get(srv.url + "/readyz").json()
    assert "bytes-lm" in ready["models"]
    sha = hashlib.sha256((FIX / "s4_bytes.ckpt").read_bytes()).hexdigest()
    folder = cache / f"{sha}-v{CONVERTER_VERSION}"  # (an older converter's entries are not reused)
    assert (folder / "model.safetensors").is_file() and sha in (folder / "README.md").read_text()

    async def main():
        async with connect(srv.ws_url) as ws:
            await ws.send(json.dumps({"type": "generate", "model": "bytes-lm", "prompt": "hello",
                                      "max_new_tokens": 12, "seed": 3}))  # fmt: skip
            ids = []
            while True:
                m = json.loads(await ws.recv())
                if m["type"] == "token":
                    ids += m["ids"]
                elif m["type"] in ("done", "error"):
                    return ids, m

    ids, done = asyncio.run(main())
    assert done["type"] == "done", done
    assert ids == reference(folder, list(b"hello"), SamplingParams(seed=3), 12)


@pytest.mark.parametrize(
    ("model", "arch", "unet"),
    [("sc09-unet", "sashimi", True), ("sc09-s4d", "sashimi", False), ("sc09-iso", "isotropic", False)],
)
def test_official_audio_ckpts_are_converted_and_stream_official_mulaw(official_server, model, arch, unet):
    """The official U-Net SaShiMi (backbone unet), a SaShiMi of S4D layers and the isotropic backbone under
    the sc09 task convert at startup and serve as our SaShiMi (unet true or false) or isotropic audio model:
    a WebSocket audio stream equals the library reference of the converted folder."""
    srv, _, _ = official_server
    info = httpx.get(f"{srv.url}/v1/models/{model}").json()
    assert info["arch"] == arch and info["sample_rate"] == 16000, info
    folder = srv.state.models[model].path
    assert json.loads((folder / "config.json").read_text())["config"].get("unet") is unet

    async def main():
        async with connect(srv.ws_url) as ws:
            await ws.send(json.dumps({"type": "generate", "model": model, "max_new_tokens": 40,
                                      "seed": 1, "audio_encoding": "pcm16"}))  # fmt: skip
            out = b""
            while not isinstance(m := await ws.recv(), str) or json.loads(m)["type"] != "done":
                out += m if isinstance(m, bytes) else b""
            return out

    want = reference(folder, [128], SamplingParams(seed=1), 40)  # silence: 128, exactly 0.0
    assert asyncio.run(main()) == to_pcm16(MuLaw("s4").decode(want))


def test_refused_official_files_are_reported_by_name_and_the_others_still_serve(official_server):
    srv, _, _ = official_server
    ready = httpx.get(srv.url + "/readyz").json()
    assert ready["ready"] is True
    assert "bidirectional = True" in ready["failed"]["s4_bidirectional"]
    # a vocab-16 model cannot take UTF-8 text prompts: not served (no 500 on a byte >= 16)
    assert "vocab_size >= 256" in ready["failed"]["s4d_zoh"]
    assert f"{FIX / 's4d_zoh.pt'} (converted into " in ready["failed"]["s4d_zoh"]  # the file, not the cache


def test_the_cache_is_reused_while_the_source_is_unchanged(official_server):
    _, cache, settings = official_server
    model_id, folder = resolve_entry(f"bytes-lm={FIX / 's4_bytes.ckpt'}", settings)
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    again = resolve_entry(str(FIX / "s4_bytes.ckpt"), settings)
    assert model_id == "bytes-lm" and again == ("s4_bytes", folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in cache.iterdir() if p.name.startswith(".tmp-")] == []


@pytest.mark.parametrize("damage", ["weights truncated", "weights missing", "vocab.txt edited"])
def test_a_damaged_cache_entry_is_logged_and_converted_again(tmp_path, damage, caplog):
    """A conversion cache entry changed after it was written (a fresh-user trial truncated its weights: the
    server then stopped with `checksum mismatch` at every start): logged, converted again, served."""
    import logging  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    from model.vocab import main as vocab_main  # noqa: PLC0415

    src = tmp_path / "run" / "s4_wt103.ckpt"
    src.parent.mkdir()
    shutil.copy(FIX / "s4_wt103.ckpt", src)
    assert vocab_main([str(FIX / "wt103_data"), "wt103", str(src.parent / "vocab.txt")]) == 0
    settings = Settings(convert_cache=str(tmp_path / "cache"))
    _, folder = resolve_entry(str(src), settings)
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    if damage == "weights truncated":
        weights.write_bytes(good[: len(good) // 2])
    elif damage == "weights missing":
        weights.unlink()
    else:
        (folder / "vocab.txt").write_text((folder / "vocab.txt").read_text().replace("<unk>", "<UNK>"))
    with caplog.at_level(logging.WARNING, logger="model.convert"):
        _, again = resolve_entry(str(src), settings)
    assert again == folder and weights.read_bytes() == good  # (conversions are the same bytes)
    assert any(str(folder) in m and "converting" in m for m in caplog.messages), caplog.messages
    load(folder)  # the checkpoint's own checks pass


def test_an_intact_cache_entry_s_weights_and_its_source_are_hashed_once_per_process(tmp_path, monkeypatch):
    """A server resolves each entry twice at a start (preflight, then the load): the second finds the
    weights intact by their file's mtime and size, without hashing them again (seconds for 1 GB). The
    official source too: its SHA-256 (the cache key, and the provenance `convert` records) was taken at
    each resolve and again by the conversion, so a source was read whole three or four times at a start;
    once now, while its inode, mtime and size stay, and again (a new entry) once it is changed."""
    import os  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    from model import convert as convert_module  # noqa: PLC0415

    src = tmp_path / "s4_bytes.ckpt"
    shutil.copy(FIX / "s4_bytes.ckpt", src)
    settings = Settings(convert_cache=str(tmp_path / "cache"))
    hashed = []
    real = convert_module._sha256
    monkeypatch.setattr(convert_module, "_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    _, folder = resolve_entry(str(src), settings)  # converted
    assert hashed.count("s4_bytes.ckpt") == 1
    for _ in range(3):
        assert resolve_entry(str(src), settings)[1] == folder
    assert hashed.count("model.safetensors") == 1 and hashed.count("s4_bytes.ckpt") == 1
    data = bytearray(src.read_bytes())  # the source changed (its last byte; mtime a second later)
    data[-1] ^= 1
    src.write_bytes(bytes(data))
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert resolve_entry(str(src), settings)[1] != folder  # (a new entry: its key is the new bytes' hash)
    assert hashed.count("s4_bytes.ckpt") == 2


def test_entries_name_a_model_with_name_equals_path():
    assert parse_entry("mine=/x/y.ckpt") == ("mine", Path("/x/y.ckpt"))
    assert parse_entry("/x/a=b.ckpt") == (None, Path("/x/a=b.ckpt"))
    assert parse_entry("checkpoints/text") == (None, Path("checkpoints/text"))


def test_python_m_server_serves_an_official_ckpt_and_streams_it_over_the_websocket(tmp_path):
    """The issue's 'done when': the official .ckpt itself on the command line of `python -m server`."""
    from server import launch

    ckpt = FIX / "s4_bytes.ckpt"
    proc, url = launch.start_server(
        ["--checkpoints", f"official-lm={ckpt}", "--convert-cache", str(tmp_path / "cache"),
         "--max-sessions", "4", "--device", "cpu"],
        timeout_s=300,
    )  # fmt: skip
    try:

        async def main():
            async with connect(url.replace("http", "ws") + "/v1/stream") as ws:
                await ws.send(json.dumps({"type": "generate", "model": "official-lm", "prompt": "abc",
                                          "max_new_tokens": 6, "seed": 0}))  # fmt: skip
                frames = []
                while not frames or frames[-1]["type"] not in ("done", "error"):
                    frames.append(json.loads(await ws.recv()))
                return frames

        frames = asyncio.run(main())
    finally:
        proc.terminate()
        proc.wait(30)
    assert frames[-1]["type"] == "done", frames[-1]
    ids = [i for f in frames if f["type"] == "token" for i in f["ids"]]
    folder = tmp_path / "cache" / f"{hashlib.sha256(ckpt.read_bytes()).hexdigest()}-v{CONVERTER_VERSION}"
    assert ids == reference(folder, list(b"abc"), SamplingParams(seed=0), 6)


def test_a_served_pt_without_its_config_gets_the_servers_advice_not_the_converters_flag(tmp_path):
    src = tmp_path / "model.pt"
    src.write_bytes((FIX / "s4_v3.pt").read_bytes())
    with pytest.raises(ValueError, match="config: missing") as err:
        resolve_entry(str(src), Settings(convert_cache=str(tmp_path / "cache")))
    msg = str(err.value)
    assert (
        "put the run's config.yaml (its .hydra/config.yaml) beside the file as config.yaml or model.yaml"
        in msg
    )
    assert f"python -m model.convert {src} OUT --config CONFIG.yaml" in msg
    assert "pass the run's config.yaml" not in msg  # python -m server has no --config


def test_a_lightning_last_ckpt_serves_under_its_run_folders_name(tmp_path):
    from server.registry import model_id_of

    for run in ("run-a", "run-b"):
        (tmp_path / run / "checkpoints").mkdir(parents=True)
        (tmp_path / run / "checkpoints" / "last.ckpt").write_bytes((FIX / "s4_bytes.ckpt").read_bytes())
    assert model_id_of(str(tmp_path / "run-a" / "checkpoints" / "last.ckpt")) == "run-a"
    model_id, _ = resolve_entry(str(tmp_path / "run-b" / "checkpoints" / "last.ckpt"),
                                Settings(convert_cache=str(tmp_path / "cache")))  # fmt: skip
    assert model_id == "run-b"
    assert model_id_of(f"mine={tmp_path / 'run-a' / 'checkpoints' / 'last.ckpt'}") == "mine"
    assert model_id_of(str(FIX / "s4_bytes.ckpt")) == "s4_bytes"


def test_a_checkpoint_folder_named_like_an_official_file_serves_under_the_id_settings_and_readyz_use(
    tmp_path, model_dirs
):
    """A checkpoint folder whose name ends in .ckpt, .pt or .pth is served under its folder's name (it is no
    official file: resolve_entry), and the id Settings checks for duplicates, and /readyz lists while the
    models load (`expected_ids`), is that one: they took the name's stem ("tiny"), so such a folder beside a
    folder "tiny" was refused as one id given twice, and it was listed as "tiny" still loading while it served
    as "tiny.pt"."""
    import shutil  # noqa: PLC0415

    from server.metrics import Metrics  # noqa: PLC0415
    from server.registry import expected_ids, load_models, model_id_of  # noqa: PLC0415
    from server.sessions import SessionTable  # noqa: PLC0415

    folders = [tmp_path / "tiny.pt", tmp_path / "tiny"]
    for folder in folders:
        shutil.copytree(model_dirs["text"], folder)
    settings = Settings(checkpoints=[str(f) for f in folders], max_sessions=2, recurrent_cache="")
    assert [model_id_of(str(f)) for f in folders] == expected_ids(settings) == ["tiny.pt", "tiny"]
    models, failed = load_models(settings, SessionTable(), Metrics())
    assert list(models) == ["tiny.pt", "tiny"] and failed == {}
    assert model_id_of(str(tmp_path / "gone.ckpt")) == "gone"  # (not there: named as an official file)


def test_a_convert_cache_that_cannot_hold_conversions_refuses_the_official_entries_only(tmp_path, model_dirs):
    """An S4_CONVERT_CACHE that is a file, or under one: each official entry is refused naming the setting;
    with nothing else to serve the server stops before it listens (preflight's problems), and a checkpoint
    folder beside them is still served (the whole server stopped for the official entry's folder: a
    fresh-user trial)."""
    from server.__main__ import preflight
    from server.metrics import Metrics
    from server.registry import load_models
    from server.sessions import SessionTable

    cache = tmp_path / "cachefile"
    cache.write_text("")
    ckpt = str(FIX / "s4_bytes.ckpt")
    for folder, why in [(cache, "not a folder (a file is there); point it at a folder for the converted "
                                "checkpoints"),
                        (cache / "cc", "cannot make the folder (Not a directory)")]:  # fmt: skip
        settings = Settings(checkpoints=[ckpt], convert_cache=str(folder), port=free_port())
        assert preflight(settings) == [
            f"checkpoint {ckpt}: S4_CONVERT_CACHE (--convert-cache) = {folder}: {why}"
        ]
    text = str(model_dirs["text"])
    both = Settings(checkpoints=[ckpt, text], convert_cache=str(cache / "cc"), port=free_port(),
                    max_sessions=2, recurrent_cache="", torch_threads=1)  # fmt: skip
    assert preflight(both) == []
    models, failed = load_models(both, SessionTable(), Metrics())
    assert list(models) == [Path(text).name]
    why = "cannot make the folder (Not a directory)"
    assert failed == {"s4_bytes": f"ConvertError: S4_CONVERT_CACHE (--convert-cache) = {cache / 'cc'}: {why}"}


def test_the_log_says_how_an_official_file_was_converted_or_read_and_how_its_model_steps(
    tmp_path, caplog, monkeypatch
):
    """Serving an official file, the log said nothing of its conversion, nor of its reuse from
    S4_CONVERT_CACHE at a restart, nor how the model's step runs (a fresh-user trial): one line each, once
    per process (a server resolves each entry twice at a start), and the model's line names its step."""
    import logging

    from model import convert
    from server.metrics import Metrics
    from server.registry import load_models
    from server.sessions import SessionTable

    ckpt, cache = FIX / "s4_bytes.ckpt", tmp_path / "cc"
    settings = Settings(checkpoints=[str(ckpt)], convert_cache=str(cache), recurrent_cache="", max_sessions=2,
                        torch_threads=1)  # fmt: skip

    def start() -> tuple[list[str], str]:
        monkeypatch.setattr(convert, "_REPORTED", set())  # (a new process)
        with caplog.at_level(logging.INFO):
            caplog.clear()
            assert load_models(settings, SessionTable(), Metrics())[1] == {}
            resolve_entry(str(ckpt), settings)  # (a second resolution: no second line)
        said = [m for m in caplog.messages if m.startswith((f"{ckpt}: converted", f"{ckpt}: its conversion"))]
        return said, next(m for m in caplog.messages if m.startswith("model s4_bytes: "))

    said, line = start()
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(said) == 1, said
    assert said[0].startswith(f"{ckpt}: converted (converter v{CONVERTER_VERSION}) and verified in ")
    assert said[0].endswith(f" s into {entry} (its model card: README.md there)")
    assert "; steps in C, the whole network (native decode blocks); " in line
    said, _ = start()
    assert said == [f"{ckpt}: its conversion (converter v{CONVERTER_VERSION}) read from {entry}"]


def test_a_converter_fault_on_one_entry_leaves_the_others_served(tmp_path, model_dirs, monkeypatch):
    """An unexpected exception while converting one official entry (a TypeError in the mapping: a SaShiMi
    with S4D layers, a helper's audit) stopped the whole start with a traceback, a good checkpoint beside it
    included: preflight caught only the refusals it expected. Now that entry is a problem like any refusal
    (its type and message), the others are served, and with nothing else to serve the start stops with it
    listed."""
    from server import registry
    from server.__main__ import preflight
    from server.metrics import Metrics
    from server.registry import load_models
    from server.sessions import SessionTable

    def broken(path, *a, **kw):
        raise TypeError("'>' not supported between instances of 'NoneType' and 'NoneType'")

    monkeypatch.setattr(registry, "convert_cached", broken)
    ckpt, text = str(FIX / "s4_bytes.ckpt"), str(model_dirs["text"])
    alone = Settings(checkpoints=[ckpt], convert_cache=str(tmp_path / "cc"), port=free_port())
    assert preflight(alone) == [
        f"checkpoint {ckpt}: TypeError: '>' not supported between instances of 'NoneType' and 'NoneType'"
    ]
    both = Settings(checkpoints=[ckpt, text], convert_cache=str(tmp_path / "cc"), port=free_port(),
                    max_sessions=2, recurrent_cache="", torch_threads=1)  # fmt: skip
    assert preflight(both) == []
    models, failed = load_models(both, SessionTable(), Metrics())
    assert list(models) == [Path(text).name] and list(failed) == ["s4_bytes"]
    assert failed["s4_bytes"].startswith("TypeError: '>' not supported")


def _python_m_server(monkeypatch, *flags: str):
    """`python -m server FLAGS` run in this process (server.__main__.main) with uvicorn's place taken by
    the lifespan's load alone (then the engines stopped): its ServerState once loaded. Nothing listens;
    the process's logging, signals, fd limit and GC are left as they are."""
    import gc
    import logging
    import signal

    import server.__main__ as main_module

    states = []

    class LoadOnly:
        def __init__(self, config, state) -> None:
            self.state = state

        def stop_now(self) -> None:  # (nothing to serve: the load says so, main exits)
            pass

        def run(self) -> None:
            asyncio.run(self.state.load())
            states.append(self.state)
            for m in self.state.models.values():
                m.engine.stop()

    monkeypatch.setattr(main_module, "GracefulServer", LoadOnly)
    monkeypatch.setattr(main_module, "configure_logging", lambda *a: None)
    monkeypatch.setattr(main_module, "raise_fd_limit", lambda *a: None)
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    monkeypatch.setattr(gc, "freeze", lambda: None)
    monkeypatch.setattr(logging, "captureWarnings", lambda *a: None)
    main_module.main([*flags, "--port", str(free_port()), "--max-sessions", "2", "--torch-threads", "1"])
    (state,) = states
    return state


def test_python_m_server_builds_each_checkpoint_once(monkeypatch, model_dirs, tmp_path):
    """The preflight (before the server listens) built every checkpoint, and `load_models` built each one
    again (~50-100 ms apiece for the shipped ones, more for a large one): each checkpoint's weights are now
    read and its network built once, the load going on from what the preflight built."""
    from model import checkpoint

    read, built = checkpoint._load_from, []

    def counted(f, wpath, *args):
        built.append(Path(wpath).parent)
        return read(f, wpath, *args)

    monkeypatch.setattr(checkpoint, "_load_from", counted)
    text, audio = model_dirs["text"], model_dirs["audio"]
    state = _python_m_server(monkeypatch, "--checkpoints", f"{text},{audio}", "--recurrent-cache", "",
                             "--max-audio-s", "0.05")  # fmt: skip
    assert list(state.models) == [text.name, audio.name] and state.failed == {}
    assert sorted(built) == sorted([text, audio]), built  # once each


def test_the_load_seconds_phases_count_an_official_files_conversion_and_add_up_to_the_total(
    monkeypatch, model_dirs, tmp_path
):
    """s4_model_load_seconds{phase="total"} ran from the converted folder's read to the engine: an official
    file's conversion (at the preflight, before the server listens: seconds to minutes) was in no phase.
    Now its phases are "official" (the conversion, or finding it in S4_CONVERT_CACHE), "read" (config,
    weights, the network built), "convert" (the recurrent forms and the network check) and "warm_up" (the
    rest: CUDA graphs, warm-up, engine), which add up to "total"."""
    import time

    from server import registry

    convert, took = registry.convert_cached, []

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = convert(*args, **kwargs)
        took.append(time.perf_counter() - t0)
        return out

    monkeypatch.setattr(registry, "convert_cached", timed)
    ckpt, text = FIX / "s4_bytes.ckpt", model_dirs["text"]
    state = _python_m_server(monkeypatch, "--checkpoints", f"{ckpt},{text}", "--recurrent-cache", "",
                             "--convert-cache", str(tmp_path / "cc"))  # fmt: skip
    assert list(state.models) == ["s4_bytes", text.name]
    phases = {}
    for sample in state.metrics.load_seconds.collect()[0].samples:
        phases.setdefault(sample.labels["model"], {})[sample.labels["phase"]] = sample.value
    for model, seconds in phases.items():
        assert seconds.keys() == {"official", "read", "convert", "warm_up", "total"}, (model, seconds)
        assert all(v >= 0 for v in seconds.values()), (model, seconds)
        parts = seconds["official"] + seconds["read"] + seconds["convert"] + seconds["warm_up"]
        assert seconds["total"] == pytest.approx(parts, rel=1e-9, abs=1e-9), (model, seconds)
    assert len(took) == 1  # the preflight's conversion (the load's resolution: none, the preflight's result)
    assert phases["s4_bytes"]["official"] >= took[0] > 0  # what the operator waited for it
    assert phases["s4_bytes"]["total"] > took[0]
