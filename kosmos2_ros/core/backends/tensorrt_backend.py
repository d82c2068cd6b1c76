"""TensorRT backend: engines built from the exported ONNX graphs, run on torch CUDA tensors.

tensorrt and a CUDA build of torch are imported lazily; when either is missing the backend
raises `BackendUnavailable` naming it. Engines come from `core.engines` (cache keyed by model,
TensorRT version, GPU compute capability and precision) and are built only when
`build_engines` allows it (else: run `kosmos2-build-engines`).

Rows share the onnxruntime backend's packing (holes masked by `attention_mask`, explicit
positions), so results match it row for row. Output buffers are allocated per call from
torch's caching allocator (no cudaMalloc after warm-up). Not done yet: a fixed-shape decode
step over a static KV pool replayed as a CUDA graph (see the report in docs/notes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from .base import Backend, BackendError, BackendUnavailable, pack_rows


@dataclass
class TrtCache:
    kv: List[Any]    # torch CUDA tensors [1, H, length, head_dim] per past_key_i / past_value_i
    length: int


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, model_dir: str, device: str = "auto", precision: str = "fp16",
                 artifacts_dir: str = "~/.cache/kosmos2_ros", build_engines: bool = False, **_: Any) -> None:
        from .. import engines

        trt = engines.require_tensorrt()
        torch = engines.require_cuda_torch()
        if device not in ("auto", "cuda") and not str(device).startswith("cuda"):
            raise BackendUnavailable(f"the tensorrt backend runs on CUDA devices, got device {device!r}")
        self._torch, self._trt = torch, trt
        self.device = "cuda" if device in ("auto", "cuda") else device
        index = torch.device(self.device).index or 0
        self.engine_dir, meta = engines.ensure_engines(model_dir, artifacts_dir, precision, allow_build=build_engines,
                                                       device_index=index)
        m = self.manifest = meta["manifest"]
        self.vocab_size, self.pad_token_id = int(m["vocab_size"]), int(m["pad_token_id"])
        self.heads, self.head_dim, self.embed_dim = int(m["heads"]), int(m["head_dim"]), int(m["embed_dim"])
        self._kv_names = list(m["inputs"]["decoder"][5:])
        self._out_names = list(m["outputs"]["decoder"])
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engines = {k: runtime.deserialize_cuda_engine((self.engine_dir / f).read_bytes())
                         for k, f in meta["files"].items()}
        if any(e is None for e in self._engines.values()):
            raise BackendError(f"TensorRT could not deserialize the engines in {self.engine_dir}")
        self._stream = torch.cuda.Stream(device=self.device)
        self._vision_ctx = self._engines["vision"].create_execution_context()
        self._prefill_ctx = self._engines["decoder"].create_execution_context()
        self._step_ctx = self._engines["decoder"].create_execution_context()
        self._step_ctx.set_optimization_profile_async(1, self._stream.cuda_stream)
        self._no_image = torch.zeros((1, 1, self.embed_dim), dtype=torch.float32, device=self.device)

    # -- Backend ---------------------------------------------------------------------------
    def encode_image(self, pixel_values: np.ndarray) -> Any:
        torch = self._torch
        pv = torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32)).to(self.device)
        out = torch.empty((pv.shape[0], int(self.manifest["image_tokens"]), self.embed_dim),
                          dtype=torch.float32, device=self.device)
        self._execute(self._vision_ctx, {"pixel_values": pv}, {"image_embeds": out})
        return out

    def prefill(self, image_embeds: Any, input_ids: Sequence[int], image_mask: Sequence[int],
                cache: Optional[TrtCache] = None) -> Tuple[np.ndarray, TrtCache]:
        if cache is not None or image_embeds is None:
            image_embeds, image_mask = None, [0] * len(input_ids)
        logits, caches = self._run([cache], [list(input_ids)], image_embeds, [list(image_mask)])
        return logits[0], caches[0]

    def prefill_batch(self, caches: List[Any], chunks: List[List[int]]) -> Tuple[np.ndarray, List[Any]]:
        return self._run(list(caches), [list(c) for c in chunks], None, [[0] * len(c) for c in chunks])

    def decode(self, cache: TrtCache, token_id: int) -> Tuple[np.ndarray, TrtCache]:
        logits, caches = self._run([cache], [[int(token_id)]], None, [[0]])
        return logits[0], caches[0]

    def decode_batch(self, caches: List[Any], token_ids: List[int]) -> Tuple[np.ndarray, List[Any]]:
        return self._run(list(caches), [[int(t)] for t in token_ids], None, [[0] for _ in token_ids])

    def fork(self, cache: TrtCache) -> TrtCache:
        return TrtCache(list(cache.kv), cache.length)   # tensors are never written in place

    def close(self) -> None:
        self._vision_ctx = self._prefill_ctx = self._step_ctx = None
        self._engines = {}
        self._torch.cuda.empty_cache()

    # -- internals ---------------------------------------------------------------------------
    def _execute(self, ctx: Any, inputs: dict, outputs: dict) -> None:
        for name, t in inputs.items():
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise BackendError(f"input {name} shape {tuple(t.shape)} is outside the engine's profile "
                                   "(rebuild engines with larger limits)")
            ctx.set_tensor_address(name, t.data_ptr())
        for name, t in outputs.items():
            ctx.set_tensor_address(name, t.data_ptr())
        self._stream.wait_stream(self._torch.cuda.current_stream())
        if not ctx.execute_async_v3(self._stream.cuda_stream):
            raise BackendError("TensorRT execution failed")
        self._stream.synchronize()

    def _run(self, caches: List[Optional[TrtCache]], chunks: List[List[int]], image_embeds: Any,
             masks: List[List[int]]) -> Tuple[np.ndarray, List[TrtCache]]:
        torch = self._torch
        bsz = len(chunks)
        pasts = [0 if c is None else int(c.length) for c in caches]
        rows = pack_rows(pasts, chunks, masks, self.pad_token_id)
        pmax, smax, lens = rows.pmax, rows.smax, rows.lens
        ids, pos, img, att = rows.input_ids, rows.position_ids, rows.image_mask, rows.attention_mask
        dev = self.device
        inputs = {"input_ids": torch.from_numpy(ids).to(dev), "image_mask": torch.from_numpy(img).to(dev),
                  "position_ids": torch.from_numpy(pos).to(dev), "attention_mask": torch.from_numpy(att).to(dev),
                  "image_embeds": self._no_image if image_embeds is None else image_embeds.float().contiguous()}
        for j, name in enumerate(self._kv_names):
            buf = torch.zeros((bsz, self.heads, pmax, self.head_dim), dtype=torch.float32, device=dev)
            for b, c in enumerate(caches):
                if c is not None and c.length:
                    buf[b, :, :c.length] = c.kv[j][0]
            inputs[name] = buf
        outputs = {"logits": torch.empty((bsz, self.vocab_size), dtype=torch.float32, device=dev)}
        for name in self._out_names[1:]:
            outputs[name] = torch.empty((bsz, self.heads, pmax + smax, self.head_dim), dtype=torch.float32, device=dev)
        step = smax == 1 and pmax > 0 and image_embeds is None
        self._execute(self._step_ctx if step else self._prefill_ctx, inputs, outputs)
        logits = outputs["logits"].cpu().numpy()
        if not np.isfinite(logits).all():
            raise BackendError("the engine produced non-finite logits (fp16 overflow? try precision: bf16 or fp32)")
        presents = [outputs[n] for n in self._out_names[1:]]
        new = [TrtCache([torch.cat([p[b:b + 1, :, :past], p[b:b + 1, :, pmax + smax - n:]], dim=2) for p in presents],
                        past + n) for b, (past, n) in enumerate(zip(pasts, lens))]
        return logits, new
