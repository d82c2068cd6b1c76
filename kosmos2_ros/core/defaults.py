"""Names and defaults shared by the config, the backends and the command-line tools (defined once).

A leaf module: it imports nothing of the package, so every layer may read it.
"""
from __future__ import annotations

import os
from typing import Tuple

#: The checkpoint every interface loads unless told otherwise.
DEFAULT_MODEL = "microsoft/kosmos-2-patch14-224"
#: Every entry point's one rule for the model: the `model` parameter (or `--model`) when given,
#: else this environment variable, else DEFAULT_MODEL (`default_model`).
MODEL_ENV = "KOSMOS2_MODEL"


def default_model() -> str:
    """The model when none is given: $KOSMOS2_MODEL, else DEFAULT_MODEL."""
    return os.environ.get(MODEL_ENV, "").strip() or DEFAULT_MODEL
#: Where ONNX graphs and TensorRT engines are cached (expanded with `os.path.expanduser`).
ARTIFACTS_DIR = "~/.cache/kosmos2_ros"
#: Numeric precisions of weights and compute, fp32 first (the reference).
PRECISIONS: Tuple[str, ...] = ("fp32", "fp16", "bf16")
#: Quantized weights (onnxruntime on the CPU; `backends.onnx.quantize` says what each quantizes).
QUANTIZED_PRECISIONS: Tuple[str, ...] = ("int8", "int4")
#: torch / numpy dtype names of each (float) precision.
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
#: How the torch backend runs (`backends.torch.backend.create`): auto = the static path (static KV
#: arena, CUDA graphs) on a GPU and transformers' modules (the reference) on the CPU.
TORCH_MODES: Tuple[str, ...] = ("auto", "reference", "static")
