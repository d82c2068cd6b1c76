"""The grounding node as its own process, a tiny real checkpoint, real DDS (domains of its own: free_domain).

One node process serves most tests of this module (started once); the tests talk to it
like a user would: images and commands over topics, the service, the action, parameters.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from node_helpers import ROOT, NodeProcess, Tester, free_domain, rgb_image_msg, running_node, scene

from kosmos2_ros.core.model.grounding import parse_generation
from kosmos2_ros.core.serving.pipeline import Status

DOMAIN, SLOW_DOMAIN, BROKEN_DOMAIN = free_domain(), free_domain(), free_domain()
OK, BUSY, NO_FRAME, STALE, INVALID, CANCELLED, MODEL_ERROR, NOT_ACTIVE = Status   # in definition order
W, H = 64, 48

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def node(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    log = tmp_path_factory.mktemp("node") / "node.log"
    with running_node({"model": str(tiny_model_dir), "use_compressed": True, "max_frame_age_s": 0,
                       "queue_size": 32, "max_new_tokens": 24}, DOMAIN, log, debug=True,
                      script=str(ROOT / "bin" / "grounding_node"), params_file=ROOT / "config" / "grounding.yaml") as running:
        yield running


_stamp = [1_700_000_000_000_000_000]


def next_stamp() -> int:
    _stamp[0] += 10_000_000
    return _stamp[0]


def fresh_frame(tester: Tester, frame_id: str = "camera_optical", seed: int = 0) -> tuple:
    stamp = next_stamp()
    rgb = scene(W, H, seed)
    tester.publish_frame(rgb, stamp, frame_id)
    assert tester.wait_frame(stamp).status == OK
    return stamp, rgb


# -- the shipped configuration --------------------------------------------------------------
def test_params_file_lists_every_parameter_with_a_comment() -> None:
    import yaml

    from kosmos2_ros.core.serving.config import Kosmos2Config

    text = (ROOT / "config" / "grounding.yaml").read_text()
    params = yaml.safe_load(text)["/**"]["ros__parameters"]
    names = [f.name for f in dataclasses.fields(Kosmos2Config)]
    assert sorted(params) == sorted(names)
    assert Kosmos2Config.from_dict(params) == Kosmos2Config.from_yaml(ROOT / "config" / "grounding.yaml")
    for name in names:
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(f"{name}:"))
        assert "#" in line, f"{name} has no comment"


def test_launch_file_declares_its_arguments() -> None:
    source = (ROOT / "launch" / "grounding.launch.py").read_text()
    tree = ast.parse(source)
    declared = {}
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "DeclareLaunchArgument":
            described = any(k.arg == "description" for k in call.keywords)
            declared[call.args[0].value] = described
    expected = {"namespace", "image_topic", "camera_info_topic", "depth_topic", "use_compressed", "enable_3d",
                "params_file", "model", "backend", "autostart", "dds_profile", "use_rviz", "log_level",
                "cameras", "queries", "query_rate_hz", "encode_ahead_hz", "image_topics", "depth_topics",
                "camera_info_topics", "image_transport", "depth_transport"}
    assert set(declared) == expected and all(declared.values())
    assert 'executable="grounding_node"' in source and "rviz2" in source
    compile(source, "grounding.launch.py", "exec")


def test_serve_robots_launch_file_declares_its_arguments() -> None:
    """serve_robots.launch.py: every argument it reads is declared and described (its logic is launch_shards,
    tested in test_launch_shards.py; test_launch.py runs it where launch_ros is installed)."""
    source = (ROOT / "launch" / "serve_robots.launch.py").read_text()
    declared = {call.args[0].value: any(k.arg == "description" for k in call.keywords)
                for call in ast.walk(ast.parse(source))
                if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "DeclareLaunchArgument"}
    assert set(declared) == {"shards", "machine", "namespace", "params_file", "model", "backend", "image_transport",
                             "depth_transport", "queries", "query_rate_hz", "dds_profile", "log_level"}
    assert all(declared.values()) and 'executable="grounding_node"' in source
    compile(source, "serve_robots.launch.py", "exec")


# -- ordinary use --------------------------------------------------------------------------
def test_command_before_any_frame_is_no_frame(node: tuple) -> None:
    _, t = node
    res = t.run(t.command("early", "refer", "the red box"))
    assert res.status == NO_FRAME and "no image" in res.error
    assert res.header.stamp.sec == 0 and res.header.stamp.nanosec == 0


def test_results_carry_stamps_and_ids(node: tuple) -> None:
    _, t = node
    stamp, _ = fresh_frame(t, "cam_left")
    commands = [t.command("a1", "refer", "the red box"), t.command("a2", "caption"),
                t.command("a3", "vqa", "what colour is the box?"), t.command("a4", "phrase_grounding", "a [red box]"),
                t.command("a5", "describe", max_new_tokens=8)]
    for cmd in commands:
        t.command_pub.publish(cmd)
    results = [t.wait_result(c.id) for c in commands]
    time.sleep(0.5)
    for cmd, res in zip(commands, results):
        assert len(t.results[cmd.id]) == 1, f"{cmd.id} answered {len(t.results[cmd.id])} times"
        assert res.id == cmd.id and res.task == cmd.task
        assert res.status == OK, res.error
        assert res.header.stamp.sec * 10**9 + res.header.stamp.nanosec == stamp
        assert res.header.frame_id == "cam_left"
        assert (res.image_width, res.image_height) == (W, H)
        assert len(res.token_ids) > 0 and res.total_ms > 0
    assert results[4].token_ids and len(results[4].token_ids) <= 8


def test_region_description_and_vqa(node: tuple) -> None:
    _, t = node
    fresh_frame(t)
    region = t.run(t.command("r1", "region", region=(10, 8, 30, 40)))
    assert region.status == OK, region.error
    # The prompt's own box comes back as the grounded "It", mapped to pixels near the region.
    it = region.objects[0]
    assert it.phrase == "It"
    assert abs(it.box.x_min - 10) <= 2.5 and abs(it.box.y_min - 8) <= 2 and abs(it.box.x_max - 30) <= 2.5
    vqa = t.run(t.command("q1", "vqa", "what is on the left?"))
    assert vqa.status == OK and vqa.token_ids and vqa.raw_text


def test_result_equals_pipeline_run_on_same_frame(node: tuple, tiny_model_dir: Path) -> None:
    """CLI parity: the node's text and boxes equal Pipeline.run on the same pixels and checkpoint."""
    from kosmos2_ros.core.serving.config import Kosmos2Config
    from kosmos2_ros.core.serving.frames import Frame
    from kosmos2_ros.core.serving.pipeline import Command, Pipeline

    _, t = node
    stamp, rgb = fresh_frame(t, "parity", seed=3)
    pipe = Pipeline.load(Kosmos2Config(model=str(tiny_model_dir), backend="torch", max_new_tokens=24))
    cases = (("refer", "the red box", None), ("caption", "", None), ("region", "", (5, 5, 40, 30)),
             ("vqa", "what is it?", None), ("vqa", "What is [this] used for?", (5, 5, 40, 30)),
             ("check", "Is [this] red?", (5, 5, 40, 30)))
    try:
        refs = [pipe.run(Command(id="x", task=task, text=text, region_px=region), Frame(rgb=rgb.copy()))
                for task, text, region in cases]
        one_by_one = [t.run(t.command(f"parity-{k}", task, text, region=region, stamp_ns=stamp))
                      for k, (task, text, region) in enumerate(cases)]
        # Sent together, queued commands about one frame may share a batch: same answers.
        together = [t.command(f"parity-batch-{k}", task, text, region=region, stamp_ns=stamp)
                    for k, (task, text, region) in enumerate(cases)]
        for cmd in together:
            t.command_pub.publish(cmd)
        batched = [t.wait_result(cmd.id) for cmd in together]
        for res, ref in list(zip(one_by_one, refs)) + list(zip(batched, refs)):
            assert res.status == OK == int(ref.status)
            assert res.text == ref.text and res.raw_text == ref.raw_text
            assert list(res.token_ids) == ref.token_ids
            assert (res.answer, res.answer_probability) == pytest.approx((ref.answer, ref.answer_probability))
            assert len(res.objects) == len(ref.objects)
            for got, want in zip(res.objects, ref.objects):
                assert got.phrase == want.phrase
                np.testing.assert_allclose([got.box.x_min, got.box.y_min, got.box.x_max, got.box.y_max],
                                           want.box_px, atol=1e-3)
    finally:
        pipe.close()


def test_result_equals_cli_output(node: tuple, tiny_model_dir: Path, tmp_path: Path) -> None:
    """kosmos2-ground on the same image and checkpoint gives the node's text and boxes."""
    from PIL import Image as PILImage

    _, t = node
    stamp, rgb = fresh_frame(t, "cli", seed=5)
    PILImage.fromarray(rgb).save(tmp_path / "frame.png")
    res = t.run(t.command("cli-refer", "refer", "the red box", stamp_ns=stamp))
    out = subprocess.run([sys.executable, str(ROOT / "bin" / "kosmos2_ground"), "--model", str(tiny_model_dir),
                          "--image", str(tmp_path / "frame.png"), "--task", "refer", "--text", "the red box",
                          "--max-new-tokens", "24", "--no-download", "--json", "--backend", "torch"],
                         capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    cli = json.loads(out.stdout.strip().splitlines()[-1])
    assert res.status == OK and cli["status"] == "ok"
    assert res.text == cli["text"] and res.raw_text == cli["raw_text"] and list(res.token_ids) == cli["token_ids"]
    cli_boxes = [box for ent in cli["entities"] for box in ent["boxes_px"]]
    node_boxes = [[o.box.x_min, o.box.y_min, o.box.x_max, o.box.y_max] for o in res.objects]
    assert len(node_boxes) == len(cli_boxes)
    if node_boxes:
        np.testing.assert_allclose(node_boxes, cli_boxes, atol=1e-3)


def test_3d_points_from_synthetic_depth(node: tuple) -> None:
    from sensor_msgs.msg import CameraInfo, Image

    from kosmos2_ros.core.spatial.geometry import CameraIntrinsics, box_point_3d
    from kosmos2_ros.ros.convert import header_of, uint8_array

    _, t = node
    fx, fy, cx, cy = 60.0, 55.0, 31.5, 23.5
    # Left half 1.5 m, right half 3 m, a dead band of zeros (invalid) along the top rows.
    depth_mm = np.full((H, W), 1500, np.uint16)
    depth_mm[:, W // 2:] = 3000
    depth_mm[:3] = 0
    for encoding, data, step in (("16UC1", depth_mm.tobytes(), W * 2),
                                 ("32FC1", (depth_mm.astype(np.float32) / 1000).tobytes(), W * 4)):
        stamp = next_stamp()
        header = header_of(stamp, "depth_cam")
        info = CameraInfo(header=header, width=W, height=H, k=[fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0])
        t.info_pub.publish(info)
        t.depth_pub.publish(Image(header=header, height=H, width=W, encoding=encoding, step=step,
                                  data=uint8_array(data)))
        time.sleep(0.4)
        rgb = scene(W, H, 1)
        t.publish_frame(rgb, stamp, "depth_cam")
        t.wait_frame(stamp)
        refer = t.command(f"3d-{encoding}-refer", "refer", "the red box", stamp_ns=stamp, decoding="constrained")
        for i, cmd in enumerate([t.command(f"3d-{encoding}-{i}", "region", region=region, stamp_ns=stamp)
                                 for i, region in enumerate(((4, 6, 24, 40), (36, 10, 62, 44)))] + [refer]):
            res = t.run(cmd)
            assert res.status == OK, res.error
            assert res.objects, "constrained refer and region always carry a box"
            if cmd.task == "region":
                assert res.objects[0].point_valid
            depth_m = np.where(depth_mm == 0, np.nan, depth_mm / 1000.0).astype(np.float32)
            intr = CameraIntrinsics(fx, fy, cx, cy, W, H)
            for obj in res.objects:
                box = (obj.box.x_min, obj.box.y_min, obj.box.x_max, obj.box.y_max)
                want, why = box_point_3d(box, depth_m, intr, 0.5, 0.05, 20.0)
                assert obj.point_valid == (want is not None) and obj.point_error == why
                if want is None:
                    continue
                np.testing.assert_allclose([obj.point.x, obj.point.y, obj.point.z], want, rtol=1e-4, atol=1e-4)
            if cmd.task == "region":
                assert res.objects[0].point.z == pytest.approx(1.5 if i == 0 else 3.0, abs=1e-3)
    deadline = time.monotonic() + 5
    while not any(len(m.markers) > 1 for m in t.markers) and time.monotonic() < deadline:
        time.sleep(0.05)
    # objects with geometry get a 3D box (CUBE) and a grasp arrow, objects with only a point a SPHERE
    shown = [mk for m in t.markers for mk in m.markers if mk.type in (mk.SPHERE, mk.CUBE)]
    assert shown and shown[-1].header.frame_id == "depth_cam"


def test_refer_topic_gets_a_result_with_generated_id(node: tuple) -> None:
    from std_msgs.msg import String

    _, t = node
    stamp, _ = fresh_frame(t, "refer_cam")
    before = set(t.results)
    t.refer_pub.publish(String(data="the red box"))
    deadline = time.monotonic() + 20
    new = []
    while not new and time.monotonic() < deadline:
        new = [i for i in set(t.results) - before if i.startswith("kosmos2-")]
        time.sleep(0.02)
    assert len(new) == 1
    res = t.results[new[0]][0]
    assert res.status == OK and res.task == "refer" and res.header.frame_id == "refer_cam"


def test_best_effort_command_publisher_is_warned_about(node: tuple) -> None:
    """The command subscriptions carry no QoS-event waitable (command_intake): the node still says,
    naming the publisher, when a best-effort command publisher can never reach it."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    from kosmos2_ros.msg import GroundingCommand

    proc, t = node
    pub = t.node.create_publisher(GroundingCommand, "/kosmos2/command",
                                  QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
    try:
        expected = f"{t.node.get_fully_qualified_name()} publishes /kosmos2/command best effort"
        deadline = time.monotonic() + 15
        while expected not in proc.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert expected in proc.log()
        assert "publish commands with reliable QoS" in proc.log()
        time.sleep(2.5)   # two more checks: warned once, not every second
        assert proc.log().count(expected) == 1
    finally:
        t.node.destroy_publisher(pub)


def test_service_returns_the_result_and_publishes_it(node: tuple) -> None:
    from kosmos2_ros.srv import Ground

    _, t = node
    stamp, _ = fresh_frame(t, "srv_cam")
    assert t.ground_client.wait_for_service(timeout_sec=10)
    reply = t.wait_for(t.ground_client.call_async(Ground.Request(command=t.command("svc1", "caption"))))
    res = reply.result
    assert res.id == "svc1" and res.status == OK and res.header.frame_id == "srv_cam"
    assert t.wait_result("svc1").token_ids == res.token_ids
    bad = t.wait_for(t.ground_client.call_async(Ground.Request(command=t.command("svc2", "refer", "")))).result
    assert bad.status == INVALID and "non-empty" in bad.error


def test_a_question_about_a_region_through_the_topic_the_service_and_the_action(node: tuple) -> None:
    """check with a region: the same answer and p(yes) whichever way it is sent; a region outside the image
    is INVALID with the reason, as for `region`."""
    from kosmos2_ros.action import GroundTask
    from kosmos2_ros.srv import Ground

    _, t = node
    stamp, _ = fresh_frame(t, "ask_cam", seed=4)
    ask = dict(region=(5, 5, 40, 30), stamp_ns=stamp)
    by_topic = t.run(t.command("ask-topic", "check", "Is [this] red?", **ask))
    assert t.ground_client.wait_for_service(timeout_sec=10) and t.action_client.wait_for_server(timeout_sec=10)
    by_service = t.wait_for(t.ground_client.call_async(
        Ground.Request(command=t.command("ask-svc", "check", "Is [this] red?", **ask)))).result
    handle = t.wait_for(t.action_client.send_goal_async(
        GroundTask.Goal(command=t.command("ask-act", "check", "Is [this] red?", **ask))))
    by_action = t.wait_for(handle.get_result_async()).result.result
    for res in (by_topic, by_service, by_action):
        assert res.status == OK, res.error
        assert res.answer in ("yes", "no") and 0.0 <= res.answer_probability <= 1.0
        assert (res.answer, res.answer_probability, list(res.token_ids)) == \
            (by_topic.answer, by_topic.answer_probability, list(by_topic.token_ids))
    outside = t.run(t.command("ask-out", "vqa", "What is [this]?", region=(500, 500, 600, 600), stamp_ns=stamp))
    assert outside.status == INVALID and "outside" in outside.error
    unlinked = t.run(t.command("ask-unlinked", "check", "Is the drawer open?", region=(5, 5, 40, 30), stamp_ns=stamp))
    assert unlinked.status == INVALID and "[bracket] it" in unlinked.error


def test_action_gives_feedback_and_result(node: tuple) -> None:
    from action_msgs.msg import GoalStatus

    from kosmos2_ros.action import GroundTask

    _, t = node
    fresh_frame(t, "act_cam")
    assert t.action_client.wait_for_server(timeout_sec=10)
    feedback = []
    goal = GroundTask.Goal(command=t.command("act1", "describe", max_new_tokens=16))
    handle = t.wait_for(t.action_client.send_goal_async(goal, feedback_callback=lambda fb: feedback.append(fb)))
    assert handle.accepted
    result = t.wait_for(handle.get_result_async())
    assert result.status == GoalStatus.STATUS_SUCCEEDED
    assert result.result.result.id == "act1" and result.result.result.status == OK
    assert feedback and feedback[0].feedback.tokens_generated >= 1
    assert t.wait_result("act1").status == OK
    # Feedback text is clean (what a UI shows); the raw text with its tags travels beside it.
    for fb in feedback:
        assert "<" not in fb.feedback.partial_text, fb.feedback.partial_text
        assert fb.feedback.partial_text == parse_generation(fb.feedback.partial_raw_text).text


def test_debug_image_and_diagnostics(node: tuple) -> None:
    _, t = node
    stamp, _ = fresh_frame(t, "dbg_cam")
    t.debug_images.clear()
    assert t.run(t.command("dbg1", "region", region=(5, 5, 30, 30), stamp_ns=stamp)).status == OK
    deadline = time.monotonic() + 5
    while not any(m.header.frame_id == "dbg_cam" for m in t.debug_images) and time.monotonic() < deadline:
        time.sleep(0.05)
    img = [m for m in t.debug_images if m.header.frame_id == "dbg_cam"][-1]
    assert (img.width, img.height, img.encoding) == (W, H, "bgr8")
    assert img.header.stamp.sec * 10**9 + img.header.stamp.nanosec == stamp
    deadline = time.monotonic() + 3
    while not t.diagnostics and time.monotonic() < deadline:
        time.sleep(0.05)
    values = {kv.key: kv.value for kv in t.diagnostics[-1].status[0].values}
    for key in ("latency_p50_ms", "latency_p95_ms", "frames_received", "frames_rejected",
                "commands_ok", "commands_failed", "queue_depth"):
        assert key in values
    assert int(values["commands_ok"]) > 0 and int(values["frames_received"]) > 0
    assert "point_invalid_reasons" in values and "geometry_invalid_reasons" in values


# -- bad input: an error status each, and the node still answers ---------------------------
def _still_answers(t: Tester, tag: str) -> None:
    stamp, _ = fresh_frame(t, f"after_{tag}")
    res = t.run(t.command(f"ok-after-{tag}", "refer", "the red box"))
    assert res.status == OK, res.error


@pytest.mark.parametrize("kind", ["truncated", "unknown_encoding", "zero_size", "short_step"])
def test_bad_images_are_rejected(node: tuple, kind: str) -> None:
    proc, t = node
    stamp = next_stamp()
    msg = rgb_image_msg(scene(W, H), stamp, "bad_cam")
    expect = {"truncated": "truncated", "unknown_encoding": "unsupported image encoding",
              "zero_size": "zero-size", "short_step": "step"}[kind]
    if kind == "truncated":
        msg.data = bytes(msg.data)[: H * msg.step - 10]
    elif kind == "unknown_encoding":
        msg.encoding = "yuv_weird42"
    elif kind == "zero_size":
        msg.height, msg.width, msg.step, msg.data = 0, 0, 0, b""
    else:
        msg.step = W  # smaller than a row of rgb8
    t.image_pub.publish(msg)
    probe = t.wait_frame(stamp)
    assert probe.status == INVALID and "last image was rejected" in probe.error and expect in probe.error
    res = t.run(t.command(f"after-bad-{kind}", "refer", "the red box"))
    assert res.status == INVALID and expect in res.error
    assert res.header.frame_id == "bad_cam"
    assert proc.alive()
    _still_answers(t, kind)


def test_corrupt_compressed_image(node: tuple) -> None:
    from sensor_msgs.msg import CompressedImage

    from kosmos2_ros.ros.convert import header_of

    proc, t = node
    stamp = next_stamp()
    t.compressed_pub.publish(CompressedImage(header=header_of(stamp, "jpeg_cam"), format="jpeg",
                                             data=b"\xff\xd8\xff\xe0 this is not a jpeg" * 10))
    probe = t.wait_frame(stamp)
    assert probe.status == INVALID and "cannot decode compressed image" in probe.error
    # A good JPEG on the same topic works.
    import cv2

    ok, jpeg = cv2.imencode(".jpg", scene(W, H)[:, :, ::-1])
    assert ok
    stamp2 = next_stamp()
    t.compressed_pub.publish(CompressedImage(header=header_of(stamp2, "jpeg_cam"), format="jpeg", data=jpeg.tobytes()))
    assert t.wait_frame(stamp2).status == OK
    assert proc.alive()
    _still_answers(t, "compressed")


@pytest.mark.parametrize("case", ["empty", "huge", "phrase_tag", "patch_tag", "region_outside", "unknown_task",
                                  "too_many_tokens"])
def test_bad_commands_are_invalid(node: tuple, case: str) -> None:
    _, t = node
    fresh_frame(t)
    cmd = {
        "empty": t.command("bad-empty", "refer", ""),
        "huge": t.command("bad-huge", "refer", "x" * 100_000),
        "phrase_tag": t.command("bad-phrase", "refer", "the <phrase>dog</phrase>"),
        "patch_tag": t.command("bad-patch", "vqa", "where is <patch_index_0042>?"),
        "region_outside": t.command("bad-region", "region", region=(500, 500, 600, 700)),
        "unknown_task": t.command("bad-task", "fly", "up"),
        "too_many_tokens": t.command("bad-tokens", "caption", max_new_tokens=100_000),
    }[case]
    res = t.run(cmd)
    assert res.status == INVALID and res.error
    assert res.id == cmd.id
    _still_answers(t, case)


def test_stale_frame(node: tuple) -> None:
    _, t = node
    fresh_frame(t, "stale_cam")
    assert all(r.successful for r in t.set_parameters({"max_frame_age_s": 0.3}))
    try:
        time.sleep(0.6)
        res = t.run(t.command("stale1", "refer", "the red box"))
        assert res.status == STALE and "old" in res.error and res.header.frame_id == "stale_cam"
        stamp, _ = fresh_frame(t, "fresh_cam")
        assert t.run(t.command("stale2", "refer", "the red box")).status == OK
    finally:
        assert all(r.successful for r in t.set_parameters({"max_frame_age_s": 0.0}))


def test_bad_parameters_are_refused_with_a_reason(node: tuple) -> None:
    _, t = node
    for values, words in (({"max_new_tokens": 0}, "max_new_tokens"), ({"backend": "nope"}, "backend"),
                          ({"score_threshold": 2.0}, "score_threshold"),
                          ({"max_frame_age_s": "soon"}, "max_frame_age_s must be a number"),
                          ({"image_qos": "fast"}, "image_qos")):
        (result,) = t.set_parameters(values)
        assert not result.successful and words in result.reason, (values, result.reason)
    (result,) = t.set_parameters({"max_new_tokens": 12})
    assert result.successful
    try:
        fresh_frame(t)
        res = t.run(t.command("tok12", "describe"))
        assert res.status == OK and 0 < len(res.token_ids) <= 12
    finally:
        t.set_parameters({"max_new_tokens": 24})


def test_not_active_after_deactivate(node: tuple) -> None:
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    _, t = node
    client = t.node.create_client(ChangeState, "/kosmos2/change_state")
    assert client.wait_for_service(timeout_sec=5)

    def change(tid: int) -> bool:
        return t.wait_for(client.call_async(ChangeState.Request(transition=Transition(id=tid)))).success

    assert change(Transition.TRANSITION_DEACTIVATE)
    try:
        res = t.run(t.command("inactive1", "refer", "the red box"))
        assert res.status == NOT_ACTIVE and "not active" in res.error
    finally:
        assert change(Transition.TRANSITION_ACTIVATE)
    _still_answers(t, "reactivate")


# -- plumbing with a slowed-down backend: a full queue and cancel ---------------------------
@pytest.fixture(scope="module")
def slow_node(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    log = tmp_path_factory.mktemp("slow_node") / "node.log"
    with running_node({"model": str(tiny_model_dir), "queue_size": 1, "max_new_tokens": 40, "max_frame_age_s": 0},
                      SLOW_DOMAIN, log, check_exit=False, script=str(Path(__file__).with_name("node_helpers.py"))) as running:
        yield running


def test_full_queue_answers_busy_at_once(slow_node: tuple) -> None:
    _, t = slow_node
    fresh_frame(t)
    t.command_pub.publish(t.command("long", "caption", max_new_tokens=40))   # ~2 s at 50 ms a token
    time.sleep(0.3)
    for i in range(3):
        t.command_pub.publish(t.command(f"q{i}", "refer", "the red box"))
    got = [t.wait_result(f"q{i}", 20) for i in range(3)]
    assert [r.status for r in got].count(BUSY) >= 2
    assert all(r.status in (OK, BUSY) for r in got)
    busy = [r for r in got if r.status == BUSY]
    assert "queue_size" in busy[0].error and busy[0].total_ms < 500
    assert t.wait_result("long", 20).status == OK


def test_action_cancel_gives_cancelled(slow_node: tuple) -> None:
    from action_msgs.msg import GoalStatus

    from kosmos2_ros.action import GroundTask

    _, t = slow_node
    fresh_frame(t)
    assert t.action_client.wait_for_server(timeout_sec=10)
    feedback = []
    goal = GroundTask.Goal(command=t.command("cancel-me", "describe", max_new_tokens=200))
    handle = t.wait_for(t.action_client.send_goal_async(goal, feedback_callback=feedback.append))
    deadline = time.monotonic() + 10
    while not feedback and time.monotonic() < deadline:
        time.sleep(0.01)
    assert feedback
    t.wait_for(handle.cancel_goal_async())
    result = t.wait_for(handle.get_result_async(), 20)
    assert result.status == GoalStatus.STATUS_CANCELED
    assert result.result.result.status == CANCELLED
    published = t.wait_result("cancel-me")
    assert published.status == CANCELLED and len(t.results["cancel-me"]) == 1
    _still_answers(t, "cancel")


# -- a model that cannot be loaded -----------------------------------------------------------
def test_missing_model_fails_configure_clearly(tmp_path: Path) -> None:
    from lifecycle_msgs.srv import GetState

    proc = NodeProcess({"model": str(tmp_path / "no_such_model"), "allow_download": False}, BROKEN_DOMAIN,
                       tmp_path / "node.log")
    t = Tester(BROKEN_DOMAIN)
    try:
        client = t.node.create_client(GetState, "/kosmos2/get_state")
        assert client.wait_for_service(timeout_sec=30), proc.log()
        deadline = time.monotonic() + 30
        while "cannot load model" not in proc.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "cannot load model" in proc.log() and "no_such_model" in proc.log()
        assert t.wait_for(client.call_async(GetState.Request())).current_state.label == "unconfigured"
        while t.command_pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        res = t.run(t.command("no-model", "refer", "a dog"), 10)
        assert res.status == NOT_ACTIVE
    finally:
        t.close()
        proc.stop()


def test_a_bad_command_is_invalid_before_its_frame_is_looked_up(node: tuple) -> None:
    """A control token about a frame the node does not have: INVALID (the command is what to fix), not NO_FRAME."""
    _, t = node
    res = t.run(t.command("bad-first", "refer", "the <phrase> mug", stamp_ns=123))
    assert res.status == 4, res.error
    res = t.run(t.command("bad-first-2", "region", stamp_ns=123))
    assert res.status == 4 and "needs a region" in res.error
