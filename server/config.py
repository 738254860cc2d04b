"""Server settings: environment variables `S4_*` (pydantic-settings), overridable by CLI flags.

Every field here is a flag of `python -m server` too (`max_sessions` → `--max-sessions`); the README's
settings table is generated from the same descriptions (`settings_table`).
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.origin import normal_host_name, normal_origin

REDIS_STORE_SCHEMES = ("redis://", "rediss://", "unix://")  # S4_SESSION_STORE values naming a Redis
# the largest S4_SESSION_STORE_TTL_S: Redis takes expiry times up to ~9.2e15 s ahead (signed 64-bit ms)
MAX_STORE_TTL_S = 10**9
# redis-py URL options the session store sets itself: in the URL they replaced its timeouts (redis-py's
# from_url lets the URL's options win), so `?socket_timeout=60` made a hung Redis cost each request 60 s
STORE_OWN_OPTIONS = frozenset({"socket_timeout", "socket_connect_timeout", "timeout"})


def misread_userinfo(url: str) -> bool:
    """Whether an '@' follows a '/', '?' or '#' after the scheme: a user name or password holding one of
    them unencoded (a base64 password: redis://:Ab/cd@host/0), which URL parsers, redis-py's included, end
    the host at, reading the rest of the password as the path, query, fragment or port, where an error
    message or a log line showed it (`not '/cd@host/0'`, `as 'Ab'`)."""
    rest = url.partition("://")[2]
    return "@" in rest and any(c in rest.rpartition("@")[0] for c in "/?#")


DEFAULT_CHECKPOINTS = [
    "checkpoints/text-shakespeare",
    "checkpoints/audio-digits",  # SaShiMi
    "checkpoints/audio-digits-s4",  # isotropic S4: more concurrent streams per core
]
Dtype = Literal["float32", "bfloat16", "float16"]  # a served model's weights (S4_DTYPE, S4_MODEL_DTYPES)
DTYPES = get_args(Dtype)
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a served model's id (NAME= of S4_CHECKPOINTS)
MAX_PREFILL_TOKENS = 1 << 20  # the largest prefill chunk / per-iteration budget an operator may set
# Every numeric setting has an upper bound, so that a value past it is refused by name before the server
# listens (not a crash, an overflow or a warning printing a 400-digit number after it), and every network
# timeout and TTL a lower one, under which every request would fail (a header timeout of 1e-9 s dropped
# every connection; a TTL of 1e-9 s deleted a socket's session before its first turn).
MAX_COUNT = 1 << 20  # sessions, queued requests, connections, buffered steps (Linux's default nr_open)
MAX_TOKENS = 1 << 24  # a prompt's or a generation's tokens (16,777,216)
MAX_BYTES = 1 << 30  # a request body or WebSocket message (1 GiB)
MAX_THREADS = 1024  # torch threads (100000 crashed torch's pool after the server listened)
KEYS_FILE_MAX_CHARS = 1 << 20  # an S4_API_KEYS_FILE's characters at most (a million: thousands of keys)
MIN_NET_TIMEOUT_S = 0.1  # the shortest network timeout: a LAN round trip takes well under it
MAX_TIMEOUT_S = 3600.0  # the longest timeout or drain: an hour
MIN_TTL_S = 1.0  # the shortest idle TTL of a session
# how much longer than S4_SESSION_TTL_S a stored key (or a delete's tombstone) must live: a replica's idle
# copy is evicted by a sweep every min(1 s, TTL / 4) on an engine that wakes every 0.25 s when idle, so up
# to ~1.25 s after its TTL, while the key expires to the millisecond (whole seconds: 2)
STORE_TTL_MARGIN_S = 2


class Settings(BaseSettings):
    """Everything an operator may set. Limits are per model unless said otherwise."""

    # (no setting takes NaN or an infinity: refused as "a finite number", where NaN was said to be above a
    # bound and an infinite timeout was accepted)
    model_config = SettingsConfigDict(env_prefix="S4_", extra="forbid", allow_inf_nan=False)

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(
        8000,
        ge=1,
        le=65535,
        description="TCP port, 1 to 65535 (0, a port the OS would pick, is refused: nothing could reach it "
        "without reading the log)",
    )
    checkpoints: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_CHECKPOINTS),
        description="checkpoint folders to serve (comma-separated); the model id is the folder name. "
        "An entry may also be a checkpoint of the official state-spaces/s4 code (a `.ckpt`, or a `.pt` with "
        "its config.yaml beside it), converted at load time; `NAME=PATH` sets the model id (default: the "
        "folder name or the file's stem; NAME: letters, digits, '.', '_', '-'; a path with a '=' before its "
        "first '/' is written ./PATH). An entry whose NAME is no id, or two entries with one model id (one "
        "checkpoint twice, however written), stop the server before it listens; one checkpoint under two "
        "NAMEs serves twice (e.g. in two dtypes: S4_MODEL_DTYPES)",
    )
    convert_cache: str = Field(
        "~/.cache/s4serve/convert",
        description="where official checkpoints are converted to, one folder per SHA-256 of the source "
        "(and of its config and its vocab.txt, when beside it) and converter version (reused; an entry "
        "changed since is converted again)",
    )
    recurrent_cache: str = Field(
        "~/.cache/s4serve/recurrent",
        description="where each S4 layer's verified recurrent form is kept (a safetensors file per layer, "
        "keyed by the SHA-256 of its SSM parameters, the conversion's settings and the torch and converter "
        "versions): a restart reads them instead of converting again (the whole network's check against "
        "conv mode runs at every start); a folder that cannot be written is logged and the layers are "
        "converted at every start; empty: off",
    )
    device: str = Field("auto", description="auto (cuda when present, else cpu), cpu, cuda, cuda:N")
    verify_tolerance: float = Field(
        1e-4,
        gt=0,
        le=1e-2,
        description="max relative error of each layer's recurrent form against its conv kernel, at most 1e-2 "
        "(above that the form no longer computes the trained model; the shipped models' layers measure "
        "5e-6 to 2e-5 in float32)",
    )
    dtype: Dtype = Field(
        "float32",
        description="dtype of the served weights (states stay float32: S4_STATE_DTYPE); verified at load: "
        "logits within "
        "1e-4 (float32), 1.6e-2 (bfloat16) or 2e-3 (float16) of float64 conv mode, else not served",
    )
    model_dtypes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="per-model dtype overriding S4_DTYPE: MODEL_ID=DTYPE entries (comma-separated), e.g. "
        "`text-shakespeare=bfloat16` with the default dtype float32, or `audio-digits=float32` with "
        "S4_DTYPE=bfloat16; an id that no checkpoint entry serves is "
        "listed in /readyz as not served",
    )
    require_all_models: bool = Field(
        False,
        description="/readyz answers 503 (reason: the models not served and why) while any configured "
        "checkpoint failed to load or verify, so an orchestrator keeps such a replica out of service; by "
        "default it is ready once every configured model has loaded or failed and at least one serves (a "
        "default checkpoint not trained yet never counts)",
    )
    cuda_graphs: bool = Field(
        True,
        description="on a CUDA device, replay the decode step as CUDA graphs, one per batch-size bucket "
        "(1, 2, 4, … up to max_batch_size, at most 1024; a batch is padded up to its bucket), captured at "
        "load and checked against the eager step (a capture that fails or differs is logged and the plain "
        "step serves); SaShiMi models capture a dense step (every pooling level of every row, masked). "
        "0 steps with plain torch ops. Ignored on CPU",
    )
    triton_step: bool = Field(
        True,
        description="on a CUDA device, step each diagonal SSM layer (S4D, and S4 layers converted to "
        "diagonal) of a batch with one Triton kernel that reads and writes its state once "
        "(model/triton_step.py; verified against conv mode at load, as every step is), where the plain "
        "step takes a dozen elementwise kernels a layer; needs the triton package (PyTorch's CUDA wheels "
        "ship it). Ignored on CPU (the C step). At load one launch probes the kernel; where it does not run "
        "(triton missing, no C compiler for Triton's launcher) a warning names why and the torch step "
        "serves. With S4_COMPILE_STEP the compiled torch step runs instead",
    )
    state_dtype: Literal["float32", "float16"] = Field(
        "float32",
        description="on a CUDA device, the dtype the decode batch stores its states in: float16 halves the "
        "bytes a step moves (bound by them at large batches) for a model whose layers are all diagonal and "
        "step with the Triton kernel (others, SaShiMi among them, keep float32: a warning says why), each "
        "step computing in float32 from the widened state and rounding the next state to float16 (+0.0002 "
        "bits a token on the shipped text model's held-out data, +0.008 on audio-digits-s4's: "
        "bench.state_precision). Applied only where proven not to overflow: the largest value any input "
        "can drive a state to, every float16 rounding fed back (state16_bound), within float16's 65,504 "
        "(6,688 for text-shakespeare, 6,452 for audio-digits-s4; a model with a mode too slow for "
        "float16's rounding has none); and checked at load against the float32 step over a probe of random "
        "tokens (next-token distributions within a mean total variation of 0.015). A model that fails "
        "either is logged as an error and keeps float32. Sessions, exports and prefill stay float32. "
        "Ignored on CPU (the C step keeps float32 states)",
    )
    compile_step: bool = Field(
        False,
        description="on a CUDA device, run the decode step through torch.compile (Inductor, dynamic batch "
        "size), compiled at load before the CUDA graphs are captured (a minute or more at start). Ignored "
        "on CPU (the C step) and for SaShiMi models",
    )
    max_sessions: int = Field(
        256,
        ge=1,
        le=MAX_COUNT,
        description="state slots per model (sessions + one-shot requests); with a session store, a request "
        f"that finds none free evicts the idle sessions used least recently to it (at most {MAX_COUNT:,})",
    )
    session_ttl_s: float = Field(
        600.0,
        ge=MIN_TTL_S,
        le=MAX_STORE_TTL_S,
        description="an idle session is deleted (with a session store: evicted to it) after this many "
        "seconds (idle: no turn running, and its last frame handed to its client; a request naming the "
        "session restarts the count when it arrives, so the TTL never takes a session between a request's "
        f"check and its claim); at least {MIN_TTL_S:g} s",
    )
    max_prompt_tokens: int = Field(
        8192,
        ge=1,
        le=MAX_TOKENS,
        description="text models: longest prompt (or append) in tokens (else 413); a /v1/completions body "
        "may hold 64 prompts of this many token ids",
    )
    max_new_tokens: int = Field(
        4096,
        ge=1,
        le=MAX_TOKENS,
        description=f"text models: largest max_new_tokens a request may ask for (at most {MAX_TOKENS:,})",
    )
    max_audio_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="audio models: longest prompt (or append; else 413) and largest max_new_tokens, in "
        "seconds at the model's sample rate (30 s at 8 kHz: 240,000 samples)",
    )
    audio_decode_cpu_s: float = Field(
        10.0,
        ge=0.1,
        le=3600,
        description="audio models: CPU seconds a prompt audio file may take to decode and resample, 0.1 to "
        "3,600 (in a worker process, which is ended past them: the file is tried once more alone, then "
        "refused with a 422 naming prompt_audio and this setting); a 30 s 48 kHz WAV takes 6.6 ms in the "
        "server's process and 12.3 ms through a worker (bench.audio_decoder). Not applied where no worker "
        "process can be made and files are decoded in the server's own process (the log says so)",
    )
    max_queued_requests: int = Field(
        256,
        ge=1,
        le=MAX_COUNT,
        description="requests admitted but not yet decoding, per model (else 429; a delete is never refused)",
    )
    max_batch_size: int = Field(
        128, ge=1, le=MAX_COUNT, description="most sessions stepped together in one decode step"
    )
    prefill_chunk_tokens: int = Field(
        256,
        ge=1,
        le=MAX_PREFILL_TOKENS,
        description="prompts are ingested in chunks of this many tokens (fixed boundaries), one chunk per "
        "prompt per engine iteration, between decode steps: the decoding sessions wait at most one "
        "iteration's prefill for their next token, prefill_token_budget tokens at most (one chunk while a "
        "single prompt is ingested; this and the budget ≥ the longest prompt: chunking off)",
    )
    prefill_token_budget: int = Field(
        512,
        ge=1,
        le=MAX_PREFILL_TOKENS,
        description="prompt tokens ingested per engine iteration, between two decode steps (at least "
        "`prefill_chunk_tokens`); shortest prompts first, a prompt passed over goes first next time",
    )
    prefix_cache_mb: float = Field(
        64.0,
        ge=0,
        le=1 << 20,
        description="per model, MiB of device memory for the states after prompt prefixes (at "
        "`prefill_chunk_tokens` boundaries and after a prompt's ingested tokens, all but its last; spare "
        "rows out before kept ones, least "
        "recently used first: see `prefix_cache_retention_interval`): a new session's prompt (one-shot "
        "requests and OpenAI routes included) starts from the longest stored prefix and ingests only the "
        "rest, reported as usage.prompt_tokens_details.cached_tokens; 0: off",
    )
    prefix_cache_retention_interval: int = Field(
        0,
        ge=0,
        le=MAX_PREFILL_TOKENS,
        description="tokens, a multiple of `prefill_chunk_tokens`: the prefix cache keeps a prompt's state "
        "after each multiple of this many tokens, as it keeps the state after its last whole chunk and "
        "where it diverges from an earlier prompt; its other states are spare, stored while there is room "
        "and out first (vLLM's prefix_cache_retention_interval). 0: none by length; "
        "`prefill_chunk_tokens`: every chunk's row kept",
    )
    decode_block_ms: float = Field(
        40.0,
        ge=0,
        le=100,
        description="the engine decodes 8 steps, or more (≤ 64) while within this time, "
        "before it hands the tokens to the event loop (new work ends a block within ≤ 4 steps); "
        "longer means fewer, larger token frames and less CPU per token, shorter a steadier trickle",
    )
    audio_decode_block_ms: float = Field(
        20.0,
        ge=0,
        le=200,
        description="the same for audio models (≤ 512 steps, in native blocks of ≤ 256): their samples "
        "leave in frames of frame_ms (20 by default), so handing them over more often only costs time",
    )
    stream_buffer: int = Field(
        64,
        ge=1,
        le=MAX_COUNT,
        description="undelivered steps held per request; a full buffer pauses its session",
    )
    audio_stream_buffer_ms: float = Field(
        250.0,
        ge=0,
        le=10_000,
        description="the same for audio models, in milliseconds of audio (at least `stream_buffer` samples): "
        "64 samples are 8 ms at 8 kHz, less than one frame",
    )
    ws_max_frame_bytes: int = Field(
        1 << 20,
        ge=1024,
        le=MAX_BYTES,
        description="largest WebSocket message accepted, fragments together (else close 1009)",
    )
    ws_compression: bool = Field(
        False,
        description="offer permessage-deflate on WebSockets: fewer bytes on slow links, CPU on both ends "
        "for every frame (mu-law audio and short token frames barely shrink)",
    )
    max_body_bytes: int = Field(
        16 << 20,
        ge=1024,
        le=MAX_BYTES,
        description="largest HTTP request body, counted as it arrives (else 413 and the connection is "
        "closed); a session import is held to the largest state blob (a state, and a seen list of the "
        "whole vocabulary) + 1 MiB instead, whatever this setting (1,514,756 bytes with the shipped "
        "models). A JSON body, "
        "and a WebSocket message, is also counted outside its strings as it arrives: at most 65,536 array "
        "or object elements, object members and numbers with a fraction or exponent, and 16,384 arrays "
        "and objects, as no valid one holds more (for token ids, /v1/completions: 64 x max_prompt_tokens "
        "more elements; /detokenize: the larger of max_prompt_tokens and max_new_tokens more; for content "
        "parts of a token each, /v1/chat/completions: 2 x max_prompt_tokens + 4,096 elements and members, "
        "and max_prompt_tokens + 4,096 arrays and objects, where that is more), else 413",
    )
    max_header_bytes: int = Field(
        1 << 16,
        ge=1024,
        le=MAX_BYTES,
        description="largest request line + headers, and largest trailer section of a chunked body (else 431 "
        "and the connection is closed)",
    )
    header_timeout_s: float = Field(
        10.0,
        ge=MIN_NET_TIMEOUT_S,
        le=MAX_TIMEOUT_S,
        description="a request line and headers must arrive within this time of the request's first byte "
        "(of the accept, for a connection's first request), else 408 and close. This and the other network "
        f"timeouts: {MIN_NET_TIMEOUT_S:g} s (a LAN round trip takes well under it; give a slow link more) to "
        f"{MAX_TIMEOUT_S:g} s",
    )
    body_timeout_s: float = Field(
        30.0,
        ge=MIN_NET_TIMEOUT_S,
        le=MAX_TIMEOUT_S,
        description="a request body must arrive within this time of its headers (else 408 and close)",
    )
    ws_handshake_timeout_s: float = Field(
        10.0,
        ge=MIN_NET_TIMEOUT_S,
        le=MAX_TIMEOUT_S,
        description="a WebSocket is accepted within this time of its upgrade request, or closed",
    )
    send_timeout_s: float = Field(
        60.0,
        ge=MIN_NET_TIMEOUT_S,
        le=MAX_TIMEOUT_S,
        description="a client that reads none of what the server sends for this long is disconnected "
        "(its generation cancelled); a WebSocket that takes nothing is closed sooner by its keepalive, "
        "1008 once a ping (every 20 s) goes 20 s unanswered, while it takes none of the bytes sent before it",
    )
    sse_keepalive_s: float = Field(
        15.0,
        ge=MIN_NET_TIMEOUT_S,
        le=MAX_TIMEOUT_S,
        description="an SSE stream (`/v1/generate`, `/v1/completions`, `/v1/chat/completions` with stream: "
        "true) that has had nothing to send for this many seconds (queued behind other requests, a long "
        "prompt's prefill) gets a comment line, `: keep-alive`, which SSE clients ignore, so that a proxy's "
        "idle timeout (nginx's proxy_read_timeout, a load balancer's 60 s) does not cut it; there is no off "
        "(0 is refused): 3600 makes them rare",
    )
    keep_alive_timeout_s: float = Field(
        5.0,
        ge=MIN_NET_TIMEOUT_S,
        le=MAX_TIMEOUT_S,
        description="an idle keep-alive connection is closed after this many seconds",
    )
    max_connections: int = Field(
        1000,
        ge=1,
        le=MAX_COUNT,
        description="open client connections (HTTP and WebSocket) at most; one more is answered 503 at "
        f"once and closed (keep it under `ulimit -n`; at most {MAX_COUNT:,}, Linux's default cap on a "
        "process's open files)",
    )
    max_connections_per_client: int = Field(
        0,
        ge=0,
        le=MAX_COUNT,
        description="open connections (HTTP and WebSocket) from one client at most: its IPv4 address, or its "
        "IPv6 /64; one more is answered 429 at once and closed (0: no limit). The client is the socket's "
        "peer: behind a reverse proxy, Docker's userland proxy or a NAT, many users share one address, so "
        "keep 0 there and limit in the proxy. Leave room for a client's own parallelism: a browser opens "
        "up to 6 connections to a host, an HTTP client's pool more, and retries add to them",
    )
    drain_timeout_s: float = Field(
        10.0,
        ge=0,
        le=MAX_TIMEOUT_S,
        description="on shutdown, wait this long for running requests",
    )
    shutdown_close_timeout_s: float = Field(
        5.0,
        ge=0,
        le=MAX_TIMEOUT_S,
        description="on shutdown, after the drain, wait at most this long for the connections to close "
        "(uvicorn's graceful-shutdown timeout); requests still running then are cancelled",
    )
    session_store: str = Field(
        "memory",
        description="memory (sessions live in this process only) or redis://host:port/db: session states are "
        "written through whenever a session changes (the answer waits for the write), and resume on any "
        "replica or after a restart",
    )
    session_store_ttl_s: int = Field(
        86400,
        ge=1,
        le=MAX_STORE_TTL_S,
        description="a state in the session store expires this many seconds after its last write, or the "
        "last request that used it on a replica (whole "
        f"seconds, 1 to {MAX_STORE_TTL_S:,}: about 31 years; at least S4_SESSION_TTL_S + "
        f"{STORE_TTL_MARGIN_S} s: a replica evicts an idle copy up to a second after its TTL)",
    )
    session_store_flush_timeout_s: float = Field(
        10.0,
        ge=MIN_NET_TIMEOUT_S,
        le=MAX_TIMEOUT_S,
        description="on shutdown, after the drain, the final write of every session to the session store "
        "takes at most this long in all (a store that does not answer: the sessions not written by then "
        "are logged, and keep their last written state there)",
    )
    session_store_write_wait_s: float = Field(
        2.0,
        ge=0,
        le=60,
        description="with a session store, a request that changes a session (create, append, fork, import, "
        "delete, a turn on it) is answered once the change is in the store (HTTP answer, SSE done event, "
        "WebSocket done or appended frame), so the next request finds it on any replica; a store slower "
        "than this many seconds gets the answer sent anyway (logged), but a delete is then a 503 (sent "
        "again, it waits for the store's delete). 0: answer at once, the write lands "
        "after (a next request on another replica may then continue from the state before, or be refused "
        "409 while the replica it left still writes or reloads the session); else at least "
        f"{MIN_NET_TIMEOUT_S:g} (a wait shorter than a store's round trip answered every change late, and "
        "every delete 503)",
    )
    torch_threads: int = Field(
        0,
        ge=0,
        le=MAX_THREADS,
        description=f"torch intra-op threads (0: torch's default), at most {MAX_THREADS} (more than the "
        "cores only slows the steps)",
    )
    prefill_threads: int = Field(
        1,
        ge=0,
        le=MAX_THREADS,
        description="torch threads of a prompt chunk's parallel prefill (isotropic models, chunks over 512 "
        "tokens or weights not float32; 0: the engine thread's torch setting): 2 on a dedicated 2-core box "
        "ingest 16k tokens 1.5–2.0× faster, but stall while another process takes a core; 1 degrades no "
        "more than decoding does",
    )
    gil_switch_ms: float = Field(
        0.5,
        ge=0.05,
        le=100,
        description="Python's thread switch interval (sys.setswitchinterval), in ms: how long the event loop "
        "may hold the GIL while an engine thread, back from a native block, waits for it (Python's 5 ms "
        "cost 16 audio streams 7–9 % of their samples/s)",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        repr=False,
        description="API keys (comma-separated); when set, every route but /healthz, /readyz and the demo "
        "page needs one: `Authorization: Bearer KEY` or `X-API-Key: KEY` (401 otherwise)",
    )
    api_keys_file: str = Field(
        "",
        description="a file of API keys, one per line (blank lines and lines starting with # ignored), read "
        "at start and added to S4_API_KEYS: for keys mounted as a secret (Docker, Kubernetes), kept out of "
        "the environment and of the command line, which `ps` shows",
    )
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="browser origins besides the server's own that may call it (comma-separated, exact: "
        "`https://app.example.com`; `*`: any, unsafe without API keys): a request carrying another "
        "`Origin` (a WebSocket handshake from another site's page, `Origin: null`) is refused 403; "
        "requests without one (curl, API clients) pass",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="host names besides loopback ones and IP addresses that requests may name in `Host` "
        "(comma-separated, no port; `*`: any), against DNS rebinding: checked when S4_HOST is a loopback "
        "address, or when this is set (else 403; the probes are exempt)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="log level (probes and /metrics scrapes are logged at debug)"
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="log lines as text, or one JSON object per line (time, level, logger, message, "
        "request_id, generation_id); either way a request's lines carry its X-Request-ID",
    )

    @field_validator("port", mode="before")
    @classmethod
    def _port(cls, v):
        """Port 0 refused with its reason (before the bounds, whose ">= 1" gave none)."""
        if isinstance(v, (int, str)) and not isinstance(v, bool) and str(v).strip() == "0":
            raise ValueError(
                "0 is refused: the OS would pick the port, and no client, probe or proxy could know it"
            )
        return v

    @field_validator("session_store_write_wait_s")
    @classmethod
    def _write_wait(cls, v: float) -> float:
        if 0 < v < MIN_NET_TIMEOUT_S:
            raise ValueError(f"must be 0 (answer at once) or at least {MIN_NET_TIMEOUT_S:g} s, not {v:g}")
        return v

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, v):
        return v.lower() if isinstance(v, str) else v  # DEBUG as debug, as logging takes it

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if re.fullmatch(r"auto|cpu|cuda(:[0-9]{1,3})?", v) is None:
            raise ValueError(f"must be auto, cpu, cuda or cuda:N (a GPU's index), not {v!r}")
        return v

    @field_validator("session_store")
    @classmethod
    def _store(cls, v: str) -> str:
        if v != "memory" and not v.startswith(REDIS_STORE_SCHEMES):
            raise ValueError("must be 'memory' or a redis:// URL (redis://host:port/db)")
        if v == "memory":
            return v
        if misread_userinfo(v):  # (before any message quotes a part of the URL)
            raise ValueError(
                "an '@' follows a '/', '?' or '#' in the URL: percent-encode them in its user name and "
                "password (%2F, %3F, %23; an '@' elsewhere %40), which are otherwise read as the URL's path, "
                "query or port"
            )
        parts = urllib.parse.urlsplit(v)
        dbs = urllib.parse.parse_qs(parts.query).get("db", [])
        if any(re.fullmatch(r"[0-9]{1,5}", d) is None for d in dbs) or len(dbs) > 1:
            raise ValueError(f"the URL's db parameter must be one number, not {dbs!r}")
        if not v.startswith("unix://"):  # (redis-py reads /abc as db 0 and /1/2 as db 12; unix://: a socket)
            if re.fullmatch(r"/?([0-9]{1,5})?", parts.path) is None:
                raise ValueError(f"the database in the URL's path must be a number (redis://host:port/N), "
                                 f"not {parts.path!r}")  # fmt: skip
            if dbs and parts.path.strip("/"):
                raise ValueError("the URL names its database twice (its path and its db parameter): give one")
        from redis.connection import parse_url  # noqa: PLC0415  (redis-py's own reading of the URL)

        try:  # (a port past 65535 or not a number, an option's value redis-py cannot read: its traceback)
            options = parse_url(v)
        except ValueError as exc:  # (its text names the port or the option, never the password)
            raise ValueError(f"redis-py cannot read the URL: {exc}") from None
        if timeouts := sorted(STORE_OWN_OPTIONS & options.keys()):
            raise ValueError(
                f"the URL sets {', '.join(timeouts)}, which the server sets itself (a 5 s socket timeout, "
                "1 s for the version check before each request, S4_SESSION_STORE_FLUSH_TIMEOUT_S at shutdown)"
            )
        return v

    @field_validator(
        "checkpoints", "api_keys", "model_dtypes", "allowed_origins", "allowed_hosts", mode="before"
    )
    @classmethod
    def _split(cls, v):
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list):  # the env var, and each --checkpoints value, may be comma-separated
            return [p.strip() for item in v for p in str(item).split(",") if p.strip()]
        return v

    @field_validator("checkpoints")
    @classmethod
    def _checkpoints(cls, v: list[str]) -> list[str]:
        """Each entry serves one model under an id no other entry has: a NAME that is no id, an empty NAME
        or PATH, and two entries with one id (the same folder twice, however written) are refused here,
        not logged as "failed" in /readyz after the server listens (where S4_REQUIRE_ALL_MODELS then kept
        it unready for ever) or read as a path ("no such file or folder: bad name!=...")."""
        from server.registry import model_id_of, parse_entry  # noqa: PLC0415 (it imports this module)

        seen: dict[str, tuple[str, Path]] = {}
        for entry in v:
            name, path = parse_entry(entry)
            if name is not None and not MODEL_ID.fullmatch(name):
                raise ValueError(
                    f"{entry!r}: {name!r} is not a model id (NAME=PATH: 1 to 128 letters, digits, '.', '_', "
                    "'-', starting with a letter or digit); a path with a '=' in its first part is written "
                    "./PATH"
                )
            if name is not None and not entry.partition("=")[2]:
                raise ValueError(f"{entry!r} names no checkpoint after '=' (NAME=PATH)")
            model_id = model_id_of(entry)
            if not model_id or model_id in (".", ".."):
                raise ValueError(
                    f"{entry!r} gives no model id (a folder's name is its id): write NAME={entry}"
                )
            if model_id in seen:
                first, first_path = seen[model_id]
                both = " (the same checkpoint)" if _same_path(first_path, path) else ""
                raise ValueError(
                    f"model id {model_id!r} is given twice, by {first!r} and {entry!r}{both}: give each "
                    "checkpoint once, or distinct ids with NAME=PATH"
                )
            seen[model_id] = entry, path
        return v

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for entry in v:
            if entry != "*" and normal_origin(entry) is None:
                raise ValueError(
                    f"{entry!r} is not an origin: scheme://host[:port] with no path, not even '/' "
                    "(https://app.example.com), or *"
                )
        return v

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        for entry in v:
            if entry != "*" and normal_host_name(entry) is None:
                raise ValueError(f"{entry!r} is not a host name: no port, no scheme (app.example.com), or *")
        return v

    @field_validator("model_dtypes")
    @classmethod
    def _model_dtypes(cls, v: list[str]) -> list[str]:
        seen = set()
        for entry in v:
            model_id, sep, dtype = entry.partition("=")
            if not sep or not MODEL_ID.fullmatch(model_id) or dtype not in DTYPES:
                raise ValueError(
                    f"{entry!r} is not MODEL_ID=DTYPE (MODEL_ID: letters, digits, '.', '_', '-'; "
                    f"DTYPE: {', '.join(DTYPES)})"
                )
            if model_id in seen:
                raise ValueError(f"model id {model_id!r} is given twice")
            seen.add(model_id)
        return v

    def model_dtype_overrides(self) -> dict[str, str]:
        """S4_MODEL_DTYPES as {model id: dtype}."""
        return dict(e.split("=", 1) for e in self.model_dtypes)

    def prefix_cache_rows(self, row_bytes: int) -> int:
        """The state rows of `row_bytes` bytes that prefix_cache_mb holds, whole (0: the cache is off)."""
        return int(self.prefix_cache_mb * (1 << 20)) // row_bytes

    def audio_samples(self, sample_rate: int) -> int:
        """max_audio_s in samples at `sample_rate`: an audio model's longest prompt and generation (of the
        decimal the setting is written in: 0.29 s at 48 kHz is 13,920, where the float product floored to
        13,919, and read_audio's limit is the same count)."""
        from model.codecs import samples_in  # noqa: PLC0415 (torch with it: only where models are served)

        return samples_in(self.max_audio_s, sample_rate)

    def new_tokens_limit(self, sample_rate: int | None) -> tuple[int, str]:
        """The largest max_new_tokens of a model (`sample_rate`: an audio model's, None for text) and the
        setting that sets it: max_new_tokens, or for audio max_audio_s at the model's rate."""
        if sample_rate is not None:
            return self.audio_samples(sample_rate), "max_audio_s"
        return self.max_new_tokens, "max_new_tokens"

    def dtype_for(self, model_id: str) -> str:
        """The dtype `model_id` serves in: its S4_MODEL_DTYPES entry, else S4_DTYPE."""
        return self.model_dtype_overrides().get(model_id, self.dtype)

    def dtype_source(self, model_id: str) -> str:
        """The setting `dtype_for(model_id)` comes from: "S4_MODEL_DTYPES" or "S4_DTYPE"."""
        return "S4_MODEL_DTYPES" if model_id in self.model_dtype_overrides() else "S4_DTYPE"

    @model_validator(mode="after")
    def _keys_when_asked(self) -> Settings:
        if "api_keys" in self.model_fields_set and not self.api_keys:  # never fail open
            unset = ("unset it to serve with S4_API_KEYS_FILE's keys alone" if self.api_keys_file
                     else "unset it to serve without keys")  # fmt: skip
            raise ValueError(
                "S4_API_KEYS (--api-keys) is set but holds no key (empty, or only commas and spaces: an "
                f"unset variable in a template?); {unset}"
            )
        return self

    @model_validator(mode="after")
    def _keys_from_file(self) -> Settings:
        if not self.api_keys_file:
            return self
        name = "S4_API_KEYS_FILE (--api-keys-file)"
        try:  # utf-8-sig: a byte-order mark (Windows Notepad's UTF-8) is not part of the first key
            with open(self.api_keys_file, encoding="utf-8-sig") as f:
                text = f.read(KEYS_FILE_MAX_CHARS + 1)  # bounded: /dev/zero, a log file named by mistake
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise ValueError(f"{name}: cannot read {self.api_keys_file}: {why}") from None
        if len(text) > KEYS_FILE_MAX_CHARS:
            too_long = f"is over {KEYS_FILE_MAX_CHARS:,} characters: not a file of keys"
            raise ValueError(f"{name}: {self.api_keys_file} {too_long}")
        keys = [k for k in (line.strip() for line in text.splitlines()) if k and not k.startswith("#")]
        if not keys:  # never fail open
            raise ValueError(f"{name}: {self.api_keys_file} holds no key (only blank lines or comments)")
        self.api_keys = [*self.api_keys, *keys]
        return self

    @model_validator(mode="after")
    def _store_outlives_idle_copies(self) -> Settings:
        """A stored session (and a delete's tombstone) must outlive every replica's idle copy of it: a key
        that expired first left a session a replica held idle unknown to the others (404), and a deleted
        session that a replica still held came back, tombstone gone, at its next request or eviction. An
        idle copy lives up to STORE_TTL_MARGIN_S past its TTL (the sweep's period): equal TTLs brought a
        session deleted right after a turn on another replica back."""
        least = self.session_ttl_s + STORE_TTL_MARGIN_S
        if self.session_store != "memory" and self.session_store_ttl_s < least:
            raise ValueError(
                f"S4_SESSION_STORE_TTL_S (--session-store-ttl-s) = {self.session_store_ttl_s} must be at "
                f"least S4_SESSION_TTL_S (--session-ttl-s) + {STORE_TTL_MARGIN_S} = {least:g} with a session "
                "store: a session idle on one replica, evicted up to a second after its TTL, would expire "
                "from the store first (unknown to the other replicas), and a deleted one that a replica "
                "still holds would come back once its tombstone expired"
            )
        return self

    @model_validator(mode="after")
    def _prefill_budget(self) -> Settings:
        if self.prefill_token_budget < self.prefill_chunk_tokens:
            raise ValueError(
                f"S4_PREFILL_TOKEN_BUDGET (--prefill-token-budget) = {self.prefill_token_budget} must be at "
                f"least S4_PREFILL_CHUNK_TOKENS (--prefill-chunk-tokens) = {self.prefill_chunk_tokens}: one "
                "chunk per engine iteration"
            )
        if self.prefix_cache_retention_interval % self.prefill_chunk_tokens:
            raise ValueError(
                "S4_PREFIX_CACHE_RETENTION_INTERVAL (--prefix-cache-retention-interval) = "
                f"{self.prefix_cache_retention_interval} must be a multiple of S4_PREFILL_CHUNK_TOKENS "
                f"(--prefill-chunk-tokens) = {self.prefill_chunk_tokens}, or 0: the states are stored at "
                "chunk boundaries"
            )
        return self

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def device_problem(self) -> str | None:
        """Why the device asked for cannot be used here (checked before the server listens), else None:
        cuda without a CUDA build of torch or a visible GPU, cuda:N past the GPUs there are."""
        if not self.device.startswith("cuda"):
            return None
        import torch

        if not torch.cuda.is_available():
            why = "this torch has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            return f"S4_DEVICE={self.device}: {why} (torch {torch.__version__}); use cpu or auto"
        index = int(self.device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            return f"S4_DEVICE={self.device}: there are {torch.cuda.device_count()} CUDA devices"
        return None

    def uses_default_checkpoints(self) -> bool:
        return "checkpoints" not in self.model_fields_set


def _same_path(a: Path, b: Path) -> bool:
    """Whether two checkpoint paths name one file or folder (./x//y/ and x/y), as far as can be told."""
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def default_text(name: str) -> str:
    """A setting's default as the README table and `--help` show it: lists comma-joined, "" as ""."""
    f = Settings.model_fields[name]
    default = f.default_factory() if f.default_factory else f.default
    return ",".join(default) if isinstance(default, list) else str(default)


def settings_table() -> str:
    """Markdown table of every setting: env var, CLI flag, default, meaning (for the README)."""
    rows = ["| env var | flag | default | meaning |", "|---|---|---|---|"]
    for name, f in Settings.model_fields.items():
        default = default_text(name)
        shown = f"`{default}`" if default != "" else "(none)"
        rows.append(f"| `S4_{name.upper()}` | `--{name.replace('_', '-')}` | {shown} | {f.description} |")
    return "\n".join(rows)
