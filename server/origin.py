"""Browser origins and DNS rebinding (`S4_ALLOWED_ORIGINS`, `S4_ALLOWED_HOSTS`): an ASGI middleware in
front of every route, HTTP and WebSocket alike.

A web page the user visits can reach a server on their machine: a WebSocket has no same-origin policy
(the page opens `ws://127.0.0.1:8000/v1/stream` and talks to it: cross-site WebSocket hijacking), and
a name the attacker's DNS points at 127.0.0.1 makes the HTTP routes same-origin to the page (DNS
rebinding: Ollama's CVE-2024-28224). Two checks, before any route (and before the API-key check):

- **Origin.** A request that carries `Origin` (browsers send it on every WebSocket handshake and on
  cross-origin fetches and form posts) must come from this server's own origin (the Origin's host:port
  is the request's `Host`; the scheme is not compared, so the page works behind a TLS-terminating proxy
  that keeps `Host`, as Tornado's and Jupyter's check) or one listed in `S4_ALLOWED_ORIGINS` (`*`: any).
  `Origin: null` (a sandboxed iframe, a file:// page) is foreign. Requests without Origin pass: curl,
  the Python and openai clients, and a browser's cross-site GET, whose answer the page cannot read.
- **Host.** On a server listening on a loopback address (127.0.0.0/8, ::1, localhost) the `Host` must
  name a loopback host (localhost, *.localhost, 127.x.x.x, [::1]; any port), an IP address, written in
  any of the forms URLs take (`127.1`, `2130706433`: curl sends them as given; a page can only be on an
  address's origin if it came from that address: rebinding needs a name), or a name in
  `S4_ALLOWED_HOSTS` (`*`: any). On any other address (0.0.0.0 in a container) any Host passes unless
  `S4_ALLOWED_HOSTS` is set (then the same rule). The probes (/healthz, /readyz: a probe may name the
  server by a name no one listed) are exempt from the Host check; /readyz then withholds why a model is
  not served, which quotes paths on the server's disk (server/routes/health.py).

A refusal is 403 naming the origin or host and the setting (OpenAI's error shape on the OpenAI routes),
a WebSocket's an HTTP 403 before the handshake completes; each is counted in
`s4_requests_refused_total{reason="foreign_origin"|"foreign_host"}`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable

from starlette.middleware.cors import CORSMiddleware

from server.errors import APIError, refuse

HOST_EXEMPT_PATHS = frozenset({"/healthz", "/readyz"})  # probes: the kubelet's Host is the pod's IP
DEFAULT_PORTS = {"http": "80", "https": "443"}
ORIGIN = re.compile(r"([a-z][a-z0-9+.-]*)://(\[[0-9a-f:.]+\]|[a-z0-9._~-]+)(?::([0-9]{1,5}))?")
HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?")
SHOWN = 200  # characters of a refused Origin or Host quoted in the message


def normal_origin(origin: str) -> str | None:
    """`scheme://host[:port]` lower-cased, the scheme's default port dropped (a browser sends
    `https://a.example`, never `https://a.example:443`); None when `origin` is not of that form (a
    path, even `/`, user info, a query: not an origin)."""
    m = ORIGIN.fullmatch(origin.strip().lower())
    if m is None:
        return None
    scheme, host, port = m.groups()
    if port is not None:
        if int(port) > 65535:
            return None
        port = None if DEFAULT_PORTS.get(scheme) == str(int(port)) else str(int(port))
    return f"{scheme}://{host}" + (f":{port}" if port else "")


def normal_host_name(name: str) -> str | None:
    """A host name as `S4_ALLOWED_HOSTS` lists it (no port, no scheme), lower-cased, an IPv6 address
    without brackets; None when it is none."""
    name = name.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if _ip(name) is not None:
        return name
    return name.rstrip(".") if HOST_NAME.fullmatch(name) else None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def ipv4_number_form(name: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a host name of numbers names as URLs read it (the WHATWG URL standard's IPv4
    parser, what inet_aton and so curl take): 1 to 4 dot-separated numbers, each decimal, 0x-hex or
    0-octal, the last filling the bytes left (`127.1`, `2130706433`, `0x7f000001`, `0` are addresses);
    None for anything else. A browser sends such a host as its dotted quad and never looks it up in DNS
    (a host ending in a number is an address or no URL), so none is a rebinding name."""
    labels = name.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()  # a trailing dot
    if not 1 <= len(labels) <= 4:
        return None
    numbers = []
    for label in labels:
        if label[:2] in ("0x", "0X"):
            digits, base = label[2:] or "0", 16
        elif len(label) > 1 and label.startswith("0"):
            digits, base = label[1:], 8
        else:
            digits, base = label, 10
        if not digits or not digits.isascii() or not digits.isalnum():
            return None
        try:
            numbers.append(int(digits, base))
        except ValueError:
            return None
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (4 - len(head)):
        return None
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def host_name(host_header: str) -> str:
    """The name of a `Host` header, without its port, lower-cased (`[::1]:8000` → `::1`)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return (host.rpartition(":")[0] if host.count(":") == 1 else host).rstrip(".")  # `localhost.` too


def is_loopback_name(name: str) -> bool:
    """localhost, *.localhost (browsers resolve them to loopback themselves: RFC 6761), or a loopback
    address."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    ip = _ip(name)
    return ip is not None and ip.is_loopback


class OriginPolicy:
    """What `S4_ALLOWED_ORIGINS`, `S4_ALLOWED_HOSTS` and the listening address allow."""

    def __init__(self, listen_host: str, allowed_origins: Iterable[str] = (),
                 allowed_hosts: Iterable[str] = ()) -> None:  # fmt: skip
        origins = [o.strip() for o in allowed_origins]
        hosts = [h.strip() for h in allowed_hosts]
        self.any_origin = "*" in origins
        self.origins = frozenset(normal_origin(o) for o in origins if o != "*") - {None}
        self.any_host = "*" in hosts
        self.hosts = frozenset(normal_host_name(h) for h in hosts if h != "*") - {None}
        self.loopback = is_loopback_name(normal_host_name(listen_host) or listen_host)
        # the Host check is on when listening on loopback, or when S4_ALLOWED_HOSTS names hosts
        self.check_host = not self.any_host and (self.loopback or bool(hosts))

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        """`origin` (an Origin header) may use this server: its own (same host:port as the request's
        Host), or listed."""
        if self.any_origin:
            return True
        m = ORIGIN.fullmatch(origin.strip().lower())
        if m is None:  # `null`, or not an origin at all
            return False
        scheme, name, port = m.groups()
        own = host is not None and scheme in DEFAULT_PORTS
        if own and name + (f":{port}" if port else "") == host.strip().lower():
            return True
        return normal_origin(origin) in self.origins

    def host_allowed(self, host: str | None) -> bool:
        """`host` (a Host header) is no DNS-rebinding name: see the module's docstring. A request without
        Host is not a browser's."""
        if not self.check_host or host is None:
            return True
        name = host_name(host)
        if _ip(name) is not None or ipv4_number_form(name) is not None:
            return True
        return is_loopback_name(name) or name.rstrip(".") in self.hosts


def open_door_warnings(policy: OriginPolicy, keys: bool) -> list[str]:
    """Warnings, at start, for a `*` that opens the server to every web page while no API key guards it
    (`keys`: whether keys are configured): `S4_ALLOWED_ORIGINS=*` (any page the user visits drives every
    route and the WebSocket), and on a loopback server `S4_ALLOWED_HOSTS=*` (DNS rebinding). The README
    calls either unsafe without keys; nothing said so when it was set."""
    if keys:
        return []
    out = []
    if policy.any_origin:
        out.append(
            "S4_ALLOWED_ORIGINS=* with no API key: any web page a user of this machine visits can call every "
            "route and open the WebSocket (generate, read, continue or delete sessions); list the pages' "
            "origins, or set S4_API_KEYS"
        )
    if policy.any_host and policy.loopback:
        out.append(
            "S4_ALLOWED_HOSTS=* with no API key on a loopback address: a web page can reach this server "
            "under a name of its own (DNS rebinding) and call every route; list the names, or set S4_API_KEYS"
        )
    return out


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _shown(value: str) -> str:
    return value if len(value) <= SHOWN else value[:SHOWN] + "…"


class OriginCheck:
    """Refuses HTTP requests (403 JSON) and WebSocket handshakes (HTTP 403 denial response) from a foreign
    origin or to a DNS-rebinding Host; `on_refused(reason)` counts them ("foreign_origin",
    "foreign_host")."""

    def __init__(self, app, policy: OriginPolicy, on_refused: Callable[[str], None] | None = None) -> None:
        self.app, self.policy, self.on_refused = app, policy, on_refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        reason, err = refusal
        if self.on_refused is not None:
            self.on_refused(reason)
        await refuse(scope, receive, send, err)

    def refusal(self, scope: dict) -> tuple[str, APIError] | None:
        """(reason, error) when the request is refused, else None."""
        host = _header(scope, b"host")
        if scope.get("path", "") not in HOST_EXEMPT_PATHS and not self.policy.host_allowed(host):
            where = "a loopback address" if self.policy.loopback else "this address"
            return "foreign_host", APIError(
                403,
                f"the Host {_shown(host or '')!r} is not allowed on a server listening on {where} (DNS "
                "rebinding): use localhost or an IP address, or list the name in S4_ALLOWED_HOSTS",
                openai_code="host_not_allowed",
            )
        origin = _header(scope, b"origin")
        if origin is not None and not self.policy.origin_allowed(origin, host):
            return "foreign_origin", APIError(
                403,
                f"the origin {_shown(origin)!r} is not allowed: not this server's own, and not listed in "
                "S4_ALLOWED_ORIGINS",
                openai_code="origin_not_allowed",
            )
        return None


CORS_METHODS = ("GET", "HEAD", "POST", "DELETE")  # the methods the routes serve
# response headers a listed page may read (the Fetch standard hides the others from it): every header an
# answer carries for its client, the WAV answer's id, finish reason and usage (routes/generate.py) and an
# export's file name included
CORS_EXPOSED = ("X-Request-ID", "Retry-After", "X-Generation-Id", "X-Finish-Reason", "X-Prompt-Tokens",
                "X-Completion-Tokens", "X-Cached-Tokens", "Content-Disposition")  # fmt: skip


class CrossOrigin(CORSMiddleware):
    """CORS for the origins `S4_ALLOWED_ORIGINS` lists (added only when it lists any), inside `OriginCheck`
    and outside the API-key check: a listed page's `fetch` gets its preflight answered (an `OPTIONS` a
    browser sends without the key, so the key check refused it 401 and no fetch with `Authorization`
    could follow) and `Access-Control-Allow-Origin` on every answer, a 401 included, so the page can
    read it. Any request header is allowed (the preflight's list mirrored: `Authorization`, `X-API-Key`,
    the openai SDK's `X-Stainless-*`); no cookies are used, so no credentials mode. Origins match as
    `OriginCheck` matches them (case, default ports: `OriginPolicy.origin_allowed`)."""

    def __init__(self, app, policy: OriginPolicy) -> None:
        super().__init__(
            app,
            allow_origins=["*"] if policy.any_origin else sorted(policy.origins),
            allow_methods=CORS_METHODS,
            allow_headers=["*"],
            expose_headers=CORS_EXPOSED,
            allow_private_network=True,  # Chrome's Private Network Access: a server on loopback
        )
        self.policy = policy

    def is_allowed_origin(self, origin: str) -> bool:
        return self.policy.origin_allowed(origin, None)
