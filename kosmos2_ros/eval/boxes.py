"""Box formats and IoU, as the paper's evaluation computes them.

Corners are (x0, y0, x1, y1) in pixels with x1, y1 exclusive edges, so a box's area is
(x1 - x0) * (y1 - y0), as torchvision's `box_iou` that the paper's scripts use.
"""
from __future__ import annotations

from typing import Sequence, Tuple

from ..core.model.grounding import box_area as area  # noqa: F401 (part of this module's interface)
from ..core.model.grounding import box_iou as iou

Box = Tuple[float, float, float, float]


def xywh_to_corners(box: Sequence[float]) -> Box:
    """COCO / MDETR [x, y, width, height] -> corners."""
    x, y, w, h = (float(v) for v in box)
    return (x, y, x + w, y + h)


def corners_to_xywh(box: Sequence[float]) -> Box:
    x0, y0, x1, y1 = (float(v) for v in box)
    return (x0, y0, x1 - x0, y1 - y0)


def normalized_to_pixels(box: Sequence[float], width: float, height: float) -> Box:
    """Normalised [0, 1] corners -> pixels of a width x height image (the paper: x * width)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return (x0 * width, y0 * height, x1 * width, y1 * height)


def pixels_to_normalized(box: Sequence[float], width: float, height: float) -> Box:
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    x0, y0, x1, y1 = (float(v) for v in box)
    return (x0 / width, y0 / height, x1 / width, y1 / height)


def best_iou(box: Sequence[float], targets: Sequence[Sequence[float]]) -> float:
    """IoU of `box` with the best-matching target (0 with no targets)."""
    return max((iou(box, t) for t in targets), default=0.0)
