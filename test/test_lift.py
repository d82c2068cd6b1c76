"""Stage 5 (`core/serving/lift.py`): 3D points and geometry for what a result keeps, at the cost decided
there: objects always, candidates' full geometry only with `candidate_geometry`, and nothing for boxes the
earlier stages dropped."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from kosmos2_ros.core.serving.config import Kosmos2Config
from kosmos2_ros.core.serving.frames import Frame
from kosmos2_ros.core.serving.lift import CANDIDATE_GEOMETRY_OFF, Lifter
from kosmos2_ros.core.serving.results import GroundedBox, Result
from kosmos2_ros.core.spatial.geometry import InputGeometry
from kosmos2_ros.fixtures.rgbd_scenes import noisy_depth


@pytest.fixture(scope="module")
def frame_and_result(result_with_geometry: Result):
    scene = result_with_geometry.scene
    frame = Frame(rgb=scene.rgb, stamp_ns=1, frame_id="cam", depth_m=noisy_depth(scene.depth_m, np.random.default_rng(1)),
                  intrinsics=scene.intrinsics)
    res = Result(id="a", task="refer")
    box = scene.truths[0].box
    res.objects = [GroundedBox("the box", 0, (0, 7), box, (0.1, 0.1, 0.5, 0.5), 0.9)]
    res.candidates = [GroundedBox("the box", 0, (0, 0), box, (0.1, 0.1, 0.5, 0.5), 0.4)]
    return frame, res


def _lift(frame: Frame, res: Result, **cfg) -> Result:
    res = copy.deepcopy(res)
    geometry = InputGeometry(frame.width, frame.height, 0.0, 0.0, float(frame.width), float(frame.height))
    Lifter(Kosmos2Config(model="x", **cfg)).lift(res, frame, geometry)
    return res


def test_candidates_get_their_point_and_their_geometry_only_when_asked(frame_and_result) -> None:
    frame, res = frame_and_result
    off = _lift(frame, res)
    assert off.objects[0].geometry.valid and off.objects[0].point is not None
    cand = off.candidates[0]
    assert cand.point is not None and cand.point_error == ""                     # its point, always
    assert not cand.geometry.valid and cand.geometry.error == CANDIDATE_GEOMETRY_OFF
    on = _lift(frame, res, candidate_geometry=True)
    assert on.candidates[0].geometry.valid
    np.testing.assert_allclose(on.candidates[0].geometry.center, on.objects[0].geometry.center)
    assert off.geometry_frame_id == "cam"


def test_without_depth_every_box_says_why(frame_and_result) -> None:
    frame, res = frame_and_result
    bare = Frame(rgb=frame.rgb, stamp_ns=1, frame_id="cam")
    out = _lift(bare, res, candidate_geometry=True)
    for obj in out.objects + out.candidates:
        assert obj.point is None and obj.point_error == "no depth image paired with this frame"
        assert obj.geometry.error == "no depth image paired with this frame"
