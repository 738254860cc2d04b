"""Optional API keys (`S4_API_KEYS`): an ASGI middleware in front of every route.

When keys are configured, every HTTP request and WebSocket handshake must carry one, except the
probes (/healthz, /readyz) and the static demo page (/, /static/*), which hold no data (a listed
origin's CORS preflight, which a browser sends without the key, is answered before: server/origin.py).
A key comes as `Authorization: Bearer <key>` or `X-API-Key: <key>`; on the WebSocket, browsers (which
cannot set headers) may instead offer the subprotocols `s4` and `s4.key.<base64url(key), no padding>`, and the
server selects `s4`, never echoing the key.

A refusal is 401 with one message whatever was wrong (missing, malformed or unknown key), so it tells
a prober nothing. Keys are kept and looked up as SHA-256 digests (a set of them), so the time taken
does not depend on how much of a key was right (a prober steers no byte of a digest) nor on how many
keys are configured: a loop of `hmac.compare_digest` over every configured key, for every key a
request carried, let one unauthenticated request of 4,900 `X-API-Key` headers hold the event loop
(every stream) 13 s against a 20,000-key S4_API_KEYS_FILE.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

from server.errors import APIError, is_openai_path, refuse

EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/"})
EXEMPT_PREFIXES = ("/static/",)
SUBPROTOCOL = "s4"
KEY_SUBPROTOCOL_PREFIX = "s4.key."
# one message whatever was wrong, naming the headers that carry a key (an `api-key` header, Azure's, or
# `Authorization: Token KEY` was refused with no word of what is read)
MESSAGE = "missing or invalid API key: send one as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def encode_key_subprotocol(key: str) -> str:
    """The subprotocol a browser offers to carry `key` (what the demo page does in JavaScript)."""
    return KEY_SUBPROTOCOL_PREFIX + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def _decode_key_subprotocol(value: str) -> bytes | None:
    raw = value[len(KEY_SUBPROTOCOL_PREFIX) :]
    try:
        return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):
        return None


def presented_keys(scope: dict) -> list[bytes]:
    """Every key the request carries (headers, and for WebSockets the key subprotocol), each without
    surrounding whitespace, wherever it came from: a header value's is not part of it (HTTP), so a key
    subprotocol's is not either, and a padded key is accepted alike by both (configured keys are
    stripped too: server/config.py)."""
    keys: list[bytes] = []
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                keys.append(token.strip())
        elif name == b"x-api-key" and value.strip():
            keys.append(value.strip())
    if scope["type"] == "websocket":
        for proto in scope.get("subprotocols", ()):
            if proto.startswith(KEY_SUBPROTOCOL_PREFIX) and (key := _decode_key_subprotocol(proto)):
                if key.strip():
                    keys.append(key.strip())
    return keys


class APIKeys:
    """The configured keys, kept only as digests."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = frozenset(_digest(k) for k in keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def accepts(self, key: bytes) -> bool:
        """One digest and one set lookup, however many keys are configured (see the module's docstring)."""
        return _digest(key) in self._digests

    def carries_key(self, scope: dict) -> bool:
        """Whether the request carries a configured key (any path: /readyz gives its reasons only then)."""
        return any([self.accepts(k) for k in presented_keys(scope)])  # a list: every key is checked

    def allows(self, scope: dict) -> bool:
        path = scope.get("path", "")
        if path in EXEMPT_PATHS or (
            path.startswith(EXEMPT_PREFIXES) and ".." not in path and "%" not in path
        ):
            return True
        return self.carries_key(scope)


# variables named like a key setting that hold another program's key, by what they are: the server reads
# neither (set without S4_API_KEYS, either stops it: server/__main__.py), and the servers the tools start
# (server/launch.py) do not inherit them
CLIENT_KEY_VARIABLES = {"S4_API_KEY": "the client scripts' key", "VLLM_API_KEY": "vLLM's setting"}
SHORT_KEY_CHARS = 16  # a key shorter than this is reported at start: guessable (OpenAI's are 51+)
UNSENDABLE = re.compile("[\x00-\x08\x0a-\x1f\x7f]")  # control characters: no header value holds them
WHICH = "(S4_API_KEYS in order, then S4_API_KEYS_FILE's lines)"


def key_warnings(keys: list[str]) -> list[str]:
    """Warnings naming configured keys (by position, never by value) that clients will trip on: shorter
    than SHORT_KEY_CHARS (a comma in S4_API_KEYS splits a key in two, so `x9f,q` is the keys `x9f` and
    `q`: any one-character guess passed), holding a control character (no header carries it), or not
    ASCII (httpx and the openai client refuse to send it, requests sends it as Latin-1, which is not the
    key's UTF-8; curl and the demo page send UTF-8, which passes)."""

    def positions(pred) -> str:
        return ", ".join(str(i) for i, k in enumerate(keys, 1) if pred(k))

    out = []
    if short := positions(lambda k: len(k) < SHORT_KEY_CHARS):
        out.append(
            f"API key {short} of {len(keys)} {WHICH} is shorter than {SHORT_KEY_CHARS} characters: "
            "guessable; a comma in S4_API_KEYS splits a key (one with a comma goes in S4_API_KEYS_FILE)"
        )
    if unsendable := positions(lambda k: UNSENDABLE.search(k) is not None):
        out.append(
            f"API key {unsendable} of {len(keys)} {WHICH} holds a control character, which no HTTP "
            "header can carry: no client can send it"
        )
    if non_ascii := positions(lambda k: not k.isascii()):
        out.append(
            f"API key {non_ascii} of {len(keys)} {WHICH} is not ASCII: httpx and the openai client "
            "cannot send it, requests sends it as Latin-1 (refused); only UTF-8 senders (curl, the "
            "demo page) pass"
        )
    return out


class APIKeyMiddleware:
    """Refuses HTTP requests (401 JSON) and WebSocket handshakes (HTTP 401 denial response) that
    carry no valid key; counts them in `s4_auth_failures_total`."""

    def __init__(self, app, keys: APIKeys, on_refused=None) -> None:
        self.app, self.keys, self.on_refused = app, keys, on_refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.keys.enabled or self.keys.allows(scope):
            await self.app(scope, receive, send)
            return
        if self.on_refused is not None:
            self.on_refused(scope["type"])
        # OpenAI's shape on the OpenAI routes: invalid_api_key
        await refuse(scope, receive, send, APIError(401, MESSAGE), ((b"www-authenticate", b"Bearer"),))


def document_api_keys(app) -> None:
    """Put the keys in the app's OpenAPI schema: two security schemes (Bearer, X-API-Key) and a 401
    response on every operation that needs a key, so clients and schema-driven fuzzers know."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:  # built and documented by the first call (FastAPI caches it)
            return app.openapi_schema
        schema = build()
        schema["components"].setdefault("securitySchemes", {}).update(
            {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            }
        )
        for path, ops in schema["paths"].items():
            if path in EXEMPT_PATHS or path.startswith(EXEMPT_PREFIXES):
                continue
            # every API route declares its error model: OpenAI's on the OpenAI routes
            error = {"$ref": f"#/components/schemas/{'OpenAI' if is_openai_path(path) else ''}ErrorResponse"}
            for op in ops.values():
                op["security"] = [{"bearer": []}, {"apiKey": []}]
                op.setdefault("responses", {})["401"] = {
                    "description": MESSAGE,
                    "content": {"application/json": {"schema": error}},
                }
        return schema

    app.openapi = openapi
