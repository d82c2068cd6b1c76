"""The one list of backends: config validation, the CLIs, the parameter docs and `create_backend` read it.

Each entry names its folder under `backends/`, the class in that folder's `backend.py`, and the
keyword options its constructor takes; the folder's `__init__.py` says whether it can run here
(`unusable`). Adding a backend is one folder and one entry (and its place in `PREFERENCE`, the
order `auto` tries backends and devices in: the fastest first).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Tuple

from ..defaults import PRECISIONS, QUANTIZED_PRECISIONS
from .base import BackendUnavailable, cuda_capability, cuda_device_count

#: The name that lets the registry choose (`choose_backend`).
AUTO = "auto"


@dataclass(frozen=True)
class BackendSpec:
    name: str                       # what `backend:` and `--backend` take
    package: str                    # its folder under backends/
    class_name: str                 # the `Backend` subclass in that folder's backend.py
    options: Tuple[str, ...]        # keyword options its constructor takes besides the model directory
    precisions: Tuple[str, ...]     # precisions it runs
    summary: str                    # one line for parameter docs and --help
    requires: Tuple[str, ...] = ()  # Python packages it cannot run without (checked when the parameter is set)

    def module(self) -> Any:
        """The backend's folder (its `__init__`: light, no heavy imports)."""
        return importlib.import_module(f"{__package__}.{self.package}")


REGISTRY: Tuple[BackendSpec, ...] = (
    BackendSpec("tensorrt", "tensorrt", "TensorRTBackend",
                ("device", "precision", "artifacts_dir", "build_engines", "cuda_graph", "arena_budget_mb"), PRECISIONS,
                "TensorRT engines on an NVIDIA GPU (build them with kosmos2-build-engines)", ("tensorrt", "torch")),
    BackendSpec("onnxruntime", "onnx", "OnnxBackend",
                ("device", "precision", "artifacts_dir", "allow_pickle", "model", "threads"), ("fp32",) + QUANTIZED_PRECISIONS,
                "onnxruntime over the exported ONNX graphs: fp32, or int8 / int4 quantized from them (made on "
                "first use)", ("onnxruntime",)),
    BackendSpec("torch", "torch", "create",
                ("device", "precision", "allow_pickle", "model", "cuda_graph", "torch_mode", "arena_budget_mb"),
                PRECISIONS,
                "torch: on a GPU a static KV arena and CUDA graphs; on the CPU transformers' modules, the "
                "reference every other backend equals token for token", ("torch", "transformers")),
)
BY_NAME: Dict[str, BackendSpec] = {s.name: s for s in REGISTRY}
#: Backends selectable by name.
BACKENDS: Tuple[str, ...] = tuple(BY_NAME)
#: What `backend:` accepts.
CHOICES: Tuple[str, ...] = (AUTO,) + BACKENDS
#: Every option some backend takes (`create_backend` refuses others).
OPTIONS = frozenset(o for s in REGISTRY for o in s.options)
#: `auto`'s preference, fastest first: (backend, where it runs). On a desktop with a GPU, torch on the
#: GPU is dozens of times faster than onnxruntime on the CPU, whatever the order of the registry.
PREFERENCE: Tuple[Tuple[str, str], ...] = (("tensorrt", "cuda"), ("torch", "cuda"), ("onnxruntime", "cuda"),
                                           ("onnxruntime", "cpu"), ("torch", "cpu"))
#: What `precision:` accepts: `auto` (`resolve_precision`), the float precisions and the quantized ones.
PRECISION_CHOICES: Tuple[str, ...] = (AUTO,) + PRECISIONS + QUANTIZED_PRECISIONS
#: GPUs without native fp16 arithmetic (compute capability below 5.3, and sm61: 1/64 rate).
NO_FAST_FP16 = ((6, 1),)


def describe() -> str:
    """One line for the `backend` parameter's documentation."""
    return f"inference backend: {AUTO} (the fastest usable here) | " + " | ".join(BACKENDS)


def precision_problem(backend: str, precision: str) -> str:
    """Why a named backend cannot run a precision ("" when it can, or for auto)."""
    if precision == AUTO or backend == AUTO or precision in spec(backend).precisions:
        return ""
    takers = [s.name for s in REGISTRY if precision in s.precisions]
    return (f"backend {backend} runs {', '.join(spec(backend).precisions)}, not {precision}"
            + (f" (use backend: {' or '.join(takers)})" if takers else ""))


def spec(name: str) -> BackendSpec:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected one of: {', '.join(CHOICES)}") from None


def machine_problem(backend: str, device: str) -> str:
    """What this machine lacks for a backend or device, checkable at once (a parameter set is refused
    with it): a missing package, a CUDA device that does not exist. "" when nothing is known missing."""
    import importlib.util

    if backend != AUTO:
        missing = [m for m in spec(backend).requires if importlib.util.find_spec(m) is None]
        if missing:
            return f"backend {backend} needs {' and '.join(missing)}, which is not installed here"
    if device.startswith("cuda"):
        count = cuda_device_count()
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= count:
            return f"device {device} does not exist: torch sees {count} CUDA device(s)"
    return ""


def resolve_precision(name: str, device: str, precision: str, options: Mapping[str, Any]) -> str:
    """`precision: auto` made concrete for a backend on a device.

    fp32 on the CPU, and for a backend that runs only fp32 (onnxruntime). On a GPU, fp16: the GPU
    paths (TensorRT engines, torch's static path) run the mixed graphs that keep the residual
    stream, LayerNorm, softmax and logits in fp32, where fp16's range would be at risk, and fp16's
    10-bit mantissa keeps tokens closer to fp32's than bf16's 7 bits. bf16 only for torch's
    reference mode (transformers' modules in one dtype throughout, residual stream included) on GPUs
    that have it (sm80+); fp32 on GPUs without native fp16.
    """
    if precision != AUTO:
        return precision
    if not device.startswith("cuda") or "fp16" not in spec(name).precisions or not cuda_device_count():
        return "fp32"   # (no GPU: the candidate is unusable anyway and says why)
    cc = cuda_capability(device)
    if cc < (5, 3) or cc in NO_FAST_FP16:
        return "fp32"
    if name == "torch" and options.get("torch_mode") == "reference" and cc >= (8, 0):
        return "bf16"
    return "fp16"


def _device_for(name: str, device: str) -> str:
    """Where a named backend runs with `device: auto` (for its precision)."""
    if device != AUTO:
        return device
    if name == "tensorrt" or (name == "torch" and cuda_device_count()):
        return "cuda"
    return "cpu"


def choose_backend(model_dir: str, options: Mapping[str, Any]) -> Tuple[str, Dict[str, Any], str]:
    """(name, options with device and precision made concrete, why) of the first usable candidate in
    `PREFERENCE` (only those on the configured device when it is not auto)."""
    device = str(options.get("device", AUTO))
    want = None if device == AUTO else ("cuda" if device.startswith("cuda") else "cpu")
    passed = []
    for name, kind in PREFERENCE:
        if want is not None and kind != want:
            continue
        entry = BY_NAME[name]
        dev = device if want is not None else kind
        precision = resolve_precision(name, dev, str(options.get("precision", AUTO)), options)
        if precision not in entry.precisions:
            passed.append(f"not {name} on {kind}: it runs {', '.join(entry.precisions)}")
            continue
        resolved = dict(options, device=dev, precision=precision)
        reason = entry.module().unusable(model_dir, {k: v for k, v in resolved.items() if k in entry.options})
        if not reason:
            why = f"backend auto chose {name} on {dev} ({precision})"
            return name, resolved, why + (f" ({'; '.join(passed)})" if passed else "")
        passed.append(f"not {name} on {kind}: {reason}")
    raise ValueError("backend auto found no usable backend: " + "; ".join(passed))


def create_backend(name: str, model_dir: str, **options: Any) -> Any:
    """Build the named backend (or `auto`'s choice) for a local model directory.

    Options no backend takes are refused; options other backends take are left out, so one set of
    options (from the config) serves every backend. `precision: auto` is resolved here.
    """
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise TypeError(f"unknown backend option(s) {', '.join(unknown)}; backends take: {', '.join(sorted(OPTIONS))}")
    if name == AUTO:
        name, options, _ = choose_backend(model_dir, options)
    entry = spec(name)
    problem = precision_problem(name, str(options.get("precision", AUTO)))
    if problem:
        raise BackendUnavailable(problem)
    if options.get("precision", AUTO) == AUTO:
        options = dict(options, precision=resolve_precision(
            name, _device_for(name, str(options.get("device", AUTO))), AUTO, options))
    cls = getattr(importlib.import_module(f"{__package__}.{entry.package}.backend"), entry.class_name)
    return cls(model_dir, **{k: v for k, v in options.items() if k in entry.options})
