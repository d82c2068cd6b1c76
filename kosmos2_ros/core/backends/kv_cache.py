"""Key/value caches of the graph backends (onnxruntime, TensorRT): standalone rows and a static arena.

A prompt's prefill yields a standalone cache: its own arrays of exactly its length, never
written afterwards, so forks share them for free. Decoding moves rows into a `KVArena`: one
array per batch shape, allocated once with room for `capacity` tokens per row plus a scratch
column. A decode step feeds the whole arena to the step graph unchanged (unused columns masked
out) and writes each row's new key/value into its next column, so no step allocates or copies
the past, and shapes and addresses stay fixed: what a CUDA graph replay needs (gpt-fast's
static cache, with per-row lengths).

Views of an arena row are written in place by later steps. Before an arena is reused for other
rows, every view still referenced somewhere gets its own copy (tracked by weak references), so
an old cache never silently changes. Works on numpy arrays and torch tensors alike: the only
array-library calls go through `ArrayOps`.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .base import BackendError, PackedRows, pack_rows, position_ids

#: The smallest arena capacity. Capacities double up to LINEAR_FROM, then grow by LINEAR_FROM: a handful of
#: shapes (and so of CUDA graphs) serve every length, none more than twice the length it holds.
CAPACITY_STEP = 64
LINEAR_FROM = 512
#: Device memory the arenas a pool keeps may take by default (MiB): each arena keeps its decode step's
#: buffers and CUDA graph alive, so kept arenas are what lets mixed traffic replay instead of capture.
ARENA_BUDGET_MB = 1024.0
#: Free columns an arena keeps beyond its longest row when it is (re)filled.
HEADROOM = 32
#: Each array of an arena (and of a step's new keys/values) starts a multiple of this many elements
#: after the first: TensorRT requires 256-byte aligned tensor addresses, which this gives for any
#: element size (the first array is where the allocator put the buffer: 512-byte aligned in torch).
SLAB_ALIGN = 256


@dataclass(frozen=True)
class ArrayOps:
    """The array library: numpy on the host, torch on a device."""
    zeros: Callable[[Tuple[int, ...]], Any]
    cat: Callable[[List[Any], int], Any]


NUMPY = ArrayOps(zeros=lambda shape: np.zeros(shape, dtype=np.float32),
                 cat=lambda parts, axis: np.concatenate(parts, axis=axis))


def aligned_slabs(ops: ArrayOps, n: int, shape: Tuple[int, ...]) -> Any:
    """Zeros of shape (n, *shape) whose n arrays [j] each start SLAB_ALIGN elements apart (a view
    into one padded buffer): each [j] is contiguous and can be bound as a tensor on its own."""
    size = int(np.prod(shape))
    padded = -(-size // SLAB_ALIGN) * SLAB_ALIGN
    return ops.zeros((n, padded))[:, :size].reshape((n, *shape))


@dataclass(eq=False)
class KVCache:
    """One sequence's keys and values: its own arrays, or row `row` of a live `arena`."""
    length: int
    kv: Optional[List[Any]] = None          # standalone: 2 * layers arrays [1, H, length, hd]
    arena: Optional[KVArena] = None
    row: int = -1
    generation: int = -1

    def layer(self, j: int) -> Any:
        """Array j (past_key_0, past_value_0, ...) as [1, H, length, hd]; a view for arena rows."""
        if self.kv is not None:
            return self.kv[j]
        assert self.arena is not None
        return self.arena.kv[j, self.row:self.row + 1, :, :self.length]

    def n_arrays(self) -> int:
        return len(self.kv) if self.kv is not None else int(self.arena.kv.shape[0])  # type: ignore[union-attr]

    def in_arena(self, arena: KVArena) -> bool:
        return self.kv is None and self.arena is arena and self.generation == arena.generation

    def detach(self, ops: ArrayOps) -> None:
        """Become standalone (a copy), so the arena row can be reused."""
        if self.kv is None:
            self.kv = [ops.cat([self.layer(j)], 2) for j in range(self.n_arrays())]
            self.arena = None


def standalone(cache: KVCache, ops: ArrayOps) -> KVCache:
    """A cache that no decode step will ever write: itself, or a copy of an arena row."""
    if cache.kv is not None:
        return KVCache(cache.length, list(cache.kv))
    copy = KVCache(cache.length, None, cache.arena, cache.row, cache.generation)
    copy.detach(ops)
    return copy


def truncated(cache: KVCache, length: int, ops: ArrayOps) -> KVCache:
    """The first `length` tokens as a new standalone cache (exact: causal attention)."""
    return KVCache(int(length), [ops.cat([cache.layer(j)[:, :, :length]], 2) for j in range(cache.n_arrays())])


def pack_appends(caches: Sequence[Optional[KVCache]], chunks: Sequence[Sequence[int]],
                 masks: Sequence[Sequence[int]], pad_id: int, limit: int) -> PackedRows:
    """`pack_rows` for chunks appended to caches (None: from scratch), refusing what the graph cannot hold."""
    if min(len(c) for c in chunks) < 1:
        raise BackendError("empty chunk")
    rows = pack_rows([0 if c is None else int(c.length) for c in caches], chunks, masks, pad_id)
    if rows.pmax + rows.smax > limit:
        raise BackendError(f"sequence of {rows.pmax + rows.smax} tokens exceeds the decoder's limit of {limit}")
    return rows


def packed_past(caches: Sequence[Optional[KVCache]], j: int, pmax: int, heads: int, head_dim: int,
                ops: ArrayOps) -> Any:
    """Array j of several caches as one [rows, H, pmax, hd] input, each row's past at its start."""
    buf = ops.zeros((len(caches), heads, pmax, head_dim))
    for b, c in enumerate(caches):
        if c is not None and c.length:
            buf[b, :, :c.length] = c.layer(j)[0]
    return buf


def appended(caches: Sequence[Optional[KVCache]], lens: Sequence[int], smax: int, new: Sequence[Any],
             ops: ArrayOps) -> List[KVCache]:
    """Standalone caches after a packed prefill: row b's past, then its `lens[b]` new tokens
    (the last columns of the graph's [rows, H, smax, hd] new keys/values)."""
    out = []
    for b, (cache, n) in enumerate(zip(caches, lens)):
        past = 0 if cache is None else cache.length
        mine = [arr[b:b + 1, :, smax - n:] for arr in new]
        kv = [ops.cat([cache.layer(j), m] if past else [m], 2) for j, m in enumerate(mine)]  # type: ignore[union-attr]
        out.append(KVCache(past + n, kv))
    return out


@dataclass
class StepFeeds:
    """Graph inputs for one decode step over a whole arena; idle rows write the scratch column."""
    input_ids: np.ndarray        # [rows, 1]
    position_ids: np.ndarray     # [rows, 1]
    attention_mask: np.ndarray   # [rows, capacity + 2]: the arena's columns, then the new token
    columns: np.ndarray          # [rows] column each row's new key/value goes to
    active: List[int]            # arena rows stepped, in the caller's order


class KVArena:
    """Keys and values of `rows` sequences, `capacity` tokens each, allocated once."""

    def __init__(self, ops: ArrayOps, n_arrays: int, rows: int, heads: int, capacity: int, head_dim: int) -> None:
        self.ops = ops
        self.rows, self.capacity = rows, capacity
        # Column `capacity` is scratch: idle rows write there, and no mask ever lets it be read.
        self.kv = aligned_slabs(ops, n_arrays, (rows, heads, capacity + 1, head_dim))
        self.lengths = [0] * rows
        self.generation = 0
        self._written = [0] * rows          # columns ever written per row (stale data to clear)
        self._views: List[weakref.ref] = []

    @property
    def key(self) -> Tuple[int, int]:
        return self.rows, self.capacity

    def release_views(self) -> None:
        """Give every still-referenced view of this arena its own copy."""
        for ref in self._views:
            view = ref()
            if view is not None and view.in_arena(self):
                view.detach(self.ops)
        self._views = []

    def load(self, caches: Sequence[KVCache]) -> List[KVCache]:
        """Copy `caches` into rows 0.. of a new generation; returns their arena views."""
        if len(caches) > self.rows or any(c.length >= self.capacity for c in caches):
            raise BackendError("caches do not fit this arena")
        self.release_views()   # also detaches `caches` themselves if they were rows of this arena
        self.generation += 1
        for b, c in enumerate(caches):
            for j in range(self.kv.shape[0]):
                self.kv[j, b, :, :c.length] = c.layer(j)[0]
            if self._written[b] > c.length:
                # Stale keys are masked out, but a non-finite leftover would still turn 0 * x into NaN.
                self.kv[:, b, :, c.length:self._written[b]] = 0
            self._written[b] = c.length
            self.lengths[b] = c.length
        for b in range(len(caches), self.rows):
            self.lengths[b] = 0
        return [self.view(b) for b in range(len(caches))]

    def view(self, row: int) -> KVCache:
        v = KVCache(self.lengths[row], None, self, row, self.generation)
        self._views.append(weakref.ref(v))
        if len(self._views) > 8 * self.rows:
            self._views = [r for r in self._views if r() is not None]
        return v

    def holds(self, caches: Sequence[KVCache]) -> bool:
        """Whether `caches` are the current heads of distinct rows of this arena, each with room."""
        rows = [c.row for c in caches]
        return (all(c.in_arena(self) and c.length == self.lengths[c.row] < self.capacity for c in caches)
                and len(set(rows)) == len(rows))

    def step_feeds(self, caches: Sequence[KVCache], tokens: Sequence[int], pad_id: int) -> StepFeeds:
        ids = np.full((self.rows, 1), pad_id, dtype=np.int64)
        pos = np.full((self.rows, 1), pad_id, dtype=np.int64)
        mask = np.zeros((self.rows, self.capacity + 2), dtype=np.int64)
        mask[:, -1] = 1                                    # every row attends to its own new token
        cols = np.full((self.rows,), self.capacity, dtype=np.int64)
        for c, tok in zip(caches, tokens):
            ids[c.row, 0] = tok
            pos[c.row, 0] = position_ids([tok], c.length, pad_id)[0]
            mask[c.row, :c.length] = 1
            cols[c.row] = c.length
        return StepFeeds(ids, pos, mask, cols, [c.row for c in caches])

    def advance(self, feeds: StepFeeds) -> List[KVCache]:
        """After the step's keys/values are written at `feeds.columns`: the rows' new views."""
        out = []
        for row in feeds.active:
            self.lengths[row] += 1
            self._written[row] = max(self._written[row], self.lengths[row])
            out.append(self.view(row))
        return out

    def write_host(self, feeds: StepFeeds, new: Sequence[Any]) -> None:
        """Write the step's new keys/values (array j: [rows, H, 1, hd]) for the active rows."""
        for j, arr in enumerate(new):
            for row in feeds.active:
                self.kv[j, row, :, int(feeds.columns[row])] = arr[row, :, 0]


def capacity_for(length: int, limit: int) -> int:
    """Arena capacity for rows up to `length` tokens with headroom: 64, 128, 256, 512, then multiples of 512."""
    if length >= limit:
        raise BackendError(f"sequence of {length + 1} tokens exceeds the decoder's limit of {limit}")
    need, cap = length + HEADROOM, CAPACITY_STEP
    while cap < need and cap < LINEAR_FROM:
        cap *= 2
    if cap < need:
        cap = -(-need // LINEAR_FROM) * LINEAR_FROM
    return min(cap, limit)


def rows_for(rows: int, max_rows: Optional[int]) -> int:
    """Arena rows for a group of `rows`: the next power of two (idle rows write the scratch column), at most
    `max_rows`, so 1, 2, 3 and 4 rows take at most three shapes."""
    out = 1
    while out < rows:
        out *= 2
    return max(rows, min(out, max_rows)) if max_rows else out


@dataclass
class PoolStats:
    """What an arena pool dropped, and what it holds (diagnostics)."""
    dropped: int = 0
    kept: int = 0
    kept_mb: float = 0.0
    budget_mb: float = 0.0


class ArenaPool:
    """The arenas of one backend, kept while they fit a memory budget, least recently used dropped first
    (their views get copies). Each arena shape is a decode step (and a CUDA graph) that real traffic reuses:
    a single refer, four expressions on a frame, candidate rows, a caption and a description take a handful
    of shapes, and a pool that keeps them all never captures again after warm-up.

    `slot` separates groups of rows decoded in turn (a batch larger than a backend's step takes several
    arenas of the same shape, one per group). `bucket_rows` rounds a group's rows up to a power of two
    (device graphs: fewer shapes); the CPU backend keeps exact rows (idle rows would cost compute there).
    """

    def __init__(self, ops: ArrayOps, n_arrays: int, heads: int, head_dim: int, limit: int,
                 budget_mb: float = ARENA_BUDGET_MB, itemsize: int = 4, bucket_rows: bool = False,
                 max_rows: Optional[int] = None, on_change: Optional[Callable[[str], None]] = None) -> None:
        self.ops, self.n_arrays, self.heads, self.head_dim = ops, n_arrays, heads, head_dim
        self.limit, self.itemsize, self.bucket_rows, self.max_rows = limit, itemsize, bucket_rows, max_rows
        self.budget_bytes = float(budget_mb) * (1 << 20)
        self.stats = PoolStats(budget_mb=float(budget_mb))
        self._on_change = on_change
        self._arenas: Dict[Tuple[int, int, int], KVArena] = OrderedDict()

    def arena_bytes(self, rows: int, capacity: int) -> int:
        return self.n_arrays * rows * self.heads * (capacity + 1) * self.head_dim * self.itemsize

    def arena_for(self, caches: Sequence[KVCache], slot: int = 0) -> Tuple[KVArena, List[KVCache]]:
        """The arena holding `caches` as they are, or one they have just been copied into."""
        first = caches[0]
        if first.arena is not None and first.arena.holds(caches):
            self._touch(first.arena)
            return first.arena, list(caches)
        cap = capacity_for(max(c.length for c in caches), self.limit)
        rows = rows_for(len(caches), self.max_rows) if self.bucket_rows else len(caches)
        key = (slot, rows, cap)
        arena = self._arenas.pop(key, None)
        if arena is None:
            arena = KVArena(self.ops, self.n_arrays, rows, self.heads, cap, self.head_dim)
            self._arenas[key] = arena
            self._fit(keep=key)
            self._report(f"arena {rows} x {cap} tokens made")
        else:
            self._arenas[key] = arena
        return arena, arena.load(caches)

    def _touch(self, arena: KVArena) -> None:
        for key, kept in self._arenas.items():
            if kept is arena:
                self._arenas.move_to_end(key)
                return

    def _fit(self, keep: Tuple[int, int, int]) -> None:
        """Drop the least recently used arenas until the rest fit the budget (the one in use always stays)."""
        while self._bytes() > self.budget_bytes and len(self._arenas) > 1:
            old = next(k for k in self._arenas if k != keep)
            self._arenas.pop(old).release_views()
            self.stats.dropped += 1
            self._report(f"arena {old[1]} x {old[2]} tokens dropped (budget)")

    def _bytes(self) -> int:
        return sum(self.arena_bytes(k[1], k[2]) for k in self._arenas)

    def _report(self, what: str) -> None:
        self.stats.kept = len(self._arenas)
        self.stats.kept_mb = self._bytes() / (1 << 20)
        if self._on_change is not None:
            self._on_change(f"{what}: {self.stats.kept} kept, {self.stats.kept_mb:.1f} of "
                            f"{self.stats.budget_mb:g} MiB")

    def live(self) -> List[KVArena]:
        """The arenas kept now (a backend drops what it holds for any other)."""
        return list(self._arenas.values())

    def clear(self) -> None:
        for arena in self._arenas.values():
            arena.release_views()
        self._arenas.clear()
        self._report("arenas cleared")
