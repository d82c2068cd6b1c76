"""The transformers reference backend (`backend.TorchBackend`), CPU or CUDA, fp32 / fp16 / bf16."""
from __future__ import annotations

import importlib.util
from typing import Any, Mapping


def unusable(model_dir: str, options: Mapping[str, Any]) -> str:
    """Why this backend cannot run here with these options ('' when it can)."""
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    return f"{' and '.join(missing)} not installed" if missing else ""
