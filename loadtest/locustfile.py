"""Locust users for the S4 server: HTTP generate, SSE streaming, WebSocket text sessions (several turns
on one socket) and WebSocket audio streaming.

    locust -f loadtest/locustfile.py --headless -u 8 -r 8 -t 20s --host http://127.0.0.1:8000 \\
        WsTextUser SseUser                  # user classes select the mix (all four by default)
    locust -f loadtest/locustfile.py ... --tags ws    # or tags: http, sse, ws, audio, text

Every user reports through `events.request.fire`, one entry per generation (request type HTTP, SSE,
WS or WS-audio, name "generate", response time = the whole request, response length = tokens, or
samples for audio), plus, for the streaming users, "ttft" (request sent → first token) and "itl"
(gap between two consecutive token frames, as the client sees them: a frame that carries several
tokens counts once, as in vLLM's benchmark). Locust rounds response times to whole milliseconds in its
percentiles, so the users also keep the exact samples and, with `--latency-out FILE`, write their
percentiles, the tokens received inside the measured window (stats reset when spawning completes,
`--reset-stats`) and the audio real-time factors to FILE as JSON when the test stops; `loadtest.run`
reads both.

The module imports nothing from the project (locust runs it under gevent).
"""

from __future__ import annotations

import json
import math
import random
import resource
import struct
import time
from collections import defaultdict

import gevent
import requests
import websocket  # websocket-client
from locust import User, constant, events, tag, task
from locust.exception import StopTest
from loopback import loopback_url  # (loadtest/loopback.py: locust puts this file's folder on sys.path)

PROMPTS = [
    "ROMEO:\n",
    "JULIET:\nO ",
    "HAMLET:\nTo be, or not to be",
    "KING LEAR:\n",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "MACBETH:\nIs this a dagger",
    "PORTIA:\nThe quality of mercy",
    "BRUTUS:\n",
]
FAILURE_BACKOFF_S = 0.5  # a user whose request failed waits this long (no tight retry loops)


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    g = parser.add_argument_group("s4 server load")
    g.add_argument(
        "--text-model", default="text-shakespeare", env_var="LOCUST_TEXT_MODEL", help="text model id"
    )
    g.add_argument(
        "--audio-model", default="audio-digits-s4", env_var="LOCUST_AUDIO_MODEL", help="audio model id"
    )
    g.add_argument(
        "--new-tokens", type=int, default=64, env_var="LOCUST_NEW_TOKENS", help="tokens per text turn"
    )
    g.add_argument(
        "--audio-samples",
        type=int,
        default=4000,
        env_var="LOCUST_AUDIO_SAMPLES",
        help="samples per audio turn",
    )
    g.add_argument(
        "--audio-prompt-samples",
        type=int,
        default=400,
        env_var="LOCUST_AUDIO_PROMPT_SAMPLES",
        help="mu-law prompt samples sent as a binary frame before each audio turn",
    )
    g.add_argument(
        "--turns",
        type=int,
        default=4,
        env_var="LOCUST_TURNS",
        help="turns per WebSocket session before it reconnects",
    )
    g.add_argument(
        "--api-key",
        default="",
        env_var="S4_API_KEY",
        help="a key of a server with S4_API_KEYS, sent as Authorization: Bearer (HTTP and the WebSocket "
        "handshake); set S4_API_KEY rather than the flag, which ps shows",
    )
    g.add_argument(
        "--latency-out",
        default="",
        env_var="LOCUST_LATENCY_OUT",
        help="write exact latency percentiles, tokens and RTF (JSON) here at test stop",
    )


# ---------------------------------------------------------------------------------------------
# Exact samples beside locust's (rounded) statistics


STARTED: dict[str, set[int]] = defaultdict(set)  # kind → the users started (their ids)


class Recorder:
    """Exact latency samples (seconds), tokens received and audio turns, since the last reset."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.started = time.time()
        self.cpu_started = _cpu_seconds()
        self.latency: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.tokens: dict[str, int] = defaultdict(int)
        # kind → user → tokens, every user of the window in it (one that received nothing at 0: its stream
        # counts in the per-stream figures)
        self.per_user: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        for kind, users in STARTED.items():
            self.per_user[kind].update(dict.fromkeys(users, 0))
        self.requests: dict[str, int] = defaultdict(int)  # kind → generations and connects reported
        self.connects: dict[str, int] = defaultdict(int)  # kind → connects reported (in requests too)
        self.failures: dict[str, int] = defaultdict(int)
        self.first_failures: dict[str, str] = {}  # kind → its first failure in a line (loadtest.run names it)
        self.audio: list[dict] = []

    def summary(self) -> dict:
        window = max(time.time() - self.started, 1e-9)
        lat = {}
        for (kind, name), xs in self.latency.items():
            xs = sorted(xs)
            lat[f"{kind} {name}"] = {
                "count": len(xs),
                "mean_ms": 1e3 * sum(xs) / len(xs),
                **{f"p{q}_ms": 1e3 * _quantile(xs, q / 100) for q in (50, 90, 99)},
                "max_ms": 1e3 * xs[-1],
            }
        return {
            "window_s": window,
            "tokens": dict(self.tokens),
            "tokens_per_s": {k: v / window for k, v in self.tokens.items()},
            "tokens_per_s_per_user": {
                k: sorted(n / window for n in v.values()) for k, v in self.per_user.items()
            },
            "requests": dict(self.requests),
            "connects": dict(self.connects),
            "failures": dict(self.failures),
            "first_failures": self.first_failures,
            "latency": lat,
            "audio_turns": self.audio,
            "locust_cpu_percent": 100 * (_cpu_seconds() - self.cpu_started) / window,  # of one core
        }


def _cpu_seconds() -> float:
    """User + system CPU time of this (locust) process."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _quantile(xs: list[float], q: float) -> float:
    """Nearest-rank quantile of sorted xs: the ⌈q·n⌉-th smallest (q·n rounded to 9 decimals first, so 0.99 ×
    100 is rank 99). `round(q·n + 0.5)` rounded half to even: one rank high wherever q·n was an odd whole
    number (the p99 of 100 samples was their maximum, the p50 of 10 their 6th)."""
    return xs[min(len(xs), max(1, math.ceil(round(q * len(xs), 9)))) - 1]


RECORDER = Recorder()


@events.spawning_complete.add_listener
def _on_spawned(user_count: int, **_) -> None:
    env = _ENV.get("env")
    if env is not None and env.reset_stats:
        RECORDER.reset()


_ENV: dict = {}


@events.init.add_listener
def _on_init(environment, **_) -> None:
    # gevent's timers count from its loop's cached time, last read before this file's imports (seconds on a
    # loaded machine): locust's --run-time timer, armed just after this event, fired that much early (a
    # 3 s run ended 15 ms after it started when the imports took 3 s). Read the clock now.
    gevent.get_hub().loop.update_now()
    _ENV["env"] = environment
    if environment.host:  # (--host; the web UI's host field is checked as each user starts)
        try:
            loopback_url(environment.host)
        except ValueError as exc:
            raise SystemExit(f"locustfile: --host {exc}") from None


@events.test_stop.add_listener
def _on_stop(environment, **_) -> None:
    path = getattr(environment.parsed_options, "latency_out", "") if environment.parsed_options else ""
    if path:
        with open(path, "w") as f:
            json.dump(RECORDER.summary(), f, indent=1)


# ---------------------------------------------------------------------------------------------
# Users


class S4User(User):
    """Shared reporting: one entry per generation, plus ttft and itl entries for streaming users."""

    abstract = True
    wait_time = constant(0)  # closed loop: the next request as soon as the last one is done
    kind = "?"

    def report(self, t0: float, n: int, exc: Exception | None = None, name: str = "generate") -> None:
        ms = (time.perf_counter() - t0) * 1e3
        self.environment.events.request.fire(
            request_type=self.kind, name=name, response_time=ms, response_length=n, exception=exc, context={}
        )
        RECORDER.requests[self.kind] += 1
        if name == "connect":
            RECORDER.connects[self.kind] += 1
        if exc is not None:
            RECORDER.failures[self.kind] += 1
            RECORDER.first_failures.setdefault(
                self.kind, " ".join(f"{name}: {type(exc).__name__}: {exc}".split())[:300]
            )
            time.sleep(FAILURE_BACKOFF_S)

    def latency(self, name: str, seconds: float) -> None:
        self.environment.events.request.fire(
            request_type=self.kind,
            name=name,
            response_time=seconds * 1e3,
            response_length=0,
            exception=None,
            context={},
        )
        RECORDER.latency[(self.kind, name)].append(seconds)

    def on_start(self) -> None:
        try:
            loopback_url(self.host)
        except ValueError as exc:
            raise StopTest(str(exc)) from None
        STARTED[self.kind].add(id(self))
        RECORDER.per_user[self.kind][id(self)] += 0  # (a user of the window, whatever it receives)

    def opt(self, name: str):
        return getattr(self.environment.parsed_options, name)

    def auth_headers(self) -> dict[str, str]:
        key = self.opt("api_key")
        return {"Authorization": f"Bearer {key}"} if key else {}

    def text_request(self) -> dict:
        return {
            "model": self.opt("text_model"),
            "prompt": random.choice(PROMPTS),
            "max_new_tokens": self.opt("new_tokens"),
            "temperature": 0.8,
            "seed": random.randrange(2**31),
        }


class StreamTimer:
    """TTFT and inter-token gaps of one streamed generation."""

    def __init__(self, user: S4User) -> None:
        self.user, self.t0 = user, time.perf_counter()
        self.last: float | None = None
        self.count = 0

    def got(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        if self.last is None:
            self.user.latency("ttft", now - self.t0)
        else:
            self.user.latency("itl", now - self.last)
        self.last = now
        self.count += n
        RECORDER.tokens[self.user.kind] += n
        RECORDER.per_user[self.user.kind][id(self.user)] += n


class _HttpUser(S4User):
    """One keep-alive HTTP connection pool per user."""

    abstract = True

    def on_start(self) -> None:
        super().on_start()
        self.http = requests.Session()
        self.http.headers.update(self.auth_headers())

    def on_stop(self) -> None:
        self.http.close()


class HttpGenerateUser(_HttpUser):
    """POST /v1/generate, the whole completion in one JSON response."""

    kind = "HTTP"

    @tag("http", "text")
    @task
    def generate(self) -> None:
        t0 = time.perf_counter()
        try:
            r = self.http.post(self.host + "/v1/generate", json=self.text_request(), timeout=120)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            n = len(r.json()["tokens"])
        except Exception as exc:  # noqa: BLE001  (reported as a failure)
            self.report(t0, 0, exc)
            return
        RECORDER.tokens[self.kind] += n
        self.report(t0, n)


class SseUser(_HttpUser):
    """POST /v1/generate with stream: true (Server-Sent Events), timing every token event."""

    kind = "SSE"

    @tag("sse", "text")
    @task
    def generate(self) -> None:
        timer = StreamTimer(self)
        try:
            body = {**self.text_request(), "stream": True}
            with self.http.post(self.host + "/v1/generate", json=body, stream=True, timeout=120) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                done = None
                for line in r.iter_lines(chunk_size=None):
                    if not line.startswith(b"data: "):
                        continue
                    ev = json.loads(line[6:])
                    if ev["type"] == "token":
                        timer.got(len(ev["ids"]))
                    elif ev["type"] == "done":
                        done = ev
                    elif ev["type"] == "error":
                        raise RuntimeError(f"error event: {ev}")
                if done is None:
                    raise RuntimeError("stream ended without a done event")
        except Exception as exc:  # noqa: BLE001
            self.report(timer.t0, timer.count, exc)
            return
        self.report(timer.t0, timer.count)


class _WebSocketUser(S4User):
    """A socket bound to one session for `--turns` generations, then closed and opened again."""

    abstract = True
    model_option = "text_model"
    hello: dict = {}

    def on_start(self) -> None:
        super().on_start()
        self.ws: websocket.WebSocket | None = None
        self.turn = 0

    def on_stop(self) -> None:
        self.close()

    def close(self) -> None:
        # Not `ws.close()`: websocket-client wraps its close handshake in a bare `except: pass`, which
        # swallows the GreenletExit locust uses to stop a user, and the user then runs forever. Send the
        # close frame and drop the socket instead (the server sees a normal 1000 close).
        if self.ws is not None:
            try:
                self.ws.send_close()
            except (websocket.WebSocketException, OSError):
                pass
            self.ws.shutdown()
        self.ws = None

    def receive(self) -> str | bytes:
        """The next text or binary message. A close frame raises WebSocketConnectionClosedException naming
        its code and reason: websocket-client's `recv` returns "" for it, whose JSON error was taken for an
        error frame (the dead socket kept, so the next turn failed too, on a socket nobody had reported
        closed)."""
        opcode, data = self.ws.recv_data()
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
            reason = data[2:].decode("utf-8", "replace")
            why = f"the server closed the socket: {code} {reason}"
            raise websocket.WebSocketConnectionClosedException(why)
        if opcode == websocket.ABNF.OPCODE_TEXT and isinstance(data, bytes):
            return data.decode("utf-8")
        return data

    def connect(self) -> None:
        t0 = time.perf_counter()
        url = self.host.replace("http://", "ws://").replace("https://", "wss://") + "/v1/stream"
        try:
            header = [f"{k}: {v}" for k, v in self.auth_headers().items()]
            self.ws = websocket.create_connection(url, timeout=120, enable_multithread=False, header=header)
            self.ws.send(json.dumps({"type": "session", "model": self.opt(self.model_option), **self.hello}))
            frame = json.loads(self.receive())
            if frame.get("type") != "session":
                raise RuntimeError(f"expected a session frame, got {frame}")
        except Exception as exc:  # noqa: BLE001
            self.close()
            self.report(t0, 0, exc, name="connect")
            return
        self.report(t0, 0, name="connect")
        self.turn = 0

    def one_turn(self) -> None:
        if self.ws is None:
            self.connect()
            if self.ws is None:
                return
        timer = StreamTimer(self)
        try:
            self.generate(timer)
        except (websocket.WebSocketException, OSError) as exc:
            self.close()  # the socket is unusable: reconnect at the next turn
            self.report(timer.t0, timer.count, exc)
            return
        except Exception as exc:  # noqa: BLE001  (an error frame: the socket stays usable)
            self.report(timer.t0, timer.count, exc)
            return
        self.report(timer.t0, timer.count)
        self.turn += 1
        if self.turn >= self.opt("turns"):
            self.close()

    def generate(self, timer: StreamTimer) -> None:
        raise NotImplementedError


class WsTextUser(_WebSocketUser):
    """WS /v1/stream, text: `generate` frames on one session (each turn continues the last)."""

    kind = "WS"

    @tag("ws", "text")
    @task
    def stream(self) -> None:
        self.one_turn()

    def generate(self, timer: StreamTimer) -> None:
        req = self.text_request()
        del req["model"]  # the socket is bound
        if self.turn:
            req["prompt"] = "\n\n" + req["prompt"]
        timer.t0 = time.perf_counter()
        self.ws.send(json.dumps({"type": "generate", **req}))
        while True:
            m = json.loads(self.receive())
            if m["type"] == "token":
                timer.got(len(m["ids"]))
            elif m["type"] == "done":
                return
            elif m["type"] == "error":
                raise RuntimeError(f"error frame: {m}")


class WsAudioUser(_WebSocketUser):
    """WS /v1/stream, audio: a mu-law prompt as a binary frame, then `generate`; the samples arrive
    as binary frames (one byte per sample). Records each turn's real-time factor: samples received
    ÷ sample rate ÷ wall time (request sent → done), and the same after the first frame: the samples
    after it ÷ sample rate ÷ the time from it to the last frame (bench.audio_streams' real-time factor;
    None for a turn of one frame)."""

    kind = "WS-audio"
    model_option = "audio_model"
    hello = {"audio_encoding": "mulaw"}

    @tag("ws", "audio")
    @task
    def stream(self) -> None:
        self.one_turn()

    def generate(self, timer: StreamTimer) -> None:
        n_prompt = self.opt("audio_prompt_samples")
        if n_prompt:  # a soft tone around mu-law silence (0xFF)
            self.ws.send_binary(bytes(0xFF - (i % 16) for i in range(n_prompt)))
        timer.t0 = time.perf_counter()
        req = {
            "type": "generate",
            "max_new_tokens": self.opt("audio_samples"),
            "seed": random.randrange(2**31),
        }
        self.ws.send(json.dumps(req))
        rate, first, last, first_samples = None, None, None, 0
        while True:
            m = self.receive()
            if isinstance(m, bytes):
                last = time.perf_counter()
                if first is None:
                    first, first_samples = last, len(m)
                timer.got(len(m))
                continue
            m = json.loads(m)
            if m["type"] == "audio_header":
                rate = m["sample_rate"]
                if m["encoding"] != "mulaw":
                    raise RuntimeError(f"expected mu-law frames, got {m['encoding']}")
            elif m["type"] == "done":
                break
            elif m["type"] == "error":
                raise RuntimeError(f"error frame: {m}")
        end = time.perf_counter()
        if rate and timer.count:
            seconds = timer.count / rate
            RECORDER.audio.append(
                {
                    "samples": timer.count,
                    "sample_rate": rate,
                    "wall_s": end - timer.t0,
                    "rtf": seconds / (end - timer.t0),
                    # (the first frame's samples came at its arrival: the span after it holds the rest)
                    "rtf_after_first_sample": (
                        (timer.count - first_samples) / rate / (last - first) if last > first else None
                    ),
                    "end": time.time(),
                }
            )
