"""The debug image: boxes and phrases, masks as translucent overlays, refined boxes beside the model's."""
from __future__ import annotations

import numpy as np

from kosmos2_ros.core.serving.annotate import PALETTE, draw_result
from kosmos2_ros.core.serving.pipeline import GroundedBox, Result
from kosmos2_ros.core.spatial.object_geometry import ObjectGeometry


def test_masks_and_refined_boxes_are_drawn() -> None:
    rgb = np.full((120, 160, 3), 100, dtype=np.uint8)
    mask = np.zeros((120, 160), dtype=bool)
    mask[40:80, 50:90] = True
    geo = ObjectGeometry(True, mask=mask, box_refined=(50.0, 40.0, 90.0, 80.0))
    res = Result(id="a", task="refer", width=160, height=120)
    res.objects = [GroundedBox("cup", 2, (0, 3), (30.0, 20.0, 110.0, 100.0), (0, 0, 1, 1), 0.5, None, geo),
                   GroundedBox("plate", 0, (4, 9), (5.0, 5.0, 20.0, 20.0), (0, 0, 1, 1), 0.5, None,
                               ObjectGeometry.invalid("no depth"))]
    out = draw_result(rgb, res)
    inside = out[60, 70].astype(int)
    expected = (0.55 * 100 + 0.45 * np.array(PALETTE[2])).astype(int)
    assert np.abs(inside - expected).max() <= 1                     # translucent overlay of the entity colour
    assert (out[10, 140] == 100).all()                             # outside every mask and box: untouched
    assert (out[40, 60] == 255).all() and (out[79, 89] == 255).all()   # the refined box's thin white line
    assert (out[20, 60] == PALETTE[2]).all()                       # the model's box in the entity colour
