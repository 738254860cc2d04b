"""An automated listener for spoken digits: a small CNN classifier and the SC09 sample metrics.

The SaShiMi paper (Goel, Gu, Donahue, Ré, "It's Raw! Audio Generation with State-Space Models",
ICML 2022, Table 3) scores unconditional spoken-digit samples with a digit classifier trained on the
real clips, following DiffWave (Kong et al., ICLR 2021): FID on the classifier's penultimate features,
Inception Score, modified Inception Score and AM Score, and a human MOS. This module is that
classifier for our data (`python -m model.data audio`: espeak-ng digits, 8 kHz mu-law, whole voices
held out) and those four measures. It is a proxy for a listener, not one: it says whether a clip
sounds like *some* digit to a model that has only heard espeak-ng digits.

    python -m model.classifier train --data data/digits --out checkpoints/digit-classifier
    python -m model.classifier reference --classifier checkpoints/digit-classifier   # real test clips
    python -m model.classifier score checkpoints/audio-digits --classifier checkpoints/digit-classifier \\
        --samples 256 --temperature 0.9 --seed 0

Bad arguments and unusable inputs (a text checkpoint, a folder that is not a classifier, a dataset
without digit labels) end with a one-line error and exit status 2.

Definitions (p(y|x): the classifier's probabilities for clip x; p(y) their mean over the clips):
- IS = exp(E_x KL(p(y|x) ‖ p(y))) (Salimans et al. 2016): 1 (every clip the same mixture) … 10
  (each clip one confident digit, the digits balanced).
- mIS = exp(E_{x, x'} KL(p(y|x) ‖ p(y|x'))) over pairs of distinct clips (Gurumurthy et al. 2017):
  also rewards variety within a class.
- AM = KL(p*(y) ‖ p(y)) + E_x H(p(y|x)) (Zhou et al. 2018), p* the training clips' label distribution
  (uniform here): 0 is best; log 10 = 2.30 nats when every clip is the uniform mixture.
- FID = ‖μ_r − μ_g‖² + tr(Σ_r + Σ_g − 2 (Σ_r^½ Σ_g Σ_r^½)^½) between Gaussians fitted to the
  penultimate features of real test clips and of the samples (Heusel et al. 2017); 0 is best.
Natural logarithms throughout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from model.data import DIGITS, Dataset

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
N_FFT, HOP = 256, 128  # 32 ms windows, 16 ms hop at 8 kHz


def log_spectrogram(x: torch.Tensor) -> torch.Tensor:
    """x (B, n) float32 samples in [−1, 1] → (B, 1, N_FFT/2 + 1, frames): the power of a centred STFT
    (`torch.stft`, Hann window of N_FFT samples, hop HOP) in dB relative to the clip's loudest bin,
    floored at −80 dB, scaled to [−2, 2] ((dB + 40) / 20). Relative to its own peak, a clip's level
    does not change it."""
    spec = torch.stft(x, N_FFT, HOP, window=torch.hann_window(N_FFT, device=x.device), return_complex=True)
    db = 10 * torch.log10(spec.abs().square() + 1e-12)
    db = (db - db.amax((1, 2), keepdim=True)).clamp(min=-80.0)
    return ((db + 40) / 20)[:, None]


class DigitClassifier(nn.Module):
    """Log spectrogram → 4 conv blocks (3×3, group norm of 4 groups, ReLU, 2×2 max pool but the last) →
    mean and max over time and frequency → `features` (2·widths[-1]) → linear → 10 logits (DIGITS
    order). Group norm, not batch norm: no running statistics, so a clip scores the same in training
    and evaluation and whatever else is in its batch, up to float rounding (the convolutions and the
    head round by the batch's size: a clip's features alone and among 19 others differed by 1.9e-6)."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 64), n_classes: int = len(DIGITS)):
        super().__init__()
        layers: list[nn.Module] = []
        c = 1
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.GroupNorm(4, w), nn.ReLU()]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(2 * c, n_classes)
        self.widths = tuple(widths)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, n) float32 samples → (B, 2·widths[-1]) penultimate features (FID is computed on these)."""
        h = self.body(log_spectrogram(x))
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, n) float32 samples → (B, 10) logits."""
        return self.head(self.features(x))


# ---------------------------------------------------------------------------------------------
# The metrics


def _probs64(p) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 2 or (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-6):
        raise ValueError(f"probabilities must be (N >= 2, classes) rows summing to 1, got shape {p.shape}")
    return np.clip(p, 1e-12, 1.0)


def inception_score(p) -> float:
    """exp(mean_x KL(p(y|x) ‖ p(y))) for p (N, C) rows of probabilities (Salimans et al. 2016)."""
    p = _probs64(p)
    marginal = p.mean(0)
    return float(np.exp((p * (np.log(p) - np.log(marginal))).sum(1).mean()))


def modified_inception_score(p) -> float:
    """exp(mean over ordered pairs i ≠ j of KL(p_i ‖ p_j)) (Gurumurthy et al. 2017)."""
    p = _probs64(p)
    logp = np.log(p)
    neg_entropy = (p * logp).sum(1)  # Σ_y p_i log p_i
    kl = neg_entropy[:, None] - p @ logp.T  # KL(p_i ‖ p_j) = Σ p_i log p_i − Σ p_i log p_j
    n = len(p)
    return float(np.exp((kl.sum() - np.trace(kl)) / (n * (n - 1))))


def am_score(p, prior=None) -> float:
    """KL(prior ‖ mean_x p(y|x)) + mean_x H(p(y|x)) in nats (Zhou et al. 2018); prior: the training
    labels' distribution (default uniform)."""
    p = _probs64(p)
    prior = np.full(p.shape[1], 1 / p.shape[1]) if prior is None else np.asarray(prior, dtype=np.float64)
    marginal = p.mean(0)
    kl = float((prior * (np.log(np.clip(prior, 1e-12, 1)) - np.log(marginal))).sum())
    return kl + float(-(p * np.log(p)).sum(1).mean())


def frechet_distance(a, b) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a^½ Σ_b Σ_a^½)^½) between Gaussians fitted (unbiased
    covariance) to feature rows a (N, D) and b (M, D), in float64. The matrix square roots come from
    symmetric eigendecompositions (eigenvalues below 0, rounding, are taken as 0); the result is
    clipped at 0."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need feature rows (N >= 2, D) and (M >= 2, D), got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False).reshape(a.shape[1], -1), np.cov(b, rowvar=False).reshape(b.shape[1], -1)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root_a @ sb @ root_a
    tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    fid = float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * tr_cross)
    return max(fid, 0.0)  # a distance: rounding can leave it a hair below 0 for equal sets


# ---------------------------------------------------------------------------------------------
# Training and loading


def labelled_clips(data: Dataset, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(clips (n, clip_len) float32 in [−1, 1], labels (n,) int64 index into DIGITS) of a prepared
    audio dataset; raises ValueError when its meta.json has no per-clip digit list."""
    clips_meta = data.meta.get("clip_list", {}).get(split)
    if not clips_meta:
        raise ValueError(
            f"{data.path}: meta.json has no clip_list for {split!r} (prepare with model.data audio)"
        )
    codes = data.split(split).reshape(-1, data.clip_len)
    if len(codes) != len(clips_meta):
        raise ValueError(f"{data.path}: {len(codes)} {split} clips but {len(clips_meta)} labels")
    x = torch.from_numpy(data.codec.decode(codes).astype(np.float32))
    y = torch.tensor([DIGITS.index(c["digit"]) for c in clips_meta])
    return x, y


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random circular shift (±0.25 of the clip: generated words need not be centred), gain
    (−12…0 dB) and white noise (SNR 0–40 dB against the clip's RMS)."""
    n = x.shape[1]
    shifts = torch.randint(-n // 4, n // 4 + 1, (len(x),), generator=g)
    idx = (torch.arange(n)[None, :] - shifts[:, None]) % n
    x = torch.gather(x, 1, idx)
    x = x * 10 ** (-12 * torch.rand(len(x), 1, generator=g) / 20)
    rms = x.square().mean(1, keepdim=True).sqrt()
    snr_db = 40 * torch.rand(len(x), 1, generator=g)
    return x + torch.randn(x.shape, generator=g) * rms * 10 ** (-snr_db / 20)


def as_batch(clips) -> torch.Tensor:
    """A list of equal-length float clips (numpy) → (n, clip_len) float32 tensor."""
    return torch.from_numpy(np.stack(clips).astype(np.float32))


def _accuracy(p: torch.Tensor, y: torch.Tensor) -> float:
    return float((p.argmax(1) == y).float().mean())


@torch.no_grad()
def predict(model: DigitClassifier, x: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, clip_len) float32 → (probabilities (n, 10), features (n, D)), eval mode, in batches."""
    model.eval()
    probs, feats = [], []
    for i in range(0, len(x), batch):
        f = model.features(x[i : i + batch])
        feats.append(f)
        probs.append(model.head(f).softmax(-1))
    return torch.cat(probs), torch.cat(feats)


def train_classifier(data_dir: str | Path, out: str | Path | None = None, epochs: int = 12,
                     batch: int = 64, lr: float = 3e-3, seed: int = 0, log=print) -> dict:  # fmt: skip
    """Train a DigitClassifier on the `train` split of a prepared audio digits dataset, keep the epoch
    with the best `val` accuracy (held-out voices), and report its `test` accuracy (other held-out
    voices). AdamW, one-cycle learning rate (10 % warm-up, then cosine), label smoothing 0.05,
    `_augment` on every batch.
    Writes `out`/model.safetensors + config.json when `out` is given; returns the config dict."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    data = Dataset(data_dir)
    xtr, ytr = labelled_clips(data, "train")
    xva, yva = labelled_clips(data, "val")
    xte, yte = labelled_clips(data, "test")
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(xtr) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    best, best_state, history, t0 = -1.0, None, [], time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), batch):
            j = order[i : i + batch]
            loss = nn.functional.cross_entropy(model(_augment(xtr[j], g)), ytr[j], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        acc = _accuracy(predict(model, xva)[0], yva)
        history.append({"epoch": epoch + 1, "val_accuracy": acc, "loss": loss.item()})
        log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, val accuracy {acc:.1%}")
        if acc > best:
            best, best_state = acc, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    test_acc = _accuracy(predict(model, xte)[0], yte)
    cfg = {
        "kind": "digit-classifier",
        "classes": list(DIGITS),
        "widths": list(model.widths),
        "sample_rate": data.meta["sample_rate"],
        "clip_len": data.clip_len,
        "n_fft": N_FFT,
        "hop": HOP,
        "data": {
            "path": str(data_dir),
            "sha256": data.meta.get("sha256", {}),
            "clips": data.meta.get("clips"),
        },
        "train": {
            "epochs": epochs,
            "batch": batch,
            "lr": lr,
            "seed": seed,
            "wall_s": time.perf_counter() - t0,
            "threads": torch.get_num_threads(),
        },
        "val_accuracy": best,
        "test_accuracy": test_acc,
        "history": history,
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS))
        (out / CONFIG).write_text(json.dumps(cfg, indent=1) + "\n")
    return cfg


def load_classifier(path: str | Path, sample_rate: int | None = None) -> tuple[DigitClassifier, dict]:
    """(model in eval mode, its config) from a folder written by `train_classifier` (safetensors +
    JSON, nothing unpickled). Raises FileNotFoundError or ValueError for a folder that is not one (its
    config's fields or its weights unusable: ValueError naming the folder), and
    ValueError when `sample_rate` (Hz, the audio it will score) is given and is not the classifier's."""
    path = Path(path)
    cfg = json.loads((path / CONFIG).read_text())
    if not isinstance(cfg, dict) or cfg.get("kind") != "digit-classifier":
        kind = cfg.get("kind") if isinstance(cfg, dict) else None
        raise ValueError(f"{path}: not a digit classifier (kind {kind!r})")
    if sample_rate is not None and sample_rate != cfg.get("sample_rate"):
        raise ValueError(f"{path} classifies {cfg.get('sample_rate')} Hz audio, not {sample_rate} Hz")
    try:
        model = DigitClassifier(tuple(cfg["widths"]), len(cfg["classes"]))
        model.load_state_dict(load_file(str(path / WEIGHTS)))
    except FileNotFoundError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as exc:  # (not a traceback)
        why = " ".join(str(exc).split())  # (one line: torch lists each mismatched tensor on its own)
        raise ValueError(f"{path}: not a usable digit classifier ({type(exc).__name__}: {why})") from None
    return model.eval(), cfg


def sample_scores(model: DigitClassifier, clips: torch.Tensor, reference: torch.Tensor | None = None,
                  labels: torch.Tensor | None = None) -> dict:  # fmt: skip
    """The four measures (and the share of clips whose top class has p ≥ 0.9, and the top-class
    histogram) for `clips` (n ≥ 2, clip_len) float32; FID against `reference` clips when given, and
    "accuracy" when the clips' `labels` (n,) are."""
    p, f = predict(model, clips)
    top = p.argmax(1)
    out = {
        "clips": len(clips),
        **({} if labels is None else {"accuracy": _accuracy(p, labels)}),
        "inception_score": inception_score(p.numpy()),
        "modified_inception_score": modified_inception_score(p.numpy()),
        "am_score": am_score(p.numpy()),
        "confident_share": float((p.max(1).values >= 0.9).float().mean()),
        "top_class_counts": {d: int((top == i).sum()) for i, d in enumerate(DIGITS)},
    }
    if reference is not None:
        out["fid"] = frechet_distance(predict(model, reference)[1].numpy(), f.numpy())
    return out


# ---------------------------------------------------------------------------------------------
# Command line


def _score(args) -> dict:
    from model import load
    from model.card import AUDIO_BOS, generate
    from model.sampling import SamplingParams

    net = load(args.checkpoint)
    cfg = net.config
    if cfg.modality != "audio":
        raise ValueError(f"{args.checkpoint} is a {cfg.modality} model; score audio checkpoints")
    clf, ccfg = load_classifier(args.classifier, cfg.sample_rate)
    test, _ = labelled_clips(Dataset(args.data), "test")
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            min_p=args.min_p, seed=args.seed)  # fmt: skip
    rec = net.to_recurrent()
    t0 = time.perf_counter()
    outs = generate(rec, [[AUDIO_BOS]] * args.samples, ccfg["clip_len"], params)
    mu = cfg.codec
    gen = as_batch([mu.decode(np.array(o)) for o in outs])
    sampling = {k: getattr(params, k) for k in ("temperature", "top_k", "top_p", "min_p")}
    res = {"checkpoint": str(args.checkpoint), **sampling, "seed": args.seed,
           "generate_s": time.perf_counter() - t0, **sample_scores(clf, gen, test)}  # fmt: skip
    return res


def _reference(args) -> dict:
    """The measures on real clips: `clips` of `split` (all, or a seeded random subset), FID against all
    of `against` (default: test, or train when the split is test)."""
    clf, _ = load_classifier(args.classifier)
    data = Dataset(args.data)
    x, y = labelled_clips(data, args.split)
    against = args.against or ("train" if args.split == "test" else "test")
    if against == args.split:
        raise ValueError(f"--against {against} is the split being scored; FID would compare it with itself")
    if args.clips:
        if args.clips > len(x):
            raise ValueError(f"--clips {args.clips}: the {args.split} split has {len(x)}")
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))[: args.clips]
        x, y = x[keep], y[keep]
    ref, _ = labelled_clips(data, against)
    return {"split": args.split, "fid_against": against, **sample_scores(clf, x, ref, labels=y)}


SPLIT_NAMES = ("train", "val", "test")


def main(argv: list[str] | None = None) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    ap = argparse.ArgumentParser(prog="python -m model.classifier", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the classifier on a prepared digits dataset", formatter_class=fmt)
    t.add_argument("--data", default="data/digits", help="a dataset written by `python -m model.data audio`")
    t.add_argument("--out", required=True, help="folder for model.safetensors + config.json")
    t.add_argument("--epochs", type=int, default=12, help="passes over the train split (1-1000)")
    t.add_argument("--seed", type=int, default=0, help="weights, batches and augmentation")
    t.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    r = sub.add_parser("reference", help="the measures on real clips (the ceiling)", formatter_class=fmt)
    r.add_argument("--classifier", required=True, help="a folder written by `train`")
    r.add_argument("--data", default="data/digits", help="a dataset written by `python -m model.data audio`")
    r.add_argument("--split", default="test", choices=SPLIT_NAMES, help="the clips scored")
    r.add_argument("--against", choices=SPLIT_NAMES, help="FID's reference split (default: train for the "
                   "test split, else test)")  # fmt: skip
    r.add_argument("--clips", type=int, default=0, help="score a random subset of this many (0: all)")
    r.add_argument("--seed", type=int, default=0, help="the subset")
    r.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    s = sub.add_parser("score", help="generate unconditional clips from an audio checkpoint and score them",
                       formatter_class=fmt)  # fmt: skip
    s.add_argument("checkpoint", help="an audio model checkpoint folder")
    s.add_argument("--classifier", required=True, help="a folder written by `train`")
    s.add_argument("--data", default="data/digits", help="its test split is FID's reference")
    s.add_argument("--samples", type=int, default=256, help="clips generated and scored (2-4096)")
    s.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely codes (0: off)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    s.add_argument(
        "--min-p", type=float, default=0.0, help="drop codes below min_p x the most likely (0: off)"
    )
    s.add_argument("--seed", type=int, default=0, help="the first clip's seed (clip i: seed + i)")
    s.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if not 0 <= args.threads <= 1024:
        ap.error(f"--threads must be in [0, 1024], got {args.threads}")
    if args.cmd == "train" and not 1 <= args.epochs <= 1000:
        ap.error(f"--epochs must be in [1, 1000], got {args.epochs}")
    if args.cmd == "score" and not 2 <= args.samples <= 4096:
        ap.error(f"--samples must be in [2, 4096] (the measures compare clips), got {args.samples}")
    if args.cmd == "reference" and not (args.clips == 0 or args.clips >= 2):
        ap.error(f"--clips must be 0 (all) or at least 2, got {args.clips}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.cmd == "train":
            cfg = train_classifier(args.data, args.out, epochs=args.epochs, seed=args.seed,
                                   log=lambda m: print(m, file=sys.stderr, flush=True))  # fmt: skip
            res = {k: cfg[k] for k in ("val_accuracy", "test_accuracy")}
        elif args.cmd == "reference":
            res = _reference(args)
        else:
            res = _score(args)
    except (ValueError, FileNotFoundError) as exc:  # bad input: one line, not a traceback
        ap.exit(2, f"{ap.prog} {args.cmd}: error: {exc}\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
