"""The baseline Transformer's preallocated KV cache: cached prefill + decode == the full forward pass."""

import pytest
import torch

from bench.baselines.transformer import TransformerConfig, TransformerLM

CFG = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_len=64)


@pytest.mark.parametrize("chunks", [[20], [7, 9, 4], [1] * 20])
def test_cached_chunks_and_decode_steps_match_the_full_forward(chunks):
    net = TransformerLM(CFG).eval()
    tokens = torch.randint(0, CFG.vocab_size, (3, 24))
    with torch.no_grad():
        full = net(tokens)
        cache = net.new_cache(batch=3, capacity=32)
        outs, at = [], 0
        for n in chunks + [1] * (24 - sum(chunks)):  # prompt chunks, then one token per step
            outs.append(net(tokens[:, at : at + n], cache))
            at += n
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-4, atol=1e-5)


def test_cache_is_preallocated_and_refuses_to_overflow():
    net = TransformerLM(CFG).eval()
    cache = net.new_cache(batch=2, capacity=8)
    k_ptr = cache.k.data_ptr()
    with torch.no_grad():
        net(torch.zeros(2, 6, dtype=torch.long), cache)
        net(torch.zeros(2, 1, dtype=torch.long), cache)
        assert cache.k.data_ptr() == k_ptr and cache.length == 7
        assert cache.nbytes == 2 * 2 * 2 * 4 * 8 * 8 * 4  # k + v, (layers, B, heads, T, d_head) float32
        assert cache.bytes_per_sequence(7) == 2 * 2 * 32 * 7 * 4
        with pytest.raises(ValueError, match="KV cache full"):
            net(torch.zeros(2, 2, dtype=torch.long), cache)


def test_fill_copies_a_prefix_into_every_row():
    net = TransformerLM(CFG).eval()
    one = net.new_cache(batch=1, capacity=16)
    with torch.no_grad():
        net(torch.arange(5)[None], one)
        many = net.new_cache(batch=4, capacity=16).fill_(one)
        a = net(torch.full((4, 1), 3), many)
        b = net(torch.full((1, 1), 3), one)
    assert many.length == 6
    torch.testing.assert_close(a, b.expand(4, -1, -1))


def test_prefill_benchmarks_transformer_is_parameter_matched_to_the_shipped_text_model():
    """bench.prefill --vs-transformer compares the shipped S4 text model with the issue-15 baseline, its
    position table grown to the prompt: at its trained length (256 positions) the parameter counts agree
    within 0.1 % (1,978,116 vs 1,977,856), and the grown table has one row per prompt position."""
    from bench.baselines.transformer import matched_config
    from bench.prefill import _matched_transformer
    from model import load

    tf = _matched_transformer(4096, torch.bfloat16)
    s4 = load("checkpoints/text-shakespeare")
    assert tf.pos.weight.shape[0] == 4096 and tf.pos.weight.dtype == torch.bfloat16
    trained = matched_config().max_len
    matched = tf.num_params() - (4096 - trained) * tf.pos.weight.shape[1]
    assert trained == 256 and matched == TransformerLM(matched_config()).num_params()
    assert abs(matched - s4.num_params()) <= 1e-3 * s4.num_params(), (matched, s4.num_params())
