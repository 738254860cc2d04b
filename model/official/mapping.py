"""The parameter mapping: an official state-spaces/s4 state dict + its config → our config + tensors.

A pure function (`map_official`): it knows nothing of files or serving. Every source tensor is consumed
or the whole import is refused by name; every option that changes the computed function is checked
against what our model expresses and refused (`Unsupported`, naming the option and its value) when it
cannot be expressed exactly.

Facts followed (state-spaces/s4 at e757cef):
- src/models/sequence/kernels/ssm.py: Λ = −real_transform(A_real) − i·imag_transform(A_imag);
  Δ = dt_transform(inv_dt) (after sinh when dt_fast), (H,1) or (H,N/2) untied; B (1,S,N/2), P (r,S,N/2),
  A_* (S,N/2) hold n_ssm = S SSMs and channel h uses SSM h mod S; DPLR A = diag(Λ) − P Pᴴ, bilinear;
  its C (channels,H,N/2) is the truncated generating function C̃ = C̄(I − Ā^L) for the layer's own
  `l_kernel` buffer L (doubled in place when a longer input arrives); for S4D C is C̄, ZOH or bilinear.
- modules/s4block.py + kernels/fftconv.py: y = GLU(Linear(GELU(K̄ ∗ u + D u))); D is (channels, H).
- backbones/model.py, block.py: pre-norm residual blocks (LayerNorm, eps 1e-5), a final LayerNorm;
  the layer list (e.g. [s4, ffn]) is repeated n_layers times, one residual block per entry. `transposed`
  only changes the layout, (B, H, L) instead of (B, L, H), and so the norm: nn/normalization.py
  Normalization('layer', transposed=True) is TransposedLN (scalar by default: y = s/σ·(x − μ + m), one
  mean and population σ over the channels, no ε), in every block and as the final norm; the layers'
  own `transposed` is overwritten by the backbone's, their Linear (TransposedLinear in the FFN) weights
  have nn.Linear's shapes and names.
- modules/ffn.py: Linear(H, expand·H) → GELU → dropout → Linear(expand·H, H).
- tasks/tasks.py LMTask: Embedding (encoder.0), × √d_model when `rescale` (default true), Linear decoder
  with bias (tied to the embedding when `tied`).
- tasks/tasks.py AdaptiveLMTask + nn/adaptive_softmax.py (the WikiText-103 pipeline): AdaptiveEmbedding
  (encoder.0: emb_layers.i, emb_projs.i; × √d_model inside) and ProjectedAdaptiveLogSoftmax (train.py
  registers it twice, loss. and loss_val.; its shared_out_projs are the embedding's projections), whose
  compute_logits (generate.py) gives the log-probabilities; see map_adaptive.
- checkpoints/convert_v3_to_v4.py: version-3 names log_dt (H), inv_w_real/log_w_real, w_imag (= −A_imag),
  kernel.kernel.*, kernel.kernel.L, layer.kernel / layer.D one module up.
- backbones/sashimi.py, backbones/unet.py (the U-Net SaShiMi, `_name_: unet`), modules/pool.py: see
  map_sashimi.
- models/s4/s4d.py (standalone S4D): Λ = −exp(log_A_real) + i·A_imag, B = 1, Δ = exp(log_dt), ZOH,
  output_linear = Conv1d(H, 2H, 1) + GLU.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model.adaptive import shard_bounds, shard_widths
from model.network import MAX_SIZE

TRANSFORMS = ("none", "exp", "relu", "sigmoid", "softplus")
# src/dataloaders/audio.py: the quantized-audio datasets (vocab 2^bits); sample rates of the official data
# (qautoaudio: YouTubeMix, Beethoven; their rate is the files')
QAUTOAUDIO_RATES = {"beethoven": 16000, "youtube_mix": 16000}  # qautoaudio's official data, by its path
AUDIO_DATASETS = {"sc09": 16000, "qautoaudio": None, "maestro": 16000, "ljspeech": 16000, "music": 16000}
# dataset.quantization when a config leaves it out: the dataset class's init_defaults (src/dataloaders/
# audio.py; qautoaudio's is linear, where "mu-law" was assumed: a helper's audit); music's is not in the
# checkout (deprecated): mu-law, assumed and said so
DEFAULT_QUANTIZATION = {"sc09": "mu-law", "qautoaudio": "linear", "maestro": "mu-law", "ljspeech": "mu-law"}
AUDIO_TASKS = ("multiclass_classification", "base", None)  # the sc09-style task (sashimi-sc09.yaml)
LN_EPS = 1e-5
# the backbone pools (modules/pool.py registry; version 3's sequence/pool.py) that are the identity at
# stride 1 with no expand (or version 3's expand 1): DownAvgPool ('pool', 'avg') and DownSample ('sample').
# Not DownSpectralPool ('spectral': ifftn twice, a helper's audit) nor DownLinearPool ('linear': a Linear)
IDENTITY_POOLS = ("pool", "avg", "sample")
# the note a version-3 checkpoint's import carries (`_v3_to_v4`); model.convert's card reads it
V3_RENAMED_NOTE = "version-3 names renamed as checkpoints/convert_v3_to_v4.py does (w_imag negated)"


class Unsupported(ValueError):
    """The checkpoint uses an option (or holds a tensor) our model cannot express exactly."""


class ConfigMismatch(Unsupported):
    """The config contradicts the weights: an option the tensor shapes also determine differs."""


class MissingConfig(Unsupported):
    """A state dict without its run's config (the caller says where to give it)."""


def _agree(option: str, config_value, weights_value) -> None:
    """Raise ConfigMismatch when the config's value of `option` is not the one the weights imply."""
    if config_value != weights_value:
        raise ConfigMismatch(
            f"{option} = {config_value!r} in the config, but the weights have {weights_value!r}: "
            "the config does not belong to these weights?"
        )


@dataclass
class Imported:
    config: dict  # our ModelConfig fields
    tensors: dict[str, torch.Tensor]  # our state dict; SSM parameters in float64
    mapping: list[tuple[str, str, str]] = field(default_factory=list)  # (ours, source, how)
    notes: list[str] = field(default_factory=list)  # options read from the config, and their meaning


def _applied(name: str, x: str) -> str:
    """How `transform` with `name` reads applied to `x`, for a model card: "exp(A_real)", "A_imag"."""
    return x if name == "none" else f"{name}({x})"


def transform(x: torch.Tensor, name: str, option: str) -> torch.Tensor:
    """src/models/sequence/kernels/ssm.py param_transform, in float64."""
    x = x.double()
    if name == "none":
        return x
    if name == "exp":
        return torch.exp(x)
    if name == "relu":
        return F.relu(x) + 1e-4
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "softplus":
        return F.softplus(x)
    raise Unsupported(f"{option} = {name!r}: unknown transform (expected one of {TRANSFORMS})")


class _Source:
    """The state dict with consumption tracking: take() marks a key used; leftovers are refused."""

    def __init__(self, sd: dict[str, torch.Tensor]):
        self.sd = sd
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.sd

    def take(self, key: str, shape: tuple | None = None) -> torch.Tensor:
        if key not in self.sd:
            raise Unsupported(f"tensor {key!r} is missing from the state dict")
        t = self.sd[key]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise Unsupported(f"tensor {key!r} has shape {list(t.shape)}, expected {list(shape)}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise Unsupported(f"tensor {key!r} has non-finite values")
        self.used.add(key)
        return t

    def take_glu_out(self, prefix: str, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """An S4 block's output layer `prefix` (…output_linear.): Linear(d, 2d) then GLU, its module tree's
        `0.weight` (2d, d) and `0.bias` (2d,). Raises Unsupported, naming it, for an output layer without
        the GLU that the config check cannot see: version 3's `postact: null` (with no `final_act`: version
        4 reads that config as a GLU), whose LinearActivation is the bare Linear(d, d), `weight` and `bias`
        without the `0.`. (It was refused as "tensor …output_linear.0.weight is missing".) The same layer
        under `0.` with d outputs (a GLU config beside weights of an activation-less layer) is refused too.
        """
        bare = self.sd.get(prefix + "weight")
        under = self.sd.get(prefix + "0.weight")
        if under is None and bare is not None or under is not None and under.shape[:1] == (d,):
            key = prefix + ("weight" if under is None else "0.weight")
            raise Unsupported(
                f"tensor {key!r} of shape {list(self.sd[key].shape)}: an output layer of {d} features "
                "without a GLU (version 3's postact: null, or final_act 'id'), where only a GLU output layer "
                f"(Linear({d}, {2 * d}) then GLU) is supported"
            )
        return self.take(prefix + "0.weight", (2 * d, d)), self.take(prefix + "0.bias", (2 * d,))

    def leftovers(self) -> list[str]:
        return sorted(set(self.sd) - self.used)


def _opt(cfg: dict, key: str, default, where: str):
    v = cfg.get(key, default)
    if isinstance(v, str) and v.startswith("${"):
        raise Unsupported(f"{where}.{key} = {v!r}: an interpolation this importer cannot resolve")
    return v


def _expect(cfg: dict, key: str, default, allowed, where: str, why: str) -> None:
    v = _opt(cfg, key, default, where)
    if v not in allowed:
        raise Unsupported(f"{where}.{key} = {v!r}: {why}")


def _c(t: torch.Tensor) -> torch.Tensor:
    """(..., 2) real view → complex128."""
    return torch.view_as_complex(t.double().contiguous())


def _per_channel(x: torch.Tensor, H: int, dim: int) -> torch.Tensor:
    """Fold n_ssm = S copies into H channels: channel h uses SSM h mod S (einops '(v t)' repeat)."""
    S = x.shape[dim]
    idx = torch.arange(H) % S
    return x.index_select(dim, idx)


def _drop_defaults(config: dict) -> dict:
    """Leave out l_kernel=None and dt_tied=True (our defaults), so the config.json of a model that
    needs neither loads in any s4serve that has the other fields."""
    return {
        k: v for k, v in config.items() if not ((k == "l_kernel" and v is None) or (k == "dt_tied" and v))
    }


class _V3Default(str):
    """An option's version-3 default that its kernel's names imply (an S4D kernel's `disc`, 'bilinear'
    where version 4's is 'zoh'): the config's value where it gives one, else this."""


def _kernel_opts(lc: dict, implied: dict, where: str) -> dict:
    """A layer config's options for one kernel, with those its version-3 names imply (_v3_to_v4)."""
    opts = dict(lc)
    for k2, v2 in implied.items():
        opts[k2] = _opt(lc, k2, str(v2), where) if isinstance(v2, _V3Default) else v2
    return opts


def _v3_to_v4(sd: dict[str, torch.Tensor], notes: list[str]) -> tuple[dict, dict[str, dict]]:
    """Rename version-3 keys (convert_v3_to_v4.py's renames); returns the new dict and, per kernel
    prefix, the options that the old names imply: a value, or a _V3Default the config may override.

    Version 3 (src/models/sequence/ss/kernel.py at v3.0.0): SSKernelNPLR has inv_w_real (its transform
    the option `real_type`, default 'exp', −relu without v4's 1e-4 floor) and w_imag (= −A_imag); SSKernelDiag
    has inv_A_real (`real_type`; its relu has the floor), A_imag (= +Im Λ: version 4 stores −Im Λ), B of
    shape (n_ssm, N/2, 2) (version 4: (1, n_ssm, N/2, 2)), a parameter A it never reads (its init), and
    `disc` 'bilinear' by default (version 4's diagonal kernel: 'zoh'). convert_v3_to_v4.py handles the
    DPLR names only; the diagonal kernel's are read here as its SSKernelDiag defines them, from version 3's
    own keys or from those the script moved (it negates every A_imag, flattens kernel.kernel, renames
    log_dt, and leaves inv_A_real, B and A as they were)."""
    v3_names = r"(log_dt|inv_w_real|log_w_real|w_imag|inv_A_real|kernel\.kernel\.)"
    if not any(re.search(v3_names, k) for k in sd):
        return sd, {}
    diag = {k[: -len("inv_A_real")] for k in sd if k.endswith(".inv_A_real")}  # v3 S4D kernels' prefixes
    out, implied = {}, {}
    for k, v in sd.items():
        old_prefix = k.rsplit(".", 1)[0] + "."
        if old_prefix in diag and k == old_prefix + "A":
            continue  # SSKernelDiag's unread copy of its initial A
        # version 3's module paths (…layer.kernel.kernel.X, …layer.D) only: a checkpoint whose keys
        # convert_v3_to_v4.py has already moved keeps the rest (renaming every key mangled those)
        native = ".kernel.kernel." in k
        nk = re.sub(r"\.kernel\.kernel\.L$", ".kernel.kernel.l_kernel", k)
        nk = re.sub(r"\.layer\.kernel\.kernel\.", ".layer.layer.kernel.", nk)
        nk = re.sub(r"(?<!\.layer)\.layer\.D$", ".layer.layer.D", nk)
        prefix = nk.rsplit(".", 1)[0] + "."
        if nk.endswith(".log_dt"):
            v, nk = v.unsqueeze(-1), nk[: -len("log_dt")] + "inv_dt"
            implied.setdefault(prefix, {})["dt_transform"] = "exp"
        elif nk.endswith(".log_w_real"):
            nk = nk[: -len("log_w_real")] + "A_real"
            implied.setdefault(prefix, {})["real_transform"] = "exp"
        elif nk.endswith(".inv_w_real"):  # (its transform: real_type, which map_ssm_kernel reads)
            nk = nk[: -len("inv_w_real")] + "A_real"
        elif nk.endswith(".w_imag"):
            v, nk = -v, nk[: -len("w_imag")] + "A_imag"
            implied.setdefault(prefix, {})["imag_transform"] = "none"
        elif old_prefix in diag and nk.endswith(".inv_A_real"):
            nk = nk[: -len("inv_A_real")] + "A_real"
            implied.setdefault(prefix, {})["disc"] = _V3Default("bilinear")
        elif old_prefix in diag and nk.endswith(".A_imag"):
            v = -v if native else v  # (convert_v3_to_v4.py negates every A_imag it sees)
            implied.setdefault(prefix, {})["imag_transform"] = "none"
        elif old_prefix in diag and nk.endswith(".B") and v.dim() == 3:
            v = v.unsqueeze(0)
        out[nk] = v
    if diag:
        notes.append("version-3 diagonal kernels: inv_A_real, A_imag as +Im Λ, B unsqueezed, A dropped")
    notes.append(V3_RENAMED_NOTE)
    return out, implied


# ---------------------------------------------------------------------------------------------
# One SSM layer


def map_ssm_kernel(
    src: _Source, kp: str, H: int, opts: dict, where: str, kind: str
) -> tuple[dict[str, torch.Tensor], dict, list[tuple[str, str, str]]]:
    """kernel prefix kp (…kernel.) → our kernel tensors (float64) + facts (N, rank, disc, dt_tied, L).

    kind: "s4" (SSMKernelDPLR) or "s4d" (SSMKernelDiag). The options the shapes also determine
    (d_state, n_ssm, rank, dt_tie, l_max against l_kernel), where the config gives
    them, must agree with the tensors, else ConfigMismatch.

    Re Λ is computed as the run's code computed it, bit for bit in float64: version 4's real_transform
    (param_transform: its relu adds 1e-4) or version 3's real_type (SSKernelDiag's relu adds 1e-4 too;
    SSKernelNPLR's relu does not: Re Λ = −relu(A_real), which is −A_real where A_real > 0; an A_real ≤ 0 there
    is Re Λ = 0, a mode on the imaginary axis, refused naming the count). Every Re Λ is then stored as our
    one parameter, log(−Re Λ) (the exp transform; the served Re Λ = −exp of it agrees to float64's
    rounding). Fine-tuning a converted model therefore trains log(−Re Λ), not the run's parameter: a step
    moves Re Λ in proportion to itself (relu's gradient is 1 wherever A_real > 0), learning rates and weight
    decay act on another quantity, and Re Λ stays < 0 (under version 3's DPLR relu it could reach 0, where
    the gradient vanishes and the mode stops decaying)."""
    for opt, allowed, why in (
        ("channels", (1,), "our S4 layer maps each channel to one output (C = 1)"),
        ("bandlimit", (None,), "the S4ND band limit is not supported"),
        ("is_real", (False,), "real-valued (EMA) SSMs are not supported"),
    ):
        _expect(opts, opt, allowed[0], allowed, where, why)
    dt_t = _opt(opts, "dt_transform", "exp", where)
    # a version-3 config names the transform real_type (version 4's code takes no such option): read where
    # real_transform is absent, as for a checkpoint convert_v3_to_v4.py renamed (its config kept)
    v3_real = "real_transform" not in opts and "real_type" in opts
    re_t = _opt(opts, "real_type", "exp", where) if v3_real else _opt(opts, "real_transform", "exp", where)
    # version 3's DPLR relu (SSKernelNPLR._w): Re Λ = −relu(A_real), without the 1e-4 of version 4's relu
    # and of version 3's own diagonal kernel's (−relu(A_real) − 1e-4, which is −transform(A_real, 'relu'))
    v3_relu = v3_real and kind == "s4" and re_t == "relu"
    im_t = _opt(opts, "imag_transform", "none", where)
    for name, v in (("dt_transform", dt_t), ("real_transform", re_t), ("imag_transform", im_t)):
        if v not in TRANSFORMS:
            raise Unsupported(f"{where}.{name} = {v!r}: unknown transform (expected one of {TRANSFORMS})")
    disc = "bilinear" if kind == "s4" else _opt(opts, "disc", "zoh", where)
    if disc not in ("zoh", "bilinear"):
        raise Unsupported(f"{where}.disc = {disc!r}: only 'zoh' and 'bilinear' are supported")
    mp: list[tuple[str, str, str]] = []

    A_real = src.take(kp + "A_real")
    S, N2 = A_real.shape
    for opt, weights_value in (("d_state", 2 * N2), ("n_ssm", S)):
        if opt in opts:
            value = _opt(opts, opt, None, where)
            _agree(f"{where}.{opt}", H if (opt == "n_ssm" and value is None) else value, weights_value)
    if H % S:
        raise Unsupported(f"{where}: n_ssm = {S} does not divide d_model = {H}")
    A_imag = src.take(kp + "A_imag", (S, N2))
    C = src.take(kp + "C")
    if C.dim() != 4 or C.shape[0] != 1:
        raise Unsupported(f"{where}.channels = {C.shape[0] if C.dim() == 4 else '?'}: C is {list(C.shape)}")
    C = src.take(kp + "C", (1, H, N2, 2))
    Bt = src.take(kp + "B", (1, S, N2, 2))
    inv_dt = src.take(kp + "inv_dt").double()
    if inv_dt.shape not in ((H, 1), (H, N2)):
        raise Unsupported(f"{where}: inv_dt has shape {list(inv_dt.shape)}, expected [{H}, 1] or [{H}, {N2}]")
    dt_tied = inv_dt.shape[1] == 1
    if "dt_tie" in opts:
        _agree(f"{where}.dt_tie", bool(_opt(opts, "dt_tie", True, where)), dt_tied)
    dt_fast = bool(_opt(opts, "dt_fast", False, where))
    if dt_fast:
        inv_dt = torch.sinh(inv_dt)
    dt = transform(inv_dt, dt_t, f"{where}.dt_transform")  # (H, 1) or (H, N2)
    if not (dt > 0).all() or not torch.isfinite(dt).all():
        raise Unsupported(f"{where}: Δ = dt_transform(inv_dt) is not positive and finite")
    re = -(F.relu(A_real.double()) if v3_relu else transform(A_real, re_t, f"{where}.real_transform"))  # Re Λ
    im = -transform(A_imag, im_t, f"{where}.imag_transform")  # Im Λ
    if v3_relu and not (re < 0).all():
        raise Unsupported(
            f"{where}.real_type = 'relu' with version 3's DPLR kernel: Re Λ = −relu(A_real) = 0 in "
            f"{int((re == 0).sum())} of {re.numel()} modes (A_real ≤ 0; version 3's relu has no floor): a "
            "mode on the imaginary axis, which our S4 (Re Λ < 0, stored as log(−Re Λ)) cannot hold"
        )
    if not (re < 0).all():
        raise Unsupported(
            f"{where}.real_transform = {re_t!r}: Re Λ = {float(re.max()):.3g} ≥ 0 in the checkpoint "
            "(our S4 keeps Re Λ < 0, stored as log(−Re Λ))"
        )
    out = {
        "log_neg_re": _per_channel(torch.log(-re), H, 0),
        "im": _per_channel(im, H, 0),
        "B": torch.view_as_real(_per_channel(_c(Bt[0]), H, 0)),
        "C": torch.view_as_real(_c(C[0])),
    }
    if dt_tied:
        out["log_dt"] = torch.log(dt[:, 0])
    else:
        if kind == "s4":
            raise Unsupported(f"{where}.dt_tie = False: untied Δ is supported for S4D (diag) only")
        out["log_dt"] = torch.log(dt)
    how_dt = f"log Δ = log {_applied(dt_t, 'inv_dt')}" + (
        " (after sinh: dt_fast)" if opts.get("dt_fast") else ""
    )
    mp += [
        ("kernel.log_dt", kp + "inv_dt", how_dt + ("" if dt_tied else ", one Δ per mode (untied)")),
        (
            "kernel.log_neg_re",
            kp + "A_real",
            f"log(−Re Λ), Re Λ = −{_applied(re_t, 'A_real')}"
            + (" (version 3's DPLR relu: no 1e-4 floor)" if v3_relu else "")
            + f"; channel h ← SSM h mod {S}",
        ),
        ("kernel.im", kp + "A_imag", f"Im Λ = −{_applied(im_t, 'A_imag')}; channel h ← SSM h mod {S}"),
        ("kernel.B", kp + "B", f"B[0]; channel h ← SSM h mod {S}"),
    ]
    facts = {"N2": N2, "S": S, "disc": disc, "dt_tied": dt_tied, "rank": 0, "l_kernel": None,
             "transforms": {"dt": dt_t, "real": "relu without floor (version 3's DPLR)" if v3_relu else re_t,
                            "imag": im_t}, "dt_fast": dt_fast}  # fmt: skip
    if kind == "s4":
        P = src.take(kp + "P")
        if P.dim() != 4 or tuple(P.shape[1:]) != (S, N2, 2):
            raise Unsupported(f"{where}: P has shape {list(P.shape)}, expected [rank, {S}, {N2}, 2]")
        out["P"] = torch.view_as_real(_per_channel(_c(P), H, 1))
        facts["rank"] = P.shape[0]
        if "rank" in opts:
            _agree(f"{where}.rank", _opt(opts, "rank", 1, where), P.shape[0])
        L = int(src.take(kp + "l_kernel").item())
        if L <= 0:
            raise Unsupported(
                f"{where}: l_kernel = {L}: the model never ran in conv mode, so C is not yet the "
                "truncated generating function of any length"
            )
        l_max = _opt(opts, "l_max", None, where)
        if type(l_max) is int and l_max > 0 and not (L % l_max == 0 and (L // l_max).bit_count() == 1):
            # the kernel is set up at l_max, then only doubled (ssm.py _setup_C): l_kernel = l_max·2^k
            raise ConfigMismatch(
                f"{where}.l_max = {l_max} in the config, but the weights have l_kernel = {L} (not l_max "
                "times a power of 2): the config does not belong to these weights?"
            )
        facts["l_kernel"] = L
        mp += [
            ("kernel.P", kp + "P", f"P; channel h ← SSM h mod {S}"),
            ("kernel.C", kp + "C", f"C[0] = C̃ = C̄(I − Ā^L) with this layer's l_kernel L = {L}"),
            ("config.l_kernel", kp + "l_kernel", "the layer's own kernel length"),
        ]
    else:
        if src.has(kp + "P"):  # SSMKernelDiag does not register P; a P here is a different kernel
            raise Unsupported(f"{where}: a diagonal kernel with a P tensor ({kp}P)")
        mp.append(("kernel.C", kp + "C", f"C[0] = C̄ ({disc})"))
    return {k: v.contiguous() for k, v in out.items()}, facts, mp


# ---------------------------------------------------------------------------------------------
# The official src/ pipeline: SequenceLightningModule (model. / encoder. / decoder.)


def _plain_residual(res) -> bool:
    """Whether model.residual is the plain residual x + f(x): 'R' (or 'residual'), as a name or a dict
    with alpha = beta = 1."""
    return res in ("R", "residual") or (
        isinstance(res, dict) and res.get("_name_") in ("R", "residual")
        and res.get("alpha", 1.0) == 1.0 and res.get("beta", 1.0) == 1.0
    )  # fmt: skip


def _check_decoder(cfg: dict) -> None:
    """The task's decoders: none, or a `sequence` decoder (src/tasks/decoders.py SequenceDecoder) that keeps
    every position (no l_output, no lengths, mode last or first: the modes that do not mix positions).
    Its `sum` (a cumulative sum over positions), `pool` and `ragged` modes are refused by name (a SaShiMi's
    was ignored, and served logits 1.01 off in relative terms: a helper's audit). train.py chains
    model.decoder (which it pops from the backbone's config) before decoder, so both are read (model.decoder
    was not: a sum decoder there was served as per-token)."""
    m = cfg.get("model")
    for where, dec in (("model.decoder", m.get("decoder") if isinstance(m, dict) else None),
                       ("decoder", cfg.get("decoder"))):  # fmt: skip
        per_token = dec == "sequence" or (
            isinstance(dec, dict) and dec.get("_name_") == "sequence" and dec.get("l_output") is None
            and not dec.get("use_lengths", False) and dec.get("mode", "last") in ("last", "first")
        )  # fmt: skip
        if dec not in (None, []) and not per_token:
            raise Unsupported(f"{where} = {dec!r}: only a per-token Linear decoder is supported")


def _absent(cfg: dict, key: str, meaning: str) -> str:
    """A refusal's note when `key` is not in `cfg` (the official constructor's default, `meaning`, applies);
    "" when it is."""
    return "" if key in cfg else f" (absent from the config: the official default, {meaning})"


def _check_backbone(m: dict, pool_weights: bool = False) -> str:
    """The isotropic backbone's options; returns our norm: "layer" (LayerNorm) or, for a transposed
    backbone, "tln" (the scalar TransposedLN its Normalization('layer') builds). `pool_weights`: whether
    the state dict has a pool's tensors (version 4 builds a Linear for any `expand`; version 3's
    `expand: 1`, its base.yaml's default, is the identity and has none)."""
    w = "model"
    _expect(m, "_name_", "model", ("model",), w, "only the isotropic backbone (model) is supported")
    _expect(m, "prenorm", True, (True,), w, "post-norm blocks are not supported")
    _expect(m, "transposed", False, (False, True), w, "expected true or false")
    transposed = _opt(m, "transposed", False, w)
    _expect(m, "bidirectional", False, (False,), w, "bidirectional backbones cannot run as a recurrence")
    # residual and norm: the official SequenceModel's defaults when absent, None (no residual connection,
    # no norms); a config without model.residual was read as 'R', a model 1.9 off in relative terms
    # served as verified (a hand-written config beside a .pt: a helper's audit)
    res = _opt(m, "residual", None, w)
    if not _plain_residual(res):
        raise Unsupported(f"model.residual = {res!r}{_absent(m, 'residual', 'no residual connection')}: only "
                          "the plain residual 'R' is supported")  # fmt: skip
    n_repeat = _opt(m, "n_repeat", 1, w)
    if type(n_repeat) is not int or n_repeat < 1:
        raise Unsupported(f"model.n_repeat = {n_repeat!r}: expected an integer ≥ 1")
    norm = _opt(m, "norm", None, w)
    if norm is None:
        raise Unsupported(f"model.norm = None{_absent(m, 'norm', 'no norms')}: only LayerNorm ('layer') is "
                          "supported (pre-norm blocks and a final norm)")  # fmt: skip
    if transposed:  # TransposedLN(d, **norm's other keys): scalar (default True) is its only option
        if isinstance(norm, dict) and norm.get("_name_") == "layer" and norm.get("scalar", True) is False:
            raise Unsupported(
                f"model.norm = {norm!r} with model.transposed = True: the per-channel TransposedLN "
                "(scalar false) is not supported, only the scalar one (the default)"
            )
        if not (norm == "layer" or (isinstance(norm, dict) and norm.get("_name_") == "layer"
                and set(norm) <= {"_name_", "scalar"})):  # fmt: skip
            raise Unsupported(
                f"model.norm = {norm!r} with model.transposed = True: only 'layer' (the scalar "
                "TransposedLN) is supported"
            )
    elif not (norm == "layer" or (isinstance(norm, dict) and norm.get("_name_") == "layer"
              and set(norm) <= {"_name_", "eps"} and norm.get("eps", LN_EPS) == LN_EPS)):  # fmt: skip
        if isinstance(norm, dict) and norm.get("_name_") == "layer":  # a LayerNorm: name what is not default
            other = {k: v for k, v in norm.items() if k != "_name_" and not (k == "eps" and v == LN_EPS)}
            options = ", ".join(f"{k} = {v!r}" for k, v in other.items())
            raise Unsupported(
                f"model.norm = {norm!r}: a LayerNorm with {options}: only LayerNorm's defaults (eps 1e-5, "
                "elementwise affine) are supported"
            )
        raise Unsupported(f"model.norm = {norm!r}: only LayerNorm ('layer', eps 1e-5) is supported")
    pool = _opt(m, "pool", None, w)
    if pool is not None and not (
        isinstance(pool, dict)
        and pool.get("stride", 1) == 1
        and (pool.get("expand") is None or (pool.get("expand") == 1 and not pool_weights))
    ):
        raise Unsupported(f"model.pool = {pool!r}: pooling is not supported in the isotropic backbone")
    if pool is not None and pool.get("_name_", "pool") not in IDENTITY_POOLS:
        raise Unsupported(
            f"model.pool._name_ = {pool['_name_']!r}: at stride 1 only the pools {IDENTITY_POOLS} are the "
            "identity (the spectral pool's two inverse FFTs mix the whole sequence, the future too)"
        )
    return "tln" if transposed else "layer"


def _agree_norm(sd: dict[str, torch.Tensor], norm: str) -> None:
    """The norm the config implies (model.transposed) against the final norm's tensors: a LayerNorm has
    model.norm.norm.weight, the scalar TransposedLN model.norm.norm.s."""
    weights = {"model.norm.norm.weight": "layer", "model.norm.norm.s": "tln"}
    found = {v for k, v in weights.items() if k in sd}
    if len(found) == 1 and found != {norm}:
        has = "LayerNorms (norm.norm.weight)" if "layer" in found else "TransposedLNs (norm.norm.s, m)"
        raise ConfigMismatch(
            f"model.transposed = {norm == 'tln'} in the config, but the weights have {has}: "
            "the config does not belong to these weights?"
        )


def _check_s4_layer(lc: dict, where: str) -> str:
    """The S4Block options; returns our kernel kind."""
    for opt, default, allowed, why in (
        ("bidirectional", False, (False,), "a two-sided kernel has no recurrence"),
        ("gate", None, (None,), "gated (GSS) blocks are not supported"),
        ("bottleneck", None, (None,), "bottleneck (GSS) blocks are not supported"),
        ("activation", "gelu", ("gelu",), "only GELU is supported"),
        ("mult_act", None, (None, "id", "identity", "linear", "none"), "only no multiplicative activation"),
        ("weight_norm", False, (False,), "weight-normalized output layers are not supported"),
        ("layer", "fftconv", ("fftconv",), "only the FFTConv inner layer is supported"),
        # options of other official versions (at e757cef each one reaches dplr() and fails there, so a run
        # that set it trained elsewhere), each taken silently before: v4.0's force_real (A = Re A: Im Λ
        # 0, A_imag unused), version 3's shift (the convolution delayed one step), hyper_act (a second
        # channel multiplying the first) and linear (no activation and output layer): a helper's audit
        ("force_real", False, (False,), "state-spaces/s4 v4.0's real-valued SSM (Im Λ = 0) is not supported"),
        ("shift", False, (False,), "version 3's shifted convolution (one step late) is not supported"),
        ("hyper_act", None, (None,), "version 3's hypernetwork multiplication is not supported"),
        (
            "linear",
            False,
            (False,),
            "version 3's linear S4 layer (no activation or output layer) is not supported",
        ),
    ):
        _expect(lc, opt, default, allowed, where, why)
    final = lc.get("final_act", "glu")
    if lc.get("postact") is not None:  # the deprecated name (s4block.py swaps them)
        final = lc["postact"]
    if final != "glu":
        raise Unsupported(f"{where}.final_act = {final!r}: only a GLU output layer is supported")
    mode = lc.get("mode", lc.get("kernel", "dplr"))
    if mode is None:
        mode = lc.get("kernel")
    if mode in ("nplr", "dplr", "s4"):
        return "s4"
    if mode in ("diag", "s4d"):
        return "s4d"
    raise Unsupported(
        f"{where}.mode = {mode!r}: only the S4 (nplr/dplr) and S4D (diag) kernels are supported"
    )


def _agree_kernel(sd: dict[str, torch.Tensor], lc: dict, where: str, blocks: list[str] | None = None) -> None:
    """The config's kernel (mode nplr/dplr or diag) against the weights': a DPLR kernel has a P. `blocks`:
    the key prefixes of the blocks this layer config builds ("model.layers.3."); None: every block (a
    SaShiMi's one layer config). (Looking in every block made a pattern of S4 and S4D layers a "config does
    not belong to these weights" for its S4D layer: a helper's audit.)"""
    has_p = any(
        k.endswith(".layer.layer.kernel.P")
        and (k.startswith(tuple(blocks)) if blocks else k.startswith("model."))
        for k in sd
    )
    if _check_s4_layer(lc, where) != ("s4" if has_p else "s4d"):
        mode = lc.get("mode") or lc.get("kernel")
        weights = "a DPLR kernel (P: mode nplr/dplr)" if has_p else "a diagonal kernel (no P: mode diag)"
        raise ConfigMismatch(
            f"{where}.mode = {mode!r} in the config, but the weights have {weights}: "
            "the config does not belong to these weights?"
        )


def _weights_kinds(sd: dict[str, torch.Tensor], n_blocks: int) -> list[str]:
    """The kind of each residual block model.layers.{j}: 's4' (an SSM kernel) or 'ffn' (layer.ff)."""
    kinds = []
    for j in range(n_blocks):
        p = f"model.layers.{j}.layer."
        kinds.append("ffn" if any(k.startswith(p + "ff.") for k in sd) else "s4")
    return kinds


def _repeating_unit(kinds: list[str]) -> list[str]:
    """The shortest list whose repeats make `kinds` ([s4, ffn] for [s4, ffn, s4, ffn])."""
    n = len(kinds)
    return next(kinds[:per] for per in range(1, n + 1) if n % per == 0 and kinds == kinds[:per] * (n // per))


def _pattern_units(names: list[str]) -> list[tuple[int, int | None]]:
    """The layer pattern as our blocks: (pattern index of an S4 layer, index of the FF layer right after
    it, or None). Every FF layer must follow an S4 layer that has no other; else Unsupported."""
    units: list[tuple[int, int | None]] = []
    for i, n in enumerate(names):
        if n == "s4":
            units.append((i, None))
        elif i > 0 and names[i - 1] == "s4":  # (that s4's unit has no FF layer yet)
            units[-1] = (units[-1][0], i)
        else:
            raise Unsupported(
                f"model.layer = {names}: every ffn layer must come right after an s4 layer (our blocks "
                "are an S4 layer with an optional feed-forward block after it)"
            )
    return units


def _check_sections(cfg: dict) -> None:
    """The config's task and dataset sections: each a mapping (or absent), the names in them strings (or
    absent). Raises Unsupported naming the entry (a task or dataset name of another type raised TypeError
    or AttributeError from the lookups by name: a helper's audit)."""
    for sec in ("task", "dataset"):
        v = cfg.get(sec)
        if v is not None and not isinstance(v, dict):
            raise Unsupported(f"{sec} = {v!r}: expected a mapping (the run's {sec} config)")
        for key in ("_name_", "path", "quantization") if isinstance(v, dict) else ():
            if v.get(key) is not None and not isinstance(v[key], str):
                raise Unsupported(f"{sec}.{key} = {v[key]!r}: expected a name (a string)")


def _check_vocab(cfg: dict, V: int) -> None:
    """The vocabulary size a dataset config states (synthetic n_tokens; audio 2^bits) against the
    embedding's. The LM datasets' vocabularies are built from the data: the config does not say."""
    ds = cfg.get("dataset")
    if not isinstance(ds, dict):
        return
    if "n_tokens" in ds and type(ds["n_tokens"]) is int:
        _agree("dataset.n_tokens", ds["n_tokens"], V)
    # an official audio dataset's bits when the config leaves it out: 8, its init_defaults' (music: 256
    # tokens). It was checked only where spelled out: 512 tokens under such a config imported as 8-bit audio
    bits = ds.get("bits", 8)
    if type(bits) is int and ds.get("_name_") in AUDIO_DATASETS:
        if not 1 <= bits <= 32:  # (1 << -1 raised ValueError, 1 << 10**30 OverflowError)
            raise Unsupported(f"dataset.bits = {bits!r}: served are 8-bit audio tokens (256 of them)")
        if 1 << bits != V:
            said = "in the config" if "bits" in ds else "(absent from the config: its dataset's default)"
            raise ConfigMismatch(
                f"dataset.bits = {bits} {said} (vocab {1 << bits}), but the weights have vocab {V}: the "
                "config does not belong to these weights?"
            )


def _tie_projs(task: dict, n_clusters: int) -> list[bool]:
    """The official tie_projs as AdaptiveLogSoftmax reads it: a bool for every cluster, or a list of one
    per cluster; the head's own projection (shard 0) is never tied. Returns one bool per shard."""
    t = task.get("tie_projs")
    t = [t] * n_clusters if isinstance(t, bool) else t
    if not (isinstance(t, list) and len(t) >= n_clusters and all(isinstance(x, bool) for x in t)):
        raise Unsupported(
            f"task.tie_projs = {task.get('tie_projs')!r}: expected a bool or {n_clusters} of them (one per "
            "cluster; the official code reads the first that many and ignores the rest)"
        )
    return [False, *t[:n_clusters]]  # (the recipe's 3 with 2 cutoffs: the official code uses the first 2)


def map_adaptive(src: _Source, task: dict, H: int, tensors: dict, mp: list, notes: list) -> tuple[int, dict]:
    """The adaptivelm task's AdaptiveEmbedding (encoder.0) and ProjectedAdaptiveLogSoftmax (loss., and
    the same module again as loss_val.) → our model/adaptive.py modules (embed., head.); returns the
    vocabulary size and the config fields (cutoffs, div_val, tie_embeddings, tie_projs).

    Facts (nn/adaptive_softmax.py, tasks.py AdaptiveLMTask at e757cef): shards [c_i, c_{i+1}) with the
    cutoffs and V; div_val 1: one embedding table (V, d_model), no projections (d_proj = d_embed in the
    task), the output weight and bias one (V, ·) each, sliced per shard; div_val > 1: per shard a table
    (n_i, d_model / div_val^i) and a projection emb_projs.i (d_model, d_i), the output's shard weights
    the tables (tie_weights) or out_layers_weights.i, its projections out_projs.i or, where tie_projs,
    the embedding's (loss.shared_out_projs.i, the same tensors). The embedding is scaled by √d_model
    (emb_scale = d_proj^0.5) inside the module: our embed_scale."""
    where = "task"
    cutoffs = task.get("cutoffs")
    if not (isinstance(cutoffs, list) and cutoffs and all(type(c) is int for c in cutoffs)):
        raise Unsupported(f"task.cutoffs = {cutoffs!r}: expected a list of token ids")
    div_val = _opt(task, "div_val", 1, where)
    if type(div_val) is not int or div_val < 1:
        raise Unsupported(f"task.div_val = {div_val!r}: expected an integer ≥ 1")
    tie_weights = _opt(task, "tie_weights", True, where)
    if not isinstance(tie_weights, bool):
        raise Unsupported(f"task.tie_weights = {tie_weights!r}: expected true or false")
    n_clusters = len(cutoffs)
    cw = src.take("loss.cluster_weight")
    if tuple(cw.shape) != (n_clusters, H):
        raise ConfigMismatch(
            f"task.cutoffs = {cutoffs} in the config ({n_clusters} tail clusters), but the weights have "
            f"loss.cluster_weight of shape {list(cw.shape)}: the config does not belong to these weights?"
        )
    tensors["head.cluster_weight"] = cw
    tensors["head.cluster_bias"] = src.take("loss.cluster_bias", (n_clusters,))
    mp.append(("head.cluster_{weight,bias}", "loss.cluster_{weight,bias}", "the head's tail-cluster entries"))
    if div_val == 1:
        table = src.take("encoder.0.emb_layers.0.weight")
        V = table.shape[0]
        if tuple(table.shape) != (V, H):
            raise Unsupported(
                f"encoder.0.emb_layers.0.weight has shape {list(table.shape)}, expected [V, {H}]"
            )
    else:
        tables = [src.take(f"encoder.0.emb_layers.{i}.weight") for i in range(n_clusters + 1)]
        V = sum(t.shape[0] for t in tables)
    ends = [0, *cutoffs, V]
    if not all(a < b for a, b in zip(ends[:-1], ends[1:], strict=True)):
        raise ConfigMismatch(
            f"task.cutoffs = {cutoffs} in the config, but the weights have a vocabulary of {V} tokens: the "
            "cutoffs must increase within it: the config does not belong to these weights?"
        )
    bounds = shard_bounds(V, cutoffs)
    sizes = [hi - lo for lo, hi in bounds]
    widths = shard_widths(H, n_clusters + 1, div_val) if div_val > 1 else [H]
    if div_val == 1:
        tensors["embed.layers.0.weight"] = table
        mp.append(
            ("embed.layers.0.weight", "encoder.0.emb_layers.0.weight", "the token embedding (div_val 1)")
        )
        tie = None
        bias = src.take("loss.out_layers_biases.0", (V,))
        for i, (lo, hi) in enumerate(bounds):
            tensors[f"head.biases.{i}"] = bias[lo:hi].clone()
        mp.append(("head.biases.*", "loss.out_layers_biases.0", "the output bias, split at the cutoffs"))
        _agree("task.tie_weights", tie_weights, not src.has("loss.out_layers_weights.0"))
        if not tie_weights:
            w = src.take("loss.out_layers_weights.0", (V, H))
            for i, (lo, hi) in enumerate(bounds):
                tensors[f"head.weights.{i}"] = w[lo:hi].clone()
            mp.append(
                ("head.weights.*", "loss.out_layers_weights.0", "the output weight, split at the cutoffs")
            )
        for k in list(src.sd):
            if k.startswith(("encoder.0.emb_projs.", "loss.out_projs.", "loss.shared_out_projs.")):
                raise Unsupported(
                    f"{k}: div_val 1 with projections (d_proj ≠ d_embed) is not the adaptivelm task's"
                )
    else:
        tie = _tie_projs(task, n_clusters)
        for i, (t, n, d) in enumerate(zip(tables, sizes, widths, strict=True)):
            if tuple(t.shape) != (n, d):
                raise ConfigMismatch(
                    f"task.cutoffs = {cutoffs}, task.div_val = {div_val} in the config (shard {i}: {n} "
                    f"tokens of width {d}), but the weights have encoder.0.emb_layers.{i}.weight of shape "
                    f"{list(t.shape)}: the config does not belong to these weights?"
                )
            tensors[f"embed.layers.{i}.weight"] = t
            proj = src.take(f"encoder.0.emb_projs.{i}", (H, d))
            tensors[f"embed.projs.{i}"] = proj
            tensors[f"head.biases.{i}"] = src.take(f"loss.out_layers_biases.{i}", (n,))
            if src.has(f"loss.shared_out_projs.{i}"):  # the same ParameterList as emb_projs, registered twice
                if not torch.equal(src.take(f"loss.shared_out_projs.{i}", (H, d)), proj):
                    raise Unsupported(f"loss.shared_out_projs.{i} differs from encoder.0.emb_projs.{i}")
            if src.has(f"loss.out_projs.{i}") == tie[i]:
                raise ConfigMismatch(
                    f"task.tie_projs = {task.get('tie_projs')!r} in the config (shard {i}: "
                    f"{'the embedding' if tie[i] else 'its own'} projection), but the weights have "
                    f"{'a' if tie[i] else 'no'} loss.out_projs.{i}: the config does not belong to these "
                    "weights?"
                )
            if not tie[i]:
                tensors[f"head.projs.{i}"] = src.take(f"loss.out_projs.{i}", (H, d))
            _agree("task.tie_weights", tie_weights, not src.has(f"loss.out_layers_weights.{i}"))
            if not tie_weights:
                tensors[f"head.weights.{i}"] = src.take(f"loss.out_layers_weights.{i}", (n, d))
        mp += [
            (
                "embed.layers.*.weight",
                "encoder.0.emb_layers.*.weight",
                f"the shards' tables, widths {widths}",
            ),
            ("embed.projs.*", "encoder.0.emb_projs.*", "the shards' projections to d_model"),
            ("head.biases.*", "loss.out_layers_biases.*", "the shards' output biases"),
            ("head.projs.*", "loss.out_projs.*", f"the untied output projections (tie_projs {tie})"),
        ]
        if not tie_weights:
            mp.append(("head.weights.*", "loss.out_layers_weights.*", "the shards' output weights (untied)"))
    for k in [k for k in src.sd if k.startswith("loss_val.")]:  # train.py registers the loss twice
        twin = "loss." + k.removeprefix("loss_val.")
        if not (src.has(twin) and torch.equal(src.sd[twin], src.take(k))):
            raise Unsupported(f"{k}: not the same tensor as {twin} (loss_val is another module?)")
    notes.append(
        f"task 'adaptivelm': adaptive input and softmax, cutoffs {cutoffs}, div_val {div_val}, shard widths "
        f"{widths}, tie_weights {tie_weights}"
        + (f", tie_projs {tie}" if tie else "")
        + f"; the embedding × √d_model = {math.sqrt(H):.6g}; the head returns log-probabilities "
        "(compute_logits)"
    )
    extra = {"cutoffs": list(cutoffs), "div_val": div_val, "tie_embeddings": tie_weights}
    if tie is not None and any(tie):
        extra["tie_projs"] = tie
    return V, extra


def map_lightning(sd: dict[str, torch.Tensor], cfg: dict | None, sample_rate: int | None = None) -> Imported:
    """A state dict of the official SequenceLightningModule (keys model. / encoder. / decoder.) around the
    isotropic backbone: a language model (task lm, adaptivelm), or an audio model (the sc09-style task,
    multiclass over quantized samples at every position, on an official audio dataset; `sample_rate` as
    for map_sashimi)."""
    notes: list[str] = []
    if cfg is None:
        raise MissingConfig(
            "config: missing. The transforms (dt_transform, real_transform, imag_transform) and the task's "
            "rescale cannot be inferred from the weights (a trained softplus-Δ model read as exp is off "
            "by 0.5)"
        )
    _check_sections(cfg)
    # the task first: a classifier (the LRA, speech commands and CIFAR experiments) is refused as one, not
    # by the first backbone option it also has (post-norm, bidirectional, BatchNorm: a helper's audit)
    task = cfg.get("task") if isinstance(cfg.get("task"), dict) else {}
    tname = task.get("_name_")
    ds = cfg.get("dataset") if isinstance(cfg.get("dataset"), dict) else {}
    # an audio model: the sc09-style task, or the lm task (LMTask's embedding over its dataset's n_tokens,
    # 2^bits quantized samples), on an official audio dataset (an lm one was served as 256 byte ids of text)
    audio = tname in (*AUDIO_TASKS, "lm") and ds.get("_name_") in AUDIO_DATASETS
    if tname not in ("lm", "adaptivelm") and not audio:
        dec = cfg.get("decoder")
        mode = dec.get("mode", "last") if isinstance(dec, dict) else None
        raise Unsupported(
            f"task._name_ = {tname!r} (decoder mode {mode!r}) on dataset {ds.get('_name_')!r}: served are "
            "the 'lm' and 'adaptivelm' tasks (language models: their decoder gives the next token's logits "
            "at every position) and the sc09-style task on an audio dataset (next-sample logits at every "
            f"position: {', '.join(sorted(AUDIO_DATASETS))}); other tasks (synthetic copying, "
            "classification) map a sequence to other targets"
        )
    sd, implied = _v3_to_v4(sd, notes)
    src = _Source(sd)
    m = cfg.get("model")
    if not isinstance(m, dict):
        raise Unsupported("config: no 'model' section")
    norm = _check_backbone(m, pool_weights=any(re.match(r"model\.layers\.\d+\.pool\.", k) for k in sd))
    _agree_norm(sd, norm)
    layer_cfgs = m.get("layer")
    layer_cfgs = layer_cfgs if isinstance(layer_cfgs, list) else [layer_cfgs]
    if not layer_cfgs or not all(isinstance(x, dict) for x in layer_cfgs):
        raise Unsupported(f"model.layer = {m.get('layer')!r}: expected a layer config or a list of them")
    names = [x.get("_name_") for x in layer_cfgs]
    for i, n in enumerate(names):
        if n not in ("s4", "ffn", "ff"):
            raise Unsupported(
                f"model.layer[{i}]._name_ = {n!r}: only 's4' and 'ffn' (version 3: 'ff') layers are supported"
            )
    names = ["ffn" if n == "ff" else n for n in names]  # version 3's FF: ffn.py's FFN module tree and options
    units = _pattern_units(names)

    idx = sorted({int(mt.group(1)) for k in sd if (mt := re.match(r"model\.layers\.(\d+)\.", k))})
    if not idx or idx != list(range(len(idx))):
        raise Unsupported(f"state dict: model.layers indices {idx[:8]} are not 0..n-1")
    per = len(names)
    block_kinds = _weights_kinds(sd, len(idx))
    if len(idx) % per or block_kinds != names * (len(idx) // per):
        _agree("model.layer", names, _repeating_unit(block_kinds))
        raise ConfigMismatch(
            f"model.layer = {names} in the config, but the weights' {len(idx)} residual blocks are "
            f"{block_kinds}: "
            "the config does not belong to these weights?"
        )
    n_repeats = len(idx) // per
    if "n_layers" in m:  # the official backbone builds layer × n_layers × n_repeat blocks (its pool, every
        # n_repeat blocks, is the identity here: stride 1, no expand)
        n_layers, n_rep = _opt(m, "n_layers", None, "model"), _opt(m, "n_repeat", 1, "model")
        if n_rep == 1:
            _agree("model.n_layers", n_layers, n_repeats)
        elif type(n_layers) is not int or n_layers * n_rep != n_repeats:
            raise ConfigMismatch(
                f"model.n_layers × model.n_repeat = {n_layers!r} × {n_rep} in the config, but the weights "
                f"have {n_repeats} repeats of the layer pattern: the config does not belong to these weights?"
            )

    for k, where in ((cfg.get("encoder"), "encoder"), (m.get("encoder"), "model.encoder")):
        if k not in (None, [], "embedding") and not (isinstance(k, dict) and k.get("_name_") == "embedding"):
            raise Unsupported(f"{where} = {k!r}: only a token embedding encoder is supported")
    _check_decoder(cfg)
    head_keys = [k for k in sd if k.startswith("decoder.") and k.endswith(".weight")]
    tensors: dict[str, torch.Tensor] = {}
    mp: list[tuple[str, str, str]] = []
    if tname == "adaptivelm":
        if head_keys:
            raise Unsupported(
                f"task adaptivelm: its softmax is the decoder, but the state dict has {head_keys}"
            )
        H = _opt(m, "d_model", None, "model")
        if type(H) is not int:
            raise Unsupported(f"model.d_model = {H!r}: an adaptivelm import needs the width in the config")
        V, extra = map_adaptive(src, task, H, tensors, mp, notes)
        _check_vocab(cfg, V)
        embed_scale = math.sqrt(H)
    else:
        emb = src.take("encoder.0.weight")
        V, H = emb.shape
        if "d_model" in m:
            _agree("model.d_model", _opt(m, "d_model", None, "model"), H)
        _check_vocab(cfg, V)
        tensors["embed.weight"] = emb
        mp.append(("embed.weight", "encoder.0.weight", "the token embedding"))
        rescale = bool(task.get("rescale", True)) and tname == "lm"  # (LMTask's √H; the sc09 task has none)
        embed_scale = math.sqrt(H) if rescale else 1.0
        notes.append(f"task {tname!r}: rescale = {rescale} → embed_scale {embed_scale:.6g}")
        if len(head_keys) != 1:
            raise Unsupported(f"decoder: expected one Linear, found weights {head_keys}")
        hw = head_keys[0]
        head_w = src.take(hw, (V, H))
        head_b = src.take(hw[: -len("weight")] + "bias", (V,))
        tied = bool(task.get("tied", False)) and tname == "lm"
        _agree("task.tied", tied, bool(torch.equal(head_w, emb)))
        tensors["head.weight"], tensors["head.bias"] = head_w, head_b
        mp += [("head.weight", hw, "decoder weight" + (" (tied to the embedding)" if tied else "")),
               ("head.bias", hw[: -len('weight')] + "bias", "decoder bias")]  # fmt: skip
        extra = {"tie_embeddings": tied}
        if audio:
            fields, audio_note = _audio_fields(ds, sample_rate)
            extra |= fields
            notes.append(audio_note)
    for k, lc in enumerate(layer_cfgs):
        if names[k] == "s4":
            _agree_kernel(
                sd, lc, f"model.layer[{k}]", [f"model.layers.{r * per + k}." for r in range(n_repeats)]
            )

    def take_norm(ours: str, theirs: str, what: str, where: str = "") -> None:
        """A LayerNorm's weight and bias (H,), or (transposed) the scalar TransposedLN's s and m (1,)."""
        names, shape = (("s", "m"), (1,)) if norm == "tln" else (("weight", "bias"), (H,))
        for n in names:
            tensors[ours + n] = src.take(theirs + n, shape)
        kind = "scalar TransposedLN (s, m: transposed backbone)" if norm == "tln" else "LayerNorm"
        mp.append((ours[:-1], theirs[:-1], f"{what} {kind}{where}"))

    d_ffs, kinds, l_kernels, facts0 = [], set(), [], None
    dt_tied_all = True
    for i, (r, (si, fi)) in enumerate((r, u) for r in range(n_repeats) for u in units):
        j = r * per + si
        p = f"model.layers.{j}."
        lc = layer_cfgs[si]
        where = f"model.layer[{si}]"
        kind = _check_s4_layer(lc, where)
        kinds.add(kind)
        if len(kinds) > 1:  # (before the facts' check below, which S4 and S4D layers always fail)
            raise Unsupported(
                f"{where}: S4 and S4D layers mixed in one model (our model has one kernel kind, `kernel`)"
            )
        kp = p + "layer.layer.kernel."
        opts = _kernel_opts(lc, implied.get(kp, {}), where)
        kt, facts, kmp = map_ssm_kernel(src, kp, H, opts, where, kind)
        q = f"blocks.{i}."
        for k2, v2 in kt.items():
            tensors[q + "layer.kernel." + k2] = v2
        mp += [(q + a if not a.startswith("config.") else a + f"[{i}]", b, c) for a, b, c in kmp]
        if facts0 is None:
            facts0 = facts
        elif (facts["N2"], facts["rank"], facts["disc"]) != (facts0["N2"], facts0["rank"], facts0["disc"]):
            raise Unsupported(f"{where}: layers differ in d_state, rank or discretization")
        dt_tied_all &= facts["dt_tied"]
        l_kernels.append(facts["l_kernel"])
        D = src.take(p + "layer.layer.D", (1, H))
        tensors[q + "layer.D"] = D[0]
        tensors[q + "layer.out.weight"], tensors[q + "layer.out.bias"] = src.take_glu_out(
            p + "layer.output_linear.", H
        )
        mp += [
            (q + "layer.D", p + "layer.layer.D", "D[0]"),
            (q + "layer.out", p + "layer.output_linear.0", "Linear(H, 2H) then GLU"),
        ]
        take_norm(q + "norm.", p + "norm.norm.", "pre-norm")
        if fi is None:
            d_ffs.append(0)
            continue
        f = f"model.layers.{r * per + fi}."
        fc = layer_cfgs[fi]
        fw = f"model.layer[{fi}]"
        _expect(fc, "activation", "gelu", ("gelu",), fw, "only GELU is supported")
        _expect(fc, "d_output", None, (None, H), fw, "the FF block must map d_model to d_model")
        # (its own `transposed` is overwritten by the backbone's, which only changes the layout)
        up = src.take(f + "layer.ff.0.0.weight")
        if up.dim() != 2 or up.shape[1] != H:
            raise Unsupported(f"{fw}: ff.0 weight has shape {list(up.shape)}")
        d_ff = up.shape[0]
        expand = _opt(fc, "expand", 2, fw)  # ffn.py: d_inner = int(expand · d_model)
        if not isinstance(expand, int | float) or int(expand * H) != d_ff:
            raise ConfigMismatch(
                f"{fw}.expand = {expand!r} in the config (d_ff = expand × d_model {H}), but the "
                f"weights have d_ff = {d_ff}: the config does not belong to these weights?"
            )
        d_ffs.append(int(d_ff))
        tensors[q + "ff.up.weight"] = up
        tensors[q + "ff.up.bias"] = src.take(f + "layer.ff.0.0.bias", (d_ff,))
        tensors[q + "ff.down.weight"] = src.take(f + "layer.ff.2.weight", (H, d_ff))
        tensors[q + "ff.down.bias"] = src.take(f + "layer.ff.2.bias", (H,))
        mp += [
            (q + "ff.up", f + "layer.ff.0.0", "Linear(H, expand·H), GELU"),
            (q + "ff.down", f + "layer.ff.2", "Linear(expand·H, H)"),
        ]
        take_norm(q + "ff_norm.", f + "norm.norm.", "pre-norm", f" of the pattern's ffn block {fw}")
    take_norm("norm.", "model.norm.norm.", "final")
    left = src.leftovers()
    if left:
        raise Unsupported(f"state dict: tensors this importer does not understand: {left[:10]}")
    kind = kinds.pop()
    lc = layer_cfgs[0]
    if kind == "s4":
        l_max = lc.get("l_max") if _positive_int(lc.get("l_max")) else max(l_kernels)
    else:
        l_max = _s4d_length(lc, cfg)
    l_max += l_max % 2  # ours is even; it is the verification length, the kernels use l_kernel
    config = {
        "vocab_size": int(V), "d_model": int(H), "n_layers": len(d_ffs), "d_state": 2 * facts0["N2"],
        "kernel": kind, "init": _our_init(kind, lc), "rank": max(1, facts0["rank"]), "disc": facts0["disc"],
        "l_max": int(l_max), "d_ff": d_ffs[0] if len(set(d_ffs)) == 1 else d_ffs, "head_bias": True,
        "embed_scale": float(embed_scale), "l_kernel": l_kernels if kind == "s4" else None,
        "dt_tied": bool(dt_tied_all), "re_lambda_max": None, **extra,
    }  # fmt: skip
    if norm == "tln":  # (absent for LayerNorms, our default: the config.json loads in older s4serve too)
        config["norm"] = "tln"
        notes.append(
            "model.transposed = True: every norm (each block's and the final one) is the official scalar "
            "TransposedLN, y = s/σ·(x − μ + m) over the channels (config norm 'tln')"
        )
    config = _drop_defaults(config)
    notes.append(_kernel_note(kind, lc, facts0))
    return Imported(config, tensors, mp, notes)


# the official inits (src/models/sequence/kernels/dplr.py) that are ours too, by kernel: the config.json
# `init` of an import (its weights are the run's; `init` says how a model of that config starts, for a
# fresh run from the converted config). It was "legs" for every import: an S4D-Inv run's said legs (a
# fresh-user trial). An init of ours it has not (hippo, diag mixtures, real, random) stays "legs", and the
# card's options line says the official one.
OFFICIAL_INITS = {
    "s4": {"legs": "legs", "fout": "fout", "lagt": "lagt"},
    "s4d": {"legs": "legs", "diag-legs": "legs", "diag-lin": "diag-lin", "diag-inv": "diag-inv"},
}


def _our_init(kind: str, lc: dict) -> str:
    """Our `init` for an imported layer config `lc` (its `init`, or the older `measure`)."""
    init = lc.get("init") if lc.get("init") is not None else lc.get("measure")  # (init: null beside measure)
    return OFFICIAL_INITS[kind].get(init, "legs") if isinstance(init, str) else "legs"


def _kernel_note(kind: str, lc: dict, facts: dict) -> str:
    """The model card's line on the SSM options read: init, n_ssm, transforms (dt_fast), disc."""
    t = facts["transforms"]
    dt = f"{t['dt']} of sinh(inv_dt) (dt_fast)" if facts["dt_fast"] else t["dt"]
    return (
        f"{kind} layers: init {lc.get('init', lc.get('measure'))!r}, n_ssm {facts['S']}, "
        f"transforms dt={dt}, real={t['real']}, imag={t['imag']}; disc {facts['disc']}"
    )


# ---------------------------------------------------------------------------------------------
# Standalone models/s4/s4d.py with a JSON description


STANDALONE_FIELDS = {"format", "module", "n_layers", "d_model", "d_state", "vocab_size", "prenorm",
                     "final_norm", "embed_scale", "l_max"}  # fmt: skip


def map_standalone(sd: dict[str, torch.Tensor], desc: dict) -> Imported:
    """example.py's S4Model shape over tokens, built from the standalone S4D module:
    encoder (Embedding), s4_layers.{i} (S4D), norms.{i} (pre-norm LayerNorm), norm (final LayerNorm),
    decoder (Linear). `desc`: {"format": "s4-standalone", "module": "s4d", "n_layers", "d_model",
    "d_state", "vocab_size", "prenorm": true, "final_norm": true, "embed_scale": 1.0, "l_max": 1024}
    (l_max: the length it was trained at; s4d.py computes its kernel for any length, so it only sets
    the length our conversion verifies at)."""
    unknown = set(desc) - STANDALONE_FIELDS
    if unknown:
        raise Unsupported(f"description: unknown fields {sorted(unknown)}")
    if desc.get("module") != "s4d":
        raise Unsupported(
            f"description.module = {desc.get('module')!r}: only the standalone 's4d' is supported"
        )
    if desc.get("prenorm", True) is not True:
        raise Unsupported(f"description.prenorm = {desc.get('prenorm')!r}: post-norm is not supported")
    if desc.get("final_norm", True) is not True:
        raise Unsupported(
            f"description.final_norm = {desc.get('final_norm')!r}: a final LayerNorm is required"
        )
    # each size an integer and embed_scale a number, as JSON wrote them: int() read 2.7 as 2 and "8" as 8,
    # float() read true as 1.0 (a helper's audit): a description that is not what the run used is refused
    sizes = {k: desc.get(k) for k in ("n_layers", "d_model", "d_state", "vocab_size")} | {
        "l_max": desc.get("l_max", 1024)
    }
    for k, v in sizes.items():
        if type(v) is not int:
            raise Unsupported(
                f"description.{k} = {v!r}: expected an integer" + (" (missing)" if v is None else "")
            )
    n_layers, H, N, V, l_max = sizes.values()
    scale = desc.get("embed_scale", 1.0)
    if type(scale) not in (int, float):
        raise Unsupported(f"description.embed_scale = {scale!r}: expected a number")
    scale = float(scale)
    if (
        min(n_layers, H, N, V, l_max) <= 0
        or N % 2
        or l_max > 1 << 20
        or not (math.isfinite(scale) and scale > 0)
    ):
        raise Unsupported(f"description: invalid sizes {desc}")
    N2 = N // 2
    src = _Source(sd)
    tensors = {"embed.weight": src.take("encoder.weight", (V, H))}
    mp = [("embed.weight", "encoder.weight", "the token embedding")]
    for i in range(n_layers):
        p, q = f"s4_layers.{i}.", f"blocks.{i}."
        dt = torch.exp(src.take(p + "kernel.log_dt", (H,)).double())
        re = -torch.exp(src.take(p + "kernel.log_A_real", (H, N2)).double())
        tensors |= {
            q + "layer.kernel.log_dt": torch.log(dt),
            q + "layer.kernel.log_neg_re": torch.log(-re),
            q + "layer.kernel.im": src.take(p + "kernel.A_imag", (H, N2)).double(),
            q + "layer.kernel.B": torch.view_as_real(torch.ones(H, N2, dtype=torch.complex128)),
            q + "layer.kernel.C": src.take(p + "kernel.C", (H, N2, 2)).double(),
            q + "layer.D": src.take(p + "D", (H,)),
            q + "layer.out.weight": src.take(p + "output_linear.0.weight", (2 * H, H, 1))[..., 0],
            q + "layer.out.bias": src.take(p + "output_linear.0.bias", (2 * H,)),
            q + "norm.weight": src.take(f"norms.{i}.weight", (H,)),
            q + "norm.bias": src.take(f"norms.{i}.bias", (H,)),
        }
        mp += [
            (q + "layer.kernel.log_dt", p + "kernel.log_dt", "log Δ (exp)"),
            (q + "layer.kernel.log_neg_re", p + "kernel.log_A_real", "Re Λ = −exp(log_A_real)"),
            (q + "layer.kernel.im", p + "kernel.A_imag", "Im Λ = +A_imag (s4d.py's sign)"),
            (q + "layer.kernel.B", "(none)", "B = 1 (s4d.py has no B)"),
            (q + "layer.kernel.C", p + "kernel.C", "C̄ (ZOH)"),
            (q + "layer.D", p + "D", "D"),
            (q + "layer.out", p + "output_linear.0", "Conv1d(H, 2H, 1) → Linear, then GLU"),
            (q + "norm", f"norms.{i}", "pre-norm LayerNorm"),
        ]
    tensors["norm.weight"] = src.take("norm.weight", (H,))
    tensors["norm.bias"] = src.take("norm.bias", (H,))
    tensors["head.weight"] = src.take("decoder.weight", (V, H))
    tensors["head.bias"] = src.take("decoder.bias", (V,))
    mp += [("norm", "norm", "final LayerNorm"), ("head", "decoder", "Linear decoder with bias")]
    left = src.leftovers()
    if left:
        raise Unsupported(f"state dict: tensors this importer does not understand: {left[:10]}")
    config = {
        "vocab_size": V, "d_model": H, "n_layers": n_layers, "d_state": N, "kernel": "s4d",
        "init": "diag-lin",
        "rank": 1, "disc": "zoh", "l_max": l_max + l_max % 2, "d_ff": 0, "tie_embeddings": False,
        "head_bias": True, "embed_scale": scale, "l_kernel": None, "dt_tied": True, "re_lambda_max": None,
    }  # fmt: skip
    config = _drop_defaults(config)
    return Imported(config, tensors, mp, ["standalone models/s4/s4d.py layers (ZOH, exp transforms)"])


# ---------------------------------------------------------------------------------------------
# SaShiMi (src/models/sequence/backbones/sashimi.py, modules/pool.py)


def _fold_weight_norm(src: _Source, p: str, shape: tuple[int, int]) -> tuple[torch.Tensor, str]:
    """nn.utils.weight_norm(Linear) (dim 0): W = g · v / ‖v‖ with the norm of each output row."""
    if src.has(p + "weight"):
        return src.take(p + "weight", shape), "Linear weight"
    g = src.take(p + "weight_g", (shape[0], 1)).double()
    v = src.take(p + "weight_v", shape).double()
    return g * v / v.norm(dim=1, keepdim=True), "weight norm folded: W = g·v/‖v‖ (per output row)"


def _check_sashimi(m: dict, unet: bool) -> None:
    """The backbone options of `_name_: sashimi` (backbones/sashimi.py) or `_name_: unet`
    (backbones/unet.py, the U-Net SaShiMi; version 3's unet.py, whose pools take act_pool, not pool_mode);
    each one our SaShiMi cannot compute is refused by name."""
    w = "model"
    _expect(m, "prenorm", False, (True,), w, "post-norm blocks are not supported")
    if unet:
        _expect(m, "pool_mode", "linear", ("linear",), w, "only the linear pools (pool_mode 'linear') are "
                "supported")  # fmt: skip
        _expect(m, "act_pool", None, (None,), w, "activations after the pools (version 3's act_pool) are not "
                "supported")  # fmt: skip
        ff, cff = _opt(m, "ff", 2, w), _opt(m, "cff", 0, w)
        if type(cff) is not int or (cff > 0) != bool(ff):
            raise Unsupported(
                f"model.cff = {cff!r} with model.ff = {ff!r}: our SaShiMi's center has FF blocks exactly "
                "when the other levels do (the official center's, there when cff > 0, are ff wide)"
            )
    else:
        _expect(m, "interp", 0, (0,), w, "the interpolating SaShiMi variant is not supported")
        _expect(m, "act_pool", None, (None,), w, "activations after the pools are not supported")
        _expect(m, "unet", False, (False,), w, "not an option of the official sashimi backbone (its U-Net "
                "SaShiMi is the backbone `_name_: unet`, which this importer takes)")  # fmt: skip
    res = _opt(m, "residual", "R", w)
    if res is not None and not _plain_residual(res):
        raise Unsupported(f"model.residual = {res!r}: only the plain residual 'R' is supported")
    norm = _opt(m, "norm", None, w)
    scalar_ln = isinstance(norm, dict) and norm.get("_name_") == "layer" and set(norm) <= {"_name_", "scalar"}
    if norm != "layer" and not (scalar_ln and norm.get("scalar", True) is True):
        raise Unsupported(
            f"model.norm = {norm!r}: only 'layer' (the scalar TransposedLN, SaShiMi's blocks being "
            "transposed) is supported"
        )
    if not m.get("transposed", True):
        raise Unsupported("model.transposed = False: SaShiMi's blocks then use LayerNorm; only the official "
                          "default (transposed, scalar TransposedLN) is supported")  # fmt: skip


def _check_sashimi_shapes(sd: dict[str, torch.Tensor], m: dict, H: int) -> None:
    """model.d_model, pool, expand, ff and n_layers against what the tensors imply: the DownPools
    (the d_layers.i with a linear: every one in sashimi, each level's last in unet; widths
    H·expand^k → H·expand^(k+1), pool[k] steps folded in), the center's FF width and its block count."""
    _agree("model.d_model", m.get("d_model", H), H)
    pools = sorted({int(mt.group(1)) for k in sd if (mt := re.match(r"model\.d_layers\.(\d+)\.linear\.", k))})
    pool, expand, width = [], None, H
    for i in pools:
        p = f"model.d_layers.{i}.linear."
        w = sd.get(p + "weight", sd.get(p + "weight_v"))
        if w is None or w.dim() != 2 or w.shape[0] % width or w.shape[1] % width:
            return  # left to the mapping's own shape checks
        expand = w.shape[0] // width if expand is None else expand
        pool.append(w.shape[1] // width)
        width = w.shape[0]
    _agree("model.pool", m.get("pool"), pool)
    if pools:
        _agree("model.expand", m.get("expand", 1), expand)
    c = sorted({int(mt.group(1)) for k in sd if (mt := re.match(r"model\.c_layers\.(\d+)\.", k))})
    up = sd.get("model.c_layers.1.layer.ff.0.0.weight")
    ff = up.shape[0] // width if up is not None and up.dim() == 2 and up.shape[1] == width else 0
    _agree("model.ff", m.get("ff", 2), ff)
    _agree("model.n_layers", m.get("n_layers"), len(c) // (2 if ff else 1))


def map_sashimi(sd: dict[str, torch.Tensor], cfg: dict, sample_rate: int | None = None) -> Imported:
    """The official SaShiMi backbone under a Lightning module (model. / encoder.0 / decoder.0) → our
    arch 'sashimi' (norm 'tln'), from either official backbone:

    * `_name_: sashimi` (backbones/sashimi.py) → unet false. d_layers.k ↔ down.k.pool (weight norm
      folded), c_layers.i ↔ center.i, u_layers.j.0 ↔ up.(K−1−j).pool, u_layers.j.(1+i) ↔
      up.(K−1−j).blocks.i.
    * `_name_: unet` (backbones/unet.py, the U-Net SaShiMi of configs/model/unet.yaml) → unet true.
      Flat lists of B = n_layers·(2 if ff else 1) blocks and one pool per level: d_layers.(k(B+1) + i) ↔
      down.k.blocks.i, d_layers.(k(B+1) + B) ↔ down.k.pool, c_layers.i ↔ center.i (its FF blocks
      by cff), u_layers.(j(B+1)) ↔ up.(K−1−j).pool, u_layers.(j(B+1) + 1 + i) ↔ up.(K−1−j).blocks.i;
      the pools are plain linear layers (DownLinearPool, UpLinearPool). Version 3's unet.py (v3.0.0,
      configs/model/unet.yaml) has the same lists; its pools are its pool.py's DownPool / UpPool, weight
      norm folded as the sashimi backbone's (act_pool null), and its model.l_max gives each level's layers
      their level's length, as its Sashimi does.

    Both: norm ↔ norm (LayerNorm), encoder.0 ↔ embed, decoder.0.output_transform ↔ head. Each S4 layer
    keeps its own l_kernel (its level's length when layer.l_max is null). The tokens are state-spaces/s4
    mu-law (config mulaw 's4'); the audio is 16 kHz (SC09, YouTubeMix) unless `sample_rate` says
    otherwise (_audio_format)."""
    notes: list[str] = []
    _check_sections(cfg)
    sd, implied = _v3_to_v4(sd, notes)
    src = _Source(sd)
    m = cfg["model"]
    unet = m.get("_name_") == "unet"
    _check_sashimi(m, unet)
    pool = _opt(m, "pool", [], "model")
    if not (isinstance(pool, list) and pool and all(type(x) is int for x in pool)):
        raise Unsupported(f"model.pool = {pool!r}: expected a list of strides")
    expand, ff, n_layers = m.get("expand", 1), m.get("ff", 2), m.get("n_layers")
    if not all(type(x) is int for x in (expand, ff, n_layers)):
        raise Unsupported(f"model.expand/ff/n_layers = {expand!r}/{ff!r}/{n_layers!r}: expected integers")
    lc = m.get("layer")
    if not isinstance(lc, dict) or lc.get("_name_", "s4") != "s4":
        raise Unsupported(f"model.layer = {lc!r}: only an s4 layer config is supported")
    if m.get("center_layer") is not None:
        raise Unsupported("model.center_layer: a different center layer is not supported")
    kind = _check_s4_layer(lc, "model.layer")
    v3_levels = bool(implied) or "l_max" in m
    if v3_levels:  # version 3's Sashimi and SequenceUNet (version 4's take no model.l_max) set each level's
        # layers' l_max to that level's length (model.l_max over the strides before it): the layer config's
        # is none of theirs. (Its keys renamed by convert_v3_to_v4.py show no version-3 name.)
        lc = {k: v for k, v in lc.items() if k != "l_max"}
    emb = src.take("encoder.0.weight")
    V, H = emb.shape
    _check_sashimi_shapes(sd, m, H)
    _check_vocab(cfg, V)
    _check_decoder(cfg)
    _agree_kernel(sd, lc, "model.layer")
    tensors: dict[str, torch.Tensor] = {"embed.weight": emb}
    mp = [("embed.weight", "encoder.0.weight", "the token embedding (no rescale: classification task)")]
    task = cfg.get("task") or {}
    if task.get("_name_") not in AUDIO_TASKS:
        raise Unsupported(f"task._name_ = {task.get('_name_')!r}: SaShiMi imports expect the sc09-style task")
    hw = "decoder.0.output_transform."
    tensors["head.weight"], tensors["head.bias"] = (
        src.take(hw + "weight", (V, H)),
        src.take(hw + "bias", (V,)),
    )
    mp += [("head", hw[:-1], "SequenceDecoder output_transform Linear")]
    K = len(pool)
    widths = [H * expand**k for k in range(K + 1)]
    facts0, l_kernels, names = None, [], []

    def block(p: str, q: str, d: int, is_s4: bool) -> None:
        nonlocal facts0
        tensors[q + "norm.m"] = src.take(p + "norm.norm.m", (1,))
        tensors[q + "norm.s"] = src.take(p + "norm.norm.s", (1,))
        if is_s4:
            kp = p + "layer.layer.kernel."
            opts = _kernel_opts(lc, implied.get(kp, {}), "model.layer")
            kt, facts, kmp = map_ssm_kernel(src, kp, d, opts, "model.layer", kind)
            for k2, v2 in kt.items():
                tensors[q + "layer.kernel." + k2] = v2
            mp.extend((q + a if not a.startswith("config.") else a, b, c) for a, b, c in kmp)
            if facts0 is None:
                facts0 = facts
            elif (facts["N2"], facts["rank"], facts["disc"]) != (
                facts0["N2"],
                facts0["rank"],
                facts0["disc"],
            ):
                raise Unsupported("model.layer: layers differ in d_state, rank or discretization")
            l_kernels.append(facts["l_kernel"])
            names.append(q[:-1])
            tensors[q + "layer.D"] = src.take(p + "layer.layer.D", (1, d))[0]
            tensors[q + "layer.out.weight"], tensors[q + "layer.out.bias"] = src.take_glu_out(
                p + "layer.output_linear.", d
            )
            mp.append((q + "layer", p + "layer", "S4 block: D, output Linear(d, 2d) + GLU; TransposedLN"))
        else:
            tensors[q + "ff.up.weight"] = src.take(p + "layer.ff.0.0.weight", (ff * d, d))
            tensors[q + "ff.up.bias"] = src.take(p + "layer.ff.0.0.bias", (ff * d,))
            tensors[q + "ff.down.weight"] = src.take(p + "layer.ff.2.weight", (d, ff * d))
            tensors[q + "ff.down.bias"] = src.take(p + "layer.ff.2.bias", (d,))
            mp.append(
                (q + "ff", p + "layer.ff", "FF block: Linear(d, ff·d), GELU, Linear(ff·d, d); TransposedLN")
            )

    def level(p: str, q: str, d: int, offset: int) -> None:
        per = 2 if ff else 1
        for i in range(n_layers * per):
            block(f"{p}{offset + i}.", f"{q}{i}.", d, i % per == 0)

    nb = n_layers * (2 if ff else 1)  # blocks per level
    for k in range(K):  # in the order of s4_block_names: down levels, center, up levels (coarsest first)
        if unet:
            level("model.d_layers.", f"down.{k}.blocks.", widths[k], k * (nb + 1))
        p = f"model.d_layers.{k * (nb + 1) + nb if unet else k}.linear."
        W, how = _fold_weight_norm(src, p, (widths[k + 1], widths[k] * pool[k]))
        tensors[f"down.{k}.pool.linear.weight"] = W
        tensors[f"down.{k}.pool.linear.bias"] = src.take(p + "bias", (widths[k + 1],))
        mp.append((f"down.{k}.pool.linear", p[:-1], how))
    level("model.c_layers.", "center.", widths[K], 0)
    for j in range(K):
        k = K - 1 - j
        p = f"model.u_layers.{j * (nb + 1)}.linear." if unet else f"model.u_layers.{j}.0.linear."
        W, how = _fold_weight_norm(src, p, (widths[k] * pool[k], widths[k + 1]))
        tensors[f"up.{k}.pool.linear.weight"] = W
        tensors[f"up.{k}.pool.linear.bias"] = src.take(p + "bias", (widths[k] * pool[k],))
        mp.append((f"up.{k}.pool.linear", p[:-1], how))
        if unet:
            level("model.u_layers.", f"up.{k}.blocks.", widths[k], j * (nb + 1) + 1)
        else:
            level(f"model.u_layers.{j}.", f"up.{k}.blocks.", widths[k], 1)
    tensors["norm.weight"] = src.take("model.norm.weight", (H,))
    tensors["norm.bias"] = src.take("model.norm.bias", (H,))
    mp.append(("norm", "model.norm", "final LayerNorm"))
    left = src.leftovers()
    if left:
        raise Unsupported(f"state dict: tensors this importer does not understand: {left[:10]}")
    P = math.prod(pool)
    if kind == "s4":
        l_max = max(l_kernels)
    elif v3_levels and m.get("l_max") is not None:  # version 3's: its top level's layers' l_max (the
        # dataset's 1024 default was read instead, where an S4 model's l_kernels gave model.l_max); any other
        # value than such a length (0, -64, true, 48.0, "64") is refused by name, not read as that default
        l_max = _l_max_option(m["l_max"], "model.l_max")
    else:  # S4D layers keep no kernel length (a helper's audit: max() of their None crashed the import)
        l_max = _s4d_length(lc, cfg)
    l_max = -(-l_max // (2 * P)) * 2 * P  # a multiple of 2·prod(pool): the verification length
    audio, audio_note = _audio_fields(cfg.get("dataset") if isinstance(cfg.get("dataset"), dict) else {},
                                      sample_rate)  # fmt: skip
    config = {
        "arch": "sashimi", "pool": list(pool), "expand": expand, "ff": ff, "unet": unet, "norm": "tln",
        "vocab_size": int(V), "d_model": int(H), "n_layers": n_layers, "d_state": 2 * facts0["N2"],
        "kernel": kind, "init": _our_init(kind, lc), "rank": max(1, facts0["rank"]), "disc": facts0["disc"],
        "l_max": int(l_max), "head_bias": True, "embed_scale": 1.0,
        "l_kernel": l_kernels if kind == "s4" else None, "dt_tied": bool(facts0["dt_tied"]),
        "re_lambda_max": None, **audio,
    }  # fmt: skip
    notes.append(
        f"{'U-Net SaShiMi (official backbone unet)' if unet else 'SaShiMi'}"
        f"{' of version 3' if v3_levels else ''} pool {pool}, expand {expand}, "
        f"ff {ff}, {n_layers} (S4, FF) pairs per level; S4 blocks {names} with l_kernel {l_kernels}"
    )
    notes.append(_kernel_note(kind, lc, facts0))
    notes.append(audio_note)
    return Imported(_drop_defaults(config), tensors, mp, notes)


def _positive_int(v) -> bool:
    return type(v) is int and v > 0  # (not a bool: true is no length)


def _s4d_length(lc: dict, cfg: dict) -> int:
    """An S4D layer's length (it keeps no kernel length of its own, unlike a DPLR layer's l_kernel): its
    model.layer.l_max, else the dataset's (`_dataset_l_max`)."""
    return lc["l_max"] if _positive_int(lc.get("l_max")) else _dataset_l_max(cfg)


def _audio_fields(ds: dict, sample_rate: int | None) -> tuple[dict, str]:
    """An audio import's config fields (modality, sample_rate, the official mu-law convention "s4", and
    quantization where it is not mu-law, the default, left out as before) and its card note, from the
    dataset config `ds` (`_audio_format`)."""
    rate, quant, note = _audio_format(ds, sample_rate)
    fields = {"modality": "audio", "sample_rate": rate, "mulaw": "s4"}
    return fields | ({"quantization": quant} if quant != "mu-law" else {}), note


def _dataset_l_max(cfg: dict) -> int:
    """The S4D layers' length where model.layer.l_max is null: dataset.l_max, else 1024. Raises Unsupported
    unless it is an integer in [1, MAX_SIZE["l_max"]] or null (int() took "abc" as a traceback, 3.7 as 3 and
    true as 1, silently: a helper's audit)."""
    ds = cfg.get("dataset")
    v = ds.get("l_max") if isinstance(ds, dict) else None
    if v is None:
        return 1024
    return _l_max_option(v, "dataset.l_max", " (the S4D layers' length, their model.layer.l_max being null)")


def _l_max_option(v, option: str, why: str = "") -> int:
    """A config's length `v` (not null), an integer in [1, MAX_SIZE["l_max"]]; else Unsupported naming
    `option` (then `why`)."""
    most = MAX_SIZE["l_max"]
    if type(v) is not int or not 1 <= v <= most:
        raise Unsupported(f"{option} = {v!r}: expected an integer in [1, {most:,}] or null{why}")
    return v


def _audio_format(ds: dict, sample_rate: int | None) -> tuple[int, str, str]:
    """(sample rate, quantization, card note) of an audio import. The tokens are state-spaces/s4's 8-bit
    mu-law or linear quantization (dataset.quantization 'mu-law' or 'linear', the official Beethoven
    SaShiMi's; when absent, the dataset's official default, DEFAULT_QUANTIZATION, else mu-law, assumed and
    said so; dataset.bits, when given, 8; anything else is refused); the rate is
    `sample_rate` when given, else the music dataset's dataset.sample_rate (its own option), else the official
    data's rate for its dataset name, else 16 kHz, assumed (and said so)."""
    name, quant, bits = ds.get("_name_"), ds.get("quantization"), ds.get("bits", 8)
    default = DEFAULT_QUANTIZATION.get(name)
    if quant not in (None, "mu-law", "linear"):
        raise Unsupported(
            f"dataset.quantization = {quant!r}: served are 'mu-law' and 'linear' (state-spaces/s4's)"
        )
    if bits != 8 or isinstance(bits, bool):
        raise Unsupported(f"dataset.bits = {bits!r}: served are 8-bit audio tokens (256 of them)")
    if quant:
        law = f"{'8-bit linear' if quant == 'linear' else 'mu-law'} ({quant!r} in the config)"
    elif default:
        kind = "8-bit linear" if default == "linear" else "mu-law"
        law = f"{kind} (no dataset.quantization in the config: the official {name} dataset's default)"
    else:
        law = "mu-law ASSUMED (no dataset.quantization in the config)"
    quant = quant or default or "mu-law"
    if sample_rate is not None:
        return (
            sample_rate,
            quant,
            f"dataset {name!r}: {sample_rate} Hz audio (--sample-rate), state-spaces/s4 {law}",
        )
    if name == "music" and "sample_rate" in ds:  # the Music dataset's rate is its config's (default 16000):
        rate = ds["sample_rate"]  # 16 kHz was read for every music run, an 8 kHz one's too
        if type(rate) is not int or not 1000 <= rate <= MAX_SIZE["sample_rate"]:
            raise Unsupported(
                f"dataset.sample_rate = {rate!r}: expected an integer of 1000 to {MAX_SIZE['sample_rate']} Hz"
            )
        return rate, quant, f"dataset {name!r}: {rate} Hz audio (its dataset.sample_rate), {law}"
    if AUDIO_DATASETS.get(name):
        rate = AUDIO_DATASETS[name]
        return (
            rate,
            quant,
            f"dataset {name!r}: {rate // 1000} kHz audio (the official {name} data's rate), {law}",
        )
    path = ds.get("path")
    if name == "qautoaudio" and path in QAUTOAUDIO_RATES:  # configs/dataset/beethoven.yaml, youtubemix.yaml
        rate = QAUTOAUDIO_RATES[path]
        note = f"dataset {name!r} at {path!r}: {rate // 1000} kHz audio (the official {path} data's rate)"
        return rate, quant, f"{note}, {law}"
    return (
        16000,
        quant,
        (
            f"dataset {name!r}: not an official audio set of known rate, so 16 kHz audio is ASSUMED "
            f"(--sample-rate sets it), state-spaces/s4 {law}; SaShiMi imports expect the sc09-style task "
            "(quantized audio samples as tokens)"
        ),
    )


def map_official(
    sd: dict[str, torch.Tensor], cfg: dict | None, kind: str, sample_rate: int | None = None
) -> Imported:
    """(state dict, plain config or description, kind from model.official.reader) → Imported.

    Every import gets `cauchy_backend = "torch"`: converting and serving never need KeOps (the kernels
    are checked in float64 by the torch Cauchy kernel, the model serves as its recurrence), and the
    default "auto" made the first conversion in a fresh KeOps cache, and so a fresh container serving
    a .ckpt, compile KeOps kernels first (tests/fixtures/official/s4_bytes.ckpt on a 2-core VM, fresh
    cache: 33.6 s with "auto", 3.2 s with "torch"). Set it to "auto" or "keops" in config.json to train
    the converted model further. `sample_rate` sets a SaShiMi import's audio rate (else its dataset's).
    Raises Unsupported (ConfigMismatch, MissingConfig) naming the option and its value."""
    if kind == "standalone":
        imp = map_standalone(sd, cfg or {})
    elif (
        isinstance(cfg, dict)
        and isinstance(cfg.get("model"), dict)
        and cfg["model"].get("_name_") in ("sashimi", "unet")
    ):
        imp = map_sashimi(sd, cfg, sample_rate)
    else:
        imp = map_lightning(sd, cfg, sample_rate)
    imp.config["cauchy_backend"] = "torch"
    return imp
