"""What a fresh user's run of every README command found (2026-12-06): a model card of a run without final
scores, a partial load test over the committed report, bench.official "skipped" with exit 0 when asked
for, a fine-tune's shape refusal that named tensors, not the [model] keys. Each failed before its fix."""

import argparse
import json
import shutil

import pytest
import torch
from test_train import tiny_config

from model import ModelConfig
from model.train import ConfigError, train


def test_a_card_of_a_run_without_final_scores_is_one_line_not_a_traceback(text_data, tmp_path, capsys):
    """`model.card CKPT --run RUN` after a run with train.final_eval = false: a KeyError traceback; now
    argparse's one line (exit 2) saying how to get the scores."""
    from model.card import main

    run = tmp_path / "run"
    cfg = tiny_config(text_data, run, steps=2, final_eval=False, eval_every=0, export=str(tmp_path / "ck"))
    train(cfg)
    assert "test" not in json.loads((run / "metrics.json").read_text())
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "ck"), "--run", str(run)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "no final validation and test scores" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, folder",
    [
        ([], ""),
        (["--quick"], "quick"),
        (["--host", "http://127.0.0.1:8000", "--scenarios", "text-ws", "--users", "1", "8", "64"], "partial"),
        (["--scenarios", "audio"], "partial"),
        (["--users", "1", "2"], "partial"),
        (["--seconds", "3"], "partial"),
        (["--replot"], ""),
        (["--scenarios", "text-ws", "--out", "OUT"], "OUT"),
    ],
)
def test_a_partial_load_test_reports_apart_from_the_full_sweep(argv, folder):
    """The README's `loadtest --host … --scenarios text-ws --users 1 8 64` rewrote the committed
    loadtest/results/report.md, dropping its audio and mixed sections and CSVs; a run of anything but the
    full sweep now reports in loadtest/results/partial/ (ignored by git) unless --out says otherwise."""
    from loadtest.run import HERE, SCENARIOS, report_folder

    ns = argparse.Namespace(out=None, host=None, users=None, seconds=None, scenarios=list(SCENARIOS),
                            quick=False, replot=False)  # fmt: skip
    i = 0
    while i < len(argv):
        key = argv[i][2:]
        vals = []
        while i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            vals.append(argv[i + 1])
            i += 1
        i += 1
        if key in ("quick", "replot"):
            setattr(ns, key, True)
        elif key in ("users", "scenarios"):
            setattr(ns, key, [int(v) for v in vals] if key == "users" else vals)
        else:
            setattr(ns, key, vals[0] if key != "seconds" else float(vals[0]))
    if ns.out:
        assert report_folder(ns) == "OUT"
    else:
        assert report_folder(ns) == HERE / "results" / folder


def test_bench_official_asked_for_without_its_dependencies_or_checkout_exits_2(tmp_path, capsys, monkeypatch):
    """Given --official, a missing checkout or a python without einops, scipy and rich said "skipped" and
    exited 0; now exit 2 naming what is missing. Without --official (the whole benchmark suite) it still
    skips."""
    import importlib.util

    from bench import official

    monkeypatch.delenv("S4_OFFICIAL_DIR", raising=False)
    monkeypatch.setitem(official.OPTIONS, "official", None)
    with pytest.raises(SystemExit) as exc:
        official._configure(argparse.Namespace(official=str(tmp_path)))
    assert exc.value.code == 2 and "no official state-spaces/s4 checkout" in capsys.readouterr().err
    (tmp_path / "src" / "models").mkdir(parents=True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m: None if m == "einops" else real(m))
    monkeypatch.setitem(official.OPTIONS, "official", None)
    with pytest.raises(SystemExit) as exc:
        official._configure(argparse.Namespace(official=str(tmp_path)))
    assert exc.value.code == 2 and "lacks einops" in capsys.readouterr().err
    # omegaconf (src.utils.config's): the other three present, it was not checked, and the run failed on it
    # with the official code's traceback (a fresh-user trial: a PYTHONPATH folder of einops, scipy and rich)
    monkeypatch.setattr(importlib.util, "find_spec", lambda m: None if m == "omegaconf" else object())
    monkeypatch.setitem(official.OPTIONS, "official", None)
    with pytest.raises(SystemExit) as exc:
        official._configure(argparse.Namespace(official=str(tmp_path)))
    err = capsys.readouterr().err
    assert (
        exc.value.code == 2
        and "which lacks omegaconf: install them here (pip install einops scipy rich omegaconf)" in err
    ), err
    monkeypatch.setitem(official.OPTIONS, "official", None)
    assert official._configure(argparse.Namespace(official=None)) is False
    assert "skipped (no official" in capsys.readouterr().out


def test_a_fine_tunes_shape_refusal_names_the_model_keys_that_differ(text_data, tmp_path):
    """train.init with a [model] key that changes a tensor's shape (d_ff) but builds: the refusal named the
    tensors only; it names the key, its value and the checkpoint's."""
    from model import save
    from model.train import build_s4

    base = tmp_path / "base"
    save(build_s4(tiny_config(text_data, tmp_path)["model"]), base)
    cfg = tiny_config(text_data, tmp_path / "ft", steps=2, init=str(base))
    cfg["model"] = {"d_ff": 48, "dropout": 0.0}
    with pytest.raises(ConfigError, match=r"\[model\] d_ff = 48 \(the checkpoint's 0\)"):
        train(cfg)
    shutil.rmtree(tmp_path / "ft", ignore_errors=True)


def test_a_runs_validation_and_final_scores_build_no_autograd_graph(text_data, tmp_path, recwarn):
    """`model.train configs/text-shakespeare.toml train.steps=3` (a fresh user's trial, 2026-12-08) printed
    torch's `UserWarning: Converting a tensor with requires_grad=True to a scalar` at its final scoring:
    7b26bd9 put `cpu_model` between `evaluate` and its `@torch.no_grad()`, so every validation, a run's
    final scores and a model card's eval slice built an autograd graph they never used. Each forward of
    an evaluation runs without gradients, and the run warns of none."""
    from model import build
    from model.data import Dataset
    from model.train import evaluate

    cfg = tiny_config(text_data, tmp_path / "run", steps=2, eval_every=1, eval_tokens=256)
    train(cfg)
    assert [str(w.message) for w in recwarn if "requires_grad" in str(w.message)] == []
    data = Dataset(text_data)
    net = build(ModelConfig(vocab_size=256, d_model=16, n_layers=1, d_state=8, l_max=64,
                            cauchy_backend="torch"))  # fmt: skip
    grad_enabled = []
    net.register_forward_hook(lambda module, args, out: grad_enabled.append(torch.is_grad_enabled()))
    res = evaluate(net, data, data.split("val"), 64, 4, max_tokens=512)
    assert res["tokens"] > 0 and grad_enabled and not any(grad_enabled), grad_enabled
    assert torch.is_grad_enabled()  # (left as it was)


def test_a_card_whose_runs_data_folder_is_not_found_is_one_line_not_a_traceback(text_data, tmp_path, capsys,
                                                                              monkeypatch):  # fmt: skip
    """`model.card CKPT --run RUN` run from another folder than the training's (the run's data.path is
    relative, `data/shakespeare`), or after the data were removed: a FileNotFoundError traceback from
    model.data; now argparse's one line (exit 2) naming --run, data.path and how to prepare the data."""
    from model.card import main

    run, ckpt = tmp_path / "run", tmp_path / "ck"
    train(tiny_config(text_data, run, steps=2, eval_every=0, export=str(ckpt)))
    cfg = json.loads((run / "config.json").read_text())
    cfg["data"]["path"] = "data/shakespeare"  # (the shipped config: relative to the working folder)
    (run / "config.json").write_text(json.dumps(cfg))
    monkeypatch.chdir(tmp_path)  # where no data/ is
    with pytest.raises(SystemExit) as exc:
        main([str(ckpt), "--run", str(run)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err, err
    assert "data.path 'data/shakespeare'" in err and "model.data text --out data/shakespeare" in err, err
