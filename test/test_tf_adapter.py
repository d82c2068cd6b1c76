"""Geometry into target_frame (`ros/tf_adapter.py`) with transforms given directly (no tf2 here),
and what the messages carry of it: poses, sizes, grasps, masks, clouds, markers.

tf2_ros is not on PyPI, so `TfTransforms.lookup` (the one tf2 call) cannot run in CI; everything
behind it runs here: applying a transform to poses, points and clouds, the stamp asked for, and
what a missing transform does to a result.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from kosmos2_ros.core.serving.pipeline import Result
from kosmos2_ros.core.spatial.object_geometry import quaternion, rotation_matrix
from kosmos2_ros.ros import convert, visualize
from kosmos2_ros.ros.tf_adapter import TF2_MISSING, GeometryFrames, TransformUnavailable, make_geometry_frames

STAMP = 1_700_000_123_456_789_000


@pytest.fixture(scope="module")
def result(result_with_geometry: Result) -> Result:
    """A result with one object that has geometry (a rendered box) and one that has none (conftest)."""
    return result_with_geometry


class Given:
    """Transforms given directly: {(target, source): (R, t)}; records what was asked."""

    def __init__(self, table):
        self.table, self.asked = table, []

    def lookup(self, target, source, stamp_ns, timeout_s):
        self.asked.append((target, source, stamp_ns, timeout_s))
        if (target, source) not in self.table:
            raise TransformUnavailable(f"no transform {source} -> {target} at the image's stamp: "
                                       f'"{target}" passed to lookupTransform argument target_frame does not exist')
        return self.table[(target, source)]


def _copy(res: Result) -> Result:
    import copy

    return copy.deepcopy(res)


def test_geometry_moves_into_the_target_frame_at_the_image_stamp(result: Result) -> None:
    scene = result.scene
    rot, t = scene.cam_to_world[:3, :3], scene.cam_to_world[:3, 3]
    given = Given({("world", "cam_optical"): (rot, t)})
    res = _copy(result)
    GeometryFrames("world", 0.05, given, warn=pytest.fail).place([res])
    assert given.asked == [("world", "cam_optical", STAMP, 0.05)]
    assert res.geometry_frame_id == "world"
    before, after = result.objects[0].geometry, res.objects[0].geometry
    np.testing.assert_allclose(after.center, rot @ before.center + t, atol=1e-9)
    np.testing.assert_allclose(after.points, before.points @ rot.T + t, atol=1e-5)
    np.testing.assert_allclose(after.grasp_position, rot @ before.grasp_position + t, atol=1e-9)
    assert after.rotation[:, 2] @ [0, 0, 1] > 0.99 and after.grasp_rotation[:, 2] @ [0, 0, -1] > 0.99
    np.testing.assert_allclose(after.center[:2], [0.0, 0.0], atol=0.02)     # the box stands at the world origin
    msg = convert.result_to_msg(res)
    assert msg.geometry_frame_id == "world" and msg.header.frame_id == "cam_optical"   # point stays in the camera's
    cloud = convert.cloud_of(res)
    assert cloud.header.frame_id == "world" and cloud.header.stamp == msg.header.stamp
    pts = convert.cloud_points(cloud)
    np.testing.assert_allclose(pts["x"], after.points[:, 0])
    assert not res.objects[1].geometry.valid        # an object without geometry stays without


def test_candidates_move_with_the_objects(result: Result) -> None:
    """A candidate a person picks is what the arm reaches for: its geometry is in target_frame too (it
    stayed in the camera's frame, labelled with the target's, 0.7 m off), and in the message (which
    `~/tracks` entries copy their candidates from)."""
    import copy

    scene = result.scene
    rot, t = scene.cam_to_world[:3, :3], scene.cam_to_world[:3, 3]
    res = _copy(result)
    res.candidates = [copy.deepcopy(res.objects[0])]
    before = res.candidates[0].geometry
    GeometryFrames("world", 0.05, Given({("world", "cam_optical"): (rot, t)}), warn=pytest.fail).place([res])
    after = res.candidates[0].geometry
    assert after.frame_id == "world"
    np.testing.assert_allclose(after.center, rot @ before.center + t, atol=1e-9)
    np.testing.assert_allclose(after.grasp_position, rot @ before.grasp_position + t, atol=1e-9)
    msg = convert.result_to_msg(res)
    np.testing.assert_allclose([msg.candidates[0].pose.position.x, msg.candidates[0].pose.position.z],
                               [after.center[0], after.center[2]], atol=1e-9)
    missing = _copy(result)
    missing.candidates = [copy.deepcopy(missing.objects[0])]
    GeometryFrames("base_link", 0.05, Given({}), warn=lambda text: None).place([missing])
    assert not missing.candidates[0].geometry.valid and "no transform" in missing.candidates[0].geometry.error


def test_a_missing_transform_makes_the_geometry_invalid_and_says_what_to_check(result: Result) -> None:
    warnings = []
    frames = GeometryFrames("base_link", 0.05, Given({}), warn=warnings.append)
    first, second = _copy(result), _copy(result)
    frames.place([first])
    frames.place([second])
    geo = first.objects[0].geometry
    assert not geo.valid and geo.error.startswith("no transform cam_optical -> base_link at the image's stamp")
    assert geo.mask is not None and geo.box_refined is not None          # the pixels are still right
    assert first.status.value == 0 and first.objects[0].box_px == result.objects[0].box_px
    assert len(warnings) == 1 and "ros2 run tf2_ros tf2_echo base_link cam_optical" in warnings[0]
    assert frames.failures == 2
    msg = convert.result_to_msg(first)
    assert not msg.objects[0].geometry_valid and msg.objects[0].geometry_error == geo.error
    assert convert.cloud_of(first) is None


def test_no_target_or_the_same_frame_leaves_it_as_it_is(result: Result) -> None:
    res = _copy(result)
    GeometryFrames("", 0.05, None, warn=pytest.fail).place([res])
    assert res.geometry_frame_id == "cam_optical"
    np.testing.assert_array_equal(res.objects[0].geometry.center, result.objects[0].geometry.center)
    given = Given({})
    GeometryFrames("cam_optical", 0.05, given, warn=pytest.fail).place([res])
    assert given.asked == [] and res.objects[0].geometry.valid


def test_each_robots_camera_goes_into_its_own_robots_frame(result: Result) -> None:
    """One node serving robots r1 and r2 (target_frames): r1's result into r1/base_link, r2's into
    r2/base_link, a third camera with no frame of its own into target_frame."""
    scene = result.scene
    rot, t = scene.cam_to_world[:3, :3], scene.cam_to_world[:3, 3]
    given = Given({(frame, "cam_optical"): (rot, t) for frame in ("r1/base_link", "r2/base_link", "world")})
    frames = GeometryFrames("world", 0.05, given, warn=pytest.fail,
                            per_camera={"r1/front": "r1/base_link", "r2/front": "r2/base_link", "r3/front": ""})
    placed = []
    for camera in ("r1/front", "r2/front", "r3/front"):
        res = _copy(result)
        res.camera = camera
        placed.append(res)
    frames.place(placed)
    assert [r.geometry_frame_id for r in placed] == ["r1/base_link", "r2/base_link", "world"]
    assert [a[0] for a in given.asked] == ["r1/base_link", "r2/base_link", "world"]
    np.testing.assert_allclose(placed[1].objects[0].geometry.center, rot @ result.objects[0].geometry.center + t,
                               atol=1e-9)


def test_target_frame_without_tf2_names_what_to_install(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tf2_ros", None)
    with pytest.raises(ImportError, match="apt install ros-\\$ROS_DISTRO-tf2-ros-py\\)"):
        make_geometry_frames(object(), "base_link", 0.05)
    with pytest.raises(ImportError, match="tf2_ros is not importable"):      # a robot's frame alone needs it too
        make_geometry_frames(object(), "", 0.05, {"r1/front": "r1/base_link"})
    assert "target_frame is set but tf2_ros is not importable" in TF2_MISSING


def test_messages_carry_the_geometry(result: Result) -> None:
    msg = convert.result_to_msg(result)
    obj, other = msg.objects
    geo = result.objects[0].geometry
    assert obj.geometry_valid and obj.geometry_error == ""
    assert (obj.box_refined.x_min, obj.box_refined.y_max) == (geo.box_refined[0], geo.box_refined[3])
    q = obj.pose.orientation
    np.testing.assert_allclose(rotation_matrix(q.x, q.y, q.z, q.w), geo.rotation, atol=1e-6)
    np.testing.assert_allclose([obj.size.x, obj.size.y, obj.size.z], geo.size, atol=1e-6)
    assert math.isclose(obj.grasp_width, geo.grasp_width, rel_tol=1e-6)
    assert not other.geometry_valid and other.geometry_error.startswith("no valid depth inside the box")
    labels = np.frombuffer(bytes(msg.mask.data), dtype=np.uint8).reshape(480, 640)
    assert msg.mask.encoding == "mono8" and set(np.unique(labels)) == {0, 1}
    np.testing.assert_array_equal(labels == 1, geo.mask)
    assert convert.result_to_msg(result, masks=False).mask.width == 0
    np.testing.assert_allclose(quaternion(rotation_matrix(*quaternion(geo.rotation))), quaternion(geo.rotation),
                               atol=1e-9)


def test_markers_show_the_3d_box_and_the_grasp(result: Result) -> None:
    msg = convert.result_to_msg(result)
    out = visualize.markers(msg).markers
    kinds = [m.type for m in out[1:]]
    cube, arrow, label = out[1:4]
    assert kinds == [cube.CUBE, cube.ARROW, cube.TEXT_VIEW_FACING]   # the object without geometry nor point: none
    assert cube.header.frame_id == msg.geometry_frame_id and cube.color.a < 0.5
    tip = arrow.points[1]
    grasp = msg.objects[0].grasp.position
    assert (tip.x, tip.y, tip.z) == (grasp.x, grasp.y, grasp.z)
    assert label.text == "the box"


def test_geometry_reasons_are_counted_by_kind() -> None:
    stats = visualize.Stats()
    assert stats.geometry_invalid("no valid depth inside the box (0 of 100 pixels)")
    assert not stats.geometry_invalid("no valid depth inside the box (0 of 7 pixels)")
    assert stats.geometry_invalid("no transform cam -> base at the image's stamp: ...")
    snap = stats.snapshot()
    assert snap["geometry_invalid"] == "3"
    assert snap["geometry_invalid_reasons"] == ("no valid depth inside the box: 2; "
                                                "no transform cam -> base at the image's stamp: 1")
