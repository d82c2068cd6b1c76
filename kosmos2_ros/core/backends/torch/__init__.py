"""The torch backend (`backend.create`): transformers' modules step by step (`backend.TorchBackend`,
the reference) or, on a GPU, the static path (`static.TorchStaticBackend`); fp32 / fp16 / bf16."""
from __future__ import annotations

import importlib.util
from typing import Any, Mapping

from ..base import cuda_device_count


def unusable(model_dir: str, options: Mapping[str, Any]) -> str:
    """Why this backend cannot run here with these options ('' when it can)."""
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not installed"
    device = str(options.get("device", "auto"))
    if device.startswith("cuda"):
        count = cuda_device_count()
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= count:
            return f"torch sees {count} CUDA device(s)" if count else "torch sees no CUDA device (CPU-only build or no GPU)"
    if device == "cpu" and options.get("precision") == "fp16":
        return "fp16 on the CPU is not supported by torch matmuls"
    return ""
