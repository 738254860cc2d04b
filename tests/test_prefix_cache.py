"""The prefix cache (server/prefix_cache.py): its keys and eviction, the engine starting a new session's
prompt from the longest stored prefix (driven by hand, tests/test_scheduling.py's Driver), and the usage
and metrics the routes report.

The cache restores the state that ingestion computed at a chunk boundary, and the rest of the prompt is
ingested from that boundary as before, so a hit must give the very tokens the same request gets with the
cache off (seeded sampling at temperature 1: any change in the state shows up within a few tokens). The
float64 conv-mode check of chunked ingestion itself is tests/test_scheduling.py's."""

from __future__ import annotations

import collections

import httpx
import pytest
import torch
from conftest import devices
from server_support import (
    CORPUS,
    ServerThread,
    make_audio_model,
    make_text_model,
    metric,
    reference,
    sse_events,
    ws_turn,
)
from test_scheduling import Driver, prompt_of
from test_server_sashimi import make_text_sashimi
from websockets.sync.client import connect

from model import save
from model.sampling import SamplingParams
from server import Settings
from server.__main__ import main as server_main
from server.engine import Job, Stream
from server.prefix_cache import PrefixCache, boundary_keys
from server.sessions import pack_state, unpack_state

CHUNK = 64


# --- keys and the cache alone -------------------------------------------------------------------------


def test_keys_name_every_whole_chunk_and_the_end_and_only_equal_prefixes_share_them():
    p = prompt_of(3 * CHUNK + 5, 1)
    keys = boundary_keys(p, CHUNK)
    assert sorted(keys) == [CHUNK, 2 * CHUNK, 3 * CHUNK, 3 * CHUNK + 5]
    assert sorted(boundary_keys(p[: 2 * CHUNK], CHUNK)) == [CHUNK, 2 * CHUNK]  # the end on a boundary: once
    other = p[: 2 * CHUNK] + prompt_of(CHUNK + 5, 2)  # the same first 2 chunks, then others
    k2 = boundary_keys(other, CHUNK)
    assert k2[CHUNK] == keys[CHUNK] and k2[2 * CHUNK] == keys[2 * CHUNK]
    assert k2[3 * CHUNK] != keys[3 * CHUNK] and k2[3 * CHUNK + 5] != keys[3 * CHUNK + 5]
    changed = list(p)
    changed[0] += 1  # one token early on changes every key after it
    assert all(a != b for a, b in zip(boundary_keys(changed, CHUNK).values(), keys.values()))
    assert boundary_keys([], CHUNK) == {}
    assert boundary_keys([0] * 10, 100)[10] != boundary_keys([0] * 11, 100)[11]
    assert boundary_keys([1, 256], 2)[2] != boundary_keys([256, 1], 2)[2]  # (not a byte per token)
    with pytest.raises(ValueError, match="chunk"):
        boundary_keys(p, 0)


def test_the_cache_keeps_the_most_recently_used_rows_within_its_capacity_and_copies_them():
    row = torch.zeros(1, 8)  # 32 bytes
    cache = PrefixCache(capacity=3, row_bytes=32, chunk=1)
    for i in range(3):
        cache.put(bytes([i]), row + i)
    assert cache.longest({1: b"\x00"}, 1)[1][0, 0] == 0  # 0 used: 1 is now the least recently used
    cache.put(b"\x03", row + 3)
    assert cache.entries == 3 and cache.bytes == 96
    assert cache.longest({1: b"\x01"}, 1) is None
    assert [cache.longest({1: bytes([i])}, 1)[1][0, 0].item() for i in (0, 2, 3)] == [0, 2, 3]
    # the longest stored prefix within the bound
    assert cache.longest({5: b"\x00", 9: b"\x02", 12: b"\x03"}, 11)[0] == 9
    assert cache.longest({5: b"\x07"}, 11) is None
    mine = row + 5
    cache.put(b"\x05", mine)
    mine += 1  # the caller's tensor, reused: the stored row is a copy
    assert cache.longest({1: b"\x05"}, 1)[1][0, 0] == 5
    with pytest.raises(ValueError, match="16 bytes"):
        cache.put(b"\x09", torch.zeros(1, 4))
    nothing = PrefixCache(capacity=0, row_bytes=32, chunk=1)  # keeps nothing
    nothing.put(b"\x00", row)
    assert nothing.entries == 0


def test_keys_are_256_bit_and_the_remembered_keys_take_what_the_docstring_says():
    """A hit compares no tokens, so a key alone names its prefix: BLAKE2b-128 keys left two prompts of one
    key to a birthday search of about 2^64 hashes; keys are now 256 bits. The remembered keys (SEEN_KEYS of
    them, outside S4_PREFIX_CACHE_MB) were said to take 16 bytes each, and took ~137 bytes (8.6 MiB): the
    docstring now says ~150 bytes each, 9.6 MiB in all; measured here within 10%."""
    import tracemalloc

    from server.prefix_cache import SEEN_KEYS

    keys = boundary_keys(prompt_of(3 * CHUNK + 5, 1), CHUNK)
    assert {len(k) for k in keys.values()} == {32}
    cache = PrefixCache(capacity=0, row_bytes=32, chunk=1)
    prompt = prompt_of(SEEN_KEYS + 2, 3)
    tracemalloc.start()
    try:
        for start in range(0, SEEN_KEYS, 4096):  # (4,096 keys a prompt; every key new)
            cache.plan(boundary_keys([start, *prompt[start : start + 4096]], 1))
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(cache._seen) == SEEN_KEYS and cache.bytes == 0  # (none of it in the rows' budget)
    assert held == pytest.approx(9.6 * 2**20, rel=0.1)


def test_a_hit_keeps_the_shorter_prefixes_of_its_prompt_too():
    """A hit refreshes the stored shorter prefixes of the same prompt with it (vLLM touches a hit's whole
    chain), so a prefix that many prompts share is not evicted before rarer longer ones."""
    cache = PrefixCache(capacity=3, row_bytes=32, chunk=1)
    row = torch.zeros(1, 8)
    cache.put(b"short", row)  # the shared first chunk
    cache.put(b"long", row)  # one prompt's 2 chunks
    cache.put(b"other", row)
    assert cache.longest({64: b"short", 128: b"long"}, 128)[0] == 128
    cache.put(b"new", row)  # evicts the least recently used: "other", not "short"
    assert cache.longest({64: b"short"}, 64) is not None and cache.longest({64: b"other"}, 64) is None
    assert cache.shrink() == 2 and cache.entries == 2 and cache.longest({64: b"long"}, 64) is None


def test_a_prompts_plan_keeps_its_end_its_last_whole_chunk_its_junction_and_the_interval_multiples():
    """Of a prompt's prefixes, kept rows are its last whole chunk, the longest prefix an earlier prompt
    also passed (its junction: its whole input, for a prompt seen before), and each multiple of the
    retention interval; its whole input is otherwise spare. All its keys are remembered for later
    junctions, within `seen_keys`, least recently seen out."""
    C = CHUNK
    cache = PrefixCache(capacity=8, row_bytes=32, chunk=C)
    p = prompt_of(10 * C + 5, 1)
    keys = boundary_keys(p, C)
    assert cache.plan(keys) == {10 * C}  # nothing seen before: no junction
    q = p[: 4 * C + 7] + prompt_of(3 * C, 2)  # 4 whole chunks of p, then its own: 7 chunks and 7 tokens
    assert cache.plan(boundary_keys(q, C)) == {4 * C, 7 * C}
    assert cache.plan(keys) == {10 * C, 10 * C + 5}  # p again: its junction is its end
    assert cache.plan(boundary_keys(p[: 3 * C], C)) == {3 * C}  # its end a whole chunk
    assert cache.plan({}) == set() and cache.plan(boundary_keys(p[:5], C)) == set()  # under one chunk
    assert PrefixCache(8, 32, C, interval=4 * C).plan(keys) == {4 * C, 8 * C, 10 * C}
    assert PrefixCache(8, 32, C, interval=C).plan(keys) == set(keys) - {10 * C + 5}  # every chunk
    r = p[:C] + prompt_of(3 * C, 3)
    for seen, want in ((2, {4 * C}), (8, {C, 4 * C})):
        remembering = PrefixCache(capacity=8, row_bytes=32, chunk=C, seen_keys=seen)
        remembering.plan(boundary_keys(p[: C + 5], C))  # p's keys at C and C + 5
        remembering.plan(boundary_keys(prompt_of(2 * C, 4), C))  # 2 keys more: with 2 remembered, p's go
        assert remembering.plan(boundary_keys(r, C)) == want  # the junction at C, if remembered
    for interval in (-C, C // 2):
        with pytest.raises(ValueError, match="interval"):
            PrefixCache(8, 32, C, interval=interval)


def test_spare_rows_go_first_never_evict_a_kept_row_and_become_kept_when_they_serve_a_hit():
    row = torch.zeros(1, 8)  # 32 bytes
    cache = PrefixCache(capacity=3, row_bytes=32, chunk=1)
    cache.put(b"k1", row)
    for i in (1, 2, 3):  # full at the third: the least recently used spare row goes
        cache.put(b"s%d" % i, row + i, keep=False)
    assert (cache.kept, cache.spare) == (1, 2) and cache.longest({1: b"s1"}, 1) is None
    cache.put(b"k2", row)
    cache.put(b"k3", row)  # kept rows evict the spare ones first
    assert (cache.kept, cache.spare) == (3, 0) and cache.longest({1: b"k1"}, 1) is not None
    cache.put(b"s4", row, keep=False)  # a spare row never evicts a kept one: not stored
    assert (cache.kept, cache.spare) == (3, 0) and cache.longest({1: b"s4"}, 1) is None
    cache.put(b"k4", row)  # a kept row evicts the least recently used kept row (k2: k1 was just used)
    assert cache.longest({1: b"k2"}, 1) is None and cache.kept == 3
    c = PrefixCache(capacity=3, row_bytes=32, chunk=1)
    for key in (b"a", b"b", b"c"):
        c.put(key, row, keep=False)
    assert c.longest({1: b"a"}, 1, use=False)[0] == 1 and (c.kept, c.spare) == (0, 3)  # a look only
    c.put(b"d", row, keep=False)  # ... which did not refresh "a": it goes first
    assert c.longest({1: b"a"}, 1) is None
    c = PrefixCache(capacity=3, row_bytes=32, chunk=1)
    for key in (b"a", b"b", b"c"):
        c.put(key, row, keep=False)
    assert c.longest({1: b"a", 2: b"b"}, 2)[0] == 2 and (c.kept, c.spare) == (1, 2)  # the hit's row: kept
    c.put(b"c", row)  # stored again as kept: kept (no copy)
    assert (c.kept, c.spare) == (2, 1)
    assert c.shrink() == 2 and (c.kept, c.spare) == (2, 0)  # spare rows out first
    assert c.shrink() == 1 and c.kept == 1 and c.bytes == 32


# --- the engine --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rec():
    return make_text_model().eval().to_recurrent()


def generation(d: Driver, prompt: list[int], seed: int, n: int = 40, **params):
    """(tokens, Finished, the prefill calls' (rows, length)) of one generation run to its end."""
    job = d.generate(prompt, max_new=n, params=SamplingParams(seed=seed, temperature=1.0, **params))
    start = len(d.events)
    d.until(lambda: d.final(job))
    return d.out(job), d.final(job), [e[1:] for e in d.events[start:] if e[0] == "prefill"]


def driver(rec, **settings) -> Driver:
    return Driver(rec, prefill_chunk_tokens=CHUNK, prefill_token_budget=CHUNK, **settings)


MODELS = {  # name → (the network, the served weights' dtype)
    "isotropic": (make_text_model, None),
    "isotropic-bfloat16": (make_text_model, torch.bfloat16),
    "sashimi": (make_text_sashimi, None),
    "audio": (make_audio_model, None),
}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("model", list(MODELS))
def test_a_prompt_starts_from_its_longest_stored_prefix_with_the_tokens_of_the_cache_off(model, device):
    """A 3-chunk prompt, then: itself (all of it cached: nothing ingested), a prompt sharing its first 2
    chunks (ingested from there), one sharing 1.5 chunks (from the first boundary), one sharing no whole
    chunk (all of it). Each gets the tokens it gets from an engine without a cache, and its usage counts
    the tokens it did not ingest; the metrics count those looked up and those found. Every kind of model
    (a SaShiMi's pooling phase and buffers are in the cached row; an audio model's prompt is samples;
    bfloat16 weights keep a float32 state) and every device."""
    make, dtype = MODELS[model]
    rec = make().eval().to_recurrent(device=device, dtype=dtype)
    p = prompt_of(3 * CHUNK + 10, 1)
    prompts = [p, p, p[: 2 * CHUNK] + prompt_of(20, 2), p[: CHUNK + 32] + prompt_of(40, 3), prompt_of(50, 4)]
    cold = driver(rec, prefix_cache_mb=0)
    assert cold.engine.prefix_cache is None
    want = [generation(cold, q, seed=10 + i) for i, q in enumerate(prompts)]
    cold.close()
    d = driver(rec)
    got = [generation(d, q, seed=10 + i) for i, q in enumerate(prompts)]
    for (w, _, _), (g, _, _) in zip(want, got):
        assert g == w
    cached = [f.cached_tokens for _, f, _ in got]
    assert cached == [0, len(p) - 1, 2 * CHUNK, CHUNK, 0]
    assert [f.prompt_tokens for _, f, _ in got] == [len(q) for q in prompts]
    # what each ingested: from its cached prefix on, in the same fixed chunks
    assert got[0][2] == want[0][2] == [(1, CHUNK)] * 3 + [(1, 9)]
    assert got[1][2] == [] and got[2][2] == [(1, 19)] and got[3][2] == [(1, CHUNK), (1, 7)]
    assert got[4][2] == want[4][2] == [(1, 49)]
    m = d.engine.metrics
    assert m.prefix_cache_queries._value.get() == sum(len(q) - 1 for q in prompts)
    assert m.prefix_cache_hits._value.get() == sum(cached)
    assert m.prefill_tokens._value.get() == sum(len(q) - 1 for q in prompts) - sum(cached)
    d.close()


def test_prompt_logprobs_ingest_the_whole_prompt_and_a_continued_session_looks_nothing_up(rec):
    """A request for the prompt's log-probabilities needs every position's logits: it is ingested whole,
    with the cache's prefixes stored all the same (the next request hits them). A session that already
    holds tokens (a later turn) is not a new prompt: nothing is looked up or stored."""
    d = driver(rec)
    p = prompt_of(2 * CHUNK + 3, 5)
    _, first, calls = generation(d, p, seed=1, prompt_logprobs=2)
    assert first.cached_tokens == 0 and calls == [(1, CHUNK), (1, CHUNK), (1, 2)]
    _, again, calls = generation(d, p, seed=1, prompt_logprobs=2)
    assert again.cached_tokens == 0 and calls == [(1, CHUNK), (1, CHUNK), (1, 2)]
    assert d.engine.metrics.prefix_cache_queries._value.get() == 0  # (not looked up)
    _, hit, calls = generation(d, p, seed=1)
    assert hit.cached_tokens == len(p) - 1 and calls == []
    assert d.engine.metrics.prefix_cache_queries._value.get() == len(p) - 1
    entries = d.engine.prefix_cache.entries
    job = d.generate(p, max_new=3)  # a one-shot session's first turn: a new prompt
    d.until(lambda: d.final(job))
    assert d.final(job).cached_tokens == len(p) - 1
    assert d.engine.prefix_cache.entries == entries
    d.close()


def test_the_cache_stays_within_its_budget_least_recently_used_out(rec):
    """A budget of 2.5 rows holds 2: of three prompts' end states the first is evicted by the third; the
    bytes gauge reports what is held."""
    d = driver(rec, prefix_cache_mb=1)
    row_bytes = d.engine.pool.bytes_per_slot
    d.close()
    mb = 2.5 * row_bytes / (1 << 20)
    d = driver(rec, prefix_cache_mb=mb)
    assert d.engine.prefix_cache.capacity == 2
    prompts = [prompt_of(30, 10 + i) for i in range(3)]  # under one chunk: one key each, the end
    for q in prompts:
        generation(d, q, seed=0, n=2)
    assert d.engine.metrics.prefix_cache_bytes._value.get() == 2 * row_bytes
    assert [generation(d, q, seed=0, n=2)[1].cached_tokens for q in prompts[::-1]] == [29, 29, 0]
    d.close()


def test_a_long_prompt_leaves_other_prompts_kept_rows_and_a_shared_document_is_kept_at_its_junction(rec):
    """A cache of 4 rows. Prompt A (2 chunks and 9 tokens ingested) keeps its last whole chunk; a long
    prompt's 8 chunks go through as spare rows but its last, and evict none of A's kept row, so a prompt
    that shares A's 2 chunks starts from them. With every chunk kept (S4_PREFIX_CACHE_RETENTION_INTERVAL
    = the chunk: least recently used eviction alone) the long prompt evicts them.

    A document of 2 chunks asked three long questions (3 chunks each): the first keeps its 4th chunk and
    leaves the document's chunks spare. With room (the default budget) the second starts from the
    document's spare row; in 3 rows, the first's own rows evicted it, and the second passes the first's
    keys up to the document's end, its junction, and keeps that row: the third starts from it. Every
    prompt's tokens are those of an engine without the cache."""
    C, row_mb = CHUNK, d_row_mb(rec)
    a = prompt_of(2 * C + 10, 1)
    doc = prompt_of(2 * C, 5)
    runs = {  # name → (prompts, {(rows, interval): the cached tokens of each})
        "long": ([a, prompt_of(8 * C + 5, 2), a[: 2 * C] + prompt_of(20, 3)],
                 {(4, 0): [0, 0, 2 * C], (4, C): [0, 0, 0]}),
        "document": ([doc + prompt_of(3 * C, 6 + i) for i in range(3)],
                     {(3, 0): [0, 0, 2 * C], (None, 0): [0, 2 * C, 2 * C]}),
    }  # fmt: skip
    for name, (prompts, expected) in runs.items():
        cold = driver(rec, prefix_cache_mb=0)
        want = [generation(cold, q, seed=i)[0] for i, q in enumerate(prompts)]
        cold.close()
        for (rows, interval), cached in expected.items():
            mb = {} if rows is None else {"prefix_cache_mb": (rows + 0.5) * row_mb}
            d = driver(rec, prefix_cache_retention_interval=interval, **mb)
            assert rows is None or d.engine.prefix_cache.capacity == rows
            got = [generation(d, q, seed=i) for i, q in enumerate(prompts)]
            assert [g[0] for g in got] == want, (name, rows, interval)
            assert [g[1].cached_tokens for g in got] == cached, (name, rows, interval)
            gauges = {k: g._value.get() for k, g in d.engine.metrics.prefix_cache_rows.items()}
            assert gauges == {"kept": d.engine.prefix_cache.kept, "spare": d.engine.prefix_cache.spare}
            d.close()


@pytest.mark.parametrize("model", list(MODELS))
def test_prompts_admitted_together_ingest_their_common_prefix_once(model):
    """New sessions' prompts admitted at once: the first ingests its input; the same input again (OpenAI's
    n and best_of), and prompts that share its first chunks (questions after one document sent at once),
    follow it (or a prompt that follows it, when that one shares more): they ingest nothing until it has
    stored its state at their longest common keyed prefix, then start from there, counted as cached.
    Each gets the tokens it gets from an engine without the cache. One that asks for its prompt's
    log-probabilities (which need every position's logits) ingests its own. Every kind of model (a
    SaShiMi's row holds its pooling phase and buffers; bfloat16 weights; an audio model's input is
    samples)."""
    make, dtype = MODELS[model]
    rec = make().eval().to_recurrent(dtype=dtype)
    p = prompt_of(3 * CHUNK + 10, 1)
    longer, forked = p + prompt_of(5, 2), p[: 2 * CHUNK] + prompt_of(30, 3)
    specs = [
        (p, 1, {}),
        (p, 2, {}),
        (p, 3, {}),
        (longer, 4, {}),
        (p, 5, {"prompt_logprobs": 1}),
        (forked, 6, {}),
        (forked, 7, {}),  # follows the one before, itself a follower, to its whole input
    ]
    cold = driver(rec, prefix_cache_mb=0)
    want = [generation(cold, q, seed, n=20, **kw)[0] for q, seed, kw in specs]
    cold.close()
    assert len({tuple(w) for w in want}) == len(want)  # (distinct seeds: distinct samples)
    d = driver(rec)
    jobs = [d.generate(q, max_new=20, params=SamplingParams(seed=seed, temperature=1.0, **kw))
            for q, seed, kw in specs]  # fmt: skip
    d.tick()  # admitted together
    n = len(p) - 1
    lead = jobs[0]
    f = len(forked) - 1
    assert [j.following for j in jobs] == [None, lead, lead, lead, None, lead, jobs[5]]
    assert [j.follow_to for j in jobs] == [0, n, n, 3 * CHUNK, 0, 2 * CHUNK, f]
    assert {2 * CHUNK, 3 * CHUNK, n} <= lead.prefix_keep  # (stored as kept rows)
    d.until(lambda: all(d.final(j) for j in jobs))
    assert [d.out(j) for j in jobs] == want
    cached = [0, n, n, 3 * CHUNK, 0, 2 * CHUNK, f]
    assert [d.final(j).cached_tokens for j in jobs] == cached
    m = d.engine.metrics
    # p twice (once with its log-probabilities), then what `longer` and `forked` (once) add
    assert m.prefill_tokens._value.get() == 2 * n + (len(longer) - 1 - 3 * CHUNK) + (
        len(forked) - 1 - 2 * CHUNK
    )
    assert m.prefix_cache_hits._value.get() == sum(cached)
    assert all(j.following is None for j in jobs)
    d.close()


def test_a_prompt_that_arrives_mid_document_follows_without_keeping_the_row_it_passes(rec):
    """B arrives while A, the same document (4 chunks) with another question, has ingested 2 chunks: B's
    longest stored prefix is A's spare row after 2 chunks, but A shares more with it, so B follows A to
    the document's end and starts there. The row it only looked at stays spare: the cache keeps one row
    (the document's end: A's last whole chunk, B's junction), not the row after 2 chunks too (a fresh
    user's trial counted such extra kept rows). Both get the tokens of an engine without the cache."""
    doc = prompt_of(4 * CHUNK, 8)
    a, b = doc + prompt_of(20, 9), doc + prompt_of(20, 10)
    cold = driver(rec, prefix_cache_mb=0)
    want = [generation(cold, q, seed=s, n=10)[0] for q, s in ((a, 1), (b, 2))]
    cold.close()
    d = driver(rec)
    ja = d.generate(a, 10, SamplingParams(seed=1, temperature=1.0))
    d.tick(2)
    assert ja.offset == 2 * CHUNK and (d.engine.prefix_cache.kept, d.engine.prefix_cache.spare) == (0, 2)
    jb = d.generate(b, 10, SamplingParams(seed=2, temperature=1.0))
    d.tick()
    assert jb.following is ja and jb.follow_to == 4 * CHUNK and jb.offset == 0
    d.until(lambda: d.final(ja) and d.final(jb))
    assert [d.out(ja), d.out(jb)] == want
    assert [d.final(ja).cached_tokens, d.final(jb).cached_tokens] == [0, 4 * CHUNK]
    cache = d.engine.prefix_cache
    assert (cache.kept, cache.spare) == (1, 5)  # spare: 1, 2 and 3 chunks, both ends
    assert d.engine.metrics.prefix_cache_hits._value.get() == 4 * CHUNK
    d.close()


def test_sessions_created_with_one_prompt_at_once_follow_and_hold_the_state_of_one_created_alone(rec):
    """POST /v1/sessions with a prompt is an ingest-only job: two created at once with a generation of
    the same prompt follow it, and each session then holds bit for bit the state a session created
    alone on an engine without the cache holds (and the same `seen` tokens and pending token)."""
    p = prompt_of(2 * CHUNK + 20, 7)
    cold = driver(rec, prefix_cache_mb=0)
    done, alone = cold.create(p)
    cold.until(done.done)
    pool = cold.engine.pool
    want = (pool.row(alone.slot).clone(), pool.seen[alone.slot].clone(), alone.pending)
    cold.close()
    d = driver(rec)
    lead = d.generate(p, 5, SamplingParams(seed=1, temperature=1.0))
    created = [d.create(p) for _ in range(2)]
    d.until(lambda: all(f.done() for f, _ in created) and d.final(lead))
    for _, r in created:
        assert torch.equal(d.engine.pool.row(r.slot), want[0])
        assert torch.equal(d.engine.pool.seen[r.slot], want[1])
        assert (r.pending, r.n_tokens) == (want[2], len(p))
    assert d.engine.metrics.prefill_tokens._value.get() == len(p) - 1  # the generation's ingestion alone
    d.close()


def test_a_follower_whose_leader_is_taken_back_after_its_prompt_goes_on(rec):
    """The leader is a kept session's turn (a WebSocket's first); the follower, a one-shot of the same
    prompt, waits for it. The leader ingests its last chunk, and its client goes away before the follower
    looks again: the turn ends, and its rollback sets its offset to 0 (the tokens to step again) without
    `undone`. The follower waited for `offset >= follow_to` or `undone`, so it waited forever, and the
    engine spun (the stuck job kept it awake, one decode step per block: a helper's audit measured 1 core
    busy on an idle server and decode 3× slower). Now a leader that has ended releases its followers: this
    one starts from the leader's stored state and gets the tokens of an engine without the cache."""
    p = prompt_of(2 * CHUNK + 10, 4)
    cold = driver(rec, prefix_cache_mb=0)
    want = generation(cold, p, seed=2, n=12)[0]
    cold.close()
    d = driver(rec)
    kept = d.engine.new_session("kept", ephemeral=False)
    lead = d.submit(Job(kept, list(p), fresh=True, stream=Stream(d.loop, d.settings.stream_buffer),
                        params=SamplingParams(seed=1, temperature=1.0), max_new_tokens=4000))  # fmt: skip
    follower = d.generate(p, 12, SamplingParams(seed=2, temperature=1.0))
    d.paused.append(lead)  # (its client reads nothing)
    ingested = d.engine._ingested

    def client_leaves(job):  # right as the leader's prompt is in, within the engine's iteration
        ingested(job)
        if job is lead:
            lead.stream.cancel()

    d.engine._ingested = client_leaves
    d.tick()
    assert follower.following is lead
    d.until(lambda: lead.stream.cancelled)  # its whole prompt is in, then its decode ended it
    assert follower.following is lead
    lead.stream.settle()  # handed nothing: the turn is taken back (before the follower looks again)
    d.until(lambda: d.final(follower), limit=60)
    assert d.out(follower) == want and d.final(follower).cached_tokens == len(p) - 1
    d.until(lambda: not d.engine._prefilling and not d.engine._running, limit=60)
    d.close()


def test_a_cancelled_follower_ends_alone_and_a_cancelled_leaders_follower_goes_on_from_its_chunks(rec):
    """Three samples of one prompt: the first ingests it, two follow. One follower's client goes away:
    it ends "cancelled" while it waits. Then the leader's client goes away after 2 chunks: the follower
    left starts from the state the leader stored after them and ingests the rest itself, and its tokens
    are those of an engine without the cache."""
    p = prompt_of(4 * CHUNK + 10, 3)
    cold = driver(rec, prefix_cache_mb=0)
    want = generation(cold, p, seed=2, n=20)[0]
    cold.close()
    d = driver(rec)
    lead, f1, f2 = (d.generate(p, 20, SamplingParams(seed=s, temperature=1.0)) for s in (1, 2, 3))
    d.tick()
    assert f1.following is lead and f2.following is lead and lead.offset == CHUNK
    f2.stream.cancel()
    d.tick()
    assert d.final(f2).finish_reason == "cancelled" and lead.offset == 2 * CHUNK and f1.offset == 0
    lead.stream.cancel()
    d.until(lambda: d.final(f1) and d.final(lead))
    assert d.final(lead).finish_reason == "cancelled" and d.final(f1).finish_reason == "length"
    assert d.out(f1) == want and d.final(f1).cached_tokens == 2 * CHUNK
    assert d.engine.pool.in_use == 0  # every one-shot slot back
    d.close()


@pytest.mark.parametrize("scenario", range(4))
def test_random_arrivals_cancels_and_shared_prefixes_give_the_tokens_of_the_cache_off(rec, scenario):
    """Randomized, with a fixed seed per scenario: prompts drawn from 3 documents (a document, a document and
    a suffix, an earlier prompt again) arrive a few an engine iteration, in a cache of 3 to 6 rows (every
    chunk kept or not), and some clients go away at random moments. Each request that ends "length" has
    the tokens its prompt and seed get alone from an engine without the cache; every request ends; then no
    slot is in use, no job waits on another, nothing is left to ingest and the cache is within its
    capacity, its counters consistent with the usage reported."""
    gen = torch.Generator().manual_seed(100 + scenario)

    def rand(lo: int, hi: int) -> int:  # [lo, hi]
        return int(torch.randint(lo, hi + 1, (), generator=gen))

    docs = [prompt_of(rand(CHUNK, 4 * CHUNK), 200 + 10 * scenario + k) for k in range(3)]
    rows, interval = rand(3, 6), [0, CHUNK][scenario % 2]
    d = driver(rec, prefix_cache_mb=(rows + 0.5) * d_row_mb(rec), prefix_cache_retention_interval=interval)
    cold = driver(rec, prefix_cache_mb=0)
    want: dict[tuple, list[int]] = {}
    sent: list[tuple[Job, list[int], int]] = []
    for tick in range(60):
        for _ in range(rand(0, 3) if tick < 40 else 0):
            kind = rand(0, 2)
            if kind == 2 and sent:
                prompt = sent[rand(0, len(sent) - 1)][1]  # an earlier prompt again
            else:
                prompt = docs[rand(0, 2)] + (prompt_of(rand(1, 2 * CHUNK), rand(0, 10**6)) if kind else [])
            seed = rand(0, 3)
            job = d.generate(prompt, max_new=6, params=SamplingParams(seed=seed, temperature=1.0))
            sent.append((job, prompt, seed))
        live = [j for j, _, _ in sent if d.final(j) is None and not j.cancelled]
        if live and rand(0, 5) == 0:
            live[rand(0, len(live) - 1)].stream.cancel()
        d.tick()
    d.until(lambda: all(d.final(j) for j, _, _ in sent))
    ended = collections.Counter(d.final(j).finish_reason for j, _, _ in sent)
    assert set(ended) <= {"length", "cancelled"} and ended["length"] >= len(sent) // 2, ended
    for job, prompt, seed in sent:
        if d.final(job).finish_reason == "length":
            if (tuple(prompt), seed) not in want:
                want[tuple(prompt), seed] = generation(cold, prompt, seed, n=6)[0]
            assert d.out(job) == want[tuple(prompt), seed]
    cache, eng = d.engine.prefix_cache, d.engine
    assert d.engine.pool.in_use == 0 and not eng._prefilling and all(j.following is None for j, _, _ in sent)
    assert cache.capacity == rows and cache.entries <= rows and cache.bytes == cache.entries * cache.row_bytes
    hits = eng.metrics.prefix_cache_hits._value.get()
    assert hits >= sum(d.final(j).cached_tokens for j, _, _ in sent if d.final(j).finish_reason == "length")
    assert eng.metrics.prefix_cache_queries._value.get() <= sum(len(p) - 1 for _, p, _ in sent)
    cold.close()
    d.close()


def session_turns(d: Driver, first: list[int], turn: list[int], seed: int) -> tuple[list[int], int]:
    """A kept session created with `first` (an ingest-only job, as POST /v1/sessions), then a generation
    turn with `turn` on it: (the turn's tokens, its cached tokens)."""
    created, rec = d.create(first)
    d.until(created.done)
    rec = d.engine.sessions.claim(rec.id)
    job = d.submit(Job(rec, list(turn), stream=Stream(d.loop, d.settings.stream_buffer),
                       params=SamplingParams(seed=seed, temperature=1.0), max_new_tokens=20))  # fmt: skip
    d.until(lambda: d.final(job))
    return d.out(job), d.final(job).cached_tokens


def test_a_later_turn_of_a_session_is_not_a_prompt_and_looks_nothing_up(rec):
    """A one-shot prompt P stores the state after P's first tokens. A kept session's later turn feeds the
    session's pending token and the turn's tokens, which can be exactly those tokens, but after the
    session's history: it must not start from P's state. Its tokens are those of a cache-off engine,
    and nothing is counted as cached; the session's first prompt does start from the cache."""
    first = prompt_of(2 * CHUNK + 7, 20)
    turn = prompt_of(CHUNK + 9, 21)
    p = [first[-1]] + turn  # ingested as P[:-1] = [first's last token] + turn[:-1]: the turn's very tokens
    cold = driver(rec, prefix_cache_mb=0)
    want = session_turns(cold, first, turn, seed=4)
    cold.close()
    d = driver(rec)
    generation(d, p, seed=0, n=2)
    generation(d, first, seed=0, n=2)
    hits = d.engine.metrics.prefix_cache_hits._value.get()
    got = session_turns(d, first, turn, seed=4)
    assert got == (want[0], 0)
    # the session's creation started from `first`'s whole prompt; its turn looked nothing up
    assert d.engine.metrics.prefix_cache_hits._value.get() - hits == len(first) - 1
    d.close()


# --- through the server ------------------------------------------------------------------------------


def test_the_routes_report_cached_tokens_and_the_tokens_do_not_change(tmp_path):
    """/v1/generate (JSON and SSE) and the OpenAI completions (n = 2: the fewest cached among a prompt's
    samples) report usage.prompt_tokens_details.cached_tokens; a request's tokens are those of the
    library's one-shot generation whether its prefix came from the cache or not; the metrics count the
    cached tokens; a session created with a prompt starts from the cache, and so does the first turn of
    one created empty (a WebSocket's), not its next."""
    torch.manual_seed(0)
    d = tmp_path / "tiny-text"
    save(make_text_model(), d)
    settings = Settings(checkpoints=[str(d)], prefill_chunk_tokens=CHUNK, prefill_token_budget=CHUNK)
    srv = ServerThread(settings).start()
    doc = (CORPUS * 4)[: 2 * CHUNK + 30]
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:

            def gen(prompt: str, seed: int, stream: bool = False) -> tuple[list[int], dict]:
                body = {"model": "tiny-text", "prompt": prompt, "max_new_tokens": 12, "seed": seed,
                        "temperature": 1.0, "stream": stream}  # fmt: skip
                if not stream:
                    r = c.post("/v1/generate", json=body)
                    assert r.status_code == 200, r.text
                    return r.json()["tokens"], r.json()["usage"]
                with c.stream("POST", "/v1/generate", json=body) as r:
                    events = sse_events(r)
                return [t for e in events if e["type"] == "token" for t in e["ids"]], events[-1]["usage"]

            hits0 = metric(c, "s4_prefix_cache_hit_tokens_total", "tiny-text")
            first, u1 = gen(doc + " Q1?", 1)
            again, u2 = gen(doc + " Q2?", 2, stream=True)
            for prompt, seed, toks in ((doc + " Q1?", 1, first), (doc + " Q2?", 2, again)):
                assert toks == reference(
                    d, list(prompt.encode()), SamplingParams(seed=seed, temperature=1.0), 12
                )
            assert u1["prompt_tokens_details"] == {"cached_tokens": 0}
            assert u2["prompt_tokens_details"] == {"cached_tokens": 2 * CHUNK}
            r = c.post("/v1/completions", json={"model": "tiny-text", "prompt": doc + " Q3?", "max_tokens": 4,
                                                "n": 2, "seed": 3})  # fmt: skip
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 2 * CHUNK}
            s = c.post("/v1/sessions", json={"model": "tiny-text", "prompt": doc + " Q1?"})
            assert s.status_code == 201, s.text
            got_usage = s.json()["usage"]
            assert got_usage == {
                "prompt_tokens": len(doc) + 4,
                "prompt_tokens_details": {"cached_tokens": len(doc) + 3},
            }
            assert "usage" not in c.get(f"/v1/sessions/{s.json()['session_id']}").json()  # (info alone)
            # an HTTP append: the first input of a session created empty looks up; the next does not
            empty = c.post("/v1/sessions", json={"model": "tiny-text"})
            nothing = {"prompt_tokens": 0, "prompt_tokens_details": {"cached_tokens": 0}}
            assert empty.json()["usage"] == nothing
            url = f"/v1/sessions/{empty.json()['session_id']}/append"
            for cached in (2 * CHUNK, 0):
                a = c.post(url, json={"prompt": doc + " Q6?"})
                assert a.status_code == 200, a.text
                assert a.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": cached}
            # a session created empty (as a WebSocket's is): its first turn is a prompt from the start
            sid = c.post("/v1/sessions", json={"model": "tiny-text"}).json()["session_id"]
            body = {"model": "tiny-text", "session_id": sid, "prompt": doc + " Q4?", "max_new_tokens": 5,
                    "seed": 4, "temperature": 1.0}  # fmt: skip
            r = c.post("/v1/generate", json=body).json()
            params = SamplingParams(seed=4, temperature=1.0)
            assert r["tokens"] == reference(d, list((doc + " Q4?").encode()), params, 5)
            assert r["usage"]["prompt_tokens_details"] == {"cached_tokens": 2 * CHUNK}
            # a WebSocket whose first message is an append: its session is empty, its prompt a new one
            with connect(srv.ws_url) as ws:
                frames = ws_turn(ws, {"type": "append", "model": "tiny-text", "prompt": doc + " Q5?"})
            assert frames[-1]["type"] == "appended", frames
            assert frames[-1]["usage"] == {"prompt_tokens": len(doc) + 4,
                                           "prompt_tokens_details": {"cached_tokens": 2 * CHUNK}}  # fmt: skip
            # its next turn has a history: nothing looked up
            body = {**body, "prompt": doc}
            usage = c.post("/v1/generate", json=body).json()["usage"]
            assert usage["prompt_tokens_details"]["cached_tokens"] == 0
            # Q2's 2 chunks, the session's whole prompt (Q1's, all but its last token), Q6's, Q4's and Q5's 2
            # chunks (the empty sessions' first inputs) and Q3's 2 samples: the first's 2 chunks, the
            # second's whole prompt (it follows the first, or finds its end stored; the usage counts the
            # fewer)
            hits = metric(c, "s4_prefix_cache_hit_tokens_total", "tiny-text") - hits0
            base = 2 * CHUNK + (len(doc) + 3) + 2 * CHUNK + 2 * CHUNK + 2 * CHUNK + 2 * CHUNK
            assert hits == base + len(doc) + 3, hits
            rows = {line.split('kind="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                    for line in c.get("/metrics").text.splitlines()
                    if line.startswith("s4_prefix_cache_rows{") and 'model="tiny-text"' in line}  # fmt: skip
            assert set(rows) == {"kept", "spare"} and rows["kept"] >= 1 and rows["spare"] >= 1, rows
            row_bytes = metric(c, "s4_prefix_cache_bytes", "tiny-text") / (rows["kept"] + rows["spare"])
            assert row_bytes == int(row_bytes) and row_bytes > 0
    finally:
        srv.stop()


@pytest.mark.parametrize("value", ["-1", "nan", "inf", str((1 << 20) + 1), "lots"])
def test_a_prefix_cache_size_out_of_range_is_refused_by_name(value, monkeypatch, capsys):
    with pytest.raises(ValueError, match="prefix_cache_mb"):
        Settings(prefix_cache_mb=value)
    monkeypatch.setenv("S4_PREFIX_CACHE_MB", value)
    with pytest.raises(SystemExit, match="invalid settings: .*PREFIX_CACHE_MB"):
        server_main([])
    monkeypatch.delenv("S4_PREFIX_CACHE_MB")
    with pytest.raises(SystemExit) as refused:  # (argparse refuses a flag that is no number: on stderr)
        server_main(["--prefix-cache-mb", value])
    assert "PREFIX_CACHE_MB" in str(refused.value) or "--prefix-cache-mb" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "100", "lots", "1.5"])
def test_a_retention_interval_that_is_no_whole_number_of_chunks_is_refused_by_name(value, monkeypatch):
    with pytest.raises(ValueError, match="prefix_cache_retention_interval|PREFIX_CACHE_RETENTION_INTERVAL"):
        Settings(prefix_cache_retention_interval=value)
    monkeypatch.setenv("S4_PREFIX_CACHE_RETENTION_INTERVAL", value)
    with pytest.raises(SystemExit) as refused:  # the variable and its flag, without pydantic's prefix
        server_main([])
    message = str(refused.value)
    assert "settings: S4_PREFIX_CACHE_RETENTION_INTERVAL (--prefix-cache-retention-interval)" in message
    assert "Value error" not in message
    ok = Settings(prefix_cache_retention_interval=512, prefill_chunk_tokens=128)
    assert ok.prefix_cache_retention_interval == 512
    with pytest.raises(ValueError, match=r"interval\) = 512 must be a multiple of S4_PREFILL_CHUNK_TOKENS"):
        Settings(prefix_cache_retention_interval=512, prefill_chunk_tokens=96, prefill_token_budget=96)


def test_an_imported_state_that_counts_no_tokens_is_not_taken_for_a_new_session(tmp_path):
    """A session imported with `n_tokens` 0 and no pending token, but a state that is not the initial one
    (an export whose header was edited; the import checks the state's range, not its history): its first
    turn must start from that state, not from a stored prefix. Its tokens are those a server without the
    cache gives for the same import and turn."""
    torch.manual_seed(0)
    d = tmp_path / "tiny-text"
    save(make_text_model(), d)
    doc = (CORPUS * 4)[: 2 * CHUNK + 30]
    got = []
    for mb in (64, 0):
        settings = Settings(checkpoints=[str(d)], prefill_chunk_tokens=CHUNK, prefill_token_budget=CHUNK,
                            prefix_cache_mb=mb)  # fmt: skip
        srv = ServerThread(settings).start()
        try:
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                if mb:  # prefixes of the turn's prompt stored
                    assert (
                        c.post(
                            "/v1/generate", json={"model": "tiny-text", "prompt": doc + " Q0?"}
                        ).status_code
                        == 200
                    )
                sid = c.post("/v1/sessions", json={"model": "tiny-text", "prompt": CORPUS}).json()[
                    "session_id"
                ]
                header, raw = unpack_state(c.get(f"/v1/sessions/{sid}/export").content)
                header.update(n_tokens=0, pending=None)
                r = c.post("/v1/sessions/import", content=pack_state(header, raw))
                assert r.status_code == 201, r.text
                body = {"model": "tiny-text", "session_id": r.json()["session_id"], "prompt": doc + " Q1?",
                        "max_new_tokens": 12, "seed": 1, "temperature": 1.0}  # fmt: skip
                r = c.post("/v1/generate", json=body).json()
                got.append((r["tokens"], r["usage"]["prompt_tokens_details"]["cached_tokens"]))
        finally:
            srv.stop()
    assert got[0] == got[1] and got[0][1] == 0


def test_the_cache_budget_is_checked_at_load_beside_the_pool_and_a_budget_under_one_row_is_off(
    rec, model_dirs, monkeypatch, caplog
):
    """S4_PREFIX_CACHE_MB counts in the memory check made before the pool is allocated (its rows are
    allocated as prompts are ingested: an allocator error there would stop the engine), naming the setting
    as it was set when the pool fits without it; the model's start-up line says how many rows the cache
    holds, or that it is off; a budget under one state row keeps nothing, so the cache is off."""
    from server import registry
    from server.metrics import Metrics
    from server.registry import load_models
    from server.sessions import SessionTable

    free = 50 << 20  # 50 MiB available
    monkeypatch.setattr(registry, "available_memory", lambda device: free)
    settings = Settings(checkpoints=[str(model_dirs["text"])], max_sessions=4, prefix_cache_mb=1048575.5)
    models, failed = load_models(settings, SessionTable(), Metrics())
    (why,) = failed.values()
    assert not models and why.startswith(
        "ValueError: S4_PREFIX_CACHE_MB=1048575.5: model tiny-text's prefix cache "
    )
    assert "MiB fit beside the pool" in why
    for mb in (32, 0):
        settings = Settings(checkpoints=[str(model_dirs["text"])], max_sessions=4, prefix_cache_mb=mb)
        with caplog.at_level("INFO", logger="server.models"):
            models, failed = load_models(settings, SessionTable(), Metrics())
        cache = models["tiny-text"].engine.prefix_cache
        assert not failed and (cache.capacity == 32 * 2**20 // models["tiny-text"].engine.pool.bytes_per_slot
                               if mb else cache is None)  # fmt: skip
        assert f"slots, prefix cache {f'{cache.capacity} rows' if mb else 'off'}; ready in" in caplog.text
    settings = Settings(checkpoints=[str(model_dirs["text"])], max_sessions=4, prefix_cache_mb=32,
                        prefill_chunk_tokens=128, prefix_cache_retention_interval=1024)  # fmt: skip
    with caplog.at_level("INFO", logger="server.models"):
        models, failed = load_models(settings, SessionTable(), Metrics())
    rows = models["tiny-text"].engine.prefix_cache.capacity
    assert f"prefix cache {rows} rows, a row kept every 1024 tokens; ready in" in caplog.text
    d = driver(rec, prefix_cache_mb=d_row_mb(rec) * 0.9)
    assert d.engine.prefix_cache is None
    generation(d, prompt_of(2 * CHUNK + 3, 1), seed=0, n=2)
    assert d.engine.metrics.prefix_cache_queries._value.get() == 0
    d.close()


def test_the_memory_check_counts_the_prefix_caches_of_the_models_loaded_before(model_dirs, monkeypatch):
    """Two models on one device: each one's pool is allocated as it loads, its prefix cache's rows only as
    prompts come. The check before the second model's pool counted the memory available then, in which the
    first model's cache budget (not yet allocated) still looked free: both loaded where the two pools and
    caches did not fit, and the caches then took memory the check had promised the second. Now the check
    counts what the caches of the models loaded before may still take: in room for the two pools and one
    and a half caches the second model is refused, naming S4_PREFIX_CACHE_MB; in room for both, both load."""
    from server import registry
    from server.metrics import Metrics
    from server.registry import load_models
    from server.sessions import SessionTable

    taken: list[int] = []  # bytes of each pool allocated (each engine's: its states and seen sets)

    class Counted(registry.Engine):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            taken.append(self.pool.state.nbytes + self.pool.seen.nbytes)

    monkeypatch.setattr(registry, "Engine", Counted)
    text = model_dirs["text"]
    settings = Settings(checkpoints=[f"a={text}", f"b={text}"], max_sessions=4, prefix_cache_mb=1)
    monkeypatch.setattr(registry, "available_memory", lambda device: (1 << 40) - sum(taken))
    models, failed = load_models(settings, SessionTable(), Metrics())
    assert not failed and set(models) == {"a", "b"}
    pool, cache = taken[0], models["a"].engine.prefix_cache
    budget = cache.capacity * cache.row_bytes
    assert budget > 0 and taken == [pool, pool]
    for room, served in ((2 * pool + 2 * budget, {"a", "b"}), (2 * pool + budget + budget // 2, {"a"})):
        taken.clear()
        monkeypatch.setattr(registry, "available_memory", lambda device, room=room: room - sum(taken))
        models, failed = load_models(settings, SessionTable(), Metrics())
        assert set(models) == served, failed
        if served == {"a"}:
            assert failed["b"].startswith("ValueError: S4_PREFIX_CACHE_MB=1: model b's prefix cache "), failed
            assert f"the prefix caches of the models loaded before ({budget:,} bytes)" in failed["b"]


def d_row_mb(rec) -> float:
    d = driver(rec)
    row = d.engine.pool.bytes_per_slot
    d.close()
    return row / (1 << 20)


def test_an_allocation_that_fails_shrinks_the_cache_and_the_engine_goes_on(rec, monkeypatch, caplog):
    """A state row the cache cannot allocate (the device full) is not stored: the cache keeps one row
    fewer than it held from then on, a warning says so, and the request is served as without it."""
    d = driver(rec)
    cache = d.engine.prefix_cache
    generation(d, prompt_of(CHUNK + 3, 1), seed=0, n=2)  # 2 rows: the chunk and the end
    assert cache.entries == 2
    put = cache.put

    def full(key, row, keep=True):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 256.00 KiB")

    monkeypatch.setattr(cache, "put", full)
    p = prompt_of(CHUNK - 10, 2)  # one key: its end
    with caplog.at_level("WARNING", logger="server.engine"):
        toks, final, _ = generation(d, p, seed=3)
    assert final.finish_reason == "length" and cache.capacity == 1 and cache.entries == 1
    assert "out of memory for the prefix cache: it keeps 1 rows" in caplog.text
    cold = driver(rec, prefix_cache_mb=0)
    assert toks == generation(cold, p, seed=3)[0]
    cold.close()
    monkeypatch.setattr(cache, "put", put)
    generation(d, prompt_of(CHUNK + 7, 3), seed=0, n=2)
    assert cache.entries == 1  # (within its new capacity)
    d.close()
