"""TensorRT engine build and cache: one strongly typed build path for TensorRT 10.x and 11.x.

TensorRT 11 (desktop `pip install tensorrt`, 11.4 today) removed weak typing: no precision
builder flags (`BuilderFlag.FP16`, `BF16`, ...), every network is strongly typed and each
tensor's type comes from the graph. JetPack 6 stays on TensorRT 10.3, where strong typing is
opted into with `NetworkDefinitionCreationFlag.STRONGLY_TYPED` (TensorRT 11 keeps that flag,
deprecated and ignored). So engines are built from graphs that already carry their precision
(`onnx.export`: fp32, or the fp16 / bf16 variants), always as strongly typed networks, with no
precision flag: the same code on both. `test/test_tensorrt_api.py` holds the code to the API
both versions have.

The cache key holds everything that makes an engine unusable elsewhere: the model (hash of
config + weights), the export version, the TensorRT version, the GPU's compute capability and
the precision, so an upgrade rebuilds instead of crashing on deserialisation. tensorrt is
imported only inside functions.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ...defaults import PRECISIONS
from ..base import BackendError, BackendUnavailable
from ..onnx import export

#: The oldest TensorRT the engines are built and run with: JetPack 6's (strongly typed ONNX
#: parsing with bf16 and the name-based I/O API of 10.x; the API guard test checks against it).
MIN_TENSORRT = (10, 3)
#: Compute capabilities whose GPUs run a precision natively: fp16 from 5.3 (except sm61, the
#: consumer Pascal parts at 1/64 rate), bf16 from 8.0 (Ampere, Jetson Orin sm87 and newer).
FP16_SM_EXCLUDED = ((6, 1),)
MIN_SM = {"fp16": (5, 3), "bf16": (8, 0), "fp32": (0, 0)}


@dataclass(frozen=True)
class EngineLimits:
    """Shape ranges of the optimisation profiles (the engine refuses anything outside them)."""
    max_batch: int = 8          # rows decoded together
    max_prompt: int = 256       # tokens in one prefill chunk
    max_context: int = 1024     # past + new tokens
    image_tokens: int = 64


def require_tensorrt() -> Any:
    """Import tensorrt (10.3 or newer, 10.x or 11.x) or raise BackendUnavailable naming what is missing."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(
            f"tensorrt Python package not importable ({exc}); install TensorRT >= 10.3 "
            "(pip install tensorrt on a desktop, 11.x; JetPack 6 on Jetson, 10.3), or use backend: onnxruntime / torch"
        ) from None
    check_tensorrt_version(str(trt.__version__))
    return trt


def version_tuple(version: str) -> Tuple[int, int]:
    """(major, minor) of a TensorRT version string such as "10.3.0.30" or "11.4.1.post1"."""
    parts = [int(re.match(r"\d*", piece).group() or 0) for piece in str(version).split(".")[:2]] + [0, 0]
    return parts[0], parts[1]


def check_tensorrt_version(version: str) -> None:
    """Refuse a TensorRT older than MIN_TENSORRT, saying what to install."""
    if version_tuple(version) < MIN_TENSORRT:
        need = ".".join(map(str, MIN_TENSORRT))
        raise BackendUnavailable(
            f"TensorRT {version} found; the tensorrt backend needs TensorRT >= {need} (JetPack 6 ships 10.3; "
            "on a desktop: pip install -U tensorrt), or use backend: onnxruntime / torch")


def check_precision(precision: str, compute_capability: Tuple[int, int]) -> None:
    """Refuse a precision the GPU has no native support for, naming the precisions it has."""
    cc = tuple(compute_capability)
    ok = [p for p in ("fp16", "bf16") if cc >= MIN_SM[p] and not (p == "fp16" and cc in FP16_SM_EXCLUDED)]
    if precision == "fp32" or precision in ok:
        return
    need = "compute capability >= 8.0 (Ampere, Jetson Orin or newer)" if precision == "bf16" else \
        "compute capability 5.3, 6.0, 6.2 or >= 7.0"
    instead = " or ".join([*ok, "fp32"])
    raise BackendUnavailable(f"this GPU (sm{cc[0]}{cc[1]}) has no native {precision} ({precision} needs {need}); "
                             f"use precision {instead} (kosmos2-build-engines --precision {instead.split()[0]})")


def engine_mismatch(meta: dict, trt_version: str, compute_capability: Tuple[int, int]) -> Optional[str]:
    """Why engines described by `meta` (engines.json) cannot run here, or None when they can."""
    built = (str(meta.get("tensorrt")), tuple(meta.get("compute_capability", ())))
    here = (str(trt_version), tuple(compute_capability))
    if built == here:
        return None
    return (f"engines built by TensorRT {built[0]} for sm{''.join(map(str, built[1]))}, "
            f"this is TensorRT {here[0]} on sm{''.join(map(str, here[1]))}")


def rebuild_hint(model_dir: str, precision: str) -> str:
    return (f"rebuild them: kosmos2-build-engines --model {model_dir} --precision {precision} "
            "(or set build_engines: true)")


def network_flags(trt: Any) -> int:
    """create_network flags for a strongly typed network: the flag 10.x needs; 11.x is always
    strongly typed and keeps the flag only for compatibility (0 if a later release drops it).

    The bit comes from the installed bindings, never a constant: STRONGLY_TYPED is 1 in 10.3's
    NvInfer.h and 0 in 11 (EXPLICIT_BATCH, bit 0 in 10.x, is gone; bit 1 is now
    PREFER_JIT_PYTHON_PLUGINS)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


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


def cuda_device(torch: Any, device: str) -> str:
    """`auto` / `cuda` -> "cuda"; `cuda:N` checked against the GPUs torch sees."""
    device = str(device or "auto")
    if device in ("auto", "cuda"):
        return "cuda"
    if not device.startswith("cuda:"):
        raise BackendUnavailable(f"the tensorrt backend runs on CUDA devices, got device {device!r}")
    index, count = torch.device(device).index or 0, torch.cuda.device_count()
    if index >= count:
        raise BackendUnavailable(f"device {device} does not exist: torch sees {count} CUDA device(s)")
    return device


def compute_capability(torch: Any, device: str) -> Tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(torch.device(device).index or 0))  # type: ignore[return-value]


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
    root = Path(os.path.expanduser(artifacts_dir))
    key = engine_key(export.model_hash(model_dir, str(root)), trt_version, compute_capability, precision,
                     export.EXPORT_VERSION, limits)
    return root / "engines" / key


def arena_limit(manifest: dict, limits: EngineLimits) -> int:
    """Longest row a decode-step arena may hold: its capacity + 1 columns plus the new token stay
    within the step profile (`max_context` - 1 past), and positions within the exported table."""
    return min(limits.max_context - 2, int(manifest["max_positions"]) - int(manifest["pad_token_id"]) - 2)


#: The decoder engine's optimisation profiles (`profiles`): prefill, then the decode step.
PREFILL_PROFILE, STEP_PROFILE = 0, 1


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

    prefill = dec((1, min(n_img + 16, mp), mp), (0, 0, mc - 1), (1, 1, mb))
    # The step reads a whole arena: capacity + 1 columns (kv_cache.capacity_for: multiples of 64).
    step = dec((1, 1, 1), (1, 129, mc - 1), (1, min(4, mb), mb))
    return {"vision": vision, "decoder": [prefill, step]}


_LOGGER: Any = None


def logger(trt: Any) -> Any:
    """The process's one trt.Logger: TensorRT keeps a single logger pointer and warns when another
    is given; builders and runtimes all take this one."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def timing_cache_path(artifacts_engines: Path, trt_version: str, compute_capability: Tuple[int, int]) -> Path:
    """One timing cache per TensorRT version and GPU, beside the engine sets: kernel timings
    measured in one build are reused by the next (builds on a Jetson Orin take long)."""
    cc = f"sm{compute_capability[0]}{compute_capability[1]}"
    return artifacts_engines / f"timing-trt{trt_version}-{cc}.cache"


def build_engine(onnx_path: Path, out_path: Path, precision: str, shape_profiles: list,
                 workspace_gb: float = 4.0, log: Any = print, timing_cache: Optional[Path] = None) -> Path:
    """Parse an ONNX graph (external weights beside it) and serialise an engine to `out_path`.

    The network is strongly typed: every tensor keeps the type the graph gives it, so the fp16 /
    bf16 graphs make fp16 / bf16 engines with no precision flag (there is none in TensorRT 11).
    fp32 engines clear TF32 (on by default, and strong typing does not turn it off: fp32 engines
    are held to exact token equality). The plan is written from TensorRT's own buffer after the
    builder, network and parser (which holds the weights) are freed: a 2.7 GB plan is never
    copied in host memory.
    """
    trt = require_tensorrt()
    builder = trt.Builder(logger(trt))
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger(trt))
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    timings = timing_cache or out_path.with_name("timing.cache")
    cache = config.create_timing_cache(timings.read_bytes() if timings.is_file() else b"")
    config.set_timing_cache(cache, False)
    for shapes in shape_profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    timing_data = config.get_timing_cache().serialize()
    del parser, network, config, builder, cache   # the parser's weights go before the plan is written
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _write(timings, timing_data)
    _write(out_path, serialized)
    log(f"built {out_path.name} ({precision}) in {time.perf_counter() - t0:.0f} s")
    return out_path


def _write(path: Path, buffer: Any) -> None:
    """Write a TensorRT host buffer (IHostMemory has the buffer protocol) atomically, without a copy."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")   # the timing cache is shared by engine folders
    with open(tmp, "wb") as fh:
        fh.write(buffer)
    os.replace(tmp, path)


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
                   limits: EngineLimits = EngineLimits(), device: str = "cuda",
                   log: Any = print) -> Tuple[Path, dict]:
    """Engines for this model/GPU/TensorRT/precision, built from the ONNX graphs if allowed
    (on `device`: the GPU they will run on, current while building; one process at a time, the
    others wait for it and use its engines)."""
    trt = require_tensorrt()
    torch = require_cuda_torch()
    cc = compute_capability(torch, device)
    check_precision(precision, cc)
    out = engine_dir(artifacts_dir, model_dir, precision, trt.__version__, cc, limits)
    found = read_engines(out) or (None if allow_build else other_limits(out))
    if found is not None:
        return found
    if not allow_build:
        raise BackendUnavailable(f"no TensorRT engines in {out} for this model, TensorRT {trt.__version__}, "
                                 f"sm{cc[0]}{cc[1]} and {precision}; run `kosmos2-build-engines --model {model_dir} "
                                 f"--precision {precision}` (or `ros2 run kosmos2_ros build_engines`), "
                                 "or set build_engines: true")
    graphs, manifest = export.ensure_exported(model_dir, artifacts_dir, allow_export=True, log=log,
                                              precision=precision)
    with export.build_lock(out, log, what="engines"):   # two nodes started together build once; the other waits
        found = read_engines(out)
        if found is not None:
            return found
        shapes = profiles(manifest, limits)
        files = {"vision": "vision.plan", "decoder": "decoder.plan"}
        sources = export.graph_files(manifest, precision)
        timings = timing_cache_path(out.parent, str(trt.__version__), cc)
        with torch.cuda.device(torch.device(cuda_device(torch, device))):   # TensorRT builds on the current GPU
            for name in ("vision", "decoder"):
                build_engine(graphs / sources[name], out / files[name], precision, shapes[name], log=log,
                             timing_cache=timings)
        meta = {"files": files, "precision": precision, "tensorrt": trt.__version__, "compute_capability": list(cc),
                "strongly_typed": True, "graphs": sources, "limits": limits.__dict__, "manifest": manifest}
        (out / "engines.json").write_text(json.dumps(meta, indent=1))
        return out, meta



def load_engines(trt: Any, engine_dir: Path, meta: dict, compute_capability: Tuple[int, int],
                 model_dir: str) -> Dict[str, Any]:
    """Deserialise a set of engines, or fail with one line saying why and how to rebuild them.

    Each plan is read through a read-only mmap (deserialize_cuda_engine takes any buffer), so no
    second host copy of a multi-GB plan is made; the pages are the file's.
    """
    precision = str(meta.get("precision", "fp16"))
    mismatch = engine_mismatch(meta, trt.__version__, compute_capability)
    if mismatch:
        raise BackendUnavailable(f"{engine_dir}: {mismatch}; {rebuild_hint(model_dir, precision)}")
    runtime = trt.Runtime(logger(trt))
    engines = {}
    for name, f in meta["files"].items():
        with open(engine_dir / f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as plan:
            engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise BackendUnavailable(f"TensorRT {trt.__version__} could not deserialise {engine_dir / f} (corrupt, or "
                                     f"built by another TensorRT or GPU); {rebuild_hint(model_dir, precision)}")
        engines[name] = engine
    return engines


def context(trt: Any, engine: Any, label: str, profile: Optional[int] = None, stream: int = 0,
            memory: Optional[Tuple[int, int]] = None, log: Any = print) -> Any:
    """An execution context; with `profile`, one that allocates device memory for that profile only
    (ON_PROFILE_CHANGE: the decode-step context does not reserve the prefill profile's scratch); with
    `memory` (address, bytes), one that uses that allocation (USER_MANAGED, `set_device_memory`: TensorRT's
    setDeviceMemoryV2, which several contexts may share as long as they never run at the same time).
    Logs the device memory it takes."""
    if profile is None:
        ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.STATIC)
        size = int(engine.device_memory_size_v2)
    else:
        strategy = (trt.ExecutionContextAllocationStrategy.USER_MANAGED if memory is not None
                    else trt.ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE)
        ctx = engine.create_execution_context(strategy)
        size = int(engine.get_device_memory_size_for_profile_v2(profile))
        # The profile first, then the memory sized for it (trtexec's order, samples/common/sampleInference.cpp):
        # a new context starts on profile 0, whose scratch is larger than the step profile's.
        if ctx is not None and not ctx.set_optimization_profile_async(profile, stream):
            raise BackendUnavailable(f"TensorRT could not select optimisation profile {profile} for the {label} context")
        if ctx is not None and memory is not None:
            if memory[1] < size:
                raise BackendError(f"{label}: shared scratch of {memory[1]} bytes, the profile needs {size}")
            ctx.set_device_memory(memory[0], memory[1])
    if ctx is None:
        raise BackendUnavailable(f"TensorRT could not create the {label} execution context (out of GPU memory?)")
    log(f"tensorrt: {label} context: {size / (1 << 20):.1f} MiB of device memory" + (" (shared)" if memory else ""))
    return ctx


#: TensorRT DataType member names -> torch dtype names (the I/O types our graphs use).
TRT_TO_TORCH = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
                "BOOL": "bool"}


def io_dtypes(engine: Any, torch: Any) -> Dict[str, Any]:
    """{tensor name: torch dtype} of an engine's inputs and outputs, as the engine has them."""
    out = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        out[name] = torch_dtype(engine.get_tensor_dtype(name).name, torch)
    return out


def torch_dtype(trt_name: str, torch: Any) -> Any:
    if trt_name not in TRT_TO_TORCH:
        raise BackendUnavailable(f"engine tensor type {trt_name} is not one the tensorrt backend binds "
                                 f"({', '.join(TRT_TO_TORCH)}); rebuild the engines with kosmos2-build-engines")
    return getattr(torch, TRT_TO_TORCH[trt_name])
