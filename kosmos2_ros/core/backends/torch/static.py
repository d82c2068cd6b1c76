"""torch's static path: the hand-written decoder (`modules.DecoderGraph`) over a static KV arena,
the decode step replayed as a CUDA graph. What the torch backend runs on a GPU by default.

The same modules the ONNX graphs (and so the TensorRT engines) are traced from, run as they are:
fp32 computes what transformers computes (the modules are tested equal to it on every path), fp16
/ bf16 are the mixed graphs of `onnx.export.REDUCED_PRECISION` (matrix products and the KV cache in
the reduced type; residual stream, LayerNorm, softmax and logits in fp32). Everything around the
decoder (packed prefill, the arena, the step's buffers and its CUDA graph) is
`device_graph.DeviceGraphBackend`, which the TensorRT backend shares. On the CPU it runs the same
arithmetic without streams or graphs (how CI proves its tokens equal `generate`).
"""
from __future__ import annotations

from typing import Any, Dict

import numpy as np

from ...defaults import DTYPE_NAMES
from ..base import BackendError, BackendUnavailable
from ..device_graph import DeviceGraphBackend, StepBuffers
from ..modules import MIN_POSITION_ROWS, decoder_module, vision_module
from .backend import load_model, resolve_device


class TorchStaticBackend(DeviceGraphBackend):
    name = "torch"
    mode = "static"
    encodes_batches = True
    batches_images = True

    def __init__(self, model_dir: str, device: str = "auto", precision: str = "fp32",
                 allow_pickle: bool = False, model: Any = None, cuda_graph: bool = True) -> None:
        import torch

        if precision not in DTYPE_NAMES:
            raise ValueError(f"precision must be one of {sorted(DTYPE_NAMES)}, got {precision!r}")
        device = resolve_device(device)
        if device == "cpu" and precision == "fp16":
            raise BackendUnavailable("fp16 on CPU is not supported by torch matmuls; use fp32 or bf16 on CPU")
        self.precision = precision
        model = model if model is not None else load_model(model_dir, "fp32", allow_pickle)
        tcfg = model.config.text_config
        layers, heads, dim = int(tcfg.layers), int(tcfg.attention_heads), int(tcfg.embed_dim)
        self.vocab_size = int(tcfg.vocab_size)
        self.pad_token_id = int(tcfg.pad_token_id if tcfg.pad_token_id is not None else 1)
        self.image_tokens = int(model.config.latent_query_num)
        # fp32: the modules hold the model's own weights; fp16 / bf16: reduced copies (the fp32 model goes).
        with torch.no_grad():
            self._decoder = decoder_module(model, precision).to(device)
            self._vision = vision_module(model, precision).to(device)
        del model
        self._kv_names = [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
        self._new_names = [f"new_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
        kv_dtype = getattr(torch, DTYPE_NAMES[precision])
        self._init_device(torch, device, kv_dtype, {}, 2 * layers, heads, dim // heads, dim,
                          MIN_POSITION_ROWS - self.pad_token_id - 2, cuda_graph)

    # -- Backend ---------------------------------------------------------------------------
    def encode_image(self, pixel_values: np.ndarray) -> Any:
        torch = self._torch
        with self._on_device(), torch.no_grad():
            pv = torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32)).to(self.device)
            out = self._vision(pv)
            self._sync()
        return out

    def close(self) -> None:
        super().close()
        self._decoder = self._vision = None

    # -- DeviceGraphBackend ----------------------------------------------------------------
    def _run_decoder(self, inputs: Dict[str, Any], outputs: Dict[str, Any]) -> None:
        if self._decoder is None:
            raise BackendError("backend is closed")
        out = self._decoder(*(inputs[n] for n in ("input_ids", "image_embeds", "image_mask", "position_ids",
                                                  "attention_mask")), *(inputs[n] for n in self._kv_names))
        outputs["logits"].copy_(out[0])
        for name, new in zip(self._new_names, out[1:]):
            outputs[name].copy_(new)

    def _launch_step(self, step: StepBuffers) -> None:
        """The decoder over the whole arena (unused columns masked), its outputs into the step's buffers."""
        kv = step.arena.kv
        out = self._decoder(step.inputs["input_ids"], self._no_image, step.inputs["image_mask"],
                            step.inputs["position_ids"], step.inputs["attention_mask"],
                            *(kv[j] for j in range(kv.shape[0])))
        step.logits.copy_(out[0])
        step.new.copy_(self._torch.stack(out[1:]))
