"""A WebSocket client for /v1/stream: one generation, text to stdout as it arrives (an audio model's
samples: raw s16le bytes), the done frame (finish_reason, usage) to stderr as JSON. Exit status 1 on
an error frame, a refused handshake (the server's status and message, e.g. 401 or a 429 at the
per-client connection cap), a server that cannot be reached, a connection closed before the done
frame (its close code and reason: 1012 when the server stopped), or when stdout is closed before the
generation ends (`| head`); one line on stderr, no traceback. An empty prompt sends none (an audio
model then starts from its silence). Without --max-new-tokens (or --seed) the request names none, so
the model's default applies: its checkpoint's `generation_config` (one second of audio for
audio-digits), else the API's 64.

    .venv/bin/python scripts/ws_generate.py ws://127.0.0.1:8000/v1/stream "ROMEO:" \
        --max-new-tokens 200 --seed 1
    .venv/bin/python scripts/ws_generate.py ws://127.0.0.1:8000/v1/stream "" --model audio-digits > out.s16le

With API keys on the server, pass `--api-key KEY` or set S4_API_KEY (sent as `Authorization: Bearer`).
"""

import argparse
import asyncio
import json
import os
import sys

import websockets


async def generate(
    url: str,
    prompt: str,
    model: str,
    max_new_tokens: int | None,
    seed: int | None,
    api_key: str | None = None,
) -> int:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    try:
        ws = await websockets.connect(url, additional_headers=headers)
    except websockets.exceptions.InvalidStatus as exc:  # the server refused the handshake: say why
        r = exc.response
        try:
            why = json.loads(r.body or b"")["error"]["message"]
        except (ValueError, KeyError, TypeError):
            why = (r.body or b"").decode(errors="replace").strip()
        hint = " (this script sends one given --api-key KEY or S4_API_KEY)" if r.status_code == 401 else ""
        print(f"refused: HTTP {r.status_code} {r.reason_phrase}: {why}{hint}", file=sys.stderr)
        return 1
    except (OSError, TimeoutError, websockets.exceptions.InvalidHandshake) as exc:
        print(f"cannot connect to {url}: {exc}", file=sys.stderr)
        return 1
    try:
        return await _stream(ws, prompt, model, max_new_tokens, seed)
    except websockets.exceptions.ConnectionClosed as exc:  # (1012: the server is stopping or restarting)
        return _closed_early(exc.rcvd)


def _closed_early(close) -> int:
    """Say how the connection closed before the done frame (`close`: the close frame received, or None),
    in one line on stderr; exit status 1."""
    why = f"code {close.code}" + (f" ({close.reason})" if close.reason else "") if close else "no close frame"
    print(f"the connection closed before the done frame: {why}", file=sys.stderr)
    return 1


async def _stream(ws, prompt: str, model: str, max_new_tokens: int | None, seed: int | None) -> int:
    async with ws:
        given = {"prompt": prompt, "max_new_tokens": max_new_tokens, "seed": seed}
        msg = {"type": "generate", "model": model} | {k: v for k, v in given.items() if v not in (None, "")}
        await ws.send(json.dumps(msg))
        text = False  # (whether text went to stdout: on a terminal it ends its line before the done line)
        async for frame in ws:
            if isinstance(frame, bytes):  # an audio model's samples
                sys.stdout.buffer.write(frame)
                sys.stdout.buffer.flush()
                continue
            msg = json.loads(frame)
            if msg["type"] == "token":
                print(msg["text"], end="", flush=True)
                text = text or bool(msg["text"])
            elif msg["type"] in ("done", "error"):
                if text and sys.stdout.isatty():  # (a pipe or a file gets the text exactly)
                    print(flush=True)
                print(json.dumps(msg), file=sys.stderr)
                return 0 if msg["type"] == "done" else 1
    return _closed_early(ws.protocol.close_rcvd)  # (a normal close, 1000 or 1001, ends the loop: no raise)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("prompt")
    p.add_argument("--model", default="text-shakespeare")
    p.add_argument("--max-new-tokens", type=int, help="default: the model's (its generation_config, else 64)")
    p.add_argument("--seed", type=int)
    p.add_argument("--api-key", default=os.environ.get("S4_API_KEY"), help="default: $S4_API_KEY")
    a = p.parse_args()
    try:
        sys.exit(asyncio.run(generate(a.url, a.prompt, a.model, a.max_new_tokens, a.seed, a.api_key)))
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as the Python docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        sys.exit(1)
