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

Which rows stay when memory is short (vLLM's `prefix_cache_retention_interval` and Marconi, Pan et
al. 2024, "Marconi: Prefix Caching for the Era of Hybrid LLMs", followed): a Transformer's cached prefix
needs every block before it, so vLLM keeps them all; here one row serves a hit by itself, and a 64k-token
prompt would leave 256 rows, the whole default budget, of which a later prompt uses one. So a prompt's
rows are of two kinds:
- **kept**: the row after its last whole chunk (what the next turn of a conversation, which resends
  this prompt and more, or another question after the same document, starts from), after each multiple
  of `interval` tokens (`S4_PREFIX_CACHE_RETENTION_INTERVAL`; 0: none), and at its junction: the
  longest of its prefixes that an earlier prompt also ingested (a key is remembered long after its row
  is gone: "Keys" below says what that costs), where prompts that share a document or preamble
  diverge, or its whole input when it was seen before (a retry); and any row that served a hit;
- **spare**: every other row (the other chunk boundaries; the whole input, which only the very same
  prompt can use), stored while there is room, evicted before any kept row and never evicting one.
  A prefix shared by a second prompt is then found if memory allowed its spare row to stay, and by the
  third prompt whenever kept rows have room (the second kept its junction).

Keys: BLAKE2b-256 (KEY_BYTES) of the prefix's token ids (int64, little-endian), one running hash over a
prompt's chunks. A hit does not compare tokens (the cache keeps none), so the key alone must name the
prefix: at 128 bits, a birthday search of about 2^64 hashes could find two prompts of one key (the one
then served the state after the other); at 256 bits no collision can be found, by chance or by design. It
costs no measurable time (the hashing of a 64k-token prompt is about 2 ms either way) and 16 bytes more a
remembered key. The remembered keys (SEEN_KEYS of them, least recently seen out) take about 150 bytes
each in Python (the key, its place in an ordered dict): 9.6 MiB per model when all 65,536 are held. That
is host memory, not counted in `S4_PREFIX_CACHE_MB`, which budgets the state rows only (`bytes`).
One cache per engine: per model, with its dtype, device and chunk size. The engine thread alone uses it.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import numpy as np
import torch

KEY_BYTES = 32  # a prefix key's size: BLAKE2b-256 (module docstring, "Keys")


def boundary_keys(tokens: Sequence[int], chunk: int) -> dict[int, bytes]:
    """{prefix length: key} for the prefixes a prompt's ingestion passes whole: every multiple of
    `chunk` (≥ 1) up to len(tokens), and len(tokens) itself (empty for no tokens). O(len) hashing."""
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1, got {chunk}")
    n = len(tokens)
    ends = list(range(chunk, n, chunk)) + ([n] if n else [])
    ids = np.asarray(tokens, dtype="<i8")
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=b"s4-prefix")
    keys, start = {}, 0
    for end in ends:
        h.update(ids[start:end].tobytes())  # (8 bytes a token: prefixes of two lengths hash different bytes)
        start = end
        keys[end] = h.digest()  # (digest does not end the hash: the next chunk extends it)
    return keys


SEEN_KEYS = 1 << 16  # keys remembered for junctions (9.6 MiB of host memory; 16M tokens at 256 a chunk)


class PrefixCache:
    """At most `capacity` state rows by prefix key: kept rows and spare ones (module docstring), each kind
    least recently used first out, spare rows before any kept one.

    Rows are stored as given (a copy: the caller's tensor may be reused), on their device; every row of
    one cache has `row_bytes` bytes (one slot of the engine's pool). A capacity of 0 keeps nothing.
    `chunk`: the keys' chunk (`boundary_keys`); `interval` (tokens, ≥ 0, a multiple of `chunk`):
    prefixes whose length is a multiple of it are kept (0: none by length).
    `seen_keys`: how many prefix keys are remembered for junctions, least recently seen out.
    Counters: `entries` (`kept` + `spare`), `bytes`. Raises ValueError for a size out of range."""

    def __init__(
        self, capacity: int, row_bytes: int, chunk: int, interval: int = 0, seen_keys: int = SEEN_KEYS
    ) -> None:
        if capacity < 0 or min(row_bytes, chunk, seen_keys) < 1 or interval < 0 or interval % chunk:
            raise ValueError(
                "capacity ≥ 0, row_bytes, chunk and seen_keys ≥ 1 and an interval ≥ 0 that is a multiple of "
                f"the chunk, got {capacity}, {row_bytes}, {chunk}, {seen_keys} and {interval}"
            )
        self.capacity, self.row_bytes, self.chunk, self.interval = capacity, row_bytes, chunk, interval
        self.seen_keys = seen_keys
        self._kept: collections.OrderedDict[bytes, torch.Tensor] = collections.OrderedDict()
        self._spare: collections.OrderedDict[bytes, torch.Tensor] = collections.OrderedDict()
        self._seen: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    @property
    def entries(self) -> int:
        return len(self._kept) + len(self._spare)

    @property
    def kept(self) -> int:
        return len(self._kept)

    @property
    def spare(self) -> int:
        return len(self._spare)

    def plan(self, keys: dict[int, bytes]) -> set[int]:
        """The prefix lengths among a prompt's `keys` ({length: key}, `boundary_keys` with this cache's
        chunk) whose rows are to be kept: the longest multiple of the chunk (its last whole chunk), the
        multiples of `interval`, and the junction (the longest whose key an earlier prompt's plan saw).
        Then remembers all of `keys` as seen. Empty for no keys."""
        lengths = sorted(keys)
        keep = set([n for n in lengths if n % self.chunk == 0][-1:])
        if self.interval:
            keep.update(n for n in lengths if n % self.interval == 0)
        junction = next((n for n in reversed(lengths) if keys[n] in self._seen), None)
        if junction is not None:
            keep.add(junction)
        for n in lengths:
            self._seen[keys[n]] = None
            self._seen.move_to_end(keys[n])
        while len(self._seen) > self.seen_keys:
            self._seen.popitem(last=False)
        return keep

    @property
    def bytes(self) -> int:
        return self.entries * self.row_bytes

    def longest(
        self, keys: dict[int, bytes], within: int, use: bool = True
    ) -> tuple[int, torch.Tensor] | None:
        """The longest stored prefix among `keys` ({length: key}) no longer than `within` tokens, as
        (length, row); None when none is stored. When the caller starts from it (`use`), it and the stored
        shorter prefixes of `keys` become the most recently used (the longest last), so a prefix that many
        prompts share stays while it is used (vLLM touches every block of a hit's chain), and a spare row
        that served the hit becomes kept; `use=False` only looks."""
        lengths = sorted(n for n in keys if n <= within)
        hit = next((n for n in reversed(lengths) if keys[n] in self._kept or keys[n] in self._spare), None)
        if hit is None:
            return None
        if not use:
            return hit, self._kept.get(keys[hit], self._spare.get(keys[hit]))
        for n in lengths:
            if n <= hit:
                for rows in (self._kept, self._spare):
                    if keys[n] in rows:
                        rows.move_to_end(keys[n])
        if keys[hit] in self._spare:  # a prefix that two prompts share: kept from now on
            self._kept[keys[hit]] = self._spare.pop(keys[hit])
        return hit, self._kept[keys[hit]]

    def put(self, key: bytes, row: torch.Tensor, keep: bool = True) -> None:
        """Store a copy of `row` under `key` as a kept row (`keep`) or a spare one, or refresh the row
        stored under it as the most recently used (a spare row asked to be kept becomes kept). Beyond the
        capacity the least recently used spare row goes, else (only for a kept row) the least recently
        used kept one; a spare row that would evict a kept one is not stored. Raises ValueError for a row
        of another size than `row_bytes`."""
        if self.capacity == 0:
            return
        if key in self._kept:
            self._kept.move_to_end(key)
            return
        if key in self._spare:
            if keep:
                self._kept[key] = self._spare.pop(key)
            else:
                self._spare.move_to_end(key)
            return
        size = row.numel() * row.element_size()
        if size != self.row_bytes:
            raise ValueError(f"a row of {size} bytes in a cache of {self.row_bytes}-byte rows")
        while self.entries >= self.capacity:
            if self._spare:
                self._spare.popitem(last=False)
            elif keep:
                self._kept.popitem(last=False)
            else:
                return
        (self._kept if keep else self._spare)[key] = row.clone()

    def shrink(self) -> int:
        """After an allocation failed: hold at most the rows held now, less one (at least none), from now
        on, spare rows dropped first, each kind's least recently used first. Returns the new capacity."""
        self.capacity = max(self.entries - 1, 0)
        while self.entries > self.capacity:
            (self._spare if self._spare else self._kept).popitem(last=False)
        return self.capacity
