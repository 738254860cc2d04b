"""Sampling whose per-row settings and counter-based streams stay on the device (`RowSampler`, the GPU
engine's `DecodeBatch.step`): the uniforms are Philox4x32-10 in torch int64 ops, bit for bit the host's
and the C sampler's, and the tokens are `sample`'s, bit for bit, for every kind of row settings.

On the first GPU run (an H200, 2026-12-04) the engine made 935 steps/s where the bare step made 4,847:
each step rebuilt six per-row tensors on the host, copied them over and synchronized three times."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import devices

from model import fused, sampling
from model.sampling import (
    CounterRNG,
    RowSampler,
    SamplingParams,
    philox_uniform,
    philox_uniforms_torch,
    sample,
    uint64_bits,
)

EDGE = [0, 1, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]


def reference_philox4x32_10(counter: list[int], key: list[int]) -> list[int]:
    """Philox4x32-10 written from Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2,
    3" (SC 2011): a round maps (x0, x1, x2, x3) under key (k0, k1) to (hi(M1·x2) ⊕ x1 ⊕ k0, lo(M1·x2),
    hi(M0·x0) ⊕ x3 ⊕ k1, lo(M0·x0)); the key is bumped by the Weyl constants (W0, W1) before rounds 2…10."""
    x, k = list(counter), list(key)
    for r in range(10):
        if r:
            k = [(k[0] + 0x9E3779B9) % 2**32, (k[1] + 0xBB67AE85) % 2**32]
        a, b = 0xD2511F53 * x[0], 0xCD9E8D57 * x[2]  # 64-bit products
        x = [(b >> 32) ^ x[1] ^ k[0], b % 2**32, (a >> 32) ^ x[3] ^ k[1], a % 2**32]
    return x


def test_the_reference_philox_gives_random123s_known_answers():
    """Random123's kat_vectors for philox4x32 with 10 rounds: the reference below is the published cipher."""
    f, pi = 0xFFFFFFFF, [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0]
    assert reference_philox4x32_10([0] * 4, [0] * 2) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert reference_philox4x32_10([f] * 4, [f] * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert reference_philox4x32_10(pi[:4], pi[4:]) == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("library", ["c", "torch"])
@pytest.mark.parametrize("seed", [0, 5, 2**64 - 1])
def test_a_seed_is_the_philox_key_of_its_stream(monkeypatch, library, seed):
    """SamplingParams(seed=s).generator() is the stream keyed by s itself at index 0 (the server, the
    library and the C decode block all take the key from it): its uniforms n = 0, 1 are the top 24 bits
    of the first word of Philox4x32-10 of the counter (n, 0, 0, 0) under the key (s mod 2³², s >> 32),
    times 2⁻²⁴ — from the reference above, through the C library's Philox and the torch ops'."""
    if library == "c":
        assert fused.library() is not None, "the C sampling pass must build here"
    else:
        monkeypatch.setattr(fused, "library", lambda: None)
    words = [reference_philox4x32_10([n, 0, 0, 0], [seed % 2**32, seed >> 32])[0] for n in (0, 1)]
    want = [(w >> 8) / 2**24 for w in words]  # (exact in float32: 24 bits)
    g = SamplingParams(seed=seed).generator()
    assert (g.key, g.counter) == (seed, 0)
    assert [float(sampling.uniforms([g])[0]) for _ in range(2)] == want and g.counter == 2
    assert SamplingParams(seed=seed).generator().uniform() == want[0]
    far = (reference_philox4x32_10([1, 1, 0, 0], [seed % 2**32, seed >> 32])[0] >> 8) / 2**24  # n = 2³² + 1
    assert float(sampling.uniforms([CounterRNG(seed, 2**32 + 1)])[0]) == far
    assert CounterRNG(seed, 2**32 + 1).uniform() == far


@pytest.mark.parametrize("device", devices())
def test_torch_philox_is_the_host_philox_bit_for_bit(device):
    g = torch.Generator().manual_seed(7)
    rand = [int(x) for x in torch.randint(0, 2**62, (40,), generator=g)] + [x * 4 + 3 for x in range(10)]
    pairs = [(k, c) for k in EDGE for c in EDGE] + list(zip(rand, reversed(rand)))
    keys, counters = zip(*pairs)
    got = philox_uniforms_torch(uint64_bits(list(keys)).to(device), uint64_bits(list(counters)).to(device))
    want = torch.tensor([philox_uniform(k, c) for k, c in pairs], dtype=torch.float32)
    assert got.dtype == torch.float32 and got.device.type == torch.device(device).type
    assert torch.equal(got.cpu(), want)
    assert 0 <= float(got.min()) and float(got.max()) < 1


PARAMS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.0),  # greedy
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.9, min_p=0.1),
    SamplingParams(temperature=1.0, repetition_penalty=1.5),
    SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.3),
    SamplingParams(temperature=1.0, logit_bias={3: 5.0, 7: -100.0}),
    SamplingParams(temperature=1.0, top_p=1 - 1e-9),  # rounds to 1 in float32: no filter, as in `sample`
]


def streams(seed: int) -> list[CounterRNG]:
    return [CounterRNG(seed * 1000 + i, counter=(2**32 - 3 if i == 0 else i)) for i in range(len(PARAMS))]


@pytest.mark.parametrize("device", devices())
def test_the_row_sampler_draws_samples_tokens_bit_for_bit(device):
    """20 steps of 9 rows with every kind of setting: the RowSampler's tokens are `sample`'s with copies
    of the same generators (on the CPU that is the C sampler), and after `sync` each generator has
    advanced by one draw a step (row 0's counter crossing 2^32)."""
    V = 64
    g = torch.Generator().manual_seed(0)
    ref_gens, dev_gens = streams(3), streams(3)
    sampler = RowSampler(PARAMS, dev_gens, V, device)
    seen = torch.zeros(len(PARAMS), V, dtype=torch.bool)
    counts = torch.zeros(len(PARAMS), V)
    for _ in range(20):
        logits = torch.randn(len(PARAMS), V, generator=g) * 3
        want = sample(logits, PARAMS, ref_gens, seen, counts)
        got = sampler(logits.to(device), seen.to(device), counts.to(device))
        assert got.dtype == torch.long and torch.equal(got.cpu(), want)
        seen[torch.arange(len(PARAMS)), want] = True
        counts[torch.arange(len(PARAMS)), want] += 1
    assert [g.counter for g in dev_gens] == [g.counter for g in streams(3)]  # not yet synced
    sampler.sync()
    assert [g.counter for g in dev_gens] == [g.counter for g in ref_gens]
    assert dev_gens[0].counter == 2**32 + 17


def test_the_row_sampler_refuses_what_it_cannot_keep_on_the_device():
    p = [SamplingParams(), SamplingParams()]
    with pytest.raises(TypeError, match="CounterRNG"):
        RowSampler(p, [CounterRNG(1), torch.Generator()], 8, "cpu")
    shared = CounterRNG(1)
    with pytest.raises(ValueError, match="two rows"):
        RowSampler(p, [shared, shared], 8, "cpu")
    with pytest.raises(ValueError, match="one SamplingParams per generator"):
        RowSampler(p, [CounterRNG(1)], 8, "cpu")
    with pytest.raises(ValueError, match=r"logits must be \(2, V\)"):
        RowSampler(p, [CounterRNG(1), CounterRNG(2)], 8, "cpu")(torch.zeros(3, 8))


def decode_batch(device_sampler: bool):
    """A tiny model's DecodeBatch with its pool (CPU), `device_sampler` forced either way."""
    from model import ModelConfig, SequenceModel
    from server.engine import DecodeBatch
    from server.sessions import SlotPool

    torch.manual_seed(0)
    net = SequenceModel(ModelConfig(vocab_size=64, d_model=16, n_layers=2, d_state=8, l_max=64,
                                    cauchy_backend="torch"))  # fmt: skip
    rec = net.to_recurrent()
    pool = SlotPool(rec.init_state(8), rec.config.vocab_size, rec.batch_dim)
    batch = DecodeBatch(pool)
    batch.device_sampler = device_sampler
    return rec, pool, batch


def jobs_for(pool, params: list[SamplingParams]):
    from server.engine import Job
    from server.sessions import SessionRecord

    out = []
    for k, p in enumerate(params):
        job = Job(
            SessionRecord(id=f"s{k}", model="m", slot=pool.reserve(), pending=(5 * k) % 64), [], params=p
        )
        job.generator = p.generator()
        if p.counts_output:
            job.counts = torch.zeros(64)
        out.append(job)
    return out


def test_decode_batch_steps_give_the_same_tokens_with_the_sampler_on_the_device():
    """Two DecodeBatches driven alike, one with the device sampler (forced on the CPU), one with `sample`
    (the C sampler): the same tokens at every step while rows join, leave (holes) and rejoin, and each
    job's generator counter counts its draws once the rows change."""
    seeded = [dataclasses.replace(p, seed=100 + i) for i, p in enumerate(PARAMS[:6])]
    runs = []
    for device_sampler in (True, False):
        rec, pool, batch = decode_batch(device_sampler)
        jobs = jobs_for(pool, seeded)
        tokens = []
        batch.join(jobs[:4])
        tokens += [batch.step(rec) for _ in range(5)]
        batch.leave([jobs[1]])  # a hole, filled by the next joiner
        tokens += [batch.step(rec) for _ in range(3)]
        batch.join(jobs[4:])
        tokens += [batch.step(rec) for _ in range(4)]
        batch.leave([jobs[0], jobs[4]])
        batch.join([jobs[1]])  # back: its stream continues where it stopped
        tokens += [batch.step(rec) for _ in range(4)]
        batch.leave([j for j in batch.rows if j is not None])
        runs.append((tokens, [j.generator.counter for j in jobs], batch._step_args))
    (a, counters_a, left_a), (b, counters_b, _) = runs
    assert a == b
    assert counters_a == counters_b == [12, 9, 16, 16, 4, 8]  # the steps each job was in
    assert left_a is None  # nothing cached once every row left
