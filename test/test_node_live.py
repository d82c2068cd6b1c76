"""Live perception in a real node process (issue 12): two cameras on one model, standing queries
on ~/tracks, a command flood beside them, lifecycle, and encoding ahead. Tiny checkpoint, real DDS.

One node serves the module: cameras [front, wrist], set up through the launch file's per-camera
topic arguments (`launch_args.camera_remappings`). front reads the default topics (/front/image,
a raw image, /front/camera_info, /front/depth/image); wrist reads a driver's topics in namespace
wrist, its colour image rectified by image_proc: /wrist/color/image_rect, its sibling
/wrist/color/camera_info and /wrist/aligned_depth_to_color/image_raw.
Standing queries are off (no `queries`) except in the tests about them, which set and clear them.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
from node_helpers import ROOT, CameraStream, NodeProcess, Tester, free_domain, rgb_image_msg, scene

DOMAIN = free_domain()
OK, BUSY, NO_FRAME, STALE, INVALID, CANCELLED, MODEL_ERROR, NOT_ACTIVE = range(8)
W, H = 64, 48
CAMERAS = ("front", "wrist")
#: The launch arguments that set the cameras up, and where each camera's driver publishes.
LAUNCH_ARGUMENTS = {"cameras": "[front, wrist]", "image_topics": '["", /wrist/color/image_rect]',
                    "depth_topics": '["", /wrist/aligned_depth_to_color/image_raw]'}
DRIVER_TOPICS = {"front": {"image": "/front/image", "camera_info": "/front/camera_info",
                           "depth": "/front/depth/image"},
                 "wrist": {"image": "/wrist/color/image_rect", "camera_info": "/wrist/color/camera_info",
                           "depth": "/wrist/aligned_depth_to_color/image_raw"}}

pytestmark = pytest.mark.timeout(180)


class LiveTester:
    """A Tester on the node's domain plus what live perception needs: per-camera publishers,
    ~/tracks, and the ~/set_queries service."""

    def __init__(self, tester: Tester) -> None:
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image

        from kosmos2_ros.msg import Tracks
        from kosmos2_ros.srv import SetQueries

        self.t = tester
        n = tester.node
        reliable = QoSProfile(depth=20, reliability=ReliabilityPolicy.RELIABLE)
        from sensor_msgs.msg import CameraInfo

        self.image_pubs = {cam: n.create_publisher(Image, DRIVER_TOPICS[cam]["image"], reliable) for cam in CAMERAS}
        self.depth_pubs = {cam: n.create_publisher(Image, DRIVER_TOPICS[cam]["depth"], reliable) for cam in CAMERAS}
        self.info_pubs = {cam: n.create_publisher(CameraInfo, DRIVER_TOPICS[cam]["camera_info"], reliable)
                          for cam in CAMERAS}
        self.tracks: List[Any] = []
        self._lock = threading.Lock()
        n.create_subscription(Tracks, "/kosmos2/tracks", self._on_tracks, 50)
        self.set_queries_client = n.create_client(SetQueries, "/kosmos2/set_queries")
        self._sent: Dict[str, Any] = {}
        self._probes = 0

    def _on_tracks(self, msg: Any) -> None:
        with self._lock:
            self.tracks.append((time.monotonic(), msg))

    def tracks_since(self, since: float, camera: Optional[str] = None) -> List[Any]:
        with self._lock:
            return [m for t, m in self.tracks if t >= since and (camera is None or m.camera == camera)]

    def wait_tracks(self, since: float, predicate: Any = lambda m: True, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in self.tracks_since(since):
                if predicate(msg):
                    return msg
            time.sleep(0.05)
        raise TimeoutError("no matching ~/tracks message")

    def publish(self, camera: str, rgb: Any, stamp_ns: int, frame_id: str) -> None:
        msg = rgb_image_msg(rgb, stamp_ns, frame_id)
        self._sent[camera] = (stamp_ns, msg)
        self.image_pubs[camera].publish(msg)

    def command(self, cmd_id: str, camera: str, task: str = "refer", text: str = "", **kw: Any) -> Any:
        msg = self.t.command(cmd_id, task, text, **kw)
        msg.camera = camera
        return msg

    def wait_frame(self, camera: str, stamp_ns: int, timeout: float = 20.0) -> Any:
        """Until the camera's frame with `stamp_ns` reached the node (probes name the stamp)."""
        deadline = time.monotonic() + timeout
        while True:
            self._probes += 1
            res = self.t.run(self.command(f"probe-{camera}-{self._probes}", camera, "caption", stamp_ns=stamp_ns,
                                          max_new_tokens=1), max(1.0, deadline - time.monotonic()))
            if res.status == NO_FRAME and "no image received yet" in res.error and camera in self._sent:
                self.image_pubs[camera].publish(self._sent[camera][1])
            elif not (res.status == NO_FRAME and "no cached frame" in res.error):
                return res
            if time.monotonic() > deadline:
                raise TimeoutError(f"camera {camera}: the node never received the frame stamped {stamp_ns}")
            time.sleep(0.05)

    def set_queries(self, camera: str, queries: List[str], checks: Optional[List[str]] = None) -> Any:
        """Set a camera's standing queries, and its checks when `checks` is given (else they stay)."""
        from kosmos2_ros.srv import SetQueries

        assert self.set_queries_client.wait_for_service(timeout_sec=10)
        request = SetQueries.Request(camera=camera, queries=queries, set_checks=checks is not None,
                                     checks=checks or [])
        return self.t.wait_for(self.set_queries_client.call_async(request))


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveTester]:
    log = tmp_path_factory.mktemp("live_node") / "node.log"
    from kosmos2_ros.ros import launch_args

    proc = NodeProcess({"model": str(tiny_model_dir), "cameras": "[front, wrist]", "max_frame_age_s": 0,
                        "queue_size": 4, "max_new_tokens": 16, "query_rate_hz": 2.0},
                       DOMAIN, log, script=str(ROOT / "bin" / "grounding_node"),
                       remaps=dict(launch_args.camera_remappings(LAUNCH_ARGUMENTS)))
    tester = Tester(DOMAIN, topic_ns="/front")
    try:
        tester.wait_active(proc=proc)
        lt = LiveTester(tester)
        deadline = time.monotonic() + 20
        while any(p.get_subscription_count() == 0 for p in lt.image_pubs.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        yield lt
    finally:
        tester.close()
        code = proc.stop()
        assert code == 0, f"node exited with {code}:\n{proc.log()}"


_stamp = [1_800_000_000_000_000_000]


def next_stamp() -> int:
    _stamp[0] += 10_000_000
    return _stamp[0]


def fresh(live: LiveTester, camera: str, rgb: Any = None, frame_id: str = "") -> int:
    stamp = next_stamp()
    live.publish(camera, scene(W, H) if rgb is None else rgb, stamp, frame_id or f"{camera}_optical")
    assert live.wait_frame(camera, stamp).status == OK
    return stamp


# -- several cameras ---------------------------------------------------------------------------
def test_each_camera_answers_with_its_own_frame(live: LiveTester) -> None:
    front = fresh(live, "front", scene(W, H, 1))
    wrist = fresh(live, "wrist", scene(80, 60, 2))
    # Published together, so the worker serves them as one cross-camera batch.
    msgs = [live.command("c-front", "front", text="the red box"), live.command("c-wrist", "wrist", text="the red box"),
            live.command("c-default", "", text="the red box")]
    for msg in msgs:
        live.t.command_pub.publish(msg)
    got = {m.id: live.t.wait_result(m.id) for m in msgs}
    assert all(r.status == OK for r in got.values()), [r.error for r in got.values()]
    assert (got["c-front"].camera, got["c-front"].header.frame_id) == ("front", "front_optical")
    assert (got["c-wrist"].camera, got["c-wrist"].header.frame_id) == ("wrist", "wrist_optical")
    assert got["c-default"].camera == "front"                       # empty = the first camera
    from kosmos2_ros.ros.convert import stamp_to_ns

    assert stamp_to_ns(got["c-front"].header.stamp) == front and stamp_to_ns(got["c-wrist"].header.stamp) == wrist
    assert (got["c-wrist"].image_width, got["c-wrist"].image_height) == (80, 60)


def test_each_camera_reads_its_drivers_depth_and_camera_info(live: LiveTester) -> None:
    """Each camera's depth and camera_info arrive on its own topics and make its 3D points, with the
    matrix its image needs: K with the distortion D undone for front's raw image, P for wrist's
    rectified one (the two differ here, so a point says which was used)."""
    import numpy as np
    from sensor_msgs.msg import CameraInfo, Image

    from kosmos2_ros.core.spatial.geometry import CameraIntrinsics
    from kosmos2_ros.ros.convert import header_of, uint8_array

    k = [50.0, 0.0, W / 2, 0.0, 50.0, H / 2, 0.0, 0.0, 1.0]
    p = [40.0, 0.0, W / 2 - 4, 0.0, 0.0, 40.0, H / 2 + 3, 0.0, 0.0, 0.0, 1.0, 0.0]
    d = [-0.2, 0.05, 0.0, 0.0, 0.0]
    deadline = time.monotonic() + 20     # depth and camera_info are only read once the node has matched them
    while time.monotonic() < deadline and not all(pub.get_subscription_count() > 0 for pubs in
                                                   (live.depth_pubs, live.info_pubs) for pub in pubs.values()):
        time.sleep(0.05)
    expected = {"front": CameraIntrinsics.from_k(k, W, H, d), "wrist": CameraIntrinsics.from_p(p, W, H)}
    for cam in CAMERAS:
        # A publisher can see the node's subscription before the node's side has matched the publisher
        # (discovery is not symmetric), and a volatile message sent in that gap never arrives: send the
        # depth again with a new frame while the node says nothing was paired, a few times at most.
        for attempt in range(5):
            stamp = next_stamp()
            header = header_of(stamp, f"{cam}_optical")
            live.info_pubs[cam].publish(CameraInfo(header=header, width=W, height=H, distortion_model="plumb_bob",
                                                   d=d, k=k, p=p))
            depth = np.full((H, W), 800, dtype=np.uint16)      # a wall 0.8 m away: every box has depth
            live.depth_pubs[cam].publish(Image(header=header, height=H, width=W, encoding="16UC1", step=2 * W,
                                               data=uint8_array(depth)))
            time.sleep(0.3)
            live.publish(cam, scene(W, H, 3), stamp, f"{cam}_optical")
            assert live.wait_frame(cam, stamp).status == OK
            msg = live.command(f"d-{cam}-{attempt}", cam, text="the red box")
            live.t.command_pub.publish(msg)
            res = live.t.wait_result(msg.id)
            assert res.status == OK and res.objects, res.error
            obj = res.objects[0]
            if obj.point_error != "no depth image paired with this frame":
                break
        assert obj.point_valid and obj.point_error == "", obj.point_error
        u, v = (obj.box.x_min + obj.box.x_max) / 2, (obj.box.y_min + obj.box.y_max) / 2
        xn, yn = expected[cam].normalized(u - 0.5, v - 0.5)   # K puts pixel i's centre at i; box edges are continuous
        np.testing.assert_allclose([obj.point.x, obj.point.y, obj.point.z], [xn * 0.8, yn * 0.8, 0.8], atol=2e-3)


def test_unknown_camera_is_invalid_and_names_the_cameras(live: LiveTester) -> None:
    res = live.t.run(live.command("c-rear", "rear", text="the red box"))
    assert res.status == INVALID and "'rear'" in res.error and "'front'" in res.error and "'wrist'" in res.error
    assert res.camera == "rear"


def test_a_camera_that_stops_goes_stale_while_the_other_serves(live: LiveTester) -> None:
    assert all(r.successful for r in live.t.set_parameters({"max_frame_age_s": 0.5}))
    streams = {cam: CameraStream(live.t, W, H, 10.0, True, topic=DRIVER_TOPICS[cam]["image"],
                                 frame_id=f"{cam}_optical")
               for cam in CAMERAS}
    try:
        time.sleep(1.0)
        streams["wrist"].stop()
        time.sleep(1.0)
        wrist = live.t.run(live.command("stale-wrist", "wrist", text="the red box"))
        front = live.t.run(live.command("live-front", "front", text="the red box"))
        assert wrist.status == STALE and "wrist" in wrist.error
        assert front.status == OK and front.camera == "front"
    finally:
        streams["front"].stop()
        assert all(r.successful for r in live.t.set_parameters({"max_frame_age_s": 0.0}))


# -- standing queries --------------------------------------------------------------------------
def test_standing_queries_follow_the_parameter_at_the_requested_rate(live: LiveTester) -> None:
    stream = CameraStream(live.t, W, H, 10.0, True, topic="/front/image", frame_id="front_optical")
    try:
        start = time.monotonic()
        assert all(r.successful for r in live.t.set_parameters({"queries": ["the red box", "the blue box"]}))
        first = live.wait_tracks(start, lambda m: m.camera == "front")
        assert [q.query for q in first.queries] == ["the red box", "the blue box"]
        assert first.header.frame_id == "front_optical" and first.image_width == W
        assert all(q.found == bool(q.objects) and (q.track_id > 0) == q.found for q in first.queries)
        window_start = time.monotonic()
        time.sleep(3.0)
        count = len(live.tracks_since(window_start, "front"))
        assert 3 <= count <= 8, count                       # query_rate_hz 2 over 3 s, frames at 10 Hz
        stamps = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for m in live.tracks_since(window_start, "front")]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)   # newest frames, none twice

        changed = time.monotonic()
        assert all(r.successful for r in live.t.set_parameters({"queries": ["the green box"]}))
        msg = live.wait_tracks(changed, lambda m: m.camera == "front" and [q.query for q in m.queries] == ["the green box"],
                               timeout=5.0)
        assert msg is not None
        # The first message after the change already has the new query (nothing stale goes out).
        after = [m for m in live.tracks_since(changed + 0.6, "front")]
        assert all([q.query for q in m.queries] == ["the green box"] for m in after)

        assert all(r.successful for r in live.t.set_parameters({"queries": []}))
        time.sleep(1.0)                                     # a frame being grounded may still come out
        quiet = time.monotonic()
        time.sleep(2.0)
        assert live.tracks_since(quiet) == []
    finally:
        live.t.set_parameters({"queries": []})
        stream.stop()


def test_bad_queries_are_refused_with_the_reason(live: LiveTester) -> None:
    (res,) = live.t.set_parameters({"queries": ["a <phrase>mug"]})
    assert not res.successful and "control token" in res.reason
    (res,) = live.t.set_parameters({"queries": [f"thing {i}" for i in range(9)]})
    assert not res.successful and "at most 8" in res.reason
    good = live.set_queries("front", ["the mug", "the cup"])
    assert good.success and list(good.queries) == ["the mug", "the cup"]
    bad = live.set_queries("front", [""])
    assert not bad.success and "empty" in bad.error
    assert list(bad.queries) == ["the mug", "the cup"]        # refused: the queries still in force
    assert live.set_queries("front", []).success
    bad = live.set_queries("rear", ["the mug"])
    assert not bad.success and "'rear'" in bad.error and "'front'" in bad.error
    bad = live.set_queries("wrist", ["x" * 5000])
    assert not bad.success and "max_prompt_chars" in bad.error


def test_standing_checks_answer_on_tracks_about_their_querys_box(live: LiveTester) -> None:
    """A check naming a standing query in [brackets] is asked about that query's box on the frame; others
    about the whole image; each frame's Tracks carries the answers and p(yes) in the order set."""
    checks = ["Is [the red box] red?", "Is there a cup?", "Is [a ghost] here?"]
    ok = live.set_queries("front", ["the red box"], checks)
    assert ok.success and list(ok.checks) == checks and list(ok.queries) == ["the red box"]
    try:
        start = time.monotonic()
        fresh(live, "front", scene(W, H, 5))
        msg = live.wait_tracks(start, lambda m: m.camera == "front" and len(m.checks) == 3)
        about, whole, ghost = msg.checks
        assert [c.question for c in msg.checks] == checks
        assert (about.about, whole.about, ghost.about) == ("the red box", "", "")   # a ghost is no standing query
        query = msg.queries[0]
        assert query.found, "constrained decoding always places the query's box"
        boxes = [(o.box.x_min, o.box.y_min, o.box.x_max, o.box.y_max) for o in query.objects]
        region = (about.region.x_min, about.region.y_min, about.region.x_max, about.region.y_max)
        assert any(all(abs(a - b) < 1e-3 for a, b in zip(region, box)) for box in boxes), (region, boxes)
        for entry in msg.checks:
            assert entry.answered and entry.error == "" and 0.0 <= entry.answer_probability <= 1.0
            assert entry.answer == ("yes" if entry.answer_probability >= 0.5 else "no")
        assert whole.region.x_max == 0.0 and ghost.region.x_max == 0.0
        bad = live.set_queries("front", ["the red box"], ["a <phrase> trick?"])
        assert not bad.success and "checks" in bad.error and "control token" in bad.error
        assert list(bad.checks) == checks                    # refused: nothing changed
        kept = live.set_queries("front", ["the red box"])    # a client that sets only queries keeps the checks
        assert kept.success and list(kept.checks) == checks
    finally:
        assert live.set_queries("front", [], []).success


def test_per_camera_queries_via_the_service(live: LiveTester) -> None:
    streams = {cam: CameraStream(live.t, W, H, 10.0, True, topic=DRIVER_TOPICS[cam]["image"],
                                 frame_id=f"{cam}_optical")
               for cam in CAMERAS}
    try:
        start = time.monotonic()
        ok = live.set_queries("wrist", ["the yellow box"])
        assert ok.success and list(ok.queries) == ["the yellow box"]
        msg = live.wait_tracks(start, lambda m: m.camera == "wrist")
        assert [q.query for q in msg.queries] == ["the yellow box"]
        time.sleep(1.5)
        assert live.tracks_since(start, "front") == []      # the other camera has none
        assert all(r.successful for r in live.t.set_parameters({"max_new_tokens": 16}))   # another parameter
        later = time.monotonic()
        assert [q.query for q in live.wait_tracks(later, lambda m: m.camera == "wrist").queries] == ["the yellow box"]
        assert live.set_queries("wrist", []).success
        time.sleep(1.0)
        quiet = time.monotonic()
        time.sleep(1.5)
        assert live.tracks_since(quiet) == []
    finally:
        live.set_queries("", [])
        for s in streams.values():
            s.stop()
        # back to following the parameter: a fresh configure would do it; here both cameras just stay empty


def test_track_ids_stable_for_a_small_move_and_new_for_a_jump(live: LiveTester) -> None:
    """The tiny checkpoint puts a query at the same normalised box whatever the image, so changing
    the image size moves the box in pixels by a known amount: a few percent is a small move, a
    frame four times as wide puts the box somewhere else entirely (a jump)."""
    assert live.set_queries("front", ["the red box"]).success
    try:
        ids = []
        for width, height in ((160, 120), (164, 123), (168, 126), (640, 126)):
            start = time.monotonic()
            stamp = next_stamp()
            live.publish("front", scene(width, height), stamp, "front_optical")
            msg = live.wait_tracks(start, lambda m, s=stamp: m.camera == "front"
                                   and m.header.stamp.sec * 10**9 + m.header.stamp.nanosec == s)
            assert msg.queries[0].found
            ids.append(msg.queries[0].track_id)
        assert ids[0] == ids[1] == ids[2] and ids[3] != ids[2], ids
    finally:
        live.set_queries("", [])


def test_command_flood_beside_standing_queries(live: LiveTester) -> None:
    stream = CameraStream(live.t, W, H, 10.0, True, topic="/front/image", frame_id="front_optical")
    try:
        assert live.set_queries("front", ["the red box"]).success
        live.wait_tracks(time.monotonic())
        sent = [live.command(f"flood-{i}", "front", text="the blue box") for i in range(30)]
        t0 = time.monotonic()
        for msg in sent:
            live.t.command_pub.publish(msg)
        got = [live.t.wait_result(m.id, 60) for m in sent]
        assert all(len(live.t.results[m.id]) == 1 for m in sent)          # exactly one result each
        statuses = [r.status for r in got]
        assert set(statuses) <= {OK, BUSY} and BUSY in statuses and OK in statuses
        busy = [r for r in got if r.status == BUSY]
        assert "queue_size" in busy[0].error and max(r.total_ms for r in busy) < 1000
        assert time.monotonic() - t0 < 60
        after = time.monotonic()
        live.wait_tracks(after, lambda m: m.camera == "front", timeout=10)   # the tracks continue
    finally:
        live.set_queries("", [])
        stream.stop()


def test_lifecycle_stops_and_resumes_standing_queries(live: LiveTester) -> None:
    stream = CameraStream(live.t, W, H, 10.0, True, topic="/front/image", frame_id="front_optical")
    try:
        assert all(r.successful for r in live.t.set_parameters({"queries": ["the red box"]}))
        live.wait_tracks(time.monotonic())
        assert live.t.change_state("deactivate")
        time.sleep(0.5)
        quiet = time.monotonic()
        time.sleep(1.5)
        assert live.tracks_since(quiet) == []
        assert live.t.change_state("activate")
        live.wait_tracks(time.monotonic(), timeout=10)
        assert live.t.change_state("deactivate") and live.t.change_state("cleanup")
        quiet = time.monotonic()
        time.sleep(1.5)
        assert live.tracks_since(quiet) == []
        assert live.t.change_state("configure") and live.t.change_state("activate")
        msg = live.wait_tracks(time.monotonic(), timeout=20)
        assert [q.query for q in msg.queries] == ["the red box"]     # the parameter still holds
    finally:
        live.t.set_parameters({"queries": []})
        stream.stop()


# -- encoding ahead ----------------------------------------------------------------------------
def test_a_frame_encoded_ahead_gives_the_same_tokens(live: LiveTester) -> None:
    rgb = scene(W, H, 7)
    assert all(r.successful for r in live.t.set_parameters({"encode_ahead_hz": 0.0}))
    # No probe commands here: a probe would encode the frame itself.
    cold_stamp = next_stamp()
    live.publish("wrist", rgb, cold_stamp, "wrist_optical")
    time.sleep(0.5)
    cold = live.t.run(live.command("cold", "wrist", text="the red box", stamp_ns=cold_stamp))
    assert cold.status == OK and cold.encode_ms > 0
    try:
        assert all(r.successful for r in live.t.set_parameters({"encode_ahead_hz": 10.0}))
        warm_stamp = next_stamp()
        live.publish("wrist", rgb, warm_stamp, "wrist_optical")
        time.sleep(1.5)                                       # idle: the worker encodes it ahead
        warm = live.t.run(live.command("warm", "wrist", text="the red box", stamp_ns=warm_stamp))
        assert warm.status == OK and warm.encode_ms == 0.0
        assert list(warm.token_ids) == list(cold.token_ids) and warm.text == cold.text
    finally:
        live.t.set_parameters({"encode_ahead_hz": 0.0})
