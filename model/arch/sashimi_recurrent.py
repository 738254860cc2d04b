"""The recurrent (serving) form of a SaShiMi network: one verified recurrence for the whole U-shape.

Every S4 layer is converted and verified by model.recurrent.convert_kernel (the diagonal form, or the
exact DPLR step when diagonalization is ill-conditioned), at its own level's length. The pools become:
  * DownPool k: a buffer of the level's last inputs; on the step whose level-k phase is pool[k] − 1
    it emits one coarse input, and only then does level k + 1 (and everything coarser) step.
  * UpPool k: a buffer of the `pool[k]` fine outputs of the last coarse step, handed out one per
    level-k step (at phase r, entry r). It starts at zeros: the conv mode's causal shift.
One sequence's whole state is one float32 row laid out by a StateLayout:
    phase                    steps taken mod prod(pool) (an exact integer in float32)
    <block name>.x           (H_k, 2, M) real and imaginary parts of each S4 layer's modes
    down.k.buffer, up.k.buffer   (pool[k], H_k)
Rows of one batch may be at different phases; each row equals the same sequence run alone.

Prefill is parallel at every level: conv (FFT) over the prompt at level 0, the DownPool over the
buffered inputs plus the new ones, the coarser levels over the complete blocks, the UpPool outputs
read from [buffer, new coarse blocks] at the starting phase; each S4 layer's final state comes from
its form's `prefill`. It leaves the exact state for any prompt length and any starting state.

Precision: the policy of model/recurrent.py (a float16 state row too: `use_state_dtype`, its phase counter
exact). Conversion is float64 and the state row stays float32 whatever the weights' dtype (float32, bfloat16
or float16): SSM states, pool buffers (a 16-bit activation widens into them exactly) and the phase. The
whole-network C step (fused.SaShiMiStep, every batch size) reads 16-bit linear weights (blocks and pools) as
they are and computes in float32. The torch ops (the prefill, which has no C form; the step where no C step
was built) run the embedding, norms, pools, FF and mixing linears and the head in `compute_dtype` (on CPU in
float32 the prefill's linears are the C step's tiles, row-invariant: `RowwiseLinear`): the
weights' dtype where the device multiplies it natively (`recurrent.native_matmul`), else float32 on a copy of
the 16-bit weights widened exactly; each SSM takes its input in float32 and hands its output back in that
dtype; logits are float32. The whole network is verified at the served dtype within `LOGITS_TOL[dtype]` (4u
for 16 bits) of float64 conv mode.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from model import fused, recurrent
from model import triton_step as triton_kernel
from model.arch.sashimi import S4Block, SaShiMi
from model.cuda_graphs import GraphedModel
from model.layer import fft_conv
from model.network import check_token_dtype, check_token_ids
from model.recurrent import (
    F64,
    LOGITS_TOL,
    STATE_BOUND_SLACK,
    VERIFY_TOKENS,
    StateRangeError,
    VerificationError,
    check_block_tokens,
    check_logits_kind,
    check_native_block_state,
    check_step_inputs,
    convert_kernel,
    float32_str,
    layernorm_output_bound,
    logits_report,
    pad_fused_params,
    state_basis,
)
from model.state_layout import StateLayout

if TYPE_CHECKING:
    from model.form_cache import FormCache


class RowwiseLinear(torch.nn.Module):
    """An nn.Linear applied to x (…, K) float32 on CPU by ssm_step.c's linear tiles (the whole-network C
    step's own; `fused.linear_rows_threads`): each row's bits are those of the row alone, whatever else is in
    the batch and however many threads run. torch's `linear` flattens a batch's rows into one MKL product
    whose kernel and split depend on the row count (a logit of audio-digits moved by up to 1.3e-5 with other
    prompts beside it), and `bmm` against the weight expanded per row on the thread count (1e-6 at 8
    threads). Holds the weight packed as a float32 copy."""

    def __init__(self, linear: torch.nn.Linear, lib):
        super().__init__()
        self.lib, self.out_features = lib, linear.out_features
        w = linear.weight.detach()
        self.packed = fused.pack_linear(w.t().float(), lib.linear_panel_width())
        bias = torch.zeros(self.out_features) if linear.bias is None else linear.bias.detach().float()
        self.bias_f32 = bias.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        y = fused.linear_rows_threads(self.lib, rows, self.packed, self.out_features, self.bias_f32)
        return y.reshape(*x.shape[:-1], self.out_features)


def each_row(fn, x: torch.Tensor) -> torch.Tensor:
    """fn (an elementwise activation) on each row x[i : i + 1] of x (b, …) alone, concatenated: torch runs
    a vectorized loop over each thread's share of the elements and a scalar one on the share's last few,
    whose sigmoid (GLU) rounds otherwise, and the shares' edges move with the batch's size and the thread
    count (a logit of audio-digits moved by 3.8e-6 with 16 rows at 3 threads). A row alone has its own
    shape's shares, the same whatever else is in the batch."""
    return fn(x) if len(x) == 1 else torch.cat([fn(x[i : i + 1]) for i in range(len(x))])


def rowwise_linears(net: torch.nn.Module, lib) -> torch.nn.Module:
    """A copy of `net` (sharing its weights) whose nn.Linear layers are `RowwiseLinear`s."""
    out = copy.deepcopy(net, memo={id(t): t for t in (*net.parameters(), *net.buffers())})
    for name, mod in list(out.named_modules()):
        if isinstance(mod, torch.nn.Linear):
            parent, _, attr = name.rpartition(".")
            setattr(out.get_submodule(parent), attr, RowwiseLinear(mod, lib))
    return out


class SaShiMiRecurrent(GraphedModel):
    """Frozen recurrent form of a SaShiMi network: init_state, parallel prefill, batched step.

    State: float32 (B, layout.numel); `step` and `prefill` return a new state and leave the one
    passed in untouched, unless `step(..., out=state)` asks for an in-place update. The batch is dim
    `batch_dim` = 0 of the state (the server's slot pool indexes rows there and never looks inside).

    `dtype`: the weights' dtype to serve in (default: the net's own), float32, bfloat16, float16 or
    float64 (`LOGITS_TOL`), cast *after* the float64 conversion; the state stays float32 (module
    docstring: Precision). After conversion `report` holds one dict per S4 layer and `verification` the
    network check (as RecurrentModel's): step and prefill of a probe at the served dtype against the
    float64 conv mode, within `logits_tol` (default LOGITS_TOL[dtype]: 1e-4 for float32, 4u for 16
    bits). `triton_step`: each diagonal layer's step of a whole batch is one Triton kernel that updates the
    state in place (`model/triton_step.py`; where the C step does not run): None (default) on a CUDA
    device when triton imports and `S4_TRITON_STEP` is not 0, True also on CPU under Triton's
    interpreter (tests). `cache`: a `model.form_cache.FormCache` the layers' verified forms are read from
    and written to, as RecurrentModel's (the network check runs whatever it held). Raises ValueError for
    weights of mixed or unsupported dtypes, VerificationError when a check fails (naming the dtype and the
    errors)."""

    batch_dim = 0

    def __init__(
        self,
        net: SaShiMi,
        tol: float = 1e-4,
        verify_len: int | None = None,
        device=None,
        fused_step=True,
        dtype: torch.dtype | None = None,
        logits_tol: float | None = None,
        fused_network=True,
        triton_step: bool | None = None,
        cache: FormCache | None = None,
    ):
        device = recurrent.form_device(net, device, tol, logits_tol, verify_len)
        self.dtype = dtype = recurrent.served_dtype(net, dtype)
        self.net = copy.deepcopy(net).to(device).eval().requires_grad_(False)
        self.config = cfg = net.config
        self.device = device
        self._device_type = torch.device(device).type  # (checked per call: a cached string)
        self.pool = list(cfg.pool)
        self.period = math.prod(self.pool)
        self.layout = StateLayout()
        self.layout.add("phase", (1,))
        self.forms, self.report, kernels64 = {}, [], {}
        for name, level, block in self.net.named_s4_blocks():
            L = None if verify_len is None else -(-verify_len // math.prod(self.pool[:level]))
            try:
                form, rep, kernels64[name] = convert_kernel(block.layer.kernel, device, tol, L, cache)
            except VerificationError as exc:
                raise VerificationError(f"layer {name}: {exc}") from None
            self.forms[name] = form
            self.report.append({"layer": name, "level": level, **rep})
            self.layout.add(f"{name}.x", (form.H, 2, form.M))
        for k, p in enumerate(self.pool):
            self.layout.add(f"down.{k}.buffer", (p, self.net.widths[k]))
            self.layout.add(f"up.{k}.buffer", (p, self.net.widths[k]))
        self.net.to(dtype)  # after the float64 conversion; the SSM forms and the state stay float32
        # the torch ops compute in the weights' dtype where the device multiplies it natively, else in
        # float32 on a copy of the weights widened exactly (RecurrentModel.compute_dtype)
        self.compute_dtype = dtype if recurrent.native_matmul(dtype, device) else torch.float32
        self._net_ops = self.net if self.compute_dtype == dtype else copy.deepcopy(self.net).float()
        # on CPU each S4 layer's step is one fused C pass (model/fused.py) when it builds
        self._fused = fused.library() if (fused_step and device.type == "cpu") else None
        if self._fused is not None:
            for form in self.forms.values():
                pad_fused_params(form, form.M)  # its C pointers (each layer's state has its own M)
        # on CPU in float32 the prefill takes a phase's rows together through the C linears (`RowwiseLinear`),
        # each row bit for bit the row alone; else (16-bit products, no C library) on CPU each row runs alone
        self._rowwise = self._fused is not None and self.compute_dtype == torch.float32
        self._prefill_net = rowwise_linears(self._net_ops, self._fused) if self._rowwise else self._net_ops
        # ... and the whole network's step is one C call (fused.SaShiMiStep), with the native decode
        # block, unless the network has something it does not compute (it names it): then the torch ops
        self._net_step = None
        if self._fused is not None and fused_network:
            try:
                self._net_step = fused.SaShiMiStep(self._fused, self)
            except ValueError:
                pass
        self._triton = triton_kernel.resolve(triton_step, device)
        self._graphs = None  # model.cuda_graphs.BucketedStep, set by use_cuda_graphs
        self._state_bound: torch.Tensor | None = None
        tol_net = LOGITS_TOL[dtype] if logits_tol is None else logits_tol
        self.verification = self._verify_network(net, kernels64, tol_net)

    def use_triton_step(self, on: bool = True) -> None:
        """Step the diagonal layers with the Triton kernel (on; where the C step does not run) or with
        torch ops (off), as `RecurrentModel.use_triton_step`. Raises ValueError for on where the kernel
        does not run."""
        if on:
            triton_kernel.require(self.device, "use_triton_step(True)")
        self._triton = bool(on)
        self._recapture()

    @property
    def triton_step_active(self) -> bool:
        """Whether the step runs the Triton kernel for some layer (on, and a diagonal layer to run it on)."""
        return self._triton and any(f.form == "diagonal" for f in self.forms.values())

    def _verify_network(self, net: SaShiMi, kernels64: dict[str, torch.Tensor], tol: float) -> dict:
        """Prefill 2 probe sequences (fixed seed) in two parts split off the pooling period (the second
        starts mid-block), and step them: their first part from the zero state (through every phase),
        their second from the state the first part's prefill left (in one batch of 4 rows while both
        step); compare the logits with the conv mode of
        `net` in float64 (CPU), each S4 layer convolving with its float64 kernel's first taps from
        `convert_kernel` (its kernel at the length needed where they are fewer). Raises
        VerificationError above `tol`."""
        T = min(VERIFY_TOKENS, self.config.l_max)
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, self.config.vocab_size, (2, T), generator=gen)
        ref_net = copy.deepcopy(net).to("cpu", F64).eval()
        blocks = {name: block for name, _, block in ref_net.named_s4_blocks()}

        def conv(name: str):
            def ssm(u: torch.Tensor) -> torch.Tensor:  # u (B, n, H) float64
                n, K = u.shape[1], kernels64[name]
                K = K[:, :n] if K.shape[1] >= n else blocks[name].layer.kernel(n, dtype=F64, backend="torch")
                return fft_conv(u.transpose(1, 2), K).transpose(1, 2)

            return ssm

        with torch.no_grad():
            ref = ref_net(tokens, ssms={name: conv(name) for name in blocks})
        del ref_net
        tok = tokens.to(self.device)
        cut = T // 2 + self.period // 2 + 1  # not a multiple of the period
        first, mid = self.prefill(tok[:, :cut], self.init_state(2))
        second, _ = self.prefill(tok[:, cut:], mid)
        # stepped: the first `cut` tokens from the zero state (through every phase), and in the same batch
        # the rest from the state the first prefill left, mid-block (decoding after a prompt)
        n = max(T - cut, 0)  # (cut ≥ T for a probe shorter than 1.5 periods: then the first part is all)
        state, head, tail = torch.cat([self.init_state(2), mid]), [], []
        for t in range(n):
            logits, state = self.step(torch.cat([tok[:, t], tok[:, cut + t]]), state)
            head.append(logits[:2])
            tail.append(logits[2:])
        state = state[:2]
        for t in range(n, min(cut, T)):
            logits, state = self.step(tok[:, t], state)
            head.append(logits)
        stepped = torch.cat([torch.stack(x, 1) for x in (head, tail) if x], 1)
        prefilled = torch.cat([first, second], 1)
        name = str(self.dtype).removeprefix("torch.")
        return logits_report(f"the recurrent SaShiMi network in {name}", name, stepped, prefilled, ref, tol)

    @property
    def state_shape(self) -> tuple[int, ...]:
        """One sequence's state: (layout.numel,) float32 (the batch adds dim `batch_dim` = 0)."""
        return (self.layout.numel,)

    @functools.cached_property
    def basis(self) -> str:
        """What a state's coordinates mean (`model.recurrent.state_basis` of every S4 layer's form, in the
        order of their names), as 16 hex digits."""
        return state_basis([self.forms[name] for name in sorted(self.forms)])

    def ssm_input_bound(self, block) -> torch.Tensor:
        """(H,) float64: max |u_h| of a block's input u = norm(x) (an S4 block's SSM input). A
        LayerNorm's output is γ ⊙ x̂ + β with |x̂_h| ≤ √(H − 1) (Samuelson's inequality), so
        |u_h| ≤ |γ_h| √(H − 1) + |β_h|. The scalar TransposedLN s·(x − μ + m)/σ has no such bound (m/σ
        grows as σ → 0): inf."""
        norm = block.norm
        if not isinstance(norm, torch.nn.LayerNorm):
            return torch.full((self._width(block),), torch.inf, dtype=F64)
        return layernorm_output_bound(norm)

    @staticmethod
    def _width(block) -> int:
        return block.layer.D.shape[0] if isinstance(block, S4Block) else block.ff.up.in_features

    @staticmethod
    def _abs_linear(linear: torch.nn.Linear, v: torch.Tensor) -> torch.Tensor:
        """Bound of |W x + b| for |x| ≤ v (float64): |W| v + |b| (0 · inf counts 0)."""
        W = linear.weight.detach().cpu().double().abs()
        out = (W * v[None, :]).nan_to_num(nan=0.0, posinf=math.inf).sum(-1)
        return out if linear.bias is None else out + linear.bias.detach().cpu().double().abs()

    def _block_bound(self, name: str, block, bx: torch.Tensor) -> torch.Tensor:
        """Bound of a residual block's output x + f(norm(x)) for |x| ≤ bx (H,) float64. S4 block:
        |y| ≤ Σ_m |c_re| B_re + |c_im| B_im over its state bound (y = Σ c_re x_re − c_im x_im of the
        step), |GELU(z)| ≤ |z| for z = y + D u, and the GLU a·σ(b) within |a|. FF block: the two linear
        layers around |GELU(z)| ≤ |z|."""
        u = self.ssm_input_bound(block)
        if isinstance(block, S4Block):
            form = self.forms[name]
            sb = form.state_bound(u)  # (H, 2, M)
            cr, ci = form.cr.detach().cpu().double().abs(), form.ci.detach().cpu().double().abs()
            y = (cr * sb[:, 0] + ci * sb[:, 1]).nan_to_num(nan=0.0, posinf=math.inf).sum(-1)
            g = y + (block.layer.D.detach().cpu().double().abs() * u).nan_to_num(nan=0.0, posinf=math.inf)
            return bx + self._abs_linear(block.layer.out, g)[: bx.shape[0]]
        return bx + self._abs_linear(block.ff.down, self._abs_linear(block.ff.up, u))

    def _blocks_bound(self, prefix: str, blocks, bx: torch.Tensor, skips: list | None = None,
                      unet_up: bool = False) -> torch.Tensor:  # fmt: skip
        """As `_step_blocks`: each block's output bound pushed on `skips`, or (unet_up) a popped skip's
        bound added."""
        for i, blk in enumerate(blocks):
            bx = self._block_bound(f"{prefix}.{i}", blk, bx)
            if unet_up:
                bx = bx + skips.pop()
            elif skips is not None:
                skips.append(bx)
        return bx

    def _level_bound(self, k: int, bx: torch.Tensor, buffers: dict) -> torch.Tensor:
        """Bound of level k's output for inputs |x| ≤ bx, mirroring `_step_level`; fills `buffers`
        with each pool buffer's bound (stride, H_k)."""
        net = self.net
        if k == len(self.pool):
            return self._blocks_bound("center", net.center, bx) + bx
        s, H = self.pool[k], bx.shape[0]
        skips = [bx]
        x = self._blocks_bound(f"down.{k}.blocks", net.down[k].blocks, bx, skips) if self.config.unet else bx
        buffers[f"down.{k}.buffer"] = x.expand(s, H)
        c = self._level_bound(
            k + 1, self._abs_linear(net.down[k].pool.linear, x.repeat_interleave(s)), buffers
        )
        ub = self._abs_linear(net.up[k].pool.linear, c).view(H, s).T  # channel h·s + j → entry (j, h)
        buffers[f"up.{k}.buffer"] = ub
        y = ub.amax(0) + skips.pop()
        blocks = net.up[k].blocks
        if self.config.unet:
            return self._blocks_bound(f"up.{k}.blocks", blocks, y, skips, unet_up=True)
        return self._blocks_bound(f"up.{k}.blocks", blocks, y) + y

    def state_bound(self) -> torch.Tensor:
        """(layout.numel,) float64: the largest |value| each state entry can take when the model runs
        from the zero state on any tokens (sound, not tight). SSM states: the SSM input bound × the ℓ1
        norm of the state's impulse response (each form's `state_bound`). Pool buffers: the residual
        stream's bound, carried from the embeddings (max over tokens of |embed|·embed_scale) through
        every block (`_block_bound`), pool (|W| v + |b|) and skip as the step computes them. Under a
        TransposedLN nothing past its input is bounded: inf (finiteness only). The phase counter:
        period − 1. Computed once on the CPU."""
        if self._state_bound is None:
            bound = torch.full((self.layout.numel,), torch.inf, dtype=F64)
            row = bound[None]
            self.layout.view(row, "phase")[:] = self.period - 1
            for name, _, block in self.net.named_s4_blocks():
                self.layout.view(row, f"{name}.x")[0] = self.forms[name].state_bound(
                    self.ssm_input_bound(block)
                )
            emb = self.net.embed.weight.detach().cpu().double().abs().amax(0) * abs(self.config.embed_scale)
            buffers: dict[str, torch.Tensor] = {}
            self._level_bound(0, emb, buffers)
            for name, b in buffers.items():
                self.layout.view(row, name)[0] = b
            self._state_bound = bound
        return self._state_bound

    def check_state(self, state: torch.Tensor) -> None:
        """Raise StateRangeError unless state (B, layout.numel) float32 is one the model can produce:
        every value finite; each phase counter an integer in [0, prod(pool)); DownPool buffer entries at
        or after their level's phase exactly 0 (they are filled one per level step and cleared when the
        block is pooled); every value within `state_bound()` × STATE_BOUND_SLACK (inf: finiteness
        only). Checks each row on its own; the message names the first offending part and row."""
        recurrent.check_state_kind(state)
        if state.dim() != 2 or state.shape[1] != self.layout.numel:
            raise StateRangeError(
                f"state has shape {tuple(state.shape)}, expected (B, layout.numel) = (B, {self.layout.numel})"
            )
        x = state.detach().cpu().float()
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            r, i = bad.nonzero()[0].tolist()
            raise StateRangeError(
                f"state holds {int(bad.sum())} NaN or infinite values (first in {self._part(i)}, row {r})"
            )
        tau = self.layout.view(x, "phase")[:, 0]
        ok = (tau == tau.round()) & (tau >= 0) & (tau < self.period)
        if not bool(ok.all()):
            r = int((~ok).nonzero()[0, 0])
            raise StateRangeError(
                f"state phase counter {float(tau[r]):.6g} in row {r} is not an integer in [0, {self.period})"
            )
        tau = tau.long()
        for k, s in enumerate(self.pool):
            buf = self.layout.view(x, f"down.{k}.buffer")  # (B, s, H)
            r_k = self._level_phase(tau, k)
            late = torch.arange(s)[None, :] >= r_k[:, None]  # (B, s): entries not filled yet
            stray = late[..., None] & (buf != 0)
            if bool(stray.any()):
                r, j, h = stray.nonzero()[0].tolist()
                raise StateRangeError(
                    f"state down.{k}.buffer entry {j} (channel {h}) in row {r} is {float(buf[r, j, h]):.6g}, "
                    f"but at phase {int(tau[r])} level {k} has filled only entries < {int(r_k[r])} (0 after)"
                )
        limit = (self.state_bound() * STATE_BOUND_SLACK).float()
        over = x.abs() > limit
        if bool(over.any()):
            r, i = over.nonzero()[0].tolist()
            raise StateRangeError(
                f"state value {float32_str(x[r, i])} in {self._part(i)}, row {r}, exceeds "
                f"{float32_str(limit[i])}, the largest this model can reach"
            )

    def _part(self, i: int) -> str:
        """The layout part (and index within it) of flat entry i."""
        for name, slot in self.layout.slots.items():
            if slot.offset <= i < slot.offset + slot.numel:
                idx = list(torch.unravel_index(torch.tensor(i - slot.offset), slot.shape))
                return f"{name}{[int(j) for j in idx]}"
        return f"entry {i}"

    @property
    def state_bytes_per_sequence(self) -> int:
        """Bytes of one sequence's state ((numel,) float32), whatever its context length."""
        return self.layout.numel * 4

    def init_state(self, batch_size: int) -> torch.Tensor:
        """Zeros (batch_size, layout.numel) float32: phase 0, empty buffers, zero SSM states."""
        recurrent.check_batch_size(batch_size)
        return torch.zeros(batch_size, self.layout.numel, device=self.device)

    @property
    def align_period(self) -> int:
        """Rows whose phases (`phases`) are equal step cheapest together, and a row's phase advances by 1
        mod this period each step: the period prod(pool), which a server batching rows (server/engine.py)
        uses to keep a decode batch's rows at one phase. Stepped sparsely (the C step, the eager torch
        step), a batch at one phase runs each coarser level on one step of its period for all rows at
        once; at mixed phases on nearly every step for a few rows, each time streaming that level's
        weights again: the shipped audio-digits at 16 rows makes 2.2× the samples/s at one phase with
        `step`, 2.4× with the native decode block, on one thread of the 2-core VM (`bench.sashimi
        --phases`). 1 (no preference) with CUDA graphs, whose dense step costs the same at any phases."""
        return self.period if self._graphs is None else 1

    def _state16_problem(self) -> str | None:
        """float16 holds the phase counter exactly only below 2,049 (11-bit significand)."""
        if self.period - 1 > 2048:
            return (
                f"its phase counter runs to prod(pool) − 1 = {self.period - 1}, past 2,048, float16's "
                "last exact integer step"
            )
        return None

    def row_phases(self, state: torch.Tensor, rows: torch.Tensor) -> list[int]:
        """The phase counters of `rows` (R,) int64 of state (N, numel), reading only the phase column (a
        server's rows, which the step wrote: not checked; `phases` checks)."""
        return self.layout.view(state, "phase")[rows, 0].long().tolist()

    def phases(self, state: torch.Tensor) -> torch.Tensor:
        """The phase counters (B,) long; raises ValueError unless each is an integer in [0, prod(pool))."""
        tau = self.layout.view(state, "phase")[:, 0]
        if not bool(self._phases_ok(tau)):
            raise ValueError(
                f"state: phase counter must be an integer in [0, {self.period}), got {tau.tolist()}"
            )
        return tau.long()

    def _phases_ok(self, tau: torch.Tensor) -> torch.Tensor:
        """Whether every phase counter of tau (B,) float32 is an integer in [0, prod(pool)): a 0-dim bool
        tensor on tau's device (no wait for it; NaN and inf fail)."""
        return ((tau == tau.round()) & (tau >= 0) & (tau < self.period)).all()

    def _check(self, tokens: torch.Tensor, state: torch.Tensor, ndim: int) -> torch.Tensor:
        """`check_step_inputs` for this model's state shape: the tokens as ids (int64 or int32)."""
        tokens = check_token_dtype(tokens)
        want = (tokens.shape[0] if tokens.dim() else 0, self.layout.numel)
        check_step_inputs(tokens, ndim, state, want, self._device_type)
        return tokens

    def _level_phase(self, tau, k: int):
        """Inputs already in DownPool k's buffer (level k's phase) at global phase tau."""
        return (tau // math.prod(self.pool[:k])) % self.pool[k]

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._net_ops.embed(tokens) * self.config.embed_scale  # (…, H_0) in compute_dtype

    # -----------------------------------------------------------------------------------------
    # step: one token per row; rows is None (all rows of st) or a LongTensor of rows of st

    def _step_blocks(self, prefix, blocks, x, rows, st, skips=None, unet_up=False, mask=None):
        """Blocks `prefix`.i in order on x (b, H) (compute_dtype). `skips`: each block's output is pushed
        on it (U-Net down side), or with `unet_up` the last skip is popped and added to each block's
        output. Each SSM steps in float32 (its input widened, its output rounded back to x's dtype).
        `mask` (b,) bool (with rows None, the dense step): only those rows' SSM states are updated."""
        for i, blk in enumerate(blocks):
            name = f"{prefix}.{i}"
            if isinstance(blk, S4Block):
                u = blk.norm(x)
                u32 = u.float().contiguous()
                xs = self.layout.view(st, f"{name}.x")
                x0 = xs if rows is None else xs[rows]
                form = self.forms[name]
                if self._fused is not None:
                    x0 = x0.contiguous()
                    y, x1 = torch.empty_like(u32), torch.empty_like(x0)
                    form.step_fused(self._fused, u32, x0, x1, y)
                elif self._triton and rows is None and form.form == "diagonal":
                    # the state's view stepped in place (with a mask only its rows: the others untouched)
                    y, x1 = torch.empty_like(u32), None
                    triton_kernel.diag_step(form, u32, xs, xs, y, mask)
                else:
                    y, x1 = form.step(u32, x0)
                y = y.to(x.dtype)
                if x1 is None:
                    pass
                elif mask is not None:
                    xs.copy_(torch.where(mask[:, None, None, None], x1, xs))
                elif rows is None:
                    xs.copy_(x1)
                else:
                    xs[rows] = x1
                x = x + blk.layer.mix(y, u)
            else:
                x = blk(x)
            if unet_up:
                x = x + skips.pop()
            elif skips is not None:
                skips.append(x)
        return x

    def _step_level(self, k: int, x: torch.Tensor, rows, tau: torch.Tensor, st: torch.Tensor, mask=None,
                    dense: bool = False):  # fmt: skip
        """Level k's input x (b, H_k) for rows at global phases tau (b,) → level k's output (b, H_k).

        Sparse (rows None: every row of st, or a LongTensor of them): each coarser level steps only the
        rows that reach it this step (one host sync a level: which). `dense` (rows None): every row computes
        every level, and only the rows that step there (`mask` (b,) bool, None at level 0: all) have their
        states and pool buffers updated; the others' results are discarded (`torch.where`): no host sync
        and fixed shapes, the step the CUDA graphs capture. A stepping row's ops are the sparse step's."""
        net = self._net_ops
        if k == len(self.pool):
            return self._step_blocks("center", net.center, x, rows, st, mask=mask) + x
        skips = [x]
        if self.config.unet:
            x = self._step_blocks(f"down.{k}.blocks", net.down[k].blocks, x, rows, st, skips, mask=mask)
        s = self.pool[k]
        r = self._level_phase(tau, k)
        dbuf, ubuf = self.layout.view(st, f"down.{k}.buffer"), self.layout.view(st, f"up.{k}.buffer")
        if dense:
            at = torch.arange(s, device=st.device) == r[:, None]  # (b, s): the buffer entry of this phase
            emit = r == s - 1
            if mask is not None:
                at, emit = at & mask[:, None], emit & mask
            y = ubuf.gather(1, r[:, None, None].expand(-1, 1, ubuf.shape[2]))[:, 0].to(x.dtype)
            dbuf.copy_(torch.where(at[:, :, None], x[:, None].to(dbuf.dtype), dbuf))
            coarse = net.down[k].pool(dbuf.to(x.dtype))[:, 0]  # (b, H_{k+1})
            c = self._step_level(k + 1, coarse, None, tau, st, emit, dense=True)
            fine = net.up[k].pool.blocks(c).to(ubuf.dtype)
            ubuf.copy_(torch.where(emit[:, None, None], fine, ubuf))
            dbuf.masked_fill_(emit[:, None, None], 0)
        else:
            idx = torch.arange(st.shape[0], device=st.device) if rows is None else rows
            dbuf[idx, r] = x.to(dbuf.dtype)  # (a 16-bit activation widens exactly into the float32 state)
            y = ubuf[idx, r].to(x.dtype)  # this step's UpPool output, read before a refill
            emit = r == s - 1
            if bool(emit.any()):
                sub = None if bool(emit.all()) else emit.nonzero()[:, 0]
                erows = rows if sub is None else idx[sub]
                eidx = idx if sub is None else erows
                coarse = net.down[k].pool(dbuf[eidx].to(x.dtype))[:, 0]  # (b', H_{k+1})
                c = self._step_level(k + 1, coarse, erows, tau if sub is None else tau[sub], st)
                ubuf[eidx] = net.up[k].pool.blocks(c).to(ubuf.dtype)  # the next `s` outputs
                dbuf[eidx] = 0
        y = y + skips.pop()
        blocks = net.up[k].blocks
        if self.config.unet:
            return self._step_blocks(f"up.{k}.blocks", blocks, y, rows, st, skips, unet_up=True, mask=mask)
        return self._step_blocks(f"up.{k}.blocks", blocks, y, rows, st, mask=mask) + y

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, state: torch.Tensor, out: torch.Tensor | None = None):
        """tokens (B,) integer ids in 0 … V − 1, state (B, numel) float32 → logits (B, V) float32 and the
        next state: a new tensor, or written into `out` (which may be `state` itself; the state's shape,
        dtype and device). With `use_cuda_graphs`, a batch within the largest bucket replays its bucket's
        graph (of the dense step). Raises ValueError on a wrong shape, dtype or device, an id outside the
        vocabulary, or a phase counter that is not an integer in [0, prod(pool))."""
        tokens = self._check(tokens, state, 1)
        if out is not None and (out.shape != state.shape or out.dtype != state.dtype):
            raise ValueError(f"out has shape {tuple(out.shape)} {out.dtype}, expected {tuple(state.shape)} "
                             f"{state.dtype}")  # fmt: skip
        if out is not None and out.device != state.device:  # (the C step would write through its pointer)
            raise ValueError(f"out is on {out.device}, expected the state's device ({state.device})")
        if self._graphs is not None:  # the ids and phases checked with one wait for the device
            V, tau = self.config.vocab_size, self.layout.view(state, "phase")[:, 0]
            if not bool(self._phases_ok(tau) & (tokens >= 0).all() & (tokens < V).all()):
                self.phases(state)  # (raise, naming what is wrong)
                check_token_ids(tokens, V)
            return self._graphs(tokens, state, out)
        self.phases(state)
        return self._step_eager(tokens, state, out)

    def _step_eager(self, tokens: torch.Tensor, state: torch.Tensor, out: torch.Tensor | None = None,
                    ids_checked: bool = False):  # fmt: skip
        """`step` without its checks (the phases' too): the whole-network C step where it was built, else
        the torch ops. With `ids_checked` (the CUDA graphs' capture and replay: `step` checked the ids and
        phases) the dense step (`_step_level`: no host sync, fixed shapes), in place when `out` is
        `state`; else the sparse step (each level steps only its rows: fewer FLOPs, a host sync a level),
        which checks the ids. A float16 state (`use_state_dtype`) is stepped from its exact widening, the
        next state rounded to float16 (the phase counter too, exactly: an integer below prod(pool), which
        `use_state_dtype` keeps ≤ 2,048)."""
        if state.dtype != torch.float32:  # (the C step only ever sees float32)
            return self._half_step(tokens, state, out, ids_checked)
        if self._net_step is not None:
            new = state.contiguous().clone() if out is None or not out.is_contiguous() else out.copy_(state)
            logits = self._net_step(tokens, new)  # (the C step checks the ids)
            return logits, new if out is None or new is out else out.copy_(new)
        if not ids_checked:
            check_token_ids(tokens, self.config.vocab_size)
        if ids_checked and out is not None and out.is_contiguous():
            new = out if out is state else out.copy_(state)
        else:
            new = state.contiguous().clone()
        phase = self.layout.view(new, "phase")[:, 0]
        tau = phase.long()
        y = self._step_level(0, self._embed(tokens), None, tau, new, dense=ids_checked)
        phase.copy_((tau + 1) % self.period)
        logits = self._net_ops.head(self._net_ops.norm(y)).float()
        return logits, new if out is None or new is out else out.copy_(new)

    def decode_block_ready(self, batch: int) -> bool:
        """Whether `decode_block` serves a batch of this many rows: with CUDA graphs (`use_cuda_graphs`), a
        batch within the largest bucket; else the whole-network C step (CPU, float32, bfloat16 or float16
        weights, LayerNorm or scalar TransposedLN blocks, unet or not), any number of rows, for float32
        states only (`state_dtype`)."""
        if self._graphs is not None:
            return 1 <= batch <= self._graphs.buckets[-1]
        return self._net_step is not None and self.state_dtype == torch.float32

    @torch.inference_mode()
    def decode_block(self, K: int, state: torch.Tensor, tokens: torch.Tensor, **rows) -> fused.BlockResult:
        """Up to K steps with sampling and stop checks, the state (B, numel) and the pending tokens (B,)
        updated in place: see fused.decode_block for the per-row arguments and the result. On CPU one C call
        (ssm_step.c `sashimi_block`); with CUDA graphs the bucket's decode-block graphs of the dense step
        (`model.cuda_graphs.BucketedStep.decode_block`: stop sequences checked after the block, a row that met
        one stepped again to it). Each row's tokens, state and seen set are exactly those of stepping it with
        `step` and `model.sampling.sample` (its settings, its CounterRNG): alone, on CPU; in its batch (the
        one-step path through the same bucket), with the graphs. Raises ValueError when `decode_block_ready`
        is false, on a bad phase, or on bad arguments (tokens not int64 among them: `check_block_tokens`)."""
        check_block_tokens(tokens)
        B = tokens.shape[0]
        if not self.decode_block_ready(B):
            if self._graphs is not None:
                most = self._graphs.buckets[-1]
                raise ValueError(f"the graphs' decode block holds 1 … {most} rows, got {B}")
            raise ValueError(
                "the native decode block needs the SaShiMi C step (CPU, 32- or 16-bit weights, a C compiler)"
            )
        tokens = self._check(tokens, state, 1)
        self.phases(state)
        if self._graphs is not None:
            return self._graphs.decode_block(K, state, tokens, **rows)
        check_native_block_state(state)
        return self._net_step.block(K, state, tokens, **rows)

    # -----------------------------------------------------------------------------------------
    # prefill: every row of st at the same phase tau

    def _prefill_blocks(self, prefix, blocks, x, st, skips=None, unet_up=False):
        """Blocks `prefix`.i in order on x (b, T, H); `skips` and `unet_up` as `_step_blocks`."""
        for i, blk in enumerate(blocks):
            name = f"{prefix}.{i}"
            if isinstance(blk, S4Block):
                u = blk.norm(x)
                xs = self.layout.view(st, f"{name}.x")  # (b, H, 2, M)
                y, xL = self._ssm_prefill(name, u, xs)
                xs.copy_(torch.stack([xL.real, xL.imag], dim=2))
                x = x + self._prefill_mix(blk.layer, y, u)
            elif self._rowwise:  # FFBlock: x + FF(norm(x)), its GELU row by row
                ff = blk.ff
                x = x + ff.down(each_row(F.gelu, ff.up(blk.norm(x))))
            else:
                x = blk(x)
            if unet_up:
                x = x + skips.pop()
            elif skips is not None:
                skips.append(x)
        return x

    def _prefill_mix(self, layer, y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """`S4Layer.mix` (eval: no dropout); with the C linears (`_rowwise`) its GELU and GLU row by row."""
        if not self._rowwise:
            return layer.mix(y, u)
        z = layer.out(each_row(F.gelu, y + layer.D * u))
        return each_row(lambda t: F.glu(t, dim=-1), z)

    def _ssm_prefill(self, name: str, u: torch.Tensor, xs: torch.Tensor):
        """S4 layer `name`'s prefill of u (b, T, H) from the states xs (b, H, 2, M) → y, x_L. With per-row
        products (`_rowwise`) the rows go through one call only where that computes each row alone (the C
        pass of a diagonal form); the torch form's products and a DPLR form's advance of x0 take the rows
        together, so there it is one call a row."""
        form = self.forms[name]
        x0 = torch.complex(xs[:, :, 0], xs[:, :, 1])
        if self._rowwise and len(u) > 1 and not (form._prefill_c is not None and form.form == "diagonal"):
            parts = [form.prefill(u[i : i + 1], x0[i : i + 1], not bool(xs[i].any())) for i in range(len(u))]
            return torch.cat([y for y, _ in parts]), torch.cat([x for _, x in parts])
        return form.prefill(u, x0, not bool(xs.any()))

    def _prefill_level(self, k: int, x: torch.Tensor, tau: int, st: torch.Tensor) -> torch.Tensor:
        """Level k's inputs x (b, T_k, H_k) (compute_dtype), all rows at global phase tau → outputs
        (b, T_k, H_k)."""
        net = self._prefill_net
        if k == len(self.pool):
            return self._prefill_blocks("center", net.center, x, st) + x
        skips = [x]
        if self.config.unet:
            x = self._prefill_blocks(f"down.{k}.blocks", net.down[k].blocks, x, st, skips)
        s, T = self.pool[k], x.shape[1]
        r = int(self._level_phase(tau, k))
        dbuf, ubuf = self.layout.view(st, f"down.{k}.buffer"), self.layout.view(st, f"up.{k}.buffer")
        seq = torch.cat(
            [dbuf[:, :r].to(x.dtype), x], dim=1
        )  # the current block's earlier inputs, then the new
        n = seq.shape[1] // s  # complete blocks: coarse steps taken now
        if n:
            c = self._prefill_level(k + 1, net.down[k].pool(seq[:, : n * s]), tau, st)
            new_blocks = net.up[k].pool.blocks(c)  # (b, n, s, H)
            outs = torch.cat([ubuf.to(x.dtype), new_blocks.flatten(1, 2)], dim=1)
            ubuf.copy_(new_blocks[:, -1])
        else:
            outs = ubuf.to(x.dtype, copy=True)
        y = outs[:, r : r + T]  # level-k step r + t of the current block reads entry r + t
        dbuf.zero_()
        dbuf[:, : seq.shape[1] - n * s] = seq[:, n * s :]
        y = y + skips.pop()
        blocks = net.up[k].blocks
        if self.config.unet:
            return self._prefill_blocks(f"up.{k}.blocks", blocks, y, st, skips, unet_up=True)
        return self._prefill_blocks(f"up.{k}.blocks", blocks, y, st) + y

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, state: torch.Tensor, logits: str = "all"):
        """tokens (B, T) long, state (B, numel) float32 → logits and the state after the last token;
        parallel over T at every level, for any T and any starting state; rows of equal phase together.
        On CPU each row's logits and state are bit for bit those of the row prefilled by itself, whatever
        else is in the batch and however many threads run: in float32 with the C library the linears
        are ssm_step.c's tiles (`RowwiseLinear`), GELU and GLU run row by row (`each_row`), and an S4
        prefill that takes rows together (the torch form, a DPLR form's advance of x0) one row a call;
        else (16-bit products, no C library) each row runs alone. (torch's linears round a row by the
        batch's row count: up to 1.3e-5 on a logit of audio-digits.) `logits` as `RecurrentModel.prefill`:
        "all" (B, T, V), "last" (B, min(T, 1), V) or "none" (None). Raises ValueError for bad shapes or
        dtypes, an id outside the vocabulary or an unknown `logits`."""
        tokens = self._check(tokens, state, 2)
        check_logits_kind(logits)
        if state.dtype == torch.float16:  # a state stored at 16 bits
            return self._half_prefill(tokens, state, logits)
        check_token_ids(tokens, self.config.vocab_size)
        B, T = tokens.shape
        new = state.contiguous().clone()
        tau = self.phases(new)
        out = None
        if logits != "none":
            rows_out = T if logits == "all" else min(T, 1)
            out = torch.empty(B, rows_out, self.config.vocab_size, device=self.device)
        if T == 0:
            return out, new
        if self._device_type == "cpu" and not self._rowwise:  # each row alone (16-bit products, no C library)
            groups = [torch.tensor([i]) for i in range(B)]
        else:  # rows of one phase together (on CPU through the C linears, `RowwiseLinear`)
            groups = [(tau == t0).nonzero()[:, 0] for t0 in torch.unique(tau).tolist()]
        for rows in groups:
            t0 = int(tau[rows[0]])
            whole = len(rows) == B
            st = new if whole else new[rows]
            y = self._prefill_level(0, self._embed(tokens[rows]), t0, st)
            self.layout.view(st, "phase")[:, 0] = float((t0 + T) % self.period)
            if out is not None:
                out[rows] = self._prefill_net.head(
                    self._prefill_net.norm(y if logits == "all" else y[:, -1:])
                ).float()
            if not whole:
                new[rows] = st
        return out, new
