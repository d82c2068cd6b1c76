"""ONNX export (`export`) and the onnxruntime backend over the exported graphs (`backend.OnnxBackend`)."""
from __future__ import annotations

import importlib.util
from typing import Any, Mapping

from ...defaults import ARTIFACTS_DIR, QUANTIZED_PRECISIONS

#: What this backend runs: the fp32 graphs, and the int8 / int4 graphs quantized from them.
PRECISIONS = ("fp32",) + QUANTIZED_PRECISIONS


def unusable(model_dir: str, options: Mapping[str, Any]) -> str:
    """Why this backend cannot run here with these options ('' when it can)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime not installed"
    precision = options.get("precision", "fp32")
    if precision not in PRECISIONS:
        return f"it runs {', '.join(PRECISIONS)}, precision is {precision}"
    device = str(options.get("device", "auto"))
    if precision in QUANTIZED_PRECISIONS and device.startswith("cuda"):
        return f"{precision} runs on the CPU (onnxruntime's quantized kernels), device is {device}"
    if device.startswith("cuda"):
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return f"device {device} needs onnxruntime-gpu"
    from . import export, quantize

    graphs = export.read_manifest(export.onnx_dir(options.get("artifacts_dir", ARTIFACTS_DIR), model_dir))
    if graphs is None and any(importlib.util.find_spec(m) is None for m in ("torch", "onnx")):
        return "its graphs are not exported and exporting needs torch and onnx"
    if precision in QUANTIZED_PRECISIONS and precision not in (graphs or {}).get("variants", {}):
        return quantize.missing_tools()
    return ""
