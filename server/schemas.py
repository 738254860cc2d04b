"""Request and response models: the API's single source of truth (OpenAPI is generated from them).

Our own endpoints are strict: unknown fields and wrong types are a 422 naming the field. The
OpenAI-compatible routes refuse the fields they do not support, by name, as our own do.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from model.sampling import MAX_LOGPROBS
from server.config import Dtype

StopString = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MAX_TEMPERATURE = 100.0  # the API's bound (the library takes any finite T ≥ 0)
# on every field a checkpoint's generation_config may set (GenerationConfig)
OR_CHECKPOINTS = (
    "; left out: the model's generation_config value (GET /v1/models) if it sets one, else the default"
)


def finite(default: float, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           description: str = "") -> float:  # fmt: skip
    """A float field that takes only finite JSON numbers within the bounds: NaN, ±Infinity (which
    Python's json and some clients send), 1e309 and out-of-range values are a 422 naming the field.
    Every numeric sampling field is one of these or a `count`; the sampler (model/sampling.py
    `SamplingParams`, `check_number`) enforces the same bounds for library callers."""
    return Field(default, ge=ge, gt=gt, le=le, allow_inf_nan=False, description=description)


def count(default: int | None, *, ge: int = 0, le: int | None = None, description: str = "") -> int:
    """An integer field (strict: no floats, no bools) within the bounds; a JSON integer of any size
    is compared exactly (2**70 is a 422 where a bound says so, never an overflow)."""
    return Field(default, ge=ge, le=le, description=description)


_KINDS = {  # a JSON type's name, from pydantic's error type for a value not of that type
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
}


def union_error(errors: list[dict]) -> PydanticCustomError:
    """One error for a union that no member took. pydantic reports one error per member, each located
    after the member's type tag (`[-1]` as a completions prompt: "prompt.str: Input should be a valid
    string", the first member's), which names no field and hides the member that came nearest. This
    keeps the error of the member that got furthest: a value error (a bound, a length) before a type
    error, then the latest element reached (item 1 wrong means item 0 passed). Where the nearest members
    all fail on an element's type, it says which types that element may have. The message gives the
    element's path (`element [0]`); its type is the chosen error's."""
    firsts: dict[str, dict] = {}
    for e in errors:  # each member's first error; loc = (tag, *path in the value)
        firsts.setdefault(str(e["loc"][0]), e)

    def reached(e: dict) -> tuple:
        path = tuple((p, "") if isinstance(p, int) else (-1, str(p)) for p in e["loc"][1:])
        return (not e["type"].endswith("_type"), path)

    best = max(firsts.values(), key=reached)
    message = best["msg"]
    if not reached(best)[0]:  # only type errors: the types this element may have
        kinds = [_KINDS.get(e["type"]) for e in firsts.values() if reached(e) == reached(best)]
        if all(kinds):
            kinds = list(dict.fromkeys(kinds))
            message = "Input should be " + (
                " or ".join(kinds) if len(kinds) < 3 else f"{', '.join(kinds[:-1])} or {kinds[-1]}"
            )
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in best["loc"][1:])
    where = f"element {path}: " if path else ""
    return PydanticCustomError(best["type"], "{where}{message}", {"where": where, "message": message})


def _one_error(value, handler: ValidatorFunctionWrapHandler):
    try:
        return handler(value)
    except ValidationError as exc:
        raise union_error(exc.errors()) from None


OneOf = WrapValidator(_one_error)  # on a union field: `union_error`'s one error instead of one per member


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SamplingFields(Strict):
    max_new_tokens: int = count(
        64, ge=1, description="tokens to generate at most (≤ the server's limit)" + OR_CHECKPOINTS
    )
    temperature: float = finite(
        1.0,
        ge=0,
        le=MAX_TEMPERATURE,
        description="0 → greedy; T > 0 samples softmax(z/T) (tiny T: the argmax)" + OR_CHECKPOINTS,
    )
    top_k: int = count(
        0, description="keep the k most likely tokens (0, or ≥ the vocabulary → off)" + OR_CHECKPOINTS
    )
    top_p: float = finite(
        1.0, gt=0, le=1, description="nucleus mass (1 → off; tiny → the top token)" + OR_CHECKPOINTS
    )
    repetition_penalty: float = finite(
        1.0, gt=0, le=100, description="CTRL-style penalty (1 → off)" + OR_CHECKPOINTS
    )
    min_p: float = finite(
        0.0,
        ge=0,
        le=1,
        description="drop tokens less likely than min_p × the most likely one (0 → off; vLLM's min_p, as "
        "on the OpenAI routes)",
    )
    seed: int | None = count(None, le=2**63 - 1, description="same seed + input + params → same tokens")
    stop: list[StopString] | None = Field(
        None, max_length=16, description="stop sequences (text models); the text ends before them"
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, v):
        if v is None or isinstance(v, list):
            return v
        if isinstance(v, str):
            return [v]
        raise PydanticCustomError("list_type", "Input should be a string or an array of strings")


GENERATION_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty")


class GenerationConfig(Strict):
    """A checkpoint's sampling defaults: `generation_config` in its config.json (the fields of Hugging
    Face's generation_config.json that every route here takes), with the bounds of the requests' own
    fields. A request that leaves a field out (or, on the OpenAI routes, sends it as null) samples with
    the checkpoint's value; one that sends it, with its own. Fields the checkpoint leaves out keep the
    API's defaults (temperature 1, top_k 0, top_p 1, repetition_penalty 1; max_new_tokens 64, on the
    OpenAI routes max_tokens 16 and, for chat, 256). max_new_tokens is the length of a generation that
    names none (`max_tokens` on the OpenAI routes), at most the server's limit."""

    temperature: float | None = finite(None, ge=0, le=MAX_TEMPERATURE, description="as a request's")
    top_k: int | None = count(None, description="as a request's (0: off)")
    top_p: float | None = finite(None, gt=0, le=1, description="as a request's")
    repetition_penalty: float | None = finite(None, gt=0, le=100, description="as a request's")
    max_new_tokens: int | None = count(
        None, ge=1, description="tokens generated when a request names none (at most the server's limit)"
    )

    @classmethod
    def from_config(cls, meta: dict) -> dict:
        """The defaults a checkpoint's config.json metadata sets ({} without `generation_config`);
        ValueError naming the field when it is not an object of these fields within their bounds."""
        raw = meta.get("generation_config")
        if raw is None:
            return {}
        try:
            got = cls.model_validate(raw)
        except ValidationError as exc:
            e = exc.errors()[0]
            where = ".".join(str(p) for p in ("generation_config", *e["loc"]))
            hint = f" (it takes {', '.join(cls.model_fields)})" if e["type"] == "extra_forbidden" else ""
            raise ValueError(f"{where}: {e['msg']}{hint}") from None
        return got.model_dump(exclude_none=True)


def with_defaults(defaults: dict, req: BaseModel) -> dict:
    """The sampling fields of a request, each from the request if it set it, else from the checkpoint's
    `defaults` (GenerationConfig), else the request model's own default."""
    return {f: defaults[f] if f in defaults and f not in req.model_fields_set else getattr(req, f)
            for f in GENERATION_FIELDS}  # fmt: skip


class InputFields(Strict):
    prompt: str | None = Field(None, description="text prompt (text models)")
    prompt_audio: str | None = Field(
        None,
        description="audio models: a base64 audio file (WAV of any sample format, FLAC, OGG Vorbis/Opus, "
        "MP3: what libsndfile reads), resampled to the model's rate; line breaks and a data URI's "
        "`data:<type>;base64,` prefix are allowed; without one, generation starts from the model's silence",
    )


DEFAULT_FRAME_MS, MIN_FRAME_MS, MAX_FRAME_MS = 20, 5, 200  # streamed audio: milliseconds per frame


class AudioStreamFields(Strict):
    frame_ms: int | None = count(
        None,
        ge=MIN_FRAME_MS,
        le=MAX_FRAME_MS,
        description=f"streamed audio (SSE, WebSocket): milliseconds of audio per frame, {MIN_FRAME_MS}-"
        f"{MAX_FRAME_MS} (default {DEFAULT_FRAME_MS}); "
        "every frame but the last holds exactly round(frame_ms × sample_rate / 1000) samples, at least one "
        "(160 at 8 kHz, "
        "320 at 16 kHz for 20 ms), the last one the rest. Audio models only",
    )


class GenerateRequest(SamplingFields, InputFields, AudioStreamFields):
    model: str | None = Field(
        None,
        description="model id (see GET /v1/models); required unless session_id is given, whose model it is "
        "then (naming another one is a 422)",
    )
    session_id: str | None = Field(None, description="continue this session (its state is updated)")
    stream: bool = Field(False, description="Server-Sent Events: token events, then a done event")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(
        description="prompt tokens whose state came from the prefix cache, not ingested (S4_PREFIX_CACHE_MB)"
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int = Field(description="prompt_tokens + completion_tokens")
    prompt_tokens_details: PromptTokensDetails


class GenerateResponse(BaseModel):
    id: str
    model: str
    text: str | None = Field(None, description="text models: the generated text, before any stop sequence")
    audio: str | None = Field(None, description="audio models: base64 WAV at the model's sample rate")
    tokens: list[int] = Field(description="every generated token id (a stop sequence's included)")
    finish_reason: Literal["stop", "length", "cancelled"]
    usage: Usage
    session_id: str | None = None


class Verification(BaseModel):
    """The load-time checks: relative errors (‖Δ‖/‖ref‖) against float64 conv mode."""

    dtype: str = Field(description="the dtype the network was verified at")
    tokens: int = Field(description="probe length (2 sequences) of the logits check")
    step_rel_err: float = Field(description="logits of the recurrent step over the probe")
    prefill_rel_err: float = Field(description="logits of the parallel prefill (two halves) over the probe")
    logits_tol: float = Field(description="the tolerance both met (LOGITS_TOL of the dtype)")
    kernel_rel_err: list[float] = Field(description="per layer: the step's impulse response vs the kernel")
    state_dtype_check: dict[str, float | int | str] | None = Field(
        None,
        description="S4_STATE_DTYPE=float16 on CUDA: the float16 step against the float32 step over its "
        "probe (dtype, rows, steps, tv_mean and tv_max: total variation between their next-token "
        "distributions, logits_rel_err, argmax_differs, state_max_abs; state_bound_max: the largest |value| "
        "a float16 state can take on any input, every rounding included, under float16's 65504; bound_over: "
        "entries past it, 0; tol: the tv_mean it met); null with float32 states",
    )


class ModelInfo(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the checkpoint's weights were written")
    owned_by: str
    chat: bool = Field(description="has a chat template (POST /v1/chat/completions)")
    generation_config: dict[str, float | int] = Field(
        description="the checkpoint's sampling defaults (config.json generation_config: temperature, top_k, "
        "top_p, repetition_penalty, max_new_tokens), only those it sets: what a request that leaves the "
        "field out gets; a field not listed has the API's default"
    )
    kind: Literal["text", "audio"]
    arch: Literal["isotropic", "sashimi"] = Field(description="network shape (sashimi: n_layers per level)")
    unet: bool = Field(
        description="sashimi: a U-Net (blocks before each DownPool too, their outputs added on the way up); "
        "false for isotropic"
    )
    sample_rate: int | None
    vocab_size: int
    tokens: Literal["bytes", "words", "vocab_bytes", "characters", "audio"] = Field(
        description="what a token is: a UTF-8 byte (text; id = byte), a word of the checkpoint's vocab.txt "
        "(a word-level text model: a newline is <eos>, a word's text is a space and the word), a UTF-8 byte "
        "numbered by vocab.txt (an official enwik8 model: a newline, where its data lacked one, is dropped "
        "from prompts: dropped_characters), a character of vocab.txt (an official text8 model: prompts "
        "lower-cased, a space is its '_'), or an 8-bit audio sample (audio_codec)"
    )
    dropped_characters: list[str] = Field(
        description='the characters every text route drops from a prompt, unread: ["\\n"] for an enwik8 '
        "model whose vocabulary lacks the newline byte (its data had none), [] for every other model (an "
        "enwik8 vocabulary with the symbol 10 reads a newline as a token)"
    )
    audio_codec: Literal["mu-law s4serve", "mu-law s4", "linear"] | None = Field(
        description="audio: the samples' 8-bit code, what `mulaw` WebSocket frames hold (token ids, not "
        "G.711 bytes: use pcm16 or WAV to play them): mu-law in our "
        "convention (s4serve: 2q/255 - 1), mu-law in state-spaces/s4's (s4: q/128 - 1, official SaShiMi "
        "models), or state-spaces/s4's linear quantization (q/128 - 1 without companding, the official "
        "Beethoven SaShiMi's; such a model sends no mulaw frames); null for text"
    )
    n_layers: int
    d_model: int
    d_state: int
    kernel: str
    layer_forms: list[str] = Field(description="per S4 layer: diagonal or dplr (the verified step form)")
    dtype: Dtype = Field(description="the served weights' dtype")
    state_dtype: Literal["float32", "float16"] = Field(
        description="the dtype the decode batch stores states in (S4_STATE_DTYPE; sessions stay float32)"
    )
    verification: Verification
    state_bytes_per_session: int
    max_sessions: int
    max_prompt_tokens: int = Field(
        description="the longest prompt (or append) in tokens, else 413 (on the OpenAI routes 400, code "
        "context_length_exceeded): text S4_MAX_PROMPT_TOKENS, audio S4_MAX_AUDIO_S × sample_rate samples"
    )
    max_new_tokens: int = Field(
        description="the largest max_new_tokens: text S4_MAX_NEW_TOKENS, audio S4_MAX_AUDIO_S × sample_rate"
    )


class TokenizeRequest(Strict):
    """vLLM's /tokenize: how a text model reads a prompt, without generating."""

    model: str = Field(description="a served text model's id")
    prompt: str = Field(description="read as every text route reads a prompt: UTF-8 bytes, a word-level "
                        "model's words (split at whitespace, `<eos>` for each newline), an enwik8 model's "
                        "bytes or a text8 model's characters (model/vocab.py)")  # fmt: skip
    return_token_strs: bool = Field(False, description="also each token as OpenAI's logprobs spell it")


class TokenizeResponse(BaseModel):
    count: int = Field(description="the prompt's tokens")
    max_model_len: int = Field(description="the longest prompt this server takes (max_prompt_tokens)")
    tokens: list[int]
    token_strs: list[str] | None = Field(description="each token's text (return_token_strs), else null")
    unknown_words: list[str] = Field(
        description="a word-level model's: the prompt's words its vocabulary lacks, in order, each read as "
        "`<unk>` (the text routes do not say so); [] for any other model (an enwik8 or text8 model refuses a "
        "character its vocabulary lacks, naming it)"
    )
    dropped: list[str] = Field(
        description="the prompt's characters the model's vocabulary drops, in order: an enwik8 model's "
        "newlines (its data had none: the prep script made each a line break, which the official tokenizer "
        "dropped); [] for any other model"
    )


class DetokenizeRequest(Strict):
    """vLLM's /detokenize: token ids back to text."""

    model: str = Field(description="a served text model's id")
    tokens: list[Annotated[int, Field(ge=0)]] = Field(description="token ids, each below the vocabulary size")


class DetokenizeResponse(BaseModel):
    prompt: str = Field(description="the ids' text (bytes decoded as UTF-8, invalid sequences as U+FFFD)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


class SessionCreate(InputFields):
    model: str


class SessionAppend(InputFields):
    pass


class InputUsage(BaseModel):
    prompt_tokens: int
    prompt_tokens_details: PromptTokensDetails


class SessionInfo(BaseModel):
    session_id: str
    model: str
    tokens: int = Field(description="tokens in the session so far (prompts and generations)")
    state_bytes: int
    status: Literal["idle", "busy"]
    generated: int = Field(description="tokens generated by the running (or last) request")
    created: float
    last_used: float
    usage: InputUsage | None = Field(
        None,
        description="create and append: the input's tokens, and those whose state came from the prefix cache",
    )


class ErrorDetail(BaseModel):
    code: int
    type: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# the error statuses of the JSON routes, for their OpenAPI `responses` (415: a body not sent as JSON)
ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 404, 409, 413, 415, 422, 429, 503)}


class OpenAIErrorDetail(BaseModel):
    """OpenAI's error object (server/errors.py `APIError.openai_body`)."""

    message: str
    type: str = Field(description="invalid_request_error, requests (a 429) or server_error (5xx)")
    param: str | None = None
    code: str | None = Field(
        description="invalid_api_key, model_not_found, rate_limit_exceeded, or null (OpenAI's codes)"
    )


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail


# the OpenAI routes' errors (a refused field is a 400 there, never a 422; 406: an Accept they cannot answer)
OPENAI_ERROR_RESPONSES = {
    code: {"model": OpenAIErrorResponse} for code in (400, 404, 406, 413, 415, 429, 503)
}


# --- OpenAI-compatible API (server/routes/openai.py) --------------------------------------------
# Field by field as platform.openai.com/docs/api-reference documents them; fields we lack are
# refused by name (unknown fields too: extra="forbid"), never ignored. Extensions as vLLM names them.

MAX_CHOICES = 16  # n and best_of
MAX_PROMPTS = 64  # prompts in one completions request
Finite = {"allow_inf_nan": False}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = Field(False, description="a last chunk with `usage` (and no choices) before [DONE]")
    include_obfuscation: bool = Field(
        True,
        description="accepted, not used: this server adds no obfuscation padding to its chunks (OpenAI's "
        "`obfuscation` field, which true asks for), so false and true answer alike",
    )


class OpenAISampling(BaseModel):
    """The sampling fields completions and chat share. Strict types (no "2" for 2, no true for 1);
    a field sent as null is the same as a field left out (OpenAI's schema makes them nullable)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    model: str = Field(description="model id (see GET /v1/models)")
    temperature: float = Field(
        1.0,
        ge=0,
        le=MAX_TEMPERATURE,
        **Finite,
        description="0 → greedy; as /v1/generate (OpenAI documents ≤ 2)" + OR_CHECKPOINTS,
    )
    top_p: float = Field(
        1.0,
        ge=0,
        le=1,
        **Finite,
        description="nucleus mass (1 → off; 0, as OpenAI takes it, or tiny → the most likely token)"
        + OR_CHECKPOINTS,
    )
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="completions per prompt, each its own sample")
    seed: int | None = Field(
        None,
        ge=-(2**63),
        le=2**63 - 1,
        description="OpenAI's int64 range; choice i samples with a seed derived from (seed, i); i = 0 uses "
        "seed (a negative one as seed + 2^64, so each seed keys its own generator)",
    )
    stop: list[StopString] | None = Field(
        None, max_length=16, description="the text ends before any of these"
    )
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="only with stream=true")
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, **Finite)]] | None = Field(
        None, max_length=1024, description="token id (a string) → bias added to its logit, in [-100, 100]"
    )
    presence_penalty: float = Field(
        0.0, ge=-2, le=2, **Finite, description="subtracted from the logit of every token generated so far"
    )
    frequency_penalty: float = Field(
        0.0, ge=-2, le=2, **Finite, description="subtracted per occurrence in the tokens generated so far"
    )
    user: str | None = Field(None, max_length=256, description="an end-user id; accepted, not used")
    # extensions (vLLM's names; `extra_body` in the openai client)
    top_k: int = Field(
        0,
        ge=-1,
        le=2**31 - 1,
        description="extension: keep the k most likely (0 or -1 → off)" + OR_CHECKPOINTS,
    )
    min_p: float = Field(
        0.0,
        ge=0,
        le=1,
        **Finite,
        description="extension: drop tokens below min_p × the most likely one's probability",
    )
    repetition_penalty: float = Field(
        1.0,
        ge=0.01,
        le=100,
        **Finite,
        description="extension: CTRL-style penalty on tokens of prompt and output" + OR_CHECKPOINTS,
    )

    _one_stop = field_validator("stop", mode="before")(SamplingFields._one_stop.__func__)


# A request's unbounded collections (the prompt's lists, chat messages and content parts) stop at their
# first bad item: a union member that fails on each of half a million items otherwise reports each (3 s
# to build and sort, the event loop held). The bounded ones (stop, logit_bias) fail on their length first.
FAIL_FAST = Field(fail_fast=True)
TokenIds = Annotated[list[Annotated[int, Field(ge=0, lt=2**31)]], Field(min_length=1), FAIL_FAST]


class CompletionRequest(OpenAISampling):
    prompt: Annotated[
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS), FAIL_FAST]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS), FAIL_FAST],
        OneOf,
    ] = Field(
        description=f"a string, a list of strings, token ids, or a list of token-id lists (≤ {MAX_PROMPTS})"
    )
    max_tokens: int = Field(
        16, ge=0, description="tokens to generate at most per choice (0 only with echo)" + OR_CHECKPOINTS
    )
    echo: bool = Field(False, description="return the prompt before the completion (and its logprobs)")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="log-probabilities of each token and of the k most likely"
    )
    best_of: int | None = Field(
        None,
        ge=1,
        le=MAX_CHOICES,
        description="sample this many per prompt, return the n of best mean logprob",
    )
    suffix: str | None = Field(None, description="not supported (refused)")


CHAT_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for a message's `name`

# Fields of OpenAI's reply message (the openai client's ChatCompletionMessage, and the assistant message a
# client sends back: `messages.append(reply.model_dump())` writes every one, null) that this server never
# produces: accepted as null, refused naming the field otherwise. The reason each is refused:
NULL_ONLY_MESSAGE_FIELDS = {
    "refusal": "writes no refusals",
    "tool_calls": "has no tools",
    "function_call": "has no functions",
    "audio": "writes no audio on this route",
    "annotations": "writes no annotations",
}


def null_only(field: str):
    """A field of `NULL_ONLY_MESSAGE_FIELDS`: null, or refused naming it (`ChatMessage._null_only`)."""
    return Field(None, description=f"null only: this server {NULL_ONLY_MESSAGE_FIELDS[field]}")


class ChatMessage(BaseModel):
    """One message. `content` may be null only for an assistant message (an empty speech), as OpenAI's
    reply objects carry it; the fields of `NULL_ONLY_MESSAGE_FIELDS` only null."""

    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | Annotated[list[dict], Field(min_length=1), FAIL_FAST] | None, OneOf] = Field(
        description="text, or a list of {type: text, text} parts; null only for role assistant"
    )
    name: str | None = Field(
        None,
        description="the speaker (the template may use it): 1-64 ASCII letters, digits, _ or - (OpenAI's "
        "rule), so a name cannot add lines to the prompt",
        json_schema_extra={"pattern": f"^{CHAT_NAME.pattern}$"},
    )
    refusal: None = null_only("refusal")
    tool_calls: None = null_only("tool_calls")
    function_call: None = null_only("function_call")
    audio: None = null_only("audio")
    annotations: None = null_only("annotations")

    @field_validator("content")
    @classmethod
    def _null_only_for_the_assistant(cls, v, info: ValidationInfo):
        if v is None and info.data.get("role", "assistant") != "assistant":
            raise PydanticCustomError(
                "content_null", "null content is allowed only in an assistant message; send a string"
            )
        return v

    @field_validator("name", mode="before")
    @classmethod
    def _openai_s_name(cls, v):
        if isinstance(v, str) and not CHAT_NAME.fullmatch(v):
            raise PydanticCustomError(
                "name_pattern",
                "{value} is not a name: 1-64 ASCII letters, digits, _ or - (OpenAI's rule; no spaces or "
                "line breaks, which would write other lines into the conversation)",
                {"value": repr(v[:80])},
            )
        return v

    @field_validator(*NULL_ONLY_MESSAGE_FIELDS, mode="before")
    @classmethod
    def _null_only(cls, v, info: ValidationInfo):
        if v is not None:
            raise PydanticCustomError(
                "unsupported_field",
                "{field} is not supported by this server, which {why}: only null is accepted, as a reply's "
                "model_dump() has it",
                {"field": info.field_name, "why": NULL_ONLY_MESSAGE_FIELDS[info.field_name]},
            )
        return v


class ChatCompletionRequest(OpenAISampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256), FAIL_FAST]
    max_completion_tokens: int | None = Field(
        None,
        ge=1,
        description="tokens to generate at most per choice; left out (with max_tokens): the model's "
        "generation_config max_new_tokens (GET /v1/models) if it sets one, else 256",
    )
    max_tokens: int | None = Field(None, ge=1, description="the older name of max_completion_tokens")
    logprobs: bool = Field(False, description="log-probabilities of each generated token")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="with logprobs: the k most likely"
    )
    # fields clients send by default that change nothing here: accepted, range-checked, not used
    store: Literal[False] = Field(False, description="false only: this server keeps no completions")
    metadata: (
        Annotated[
            dict[
                Annotated[str, StringConstraints(max_length=64)],
                Annotated[str, StringConstraints(max_length=512)],
            ],
            Field(max_length=16),
        ]
        | None
    ) = Field(None, description="≤ 16 string pairs (OpenAI's bounds); accepted, not used (nothing is stored)")
    parallel_tool_calls: bool = Field(True, description="accepted, not used: tools are not supported")

    @field_validator("store", mode="before")
    @classmethod
    def _store_false_only(cls, v):
        if v is True:
            raise PydanticCustomError(
                "unsupported_value",
                "true is not supported by this server (it keeps no completions): send false or leave it out",
            )
        return v


SYSTEM_FINGERPRINT = Field(
    description="fp_ + 12 hex digits: the served model's weights, config and serving dtypes and device "
    "(a seed reproduces its tokens while this stays the same); in every stream chunk too"
)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str = SYSTEM_FINGERPRINT
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: dict | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str = SYSTEM_FINGERPRINT
    choices: list[ChatChoice]
    usage: CompletionUsage | None = None


# --- WebSocket control frames (client → server) ------------------------------------------------


WS_MODEL = (
    "binds the socket when it is not bound yet; a first message may leave it out when it names a "
    "session_id: the session's model"
)


AUDIO_ENCODING = (
    "binary frames, both ways: pcm16 (s16le samples at the model's rate: playable) or mulaw (one byte per "
    "sample = the model's token ids, NOT G.711 mu-law bytes: ids 128-255 run opposite to G.711's, so the "
    "silence code 128 plays at full scale in `sox -t ul` or ffmpeg's pcm_mulaw)"
)


class WSSession(Strict):
    type: Literal["session"]
    model: str | None = Field(None, description=WS_MODEL)
    session_id: str | None = Field(None, description="attach an existing session instead of a new one")
    audio_encoding: Literal["pcm16", "mulaw"] | None = Field(None, description=AUDIO_ENCODING)


class WSGenerate(SamplingFields, InputFields, AudioStreamFields):
    type: Literal["generate"]
    model: str | None = Field(None, description=WS_MODEL)
    session_id: str | None = None
    audio_encoding: Literal["pcm16", "mulaw"] | None = Field(None, description=AUDIO_ENCODING)


class WSAppend(InputFields):
    type: Literal["append"]
    model: str | None = Field(None, description=WS_MODEL)
    session_id: str | None = None
    audio_encoding: Literal["pcm16", "mulaw"] | None = Field(None, description=AUDIO_ENCODING)


class WSCancel(Strict):
    type: Literal["cancel"]


WSMessage = TypeAdapter(Annotated[WSSession | WSGenerate | WSAppend | WSCancel, Field(discriminator="type")])
