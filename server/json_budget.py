"""How much JSON a request may make the server parse: its structure, counted as the body arrives.

A body is parsed and validated on the event loop, mostly in C calls that hold the GIL (`json.loads`,
pydantic-core): meanwhile no stream gets a frame, and the engine thread waits too. The cost is set by the
number and kind of JSON values, not by the bytes (measured on the 2-core Zen 3 VM): 16 MiB of one
string parses in 13 ms; 5.5 M token ids (16 MiB) in ~300 ms and as long again to validate; floats cost
4× an integer; a million object members of distinct keys take 0.6 s, and arrays and objects more still
(the cyclic GC scans them as they pile up). So every JSON body is counted, outside its strings, as
uvicorn hands it over (64 KiB at a time), and refused 413 as soon as it holds more of a kind than a
valid request to its route can (`route_budget`): before the rest is read, and before anything parses it.

Four kinds are counted, each by its bytes outside strings: separators (`,`: an array's or object's
elements but its first), containers (`[`, `{`), object members (`:`) and floats (`.`, `e`, `E`: a
number with a fraction or an exponent; `true` and `false` count too); and the nesting depth, the most
arrays and objects open at once (`[`, `{` open one, `]`, `}` close one): MAX_DEPTH = 32, where a valid
request nests 5 deep at most (a chat message's content parts). A fixed limit far inside Python's
recursion limit (about 1,000 levels, which set json's refusal before), so it does not depend on the
interpreter. Inside strings nothing counts, so a long text prompt full of commas costs nothing against
the budget (its length has its own limit). A
byte is inside a string when an odd number of unescaped `"` precede it; a `"` is escaped when an odd
run of `\\` precedes it. Where the body is not valid JSON this count and a parser may disagree only
from the first invalid byte on (a `\\` outside a string, say), where the parser stops: the count is
exact for every byte a parser reads.
"""

from __future__ import annotations

import email.message
import json
from dataclasses import dataclass

import numpy as np

from server.schemas import MAX_PROMPTS

_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_COUNTED = {  # the most specific kind first: a refusal names the first kind over its budget
    "floats": (b".", b"e", b"E"),  # outside strings only in numbers, and in true and false
    "members": (b":",),
    "containers": (b"[", b"{"),
    "separators": (b",",),
}


MAX_DEPTH = 32  # arrays and objects nested in one another (a valid request: 5 at most)


@dataclass(frozen=True)
class JSONBudget:
    """The most of each kind a body may hold outside strings (each ≥ 0)."""

    separators: int  # ',': a list of n token ids has n - 1
    containers: int  # '[' and '{'
    members: int  # ':': object members (a request's fields count too)
    floats: int  # '.', 'e', 'E': a number with a fraction or an exponent (1 or 2 each), true, false
    depth: int = MAX_DEPTH  # arrays and objects open at once

    def limit(self, kind: str) -> int:
        return getattr(self, kind)


def json_content_type(headers) -> bool:
    """Whether FastAPI parses a body with these headers as JSON (fastapi/routing.py, strict content
    type, its default): `application/json` or `application/*+json`, parameters allowed, read as FastAPI
    reads it: the first Content-Type, as Latin-1 text (Starlette's), through `email.message` (which strips
    Unicode whitespace: a no-break space or NEL around `application/json` is JSON to FastAPI, and was left
    uncounted here when only ASCII whitespace was stripped). `headers`: the ASGI scope's list of (name,
    value) byte pairs."""
    for name, value in headers:
        if name == b"content-type":
            message = email.message.Message()
            message["content-type"] = value.decode("latin-1")
            main, sub = message.get_content_maintype(), message.get_content_subtype()
            return main == "application" and (sub == "json" or sub.endswith("+json"))
    return False


def not_utf8(head: bytes) -> str | None:
    """The encoding Python's json reads a body in, by its first bytes `head` (`json.detect_encoding`: a
    UTF-16 or UTF-32 BOM, or NUL bytes among the first four), when it is not UTF-8 ("utf-16-le", ...), else
    None (a UTF-8 BOM included). JSON bodies must be UTF-8 (RFC 8259 8.1), and `StructureCounter` reads
    UTF-8 bytes: in UTF-16 a quote's byte 0x22 is also half of other characters ("∀" is 0x00 0x22)."""
    enc = json.detect_encoding(head)
    return None if enc in ("utf-8", "utf-8-sig") else enc


class StructureCounter:
    """Counts a JSON text's separators, containers, members and floats outside strings, fed in pieces of any
    size (split anywhere, even inside an escape). `feed` returns the first kind over `budget`, or None.

    Cost: a piece with no `"` and no `\\` is counted with `bytes.count` (base64 audio, token ids); one
    with them in a few numpy passes (2-10 ms per MiB here, the most with dense escapes: under 1 ms
    for a 64 KiB piece)."""

    def __init__(self, budget: JSONBudget) -> None:
        self.budget = budget
        self.counts = {"depth": 0} | dict.fromkeys(_COUNTED, 0)  # depth: the deepest so far (named first)
        self.depth = 0  # arrays and objects open after the bytes fed so far
        self.in_string = False  # after the bytes fed so far
        self.escape_pending = False  # they end in an odd run of backslashes: the next byte is escaped

    def feed(self, piece: bytes) -> str | None:
        if not piece:
            return None
        if _QUOTE not in piece and _BACKSLASH not in piece:
            self.escape_pending = False
            if not self.in_string:
                for kind, chars in _COUNTED.items():
                    self.counts[kind] += sum(piece.count(c) for c in chars)
                if b"[" in piece or b"{" in piece:
                    self._nest(np.frombuffer(piece, np.uint8))
                else:  # (only closes: the depth falls, its maximum stands)
                    self.depth -= piece.count(b"]") + piece.count(b"}")
        else:
            self._scan(np.frombuffer(piece, np.uint8))
        for kind, n in self.counts.items():
            if n > self.budget.limit(kind):
                return kind
        return None

    def _scan(self, a: np.ndarray) -> None:
        n = a.size
        if self.escape_pending or _BACKSLASH in a:
            # the run of backslashes ending at i: i - (the last non-backslash at or before i); a run
            # that reaches the piece's start continues the last piece's (its parity: escape_pending)
            idx = np.arange(n)
            last_other = np.maximum.accumulate(np.where(a == _BACKSLASH, -1, idx))
            odd_run = ((idx - last_other) + ((last_other < 0) & self.escape_pending)) & 1
            escaped = np.empty(n, bool)
            escaped[0] = self.escape_pending
            escaped[1:] = odd_run[:-1]
            quote = (a == _QUOTE) & ~escaped
            self.escape_pending = bool(odd_run[-1])
        else:
            quote = a == _QUOTE
        inside = np.cumsum(quote, dtype=np.int64)  # quotes up to byte i: odd (+ in_string) is inside
        outside = ((inside + self.in_string) & 1) == 0  # (a quote's own parity is moot: it is not counted)
        out = a[outside]
        kinds = np.bincount(_KIND[out], minlength=len(_COUNTED) + 1)
        for k, kind in enumerate(_COUNTED, start=1):
            self.counts[kind] += int(kinds[k])
        self._nest(out)
        self.in_string = bool((int(inside[-1]) + self.in_string) & 1)

    def _nest(self, out: np.ndarray) -> None:
        """Follow the depth through `out`, bytes outside strings."""
        step = _NEST[out]
        if step.any():
            depth = self.depth + np.cumsum(step, dtype=np.int64)
            self.counts["depth"] = max(self.counts["depth"], int(depth.max()))
            self.depth = int(depth[-1])


_KIND = np.zeros(256, np.uint8)  # byte -> 1 + its kind's index in _COUNTED (0: not counted)
for _k, _chars in enumerate(_COUNTED.values(), start=1):
    for _c in _chars:
        _KIND[_c[0]] = _k
_NEST = np.zeros(256, np.int8)  # byte -> +1 opens an array or object, -1 closes one
_NEST[[ord("["), ord("{")]], _NEST[[ord("]"), ord("}")]] = 1, -1


SMALL = 65_536  # of each kind, far more than any valid request holds (but the token ids of the routes below)
CONTAINERS = 16_384  # a valid request holds a few hundred arrays and objects at most (256 chat messages)
CHAT_SLACK = 4_096  # a chat request's arrays, objects, members and elements besides its content parts


def route_budget(path: str, max_prompt_tokens: int, max_new_tokens: int = 0) -> tuple[JSONBudget, str | None]:
    """What a JSON body to `path` may hold, and, on the routes that take token ids, what sets its separators
    (else None). /v1/completions takes up to MAX_PROMPTS prompts of `max_prompt_tokens` ids each, and
    /detokenize one list, of a prompt's ids (/tokenize's answer) or a generation's (`max_new_tokens`): their
    separators may be that many more. Parsed and validated at its budget (the defaults: 8,192 tokens), the
    costliest body holds the GIL ~60 ms here (589,824 token ids, or as many strings); any other route's
    ~40 ms."""
    if path == "/v1/completions":
        n = MAX_PROMPTS * max_prompt_tokens
        note = (
            f"a valid /v1/completions body holds at most {MAX_PROMPTS} prompts of max_prompt_tokens "
            f"({max_prompt_tokens}) token ids, {n}, + {SMALL}"
        )
        return JSONBudget(n + SMALL, CONTAINERS, SMALL, SMALL), note
    if path == "/detokenize":
        n = max(max_prompt_tokens, max_new_tokens)
        note = (
            f"a valid /detokenize body holds the token ids of a prompt or a generation, at most {n} "
            f"(max_prompt_tokens {max_prompt_tokens}, max_new_tokens {max_new_tokens}), + {SMALL}"
        )
        return JSONBudget(n + SMALL, CONTAINERS, SMALL, SMALL), note
    if path == "/v1/chat/completions":  # (a message's content parts are an unbounded list: a part of one
        # token, {"type": "text", "text": "a"}, is 1 object, 2 members and 2 elements; a prompt of
        # max_prompt_tokens such parts past 16,384 was refused though valid, a helper's audit. CHAT_SLACK:
        # the rest of the request, 256 messages and a logit_bias included. The defaults are unchanged.)
        n, most = max_prompt_tokens, max(SMALL, 2 * max_prompt_tokens + CHAT_SLACK)
        return JSONBudget(most, max(CONTAINERS, n + CHAT_SLACK), most, SMALL), None
    return JSONBudget(SMALL, CONTAINERS, SMALL, SMALL), None


def text_over_budget(text: str, budget: JSONBudget) -> str | None:
    """`StructureCounter.feed` for a whole text (a WebSocket message): the first kind over `budget`, or
    None. Counted in strings too first (str.count), then exactly only if that count is over."""
    naive = {kind: sum(text.count(c.decode()) for c in chars) for kind, chars in _COUNTED.items()}
    naive["depth"] = naive["containers"]  # (at most every one open at once)
    if all(n <= budget.limit(kind) for kind, n in naive.items()):
        return None
    return StructureCounter(budget).feed(text.encode("utf-8", "surrogatepass"))


def over_budget_message(
    kind: str, budget: JSONBudget, separators_note: str | None = None, what: str = "request body"
) -> str:
    """The 413's message: `kind` over `budget`, in `what` ("request body", or "message" on a WebSocket);
    `separators_note` (route_budget's) says what sets a route's larger separator budget."""
    items = {
        "depth": "levels of arrays and objects nested in one another",
        "separators": "array or object elements (',')",
        "containers": "arrays and objects ('[', '{')",
        "members": "object members (':')",
        "floats": "numbers with a fraction or an exponent ('.', 'e', 'E'; true and false count too)",
    }[kind]
    why = separators_note if kind == "separators" and separators_note else f"more than any valid {what} holds"
    return (
        f"the {what} holds more than {budget.limit(kind)} {items} outside strings ({why}); it was refused "
        "before it was parsed"
    )
