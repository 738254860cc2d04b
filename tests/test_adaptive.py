"""Adaptive input embeddings and softmax (model/adaptive.py; ModelConfig cutoffs, div_val, tie_projs) and
per-block feed-forward sizes (d_ff as a list): the official WikiText-103 recipe's pieces.

The official code's own outputs for both are in tests/test_official_import.py (fixtures s4_wt103 and
s4d_adaptive). Here: every variant of the options against a float64 reference written word by word
(each word's log-probability from its shard's formula, no vectorized path shared with the module),
the ties (no tensor stored twice, kept through deepcopy, dtype moves and a checkpoint round trip), the
recurrent form against conv mode, the whole-network C step with blocks that have no FF block, config
errors, and a served adaptive model streaming the library's tokens. Tolerances: float64 1e-12; the
float32 recurrent form 1e-5 relative (as every conversion check)."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
from server_support import ServerThread, reference, token_ids, ws_turn
from websockets.sync.client import connect

from model import checkpoint
from model.network import ModelConfig, SequenceModel
from model.sampling import SamplingParams
from server.config import Settings

F64 = torch.float64
VARIANTS = {  # name: the adaptive options
    "div2-tied": {"cutoffs": [10, 20, 40], "div_val": 2, "tie_embeddings": True,
                  "tie_projs": [False, True, True, True]},
    "div2-untied": {"cutoffs": [10, 30], "div_val": 2, "tie_embeddings": False,
                    "tie_projs": [False, False, True]},
    "div2-own-projs": {"cutoffs": [5], "div_val": 4, "tie_embeddings": True},
    "div1-tied": {"cutoffs": [10, 20], "div_val": 1, "tie_embeddings": True},
    "div1-untied": {"cutoffs": [33], "div_val": 1, "tie_embeddings": False},
}  # fmt: skip


def config(V=64, H=16, **kw) -> ModelConfig:
    base = {"vocab_size": V, "d_model": H, "n_layers": 2, "d_state": 8, "l_max": 32, "head_bias": True,
            "cauchy_backend": "torch", "d_ff": 32}  # fmt: skip
    return ModelConfig(**{**base, **kw})


def drawn(cfg: ModelConfig, seed: int = 0) -> SequenceModel:
    """A model whose every parameter is drawn (the head's zero-initialized entries too)."""
    torch.manual_seed(seed)
    net = SequenceModel(cfg)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("head.", "embed.")):
                p.copy_(0.5 * torch.randn(p.shape))
    return net.eval()


def logprobs_word_by_word(net: SequenceModel, h: torch.Tensor) -> torch.Tensor:
    """(V,) float64 log p of every word for one hidden state h (H,), from the adaptive softmax's formula
    (Grave et al. 2017; the official layout): head logits over shard 0's words and one entry per tail
    cluster (cluster i at the head's column −i), each tail word log p_head(cluster) + its shard's
    log-softmax."""
    cfg, head = net.config, net.head
    ends = [0, *cfg.cutoffs, cfg.vocab_size]
    n_clusters = len(cfg.cutoffs)

    def shard(i):  # (weight rows, bias, projection or None), read from the parameters by name
        sd = dict(net.named_parameters())
        if cfg.tie_embeddings:
            W = (
                sd[f"embed.layers.{i}.weight"]
                if cfg.div_val > 1
                else sd["embed.layers.0.weight"][ends[i] : ends[i + 1]]
            )
        else:
            W = sd[f"head.weights.{i}"]
        P = None
        if cfg.div_val > 1:
            tied = cfg.tie_projs is not None and cfg.tie_projs[i]
            P = sd[f"embed.projs.{i}"] if tied else sd[f"head.projs.{i}"]
        return W.double(), sd[f"head.biases.{i}"].double(), None if P is None else P.double()

    def score(W, b, P, row):
        x = h if P is None else h @ P
        return float(x @ W[row] + b[row])

    W0, b0, P0 = shard(0)
    cw, cb = head.cluster_weight.double(), head.cluster_bias.double()
    x0 = h if P0 is None else h @ P0
    head_scores = [score(W0, b0, P0, j) for j in range(ends[1])] + [
        float(x0 @ cw[k] + cb[k]) for k in range(n_clusters)
    ]
    log_z = math.log(sum(math.exp(s) for s in head_scores))
    out = [s - log_z for s in head_scores[: ends[1]]]
    for i in range(1, n_clusters + 1):
        cluster = head_scores[ends[1] + n_clusters - i] - log_z
        W, b, P = shard(i)
        tail = [score(W, b, P, j) for j in range(ends[i + 1] - ends[i])]
        log_zt = math.log(sum(math.exp(s) for s in tail))
        out += [cluster + s - log_zt for s in tail]
    return torch.tensor(out, dtype=F64)


def embedding_token_by_token(net: SequenceModel, tokens: list[int]) -> torch.Tensor:
    cfg = net.config
    ends = [0, *cfg.cutoffs, cfg.vocab_size] if cfg.div_val > 1 else [0, cfg.vocab_size]
    rows = []
    for t in tokens:
        i = max(k for k in range(len(ends) - 1) if ends[k] <= t)
        e = net.embed.layers[i].weight[t - ends[i]].double()
        rows.append(e if cfg.div_val == 1 else net.embed.projs[i].double() @ e)
    return torch.stack(rows)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_adaptive_softmax_equals_its_formula_word_by_word_in_float64(name):
    net = drawn(config(**VARIANTS[name])).double()
    h = torch.randn(3, 16, dtype=F64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = net.head(h)
        assert got.shape == (3, 64)
        for r in range(3):
            want = logprobs_word_by_word(net, h[r])
            assert (got[r] - want).abs().max() <= 1e-12, name
        assert (got.logsumexp(-1)).abs().max() <= 1e-12  # a distribution over the whole vocabulary


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_adaptive_embedding_equals_its_shard_lookup_token_by_token(name):
    net = drawn(config(**VARIANTS[name])).double()
    tokens = [0, 9, 10, 19, 20, 39, 40, 63, 5, 33, 32]
    with torch.no_grad():
        got = net.embed(torch.tensor([tokens]))[0]
        assert (got - embedding_token_by_token(net, tokens)).abs().max() <= 1e-12


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_c_steps_adaptive_softmax_and_embedding_equal_the_formulas_in_float64(name):
    """ssm_step.c's adaptive softmax and input embedding (struct Adaptive, as the whole-network step computes
    them) against the float64 formulas above, word by word and token by token: within 1e-6 of the
    log-probabilities' scale and 5e-7 of the embeddings' (float32 rounding over sums of 8-16 products and a
    log-sum-exp: 1.6e-7 and 8.9e-8 measured); each row's values are the same bits alone and among 7 others.
    Ids outside are refused."""
    net = drawn(config(**VARIANTS[name], embed_scale=1.5))
    step = net.to_recurrent()._net_step
    net64 = copy.deepcopy(net).double()
    h = torch.randn(7, 16, generator=torch.Generator().manual_seed(2))
    got = step.adaptive_logprobs(h)
    assert got.shape == (7, 64)
    for r in range(7):
        with torch.no_grad():
            want = logprobs_word_by_word(net64, h[r].double())
        assert float((got[r].double() - want).abs().max()) <= 1e-6 * float(want.abs().max()), (name, r)
        assert torch.equal(step.adaptive_logprobs(h[r : r + 1])[0], got[r])
    tokens = [0, 9, 10, 19, 20, 39, 40, 63, 5, 33, 32]
    emb = step.adaptive_embeddings(torch.tensor(tokens))
    with torch.no_grad():
        want = 1.5 * embedding_token_by_token(net64, tokens)
    assert float((emb.double() - want).abs().max()) <= 5e-7 * float(want.abs().max()), name
    assert torch.equal(step.adaptive_embeddings(torch.tensor(tokens[3:4]))[0], emb[3])
    for bad in (64, -1):
        with pytest.raises(ValueError, match="outside"):
            step.adaptive_embeddings(torch.tensor([1, bad]))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_tied_tensors_are_stored_once_and_the_tie_survives_copies_and_checkpoints(name, tmp_path):
    cfg = config(**VARIANTS[name])
    net = drawn(cfg)
    sd = net.state_dict()
    ptrs = [v.data_ptr() for v in sd.values()]
    assert len(ptrs) == len(set(ptrs)), "a tensor is in the state dict twice"
    assert net.num_params() == sum(v.numel() for v in sd.values())
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = net(tokens)
        checkpoint.save(net, tmp_path / "ck")
        assert torch.equal(checkpoint.load(tmp_path / "ck").eval()(tokens), want)
        twin = copy.deepcopy(net).double()
        twin.embed.layers[0].weight.mul_(2)  # the copy's head follows its own embedding, not the original's
        if cfg.tie_embeddings:
            assert not torch.allclose(twin(tokens).float(), want, atol=1e-3)
        assert torch.equal(net(tokens), want)


@pytest.mark.parametrize("name", ["div2-tied", "div1-untied"])
def test_the_recurrent_form_of_an_adaptive_model_equals_conv_mode(name):
    """Verified at conversion (its logits against the float64 conv mode), then prefill + step past l_max;
    the C whole-network step computes its adaptive input and softmax; the native decode block is offered."""
    net = drawn(config(**VARIANTS[name]))
    tokens = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = net.double()(tokens)
    net = net.float()
    rec = net.to_recurrent()
    assert rec._net_step is not None and rec._net_step.adaptive is not None and rec.decode_block_ready(2)
    logits, state = rec.prefill(tokens[:, :7], rec.init_state(2))
    out = [logits]
    for t in range(7, 48):
        lt, state = rec.step(tokens[:, t], state)
        out.append(lt[:, None])
    got = torch.cat(out, 1).double()
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


def test_blocks_without_a_feed_forward_block_run_in_the_whole_network_c_step():
    """d_ff per block ([s4, s4, ffn] imports: 0 for every other block): the C step's logits and state
    equal the torch ops' within float32 rounding, and the native decode block runs."""
    cfg = config(vocab_size=256, n_layers=4, d_ff=[0, 32, 0, 48])
    net = drawn(cfg)
    assert [b.ff is None for b in net.blocks] == [True, False, True, False]
    c_step, torch_ops = net.to_recurrent(fused_network=True), net.to_recurrent(fused_network=False)
    assert c_step._net_step is not None and torch_ops._net_step is None
    tokens = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(4))
    sa, sb = c_step.init_state(3), torch_ops.init_state(3)
    for t in range(20):
        la, sa = c_step.step(tokens[:, t], sa)
        lb, sb = torch_ops.step(tokens[:, t], sb)
        assert float((la - lb).abs().max()) <= 1e-5 * float(lb.abs().max())
    assert float((sa - sb).abs().max()) <= 1e-5 * float(sb.abs().max())
    assert c_step.decode_block_ready(3)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"cutoffs": [20, 10]},
            r"cutoffs must be null or strictly increasing integers in \(0, vocab_size 64\)",
        ),
        ({"cutoffs": [10, 64]}, r"cutoffs must be null or strictly increasing"),
        ({"cutoffs": [0, 10]}, r"cutoffs must be null or strictly increasing"),
        ({"cutoffs": [10.0]}, r"cutoffs must be null or strictly increasing"),
        ({"cutoffs": []}, r"cutoffs must be null or strictly increasing"),
        ({"div_val": 2}, r"div_val and tie_projs need cutoffs"),
        ({"cutoffs": [10], "div_val": 0}, r"div_val must be an integer ≥ 1"),
        ({"cutoffs": [10, 20, 30], "div_val": 4}, r"d_model 16 must be divisible by div_val\^3 = 64"),
        ({"cutoffs": [10], "tie_projs": [False, True]}, r"tie_projs needs div_val > 1"),
        ({"cutoffs": [10], "div_val": 2, "tie_projs": [True]}, r"tie_projs must be null or 2 booleans"),
        ({"cutoffs": [10], "head_bias": False}, r"head_bias must be true with cutoffs"),
        (
            {"d_ff": [0, 32, 0]},
            r"d_ff must be an integer ≥ 0 \(at most 131,072\) or a list of 2 \(n_layers\)",
        ),
        ({"d_ff": [0, -1]}, r"d_ff must be an integer ≥ 0 \(at most 131,072\) or a list"),
    ],
)
def test_bad_adaptive_and_d_ff_options_are_refused_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        config(**fields)


def test_cutoffs_are_an_isotropic_option():
    with pytest.raises(
        ValueError, match=r"cutoffs \(an adaptive softmax\) are an option of arch 'isotropic'"
    ):
        ModelConfig(vocab_size=64, d_model=16, n_layers=1, d_state=8, l_max=32, head_bias=True,
                    arch="sashimi", ff=2, pool=[2], cutoffs=[10], d_ff=0)  # fmt: skip


def test_a_served_adaptive_model_streams_the_library_s_tokens(tmp_path):
    """A word-level stand-in (vocab 300, 3 shards) served by the server: the WebSocket's tokens equal the
    library's recurrent sampling of the checkpoint with the same seed (the sampler takes the head's
    log-probabilities as logits)."""
    net = drawn(config(V=300, **{**VARIANTS["div2-tied"], "cutoffs": [100, 200, 260]}))
    folder = checkpoint.save(net, tmp_path / "words")
    srv = ServerThread(
        Settings(checkpoints=[f"words={folder}"], device="cpu", max_sessions=4, torch_threads=1)
    )
    srv.start()
    try:
        with connect(srv.ws_url) as ws:
            msg = {"type": "generate", "model": "words", "prompt": "hello", "max_new_tokens": 16, "seed": 3}
            frames = ws_turn(ws, msg)
    finally:
        srv.stop()
    ids, done = token_ids(frames), frames[-1]
    assert done["type"] == "done", done
    assert ids == reference(folder, list(b"hello"), SamplingParams(seed=3), 16)
    assert max(ids) >= 100, ids  # words of the tail shards were sampled too


def _stepped(rec, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every position's logits (B, L, V) and the final state of stepping `tokens` (B, L) one at a time."""
    state, out = rec.init_state(tokens.shape[0]), []
    for t in range(tokens.shape[1]):
        logits, state = rec.step(tokens[:, t], state)
        out.append(logits)
    return torch.stack(out, 1), state


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("split", [False, True])
def test_the_adaptive_input_and_softmax_run_in_the_c_step_each_row_alone(name, split):
    """The official WikiText-103 recipe's adaptive input and softmax are computed in the whole-network C step
    (ssm_step.c struct Adaptive), every variant of the options (shards, div_val, tied tables and projections):
    - against the torch ops around the fused SSM steps (fused_network=False), whose module is checked against
      the formula word by word in float64 above, the log-probabilities and the state agree within float32
      rounding (1e-5 of their scale) over 12 steps at 1, 3 and 9 rows (9: rows split between the threads);
    - each row's log-probabilities and state are bit for bit those of the row stepped alone, with the few-rows
      step split over the threads by channels and columns or not (the softmax's normalizers by whole shards),
      and the split gives the single thread's bits;
    - a short prompt's prefill (logits "all", "last", none) is bit for bit its steps;
    - the native decode block is offered (tests/test_native_decode.py runs its every test on such a model);
      ids outside the vocabulary are refused as the torch ops refuse them."""
    from model import fused  # noqa: PLC0415

    lib = fused.library()
    net = drawn(config(**VARIANTS[name], n_layers=3, d_ff=[32, 0, 48]))
    c_step, torch_ops = net.to_recurrent(), net.to_recurrent(fused_network=False)
    assert c_step._net_step.adaptive is not None and torch_ops._net_step is None
    assert c_step.verification["step_rel_err"] <= 1e-5, c_step.verification
    from server.registry import step_path  # noqa: PLC0415 (the server's log line says which)

    assert step_path(c_step) == "in C, the whole network and its adaptive softmax (native decode blocks)"
    assert step_path(torch_ops) == "by torch ops around the C SSM steps"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    old = fused.step_split_min_weights(lib, 0 if split else 1 << 40)
    old_stall = fused.step_split_state(lib, stall_s=1e6)[2]  # no stalls: a loaded machine keeps splitting
    left = fused.step_split_state(lib)[1]  # (a pause from an earlier test waited out)
    time.sleep(max(left, 0.0) + 0.01)
    try:
        assert c_step._net_step.splits(1) == split or torch.get_num_threads() < 2
        gen = torch.Generator().manual_seed(5)
        for B in (1, 3, 9):
            tokens = torch.randint(0, 64, (B, 12), generator=gen)
            got, state = _stepped(c_step, tokens)
            want, want_state = _stepped(torch_ops, tokens)
            assert got.shape == want.shape == (B, 12, 64)
            assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max()), B
            assert float((state - want_state).abs().max()) <= 1e-5 * float(want_state.abs().max()), B
            assert torch.allclose(got.exp().sum(-1), torch.ones(B, 12), atol=1e-5)
            for r in {0, B - 1}:  # a row alone: the same bits
                alone, alone_state = _stepped(c_step, tokens[r : r + 1])
                assert torch.equal(alone[0], got[r]), (B, r)
                assert torch.equal(alone_state, state[:, r : r + 1]), (B, r)
            fused.step_split_min_weights(lib, 1 << 40 if split else 0)  # the other way: the same bits
            other, other_state = _stepped(c_step, tokens)
            fused.step_split_min_weights(lib, 0 if split else 1 << 40)
            assert torch.equal(other, got) and torch.equal(other_state, state), B
            assert c_step.decode_block_ready(B)
            for kind in ("all", "last", "none"):  # a short prompt's C prefill: bit for bit its steps
                logits, st = c_step.prefill(tokens, c_step.init_state(B), logits=kind)
                assert torch.equal(st, state), (B, kind)
                expect = {"all": got, "last": got[:, -1:], "none": None}[kind]
                assert (logits is None) if expect is None else torch.equal(logits, expect), (B, kind)
    finally:
        fused.step_split_min_weights(lib, old)
        fused.step_split_state(lib, stall_s=old_stall)
        torch.set_num_threads(threads)
    for bad in (64, -1):
        with pytest.raises(ValueError, match="outside"):
            c_step.step(torch.tensor([bad]), c_step.init_state(1))
        with pytest.raises(ValueError, match="outside"):
            c_step.prefill(torch.tensor([[1, bad]]), c_step.init_state(1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_c_step_of_an_adaptive_model_serves_16_bit_weights_verified(dtype):
    """A 16-bit adaptive model steps in C too, its adaptive input and softmax included (its linear weights
    and the softmax's packed weights read in their dtype, the tables as float32 copies, the arithmetic
    float32), verified at load within the dtype's tolerance (4u); against the torch ops, which round every
    activation to 16 bits, within that tolerance."""
    from model.recurrent import LOGITS_TOL  # noqa: PLC0415

    net = drawn(config(**VARIANTS["div2-tied"], n_layers=3, d_ff=[32, 0, 48]))
    c_step, torch_ops = net.to_recurrent(dtype=dtype), net.to_recurrent(dtype=dtype, fused_network=False)
    assert c_step._net_step.adaptive is not None and torch_ops._net_step is None
    tol = LOGITS_TOL[dtype]
    assert c_step.verification["dtype"] == str(dtype).removeprefix("torch.")
    assert c_step.verification["step_rel_err"] <= tol and c_step.verification["prefill_rel_err"] <= tol
    tokens = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(6))
    sa, sb = c_step.init_state(3), torch_ops.init_state(3)
    for t in range(8):
        la, sa = c_step.step(tokens[:, t], sa)
        lb, sb = torch_ops.step(tokens[:, t], sb)
        assert float((la - lb).norm() / lb.norm()) <= tol, t
