"""The one list of backends: config validation, the CLIs, the parameter docs and `create_backend` read it.

Each entry names its folder under `backends/`, the class in that folder's `backend.py`, and the
keyword options its constructor takes; the folder's `__init__.py` says whether it can run here
(`unusable`). Adding a backend is one folder and one entry. The order is `auto`'s preference:
the fastest first.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Tuple

from ..defaults import PRECISIONS

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

    def module(self) -> Any:
        """The backend's folder (its `__init__`: light, no heavy imports)."""
        return importlib.import_module(f"{__package__}.{self.package}")


REGISTRY: Tuple[BackendSpec, ...] = (
    BackendSpec("tensorrt", "tensorrt", "TensorRTBackend",
                ("device", "precision", "artifacts_dir", "build_engines", "cuda_graph"), PRECISIONS,
                "TensorRT engines on an NVIDIA GPU (build them with kosmos2-build-engines)"),
    BackendSpec("onnxruntime", "onnx", "OnnxBackend",
                ("device", "precision", "artifacts_dir", "allow_pickle", "model", "threads"), ("fp32",),
                "onnxruntime over the exported fp32 ONNX graphs (exported on first use)"),
    BackendSpec("torch", "torch", "TorchBackend", ("device", "precision", "allow_pickle", "model"), PRECISIONS,
                "transformers, the reference every other backend equals token for token"),
)
BY_NAME: Dict[str, BackendSpec] = {s.name: s for s in REGISTRY}
#: Backends selectable by name.
BACKENDS: Tuple[str, ...] = tuple(BY_NAME)
#: What `backend:` accepts.
CHOICES: Tuple[str, ...] = (AUTO,) + BACKENDS
#: Every option some backend takes (`create_backend` refuses others).
OPTIONS = frozenset(o for s in REGISTRY for o in s.options)


def describe() -> str:
    """One line for the `backend` parameter's documentation."""
    return f"inference backend: {AUTO} (the fastest usable here) | " + " | ".join(BACKENDS)


def spec(name: str) -> BackendSpec:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected one of: {', '.join(CHOICES)}") from None


def choose_backend(model_dir: str, options: Mapping[str, Any]) -> Tuple[str, str]:
    """(name, why) of the first backend in preference order that can run here with these options."""
    passed = []
    for entry in REGISTRY:
        reason = entry.module().unusable(model_dir, {k: v for k, v in options.items() if k in entry.options})
        if not reason:
            why = "; ".join(passed) if passed else "the fastest backend"
            return entry.name, f"backend auto chose {entry.name}" + (f" ({why})" if passed else "")
        passed.append(f"not {entry.name}: {reason}")
    raise ValueError("backend auto found no usable backend: " + "; ".join(passed))


def create_backend(name: str, model_dir: str, **options: Any) -> Any:
    """Build the named backend (or `auto`'s choice) for a local model directory.

    Options no backend takes are refused; options other backends take are left out, so one set of
    options (from the config) serves every backend.
    """
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise TypeError(f"unknown backend option(s) {', '.join(unknown)}; backends take: {', '.join(sorted(OPTIONS))}")
    if name == AUTO:
        name, _ = choose_backend(model_dir, options)
    entry = spec(name)
    cls = getattr(importlib.import_module(f"{__package__}.{entry.package}.backend"), entry.class_name)
    return cls(model_dir, **{k: v for k, v in options.items() if k in entry.options})
