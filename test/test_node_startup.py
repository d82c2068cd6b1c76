"""A ROS user's first contact with the node, each case a real node process over loopback DDS.

Start-up parameters that are wrong and then fixed at runtime, what `ros2 param describe`
shows, names under a namespace (topics, diagnostics), the lifecycle shutdown ending the
process, and camera frames of real sizes (640x480) arriving with the default settings.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest
from node_helpers import CameraStream, NodeProcess, Tester, free_domain, running_node, scene

OK = 0
pytestmark = pytest.mark.timeout(180)


def _wait_log(proc: NodeProcess, words: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while words not in proc.log() and time.monotonic() < deadline:
        if not proc.alive():
            break
        time.sleep(0.05)
    return proc.log()


def _refer_on_fresh_frame(t: Tester, cmd_id: str) -> object:
    stamp = time.time_ns()
    t.publish_frame(scene(64, 48), stamp)
    t.wait_frame(stamp)
    return t.run(t.command(cmd_id, "refer", "the red box", stamp_ns=stamp))


def test_bad_start_up_parameters_can_be_fixed_at_runtime(tiny_model_dir: Path, tmp_path: Path) -> None:
    """queue_size 0 and score_threshold 2 (refused by their ranges) and max_new_tokens 600 (above the
    limit): configure fails, and `ros2 param set` of valid values then lets configure succeed."""
    domain = free_domain()
    proc = NodeProcess({"model": str(tiny_model_dir), "queue_size": 0, "score_threshold": 2.0,
                        "max_new_tokens": 600, "max_frame_age_s": 0}, domain, tmp_path / "node.log")
    t = Tester(domain)
    try:
        log = _wait_log(proc, "will not configure")
        assert "queue_size" in log and "score_threshold" in log and "max_new_tokens" in log, log
        assert t.state() == "unconfigured" and not t.change_state("configure")
        (queue,) = t.set_parameters({"queue_size": 4})
        assert queue.successful, queue.reason            # valid in itself: accepted while others are still wrong
        (too_many,) = t.set_parameters({"max_new_tokens": 700})
        assert not too_many.successful and "max_new_tokens" in too_many.reason
        (tokens,) = t.set_parameters({"max_new_tokens": 12})
        assert tokens.successful, tokens.reason
        assert not t.change_state("configure")           # score_threshold still holds a refused value's place
        (score,) = t.set_parameters({"score_threshold": 0.5})
        assert score.successful, score.reason
        assert t.change_state("configure") and t.change_state("activate")
        while t.command_pub.get_subscription_count() == 0 or t.image_pub.get_subscription_count() == 0:
            time.sleep(0.05)
        res = _refer_on_fresh_frame(t, "fixed")
        assert res.status == OK, res.error
        assert len(res.token_ids) <= 12
        # transformers' loading progress bar never reaches the node's output (launch shows it as blank lines)
        assert "Loading weights" not in proc.log() and "%|" not in proc.log()
    finally:
        t.close()
        assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def namespaced(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """In namespace /robot1, the image remapped (relatively) to cam1/color/image_raw alone."""
    log = tmp_path_factory.mktemp("namespaced") / "node.log"
    domain = free_domain()
    proc = NodeProcess({"model": str(tiny_model_dir), "use_compressed": True, "max_frame_age_s": 0}, domain, log,
                       remaps={"__ns": "/robot1", "image": "cam1/color/image_raw"})
    tester = Tester(domain, node_ns="/robot1/kosmos2", topic_ns="/robot1/cam1/color")
    try:
        tester.subscribe_debug()
        tester.wait_active(proc=proc)
        yield proc, tester
    finally:
        tester.close()
        proc.stop()


def _node_subscribes(t: Tester, topic: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(i.node_name == "kosmos2" for i in t.node.get_subscriptions_info_by_topic(topic)):
            return True
        time.sleep(0.1)
    return False


def test_camera_info_and_compressed_follow_the_image_topic(namespaced: tuple) -> None:
    _, t = namespaced
    assert _node_subscribes(t, "/robot1/cam1/color/image_raw")
    assert _node_subscribes(t, "/robot1/cam1/color/camera_info")
    assert _node_subscribes(t, "/robot1/cam1/color/image_raw/compressed")
    assert _node_subscribes(t, "/robot1/depth/image")    # not a sibling: depth has its own topic


def test_parameter_descriptors_carry_ranges_and_descriptions(namespaced: tuple) -> None:
    from rcl_interfaces.srv import DescribeParameters

    _, t = namespaced
    client = t.node.create_client(DescribeParameters, "/robot1/kosmos2/describe_parameters")
    assert client.wait_for_service(timeout_sec=10)
    names = ["queue_size", "score_threshold", "max_prompt_chars", "model", "image_qos"]
    described = {d.name: d for d in t.wait_for(client.call_async(DescribeParameters.Request(names=names))).descriptors}
    queue = described["queue_size"].integer_range[0]
    assert (queue.from_value, queue.to_value, queue.step) == (1, 1024, 1)
    score = described["score_threshold"].floating_point_range[0]
    assert (score.from_value, score.to_value) == (0.0, 1.0)
    assert described["max_prompt_chars"].integer_range[0].to_value == 100_000
    assert not described["model"].integer_range and not described["model"].floating_point_range
    assert all(d.description for d in described.values())
    assert "auto" in described["image_qos"].description
    (refused,) = t.set_parameters({"queue_size": 2000})
    assert not refused.successful


def test_diagnostics_are_named_by_the_nodes_full_name(namespaced: tuple) -> None:
    _, t = namespaced
    deadline = time.monotonic() + 5
    while not t.diagnostics and time.monotonic() < deadline:
        time.sleep(0.05)
    assert t.diagnostics and t.diagnostics[-1].status[0].name == "/robot1/kosmos2: grounding"


def test_incompatible_camera_qos_is_logged(namespaced: tuple) -> None:
    proc, t = namespaced
    assert all(r.successful for r in t.set_parameters({"image_qos": "reliable"}))
    assert t.change_state("deactivate") and t.change_state("cleanup")
    assert t.change_state("configure") and t.change_state("activate")
    camera = CameraStream(t, 64, 48, 10, reliable=False, topic="/robot1/cam1/color/image_raw")
    try:
        log = _wait_log(proc, "incompatible", 15)
        assert "incompatible" in log and "image_qos: auto" in log, log
    finally:
        camera.stop()


def test_lifecycle_shutdown_ends_the_process(namespaced: tuple) -> None:
    proc, t = namespaced
    assert t.change_state("active_shutdown")
    proc.proc.wait(timeout=20)
    assert proc.proc.returncode == 0, proc.log()


# -- real frame sizes -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_node(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """Every parameter at its default but the model (and the Fast DDS profile of the environment)."""
    log = tmp_path_factory.mktemp("default_node") / "node.log"
    with running_node({"model": str(tiny_model_dir)}, free_domain(), log) as running:
        yield running


@pytest.mark.parametrize("reliable", [False, True], ids=["best_effort_camera", "reliable_camera"])
def test_640x480_frames_arrive_and_commands_get_fresh_ones(default_node: tuple, reliable: bool) -> None:
    _, t = default_node
    camera = CameraStream(t, 640, 480, 15, reliable=reliable)
    try:
        time.sleep(2.0)    # discovery, and image_qos auto matching the camera
        for i in range(6):
            sent_ns = time.time_ns()
            res = t.run(t.command(f"vga-{reliable}-{i}", "refer", "the red box"), 30)
            assert res.status == OK, res.error
            assert (res.image_width, res.image_height) == (640, 480)
            frame_age_s = (sent_ns - (res.header.stamp.sec * 10**9 + res.header.stamp.nanosec)) / 1e9
            assert frame_age_s <= 0.5, f"command {i} ran on a frame {frame_age_s:.2f} s old"
            time.sleep(0.3)
    finally:
        camera.stop()


def test_kosmos2_model_is_read_by_the_node_too(tiny_model_dir: Path, tmp_path: Path) -> None:
    """No model parameter: the node loads $KOSMOS2_MODEL, the same rule as the CLIs."""
    domain = free_domain()
    proc = NodeProcess({"max_frame_age_s": 0}, domain, tmp_path / "node.log", env={"KOSMOS2_MODEL": str(tiny_model_dir)})
    t = Tester(domain)
    try:
        t.wait_active(proc=proc)
        assert f"loading model {str(tiny_model_dir)!r}" in proc.log()
    finally:
        t.close()
        assert proc.stop() == 0, proc.log()


def test_what_this_machine_lacks_is_refused_when_set(default_node: tuple) -> None:
    """A CUDA device that does not exist, a backend whose package is missing: refused at once with the
    reason; a change that can only apply later says so."""
    import importlib.util

    proc, t = default_node
    (gpu,) = t.set_parameters({"device": "cuda:7"})
    assert not gpu.successful and "device cuda:7 does not exist: torch sees" in gpu.reason
    if importlib.util.find_spec("tensorrt") is None:
        (trt,) = t.set_parameters({"backend": "tensorrt"})
        assert not trt.successful and trt.reason == "backend tensorrt needs tensorrt, which is not installed here"
    (later,) = t.set_parameters({"cuda_graph": False})
    assert later.successful
    deadline = time.monotonic() + 5
    while "cuda_graph: takes effect at the next configure" not in proc.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "cuda_graph: takes effect at the next configure (lifecycle cleanup + configure)" in proc.log()
    assert t.set_parameters({"cuda_graph": True})[0].successful


def test_parameters_keep_their_types_and_say_why_not(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`-p max_frame_age_s:=1` and a runtime `1` keep a double a double (`ros2 param describe` says
    double), `[]` keeps queries a string array, and a value of the wrong type gets the node's own
    one-line reason, not rclpy's type numbers."""
    from rcl_interfaces.msg import ParameterType
    from rcl_interfaces.srv import DescribeParameters

    domain = free_domain()
    proc = NodeProcess({"model": str(tiny_model_dir), "max_frame_age_s": 1, "queue_size": "abc"}, domain,
                       tmp_path / "node.log")
    t = Tester(domain)
    client = t.node.create_client(DescribeParameters, "/kosmos2/describe_parameters")

    def types(*names: str) -> dict:
        described = t.wait_for(client.call_async(DescribeParameters.Request(names=list(names)))).descriptors
        return {d.name: d.type for d in described}

    try:
        log = _wait_log(proc, "will not configure")
        assert "queue_size: start-up value refused (queue_size must be an integer, got 'abc' (str))" in log, log
        assert client.wait_for_service(timeout_sec=10)
        assert types("max_frame_age_s")["max_frame_age_s"] == ParameterType.PARAMETER_DOUBLE
        (age,) = t.set_parameters({"max_frame_age_s": 2})
        (threshold,) = t.set_parameters({"score_threshold": 1})
        (queries,) = t.set_parameters({"queries": []})        # as `ros2 param set ... "[]"` sends it
        assert age.successful and threshold.successful and queries.successful
        from rclpy.node import Node

        if hasattr(Node, "add_pre_set_parameters_callback"):   # not on Humble: there the sent type stays
            assert types("max_frame_age_s", "score_threshold", "queries") == {
                "max_frame_age_s": ParameterType.PARAMETER_DOUBLE, "score_threshold": ParameterType.PARAMETER_DOUBLE,
                "queries": ParameterType.PARAMETER_STRING_ARRAY}
        (word,) = t.set_parameters({"queue_size": "abc"})
        assert not word.successful and word.reason == "queue_size must be an integer, got 'abc' (str)"
        (flag,) = t.set_parameters({"enable_3d": 1})
        assert not flag.successful and flag.reason == "enable_3d must be true or false, got 1 (int)"
        (fixed,) = t.set_parameters({"queue_size": 4})
        assert fixed.successful and types("queue_size")["queue_size"] == ParameterType.PARAMETER_INTEGER
        assert t.change_state("configure")
    finally:
        t.close()
        assert proc.stop() == 0, proc.log()


def test_ctrl_c_with_a_camera_streaming_shuts_down_quietly(tiny_model_dir: Path, tmp_path: Path) -> None:
    """SIGINT (Ctrl-C, or launch passing it on) while frames and commands keep arriving: exit 0 and
    nothing alarming. rclpy's executor destroyed its guard condition under callbacks still running,
    which printed "The following exception was never retrieved: cannot use Destroyable ..." at exit."""
    domain = free_domain()
    proc = NodeProcess({"model": str(tiny_model_dir), "max_frame_age_s": 0, "queries": "[the red box]",
                        "cameras": "[front, wrist]", "encode_ahead_hz": 5.0}, domain, tmp_path / "node.log")
    t = Tester(domain, topic_ns="/front")
    cameras = []
    try:
        t.wait_active(proc=proc)
        cameras = [CameraStream(t, 640, 480, 10, reliable=False, topic=f"/{name}/image") for name in ("front", "wrist")]
        for i in range(30):
            msg = t.command(f"flow-{i}", "refer", "the red box")
            msg.camera = "front" if i % 2 else "wrist"
            t.command_pub.publish(msg)
            time.sleep(0.2)
        assert proc.stop() == 0, proc.log()
        log = proc.log()
        assert "shutting down" in log
        for alarming in ("never retrieved", "Traceback", "Destroyable", "InvalidHandle"):
            assert alarming not in log, log
    finally:
        for camera in cameras:
            camera.stop()
        t.close()
        proc.stop()
