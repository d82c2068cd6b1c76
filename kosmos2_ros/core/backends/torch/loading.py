"""What both torch paths (the reference and the static path) start from: the device asked for, and the checkpoint
loaded the safe way."""
from __future__ import annotations

from typing import Any

from ...defaults import DTYPE_NAMES
from ..base import BackendUnavailable
from ..modules import load_kosmos2


def resolve_device(device: str) -> str:
    """`auto` -> cuda where torch sees a GPU, else cpu; a CUDA device torch cannot see is refused."""
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailable(f"device {device!r} requested but torch sees no CUDA device "
                                 f"(torch {torch.__version__}); use device: cpu")
    return device


def load_model(model_dir: str, precision: str, allow_pickle: bool) -> Any:
    """transformers' Kosmos-2 from a local directory: safetensors only unless pickles are allowed, no remote code."""
    import torch

    return load_kosmos2(model_dir, dtype=getattr(torch, DTYPE_NAMES[precision]),
                        use_safetensors=None if allow_pickle else True, trust_remote_code=False)
