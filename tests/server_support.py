"""Server tests' support: tiny checkpoints, a real uvicorn server on a free loopback port (in a
thread of the test process), and an independent reference generator to check tokens against."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from model import ModelConfig, SequenceModel, load, save
from model.sampling import SamplingParams, find_stop, sample


def refusal_status(path: str) -> int:
    """The status of a request the server cannot take on `path`: 400 on the OpenAI routes (as OpenAI's
    API), 422 on ours (server/errors.py `as_openai`)."""
    from server.errors import is_openai_path

    return 400 if is_openai_path(path) else 422


WS_GENERATE = Path(__file__).resolve().parent.parent / "scripts" / "ws_generate.py"  # the README's client
TINY = dict(vocab_size=256, d_model=32, n_layers=2, d_state=16, l_max=256, cauchy_backend="torch")
CORPUS = (
    "to be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles "
)


def make_text_model() -> SequenceModel:
    """A tiny S4 byte model after a few optimizer steps on an English line (so it mostly speaks ASCII)."""
    torch.manual_seed(0)
    net = SequenceModel(ModelConfig(**TINY, kernel="s4"))
    data = torch.tensor(list((CORPUS * 4).encode()))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for i in range(25):
        start = (i * 37) % (len(data) - 129)
        x = data[start : start + 129][None]
        loss = torch.nn.functional.cross_entropy(net(x[:, :-1]).flatten(0, 1), x[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def make_audio_model() -> SequenceModel:
    torch.manual_seed(1)
    return SequenceModel(ModelConfig(**TINY, kernel="s4d", modality="audio", sample_rate=8000))


def build_checkpoints(root: Path) -> dict[str, Path]:
    dirs = {"text": root / "tiny-text", "audio": root / "tiny-audio", "broken": root / "broken"}
    save(make_text_model(), dirs["text"])
    save(make_audio_model(), dirs["audio"])
    dirs["broken"].mkdir()
    (dirs["broken"] / "config.json").write_text("{not json")
    return dirs


def big_vocab_checkpoint(root: Path) -> Path:
    """A text model of 200,000 token ids (a word-level model's size, served as bytes) in root/big-vocab: a
    session of it may have seen more ids than the 256 of the tiny models, so its export's header is larger
    than theirs can be. Loads in ~3 s."""
    torch.manual_seed(2)
    net = SequenceModel(ModelConfig(vocab_size=200_000, d_model=8, n_layers=1, d_state=8, l_max=32,
                                    cauchy_backend="torch"))  # fmt: skip
    return save(net, root / "big-vocab")


class ServerThread:
    """A real uvicorn server on 127.0.0.1:<free port>, serving create_app(settings) (`graceful`: with
    python -m server's drain on handle_exit)."""

    def __init__(self, settings, send_buffer: int | None = None, graceful: bool = False) -> None:
        import uvicorn

        from server import create_app
        from server.__main__ import GracefulServer
        from server.connections import uvicorn_config

        self.app = create_app(settings)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if send_buffer:  # accepted connections inherit it: lets a test fill the path to a client quickly
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn_config(self.app, settings, self.app.state.server.metrics, log_level="warning")
        # graceful: python -m server's uvicorn, whose handle_exit drains first (signals are the main
        # thread's: a test calls handle_exit itself)
        self.server = GracefulServer(config, self.app.state.server) if graceful else uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    @property
    def state(self):
        return self.app.state.server

    def start(self, timeout: float = 120) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.started:
                try:
                    if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
            if not self.thread.is_alive():
                break
            time.sleep(0.05)
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _listening(settings, go: threading.Event) -> ServerThread:
    """A ServerThread of `settings`, returned once it listens (its gated load let go if it never does)."""
    s = ServerThread(settings)
    s.thread.start()
    if not wait_for(lambda: s.server.started, 30):
        go.set()
        s.stop()
        raise RuntimeError("server did not start listening")
    return s


def serving_while_loading(settings, monkeypatch) -> tuple[ServerThread, threading.Event]:
    """A ServerThread of `settings` that listens while its models are still loading (/readyz: 503,
    "loading"), and the event that lets them load (set it; set it too before stopping the server)."""
    import server.state

    go, load = threading.Event(), server.state.load_models

    def gated(*args, **kwargs):
        go.wait(60)
        return load(*args, **kwargs)

    monkeypatch.setattr(server.state, "load_models", gated)
    return _listening(settings, go), go


def serving_while_one_loads(settings, monkeypatch, model_id: str) -> tuple[ServerThread, threading.Event]:
    """A ServerThread of `settings` whose model `model_id` waits to load (its load begins once the event
    returned is set; set it too before stopping the server): the models before it in S4_CHECKPOINTS load
    meanwhile. Returned once the server listens."""
    import server.registry

    go, load = threading.Event(), server.registry.load_model

    def gated(path, settings, sessions, metrics, device, name=None, *args, **kwargs):
        if name == model_id:
            go.wait(60)
        return load(path, settings, sessions, metrics, device, name, *args, **kwargs)

    monkeypatch.setattr(server.registry, "load_model", gated)
    return _listening(settings, go), go


class RawWebSocket:
    """A minimal blocking WebSocket client on a plain socket, so a test controls exactly when bytes
    are read (client libraries read ahead into their own buffers)."""

    def __init__(self, port: int, rcvbuf: int = 4096) -> None:
        import os

        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(4096)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def send_json(self, obj: dict) -> None:
        import os
        import struct

        p, mask = json.dumps(obj).encode(), os.urandom(4)
        n = len(p)
        head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + struct.pack(">H", n)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(p)))

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the WebSocket's connection")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_frame(self, answer_pings: bool = True) -> tuple[int, bytes]:
        """The next data or close frame: (opcode, payload); 1 text, 2 binary, 8 close (servers do not
        mask or fragment). A ping the server sends meanwhile (uvicorn's keep-alive, every 20 s) is
        answered with a pong, as a browser would, and skipped; so is a pong. With `answer_pings` False a
        ping is returned (opcode 9) and not answered: a client that has stopped answering."""
        import os

        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(self._read(2), "big")
            elif n == 127:
                n = int.from_bytes(self._read(8), "big")
            data = self._read(n)
            opcode = b0 & 0x0F
            if opcode == 0x9 and not answer_pings:
                return opcode, data
            if opcode == 0x9:  # ping (control frames carry at most 125 bytes): a masked pong back
                mask = os.urandom(4)
                pong = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
                self.sock.sendall(bytes([0x8A, 0x80 | len(data)]) + mask + pong)
                continue
            if opcode != 0xA:
                return opcode, data

    def recv_json(self) -> dict:
        """The next text frame, decoded."""
        opcode, data = self.recv_frame()
        assert opcode == 1, f"expected a text frame, got opcode {opcode}"
        return json.loads(data)

    def send_close(self) -> None:
        """Start the closing handshake (code 1000). The server answers with its own close frame after
        the frames it sent before, which `recv_frame` still returns."""
        import os

        mask = os.urandom(4)
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate((1000).to_bytes(2, "big")))
        self.sock.sendall(bytes([0x88, 0x82]) + mask + payload)

    def close(self) -> None:
        self.sock.close()


class RawSSE:
    """A POST whose `text/event-stream` answer is read on a plain socket, so a test controls when bytes
    are read and can half-close the connection (`shutdown`) and still read what the server had sent."""

    def __init__(self, port: int, path: str, body: dict, rcvbuf: int = 4096) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        data = json.dumps(body).encode()
        self.sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower(), head
        self.events_buf = b""

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        return data

    def event(self) -> dict:
        """The next event's JSON (chunked transfer decoding; ConnectionError at the end of the stream)."""
        while b"\n\n" not in self.events_buf:
            while b"\r\n" not in self.buf:
                self.buf += self._recv()
            size, rest = self.buf.split(b"\r\n", 1)
            n = int(size, 16)
            if n == 0:
                raise ConnectionError("the response ended")
            while len(rest) < n + 2:
                rest += self._recv()
            self.events_buf += rest[:n]
            self.buf = rest[n + 2 :]
        event, self.events_buf = self.events_buf.split(b"\n\n", 1)
        assert event.startswith(b"data: "), event
        return json.loads(event[6:])

    def shutdown(self) -> None:
        """Half-close: the server sees the client go (end of file), and whatever it sent before is still
        read by `event`."""
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


def reference(
    model_dir: Path, prompt: list[int], params: SamplingParams, n: int, dtype: torch.dtype | None = None
) -> list[int]:
    """One-shot generation with the library alone: prefill the whole prompt, then sample and step (the
    weights in `dtype`, default the checkpoint's)."""
    rec = _rec(model_dir, dtype)
    logits, state = rec.prefill(torch.tensor([prompt]), rec.init_state(1))
    logits = logits[:, -1]
    gen = params.generator()
    seen = torch.zeros(1, rec.config.vocab_size, dtype=torch.bool)
    seen[0, prompt] = True
    out: list[int] = []
    for _ in range(n):
        tok = sample(logits, [params], [gen], seen)
        out.append(int(tok))
        seen[0, tok] = True
        if params.stop and find_stop(bytes(out), params.stop, 1) is not None:
            break
        logits, state = rec.step(tok, state)
    return out


_RECS: dict[tuple, object] = {}


def _rec(model_dir: Path, dtype: torch.dtype | None = None):
    if (model_dir, dtype) not in _RECS:
        _RECS[model_dir, dtype] = load(model_dir).to_recurrent(dtype=dtype)
    return _RECS[model_dir, dtype]


def sse_events(response: httpx.Response) -> list:
    """The `data:` payloads of an SSE response (JSON decoded, except the literal [DONE])."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def metric(client: httpx.Client, name: str, model: str, **labels: str) -> float:
    """One sample of the Prometheus text exposition: `name` with `labels` (in the order the metric declares
    them) and then `model`."""
    inner = ",".join(f'{k}="{v}"' for k, v in {**labels, "model": model}.items())
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{{inner}}}"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def read_until_closed(sock: socket.socket, timeout: float = 60.0) -> bytes:
    """Everything the server sends on a raw socket until it closes the connection (or `timeout`: a bound
    a loaded machine's server does not reach; a test that expects no close names a short one)."""
    sock.settimeout(timeout)
    got = b""
    try:
        while data := sock.recv(65536):
            got += data
    except (TimeoutError, ConnectionResetError):
        pass
    return got


def ws_turn(ws, message: dict, timeout: float = 30) -> list[dict]:
    """Send one control message on a (sync) WebSocket and read its frames up to the one that ends it:
    `done`, `appended` or `error`."""
    ws.send(json.dumps(message))
    frames = [json.loads(ws.recv(timeout=timeout))]
    while frames[-1]["type"] not in ("done", "appended", "error"):
        frames.append(json.loads(ws.recv(timeout=timeout)))
    return frames


def check_usage(usage: dict, prompt: int, completion: int | None) -> None:
    """A usage object's prompt and completion tokens exactly (`completion` None: an append's, which has
    none), and its prompt_tokens_details.cached_tokens any count the prefix cache can give, 0 up to all but
    the prompt's last token: the cache holds what earlier requests to the same server ingested, which
    depends on the order the tests ran in (tests/test_prefix_cache.py checks the counts)."""
    want = {"prompt_tokens", "prompt_tokens_details"} | (
        set() if completion is None else {"completion_tokens", "total_tokens"}
    )
    assert set(usage) == want, usage
    assert usage["prompt_tokens"] == prompt and usage.get("completion_tokens") == completion, usage
    assert completion is None or usage["total_tokens"] == prompt + completion, usage
    assert set(usage["prompt_tokens_details"]) == {"cached_tokens"}, usage
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] <= max(prompt - 1, 0), usage


def token_ids(frames: list[dict]) -> list[int]:
    """The generated ids of a turn's token frames (WebSocket) or events (SSE), in order."""
    return [i for f in frames if f["type"] == "token" for i in f["ids"]]


def process_ready(proc, url: str) -> bool:
    """Whether a `python -m server` child process (stderr piped) answers /readyz 200 at `url`; fails the
    test, with the end of its stderr, once the process has exited (for `wait_for`)."""
    assert proc.poll() is None, f"the server stopped: {proc.stderr.read()[-3000:] if proc.stderr else ''}"
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def uvicorn_debug_lines():
    """The messages uvicorn's "uvicorn.error" logger (the websockets library's frame and header lines among
    them) writes at DEBUG while the block runs, as a list filled as they come; its level is set back after."""
    uvicorn_log = logging.getLogger("uvicorn.error")
    lines: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: lines.append(record.getMessage())
    level = uvicorn_log.level
    uvicorn_log.setLevel(logging.DEBUG)
    uvicorn_log.addHandler(handler)
    try:
        yield lines
    finally:
        uvicorn_log.removeHandler(handler)
        uvicorn_log.setLevel(level)


def slots_settled(engine, sessions, model: str) -> bool:
    """Whether `model`'s engine runs no request, no one-shot request's session is left (each is deleted as
    its request ends), and each slot in use holds a session of the table: for `wait_for`. A test on a shared
    server checks that its requests freed their slots this way, not against a slot count taken before
    them, which an earlier test's socket session deleted late, or one the idle TTL takes meanwhile, moves."""
    records = sessions.records(model)
    return (
        engine.active_requests == 0
        and not any(r.ephemeral for r in records)
        and engine.pool.in_use == len(records)
    )


def quiet(srv: ServerThread, model: str) -> bool:
    """Whether `srv` runs no request (no ASGI task: an earlier test's closed socket has been handled, its
    session deleted) and `model`'s slots are settled (`slots_settled`): for `wait_for`, before a test on a
    shared server takes a slot count to compare with later."""
    tasks = srv.server.server_state.tasks
    return not tasks and slots_settled(srv.state.models[model].engine, srv.state.sessions, model)


def steps_held_until(monkeypatch, engine, n: int, refusals: bool = False) -> list[int]:
    """Hold `engine`'s decoding (its one-step `rec.step` and native `rec.decode_block`) until `n` requests
    have come: submitted to the engine, or (`refusals`) refused, as `engine.metrics.reject` counts them. So
    requests sent together overlap in the engine whatever the machine's speed (a head start, or a turn
    slowed down, overlapped them only if the client sent faster than the engine decoded: a loaded machine's
    client could not). Returns the batch's live rows at each held call, for asserting that they overlapped.
    A call still held after 60 s fails, naming how many came."""
    came, lock, all_in, live = [0], threading.Lock(), threading.Event(), []
    submit, reject = engine.submit, engine.metrics.reject
    step, block = engine.rec.step, engine.rec.decode_block

    def arrived() -> None:
        with lock:
            came[0] += 1
            if came[0] == n:
                all_in.set()

    def counted_submit(job):  # (a job the queue refuses raises here, and is counted by its reject)
        submit(job)
        arrived()

    def counted_reject(reason: str) -> None:
        reject(reason)
        arrived()

    def held(fn):
        def run(*args, **kwargs):
            assert all_in.wait(60), f"{came[0]} of the {n} requests came"
            live.append(engine.batch.live)
            return fn(*args, **kwargs)

        return run

    monkeypatch.setattr(engine, "submit", counted_submit)
    if refusals:
        monkeypatch.setattr(engine.metrics, "reject", counted_reject)
    monkeypatch.setattr(engine.rec, "step", held(step))
    monkeypatch.setattr(engine.rec, "decode_block", held(block))
    return live


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def chat_copy(text_dir: Path, folder: Path) -> Path:
    """folder/tiny-chat: a copy of the tiny text model (`text_dir`) with the shipped text-shakespeare chat
    template and stop (the chat route's model)."""
    root = Path(__file__).resolve().parent.parent
    shipped = json.loads((root / "checkpoints/text-shakespeare/config.json").read_text())
    chat = folder / "tiny-chat"
    shutil.copytree(text_dir, chat)
    meta = json.loads((chat / "config.json").read_text())
    meta["chat_template"], meta["chat_stop"] = shipped["chat_template"], shipped["chat_stop"]
    (chat / "config.json").write_text(json.dumps(meta))
    return chat


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- fixtures (imported by tests/conftest.py) -------------------------------------------------------


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    return build_checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def server(model_dirs):
    """The main server: both tiny models (and a broken checkpoint it must refuse), roomy limits."""
    from server import Settings

    settings = Settings(
        checkpoints=[str(model_dirs[k]) for k in ("text", "audio", "broken")],
        max_sessions=80,
        max_batch_size=64,
        max_new_tokens=4096,
        stream_buffer=16,
        ws_max_frame_bytes=64 * 1024,
        ws_compression=True,  # the option's path (the limited server keeps the default, off)
        drain_timeout_s=1,
    )
    s = ServerThread(settings).start()
    yield s
    s.stop()


def limited_settings(model_dirs, **changes):
    """The limited server's settings (text model only, tight limits), with `changes`."""
    from server import Settings

    limits = dict(
        checkpoints=[str(model_dirs["text"])],
        max_sessions=3,
        max_batch_size=1,
        max_queued_requests=1,
        max_prompt_tokens=64,
        max_new_tokens=200_000,  # large enough that a paused reader cannot finish before it is checked
        session_ttl_s=1.0,
        stream_buffer=4,
        ws_max_frame_bytes=4096,
        drain_timeout_s=1,
    )
    return Settings(**{**limits, **changes})


@pytest.fixture(scope="session")
def limited(model_dirs):
    """A second server with tight limits (text model only) for the limit tests; its sockets have a
    4 KiB kernel send buffer (instead of Linux's autotuned MBs) so a slow reader is felt quickly."""
    s = ServerThread(limited_settings(model_dirs), send_buffer=4096).start()
    yield s
    s.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
