"""Manipulation geometry through the node: a real node process over loopback DDS, the tiny checkpoint,
a camera publishing a synthetic RGB-D scene (colour, 16UC1 depth, camera_info) at 640x480.

The objects' pose, size, refined box, grasp and mask agree with the scene's ground truth within
the benchmark's bounds (`bench/object_geometry.py`: p90 centroid error <= 25 mm up to 1.5 m); the
object cloud arrives while subscribed; ~/tracks objects carry the same geometry; without depth
every result is as before with `geometry_valid` false and the reason; with `target_frame` set and
no tf2 (as here) configure fails with one line.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Iterator, List

import numpy as np
import pytest
from node_helpers import NodeProcess, Tester, free_domain, rgb_image_msg, running_node

from kosmos2_ros.core.model.grounding import box_iou
from kosmos2_ros.fixtures.rgbd_scenes import SceneObject, model_box, noisy_depth, plain_geometry, render

OK = 0
W, H = 640, 480
pytestmark = pytest.mark.timeout(180)
_stamp = [1_800_000_000_000_000_000]


def next_stamp() -> int:
    _stamp[0] += 10_000_000_000          # 10 s apart: a frame never pairs with another frame's depth
    return _stamp[0]


OBJECTS = [SceneObject("box", (-0.12, 0.0), (0.09, 0.07, 0.11), yaw=0.5, colour=(200, 40, 40)),
           SceneObject("cylinder", (0.05, 0.03), (0.08, 0.08, 0.13), colour=(40, 90, 200)),
           SceneObject("sphere", (0.0, -0.12), (0.09, 0.09, 0.09), colour=(40, 160, 60))]


class Geometry:
    """The test side: publishes RGB-D frames, listens to ~/object_cloud and ~/tracks."""

    def __init__(self, t: Tester) -> None:
        from geometry_msgs.msg import PoseStamped, Vector3Stamped
        from sensor_msgs.msg import Image, PointCloud2

        from kosmos2_ros.msg import ObjectCloud, Tracks
        from kosmos2_ros.ros.target import LATCHED

        self.t = t
        self.clouds: List[Any] = []
        self.tracks: List[Any] = []
        self.target = {name: [] for name in ("grasp", "pose", "size", "mask", "cloud")}
        self._lock = threading.Lock()
        t.node.create_subscription(PointCloud2, "/kosmos2/object_cloud", self._keep(self.clouds), 10)
        t.node.create_subscription(Tracks, "/kosmos2/tracks", self._keep(self.tracks), 10)
        self.labelled: List[Any] = []
        t.node.create_subscription(ObjectCloud, "/kosmos2/object_clouds", self._keep(self.labelled), 10)
        for name, kind in (("grasp", PoseStamped), ("pose", PoseStamped), ("size", Vector3Stamped), ("mask", Image),
                           ("cloud", PointCloud2)):
            t.node.create_subscription(kind, f"/kosmos2/target/{name}", self._keep(self.target[name]), LATCHED)

    def _keep(self, into: list):
        def callback(msg: Any) -> None:
            with self._lock:
                into.append(msg)
        return callback

    def publish(self, scene: Any, with_depth: bool = True, seed: int = 0) -> int:
        from sensor_msgs.msg import CameraInfo, Image

        from kosmos2_ros.ros.convert import header_of, uint8_array

        stamp = next_stamp()
        header = header_of(stamp, "camera_color_optical_frame")
        k = scene.intrinsics
        self.t.info_pub.publish(CameraInfo(header=header, width=W, height=H,
                                           k=[k.fx, 0.0, k.cx, 0.0, k.fy, k.cy, 0.0, 0.0, 1.0]))
        if with_depth:
            depth = scene.depth_16uc1(noisy_depth(scene.depth_m, np.random.default_rng(seed)))
            self.t.depth_pub.publish(Image(header=header, height=H, width=W, encoding="16UC1", step=2 * W,
                                           data=uint8_array(depth)))
        time.sleep(0.3)
        self.t.publish_frame(scene.rgb, stamp, "camera_color_optical_frame")
        assert self.t.wait_frame(stamp).status == OK
        return stamp

    def wait(self, what: list, stamp: int, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                hit = [m for m in what if m.header.stamp.sec * 10**9 + m.header.stamp.nanosec == stamp]
            if hit:
                return hit[-1]
            time.sleep(0.05)
        raise TimeoutError("nothing arrived for that frame")


@pytest.fixture(scope="module")
def node(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    log = tmp_path_factory.mktemp("geometry_node") / "node.log"
    with running_node({"model": str(tiny_model_dir), "max_frame_age_s": 0, "max_new_tokens": 16,
                       "queries": ["a red square"], "query_rate_hz": 20.0}, free_domain(), log) as (proc, t):
        while t.depth_pub.get_subscription_count() == 0 or t.info_pub.get_subscription_count() == 0:
            time.sleep(0.05)
        yield proc, t, Geometry(t)


def _check_against_truth(obj: Any, truth: Any, labels: np.ndarray, label: int) -> None:
    from kosmos2_ros.core.spatial.object_geometry import rotation_matrix

    assert obj.geometry_valid, obj.geometry_error
    centre = np.array([obj.pose.position.x, obj.pose.position.y, obj.pose.position.z])
    assert np.linalg.norm(centre - truth.centre) <= 0.025
    size = np.array([obj.size.x, obj.size.y, obj.size.z])
    assert np.abs(np.sort(size[:2]) - np.sort(truth.size[:2])).max() <= 0.03 and abs(size[2] - truth.size[2]) <= 0.02
    b = obj.box_refined
    assert box_iou((b.x_min, b.y_min, b.x_max, b.y_max), truth.box) >= 0.8
    grasp = np.array([obj.grasp.position.x, obj.grasp.position.y, obj.grasp.position.z])
    assert np.linalg.norm(grasp - truth.top) <= 0.025
    q = obj.grasp.orientation
    approach = rotation_matrix(q.x, q.y, q.z, q.w)[:, 2]
    assert approach @ truth.centre > 0       # the approach points away from the camera, down onto the object
    mine = labels == label
    assert (mine & truth.mask).sum() / (mine | truth.mask).sum() >= 0.8


def test_region_objects_carry_geometry_that_matches_the_scene(node: tuple) -> None:
    """A region command per object (its box as Kosmos-2 would place it): pose, size, refined box,
    grasp and mask against the ground truth; the object cloud arrives while subscribed."""
    _, t, geo = node
    scene = render(OBJECTS, W, H, distance=0.8, elevation_deg=45.0)
    rng = np.random.default_rng(3)
    stamp = geo.publish(scene)
    for i, truth in enumerate(scene.truths):
        region = model_box(truth.box, plain_geometry(W, H), rng)
        res = t.run(t.command(f"geo-region-{i}", "region", region=region, stamp_ns=stamp))
        assert res.status == OK, res.error
        assert res.geometry_frame_id == "camera_color_optical_frame"
        assert (res.mask.width, res.mask.height, res.mask.encoding) == (W, H, "mono8")
        labels = np.frombuffer(bytes(res.mask.data), dtype=np.uint8).reshape(H, W)
        b = res.objects[0].box
        assert (b.x_min, b.y_min, b.x_max, b.y_max) == region     # the region given is the object's box
        _check_against_truth(res.objects[0], truth, labels, 1)
        cloud = geo.wait(geo.clouds, stamp)
        from kosmos2_ros.ros.convert import cloud_points

        points = cloud_points(cloud)
        assert cloud.header.frame_id == "camera_color_optical_frame" and len(points) > 100
        xyz = np.stack([points["x"], points["y"], points["z"]], axis=1)
        near = np.linalg.norm(xyz - truth.centre, axis=1) <= np.linalg.norm(truth.size) / 2 + 0.02
        assert near.mean() > 0.9 and set(points["object"]) == {0}
        labelled = geo.wait(geo.labelled, stamp)        # the same cloud, saying which result it is
        deadline = time.monotonic() + 10
        while labelled.result_id != f"geo-region-{i}" and time.monotonic() < deadline:
            time.sleep(0.05)
            labelled = geo.wait(geo.labelled, stamp)
        assert labelled.result_id == f"geo-region-{i}" and labelled.cloud.data == cloud.data
        geo.clouds.clear()


def test_the_target_topics_carry_what_a_planner_takes(node: tuple) -> None:
    """A consumer using only ~/target/*: after a region command, the grasp and box poses (PoseStamped), size,
    mask (mono8, 255 exactly on the object's pixels) and cloud (xyz + rgb of the object alone), all at the
    image's stamp, agree with the result and with the scene's truth."""
    from kosmos2_ros.ros.convert import cloud_points

    _, t, geo = node
    scene = render(OBJECTS, W, H, distance=0.8, elevation_deg=45.0)
    stamp = geo.publish(scene, seed=5)
    truth = scene.truths[1]
    region = model_box(truth.box, plain_geometry(W, H), np.random.default_rng(4))
    res = t.run(t.command("geo-target", "region", region=region, stamp_ns=stamp))
    assert res.status == OK and res.objects[0].geometry_valid, res.error
    got = {name: geo.wait(msgs, stamp) for name, msgs in geo.target.items()}
    obj = res.objects[0]
    assert got["grasp"].pose == obj.grasp and got["pose"].pose == obj.pose
    assert got["grasp"].header.frame_id == got["pose"].header.frame_id == res.geometry_frame_id
    assert (got["size"].vector.x, got["size"].vector.y, got["size"].vector.z) == (obj.size.x, obj.size.y, obj.size.z)
    mask = got["mask"]
    assert (mask.width, mask.height, mask.encoding, mask.header.frame_id) == (W, H, "mono8", "camera_color_optical_frame")
    pixels = np.frombuffer(bytes(mask.data), dtype=np.uint8).reshape(H, W)
    labels = np.frombuffer(bytes(res.mask.data), dtype=np.uint8).reshape(H, W)
    assert set(np.unique(pixels)) <= {0, 255} and np.array_equal(pixels == 255, labels == 1)
    mine = pixels == 255
    assert (mine & truth.mask).sum() / (mine | truth.mask).sum() >= 0.8
    points = cloud_points(got["cloud"])
    assert [f.name for f in got["cloud"].fields] == ["x", "y", "z", "rgb"] and len(points) > 100
    xyz = np.stack([points["x"], points["y"], points["z"]], axis=1)
    assert (np.linalg.norm(xyz - truth.centre, axis=1) <= np.linalg.norm(truth.size) / 2 + 0.02).mean() > 0.9
    assert len(t.results.get("geo-target", [])) == 1


def _under(scene: Any, box: tuple) -> tuple:
    """Where on the table (world x, y) the centre of a pixel box looks, and the box's footprint there
    (metres across, metres deep: the camera looks nearly straight down)."""
    k, rot, pos = scene.intrinsics, scene.cam_to_world[:3, :3], scene.cam_to_world[:3, 3]
    u, v = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    ray = rot @ np.array([(u - k.cx) / k.fx, (v - k.cy) / k.fy, 1.0])
    depth = -pos[2] / ray[2]
    hit = pos + ray * depth
    return (float(hit[0]), float(hit[1])), ((box[2] - box[0]) * depth / k.fx, (box[3] - box[1]) * depth / k.fy)


def test_refer_and_tracks_carry_geometry(node: tuple) -> None:
    """A refer command's object and the standing query's tracked object carry the geometry of the
    object under the model's box. The tiny checkpoint's box hardly depends on the image, so the
    test first asks where it puts "a red square" on an empty grey table (the kind of scene it was
    trained on), then places a red box there and checks the answer on that scene against its truth."""
    _, t, geo = node
    view = dict(distance=0.6, elevation_deg=85.0, table_colour=(128, 128, 128))
    empty = render([], W, H, **view)
    probe = t.run(t.command("geo-probe", "refer", "a red square", stamp_ns=geo.publish(empty), decoding="constrained"))
    b = probe.objects[0].box
    xy, (across, deep) = _under(empty, (b.x_min, b.y_min, b.x_max, b.y_max))
    footprint = (min(max(across, 0.05), 0.2), min(max(deep, 0.05), 0.2))
    scene = render([SceneObject("box", xy, (*footprint, 0.05), colour=(220, 30, 30))], W, H, **view)
    truth = scene.truths[0]
    stamp = geo.publish(scene, seed=1)
    res = t.run(t.command("geo-refer", "refer", "a red square", stamp_ns=stamp, decoding="constrained"))
    assert res.status == OK, res.error
    b = res.objects[0].box
    assert box_iou((b.x_min, b.y_min, b.x_max, b.y_max), truth.box) > 0.3     # the model's box is on the object
    labels = np.frombuffer(bytes(res.mask.data), dtype=np.uint8).reshape(H, W)
    _check_against_truth(res.objects[0], truth, labels, 1)
    tracks = geo.wait(geo.tracks, stamp)
    (entry,) = tracks.queries
    assert tracks.geometry_frame_id == "camera_color_optical_frame"
    _check_against_truth(entry.objects[0], truth, labels, 1)


def test_a_standing_query_named_by_target_query_is_the_target(node: tuple) -> None:
    """With target_query naming the standing query, its tracked (fused) object goes out on ~/target/* at
    each grounded frame's stamp, the same pose ~/tracks publishes (an ambiguous answer is no target: the
    random checkpoint's candidates make most answers ambiguous, so candidates are off here)."""
    _, t, geo = node
    scene = render(OBJECTS, W, H, distance=0.8, elevation_deg=45.0)
    assert all(r.successful for r in t.set_parameters({"target_query": "a red square", "max_candidates": 0}))
    try:
        stamp = geo.publish(scene, seed=9)
        entry = geo.wait(geo.tracks, stamp).queries[0]
        assert entry.found and not entry.ambiguous and entry.objects[0].geometry_valid, entry.objects[0].geometry_error
        grasp = geo.wait(geo.target["grasp"], stamp)
        assert grasp.pose == entry.objects[0].grasp and grasp.header.frame_id == "camera_color_optical_frame"
    finally:
        t.set_parameters({"target_query": "", "max_candidates": 3})


def test_a_track_holds_while_its_object_is_hidden_and_keeps_its_id(node: tuple) -> None:
    """Over DDS: the standing query's object found, then not found on 10 frames (as when the arm covers it;
    made here by raising presence_threshold, so the model's answer is "not there"), then found again.
    ~/tracks holds the track through the 10 frames (occluded, the same id, the last pose, when it was last
    seen) and the object keeps its id when it reappears."""
    _, t, geo = node
    scene = render(OBJECTS, W, H, distance=0.8, elevation_deg=45.0)
    assert all(r.successful for r in t.set_parameters({"track_hold_s": 3600.0}))   # frames here are 10 s apart
    try:
        seen = geo.publish(scene, seed=7)
        first = geo.wait(geo.tracks, seen).queries[0]
        assert first.found and first.track_id > 0 and first.objects
        assert all(r.successful for r in t.set_parameters({"presence_threshold": 1.0}))
        for k in range(10):
            entry = geo.wait(geo.tracks, geo.publish(scene, seed=20 + k)).queries[0]
            assert not entry.found and entry.occluded and entry.track_id == first.track_id, k
            assert entry.last_seen == first.last_seen and entry.objects[0].pose == first.objects[0].pose
        assert all(r.successful for r in t.set_parameters({"presence_threshold": 0.0}))
        back = geo.wait(geo.tracks, geo.publish(scene, seed=40)).queries[0]
        assert back.found and not back.occluded and back.track_id == first.track_id
    finally:
        t.set_parameters({"presence_threshold": 0.0, "track_hold_s": 2.0})


def test_without_depth_results_are_as_before_and_say_why(node: tuple) -> None:
    """No depth for a frame: the object keeps its box and says why it has no point and no geometry;
    /diagnostics counts both reasons by kind and the log has the first of each."""
    from diagnostic_msgs.msg import DiagnosticArray

    proc, t, geo = node
    diagnostics: list = []
    t.node.create_subscription(DiagnosticArray, "/diagnostics", diagnostics.append, 10)
    scene = render(OBJECTS, W, H, distance=0.8)
    stamp = geo.publish(scene, with_depth=False)
    res = t.run(t.command("geo-nodepth", "region", region=scene.truths[0].box, stamp_ns=stamp))
    assert res.status == OK, res.error
    (obj,) = res.objects
    assert not obj.geometry_valid and obj.geometry_error == "no depth image paired with this frame"
    assert not obj.point_valid and obj.point_error == "no depth image paired with this frame"
    assert res.mask.width == 0 and len(res.mask.data) == 0
    deadline, values = time.monotonic() + 10, {}
    while "no depth image paired with this frame" not in values.get("point_invalid_reasons", "") \
            and time.monotonic() < deadline:
        time.sleep(0.1)
        values = {kv.key: kv.value for kv in diagnostics[-1].status[0].values} if diagnostics else {}
    assert int(values["point_invalid"]) >= 1, values
    assert "no depth image paired with this frame: " in values["geometry_invalid_reasons"]
    log = proc.log()
    assert log.count("has no 3D point: no depth image paired with this frame") == 1
    assert log.count("has no geometry: no depth image paired with this frame") == 1


def test_target_frame_without_tf2_fails_configure_with_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    domain = free_domain()
    proc = NodeProcess({"model": str(tiny_model_dir), "target_frame": "base_link"}, domain, tmp_path / "node.log")
    t = Tester(domain)
    try:
        deadline = time.monotonic() + 60
        while "cannot configure" not in proc.log() and time.monotonic() < deadline and proc.alive():
            time.sleep(0.1)
        lines = [line for line in proc.log().splitlines() if "cannot configure" in line]
        assert len(lines) == 1, proc.log()
        assert "target_frame is set but tf2_ros is not importable: install it (apt install ros-$ROS_DISTRO-tf2-ros-py)" \
            in lines[0]
        assert t.state() == "unconfigured"
    finally:
        t.close()
        assert proc.stop() == 0, proc.log()


def test_rgb_image_helper_is_the_scene():      # the frames above are the scene's own pixels
    scene = render(OBJECTS[:1], 64, 48, distance=0.8)
    msg = rgb_image_msg(scene.rgb, 1)
    assert bytes(msg.data) == scene.rgb.tobytes()
