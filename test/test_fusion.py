"""A tracked object's geometry fused over frames (`core/spatial/fusion.py`): on a static scene with fresh
depth noise on each of 20 frames, the published yaw stays within 3 degrees of the truth after the third
frame and the centre moves less than 5 mm between frames, where single frames' yaw jumps."""
from __future__ import annotations

import math

import numpy as np
import pytest

from kosmos2_ros.core.spatial.fusion import PoseFusion
from kosmos2_ros.core.spatial.object_geometry import ObjectGeometry, object_geometry
from kosmos2_ros.fixtures.rgbd_scenes import SceneObject, model_box, noisy_depth, plain_geometry, render


def yaw_deg(rotation: np.ndarray, cam_to_world: np.ndarray, truth_yaw: float) -> float:
    """Angle between the box's and the truth's axes about the vertical, modulo 90 degrees."""
    axis = cam_to_world[:3, :3] @ rotation[:, 0]
    diff = (math.atan2(axis[1], axis[0]) - truth_yaw) % (math.pi / 2)
    return math.degrees(min(diff, math.pi / 2 - diff))


@pytest.fixture(scope="module")
def frames():
    """20 frames of one box on a table at 1.2 m, each with fresh depth noise; the model-like box fixed."""
    obj = SceneObject("box", (0.0, 0.0), (0.12, 0.07, 0.09), yaw=0.5, colour=(200, 40, 40))
    scene = render([obj], 640, 480, distance=1.2, elevation_deg=40.0)
    rng = np.random.default_rng(3)
    box = model_box(scene.truths[0].box, plain_geometry(640, 480), rng)
    geos = [object_geometry(box, scene.rgb, noisy_depth(scene.depth_m, rng), scene.intrinsics, (20, 15))
            for _ in range(20)]
    assert all(g.valid for g in geos), [g.error for g in geos if not g.valid]
    return scene, obj, geos


def test_the_fused_pose_holds_still_on_a_static_scene(frames) -> None:
    scene, obj, geos = frames
    fusion = PoseFusion()
    published = [fusion.add(g, "cam") for g in geos]
    yaws = [yaw_deg(p.rotation, scene.cam_to_world, obj.yaw) for p in published]
    assert max(yaws[3:]) <= 3.0, yaws
    steps = [1e3 * float(np.linalg.norm(b.center - a.center)) for a, b in zip(published, published[1:])]
    assert max(steps[3:]) < 5.0, steps
    for p in published:                                   # a right-handed box and grasp, z down onto it
        assert np.linalg.det(p.rotation) > 0.99 and np.linalg.det(p.grasp_rotation) > 0.99
        assert p.grasp_rotation[:, 2] @ p.rotation[:, 2] < -0.99
        assert p.grasp_width == pytest.approx(min(p.size[0], p.size[1]))
    raw_steps = [1e3 * float(np.linalg.norm(b.center - a.center)) for a, b in zip(geos, geos[1:])]
    assert max(steps[3:]) <= max(raw_steps)


def test_a_moved_object_is_followed_at_once(frames) -> None:
    """Moved 10 cm (the arm picked it up): the published centre is the new one on the next frame."""
    import dataclasses

    _, _, geos = frames
    fusion = PoseFusion()
    for g in geos[:6]:
        fusion.add(g, "cam")
    moved = dataclasses.replace(geos[6], center=geos[6].center + np.array([0.1, 0.0, 0.0]))
    np.testing.assert_allclose(fusion.add(moved, "cam").center, moved.center)


def test_another_frame_or_an_invalid_geometry_starts_over_or_passes_through(frames) -> None:
    _, _, geos = frames
    fusion = PoseFusion()
    for g in geos[:5]:
        fusion.add(g, "cam")
    moved = fusion.add(geos[5], "base_link")               # a new frame: only this observation
    np.testing.assert_allclose(moved.center, geos[5].center)
    bad = ObjectGeometry.invalid("no depth")
    assert fusion.add(bad, "base_link") is bad
