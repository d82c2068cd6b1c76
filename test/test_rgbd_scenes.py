"""Synthetic RGB-D scenes: exact depth and ground truth, the depth noise model, model-like boxes."""
from __future__ import annotations

import math

import numpy as np

from kosmos2_ros.core.spatial.geometry import depth_to_meters
from kosmos2_ros.fixtures.rgbd_scenes import NOISE_K, SceneObject, model_box, noisy_depth, plain_geometry, random_scene, render


def test_depth_is_the_optical_z_of_the_nearest_surface():
    """An empty table: every pixel's depth back-projects onto the plane z = 0 of the world, through the
    pixel's centre where camera_info's K puts it (pixel (u, v) at (u, v): OpenCV's convention)."""
    scene = render([], 320, 240, distance=1.0, elevation_deg=45.0)
    k, rot, t = scene.intrinsics, scene.cam_to_world[:3, :3], scene.cam_to_world[:3, 3]
    for v, u in ((200, 160), (150, 40), (230, 300)):
        z = float(scene.depth_m[v, u])
        p_cam = np.array([(u - k.cx) * z / k.fx, (v - k.cy) * z / k.fy, z])
        assert abs((rot @ p_cam + t)[2]) < 1e-5
    assert (scene.ids[120:] == -1).all()               # the lower half of the view is table


def test_ground_truth_of_a_box():
    box = SceneObject("box", (0.0, 0.0), (0.1, 0.06, 0.08), yaw=0.3, colour=(200, 40, 40))
    scene = render([box], 640, 480, distance=0.8, elevation_deg=50.0)
    truth = scene.truths[0]
    assert truth.mask.sum() > 1000 and not (truth.mask & (scene.ids != 0)).any()
    ys, xs = np.nonzero(truth.mask)
    assert truth.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    rot, t = scene.cam_to_world[:3, :3], scene.cam_to_world[:3, 3]
    np.testing.assert_allclose(rot @ truth.centre + t, [0.0, 0.0, 0.04], atol=1e-9)
    np.testing.assert_allclose(rot @ truth.top + t, [0.0, 0.0, 0.08], atol=1e-9)
    assert abs(truth.distance - np.linalg.norm(truth.centre)) < 1e-12
    assert (scene.rgb[truth.mask][:, 0] > scene.rgb[truth.mask][:, 2]).all()   # it is the red one


def test_noise_grows_with_the_square_of_depth_and_leaves_holes():
    rng = np.random.default_rng(0)
    for z in (0.5, 1.0, 2.0):
        flat = np.full((200, 200), z, dtype=np.float32)
        noisy = noisy_depth(flat, rng)
        hole_rate = np.isnan(noisy).mean()
        assert 0.005 < hole_rate < 0.02                    # scattered holes, no edges in a flat image
        assert abs(np.nanstd(noisy) / (NOISE_K * z * z) - 1) < 0.05
    scene = random_scene(np.random.default_rng(1), 640, 480, count=3, distance=1.0)
    noisy = noisy_depth(scene.depth_m, rng)
    edges = np.zeros(scene.depth_m.shape, bool)
    edges[:, 1:] = np.abs(np.diff(scene.depth_m, axis=1)) > 0.03
    assert np.isnan(noisy[edges]).mean() > 0.3            # depth edges lose about half their pixels


def test_16uc1_is_millimetres():
    scene = render([SceneObject("sphere", (0, 0), (0.1, 0.1, 0.1))], 160, 120, distance=0.7)
    mm = scene.depth_16uc1()
    assert mm.dtype == np.uint16
    np.testing.assert_allclose(depth_to_meters(mm, "16UC1"), scene.depth_m, atol=0.0006)


def test_model_boxes_are_on_the_grid_within_a_cell():
    rng = np.random.default_rng(2)
    geometry = plain_geometry(640, 480)
    truth = (101.0, 57.0, 250.0, 199.0)
    for _ in range(50):
        box = model_box(truth, geometry, rng)
        for v, t, cell in zip(box, truth, (20, 15, 20, 15)):
            assert abs(v - t) <= cell * 1.5 + 1e-9
            assert math.isclose(v / cell, round(v / cell), abs_tol=1e-9)
