"""The conv-mode training CLI: learning, deterministic resume, data-parallel gradients, export."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model import load
from model.train import ConfigError, TrainConfig, load_config, lr_scale, parse_value, train

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(data: Path, out: Path, **train) -> dict:
    return {
        "model": {"d_model": 32, "n_layers": 2, "d_state": 16, "l_max": 64, "cauchy_backend": "torch",
                  "dropout": 0.1},
        "data": {"path": str(data), "seq_len": 64, "batch_size": 8},
        "train": {"steps": 40, "lr": 1e-2, "ssm_lr": 1e-3, "warmup": 5, "eval_every": 20,
                  "eval_tokens": 2048, "ckpt_every": 10, "log_every": 1, "out": str(out), **train},
    }  # fmt: skip


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_loss_falls_and_export_serves(text_data, tmp_path):
    cfg = tiny_config(text_data, tmp_path / "run", export=str(tmp_path / "ckpt"))
    metrics = train(cfg)
    losses = [r["loss"] for r in read_log(tmp_path / "run") if "loss" in r]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5  # ln 256 = 5.5 → well below
    vals = [r["val"]["bits_per_token"] for r in read_log(tmp_path / "run") if "val" in r]
    assert len(vals) == 2 and vals[1] < vals[0]
    assert metrics["test"]["bits_per_token"] < 5.0 and metrics["test"]["tokens"] > 0
    assert metrics["steps"] == 40 and metrics["num_params"] > 0
    net = load(tmp_path / "ckpt")  # a servable checkpoint that converts and verifies
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["training"]["metrics"]["test"] == metrics["test"]
    rec = net.to_recurrent()
    x = torch.tensor([list(b"To be, or not to be")])
    logits_rec, _ = rec.prefill(x, rec.init_state(1))
    net.eval()
    torch.testing.assert_close(logits_rec, net(x), rtol=1e-4, atol=1e-4)


def test_resume_continues_at_the_right_step_with_identical_losses(text_data, tmp_path):
    whole = tiny_config(text_data, tmp_path / "whole", steps=12, ckpt_every=4, final_eval=False)
    train(whole)
    parts = tiny_config(text_data, tmp_path / "parts", steps=12, ckpt_every=4, final_eval=False)
    train(parts, stop_at=6)  # interrupted after step 6; the state saved there is resumed
    state = json.loads((tmp_path / "parts" / "last" / "state.json").read_text())
    assert state["step"] == 6
    # a run killed after logging steps past its last save: the resume drops those lines (it logs the
    # steps again), keeping a re-plan line and one that is not JSON
    with (tmp_path / "parts" / "log.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 9.0}\n{"step": 8, "val": {}}\n{"step": 7, "replanned": {}}\nnot json\n')
    train(parts)
    a = [r for r in read_log(tmp_path / "whole") if "loss" in r]
    lines = (tmp_path / "parts" / "log.jsonl").read_text().splitlines()
    assert "not json" in lines and '{"step": 7, "replanned": {}}' in lines
    b = [json.loads(x) for x in lines if x != "not json"]
    assert not any(r.get("val") == {} for r in b)
    b = [r for r in b if "loss" in r]
    assert [r["step"] for r in b] == list(range(1, 13))
    assert not any(r.get("resumed") for r in b)  # the same config: no record
    wall = [r["elapsed_s"] for r in b]  # training wall time, counted across the resume
    assert all(w1 < w2 for w1, w2 in zip(wall, wall[1:])), wall
    assert wall[6] > state["elapsed_s"]  # the resumed process adds to the state's time
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=1e-7), ra["step"]
    wa = load_file(str(tmp_path / "whole" / "last" / "model.safetensors"))
    wb = load_file(str(tmp_path / "parts" / "last" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)


def test_ddp_two_cpu_processes_match_single_process_gradient(text_data, tmp_path):
    cfg_path = tmp_path / "tiny.toml"
    cfg = tiny_config(text_data, tmp_path / "ddp")
    cfg["model"]["dropout"] = 0.0  # dropout masks differ per process by design
    tables = [
        f"[{sec}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in t.items()) for sec, t in cfg.items()
    ]
    cfg_path.write_text("\n".join(tables))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    single = [sys.executable, "-m", "model.train", str(cfg_path), "--dump-grads", str(tmp_path / "g1.st")]
    subprocess.run(single, check=True, env=env, cwd=ROOT, timeout=300)
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "model.train", str(cfg_path), "--dump-grads", str(tmp_path / "g2.st")]  # fmt: skip
    subprocess.run(ddp, check=True, env=env, cwd=ROOT, timeout=300)
    g1, g2 = load_file(str(tmp_path / "g1.st")), load_file(str(tmp_path / "g2.st"))
    assert g1.keys() == g2.keys() and len(g1) > 10
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-6, msg=k)
    # and each process alone (half the batch) would have had a clearly different gradient
    cfg_path.write_text(cfg_path.read_text().replace("batch_size = 8", "batch_size = 4"))
    subprocess.run([*single[:-1], str(tmp_path / "g_half.st")], check=True, env=env, cwd=ROOT, timeout=300)
    gh = load_file(str(tmp_path / "g_half.st"))
    rel = (gh["head.weight"] - g1["head.weight"]).norm() / g1["head.weight"].norm()
    assert rel > 1e-2


def test_config_overrides_and_schedule(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[model]\nd_model = 64\n[train]\nsteps = 10\n")
    cfg = load_config(p, ["train.steps=20", "train.lr=3e-4", "model.kernel=s4d", "data.path=x/y"])
    assert cfg == {"model": {"d_model": 64, "kernel": "s4d"}, "train": {"steps": 20, "lr": 3e-4},
                   "data": {"path": "x/y"}}  # fmt: skip
    assert parse_value("true") is True and parse_value("[0.9, 0.99]") == [0.9, 0.99]
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(p, ["steps=3"])
    with pytest.raises(ValueError, match="unknown config tables"):
        load_config(p, ["optim.lr=1"])
    t = TrainConfig(steps=110, warmup=10, min_lr_ratio=0.1)
    assert lr_scale(0, t) == pytest.approx(0.1) and lr_scale(9, t) == pytest.approx(1.0)
    assert lr_scale(60, t) == pytest.approx(0.55) and lr_scale(110, t) == pytest.approx(0.1)
    # a cosine, not a line through those points (a linear decay gave all four): at a quarter of the decay
    # 0.1 + 0.9 · (1 + cos(π/4))/2 = 0.868 (linear: 0.775), at three quarters 0.232 (linear: 0.325);
    # the warmup linear from 1/10
    assert lr_scale(35, t) == pytest.approx(0.1 + 0.45 * (1 + 0.5**0.5), rel=1e-12)
    assert lr_scale(85, t) == pytest.approx(0.1 + 0.45 * (1 - 0.5**0.5), rel=1e-12)
    assert [lr_scale(s, t) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)], rel=1e-12)


def test_periodic_validation_is_on_the_console_as_well_as_in_the_log(text_data, tmp_path, capsys):
    train(tiny_config(text_data, tmp_path / "run", steps=20, eval_every=10, final_eval=False))
    err = capsys.readouterr().err
    vals = [r for r in read_log(tmp_path / "run") if "val" in r]
    assert [r["step"] for r in vals] == [10, 20]
    for r in vals:  # its own line, with the figures log.jsonl has
        bits, n = r["val"]["bits_per_token"], r["val"]["tokens"]
        assert f"step {r['step']}/20 validation: {bits:.4f} bits/token over {n:,} tokens" in err
    # and the progress lines after a validation carry it
    line11 = next(line for line in err.splitlines() if "] 11/20 loss" in line)
    assert f"val {vals[0]['val']['bits_per_token']:.4f} bits" in line11
    assert "train tokens" in err.splitlines()[0]


def test_the_audio_banner_counts_clips_and_samples(tmp_path):
    from model.data import Dataset, write_splits
    from model.train import describe_split

    clips = np.full((30, 800), 128, dtype=np.uint8)
    write_splits(tmp_path, {"train": clips, "val": clips[:5], "test": clips[:5]},
                 {"kind": "audio", "sample_rate": 8000, "clip_len": 800})  # fmt: skip
    data = Dataset(tmp_path)
    assert (
        describe_split(data, data.split("train")) == "30 train clips of 800 samples (24,000 tokens, 0.00 h)"
    )


def test_the_baseline_plot_counts_wall_time_across_a_resume_in_old_and_new_logs(tmp_path):
    """bench.text_baseline.read_run: an old log whose elapsed_s restarted from 0 after a resume
    continues from the last time logged before it; a cumulative log is read as it is."""
    from bench.text_baseline import read_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": {"batch_size": 2, "seq_len": 8}}))
    old = [{"step": 10, "elapsed_s": 5.0}, {"step": 20, "elapsed_s": 10.0},
           {"step": 20, "val": {"bits_per_token": 3.0}},
           {"step": 30, "elapsed_s": 4.0}, {"step": 40, "elapsed_s": 8.0},  # resumed: the clock restarted
           {"step": 40, "val": {"bits_per_token": 2.5}}]  # fmt: skip
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    assert [(c["tokens"], c["wall_s"]) for c in read_run(run)["curve"]] == [(320, 10.0), (640, 18.0)]
    new = [
        dict(r, elapsed_s=r["elapsed_s"] + 10.0) if r["step"] > 20 and "elapsed_s" in r else r for r in old
    ]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in new))
    assert [c["wall_s"] for c in read_run(run)["curve"]] == [10.0, 18.0]


def test_a_resume_that_changes_the_config_rewrites_it_and_logs_the_change(text_data, tmp_path):
    """Resuming with train.steps re-planned (as the shipped models were trained): config.json holds the
    config as run now, and the log says at which step what changed."""
    cfg = tiny_config(text_data, tmp_path / "run", steps=8, ckpt_every=4, final_eval=False)
    train(cfg)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 8
    more = tiny_config(text_data, tmp_path / "run", steps=12, ckpt_every=4, final_eval=False)
    metrics = train(more)
    assert metrics["steps"] == 12
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 12
    resumes = [r for r in read_log(tmp_path / "run") if r.get("resumed")]
    assert resumes == [{"step": 8, "resumed": True, "changed": {"train.steps": [8, 12]}}]


def test_tokens_seen_counts_each_steps_own_batch_across_a_resume_that_changes_it(text_data, tmp_path):
    """metrics.json's tokens_seen (the card's "… tokens" and the baseline's "same number of training
    bytes") was train.steps × the final config's batch × seq_len: a run resumed with another data.batch_size
    (allowed, and logged as a change) was credited the new batch for the steps it took at the old one. Each
    save records the tokens so far: 4 steps of 4 × 64 and 4 of 8 × 64 are 3,072 tokens, not 8 × 8 × 64."""
    cfg = tiny_config(text_data, tmp_path / "run", steps=8, ckpt_every=4, final_eval=False)
    cfg["data"]["batch_size"] = 4
    train(cfg, stop_at=4)
    cfg["data"]["batch_size"] = 8
    metrics = train(cfg)
    assert metrics["tokens_seen"] == 4 * 4 * 64 + 4 * 8 * 64
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["tokens_seen"] == 3072
    assert train(cfg)["tokens_seen"] == 3072  # the finished run, evaluated and exported again
    whole = tiny_config(text_data, tmp_path / "whole", steps=8, ckpt_every=3, final_eval=False)
    assert train(whole)["tokens_seen"] == 8 * 8 * 64  # one batch throughout: as before


def test_ssm_lr_zero_freezes_the_ssm_as_the_official_lr_zero_does(text_data, tmp_path):
    """train.ssm_lr = 0 "freezes the SSM parameters" (Δ, Λ, P, B). The official code registers a tensor whose
    lr is 0 as a buffer (state-spaces/s4 `SSMKernel.register`): it takes no gradient. Here they stayed put
    (AdamW at lr 0) but their gradients were still computed and counted in the clipped global norm and the
    divergence check, so the other parameters' steps were not those of a model without them. Now the run
    is the one whose SSM tensors take no gradient, loss, gradient norm and weights alike; the SSM tensors
    are the initial ones."""
    from model.kernel import SSMKernel
    from model.train import build_s4

    def frozen(model_cfg: dict):
        net = build_s4(model_cfg)
        for k in net.kernels():
            for name in SSMKernel.SSM_PARAMS:
                if hasattr(k, name):
                    getattr(k, name).requires_grad_(False)
        return net

    runs = {}
    for name, build in (("ssm_lr_0", build_s4), ("no_grad", frozen)):
        cfg = tiny_config(text_data, tmp_path / name, steps=6, ssm_lr=0.0, grad_clip=0.1, eval_every=0,
                          final_eval=False)  # fmt: skip
        cfg["model"]["dropout"] = 0.0
        train(cfg, build_model=build)
        runs[name] = [r for r in read_log(tmp_path / name) if "loss" in r]
    for a, b in zip(runs["ssm_lr_0"], runs["no_grad"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6), a["step"]
    wa = load_file(str(tmp_path / "ssm_lr_0" / "last" / "model.safetensors"))
    wb = load_file(str(tmp_path / "no_grad" / "last" / "model.safetensors"))
    torch.manual_seed(0)
    init = build_s4(tiny_config(text_data, tmp_path)["model"]).state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7, msg=k)
        if k.rsplit(".", 1)[-1] in SSMKernel.SSM_PARAMS:
            assert torch.equal(wa[k], init[k]), k
    cfg = tiny_config(text_data, tmp_path / "dump", ssm_lr=0.0)
    train(cfg, dump_grads=str(tmp_path / "g.st"))  # --dump-grads: the parameters that take a gradient
    grads = load_file(str(tmp_path / "g.st"))
    assert grads and all(k.rsplit(".", 1)[-1] not in SSMKernel.SSM_PARAMS for k in grads), sorted(grads)


def test_a_run_starts_from_a_checkpoint_with_train_init_and_refuses_one_that_does_not_fit(
    text_data, tmp_path
):
    """`train.init` (a servable checkpoint folder: `model.save`'s or `model.convert`'s, e.g. an official
    import to fine-tune) gives the run its model and weights; [model] keys override its config (dropout
    here). The first step's loss is the checkpoint's own loss on that batch, far below a fresh model's;
    a [model] key that changes a shape or a folder that is not a checkpoint is refused naming train.init,
    before anything is trained."""
    from model.data import Dataset
    from model.train import DataConfig, loss_fn, step_batch

    base = tiny_config(text_data, tmp_path / "base", steps=30, final_eval=False, export=str(tmp_path / "a"))
    train(base)
    tune = tmp_path / "tune"
    cfg = tiny_config(text_data, tune, steps=3, final_eval=False, eval_every=0, init=str(tmp_path / "a"))
    cfg["model"] = {"dropout": 0.0}
    train(cfg)
    first = [r for r in read_log(tmp_path / "tune") if "loss" in r][0]
    net = load(tmp_path / "a").eval()  # its loss on the tuning run's first batch, without dropout
    data, dcfg = Dataset(str(text_data)), DataConfig(**cfg["data"])
    x, y = step_batch(data, data.split("train"), dcfg, 0, 0, 0, 1)
    with torch.no_grad():
        want = float(loss_fn(net, x, y))
    assert first["loss"] == pytest.approx(want, rel=1e-5), (first, want)
    fresh = [r for r in read_log(tmp_path / "base") if "loss" in r][0]["loss"]
    assert first["loss"] < fresh - 1.0  # it starts where the checkpoint left off, not from scratch
    saved = json.loads((tmp_path / "tune" / "config.json").read_text())
    assert saved["train"]["init"] == str(tmp_path / "a")
    bad = tiny_config(text_data, tmp_path / "bad", steps=1, init=str(tmp_path / "a"))  # d_model 32 → 48
    bad["model"]["d_model"] = 48
    with pytest.raises(ConfigError, match=r"train.init .*its weights do not fit.*in the checkpoint"):
        train(bad)
    bad["model"]["d_model"] = 32
    bad["train"]["init"] = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"train.init .*nowhere"):
        train(bad)
    assert not (tmp_path / "bad").exists()


def test_a_fine_tune_resumes_from_its_run_without_the_train_init_folder_with_identical_losses(
    text_data, tmp_path
):
    """A fine-tune stopped at step 4 resumes from runs/NAME/last/ after its train.init folder is deleted
    (the run keeps train.init's model config and provenance in last/state.json): the losses are an
    uninterrupted fine-tune's, and the export's `training.init` still says where the weights came from."""
    import shutil

    base = tiny_config(text_data, tmp_path / "base", steps=6, eval_every=0, export=str(tmp_path / "a"))
    base_metrics = train(base)
    shutil.copytree(tmp_path / "a", tmp_path / "a2")
    a_sha = json.loads((tmp_path / "a" / "config.json").read_text())["weights_sha256"]

    def tune(name: str, init: Path) -> dict:
        cfg = tiny_config(text_data, tmp_path / name, steps=8, ckpt_every=4, eval_every=0, final_eval=False,
                          init=str(init), export=str(tmp_path / f"{name}-ckpt"))  # fmt: skip
        cfg["model"] = {"dropout": 0.0}  # the checkpoint's model, one key overridden
        return cfg

    train(tune("whole", tmp_path / "a"))
    parts = tune("parts", tmp_path / "a2")
    train(parts, stop_at=4)
    state = json.loads((tmp_path / "parts" / "last" / "state.json").read_text())
    assert state["step"] == 4 and state["init"]["path"] == str(tmp_path / "a2")
    assert state["init"]["model"]["d_model"] == 32
    shutil.rmtree(tmp_path / "a2")
    train(parts)  # resumes from last/: train.init is not read
    a = [r for r in read_log(tmp_path / "whole") if "loss" in r]
    b = [r for r in read_log(tmp_path / "parts") if "loss" in r]
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=1e-7), ra["step"]
    assert load(tmp_path / "parts-ckpt").config.dropout == 0.0
    init = json.loads((tmp_path / "parts-ckpt" / "config.json").read_text())["training"]["init"]
    want = {"data": str(text_data), "steps": 6, "test_bits_per_token": base_metrics["test"]["bits_per_token"],
            "init": None}  # fmt: skip
    assert init == {"path": str(tmp_path / "a2"), "weights_sha256": a_sha, "training": want}
    fresh = tune("fresh", tmp_path / "a2")  # a fresh start (no last/) still needs the folder
    with pytest.raises(ConfigError, match=r"train.init .*a2'"):
        train(fresh)


def test_a_model_of_another_modality_is_refused_with_an_article_that_fits():
    """check_model_fits_data names train.init for a checkpoint's config, else the [model] key at fault."""
    import numpy as np

    from model.train import check_model_fits_data

    class Audio:
        kind, path = "audio", "d"
        meta = {"sample_rate": 8000}

        def split(self, name):
            return np.zeros(4, dtype=np.uint8)

    with pytest.raises(ConfigError, match=r"train.init 'x': a text model; the data \(d\) is audio"):
        check_model_fits_data({"modality": "text"}, Audio(), "train.init 'x'")
    with pytest.raises(ConfigError, match=r"model.sample_rate: a 16000 Hz model; the data \(d\) is 8000 Hz"):
        check_model_fits_data({"modality": "audio", "sample_rate": 16000}, Audio(), "")
    # the same code for the same sound: an official SaShiMi (linear, or mu-law "s4") is not fine-tuned on
    # ids of our mu-law (what meta.json without `quantization` means), nor ours on theirs
    said = "train.init 'x': the model's audio tokens are {}; the data \\(d\\) is {} .*--quantization"
    for model, data_meta, codecs in [
        ({"quantization": "linear"}, {}, ("linear", "mu-law s4serve")),
        ({"mulaw": "s4"}, {}, ("mu-law s4", "mu-law s4serve")),
        ({}, {"quantization": "linear"}, ("mu-law s4serve", "linear")),
    ]:
        Audio.meta = {"sample_rate": 8000, **data_meta}
        with pytest.raises(ConfigError, match=said.format(*codecs)):
            cfg = {"modality": "audio", "sample_rate": 8000, **model}
            check_model_fits_data(cfg, Audio(), "train.init 'x'")
    Audio.meta = {"sample_rate": 8000, "quantization": "linear"}
    check_model_fits_data({"modality": "audio", "sample_rate": 8000, "quantization": "linear"}, Audio(), "")
    Audio.meta = {"sample_rate": 8000, "mulaw": "s4"}
    check_model_fits_data({"modality": "audio", "sample_rate": 8000, "mulaw": "s4"}, Audio(), "")
    Audio.meta = {"sample_rate": 8000}
    Audio.kind = "text"
    with pytest.raises(ConfigError, match=r"model.modality: an audio model; the data \(d\) is text"):
        check_model_fits_data({"modality": "audio"}, Audio(), "")
    check_model_fits_data({"modality": "text", "vocab_size": 1}, Audio(), "")  # (ids 0 only: fits)


def test_a_model_key_may_not_relabel_what_a_checkpoints_tokens_mean():
    """Under train.init, a [model] key that changes the checkpoint's modality, sample rate, quantization or
    mu-law convention is refused naming it (a fresh user's trial: `model.quantization=linear` passed the
    refusal of another code than the data's, and exported mu-law weights labelled linear); keys that keep
    them (or other keys) pass, a field absent from the checkpoint's config being at its default."""
    from model.train import check_kept_format

    ck = {"modality": "audio", "sample_rate": 8000}  # (quantization and mulaw absent: mu-law, s4serve)
    for key, value in [
        ("quantization", "linear"),
        ("mulaw", "s4"),
        ("sample_rate", 16000),
        ("modality", "text"),
    ]:
        with pytest.raises(ConfigError, match=rf"train.init 'ck': \[model\] {key} = {value!r} would relabel"):
            check_kept_format("ck", ck, {key: value})
    check_kept_format(
        "ck", ck, {"quantization": "mu-law", "mulaw": "s4serve", "sample_rate": 8000, "dropout": 0.1}
    )


def test_train_inits_provenance_keeps_a_fine_tunes_chain_and_only_values_of_the_expected_kinds():
    """init_provenance reads a checkpoint's config.json (the user's file): a fine-tune of a fine-tune keeps
    the earlier run's record under training.init; a value of the wrong kind is dropped (None), not copied."""
    from model.train import checked_init_record, init_provenance

    earlier = {
        "path": "ckpt/imp",
        "weights_sha256": "cd" * 32,
        "source": {"from": "state-spaces/s4", "file": "m.ckpt", "sha256": 7, "dataset": None},
    }
    meta = {
        "weights_sha256": "ef" * 32,
        "training": {
            "config": {"data": {"path": "data/x"}},
            "metrics": {"steps": 20, "test": {"bits_per_token": "low"}},
            "init": earlier,
        },
    }
    rec = init_provenance("ckpt/ft", meta)
    assert rec == {
        "path": "ckpt/ft",
        "weights_sha256": "ef" * 32,
        "training": {
            "data": "data/x",
            "steps": 20,
            "test_bits_per_token": None,
            "init": {
                "path": "ckpt/imp",
                "weights_sha256": "cd" * 32,
                "source": {"from": "state-spaces/s4", "file": "m.ckpt", "sha256": None, "dataset": None},
            },
        },
    }
    assert checked_init_record(rec) == rec  # a record read back as written
    assert checked_init_record({"path": 3}) is None
    assert init_provenance("x", {"training": [], "source": "s"}) == {"path": "x", "weights_sha256": None}


def test_train_init_refuses_an_official_model_converted_without_its_vocabulary(text_data, tmp_path):
    """An official model trained on a dataset that numbers tokens by a vocabulary (WikiText, PTB, enwik8,
    ...), converted without --vocab (its config.json's source.warning says its ids may not be bytes), is
    refused as train.init before anything is trained: the data here is UTF-8 bytes, so its ids would be
    read as other tokens (a fresh-user trial fine-tuned such a wt103 model on bytes, exit 0, no warning)."""
    from model.convert import convert

    src = Path(__file__).resolve().parent / "fixtures" / "official" / "trainpy_enwik.ckpt"
    convert(src, tmp_path / "conv")
    meta = json.loads((tmp_path / "conv" / "config.json").read_text())
    assert meta["source"]["dataset"] == "enwik8" and meta["source"]["warning"]
    cfg = tiny_config(text_data, tmp_path / "tune", steps=1, init=str(tmp_path / "conv"))
    cfg.pop("model", None)
    with pytest.raises(ConfigError, match=r"train.init .*trained on 'enwik8'.*not UTF-8 bytes"):
        train(cfg)
    assert not (tmp_path / "tune").exists()


def test_a_resume_reads_last_state_json_once(text_data, tmp_path, monkeypatch):
    """A resume read last/state.json three times (the split's checksum, train.init's record, the step and
    the optimizer's state): once now, and the resumed run takes the steps it took."""
    cfg = tiny_config(text_data, tmp_path / "run", steps=4, ckpt_every=2, final_eval=False)
    train(cfg, stop_at=2)
    reads = []
    read_text = Path.read_text

    def counted(self, *args, **kwargs):
        if self.name == "state.json":
            reads.append(self)
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counted)
    train(cfg)
    assert reads == [tmp_path / "run" / "last" / "state.json"]
    assert [r["step"] for r in read_log(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize("seq_len", [1, 3])
def test_the_scores_are_the_models_own_mean_nll_at_the_shortest_windows(text_data, tmp_path, seq_len):
    """data.seq_len 1 (eval_stride 0: a hop of seq_len // 2 = 0) validated and scored with a hop of 1, every
    split token after the first once; it was `ValueError: range() arg 3 must not be zero` at the first
    validation, after the steps before it had trained. The scores are the mean NLL this test computes from
    the exported model's logits over the same windows (each token scored once, in the first window holding
    it), to 1e-6 relative."""
    import math

    import torch.nn.functional as F

    from model.data import Dataset

    cfg = tiny_config(text_data, tmp_path / "run", steps=4, eval_every=2, export=str(tmp_path / "ckpt"))
    cfg["data"].update(seq_len=seq_len, batch_size=512)  # (fewer calls to score every window)
    metrics = train(cfg)
    assert [r["step"] for r in read_log(tmp_path / "run") if "val" in r] == [2, 4]
    net = load(tmp_path / "ckpt").eval()
    data = Dataset(text_data)
    hop = max(1, seq_len // 2)
    for split in ("val", "test"):
        tokens = torch.from_numpy(data.split(split).astype(np.int64))
        T, nll = len(tokens), {}
        starts = [*range(0, T - seq_len, hop), T - seq_len - 1]  # the windows, the tail's last
        x = torch.stack([tokens[s : s + seq_len] for s in starts])
        y = torch.stack([tokens[s + 1 : s + seq_len + 1] for s in starts])
        with torch.no_grad():
            lp = F.cross_entropy(net(x).float().transpose(1, 2), y, reduction="none").tolist()
        for s, row in zip(starts, lp):
            for j in range(seq_len):
                nll.setdefault(s + 1 + j, row[j])
        assert sorted(nll) == list(range(1, T))
        want = sum(nll.values()) / len(nll)
        assert metrics[split]["tokens"] == T - 1
        assert metrics[split]["nll_nats"] == pytest.approx(want, rel=1e-6)
        assert metrics[split]["bits_per_token"] == pytest.approx(want / math.log(2), rel=1e-6)


@pytest.mark.parametrize("kernel", ["s4", "s4d"])
def test_the_optimizer_groups_decay_the_matrices_only_and_give_the_ssm_its_own_lr(kernel):
    """SequenceModel.param_groups (the AdamW groups train.py builds): the SSM's Δ, Λ, P and B at ssm_lr
    with no weight decay; the matrices (embedding, C, output mixing, head) with weight decay; biases, norm
    weights and D without. Written out by name, not by the rule the code applies: with every tensor of
    dim ≥ 1 decayed (biases, norms and D too) the 297 tests of test_train*.py and test_model_*.py passed."""
    from model import ModelConfig, SequenceModel  # noqa: PLC0415

    net = SequenceModel(ModelConfig(vocab_size=32, d_model=8, n_layers=2, d_state=8, l_max=32, kernel=kernel,
                                    cauchy_backend="torch"))  # fmt: skip
    names = {id(p): n for n, p in net.named_parameters()}
    groups = {g["name"]: g for g in net.param_groups(lr=3e-3, weight_decay=0.07, ssm_lr=1e-4)}
    got = {k: sorted(names[id(p)] for p in g["params"]) for k, g in groups.items()}
    kernel_params = ["log_dt", "log_neg_re", "im", "B"] + (["P"] if kernel == "s4" else [])
    blocks = range(2)
    want = {
        "ssm": [f"blocks.{i}.layer.kernel.{n}" for i in blocks for n in kernel_params],
        "decay": ["embed.weight", "head.weight"]
        + [f"blocks.{i}.layer.{n}" for i in blocks for n in ("kernel.C", "out.weight")],
        "no_decay": ["norm.bias", "norm.weight"]
        + [
            f"blocks.{i}.{n}"
            for i in blocks
            for n in ("layer.D", "layer.out.bias", "norm.bias", "norm.weight")
        ],
    }
    assert got == {k: sorted(v) for k, v in want.items()}
    assert (groups["ssm"]["lr"], groups["ssm"]["weight_decay"]) == (1e-4, 0.0)
    assert (groups["decay"]["lr"], groups["decay"]["weight_decay"]) == (3e-3, 0.07)
    assert (groups["no_decay"]["lr"], groups["no_decay"]["weight_decay"]) == (3e-3, 0.0)
    assert net.param_groups(lr=3e-3, weight_decay=0.07)[0]["lr"] == 3e-3  # no ssm_lr: the lr
