"""Object geometry (`core/spatial/object_geometry.py`) on synthetic RGB-D scenes with ground truth.

Each case renders a scene exactly (`fixtures/rgbd_scenes.py`), adds the depth camera's noise, gives
the object a box as Kosmos-2 would (snapped to the 32x32 grid, edges moved by up to a cell) and
checks the mask, refined box, 3D box, grasp and cloud against the truth, within the bounds the
benchmark (`bench/object_geometry.py`) measures on hundreds of objects, with room for one scene.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from kosmos2_ros.core.spatial.geometry import CameraIntrinsics, depth_to_meters
from kosmos2_ros.core.spatial.object_geometry import ObjectGeometry, object_geometry, quaternion
from kosmos2_ros.fixtures.rgbd_scenes import SceneObject, model_box, noisy_depth, plain_geometry, render

CELL = (640 / 32, 480 / 32)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def solve(scene, index=0, seed=0, depth=None, box=None):
    rng = np.random.default_rng(seed)
    truth = scene.truths[index]
    box = box or model_box(truth.box, plain_geometry(scene.rgb.shape[1], scene.rgb.shape[0]), rng)
    depth = noisy_depth(scene.depth_m, rng) if depth is None else depth
    return object_geometry(box, scene.rgb, depth, scene.intrinsics, CELL), truth


def up_in_camera(scene) -> np.ndarray:
    return scene.cam_to_world[:3, :3].T @ np.array([0.0, 0.0, 1.0])


SHAPES = {"box": SceneObject("box", (0.0, 0.0), (0.09, 0.06, 0.1), yaw=0.4, colour=(200, 40, 40)),
          "cylinder": SceneObject("cylinder", (0.0, 0.0), (0.08, 0.08, 0.12), colour=(40, 90, 200)),
          "sphere": SceneObject("sphere", (0.0, 0.0), (0.1, 0.1, 0.1), colour=(40, 160, 60))}


@pytest.mark.parametrize("distance", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_each_shape_and_distance(kind, distance):
    scene = render([SHAPES[kind]], 640, 480, distance=distance, elevation_deg=45.0, target=(0.0, 0.0, 0.05))
    geo, truth = solve(scene, seed=int(distance * 10))
    assert geo.valid, geo.error
    assert mask_iou(geo.mask, truth.mask) >= 0.8
    assert np.linalg.norm(geo.center - truth.centre) <= 0.02
    assert np.abs(np.sort(geo.size[:2]) - np.sort(truth.size[:2])).max() <= 0.025
    assert abs(geo.size[2] - truth.size[2]) <= 0.015
    assert np.linalg.norm(geo.grasp_position - truth.top) <= 0.02
    up = up_in_camera(scene)
    assert geo.rotation[:, 2] @ up > 0.99                    # the box stands on the table
    assert geo.grasp_rotation[:, 2] @ -up > 0.99             # z approaches: down onto the object
    assert abs(geo.grasp_width - min(truth.size[:2])) <= 0.025
    assert np.allclose(geo.grasp_rotation.T @ geo.grasp_rotation, np.eye(3), atol=1e-6)
    assert np.linalg.det(geo.grasp_rotation) > 0.99 and np.linalg.det(geo.rotation) > 0.99
    assert len(geo.points) > 100 and geo.colors.shape == (len(geo.points), 3)
    assert (geo.points[:, 2] > 0).all()


def test_yaw_of_a_box_follows_its_footprint():
    box = SceneObject("box", (0.0, 0.0), (0.14, 0.06, 0.05), yaw=0.6, colour=(200, 40, 40))
    scene = render([box], 640, 480, distance=0.7, elevation_deg=55.0)
    geo, _ = solve(scene)
    rot = scene.cam_to_world[:3, :3]
    long_axis = rot @ geo.rotation[:, int(np.argmax(geo.size[:2]))]
    yaw = math.atan2(long_axis[1], long_axis[0]) % math.pi
    assert min(abs(yaw - 0.6), math.pi - abs(yaw - 0.6)) < math.radians(6)


def test_an_occluded_object_keeps_the_pixels_it_shows():
    back = SceneObject("box", (0.0, 0.06), (0.1, 0.1, 0.16), colour=(40, 90, 200))
    front = SceneObject("cylinder", (0.0, -0.08), (0.08, 0.08, 0.1), colour=(200, 40, 40))
    scene = render([back, front], 640, 480, distance=0.8, elevation_deg=30.0, azimuth_deg=-90.0)
    truth = scene.truths[0]
    hidden = 1 - truth.mask.sum() / render([back], 640, 480, distance=0.8, elevation_deg=30.0).truths[0].mask.sum()
    assert hidden > 0.15                                      # the front object really hides part of it
    geo, _ = solve(scene, index=0, seed=3)
    assert geo.valid, geo.error
    assert mask_iou(geo.mask, truth.mask) >= 0.75
    assert (geo.mask & scene.truths[1].mask).sum() < 0.05 * scene.truths[1].mask.sum()


def test_a_cut_off_object_is_measured_from_what_is_in_view():
    obj = SceneObject("box", (0.0, 0.0), (0.1, 0.1, 0.1), colour=(200, 40, 40))
    scene = render([obj], 640, 480, distance=0.6, elevation_deg=45.0, target=(0.4, 0.0, 0.05))
    truth = scene.truths[0]
    assert truth.box[0] == 0                                  # touches the left border
    geo, _ = solve(scene, seed=4)
    assert geo.valid, geo.error
    assert mask_iou(geo.mask, truth.mask) >= 0.75 and geo.box_refined[0] == 0


def test_touching_objects_are_separated():
    a = SceneObject("box", (0.0, 0.0), (0.08, 0.08, 0.12), colour=(200, 40, 40))
    b = SceneObject("cylinder", (0.08, 0.0), (0.08, 0.08, 0.12), colour=(40, 90, 200))
    scene = render([a, b], 640, 480, distance=0.8, elevation_deg=45.0)
    for index, other in ((0, 1), (1, 0)):
        geo, truth = solve(scene, index=index, seed=5 + index)
        assert geo.valid, geo.error
        assert mask_iou(geo.mask, truth.mask) >= 0.75
        assert (geo.mask & scene.truths[other].mask).sum() < 0.05 * scene.truths[other].mask.sum()


def test_without_a_plane_the_box_comes_from_the_points():
    """No table (objects in front of a wall 2.5 m behind): no support plane; the box still holds the object."""
    obj = SceneObject("box", (0.0, 0.0), (0.1, 0.1, 0.1), colour=(200, 40, 40))
    scene = render([obj], 640, 480, distance=0.8, elevation_deg=20.0, table=False)
    geo, truth = solve(scene, seed=6)
    assert geo.valid, geo.error
    assert geo.plane is None
    assert mask_iou(geo.mask, truth.mask) >= 0.8
    assert np.linalg.norm(geo.center - truth.centre) <= 0.06
    ray = geo.grasp_position / np.linalg.norm(geo.grasp_position)
    assert geo.grasp_rotation[:, 2] @ ray > 0.99              # approach along the viewing ray


def test_a_free_box_whose_long_axis_lies_along_the_ray_still_closes_across_it():
    """A bar pointing at the camera (its first principal axis along the viewing ray): the gripper closes
    across the ray on the bar's narrow side, the opening that side's width (the closing vector used to
    vanish there, a NaN grasp, and the width came from other extents than the direction)."""
    from kosmos2_ros.core.spatial.object_geometry import _free_box

    rng = np.random.default_rng(0)
    n = 4000
    points = np.stack([rng.uniform(-0.02, 0.02, n), rng.uniform(-0.01, 0.01, n), rng.uniform(0.8, 1.1, n)], axis=1)
    center, rotation, size, top, approach, closing, opening = _free_box(points)
    assert np.isfinite(closing).all() and abs(np.linalg.norm(closing) - 1.0) < 1e-9
    assert abs(closing @ approach) < 1e-9                    # across the ray
    assert abs(closing[1]) > 0.99                            # the narrow side: y, 2 cm
    assert opening == pytest.approx(0.0192, abs=1e-3)        # its robust (2-98 %) extent


def test_16uc1_and_32fc1_give_the_same_geometry():
    scene = render([SHAPES["box"]], 640, 480, distance=0.9)
    noisy = noisy_depth(scene.depth_m, np.random.default_rng(7))
    as_mm = scene.depth_16uc1(noisy)
    a, _ = solve(scene, depth=depth_to_meters(as_mm, "16UC1"))
    b, _ = solve(scene, depth=depth_to_meters(np.nan_to_num(noisy, nan=0.0), "32FC1"))
    assert a.valid and b.valid
    assert np.linalg.norm(a.center - b.center) < 0.003 and mask_iou(a.mask, b.mask) > 0.95


def test_depth_at_another_resolution_than_colour():
    scene = render([SHAPES["cylinder"]], 640, 480, distance=0.8)
    noisy = noisy_depth(scene.depth_m, np.random.default_rng(8))
    half = noisy[::2, ::2]                                    # a 320x240 aligned depth image
    geo, truth = solve(scene, depth=half)
    assert geo.valid, geo.error
    assert geo.mask.shape == (480, 640)
    assert np.linalg.norm(geo.center - truth.centre) <= 0.025


def test_nan_and_inf_depth_do_no_harm():
    scene = render([SHAPES["sphere"]], 640, 480, distance=0.8)
    depth = noisy_depth(scene.depth_m, np.random.default_rng(9))
    depth[200:210, :] = np.inf
    depth[:, 300:305] = -np.inf
    depth[100:110, 100:500] = np.nan
    geo, truth = solve(scene, depth=depth)
    assert geo.valid, geo.error
    assert np.isfinite(geo.points).all() and np.isfinite(geo.center).all()


def test_what_cannot_be_measured_says_why():
    scene = render([SHAPES["box"]], 640, 480, distance=0.8)
    truth = scene.truths[0]
    empty = np.full(scene.depth_m.shape, np.nan, dtype=np.float32)
    geo = object_geometry(truth.box, scene.rgb, empty, scene.intrinsics, CELL)
    assert not geo.valid and geo.error.startswith("no valid depth inside the box")
    assert object_geometry((10, 10, 10, 50), scene.rgb, scene.depth_m, scene.intrinsics, CELL).error == \
        "the box has no area"
    assert object_geometry((700, 10, 800, 50), scene.rgb, scene.depth_m, scene.intrinsics, CELL).error == \
        "the box is outside the image"
    assert object_geometry((0, 0, 10, float("nan")), scene.rgb, scene.depth_m, scene.intrinsics, CELL).error == \
        "the box has no area"
    bad_k = CameraIntrinsics(0.0, 0.0, 0.0, 0.0)
    assert "intrinsics" in object_geometry(truth.box, scene.rgb, scene.depth_m, bad_k, CELL).error


def test_transformed_moves_points_and_poses():
    scene = render([SHAPES["box"]], 640, 480, distance=0.8)
    geo, _ = solve(scene)
    rot, t = scene.cam_to_world[:3, :3], scene.cam_to_world[:3, 3]
    world = geo.transformed(rot, t, "world")
    assert world.frame_id == "world"
    np.testing.assert_allclose(world.center, rot @ geo.center + t, atol=1e-9)
    np.testing.assert_allclose(world.points, geo.points @ rot.T + t, atol=1e-5)
    assert world.rotation[:, 2] @ [0, 0, 1] > 0.99            # gravity-aligned in the world
    np.testing.assert_allclose(world.plane[:3] @ world.center + world.plane[3],
                               geo.plane[:3] @ geo.center + geo.plane[3], atol=1e-9)
    assert ObjectGeometry.invalid("no depth").transformed(rot, t, "world").frame_id == "world"


def test_quaternion_order_is_xyzw():
    assert quaternion(np.eye(3)) == (0.0, 0.0, 0.0, 1.0)
    c, s = math.cos(math.pi / 4), math.sin(math.pi / 4)
    qz = quaternion(np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    np.testing.assert_allclose(qz, (0.0, 0.0, s, c), atol=1e-12)
    flip = quaternion(np.diag([1.0, -1.0, -1.0]))
    np.testing.assert_allclose(np.abs(flip), (1.0, 0.0, 0.0, 0.0), atol=1e-12)


def test_an_object_without_depth_is_not_given_the_tables_geometry():
    """A black or transparent object leaves a hole in the depth: no geometry (not the table around it)."""
    scene = render([SHAPES["box"]], 640, 480, distance=0.8)
    truth = scene.truths[0]
    depth = noisy_depth(scene.depth_m, np.random.default_rng(10))
    depth[truth.mask] = np.nan
    geo = object_geometry(truth.box, scene.rgb, depth, scene.intrinsics, CELL)
    assert not geo.valid and geo.error.startswith("no depth on the object")
    flat = render([], 640, 480, distance=0.8)
    table = object_geometry((300, 200, 340, 240), flat.rgb, flat.depth_m, flat.intrinsics, CELL)
    assert not table.valid and table.error == "nothing stands above the support plane in the box"


def test_depth_with_a_channel_axis_works():
    scene = render([SHAPES["box"]], 640, 480, distance=0.8)
    depth = noisy_depth(scene.depth_m, np.random.default_rng(11))[:, :, None]
    geo, truth = solve(scene, depth=depth)
    assert geo.valid and np.linalg.norm(geo.center - truth.centre) <= 0.02
