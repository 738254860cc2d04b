"""The trainer's edges a helper's audit found faults at (2026-12-06): a resume that changes the optimizer's
settings, a fresh start's folder, divergence, splits too small, train.init changed on resume, values past
their bounds, unreadable run state. Each test failed on the code before its fix."""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import ROOT, read_log, tiny_config

from model.train import ConfigError, Diverged, load_config, main, run_id, train


def _run(text_data, out, **kw):
    return tiny_config(
        text_data, out, **{"steps": 8, "ckpt_every": 4, "final_eval": False, "eval_every": 0, **kw}
    )


def test_a_resume_applies_a_changed_lr_weight_decay_and_betas(text_data, tmp_path):
    """Resumed with train.lr, ssm_lr, weight_decay and betas changed: the optimizer's groups take them (they
    kept the saved values while the log and config.json said the new ones), and the run differs from the
    unchanged resume; the unchanged resume is the uninterrupted run, bit for bit."""
    for name in ("same", "changed", "whole"):
        train(_run(text_data, tmp_path / name), stop_at=0 if name == "whole" else 4)
    train(_run(text_data, tmp_path / "same"))
    new = {"lr": 3e-2, "ssm_lr": 2e-3, "weight_decay": 0.3, "betas": [0.5, 0.6]}
    train(_run(text_data, tmp_path / "changed", **new))
    groups = json.loads((tmp_path / "changed" / "last" / "state.json").read_text())["param_groups"]
    by_name = {g["name"]: g for g in groups}
    assert {tuple(g["betas"]) for g in groups} == {(0.5, 0.6)}
    ssm = [g for n, g in by_name.items() if "ssm" in n]
    assert ssm and all(g["base_lr"] == 2e-3 for g in ssm)
    assert all(g["base_lr"] == 3e-2 for n, g in by_name.items() if "ssm" not in n)
    assert {g["weight_decay"] for g in groups} <= {0.0, 0.3} and any(g["weight_decay"] == 0.3 for g in groups)
    w = {n: load_file(str(tmp_path / n / "last" / "model.safetensors")) for n in ("same", "changed", "whole")}
    assert all(torch.equal(w["same"][k], w["whole"][k]) for k in w["whole"])
    assert any(not torch.equal(w["changed"][k], w["whole"][k]) for k in w["whole"])
    whole = {r["step"]: r["lr"] for r in read_log(tmp_path / "whole") if "lr" in r}
    lrs = {r["step"]: r["lr"] for r in read_log(tmp_path / "changed") if "lr" in r and r["step"] > 4}
    assert len(lrs) == 4 and all(lr == pytest.approx(3 * whole[k]) for k, lr in lrs.items())  # 3e-2 / 1e-2


def test_a_resume_cut_short_while_it_trims_the_log_leaves_a_folder_a_fresh_start_empties(
    text_data, tmp_path, monkeypatch
):
    """A resume rewrites log.jsonl through a temporary file beside it (`trim_log`); stopped between its write
    and its rename (Ctrl-C, a kill), it left log.tmp, which is not one of the run's own entries, so the run
    folder was refused by a fresh start ("holds log.tmp: not a training run's folder") that it must accept.
    The temporary file is the run's now: --fresh empties the folder (a plain resume writes it anew)."""
    run = _run(text_data, tmp_path / "run")
    train(run, stop_at=4)
    replace = Path.replace

    def cut(self, target):
        if Path(target).name == "log.jsonl":
            raise KeyboardInterrupt  # after the temporary file is written, before it is renamed
        return replace(self, target)

    monkeypatch.setattr(Path, "replace", cut)
    with pytest.raises(KeyboardInterrupt):
        train(run)
    monkeypatch.setattr(Path, "replace", replace)
    left = {p.name for p in (tmp_path / "run").iterdir()}
    assert left - {"config.json", "log.jsonl", "last", "run_id"}, left  # (the temporary file is there)
    train(run, fresh=True, stop_at=2)
    assert [r["step"] for r in read_log(tmp_path / "run") if "loss" in r] == [1, 2]
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"config.json", "log.jsonl", "last", "run_id"}


@pytest.mark.parametrize("kind", ["notes", "dataset", "checkpoint", "file"])
def test_a_fresh_start_refuses_to_empty_a_folder_that_is_not_a_runs(text_data, tmp_path, kind):
    """A fresh start emptied whatever train.out named (a folder of notes, the dataset, a shipped checkpoint);
    it is refused now, naming what is there, and nothing is deleted; a run's own folder (and an empty one)
    is started over as before."""
    out = tmp_path / "target"
    if kind == "notes":
        out.mkdir()
        (out / "notes.txt").write_text("keep")
    elif kind == "dataset":
        shutil.copytree(text_data, out)
    elif kind == "checkpoint":
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"format": "s4-checkpoint", "config": {}}))
    else:
        out.write_text("a file")
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    with pytest.raises(ConfigError, match="train.out .*(not a training run's folder|is a file)"):
        train(_run(text_data, out), fresh=True)
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else None) == before
    run = tmp_path / "run"
    train(_run(text_data, run), stop_at=2)
    (run / "export").mkdir()  # the run's own export inside it is the run's too
    (run / "export" / "config.json").write_text(  # (with the run's id, as its exports record it)
        json.dumps({"training": {"config": {"train": {"out": str(run)}}, "run_id": run_id(run)}})
    )
    train(_run(text_data, run), fresh=True, stop_at=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    train(_run(text_data, empty), stop_at=2)


def test_divergence_stops_the_run_before_the_step_and_keeps_the_last_good_state(text_data, tmp_path, capsys):
    """lr 10 (the most train.lr may be) without warmup: the loss turns NaN within a few steps. The run stops
    at the first non-finite loss or gradient norm, before taking that step and before saving anything after
    it (it trained on, overwrote last/ with NaN weights and wrote bare NaN into its JSON logs); the CLI says
    so in one line, exit 1."""
    cfg = _run(text_data, tmp_path / "run", lr=10.0, ssm_lr=10.0, grad_clip=0.0, warmup=0)
    cfg["train"]["ckpt_every"] = 1
    with pytest.raises(Diverged) as exc:
        train(cfg)
    d = exc.value
    assert d.step >= 2 and d.saved == d.step - 1 and not (math.isfinite(d.loss) and math.isfinite(d.gnorm))
    state = json.loads((tmp_path / "run" / "last" / "state.json").read_text())
    assert state["step"] == d.saved
    weights = load_file(str(tmp_path / "run" / "last" / "model.safetensors"))
    assert all(bool(torch.isfinite(v).all()) for v in weights.values())
    for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in the log"))
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({**cfg, "train": {**cfg["train"], "out": str(tmp_path / "cli")}}))
    with pytest.raises(SystemExit) as code:
        main([str(path)])
    assert code.value.code == 1
    err = capsys.readouterr().err
    assert "training diverged at step" in err and "the step was not taken" in err and "Traceback" not in err


@pytest.mark.parametrize("split, n", [("val", 0), ("val", 1), ("test", 0), ("train", 65)])
def test_splits_too_small_for_the_run_are_refused_before_it_starts(text_data, tmp_path, split, n):
    """An empty or one-token validation or test split failed with a traceback at the first validation or
    after the whole run; a training split of seq_len + 1 tokens passed the check and failed in the sampler
    ("65 tokens, fewer than seq_len + 1 = 65"). Each is a ConfigError naming the split, before training."""
    data = tmp_path / "data"
    shutil.copytree(text_data, data)
    tokens = np.fromfile(data / f"{split}.bin", dtype=np.uint8)[:n]
    tokens.tofile(data / f"{split}.bin")
    meta = json.loads((data / "meta.json").read_text())
    meta.setdefault("tokens", {})[split] = n
    (data / "meta.json").write_text(json.dumps(meta))
    cfg = _run(data, tmp_path / "run", eval_every=4)
    cfg["train"]["final_eval"] = True
    want = "data.seq_len must be ≤ the training split's 65 tokens − 2" if split == "train" else (
        f"its {split} split has {n} tokens, fewer than the 2")  # fmt: skip
    with pytest.raises(ConfigError, match=want):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_a_resume_may_not_change_train_init(text_data, tmp_path):
    """A run resumes from its own last/: a train.init changed, added or removed on resume was taken, and the
    export named a checkpoint its weights do not descend from. Refused now; the same train.init resumes."""
    from model import save
    from model.train import build_s4

    base = tmp_path / "base"
    save(build_s4(tiny_config(text_data, tmp_path)["model"]), base)
    other = tmp_path / "other"
    shutil.copytree(base, other)
    cfg = _run(text_data, tmp_path / "ft", init=str(base))
    cfg.pop("model")
    train(cfg, stop_at=2)
    for init in (str(other), ""):
        with pytest.raises(ConfigError, match=r"a resume goes on from its last/.*leave train.init as it was"):
            train({**cfg, "train": {**cfg["train"], "init": init}})
    plain = _run(text_data, tmp_path / "plain")
    train(plain, stop_at=2)
    with pytest.raises(ConfigError, match="was started from fresh weights"):
        train({**plain, "model": {}, "train": {**plain["train"], "init": str(base)}})
    train(cfg)  # the same train.init: resumes


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.seed", 2**32, r"train.seed .*2\^32 − 1"),
        ("train.seed", 10**14, r"train.seed"),
        ("train.threads", 100_000, "train.threads .*at most 1024"),
        ("data.batch_size", 10**20, r"data.batch_size .*\[1, 65,536\]"),
        ("data.batch_size", 10**8, "data.batch_size"),
    ],
)
def test_values_past_their_bounds_are_refused_when_the_config_is_read(tmp_path, key, value, message):
    """They crashed late: a seed of 10^14 overflowed the dropout seed at the first step, 100,000 threads was
    a SIGSEGV, a batch of 10^20 a traceback and 10^8 an unbounded allocation."""
    from model.train import run_configs

    path = tmp_path / "c.toml"
    path.write_text("[train]\nsteps = 1\n")
    with pytest.raises(ConfigError, match=message):
        run_configs(load_config(path, [f"{key}={value}"]))


def test_a_binary_config_and_unreadable_run_state_are_clear_errors(text_data, tmp_path):
    """A config that is not UTF-8 was a UnicodeDecodeError traceback; a run whose last/ is corrupt was a
    SafetensorError or JSONDecodeError traceback; a run config.json cut short failed every resume. Now
    ConfigErrors naming the file, and a cut config.json is written again."""
    path = tmp_path / "c.toml"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(path)
    run = tmp_path / "run"
    cfg = _run(text_data, run)
    train(cfg, stop_at=4)
    (run / "config.json").write_text("")  # cut short
    train(cfg, stop_at=6)
    assert json.loads((run / "config.json").read_text())["train"]["out"] == str(run)
    for name, content in (("model.safetensors", b"junk"), ("state.json", b"{")):
        broken = tmp_path / f"broken-{name}"
        shutil.copytree(run, broken)
        (broken / "last" / name).write_bytes(content)
        with pytest.raises(ConfigError, match=r"last.*cannot be read"):
            train({**cfg, "train": {**cfg["train"], "out": str(broken)}})


def test_a_resumed_runs_log_reads_as_the_uninterrupted_runs(text_data, tmp_path):
    """With log_every 4, a run stopped at 3 and at 6 logs the lines an uninterrupted run logs (each resume
    logged an extra line at its first step)."""
    for name, stops in (("whole", [0]), ("parts", [3, 6, 0])):
        for stop in stops:
            train({**_run(text_data, tmp_path / name), "train": {**_run(text_data, tmp_path / name)["train"],
                                                                 "log_every": 4}}, stop_at=stop)  # fmt: skip
    steps = {n: [r["step"] for r in read_log(tmp_path / n) if "loss" in r] for n in ("whole", "parts")}
    assert steps["whole"] == [1, 4, 8] and steps["parts"] == steps["whole"]


@pytest.mark.parametrize("damage", ["cut", "kind", "missing", "meta", "count"])
def test_a_damaged_dataset_folder_is_refused_naming_the_file(text_data, tmp_path, damage):
    """A train.bin cut to 1,000 bytes trained silently (meta.json's byte counts were never compared), a kind
    "txt" was read as text, a missing test.bin and an invalid meta.json were tracebacks, as was a byte count
    in meta.json that is not an integer (a ValueError from formatting it in the message meant to name it)."""
    data = tmp_path / "data"
    shutil.copytree(text_data, data)
    meta = json.loads((data / "meta.json").read_text())
    if damage == "cut":
        (data / "train.bin").write_bytes((data / "train.bin").read_bytes()[:1000])
        want = r"train.bin: 1,000 bytes, where meta.json records"
    elif damage == "kind":
        (data / "meta.json").write_text(json.dumps({**meta, "kind": "txt"}))
        want = "kind 'txt', not 'text' or 'audio'"
    elif damage == "missing":
        (data / "test.bin").unlink()
        want = r"test.bin: missing"
    elif damage == "count":
        (data / "meta.json").write_text(json.dumps({**meta, "tokens": {**meta["tokens"], "val": "218,000"}}))
        want = r"meta.json: tokens\.val must be an integer ≥ 0 \(the val split's bytes\), not '218,000'"
    else:
        (data / "meta.json").write_text("{")
        want = "meta.json: not readable JSON"
    with pytest.raises(ConfigError, match=f"data.path .*{want}"):
        train(_run(data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["train.out", "train.export", "--dump-grads"])
def test_an_unwritable_output_is_refused_before_training(text_data, tmp_path, flag):
    """An export under a file (or /proc) failed with a traceback after the whole run and its final
    evaluation; a train.out or --dump-grads there at their first write. Refused first, naming the flag."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cfg = _run(text_data, tmp_path / "run")
    dump = None
    if flag == "train.out":
        cfg["train"]["out"] = str(blocker / "run")
    elif flag == "train.export":
        cfg["train"]["export"] = str(blocker / "export")
    else:
        dump = str(blocker / "grads.safetensors")
    with pytest.raises(ConfigError, match=f"{flag} .*a-file is a file, not a folder"):
        train(cfg, dump_grads=dump)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "meta, want",
    [
        ({}, r"an audio dataset's sample_rate must be an integer ≥ 1 \(Hz\), not None"),
        ({"sample_rate": "8000"}, r"an audio dataset's sample_rate must be an integer ≥ 1 .*, not '8000'"),
        ({"sample_rate": 8000, "quantization": "a-law"}, r"audio quantization must be one of .*'a-law'"),
        ({"sample_rate": 8000, "mulaw": "alaw"}, r"mu-law convention must be one of .*'alaw'"),
    ],
    ids=["no-rate", "rate-a-string", "quantization", "mulaw"],
)
def test_an_audio_datasets_rate_and_codec_are_checked_naming_its_meta_json(tmp_path, meta, want):
    """An audio meta.json without a sample_rate was a KeyError traceback, one of an unknown quantization or
    mu-law convention a ValueError traceback, and a sample_rate "8000" was blamed on model.sample_rate. Each
    is a ConfigError naming data.path and its meta.json now, before anything is written."""
    data = tmp_path / "digits"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, clips in (("train", 8), ("val", 2), ("test", 2)):
        rng.integers(0, 256, size=clips * 64, dtype=np.uint8).tofile(data / f"{split}.bin")
    (data / "meta.json").write_text(json.dumps({"kind": "audio", "clip_len": 64, **meta}))
    cfg = _run(data, tmp_path / "run")
    with pytest.raises(ConfigError, match=rf"data.path .*digits/meta\.json: {want}"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_an_update_that_leaves_non_finite_weights_is_neither_saved_nor_exported(text_data, tmp_path, capsys):
    """train.weight_decay 1e300: the first update multiplies the matrices by about −1e297 (inf in float32)
    while that step's loss and gradient were finite. Its weights were saved in last/ as "the last good
    state" (ckpt_every 1), and a one-step run's export was a ValueError traceback after a final evaluation
    of NaN. The run stops at that update now (Diverged, `weights`), nothing saved or exported; the CLI
    says so in one line, exit 1."""
    export = tmp_path / "export"
    cfg = _run(text_data, tmp_path / "run", weight_decay=1e300, export=str(export))
    cfg["train"]["ckpt_every"] = 1
    with pytest.raises(Diverged) as exc:
        train(cfg)
    d = exc.value
    assert d.weights and d.step == 1 and d.saved == 0 and math.isfinite(d.loss) and math.isfinite(d.gnorm)
    assert not (tmp_path / "run" / "last").exists() and not export.exists()
    one = {**cfg, "train": {**cfg["train"], "steps": 1, "final_eval": True, "out": str(tmp_path / "cli")}}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(one))
    with pytest.raises(SystemExit) as code:
        main([str(path)])
    assert code.value.code == 1
    err = capsys.readouterr().err
    assert "training diverged at step 1: its update left non-finite weights" in err and "Traceback" not in err
    assert "lower train.lr or train.weight_decay" in err
    assert not export.exists() and not (tmp_path / "cli" / "metrics.json").exists()


@pytest.mark.parametrize("where", ["out", "out/last", "out/last/export"])
def test_an_export_over_the_runs_own_files_is_refused_before_training(text_data, tmp_path, where):
    """train.export = train.out: the export's config.json replaced the run's at the end, so resuming with
    runs/NAME/config.json failed ("unknown config tables"), as did model.card --run; an export inside last/
    was deleted by the next save. Refused before anything is trained or written, naming train.export."""
    out = tmp_path / "run"
    cfg = _run(text_data, out, export=str(tmp_path / where.replace("out", "run", 1)))
    want = "train.out itself" if where == "out" else "inside train.out's last/"
    with pytest.raises(ConfigError, match=rf"train.export '.*' is {want}"):
        train(cfg)
    assert not out.exists()
    train({**cfg, "train": {**cfg["train"], "export": str(out / "export")}})  # (beside the run's files: fine)
    assert json.loads((out / "config.json").read_text()) == cfg | {
        "train": {**cfg["train"], "export": str(out / "export")}
    }


def test_a_resume_on_a_training_split_that_changed_is_refused_naming_data_path(text_data, tmp_path):
    """The data folder prepared again between a stop and its resume (one byte of train.bin different, its
    size and meta.json as a preparation writes them): the resume drew its batches from the new bytes, a run
    no uninterrupted run would have taken, and said nothing. last/state.json records the split's SHA-256
    now, and a resume on another split is refused naming data.path; the same split (copied elsewhere
    too) resumes."""
    data = tmp_path / "data"
    shutil.copytree(text_data, data)
    cfg = _run(data, tmp_path / "run")
    train(cfg, stop_at=4)
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    tokens = np.fromfile(data / "train.bin", dtype=np.uint8)
    tokens[100] ^= 1
    tokens.tofile(data / "train.bin")
    meta = json.loads((data / "meta.json").read_text())
    meta["sha256"]["train"] = hashlib.sha256(tokens.tobytes()).hexdigest()
    (data / "meta.json").write_text(json.dumps(meta))
    want = (
        r"data.path '.*data': its training split is not the one .*run trained on \(SHA-256 [0-9a-f]{12}… in "
    )
    with pytest.raises(
        ConfigError, match=want + r".*state.json, [0-9a-f]{12}… now: prepared again or changed"
    ):
        train(cfg)
    assert json.loads((tmp_path / "run" / "last" / "state.json").read_text())["step"] == 4
    train({**cfg, "data": {**cfg["data"], "path": str(moved)}})  # the same bytes elsewhere: resumes
    assert json.loads((tmp_path / "run" / "last" / "state.json").read_text())["step"] == 8


@pytest.mark.parametrize("step", [-3, 1.5, None, "x", math.inf])
def test_a_resume_reads_last_states_step_checked(text_data, tmp_path, step):
    """last/state.json's step edited: -3, null and Infinity were tracebacks (ValueError, TypeError,
    OverflowError), 1.5 resumed at step 1 without a word, "x" was "holds another model". Each is a
    ConfigError naming the file, the key and the value now, and nothing is trained."""
    cfg = _run(text_data, tmp_path / "run")
    train(cfg, stop_at=2)
    path = tmp_path / "run" / "last" / "state.json"
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "step": step}))
    with pytest.raises(
        ConfigError, match=rf"last/state.json: step must be an integer ≥ 0, got {step!r}: restore"
    ):
        train(cfg)
    assert [r["step"] for r in read_log(tmp_path / "run") if "loss" in r] == [1, 2]


def test_a_second_run_into_a_folder_a_run_is_writing_is_refused_and_the_first_ends_whole(text_data, tmp_path):
    """Two runs into one train.out at once: the second (started while the first holds the folder, here from
    inside the first's model build) is refused naming train.out, and the first ends as if alone: its weights
    bit for bit an uninterrupted run's, its log every step once, its config.json its own. Before, the second
    (a --fresh start) emptied the folder under the first and trained into it: the first resumed the second's
    last/ and config.json said the second's seed."""
    from model.train import build_s4

    out = tmp_path / "run"
    train(_run(text_data, tmp_path / "whole"))
    train(_run(text_data, out), stop_at=4)
    refused = []

    def build_and_start_another(model_cfg):
        if not refused:
            refused.append(None)  # (the second run builds a model too: only the first starts one)
            with pytest.raises(ConfigError, match=r"train\.out .* is in use: another training run") as exc:
                train(_run(text_data, out, seed=1), fresh=True)
            refused[0] = str(exc.value)
        return build_s4(model_cfg)

    train(_run(text_data, out), build_model=build_and_start_another)
    assert refused[0] and str(out) in refused[0]
    want = load_file(str(tmp_path / "whole" / "last" / "model.safetensors"))
    got = load_file(str(out / "last" / "model.safetensors"))
    assert all(torch.equal(want[k], got[k]) for k in want)  # tolerance 0: bit for bit
    assert [r["step"] for r in read_log(out) if "loss" in r] == list(range(1, 9))
    assert json.loads((out / "config.json").read_text())["train"].get("seed", 0) == 0


def test_a_refused_run_leaves_no_folder_it_made_and_a_killed_run_no_lock(text_data, tmp_path):
    """The folder a run makes to hold it is removed when the config is then refused (the model does not fit
    the data: checked after); a run killed with SIGKILL leaves no lock behind (the kernel drops it): the same
    command resumes."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "new" / "run"
    with pytest.raises(ConfigError, match="model.vocab_size"):
        cfg = _run(text_data, out)
        cfg["model"]["vocab_size"] = 100
        train(cfg)
    assert not (tmp_path / "new").exists()  # (nor the folder above it that it made)
    train(_run(text_data, out), stop_at=4)
    # a process holding the folder as a run does (RunLock), killed with SIGKILL
    code = (
        "import sys, time; from model.train import RunLock; from pathlib import Path; "
        "RunLock().acquire(Path(sys.argv[1]), True, 'cpu'); print('held', flush=True); time.sleep(600)"
    )
    cmd = [sys.executable, "-c", code, str(out)]
    holder = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="is in use"):
            train(_run(text_data, out))
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    train(_run(text_data, out))
    assert json.loads((out / "last" / "state.json").read_text())["step"] == 8


def test_a_train_out_whose_filesystem_cannot_lock_trains_with_a_warning(
    text_data, tmp_path, monkeypatch, capsys
):
    """A train.out on a filesystem without flock (an NFS mount without its lock daemon answers ENOLCK, some
    FUSE and CIFS mounts EOPNOTSUPP): the run trains as every run did before the lock, with one warning
    naming train.out. It was an OSError traceback from fcntl.flock before the first step (the lock's
    file left open), so no run could train into such a folder."""
    import errno
    import fcntl

    real = fcntl.flock
    refused = []

    def no_locks(fd, op):
        refused.append(op)
        raise OSError(errno.ENOLCK, "No locks available")

    out = tmp_path / "run"
    train(_run(text_data, tmp_path / "whole"))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    train(_run(text_data, out))
    monkeypatch.setattr(fcntl, "flock", real)
    assert refused, "the run never tried to lock train.out"
    said = capsys.readouterr().err
    assert f"train.out {str(out)!r}: its filesystem cannot lock it (No locks available)" in said, said
    want = load_file(str(tmp_path / "whole" / "last" / "model.safetensors"))
    got = load_file(str(out / "last" / "model.safetensors"))
    assert all(torch.equal(want[k], got[k]) for k in want)  # tolerance 0: the run as without the lock


def test_every_process_reaches_the_run_locks_collective_if_train_out_cannot_be_opened(tmp_path, monkeypatch):
    """With several processes, the main one alone opens train.out; when it cannot (a file where the folder
    should be), it still joins the collective the others wait in, then raises; another process learns it
    there and raises the same ConfigError. The main one raised before the collective: the other processes
    waited in all_reduce for it forever. (The collective is stood in for: one process, its calls counted,
    the other's sum given.)"""
    import model.train as mt

    calls = []
    monkeypatch.setattr(mt, "all_sum", lambda x, device: calls.append(x) or x)
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"train\.out .*run': cannot open it \(File exists\)"):
        mt.RunLock().acquire(tmp_path / "run", True, "cpu")
    assert len(calls) == 1, "the main process raised without joining the collective"
    monkeypatch.setattr(mt, "all_sum", lambda x, device: x + mt.RUN_UNOPENED)  # (the main one's code)
    with pytest.raises(ConfigError, match=r"train\.out .*run': cannot open it \(on the main process\)"):
        mt.RunLock().acquire(tmp_path / "run", False, "cpu")


def test_a_refused_run_removes_the_folder_it_made_before_letting_go_of_it(text_data, tmp_path, monkeypatch):
    """A run whose config is refused after it took train.out (a folder it made) removes that folder while it
    still holds it. It let go first and removed the folder after: a second run that took the folder in that
    moment (here, at the first run's close of its lock) held a folder removed under it, and every write of
    its run failed. Now the second run makes the folder anew and holds it."""
    import os
    import stat

    from model.train import RunLock

    out = tmp_path / "new" / "run"
    real_close, second, taken = os.close, RunLock(), []

    def close_then_take(fd):
        lock = stat.S_ISDIR(os.fstat(fd).st_mode)  # (the run's lock: its fd on the folder)
        real_close(fd)
        if lock and not taken:  # (once: the second run takes the folder the moment the first lets go)
            taken.append(fd)
            second.acquire(out, True, "cpu")

    cfg = _run(text_data, out)
    cfg["model"]["vocab_size"] = 100  # (refused after the lock is taken: the model does not fit the data)
    monkeypatch.setattr(os, "close", close_then_take)
    try:
        with pytest.raises(ConfigError, match="model.vocab_size"):
            train(cfg)
    finally:
        monkeypatch.setattr(os, "close", real_close)
    try:
        assert second.fd is not None, "the second run never took the folder"
        assert out.is_dir() and os.path.samestat(os.fstat(second.fd), os.stat(out))
    finally:
        second.release()


def test_a_run_that_opened_train_out_before_a_refused_run_removed_it_holds_the_folder_made_anew(
    tmp_path, monkeypatch
):
    """The lock is on the folder's inode: a second run that opened train.out just before the run that made it
    was refused and removed it (emptied, while still held), then took its lock, held a folder no longer
    there, and every write of its run failed. Now it sees the folder at train.out is not the one it locked,
    and makes and takes it anew. (The two runs' steps are interleaved by hand: the first lets go inside the
    second's flock call.)"""
    import fcntl
    import os

    from model.train import RunLock

    out = tmp_path / "new" / "run"
    first, second = RunLock(), RunLock()
    first.acquire(out, True, "cpu")  # (it made new/ and new/run/)
    real = fcntl.flock

    def first_lets_go_then_lock(fd, op):
        if first.fd is not None:  # (the second run's first flock: the first run is refused and lets go)
            first.release()
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", first_lets_go_then_lock)
    second.acquire(out, True, "cpu")
    try:
        assert second.fd is not None and out.is_dir(), "the second run holds a folder removed under it"
        assert os.path.samestat(os.fstat(second.fd), os.stat(out))
    finally:
        second.release()
    assert not (tmp_path / "new").exists()  # (the second run made them again: it removes them, empty)


def test_a_run_refused_because_another_holds_train_out_leaves_the_folder_both_made(tmp_path, monkeypatch):
    """Two runs started at once into a missing train.out both see it missing and make it; the one that then
    loses the lock is refused. It removed the folder it 'made' as it let go, the folder the other run held,
    still empty: every write of the run that held it failed. Now a refused run leaves it. (Interleaved by
    hand: the first run takes the folder inside the second's flock call.)"""
    import fcntl
    import os

    from model.train import RunLock

    out = tmp_path / "run"
    first, second = RunLock(), RunLock()
    real, taken = fcntl.flock, []

    def first_takes_it_then_lock(fd, op):
        if not taken:  # (the second run's flock: the first run, which found train.out made, locks it first)
            taken.append(fd)
            first.acquire(out, True, "cpu")
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", first_takes_it_then_lock)
    try:
        with pytest.raises(ConfigError, match="is in use"):
            second.acquire(out, True, "cpu")
        second.release()
        assert first.fd is not None and out.is_dir(), "the refused run removed the folder the other holds"
        assert os.path.samestat(os.fstat(first.fd), os.stat(out))
    finally:
        first.release()


def test_a_fresh_start_refuses_to_empty_the_folder_holding_its_train_init(text_data, tmp_path):
    """A fresh start (--fresh) into the run folder whose export it fine-tunes (train.init inside train.out):
    refused naming train.init before anything is written, the checkpoint and the run left as they were. It
    emptied the folder, the checkpoint it had just loaded with it: the model to fine-tune was deleted."""
    out = tmp_path / "run"
    train(_run(text_data, out, export=str(out / "export")))
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    again = _run(text_data, out, init=str(out / "export"), export=str(out / "export2"))
    del again["model"]  # (a fine-tune: the checkpoint's model)
    with pytest.raises(
        ConfigError, match=r"train\.init .*export' is inside train\.out .* fresh start empties"
    ):
        train(again, fresh=True)
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


@pytest.mark.parametrize("refusal", ["train.out", "train.export", "train.init"])
def test_every_process_ends_with_the_main_ones_refusal_of_the_run_folder(text_data, tmp_path, refusal):
    """Two processes (gloo, started as torchrun starts them, without its supervisor): a config the main
    process alone refuses (train.out holding a foreign file, a fresh start: check_out_folder; train.export
    under a file: check_writable; train.init inside the train.out a fresh start empties) ends both with exit
    status 2, one line from the main one and nothing from the other. The main process raised before a
    collective the other then waited in, and the other died with a gloo traceback ("Connection reset by
    peer", exit 1)."""
    import socket

    out = tmp_path / "run"
    cfg = _run(text_data, out)
    cfg["model"]["dropout"] = 0.0
    fresh = []
    if refusal == "train.out":
        out.mkdir()
        (out / "notes.txt").write_text("not a run's")
        want = f"train.out {str(out)!r} holds notes.txt"
    elif refusal == "train.export":
        (tmp_path / "a-file").write_text("x")
        cfg["train"]["export"] = str(tmp_path / "a-file" / "export")
        want = "train.export "
    else:
        train(_run(text_data, out, export=str(out / "export")))
        cfg = _run(text_data, out, init=str(out / "export"), export=str(out / "export2"))
        del cfg["model"]
        fresh = ["--fresh"]
        want = f"train.init {str(out / 'export')!r} is inside train.out"
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "model.train", str(path), *fresh],
            cwd=ROOT,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    try:
        ends = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    main_err, other_err = ends[0][1], ends[1][1]
    assert [p.returncode for p in procs] == [2, 2], (main_err[-2000:], other_err[-2000:])
    lines = main_err.strip().splitlines()
    assert lines[-1].startswith(f"python -m model.train: error: {want}"), main_err[-2000:]
    assert "Traceback" not in main_err + other_err and other_err.strip() == "", other_err[-2000:]


def test_only_the_main_process_puts_back_a_save_cut_between_its_renames(text_data, tmp_path, monkeypatch):
    """A save cut between its renames leaves last.old and no last/; the next start puts it back. Under
    torchrun every process did so at once, and the ones whose rename lost the race died with a
    FileNotFoundError traceback (the main one had moved it), writing in train.out without its lock. Now the
    main process alone (the lock's holder) puts it back, and the others wait for it (a barrier) before they
    read last/. (Process 1 of 2 is stood in for: its barrier counted, stopped where it builds the model.)"""
    import model.train as mt

    out = tmp_path / "run"
    train(_run(text_data, out), stop_at=4)
    (out / "last").rename(out / "last.old")  # the save cut between "last → last.old" and "last.tmp → last"
    seen = []

    class Stop(Exception):
        pass

    def stop(model_cfg):
        seen.append(("build", (out / "last").exists(), (out / "last.old").exists()))
        raise Stop

    with monkeypatch.context() as m:
        m.setattr(mt, "setup_distributed", lambda: (1, 2, torch.device("cpu")))
        m.setattr(mt.dist, "barrier", lambda *args, **kwargs: seen.append("barrier"))
        with pytest.raises(Stop):
            train(_run(text_data, out), build_model=stop)
    assert seen == ["barrier", ("build", False, True)], seen  # process 1 left it to the main one
    train(_run(text_data, out))  # the main process puts it back and resumes from it
    assert [r["step"] for r in read_log(out) if "loss" in r] == list(range(1, 9))
    assert not (out / "last.old").exists()
