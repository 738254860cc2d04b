"""The official state-spaces/s4 code's own outputs for a checkpoint, computed in the official code's venv.

Run by `python -m model.check_official` as a child process with the user's official-venv python
(the server and the library never import it: its `main` imports the official `src` package;
importing the module does not, so tests/test_check_official.py imports it for its safetensors writer),
and imported by the fixture scripts under tests/fixtures/official/. The checkpoint is never unpickled:
`main` reads it with reader.py's safe loader, as model.convert does (`safe_load`).
It may import only what that venv has: the standard library, torch, omegaconf and the official code
(no safetensors: `save_safetensors` below writes the format itself).

    PYTHON model/official/reference.py --official S4_CHECKOUT --out REF.safetensors SRC [--config CFG]
        [--tokens N] [--seed S]

builds the official model from SRC's config (a Lightning .ckpt's hyper_parameters, a run's
config.yaml, or the JSON description of the standalone s4d.py layers), loads SRC's weights (strict),
and writes, in float64: tokens (B, T), logits_conv (B, T0, V) of the conv forward at T0 ≤ every layer's
kernel length (where the official conv mode does not lengthen its filter), logits_step (B, T, V) of
the official recurrence (setup_step, default_state, step per token; the standalone s4d.py has no step:
its conv forward at T, which computes the kernel for the input length), and kernel.{i} (H, L_i) of each
SSM layer in module order at its own kernel length.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import json
import math
import struct
import sys
import types
from pathlib import Path

import torch
from torch import nn

B = 2  # batch of the reference tokens
DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.int64: "I64"}


def install_standins() -> None:
    """Stand-ins: src.utils.config only calls hydra.utils.get_method / get_class on dotted paths."""
    hydra, hu = types.ModuleType("hydra"), types.ModuleType("hydra.utils")

    def get(path):
        mod, _, name = path.rpartition(".")
        return getattr(importlib.import_module(mod), name)

    hu.get_method = hu.get_class = get
    hydra.utils = hu
    sys.modules["hydra"], sys.modules["hydra.utils"] = hydra, hu
    # src/utils/train.py imports pytorch_lightning for rank_zero_only (a logging decorator) only.
    pl, plu = types.ModuleType("pytorch_lightning"), types.ModuleType("pytorch_lightning.utilities")
    plu.rank_zero_only = lambda fn: fn
    pl.utilities = plu
    sys.modules["pytorch_lightning"], sys.modules["pytorch_lightning.utilities"] = pl, plu


def import_official(official: str | Path) -> types.SimpleNamespace:
    """The official modules the model trees below need (src.models.nn.utils as U, src.utils, its
    registry), with the naive Cauchy/Vandermonde path: exact in float64, no compiler needed."""
    sys.path.insert(0, str(official))
    install_standins()
    import src.models.nn.utils as U  # noqa: PLC0415
    from src import utils  # noqa: PLC0415
    from src.utils import registry  # noqa: PLC0415

    try:  # the kernels read these flags when they are built: set them before any model is
        importlib.import_module("src.models.sequence.kernels.ssm")
    except ImportError:  # another layout of the official code: no_extensions() again once built
        pass
    no_extensions()
    return types.SimpleNamespace(U=U, utils=utils, registry=registry)


def no_extensions() -> None:
    """Every loaded official module that would use pykeops or the CUDA Cauchy extension: not."""
    for name, mod in list(sys.modules.items()):
        if name.startswith("src.") and mod is not None:
            for flag in ("has_pykeops", "has_cuda_extension"):
                if hasattr(mod, flag):
                    setattr(mod, flag, False)


class Scalar(nn.Module):  # src/tasks/tasks.py:Scalar (tasks.py imports the dataset stack)
    def __init__(self, c=1):
        super().__init__()
        self.c = c

    def forward(self, x):
        return x * self.c


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _lm_decoders(decoders: list, d_model: int) -> list[nn.Module]:
    """The official decoders an LM run's config names before the task's Linear, as train.py instantiates
    them for an LM dataset (no d_output, no l_output): `sequence` (a SequenceDecoder that keeps the whole
    sequence: no parameters) and `id`; any other is refused by name."""
    D = importlib.import_module("src.tasks.decoders")
    out = []
    for d in decoders:
        name = d if isinstance(d, str) else d.get("_name_")
        args = {} if isinstance(d, str) else {k: v for k, v in d.items() if k != "_name_"}
        if name == "sequence" and args.get("d_output") is None and args.get("l_output") is None:
            out.append(D.SequenceDecoder(d_model, **args))
        elif name == "id":
            out.append(nn.Identity())
        else:
            raise NotImplementedError(f"the LM reference builds the decoders sequence and id only, not {d!r}")
    return out


class LMLit(nn.Module):
    """The official SequenceLightningModule's module tree for the LM tasks (train.py + tasks.py):
    model., encoder. (task lm: Embedding ×√d_model when rescale; task adaptivelm: the official
    AdaptiveEmbedding), decoder. (lm: Linear, tied or not; adaptivelm: the sequence decoder without
    d_output, an identity) and, for adaptivelm, loss. and loss_val. (one ProjectedAdaptiveLogSoftmax
    under both names, as train.py registers it), whose compute_logits gives the logits (generate.py)."""

    def __init__(self, cfg: dict, official: types.SimpleNamespace, vocab: int):
        super().__init__()
        U = official.U
        model_cfg = copy.deepcopy(cfg["model"])
        decoders = [d for d in _as_list(model_cfg.get("decoder")) + _as_list(cfg.get("decoder")) if d]
        for key in ("encoder", "decoder"):  # train.py pops them (they would join the task's; refused)
            model_cfg.pop(key, None)
        self.model = official.utils.instantiate(official.registry.model, model_cfg)
        task = cfg.get("task") or {}
        H = self.model.d_model
        self.vocab = vocab
        self.adaptive = task.get("_name_") == "adaptivelm"
        if self.adaptive:  # tasks.AdaptiveLMTask (tasks.py imports the dataset stack: built here alike)
            A = importlib.import_module("src.models.nn.adaptive_softmax")
            enc = A.AdaptiveEmbedding(vocab, H, H, cutoffs=task["cutoffs"], div_val=task.get("div_val", 1),
                                      init_scale=task.get("init_scale", 1.0))  # fmt: skip
            weights = [m.weight for m in enc.emb_layers] if task.get("tie_weights", True) else None
            loss = A.ProjectedAdaptiveLogSoftmax(
                vocab, self.model.d_output, self.model.d_output, task["cutoffs"],
                div_val=task.get("div_val", 1),
                tie_projs=task.get("tie_projs"), out_projs=enc.emb_projs, out_layers_weights=weights,
                bias_scale=task.get("bias_scale", 0.0),
            )  # fmt: skip
            self.encoder = U.PassthroughSequential(enc, U.PassthroughSequential())
            self.decoder = U.PassthroughSequential(U.PassthroughSequential(), U.PassthroughSequential())
            self.loss, self.loss_val = loss, loss
            return
        emb = nn.Embedding(vocab, H)
        nn.init.normal_(emb.weight, mean=0, std=H**-0.5)
        scale = Scalar(math.sqrt(H)) if task.get("rescale", True) else None
        self.encoder = U.PassthroughSequential(U.PassthroughSequential(emb, scale), U.PassthroughSequential())
        dec = nn.Linear(self.model.d_output, vocab)
        if task.get("tied", False):
            dec.weight = self.encoder[0].weight
        # train.py's decoder: the config's decoders (model.decoder, then decoder), then the task's Linear, in
        # one flattened PassthroughSequential; the LM pipelines' `decoder: sequence` (an LM dataset has no
        # d_output or l_output: a parameterless SequenceDecoder, the whole sequence through) puts the Linear
        # at decoder.1
        self.decoder = U.PassthroughSequential(U.PassthroughSequential(*_lm_decoders(decoders, H)), dec)

    def _logits(self, x):
        x, _ = self.decoder(x)
        if not self.adaptive:
            return x
        return self.loss.compute_logits(x).view(*x.shape[:-1], self.vocab)

    def forward(self, x):
        x, _ = self.encoder(x)
        x, _ = self.model(x)
        return self._logits(x)

    @torch.no_grad()
    def recurrence(self, tokens):
        """generate.py's path: _setup_step() on every module that has it (the kernels' default mode,
        'dense' for DPLR), then default_state and step() token by token."""
        setup_step(self)
        state = self.model.default_state(tokens.shape[0], device=tokens.device)
        out = []
        for t in range(tokens.shape[1]):
            x, _ = self.encoder(tokens[:, t])
            x, state = self.model.step(x, state=state)
            out.append(self._logits(x))
        return torch.stack(out, 1)


def lm_vocab(sd: dict) -> int:
    """The vocabulary size of an LM task's state dict: the embedding's rows (task lm), or the adaptive
    softmax's output biases' total (task adaptivelm)."""
    if "encoder.0.weight" in sd:
        return sd["encoder.0.weight"].shape[0]
    return sum(v.numel() for k, v in sd.items() if k.startswith("loss.out_layers_biases."))


class SequenceDecoderParams(nn.Module):
    """src/tasks/decoders.py SequenceDecoder's parameters: output_transform = Linear(d_model, d_output)."""

    def __init__(self, H: int, V: int):
        super().__init__()
        self.output_transform = nn.Linear(H, V)


class SashimiLit(nn.Module):
    """The sc09-style task around a SaShiMi or U-Net SaShiMi backbone, or the isotropic one (an audio
    model of the sc09 task): encoder.0 (Embedding), model., decoder.0.output_transform (Linear at every
    position)."""

    def __init__(self, cfg: dict, official: types.SimpleNamespace, vocab: int):
        super().__init__()
        model_cfg = copy.deepcopy(cfg["model"])
        for key in ("encoder", "decoder"):
            model_cfg.pop(key, None)
        self.model = official.utils.instantiate(official.registry.model, model_cfg)
        H = cfg["model"]["d_model"]
        self.encoder = nn.ModuleList([nn.Embedding(vocab, H)])
        self.decoder = nn.ModuleList([SequenceDecoderParams(H, vocab)])

    def forward(self, tokens):
        x, _ = self.model(self.encoder[0](tokens))
        return self.decoder[0].output_transform(x)

    @torch.no_grad()
    def recurrence(self, tokens):
        setup_step(self)
        state = self.model.default_state(tokens.shape[0], device=tokens.device)
        out = []
        for t in range(tokens.shape[1]):
            x, state = self.model.step(self.encoder[0](tokens[:, t]), state=state)
            out.append(self.decoder[0].output_transform(x))
        return torch.stack(out, 1)


class StandaloneLM(nn.Module):
    """example.py's S4Model over tokens, from the standalone models/s4/s4d.py layers: an Embedding
    encoder, pre-norm LayerNorm residual blocks, a final LayerNorm and a Linear decoder."""

    def __init__(self, S4D, n_layers: int, H: int, N: int, V: int, embed_scale: float = 1.0):
        super().__init__()
        self.embed_scale = embed_scale
        self.encoder = nn.Embedding(V, H)
        self.s4_layers = nn.ModuleList(S4D(H, d_state=N, transposed=True) for _ in range(n_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(H) for _ in range(n_layers))
        self.norm = nn.LayerNorm(H)
        self.decoder = nn.Linear(H, V)

    def forward(self, tokens):
        x = self.encoder(tokens)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        x = x.transpose(-1, -2)  # (B, H, L)
        for layer, norm in zip(self.s4_layers, self.norms):
            z, _ = layer(norm(x.transpose(-1, -2)).transpose(-1, -2))
            x = z + x
        return self.decoder(self.norm(x.transpose(-1, -2)))


def standalone_model(official: str | Path, desc: dict) -> StandaloneLM:
    """The StandaloneLM a description (model.official.mapping.map_standalone's fields) names."""
    if (
        desc.get("module") != "s4d"
        or desc.get("prenorm", True) is not True
        or not desc.get("final_norm", True)
    ):
        raise SystemExit(f"description: only module 's4d', prenorm and a final norm are supported ({desc})")
    sys.path.insert(0, str(Path(official) / "models" / "s4"))
    from s4d import S4D  # noqa: PLC0415

    n, H, N, V = (int(desc[k]) for k in ("n_layers", "d_model", "d_state", "vocab_size"))
    return StandaloneLM(S4D, n, H, N, V, float(desc.get("embed_scale", 1.0)))


def setup_step(lit: nn.Module) -> None:
    for m in lit.modules():
        if hasattr(m, "_setup_step"):
            m._setup_step()


def _is_kernel(k) -> bool:
    return any(hasattr(k, p) for p in ("inv_dt", "log_dt"))


def _is_v3_wrapper(k) -> bool:
    """Version 3's SSKernel: a wrapper whose own `kernel` is the kernel."""
    return _is_kernel(getattr(k, "kernel", None))


def ssm_layers(lit: nn.Module) -> list[nn.Module]:
    """The modules holding an SSM kernel, in module order: their `kernel` is the kernel, or (version 3)
    an SSKernel wrapper around it (the wrapper itself is not a layer)."""
    found = [
        m
        for m in lit.modules()
        if _is_kernel(getattr(m, "kernel", None)) or _is_v3_wrapper(getattr(m, "kernel", None))
    ]
    wrappers = {id(m.kernel) for m in found}
    return [m for m in found if id(m) not in wrappers]


def dplr_length(m: nn.Module) -> int | None:
    """A layer's DPLR kernel's own length (its l_kernel; version 3's SSKernelNPLR buffer L, under the
    SSKernel wrapper), None for a diagonal kernel."""
    k = m.kernel
    if hasattr(k, "l_kernel"):
        return int(k.l_kernel.item())
    inner = getattr(k, "kernel", None)
    if isinstance(getattr(inner, "L", None), torch.Tensor) and hasattr(inner, "inv_w_real"):
        return int(inner.L.item())
    return None


def kernel_length(m: nn.Module, default: int | None = None) -> int | None:
    """A layer's own kernel length: a DPLR kernel's l_kernel, else the layer's L (its l_max)."""
    lk = dplr_length(m)
    if lk is not None:
        return lk
    return getattr(m, "L", None) or default


def kernels(lit: nn.Module, default_length: int | None = None) -> dict:
    out = {}
    for i, m in enumerate(ssm_layers(lit)):
        L = kernel_length(m, default_length)
        # (version 3's SSKernel wrapper passes its rate, None by default, on to the kernel, whose own is 1.0)
        k = m.kernel(L=L, rate=1.0) if _is_v3_wrapper(m.kernel) else m.kernel(L=L)
        k = k[0] if isinstance(k, tuple) else k  # (C, H, L) and state, or (H, L) for s4d.py
        out[f"kernel.{i}"] = (k[0] if k.dim() == 3 else k).detach().clone()  # (H, L)
    return out


def drop_omega_cache(lit):
    for m in lit.modules():
        for a in ("omega", "z"):
            if hasattr(m, a) and not isinstance(getattr(m, a), (nn.Parameter, nn.Module)):
                delattr(m, a)


def references(lit: nn.Module, tokens: torch.Tensor, T0: int, default_length: int | None = None) -> dict:
    """tokens, kernel.{i}, logits_conv (the conv forward on tokens[:, :T0]) and logits_step (the
    official recurrence on all of tokens), float64."""
    lit = lit.double().eval()
    drop_omega_cache(lit)
    ref = {"tokens": tokens}
    with torch.no_grad():
        ref.update(kernels(lit, default_length))
        ref["logits_conv"] = lit(tokens[:, :T0]).clone()
    ref["logits_step"] = lit.recurrence(tokens).clone()
    return {k: v.contiguous() for k, v in ref.items()}


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None
) -> None:
    """The safetensors format (an 8-byte little-endian header length, a JSON header, the data), written
    without the safetensors package (an official venv need not have it); read back with safetensors."""
    header: dict = {"__metadata__": {k: str(v) for k, v in (metadata or {}).items()}} if metadata else {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} is not written")
        data = t.numpy().tobytes() if t.numel() else b""
        header[name] = {
            "dtype": DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for data in blobs:
            f.write(data)


# ---------------------------------------------------------------------------------------------
# The check's child process


def read_config(src: Path, config: Path | None, ckpt: dict | None) -> dict | None:
    """The run's config as the official code reads it (omegaconf, interpolations resolved; its `eval`
    resolver registered as src/utils/train.py does), or a standalone JSON description."""
    from omegaconf import OmegaConf  # noqa: PLC0415

    if not OmegaConf.has_resolver("eval"):
        OmegaConf.register_new_resolver("eval", eval)
    if config is not None and config.suffix == ".json":
        return json.loads(config.read_text())
    if config is not None:
        cfg = OmegaConf.load(config)
    elif ckpt is not None and ckpt.get("hyper_parameters"):
        cfg = ckpt["hyper_parameters"]
        cfg = cfg if OmegaConf.is_config(cfg) else OmegaConf.create(cfg)
    else:
        return None
    return OmegaConf.to_container(cfg, resolve=True)


def trained_length(lit: nn.Module, cfg: dict, standalone: bool) -> int:
    """The longest conv length at which every layer convolves with its whole kernel: min over layers of
    its kernel length (the layer's L = l_max, where FFTConv truncates longer inputs' kernels; a DPLR
    kernel's l_kernel, past which it would lengthen its C̃ in place) × its stride (SaShiMi's levels,
    found by a short forward that records each layer's input length). With none set: the description's
    l_max (s4d.py computes its kernel for any length), else 1024."""
    if standalone:
        return int(cfg.get("l_max", 1024))
    pool = cfg["model"].get("pool")
    P = math.prod(pool) if isinstance(pool, list) else 1
    layers = ssm_layers(lit)
    seen: dict[int, int] = {}

    def hook(i):
        def record(module, args):
            x = args[0]
            seen.setdefault(i, x.size(-1) if getattr(module, "transposed", False) else x.size(-2))

        return record

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(layers)]
    try:
        with torch.no_grad():
            lit(torch.zeros(1, P, dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    drop_omega_cache(lit)
    limits = []
    for i, m in enumerate(layers):
        lens = [int(m.L)] if getattr(m, "L", None) else []
        lk = dplr_length(m)
        if lk is not None:
            if lk <= 0:
                raise SystemExit(f"SSM layer {i}: l_kernel = 0: the model never ran in conv mode")
            lens.append(lk)
        if lens:
            limits.append(min(lens) * (P // seen.get(i, P)))
    return min(limits) if limits else 1024


def reference_lengths(limit: int, P: int, tokens: int | None) -> tuple[int, int, str | None]:
    """(T0, T, note): the conv check's length T0 (the trained length `limit`, whole frames of SaShiMi's
    pool product P: never shortened by --tokens) and the recurrence's T (the --tokens asked, default
    1.5 × limit; at least one frame past T0, so something past the trained length is checked; rounded up
    to whole frames), and a line saying how an asked T was changed (None when it was not)."""
    T0 = max(P, limit // P * P)
    least = T0 + P
    T = tokens if tokens is not None else limit + limit // 2
    T = max(least, -(-T // P) * P)
    if tokens is None or T == tokens:
        return T0, T, None
    frame = f"one pool frame, {P} tokens," if P > 1 else "one token"
    if T == least and tokens < least:
        why = f"the conv check takes the trained length, {T0} tokens; the recurrence goes {frame} past it"
        return T0, T, f"--tokens {tokens}: raised to {T} ({why})"
    return T0, T, f"--tokens {tokens}: rounded up to {T} (whole pool frames of {P} tokens)"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safe_load(src: Path):
    """SRC read as model.convert reads it, never unpickled: reader.py's `safe_torch_load`
    (torch.load(weights_only=True), the omegaconf nodes of a Lightning config rebuilt as plain dicts by
    inert stand-ins). reader.py is loaded by its path, so the `model` package (and what it imports) is
    not needed in the official venv; its torch must have torch.serialization.safe_globals (2.5+)."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location(
        "s4serve_official_reader", Path(__file__).with_name("reader.py")
    )
    reader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reader)
    if not hasattr(torch.serialization, "safe_globals"):
        raise SystemExit(f"torch {torch.__version__} in this venv has no torch.serialization.safe_globals: "
                         "the safe loader needs torch 2.5 or later")  # fmt: skip
    try:
        return reader.safe_torch_load(src)
    except reader.OfficialFormatError as exc:
        raise SystemExit(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The official code's float64 outputs for a checkpoint.")
    ap.add_argument("src", type=Path)
    ap.add_argument("--official", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    official = import_official(args.official)  # first: a checkout that does not import fails here
    obj = safe_load(args.src)
    ckpt = obj if isinstance(obj, dict) and "state_dict" in obj else None
    sd = ckpt["state_dict"] if ckpt is not None else obj
    cfg = read_config(args.src, args.config, ckpt)
    if cfg is None:
        raise SystemExit(f"{args.src}: no config (a .pt needs its run's config.yaml: --config)")
    standalone = cfg.get("format") == "s4-standalone"
    if standalone:
        lit = standalone_model(args.official, cfg)
    else:
        vocab = lm_vocab(sd)
        lm = (cfg.get("task") or {}).get("_name_") in ("lm", "adaptivelm")
        lm = lm and cfg["model"].get("_name_") not in ("sashimi", "unet")
        lit = (LMLit if lm else SashimiLit)(cfg, official, vocab)
    no_extensions()
    lit.load_state_dict(sd, strict=True)
    lit = lit.double().eval()
    limit = trained_length(lit, cfg, standalone)
    pool = None if standalone else cfg["model"].get("pool")
    P = math.prod(pool) if isinstance(pool, list) else 1
    T0, T, note = reference_lengths(limit, P, args.tokens)
    V = lit.decoder.out_features if standalone else vocab
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(args.seed))
    if standalone:  # s4d.py has no step(); its conv forward computes the kernel for the input length
        drop_omega_cache(lit)
        with torch.no_grad():
            ref = {"tokens": tokens, "logits_conv": lit(tokens[:, :T0]), "logits_step": lit(tokens)}
            ref.update(kernels(lit, T0))
        ref = {k: v.contiguous() for k, v in ref.items()}
    else:
        ref = references(lit, tokens, T0, T0)
    meta = {"source": args.src.name, "sha256": sha256(args.src), "conv_tokens": T0, "tokens": T,
            "seed": args.seed, "vocab": V, "trained_length": limit,
            "logits_step": "the official conv forward (s4d.py has no step)"
            if standalone else "the official recurrence"}  # fmt: skip
    save_safetensors(ref, args.out, meta)
    print(json.dumps({**meta, "note": note} if note else meta))  # the note: for the check to print
    return 0


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        # this folder (mapping.py, reader.py) must not shadow anything the official code imports
        sys.path.pop(0)
    sys.exit(main())
