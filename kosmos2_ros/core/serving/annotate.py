"""Drawing grounded boxes and phrases on an image (the CLI's --annotate and the node's debug image)."""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np

# Distinct BGR-free RGB colours, one per entity.
PALETTE: Tuple[Tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
)


def draw_detections(rgb: np.ndarray, boxes: Iterable[Tuple[str, int, Sequence[float], float]],
                    title: Optional[str] = None) -> np.ndarray:
    """A copy of `rgb` (H x W x 3 uint8, RGB) with each (phrase, entity_index, box_px, score) drawn."""
    import cv2

    out = np.ascontiguousarray(rgb.copy())
    h, w = out.shape[:2]
    scale = max(0.4, min(w, h) / 640.0)
    thick = max(1, int(round(2 * scale)))
    for phrase, index, box, score in boxes:
        color = PALETTE[index % len(PALETTE)]
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        cv2.rectangle(out, (x0, y0), (x1, y1), color, thick)
        label = phrase if (score is None or math.isnan(score)) else f"{phrase} {score:.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, thick)
        ty = y0 - 4 if y0 - th - 6 >= 0 else min(h - 1, y0 + th + 6)
        cv2.rectangle(out, (x0, ty - th - 4), (x0 + tw + 4, ty + base - 2), color, -1)
        cv2.putText(out, label, (x0 + 2, ty - 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, (0, 0, 0), thick, cv2.LINE_AA)
    if title:
        cv2.putText(out, title, (6, h - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45 * scale, (255, 255, 255), thick + 1, cv2.LINE_AA)
        cv2.putText(out, title, (6, h - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45 * scale, (0, 0, 0), thick, cv2.LINE_AA)
    return out


def draw_result(rgb: np.ndarray, result, title: Optional[str] = None) -> np.ndarray:
    """Draw a pipeline Result's objects: masks as translucent overlays and each refined (tight) box
    as a thin line inside the model's box, where objects have geometry."""
    import cv2

    base = np.ascontiguousarray(rgb.copy())
    geometries = [(o.entity_index, getattr(o, "geometry", None)) for o in result.objects]
    for index, geo in geometries:
        if geo is not None and geo.valid and geo.mask is not None and geo.mask.shape == base.shape[:2]:
            color = np.array(PALETTE[index % len(PALETTE)], dtype=np.float32)
            base[geo.mask] = (0.55 * base[geo.mask] + 0.45 * color).astype(np.uint8)
    out = draw_detections(base, ((o.phrase, o.entity_index, o.box_px, o.score) for o in result.objects), title)
    for _, geo in geometries:
        if geo is not None and geo.valid and geo.box_refined is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in geo.box_refined)
            cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), (255, 255, 255), 1)
    return out
