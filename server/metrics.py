"""Prometheus metrics, one registry per app (so several apps can live in one process, as in tests).

Latencies are measured in the engine thread: time to first token from the request's admission to
the step that produced its first token, inter-token latency between two steps of one request, and
end-to-end from admission to the final event.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder

# No `*_created` gauge beside every counter and histogram (prometheus_client's default): they double the
# exposition and no query here needs them (process-wide; Prometheus's own clients agree it is optional).
disable_created_metrics()

# The label values each labelled counter takes, exported at 0 from the start: a rate() over a series
# that appears only at its first event misses that event, and an absent series reads as "no data"
REJECTION_REASONS = ("sessions_full", "queue_full")
EVICTION_REASONS = ("idle_ttl", "slots_full")
STORE_OPS = ("write", "stale", "delete", "error", "restore", "reload", "late", "unchanged")
STORE_ERROR_OPS = ("write", "delete", "read")  # what a failed session store operation did
AUTH_TRANSPORTS = ("http", "websocket")
CLOSE_REASONS = (
    "header_timeout",
    "body_timeout",
    "ws_handshake_timeout",
    "keep_alive_timeout",
    "send_timeout",
    "ws_invalid_utf8",
    "ws_ping_timeout",
    "ws_message_too_big",
    "ws_protocol_error",
    "pipeline_full",
)
CONNECTION_REFUSALS = ("max_connections", "max_connections_per_client")
REQUEST_REFUSALS = ("body_too_large", "json_structure", "headers_too_large", "invalid_http", "foreign_origin",
                    "foreign_host")  # fmt: skip
FINISH_REASONS = ("stop", "length", "cancelled")
# the codes of a WebSocket's error frames (the status the same refusal has over HTTP) and of the handshakes
# the app refuses (400, 404), exported at 0; another code a refusal may take is counted as it comes
WS_ERROR_CODES = ("400", "404", "409", "413", "422", "429", "500", "503")

# from 50 µs: an audio model makes a token per sample (62.5 µs of audio at 16 kHz), and at 1 ms the first
# bucket held 99 % of an 8 kHz model's inter-token gaps (a real server on CPU)
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1, 2.5, 5, 10)  # fmt: skip
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
FRAME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.1, 0.2, 0.5, 1)
RTF_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1, 1.1, 1.5, 2, 4, 8, 16, 32)


def observe_many(hist, values) -> None:
    """Observe each of `values` (floats, any 1-D sequence) in `hist`, a labelled prometheus_client
    Histogram child: the same bucket counts and sum as `hist.observe(v)` for each v in turn (the sum
    to float rounding), with one increment per non-empty bucket instead of a locked increment per
    value and bucket: the engine records a decode block's inter-token latencies and batch sizes
    (one per token / step: 10⁵ a second for audio) this way. prometheus_client has no bulk observe;
    this reads its Histogram's `_upper_bounds`, `_buckets` and `_sum` (tests/test_server_units.py
    checks the result against `observe` one value at a time) and falls back to `observe` when they
    are missing."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if not v.size:
        return
    bounds, buckets, total = (getattr(hist, a, None) for a in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None:
        for x in v.tolist():
            hist.observe(x)
        return
    hist._raise_if_not_observable()
    idx = np.searchsorted(np.asarray(bounds, dtype=np.float64), v, side="left")  # the first bound >= v
    counts = np.bincount(idx[idx < len(bounds)], minlength=len(bounds))  # NaN: in no bucket, as observe
    total.inc(float(v.sum()))
    for i in np.flatnonzero(counts).tolist():
        buckets[i].inc(int(counts[i]))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r, m = self.registry, ["model"]
        self.ttft = Histogram("s4_time_to_first_token_seconds", "Admission to first token", m, registry=r,
                              buckets=LATENCY_BUCKETS)  # fmt: skip
        self.itl = Histogram("s4_inter_token_latency_seconds", "Time between two tokens of a request", m,
                             registry=r, buckets=LATENCY_BUCKETS)  # fmt: skip
        self.e2e = Histogram("s4_request_duration_seconds", "Admission to final event of a generation", m,
                             registry=r, buckets=E2E_BUCKETS)  # fmt: skip
        # (its unit, sessions, is not in its name: renaming it would break dashboards; its help says it)
        self.batch_size = Histogram("s4_decode_batch_size", "Sessions (rows) per decode step; unit: sessions",
                                    m, registry=r, buckets=BATCH_BUCKETS)  # fmt: skip
        self.tokens = Counter("s4_tokens_generated", "Tokens generated", m, registry=r)
        self.audio_frame_interval = Histogram(
            "s4_audio_frame_interval_seconds",
            "Time between two audio frames of one stream, as sent (ideal: the request's frame_ms)",
            m, registry=r, buckets=FRAME_BUCKETS,
        )  # fmt: skip
        self.audio_realtime_factor = Histogram(
            "s4_audio_stream_realtime_ratio",
            "Per finished audio stream, its real-time factor: seconds of audio sent per second from the "
            "stream's start (its generation queued) to its last frame (≥ 1: real time)",
            m, registry=r, buckets=RTF_BUCKETS,
        )  # fmt: skip
        self.prefill_tokens = Counter("s4_prompt_tokens_ingested", "Prompt tokens prefilled", m, registry=r)
        self.prefix_cache_queries = Counter("s4_prefix_cache_query_tokens", "Ingested prompt tokens (all but "
                                            "each prompt's last) of new sessions looked up in the prefix "
                                            "cache, one count per sample", m, registry=r)  # fmt: skip
        self.prefix_cache_hits = Counter("s4_prefix_cache_hit_tokens", "Of those, tokens whose state came "
                                         "from the prefix cache (not ingested), stored by an earlier prompt "
                                         "or by one ingested at the same time (the samples of one prompt)",
                                         m, registry=r)  # fmt: skip
        self.prefix_cache_bytes = Gauge("s4_prefix_cache_bytes", "Bytes of state held by the prefix cache", m,
                                        registry=r)  # fmt: skip
        self.prefix_cache_rows = Gauge("s4_prefix_cache_rows", "State rows held by the prefix cache, by "
                                       "kind: kept (a prompt's last whole chunk, junctions, rows that "
                                       "served a hit) or spare (evicted first)", ["model", "kind"],
                                       registry=r)  # fmt: skip
        self.active_sessions = Gauge("s4_active_sessions", "State slots in use (sessions + one-shot)", m,
                                     registry=r)  # fmt: skip
        self.state_bytes = Gauge("s4_state_resident_bytes", "Bytes of state held by slots in use", m,
                                 registry=r)  # fmt: skip
        self.evictions = Counter("s4_session_evictions", "Sessions evicted to the session store: idle_ttl "
                                 "(idle longer than S4_SESSION_TTL_S), slots_full (the least recently used "
                                 "idle sessions, when a request needs a slot and none is free)",
                                 ["model", "reason"], registry=r)  # fmt: skip
        self.pool_bytes = Gauge("s4_state_pool_bytes", "Bytes preallocated for the state slot pool", m,
                                registry=r)  # fmt: skip
        self.queue_depth = Gauge("s4_queue_depth", "Requests admitted but not yet decoding", m, registry=r)
        self.engine_crashes = Counter("s4_engine_crashes", "Engine threads that died of an unexpected error "
                                      "(the model then answers 503 until the server restarts)", m,
                                      registry=r)  # fmt: skip
        self.rejections = Counter("s4_rejections", "Requests refused for capacity (429): sessions_full "
                                  "(every state slot in use), queue_full (S4_MAX_QUEUED_REQUESTS waiting)",
                                  ["model", "reason"], registry=r)  # fmt: skip
        self.store_ops = Counter("s4_session_store_operations", "Session store writes, deletes (a failed one "
                                 "counts an error at each try), restores, reloads of a stale copy (each "
                                 "followed by its restore, counted too), errors; unchanged: a copy let go "
                                 "of unchanged since its last write, found still stored (not written); "
                                 "late: answers sent before their session's write landed "
                                 "(S4_SESSION_STORE_WRITE_WAIT_S)", ["op"], registry=r)  # fmt: skip
        self.store_errors = Counter("s4_session_store_errors", "Session store operations that failed (each "
                                    "also counted as op=error in s4_session_store_operations), by what they "
                                    "did: write (a state, or the check that an unchanged one is still "
                                    "stored), delete, read (a route's read of a state or of its version)",
                                    ["op"], registry=r)  # fmt: skip
        self.verification_error = Gauge(
            "s4_verification_relative_error_ratio",
            "Relative error measured at load against float64 conv mode: the logits of the recurrent step and "
            "prefill at the served dtype, and each layer's kernel (check kernel_layer_N, dtype float32: its "
            "step form is checked in float32, whatever dtype serves the network); check state_float16 "
            "(S4_STATE_DTYPE): the logits of the step with float16 states against the float32 step's",
            ["model", "dtype", "check"],
            registry=r,
        )
        self.load_seconds = Gauge("s4_model_load_seconds", "Seconds a model's load at start took, by phase: "
                                  "official (an official file's conversion, or its cache entry found), "
                                  "read (config, weights, the network built), convert (its layers' "
                                  "recurrent forms and the network check against conv mode), warm_up (the "
                                  "rest, to a warmed-up engine); total: their sum",
                                  ["model", "phase"], registry=r)  # fmt: skip
        self.recurrent_form_layers = Gauge("s4_recurrent_form_layers", "A model's S4 layers by where their "
                                           "verified recurrent form came from at load: cache "
                                           "(S4_RECURRENT_CACHE) or converted", ["model", "source"],
                                           registry=r)  # fmt: skip
        self.recurrent_cache_bytes = Gauge("s4_recurrent_cache_bytes", "Bytes in the recurrent-form cache "
                                           "(S4_RECURRENT_CACHE) after the models loaded, by status: current "
                                           "(read by this server), stale (another converter or torch: never "
                                           "read here), damaged, partial (crashed writes), writing, other",
                                           ["status"], registry=r)  # fmt: skip
        self.auth_failures = Counter("s4_auth_failures", "Requests and WebSocket handshakes refused for a "
                                     "missing or invalid API key", ["transport"], registry=r)  # fmt: skip
        # Connections and request bodies (server/connections.py, server/body_limit.py)
        self.connections_open = Gauge("s4_connections_open", "Open client connections (HTTP and WebSocket)",
                                      registry=r)  # fmt: skip
        self.connections_closed = Counter("s4_connections_closed", "Connections closed by the server for a "
                                          "deadline: header_timeout, body_timeout, ws_handshake_timeout, "
                                          "keep_alive_timeout, send_timeout; for a WebSocket text "
                                          "message that is not UTF-8: ws_invalid_utf8 (close 1007); for a "
                                          "WebSocket ping not answered in time: ws_ping_timeout (close "
                                          "1008); over S4_WS_MAX_FRAME_BYTES: ws_message_too_big (1009); "
                                          "for a frame that breaks the protocol: ws_protocol_error (1002); "
                                          "for a request pipelined behind the most that may wait on its "
                                          "connection: pipeline_full",
                                          ["reason"], registry=r)  # fmt: skip
        self.connections_refused = Counter("s4_connections_refused", "Connections refused when accepted: "
                                           "max_connections (503), max_connections_per_client (429)",
                                           ["reason"], registry=r)  # fmt: skip
        self.requests_refused = Counter("s4_requests_refused", "Requests refused before routing: "
                                        "body_too_large (a session import's blob over the largest state too, "
                                        "refused by its route), json_structure (a JSON body, or a WebSocket "
                                        "message, holding more elements, arrays and objects, members or "
                                        "floats than a valid one can), headers_too_large, invalid_http "
                                        "(unparsable, 400); foreign_origin, "
                                        "foreign_host "
                                        "(a browser's request from another site's page, a DNS-rebinding "
                                        "Host: HTTP and WebSocket handshakes)", ["reason"],
                                        registry=r)  # fmt: skip
        self.generations = Counter("s4_generations", "Generations ended, by finish_reason: stop, length, "
                                   "cancelled (a client gone, a cancel, a drain's end)",
                                   ["model", "finish_reason"], registry=r)  # fmt: skip
        self.websocket_errors = Counter("s4_websocket_errors", "WebSocket error frames sent (a message or "
                                        "binary frame refused, or a turn's error), and handshakes the app "
                                        "refused (400, 404), by code: the status the same refusal has over "
                                        "HTTP (a handshake refused for its API key or origin is counted in "
                                        "s4_auth_failures_total, s4_requests_refused_total instead)",
                                        ["code"], registry=r)  # fmt: skip
        for counter, values in [
            (self.websocket_errors, WS_ERROR_CODES),
            (self.store_ops, STORE_OPS),
            (self.store_errors, STORE_ERROR_OPS),
            (self.auth_failures, AUTH_TRANSPORTS),
            (self.connections_closed, CLOSE_REASONS),
            (self.connections_refused, CONNECTION_REFUSALS),
            (self.requests_refused, REQUEST_REFUSALS),
        ]:
            for value in values:
                counter.labels(value)

    def add_store_gauges(self, backlog) -> None:
        """The session store's gauges, exported only where one is configured (a 0 would read as a store
        down): `store_up`, set by each operation's outcome, and the writer's backlog (`backlog()`, read at
        each scrape)."""
        self.store_up = Gauge("s4_session_store_up", "1 when the session store's last operation (a read, a "
                              "version check, a write or a delete) succeeded, 0 when it failed",
                              registry=self.registry)  # fmt: skip
        self.store_up.set(1)  # (the server starts only once the store answered its ping)
        queued = Gauge(
            "s4_session_store_backlog",
            "Session store operations queued or being applied (failed deletes waiting to be tried again too)",
            registry=self.registry,
        )
        queued.set_function(backlog)

    def for_model(self, model: str, audio: bool = False) -> ModelMetrics:
        """The metrics of one model, each series exported from now on (the audio ones for an audio
        model only)."""
        return ModelMetrics(self, model, audio)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition in the format the scraper's `Accept` asks for (prometheus_client's
        `choose_encoder`): OpenMetrics 1.0.0 where it is accepted (Prometheus asks for it first: it ends
        with `# EOF`, so a cut-off scrape is seen as one), else the text format 0.0.4 (no Accept, or
        text/plain). It always wrote the text format labelled `text/plain; version=1.0.0`, a version no
        Prometheus 2 scraper asks for."""
        encoder, content_type = choose_encoder(comparable_versions(accept))
        return encoder(self.registry), content_type


# the OpenMetrics versions prometheus_client writes (its choose_encoder echoes any other in the Content-Type)
OPENMETRICS_VERSIONS = ("1.0.0", "2.0.0")


def comparable_versions(accept: str) -> str:
    """`accept` less its media ranges whose `version` parameter (the first, as prometheus_client reads it)
    is not dotted numbers: `choose_encoder` compares it with (1, 0, 0) part by part, and a part that is
    not a number (`version=abc`, `1.x`) raised TypeError, a 500 for any client's Accept. Such a range is
    one this server cannot serve, passed over as an unknown type is; so is an OpenMetrics range of
    another version than OPENMETRICS_VERSIONS (`version=9.9.9`), which `choose_encoder` served as a 1.0.0
    body labelled with the version asked for."""
    kept = []
    for accepted in accept.split(","):
        params = [tok.strip().split("=", 1) for tok in accepted.split(";") if "=" in tok]
        version = next((value for key, value in params if key == "version"), "")
        openmetrics = accepted.split(";")[0].strip() == "application/openmetrics-text"
        if not version or (
            all(part.isdecimal() for part in version.split("."))
            and (not openmetrics or version in OPENMETRICS_VERSIONS)
        ):
            kept.append(accepted)
    return ",".join(kept)


class ModelMetrics:
    """The metrics with the model label bound (cheap to update from the engine's hot loop)."""

    def __init__(self, m: Metrics, model: str, audio: bool = False) -> None:
        self.ttft, self.itl, self.e2e = m.ttft.labels(model), m.itl.labels(model), m.e2e.labels(model)
        self.batch_size, self.tokens = m.batch_size.labels(model), m.tokens.labels(model)
        if audio:  # (a text model's stream sends no audio frames: no always-zero series for it)
            self.audio_frame_interval = m.audio_frame_interval.labels(model)
            self.audio_realtime_factor = m.audio_realtime_factor.labels(model)
        self.prefill_tokens = m.prefill_tokens.labels(model)
        self.prefix_cache_queries = m.prefix_cache_queries.labels(model)
        self.prefix_cache_hits = m.prefix_cache_hits.labels(model)
        self.prefix_cache_bytes = m.prefix_cache_bytes.labels(model)
        self.prefix_cache_rows = {kind: m.prefix_cache_rows.labels(model, kind) for kind in ("kept", "spare")}
        self.active_sessions, self.state_bytes = m.active_sessions.labels(model), m.state_bytes.labels(model)
        self.pool_bytes, self.queue_depth = m.pool_bytes.labels(model), m.queue_depth.labels(model)
        self.engine_crashes = m.engine_crashes.labels(model)
        self.evictions = {r: m.evictions.labels(model, r) for r in EVICTION_REASONS}
        self._rejections, self._model = m.rejections, model
        for reason in REJECTION_REASONS:
            m.rejections.labels(model, reason)
        self.finished = {r: m.generations.labels(model, r) for r in FINISH_REASONS}

    def reject(self, reason: str) -> None:
        self._rejections.labels(self._model, reason).inc()
