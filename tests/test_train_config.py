"""The training CLI refuses a wrong config before it trains or writes anything: every [train] and [data]
field is range- and type-checked, [model] by ModelConfig; each user error is one line on stderr naming
`section.key` and the value, exit status 2, no traceback. Ctrl-C is one line and status 130. A run's
config.json is a config too, so the model card's command runs."""

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from model.card import training_command
from model.train import ConfigError, DataConfig, TrainConfig, load_config, main, train

ROOT = Path(__file__).resolve().parent.parent
PROG = "python -m model.train: error: "


def tiny_toml(path: Path, data: Path, out: Path, **train) -> Path:
    t = {"steps": 6, "warmup": 1, "eval_every": 0, "ckpt_every": 2, "log_every": 1, "final_eval": False,
         "threads": 1, "out": str(out), **train}  # fmt: skip
    cfg = {
        "model": {"d_model": 16, "n_layers": 1, "d_state": 8, "l_max": 32, "cauchy_backend": "torch"},
        "data": {"path": str(data), "seq_len": 32, "batch_size": 4},
        "train": t,
    }
    path.write_text("\n".join(f"[{s}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in tbl.items())
                              for s, tbl in cfg.items()) + "\n")  # fmt: skip
    return path


# (field, bad value, what the message must say after "section.field must be "): every field
TRAIN_BAD = [
    ("steps", 0, "an integer ≥ 1"),
    ("steps", -5, "an integer ≥ 1"),
    ("steps", "abc", "an integer ≥ 1"),
    ("steps", 10.0, "an integer ≥ 1"),
    # (a helper's audit: 10^309 steps was an OverflowError traceback at the first progress line)
    ("steps", 10**12 + 1, "at most 10^12 = 1,000,000,000,000"),
    ("lr", "fast", "a finite number > 0"),
    ("lr", 0, "a finite number > 0"),
    ("lr", math.inf, "a finite number > 0"),
    # (a helper's audit: 1e38 passed and was a RuntimeError traceback in AdamW's first step)
    ("lr", 1e38, "a finite number > 0, at most 10"),
    ("ssm_lr", 1e39, "a finite number ≥ 0, at most 10 (0 freezes the SSM parameters)"),
    ("ssm_lr", -1e-3, "a finite number ≥ 0"),
    ("weight_decay", -0.1, "a finite number ≥ 0"),
    ("betas", [0.9], "two numbers in [0, 1)"),
    ("betas", [0.9, 1.0], "two numbers in [0, 1)"),
    ("betas", "0.9", "two numbers in [0, 1)"),
    ("warmup", -1, "an integer ≥ 0"),
    ("warmup", 1.5, "an integer ≥ 0"),
    ("min_lr_ratio", 1.5, "a number in [0, 1]"),
    ("grad_clip", -1.0, "a finite number > 0, or 0 for no clipping"),
    ("grad_clip", math.nan, "a finite number > 0, or 0"),
    ("eval_every", -1, "an integer ≥ 1, or 0"),
    ("eval_every", 2.5, "an integer ≥ 1, or 0"),
    ("eval_tokens", -1, "an integer ≥ 1, or 0 (all)"),
    ("ckpt_every", "often", "an integer ≥ 1, or 0"),
    ("log_every", 0, "an integer ≥ 1"),
    ("seed", -1, "an integer in [0, 2^32 − 1"),
    ("seed", 1.5, "an integer in [0, 2^32 − 1"),
    ("threads", -2, "an integer ≥ 1, or 0"),
    ("out", "", "a folder path"),
    ("out", 3, "a folder path"),
    ("export", False, 'a folder path, or ""'),
    ("init", 7, 'a checkpoint folder, or ""'),
    ("final_eval", "yes", "true or false"),
]
DATA_BAD = [
    ("path", "", "a folder path"),
    ("seq_len", 0, "an integer ≥ 1"),
    ("seq_len", "long", "an integer ≥ 1"),
    ("batch_size", 0, "an integer in [1, 65,536]"),
    ("batch_size", 2.0, "an integer in [1, 65,536]"),
    ("eval_stride", -1, "an integer in [0, data.seq_len = 1024]"),
    ("eval_stride", 2048, "an integer in [0, "),
]


def test_every_field_has_bad_value_cases():
    assert {f.name for f in fields(TrainConfig)} == {name for name, _, _ in TRAIN_BAD}
    assert {f.name for f in fields(DataConfig)} == {name for name, _, _ in DATA_BAD}


@pytest.mark.parametrize(
    "cls,section,name,value,allowed",
    [(TrainConfig, "train", *c) for c in TRAIN_BAD] + [(DataConfig, "data", *c) for c in DATA_BAD],
    ids=[f"train.{n}={v!r}" for n, v, _ in TRAIN_BAD] + [f"data.{n}={v!r}" for n, v, _ in DATA_BAD],
)
def test_a_bad_value_is_refused_naming_section_key_and_value(cls, section, name, value, allowed):
    with pytest.raises(ConfigError) as err:
        cls(**{name: value})
    shown = list(value) if isinstance(value, tuple) else value
    assert str(err.value).startswith(f"{section}.{name} must be {allowed}")
    assert str(err.value).endswith(f", got {shown!r}")


def test_the_off_values_and_edges_are_accepted():
    t = TrainConfig(steps=1, warmup=1, grad_clip=0, eval_every=0, ckpt_every=0, eval_tokens=0, ssm_lr=0,
                    lr=1, min_lr_ratio=0, betas=[0.0, 0.5])  # fmt: skip
    assert t.betas == (0.0, 0.5) and t.grad_clip == 0
    assert TrainConfig(steps=10, warmup=50).warmup == 50  # a quick run of a config: the peak is not reached
    assert DataConfig(seq_len=8, eval_stride=8).eval_stride == 8


def test_whole_numbers_in_the_float_fields_train_as_their_floats(text_data, tmp_path):
    """TOML writes `betas = [0, 0]`, `lr = 1`, `weight_decay = 0` as integers: the checks take them, and the
    run is the one the same values written as floats give, bit for bit (`train.betas = [0, 0]` was a
    ValueError traceback from AdamW at its first step: "betas must be either both floats or both Tensors")."""
    from safetensors.torch import load_file

    ints = {"betas": [0, 0], "lr": 1, "ssm_lr": 0, "weight_decay": 0, "min_lr_ratio": 1, "grad_clip": 1}
    floats = {k: ([float(x) for x in v] if isinstance(v, list) else float(v)) for k, v in ints.items()}
    for name, values in (("ints", ints), ("floats", floats)):
        main([str(tiny_toml(tmp_path / f"{name}.toml", text_data, tmp_path / name, steps=3, **values))])
    a = load_file(str(tmp_path / "ints" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "floats" / "last" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # tolerance 0


# the trial's inputs, and today's good messages that came with tracebacks
CLI_ERRORS = [
    (["train.grad_clip=-1.0"], "train.grad_clip must be a finite number > 0, or 0 for no clipping, got -1.0"),
    (["train.steps=abc"], "train.steps must be an integer ≥ 1, got 'abc'"),
    (["train.steps=0"], "train.steps must be an integer ≥ 1, got 0"),
    (["train.steps=-5"], "train.steps must be an integer ≥ 1, got -5"),
    (["train.steps=1" + "0" * 400], "train.steps must be at most 10^12 = 1,000,000,000,000, got 1000"),
    (["train.lr=fast"], "train.lr must be a finite number > 0, at most 10, got 'fast'"),
    (["train.lr=1e38"], "train.lr must be a finite number > 0, at most 10, got 1e+38"),
    (["model.d_model=3.5"], "model.d_model must be an integer ≥ 1, got 3.5"),
    (["model.dropout=2.0"], "model.dropout must be in [0, 1), got 2.0"),
    (["model.kernel=s5"], "model.kernel must be one of ['s4', 's4d'], got 's5'"),
    (["model.cauchy_backend=keopz"], "model.cauchy_backend must be one of ['auto', 'keops', 'torch'], got"),
    (["data.batch_size=0"], "data.batch_size must be an integer in [1, 65,536] (sequences per step, all"),
    (["data.seq_len=100000"], "data.seq_len must be ≤ the training split's "),
    (["train.stepz=3"], "train: unknown config fields: ['stepz'] (help(TrainConfig) lists them)"),
    (["data.pth=x"], "data: unknown config fields: ['pth'] (help(DataConfig) lists them)"),
    (["optim.lr=1"], "unknown config tables: ['optim']"),
    (["steps=3"], "override 'steps=3' must look like section.key=value"),
    (["data.path=/nonexistent/data"], "data.path '/nonexistent/data': /nonexistent/data/meta.json: missing"),
    # the model must fit the data (an audio config on text data trained silently, and exported, before)
    (["model.modality=audio", "model.sample_rate=8000"], "model.modality: an audio model; the data ("),
    (["model.vocab_size=100"], "model.vocab_size: 100 token ids (0 … 99); the data ("),
]


@pytest.mark.parametrize("overrides,message", CLI_ERRORS, ids=[o[0] for o, _ in CLI_ERRORS])
def test_a_user_error_is_one_line_and_exit_status_2_before_anything_is_written(
    text_data, tmp_path, capsys, overrides, message
):
    cfg = tiny_toml(tmp_path / "c.toml", text_data, tmp_path / "run")
    with pytest.raises(SystemExit) as exit_:
        main([str(cfg), *overrides])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(PROG + message), err
    assert not (tmp_path / "run").exists()  # refused up front: no run folder, no untrained export


def test_an_export_never_replaces_a_checkpoint_another_run_or_none_wrote(text_data, tmp_path, capsys):
    """train.export over a folder holding a checkpoint no run wrote (a shipped, converted or copied model),
    or another run's export, is refused before anything is trained or written, naming train.export (the
    shipped audio configs exported into checkpoints/: a run of them replaced the shipped model); the same
    run's own export is written over when it runs again."""
    from model.checkpoint import save
    from model.network import ModelConfig, SequenceModel

    shipped = tmp_path / "shipped"
    save(SequenceModel(ModelConfig(vocab_size=256, d_model=16, n_layers=1, d_state=8, l_max=32)), shipped)
    before = (shipped / "model.safetensors").read_bytes()
    cfg = tiny_toml(tmp_path / "c.toml", text_data, tmp_path / "run", export=str(shipped))
    with pytest.raises(SystemExit) as exit_:
        main([str(cfg)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"{PROG}train.export {str(shipped)!r} holds a checkpoint no training run wrote"), (
        err
    )
    assert (shipped / "model.safetensors").read_bytes() == before and not (tmp_path / "run").exists()
    own = tmp_path / "own"
    cfg = tiny_toml(tmp_path / "c.toml", text_data, tmp_path / "run", export=str(own))
    main([str(cfg)])
    main([str(cfg), "--fresh"])  # the same run again: its own export, written over
    assert json.loads((own / "config.json").read_text())["training"]["config"]["train"]["out"] == str(
        tmp_path / "run"
    )
    other = tiny_toml(tmp_path / "o.toml", text_data, tmp_path / "other", export=str(own))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([str(other)])
    err = capsys.readouterr().err
    assert f"holds the export of another run (train.out {str(tmp_path / 'run')!r})" in err, err
    assert not (tmp_path / "other").exists()


def test_an_export_that_names_this_train_out_but_another_run_is_not_replaced(text_data, tmp_path, capsys):
    """The shipped checkpoints record their configs' own train.out (runs/text-shakespeare), so in a fresh
    clone `configs/text-shakespeare.toml train.export=checkpoints/text-shakespeare` was taken for that
    run's own export: it trained and replaced the shipped model at its end (a new user's trial: 320 steps
    before it was stopped). The run folder's id (`run_id`) tells the runs apart: an export is this run's
    only when it records the id of the run in train.out; a run started over (--fresh, or after a finished
    run without checkpoints) keeps its id and writes over its own export."""
    from model.checkpoint import save
    from model.network import ModelConfig, SequenceModel

    run, shipped = tmp_path / "run", tmp_path / "shipped"
    net = SequenceModel(ModelConfig(vocab_size=256, d_model=16, n_layers=1, d_state=8, l_max=32))
    save(net, shipped, extra={"training": {"config": {"train": {"out": str(run)}}}})  # (as shipped: no id)
    before = (shipped / "model.safetensors").read_bytes()
    cfg = tiny_toml(tmp_path / "c.toml", text_data, run, export=str(shipped))
    for prior_run in (False, True):  # a fresh clone (no run folder), then a run of its own in that folder
        with pytest.raises(SystemExit) as exit_:
            main([str(cfg)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1, err
        assert f"of another run (train.out {str(run)!r}, not the run in that folder now)" in err, err
        assert (shipped / "model.safetensors").read_bytes() == before
        assert not (run / "last").exists()
        if not prior_run:
            main([str(tiny_toml(tmp_path / "c.toml", text_data, run, export=str(tmp_path / "own")))])
            cfg = tiny_toml(tmp_path / "c.toml", text_data, run, export=str(shipped))
            shutil.rmtree(run / "last")
            capsys.readouterr()
    own = json.loads((tmp_path / "own" / "config.json").read_text())["training"]
    assert own["run_id"] == (run / "run_id").read_text().strip() and len(own["run_id"]) == 32
    cfg = tiny_toml(tmp_path / "c.toml", text_data, run, export=str(tmp_path / "own"))
    main([str(cfg), "--fresh"])  # started over: the same run, its own export written over
    again = json.loads((tmp_path / "own" / "config.json").read_text())["training"]
    assert again["run_id"] == own["run_id"]


def test_an_export_another_run_wrote_while_this_one_trained_is_not_replaced(
    text_data, tmp_path, capsys, monkeypatch
):
    """train.export is checked at the start; a run that began while the folder was empty and exported into
    it while this run trained (two runs of one config with their own train.out, the shipped configs'
    export) was replaced at this run's end without a word. Now the export is checked again before it is
    written: refused, one line, exit status 2, the other run's checkpoint left byte for byte, this run's
    state in last/ (which a resume with another train.export exports)."""
    import model.train as mt
    from model.checkpoint import save
    from model.network import ModelConfig, SequenceModel

    shared, run = tmp_path / "shared", tmp_path / "run"
    real = mt.step_batch

    def another_run_exports(*args):  # (at this run's step 3, the other run's export lands in `shared`)
        if args[4] == 3:
            net = SequenceModel(ModelConfig(vocab_size=256, d_model=16, n_layers=1, d_state=8, l_max=32))
            save(net, shared, extra={"training": {"config": {"train": {"out": str(tmp_path / "other")}}}})
        return real(*args)

    monkeypatch.setattr(mt, "step_batch", another_run_exports)
    cfg = tiny_toml(tmp_path / "c.toml", text_data, run, export=str(shared))
    with pytest.raises(SystemExit) as exit_:
        main([str(cfg)])
    err = capsys.readouterr().err.splitlines()
    other_out = str(tmp_path / "other")
    want = f"{PROG}train.export {str(shared)!r} holds the export of another run (train.out {other_out!r})"
    assert exit_.value.code == 2 and err[-1].startswith(want), err
    assert f"{run}/last" in err[-1] and "Traceback" not in "\n".join(err)
    other = json.loads((shared / "config.json").read_text())
    assert other["training"]["config"]["train"]["out"] == str(tmp_path / "other")
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 6
    monkeypatch.setattr(mt, "step_batch", real)
    main([str(run / "config.json"), f"train.export={tmp_path / 'mine'}"])  # the finished run, exported
    mine = json.loads((tmp_path / "mine" / "config.json").read_text())
    assert mine["training"]["config"]["train"]["out"] == str(run)
    assert json.loads((shared / "config.json").read_text()) == other


def test_a_fine_tune_names_train_init_and_keeps_its_serving_settings(text_data, tmp_path, capsys):
    """With train.init, a [model] table whose keys make the checkpoint's config no model (a shipped config's
    own [model], n_layers over the checkpoint's per-layer l_kernel) is refused naming train.init and the
    keys; a word-level checkpoint (vocab.txt) is refused (the data here is bytes); the export keeps the
    checkpoint's chat_template, chat_stop and generation_config, and says so."""
    from model.checkpoint import save
    from model.network import ModelConfig, SequenceModel

    base = tmp_path / "base"
    net = SequenceModel(ModelConfig(vocab_size=256, d_model=16, n_layers=2, d_state=8, l_max=32,
                                    l_kernel=[32, 32], cauchy_backend="torch"))  # fmt: skip
    serving = {"chat_template": "{{ messages[0]['content'] }}", "chat_stop": ["\n\n"],
               "generation_config": {"temperature": 0.8}}  # fmt: skip
    save(net, base, extra=serving)
    cfg = tiny_toml(
        tmp_path / "c.toml", text_data, tmp_path / "run", init=str(base), export=str(tmp_path / "ft")
    )
    with pytest.raises(SystemExit) as exit_:
        main([str(cfg), "model.n_layers=3"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert f"train.init {str(base)!r}: its model config with the [model] table's keys (" in err, err
    assert "n_layers" in err and "leave the [model] table out" in err and not (tmp_path / "run").exists()
    text = cfg.read_text().split("[data]")  # the TOML without its [model] table
    cfg.write_text("[data]" + text[1])
    main([str(cfg)])
    err = capsys.readouterr().err
    assert "keeps train.init's chat_template, chat_stop, generation_config" in err, err
    meta = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert {k: meta[k] for k in serving} == serving and meta["training"]["init"]["path"] == str(base)
    assert "serving" not in meta["training"]["init"]
    words = tmp_path / "words"
    save(net, words, extra={"vocab": {"kind": "words", "file": "vocab.txt", "size": 256}})
    with pytest.raises(SystemExit):
        main(
            [
                str(cfg),
                f"train.init={words}",
                f"train.out={tmp_path / 'w'}",
                f"train.export={tmp_path / 'wx'}",
            ]
        )
    assert "a model of a vocabulary (its vocab.txt: words)" in capsys.readouterr().err


def test_a_config_file_that_is_not_there_or_not_toml_is_one_line(tmp_path, capsys):
    for path, message in [
        (tmp_path / "none.toml", "cannot read it"),
        (tmp_path / "bad.toml", "not valid TOML"),
    ]:
        if path.name == "bad.toml":
            path.write_text("[train\nsteps =")
        with pytest.raises(SystemExit) as exit_:
            main([str(path)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith(f"{PROG}config {str(path)!r}: {message}")
        assert err.count("\n") == 1


def test_resuming_with_another_model_names_what_changed(text_data, tmp_path, capsys):
    cfg = tiny_toml(tmp_path / "c.toml", text_data, tmp_path / "run")
    main([str(cfg), "--stop-at", "2"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(cfg), "model.d_model=32"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert "holds another model (model.d_model: 16 → 32): start over with --fresh or another train.out" in err


def test_the_real_command_prints_no_traceback(text_data, tmp_path):
    cfg = tiny_toml(tmp_path / "c.toml", text_data, tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "model.train", str(cfg), "train.grad_clip=-1.0"], env=env,
                       check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == PROG + "train.grad_clip must be a finite number > 0, or 0 for no clipping, got -1.0\n"


def test_ctrl_c_is_one_line_exit_130_and_the_same_command_resumes(text_data, tmp_path):
    cfg = tiny_toml(tmp_path / "c.toml", text_data, tmp_path / "run", steps=100_000, ckpt_every=3)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "model.train", str(cfg)]
    # `python -m model.train` with Python's own SIGINT handler set first: a shell's background job (`make
    # test &`, some CI runners) starts with SIGINT ignored, which Python then keeps (the run hung so)
    start = "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    start += "runpy.run_module('model.train', run_name='__main__', alter_sys=True)"
    p = subprocess.Popen([sys.executable, "-c", start, str(cfg)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and log.read_text().count("\n") >= 4) and time.monotonic() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = err.strip().splitlines()[-1]
    state = json.loads((tmp_path / "run" / "last" / "state.json").read_text())
    done = int(last.split("interrupted after step ")[1].split(";")[0])
    # the last save (every 3 steps) up to the step done (the signal may land between a step and its save)
    assert done >= 4 and state["step"] % 3 == 0 and done - 3 <= state["step"] <= done, (done, state["step"])
    assert last == (f"interrupted after step {done}; {tmp_path / 'run'}/last holds step {state['step']}: "
                    "the same command resumes from there")  # fmt: skip
    r = subprocess.run([*cmd, "--stop-at", str(state["step"] + 1)], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=120, check=False)  # fmt: skip
    assert r.returncode == 0 and f"resuming {tmp_path / 'run'} at step {state['step']}" in r.stderr


@pytest.mark.parametrize("tty", [False, True])
def test_each_status_line_is_one_write_so_a_ctrl_c_cannot_split_it_from_its_newline(monkeypatch, tty):
    """The status and validation lines were `print`ed: the line and its newline in two writes, and a Ctrl-C
    landing between them (a KeyboardInterrupt raised after the first) left the line unended, so "interrupted
    after step N; …" was written on its end (a fresh-clone CI run failed
    test_ctrl_c_is_one_line_exit_130_and_the_same_command_resumes so: `… eta 0:09:03interrupted after step
    20; …`). Each line is now one write, with its newline."""
    from model.train import Progress

    writes: list[str] = []

    class Stderr:
        def write(self, text):
            writes.append(text)
            if len(writes) == 1:  # (a SIGINT handled right after the first write)
                raise KeyboardInterrupt

        def flush(self):
            pass

        def isatty(self):
            return tty

    monkeypatch.setattr(sys, "stderr", Stderr())
    progress = Progress(total=10, start=0, every=2, enabled=True)
    with pytest.raises(KeyboardInterrupt):
        progress.validated(1, {"bits_per_token": 2.5, "tokens": 100})
    assert len(writes) == 1 and writes[0].endswith("validation: 2.5000 bits/token over 100 tokens\n"), writes
    writes.clear()
    writes.append("")  # (no interrupt from here on)
    progress.update(1, 5.25, 1000.0)
    progress.close()
    lines = writes[1:]
    if tty:  # redrawn in place, then ended by close
        assert len(lines) == 2 and lines[0].startswith("\r[") and lines[1] == "\n", lines
    else:
        assert len(lines) == 1 and lines[0].startswith("[") and lines[0].endswith("\n"), lines
        assert "2/10 loss 5.2500" in lines[0], lines


def test_grad_clip_zero_is_no_clipping(text_data, tmp_path):
    """grad_clip = 0 (off) trains exactly as a bound no gradient reaches; a negative one is refused above."""
    losses = {}
    for clip in (0, 1e9):
        out = tmp_path / f"clip{clip}"
        train(load_config(tiny_toml(tmp_path / "c.toml", text_data, out, steps=4, grad_clip=clip, lr=0.05)))
        recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        losses[clip] = [r["loss"] for r in recs if "loss" in r]
        assert all(r["grad_norm"] > 0 for r in recs if "loss" in r)
    assert losses[0] == losses[1e9] and losses[0][-1] < losses[0][0]


def test_the_model_cards_command_trains_from_the_runs_config_json(text_data, tmp_path, capsys):
    """The card's "Command" is `python -m model.train RUN/config.json`: a run's config.json (JSON, the
    config as run) is read like a TOML config, overrides included; here it resumes a stopped run."""
    run = tmp_path / "run"
    cfg = load_config(tiny_toml(tmp_path / "c.toml", text_data, run))
    train(cfg, stop_at=2)
    assert load_config(run / "config.json") == cfg
    argv = shlex.split(training_command(run))
    assert argv[:3] == ["python", "-m", "model.train"]
    main(argv[3:])
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 6
    assert f"resuming {run} at step 2" in capsys.readouterr().err
    assert load_config(run / "config.json", ["train.steps=8"])["train"]["steps"] == 8
    ckpt = tmp_path / "ckpt" / "config.json"
    ckpt.parent.mkdir()
    ckpt.write_text(json.dumps({"format": "s4-checkpoint", "config": cfg["model"]}))
    with pytest.raises(ConfigError, match="a checkpoint's config.json is not a training config"):
        load_config(ckpt)


def test_the_model_card_of_a_fine_tune_states_the_defaults_it_ran_with_and_where_its_weights_came_from(
    text_data, tmp_path
):
    """A run that leaves out lr, ssm_lr, weight_decay and grad_clip ran with TrainConfig's defaults: the
    card says those, not None. A fine-tune of an official import (a checkpoint with a `source` block)
    says so in its export's `training.init` and in the card, with the import's file, SHA-256 and dataset."""
    from model.card import main as card

    train(
        load_config(
            tiny_toml(tmp_path / "b.toml", text_data, tmp_path / "base", export=str(tmp_path / "imp"))
        )
    )
    meta = json.loads((tmp_path / "imp" / "config.json").read_text())
    del meta["training"]  # as `model.convert` writes it: the import's provenance, no training block
    meta["source"] = {"from": "state-spaces/s4", "file": "model.ckpt", "sha256": "ab" * 32,
                      "dataset": "wt103", "kind": "lightning"}  # fmt: skip
    (tmp_path / "imp" / "config.json").write_text(json.dumps(meta))
    cfg = load_config(tiny_toml(tmp_path / "t.toml", text_data, tmp_path / "ft", steps=3, final_eval=True,
                                init=str(tmp_path / "imp"), export=str(tmp_path / "ft-ckpt")))  # fmt: skip
    del cfg["model"]  # the import's model
    assert not {"lr", "ssm_lr", "weight_decay", "grad_clip"} & set(cfg["train"])
    train(cfg)
    init = json.loads((tmp_path / "ft-ckpt" / "config.json").read_text())["training"]["init"]
    source = {"from": "state-spaces/s4", "file": "model.ckpt", "sha256": "ab" * 32, "dataset": "wt103"}
    assert init == {"path": str(tmp_path / "imp"), "weights_sha256": meta["weights_sha256"], "source": source}
    exported = json.loads((tmp_path / "ft-ckpt" / "config.json").read_text())  # sampling defaults set by hand
    (tmp_path / "ft-ckpt" / "config.json").write_text(
        json.dumps(exported | {"generation_config": {"top_k": 5}})
    )
    card([str(tmp_path / "ft-ckpt"), "--run", str(tmp_path / "ft")])
    text = (tmp_path / "ft-ckpt" / "README.md").read_text()
    assert '| served sampling defaults (config.json `generation_config`) | {"top_k": 5} |' in text
    training = text.split("## Training", 1)[1].split("## Quality", 1)[0]
    assert "None" not in training, training
    d = TrainConfig()
    assert (
        f"AdamW lr {d.lr} (SSM parameters {d.ssm_lr}, no weight decay), weight decay {d.weight_decay}"
        in training
    )
    assert f"gradient clip {d.grad_clip}" in training
    assert f"Fine-tuned (`train.init`) from `{tmp_path / 'imp'}`" in training
    assert (
        "an import of `model.ckpt` from state-spaces/s4 (file SHA-256 abababababababab…, dataset wt103)"
        in training
    )
    kept = json.loads((tmp_path / "ft-ckpt" / "config.json").read_text())
    assert kept["training"]["init"] == init  # the card rewrites config.json and keeps the record
    assert kept["generation_config"] == {"top_k": 5}  # ... and the sampling defaults


def test_the_text_cards_baseline_paragraph_states_the_baselines_own_bytes_threads_and_hop(
    text_data, tmp_path
):
    """model.card --baseline said the Transformer had "the same number of training bytes" as S4 whatever the
    two metrics.json held (next to both numbers), gave S4's torch threads as the baseline's, and its
    evaluation hop as half its context whatever its data.eval_stride (model.train's evaluate hops by that
    stride). The paragraph now states the baseline's own record."""
    from model.card import main as card

    cfg = load_config(tiny_toml(tmp_path / "s.toml", text_data, tmp_path / "s4", final_eval=True,
                                export=str(tmp_path / "ck")))  # fmt: skip
    s4 = train(cfg)
    base = tmp_path / "tf"
    base.mkdir()
    score = {"nll_nats": 2.0, "bits_per_token": 2.0 / math.log(2), "tokens": 100}
    (base / "metrics.json").write_text(json.dumps({
        "steps": 3, "num_params": 1234, "tokens_seen": s4["tokens_seen"] // 2, "train_wall_s": 60.0,
        "threads": s4["threads"] + 1, "val": score, "test": score}))  # fmt: skip
    data = {"path": str(text_data), "seq_len": 32, "batch_size": 4, "eval_stride": 8}
    (base / "config.json").write_text(json.dumps({"data": data, "train": {"lr": 1e-3, "warmup": 1}}))
    card([str(tmp_path / "ck"), "--run", str(tmp_path / "s4"), "--baseline", str(base)])
    text = (tmp_path / "ck" / "README.md").read_text()
    half, full = s4["tokens_seen"] // 2, s4["tokens_seen"]
    assert f"another number of training bytes ({half:,}; S4: {full:,})" in text, text
    assert f"{s4['threads'] + 1} thread(s) (S4: {s4['threads']})" in text
    assert "windows of 32 bytes hopping by 8." in text


def test_the_model_card_states_the_cpu_the_run_trained_on_not_the_one_it_is_written_on(text_data, tmp_path):
    """The card's "Wall time … on cpu (1 torch thread(s), 1 process(es); AMD EPYC, 2 cores)" read the CPU from
    the machine writing the card, which need not be the one that trained (a run on a GPU box, its card written
    on a laptop). model.train records the CPU in metrics.json ("cpu"), and the card states that record (a run
    from before the record: "CPU not recorded")."""
    from model.card import main as card

    run = tmp_path / "run"
    train(load_config(tiny_toml(tmp_path / "t.toml", text_data, run, final_eval=True,
                                export=str(tmp_path / "ck"))))  # fmt: skip
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "cpu": "Another CPU 9000, 64 cores"}))
    card([str(tmp_path / "ck"), "--run", str(run)])
    training = (tmp_path / "ck" / "README.md").read_text().split("## Training", 1)[1].split("## Quality")[0]
    assert "1 process(es); Another CPU 9000, 64 cores)." in training, training
    from model.train import cpu_model

    assert metrics["cpu"] == cpu_model()  # what model.train recorded: this machine's
    del metrics["cpu"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    card([str(tmp_path / "ck"), "--run", str(run)])
    assert "1 process(es); CPU not recorded" in (tmp_path / "ck" / "README.md").read_text()


def test_a_save_cut_between_its_renames_leaves_the_previous_checkpoint_and_a_resume_finds_it(
    tmp_path, monkeypatch
):
    """save_state never leaves last/ missing: it used to remove last/ and then rename last.tmp, so a
    Ctrl-C (or a kill) between the two lost the run's checkpoint and the next start began at step 0 (a
    trial's SIGINT landed there). Now last → last.old → last.tmp → last, and recover_last puts last.old
    back; a Ctrl-C during a save is deferred to its end (sigint_deferred)."""
    import torch
    from torch import nn

    from model.train import recover_last, save_state, sigint_deferred

    net = nn.Linear(2, 2)
    opt = torch.optim.AdamW(net.parameters())
    save_state(tmp_path, net, opt, 3, {})
    real = Path.rename

    def cut(self, target):
        if self.name == "last.tmp":
            raise KeyboardInterrupt  # between "last → last.old" and "last.tmp → last"
        return real(self, target)

    monkeypatch.setattr(Path, "rename", cut)
    with pytest.raises(KeyboardInterrupt):
        save_state(tmp_path, net, opt, 6, {})
    monkeypatch.setattr(Path, "rename", real)
    assert not (tmp_path / "last").exists() and (tmp_path / "last.old" / "state.json").is_file()
    recover_last(tmp_path)
    assert json.loads((tmp_path / "last" / "state.json").read_text())["step"] == 3
    save_state(tmp_path, net, opt, 9, {})
    assert json.loads((tmp_path / "last" / "state.json").read_text())["step"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # (a background job ignores it)
    try:
        reached_end = False
        with pytest.raises(KeyboardInterrupt):
            with sigint_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                reached_end = True
        assert reached_end  # raised at the block's end, not inside it
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_before_the_first_save_says_the_command_starts_over(tmp_path, capsys, monkeypatch):
    """Interrupted before anything was saved, the line said "nothing was saved yet: the same command resumes
    from there", where there is nothing to resume: it starts over, and says so now."""
    import model.train as mt
    from model.train import TrainingInterrupted

    def interrupted(*args, **kwargs):
        raise TrainingInterrupted(13, 0, tmp_path / "run")

    monkeypatch.setattr(mt, "train", interrupted)
    path = tmp_path / "c.toml"
    path.write_text("[train]\nsteps = 1\n")
    with pytest.raises(SystemExit) as code:
        main([str(path)])
    assert code.value.code == 130
    assert capsys.readouterr().err.strip() == (
        "interrupted after step 13; nothing was saved yet: the same command starts over"
    )
