"""A word-level text model served through its vocabulary (a checkpoint with vocab.txt, model/vocab.py):
prompts are encoded into its words, output streams as the words' text, stop sequences match that text
(also across and inside words), logprobs name the words and their character offsets, and every id
equals the library's sampling of the same checkpoint.

Two models: the official scaled-down WikiText-103 recipe converted with its vocabulary (adaptive input and
softmax, computed in the whole-network C step), and a plain-head stand-in with the same vocabulary; the C
step and its native decode blocks serve both. Those blocks match stop sequences on ids as bytes, so rows
with stop sequences must take the one-step loop (a byte match of "\\n" would stop at id 10)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from server_support import ServerThread, reference, sse_events, steps_held_until, token_ids, ws_turn
from websockets.sync.client import connect

from model import checkpoint
from model.convert import convert
from model.network import ModelConfig, SequenceModel
from model.sampling import SamplingParams
from model.vocab import VOCAB_FILE, WordVocab, load_vocab
from server.config import Settings

FIX = Path(__file__).resolve().parent / "fixtures" / "official"
DATA = FIX / "wt103_data"
PROMPT = " = w1 w2 zebra\n The"  # "zebra" is not a word of it: <unk>


def plain_word_model(folder: Path) -> Path:
    """A 64-word model with a plain Linear head (the C step serves it), with the wt103 fixture's vocab."""
    torch.manual_seed(7)
    net = SequenceModel(ModelConfig(vocab_size=64, d_model=16, n_layers=2, d_state=8, l_max=32, d_ff=32,
                                    head_bias=True, cauchy_backend="torch")).eval()  # fmt: skip
    with torch.no_grad():
        net.head.weight.mul_(4)  # a peakier distribution than at initialization
    vocab = WordVocab.from_dataset(DATA, "wt103")
    folder.mkdir(parents=True)
    sha = vocab.write(folder / VOCAB_FILE)
    chat = "{% for m in messages %}{{ m.content }}\n{% endfor %}{% if add_generation_prompt %} ={% endif %}"
    extra = {"vocab": {**vocab.describe(), "sha256": sha}, "chat_template": chat, "chat_stop": ["\n"]}
    return checkpoint.save(net, folder, extra=extra)


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    root = tmp_path_factory.mktemp("words")
    convert(FIX / "s4_wt103.ckpt", root / "wt103", vocab=DATA)
    folders = {"wt103": root / "wt103", "plain": plain_word_model(root / "plain")}
    settings = Settings(checkpoints=[f"{k}={v}" for k, v in folders.items()], device="cpu", max_sessions=8,
                        torch_threads=1, max_prompt_tokens=12)  # fmt: skip
    srv = ServerThread(settings).start()
    yield srv, folders
    srv.stop()


def test_the_models_say_their_tokens_are_words_and_both_run_the_native_blocks(words):
    srv, _ = words
    for name in ("wt103", "plain"):
        info = httpx.get(f"{srv.url}/v1/models/{name}").json()
        assert info["tokens"] == "words" and info["vocab_size"] == 64, info
        assert srv.state.models[name].rec.decode_block_ready(1), name


@pytest.mark.parametrize("name", ["wt103", "plain"])
def test_a_websocket_stream_is_the_library_s_words_and_their_text(words, name):
    srv, folders = words
    vocab = load_vocab(folders[name])

    with connect(srv.ws_url) as ws:
        frames = ws_turn(
            ws, {"type": "generate", "model": name, "prompt": PROMPT, "max_new_tokens": 30, "seed": 3}
        )
    ids, done = token_ids(frames), frames[-1]
    text = "".join(f["text"] for f in frames if f["type"] == "token")
    assert done["type"] == "done" and done["usage"]["prompt_tokens"] == 6, done
    assert ids == reference(folders[name], vocab.encode(PROMPT), SamplingParams(seed=3), 30)
    assert text == vocab.decode(ids)


@pytest.mark.parametrize("name", ["wt103", "plain"])
@pytest.mark.parametrize("stop", ["\n", "2 w", "w1", " ", "\n w"])
@pytest.mark.parametrize("room", [True, False])
def test_stop_sequences_match_the_words_text_at_and_across_word_boundaries(words, name, stop, room):
    """The text ends where the stop sequence starts (inside a word's text too), the generation at the
    token that completes it; without the stop the same seed gives the same tokens up to there. The same
    when that token is the last max_new_tokens allows (`room` False): a word model's stops run in the
    one-step loop, which answered "length" with the stop in the text then (a helper's audit)."""
    srv, folders = words
    vocab = load_vocab(folders[name])
    ids = vocab.encode(PROMPT)
    for seed in range(50):  # the first seed whose 60 tokens hold the stop sequence
        free = reference(folders[name], ids, SamplingParams(seed=seed), 60)
        if (at := (full := vocab.decode(free)).find(stop)) >= 0:
            break
    assert at >= 0, stop
    ends, n = 0, 0
    while ends < at + len(stop):  # tokens up to the one that completes the stop sequence
        ends, n = ends + len(vocab.piece(free[n])), n + 1
    body = {
        "model": name,
        "prompt": PROMPT,
        "max_new_tokens": 60 if room else n,
        "seed": seed,
        "stop": [stop],
    }
    r = httpx.post(f"{srv.url}/v1/generate", json=body, timeout=60).json()
    assert r["finish_reason"] == "stop" and r["tokens"] == free[:n], (r, free)
    assert r["text"] == full[:at]


@pytest.mark.parametrize("name", ["wt103", "plain"])
def test_completions_logprobs_name_the_words_at_their_character_offsets(words, name):
    srv, folders = words
    vocab = load_vocab(folders[name])
    body = {"model": name, "prompt": PROMPT, "max_tokens": 8, "seed": 2, "logprobs": 3, "echo": True}
    choice = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    lp, text = choice["logprobs"], choice["text"]
    ids = vocab.encode(PROMPT) + reference(folders[name], vocab.encode(PROMPT), SamplingParams(seed=2), 8)
    assert lp["tokens"] == [vocab.piece(i) for i in ids]
    assert text == vocab.decode(ids)  # (the prompt as its words read back: "zebra" is <unk>)
    for token, offset in zip(lp["tokens"], lp["text_offset"], strict=True):
        assert text[offset : offset + len(token)] == token
    assert all(set(top) <= {vocab.piece(i) for i in range(64)} for top in lp["top_logprobs"][1:])


@pytest.mark.parametrize("name", ["wt103", "plain"])
def test_log_probabilities_are_the_same_alone_and_beside_rows_with_stop_sequences(words, name, monkeypatch):
    """A word-level model's rows with stop sequences decode one step at a time (the native block matches
    stops on bytes), and take their batch with them: the batch's log-probabilities then came from torch's
    log_softmax, not the block's C computation, and moved in their last bit (a trial: 52-70 of 300-400
    values, the tokens the same). Now `token_logprobs` runs the block's computation on the CPU: a request's
    logprobs are the same bits alone and among three long requests whose stop never comes."""
    import concurrent.futures

    srv, _ = words
    body = {"model": name, "prompt": PROMPT, "max_tokens": 120, "seed": 7, "logprobs": 5}
    url = f"{srv.url}/v1/completions"
    alone = httpx.post(url, json=body, timeout=120).json()["choices"][0]["logprobs"]
    others = [{**body, "seed": 100 + i, "max_tokens": 400, "stop": ["never-a-word"], "logprobs": None}
              for i in range(3)]  # fmt: skip
    # The others decode only once the request has been submitted too, so it joins them whatever the
    # machine's speed (they were given 50 ms of a head start: on a fast machine they could be done, on a slow
    # one not yet begun, and the request then ran alone), and the batch is seen to hold all four.
    live = steps_held_until(monkeypatch, srv.state.models[name].engine, 1 + len(others))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        started = [pool.submit(httpx.post, url, json=o, timeout=120) for o in others]
        batched = (
            pool.submit(httpx.post, url, json=body, timeout=120).result().json()["choices"][0]["logprobs"]
        )
        assert all(f.result().status_code == 200 for f in started)
    assert max(live) == 1 + len(others), live  # the request decoded beside the three
    assert batched["tokens"] == alone["tokens"]
    assert batched["token_logprobs"] == alone["token_logprobs"]
    assert batched["top_logprobs"] == alone["top_logprobs"]


@pytest.mark.parametrize("name", ["wt103", "plain"])
def test_tokenize_names_the_words_the_vocabulary_lacks(words, name):
    """/tokenize (vLLM's) reads a prompt into a word model's words as every text route does, and names the
    words its vocabulary lacks, which those routes read as `<unk>` without saying so ("zebra" here; "the."
    is another, WikiText writing "the ."); /detokenize writes the ids back as the routes write them."""
    srv, folders = words
    vocab = load_vocab(folders[name])
    prompt = PROMPT + " the. the ."
    r = httpx.post(f"{srv.url}/tokenize", json={"model": name, "prompt": prompt, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == vocab.encode(prompt) and body["count"] == len(body["tokens"])
    assert body["token_strs"] == [vocab.piece(i) for i in body["tokens"]]
    assert body["unknown_words"] == ["zebra", "the."] and body["max_model_len"] == 12
    assert vocab.unk_id in body["tokens"]
    back = httpx.post(f"{srv.url}/detokenize", json={"model": name, "tokens": body["tokens"]}).json()
    assert back["prompt"] == "".join(vocab.piece(i) for i in body["tokens"])
    r = httpx.post(f"{srv.url}/tokenize", json={"model": name, "prompt": " w1" * 13})  # 13 words > 12
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text


def test_a_prompt_is_limited_in_words_not_characters(words):
    srv, _ = words
    long_words = "w1 " * 12 + "w2"  # 13 words, 38 characters
    r = httpx.post(f"{srv.url}/v1/generate", json={"model": "wt103", "prompt": long_words}, timeout=60)
    assert r.status_code == 413 and "prompt is 13 tokens" in r.text, r.text
    spaced = "w1" + " " * 30 + "w2"  # 2 words in 32 characters: under the limit of 12 tokens
    r = httpx.post(f"{srv.url}/v1/generate", json={"model": "wt103", "prompt": spaced, "max_new_tokens": 2},
                   timeout=60)  # fmt: skip
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 2, r.text


@pytest.mark.parametrize(
    "prompt, least",
    [
        ("\n" * 200_000, 200_000),
        ("w1 " * 200_000, 25),
        (" w1\n" * 13, 26),
        ("w1" + " " * 200_000 + "w2\n" * 25, 50),
    ],
)
def test_a_prompt_far_over_the_limit_is_refused_before_the_vocabulary_reads_it(
    words, monkeypatch, prompt, least
):
    """A word vocabulary reads a text in Python, in time that grows with the text (16 MiB of newlines took
    12 s, the event loop held: every stream paused, the probes unanswered), so a prompt of more than twice
    max_prompt_tokens (12 here) is refused by its count of words (counted up to 25) and newlines before it
    is read, on every route that takes a text prompt: "at least" that many tokens. One nearer the limit
    is read and its count named (test_a_prompt_is_limited_in_words_not_characters)."""
    srv, _ = words
    read = []
    encode = WordVocab.encode
    monkeypatch.setattr(WordVocab, "encode", lambda self, text: read.append(len(text)) or encode(self, text))
    said = f"is at least {least} tokens; the limit is 12"
    for path, body, status in (
        ("/v1/generate", {"model": "wt103", "prompt": prompt}, 413),
        ("/v1/sessions", {"model": "plain", "prompt": prompt}, 413),
        ("/v1/completions", {"model": "wt103", "prompt": [" w1", prompt]}, 400),
        ("/tokenize", {"model": "plain", "prompt": prompt}, 400),
    ):
        r = httpx.post(f"{srv.url}{path}", json=body, timeout=60)
        assert r.status_code == status and said in r.text, (path, r.text[:300])
    with connect(srv.ws_url) as ws:
        frames = ws_turn(ws, {"type": "generate", "model": "wt103", "prompt": prompt})
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == 413 and said in frames[-1]["message"], (
        frames
    )
    # chat: the plain model's template renders the message as its line, then " =" (a word and a newline more)
    body = {"model": "plain", "messages": [{"role": "user", "content": prompt}]}
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
    assert r.json()["error"]["param"] == "messages" and "messages is at least" in r.text, r.text[:300]
    assert read == [3], read  # (the completions' first prompt, " w1": the only text read)


@pytest.mark.parametrize("name", ["wt103", "plain"])
def test_streamed_completions_release_whole_words_with_their_logprobs(words, name):
    """SSE: the chunks' text adds up to the answer's, and each chunk's logprobs name exactly the words
    whose text it released (a stop sequence's possible start is held back until it is decided)."""
    srv, folders = words
    vocab = load_vocab(folders[name])
    body = {"model": name, "prompt": PROMPT, "max_tokens": 20, "seed": 4, "logprobs": 1, "stop": ["w0 w"]}
    whole = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    with httpx.stream("POST", f"{srv.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        chunks = [e for e in sse_events(r) if e != "[DONE]"]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    assert text == whole["text"] and tokens == whole["logprobs"]["tokens"]
    assert tokens == [vocab.piece(i) for i in vocab.encode(whole["text"])][: len(tokens)]
    sent_text, sent_tokens = "", ""
    for c in chunks:  # a word's logprobs go out with (or after) its whole text, never before
        sent_text += c["choices"][0]["text"]
        sent_tokens += "".join(c["choices"][0]["logprobs"]["tokens"])
        assert sent_text.startswith(sent_tokens), (sent_text, sent_tokens)


def test_a_stop_early_in_a_long_word_ends_the_text_before_it(words):
    """A stop that starts near the beginning of a word's text: " Valkyria" (forced by logit_bias) with
    the stop "Val" ends the text at " ", with " Val" at "" (the streamed text too). (The text assembler
    looked for stops a token count of bytes back, and a long word's start slipped out: its whole text
    went out, finish_reason "stop".)"""
    srv, folders = words
    vocab = load_vocab(folders["wt103"])
    bias = {str(vocab.index["Valkyria"]): 100}
    for stop, want in (("Val", " "), (" Val", ""), ("kyr", " Val")):
        body = {
            "model": "wt103",
            "prompt": "w2 w0",
            "max_tokens": 5,
            "seed": 2,
            "logit_bias": bias,
            "stop": [stop],
        }
        choice = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
        assert (choice["text"], choice["finish_reason"]) == (want, "stop"), (stop, choice)
        with httpx.stream(
            "POST", f"{srv.url}/v1/completions", json={**body, "stream": True}, timeout=60
        ) as r:
            chunks = [e for e in sse_events(r) if e != "[DONE]"]
        assert "".join(c["choices"][0]["text"] for c in chunks) == want, (stop, chunks)


def test_an_empty_prompt_is_refused_in_words(words):
    srv, _ = words
    r = httpx.post(
        f"{srv.url}/v1/completions", json={"model": "wt103", "prompt": "  ", "max_tokens": 3}, timeout=60
    )
    assert r.status_code == 400 and "send at least one word" in r.text, r.text


def test_chat_renders_its_template_into_words_and_stops_at_its_end_of_line(words):
    """The plain word model's chat template puts each message on a line and starts the answer with " =":
    the prompt is those words (<eos> per line), the answer the library's words up to the template's
    stop (a newline), with the chat logprobs' bytes the words' UTF-8. This model writes no <eos> in 40
    words unbiased (a reply without the stop was the same text), so <eos> (id 0) is biased by 4: the
    library's 40 words, sampled with no stop, then hold a newline after the 12th."""
    srv, folders = words
    vocab = load_vocab(folders["plain"])
    messages = [{"role": "user", "content": "w1 w2"}, {"role": "user", "content": "The"}]
    body = {"model": "plain", "messages": messages, "max_tokens": 40, "seed": 1, "logprobs": True,
            "logit_bias": {"0": 4.0}}  # fmt: skip
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60).json()
    ids = vocab.encode("w1 w2\nThe\n =")
    assert r["usage"]["prompt_tokens"] == len(ids) == 6, r
    free = reference(folders["plain"], ids, SamplingParams(seed=1, logit_bias={0: 4.0}), 40)
    text = vocab.decode(free)
    assert 0 < free.index(0) < 39, text
    content = r["choices"][0]["message"]["content"]
    assert content == text.split("\n")[0], (content, text)
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == free.index(0) + 1
    entries = r["choices"][0]["logprobs"]["content"]
    assert "".join(e["token"] for e in entries) == content
    assert all(bytes(e["bytes"]).decode() == e["token"] for e in entries)


def test_an_official_file_served_directly_reads_the_vocab_txt_beside_it(words, tmp_path, caplog):
    """S4_CHECKPOINTS naming the official .ckpt itself, with the symbols file `python -m model.vocab` writes
    beside it as vocab.txt: converted with that vocabulary (a cache entry of its own), served as words, the
    same checkpoint as `model.convert --vocab DATA` makes. Without vocab.txt this 64-word model is refused
    (its ids cannot be bytes), and both the refusal and the conversion's warning say how to give it its
    words; a vocab.txt of another size is refused, named."""
    import logging  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    from safetensors.torch import load_file  # noqa: PLC0415

    from model.vocab import main as vocab_main  # noqa: PLC0415
    from server.metrics import Metrics  # noqa: PLC0415
    from server.registry import load_models  # noqa: PLC0415
    from server.sessions import SessionTable  # noqa: PLC0415

    _, folders = words
    run = tmp_path / "run"
    run.mkdir()
    src = run / "s4_wt103.ckpt"
    shutil.copy(FIX / "s4_wt103.ckpt", src)

    def serve():
        settings = Settings(checkpoints=[f"wt103={src}"], convert_cache=str(tmp_path / "cache"), device="cpu",
                            max_sessions=2, torch_threads=1)  # fmt: skip
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            return load_models(settings, SessionTable(), Metrics())

    models, failed = serve()  # no vocab.txt: refused, and the refusal and the warning name the fix
    assert models == {} and "vocab_size >= 256" in failed["wt103"]
    assert (
        f"put its vocabulary's symbols file beside s4_wt103.ckpt as vocab.txt (python -m model.vocab "
        f"DATA_DIR {src} {run / VOCAB_FILE})" in failed["wt103"]
    )
    warned = [m for m in caplog.messages if "frequency-ordered" in m and "beside it as vocab.txt" in m]
    assert warned and "refuses to serve it" in warned[0], caplog.messages
    assert warned[0].count("send") == 1, warned[0]  # (the ids-as-bytes reason once: a trial saw it twice)
    assert "would be read for every official file" not in failed["wt103"]  # alone in its folder
    shutil.copy(FIX / "s4_bytes.ckpt", run / "other.ckpt")  # (a fresh-user trial wrote vocab.txt into a
    models, failed = serve()  # folder of several official files, and the others were refused for it)
    assert (
        f"; that vocab.txt would be read for every official file of {run} (1 other: other.ckpt), so give "
        "s4_wt103.ckpt a folder of its own first" in failed["wt103"]
    )
    (run / "other.ckpt").unlink()
    assert vocab_main([str(DATA), "wt103", str(run / VOCAB_FILE)]) == 0
    models, failed = serve()
    assert failed == {}
    served = models["wt103"]
    assert served.vocab is not None and served.vocab.symbols == load_vocab(folders["wt103"]).symbols
    assert (served.path / VOCAB_FILE).read_bytes() == (folders["wt103"] / VOCAB_FILE).read_bytes()
    a, b = (load_file(f / "model.safetensors") for f in (served.path, folders["wt103"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # an entry with the vocabulary, one without
    (run / VOCAB_FILE).write_text("<eos>\n" + "".join(f"w{i}\n" for i in range(9)))  # 10; the model has 64
    models, failed = serve()
    assert models == {}
    assert f"{run / VOCAB_FILE}, beside s4_wt103.ckpt, is read as its vocabulary" in failed["wt103"]
    assert "10 words, but the model's vocabulary has 64" in failed["wt103"]
    # and what to do (a fresh-user trial: it named the size and --vocab, which a server's user never gave)
    assert failed["wt103"].endswith(
        f"(the vocabulary of the run's data: python -m model.vocab DATA_DIR {run / 's4_wt103.ckpt'} "
        f"{run / VOCAB_FILE} writes it; a checkpoint of another run needs a folder of its own)"
    ), failed["wt103"]


def test_the_official_best_checkpoint_serves_under_its_run_and_monitor_with_the_runs_vocab(words, tmp_path):
    """The best checkpoint the official ModelCheckpoint keeps, RUN/checkpoints/val/loss.ckpt (its filename
    is the monitor, `val/loss`): served as RUN-val-loss (it was 'loss', and two runs' best files collided),
    with the vocab.txt of the run's checkpoints/ folder, beside last.ckpt (it looked in val/ only and served
    the word model as bytes: a fresh-user trial of official train.py runs)."""
    import shutil  # noqa: PLC0415

    from model.convert import default_name, find_vocab  # noqa: PLC0415
    from server.metrics import Metrics  # noqa: PLC0415
    from server.registry import load_models, model_id_of  # noqa: PLC0415
    from server.sessions import SessionTable  # noqa: PLC0415

    _, folders = words
    for run in ("run-a", "run-b"):
        (tmp_path / run / "checkpoints" / "val").mkdir(parents=True)
        shutil.copy(FIX / "s4_wt103.ckpt", tmp_path / run / "checkpoints" / "val" / "loss.ckpt")
        shutil.copy(FIX / "s4_wt103.ckpt", tmp_path / run / "checkpoints" / "last.ckpt")
    best = tmp_path / "run-a" / "checkpoints" / "val" / "loss.ckpt"
    assert model_id_of(str(best)) == "run-a-val-loss" and default_name(best) == "run-a-val-loss"
    assert model_id_of(str(tmp_path / "run-b" / "checkpoints" / "val" / "loss.ckpt")) == "run-b-val-loss"
    assert model_id_of(str(tmp_path / "run-a" / "checkpoints" / "last.ckpt")) == "run-a"  # as before
    assert default_name(FIX / "s4_wt103.ckpt") == "s4_wt103"
    assert find_vocab(best) is None
    shutil.copy(folders["wt103"] / VOCAB_FILE, tmp_path / "run-a" / "checkpoints" / VOCAB_FILE)
    assert find_vocab(best) == tmp_path / "run-a" / "checkpoints" / VOCAB_FILE
    settings = Settings(checkpoints=[str(best)], convert_cache=str(tmp_path / "cache"), device="cpu",
                        max_sessions=2, torch_threads=1)  # fmt: skip
    models, failed = load_models(settings, SessionTable(), Metrics())
    assert failed == {} and list(models) == ["run-a-val-loss"]
    assert models["run-a-val-loss"].vocab.symbols == load_vocab(folders["wt103"]).symbols


def test_model_vocab_writes_the_official_code_s_symbols_file_and_names_a_bad_folder(tmp_path, capsys):
    from model.vocab import main as vocab_main  # noqa: PLC0415

    assert vocab_main([str(DATA), "wt103", str(tmp_path / "vocab.txt")]) == 0
    assert WordVocab.read(tmp_path / "vocab.txt").symbols == WordVocab.from_dataset(DATA, "wt103").symbols
    assert "64 words of wt103" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        vocab_main([str(tmp_path / "nowhere"), "wt103", str(tmp_path / "v.txt")])
    assert exc.value.code == 2 and "nowhere/train.txt" in capsys.readouterr().err
    # the run's checkpoint instead of the dataset's name: the dataset its config names (the fixture: wt103)
    assert vocab_main([str(DATA), str(FIX / "s4_wt103.ckpt"), str(tmp_path / "from-ckpt.txt")]) == 0
    assert (tmp_path / "from-ckpt.txt").read_bytes() == (tmp_path / "vocab.txt").read_bytes()
    capsys.readouterr()
    five = "enwik8, ptb, text8, wt103, wt2"
    for what, why in [(str(FIX / "s4d_standalone.pt"), "its config names dataset None, not one whose"),
                      ("wt9", f"dataset 'wt9': not a file, nor one of {five}")]:  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            vocab_main([str(DATA), what, str(tmp_path / "v.txt")])
        assert exc.value.code == 2 and why in capsys.readouterr().err
    for out in (tmp_path / "no" / "such" / "vocab.txt", tmp_path):  # a folder missing, a folder
        with pytest.raises(SystemExit) as exc:
            vocab_main([str(DATA), "wt103", str(out)])
        assert exc.value.code == 2 and f"{out}: cannot write it" in capsys.readouterr().err


def test_an_enwik8_model_without_its_vocabulary_is_told_how_to_get_it(tmp_path):
    """An official enwik8 model (trainpy_enwik.ckpt, 68 frequency-ordered byte symbols) converted without
    --vocab: the conversion's warning points at --vocab and model.vocab, which build enwik8's vocabulary
    (tests/test_server_chars.py serves it), and the server refuses it with the same advice."""
    from server.metrics import Metrics  # noqa: PLC0415
    from server.registry import load_models  # noqa: PLC0415
    from server.sessions import SessionTable  # noqa: PLC0415

    summary = convert(FIX / "trainpy_enwik.ckpt", tmp_path / "conv")
    warning = summary["warning"]
    assert "trained on dataset 'enwik8', whose token ids are the official code's frequency-ordered" in warning
    assert "give it its vocabulary (--vocab; or the symbols file beside it as vocab.txt, which" in warning
    assert "python -m model.vocab" in warning and "through the library" not in warning
    settings = Settings(checkpoints=[str(tmp_path / "conv")], device="cpu", max_sessions=2, torch_threads=1)
    models, failed = load_models(settings, SessionTable(), Metrics())
    assert models == {} and "this one has 68 (a model of a vocabulary" in failed["conv"], failed
    assert "--vocab DATA_DIR_OR_FILE" in failed["conv"]


def test_an_lm1b_model_is_told_to_use_the_library():
    """lm1b's vocabulary (read from its own vocab_file, with <S> and <UNK>) is not built here: the
    conversion's warning says the server reads only the five others and sends it to the library."""
    from model.convert import token_warning  # noqa: PLC0415

    warning = token_warning("lm1b", 793471)
    five = "enwik8, ptb, text8, wt103, wt2"
    assert f"the server reads only the vocabularies of {five} (--vocab), not lm1b's" in warning
    assert "use it through the library (model.load) by its token ids" in warning


def test_an_export_does_not_import_into_a_copy_of_its_folder_with_another_vocabulary(tmp_path):
    """Two folders of the same weights and config, one vocab.txt reordered (its config.json's checksum
    written to match): their ids are other words. The fingerprint covered config and weights only, so a
    session exported from one imported into the other (201) and went on as other text. Now the
    vocabulary's checksum is part of it: 422 naming state; the same folder's export still imports; an
    export made before the vocabulary counted (its fingerprint config + weights only) is refused by name,
    since which vocabulary it was made with cannot be told."""
    import json  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    from server.sessions import model_fingerprint, pack_state, unpack_state  # noqa: PLC0415

    a = plain_word_model(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    words = load_vocab(a)
    other = WordVocab(list(reversed(words.symbols)), lower_case=words.lower_case)
    meta = json.loads((b / "config.json").read_text())
    meta["vocab"]["sha256"] = other.write(b / VOCAB_FILE)
    (b / "config.json").write_text(json.dumps(meta))
    assert load_vocab(b).symbols == list(reversed(load_vocab(a).symbols))  # (served as it is)
    settings = Settings(checkpoints=[f"a={a}", f"b={b}"], device="cpu", max_sessions=4, torch_threads=1)
    srv = ServerThread(settings).start()
    octets = {"content-type": "application/octet-stream"}
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            sid = c.post("/v1/sessions", json={"model": "a", "prompt": " = w1 w2\n The"}).json()["session_id"]
            blob = c.get(f"/v1/sessions/{sid}/export").content
            r = c.post("/v1/sessions/import?model=b", content=blob, headers=octets)
            assert r.status_code == 422 and r.json()["error"]["param"] == "state", r.text
            assert "or another vocabulary (vocab.txt) (fingerprint)" in r.json()["error"]["message"]
            r = c.post("/v1/sessions/import?model=a", content=blob, headers=octets)
            assert r.status_code == 201 and r.json()["model"] == "a", r.text
            header, raw = unpack_state(blob)
            before = model_fingerprint(meta["config"], meta["weights_sha256"])  # (config + weights)
            older = pack_state({**header, "fingerprint": before}, raw)
            for model in ("a", "b"):
                r = c.post(f"/v1/sessions/import?model={model}", content=older, headers=octets)
                assert r.status_code == 422 and r.json()["error"]["param"] == "state", r.text
                assert "before a model's fingerprint covered its vocabulary" in r.json()["error"]["message"]
    finally:
        srv.stop()


def test_a_model_s_load_reads_its_config_json_once(tmp_path, monkeypatch):
    """load_model read config.json three times (its own read, `load`'s, `load_vocab`'s): the network's
    config and the weights' checksum came from one read, the fingerprint and the vocabulary's entry from
    others, so a save that replaced the checkpoint meanwhile could be served under another's fingerprint.
    One read now, and the model serves as before."""
    import builtins  # noqa: PLC0415
    import io  # noqa: PLC0415

    from server.metrics import Metrics  # noqa: PLC0415
    from server.registry import load_models  # noqa: PLC0415
    from server.sessions import SessionTable  # noqa: PLC0415

    folder = plain_word_model(tmp_path / "plain")
    reads = []
    real_open = io.open

    def counted(file, *args, **kwargs):
        if Path(str(file)) == folder / "config.json":
            reads.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counted)
    monkeypatch.setattr(io, "open", counted)
    settings = Settings(checkpoints=[f"plain={folder}"], device="cpu", max_sessions=2, torch_threads=1)
    models, failed = load_models(settings, SessionTable(), Metrics())
    monkeypatch.undo()
    assert failed == {} and len(reads) == 1, (failed, reads)
    assert models["plain"].vocab.symbols == load_vocab(folder).symbols
