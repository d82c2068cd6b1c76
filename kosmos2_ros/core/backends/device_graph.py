"""Graph backends whose tensors live in torch (TensorRT engines, and torch's static path): what they share.

Both run the decoder graph (`modules.DecoderGraph`: as an engine built from its ONNX export, or as
the module itself) over caches kept by `kv_cache`:

- prefill packs rows into one call (`base.pack_rows`); a call larger than the backend may make
  (an engine's optimisation profile: `max_rows`, `max_chunk`) is split into calls it may make:
  groups of rows, and long chunks prefilled piece by piece on the cache of the piece before;
- a decode step reads a static arena (`kv_cache.KVArena`) as it is and writes each row's new
  key/value into the row's next column on the device. Inputs, outputs and arena keep their
  addresses, so after two plain runs the step (decoder + scatter) is captured as a CUDA graph
  and replayed: one launch per token (gpt-fast's pattern: static buffers, warm-up runs on a side
  stream, one capture per arena shape). Arena shapes come in buckets (rows 1, 2, 4, ...; capacities
  64, 128, 256, 512, then multiples of 512) and the pool keeps them within a memory budget
  (`arena_budget_mb`), so the handful of shapes real traffic uses (a refer, four refers on a frame,
  candidate rows, a caption, a description) are captured once and replayed from then on
  (`GraphStats` counts both). Graphs share one memory pool: they replay one at a time.
- each step owns what it runs with: its buffers, its graph and, for TensorRT, its own execution
  context bound once to those buffers (a captured graph is valid only for the context state it was
  captured with; one context re-bound to another arena's shapes would make every other graph wrong).

Everything runs on the backend's own stream and, for `cuda:N`, with device N current (a
TensorRT context runs on the calling thread's current device). On the CPU (torch's static path
in tests and CI) there are no streams and no graphs; the arithmetic is the same.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .graph import GraphBackend
from .kv_cache import (
    ARENA_BUDGET_MB,
    ArenaPool,
    ArrayOps,
    KVArena,
    KVCache,
    StepFeeds,
    aligned_slabs,
    appended,
    pack_appends,
    packed_past,
)
from .logits import DeviceLogits, stack_rows

#: The decoder graph's first five inputs (`onnx.export.GRAPH_IO`); the KV arrays follow.
STEP_INPUTS = ("input_ids", "image_mask", "position_ids", "attention_mask")
#: int64 elements between the step's staged inputs: 256 bytes, the alignment TensorRT requires of an address.
STAGE_ALIGN = 32


class StepBuffers:
    """Fixed inputs and outputs of the decode step over one arena, and its CUDA graph once captured."""

    def __init__(self, torch: Any, arena: KVArena, vocab_size: int, device: str,
                 dtypes: Optional[Dict[str, Any]] = None) -> None:
        """`dtypes`: the decoder's tensor dtypes by name (default: int64 inputs, fp32 logits)."""
        rows, cap = arena.rows, arena.capacity
        n, _, heads, _, hd = arena.kv.shape
        dt = dtypes or {}

        self.arena = arena
        self.inputs = {"image_mask": torch.zeros((rows, 1), dtype=dt.get("image_mask", torch.int64), device=device)}
        # What a step loads (ids, positions, mask, columns) is one int64 buffer on the device, each piece starting
        # 256 bytes apart (TensorRT binds them one by one), filled from one host buffer (pinned on a GPU) by one
        # copy: one host-to-device transfer a token, not four synchronous ones. (An engine with other input
        # dtypes gets a buffer per input, as the decoder's graphs never export.)
        shapes = {"input_ids": (rows, 1), "position_ids": (rows, 1), "attention_mask": (rows, cap + 2),
                  "columns": (rows,)}
        if all(dt.get(name, torch.int64) == torch.int64 for name in STEP_INPUTS):
            offsets, total = {}, 0
            for name, shape in shapes.items():
                offsets[name] = total
                total += -(-int(np.prod(shape)) // STAGE_ALIGN) * STAGE_ALIGN
            self._staged = torch.zeros(total, dtype=torch.int64, device=device)
            cuda = str(device).startswith("cuda")
            self._host = torch.zeros(total, dtype=torch.int64, pin_memory=True) if cuda else self._staged
            self._copied = torch.cuda.Event() if cuda else None   # recorded after each copy out of _host
            pieces = {name: self._staged[o:o + int(np.prod(shapes[name]))].view(shapes[name])
                      for name, o in offsets.items()}
            host = self._host.numpy()
            self._host_pieces = {name: host[o:o + int(np.prod(shapes[name]))].reshape(shapes[name])
                                 for name, o in offsets.items()}
        else:
            self._staged = self._host = self._copied = None
            pieces = {name: torch.zeros(shape, dtype=dt.get(name, torch.int64), device=device)
                      for name, shape in shapes.items()}
        self.columns = pieces.pop("columns")      # scatter_ indexes in int64
        self.columns.fill_(cap)
        self.inputs.update(pieces)
        self.logits = torch.empty((rows, vocab_size), dtype=dt.get("logits", torch.float32), device=device)
        # The step's new keys/values, one aligned array per KV input (bound one by one), in the cache's dtype.
        kv_ops = ArrayOps(zeros=lambda shape: torch.zeros(shape, dtype=arena.kv.dtype, device=device),
                          cat=lambda parts, axis: torch.cat(parts, dim=axis))
        self.new = aligned_slabs(kv_ops, n, (rows, heads, 1, hd))
        self.index = self.columns.view(1, rows, 1, 1, 1).expand(n, rows, heads, 1, hd)
        self.graph: Any = None
        self.context: Any = None   # what runs the step, bound once to these buffers (TensorRT: its own context)
        self.runs = 0

    def load(self, torch: Any, feeds: StepFeeds) -> None:
        """The step's inputs onto the device, on the current (the backend's) stream. The host buffer is reused
        step after step: before writing it, wait for the last step's copy out of it (an event, not the stream)."""
        arrays = {"input_ids": feeds.input_ids, "position_ids": feeds.position_ids,
                  "attention_mask": feeds.attention_mask, "columns": feeds.columns}
        if self._staged is None:
            for name, arr in arrays.items():
                (self.columns if name == "columns" else self.inputs[name]).copy_(torch.from_numpy(arr))
            return
        if self._copied is not None:
            self._copied.synchronize()      # returns at once before the first record
        for name, arr in arrays.items():
            self._host_pieces[name][...] = arr
        if self._copied is not None:
            self._staged.copy_(self._host, non_blocking=True)
            self._copied.record()           # on the current stream: the backend's

    def read_logits(self, active: List[int], on_device: Callable[[], Any], nonfinite_error: str) -> DeviceLogits:
        """The active rows' logits, left on the device for the loop's small read (`logits`): a copy of the rows up
        to the last active one, made on the backend's stream, since the next step (or its graph's replay)
        writes this buffer again."""
        return DeviceLogits(self.logits[:max(active) + 1].clone(), active, on_device, nonfinite_error)

    def scatter(self) -> None:
        """Write the step's new keys/values into the arena at each row's column (idle rows: scratch)."""
        self.arena.kv.scatter_(3, self.index, self.new)


@dataclass
class GraphStats:
    """Decode steps by how they ran, and the step buffers made (diagnostics, the device check)."""
    captures: int = 0
    replays: int = 0
    plain_steps: int = 0
    step_buffers: int = 0


class CudaGraphCapture:
    """Captures a step's launches as a CUDA graph on the backend's stream.

    `torch.cuda.graph` synchronises the whole device, collects garbage and empties the allocator's cache on
    entry; here only the backend's stream is synchronised (its earlier work must finish before capture), and
    the capture itself is torch's `capture_begin` / `capture_end` on that stream, into the backend's pool.
    """

    def __init__(self, torch: Any, stream: Any) -> None:
        self._torch, self._stream = torch, stream
        self._pool: Any = None

    def capture(self, launch: Callable[[], None], fresh_pool: bool) -> Any:
        """`fresh_pool`: no graph of this backend is alive. A pool whose graphs are all gone may not be shared
        again (torch asserts its use count is positive when a capture joins it; torch.cuda.graph's
        empty_cache used to erase it first), so the next capture takes a new one."""
        torch = self._torch
        if fresh_pool or self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        self._stream.synchronize()
        with torch.cuda.stream(self._stream):
            graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
            try:
                launch()
            except BaseException:
                try:               # end the broken capture, but report what broke it
                    graph.capture_end()
                except Exception:  # noqa: BLE001, S110 - the launch's error is the one to report
                    pass
                raise
            graph.capture_end()
        return graph


class DeviceGraphBackend(GraphBackend):
    """Prefill and decode over torch tensors; subclasses say how the decoder runs.

    Subclasses call `_init_device` and provide `_run_decoder` (a prefill call: fill `outputs`),
    `_launch_step` (enqueue the decoder over a step's buffers: fill `step.logits`, `step.new`)
    and, where binding is a separate act (TensorRT), `_prepare_step` (once per step buffers).
    """

    #: Rows and tokens one decoder call may hold (an engine's profile); None: no limit.
    max_rows: Optional[int] = None
    max_chunk: Optional[int] = None
    #: Whether one prefill call may hold rows of several images (`prefill_images` batches frames).
    batches_images = False
    cuda_graph = False
    graph_error = ""    # why capture was given up, if it was

    def _init_device(self, torch: Any, device: str, kv_dtype: Any, dtypes: Dict[str, Any], n_arrays: int,
                     heads: int, head_dim: int, embed_dim: int, limit: int, cuda_graph: bool,
                     arena_budget_mb: float = ARENA_BUDGET_MB, log: Callable[[str], None] = print) -> None:
        self._torch, self.device, self.kv_dtype, self._dtypes = torch, device, kv_dtype, dtypes
        self.heads, self.head_dim = heads, head_dim
        self._cuda = str(device).startswith("cuda")
        self.cuda_graph = bool(cuda_graph) and self._cuda
        with self._on_device():
            self._stream = torch.cuda.Stream(device=device) if self._cuda else None
            self._no_image = torch.zeros((1, 1, embed_dim), dtype=dtypes.get("image_embeds", torch.float32),
                                         device=device)
        self._ops = ArrayOps(zeros=lambda shape: torch.zeros(shape, dtype=kv_dtype, device=device),
                             cat=lambda parts, axis: torch.cat(parts, dim=axis))
        self._limit = limit
        itemsize = torch.empty((), dtype=kv_dtype).element_size()
        self._arenas = ArenaPool(self._ops, n_arrays, heads, head_dim, limit, budget_mb=arena_budget_mb,
                                 itemsize=itemsize, bucket_rows=True, max_rows=self.max_rows,
                                 on_change=lambda line: log(f"{self.name}: {line}"))
        self._steps: Dict[int, StepBuffers] = {}     # id(arena) -> its step buffers (graph, context)
        self.graph_stats = GraphStats()
        self._graph_capture: Any = CudaGraphCapture(torch, self._stream) if self._cuda else None

    # -- subclass hooks ----------------------------------------------------------------------------
    def _run_decoder(self, inputs: Dict[str, Any], outputs: Dict[str, Any]) -> None:
        raise NotImplementedError

    def _launch_step(self, step: StepBuffers) -> None:
        raise NotImplementedError

    def _prepare_step(self, step: StepBuffers) -> None:
        """Give a new step what it runs with (TensorRT: its own context, bound to its buffers; a module: nothing)."""

    # -- device and stream ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _on_device(self) -> Iterator[None]:
        """Device `cuda:N` current and the backend's stream in use (nothing on the CPU)."""
        if not self._cuda:
            yield
            return
        torch = self._torch
        with torch.cuda.device(torch.device(self.device)):
            stream = getattr(self, "_stream", None)
            if stream is None:
                yield
                return
            stream.wait_stream(torch.cuda.current_stream())   # inputs made on torch's stream come first
            with torch.cuda.stream(stream):
                yield

    def _sync(self) -> None:
        if self._cuda:
            self._stream.synchronize()

    # -- Backend -------------------------------------------------------------------------------------
    def prefill_images(self, image_embeds: Sequence[Any], input_ids: Sequence[int],
                       image_mask: Sequence[int]) -> List[KVCache]:
        """The same prompt head on several frames' images in one decoder call, one image per row."""
        if len(image_embeds) < 2 or not self.batches_images:
            return super().prefill_images(image_embeds, input_ids, image_mask)
        n = len(image_embeds)
        embeds = self._torch.cat([e.to(self.device) for e in image_embeds])
        _, caches = self._append([None] * n, [list(input_ids)] * n, embeds, [list(image_mask)] * n)
        return caches

    def decode_batch(self, caches: List[Any], token_ids: List[int]) -> Tuple[Any, List[Any]]:
        """One step for every row; more rows than one step may hold decode in groups, each on its own arena.
        The logits stay on the device (`DeviceLogits`)."""
        if not caches:
            return np.zeros((0, self.vocab_size), dtype=np.float32), []
        size = self.max_rows or len(caches)
        parts = [self._decode_group(caches[i:i + size], token_ids[i:i + size], slot=i // size)
                 for i in range(0, len(caches), size)]
        logits = parts[0][0] if len(parts) == 1 else stack_rows([p[0] for p in parts])
        return logits, [c for p in parts for c in p[1]]

    def truncate(self, cache: KVCache, length: int) -> KVCache:
        with self._on_device():      # copies on the backend's stream, where the caches are read
            return super().truncate(cache, length)

    def fork(self, cache: KVCache) -> KVCache:
        with self._on_device():
            return super().fork(cache)

    def counters(self) -> Dict[str, Any]:
        g, pool = self.graph_stats, self._arenas.stats
        return {"decode_graph_captures": g.captures, "decode_graph_replays": g.replays,
                "decode_plain_steps": g.plain_steps, "decode_step_buffers": g.step_buffers,
                "arenas_kept": pool.kept, "arenas_dropped": pool.dropped,
                "arena_memory_mb": f"{pool.kept_mb:.1f} of {pool.budget_mb:g}"}

    def close(self) -> None:
        self._steps = {}
        self._arenas.clear()
        if self._cuda:
            self._torch.cuda.empty_cache()

    # -- the decode step -------------------------------------------------------------------------------
    def _decode_group(self, caches: List[Any], token_ids: List[int], slot: int) -> Tuple[DeviceLogits, List[Any]]:
        torch = self._torch
        with self._on_device(), torch.no_grad():
            # Loading rows into an arena (and copies of views it releases) on the backend's stream, as the step.
            arena, rows = self._arenas.arena_for(caches, slot)
            feeds = arena.step_feeds(rows, [int(t) for t in token_ids], self.pad_token_id)
            step = self._step_for(arena)
            step.load(torch, feeds)
            if step.graph is not None and self.cuda_graph:
                step.graph.replay()
                self.graph_stats.replays += 1
            else:
                self._run_step(step)
                step.runs += 1
                self.graph_stats.plain_steps += 1
                if self.cuda_graph and step.graph is None and step.runs >= 2:   # TensorRT wants a plain run first
                    self._capture(step)
            logits = step.read_logits(feeds.active, self._on_device, self.nonfinite_error)
        return logits, arena.advance(feeds)

    def _run_step(self, step: StepBuffers) -> None:
        self._launch_step(step)
        step.scatter()

    def _step_for(self, arena: KVArena) -> StepBuffers:
        live = {id(a) for a in self._arenas.live()}
        for key in [k for k in self._steps if k not in live]:   # arenas the pool dropped: their graphs go too
            del self._steps[key]
        step = self._steps.get(id(arena))
        if step is None or step.arena is not arena:
            step = StepBuffers(self._torch, arena, self.vocab_size, self.device, self._dtypes)
            self._prepare_step(step)
            self._steps[id(arena)] = step
            self.graph_stats.step_buffers += 1
        return step

    def set_cuda_graph(self, enabled: bool) -> None:
        """Turn replay on or off; off drops every captured graph (none is replayed again)."""
        self.cuda_graph = bool(enabled) and self._graph_capture is not None
        if not self.cuda_graph:
            for step in self._steps.values():
                step.graph = None

    def _capture(self, step: StepBuffers) -> None:
        """Capture the step; if this driver/runtime cannot, keep decoding plainly and say why once.

        The step that was just run plainly already holds its result, so a failed capture loses nothing.
        """
        alive = any(s.graph is not None for s in self._steps.values())
        try:
            step.graph = self._graph_capture.capture(lambda: self._run_step(step), fresh_pool=not alive)
        except Exception as exc:  # noqa: BLE001 - capture support varies by driver and runtime
            self.set_cuda_graph(False)
            self.graph_error = f"CUDA graph capture of the decode step failed, decoding without graphs: {exc}"
            warnings.warn(self.graph_error, RuntimeWarning, stacklevel=2)
            if self._stream is not None:
                self._stream.synchronize()
            return
        self.graph_stats.captures += 1

    # -- prefill ---------------------------------------------------------------------------------------
    def _append(self, caches: List[Optional[KVCache]], chunks: List[List[int]], image_embeds: Any,
                masks: List[List[int]]) -> Tuple[np.ndarray, List[KVCache]]:
        """Rows in groups of `max_rows`; a row whose chunk is longer than `max_chunk` goes alone, piece by piece."""
        size = self.max_rows or len(chunks)
        if len(chunks) > size:
            parts = [self._append(caches[i:i + size], chunks[i:i + size], self._image_rows(image_embeds, i, size),
                                  masks[i:i + size]) for i in range(0, len(chunks), size)]
            return stack_rows([p[0] for p in parts]), [c for p in parts for c in p[1]]
        longest = max(len(c) for c in chunks)
        if self.max_chunk is None or longest <= self.max_chunk:
            return self._prefill_call(caches, chunks, image_embeds, masks)
        rows = [self._pieces(caches[b], chunks[b], self._image_rows(image_embeds, b, 1), masks[b])
                for b in range(len(chunks))]
        return stack_rows([r[0] for r in rows]), [r[1] for r in rows]

    @staticmethod
    def _image_rows(image_embeds: Any, start: int, count: int) -> Any:
        """The image embeddings of rows start.. (one image for all rows stays as it is)."""
        if image_embeds is None or image_embeds.shape[0] == 1:
            return image_embeds
        return image_embeds[start:start + count]

    def _pieces(self, cache: Optional[KVCache], chunk: List[int], image_embeds: Any,
                mask: List[int]) -> Tuple[np.ndarray, KVCache]:
        """One row's long chunk as successive calls of at most `max_chunk` tokens; each piece gets the
        image embeddings its image positions still need."""
        assert self.max_chunk is not None
        logits, used = None, 0
        for start in range(0, len(chunk), self.max_chunk):
            piece, piece_mask = chunk[start:start + self.max_chunk], mask[start:start + self.max_chunk]
            wanted = int(sum(piece_mask))
            embeds = None if image_embeds is None or not wanted else image_embeds[:, used:used + wanted]
            used += wanted
            out, caches = self._prefill_call([cache], [piece], embeds, [piece_mask])
            logits, cache = out[0], caches[0]
        assert cache is not None and logits is not None
        return logits, cache

    def _prefill_call(self, caches: List[Optional[KVCache]], chunks: List[List[int]], image_embeds: Any,
                      masks: List[List[int]]) -> Tuple[np.ndarray, List[KVCache]]:
        """One decoder call: chunk b appended to cache b for every row."""
        torch = self._torch
        bsz = len(chunks)
        rows = pack_appends(caches, chunks, masks, self.pad_token_id, self._limit)
        dt = self._dtypes
        with self._on_device(), torch.no_grad():
            inputs = {name: torch.from_numpy(arr).to(self.device, dt.get(name, torch.int64))
                      for name, arr in zip(STEP_INPUTS, (rows.input_ids, rows.image_mask, rows.position_ids,
                                                         rows.attention_mask))}
            inputs["image_embeds"] = (self._no_image if image_embeds is None else
                                      image_embeds.to(self.device, dt.get("image_embeds", torch.float32)).contiguous())
            for j, name in enumerate(self._kv_names):
                inputs[name] = packed_past(caches, j, rows.pmax, self.heads, self.head_dim, self._ops)
            outputs = {"logits": torch.empty((bsz, self.vocab_size), dtype=dt.get("logits", torch.float32),
                                             device=self.device)}
            for name in self._new_names:
                outputs[name] = torch.empty((bsz, self.heads, rows.smax, self.head_dim), dtype=self.kv_dtype,
                                            device=self.device)
            self._run_decoder(inputs, outputs)
            new = appended(caches, rows.lens, rows.smax, [outputs[n] for n in self._new_names], self._ops)
            self._sync()   # the new caches complete before anyone on another stream reads them
            logits = DeviceLogits(outputs["logits"], None, self._on_device, self.nonfinite_error)
            logits.check_finite()   # a prefix's logits may never be read: its cache must not come from an overflow
        return logits, new
