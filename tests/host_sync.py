"""A CPU check for what a CUDA graph cannot record: `no_host_sync()` fails on the first op inside it that
would wait for the device, make a shape from the device's data, or bring host data or host tensors into
the recorded ops.

Under `torch.cuda.graph` capture these raise (cudaErrorStreamCaptureUnsupported, "operation not permitted
when stream is capturing") or are recorded wrongly (a host value baked in, a CPU tensor in a CUDA op). The
code the graphs capture (model/cuda_graphs.py: `BucketedStep._eager`, the step, and `_block_body`, the
decode block's steps with their sampling) runs on CPU with `capture=False`; run there under this check, it
proves on CPU what a GPU would otherwise find out at its first capture. Two torch hooks watch it:

- a `TorchFunctionMode` (the Python API: `torch.overrides`): `.item()`, `.tolist()`, `bool()`/`int()`/
  `float()` of a tensor (an `if tensor:`), `.cpu()`, `.numpy()`, `.pin_memory()`, `.to("cpu")`,
  `torch.tensor`/`as_tensor`/`from_numpy` (host data copied over: a synchronous copy from pageable memory),
  and a factory (`torch.zeros`, `arange`, `full`, …) given no `device` (made on the CPU where the graph's
  tensors are on the GPU);
- a `TorchDispatchMode` (the aten ops the Python calls become): `aten._local_scalar_dense` (what `.item()`
  and `bool()` dispatch to), ops whose output shape depends on the data (`nonzero`, a one-argument
  `torch.where`, `masked_select`, `unique`, `repeat_interleave` with tensor repeats, `bincount`), boolean
  mask indexing (`x[mask]`, `x[mask] = v`), `equal`, and random ops (the graphs' draws are the uniforms
  drawn beforehand; a `torch.Generator` would have to be registered with the graph).

`HostSyncError` names the op and what it is. `paused()` lets a stand-in (the Triton kernel's launch, which
Triton's interpreter runs in numpy on CPU) run unchecked inside a checked region."""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class HostSyncError(AssertionError):
    """An op inside a checked region that a CUDA graph's capture refuses or records wrongly."""


# the Python API (TorchFunctionMode): method and function names → what they do on a GPU
READS = {
    "item": "a host read of a tensor's value (.item())",
    "tolist": "a host read of a tensor's values (.tolist())",
    "__bool__": "a host read of a tensor's value (bool(tensor), `if tensor:`, `and`/`or`/`not` on a tensor)",
    "__int__": "a host read of a tensor's value (int(tensor))",
    "__float__": "a host read of a tensor's value (float(tensor))",
    "__index__": "a host read of a tensor's value (a tensor used as a Python index)",
    "cpu": "a copy to the host (.cpu()): it waits for the device",
    "numpy": "a copy to the host (.numpy())",
    "pin_memory": "a new pinned host allocation (.pin_memory())",
    "tensor": "host data copied to the device (torch.tensor): a synchronous copy from pageable memory",
    "as_tensor": "host data copied to the device (torch.as_tensor)",
    "from_numpy": "host data (torch.from_numpy)",
}
FACTORIES = {"zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint", "linspace", "logspace",
             "eye", "scalar_tensor", "randperm", "empty_strided", "tril_indices", "triu_indices"}  # fmt: skip
# the aten ops (TorchDispatchMode): packets → what they do
SYNC_OPS = {
    aten._local_scalar_dense: "a host read of a tensor's value (.item(), bool(), int(), float(), `if t:`)",
    aten.is_nonzero: "a host read of a tensor's value (bool(tensor))",
    aten.equal: "a host read (torch.equal returns a Python bool)",
    aten.nonzero: "an output shape from the data (torch.nonzero, a one-argument torch.where, x[mask])",
    aten.argwhere: "an output shape from the data (torch.argwhere)",
    aten.masked_select: "an output shape from the data (masked_select, x[mask])",
    aten._unique: "an output shape from the data (unique)",
    aten._unique2: "an output shape from the data (unique)",
    aten.unique_dim: "an output shape from the data (unique)",
    aten.unique_consecutive: "an output shape from the data (unique_consecutive)",
    aten.bincount: "an output shape from the data (bincount)",
    aten._pin_memory: "a new pinned host allocation",
}
RANDOM = {"rand", "randn", "randint", "randperm", "bernoulli", "multinomial", "normal", "uniform", "random",
          "exponential", "geometric", "cauchy", "log_normal", "poisson", "native_dropout", "rand_like",
          "randn_like", "randint_like"}  # fmt: skip
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}

_local = threading.local()  # the active check's pause depth (a stand-in runs unchecked)


def _is_paused() -> bool:
    return getattr(_local, "paused", 0) > 0


@contextlib.contextmanager
def paused():
    """Inside a `no_host_sync()` region: run a stand-in unchecked (the Triton kernel's launch)."""
    _local.paused = getattr(_local, "paused", 0) + 1
    try:
        yield
    finally:
        _local.paused -= 1


def _name(func) -> str:
    return getattr(func, "__name__", str(func))


class _Functions(TorchFunctionMode):
    def __init__(self, where: str, ops: list):
        super().__init__()
        self.where, self.ops = where, ops

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _is_paused():
            name = _name(func)
            what = READS.get(name)
            if what is None and name == "to":
                dev = kwargs.get("device", next((a for a in args[1:] if isinstance(a, str)), None))
                if isinstance(dev, str) and torch.device(dev).type == "cpu":  # (a device named "cpu")
                    what = "a copy to the host (.to('cpu'))"
            if what is None and name in FACTORIES and kwargs.get("device") is None:
                if torch.get_default_device().type == "cpu":
                    what = f"a tensor made on the host (torch.{name} without device=), used in CUDA ops"
            if what is not None:
                raise HostSyncError(f"{self.where}: {name}: {what}")
        return func(*args, **kwargs)


class _Dispatch(TorchDispatchMode):
    def __init__(self, where: str, ops: list):
        super().__init__()
        self.where, self.ops = where, ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _is_paused():
            self.ops.append(func)
            what = SYNC_OPS.get(func.overloadpacket)
            if what is None and func in (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor):
                what = "an output shape from the data (repeat_interleave with tensor repeats)"
            if what is None and func in INDEXING:
                indices = args[1] if len(args) > 1 else ()
                if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
                    what = "boolean mask indexing (x[mask], x[mask] = v): its shape comes from the data"
            if what is None and _name(func.overloadpacket).rstrip("_") in RANDOM:
                what = "a random op: a graph replays its draws unless its generator is registered with it"
            if what is not None:
                raise HostSyncError(f"{self.where}: {func}: {what}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_sync(where: str = "a captured region"):
    """Fail (HostSyncError naming `where`, the op and why) on the first op inside that a CUDA graph's
    capture refuses or records wrongly (see the module docstring). Yields the list of aten ops run, so a
    caller can check that the region did run ops."""
    ops: list = []
    with _Functions(where, ops), _Dispatch(where, ops):
        yield ops
