"""`python -m server [--flags]`: serve the configured checkpoints with uvicorn.

Settings come from S4_* environment variables, then these flags (one per setting; see --help).
"""

from __future__ import annotations

import os
import re
import signal
import sys


def _stop_while_starting(sig: int, frame) -> None:
    """SIGTERM or SIGINT while the modules are imported (torch: a second or more), before logging is set up:
    one line on stderr and exit 0, as a stop before listening does (`_stop_before_serving`), not a silent
    143 or a KeyboardInterrupt traceback. By os._exit: nothing is open yet, and a SystemExit raised into
    an import can be swallowed (a bare `except:` around an optional import, a finalizer running at that
    moment): CI saw a start go on past the signal until its test timed out."""
    sys.stderr.write(f"python -m server: {signal.Signals(sig).name} while starting: not serving\n")
    sys.stderr.flush()
    os._exit(0)


for _sig in (signal.SIGTERM, signal.SIGINT):  # replaced by main()'s handlers, then uvicorn's
    signal.signal(_sig, _stop_while_starting)

# Idle OpenMP threads must sleep, not spin: on a shared or small CPU spinning threads stall the
# engine (a tiny model's step goes from 0.5 ms to 20 ms). Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextvars  # noqa: E402
import logging  # noqa: E402
import socket  # noqa: E402
import types  # noqa: E402
import typing  # noqa: E402
from pathlib import Path  # noqa: E402

import uvicorn  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from server.app import create_app  # noqa: E402
from server.auth import CLIENT_KEY_VARIABLES  # noqa: E402
from server.config import Settings, default_text  # noqa: E402
from server.connections import raise_fd_limit, uvicorn_config  # noqa: E402
from server.logs import configure_logging  # noqa: E402
from server.state import ServerState  # noqa: E402

log = logging.getLogger("server")
LIST_METAVARS = {
    "checkpoints": "DIR",
    "model_dtypes": "MODEL_ID=DTYPE",
    "api_keys": "KEY",
    "allowed_origins": "ORIGIN",
    "allowed_hosts": "HOST",
}  # --help's names


def parse_args(argv: list[str] | None = None) -> Settings:
    """Settings from the S4_* variables and these flags, each flag's value parsed and checked by Settings
    as the variable's is (`--log-level DEBUG` and `S4_LOG_LEVEL=DEBUG` alike, `--port x` and `S4_PORT=x`
    refused alike, naming both); argparse only splits the command line."""
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    takes: dict[str, bool] = {}  # each flag → whether it takes a list (`attach_values`)
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        ann = field.annotation
        if typing.get_origin(ann) is typing.Annotated:
            ann = typing.get_args(ann)[0]
        takes[flag] = typing.get_origin(ann) is list
        # argparse %-formats help strings: a literal % in a description must be doubled
        default = default_text(name) or "none"
        help_ = f"{field.description} (env S4_{name.upper()}; default: {default})".replace("%", "%%")
        if typing.get_origin(ann) is list:
            metavar = LIST_METAVARS.get(name, "VALUE")
            parser.add_argument(flag, nargs="+", dest=name, default=None, metavar=metavar, help=help_)
        elif ann is bool:  # the string as given: Settings parses it (1/0, true/false, yes/no, on/off);
            # a bare flag (`--require-all-models`, as the README's table lists it) means true
            parser.add_argument(
                flag, dest=name, nargs="?", const="true", default=None, metavar="BOOL", help=help_
            )
        elif typing.get_origin(ann) is typing.Literal:  # (not argparse's choices: case-sensitive)
            metavar = "{" + ",".join(typing.get_args(ann)) + "}"
            parser.add_argument(flag, dest=name, default=None, metavar=metavar, help=help_)
        else:  # the string as given, as an S4_* variable is: Settings parses both alike (argparse's
            # int()/float() took non-ASCII digits, `--max-sessions ٣`, that the variable refuses)
            parser.add_argument(flag, dest=name, default=None, metavar=ann.__name__.upper(), help=help_)
    args = parser.parse_args(attach_values(sys.argv[1:] if argv is None else argv, takes))
    return Settings(**{k: v for k, v in vars(args).items() if v is not None})


def attach_values(argv: list[str], flags: dict[str, bool]) -> list[str]:
    """`argv` with the words after each flag, up to the next option, attached to it (`--port -1e-3` →
    `--port=-1e-3`; a list's several words comma-joined, as its variable takes them: `--api-keys K1 -K2` →
    `--api-keys=K1,-K2`): argparse reads a word starting with '-' as an option, so a value starting with one
    (a URL-safe key, 1 in 64) was its usage error, exit 2, where the variable took it or Settings refused
    it by name. A flag with no word after it is left alone (argparse's error, or a bare boolean's true).
    `flags`: each setting's flag → whether it takes a list."""
    out, i = [], 0
    while i < len(argv):
        word, i = argv[i], i + 1
        if word not in flags:  # a value, `--flag=value`, -h
            out.append(word)
            continue
        most = None if flags[word] else 1
        values = []
        while (
            i < len(argv)
            and argv[i] not in (*flags, "-h")
            and not argv[i].startswith("--")
            and most != len(values)
        ):
            values.append(argv[i])  # (a word starting with '--' ends them: the next option, or `--`)
            i += 1
        out.append(f"{word}={','.join(values)}" if values else word)
    return out


class GracefulServer(uvicorn.Server):
    """uvicorn with a graceful stop. On SIGTERM (or Ctrl-C) the app drains first, still listening:
    /readyz and new requests get 503, running requests and WebSocket turns finish (up to
    drain_timeout_s); then uvicorn closes the connections, the lifespan stops the engines, and the
    process exits 0. uvicorn alone stops listening at once, closes WebSockets mid-generation (1012)
    and re-raises the signal once it is done (exit status 143, or -15). A signal before the lifespan
    has started (just after "Started server process") ends the start: nothing loads or listens, exit 0.
    A second signal stops at once (`stop_at_once`): exit 0 without the rest of the drain, uvicorn's
    grace or the session store's final flush."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.drain_started = False

    def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
        """A Python signal handler runs in the context of whatever the main thread was running, often a
        request's task: its log lines, and a task it starts, would carry that request's id (the
        contextvars of server/logs.py). The signal and the drain are the server's, so they run in a
        fresh context: their lines carry no request id."""
        contextvars.Context().run(self._handle_exit, sig, frame)

    def _handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
        # never uvicorn's handle_exit: it records the signal to re-raise it once the server has stopped
        # (death by SIGTERM, -15; a KeyboardInterrupt traceback, or an abort while the loader thread is in
        # torch, for SIGINT), and its second SIGTERM waited for the drain and then uvicorn's grace
        name = signal.Signals(sig).name
        if self.drain_started:
            self.stop_at_once(name)
            return
        self.drain_started = True
        self.state.stopping.set()  # loading ends at its next step's boundary, or never starts
        loop = self.state.loop
        if loop is None:  # the lifespan has not started: nothing loads, nothing listens (`startup`)
            log.info("%s while starting: not serving", name)
            self.should_exit = True
            return
        log.info("%s: draining (up to %g s)", name, self.state.settings.drain_timeout_s)
        start = lambda: loop.create_task(self._drain_then_exit(), context=contextvars.Context())  # noqa: E731
        loop.call_soon_threadsafe(start, context=contextvars.Context())

    async def startup(self, sockets=None) -> None:
        if self.should_exit:  # stopped before it started: no lifespan, no socket (and so no shutdown)
            return
        await super().startup(sockets=sockets)

    def stop_at_once(self, name: str) -> None:
        """A second SIGTERM or SIGINT: exit 0 now. Running requests are cut (their connections close
        without a done frame), and the store is not flushed: each session keeps there the last state
        written through (every answered change), as after a `kill -9`. By os._exit, as nothing more is
        to be waited for: no task cancelled into a traceback, no signal re-raised. Exit status 0, as every
        stop asked for: a supervisor does not count it as a crash; this line says what it skipped."""
        kept = (
            "sessions keep their last state written to the session store, not flushed"
            if self.state.store is not None
            else "sessions in memory are lost"
        )
        log.warning("%s again: stopping at once, exit 0: running requests cut, %s", name, kept)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    def stop_now(self) -> None:
        """Stop without a drain (nothing to drain: nothing is served)."""
        self.should_exit = True

    async def _drain_then_exit(self) -> None:
        await self.state.drain()
        self.should_exit = True


def preflight(settings: Settings, built: dict | None = None) -> list[str]:
    """What stops the server from serving anything, checked before it listens: every configured
    checkpoint is read, validated and built (config.json, then the safetensors weights: never unpickled;
    `registry.build_entry`) and the session store is reached; before those (seconds, for a converted
    checkpoint), the device and the port. Returns the problems when nothing could be served, else [].
    `built`: filled with entry → its built checkpoint, or the exception it raised, for `load_models` to go
    on from (each was built again there)."""

    from model.checkpoint import CheckpointError  # noqa: PLC0415
    from server.store import StoreError, open_store  # noqa: PLC0415

    n = len(settings.checkpoints)
    what = f"{n} checkpoint" + ("" if n == 1 else "s")
    log.info("checking the settings' device, port, session store and %s", what)
    for problem in (settings.device_problem(), port_problem(settings.host, settings.port),
                    build_cache_problem(settings)):  # fmt: skip
        if problem:
            return [problem]
    problems = []
    try:
        store = open_store(settings.session_store, settings.session_store_ttl_s)
        if store is not None:
            store.close()
    except StoreError as exc:
        return [str(exc)]
    from server.registry import build_entry, untrained_default  # noqa: PLC0415

    built = {} if built is None else built
    usable = 0
    for entry in settings.checkpoints:
        if untrained_default(entry, settings):
            continue  # the default list names checkpoints that may not be trained yet
        if entry in built:  # (an entry named twice: its second is refused by id, as load_models does)
            continue
        try:
            built[entry] = build_entry(entry, settings)  # an official .ckpt/.pt is converted (cached) here
            usable += 1
        except (CheckpointError, ValueError, OSError) as exc:
            built[entry] = exc
            problems.append(f"checkpoint {entry}: {exc}")
        except Exception as exc:  # a fault of the converter or loader on this entry (a TypeError in the
            # mapping once stopped the whole start, a good checkpoint beside it included): this entry is not
            # served, as load_models would have it; its traceback in the log
            built[entry] = exc
            log.error("checkpoint %s: %s: %s", entry, type(exc).__name__, exc, exc_info=True)
            problems.append(f"checkpoint {entry}: {type(exc).__name__}: {exc}")
    if usable:
        return []
    if problems:
        return problems
    if not settings.checkpoints:
        return ["no checkpoint to serve: S4_CHECKPOINTS (--checkpoints) names none"]
    return [
        f"no checkpoint to serve: none of the default folders ({', '.join(settings.checkpoints)}) exists in "
        f"the current directory, {Path.cwd()} (they are relative to it: run from the repository's root), "
        "and S4_CHECKPOINTS (--checkpoints) names no other checkpoint"
    ]


def build_cache_problem(settings: Settings) -> str | None:
    """Why the fused CPU step could not be loaded from S4_BUILD_CACHE (a noexec mount), on a CPU device.
    It stops the server rather than warn: the torch ops would serve, but several times slower, behind a
    healthcheck that passes; the fix is one mount option or one variable (README, "Docker")."""
    from model.fused import build_cache_problem as problem  # noqa: PLC0415

    return problem() if settings.resolved_device() == "cpu" else None


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (in use, an address not of this machine), else None.
    Bound and released at once, as uvicorn binds it (asyncio's create_server: every address the host
    resolves to, SO_REUSEADDR, an IPv6 one IPv6-only), so it does not stop a restart. An empty S4_HOST (an
    unset variable in a template), which asyncio would read as every interface, is refused: no name.
    (The first address alone, dual-stack, refused S4_HOST=:: beside an IPv4 listener on the port, and
    passed a name whose second address was taken: the server then failed to listen after the models began
    to load.)"""
    sockets: list[socket.socket] = []
    address = None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in dict.fromkeys(infos):  # (each once, in order)
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:  # a family this machine lacks: asyncio passes over it too
                continue
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as exc:
        where = f" (on {address[0]})" if address is not None and address[0] != host else ""
        return f"cannot listen on {host}:{port} (S4_HOST, S4_PORT){where}: {exc.strerror or exc}"
    finally:
        for sock in sockets:
            sock.close()
    return None


# S4_* variables read elsewhere than Settings: the C build's (model/fused.py), a client script's key
# (scripts/ws_generate.py), the official code for bench.official; S4_FUZZ_* are the fuzz tests'
OTHER_ENV = {"S4_CFLAGS", "S4_BUILD_CACHE", "S4_API_KEY", "S4_OFFICIAL_DIR"}


def unknown_env(environ) -> list[str]:
    """The S4_* variables in `environ`, in any case, that no setting or tool reads (S4_MAX_SESION for
    S4_MAX_SESSIONS would otherwise be ignored without a word). Settings reads its variables in any case
    (s4_max_sessions=9 is taken), so s4_max_sesion is as much a typo; the other tools read theirs
    (OTHER_ENV, S4_FUZZ_*) in upper case only."""
    settings = {f"S4_{name.upper()}" for name in Settings.model_fields}

    def unknown(k: str) -> bool:
        if not k.upper().startswith("S4_") or k.upper() in settings:
            return False
        return k not in OTHER_ENV and not k.startswith("S4_FUZZ_")

    return sorted(k for k in environ if unknown(k))


KEY_SETTINGS = {"S4_API_KEYS", "S4_API_KEYS_FILE"}


def misnamed_keys(environ, settings: Settings) -> str | None:
    """Why not to serve when no server key is configured but a variable named like one holds a value:
    S4_API_KEY (what vLLM's users write for VLLM_API_KEY; the client scripts' key) or a typo of the two
    settings (S4_API_KEY_FILE, Docker's `_FILE` habit; S4_APIKEYS), in any case, or VLLM_API_KEY itself
    (a `docker run -e` line carried over from vLLM). Each was ignored, with a warning for a typo and
    without one for the others, and the server served every route without a key."""
    if settings.api_keys:
        return None
    names = sorted(k for k, v in environ.items() if v.strip() and k.upper() not in KEY_SETTINGS
                   and re.fullmatch(r"S4_API_?KEY.*|VLLM_API_KEY", k.upper()))  # fmt: skip
    if not names:
        return None
    what = CLIENT_KEY_VARIABLES.get(names[0].upper(), "not a setting") if len(names) == 1 else "not settings"
    verb = "is" if len(names) == 1 else "are"
    return (f"{', '.join(names)} {verb} set ({what}), but the server reads its keys from S4_API_KEYS "
            "(--api-keys) or S4_API_KEYS_FILE (--api-keys-file) only: set one of them to require keys, or "
            f"unset {', '.join(names)} to serve without keys")  # fmt: skip


def setting_names(field: str) -> str:
    """A setting as an operator sets it: `S4_MAX_SESSIONS (--max-sessions)`."""
    return f"S4_{field.upper()} (--{field.replace('_', '-')})"


def _stop_before_serving(sig: int, frame: types.FrameType | None) -> None:
    """SIGTERM or SIGINT while the checks run (a checkpoint's conversion can take minutes), or after them
    until uvicorn's handlers are in place: exit 0 at once, as a stop while serving does, not 143 with a
    traceback. Nothing listens or loads yet."""
    log.info("%s before listening: not serving", signal.Signals(sig).name)
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> None:
    try:
        settings = parse_args(argv)
    except ValidationError as exc:  # an S4_* variable or a flag Settings parses: name both, not its value
        msgs = [(e["loc"], e["msg"].removeprefix("Value error, ")) for e in exc.errors()]  # (pydantic's)
        names = [f"{setting_names(str(loc[0]))}: {msg}" if loc else msg  # (a check across settings names its)
                 for loc, msg in msgs]  # fmt: skip
        sys.exit("not serving: invalid settings: " + "; ".join(names))
    if (why := misnamed_keys(os.environ, settings)) is not None:  # never serve open by a misnamed key
        sys.exit("not serving: " + why)
    configure_logging(settings.log_level, settings.log_format)
    # the library's warnings (the fused CPU step or KeOps unavailable: torch ops instead) as log lines,
    # timestamped like the rest (logger "py.warnings"), not bare stderr lines
    logging.captureWarnings(True)
    for name in unknown_env(os.environ):
        log.warning("%s is not a setting (a typo? `python -m server --help` lists them): ignored", name)
    # until uvicorn installs its own (GracefulServer.handle_exit, in server.run): a stop exits 0 with a line.
    # (Python's defaults were put back here: a signal between the checks and uvicorn's start was death by
    # SIGTERM, or a KeyboardInterrupt traceback.)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_before_serving)
    built: dict = {}  # entry → its checkpoint built by the preflight, which the load goes on from
    problems = preflight(settings, built)
    if problems:
        for p in problems:
            log.error("%s", p)
        sys.exit("not serving: " + "; ".join(problems))
    app = create_app(settings)
    state = app.state.server
    state.built = built
    state.freeze_gc = True
    raise_fd_limit(settings.max_connections)
    config = uvicorn_config(
        app,
        settings,
        state.metrics,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's lines through the root logger: timestamped like the server's
        # the drain is over by then: this bounds the last writes (S4_SHUTDOWN_CLOSE_TIMEOUT_S)
        timeout_graceful_shutdown=settings.shutdown_close_timeout_s,
    )
    server = GracefulServer(config, state)
    state.on_fatal = server.stop_now  # e.g. every checkpoint failed its verification after all
    server.run()
    for sig in (signal.SIGTERM, signal.SIGINT):  # stopped: the process ends within LOADER_STOP_S
        signal.signal(sig, signal.SIG_IGN)
    if state.loader is not None and state.loader.is_alive():  # stopped while the models load
        exit_while_loading(state.loader)
    if state.fatal is not None:
        sys.exit(f"not serving: {state.fatal}")


LOADER_STOP_S = 1.0  # after a stop while loading: how long the loader may take to reach a step's boundary


def exit_while_loading(loader) -> None:
    """Exit 0 now that uvicorn has stopped, though the loader thread is still in a step (a model's
    conversion and verification takes seconds to minutes and cannot be cut short): up to LOADER_STOP_S
    for it to reach the next step's boundary, then os._exit, which does not wait for it (an interpreter
    shutting down under a running torch call can abort instead of exiting 0)."""
    loader.join(LOADER_STOP_S)
    if loader.is_alive():
        log.info("stopped while loading a model: exiting without waiting for it")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
