"""Where an ONNX graph's files lie: what export and quantization both need to know of a graph on disk."""
from __future__ import annotations

from pathlib import Path


def has_external_data(path: Path) -> bool:
    """Whether a graph's weights lie beside it (> 2 GB); each graph has its own folder, so any other file is its."""
    return any(f != path for f in Path(path).parent.iterdir())
