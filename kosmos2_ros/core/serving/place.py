"""Stage 4, place: a result's normalised boxes -> pixels of the source image.

Through the image processor's resize and crop (`InputGeometry`). A region command keeps its own
region: its object's box is the region given (clipped to the image), not the cells the model was
shown (which `box_norm` still reports).
"""
from __future__ import annotations

from typing import Optional

from ..model.grounding import Box
from ..spatial.geometry import InputGeometry
from .results import Result


def place(res: Result, geometry: InputGeometry, width: int, height: int, region_px: Optional[Box] = None) -> None:
    """Fill every entity's, object's and candidate's pixel box (`width` x `height`: the source image)."""
    for index, ent in enumerate(res.entities):
        ent.boxes_px = [geometry.to_pixels(b) for b in ent.boxes_norm]
        if region_px is not None and index == 0 and ent.boxes_px:
            x0, y0, x1, y1 = region_px
            ent.boxes_px[0] = (min(max(x0, 0.0), width), min(max(y0, 0.0), height),
                               min(max(x1, 0.0), width), min(max(y1, 0.0), height))
    for obj in res.objects:
        obj.box_px = res.entities[obj.entity_index].boxes_px[obj.box_index]
    for cand in res.candidates:
        cand.box_px = geometry.to_pixels(cand.box_norm)
