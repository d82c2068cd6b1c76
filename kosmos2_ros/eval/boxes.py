"""Box formats and IoU, as the paper's evaluation computes them.

Corners are (x0, y0, x1, y1) in pixels with x1, y1 exclusive edges, so a box's area is
(x1 - x0) * (y1 - y0), as torchvision's `box_iou` that the paper's scripts use.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

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


def area(box: Sequence[float]) -> float:
    """Area of a corners box; a box with x1 < x0 or y1 < y0 has area 0."""
    x0, y0, x1, y1 = box
    return max(0.0, x1 - x0) * max(0.0, y1 - y0)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two corners boxes; 0 when the union is empty (two zero-area boxes).

    Boxes are taken as given: one outside the image still has its area (nothing is clipped), as
    in the paper's scripts; zero-area boxes (the paper's stand-in for "no box") score 0.
    """
    if not all(math.isfinite(float(v)) for v in (*a, *b)):
        return 0.0
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, iw) * max(0.0, ih)
    union = area(a) + area(b) - inter
    return float(inter / union) if union > 0 else 0.0


def best_iou(box: Sequence[float], targets: Sequence[Sequence[float]]) -> float:
    """IoU of `box` with the best-matching target (0 with no targets)."""
    return max((iou(box, t) for t in targets), default=0.0)
