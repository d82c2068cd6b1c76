"""TensorRT engine build and cache (TensorRT 10 Python API, as on JetPack 6 and desktop).

Engines are built from the ONNX graphs of `core.export`. The cache key holds everything that
makes an engine unusable elsewhere: the model (hash of config + weights), the export version,
the TensorRT version, the GPU's compute capability and the precision, so an upgrade rebuilds
instead of crashing on deserialisation. tensorrt is imported only inside functions.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .backends.base import BackendUnavailable

PRECISIONS = ("fp16", "bf16", "fp32")


@dataclass(frozen=True)
class EngineLimits:
    """Shape ranges of the optimisation profiles (the engine refuses anything outside them)."""
    max_batch: int = 8          # rows decoded together
    max_prompt: int = 256       # tokens in one prefill chunk
    max_context: int = 1024     # past + new tokens
    image_tokens: int = 64


def require_tensorrt() -> Any:
    """Import tensorrt (TensorRT 10) or raise BackendUnavailable naming what is missing."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(
            f"tensorrt Python package not importable ({exc}); install TensorRT 10 "
            "(pip install tensorrt, or JetPack 6 on Jetson), or use backend: onnxruntime / torch") from None
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise BackendUnavailable(f"TensorRT {trt.__version__} found; the tensorrt backend needs TensorRT >= 10")
    return trt


def require_cuda_torch() -> Any:
    """torch with a CUDA device: the TensorRT backend's buffers and stream are torch CUDA tensors."""
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailable(f"torch not importable ({exc}); the tensorrt backend uses torch CUDA tensors") from None
    if not torch.cuda.is_available():
        raise BackendUnavailable(f"no CUDA device visible to torch {torch.__version__} (CPU-only build or no GPU); "
                                 "the tensorrt backend needs an NVIDIA GPU with a CUDA build of torch")
    return torch


def engine_key(model_hash: str, trt_version: str, compute_capability: Tuple[int, int], precision: str,
               export_version: str, limits: EngineLimits = EngineLimits()) -> str:
    """Directory name for one set of engines; any change in its parts means a rebuild."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    cc = f"sm{compute_capability[0]}{compute_capability[1]}"
    lim = f"b{limits.max_batch}p{limits.max_prompt}c{limits.max_context}"
    return f"{model_hash}-x{export_version}-trt{trt_version}-{cc}-{precision}-{lim}"


def engine_dir(artifacts_dir: str, model_dir: str, precision: str, trt_version: str,
               compute_capability: Tuple[int, int], limits: EngineLimits = EngineLimits()) -> Path:
    from . import export

    root = Path(os.path.expanduser(artifacts_dir))
    key = engine_key(export.model_hash(model_dir, str(root)), trt_version, compute_capability, precision,
                     export.EXPORT_VERSION, limits)
    return root / "engines" / key


def arena_limit(manifest: dict, limits: EngineLimits) -> int:
    """Longest row a decode-step arena may hold: its capacity + 1 columns plus the new token stay
    within the step profile (`max_context` - 1 past), and positions within the exported table."""
    return min(limits.max_context - 2, int(manifest["max_positions"]) - int(manifest["pad_token_id"]) - 2)


def profiles(manifest: dict, limits: EngineLimits) -> Dict[str, list]:
    """Optimisation profiles (min, opt, max) per graph input.

    The decoder gets two: 0 for prefill (long chunks, past may be 0) and 1 for the decode step
    (one token per row), so each is tuned for its shapes.
    """
    heads, hd, dim = manifest["heads"], manifest["head_dim"], manifest["embed_dim"]
    size, n_img = manifest["image_size"], manifest["image_tokens"]
    mb, mp, mc = limits.max_batch, limits.max_prompt, limits.max_context
    vision = [{"pixel_values": ((1, 3, size, size), (1, 3, size, size), (1, 3, size, size))}]

    def dec(seq, past, batch):
        shapes = {
            "input_ids": ((1, seq[0]), (batch[1], seq[1]), (batch[2], seq[2])),
            "image_mask": ((1, seq[0]), (batch[1], seq[1]), (batch[2], seq[2])),
            "position_ids": ((1, seq[0]), (batch[1], seq[1]), (batch[2], seq[2])),
            "image_embeds": ((1, 1, dim), (1, n_img, dim), (1, n_img, dim)),
            "attention_mask": ((1, seq[0] + past[0]), (batch[1], seq[1] + past[1]), (batch[2], seq[2] + past[2])),
        }
        for name in manifest["inputs"]["decoder"][5:]:
            shapes[name] = ((1, heads, past[0], hd), (batch[1], heads, past[1], hd), (batch[2], heads, past[2], hd))
        return shapes

    prefill = dec((1, n_img + 16, mp), (0, 0, mc - 1), (1, 1, mb))
    # The step reads a whole arena: capacity + 1 columns (kv_cache.capacity_for: multiples of 64).
    step = dec((1, 1, 1), (1, 129, mc - 1), (1, min(4, mb), mb))
    return {"vision": vision, "decoder": [prefill, step]}


def build_engine(onnx_path: Path, out_path: Path, precision: str, shape_profiles: list,
                 workspace_gb: float = 4.0, log: Any = print) -> Path:
    """Parse an ONNX graph (external weights beside it) and serialise an engine to `out_path`."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)   # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    for shapes in shape_profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.rename(out_path)
    log(f"built {out_path.name} ({precision}) in {time.perf_counter() - t0:.0f} s")
    return out_path


def read_engines(out: Path) -> Optional[Tuple[Path, dict]]:
    """(directory, metadata) of a complete set of engines in `out`, or None."""
    try:
        meta = json.loads((out / "engines.json").read_text())
    except (OSError, ValueError):
        return None
    if not all((out / f).is_file() for f in meta.get("files", {}).values()) or not meta.get("files"):
        return None
    return out, meta


def other_limits(out: Path) -> Optional[Tuple[Path, dict]]:
    """Engines for the same model, TensorRT, GPU and precision built with other shape limits
    (`kosmos2-build-engines --max-context ...`): the largest, so the node can use them."""
    prefix = out.name.rsplit("-", 1)[0] + "-"
    sets = [s for s in (read_engines(d) for d in sorted(out.parent.glob(prefix + "*"))) if s is not None]
    if not sets:
        return None
    return max(sets, key=lambda s: (s[1]["limits"]["max_context"], s[1]["limits"]["max_batch"],
                                    s[1]["limits"]["max_prompt"]))


def ensure_engines(model_dir: str, artifacts_dir: str, precision: str = "fp16", allow_build: bool = False,
                   limits: EngineLimits = EngineLimits(), device_index: int = 0,
                   log: Any = print) -> Tuple[Path, dict]:
    """Engines for this model/GPU/TensorRT/precision, built from the ONNX graphs if allowed."""
    trt = require_tensorrt()
    torch = require_cuda_torch()
    from . import export

    cc = torch.cuda.get_device_capability(device_index)
    out = engine_dir(artifacts_dir, model_dir, precision, trt.__version__, cc, limits)
    found = read_engines(out) or (None if allow_build else other_limits(out))
    if found is not None:
        return found
    if not allow_build:
        raise BackendUnavailable(f"no TensorRT engines in {out} for this model, TensorRT {trt.__version__}, "
                                 f"sm{cc[0]}{cc[1]} and {precision}; run `kosmos2-build-engines --model {model_dir}` "
                                 "(or `ros2 run kosmos2_ros build_engines`), or set build_engines: true")
    graphs, manifest = export.ensure_exported(model_dir, artifacts_dir, allow_export=True, log=log)
    shapes = profiles(manifest, limits)
    files = {"vision": "vision.plan", "decoder": "decoder.plan"}
    for name in ("vision", "decoder"):
        build_engine(graphs / manifest["files"][name], out / files[name], precision, shapes[name], log=log)
    meta = {"files": files, "precision": precision, "tensorrt": trt.__version__, "compute_capability": list(cc),
            "limits": limits.__dict__, "manifest": manifest}
    (out / "engines.json").write_text(json.dumps(meta, indent=1))
    return out, meta

