"""Quality measures for generated samples, used by the model cards (model/card.py).

- Text: the share of generated words that are real words, with the training plays' own lexicon as
  the dictionary (Shakespeare's spelling and names; a general English word list would count
  "thou'rt" or "Ulysses" as invented).
- Audio: the share of loud frames that are voiced, i.e. periodic at a speaking pitch. A frame is
  voiced when its normalized autocorrelation peaks above a threshold at a lag between 1/400 s and
  1/80 s (pitch 80–400 Hz), the classic autocorrelation pitch detector (Rabiner, "On the use of
  autocorrelation analysis for pitch detection", IEEE TASSP 1977). Broadband noise has no such peak;
  vowels and voiced consonants do. How periodic, as a harmonics-to-noise ratio: a frame whose peak is r
  has HNR = 10 log10(r / (1 − r)) dB (Boersma, "Accurate short-term analysis of the fundamental
  frequency and the harmonics-to-noise ratio of a sampled sound", IFA Proceedings 17, 1993): a periodic
  signal of power S in white noise of power N gives r ≈ S / (S + N). Strong harmonics, the evenly
  spaced bands of a spectrogram, need a high HNR; r > 0.5 is HNR > 0 dB.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

import numpy as np

WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")


def words(text: str) -> list[str]:
    """The words of `text`: maximal runs of ASCII letters, inner apostrophes kept, lower-cased."""
    return [w.lower() for w in WORD.findall(text)]


def lexicon(texts: Iterable[str], min_count: int = 2) -> frozenset[str]:
    """Every word that occurs at least `min_count` times in `texts` (min_count ≥ 1): a dictionary
    from a corpus, without its one-off typos."""
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    counts = Counter(w for t in texts for w in words(t))
    return frozenset(w for w, c in counts.items() if c >= min_count)


def word_share(text: str, vocab: frozenset[str]) -> tuple[float, int]:
    """(share of the words of `text` found in `vocab`, number of words). Share 0.0 for no words."""
    ws = words(text)
    if not ws:
        return 0.0, 0
    return sum(w in vocab for w in ws) / len(ws), len(ws)


def frame_stats(x: np.ndarray, sample_rate: int, frame_s: float = 0.032, f_lo: float = 80.0,
                f_hi: float = 400.0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per non-overlapping frame of `frame_s` seconds of the mono signal `x` (float, any scale):
    (RMS, peak normalized autocorrelation over lags sample_rate/f_hi … sample_rate/f_lo).

    The normalized autocorrelation at lag τ is Σ a_t a_{t+τ} / √(Σ a_t² · Σ a_{t+τ}²) over the frame
    a (mean removed), the overlapping parts only, so a pure tone of period τ scores 1.

    Raises ValueError when the frame is shorter than two periods of the lowest pitch."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    n = int(round(frame_s * sample_rate))
    lo, hi = int(np.floor(sample_rate / f_hi)), int(np.ceil(sample_rate / f_lo))
    if n < 2 * hi or lo < 1:
        raise ValueError(f"a {frame_s} s frame at {sample_rate} Hz is too short for pitch {f_lo}–{f_hi} Hz")
    frames = x[: len(x) // n * n].reshape(-1, n)
    frames = frames - frames.mean(axis=1, keepdims=True)
    rms = np.sqrt((frames**2).mean(axis=1))
    peak = np.zeros(len(frames))
    for lag in range(lo, hi + 1):
        a, b = frames[:, :-lag], frames[:, lag:]
        den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
        r = np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1.0), 0.0)
        peak = np.maximum(peak, r)
    return rms, peak


def voiced_share(
    clips: Iterable[np.ndarray],
    sample_rate: int,
    threshold: float = 0.5,
    loud_db: float = 20.0,
    floor_dbfs: float = -40.0,
    harmonic: float = 0.9,
) -> dict:
    """The share of loud 32 ms frames that are voiced, over all `clips` (mono float in [−1, 1]).

    A frame is loud when its RMS is within `loud_db` dB of its clip's loudest frame and above
    `floor_dbfs` dBFS (so silence and the quiet tails of a word are not counted), and voiced when
    its normalized autocorrelation peaks above `threshold` at a pitch of 80–400 Hz; strongly harmonic
    when that peak r is above `harmonic` (0.9: HNR = 10 log10(r / (1 − r)) > 9.5 dB).

    Returns {"voiced_share", "loud_frames", "voiced_frames", "threshold", "frame_s", "harmonic_share",
    "harmonic", "hnr_db_median"}: the shares are 0.0 and the median HNR (over the loud frames, r
    clipped to [1e-6, 1 − 1e-6]: ±60 dB) None when no frame is loud."""
    peaks = []
    for x in clips:
        rms, peak = frame_stats(x, sample_rate)
        if not len(rms) or rms.max() <= 0:
            continue
        keep = (rms >= rms.max() * 10 ** (-loud_db / 20)) & (rms >= 10 ** (floor_dbfs / 20))
        peaks.append(peak[keep])
    r = np.concatenate(peaks) if peaks else np.zeros(0)
    loud, voiced, strong = len(r), int((r > threshold).sum()), int((r > harmonic).sum())
    rc = np.clip(r, 1e-6, 1 - 1e-6)
    return {
        "voiced_share": voiced / loud if loud else 0.0,
        "loud_frames": loud,
        "voiced_frames": voiced,
        "threshold": threshold,
        "frame_s": 0.032,
        "harmonic_share": strong / loud if loud else 0.0,
        "harmonic": harmonic,
        "hnr_db_median": float(np.median(10 * np.log10(rc / (1 - rc)))) if loud else None,
    }
