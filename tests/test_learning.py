"""A tiny model learns a toy task in conv mode, and its recurrent form agrees after training."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, SequenceModel


@pytest.mark.parametrize("kernel,init", [("s4", "legs"), ("s4d", "diag-lin")])
def test_learns_delay_task(kernel, init):
    """Output the token seen `delay` steps ago: chance is ln(8) = 2.08 nats; we require < 0.2."""
    torch.manual_seed(0)
    V, L, delay = 8, 128, 20
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, d_state=32, kernel=kernel, init=init,
                      l_max=L, dt_min=0.01, dt_max=0.1, cauchy_backend="torch")  # fmt: skip
    net = SequenceModel(cfg)
    opt = torch.optim.AdamW(net.param_groups(lr=1e-2, weight_decay=0.0, ssm_lr=1e-3))
    for _ in range(300):
        x = torch.randint(0, V, (16, L))
        logits = net(x)[:, delay:]
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, :-delay].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x = torch.randint(0, V, (32, L))
    with torch.no_grad():
        logits = net(x)
    loss = F.cross_entropy(logits[:, delay:].flatten(0, 1), x[:, :-delay].flatten()).item()
    assert loss < 0.2, f"loss {loss:.3f} (chance {math.log(V):.2f})"
    rec = net.to_recurrent()
    got, _ = rec.prefill(x, rec.init_state(32))
    assert float((got - logits).norm() / logits.norm()) < 1e-4


def test_param_groups_split_ssm_parameters():
    net = SequenceModel(ModelConfig(vocab_size=16, d_model=8, n_layers=2, d_state=4, l_max=16))
    groups = {g["name"]: g for g in net.param_groups(lr=1e-3, weight_decay=0.1, ssm_lr=5e-4)}
    ssm_names = {n for n, p in net.named_parameters() if any(p is q for q in groups["ssm"]["params"])}
    assert ssm_names == {f"blocks.{i}.layer.kernel.{k}" for i in range(2)
                         for k in ("log_dt", "log_neg_re", "im", "P", "B")}  # fmt: skip
    assert groups["ssm"]["lr"] == 5e-4 and groups["ssm"]["weight_decay"] == 0.0
    assert groups["decay"]["weight_decay"] == 0.1
    n_total = sum(len(g["params"]) for g in groups.values())
    assert n_total == len(list(net.parameters()))
