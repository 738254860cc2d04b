"""The recurrent-form cache: each S4 layer's verified step form kept on disk, so a restart does not convert
it again.

`model.recurrent.convert_kernel` turns a trained layer into its step form and verifies it: the float64 conv
kernel over the trained length L (Cauchy + Woodbury for S4), the real N×N system and its
eigendecomposition, and the float32 step's impulse response over L compared with that kernel. For the
official WikiText-103 recipe (H 1,024, N 64, L 8,192) that is about 6 s a layer on a 2-core CPU, half of
it the kernel: most of the 4.5 minutes its 32 layers took at every server start (bench.wt103).

What conversion produces depends only on the layer's SSM parameters and on the conversion's settings, so
an entry is keyed by the SHA-256 (`layer_key`) of:
  * `FORMAT_VERSION` (the entry's layout), the SHA-256 of the converting code's source
    (`converter_digest`: an upgrade or an edit that touches it converts again), torch's version, and the
    device the impulse response ran on (its type, and a CUDA device's name);
  * the tolerance and the verified length;
  * the kernel's kind, discretization, rank and trained length L;
  * every tensor of `kernel.ssm(float64)` (Λ, P, B, C, Δ): its name, dtype, shape and bytes.
A checkpoint whose weights change in any SSM parameter misses on that layer; its other layers still hit.

An entry is one safetensors file, `<key>.safetensors` (nothing is ever unpickled): the tensors
`model.recurrent` gives it (a diagonal form's modes, the float64 kernel's first taps: the network check's
reference) and, in its metadata, the form's name, its verification report, the key, and the SHA-256 of the
tensors (name, dtype, shape, bytes), checked at every read. At a read `model.recurrent` also checks the
entry against the layer: its shapes, and its kernel taps against the layer's own computed by brute force
from the live parameters (`dense_taps`: dense powers of the state matrix, 0.4 s a layer of that recipe). An
entry that cannot be read, or whose metadata, checksum, shapes or taps do not match, is a miss: logged,
converted again, and written anew. Entries are written to a temporary file and renamed, so a crash leaves no
partial entry, and two processes that convert the same layer both write the same tensors. The server
never prunes the folder (about 3.6 MB a layer for that recipe: 115 MB for its 32 layers); `python -m
model.form_cache [FOLDER] [--prune]` (`scan`, `main`) tells current entries from stale ones (another
converter or torch: never read again) and deletes the latter. Deleting any entry is safe at any time.

Only the layer's own check over L is cached (for an entry read, its form's impulse response is stepped
over the entry's taps only, against them, for a diagonal form: `model.recurrent._cached_form`). The
network check (`RecurrentModel.verification`, `SaShiMiRecurrent.verification`: a probe prefilled and
stepped, also from the state its first part's prefill left, at the served dtype against float64 conv mode
of the live weights, each layer convolving with its taps, checked as above) runs at every load, hit or
miss; a model that fails it with layers read from the cache is converted again without it by
`to_recurrent` (what the server calls).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import secrets
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

log = logging.getLogger("model.form_cache")

FORMAT = "s4-recurrent-form"
FORMAT_VERSION = 1  # the entry's layout (what the converting code computes is in the key by its source)
SUFFIX = ".safetensors"


class FormCache:
    """The entries of one folder (created on first write; `~` expanded). `hits` and `misses` count the
    reads of this object. Reading and writing never raise for the folder or an entry (an unusable folder
    is logged once, and the layer converted as if there were no cache)."""

    def __init__(self, folder: str | Path, reading: bool = True):
        """reading=False: every read is a miss (entries are only written: `to_recurrent`'s second try)."""
        self.folder = Path(folder).expanduser()
        self.reading = reading
        self.hits = self.misses = 0
        self._write_failed = False

    def __repr__(self) -> str:
        return f"FormCache({str(self.folder)!r})"

    def path(self, key: str) -> Path:
        return self.folder / f"{key}{SUFFIX}"

    def read(self, key: str, build):
        """The entry under `key`, made into what the caller needs by `build(form name, report, tensors on
        CPU)`, which raises KeyError, ValueError or RuntimeError for an entry that does not fit (a shape
        the layer does not have); or None: a miss (no entry, or one not usable, which is logged)."""
        path = self.path(key)
        if not self.reading or not path.is_file():
            self.misses += 1
            return None
        try:
            meta, tensors = _open(path)
            if meta.get("format") != FORMAT or meta.get("format_version") != str(FORMAT_VERSION):
                raise ValueError(f"not a {FORMAT} v{FORMAT_VERSION} entry")
            if meta.get("key") != key:
                raise ValueError("its key is another's")
            if meta.get("tensors_sha256") != tensors_sha256(tensors):
                raise ValueError("checksum mismatch (the file was changed or damaged)")
            form, report = meta["form"], json.loads(meta["report"])
            if not isinstance(report, dict):
                raise ValueError("its report is not an object")
            made = build(form, report, tensors)
        except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as exc:
            self.misses += 1
            log.warning("%s: not used (%s); the layer is converted again", path, exc)
            return None
        self.hits += 1
        return made

    def write(self, key: str, form: str, report: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Store an entry (tensors: contiguous CPU tensors; report: JSON-serializable). A folder that cannot
        be written is logged once per object; nothing is raised."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "key": key,
            "form": form,
            "report": json.dumps(report),
            "tensors_sha256": tensors_sha256(tensors),
            "converter": converter_digest(),  # (in the key too; here so `scan` can tell stale entries)
            "torch": torch.__version__,
        }
        tmp = self.folder / f".tmp-{secrets.token_hex(6)}{SUFFIX}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata=meta)
            tmp.chmod(0o644)  # safetensors writes 0600; another uid may serve from the same folder
            os.replace(tmp, self.path(key))
        except (OSError, SafetensorError) as exc:  # (safetensors reports a read-only folder as the latter)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if not self._write_failed:
                self._write_failed = True
                why = getattr(exc, "strerror", None) or exc
                if self.folder.is_file():
                    why = "a file is there, not a folder"
                log.warning("recurrent-form cache %s cannot be written (%s): layers are converted at every "
                            "start", self.folder, why)  # fmt: skip


def _open(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """An entry's metadata and tensors (on CPU). Raises SafetensorError or OSError."""
    with safe_open(str(path), framework="pt") as f:
        # (copies: a tensor read from the file may sit at an offset that a complex view of it, which needs
        # 16-byte alignment, cannot use; one such view crashed in indexing)
        return f.metadata() or {}, {name: f.get_tensor(name).clone() for name in f.keys()}  # noqa: SIM118


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors in name order: each one's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(_bytes(t))
    return h.hexdigest()


def _bytes(t: torch.Tensor) -> bytes:
    """A tensor's raw bytes, whatever its dtype (through uint8: numpy has no bfloat16 or float8, and its
    TypeError escaped the entry's read)."""
    t = t.resolve_conj().resolve_neg().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


# the modules whose code computes what an entry holds: the kernel (Cauchy, Woodbury), the float64 linear
# algebra, the forms and their verification, and this module (the key and the layout)
CONVERTER_MODULES = ("model.kernel", "model.cauchy", "model.linalg", "model.recurrent", "model.form_cache")


@functools.cache
def converter_digest() -> str:
    """SHA-256 of the source of `CONVERTER_MODULES`: any change to the code that converts (an upgrade, a
    local edit) is a new key, so no entry made by other code is ever read."""
    h = hashlib.sha256()
    for name in CONVERTER_MODULES:
        origin = importlib.util.find_spec(name).origin
        h.update(f"{name}|".encode())
        h.update(Path(origin).read_bytes())
    return h.hexdigest()


def layer_key(kernel, s: dict[str, torch.Tensor], device, tol: float, verify_len: int) -> str:
    """The key of a layer's conversion: SHA-256 of what it depends on (module docstring). `kernel`: an
    `SSMKernel`; `s`: its `ssm(torch.float64)` on CPU."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else ""
    head = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "converter": converter_digest(),
        "torch": torch.__version__,
        "device": dev.type,
        "device_name": name,
        "tol": float(tol).hex(),
        "verify_len": int(verify_len),
        "kind": kernel.kind,
        "disc": kernel.disc,
        "rank": int(kernel.rank),
        "L": int(kernel.L),
    }
    h = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
    h.update(tensors_sha256(s).encode())
    return h.hexdigest()


def to_recurrent(net, cache: FormCache | None, **kwargs):
    """`net.to_recurrent(cache=cache, **kwargs)` (RecurrentModel or SaShiMiRecurrent). When the network
    check fails on a model some of whose layers were read from `cache`, the model is converted once more
    without reading it (its entries rewritten): an entry whose modes are wrong though its checksum and its
    taps are right (written by other code under the same versions, or by hand) costs one conversion, not
    the model. (`net.to_recurrent(cache=...)` itself raises VerificationError then.) Raises what
    `to_recurrent` raises."""
    from model.recurrent import VerificationError  # noqa: PLC0415 (model.recurrent imports this module)

    if cache is None:
        return net.to_recurrent(**kwargs)
    hits = cache.hits
    try:
        return net.to_recurrent(cache=cache, **kwargs)
    except VerificationError as exc:
        if cache.hits == hits:
            raise
        log.warning("%s; %d of its layers came from the recurrent-form cache %s: converting them again",
                    exc, cache.hits - hits, cache.folder)  # fmt: skip
        return net.to_recurrent(cache=FormCache(cache.folder, reading=False), **kwargs)


STATUSES = ("current", "stale", "damaged", "partial", "writing", "other")  # `scan`'s
TMP_AGE_S = 3600  # a temporary file older than this is a crashed write's (a write takes well under a second)


def scan(folder: str | Path, now: float | None = None, verify: bool = True) -> list[tuple[Path, str, int]]:
    """Every file of a cache folder as (path, status, bytes), status one of: "current" (an entry this
    installation reads: its converter and torch), "stale" (written by another converter, torch or layout:
    never read again here), "damaged" (unreadable, or its tensors' checksum does not match), "partial" (a
    write's temporary file older than TMP_AGE_S, left by a crash), "writing" (a younger one), "other" (not
    the cache's). A folder that does not exist has none. verify=False reads each entry's header only
    (milliseconds for a folder, where the checksums read every byte): a file cut short is still damaged
    (safetensors checks the header's offsets against its size), one changed in place is not."""
    folder, now = Path(folder).expanduser(), time.time() if now is None else now
    out = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            st = path.stat()
        except OSError:  # a dangling link, or a temporary file renamed meanwhile
            if path.is_symlink():
                out.append((path, "other", 0))
            continue
        size = st.st_size
        if path.name.startswith(".tmp-") and path.name.endswith(SUFFIX):
            out.append((path, "partial" if now - st.st_mtime > TMP_AGE_S else "writing", size))
        elif not path.is_file() or path.suffix != SUFFIX:
            out.append((path, "other", size))
        else:
            out.append((path, _status(path, verify), size))
    return out


def _status(path: Path, verify: bool = True) -> str:
    try:
        if verify:
            meta, tensors = _open(path)
        else:
            with safe_open(str(path), framework="pt") as f:
                meta, tensors = f.metadata() or {}, None
    except (SafetensorError, OSError, ValueError):
        return "damaged"
    if meta.get("format") != FORMAT:
        return "other"
    if meta.get("format_version") != str(FORMAT_VERSION) or meta.get("key") != path.stem:
        return "stale" if meta.get("key") == path.stem else "damaged"
    if tensors is not None and meta.get("tensors_sha256") != tensors_sha256(tensors):
        return "damaged"
    current = meta.get("converter") == converter_digest() and meta.get("torch") == torch.__version__
    return "current" if current else "stale"


def tally(files: list[tuple[Path, str, int]]) -> dict[str, tuple[int, int]]:
    """`scan`'s files by status: {status: (files, bytes)}."""
    by: dict[str, tuple[int, int]] = {}
    for _, status, size in files:
        n, total = by.get(status, (0, 0))
        by[status] = (n + 1, total + size)
    return by


def summary(folder: str | Path) -> tuple[dict[str, tuple[int, int]], str]:
    """What a cache folder holds by status (`scan`, headers only): {status: (files, bytes)}, and one line
    for a log: "2 current entries (7.3 MB)", then what is not current, with the command that deletes it
    ("; 4 stale (14.6 MB: another converter or torch, never read here); `python -m model.form_cache FOLDER
    --prune` deletes them")."""
    folder = Path(folder).expanduser()
    by = tally(scan(folder, verify=False))
    n, size = by.get("current", (0, 0))
    line = f"{n} current entries ({size / 1e6:.1f} MB)"
    why = {"stale": "another converter or torch, never read here", "damaged": "unreadable",
           "partial": "crashed writes"}  # fmt: skip
    left = [f"{by[s][0]} {s} ({by[s][1] / 1e6:.1f} MB: {w})" for s, w in why.items() if s in by]
    if left:
        line += f"; {', '.join(left)}: `python -m model.form_cache {folder} --prune` deletes them"
    return by, line


def main(argv: list[str] | None = None) -> int:
    """python -m model.form_cache [FOLDER] [--prune]: what a recurrent-form cache holds (entries this
    installation reads, stale ones of another converter or torch, damaged ones, crashed writes), and with
    --prune deletes all but the current ones and the writes in progress. FOLDER: default
    $S4_RECURRENT_CACHE, else ~/.cache/s4serve/recurrent."""
    import argparse  # noqa: PLC0415

    about = " ".join(main.__doc__.split("\n\n")[0].split())
    ap = argparse.ArgumentParser(prog="python -m model.form_cache", description=about)
    default = os.environ.get("S4_RECURRENT_CACHE", "").strip() or "~/.cache/s4serve/recurrent"
    ap.add_argument("folder", nargs="?", default=default, help=f"the cache folder (default: {default})")
    ap.add_argument("--prune", action="store_true", help="delete stale and damaged entries, crashed writes")
    args = ap.parse_args(argv)
    folder = Path(args.folder).expanduser()
    if not folder.is_dir():
        ap.error(f"{folder}: " + ("a file, not a folder" if folder.exists() else "no such folder"))
    files = scan(folder)
    print(f"{folder}: " + (", ".join(
        f"{n} {status} ({size / 2**10:.0f} KiB)" for status, (n, size) in sorted(tally(files).items())
    ) or "empty"))  # fmt: skip
    for path, status, _ in files:
        if status not in ("current", "writing"):
            print(f"  {status}: {path.name}")
    if args.prune:
        gone = [(p, s, n) for p, s, n in files if s in ("stale", "damaged", "partial")]
        for path, _, _ in gone:
            path.unlink(missing_ok=True)
        freed = sum(n for _, _, n in gone) / 2**10
        print(f"pruned {len(gone)} file{'' if len(gone) == 1 else 's'} ({freed:.0f} KiB); files not of the "
              "cache are left")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
