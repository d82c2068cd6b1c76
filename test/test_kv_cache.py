"""The static KV arena: rows loaded once, one column written per step, old views never changed."""
from __future__ import annotations

import gc

import numpy as np
import pytest

from kosmos2_ros.core.backends.base import BackendError
from kosmos2_ros.core.backends.kv_cache import (
    CAPACITY_STEP,
    HEADROOM,
    NUMPY,
    ArenaPool,
    KVCache,
    appended,
    capacity_for,
    packed_past,
    standalone,
    truncated,
)

N, H, HD = 4, 2, 3     # arrays (2 layers x key/value), heads, head dim
PAD = 1


def _cache(length: int, seed: int) -> KVCache:
    rng = np.random.RandomState(seed)
    return KVCache(length, [rng.randn(1, H, length, HD).astype(np.float32) for _ in range(N)])


def _step(pool: ArenaPool, caches, tokens, seed):
    """One decode step with known new keys/values: (new caches, what each row should hold)."""
    arena, rows = pool.arena_for(caches)
    feeds = arena.step_feeds(rows, tokens, PAD)
    new = [np.random.RandomState(seed + j).randn(arena.rows, H, 1, HD).astype(np.float32) for j in range(N)]
    arena.write_host(feeds, new)
    out = arena.advance(feeds)
    expect = [[np.concatenate([c.layer(j), new[j][r.row:r.row + 1]], axis=2) for j in range(N)]
              for c, r in zip(rows, out)]
    return out, expect, feeds


def _holds(cache: KVCache, arrays) -> None:
    assert cache.length == arrays[0].shape[2]
    for j in range(N):
        np.testing.assert_array_equal(cache.layer(j), arrays[j])


def test_capacity_is_bucketed_with_headroom_and_limited():
    assert capacity_for(10, 4096) == CAPACITY_STEP
    assert capacity_for(CAPACITY_STEP - HEADROOM + 1, 4096) == 2 * CAPACITY_STEP
    assert capacity_for(1000, 1010) == 1010
    with pytest.raises(BackendError, match="exceeds"):
        capacity_for(1010, 1010)


def test_steps_write_one_column_in_place_and_feeds_mask_each_row():
    pool = ArenaPool(NUMPY, N, H, HD, limit=4096)
    caches = [_cache(5, 0), _cache(9, 1)]
    rows, expect, feeds = _step(pool, caches, [7, 8], seed=10)
    arena = rows[0].arena
    assert arena.key == (2, CAPACITY_STEP)
    # Row 0: five past tokens attended, then itself; position counts on from the past.
    assert feeds.attention_mask[0, :5].all() and not feeds.attention_mask[0, 5:-1].any() and feeds.attention_mask[0, -1]
    assert feeds.position_ids[:, 0].tolist() == [5 + PAD + 1, 9 + PAD + 1]
    assert feeds.columns.tolist() == [5, 9]
    for r, e in zip(rows, expect):
        _holds(r, e)
    kv_before = arena.kv
    rows2, expect2, _ = _step(pool, rows, [3, 4], seed=20)
    assert rows2[0].arena is arena and arena.kv is kv_before      # no reload, no new allocation
    for r, e in zip(rows2, expect2):
        _holds(r, e)
    # The prefill-side caches were never touched.
    _holds(caches[0], _cache(5, 0).kv)


def test_finished_rows_idle_on_the_scratch_column():
    pool = ArenaPool(NUMPY, N, H, HD, limit=4096)
    rows, _, _ = _step(pool, [_cache(5, 0), _cache(6, 1), _cache(7, 2)], [1, 2, 3], seed=0)
    snapshot = rows[0].arena.kv.copy()
    only, expect, feeds = _step(pool, [rows[1]], [4], seed=5)
    assert only[0].arena is rows[1].arena and only[0].row == 1
    assert feeds.active == [1] and feeds.columns.tolist() == [CAPACITY_STEP, 7, CAPACITY_STEP]
    _holds(only[0], expect[0])
    after = rows[0].arena.kv
    np.testing.assert_array_equal(after[:, 0], snapshot[:, 0])   # idle rows unchanged
    np.testing.assert_array_equal(after[:, 2], snapshot[:, 2])


def test_reused_arena_gives_old_views_their_own_copy():
    pool = ArenaPool(NUMPY, N, H, HD, limit=4096)
    first, expect, _ = _step(pool, [_cache(5, 0)], [1], seed=0)
    held, arena = first[0], first[0].arena              # still referenced: must keep its tokens
    second, _, _ = _step(pool, [_cache(5, 7)], [2], seed=3)   # same shape: the same arena, reloaded
    assert second[0].arena is arena
    assert held.kv is not None and held.arena is None
    _holds(held, expect[0])


def test_growing_past_capacity_moves_rows_to_a_larger_arena():
    pool = ArenaPool(NUMPY, N, H, HD, limit=4096)
    rows = [_cache(CAPACITY_STEP - HEADROOM - 1, 0)]
    history = [rows[0].layer(j) for j in range(N)]
    arenas = set()
    for i in range(HEADROOM + 3):
        rows, expect, _ = _step(pool, rows, [5], seed=100 + i)
        arenas.add(rows[0].arena.capacity)
        history = expect[0]
    assert arenas == {CAPACITY_STEP, 2 * CAPACITY_STEP}
    _holds(rows[0], history)


def test_stale_columns_are_cleared_on_reload():
    pool = ArenaPool(NUMPY, N, H, HD, limit=4096)
    rows, _, _ = _step(pool, [_cache(20, 0)], [1], seed=0)
    arena = rows[0].arena
    arena.kv[:, 0, :, 15:21] = np.inf                  # as if an earlier row had overflowed
    del rows
    gc.collect()
    rows, _, _ = _step(pool, [_cache(10, 1)], [1], seed=1)
    assert rows[0].arena is arena
    assert np.isfinite(arena.kv[:, 0, :, 11:arena.capacity]).all()


def test_fork_truncate_and_packing_helpers():
    pool = ArenaPool(NUMPY, N, H, HD, limit=4096)
    rows, expect, _ = _step(pool, [_cache(4, 0)], [1], seed=0)
    fork = standalone(rows[0], NUMPY)
    cut = truncated(rows[0], 2, NUMPY)
    _step(pool, rows, [2], seed=9)                      # writes the arena row in place
    _holds(fork, expect[0])
    _holds(cut, [e[:, :, :2] for e in expect[0]])
    a, b = _cache(3, 1), _cache(5, 2)
    buf = packed_past([a, None, b], 0, 5, H, HD, NUMPY)
    assert buf.shape == (3, H, 5, HD) and not buf[1].any() and not buf[0, :, 3:].any()
    np.testing.assert_array_equal(buf[2], b.kv[0][0])
    new = [np.random.RandomState(j).randn(2, H, 4, HD).astype(np.float32) for j in range(N)]
    out = appended([a, None], [2, 4], 4, new, NUMPY)
    assert [c.length for c in out] == [5, 4]
    np.testing.assert_array_equal(out[0].kv[1], np.concatenate([a.kv[1], new[1][0:1, :, 2:]], axis=2))
    np.testing.assert_array_equal(out[1].kv[1], new[1][1:2])
