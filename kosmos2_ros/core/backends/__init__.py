"""Backends: one folder per implementation behind `base.Backend`, listed once in `registry`.

`torch/` (transformers, the reference), `onnx/` (ONNX export + onnxruntime), `tensorrt/`
(engine build and cache + TensorRT). Heavy imports (torch, onnxruntime, tensorrt) happen inside
the folder that needs them, so choosing a backend by name never imports the others.
"""
from __future__ import annotations

from .registry import AUTO, BACKENDS, CHOICES, REGISTRY, choose_backend, create_backend

__all__ = ["AUTO", "BACKENDS", "CHOICES", "REGISTRY", "choose_backend", "create_backend"]
