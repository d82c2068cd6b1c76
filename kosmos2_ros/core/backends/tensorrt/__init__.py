"""TensorRT engine build and cache (`engines`) and the TensorRT backend (`backend.TensorRTBackend`)."""
from __future__ import annotations

import importlib.util
from typing import Any, Mapping

from ...defaults import ARTIFACTS_DIR
from ..base import BackendUnavailable


def unusable(model_dir: str, options: Mapping[str, Any]) -> str:
    """Why this backend cannot run here ('' when it can): it needs TensorRT, a CUDA GPU and built engines."""
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt not installed"
    device = str(options.get("device", "auto"))
    if device not in ("auto", "cuda") and not device.startswith("cuda:"):
        return f"device is {device}"
    from . import engines

    try:
        trt, torch = engines.require_tensorrt(), engines.require_cuda_torch()
        cc = engines.compute_capability(torch, engines.cuda_device(torch, device))
        precision = options.get("precision", "fp32")
        engines.check_precision(precision, cc)
        out = engines.engine_dir(options.get("artifacts_dir", ARTIFACTS_DIR), model_dir, precision,
                                 trt.__version__, cc)
    except (BackendUnavailable, OSError) as exc:
        return str(exc)
    if engines.read_engines(out) is None and engines.other_limits(out) is None:
        return f"no {precision} engines built for this model (kosmos2-build-engines --model {model_dir})"
    return ""
