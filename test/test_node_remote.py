"""A GPU desktop serving robots over the network (issue 31), over real DDS with the tiny checkpoint.

Two nodes started from one shards file as serve_robots.launch.py starts them (`launch_shards`):
kosmos2_a serves r1/front and r2/front, kosmos2_b serves r3/front. Each robot publishes what a robot
sends over WiFi, compressed colour (JPEG) and compressedDepth, on its driver's topics, and talks to its
own camera's topics (`<camera>/kosmos2/command`, `.../result`, `.../ground`, `.../tracks`), never
naming the node that serves it.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pytest
from node_helpers import ROOT, NodeProcess, Tester, free_domain, scene

DOMAIN = free_domain()
OK, BUSY, NO_FRAME, STALE, INVALID = range(5)
W, H = 96, 72
SHARDS = """
shards:
  - name: kosmos2_a
    cameras:
      - {name: r1/front, image: /r1/camera/color/image_raw, depth: /r1/camera/aligned_depth_to_color/image_raw}
      - {name: r2/front, image: /r2/camera/color/image_raw, depth: /r2/camera/aligned_depth_to_color/image_raw}
  - name: kosmos2_b
    cameras:
      - {name: r3/front, image: /r3/camera/color/image_raw, depth: /r3/camera/aligned_depth_to_color/image_raw}
"""
CAMERAS = ("r1/front", "r2/front", "r3/front")
K = [60.0, 0.0, W / 2, 0.0, 60.0, H / 2, 0.0, 0.0, 1.0]

pytestmark = pytest.mark.timeout(240)


class Robots:
    """The robots' side: each camera's driver topics (compressed) and its own command/result topics."""

    def __init__(self, tester: Tester, shards: List[Any]) -> None:
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, CompressedImage

        from kosmos2_ros.msg import GroundingCommand, GroundingResult, Tracks
        from kosmos2_ros.ros.topics import camera_interface
        from kosmos2_ros.srv import Ground

        self.t = tester
        n = tester.node
        reliable = QoSProfile(depth=20, reliability=ReliabilityPolicy.RELIABLE)
        remaps = {src: dst for shard in shards for src, dst in shard.remappings}
        self.colour, self.depth, self.info, self.commands, self.ground = {}, {}, {}, {}, {}
        self.results: Dict[str, List[Any]] = {cam: [] for cam in CAMERAS}
        self.tracks: Dict[str, List[Any]] = {cam: [] for cam in CAMERAS}
        self._cv = threading.Condition()
        for cam in CAMERAS:
            self.colour[cam] = n.create_publisher(CompressedImage, remaps[f"{cam}/image"] + "/compressed", reliable)
            self.depth[cam] = n.create_publisher(CompressedImage, remaps[f"{cam}/depth/image"] + "/compressedDepth",
                                                 reliable)
            self.info[cam] = n.create_publisher(CameraInfo, remaps[f"{cam}/camera_info"], reliable)
            self.commands[cam] = n.create_publisher(GroundingCommand, "/" + camera_interface(cam, "command"), reliable)
            self.ground[cam] = n.create_client(Ground, "/" + camera_interface(cam, "ground"))
            n.create_subscription(GroundingResult, "/" + camera_interface(cam, "result"),
                                  lambda msg, cam=cam: self._on(self.results, cam, msg), QoSProfile(depth=200))
            n.create_subscription(Tracks, "/" + camera_interface(cam, "tracks"),
                                  lambda msg, cam=cam: self._on(self.tracks, cam, msg), 50)
        self._probes = 0
        self._stamp = 1_900_000_000_000_000_000

    def _on(self, store: Dict[str, List[Any]], cam: str, msg: Any) -> None:
        with self._cv:
            store[cam].append(msg)
            self._cv.notify_all()

    def wait_matched(self, timeout: float = 30.0) -> None:
        """Until the nodes hear every publisher and answer on every camera topic; then a moment more, since
        a publisher can see the node before the node has matched it (discovery is not symmetric)."""
        pubs = [p for group in (self.colour, self.depth, self.info, self.commands) for p in group.values()]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(p.get_subscription_count() > 0 for p in pubs):
            time.sleep(0.05)
        assert all(p.get_subscription_count() > 0 for p in pubs), "a node never subscribed to a robot's topic"
        time.sleep(1.0)

    def next_stamp(self) -> int:
        self._stamp += 100_000_000
        return self._stamp

    def wait_result(self, cam: str, cmd_id: str, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                found = [m for m in self.results[cam] if m.id == cmd_id]
                if found:
                    return found[0]
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no result for {cmd_id!r} on camera {cam}'s result topic")
                self._cv.wait(0.1)

    def command(self, cam: str, cmd_id: str, text: str = "the red box", task: str = "refer", stamp_ns: int = 0,
                camera: str = "", max_new_tokens: int = 0) -> Any:
        msg = self.t.command(cmd_id, task, text, stamp_ns=stamp_ns, max_new_tokens=max_new_tokens)
        msg.camera = camera
        return msg

    def run(self, cam: str, msg: Any, timeout: float = 30.0) -> Any:
        self.commands[cam].publish(msg)
        return self.wait_result(cam, msg.id, timeout)

    def send(self, cam: str, rgb: np.ndarray, depth: Optional[Tuple[str, bytes]] = None,
             colour: Optional[bytes] = None) -> int:
        """One frame from the robot: camera_info, compressedDepth (when given), then the JPEG (or `colour`
        bytes) at one stamp; returns the stamp once the node has it (kept or rejected)."""
        import cv2
        from sensor_msgs.msg import CameraInfo, CompressedImage

        from kosmos2_ros.ros.convert import header_of, uint8_array

        stamp = self.next_stamp()
        header = header_of(stamp, cam.replace("/", "_") + "_optical")
        self.info[cam].publish(CameraInfo(header=header, width=W, height=H, k=K,
                                          p=[K[0], 0.0, K[2], 0.0, 0.0, K[4], K[5], 0.0, 0.0, 0.0, 1.0, 0.0]))
        if depth is not None:
            self.depth[cam].publish(CompressedImage(header=header, format=depth[0], data=uint8_array(depth[1])))
        if colour is None:
            colour = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
        image = CompressedImage(header=header, format="jpeg", data=uint8_array(bytes(colour)))
        self.colour[cam].publish(image)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            self._probes += 1
            res = self.run(cam, self.command(cam, f"probe-{self._probes}", "", "caption", stamp, max_new_tokens=1))
            if res.status == NO_FRAME:          # that copy was lost to discovery: send it again
                self.colour[cam].publish(image)
                time.sleep(0.1)
                continue
            return stamp
        raise TimeoutError(f"camera {cam}: the node never received the frame stamped {stamp}")


@pytest.fixture(scope="module")
def fleet(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Robots]:
    from kosmos2_ros.ros.launch_shards import parse_shards

    shards = parse_shards(SHARDS)
    common = {"model": str(tiny_model_dir), "image_transport": "compressed", "depth_transport": "compressedDepth",
              "max_frame_age_s": 0, "max_new_tokens": 16, "queue_size": 8, "query_rate_hz": 4.0}
    logs = tmp_path_factory.mktemp("fleet")
    procs = [NodeProcess(shard.node_parameters(common), DOMAIN, logs / f"{shard.name}.log",
                         script=str(ROOT / "bin" / "grounding_node"),
                         remaps={**dict(shard.remappings), "__node": shard.name}) for shard in shards]
    tester = Tester(DOMAIN, node_ns="/kosmos2_a")
    try:
        for proc, shard in zip(procs, shards):
            tester.node_ns = f"/{shard.name}"
            tester.wait_active(proc=proc, raw_image=False)
        tester.node_ns = "/kosmos2_a"
        robots = Robots(tester, shards)
        robots.wait_matched()
        yield robots
    finally:
        tester.close()
        codes = [proc.stop() for proc in procs]
        assert codes == [0, 0], "\n".join(proc.log() for proc in procs)


def slanted(encoding: str) -> np.ndarray:
    """A table seen at an angle, 0.6 m at the bottom row to 1.4 m at the top."""
    metres = np.repeat(np.linspace(1.4, 0.6, H, dtype=np.float32)[:, None], W, axis=1)
    return np.round(metres * 1000).astype(np.uint16) if encoding == "16UC1" else metres


@pytest.mark.parametrize("encoding", ["16UC1", "32FC1"])
def test_compressed_depth_gives_the_raw_depths_point(fleet: Robots, encoding: str) -> None:
    """The node's 3D point from compressedDepth equals the point the raw depth gives for the same box
    (within 16UC1's millimetre and 32FC1's quantisation step)."""
    from kosmos2_ros.core.serving.images import encode_compressed_depth
    from kosmos2_ros.core.spatial.geometry import CameraIntrinsics, box_point_3d

    raw = slanted(encoding)
    metres = raw.astype(np.float32) / 1000.0 if encoding == "16UC1" else raw
    for attempt in range(5):
        fleet.send("r1/front", scene(W, H, 1), depth=encode_compressed_depth(raw, encoding))
        res = fleet.run("r1/front", fleet.command("r1/front", f"depth-{encoding}-{attempt}"))
        assert res.status == OK and res.objects, res.error
        obj = res.objects[0]
        if obj.point_error != "no depth image paired with this frame":   # that depth was lost to discovery
            break
    assert obj.point_valid, obj.point_error
    box = (obj.box.x_min, obj.box.y_min, obj.box.x_max, obj.box.y_max)
    expected, why = box_point_3d(box, metres, CameraIntrinsics.from_k(K, W, H), 0.5, 0.05, 20.0, (W, H))
    assert expected is not None, why
    np.testing.assert_allclose([obj.point.x, obj.point.y, obj.point.z], expected, atol=1e-3)
    assert res.camera == "r1/front" and res.geometry_frame_id == "r1_front_optical"


def _diagnostic(fleet: Robots, camera: str, key: str, since: float) -> int:
    """A camera's /diagnostics value, published after `since`."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for t, arr in reversed(list(fleet.diagnostics)):
            if t < since:
                break
            for status in arr.status:
                if status.name.endswith(f"({camera})"):
                    return int({kv.key: kv.value for kv in status.values}[key])
        time.sleep(0.1)
    raise TimeoutError(f"no /diagnostics for camera {camera} after the malformed frame")


@pytest.fixture(scope="module")
def diagnostics(fleet: Robots) -> Robots:
    from diagnostic_msgs.msg import DiagnosticArray

    fleet.diagnostics = []
    fleet.t.node.create_subscription(DiagnosticArray, "/diagnostics",
                                     lambda msg: fleet.diagnostics.append((time.monotonic(), msg)), 20)
    return fleet


def test_a_malformed_compressed_depth_is_counted_and_the_command_says_why(diagnostics: Robots) -> None:
    fleet = diagnostics
    from kosmos2_ros.core.serving.images import DEPTH_HEADER

    bad = ("16UC1; compressedDepth png", DEPTH_HEADER.pack(0, 0.0, 0.0) + b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    for attempt in range(5):
        fleet.send("r2/front", scene(W, H, 2), depth=bad)
        res = fleet.run("r2/front", fleet.command("r2/front", f"bad-depth-{attempt}"))
        assert res.status == OK and res.objects, res.error          # grounded all the same, without 3D
        if res.objects[0].point_error != "no depth image paired with this frame":
            break
    assert res.objects[0].point_error.startswith("depth image rejected: compressedDepth payload is not"), \
        res.objects[0].point_error
    assert _diagnostic(fleet, "r2/front", "depth_rejected", time.monotonic()) >= 1
    from kosmos2_ros.core.serving.images import encode_compressed_depth

    for attempt in range(5):                                          # and the next good depth serves
        fleet.send("r2/front", scene(W, H, 2), depth=encode_compressed_depth(slanted("16UC1"), "16UC1"))
        res = fleet.run("r2/front", fleet.command("r2/front", f"good-depth-{attempt}"))
        if res.objects and res.objects[0].point_valid:
            break
    assert res.status == OK and res.objects[0].point_valid, res.objects[0].point_error


def test_a_malformed_compressed_image_is_invalid_and_the_previous_frame_still_serves(diagnostics: Robots) -> None:
    fleet = diagnostics
    good = fleet.send("r2/front", scene(W, H, 3))
    bad = fleet.send("r2/front", scene(W, H, 3), colour=b"\xff\xd8\xff\xe0 truncated jpeg")
    newest = fleet.run("r2/front", fleet.command("r2/front", "on-bad-frame"))
    assert newest.status == INVALID and newest.error.startswith("image rejected: cannot decode compressed image"), \
        newest.error
    from kosmos2_ros.ros.convert import stamp_to_ns

    assert stamp_to_ns(newest.header.stamp) == bad
    previous = fleet.run("r2/front", fleet.command("r2/front", "on-good-frame", stamp_ns=good))
    assert previous.status == OK and stamp_to_ns(previous.header.stamp) == good
    assert _diagnostic(fleet, "r2/front", "frames_rejected", time.monotonic()) >= 1


def test_frames_nobody_asked_about_are_never_decoded(diagnostics: Robots) -> None:
    fleet = diagnostics
    fleet.send("r1/front", scene(W, H, 4))
    time.sleep(0.2)
    before = _diagnostic(fleet, "r1/front", "compressed_frames_decoded", time.monotonic())
    received = _diagnostic(fleet, "r1/front", "frames_received", time.monotonic())
    for _ in range(10):           # a 10 Hz camera nobody asks about (the node's reader keeps the newest one)
        fleet.colour["r1/front"].publish(_jpeg_message(fleet.next_stamp()))
        time.sleep(0.1)
    time.sleep(0.5)
    assert fleet.run("r1/front", fleet.command("r1/front", "newest")).status == OK   # decodes the newest only
    after = _diagnostic(fleet, "r1/front", "compressed_frames_decoded", time.monotonic())
    assert _diagnostic(fleet, "r1/front", "frames_received", time.monotonic()) >= received + 6
    assert after - before == 1, (before, after)


def _jpeg_message(stamp: int) -> Any:
    import cv2
    from sensor_msgs.msg import CompressedImage

    from kosmos2_ros.ros.convert import header_of, uint8_array

    data = cv2.imencode(".jpg", np.ascontiguousarray(scene(W, H, 5)[:, :, ::-1]))[1]
    return CompressedImage(header=header_of(stamp, "r1_front_optical"), format="jpeg", data=uint8_array(bytes(data)))


def test_each_cameras_topic_carries_only_its_own_results(fleet: Robots) -> None:
    """Commands through the node-wide topic and through each camera's own: a camera's result topic gets
    its camera's results and no other's; a command naming another camera on it is refused there."""
    for cam in ("r1/front", "r2/front"):
        fleet.send(cam, scene(W, H, 6))
    with fleet._cv:
        for cam in CAMERAS:
            fleet.results[cam].clear()
    wide = [fleet.t.command(f"wide-{i}", "refer", "the red box") for i in range(2)]
    wide[0].camera, wide[1].camera = "r1/front", "r2/front"
    for msg in wide:
        fleet.t.command_pub.publish(msg)                        # /kosmos2_a/command
    own = fleet.run("r2/front", fleet.command("r2/front", "own-r2"))
    assert own.status == OK and own.camera == "r2/front"
    assert fleet.t.wait_result("wide-0").camera == "r1/front" and fleet.t.wait_result("wide-1").camera == "r2/front"
    assert fleet.wait_result("r1/front", "wide-0").camera == "r1/front"
    assert fleet.wait_result("r2/front", "wide-1").camera == "r2/front"
    refused = fleet.run("r1/front", fleet.command("r1/front", "wrong-camera", camera="r2/front"))
    assert refused.status == INVALID and "serves camera 'r1/front'" in refused.error
    time.sleep(0.5)
    with fleet._cv:
        by_camera = {cam: {m.camera for m in fleet.results[cam]} for cam in CAMERAS}
        ids = {cam: {m.id for m in fleet.results[cam]} for cam in CAMERAS}
    assert by_camera["r1/front"] == {"r1/front"} and by_camera["r2/front"] == {"r2/front"}
    assert "own-r2" not in ids["r1/front"] and "wide-0" not in ids["r2/front"] and not ids["r3/front"]
    assert fleet.t.results.get("own-r2"), "the node-wide ~/result carries every camera's results too"


def test_a_command_reaches_the_node_serving_its_camera_by_name_alone(fleet: Robots) -> None:
    """r3/front is served by kosmos2_b, r1/front by kosmos2_a: a robot sends to its camera's topic and
    service, and the node serving it answers (an empty id is named after the node that answered)."""
    from kosmos2_ros.srv import Ground

    fleet.send("r3/front", scene(W, H, 7))
    msg = fleet.command("r3/front", "")
    fleet.commands["r3/front"].publish(msg)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not [m for m in fleet.results["r3/front"] if m.task == "refer"]:
        time.sleep(0.05)
    (answer,) = [m for m in fleet.results["r3/front"] if m.task == "refer"]
    assert answer.status == OK and answer.id.startswith("kosmos2_b-") and answer.camera == "r3/front"
    client = fleet.ground["r1/front"]
    assert client.wait_for_service(timeout_sec=10)
    fleet.send("r1/front", scene(W, H, 8))
    response = fleet.t.wait_for(client.call_async(Ground.Request(command=fleet.command("r1/front", ""))))
    assert response.result.status == OK and response.result.id.startswith("kosmos2_a-")
    assert response.result.camera == "r1/front"


def test_standing_queries_answer_on_their_cameras_tracks_only(fleet: Robots) -> None:
    from kosmos2_ros.srv import SetQueries

    client = fleet.t.node.create_client(SetQueries, "/kosmos2_a/set_queries")
    assert client.wait_for_service(timeout_sec=10)
    done = fleet.t.wait_for(client.call_async(SetQueries.Request(camera="r1/front", queries=["the red box"])))
    assert done.success, done.error
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(fleet.tracks["r1/front"]) < 2:
            fleet.send("r1/front", scene(W, H, 9))
            time.sleep(0.3)
        assert len(fleet.tracks["r1/front"]) >= 2
        assert {m.camera for m in fleet.tracks["r1/front"]} == {"r1/front"}
        assert not fleet.tracks["r2/front"] and not fleet.tracks["r3/front"]
    finally:
        fleet.t.wait_for(client.call_async(SetQueries.Request(camera="r1/front", queries=[])))
