"""Tokenizers and the sampler."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from model.codecs import ByteTokenizer, MuLaw, read_wav, to_pcm16, wav_bytes
from model.sampling import SamplingParams, filter_logits, find_stop, sample


@given(st.text())
def test_utf8_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_stream_decoder_holds_back_partial_characters():
    tok = ByteTokenizer()
    ids = tok.encode("né✓")
    dec = tok.stream_decoder()
    pieces = [dec.decode(bytes([i])) for i in ids]
    assert "".join(pieces) == "né✓"
    assert pieces[1] == "" and pieces[2] == "é"  # 'é' is two bytes
    assert tok.decode([0xFF, 0x41]) == "\ufffdA"  # invalid bytes never raise


def test_mulaw_round_trip_and_error_bound():
    m = MuLaw()
    q = np.arange(256)
    assert (m.encode(m.decode(q)) == q).all()  # ids survive decode → encode exactly
    x = np.linspace(-1, 1, 10001)
    ids = m.encode(x)
    assert ids.min() == 0 and ids.max() == 255 and (np.diff(ids) >= 0).all()  # monotone
    err = np.abs(m.decode(ids) - x)
    # quantization error is at most half a step of the companded scale, which widens with |x|
    assert err.max() < 0.035 and err[np.abs(x) < 0.01].max() < 2.5e-4


def test_mulaw_is_its_documented_companding_written_out():
    """Ours ("s4serve") against MuLaw's formulas written out in float64: q = floor((f + 1)/2 · 255 + 1/2)
    with f = sign(x) ln(1 + 255|x|)/ln 256, and the decoded sample sign(f)(256^|f| − 1)/255 with
    f = 2q/255 − 1 (float32: within 2 ulps). The round trip and the error bound above passed μ = 254 in the
    encoder (ids near a step's edge move, none of the codes' own samples do)."""
    m = MuLaw()
    x = np.linspace(-1, 1, 20001)
    f = np.sign(x) * np.log1p(255 * np.abs(x)) / np.log(256)
    v = (f + 1) / 2 * 255 + 0.5
    clear = np.abs(v - np.round(v)) > 1e-9  # (not on a step's edge, where float rounding may go either way)
    assert clear.mean() > 0.999
    np.testing.assert_array_equal(m.encode(x)[clear], np.floor(v[clear]).astype(np.int64))
    q = np.arange(256)
    fq = 2 * q / 255 - 1
    want = np.sign(fq) * (256.0 ** np.abs(fq) - 1) / 255
    np.testing.assert_allclose(m.decode(q), want, rtol=2.5e-7, atol=1e-12)


def test_mulaw_official_convention_is_state_spaces_s4s_own_companding():
    """MuLaw("s4") against the official functions' own outputs (make_codec_fixture.py ran `mu_law_encode`,
    its per-clip min-max scaling made the identity, and `mu_law_decode` from the official
    src/dataloaders/audio.py): every id of 21,556 samples (a grid, the mu-law bins' edges and decoded
    values with their float32 neighbours, tiny samples where its `+ 1e-8` acts) exactly, and every
    decoded id exactly, as float32 arithmetic in the official order gives them (float64 gives over 100 of
    the ids, and over 10 of the decoded values, another value). 128 is the silence and decodes to 0.0."""
    from safetensors.torch import load_file

    ref = load_file(str(Path(__file__).parent / "fixtures" / "official" / "audio_codecs.ref.safetensors"))
    m, x, want = MuLaw("s4"), ref["mx"].numpy(), ref["mu_law_encode_mx"].numpy()
    got = m.encode(x)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)
    x64 = x.astype(np.float64)  # the same formulas in float64: the arithmetic matters at the edges
    f64 = np.sign(x64) * np.log1p(255 * np.abs(x64)) / np.log1p(255)
    assert (np.floor((f64 + 1) / 2 * (256 - 0.01) + 0.005) != want).sum() > 100
    q = ref["ids"].numpy()
    decoded = m.decode(q)
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, ref["mu_law_decode"].numpy())
    d64 = (np.sign(q / 128 - 1) * np.expm1(np.abs(q / 128 - 1) * np.log1p(255)) / 255).astype(np.float32)
    assert (d64 != ref["mu_law_decode"].numpy()).sum() > 10
    assert m.encode(np.zeros((2, 3))[:, ::-1]).shape == (2, 3) and int(m.encode(0.0)) == 128  # any shape
    assert m.silence == 128 and m.decode([128])[0] == 0.0 and MuLaw().decode([128])[0] > 0
    # ours is unchanged: 2q/255 − 1
    np.testing.assert_allclose(MuLaw().decode(q), MuLaw("s4serve").decode(q))
    with pytest.raises(ValueError, match="convention"):
        MuLaw("alaw")


def test_mulaw_round_trip_of_the_official_convention_is_the_official_codes():
    """decode then encode in "s4" is the official functions' own round trip (the fixture's): ids 0 … 129
    come back, 130 … 255 one lower (a bin's lower edge quantized with the 0.01 margin; 129's edge rounds
    up in float32), as MuLaw's docstring says."""
    from safetensors.torch import load_file

    ref = load_file(str(Path(__file__).parent / "fixtures" / "official" / "audio_codecs.ref.safetensors"))
    m, q = MuLaw("s4"), np.arange(256)
    back = m.encode(m.decode(q))
    np.testing.assert_array_equal(back, ref["mu_law_round_trip"].numpy())
    assert (back[:130] == q[:130]).all() and (back[130:] == q[130:] - 1).all()


def test_the_linear_codec_is_state_spaces_s4s_own_quantization():
    """Linear8 against the official functions' own outputs (tests/fixtures/official/make_codec_fixture.py
    ran `quantize`, `linear_decode` and `q_zero` from the official src/dataloaders/audio.py): every id of
    21,543 samples (a grid, the decoded values and the bins' edges with their float32 neighbours) exactly,
    as float32 arithmetic gives it (float64 gives 268 of them another id); every decoded id exactly; the
    silence is q_zero, 128, exactly 0.0. decode then encode: 0 … 128 back, 129 … 255 one lower, as the
    official formulas. Codecs are values (equal by name, hashable); another quantization is refused."""
    from safetensors.torch import load_file

    from model.codecs import Linear8, audio_codec

    ref = load_file(str(Path(__file__).parent / "fixtures" / "official" / "audio_codecs.ref.safetensors"))
    lin = Linear8()
    np.testing.assert_array_equal(lin.encode(ref["x"].numpy()), ref["quantize_f01"].numpy())
    x64 = ref["x"].numpy().astype(np.float64)
    in64 = np.clip(np.floor((x64 + 1) / 2 * (256 - 0.01) + 0.005), 0, 255)
    assert (in64 != ref["quantize_f01"].numpy()).sum() > 100  # (so the float32 arithmetic matters)
    decoded = lin.decode(ref["ids"].numpy())
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, ref["linear_decode"].numpy())
    assert lin.silence == int(ref["q_zero"][0]) == 128 and lin.decode([128])[0] == 0.0
    q = np.arange(256)
    back = lin.encode(lin.decode(q))
    assert (back[:129] == q[:129]).all() and (back[129:] == q[129:] - 1).all()
    assert audio_codec("linear") == lin and audio_codec("mu-law", "s4") == MuLaw("s4") != lin
    assert len({audio_codec("linear"), lin, MuLaw(), MuLaw("s4serve"), MuLaw("s4")}) == 3
    with pytest.raises(ValueError, match="quantization must be one of"):
        audio_codec("a-law")
    with pytest.raises(ValueError, match=r"linear id 256 at index \[1\]"):
        lin.decode([0, 256])
    with pytest.raises(ValueError, match="not finite"):
        lin.encode([0.0, float("nan")])


def test_codecs_refuse_values_without_a_code():
    """NaN or infinite samples (encode cast NaN to -2**63, an id the model would index with) and ids outside
    0 … 255 or not integers (decode returned 1.2e14 for 1000) are ValueErrors naming the value and its
    index, as is a NaN in to_pcm16 (a silent cast before)."""
    for convention in ("s4serve", "s4"):
        m = MuLaw(convention)
        for bad in (np.nan, np.inf, -np.inf):
            with pytest.raises(ValueError, match=r"sample .* at index \[1\] is not finite"):
                m.encode([0.1, bad])
        for bad in (256, 1000, -1, 1.5):
            with pytest.raises(ValueError, match=rf"mu-law id {bad:g} at index \[0, 1\] is not an integer"):
                m.decode([[3, bad]])
        assert m.encode([2.0, -7.0]).tolist() == [255, 0]  # finite values past ±1 are clipped
    with pytest.raises(ValueError, match="not finite"):
        to_pcm16([0.0, np.nan])


def test_wav_round_trip():
    x = np.sin(np.linspace(0, 100, 8000)).astype(np.float32) * 0.5
    y, sr = read_wav(wav_bytes(x, 8000))
    assert sr == 8000 and np.abs(y - x).max() < 1e-4
    with pytest.raises(ValueError, match="not an audio file"):
        read_wav(b"RIFFjunk")


def test_greedy_top_k1_and_tiny_top_p_pick_the_argmax():
    logits = torch.randn(6, 50)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(top_k=1, seed=1),
        SamplingParams(top_p=1e-6, seed=2),
    ] * 2
    out = sample(logits, params, [p.generator() for p in params])
    assert torch.equal(out, logits.argmax(-1))


def test_sample_refuses_logits_of_no_token():
    """(B, 0) logits have no token to draw: sample returned token 0, outside its own promise [0, V) (a
    helper's audit); a ValueError now, and an empty batch (0, V) still gives no tokens."""
    p = SamplingParams(seed=1)
    with pytest.raises(ValueError, match=r"logits must be \(B, V\) with V ≥ 1, got shape \(2, 0\)"):
        sample(torch.zeros(2, 0), [p, p], [p.generator(), p.generator()])
    assert sample(torch.zeros(0, 5), [], []).shape == (0,)


def test_filter_keeps_top_k_and_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    out = filter_logits(logits, torch.tensor([2, 0]), torch.tensor([1.0, 0.7]))
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]
    assert torch.isfinite(out[1]).tolist() == [True, True, False, False]  # 0.5 + 0.3 ≥ 0.7


def test_seed_reproduces_a_sequence_whatever_the_batch():
    def run(batch_rows, steps=20):
        gens = [p.generator() for p in batch_rows]
        outs = []
        for t in range(steps):
            torch.manual_seed(1000 + t)  # logits identical across runs for the row of interest
            logits = torch.randn(len(batch_rows), 30)
            logits[0] = torch.linspace(-1, 1, 30) * (t % 3)
            outs.append(sample(logits, batch_rows, gens)[0].item())
        return outs

    me = SamplingParams(seed=42, temperature=0.9, top_p=0.95)
    alone = run([me])
    crowded = run([me] + [SamplingParams(seed=s, top_k=5) for s in range(31)])
    assert alone == crowded
    assert alone != run([SamplingParams(seed=43, temperature=0.9, top_p=0.95)])


def test_samples_follow_the_distribution():
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    p = SamplingParams(seed=7)
    g = p.generator()
    n = 20000
    draws = torch.stack([sample(probs.log()[None], [p], [g]) for _ in range(n)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / n
    assert (freq - probs).abs().max() < 0.015  # ~4.5 standard errors at n = 20000


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([[2.0, 2.0, -1.0, -1.0]])
    seen = torch.tensor([[True, False, True, False]])
    p = SamplingParams(temperature=0, repetition_penalty=3.0)
    assert sample(logits, [p], [p.generator()], seen).item() == 1
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_find_stop_incremental():
    assert find_stop(b"hello wor", [b"world"], 3) is None
    assert find_stop(b"hello world", [b"world", b"lo"], 2) == 6
    assert find_stop(b"hello world", [b"lo"], 2) is None  # already checked before the last 2 bytes
    assert find_stop(b"a\n\nb", [b"\n\n"], 2) == 1


def test_mulaw_ids_are_not_g711_bytes_as_the_readme_warns():
    """The README warns that WebSocket `mulaw` frames (the token ids) are not G.711 bytes: a G.711 decoder
    (libsndfile's, as sox's and ffmpeg's) plays the silence code 128 at full scale, ids 128-255 run the
    other way, and id → 383 − id for ids ≥ 128 is within 2.6 % of full scale of our decode (5.6 % in the
    s4 convention)."""
    import io

    import soundfile

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "**`mulaw` frames are the model's token ids, not G.711 μ-law bytes.**" in readme
    ids = np.arange(256)

    def g711(data: np.ndarray) -> np.ndarray:
        raw = io.BytesIO(bytes(data.astype(np.uint8).tolist()))
        return soundfile.read(raw, format="RAW", subtype="ULAW", samplerate=8000, channels=1)[0]

    assert g711(np.array([128]))[0] > 0.97  # our silence, full scale in G.711
    assert (np.diff(g711(ids[128:])) < 0).all() and (np.diff(g711(ids[:128])) > 0).all()
    for convention, within in [("s4serve", 0.026), ("s4", 0.056)]:
        ours = MuLaw(convention).decode(ids)
        assert (np.diff(ours) > 0).all()
        mapped = g711(np.where(ids < 128, ids, 383 - ids))
        assert np.abs(mapped - ours).max() < within, convention
