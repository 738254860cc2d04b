"""`python -m model.train --time-budget S`: one re-plan of train.steps from the measured step time (exact
inside the warmup), written to the run's config.json; a hard stop at the deadline, resumable."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import read_log, tiny_config

import model.train as mt
from model.train import (
    BUDGET_MARGIN,
    BUDGET_REPLAN_AT,
    BUDGET_TIMED,
    BUDGET_WARM,
    TrainConfig,
    lr_scale,
    main,
    replan_steps,
    train,
)

ROOT = Path(__file__).resolve().parents[1]


def test_replan_steps_fits_the_remaining_time_less_the_margin():
    assert replan_steps(13, 0.5, 100.0) == 13 + int(100 * (1 - BUDGET_MARGIN) / 0.5)  # 13 + 192
    assert replan_steps(13, 2.0, 1.0) == 13  # not one more step fits
    assert replan_steps(13, 0.5, -4.0) == 13  # already past the deadline
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="step_s"):
            replan_steps(13, bad, 10.0)


def test_replan_steps_counts_the_validations_left_in_the_plan():
    """A plan of n more steps costs n·step_s plus eval_s for each validation in it: one every eval_every steps
    and one at its last step (a trial's plan made at step 1,429 of a 15 s budget missed the validation at
    1,500 and met the deadline 5 steps short, with no export). Room: 100 s less the 4 % margin = 96 s."""
    # from step 0, 1 s a step, a 5 s validation every 10 steps: 61 steps = 61 s + 7 validations (10, …, 60,
    # and the last at 61) = 96 s; 62 would be 97 s
    assert replan_steps(0, 1.0, 100.0, 10, 5.0) == 61
    assert replan_steps(5, 1.0, 100.0, 10, 5.0) == 5 + 61  # validations at 10, …, 60 and the last (66)
    assert replan_steps(0, 1.0, 100.0, 10, 0.0) == replan_steps(0, 1.0, 100.0) == 96
    assert replan_steps(0, 1.0, 4.0, 10, 5.0) == 0  # one step and its validation do not fit


def test_the_replans_set_each_steps_learning_rate_and_the_first_inside_the_warmup_is_exact(
    text_data, tmp_path
):
    """The run is told 10,000 steps; the budget re-plans it at step 13 (inside the 50-step warmup, so
    exactly: the schedule of a run planned for that many steps from the start) and again after each share
    of the budget in BUDGET_REPLAN_AT. Every logged learning rate is lr_scale's under the plan in effect
    at that step, config.json holds the last plan, and the run ends at it or at the deadline."""
    out = tmp_path / "run"
    cfg = tiny_config(text_data, out, steps=10_000, warmup=50, eval_every=0, ckpt_every=0, final_eval=False,
                      export=str(tmp_path / "ckpt"))  # fmt: skip
    train(cfg, time_budget=6.0)
    log = read_log(out)
    re = [r for r in log if "replanned" in r]
    n_re = BUDGET_WARM + BUDGET_TIMED
    assert re[0]["step"] == n_re and re[0]["replanned"]["steps"][0] == 10_000 and re[0]["exact"] is True
    assert 1 <= len(re) <= 1 + len(BUDGET_REPLAN_AT)
    assert all(r["time_budget_s"] == 6.0 and r["step_s"] > 0 for r in re)
    for a, b in zip(re, re[1:]):  # a chain: each starts from the plan before it, later in the run
        assert b["replanned"]["steps"][0] == a["replanned"]["steps"][1] and b["step"] > a["step"]
        assert b["exact"] == (b["step"] <= 50)
    new = re[-1]["replanned"]["steps"][1]
    assert n_re <= new < 10_000 and cfg["train"]["steps"] == new
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == new  # what a resume names
    steps = [r for r in log if "loss" in r]
    # the run either finished the last plan (and exported) or met the deadline first (and stopped, saved)
    finished = (tmp_path / "ckpt" / "config.json").is_file()
    last = json.loads((out / "last" / "state.json").read_text())["step"]
    assert steps[-1]["step"] == last and (last == new) == finished
    for r in steps:  # the plan in effect: the last re-plan made after fewer steps than this one's index
        plan = 10_000
        for p in re:
            if p["step"] <= r["step"] - 1:
                plan = p["replanned"]["steps"][1]
        want = cfg["train"]["lr"] * lr_scale(r["step"] - 1, TrainConfig(**{**cfg["train"], "steps": plan}))
        assert r["lr"] == pytest.approx(want, rel=1e-12), r["step"]
    if finished:
        saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())["training"]
        assert saved["config"]["train"]["steps"] == new and saved["metrics"]["steps"] == new


def test_the_deadline_stops_the_run_resumably_whatever_the_plan(text_data, tmp_path, monkeypatch, capsys):
    """A plan that cannot fit (the re-plan forced to 10^6 steps) still ends at the deadline: the state is
    saved at the step reached, there is no export, and the re-planned config.json resumes it."""
    monkeypatch.setattr(mt, "replan_steps", lambda done, step_s, left_s, *evals: 1_000_000)
    out = tmp_path / "run"
    cfg = tiny_config(text_data, out, steps=100, warmup=5, eval_every=0, ckpt_every=0, final_eval=False,
                      export=str(tmp_path / "ckpt"))  # fmt: skip
    assert train(cfg, time_budget=3.0) == {}
    err = capsys.readouterr().err
    assert "train.steps 100 -> 1000000" in err and "--time-budget 3 s reached at step" in err
    assert "nothing was exported" in err
    assert f"resume the plan (train.steps 1000000) with `python -m model.train {out / 'config.json'}`" in err
    reached = json.loads((out / "last" / "state.json").read_text())["step"]
    assert BUDGET_WARM + BUDGET_TIMED <= reached < 1_000_000
    assert [r["step"] for r in read_log(out) if "loss" in r] == list(range(1, reached + 1))
    assert not (tmp_path / "ckpt").exists()
    resumed = json.loads((out / "config.json").read_text())
    assert resumed["train"]["steps"] == 1_000_000
    assert train(resumed, stop_at=reached + 2) == {}  # the resume continues from the step reached
    assert json.loads((out / "last" / "state.json").read_text())["step"] == reached + 2
    assert [r["step"] for r in read_log(out) if "loss" in r] == list(range(1, reached + 3))


def test_resuming_a_finished_run_says_so_and_plans_nothing(text_data, tmp_path, capsys):
    """The same command again after a run finished (with or without --time-budget) trains nothing and
    re-runs the final evaluation and export: it says so, instead of "resuming … at step N" alone. A config
    whose train.steps is below the step reached (the TOML again after a --time-budget plan trained past
    it) is refused, naming the ways on, and the run's config.json (the plan) is left as it was."""
    out = tmp_path / "run"
    cfg = tiny_config(text_data, out, steps=4, eval_every=0, final_eval=False, export=str(tmp_path / "ckpt"))
    train(cfg)
    capsys.readouterr()
    train(json.loads(json.dumps(cfg)), time_budget=30.0)
    err = capsys.readouterr().err
    assert f"{out} already finished its train.steps 4: nothing to train" in err
    assert "the final evaluation and the export run again" in err and f"resuming {out}" not in err
    assert "train.steps above 4 continues); --time-budget 30 is unused" in err
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3, 4]
    assert not [r for r in read_log(out) if "replanned" in r]
    before = (out / "config.json").read_text()
    with pytest.raises(mt.ConfigError, match=r"is at step 4, past this config's train.steps 3") as exc:
        train({**cfg, "train": {**cfg["train"], "steps": 3}})
    assert f"python -m model.train {out / 'config.json'}" in str(exc.value) and "--fresh" in str(exc.value)
    assert (out / "config.json").read_text() == before


def test_without_a_budget_nothing_is_replanned(text_data, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(text_data, out, steps=16, eval_every=0, final_eval=False))
    assert not [r for r in read_log(out) if "replanned" in r]
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 16


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon", "1e308", "100000001"])
def test_a_bad_time_budget_is_one_line_and_exit_status_2(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "none.toml"), f"--time-budget={value}"])
    assert exc.value.code == 2
    assert "--time-budget" in capsys.readouterr().err


def test_a_deadline_before_the_first_plan_says_no_plan_was_made(text_data, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tiny_config(text_data, out, steps=500, eval_every=0, final_eval=False)
    assert train(cfg, time_budget=1e-3) == {}  # over after the first step
    err = capsys.readouterr().err
    assert "reached at step 1," in err and "no plan was made" in err
    assert f"{out / 'config.json'} still says train.steps 500" in err
    assert json.loads((out / "last" / "state.json").read_text())["step"] == 1


def test_options_may_come_before_or_after_the_overrides(text_data, tmp_path):
    """`CONFIG --time-budget 8 train.steps=2` was refused ('unrecognized arguments'; a fresh-user trial)."""
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(tiny_config(text_data, tmp_path / "run", eval_every=0, final_eval=False)))
    main([str(path), "--stop-at", "2", "train.steps=5", "--time-budget", "0"])
    assert json.loads((tmp_path / "run" / "last" / "state.json").read_text())["step"] == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 5


def test_two_ddp_processes_take_every_budget_decision_together(text_data, tmp_path):
    """Under torchrun (2 CPU processes, gloo) a --time-budget run re-plans and stops as one: every decision
    is taken from the all-reduced elapsed time, so no process skips a collective the other calls. Here
    process 1's clock runs fast: with decisions from each process's own clock (before 2026-12-04) the
    two counted different shares of the budget as passed and one called an all-reduce the other did not
    (the run then hung, or paired the wrong values). It exits 0 within the subprocess timeout; the log
    (rank 0's) holds the first re-plan and later ones, every step once; and the run stopped at the
    deadline, or finished the plan, with its state at the step reached."""
    out = tmp_path / "run"
    cfg = tiny_config(text_data, out, steps=100_000, eval_every=0, ckpt_every=0, final_eval=False)
    cfg["model"]["dropout"] = 0.0
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    # process 1's clock runs 1.6x fast (a sitecustomize on its path): the processes' own clocks disagree on
    # which shares of the budget have passed, which the step loop must not act on. And every step after the
    # timed ones takes at least twice their mean (an optimizer hook sleeps): the first plan cannot finish
    # before the budget ends, so the shares after it pass and are re-planned at. (With the steps' own times,
    # timed steps slower than the later ones, as on a loaded machine, made a plan that finished before the
    # next share: one re-plan, and the later ones' collectives untested.)
    skew = tmp_path / "skew"
    skew.mkdir()
    (skew / "sitecustomize.py").write_text(
        "import os, time\n"
        "if os.environ.get('RANK') == '1':\n"
        "    _clock = time.perf_counter\n"
        "    _t0 = _clock()\n"
        "    time.perf_counter = lambda: _t0 + 1.6 * (_clock() - _t0)\n"
        "if os.environ.get('RANK') is not None:\n"
        "    from torch.optim.optimizer import register_optimizer_step_post_hook\n"
        "    _ends = []  # time.monotonic() at the end of each step\n"
        "    def _slower(opt, args, kwargs):\n"
        f"        warm, timed = {BUDGET_WARM}, {BUDGET_TIMED}\n"
        "        if len(_ends) >= warm + timed:\n"
        "            mean = (_ends[warm + timed - 1] - _ends[warm - 1]) / timed\n"
        "            time.sleep(max(0.0, 2 * mean - (time.monotonic() - _ends[-1])))\n"
        "        _ends.append(time.monotonic())\n"
        "    register_optimizer_step_post_hook(_slower)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{skew}{os.pathsep}{ROOT}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "model.train", str(path), "--time-budget", "6"]  # fmt: skip
    run = subprocess.run(cmd, env=env, cwd=ROOT, timeout=120, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    log = read_log(out)
    replans = [r for r in log if "replanned" in r]
    assert len(replans) >= 2, replans  # the first (step 13) and at least one share of the budget
    assert replans[0]["step"] == BUDGET_WARM + BUDGET_TIMED
    reached = json.loads((out / "last" / "state.json").read_text())["step"]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, reached + 1))
    plan = replans[-1]["replanned"]["steps"][1]
    assert "--time-budget 6 s reached at step" in run.stderr or reached == plan, run.stderr[-2000:]


def test_a_plan_never_passes_train_steps_bound():
    """The steps that fit a budget at a vanishing step time: at most MAX_STEPS, a train.steps the config takes
    (5e-324 s a step was an OverflowError, `cannot convert float infinity to integer`, at the first re-plan of
    --time-budget 1e308; a plan of 10^310 steps was written to config.json, which no later read could run)."""
    from model.train import MAX_STEPS, MAX_TIME_BUDGET, TrainConfig, replan_steps

    for done, step_s in ((0, 5e-324), (13, 1e-300), (MAX_STEPS - 1, 1e-9)):
        steps = replan_steps(done, step_s, MAX_TIME_BUDGET, eval_every=7, eval_s=1e-12)
        assert steps == MAX_STEPS
        assert TrainConfig(steps=steps).steps == MAX_STEPS
    assert replan_steps(13, 0.5, 100.0) == 13 + int(100 * 0.96 / 0.5)  # (unchanged where it fits: 192)
