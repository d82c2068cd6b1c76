"""Synthetic scenes with objects at known pixel positions (demo, tests, benchmarks).

No camera or image files are needed, and the ground truth is known, so boxes can be checked.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

# name -> RGB colour
OBJECTS: Tuple[Tuple[str, Tuple[int, int, int]], ...] = (
    ("a red square", (220, 30, 30)),
    ("a blue square", (30, 60, 220)),
    ("a green square", (30, 180, 60)),
    ("a yellow square", (235, 210, 40)),
)


def draw_scene(width: int = 640, height: int = 480, rng: Optional[np.random.Generator] = None,
               count: int = 3) -> Tuple[np.ndarray, List[Dict]]:
    """A grey table-top with `count` coloured squares that do not overlap.

    Returns the RGB image and, per object, its name, colour and box (x0, y0, x1, y1) in pixels
    (x1, y1 exclusive).
    """
    rng = rng or np.random.default_rng(0)
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    rgb[:] = (128, 128, 128)
    rgb[int(height * 0.55):] = (150, 110, 70)          # the table
    objects: List[Dict] = []
    side_max = max(4, min(width, height) // 3)
    for name, color in OBJECTS[:count]:
        for _ in range(100):
            side = int(rng.integers(max(2, side_max // 2), side_max + 1))
            x0 = int(rng.integers(0, max(1, width - side)))
            y0 = int(rng.integers(0, max(1, height - side)))
            box = (x0, y0, x0 + side, y0 + side)
            if all(_disjoint(box, o["box"]) for o in objects):
                break
        rgb[box[1]:box[3], box[0]:box[2]] = color
        objects.append({"name": name, "color": color, "box": box})
    return rgb, objects


def _disjoint(a: Tuple[int, int, int, int], b: Tuple[int, int, int, int]) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
