"""onnxruntime backend: the exported graphs (`export`, beside it) behind the `Backend` interface.

CPU here; CUDA when onnxruntime-gpu is installed. The graphs are exported into
`artifacts_dir` on first use (keyed by the model's hash and the export version). fp32 is the
reference the fp16/bf16 graph variants (TensorRT's strongly typed engines) are checked against;
int8 and int4 run graphs quantized from it (`quantize`) for CPUs and small Jetsons.

Prefill runs rows together for real: several caches of different lengths are packed into one
batch, with holes in the key/value tensors masked out by `attention_mask` and positions
passed explicitly, so each row computes what it would alone (masked keys get exactly zero
attention weight). Decode steps run on a static arena (`kv_cache`): the past is fed as is and
only the new column is written, the same scheme the TensorRT backend replays as a CUDA graph.
Frames of several cameras run together too: the vision graph takes a batch of images, and the
decoder takes one image per row (`image_embeds` [rows, 64, D]).
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ...defaults import ARTIFACTS_DIR, QUANTIZED_PRECISIONS
from ..base import BackendError, BackendUnavailable
from ..graph import GraphBackend
from ..kv_cache import NUMPY, ArenaPool, KVCache, appended, pack_appends, packed_past
from . import PRECISIONS, export, quantize
from .quantize import QuantizeError

#: The cache type of this backend (kept for callers that name it).
OrtCache = KVCache


def providers_for(device: str, available: Sequence[str]) -> List[str]:
    device = (device or "auto").lower()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise BackendUnavailable(
                f"device {device!r} requested but onnxruntime has no CUDAExecutionProvider "
                f"(available: {', '.join(available)}); pip install onnxruntime-gpu, or use device: cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxBackend(GraphBackend):
    name = "onnxruntime"
    encodes_batches = True     # the vision graph has a batch axis

    def __init__(self, model_dir: str, device: str = "auto", precision: str = "fp32",
                 artifacts_dir: str = ARTIFACTS_DIR, allow_pickle: bool = False, model: Any = None,
                 threads: int = 0) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable(f"onnxruntime Python package not importable ({exc}); "
                                     "pip install onnxruntime (or onnxruntime-gpu)") from None
        if precision not in PRECISIONS:
            raise BackendUnavailable(f"the onnxruntime backend runs precisions {', '.join(PRECISIONS)}; "
                                     f"{precision!r} needs backend: tensorrt or torch")
        self.precision = precision
        try:
            self.graph_dir, self.manifest = export.ensure_exported(
                model_dir, artifacts_dir, allow_export=True, model=model, allow_pickle=allow_pickle,
                precision=precision)
        except QuantizeError as exc:
            raise BackendUnavailable(str(exc)) from exc
        m = self.manifest
        files = export.graph_files(m, precision)
        self.caveat = quantize.caveat(m["variants"][precision]) if precision in QUANTIZED_PRECISIONS else ""
        self.vocab_size = int(m["vocab_size"])
        self.pad_token_id = int(m["pad_token_id"])
        self.layers, self.heads, self.head_dim = int(m["layers"]), int(m["heads"]), int(m["head_dim"])
        self.embed_dim = int(m["embed_dim"])
        self.max_positions = int(m["max_positions"])
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
        if precision in QUANTIZED_PRECISIONS and str(device).startswith("cuda"):
            raise BackendUnavailable(f"{precision} runs on the CPU (onnxruntime's quantized kernels); use device: cpu "
                                     "(or auto)")
        # The quantized graphs' kernels are CPU kernels: on CUDA they would fall back with copies between devices.
        self.providers = providers_for("cpu" if precision in QUANTIZED_PRECISIONS else device,
                                       ort.get_available_providers())
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self._vision = ort.InferenceSession(str(self.graph_dir / files["vision"]), opts, providers=self.providers)
        self._decoder = ort.InferenceSession(str(self.graph_dir / files["decoder"]), opts, providers=self.providers)
        self._kv_names = list(m["inputs"]["decoder"][5:])
        self._no_image = np.zeros((1, 1, self.embed_dim), dtype=np.float32)
        self._limit = self.max_positions - self.pad_token_id - 2
        self._ops = NUMPY
        self._arenas = ArenaPool(NUMPY, len(self._kv_names), self.heads, self.head_dim, self._limit)

    # -- Backend ---------------------------------------------------------------------------
    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        pv = np.ascontiguousarray(pixel_values, dtype=np.float32)
        return self._vision.run(["image_embeds"], {"pixel_values": pv})[0]

    def prefill_images(self, image_embeds: Sequence[Any], input_ids: Sequence[int],
                       image_mask: Sequence[int]) -> List[KVCache]:
        """The same prompt head on several frames' images in one decoder run, one image per row."""
        if len(image_embeds) < 2:
            return super().prefill_images(image_embeds, input_ids, image_mask)
        n = len(image_embeds)
        embeds = np.concatenate([np.asarray(e, dtype=np.float32) for e in image_embeds])
        _, caches = self._append([None] * n, [list(input_ids)] * n, embeds, [list(image_mask)] * n)
        return caches

    def decode_batch(self, caches: List[Any], token_ids: List[int]) -> Tuple[np.ndarray, List[Any]]:
        """One step for every row on its arena: the past is fed as is, one column written per row."""
        if self._decoder is None:
            raise BackendError("backend is closed")
        arena, rows = self._arenas.arena_for(caches)
        feeds = arena.step_feeds(rows, [int(t) for t in token_ids], self.pad_token_id)
        inputs = {"input_ids": feeds.input_ids, "image_mask": np.zeros_like(feeds.input_ids),
                  "position_ids": feeds.position_ids, "attention_mask": feeds.attention_mask,
                  "image_embeds": self._no_image}
        for j, name in enumerate(self._kv_names):
            inputs[name] = arena.kv[j]
        out = self._call(inputs)
        logits = out[0][feeds.active]
        self._check(logits)
        arena.write_host(feeds, out[1:])
        return logits, arena.advance(feeds)

    def close(self) -> None:
        if self._decoder is not None:
            self._arenas.clear()
        self._vision = self._decoder = None

    # -- graph calls ---------------------------------------------------------------------------
    def _call(self, inputs: dict) -> list:
        if self._decoder is None:
            raise BackendError("backend is closed")
        try:
            return self._decoder.run(None, inputs)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise BackendError(f"onnxruntime decoder failed: {exc}") from exc

    def _append(self, caches: List[Optional[KVCache]], chunks: List[List[int]], image_embeds: Any,
                masks: List[List[int]]) -> Tuple[np.ndarray, List[KVCache]]:
        bsz = len(chunks)
        rows = pack_appends(caches, chunks, masks, self.pad_token_id, self._limit)
        pmax, smax, lens = rows.pmax, rows.smax, rows.lens
        feeds = {"input_ids": rows.input_ids, "image_mask": rows.image_mask, "position_ids": rows.position_ids,
                 "attention_mask": rows.attention_mask,
                 "image_embeds": self._no_image if image_embeds is None
                 else np.ascontiguousarray(image_embeds, dtype=np.float32)}
        for j, name in enumerate(self._kv_names):
            if bsz == 1 and caches[0] is not None:
                feeds[name] = np.ascontiguousarray(caches[0].layer(j))
            else:
                feeds[name] = packed_past(caches, j, pmax, self.heads, self.head_dim, NUMPY)
        out = self._call(feeds)
        logits, new = out[0], out[1:]
        self._check(logits)
        return logits, appended(caches, lens, smax, new, NUMPY)

