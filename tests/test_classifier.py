"""model.classifier: the SC09-style sample measures against float64 loops written from their papers'
definitions, the Fréchet distance against closed forms and an independent matrix square root, and the
classifier's training, saving and loading on a small synthetic three-class dataset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from model.classifier import (
    am_score,
    frechet_distance,
    inception_score,
    labelled_clips,
    load_classifier,
    modified_inception_score,
    predict,
    sample_scores,
    train_classifier,
)
from model.codecs import MuLaw
from model.data import DIGITS, Dataset, write_splits


def _kl(p, q) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))


def test_scores_match_loops_from_the_definitions():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(10, 0.3), size=7)
    marginal = [sum(row[c] for row in p) / len(p) for c in range(10)]
    is_loop = math.exp(sum(_kl(row, marginal) for row in p) / len(p))
    mis_loop = math.exp(
        sum(_kl(p[i], p[j]) for i in range(len(p)) for j in range(len(p)) if i != j) / (len(p) * (len(p) - 1))
    )
    prior = [0.1] * 10
    am_loop = _kl(prior, marginal) + sum(-sum(x * math.log(x) for x in row) for row in p) / len(p)
    assert inception_score(p) == pytest.approx(is_loop, rel=1e-9)
    assert modified_inception_score(p) == pytest.approx(mis_loop, rel=1e-9)
    assert am_score(p) == pytest.approx(am_loop, rel=1e-9)


def test_scores_at_their_extremes():
    confident = np.eye(10)[np.arange(40) % 10]  # each clip one digit, the digits balanced
    uniform = np.full((40, 10), 0.1)  # every clip the same mixture
    assert inception_score(confident) == pytest.approx(10.0, rel=1e-6)
    assert inception_score(uniform) == pytest.approx(1.0, abs=1e-12)
    assert modified_inception_score(uniform) == pytest.approx(1.0, abs=1e-12)
    assert am_score(confident) == pytest.approx(0.0, abs=1e-6)
    assert am_score(uniform) == pytest.approx(math.log(10), rel=1e-12)
    one_digit = np.eye(10)[np.zeros(40, dtype=int)]  # confident, but always the same digit
    assert inception_score(one_digit) == pytest.approx(1.0, abs=1e-6)
    assert am_score(one_digit) == pytest.approx(_kl([0.1] * 10, [1 - 9e-12] + [1e-12] * 9), rel=1e-6)
    with pytest.raises(ValueError, match="summing to 1"):
        inception_score(np.full((4, 10), 0.2))
    with pytest.raises(ValueError, match="N >= 2"):
        am_score(np.full((1, 10), 0.1))


def test_frechet_distance_closed_forms_and_an_independent_square_root():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    assert abs(frechet_distance(a, a)) < 1e-9 * np.trace(np.cov(a, rowvar=False))
    shift = rng.normal(size=6)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)
    # 1-D: (μa − μb)² + (σa − σb)²
    x, y = rng.normal(1.0, 2.0, size=300), rng.normal(-0.5, 0.7, size=400)
    want = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
    assert frechet_distance(x[:, None], y[:, None]) == pytest.approx(want, rel=1e-9)
    # general covariances: tr (Σa Σb)^½ from the eigenvalues of the (non-symmetric) product Σa Σb
    b = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 0.3
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    tr_root = np.sqrt(np.linalg.eigvals(sa @ sb).real.clip(0)).sum()
    want = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * tr_root
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="feature rows"):
        frechet_distance(a, b[:, :5])


SR, N = 8000, 2048


def _clip(kind: int, rng: np.random.Generator) -> np.ndarray:
    """Three 'digits' a spectrogram tells apart: a low tone, a high tone, a rising chirp; random pitch
    (±10 %), level, onset and noise."""
    t = np.arange(N) / SR
    f = rng.uniform(0.9, 1.1)
    phase = {
        0: 2 * np.pi * 220 * f * t,
        1: 2 * np.pi * 1200 * f * t,
        2: 2 * np.pi * (300 + 1200 * t / t[-1]) * f * t,
    }
    env = np.zeros(N)
    start = rng.integers(0, N // 3)
    env[start : start + N // 2] = np.hanning(N // 2)
    x = rng.uniform(0.2, 0.8) * env * np.sin(phase[kind]) + rng.normal(0, 0.01, N)
    return np.clip(x, -1, 1)


@pytest.fixture(scope="module")
def three_class_data(tmp_path_factory):
    rng = np.random.default_rng(2)
    mu = MuLaw()
    splits, lists = {}, {}
    for split, n in (("train", 90), ("val", 30), ("test", 30)):
        kinds = np.arange(n) % 3
        splits[split] = mu.encode(np.stack([_clip(k, rng) for k in kinds])).astype(np.uint8).reshape(-1)
        lists[split] = [{"voice": "synthetic", "digit": DIGITS[k]} for k in kinds]
    out = tmp_path_factory.mktemp("three-class")
    meta = {"kind": "audio", "sample_rate": SR, "clip_len": N, "clip_list": lists, "source": "synthetic",
            "accents": ["tones"], "variants": {"train": ["a", "b"], "val": ["c"], "test": ["d"]},
            "clips": {k: len(v) for k, v in lists.items()}, "hours": 0.01}  # fmt: skip
    write_splits(out, splits, meta)
    return out


def test_classifier_trains_saves_and_loads(three_class_data, tmp_path):
    cfg = train_classifier(
        three_class_data, tmp_path / "clf", epochs=40, batch=16, lr=1e-2, log=lambda m: None
    )
    assert cfg["val_accuracy"] >= 0.9 and cfg["test_accuracy"] >= 0.9, cfg
    model, saved = load_classifier(tmp_path / "clf")
    assert saved == json.loads(json.dumps(cfg))  # what was written is what was returned
    data = Dataset(three_class_data)
    x, y = labelled_clips(data, "test")
    p, f = predict(model, x)
    assert p.shape == (30, 10) and f.shape == (30, 128)
    assert torch.allclose(p.sum(1), torch.ones(30))
    # the measures on the test clips: 3 balanced confident classes would be an IS of 3 (measured 2.3:
    # label smoothing and 240 steps leave it ~0.87 sure); white noise is one mixture for every clip (IS
    # 1), and far from the test clips' features next to the train clips
    real = sample_scores(model, x, labelled_clips(data, "train")[0])
    noise = sample_scores(model, torch.randn(30, N) * 0.1, x)
    assert 2.0 <= real["inception_score"] <= 3.0 + 1e-6 and real["confident_share"] >= 0.5, real
    assert real["top_class_counts"] == {d: 10 if i < 3 else 0 for i, d in enumerate(DIGITS)}
    assert noise["inception_score"] < 1.1 and noise["confident_share"] == 0.0, noise
    assert real["fid"] < 0.05 * noise["fid"], (real["fid"], noise["fid"])


def test_classifier_refuses_what_it_cannot_use(three_class_data, tmp_path):
    meta = json.loads((three_class_data / "meta.json").read_text())
    (tmp_path / "nolabels").mkdir()
    for split in ("train", "val", "test"):
        (tmp_path / "nolabels" / f"{split}.bin").write_bytes((three_class_data / f"{split}.bin").read_bytes())
    del meta["clip_list"]
    (tmp_path / "nolabels" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="no clip_list"):
        labelled_clips(Dataset(tmp_path / "nolabels"), "train")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"kind": "sequence-model"}))
    with pytest.raises(ValueError, match="not a digit classifier"):
        load_classifier(tmp_path / "ckpt")
    root = Path(__file__).resolve().parent.parent / "checkpoints" / "digit-classifier"
    with pytest.raises(ValueError, match="classifies 8000 Hz audio, not 16000 Hz"):
        load_classifier(root, sample_rate=16000)


def test_the_shipped_classifier_hears_the_held_out_clips_beside_audio_digits():
    """checkpoints/digit-classifier on the 8 test clips (held-out voices, spread over the split) that
    audio-digits keeps in eval_slice/ with their digits: all named right, and its recorded accuracies
    are the ones its card states."""

    root = Path(__file__).resolve().parent.parent / "checkpoints"
    model, cfg = load_classifier(root / "digit-classifier")
    x, y = labelled_clips(Dataset(root / "audio-digits" / "eval_slice"), "test")
    assert len(set(y.tolist())) == 8  # eight different digits
    p, _ = predict(model, x)
    assert (p.argmax(1) == y).all(), (p.argmax(1), y)
    assert p.max(1).values.min() > 0.5
    card = (root / "digit-classifier" / "README.md").read_text()
    for key in ("val_accuracy", "test_accuracy"):
        assert f"**{cfg[key]:.1%}**".replace("%", " %") in card, key


def test_the_command_line_scores_and_refuses_in_one_line(three_class_data, tmp_path, capsys):
    """`python -m model.classifier`: reference and score print the measures as JSON; bad arguments and
    unusable inputs exit with status 2 and a one-line message, not a traceback."""
    from model import ModelConfig, build, save
    from model.classifier import main

    train_classifier(three_class_data, tmp_path / "clf", epochs=2, batch=16, log=lambda m: None)
    clf, data = str(tmp_path / "clf"), str(three_class_data)
    main(["reference", "--classifier", clf, "--data", data, "--split", "train", "--clips", "12"])
    ref = json.loads(capsys.readouterr().out)
    assert ref["clips"] == 12 and ref["fid_against"] == "test" and ref["fid"] > 0
    torch.manual_seed(0)
    audio = dict(vocab_size=256, d_model=16, n_layers=1, d_state=8, l_max=64, cauchy_backend="torch")
    save(build(ModelConfig(**audio, modality="audio", sample_rate=SR)), tmp_path / "audio")
    save(build(ModelConfig(**audio)), tmp_path / "text")
    main(
        [
            "score",
            str(tmp_path / "audio"),
            "--classifier",
            clf,
            "--data",
            data,
            "--samples",
            "3",
            "--top-p",
            "0.9",
        ]
    )
    res = json.loads(capsys.readouterr().out)
    assert res["clips"] == 3 and sum(res["top_class_counts"].values()) == 3 and res["fid"] > 0
    assert res["top_p"] == 0.9 and res["temperature"] == 1.0 and res["min_p"] == 0.0
    a = str(tmp_path / "audio")
    bad = [
        (["score", a, "--classifier", clf, "--data", data, "--samples", "1"], "--samples"),
        (["score", str(tmp_path / "text"), "--classifier", clf, "--data", data], "text model"),
        (["score", a, "--classifier", a, "--data", data], "not a digit classifier"),
        (["score", a, "--classifier", clf, "--data", data, "--top-p", "2"], "top_p"),
        (["reference", "--classifier", clf, "--data", str(tmp_path / "none")], "meta.json"),
        (["reference", "--classifier", clf, "--data", data, "--split", "val", "--against", "val"], "itself"),
        (["reference", "--classifier", clf, "--data", data, "--clips", "999"], "--clips 999"),
        (["train", "--data", data, "--out", str(tmp_path / "x"), "--epochs", "0"], "--epochs"),
        (["reference", "--classifier", clf, "--split", "foo"], "invalid choice"),
    ]  # fmt: skip
    for argv, says in bad:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err and "Traceback" not in err, (argv, err)


def _tiny_audio_run(data: Path, tmp_path: Path, steps: int) -> tuple[Path, Path]:
    """A tiny audio model trained by model.train on `data` for `steps` steps: (its run folder, its export)."""
    from model.train import train  # noqa: PLC0415

    run, ckpt = tmp_path / "run", tmp_path / "ckpt"
    train({"model": {"d_model": 16, "n_layers": 1, "d_state": 8, "l_max": N, "cauchy_backend": "torch"},
           "data": {"path": str(data), "batch_size": 4},
           "train": {"steps": steps, "warmup": 1, "eval_every": 0, "ckpt_every": 0, "log_every": 1,
                     "out": str(run), "export": str(ckpt)}})  # fmt: skip
    return run, ckpt


def test_the_model_card_scores_its_audio_samples_with_a_classifier(three_class_data, tmp_path):
    """model.card on a tiny audio model trained by model.train: with --classifier, the card gains the
    listener table and config.json its figures (the card's audio path end to end: eval slice with the
    clips' digits, recurrent NLL, WAVs, spectrogram, voicing)."""
    from model.card import main as card

    train_classifier(three_class_data, tmp_path / "clf", epochs=2, batch=16, log=lambda m: None)
    run, ckpt = _tiny_audio_run(three_class_data, tmp_path, steps=3)
    card([str(ckpt), "--run", str(run), "--audio-samples", "4", "--classifier", str(tmp_path / "clf")])
    text = (ckpt / "README.md").read_text()
    meta = json.loads((ckpt / "config.json").read_text())
    g, r = meta["samples_classifier"]["generated"], meta["samples_classifier"]["test_clips"]
    assert g["clips"] == 4 and r["clips"] == 30 and g["fid"] > 0
    assert "### An automated listener" in text
    assert f"| 4 generated | {g['inception_score']:.2f} | {g['modified_inception_score']:.2f} |" in text
    assert f"| 30 real test clips | {r['inception_score']:.2f} |" in text
    assert len(list((ckpt / "samples").glob("generated_*.wav"))) == 4
    sl = Dataset(ckpt / "eval_slice")  # the 8 spread test clips keep their digits
    idx = [0, 4, 8, 12, 17, 21, 25, 29]  # round(linspace(0, 29, 8)); clip i is digit i % 3
    assert [c["index"] for c in sl.meta["clip_list"]["test"]] == idx
    assert labelled_clips(sl, "test")[1].tolist() == [i % 3 for i in idx]


def test_the_model_card_replaces_its_own_wavs_and_keeps_the_other_files_in_samples(
    three_class_data, tmp_path
):
    """model.card writes samples/generated_0.wav … and removes an earlier card's that it does not write again
    (it made more samples), by the pattern generated_*.wav, which also took the WAVs written beside them by
    hand: audio-digits keeps generated_t0.9_0.wav … 3, which its card's text names, and a new card deleted
    them. Only generated_<number>.wav are the card's."""
    from model.card import main as card

    run, ckpt = _tiny_audio_run(three_class_data, tmp_path, steps=2)
    samples = ckpt / "samples"
    samples.mkdir()
    (samples / "generated_7.wav").write_bytes(b"an earlier card's eighth sample")
    (samples / "generated_t0.9_0.wav").write_bytes(b"a sample at temperature 0.9")
    card([str(ckpt), "--run", str(run), "--audio-samples", "2"])
    names = sorted(p.name for p in samples.glob("generated_*.wav"))
    assert names == ["generated_0.wav", "generated_1.wav", "generated_t0.9_0.wav"], names
    assert (samples / "generated_t0.9_0.wav").read_bytes() == b"a sample at temperature 0.9"


def test_the_audio_model_card_describes_its_own_codec_clip_length_and_preparation(three_class_data, tmp_path):
    """The audio card said "8-bit mu-law" (the model, the data, the entropy line), "(1 s) clips" and "Prepared
    with `python -m model.data audio --out data/digits`" whatever the data: a model of 8-bit linear clips
    of 2,048 samples at 8 kHz (`model.data audio --quantization linear --seconds 0.256`, the official
    Beethoven SaShiMi's codec) got a card of 1 s mu-law clips and a command that prepares those."""
    from model.card import main as card
    from model.codecs import Linear8
    from model.train import train

    mu_data = Dataset(three_class_data)
    meta = {k: v for k, v in mu_data.meta.items() if k not in ("tokens", "sha256")}
    splits = {
        s: Linear8().encode(mu_data.codec.decode(mu_data.split(s))).reshape(-1)
        for s in mu_data.meta["tokens"]
    }
    write_splits(tmp_path / "linear", splits, {**meta, "quantization": "linear", "encoding": "linear 8-bit"})
    run, ckpt = tmp_path / "run", tmp_path / "ckpt"
    train({"model": {"d_model": 16, "n_layers": 1, "d_state": 8, "l_max": N, "cauchy_backend": "torch",
                     "quantization": "linear"},
           "data": {"path": str(tmp_path / "linear"), "batch_size": 4},
           "train": {"steps": 2, "warmup": 1, "eval_every": 0, "ckpt_every": 0, "log_every": 1,
                     "out": str(run), "export": str(ckpt)}})  # fmt: skip
    card([str(ckpt), "--run", str(run), "--audio-samples", "2"])
    text = (ckpt / "README.md").read_text()
    assert "mu-law" not in text.lower(), [line for line in text.splitlines() if "mu-law" in line.lower()]
    assert "8-bit linear audio model" in text and "2048-sample (0.256 s) clips, 8-bit linear." in text
    assert "`python -m model.data audio --out data/digits --seconds 0.256 --quantization linear`" in text
    assert "Linear marginal entropy of the test set" in text


def test_the_model_card_refuses_one_audio_sample_with_a_classifier_before_any_work(
    three_class_data, tmp_path, capsys
):
    """The listener's measures compare clips (IS, mIS, AM and FID need at least 2): `--audio-samples 1`
    with `--classifier` is refused with exit status 2 and a line naming --audio-samples, before the card
    generates anything (it used to generate, write the WAVs, then end in sample_scores' ValueError, a
    traceback, with no README.md); without --classifier one sample is still a card."""
    from model.card import main as card

    train_classifier(three_class_data, tmp_path / "clf", epochs=1, batch=16, log=lambda m: None)
    run, ckpt = _tiny_audio_run(three_class_data, tmp_path, steps=2)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        card([str(ckpt), "--run", str(run), "--audio-samples", "1", "--classifier", str(tmp_path / "clf")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--audio-samples" in err and "Traceback" not in err, err
    assert not (ckpt / "samples").exists() and not (ckpt / "README.md").exists()
    card([str(ckpt), "--run", str(run), "--audio-samples", "1"])
    assert len(list((ckpt / "samples").glob("generated_*.wav"))) == 1 and (ckpt / "README.md").exists()


def test_the_model_card_of_audio_whose_real_clips_have_no_voiced_frame_says_so(tmp_path):
    """The card's voicing compares generated clips with the real test clips, ÷ the real clips' voiced
    share: data with no voiced loud frame (noise, unpitched sounds) ended the card in a ZeroDivisionError
    after its WAVs were written, with no README.md (R9's note of session 59). The ratio is now None in
    config.json and the card says why; the table still gives both shares."""
    from model.card import main as card

    rng = np.random.default_rng(3)
    mu = MuLaw()
    splits, lists = {}, {}
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        noise = np.clip(rng.normal(0, 0.3, (n, N)), -1, 1)  # loud and unpitched: no frame voiced
        splits[split] = mu.encode(noise).astype(np.uint8).reshape(-1)
        lists[split] = [{"voice": "noise", "digit": DIGITS[0]} for _ in range(n)]
    data = tmp_path / "noise"
    meta = {"kind": "audio", "sample_rate": SR, "clip_len": N, "clip_list": lists, "source": "synthetic",
            "accents": ["noise"], "variants": {"train": ["a"], "val": ["b"], "test": ["c"]},
            "clips": {k: len(v) for k, v in lists.items()}, "hours": 0.001}  # fmt: skip
    write_splits(data, splits, meta)
    run, ckpt = _tiny_audio_run(data, tmp_path, steps=2)
    card([str(ckpt), "--run", str(run), "--audio-samples", "2"])
    v = json.loads((ckpt / "config.json").read_text())["samples_voicing"]
    assert v["test_clips"]["loud_frames"] > 0 and v["test_clips"]["voiced_share"] == 0.0, v
    assert v["ratio"] is None, v
    text = (ckpt / "README.md").read_text()
    assert "Generated ÷ real: none (no loud frame of the real test clips is voiced)." in text, text


def test_a_classifier_folder_with_unusable_weights_or_config_is_refused_in_one_line(tmp_path, capsys):
    """load_classifier raises ValueError (as its docstring says), and the command line ends with exit status 2
    and one line naming the folder, for a digit-classifier folder whose weights are not a safetensors file
    (a Git LFS pointer: safetensors' SafetensorError), hold other shapes than its config's widths (torch's
    RuntimeError), or whose config lacks a field (KeyError) or is not a JSON object: each was a traceback."""
    import shutil

    from model.classifier import main

    root = Path(__file__).resolve().parent.parent / "checkpoints" / "digit-classifier"
    cfg = json.loads((root / "config.json").read_text())
    lfs = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 123\n"
    cases = {
        "lfs-pointer": (cfg, lfs),
        "other-widths": ({**cfg, "widths": [8, 8, 8, 8]}, None),
        "no-widths": ({k: v for k, v in cfg.items() if k != "widths"}, None),
        "a-list": ([cfg], None),  # (AttributeError: 'list' object has no attribute 'get')
    }
    for name, (c, weights) in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(c))
        if weights is None:
            shutil.copy(root / "model.safetensors", d / "model.safetensors")
        else:
            (d / "model.safetensors").write_bytes(weights)
        with pytest.raises(ValueError, match=str(d)):
            load_classifier(d)
        data = str(root.parent / "audio-digits" / "eval_slice")
        with pytest.raises(SystemExit) as e:
            main(["reference", "--classifier", str(d), "--data", data])
        err = capsys.readouterr().err
        assert e.value.code == 2 and str(d) in err and "Traceback" not in err and err.count("\n") == 1, err


@pytest.mark.parametrize("seed", ["-1", str(2**64 - 1)])
def test_the_model_card_refuses_a_seed_outside_the_samplers_range_before_any_work(
    three_class_data, tmp_path, capsys, seed
):
    """The card samples clip i with seed --seed + i (a Philox key in [0, 2^64)): a negative seed, or one
    whose clips' seeds pass 2^64 − 1, is refused with exit status 2 naming --seed before the card writes
    anything (it used to write eval_slice/ and the WAVs' folder, then end in SamplingParams' ValueError, a
    traceback)."""
    from model.card import main as card

    run, ckpt = _tiny_audio_run(three_class_data, tmp_path, steps=2)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        card([str(ckpt), "--run", str(run), "--audio-samples", "2", "--seed", seed])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--seed" in err and "Traceback" not in err, err
    assert not (ckpt / "eval_slice").exists() and not (ckpt / "samples").exists()
