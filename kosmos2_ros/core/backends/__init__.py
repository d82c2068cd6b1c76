"""Backends: one module per implementation behind `base.Backend`.

Heavy imports (torch, onnxruntime, tensorrt) happen inside the module that needs them, so
choosing a backend by name never imports the others.
"""
from __future__ import annotations

from typing import Any

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def create_backend(name: str, model_dir: str, **options: Any):
    """Build the named backend for a local model directory (see `core.loading.resolve_model`)."""
    if name == "torch":
        from .torch_backend import TorchBackend
        return TorchBackend(model_dir, **options)
    if name == "onnxruntime":
        from .onnx_backend import OnnxBackend
        return OnnxBackend(model_dir, **options)
    if name == "tensorrt":
        from .tensorrt_backend import TensorRTBackend
        return TensorRTBackend(model_dir, **options)
    raise ValueError(f"unknown backend {name!r}; expected one of: {', '.join(BACKENDS)}")
