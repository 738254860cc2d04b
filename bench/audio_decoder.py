"""What decoding prompt audio in a worker process costs (server/decoder.py) against read_audio in the
server's process: per file, medians of alternated rounds, for a 30 s MP3 at 16 kHz, the same MP3 with
damaged frames (mpg123 writes to stderr), and a 30 s 48 kHz 16-bit WAV (2.9 MB in, the most bytes to
move), each resampled to 8 kHz; the first worker's start (it imports the codecs, torch with them), and a
worker's memory (its RSS, and USS: the pages it alone holds; the rest it shares with the fork server).

    python -m bench.audio_decoder [--rounds 15]

Writes bench/results/audio_decoder.json (with the machine, load and commit, taken before the run) and
audio_decoder.png (each file's median, in the process against in a worker).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time

import numpy as np
import psutil
import soundfile

from bench.common import RESULTS, machine_info, save_figure, subplots
from model.codecs import mp3_frame, read_audio
from server.decoder import AudioDecoder


def tone(seconds: float, rate: int) -> np.ndarray:
    return 0.5 * np.sin(2 * np.pi * 440 * np.arange(round(seconds * rate)) / rate)


def encoded(x: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def damaged_mp3(seconds: float, rate: int = 16000, per_frame: int = 8) -> bytes:
    """A layer III MP3 (libsndfile's LAME) whose frames after the first (its Xing header) each have
    `per_frame` bytes after the 4-byte header flipped: every frame header is intact (read_audio's walk of
    them passes), the data inside is damaged."""
    data = bytearray(encoded(tone(seconds, rate), rate, "MP3"))
    rng, p, frames = np.random.default_rng(0), 0, 0
    while p + 4 <= len(data):
        size, _ = mp3_frame(int.from_bytes(data[p : p + 4], "big"))
        if frames:
            for j in rng.integers(4, size, per_frame):
                data[p + j] ^= 0x5A
        p, frames = p + size, frames + 1
    return bytes(data)


def files() -> dict[str, bytes]:
    """The files measured (tests/test_audio_decoder.py uses the same makers)."""
    return {
        "30 s MP3, 16 kHz": encoded(tone(30, 16000), 16000, "MP3"),
        "30 s damaged MP3, 16 kHz": damaged_mp3(30),
        "30 s WAV, 48 kHz": encoded(tone(30, 48000), 48000, "WAV", "PCM_16"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.audio_decoder", description=__doc__)
    parser.add_argument("--rounds", type=int, default=15, choices=range(1, 1001), metavar="1..1000")
    args = parser.parse_args(argv)
    info = machine_info()  # (before the run: its load)
    decoder = AudioDecoder(max_workers=1)
    t = time.perf_counter()
    decoder.start()
    start_s = time.perf_counter() - t
    worker = psutil.Process().children(recursive=True)[-1].memory_full_info()
    out: dict = {"benchmark": "audio_decoder", "rounds": args.rounds, "machine": info,
                 "first_worker_start_s": round(start_s, 2), "worker_rss_mb": round(worker.rss / 2**20),
                 "worker_uss_mb": round(worker.uss / 2**20), "files": {}}  # fmt: skip
    stderr = os.dup(2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # (read_audio's mpg123 lines, in this process)
    try:
        for name, data in files().items():
            times: dict[str, list[float]] = {"in process": [], "worker": []}
            for _ in range(args.rounds):
                for how, fn in (("in process", read_audio), ("worker", decoder.read_audio)):
                    t = time.perf_counter()
                    x, _ = fn(data, 8000, 60)
                    times[how].append(time.perf_counter() - t)
            ms = {k: round(statistics.median(v) * 1000, 1) for k, v in times.items()}
            out["files"][name] = {"bytes": len(data), "samples": len(x), "median_ms": ms}
    finally:
        os.dup2(stderr, 2)
        decoder.close()
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=1))
    (RESULTS / "audio_decoder.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(out)


def plot(out: dict) -> None:
    """Each file's median decode time, in the server's process against in a worker (grouped bars)."""
    fig, (ax,) = subplots(width=7.0)
    names = list(out["files"])
    for k, how in enumerate(("in process", "worker")):
        ms = [out["files"][n]["median_ms"][how] for n in names]
        ax.bar([i + 0.38 * (k - 0.5) for i in range(len(names))], ms, width=0.38, label=how)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("median ms per file (resampled to 8 kHz)")
    ax.legend()
    save_figure(fig, "audio_decoder", title=f"prompt audio decoding, {out['rounds']} alternated rounds")


if __name__ == "__main__":
    main()
