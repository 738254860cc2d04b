"""Model features for imported official state-spaces/s4 checkpoints (issue #13): head bias,
embedding scale, per-layer kernel lengths, untied Δ, unclamped Re Λ, FF blocks, post-norm, and conv
mode at any length. Each holds in conv mode and in every recurrent path (torch step, fused per-layer
step, whole-network C step, prefill)."""

import pytest
import torch
from numerics import step_all

from model import ModelConfig, SequenceModel, fused
from model.kernel import SSMKernel

TINY = dict(vocab_size=32, d_model=16, n_layers=2, d_state=16, l_max=128, cauchy_backend="torch")


def all_paths(net, tokens):
    """Logits of `tokens` (B, L) from conv mode and each recurrent path, by name."""
    with torch.no_grad():
        out = {"conv": net(tokens)}
    whole = net.to_recurrent()
    per_layer = net.to_recurrent(fused_network=False)
    plain = net.to_recurrent(fused_step=False)
    assert per_layer._net_step is None and plain._fused is None
    if whole._net_step is not None:
        out["c_network_step"] = step_all(whole, tokens, whole.init_state(tokens.shape[0]))[0]
    out["fused_layer_step"] = step_all(per_layer, tokens, per_layer.init_state(tokens.shape[0]))[0]
    out["torch_step"] = step_all(plain, tokens, plain.init_state(tokens.shape[0]))[0]
    plain.prefill_by_steps_max_tokens = 0  # the parallel form
    out["prefill"] = plain.prefill(tokens, plain.init_state(tokens.shape[0]))[0]
    return out, whole


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("kernel,init", [("s4", "legs"), ("s4d", "diag-lin")])
def test_head_bias_shifts_the_logits_by_exactly_the_bias_in_every_path(kernel, init):
    torch.manual_seed(0)
    net = SequenceModel(ModelConfig(kernel=kernel, init=init, head_bias=True, **TINY)).eval()
    tokens = torch.randint(0, 32, (9, 20))  # 9 rows: the C step splits them between threads
    with torch.no_grad():
        net.head.bias.zero_()
    without, _ = all_paths(net, tokens)
    bias = torch.randn(32) * 3
    with torch.no_grad():
        net.head.bias.copy_(bias)
    with_bias, whole = all_paths(net, tokens)
    assert whole._net_step is not None  # the C step is among the paths checked
    assert set(with_bias) == {"conv", "c_network_step", "fused_layer_step", "torch_step", "prefill"}
    for name in with_bias:
        shift = with_bias[name] - without[name]
        # float32 addition: z + b − z = b up to one rounding of |z + b| ≤ 16
        torch.testing.assert_close(shift, bias.expand_as(shift), rtol=0, atol=4e-6, msg=name)
        assert rel(with_bias[name], with_bias["conv"]) <= 1e-5, name


def test_head_bias_is_saved_and_absent_by_default(tmp_path):
    from model import checkpoint

    with pytest.raises(ValueError, match="head_bias"):
        ModelConfig(head_bias="yes")

    assert SequenceModel(ModelConfig(**TINY)).head.bias is None
    net = SequenceModel(ModelConfig(head_bias=True, tie_embeddings=True, **TINY))
    with torch.no_grad():
        net.head.bias.normal_()
    checkpoint.save(net, tmp_path / "ck")
    back = checkpoint.load(tmp_path / "ck")
    assert back.config.head_bias and torch.equal(back.head.bias, net.head.bias)


@pytest.mark.parametrize("kernel,init", [("s4", "legs"), ("s4d", "diag-lin")])
def test_feed_forward_blocks_in_the_whole_network_c_step_and_every_path(kernel, init):
    """The shipped text model has FF blocks (d_ff 512): the C step computes them (LayerNorm, up,
    exact GELU, down, residual) like the torch modules, to float32 rounding, in every batch split
    (9 rows: the C step divides them between threads) and in the native decode block's rows."""
    torch.manual_seed(4)
    net = SequenceModel(ModelConfig(kernel=kernel, init=init, d_ff=40, **TINY)).eval()
    tokens = torch.randint(0, 32, (9, 24))
    out, whole = all_paths(net, tokens)
    assert whole._net_step is not None  # the C step is among the paths checked
    assert set(out) == {"conv", "c_network_step", "fused_layer_step", "torch_step", "prefill"}
    for name in out:
        assert rel(out[name], out["conv"]) <= 1e-5, name
    # against float64 conv mode, independent of every float32 path
    with torch.no_grad():
        ref = net.double()(tokens)
    assert rel(out["c_network_step"], ref) <= 1e-5
    # a row's logits do not depend on the rows beside it (bit for bit)
    alone = step_all(whole, tokens[4:5], whole.init_state(1))[0]
    assert torch.equal(alone[0], out["c_network_step"][4])


def test_whole_network_step_refuses_what_it_does_not_read():
    # a tensor added to the model that the C step knows nothing about
    net = SequenceModel(ModelConfig(**TINY)).eval()
    net.blocks[1].register_buffer("gate", torch.ones(16))
    rec = net.to_recurrent()
    assert rec._net_step is None
    with pytest.raises(ValueError, match=r"blocks\.1\.gate"):
        fused.NetStep(fused.library(), rec.net, rec.layers)


def test_whole_network_step_refuses_layernorms_with_different_eps():
    """The C step reads one eps for every LayerNorm: a network whose norms differ is refused by name,
    so the torch ops serve it."""
    net = SequenceModel(ModelConfig(**TINY)).eval()
    rec = net.to_recurrent()
    assert rec._net_step is not None
    rec.net.blocks[1].norm.eps = 1e-3
    with pytest.raises(ValueError, match="one eps"):
        fused.NetStep(fused.library(), rec.net, rec.layers)


def test_whole_network_step_refuses_config_fields_it_does_not_implement(monkeypatch):
    net = SequenceModel(ModelConfig(**TINY)).eval()
    rec = net.to_recurrent()
    assert rec._net_step is not None
    monkeypatch.setattr(fused.NetStep, "CONFIG_FIELDS", fused.NetStep.CONFIG_FIELDS - {"d_model"})
    with pytest.raises(ValueError, match="does not implement d_model=16"):
        fused.NetStep(fused.library(), rec.net, rec.layers)


@pytest.mark.parametrize("kernel,init", [("s4", "legs"), ("s4d", "diag-inv")])
def test_embed_scale_multiplies_the_embedding_in_every_path(kernel, init):
    torch.manual_seed(1)
    scale = 16**0.5  # the official `lm` rescale: √d_model
    net = SequenceModel(ModelConfig(kernel=kernel, init=init, embed_scale=scale, **TINY)).eval()
    ref = SequenceModel(ModelConfig(kernel=kernel, init=init, **TINY)).eval()
    ref.load_state_dict(net.state_dict())
    with torch.no_grad():
        ref.embed.weight.mul_(scale)  # the same float32 products, folded into the table
    tokens = torch.randint(0, 32, (2, 24))
    got, whole = all_paths(net, tokens)
    assert whole._net_step is not None
    unscaled = SequenceModel(ModelConfig(kernel=kernel, init=init, **TINY)).eval()
    unscaled.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.equal(got["conv"], ref(tokens))
        assert rel(got["conv"], unscaled(tokens)) > 0.01  # the scale matters
    for name, logits in got.items():
        assert rel(logits, got["conv"]) <= 1e-5, name


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "4", True])
def test_embed_scale_is_range_checked(bad):
    with pytest.raises(ValueError, match="embed_scale"):
        ModelConfig(embed_scale=bad)


# ---------------------------------------------------------------------------------------------
# An independent float64 reference: the DPLR SSM on all N = 2·N2 complex modes (the conjugate pairs
# explicit), A = diag(Λ, Λ*) − P̂P̂ᴴ with P̂ = [P; P*], stepped by dense matrix products.

F64, C128 = torch.float64, torch.complex128


def full_system(Lam, P, B, dt, disc="bilinear"):
    """Ā (N, N), B̄ (N,) complex128 of one channel: Lam, B (N2,), P (r, N2)."""
    A = torch.diag(torch.cat([Lam, Lam.conj()]))
    for Pj in P:
        col = torch.cat([Pj, Pj.conj()])
        A = A - col[:, None] * col.conj()[None, :]
    Bf = torch.cat([B, B.conj()])
    eye = torch.eye(A.shape[0], dtype=C128)
    if disc == "bilinear":
        inv = torch.linalg.inv(eye - dt / 2 * A)
        return inv @ (eye + dt / 2 * A), inv @ (dt * Bf)
    assert len(P) == 0, "zoh: diagonal A only"  # (torch.linalg.matrix_exp is off by 1e-11 here)
    Abar = torch.diag(torch.exp(dt * torch.diagonal(A)))
    return Abar, (Abar - eye) @ torch.linalg.solve(A, Bf)


def dense_kernel(Abar, Bbar, Cbar, L):
    """K_k = Ĉ Ā^k B̄ (k < L) with Ĉ = [C̄, C̄*] → (L,) float64."""
    Cf, out, x = torch.cat([Cbar, Cbar.conj()]), [], Bbar
    for _ in range(L):
        out.append((Cf @ x).real)
        x = Abar @ x
    return torch.stack(out)


def c_tilde(Abar, Cbar, L):
    """The generating-function C̃ = C̄(I − Ā^L) on the stored N2 modes."""
    Cf = torch.cat([Cbar, Cbar.conj()])
    return (Cf @ (torch.eye(Abar.shape[0], dtype=C128) - torch.linalg.matrix_power(Abar, L)))[: len(Cbar)]


@pytest.mark.parametrize("kind,init", [("s4", "fout"), ("s4", "legt"), ("s4d", "diag-lin")])
def test_unclamped_re_lambda_gives_the_exact_kernel_and_the_training_clamp_does_not(kind, init):
    """Official fout/legt layers hold Re Λ near 0 (1e-4 after the official inv_transform): with
    re_lambda_max=None the float64 kernel equals the dense reference to 1e-12 × cond(I − Ā^L) (the
    reference recovers C̄ from C̃ by solving with that matrix, whose condition number is 1.7 to 4,036
    here; a flat 1e-10 failed on a Zen 3 VM's LAPACK at 1.18e-10 with cond 1,547); the training clamp
    (Re Λ ≤ −1e-2) would change it by far more than the serving tolerance."""
    torch.manual_seed(2)
    H, N, L = 3, 16, 256
    k = SSMKernel(H, N, L, kind=kind, init=init, re_lambda_max=None, backend="torch")
    with torch.no_grad():  # what an importer writes: small Re Λ, some tiny, one as large as -2
        neg_re = torch.rand(H, N // 2, dtype=F64) * 1e-3 + 1e-4
        neg_re[0, 0] = 2.0
        k.log_neg_re.copy_(neg_re.log())
    s = {n: v.detach() for n, v in k.ssm(F64).items()}
    assert torch.allclose(-s["Lambda"].real, k.log_neg_re.double().exp(), rtol=1e-15, atol=0)
    K = k(dtype=F64, backend="torch").detach()
    for h in range(H):
        P = s["P"][:, h] if kind == "s4" else torch.zeros(0, N // 2, dtype=C128)
        Abar, Bbar = full_system(s["Lambda"][h], P, s["B"][h], s["dt"][h], k.disc)
        # for S4 the stored C is C̃; for the reference take C̄ with C̃ = C̄(I − Ā^L)
        Cbar, cond = s["C"][h], 1.0
        if kind == "s4":
            Fm = torch.eye(N, dtype=C128) - torch.linalg.matrix_power(Abar, L)
            Cbar = torch.linalg.solve(Fm.T, torch.cat([s["C"][h], s["C"][h].conj()]))[: N // 2]
            cond = torch.linalg.cond(Fm).item()
        assert rel(K[h], dense_kernel(Abar, Bbar, Cbar, L)) <= 1e-12 * max(cond, 10.0), (h, cond)
    k.re_lambda_max = -1e-2  # the training clamp, on the same parameters
    assert rel(k(dtype=F64, backend="torch").detach(), K) > 1e-3  # ≫ the 1e-5 import tolerance


@pytest.mark.parametrize("bad", [0.0, 1e-3, float("nan"), float("-inf"), "x", True])
def test_re_lambda_max_is_range_checked(bad):
    with pytest.raises(ValueError, match="re_lambda_max"):
        ModelConfig(re_lambda_max=bad)
    assert ModelConfig(re_lambda_max=None).re_lambda_max is None


@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
def test_untied_dt_gives_each_mode_its_own_step_size(disc):
    torch.manual_seed(3)
    H, N, L = 2, 8, 200
    k = SSMKernel(H, N, L, kind="s4d", init="diag-inv", disc=disc, dt_tied=False, backend="torch")
    assert k.log_dt.shape == (H, N // 2) and k.log_dt.std() > 0.1  # one log Δ per (channel, mode)
    s = {n: v.detach() for n, v in k.ssm(F64).items()}
    K = k(dtype=F64, backend="torch").detach()
    for h in range(H):  # modes are independent: the kernel is the sum of one-mode dense kernels
        want = sum(
            dense_kernel(*full_system(s["Lambda"][h, n : n + 1], torch.zeros(0, 1, dtype=C128),
                                      s["B"][h, n : n + 1], s["dt"][h, n], disc), s["C"][h, n : n + 1], L)
            for n in range(N // 2)
        )  # fmt: skip
        assert rel(K[h], want) <= 1e-10, h
    with pytest.raises(ValueError, match="S4D kernel only"):
        SSMKernel(H, N, L, kind="s4", dt_tied=False)
    with pytest.raises(ValueError, match="dt_tied"):
        ModelConfig(kernel="s4", dt_tied=False)


@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
def test_untied_dt_model_runs_the_same_in_conv_mode_and_every_recurrent_path(disc):
    torch.manual_seed(4)
    cfg = ModelConfig(kernel="s4d", init="diag-lin", disc=disc, dt_tied=False, **TINY)
    net = SequenceModel(cfg).eval()
    assert all(k.log_dt.shape == (16, 8) for k in net.kernels())
    got, whole = all_paths(net, torch.randint(0, 32, (2, 64)))
    assert whole._net_step is not None
    for name, logits in got.items():
        assert rel(logits, got["conv"]) <= 1e-5, name


# ---------------------------------------------------------------------------------------------
# Per-layer kernel lengths and conv mode at any length


def s4_kernel_with_c_bar(H, N, l_kernel, seed, init="legs"):
    """An S4 SSMKernel whose C̃ is C̄(I − Ā^l_kernel) for a random C̄ (as an official layer stores it),
    and the dense reference systems (Ā, B̄, C̄) per channel."""
    torch.manual_seed(seed)
    k = SSMKernel(H, N, l_kernel, kind="s4", init=init, re_lambda_max=None, backend="torch")
    s = {n: v.detach() for n, v in k.ssm(F64).items()}
    refs, Ct = [], []
    for h in range(H):
        Abar, Bbar = full_system(s["Lambda"][h], s["P"][:, h], s["B"][h], s["dt"][h])
        Cbar = torch.randn(N // 2, dtype=C128)
        refs.append((Abar, Bbar, Cbar))
        Ct.append(c_tilde(Abar, Cbar, l_kernel))
    with torch.no_grad():
        k.C.copy_(torch.view_as_real(torch.stack(Ct).to(torch.complex64)))
    # the float32 C̃ stored: take the reference C̄ from it exactly (C̄ = C̃ (I − Ā^L)⁻¹)
    Cs = torch.view_as_complex(k.C.detach().double())
    for h, (Abar, Bbar, _) in enumerate(refs):
        Fm = torch.eye(N, dtype=C128) - torch.linalg.matrix_power(Abar, l_kernel)
        refs[h] = (Abar, Bbar, torch.linalg.solve(Fm.T, torch.cat([Cs[h], Cs[h].conj()]))[: N // 2])
    return k, refs


@pytest.mark.parametrize("l_kernel", [64, 77])
@pytest.mark.parametrize("init", ["legs", "fout"])
def test_s4_kernel_at_any_length_from_a_c_tilde_of_any_kernel_length(l_kernel, init):
    """C̃ stored for the layer's own l_kernel (odd included); the kernel asked for any L (shorter,
    equal, longer, odd or even) equals the dense reference C̄ Ā^k B̄ in float64: 1e-12 for legs; fout
    (Re Λ ≈ −1e-4: I − Ā^L nearly singular, measured 3e-11, 3e-10 at L = 1, as much at L = l_kernel,
    where no rewriting happens) 1e-9."""
    H, N = 2, 16
    tol = 1e-12 if init == "legs" else 1e-9
    k, refs = s4_kernel_with_c_bar(H, N, l_kernel, seed=5, init=init)
    C_before = k.C.detach().clone()
    for L in (1, 40, l_kernel - 1, l_kernel, l_kernel + 1, 150, 301):
        K = k(L, dtype=F64, backend="torch").detach()
        assert K.shape == (H, L)
        for h, (Abar, Bbar, Cbar) in enumerate(refs):
            assert rel(K[h], dense_kernel(Abar, Bbar, Cbar, L)) <= tol, (L, h)
        K32 = k(L).detach()  # float32 (C̃ rewritten in float64 first when L > l_kernel)
        # (fout in float32 is 2e-4..3e-3 off at every L, rewritten or not: the Woodbury cancellation
        # at Re Λ ≈ 0 that kernel.py's RE_LAMBDA_MAX note measures)
        assert K32.dtype == torch.float32 and rel(K32, K) <= (1e-5 if init == "legs" else 1e-2), L
    assert torch.equal(k.C.detach(), C_before)  # computing a kernel never rewrites C̃


def test_s4_kernel_gradients_reach_every_parameter_past_the_kernel_length():
    k = SSMKernel(4, 16, 63, kind="s4", backend="torch")
    k(200).square().sum().backward()
    for n, p in k.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("kernel,init", [("s4", "legs"), ("s4", "lagt"), ("s4d", "diag-lin")])
def test_per_layer_kernel_lengths_in_conv_mode_and_every_recurrent_path(kernel, init):
    torch.manual_seed(6)
    cfg = ModelConfig(kernel=kernel, init=init, **{**TINY, "n_layers": 3}, l_kernel=[64, 77, 31])
    net = SequenceModel(cfg).eval()
    assert [k.L for k in net.kernels()] == [64, 77, 31]
    tokens = torch.randint(0, 32, (2, 150))  # longer than every layer's kernel length and than l_max
    got, whole = all_paths(net, tokens)
    assert whole._net_step is not None
    for name, logits in got.items():
        assert rel(logits, got["conv"]) <= 1e-5, name
    with torch.no_grad():  # a float64 conv forward: the float32 one is within 1e-5 of it
        assert rel(got["conv"], net.double()(tokens)) <= 1e-5


@pytest.mark.parametrize("bad", [[64], [64, 0], [64, 1.5], [64, True], "64", [64, 2**21]])
def test_l_kernel_is_range_checked(bad):
    with pytest.raises(ValueError, match="l_kernel"):
        ModelConfig(**TINY, l_kernel=bad)


@pytest.mark.parametrize("kernel,init", [("s4", "legs"), ("s4d", "diag-inv")])
def test_conv_mode_at_four_times_the_trained_length_equals_the_recurrence(kernel, init):
    """A model trained at l_max=1024 runs conv mode at 4096 tokens within 1e-4 of its recurrent form
    (stepped token by token, and the parallel prefill)."""
    torch.manual_seed(7)
    cfg = ModelConfig(kernel=kernel, init=init, **{**TINY, "l_max": 1024})
    net = SequenceModel(cfg).eval()
    tokens = torch.randint(0, 32, (1, 4096))
    with torch.no_grad():
        conv = net(tokens)
    rec = net.to_recurrent()
    assert rec._net_step is not None
    stepped, _ = step_all(rec, tokens, rec.init_state(1))
    rec.prefill_by_steps_max_tokens = 0
    prefilled, _ = rec.prefill(tokens, rec.init_state(1))
    for got in (stepped, prefilled):
        assert rel(conv, got) <= 1e-4
        assert float((conv.log_softmax(-1) - got.log_softmax(-1)).abs().max()) <= 1e-3


# ---------------------------------------------------------------------------------------------
# The official [s4, ff] layer pattern


def official_s4_ff_blocks(net, x):
    """The official backbone with layer [s4, ff], written out from its source (state-spaces/s4
    e757cef: backbones/block.py SequenceResidualBlock with prenorm and residual 'R'; modules/
    s4block.py S4Block; modules/ffn.py FFN), with F.* calls on our model's weights, in train mode:
    residual block: y = layer(LN(x)); x + dropout(y)
    S4Block:  GLU(W · dropout(GELU(K ∗ u + D u)) + b)
    FFN:      W₂ · dropout(GELU(W₁ u + b₁)) + b₂   (nn.GELU: the exact erf form)."""
    F, p = torch.nn.functional, net.config.dropout
    for blk in net.blocks:
        u = F.layer_norm(x, (x.shape[-1],), blk.norm.weight, blk.norm.bias, eps=1e-5)
        y = F.gelu(blk.layer.ssm(u) + blk.layer.D * u)
        y = F.glu(F.linear(F.dropout(y, p), blk.layer.out.weight, blk.layer.out.bias), dim=-1)
        x = x + F.dropout(y, p)
        u = F.layer_norm(x, (x.shape[-1],), blk.ff_norm.weight, blk.ff_norm.bias, eps=1e-5)
        y = F.gelu(F.linear(u, blk.ff.up.weight, blk.ff.up.bias), approximate="none")
        y = F.linear(F.dropout(y, p), blk.ff.down.weight, blk.ff.down.bias)
        x = x + F.dropout(y, p)
    return F.layer_norm(x, (x.shape[-1],), net.norm.weight, net.norm.bias, eps=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_feed_forward_blocks_equal_the_official_s4_ff_pattern_including_dropout(train):
    torch.manual_seed(8)
    net = SequenceModel(ModelConfig(d_ff=40, dropout=0.25 if train else 0.0, **TINY)).train(train)
    tokens = torch.randint(0, 32, (2, 50))
    torch.manual_seed(9)  # the same dropout masks: drawn in the same order
    with torch.no_grad():
        got = net(tokens)
    torch.manual_seed(9)
    with torch.no_grad():
        want = net.head(official_s4_ff_blocks(net, net.embed(tokens)))
    assert torch.equal(got, want)
    if train:  # dropout was active: another draw differs
        with torch.no_grad():
            assert rel(net(tokens), got) > 1e-2


def test_every_new_field_round_trips_through_a_checkpoint(tmp_path):
    from model import checkpoint

    torch.manual_seed(10)
    fields = dict(head_bias=True, embed_scale=4.0, l_kernel=[64, 77], dt_tied=False, re_lambda_max=None)
    net = SequenceModel(ModelConfig(kernel="s4d", init="diag-lin", d_ff=24, **fields, **TINY)).eval()
    with torch.no_grad():
        net.head.bias.normal_()
    checkpoint.save(net, tmp_path / "ck")
    back = checkpoint.load(tmp_path / "ck").eval()
    assert {k: getattr(back.config, k) for k in fields} == fields
    tokens = torch.randint(0, 32, (1, 200))
    with torch.no_grad():
        assert torch.equal(back(tokens), net(tokens))


def test_c_tilde_from_c_bar_for_a_layer_never_run():
    """An official layer whose l_kernel buffer is still 0 stores C̄; c_tilde_for_length(…, 0, L) gives
    the C̃ the official first forward would write (C̄(I − Ā^L)), in float64 to 1e-12."""
    from model.kernel import c_tilde_for_length

    torch.manual_seed(11)
    k = SSMKernel(2, 16, 64, kind="s4", init="legs", re_lambda_max=None, backend="torch")
    s = {n: v.detach() for n, v in k.ssm(F64).items()}
    Cbar = torch.randn(2, 8, dtype=C128)
    got = c_tilde_for_length(s["Lambda"], s["P"], Cbar, s["dt"], 0, 101)
    for h in range(2):
        Abar, _ = full_system(s["Lambda"][h], s["P"][:, h], s["B"][h], s["dt"][h])
        want = c_tilde(Abar, Cbar[h], 101)
        assert float((got[h] - want).abs().max() / want.abs().max()) <= 1e-12
