"""TensorRT backend: engines built from the exported ONNX graphs, run on torch CUDA tensors.

tensorrt and a CUDA build of torch are imported lazily; when either is missing the backend
raises `BackendUnavailable` naming it. Engines come from `engines`, beside it (cache keyed by model,
TensorRT version, GPU compute capability and precision) and are built only when
`build_engines` allows it (else: run `kosmos2-build-engines`). Every buffer is bound with the
dtype the engine gives its tensor (`engines.io_dtypes`): the fp16 / bf16 engines take fp32
pixels and image embeddings, give fp32 logits and keep the KV cache in fp16 / bf16, as their
strongly typed graphs say (`onnx.export`); the arena is allocated in the cache's dtype.

What is shared with torch's static path (packed prefill, the static arena, the step captured as a
CUDA graph, batches split to the engine's profiles) is `device_graph.DeviceGraphBackend`; this
module binds tensors to execution contexts (`binding.bind`: non-null, 256-byte aligned, shapes
inside the profile, output shapes as the engine computes them) and enqueues them. Contexts:
vision, prefill (decoder profile 0), and one per decode-step buffers (decoder profile 1), bound once
to that step's buffers and arena: TensorRT's rule for CUDA graphs with `enqueueV3` is that a captured
graph is valid only for the context state (shapes, addresses) it was captured with, so a graph is
never replayed on a context re-bound to another arena. The step contexts take their scratch memory
from one shared allocation (`USER_MANAGED` + `set_device_memory`, sized for profile 1, not for the
prefill profile's 8 x 256 x context attention scores): they run one at a time on the backend's
stream, which is all TensorRT asks of contexts sharing memory. What each context takes is logged.
"""
from __future__ import annotations

from typing import Any, Dict

import numpy as np

from ...defaults import ARTIFACTS_DIR
from ..base import BackendError, BackendUnavailable
from ..device_graph import DeviceGraphBackend, StepBuffers
from ..kv_cache import ARENA_BUDGET_MB, KVCache
from . import binding, engines

#: The cache type of this backend (kept for callers that name it).
TrtCache = KVCache


class TensorRTBackend(DeviceGraphBackend):
    name = "tensorrt"
    nonfinite_error = "the engine produced non-finite logits (fp16 overflow? try precision: bf16 or fp32)"

    def __init__(self, model_dir: str, device: str = "auto", precision: str = "fp16",
                 artifacts_dir: str = ARTIFACTS_DIR, build_engines: bool = False,
                 cuda_graph: bool = True, arena_budget_mb: float = ARENA_BUDGET_MB, log: Any = print) -> None:
        trt = engines.require_tensorrt()
        torch = engines.require_cuda_torch()
        device = engines.cuda_device(torch, device)
        self._trt, self._torch, self.precision = trt, torch, precision
        self._cuda = device.startswith("cuda")
        self.device = device
        cc = engines.compute_capability(torch, device)
        engines.check_precision(precision, cc)
        with self._on_device():   # engines deserialise and contexts are made on the configured GPU
            self.engine_dir, meta = engines.ensure_engines(model_dir, artifacts_dir, precision,
                                                           allow_build=build_engines, device=device)
            self._engines = engines.load_engines(trt, self.engine_dir, meta, cc, model_dir)
            m = self.manifest = meta["manifest"]
            self.vocab_size, self.pad_token_id = int(m["vocab_size"]), int(m["pad_token_id"])
            self.embed_dim = int(m["embed_dim"])
            self._kv_names = list(m["inputs"]["decoder"][5:])
            self._new_names = list(m["outputs"]["decoder"][1:])
            self._io = {k: engines.io_dtypes(e, torch) for k, e in self._engines.items()}
            dec = self._io["decoder"]
            kv_dtype = dec[self._kv_names[0]]
            if any(dec[n] != kv_dtype for n in self._kv_names + self._new_names):
                raise BackendUnavailable(f"the decoder engine in {self.engine_dir} mixes KV cache dtypes; "
                                         f"{engines.rebuild_hint(model_dir, precision)}")
            limits = engines.EngineLimits(**meta["limits"])
            self.max_rows, self.max_chunk = limits.max_batch, limits.max_prompt
            self._init_device(torch, device, kv_dtype, dec, len(self._kv_names), int(m["heads"]), int(m["head_dim"]),
                              self.embed_dim, engines.arena_limit(m, limits), cuda_graph, arena_budget_mb, log)
            self._log = log
            self._dummy = torch.zeros(binding.ALIGNMENT, dtype=torch.uint8, device=device)  # for empty tensors
            self._vision_ctx = engines.context(trt, self._engines["vision"], "vision", log=log)
            self._prefill_ctx = engines.context(trt, self._engines["decoder"], "decoder prefill", profile=engines.PREFILL_PROFILE,
                                                stream=self._stream_handle(), log=log)
            # One scratch allocation for every step context (they run one at a time on this backend's stream).
            size = int(self._engines["decoder"].get_device_memory_size_for_profile_v2(engines.STEP_PROFILE))
            self._step_scratch = torch.empty(max(size, binding.ALIGNMENT), dtype=torch.uint8, device=device)
            log(f"tensorrt: decoder step contexts: {size / (1 << 20):.1f} MiB of device memory, shared")

    # -- Backend ---------------------------------------------------------------------------
    def encode_image(self, pixel_values: np.ndarray) -> Any:
        torch = self._torch
        vision = self._io["vision"]
        with self._on_device():
            pv = torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32)).to(
                self.device, vision["pixel_values"])
            out = torch.empty((pv.shape[0], int(self.manifest["image_tokens"]), self.embed_dim),
                              dtype=vision["image_embeds"], device=self.device)
            self._execute(self._vision_ctx, {"pixel_values": pv}, {"image_embeds": out})
        return out

    def close(self) -> None:
        super().close()      # the step buffers, and with them their contexts, before the scratch they use
        self._vision_ctx = self._prefill_ctx = None
        self._step_scratch = None
        self._engines = {}

    # -- DeviceGraphBackend ----------------------------------------------------------------
    def _run_decoder(self, inputs: Dict[str, Any], outputs: Dict[str, Any]) -> None:
        self._execute(self._prefill_ctx, inputs, outputs)

    def _prepare_step(self, step: StepBuffers) -> None:
        """The step's own context (profile 1, the shared scratch), bound once to its fixed buffers and its
        arena's arrays: nothing re-binds it, so its captured graph stays valid for as long as the step lives."""
        if self._step_scratch is None:
            raise BackendError("backend is closed")
        label = f"decoder step {step.arena.rows}x{step.arena.capacity}"
        ctx = engines.context(self._trt, self._engines["decoder"], label, profile=engines.STEP_PROFILE,
                              stream=self._stream_handle(),
                              memory=(int(self._step_scratch.data_ptr()), int(self._step_scratch.numel())),
                              log=lambda line: None)
        inputs: Dict[str, Any] = dict(step.inputs, image_embeds=self._no_image)
        for j, name in enumerate(self._kv_names):
            inputs[name] = step.arena.kv[j]
        outputs = {"logits": step.logits, **{name: step.new[j] for j, name in enumerate(self._new_names)}}
        binding.bind(ctx, inputs, outputs, self._dummy.data_ptr())
        step.context = ctx

    def _launch_step(self, step: StepBuffers) -> None:
        if not step.context.execute_async_v3(self._stream_handle()):
            raise BackendError("TensorRT execution of the decode step failed")

    # -- helpers -----------------------------------------------------------------------------------
    def _stream_handle(self) -> int:
        return self._stream.cuda_stream if self._stream is not None else 0

    def _execute(self, ctx: Any, inputs: Dict[str, Any], outputs: Dict[str, Any]) -> None:
        if ctx is None:
            raise BackendError("backend is closed")
        # Inputs the backend does not own (a slice of image embeddings) may sit off the 256-byte grid;
        # their aligned copies must live until the engine has run.
        bound = {k: binding.aligned(v) for k, v in inputs.items()}
        binding.bind(ctx, bound, outputs, self._dummy.data_ptr())
        if not ctx.execute_async_v3(self._stream_handle()):
            raise BackendError("TensorRT execution failed")
        self._sync()
        del bound
