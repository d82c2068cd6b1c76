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
  stream, one capture per arena shape; the arenas' capacities come in steps of 64, so a handful of
  graphs serve every length). Graphs share one memory pool: they replay one at a time.

Everything runs on the backend's own stream and, for `cuda:N`, with device N current (a
TensorRT context runs on the calling thread's current device). On the CPU (torch's static path
in tests and CI) there are no streams and no graphs; the arithmetic is the same.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .graph import GraphBackend
from .kv_cache import ArenaPool, ArrayOps, KVArena, KVCache, StepFeeds, aligned_slabs, appended, pack_appends, packed_past

#: The decoder graph's first five inputs (`onnx.export.GRAPH_IO`); the KV arrays follow.
STEP_INPUTS = ("input_ids", "image_mask", "position_ids", "attention_mask")


class StepBuffers:
    """Fixed inputs and outputs of the decode step over one arena, and its CUDA graph once captured."""

    def __init__(self, torch: Any, arena: KVArena, vocab_size: int, device: str,
                 dtypes: Optional[Dict[str, Any]] = None) -> None:
        """`dtypes`: the decoder's tensor dtypes by name (default: int64 inputs, fp32 logits)."""
        rows, cap = arena.rows, arena.capacity
        n, _, heads, _, hd = arena.kv.shape
        dt = dtypes or {}

        def buffer(name: str, shape: Tuple[int, ...]) -> Any:
            return torch.zeros(shape, dtype=dt.get(name, torch.int64), device=device)

        self.arena = arena
        self.inputs = {"input_ids": buffer("input_ids", (rows, 1)), "image_mask": buffer("image_mask", (rows, 1)),
                       "position_ids": buffer("position_ids", (rows, 1)),
                       "attention_mask": buffer("attention_mask", (rows, cap + 2))}
        self.columns = torch.full((rows,), cap, dtype=torch.int64, device=device)   # scatter_ indexes in int64
        self.logits = torch.empty((rows, vocab_size), dtype=dt.get("logits", torch.float32), device=device)
        # The step's new keys/values, one aligned array per KV input (bound one by one), in the cache's dtype.
        kv_ops = ArrayOps(zeros=lambda shape: torch.zeros(shape, dtype=arena.kv.dtype, device=device),
                          cat=lambda parts, axis: torch.cat(parts, dim=axis))
        self.new = aligned_slabs(kv_ops, n, (rows, heads, 1, hd))
        self.index = self.columns.view(1, rows, 1, 1, 1).expand(n, rows, heads, 1, hd)
        self.graph: Any = None
        self.runs = 0

    def load(self, torch: Any, feeds: StepFeeds) -> None:
        for name, arr in (("input_ids", feeds.input_ids), ("position_ids", feeds.position_ids),
                          ("attention_mask", feeds.attention_mask)):
            self.inputs[name].copy_(torch.from_numpy(arr))   # copy_ converts to the buffer's dtype
        self.columns.copy_(torch.from_numpy(feeds.columns))

    def scatter(self) -> None:
        """Write the step's new keys/values into the arena at each row's column (idle rows: scratch)."""
        self.arena.kv.scatter_(3, self.index, self.new)


class DeviceGraphBackend(GraphBackend):
    """Prefill and decode over torch tensors; subclasses say how the decoder runs.

    Subclasses call `_init_device` and provide `_run_decoder` (a prefill call: fill `outputs`),
    `_launch_step` (enqueue the decoder over a step's buffers: fill `step.logits`, `step.new`)
    and, where binding is a separate act (TensorRT), `_bind_step`.
    """

    #: Rows and tokens one decoder call may hold (an engine's profile); None: no limit.
    max_rows: Optional[int] = None
    max_chunk: Optional[int] = None
    #: Whether one prefill call may hold rows of several images (`prefill_images` batches frames).
    batches_images = False
    cuda_graph = False
    graph_error = ""    # why capture was given up, if it was

    def _init_device(self, torch: Any, device: str, kv_dtype: Any, dtypes: Dict[str, Any], n_arrays: int,
                     heads: int, head_dim: int, embed_dim: int, limit: int, cuda_graph: bool) -> None:
        self._torch, self.device, self.kv_dtype, self._dtypes = torch, device, kv_dtype, dtypes
        self.heads, self.head_dim = heads, head_dim
        self._cuda = str(device).startswith("cuda")
        self.cuda_graph = bool(cuda_graph) and self._cuda
        with self._on_device():
            self._stream = torch.cuda.Stream(device=device) if self._cuda else None
            self._pool = torch.cuda.graph_pool_handle() if self._cuda else None
            self._no_image = torch.zeros((1, 1, embed_dim), dtype=dtypes.get("image_embeds", torch.float32),
                                         device=device)
        self._ops = ArrayOps(zeros=lambda shape: torch.zeros(shape, dtype=kv_dtype, device=device),
                             cat=lambda parts, axis: torch.cat(parts, dim=axis))
        self._limit = limit
        self._arenas = ArenaPool(self._ops, n_arrays, heads, head_dim, limit)
        self._steps: Dict[int, StepBuffers] = {}     # id(arena) -> its step buffers (and graph)
        self._bound: Optional[StepBuffers] = None    # the step whose addresses the step decoder holds

    # -- subclass hooks ----------------------------------------------------------------------------
    def _run_decoder(self, inputs: Dict[str, Any], outputs: Dict[str, Any]) -> None:
        raise NotImplementedError

    def _launch_step(self, step: StepBuffers) -> None:
        raise NotImplementedError

    def _bind_step(self, step: StepBuffers) -> None:
        """Give the step decoder this step's shapes and addresses (nothing to do for a module)."""

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

    def decode_batch(self, caches: List[Any], token_ids: List[int]) -> Tuple[np.ndarray, List[Any]]:
        """One step for every row; more rows than one step may hold decode in groups, each on its own arena."""
        if not caches:
            return np.zeros((0, self.vocab_size), dtype=np.float32), []
        size = self.max_rows or len(caches)
        parts = [self._decode_group(caches[i:i + size], token_ids[i:i + size], slot=i // size)
                 for i in range(0, len(caches), size)]
        return np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]]

    def close(self) -> None:
        self._steps, self._bound = {}, None
        self._arenas.clear()
        if self._cuda:
            self._torch.cuda.empty_cache()

    # -- the decode step -------------------------------------------------------------------------------
    def _decode_group(self, caches: List[Any], token_ids: List[int], slot: int) -> Tuple[np.ndarray, List[Any]]:
        torch = self._torch
        arena, rows = self._arenas.arena_for(caches, slot)
        feeds = arena.step_feeds(rows, [int(t) for t in token_ids], self.pad_token_id)
        with self._on_device(), torch.no_grad():
            step = self._step_for(arena)
            step.load(torch, feeds)
            if step.graph is not None:
                step.graph.replay()
            else:
                self._bind(step)
                self._launch_step(step)
                step.scatter()
                step.runs += 1
                if self.cuda_graph and step.runs >= 2:   # TensorRT wants a plain run before capture
                    self._capture(step)
            logits = step.logits[feeds.active].float().cpu().numpy()
        self._check(logits)
        return logits, arena.advance(feeds)

    def _step_for(self, arena: KVArena) -> StepBuffers:
        live = {id(a) for a in self._arenas.live()}
        for key in [k for k in self._steps if k not in live]:   # arenas the pool dropped
            if self._bound is self._steps[key]:
                self._bound = None
            del self._steps[key]
        step = self._steps.get(id(arena))
        if step is None or step.arena is not arena:
            step = self._steps[id(arena)] = StepBuffers(self._torch, arena, self.vocab_size, self.device,
                                                        self._dtypes)
        return step

    def _bind(self, step: StepBuffers) -> None:
        if self._bound is not step:
            self._bind_step(step)
            self._bound = step

    def _capture(self, step: StepBuffers) -> None:
        """Capture the step; if this driver/runtime cannot, keep decoding plainly and say why once.

        The step that was just run plainly already holds its result, so a failed capture loses nothing.
        """
        torch = self._torch
        graph = torch.cuda.CUDAGraph()
        self._stream.synchronize()
        try:
            with torch.cuda.graph(graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
                self._launch_step(step)
                step.scatter()
        except Exception as exc:  # noqa: BLE001 - capture support varies by driver and runtime
            self.cuda_graph = False
            self.graph_error = f"CUDA graph capture of the decode step failed, decoding without graphs: {exc}"
            warnings.warn(self.graph_error, RuntimeWarning, stacklevel=2)
            self._stream.synchronize()
            return
        step.graph = graph

    # -- prefill ---------------------------------------------------------------------------------------
    def _append(self, caches: List[Optional[KVCache]], chunks: List[List[int]], image_embeds: Any,
                masks: List[List[int]]) -> Tuple[np.ndarray, List[KVCache]]:
        """Rows in groups of `max_rows`; a row whose chunk is longer than `max_chunk` goes alone, piece by piece."""
        size = self.max_rows or len(chunks)
        if len(chunks) > size:
            parts = [self._append(caches[i:i + size], chunks[i:i + size], self._image_rows(image_embeds, i, size),
                                  masks[i:i + size]) for i in range(0, len(chunks), size)]
            return np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]]
        longest = max(len(c) for c in chunks)
        if self.max_chunk is None or longest <= self.max_chunk:
            return self._prefill_call(caches, chunks, image_embeds, masks)
        rows = [self._pieces(caches[b], chunks[b], self._image_rows(image_embeds, b, 1), masks[b])
                for b in range(len(chunks))]
        return np.stack([r[0] for r in rows]), [r[1] for r in rows]

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
            self._sync()
            logits = outputs["logits"].float().cpu().numpy()
        self._check(logits)
        return logits, appended(caches, rows.lens, rows.smax, [outputs[n] for n in self._new_names], self._ops)
