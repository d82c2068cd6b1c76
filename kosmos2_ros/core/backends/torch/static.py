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

from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from ...defaults import DTYPE_NAMES
from ..base import BackendError, BackendUnavailable
from ..device_graph import DeviceGraphBackend, StepBuffers
from ..kv_cache import ARENA_BUDGET_MB
from ..modules import MIN_POSITION_ROWS, decoder_module, vision_module
from .loading import load_model, resolve_device


def static_modules(model_dir: str, precision: str, allow_pickle: bool = False, model: Any = None) -> Tuple[Any, Any, Any]:
    """(decoder, vision, config): the mixed-precision modules the static path runs, on the CPU. They hold the
    model's own weights; an fp32 model given in is copied to the reduced dtype (and can then go)."""
    import torch

    given = model is not None
    model = model if given else load_in(model_dir, precision, allow_pickle)
    with torch.no_grad():
        decoder, vision = decoder_module(model, precision), vision_module(model, precision)
        if precision != "fp32":    # the mixed modules' fp32 islands (the fp32 vision module is transformers' own)
            islands = decoder.fp32_parameters() + vision.fp32_parameters()
            if given:      # a model given in the runtime dtype keeps its rounded values there
                for p in islands:
                    p.data = p.data.float()
            else:
                restore_fp32(model_dir, model, islands)
    return decoder, vision, model.config


def load_in(model_dir: str, precision: str, allow_pickle: bool) -> Any:
    """The checkpoint read once, in the runtime dtype where its weights are safetensors (fp16: 3.3 GB for the
    full-size model, not 6.6 GB of fp32 and then fp16 copies, on a Jetson whose 8 or 16 GB are shared with
    the GPU); pickle weights are read in fp32 and copied."""
    if precision != "fp32" and any(Path(model_dir).glob("*.safetensors")):
        import torch

        return read_in_dtype(model_dir, getattr(torch, DTYPE_NAMES[precision]))
    return load_model(model_dir, "fp32", allow_pickle)


#: safetensors' dtype names -> torch's.
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
#: Bytes read at a time while converting a tensor.
READ_CHUNK = 64 << 20


def read_in_dtype(model_dir: str, dtype: Any) -> Any:
    """transformers' Kosmos-2 made empty in `dtype` (no random init) and filled from its safetensors files
    with plain reads, a chunk at a time, converted as they come.

    Why not `from_pretrained(dtype=...)`: it maps the files, and every page it reads counts in the process's
    resident set while the file is mapped (peak 9.9 GB for the 6.35 GB fp32 checkpoint read into 3.2 GB of
    fp16). The safetensors format is an 8-byte header length, a JSON header (name -> dtype, shape, byte
    offsets) and the data; the `safetensors` package reads it only through a mapping.
    """
    import json

    import torch
    from transformers import AutoConfig, Kosmos2ForConditionalGeneration
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            model = Kosmos2ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    model.tie_weights()                               # as from_pretrained does: the file holds a tied weight once
    state = model.state_dict(keep_vars=True)          # tied weights: one tensor under both names
    filled = set()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb", buffering=0) as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            for name, info in header.items():
                target = state.get(name)
                if name == "__metadata__" or target is None:
                    continue
                start, end = info["data_offsets"]
                source = getattr(torch, SAFETENSORS_DTYPES[info["dtype"]])
                if list(info["shape"]) != list(target.shape):
                    raise BackendUnavailable(f"{path.name}: {name} is {info['shape']}, the model's {list(target.shape)}")
                _read_into(f, 8 + size + start, end - start, source, target.data.view(-1))
                filled.add(id(target))
    missing = sorted(name for name, t in state.items() if id(t) not in filled)
    if missing:
        raise BackendUnavailable(f"{model_dir}: no weights for {', '.join(missing[:3])} in its safetensors files")
    return model.eval()


def _read_into(f: Any, offset: int, nbytes: int, source: Any, flat: Any) -> None:
    """Bytes [offset, offset + nbytes) of `f`, elements of `source` dtype, into `flat`, converted."""
    import torch

    item = torch.empty((), dtype=source).element_size()
    chunk = torch.empty(max(item, READ_CHUNK // item * item), dtype=torch.uint8)
    f.seek(offset)
    done = 0
    while done < nbytes:
        n = min(nbytes - done, chunk.numel())
        got = f.readinto(memoryview(chunk.numpy())[:n])
        if got != n:
            raise BackendUnavailable(f"{f.name}: file ends inside a tensor (truncated checkpoint?)")
        values = chunk[:n].view(source)
        at = done // item
        flat[at:at + values.numel()].copy_(values)
        done += n


def restore_fp32(model_dir: str, model: Any, params: List[Any]) -> None:
    """Give the parameters the mixed graphs keep in fp32 (LayerNorms, the ViT's embeddings, the image-to-text
    projection: tens of MB) their fp32 values from the checkpoint, so a model loaded in fp16 / bf16 computes
    exactly what one loaded in fp32 and cast does. Those already fp32 are left alone."""
    import torch
    from safetensors import safe_open

    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    wanted = {names[id(p)]: p for p in params if p.dtype != torch.float32}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in set(f.keys()) & set(wanted):
                wanted.pop(name).data = f.get_tensor(name).to(torch.float32)
    if wanted:
        raise BackendUnavailable(f"{model_dir}: no fp32 weights for {', '.join(sorted(wanted)[:3])} in its "
                                 "safetensors files (a checkpoint saved by another transformers?)")


class TorchStaticBackend(DeviceGraphBackend):
    name = "torch"
    mode = "static"
    encodes_batches = True
    batches_images = True

    def __init__(self, model_dir: str, device: str = "auto", precision: str = "fp32",
                 allow_pickle: bool = False, model: Any = None, cuda_graph: bool = True,
                 arena_budget_mb: float = ARENA_BUDGET_MB) -> None:
        import torch

        if precision not in DTYPE_NAMES:
            raise ValueError(f"precision must be one of {sorted(DTYPE_NAMES)}, got {precision!r}")
        device = resolve_device(device)
        if device == "cpu" and precision == "fp16":
            raise BackendUnavailable("fp16 on CPU is not supported by torch matmuls; use fp32 or bf16 on CPU")
        self.precision = precision
        decoder, vision, config = static_modules(model_dir, precision, allow_pickle, model)
        tcfg = config.text_config
        layers, heads, dim = int(tcfg.layers), int(tcfg.attention_heads), int(tcfg.embed_dim)
        self.vocab_size = int(tcfg.vocab_size)
        self.pad_token_id = int(tcfg.pad_token_id if tcfg.pad_token_id is not None else 1)
        self.image_tokens = int(config.latent_query_num)
        self._decoder, self._vision = decoder.to(device), vision.to(device)
        del decoder, vision
        self._kv_names = [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
        self._new_names = [f"new_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
        kv_dtype = getattr(torch, DTYPE_NAMES[precision])
        self._init_device(torch, device, kv_dtype, {}, 2 * layers, heads, dim // heads, dim,
                          MIN_POSITION_ROWS - self.pad_token_id - 2, cuda_graph, arena_budget_mb)

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
