"""Official enwik8 and text8 models served through their vocabularies (model/vocab.py ByteVocab, CharVocab):
prompts are read as the official data were written (enwik8: UTF-8 bytes by their symbols, a newline
dropped; text8: lower-cased characters, any whitespace its space "_"), output streams as those bytes' or
characters' text, and every id equals the library's sampling of the same checkpoint.

Three models: the real train.py run (trainpy_enwik.ckpt, Hamlet in enwik8's format, 68 byte symbols)
converted with its symbols file; make_fixtures.py's enwik8 model (33 symbols, among them the bytes of
two- and three-byte characters, so its output holds partial and invalid UTF-8) converted with --vocab
DATA_DIR; and its text8 model (28 characters) served as the official file itself with the vocab.txt that
`python -m model.vocab` writes beside it. A fourth, version 3's train.py run (trainpy_v3_s4.ckpt), whose
vocabulary has the symbol 10 and so keeps a prompt's newlines, is served for `dropped_characters`."""

from __future__ import annotations

import codecs
import shutil
from pathlib import Path

import httpx
import pytest
from server_support import ServerThread, reference, sse_events, token_ids, ws_turn
from websockets.sync.client import connect

from model.convert import convert
from model.sampling import SamplingParams
from model.vocab import ByteVocab, CharVocab, Vocab, load_vocab
from model.vocab import main as vocab_main
from server.config import Settings

FIX = Path(__file__).resolve().parent / "fixtures" / "official"
PROMPTS = {"hamlet": "To be, or not\nto be", "enwik8": "The sea\nCafé — ", "text8": "The Café\tnaïve "}
NAMES = list(PROMPTS)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("chars")
    convert(FIX / "trainpy_enwik.ckpt", root / "hamlet", vocab=FIX / "trainpy_enwik.vocab.txt")
    convert(FIX / "s4_enwik8.ckpt", root / "enwik8", vocab=FIX / "enwik8_data")
    (root / "text8").mkdir()
    shutil.copy(FIX / "s4_text8.ckpt", root / "text8" / "s4_text8.ckpt")
    assert vocab_main([str(FIX / "text8_data"), str(root / "text8" / "s4_text8.ckpt"),
                       str(root / "text8" / "vocab.txt")]) == 0  # fmt: skip
    entries = {
        "hamlet": root / "hamlet",
        "enwik8": root / "enwik8",
        "text8": root / "text8" / "s4_text8.ckpt",
        # version 3's train.py run: its data's test.txt left it a symbol "10", so a newline is a token
        "v3s4": root / "v3s4",
    }
    convert(FIX / "trainpy_v3_s4.ckpt", root / "v3s4", vocab=FIX / "trainpy_v3.vocab.txt")
    settings = Settings(checkpoints=[f"{k}={v}" for k, v in entries.items()], device="cpu", max_sessions=8,
                        torch_threads=1, convert_cache=str(root / "cache"))  # fmt: skip
    srv = ServerThread(settings).start()
    folders = {name: srv.state.models[name].path for name in NAMES}
    yield srv, folders
    srv.stop()


def vocab_of(served, name) -> Vocab:
    return load_vocab(served[1][name])


def token_spelling(vocab: Vocab, i: int) -> str:
    """OpenAI's spelling of token i: a byte token's byte as the character when ASCII, else "bytes:\\xNN";
    a character token's text."""
    if isinstance(vocab, ByteVocab):
        b = vocab.byte_of[i]
        return chr(b) if b < 128 else f"bytes:\\x{b:02x}"
    return vocab.piece(i)


def test_the_models_say_what_their_tokens_are(served):
    srv, _ = served
    for name, tokens, size in (("hamlet", "vocab_bytes", 68), ("enwik8", "vocab_bytes", 33),
                               ("text8", "characters", 28)):  # fmt: skip
        info = httpx.get(f"{srv.url}/v1/models/{name}").json()
        assert (info["tokens"], info["vocab_size"]) == (tokens, size), info
    assert isinstance(vocab_of(served, "hamlet"), ByteVocab) and isinstance(
        vocab_of(served, "text8"), CharVocab
    )


def test_the_models_say_which_characters_their_prompts_lose(served):
    """/v1/models' `dropped_characters`: an enwik8 vocabulary without the newline byte drops every newline
    of a prompt, one with it (version 3's run, symbol "10") keeps them as tokens, and a text8 model reads
    them as spaces. The demo page's model line and its prompt count read it (they said "newlines dropped"
    of every enwik8 model: a fresh-user trial's version-3 run, whose prompts kept them)."""
    srv, _ = served
    cases = (("hamlet", ["\n"], 7), ("enwik8", ["\n"], 7), ("text8", [], 8), ("v3s4", [], 8))
    for name, dropped, count in cases:
        info = httpx.get(f"{srv.url}/v1/models/{name}").json()
        assert (info["tokens"], info["dropped_characters"]) == (
            "characters" if name == "text8" else "vocab_bytes",
            dropped,
        ), info
        r = httpx.post(f"{srv.url}/tokenize", json={"model": name, "prompt": "to be\nor"}).json()
        assert (r["count"], r["dropped"]) == (count, dropped), r
    listed = {m["id"]: m["dropped_characters"] for m in httpx.get(f"{srv.url}/v1/models").json()["data"]}
    assert listed == {"hamlet": ["\n"], "enwik8": ["\n"], "text8": [], "v3s4": []}


@pytest.mark.parametrize("name", NAMES)
def test_a_websocket_stream_is_the_library_s_tokens_and_their_text(served, name):
    """The prompt is read as the data were written (hamlet's and enwik8's newline dropped; text8 lower-cased,
    its tab a space), the ids are the library's, and the streamed text is their bytes' UTF-8 (a character
    split across tokens arrives whole; an unfinished one at the turn's end is held for the session's next
    turn)."""
    srv, folders = served
    vocab = vocab_of(served, name)
    prompt = PROMPTS[name]
    with connect(srv.ws_url) as ws:
        frames = ws_turn(
            ws, {"type": "generate", "model": name, "prompt": prompt, "max_new_tokens": 40, "seed": 3}
        )
    ids, done = token_ids(frames), frames[-1]
    text = "".join(f["text"] for f in frames if f["type"] == "token")
    assert done["type"] == "done" and done["usage"]["prompt_tokens"] == len(vocab.encode(prompt)), done
    assert len(vocab.encode(prompt)) == {"hamlet": 18, "enwik8": 17, "text8": 15}[name]
    assert ids == reference(folders[name], vocab.encode(prompt), SamplingParams(seed=3), 40)
    held = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(vocab.token_bytes(ids))
    assert text == held, (text, vocab.decode(ids), held)


def test_the_enwik8_model_s_output_has_characters_split_across_tokens(served):
    """(What makes the stream test above check the holding back: its ids include the lead byte of a
    multi-byte character, 0xC3 or 0xE2, and its continuation bytes.)"""
    srv, folders = served
    vocab = vocab_of(served, "enwik8")
    ids = reference(folders["enwik8"], vocab.encode(PROMPTS["enwik8"]), SamplingParams(seed=3), 40)
    data = vocab.token_bytes(ids)
    assert any(b >= 0xC0 for b in data) and any(0x80 <= b < 0xC0 for b in data), data


@pytest.mark.parametrize("name", NAMES)
def test_completions_logprobs_spell_each_token_at_its_character(served, name):
    """Echoed prompt and generated tokens: a byte token is spelled as OpenAI spells bytes (the character
    when ASCII, else "bytes:\\xNN"), a character token as its text; each offset is the index in the text
    of the character its (first) byte belongs to; the top alternatives are tokens of the vocabulary."""
    srv, folders = served
    vocab = vocab_of(served, name)
    prompt = PROMPTS[name]
    body = {"model": name, "prompt": prompt, "max_tokens": 12, "seed": 2, "logprobs": 3, "echo": True}
    choice = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    lp, text = choice["logprobs"], choice["text"]
    ids = vocab.encode(prompt) + reference(folders[name], vocab.encode(prompt), SamplingParams(seed=2), 12)
    spell = [token_spelling(vocab, i) for i in ids]
    if isinstance(vocab, ByteVocab):
        starts = [len(vocab.token_bytes(ids[:k]).decode("utf-8", errors="ignore")) for k in range(len(ids))]
    else:
        starts = [len(vocab.decode(ids[:k])) for k in range(len(ids))]
    assert lp["tokens"] == spell and text == vocab.decode(ids)
    n = len(vocab.encode(prompt))  # the prompt's offsets (valid UTF-8: `ignore` drops only a split character)
    assert lp["text_offset"][:n] == starts[:n], (lp["text_offset"], starts)
    for token, offset in zip(lp["tokens"], lp["text_offset"], strict=True):
        if not token.startswith("bytes:"):
            assert text[offset : offset + len(token)] == token
    every = {token_spelling(vocab, i) for i in range(len(vocab))}
    assert all(set(top) <= every for top in lp["top_logprobs"][1:]) and len(every) == len(vocab)


STOPS = [("hamlet", "e "), ("enwik8", "é"), ("enwik8", "Ω"), ("enwik8", "\u2bfc"), ("text8", "e "),
         ("text8", "ï")]  # fmt: skip


@pytest.mark.parametrize(("name", "stop"), STOPS)
def test_stop_sequences_match_the_text_across_tokens(served, name, stop):
    """The text ends where the stop sequence starts, the generation at the token that completes it (for
    "é" and "Ω", two byte tokens, for "\u2bfc" three); without the stop the same seed gives the same tokens
    up to there."""
    srv, folders = served
    vocab = vocab_of(served, name)
    ids = vocab.encode(PROMPTS[name])
    for seed in range(200):  # the first seed whose 60 tokens hold the stop sequence
        free = reference(folders[name], ids, SamplingParams(seed=seed), 60)
        if (at := (full := vocab.token_bytes(free)).find(stop.encode())) >= 0:
            break
    assert at >= 0, stop
    n = next(k for k in range(len(free) + 1) if len(vocab.token_bytes(free[:k])) >= at + len(stop.encode()))
    body = {"model": name, "prompt": PROMPTS[name], "max_new_tokens": 60, "seed": seed, "stop": [stop]}
    r = httpx.post(f"{srv.url}/v1/generate", json=body, timeout=60).json()
    assert r["finish_reason"] == "stop" and r["tokens"] == free[:n], (r, free)
    assert r["text"] == full[:at].decode("utf-8", errors="replace")
    streamed = {
        "model": name,
        "prompt": PROMPTS[name],
        "max_tokens": 60,
        "seed": seed,
        "stop": [stop],
        "stream": True,
    }
    with httpx.stream("POST", f"{srv.url}/v1/completions", json=streamed, timeout=60) as s:
        chunks = [e for e in sse_events(s) if e != "[DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == r["text"]


@pytest.mark.parametrize(
    ("name", "prompt", "named"),
    [
        ("hamlet", "To be é", "character 'é' is not in the vocabulary"),
        ("enwik8", "the x and 日", "characters 'x', 'd', '日' are not in the vocabulary"),
        ("text8", "Yes, x", "characters 'Y', 'x' are not in the vocabulary"),
    ],
)
def test_a_character_the_vocabulary_lacks_is_refused_by_name_on_every_route(served, name, prompt, named):
    srv, _ = served
    vocab = vocab_of(served, name)
    with pytest.raises(ValueError, match=named):
        vocab.encode(prompt)
    for path, body, status in (
        ("/v1/generate", {"model": name, "prompt": prompt, "max_new_tokens": 2}, 422),
        ("/v1/completions", {"model": name, "prompt": prompt, "max_tokens": 2}, 400),
        ("/tokenize", {"model": name, "prompt": prompt}, 400),
    ):
        r = httpx.post(f"{srv.url}{path}", json=body, timeout=60)
        assert r.status_code == status and f"prompt: {named}" in r.text, (path, r.text)
    with connect(srv.ws_url) as ws:
        frames = ws_turn(ws, {"type": "generate", "model": name, "prompt": prompt, "max_new_tokens": 2})
        assert frames[-1]["type"] == "error" and named in frames[-1]["message"], frames
        ok = ws_turn(ws, {"type": "generate", "model": name, "prompt": PROMPTS[name], "max_new_tokens": 2})
        assert ok[-1]["type"] == "done", ok


@pytest.mark.parametrize("name", NAMES)
def test_a_prompt_far_over_the_limit_is_refused_before_the_vocabulary_reads_it(served, monkeypatch, name):
    """A character vocabulary reads a text one character at a time in Python (16 MiB of letters: 6 s of the
    event loop, every stream paused); a prompt of more characters than twice max_prompt_tokens (8,192 by
    default), each at least one token, is refused before any vocabulary reads it, naming its length."""
    srv, _ = served
    vocab_class = type(vocab_of(served, name))
    read = []
    encode = vocab_class.encode
    monkeypatch.setattr(
        vocab_class, "encode", lambda self, text: read.append(len(text)) or encode(self, text)
    )
    prompt = "the " * 10_000  # 40,000 characters
    for path, status in (("/v1/generate", 413), ("/tokenize", 400)):
        r = httpx.post(f"{srv.url}{path}", json={"model": name, "prompt": prompt}, timeout=60)
        assert r.status_code == status and "prompt is at least 40000 tokens; the limit is 8192" in r.text, (
            r.text
        )
    assert read == [], read


def test_tokenize_and_detokenize_read_and_write_as_the_text_routes(served):
    """/tokenize reads as every text route does and lists the characters the vocabulary dropped (enwik8's
    newlines); /detokenize writes the ids back as the routes write them."""
    srv, _ = served
    for name in NAMES:
        vocab = vocab_of(served, name)
        body = {"model": name, "prompt": PROMPTS[name], "return_token_strs": True}
        r = httpx.post(f"{srv.url}/tokenize", json=body).json()
        assert r["tokens"] == vocab.encode(PROMPTS[name]) and r["unknown_words"] == [], r
        assert r["dropped"] == (["\n"] if name != "text8" else []), r
        back = httpx.post(f"{srv.url}/detokenize", json={"model": name, "tokens": r["tokens"]}).json()
        assert back["prompt"] == vocab.decode(r["tokens"]), back


def test_a_prompt_of_newlines_only_is_refused_on_an_enwik8_model_saying_why(served):
    """Every text route refuses it (422, 400 on the OpenAI routes) rather than calling it empty, and a
    session is not created from it; to a text8 model the same newlines are spaces."""
    srv, _ = served
    why = "prompt: it holds only newlines, which this enwik8 model drops"
    for path, body, status in (
        ("/v1/completions", {"model": "enwik8", "prompt": "\n\n", "max_tokens": 2}, 400),
        ("/v1/generate", {"model": "enwik8", "prompt": "\n", "max_new_tokens": 2}, 422),
        ("/v1/sessions", {"model": "enwik8", "prompt": "\n"}, 422),
        ("/tokenize", {"model": "hamlet", "prompt": "\n"}, 400),
    ):
        r = httpx.post(f"{srv.url}{path}", json=body, timeout=60)
        assert r.status_code == status and why in r.text, (path, r.text)
    r = httpx.post(f"{srv.url}/tokenize", json={"model": "text8", "prompt": "\t\n"}).json()
    assert r["tokens"] == [load_vocab(served[1]["text8"]).index["_"]] * 2, r


def test_an_official_run_folder_is_told_to_name_its_checkpoint(tmp_path):
    """S4_CHECKPOINTS naming the run's folder (a trial's: the server said "config.json: missing", the
    converter names the file to give): refused naming its official checkpoints, last.ckpt first."""
    from model.checkpoint import CheckpointError  # noqa: PLC0415
    from server.registry import resolve_entry  # noqa: PLC0415

    run = tmp_path / "run"
    (run / "checkpoints" / "val").mkdir(parents=True)
    for f in ("checkpoints/val/loss.ckpt", "checkpoints/last.ckpt"):
        shutil.copy(FIX / "trainpy_enwik.ckpt", run / f)
    settings = Settings(checkpoints=[str(run)], device="cpu", convert_cache=str(tmp_path / "cache"))
    with pytest.raises(CheckpointError) as exc:
        resolve_entry(str(run), settings)
    assert (
        f"{run}: no config.json: not a checkpoint folder, but it holds official checkpoints: name the file "
        f"({run / 'checkpoints' / 'last.ckpt'}, {run / 'checkpoints' / 'val' / 'loss.ckpt'})"
        in str(exc.value)
    )
