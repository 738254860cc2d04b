"""The OpenAI-compatible API: POST /v1/completions, POST /v1/chat/completions, GET /v1/models[/{id}].

A translation layer and nothing more: each request's fields are checked and mapped onto
`SamplingParams` and one generation per choice (service.start_generation); fields we do not support
are refused by name, never ignored: a 400 of type invalid_request_error, as OpenAI's API answers
(server/errors.py `as_openai`; our own routes say 422). The reference followed is
platform.openai.com/docs/api-reference (completions, chat, models); the extensions top_k, min_p and
repetition_penalty carry vLLM's names.

Choices: every prompt is sampled `best_of` (default `n`) times, each an independent one-shot
generation with its own generator. With a `seed`, choice i of a prompt samples with `choice_seed(seed,
i)` (choice 0 with `seed` itself, so n=1 reproduces /v1/generate with the same seed; OpenAI's seeds are
int64, and a negative one is the 64-bit key seed + 2^64: `sampling_seed`). With best_of > n
the n choices of highest mean token log-probability are returned.

A choice the server's stop cuts short (running when the drain, S4_DRAIN_TIMEOUT_S, ends: "cancelled" on
the native routes) is a 503 with Retry-After, streamed an error event before [DONE]: never a
finish_reason "stop" for a text that did not finish.

Log-probabilities are those of the model: log_softmax of the logits the sampler was given at that step
(before temperature, penalties, logit_bias and filtering), as vLLM reports them by default.
"""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from model.sampling import SamplingParams
from model.vocab import ByteVocab, Vocab
from server import media
from server.engine import Failed, Finished, Stream
from server.errors import APIError, as_openai, invalid, unavailable
from server.logs import log_stream_error
from server.registry import ServedModel
from server.routes.generate import KEEP_ALIVE, SSE_HEADERS, sse
from server.schemas import (
    OPENAI_ERROR_RESPONSES,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelInfo,
    ModelList,
    OpenAISampling,
    TokenizeRequest,
    TokenizeResponse,
    with_defaults,
)
from server.service import (
    Output,
    check_new_tokens,
    check_prompt,
    check_stops,
    collect,
    default_new_tokens,
    events,
    new_tokens,
    new_tokens_limit,
    now_s,
    prompt_limit,
    random_seed,
    request_id,
    start_generation,
    state_of,
    wait_for_slots,
)
from server.state import ServerState

router = APIRouter(tags=["openai"])
MAX_SAMPLES = 64  # prompts × best_of in one request
MAX_LOGPROB_VALUES = 2**18  # log-probabilities in one answer: each position's own and its top ones
CHAT_DEFAULT_MAX_TOKENS = 256
TOP_P_ZERO = 5e-324  # OpenAI's top_p 0: the smallest float above it, whose nucleus is the most likely token


def choice_seed(seed: int, i: int) -> int:
    """The seed of choice i of a prompt: `seed` for i = 0, else 63 bits of SHA-256("seed/i")."""
    if i == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}/{i}".encode()).digest()[:8], "big") >> 1


def token_str(t: int, vocab: Vocab | None = None) -> str:
    """A token as OpenAI spells tokens: the character for an ASCII byte, "bytes:\\xNN" for another
    byte, "token:N" for an id past the bytes (a model with a larger vocabulary); a byte vocabulary's
    (enwik8's) token as its byte; with a word or character vocabulary its text (" the", "\\n" for
    <eos>; text8's "a", " ")."""
    if isinstance(vocab, ByteVocab):
        t = vocab.byte_of[t]
    elif vocab is not None:
        return vocab.piece(t)
    return chr(t) if t < 128 else f"bytes:\\x{t:02x}" if t < 256 else f"token:{t}"


def token_utf8(t: int, vocab: Vocab | None = None) -> list[int]:
    """A token's UTF-8 bytes (chat logprobs' `bytes`): the byte the text writes for it (an id past 255 of a
    byte-level model: its low byte, as server.engine's `_id_bytes`), or its symbol's text's."""
    return [t & 0xFF] if vocab is None else list(vocab.token_bytes([t]))


class CharOffsets:
    """Byte tokens → the index of the character each byte belongs to in the text they decode to
    (UTF-8 with errors replaced, as the returned text): both bytes of "é" get the index of "é", and
    each invalid byte that becomes U+FFFD the index of its U+FFFD."""

    def __init__(self, vocab: Vocab | None = None) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.chars = 0  # characters decoded so far
        # word and character tokens: each is a piece of whole characters; a byte vocabulary's: its byte
        self.vocab = None if isinstance(vocab, ByteVocab) else vocab
        self.byte_of = vocab.byte_of if isinstance(vocab, ByteVocab) else None

    def feed(self, t: int) -> int:
        if self.vocab is not None:
            start, self.chars = self.chars, self.chars + len(self.vocab.piece(t))
            return start
        if self.byte_of is not None:
            t = self.byte_of[t]
        self.chars += len(self.decoder.decode(bytes([t & 0xFF])))
        pending = len(self.decoder.getstate()[0])  # this byte is still held: it starts the next character
        return self.chars if pending else self.chars - 1


def char_offsets(ids: list[int], vocab: Vocab | None = None) -> list[int]:
    offsets = CharOffsets(vocab)
    return [offsets.feed(t) for t in ids]


async def json_answer(model: type[BaseModel], build: Callable[[], dict]) -> Response:
    """A non-streamed answer built, validated against its response model and serialized as FastAPI does
    (by alias, None kept, compact UTF-8 JSON), in a worker thread: on the event loop, an answer
    of MAX_LOGPROB_VALUES log-probabilities (16 echoed prompts of 8,000 tokens, logprobs 1: 7.2 MB) held
    every stream for 0.3 s (a helper's audit)."""

    def run() -> bytes:  # (pydantic's serializer: 0.02 s for a 4 MB answer, json.dumps 0.1 s, under the GIL)
        return model.model_validate(build()).model_dump_json(by_alias=True).encode()

    return Response(await asyncio.to_thread(run), media_type="application/json")


def check_logprob_values(positions: int, k: int, param: str) -> None:
    """Log-probabilities asked for `positions` token positions (samples × tokens), 1 + `k` each: at most
    MAX_LOGPROB_VALUES, else a 400 naming `param`. Each is a JSON entry built on the event loop: 64 echoed
    prompts of 8,192 bytes with logprobs 20 (a 0.5 MB request) made a 260 MB answer, held the event loop
    for 23 s and the process's memory by 0.9 GiB."""
    if positions * (1 + k) > MAX_LOGPROB_VALUES:
        raise invalid(
            param,
            f"{param}: {positions} token positions × {1 + k} log-probabilities is more than "
            f"{MAX_LOGPROB_VALUES} in one answer; ask for fewer top log-probabilities, tokens or samples",
        )


# --- translation: request fields → SamplingParams -------------------------------------------------


TOKEN_ID_KEY = re.compile(r"0|[1-9][0-9]*")  # a logit_bias key: a token id in canonical ASCII decimal


def logit_bias(model: ServedModel, bias: dict[str, float] | None) -> dict[int, float]:
    """logit_bias {key: bias} → {token id: bias}. A key is a token id below the vocabulary size written
    as OpenAI's tokenizer ids are, in ASCII decimal digits without a sign, spaces, underscores or
    leading zeros ("0", "65"): int() also reads "+65", " 65", "6_5", "065" and "٦٥" as 65, so two
    keys could name one token and the later would win silently. 400 naming logit_bias and the key."""
    V = model.config.vocab_size
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        if not TOKEN_ID_KEY.fullmatch(key):
            raise invalid(
                "logit_bias",
                f"logit_bias: key {key[:40]!r} is not a token id: write ids in ASCII decimal digits with no "
                'sign, space, underscore or leading zero (as "65")',
            )
        if len(key) > len(str(V)) or int(key) >= V:  # (the length first: int() of a huge key is slow)
            raise invalid("logit_bias", f"logit_bias: token id {key[:40]} is outside the vocabulary [0, {V})")
        out[int(key)] = value
    return out


def sampling_seed(seed: int) -> int:
    """A request's seed (OpenAI's int64 range) as the generator's 64-bit key: itself in [0, 2^63), as
    /v1/generate takes it, a negative one + 2^64 (its two's complement): each seed keys its own stream."""
    return seed % 2**64


def sampling(model: ServedModel, req: OpenAISampling, stop: list[str]) -> SamplingParams:
    """The fields both routes share, range-checked against the model (logit_bias ids < vocab)."""
    V = model.config.vocab_size
    check_stops(model, req.stop)  # (the request's: a chat template's chat_stop is the checkpoint's)
    bias = logit_bias(model, req.logit_bias)
    if req.stream_options is not None and not req.stream:
        raise invalid("stream_options", "stream_options is only allowed with stream=true")
    fields = with_defaults(model.generation, req)  # the checkpoint's defaults for fields left out
    top_k = 0 if fields["top_k"] in (-1, 0) or fields["top_k"] >= V else fields["top_k"]
    return SamplingParams(
        temperature=fields["temperature"],
        top_k=top_k,
        top_p=fields["top_p"] or TOP_P_ZERO,  # (OpenAI's top_p 0: the library's range starts above it)
        repetition_penalty=fields["repetition_penalty"],
        seed=None if req.seed is None else sampling_seed(req.seed),
        stop=[s.encode() for s in stop],
        logit_bias=bias,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        min_p=req.min_p,
    )


def check_accept(request: Request, stream: bool) -> None:
    """406 unless the request's Accept takes what the route answers: application/json, or with
    stream=true text/event-stream (text/*, */* and no Accept take both). A stream is also answered to
    `Accept: application/json`, which the openai client sends with every request, streams included
    (OpenAI's API answers it)."""
    accept = request.headers.get("accept")
    if media.accepts(accept, "application/json") or (stream and media.accepts(accept, "text/event-stream")):
        return
    kinds = "application/json or (stream: true) text/event-stream"
    raise APIError(406, f"this route answers {kinds}; this request's Accept takes neither: {accept}")


def text_model(st: ServerState, model_id: str) -> ServedModel:
    model = st.model(model_id)
    if model.kind != "text":
        why = f"{model.id} is an audio model; the OpenAI routes serve text models (use POST /v1/generate)"
        raise invalid("model", why)
    return model


# --- running the choices ----------------------------------------------------------------------------


@dataclass
class Run:
    """One sampled completion of one prompt."""

    prompt: int  # index of its prompt
    ids: list[int]  # the prompt's token ids
    stream: Stream
    out: Output
    vocab: Vocab | None = None  # a model's vocabulary (its tokens' text and offsets)
    max_tokens: int = 0  # the request's limit on generated tokens
    tokens: list[int] = field(default_factory=list)
    final: Finished | None = None
    echoed: bool = False  # (streaming) the prompt has been sent
    lp_sent: int = 0  # (streaming) generated tokens whose logprobs have been sent
    offsets: list[int] = field(default_factory=list)  # character offset of each generated token
    char_offsets: CharOffsets = field(init=False)

    def __post_init__(self) -> None:
        self.char_offsets = CharOffsets(self.vocab)

    def offsets_to(self, end: int) -> list[int]:
        """Character offsets of generated tokens [0, end), computed once each."""
        self.offsets += [self.char_offsets.feed(t) for t in self.tokens[len(self.offsets) : end]]
        return self.offsets

    def kept(self) -> int:
        """Generated tokens in the returned text (those before a stop sequence)."""
        if self.final is not None and self.final.stop_token is not None:
            return self.final.stop_token
        return len(self.tokens)

    def advance(self, items: list) -> tuple[str, Finished | None, int]:
        """(streaming) Take one engine hand-over (token ids, maybe ending with Finished): the text it
        releases, the Finished or None, and how many generated tokens the client may now see."""
        ids = [x for x in items if isinstance(x, int)]
        self.tokens += ids
        text = self.out.text_piece(ids) if ids else ""
        final = items[-1] if isinstance(items[-1], Finished) else None
        if final is not None:
            self.final = final
            text += self.out.finish_text(final)
        released = self.kept() if final is not None else min(self.out.text.tokens_emitted(), len(self.tokens))
        return text, final, released

    def mean_logprob(self) -> float:
        lps = [lp for lp, _, _ in self.stream.logprobs]
        return sum(lps) / len(lps) if lps else float("-inf")


def start_runs(
    st: ServerState,
    model: ServedModel,
    prompts: list[list[int]],
    per_prompt: int,
    params: SamplingParams,
    max_tokens: int,
) -> list[Run]:
    """Queue `per_prompt` generations of each prompt, seeds derived per choice; all or none (a
    refusal cancels the ones already queued)."""
    samples = len(prompts) * per_prompt
    room = min(st.settings.max_sessions, st.settings.max_queued_requests)
    if samples > room:
        raise invalid(
            "n",
            f"{samples} samples (prompts × n or best_of) is more than this server can queue at once "
            f"({room}: max_sessions, max_queued_requests)",
        )
    runs: list[Run] = []
    try:
        for p, ids in enumerate(prompts):
            for i in range(per_prompt):
                seed = random_seed() if params.seed is None else choice_seed(params.seed, i)
                pi = replace(params, seed=seed)
                stream, job = start_generation(st, model, None, ids, pi, max_tokens)
                runs.append(Run(p, ids, stream, Output(model, pi, job=job), model.vocab, max_tokens))
    except BaseException:
        for r in runs:
            r.stream.cancel()
        raise
    return runs


async def collect_runs(runs: list[Run], request: Request, best_of: int | None = None) -> None:
    """Wait for every run of a non-streamed answer. Raises `shut_down`'s 503 when the server's stop cut
    any short (`cut_off`), naming the first: "choice k" (run k is choice k), or with `best_of` (more
    samples than choices) "sample k (of best_of N)"."""
    tasks = [asyncio.ensure_future(collect(r.stream, request)) for r in runs]
    try:
        for r, (tokens, final) in zip(runs, await asyncio.gather(*tasks)):
            r.tokens, r.final = tokens, final
            r.out.text_piece(tokens)
            r.out.finish_text(final)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise
    cut = [k for k, r in enumerate(runs) if cut_off(r)]
    if cut:
        which = f"choice {cut[0]}" if best_of is None else f"sample {cut[0]} (of best_of {best_of})"
        raise shut_down(runs[cut[0]], which, len(cut) - 1)


async def merged(runs: list[Run], idle: float | None = None) -> AsyncIterator[tuple[Run | None, list]]:
    """The runs' stream items as they come, (run, items), until every run has ended; stopping early
    cancels the generations still running. `idle` (seconds): (None, []) after each wait that long with
    no items (a stream's keep-alive)."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=2 * len(runs))

    async def pump(run: Run) -> None:
        async for items in events(run.stream):
            await queue.put((run, items))

    tasks = [asyncio.ensure_future(pump(r)) for r in runs]
    ended: set[int] = set()
    try:
        while len(ended) < len(runs):
            try:
                async with asyncio.timeout(idle):
                    run, items = await queue.get()
            except TimeoutError:
                yield None, []
                continue
            if not isinstance(items[-1], int):
                ended.add(id(run))
            yield run, items
    finally:
        for t in tasks:
            t.cancel()
        for r in runs:  # a pump cancelled mid-iteration leaves its `events` unclosed: cancel here
            if id(r) not in ended:
                r.stream.cancel()


def finish_reason(final: Finished) -> str:
    """OpenAI's finish_reason of a generation that ended by itself: "length", or "stop" (a stop sequence
    or the chat template's). One that ended "cancelled" never gets here (`cut_off`)."""
    if final.finish_reason not in ("stop", "length"):
        raise ValueError(f"a {final.finish_reason} generation has no OpenAI finish_reason")
    return final.finish_reason


def cut_off(run: Run) -> bool:
    """Whether the server stopped this generation before it finished: it ended "cancelled", which here
    only the end of a drain does to one that is still read (a client that went away reads nothing)."""
    return run.final is not None and run.final.finish_reason == "cancelled"


def shut_down(run: Run, which: str, others: int = 0) -> APIError:
    """The 503 (Retry-After) of a choice the server's stop cut short (and `others` more): its text is not
    a completion, and a finish_reason "stop" would say it was (the native routes say "cancelled")."""
    more = f" ({others} other choice{'s' if others != 1 else ''} too)" if others else ""
    return unavailable(
        f"the server shut down before the completion finished: {which} had {run.final.completion_tokens} "
        f"of {run.max_tokens} tokens when the drain (S4_DRAIN_TIMEOUT_S) ended{more}; retry the request"
    )


def sse_error(err: APIError) -> str:
    """A stream's end by an error: OpenAI's error event, then [DONE] (the choices so far stay sent);
    logged (`logs.log_stream_error`)."""
    err = as_openai(err)
    log_stream_error(err.status, err.message)
    return sse(err.openai_body()) + sse("[DONE]")


def usage(prompts: list[list[int]], runs: list[Run]) -> dict:
    """Prompt tokens once per prompt; completion tokens of every sample (best_of's unreturned too); cached
    tokens once per prompt, the fewest any of its samples started from (each sample ingests its prompt:
    one admitted after another's ingestion, or with it, starts from what that one stored, a follower's
    wait: `Engine._cached_prefix`; the first from what was stored before)."""
    p = sum(len(ids) for ids in prompts)
    c = sum(r.final.completion_tokens for r in runs if r.final is not None)
    cached = [min((r.final.cached_tokens for r in runs if r.prompt == i and r.final is not None), default=0)
              for i in range(len(prompts))]  # fmt: skip
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": sum(cached)}}  # fmt: skip


# --- log-probability entries ------------------------------------------------------------------------
# an entry: (token id, logprob or None, top [(id, logprob)] or None, character offset)


def prompt_entries(run: Run, k: int) -> list[tuple]:
    offsets = char_offsets(run.ids, run.vocab)
    out = [(run.ids[0], None, None, 0)]
    for t, off, (lp, ti, tv) in zip(run.ids[1:], offsets[1:], run.stream.prompt_logprobs):
        out.append((t, lp, list(zip(ti, tv))[:k], off))
    return out


def generated_entries(run: Run, start: int, end: int, base: int) -> list[tuple]:
    """Entries of generated tokens [start, end), offsets shifted by `base` characters."""
    offsets = run.offsets_to(end)
    out = []
    for i in range(start, end):
        lp, ti, tv = run.stream.logprobs[i]
        out.append((run.tokens[i], lp, list(zip(ti, tv)), base + offsets[i]))
    return out


def completion_logprobs(entries: list[tuple], vocab: Vocab | None = None) -> dict:
    """The legacy completions' logprobs. Each `top_logprobs` dict holds the k most likely tokens and, as
    OpenAI's reference says ("the API will always return the logprob of the sampled token, so there may be
    up to logprobs+1 elements") and vLLM does, the token itself when it is not among them (an echoed
    prompt token too): k + 1 entries then, one with logprobs=0. Chat's `top_logprobs` stay the top k."""

    def top_with_token(t: int, lp: float, top: list[tuple[int, float]]) -> dict[str, float]:
        out = {token_str(i, vocab): v for i, v in top}
        if all(i != t for i, _ in top):
            out[token_str(t, vocab)] = lp
        return out

    return {
        "tokens": [token_str(t, vocab) for t, _, _, _ in entries],
        "token_logprobs": [lp for _, lp, _, _ in entries],
        "top_logprobs": [None if top is None else top_with_token(t, lp, top) for t, lp, top, _ in entries],
        "text_offset": [off for _, _, _, off in entries],
    }


def chat_logprobs(entries: list[tuple], vocab: Vocab | None = None) -> dict:
    def one(t: int, lp: float) -> dict:
        return {"token": token_str(t, vocab), "logprob": lp, "bytes": token_utf8(t, vocab)}

    return {
        "content": [{**one(t, lp), "top_logprobs": [one(i, v) for i, v in top]} for t, lp, top, _ in entries]
    }


# --- POST /v1/completions ---------------------------------------------------------------------------


def completion_prompts(
    st: ServerState, model: ServedModel, req: CompletionRequest
) -> tuple[list[list[int]], list[str]]:
    """The prompt field as token-id lists and their texts (for echo); a prompt longer than the server's
    limit is refused (413 naming `prompt`: service.check_prompt) before it is converted (media.text_ids)
    or its ids are read."""
    max_tokens = prompt_limit(st, model)[0]
    p = req.prompt
    if isinstance(p, str) or isinstance(p[0], int):  # one prompt: a string, or token ids
        p = [p]
    V = model.config.vocab_size
    out, texts = [], []
    for x in p:
        if isinstance(x, str):
            ids = media.text_ids(x, "prompt", max_tokens, model.vocab)
            # (echo: a word model's prompt as its words read back, which its logprobs' offsets index)
            texts.append(x if model.vocab is None else model.vocab.decode(ids))
        else:  # its length first, then one C-speed pass each: the event loop waits for them
            check_prompt(st, x, "prompt", model)
            top = max(x)
            if top >= V:
                raise invalid("prompt", f"prompt: token ids must be below the vocabulary size {V}")
            ids = list(x)
            data = bytes(ids) if top < 256 and model.vocab is None else model.token_bytes(ids)
            texts.append(data.decode("utf-8", errors="replace"))
        if not ids:
            unit = "byte" if model.vocab is None else model.vocab.unit
            raise invalid(
                "prompt",
                f"prompt is empty: this {unit}-level model has no start-of-text token; send at least one "
                f"{unit}",
            )
        out.append(ids)
    return out, texts


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    response_model_exclude_none=False,
    summary="OpenAI completions (text models): every documented field but suffix, plus top_k, min_p, "
    "repetition_penalty",
    responses={**OPENAI_ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
)
async def completions(req: CompletionRequest, request: Request):
    st = state_of(request)
    model = text_model(st, req.model)
    check_accept(request, req.stream)
    if req.suffix is not None:
        raise invalid(
            "suffix",
            "suffix is not supported by this server: its models only continue a prompt (no infilling)",
        )
    best_of = req.n if req.best_of is None else req.best_of
    if best_of < req.n:
        raise invalid("best_of", f"best_of ({best_of}) must be at least n ({req.n})")
    if req.stream and best_of != req.n:
        raise invalid("best_of", "best_of cannot be streamed unless it equals n")
    max_tokens = new_tokens(st, model, req, "max_tokens")  # (the checkpoint's default when left out)
    if max_tokens == 0 and not req.echo:
        raise invalid("max_tokens", "max_tokens: 0 is only allowed with echo=true (to score the prompt)")
    check_new_tokens(st, max_tokens, "max_tokens", model)
    prompts, texts = completion_prompts(st, model, req)  # (each prompt's length checked)
    if len(prompts) * best_of > MAX_SAMPLES:
        per = f"best_of {best_of}" if req.best_of is not None else f"n {req.n}"
        raise invalid("prompt", f"{len(prompts)} prompts × {per} is more than {MAX_SAMPLES} samples")
    params = sampling(model, req, req.stop or [])
    lp = req.logprobs
    if lp is not None:  # every sample's, best_of's too (they are ranked, then n returned)
        echoed = sum(len(ids) for ids in prompts) if req.echo else 0
        check_logprob_values(best_of * (echoed + len(prompts) * max_tokens), lp, "logprobs")
    internal = lp if lp is not None else (0 if best_of > req.n else None)
    params = replace(params, logprobs=internal, prompt_logprobs=lp if req.echo else None)
    await wait_for_slots(model, len(prompts) * best_of)
    runs = start_runs(st, model, prompts, best_of, params, max_tokens)
    cid, created = request_id("cmpl"), now_s()
    head = {"id": cid, "object": "text_completion", "created": created, "model": model.id,
            "system_fingerprint": model.system_fingerprint}  # fmt: skip
    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        body = _stream_completions(
            runs, prompts, texts, req, head, include_usage, st.settings.sse_keepalive_s
        )
        return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
    await collect_runs(runs, request, best_of if best_of > req.n else None)
    return await json_answer(
        CompletionResponse, lambda: _completion(runs, prompts, texts, req, best_of, head)
    )


def _completion(runs, prompts, texts, req: CompletionRequest, best_of: int, head: dict) -> dict:
    """A non-streamed completion's answer (its runs collected)."""
    lp = req.logprobs
    choices = []
    for p in range(len(prompts)):
        mine = [r for r in runs if r.prompt == p]
        if best_of > req.n:  # stable: ties keep the sampling order
            mine = sorted(mine, key=lambda r: -r.mean_logprob())[: req.n]
        for r in mine:
            text, entries = r.out.text.text, []
            if req.echo:
                text = texts[p] + text
                entries = prompt_entries(r, lp) if lp is not None else []
            if lp is not None:
                entries += generated_entries(r, 0, r.kept(), len(texts[p]) if req.echo else 0)
            choices.append(
                {
                    "text": text,
                    "index": len(choices),
                    "logprobs": completion_logprobs(entries, r.vocab) if lp is not None else None,
                    "finish_reason": finish_reason(r.final),
                }
            )
    return {**head, "choices": choices, "usage": usage(prompts, runs)}


async def _stream_completions(
    runs, prompts, texts, req: CompletionRequest, head: dict, include_usage: bool, keepalive_s: float
):
    lp = req.logprobs
    index = {id(r): i for i, r in enumerate(runs)}
    extra = {"usage": None} if include_usage else {}
    async for run, items in merged(runs, idle=keepalive_s):
        if run is None:  # nothing for keepalive_s (queued, a long prefill)
            yield KEEP_ALIVE
            continue
        if isinstance(items[-1], Failed):
            yield sse_error(items[-1].error)
            return
        piece, final, released = run.advance(items)
        cut = cut_off(run)
        text, entries = "", []
        base = len(texts[run.prompt]) if req.echo else 0
        if req.echo and not run.echoed:
            run.echoed = True
            text = texts[run.prompt]
            entries = prompt_entries(run, lp) if lp is not None else []
        text += piece
        if lp is not None and released > run.lp_sent:
            entries += generated_entries(run, run.lp_sent, released, base)
            run.lp_sent = released
        if text or entries or (final is not None and not cut):
            choice = {
                "text": text,
                "index": index[id(run)],
                "logprobs": completion_logprobs(entries, run.vocab) if lp is not None else None,
                "finish_reason": None if final is None or cut else finish_reason(final),
            }
            yield sse({**head, "choices": [choice], **extra})
        if cut:  # its text so far, then the error in place of a finish
            yield sse_error(shut_down(run, f"choice {index[id(run)]}"))
            return
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage(prompts, runs)})
    yield sse("[DONE]")


# --- POST /v1/chat/completions ----------------------------------------------------------------------


def chat_prompt(model: ServedModel, req: ChatCompletionRequest) -> str:
    if model.chat is None:
        raise invalid(  # 422 naming `model`, as for an audio model on these routes
            "model",
            f"model {model.id} has no chat template (chat_template in its config.json); "
            "use /v1/completions with a prompt instead",
        )
    messages = []
    for i, m in enumerate(req.messages):
        content = "" if m.content is None else m.content  # (null: an assistant's empty speech)
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str) or len(part) != 2:
                    raise invalid(
                        f"messages.{i}.content",
                        f"messages.{i}.content: only {{type: text, text}} parts are supported",
                    )
                parts.append(part["text"])
            content = "".join(parts)
        message = {"role": m.role, "content": content}
        if m.name is not None:  # (absent, as in the request: a template's `name is defined` is then false)
            message["name"] = m.name
        messages.append(message)
    try:
        return model.chat.render(messages)
    except ValueError as exc:
        raise invalid("messages", str(exc)) from None


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    summary="OpenAI chat completions (text models with a chat template in config.json)",
    responses={**OPENAI_ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
)
async def chat_completions(req: ChatCompletionRequest, request: Request):
    st = state_of(request)
    model = text_model(st, req.model)
    check_accept(request, req.stream)
    prompt = chat_prompt(model, req)
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        if req.max_tokens != req.max_completion_tokens:
            raise invalid("max_tokens", "max_tokens and max_completion_tokens differ; send one")
    max_tokens = (
        req.max_completion_tokens
        or req.max_tokens
        or default_new_tokens(st, model, min(CHAT_DEFAULT_MAX_TOKENS, st.settings.max_new_tokens))
    )
    param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    check_new_tokens(st, max_tokens, param, model)
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs", "top_logprobs needs logprobs=true")
    ids = media.text_ids(prompt, "messages", prompt_limit(st, model)[0], model.vocab)
    if not ids:  # (as completion_prompts refuses an empty prompt; start_generation would name `prompt`)
        unit = "byte" if model.vocab is None else model.vocab.unit
        raise invalid(
            "messages",
            f"messages: model {model.id}'s chat template renders these messages as an empty prompt, and this "
            f"{unit}-level model has no start-of-text token to continue from",
        )
    check_prompt(st, ids, "messages", model)
    params = sampling(model, req, (req.stop or []) + model.chat.stop)
    k = (req.top_logprobs or 0) if req.logprobs else None
    if k is not None:
        check_logprob_values(req.n * max_tokens, k, "top_logprobs" if k else "logprobs")
    params = replace(params, logprobs=k)
    await wait_for_slots(model, req.n)
    runs = start_runs(st, model, [ids], req.n, params, max_tokens)
    cid, created = request_id("chatcmpl"), now_s()
    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model.id,
                "system_fingerprint": model.system_fingerprint}  # fmt: skip
        body = _stream_chat(runs, [ids], req.logprobs, head, include_usage, st.settings.sse_keepalive_s)
        return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
    await collect_runs(runs, request)
    head = {"id": cid, "object": "chat.completion", "created": created, "model": model.id,
            "system_fingerprint": model.system_fingerprint}  # fmt: skip

    def answer() -> dict:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.out.text.text},
                "logprobs": chat_logprobs(generated_entries(r, 0, r.kept(), 0), r.vocab)
                if req.logprobs
                else None,
                "finish_reason": finish_reason(r.final),
            }
            for i, r in enumerate(runs)
        ]
        return {**head, "choices": choices, "usage": usage([ids], runs)}

    return await json_answer(ChatCompletionResponse, answer)


async def _stream_chat(
    runs: list[Run], prompts, logprobs: bool, head: dict, include_usage: bool, keepalive_s: float
):
    index = {id(r): i for i, r in enumerate(runs)}
    extra = {"usage": None} if include_usage else {}
    for i in range(len(runs)):
        choice = {
            "index": i,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        yield sse({**head, "choices": [choice], **extra})
    async for run, items in merged(runs, idle=keepalive_s):
        if run is None:  # nothing for keepalive_s (queued, a long prefill)
            yield KEEP_ALIVE
            continue
        if isinstance(items[-1], Failed):
            yield sse_error(items[-1].error)
            return
        text, final, released = run.advance(items)
        cut = cut_off(run)
        entries = []
        if logprobs and released > run.lp_sent:
            entries = generated_entries(run, run.lp_sent, released, 0)
            run.lp_sent = released
        if text or entries or (final is not None and not cut):
            choice = {
                "index": index[id(run)],
                "delta": {"content": text} if text else {},
                "logprobs": chat_logprobs(entries, run.vocab) if logprobs else None,
                "finish_reason": None if final is None or cut else finish_reason(final),
            }
            yield sse({**head, "choices": [choice], **extra})
        if cut:  # its text so far, then the error in place of a finish
            yield sse_error(shut_down(run, f"choice {index[id(run)]}"))
            return
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage(prompts, runs)})
    yield sse("[DONE]")


# --- GET /v1/models ---------------------------------------------------------------------------------


def _describe(state: ServerState, model: ServedModel) -> dict:
    """A served model as /v1/models lists it: its description and this server's limits for it."""
    return {
        **model.describe(),
        "max_prompt_tokens": prompt_limit(state, model)[0],
        "max_new_tokens": new_tokens_limit(state, model)[0],
    }


@router.get(
    "/v1/models",
    tags=["models"],
    summary="Served models",
    response_model=ModelList,
    responses={503: OPENAI_ERROR_RESPONSES[503]},
)
async def models(request: Request) -> dict:
    """The served models: each one from the moment it has loaded and verified, while the others still
    load (those are not listed: every entry here serves; /readyz's `loading` names them, and a request
    naming one is a 503 naming it). Until the first model serves, and while the server drains, a 503
    with Retry-After (/readyz: "loading", "draining"): an empty list read as "this server serves
    nothing" (a client that lists the models at start gave up; OpenAI's clients retry a 503). Once all
    have loaded, the models that loaded and verified ([] when none did)."""
    st = state_of(request)
    st.check_serving()
    return {"object": "list", "data": [_describe(st, m) for m in st.models.values()]}


@router.get(
    "/v1/models/{model_id}",
    tags=["models"],
    summary="One served model",
    response_model=ModelInfo,
    responses={404: OPENAI_ERROR_RESPONSES[404], 503: OPENAI_ERROR_RESPONSES[503]},
)
async def retrieve_model(model_id: str, request: Request) -> dict:
    st = state_of(request)
    return _describe(st, st.model(model_id))


# (no slot is taken, and the answer is JSON whatever the Accept, as vLLM's: no 429, no 406)
TOKENIZE_ERRORS = {k: v for k, v in OPENAI_ERROR_RESPONSES.items() if k not in (406, 429)}


@router.post(
    "/tokenize",
    response_model=TokenizeResponse,
    summary="vLLM's /tokenize: a text model's reading of a prompt (its token ids; a word-level model's "
    "unknown words)",
    responses=TOKENIZE_ERRORS,
)
async def tokenize(req: TokenizeRequest, request: Request) -> dict:
    """The prompt's ids as every text route reads it (`media.text_ids`), a longer one than
    max_prompt_tokens refused as the completions route refuses it (400, context_length_exceeded); with a
    word vocabulary the words it lacks, which the text routes read as `<unk>` without saying so."""
    st = state_of(request)
    model = text_model(st, req.model)
    limit = prompt_limit(st, model)[0]
    ids = media.text_ids(req.prompt, "prompt", limit, model.vocab)
    return {
        "count": len(ids),
        "max_model_len": limit,
        "tokens": ids,
        "token_strs": [token_str(t, model.vocab) for t in ids] if req.return_token_strs else None,
        "unknown_words": [] if model.vocab is None else model.vocab.unknown_words(req.prompt),
        "dropped": [] if model.vocab is None else model.vocab.dropped(req.prompt),
    }


@router.post(
    "/detokenize",
    response_model=DetokenizeResponse,
    summary="vLLM's /detokenize: token ids back to a text model's text",
    responses=TOKENIZE_ERRORS,
)
async def detokenize(req: DetokenizeRequest, request: Request) -> dict:
    """The ids' text as the text routes write it (bytes decoded as UTF-8, a word model's words); an id at or
    past the vocabulary size is a 400 naming `tokens`."""
    st = state_of(request)
    model = text_model(st, req.model)
    V = model.config.vocab_size
    if req.tokens and max(req.tokens) >= V:
        raise invalid("tokens", f"tokens: ids must be below the vocabulary size {V}, got {max(req.tokens)}")
    return {"prompt": model.token_bytes(req.tokens).decode("utf-8", errors="replace")}  # (as the text routes)
