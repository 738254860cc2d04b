"""Automatic prefix caching: the recurrent state after a prompt's first tokens, kept for the next prompt
that starts with the same tokens (a system prompt, a few-shot preamble, a document asked several
questions, a retried request).

An S4 model's state after a prefix is one fixed-size row whatever the prefix's length (the shipped text
model: 256 KiB), where a Transformer's prefix cache holds keys and values per token. So a hit saves the
whole prefill of the prefix for the price of one row copy. vLLM's automatic prefix caching (hash-chained
blocks of tokens, least recently used eviction) is the model followed, at the engine's prefill chunk
boundaries: a prompt is ingested in chunks of `prefill_chunk_tokens` from position 0
(`Engine._prefill`), so the state after each whole chunk, and after the whole ingested prompt, is
stored under a hash of the tokens before it; a new session's prompt starts from its longest stored
prefix and ingests only the rest. The state a hit restores is the one ingestion computed at that
boundary, so a hit changes only which rows share a batched prefill call (as load does), never what
is computed.

Keys: BLAKE2b (128-bit) of the prefix's token ids (int64, little-endian), one running hash over a
prompt's chunks. One cache per engine: per model, with its dtype, device and chunk size. The
engine thread alone uses it.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import numpy as np
import torch


def boundary_keys(tokens: Sequence[int], chunk: int) -> dict[int, bytes]:
    """{prefix length: key} for the prefixes a prompt's ingestion passes whole: every multiple of
    `chunk` (≥ 1) up to len(tokens), and len(tokens) itself (empty for no tokens). O(len) hashing."""
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1, got {chunk}")
    n = len(tokens)
    ends = list(range(chunk, n, chunk)) + ([n] if n else [])
    ids = np.asarray(tokens, dtype="<i8")
    h = hashlib.blake2b(digest_size=16, person=b"s4-prefix")
    keys, start = {}, 0
    for end in ends:
        h.update(ids[start:end].tobytes())  # (8 bytes a token: prefixes of two lengths hash different bytes)
        start = end
        keys[end] = h.digest()  # (digest does not end the hash: the next chunk extends it)
    return keys


class PrefixCache:
    """At most `capacity` state rows by prefix key, least recently used first out.

    Rows are stored as given (a copy: the caller's tensor may be reused), on their device; every row of
    one cache has `row_bytes` bytes (one slot of the engine's pool). A capacity of 0 keeps nothing.
    Counters: `entries`, `bytes`."""

    def __init__(self, capacity: int, row_bytes: int) -> None:
        if capacity < 0 or row_bytes < 1:
            raise ValueError(f"capacity must be ≥ 0 and row_bytes ≥ 1, got {capacity}, {row_bytes}")
        self.capacity, self.row_bytes = capacity, row_bytes
        self._rows: collections.OrderedDict[bytes, torch.Tensor] = collections.OrderedDict()

    @property
    def entries(self) -> int:
        return len(self._rows)

    @property
    def bytes(self) -> int:
        return len(self._rows) * self.row_bytes

    def longest(self, keys: dict[int, bytes], within: int) -> tuple[int, torch.Tensor] | None:
        """The longest stored prefix among `keys` ({length: key}) no longer than `within` tokens, as
        (length, row); None when none is stored. It and the stored shorter prefixes of `keys` become the
        most recently used (the longest last), so a prefix that many prompts share stays while it is used
        (vLLM touches every block of a hit's chain)."""
        lengths = sorted(n for n in keys if n <= within)
        hit = next((n for n in reversed(lengths) if keys[n] in self._rows), None)
        if hit is None:
            return None
        for n in lengths:
            if n <= hit and keys[n] in self._rows:
                self._rows.move_to_end(keys[n])
        return hit, self._rows[keys[hit]]

    def put(self, key: bytes, row: torch.Tensor) -> None:
        """Store a copy of `row` under `key` (or refresh it as the most recently used), evicting the least
        recently used rows beyond the capacity."""
        if self.capacity == 0:
            return
        if key in self._rows:
            self._rows.move_to_end(key)
            return
        size = row.numel() * row.element_size()
        if size != self.row_bytes:
            raise ValueError(f"a row of {size} bytes in a cache of {self.row_bytes}-byte rows")
        while len(self._rows) >= self.capacity:
            self._rows.popitem(last=False)
        self._rows[key] = row.clone()

    def shrink(self) -> int:
        """After an allocation failed: hold at most the rows held now, less one (at least none), from now
        on, the least recently used dropped. Returns the new capacity."""
        self.capacity = max(len(self._rows) - 1, 0)
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)
        return self.capacity
