"""TensorRT backend: engines built from the exported ONNX graphs, run on torch CUDA tensors.

tensorrt and a CUDA build of torch are imported lazily; when either is missing the backend
raises `BackendUnavailable` naming it. Engines come from `engines`, beside it (cache keyed by model,
TensorRT version, GPU compute capability and precision) and are built only when
`build_engines` allows it (else: run `kosmos2-build-engines`). Every buffer is bound with the
dtype the engine gives its tensor (`engines.io_dtypes`): the fp16 / bf16 engines take fp32
pixels and image embeddings, give fp32 logits and keep the KV cache in fp16 / bf16, as their
strongly typed graphs say (`onnx.export`); the arena is allocated in the cache's dtype.

Prefill packs rows as the onnxruntime backend does (holes masked by `attention_mask`, explicit
positions), so results match it row for row. Decode steps run on a static arena
(`kv_cache.KVArena`, allocated once per batch shape): the step engine reads the arena as is and
its new keys/values are scattered into the rows' next columns on the device. Inputs, outputs
and arena keep their addresses, so after one plain run the step (engine + scatter) is captured
as a CUDA graph and replayed: one launch per token. A TensorRT profile serves one execution
context, so one step graph is live at a time; switching arenas recaptures.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ...defaults import ARTIFACTS_DIR
from ..base import BackendError, BackendUnavailable
from ..graph import GraphBackend
from ..kv_cache import ArenaPool, ArrayOps, KVArena, KVCache, StepFeeds, appended, pack_appends, packed_past
from . import engines

#: The cache type of this backend (kept for callers that name it).
TrtCache = KVCache


class _StepBuffers:
    """Fixed inputs and outputs of the decode step over one arena, and its CUDA graph once captured."""

    def __init__(self, torch: Any, arena: KVArena, vocab_size: int, device: str,
                 dtypes: Optional[Dict[str, Any]] = None) -> None:
        """`dtypes`: the decoder engine's tensor dtypes (default: int64 inputs, fp32 logits)."""
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
        self.new = torch.zeros((n, rows, heads, 1, hd), dtype=arena.kv.dtype, device=device)   # the cache's dtype
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


class TensorRTBackend(GraphBackend):
    name = "tensorrt"
    nonfinite_error = "the engine produced non-finite logits (fp16 overflow? try precision: bf16 or fp32)"

    def __init__(self, model_dir: str, device: str = "auto", precision: str = "fp16",
                 artifacts_dir: str = ARTIFACTS_DIR, build_engines: bool = False,
                 cuda_graph: bool = True) -> None:
        trt = engines.require_tensorrt()
        torch = engines.require_cuda_torch()
        if device not in ("auto", "cuda") and not str(device).startswith("cuda"):
            raise BackendUnavailable(f"the tensorrt backend runs on CUDA devices, got device {device!r}")
        self._torch, self._trt = torch, trt
        self.device = "cuda" if device in ("auto", "cuda") else device
        self.cuda_graph = bool(cuda_graph)
        self.graph_error = ""    # why capture was given up, if it was
        index = torch.device(self.device).index or 0
        self.engine_dir, meta = engines.ensure_engines(model_dir, artifacts_dir, precision, allow_build=build_engines,
                                                       device_index=index)
        m = self.manifest = meta["manifest"]
        self.vocab_size, self.pad_token_id = int(m["vocab_size"]), int(m["pad_token_id"])
        self.heads, self.head_dim, self.embed_dim = int(m["heads"]), int(m["head_dim"]), int(m["embed_dim"])
        self._kv_names = list(m["inputs"]["decoder"][5:])
        self._new_names = list(m["outputs"]["decoder"][1:])
        cc = tuple(torch.cuda.get_device_capability(index))
        self._engines = engines.load_engines(trt, self.engine_dir, meta, cc, model_dir)
        self._dtypes = {k: engines.io_dtypes(e, torch) for k, e in self._engines.items()}
        dec = self._dtypes["decoder"]
        self.kv_dtype = dec[self._kv_names[0]]
        if any(dec[n] != self.kv_dtype for n in self._kv_names + self._new_names):
            raise BackendUnavailable(f"the decoder engine in {self.engine_dir} mixes KV cache dtypes; "
                                     f"{engines.rebuild_hint(model_dir, precision)}")
        self._stream = torch.cuda.Stream(device=self.device)
        self._vision_ctx = self._engines["vision"].create_execution_context()
        self._prefill_ctx = self._engines["decoder"].create_execution_context()
        self._step_ctx = self._engines["decoder"].create_execution_context()
        self._step_ctx.set_optimization_profile_async(1, self._stream.cuda_stream)
        self._no_image = torch.zeros((1, 1, self.embed_dim), dtype=dec["image_embeds"], device=self.device)
        ops = ArrayOps(zeros=lambda shape: torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
                       cat=lambda parts, axis: torch.cat(parts, dim=axis))
        self._ops = ops
        limit = engines.arena_limit(m, engines.EngineLimits(**meta["limits"]))
        self._limit = limit
        self._arenas = ArenaPool(ops, len(self._kv_names), self.heads, self.head_dim, limit)
        self._step: Optional[_StepBuffers] = None   # the arena bound to the step context

    # -- Backend ---------------------------------------------------------------------------
    def encode_image(self, pixel_values: np.ndarray) -> Any:
        torch = self._torch
        vision = self._dtypes["vision"]
        pv = torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32)).to(
            self.device, vision["pixel_values"])
        out = torch.empty((pv.shape[0], int(self.manifest["image_tokens"]), self.embed_dim),
                          dtype=vision["image_embeds"], device=self.device)
        self._execute(self._vision_ctx, {"pixel_values": pv}, {"image_embeds": out})
        return out

    def decode_batch(self, caches: List[Any], token_ids: List[int]) -> Tuple[np.ndarray, List[Any]]:
        torch = self._torch
        arena, rows = self._arenas.arena_for(caches)
        feeds = arena.step_feeds(rows, [int(t) for t in token_ids], self.pad_token_id)
        step = self._step_for(arena)
        # Loading the arena and allocating the step's buffers ran on torch's current stream.
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            step.load(torch, feeds)
            if step.graph is not None:
                step.graph.replay()
            else:
                self._launch_step(step)
                step.runs += 1
                if self.cuda_graph and step.runs >= 2:   # TensorRT wants a plain run before capture
                    self._capture(step)
            logits = step.logits[feeds.active].float().cpu().numpy()
        self._check(logits)
        return logits, arena.advance(feeds)

    def close(self) -> None:
        self._step = None
        self._arenas.clear()
        self._vision_ctx = self._prefill_ctx = self._step_ctx = None
        self._engines = {}
        self._torch.cuda.empty_cache()

    # -- the decode step -------------------------------------------------------------------------
    def _step_for(self, arena: KVArena) -> _StepBuffers:
        if self._step is None or self._step.arena is not arena:
            self._step = _StepBuffers(self._torch, arena, self.vocab_size, self.device, self._dtypes["decoder"])
            self._bind_step(self._step)
        return self._step

    def _bind_step(self, step: _StepBuffers) -> None:
        """Shapes and addresses of the step context: the arena's arrays and the fixed buffers."""
        inputs: Dict[str, Any] = dict(step.inputs, image_embeds=self._no_image)
        for j, name in enumerate(self._kv_names):
            inputs[name] = step.arena.kv[j]
        outputs = {"logits": step.logits, **{name: step.new[j] for j, name in enumerate(self._new_names)}}
        self._bind(self._step_ctx, inputs, outputs)

    def _launch_step(self, step: _StepBuffers) -> None:
        """Enqueue the engine and the scatter of its new keys/values on the backend's stream."""
        if not self._step_ctx.execute_async_v3(self._stream.cuda_stream):
            raise BackendError("TensorRT execution of the decode step failed")
        step.scatter()

    def _capture(self, step: _StepBuffers) -> None:
        """Capture the step; if this driver/TensorRT cannot, keep decoding plainly and say why once.

        The step that was just run plainly already holds its result, so a failed capture loses nothing.
        """
        torch = self._torch
        graph = torch.cuda.CUDAGraph()
        self._stream.synchronize()
        try:
            with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                self._launch_step(step)
        except Exception as exc:  # noqa: BLE001 - capture support varies by driver/TensorRT version
            self.cuda_graph = False
            self.graph_error = f"CUDA graph capture of the decode step failed, decoding without graphs: {exc}"
            warnings.warn(self.graph_error, RuntimeWarning, stacklevel=2)
            self._stream.synchronize()
            return
        step.graph = graph

    # -- prefill ---------------------------------------------------------------------------------
    @staticmethod
    def _bind(ctx: Any, inputs: dict, outputs: dict) -> None:
        """Set a context's input shapes and every tensor's address."""
        for name, t in inputs.items():
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise BackendError(f"input {name} shape {tuple(t.shape)} is outside the engine's profile "
                                   "(rebuild engines with larger limits)")
            ctx.set_tensor_address(name, t.data_ptr())
        for name, t in outputs.items():
            ctx.set_tensor_address(name, t.data_ptr())

    def _execute(self, ctx: Any, inputs: dict, outputs: dict) -> None:
        self._bind(ctx, inputs, outputs)
        self._stream.wait_stream(self._torch.cuda.current_stream())
        if not ctx.execute_async_v3(self._stream.cuda_stream):
            raise BackendError("TensorRT execution failed")
        self._stream.synchronize()

    def _append(self, caches: List[Optional[KVCache]], chunks: List[List[int]], image_embeds: Any,
                masks: List[List[int]]) -> Tuple[np.ndarray, List[KVCache]]:
        torch = self._torch
        bsz = len(chunks)
        rows = pack_appends(caches, chunks, masks, self.pad_token_id, self._limit)
        pmax, smax, lens = rows.pmax, rows.smax, rows.lens
        dev, dt = self.device, self._dtypes["decoder"]
        inputs = {name: torch.from_numpy(arr).to(dev, dt[name])
                  for name, arr in (("input_ids", rows.input_ids), ("image_mask", rows.image_mask),
                                    ("position_ids", rows.position_ids), ("attention_mask", rows.attention_mask))}
        inputs["image_embeds"] = (self._no_image if image_embeds is None
                                  else image_embeds.to(dt["image_embeds"]).contiguous())
        for j, name in enumerate(self._kv_names):
            inputs[name] = packed_past(caches, j, pmax, self.heads, self.head_dim, self._ops)
        outputs = {"logits": torch.empty((bsz, self.vocab_size), dtype=dt["logits"], device=dev)}
        for name in self._new_names:
            outputs[name] = torch.empty((bsz, self.heads, smax, self.head_dim), dtype=dt[name], device=dev)
        self._execute(self._prefill_ctx, inputs, outputs)
        logits = outputs["logits"].float().cpu().numpy()
        self._check(logits)
        return logits, appended(caches, lens, smax, [outputs[n] for n in self._new_names], self._ops)
