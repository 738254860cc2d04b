"""model/quality.py: the word share and voicing measures the model cards report."""

import numpy as np
import pytest
from conftest import devices

from model.quality import frame_stats, lexicon, voiced_share, word_share, words

SR = 8000


def test_words_keep_inner_apostrophes_and_lower_case():
    assert words("O ROMEO, thou'rt\nthe 'king' o' the ne'er-do-well.") == [
        "o", "romeo", "thou'rt", "the", "king", "o", "the", "ne'er", "do", "well",
    ]  # fmt: skip
    # cut: a sample cut at n bytes; a last word that reaches its end (or an apostrophe there) may be cut
    assert words("the king th", cut=True) == ["the", "king"] and words("o'", cut=True) == []
    assert words("the king ", cut=True) == words("the king.", cut=True) == ["the", "king"]


def test_lexicon_drops_one_off_words_and_word_share_counts_against_it():
    vocab = lexicon(["the king the king", "a queen queen xyzzy"], min_count=2)
    assert vocab == {"the", "king", "queen"}
    share, n = word_share("The king and the fool", vocab)
    assert (share, n) == (3 / 5, 5)
    assert word_share("?!", vocab) == (0.0, 0)
    with pytest.raises(ValueError, match="min_count"):
        lexicon(["a"], min_count=0)


def _reference_peak(frame: np.ndarray, lo: int, hi: int) -> float:
    """np.correlate over the mean-removed frame, normalized by the overlapping parts' energies."""
    a = frame - frame.mean()
    best = 0.0
    for lag in range(lo, hi + 1):
        num = np.correlate(a[lag:], a[:-lag], mode="valid")[0]
        den = np.sqrt(np.sum(a[:-lag] ** 2) * np.sum(a[lag:] ** 2))
        best = max(best, num / den if den > 0 else 0.0)
    return best


def test_frame_stats_match_a_direct_autocorrelation():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(8000) * np.hanning(8000) + np.sin(2 * np.pi * 130 * np.arange(8000) / SR)
    rms, peak = frame_stats(x, SR)
    n = 256  # 32 ms at 8 kHz
    assert len(rms) == 8000 // n
    for i in (0, 7, 30):
        f = x[i * n : (i + 1) * n]
        assert rms[i] == pytest.approx(np.std(f), rel=1e-12)
        assert peak[i] == pytest.approx(_reference_peak(f, 20, 100), abs=1e-12)
    with pytest.raises(ValueError, match="too short"):
        frame_stats(x, SR, frame_s=0.01)


def test_a_harmonic_voice_is_voiced_noise_and_silence_are_not():
    t = np.arange(SR) / SR
    rng = np.random.default_rng(1)
    voice = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 8)) * 0.2  # 140 Hz, 7 harmonics
    voice = voice + 0.01 * rng.standard_normal(SR)
    assert voiced_share([voice], SR)["voiced_share"] == 1.0
    noise = 0.3 * rng.standard_normal(SR)
    r = voiced_share([noise], SR)
    assert r["loud_frames"] == SR // 256 and r["voiced_share"] == 0.0
    # a word in silence: only the word's frames are loud
    clip = np.zeros(SR)
    clip[2560:5120] = voice[2560:5120]
    r = voiced_share([clip, np.zeros(SR)], SR)
    assert r["loud_frames"] == 10 and r["voiced_share"] == 1.0
    assert voiced_share([np.zeros(SR)], SR)["voiced_share"] == 0.0


def test_card_generation_batches_rows_without_coupling_them():
    """model.card.generate steps prompts of one length as a batch; each row must equal that prompt
    generated alone with the same seed (own generator per row), within float32 batch noise: the
    tokens are compared exactly at a temperature where near-ties are unlikely."""
    import dataclasses

    import torch

    from model import ModelConfig, SequenceModel
    from model.card import generate
    from model.sampling import SamplingParams

    torch.manual_seed(0)
    rec = SequenceModel(ModelConfig(d_model=32, n_layers=2, d_state=16, l_max=64)).eval().to_recurrent()
    params = SamplingParams(temperature=0.7, seed=5)
    prompts = [[10, 20], [30, 40], [50]]
    together = generate(rec, prompts, 12, params)

    alone = [
        generate(rec, [p], 12, dataclasses.replace(params, seed=5 + i))[0] for i, p in enumerate(prompts)
    ]
    assert together == alone
    assert len({tuple(t) for t in together}) == 3


@pytest.mark.parametrize("device", devices())
def test_card_generation_and_recurrent_nll_run_on_the_models_device(device):
    """model.card's generate and recurrent_nll_bits built their token tensors on the CPU, and the recurrent
    form refuses tokens on another device than its own: on a CUDA model both raised. Here they run on
    `device` (CUDA where present, for scripts/gpu-check) and give the CPU's answer: greedy tokens equal, the
    shipped text model's eval-slice NLL the card's within 1e-3 bits."""
    import json
    from pathlib import Path

    import torch

    from model import ModelConfig, SequenceModel, load
    from model.card import generate, recurrent_nll_bits
    from model.data import Dataset
    from model.sampling import SamplingParams

    torch.manual_seed(0)
    net = SequenceModel(ModelConfig(d_model=32, n_layers=2, d_state=16, l_max=64)).eval()
    greedy = SamplingParams(temperature=0.0, seed=1)
    want = generate(net.to_recurrent(), [[10, 20], [30]], 8, greedy)
    assert generate(net.to(device).to_recurrent(), [[10, 20], [30]], 8, greedy) == want
    ckpt = Path(__file__).resolve().parent.parent / "checkpoints" / "text-shakespeare"
    sl = json.loads((ckpt / "config.json").read_text())["eval_slice"]
    data = Dataset(ckpt / sl["path"])
    rec = load(ckpt).eval().to(device).to_recurrent()
    bits = recurrent_nll_bits(rec, data, data.split("test"), sl["seq_len"])
    assert bits == pytest.approx(sl["recurrent_bits_per_token"], abs=1e-3)


@pytest.mark.parametrize("snr_db", [0.0, 5.0, 10.0, 15.0, 20.0])
def test_median_hnr_is_the_tone_to_noise_ratio(snr_db):
    """A 200 Hz tone in white noise at a known SNR: the median HNR over its frames, 10 log10(r / (1 − r))
    of the autocorrelation peak r, is that SNR within 1 dB (measured: +0.8 dB at 0 dB, where the
    maximum over lags lifts r, ≤ 0.2 dB from 5 to 20 dB); strongly harmonic (r > 0.9, HNR > 9.5 dB)
    are all frames at 15 dB and above, none at 5 dB and below."""
    t = np.arange(2 * SR) / SR
    noise = np.random.default_rng(0).standard_normal(len(t)) * np.sqrt(0.5 / 10 ** (snr_db / 10))
    r = voiced_share([0.3 * (np.sin(2 * np.pi * 200 * t) + noise)], SR)
    assert abs(r["hnr_db_median"] - snr_db) <= 1.0, r
    if snr_db >= 15:
        assert r["harmonic_share"] == 1.0
    if snr_db <= 5:
        assert r["harmonic_share"] == 0.0
    assert voiced_share([np.zeros(SR)], SR)["hnr_db_median"] is None


def test_a_cards_samples_show_control_characters_as_their_pictures():
    """A weak model writes ESC and other C0 bytes: the card shows each as its Unicode control picture
    (U+2400 + code, DEL U+2421), so no terminal acts on it and grep reads the card as text; newlines,
    tabs and every other character are kept."""
    from model.card import shown

    assert shown("a\x1b[0m\nb\tc\x7f\x00\r é") == "a\u241b[0m\nb\tc\u2421\u2400\u240d é"
    assert all(shown(chr(c)) == chr(0x2400 + c) for c in range(32) if chr(c) not in "\n\t")
    assert shown("plain text, ok") == "plain text, ok"


@pytest.mark.parametrize(
    "penalties",
    [
        dict(repetition_penalty=1.3),
        dict(presence_penalty=1.5, frequency_penalty=0.8),
        dict(repetition_penalty=0.7),
    ],
)
def test_card_generation_applies_the_penalties_as_the_server_does(penalties):
    """model.card.generate takes SamplingParams whole: a row's repetition penalty counts its prompt and the
    tokens generated so far as seen, and its presence/frequency penalties count the tokens generated, as the
    server's engine does (server/engine.py; its tokens equal `server_support.reference` at the same seed,
    tests/test_server_http.py). Each row must equal a loop that passes `sample` those sets, token for token,
    and with the penalties the tokens must differ from those without (so the test sees them applied)."""
    import torch

    from model import ModelConfig, SequenceModel
    from model.card import generate
    from model.sampling import SamplingParams, sample

    torch.manual_seed(0)
    rec = SequenceModel(ModelConfig(d_model=32, n_layers=2, d_state=16, l_max=64)).eval().to_recurrent()
    params = SamplingParams(temperature=0.5, seed=3, **penalties)
    prompts, n = [[10, 20, 10], [30, 40, 30]], 24
    got = generate(rec, prompts, n, params)

    V = rec.config.vocab_size
    for i, prompt in enumerate(prompts):
        p = SamplingParams(temperature=0.5, seed=3 + i, **penalties)
        gen = p.generator()
        logits, state = rec.prefill(torch.tensor([prompt]), rec.init_state(1))
        logits = logits[:, -1]
        seen = torch.zeros(1, V, dtype=torch.bool)
        seen[0, prompt] = True
        counts = torch.zeros(1, V)
        want = []
        for _ in range(n):
            tok = sample(logits, [p], [gen], seen, counts)
            want.append(int(tok))
            seen[0, tok] = True
            counts[0, tok] += 1
            logits, state = rec.step(tok, state)
        assert got[i] == want, (i, got[i], want)
    plain = generate(rec, prompts, n, SamplingParams(temperature=0.5, seed=3))
    assert got != plain


def test_card_generation_takes_params_without_a_seed_and_refuses_what_it_cannot_use():
    """SamplingParams() has no seed (each sequence a random key, as the server's requests without one): every
    row then draws from its own random stream, n tokens each. An empty prompt (no logits to sample the
    first token from), a negative or non-integer n are refused by name (ValueError) before any work."""
    import torch

    from model import ModelConfig, SequenceModel
    from model.card import generate
    from model.sampling import SamplingParams

    torch.manual_seed(0)
    rec = SequenceModel(ModelConfig(d_model=32, n_layers=2, d_state=16, l_max=64)).eval().to_recurrent()
    outs = generate(rec, [[1, 2], [3, 4], [5]], 6, SamplingParams())
    assert [len(o) for o in outs] == [6, 6, 6]
    assert all(0 <= t < rec.config.vocab_size for o in outs for t in o)
    for prompts, n, says in (([[1], []], 4, "prompts\\[1\\] is empty"), ([[1]], -1, "n must"),
                             ([[1]], 2.5, "n must")):  # fmt: skip
        with pytest.raises(ValueError, match=says):
            generate(rec, prompts, n, SamplingParams(seed=0))


class _Typist:
    """A stand-in recurrent form that writes `text` over and over from its first byte on: its logits put 60
    on the next byte of `text` and 0 elsewhere, so any temperature near 1 samples that byte."""

    def __init__(self, text: str):
        self.text = text.encode()

    def _logits(self, pos):
        import torch

        out = torch.zeros(len(pos), 256)
        out[torch.arange(len(pos)), torch.tensor([self.text[int(p) % len(self.text)] for p in pos])] = 60.0
        return out

    def init_state(self, batch: int):
        import torch

        return torch.zeros(batch, dtype=torch.long)

    def prefill(self, tokens, state):
        return self._logits(state)[:, None], state

    def step(self, tokens, state, out=None):
        state = state + 1
        return self._logits(state), state


@pytest.mark.parametrize("n", [11, 9])
def test_a_cards_word_share_leaves_out_a_word_its_samples_length_cut(tmp_path, n):
    """The text card's dictionary-word share scores samples of n generated bytes; a sample whose n bytes end
    inside a word ("the king th" of a model writing "the king the king") counted that piece ("th") as an
    invented word, lowering the share (the shipped card's 16 samples of 1,000 bytes: 97.5 % of 3,059 words,
    97.6 % of 3,046 without their 13 cut pieces). A last word that reaches the sample's end is now left out;
    one that a space ends is counted."""
    from model.card import text_word_share
    from model.data import Dataset, write_splits

    play = np.frombuffer(b"the king the king and the queen\n" * 4, dtype=np.uint8)
    write_splits(tmp_path, {"train": play, "val": play, "test": play}, {"kind": "text"})
    rec = _Typist("the king ")
    got = text_word_share(rec, Dataset(tmp_path), seed=0, samples=2, n=n)
    # each sample is "the king th" (n = 11) or "the king " (n = 9): two dictionary words either way
    assert got["generated"] == 1.0 and got["generated_words"] == 2 * 2, got


def test_a_cards_model_table_lists_only_the_fields_the_model_uses():
    """The card's "## Model" table listed every ModelConfig field: the isotropic text model's card said
    `pool | [4, 4]`, `expand | 2`, `ff | 2`, `unet | False` (SaShiMi's, read by model/arch/sashimi.py alone)
    and `mulaw | s4serve` (the audio codec's), which describe nothing in it (a review's note). The table
    leaves out the fields the model does not use; the shipped cards' tables name none of them."""
    import json
    from pathlib import Path

    from model.card import AUDIO_ONLY, SASHIMI_ONLY, card_fields
    from model.network import ModelConfig

    base = dict(vocab_size=256, d_model=8, n_layers=2, d_state=4, l_max=64)
    text = card_fields(ModelConfig(**base))
    audio_sashimi = card_fields(ModelConfig(**base, modality="audio", sample_rate=8000, arch="sashimi"))
    audio_iso = card_fields(ModelConfig(**base, modality="audio", sample_rate=8000))
    assert not set(text) & {*SASHIMI_ONLY, *AUDIO_ONLY} and {"d_model", "norm", "arch"} <= set(text), text
    assert {*SASHIMI_ONLY, "sample_rate", "mulaw"} <= set(audio_sashimi), audio_sashimi
    assert not set(audio_iso) & set(SASHIMI_ONLY) and {"sample_rate", "mulaw"} <= set(audio_iso), audio_iso
    assert audio_sashimi["pool"] == [4, 4] and audio_iso["sample_rate"] == 8000
    root = Path(__file__).resolve().parent.parent / "checkpoints"
    for name in ("text-shakespeare", "audio-digits", "audio-digits-s4"):
        cfg = ModelConfig.from_dict(json.loads((root / name / "config.json").read_text())["config"])
        table = (root / name / "README.md").read_text().split("## Model", 1)[1].split("\n## ", 1)[0]
        rows = {line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")}
        unused = set(cfg.to_dict()) - set(card_fields(cfg))
        assert rows & set(cfg.to_dict()) and not rows & unused, (name, rows & unused)
