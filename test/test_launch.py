"""launch/grounding.launch.py started by the real launch system, answering a referring expression.

Needs ros2/launch and launch_ros, which a ROS 2 install has and the PyPI-wheel set-up does not:
there this test is skipped, and test/test_node_process.py (the node as its own process) stands
in for it.
"""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

launch_ros = pytest.importorskip("launch_ros", reason="launch_ros is not installed (PyPI-wheel set-up)")

from node_helpers import Tester, free_domain, node_env, scene  # noqa: E402

DOMAIN = free_domain()
ROOT = Path(__file__).resolve().parents[1]


# What `ros2 launch kosmos2_ros grounding.launch.py k:=v ...` does, without needing ros2cli:
# the launch service must own its process's main thread.
LAUNCHER = """
import sys
from launch import LaunchService
from launch.actions import IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
args = dict(a.split(":=", 1) for a in sys.argv[2:])
service = LaunchService(noninteractive=True)
service.include_launch_description(IncludeLaunchDescription(PythonLaunchDescriptionSource(sys.argv[1]),
                                                            launch_arguments=args.items()))
sys.exit(service.run())
"""


def stop_launch(proc: subprocess.Popen) -> None:
    """Ctrl-C to the launch service, as a user stops `ros2 launch`; killed if it does not end."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_launch_file_starts_a_node_that_answers(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = node_env(DOMAIN)
    # No camera_info_topic: the node reads the image topic's sibling, /launch_cam/camera_info.
    arguments = {"namespace": "launch_test", "image_topic": "/launch_cam/image",
                 "depth_topic": "/launch_cam/depth/image", "model": str(tiny_model_dir), "log_level": "info"}
    log = open(tmp_path / "launch.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(ROOT / "launch" / "grounding.launch.py"),
                             *(f"{k}:={v}" for k, v in arguments.items())],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
    tester = Tester(DOMAIN, node_ns="/launch_test/kosmos2", topic_ns="/launch_cam")
    try:
        tester.wait_active(timeout=120)
        stamp = 1_700_000_000_123_000_000
        tester.publish_frame(scene(96, 72), stamp, "launch_camera")
        tester.wait_frame(stamp)
        result = tester.run(tester.command("launched", "refer", "a red square"))
        assert result.status == 0, result.error
        assert result.header.frame_id == "launch_camera"
        assert result.header.stamp.sec * 10**9 + result.header.stamp.nanosec == stamp
        assert result.objects and result.objects[0].phrase == "a red square"
        infos = tester.node.get_subscriptions_info_by_topic("/launch_cam/camera_info")
        assert any(i.node_name == "kosmos2" and i.node_namespace == "/launch_test" for i in infos)
    finally:
        tester.close()
        stop_launch(proc)
        log.close()


def test_missing_rviz_fails_before_starting_anything(tiny_model_dir: Path, tmp_path: Path) -> None:
    """use_rviz:=true without rviz2: one line, a non-zero exit, and no orphaned node serving commands."""
    from kosmos2_ros.ros.launch_args import ament_package_exists

    if ament_package_exists("rviz2"):
        pytest.skip("rviz2 is installed here")
    env = node_env(free_domain())
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, str(ROOT / "launch" / "grounding.launch.py"),
                           f"model:={tiny_model_dir}", "use_rviz:=true", "namespace:=rviz_check"],
                          env=env, capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "rviz2 is not installed" in out and "nothing was started" in out, out
    assert "grounding_node" not in out and "loading model" not in out, out


def test_serve_robots_starts_a_node_per_shard_reached_by_camera_name(tiny_model_dir: Path, tmp_path: Path) -> None:
    """launch/serve_robots.launch.py with two shards: each node serves its cameras' compressed topics, and a
    command on a camera's own topic is answered by the node serving it (its generated id names the node);
    a camera served twice stops the launch before anything starts."""
    import time

    import cv2
    from sensor_msgs.msg import CompressedImage

    from kosmos2_ros.msg import GroundingCommand, GroundingResult
    from kosmos2_ros.ros.convert import header_of, uint8_array

    shards = ("[{name: shard_a, cameras: [{name: r1/front, image: /r1/cam/image_raw}]}, "
              "{name: shard_b, cameras: [{name: r2/front, image: /r2/cam/image_raw}]}]")
    env = node_env(DOMAIN)
    bad = subprocess.run([sys.executable, "-c", LAUNCHER, str(ROOT / "launch" / "serve_robots.launch.py"),
                          f"model:={tiny_model_dir}", "shards:=[{cameras: [c1]}, {cameras: [c1]}]"],
                         env=env, capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert bad.returncode != 0 and "camera 'c1' is served by shards" in bad.stdout + bad.stderr
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(ROOT / "launch" / "serve_robots.launch.py"),
                             f"model:={tiny_model_dir}", f"shards:={shards}", "backend:=torch"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
    tester = Tester(DOMAIN, node_ns="/shard_b")
    try:
        tester.wait_active(timeout=120, raw_image=False)
        node = tester.node
        got: list = []
        node.create_subscription(GroundingResult, "/r2/front/kosmos2/result", got.append, 10)
        image = node.create_publisher(CompressedImage, "/r2/cam/image_raw/compressed", 10)
        command = node.create_publisher(GroundingCommand, "/r2/front/kosmos2/command", 10)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (image.get_subscription_count() and command.get_subscription_count()):
            time.sleep(0.1)
        time.sleep(1.0)
        jpeg = cv2.imencode(".jpg", scene(96, 72)[:, :, ::-1])[1].tobytes()
        answer = None
        while time.monotonic() < deadline and answer is None:
            image.publish(CompressedImage(header=header_of(time.time_ns(), "r2_optical"), format="jpeg",
                                          data=uint8_array(jpeg)))
            time.sleep(0.3)
            command.publish(GroundingCommand(task="refer", text="a red square"))
            time.sleep(1.0)
            answer = next((m for m in got if m.status == 0), None)
        assert answer is not None, [m.error for m in got]
        assert answer.id.startswith("shard_b-") and answer.camera == "r2/front"
    finally:
        tester.close()
        stop_launch(proc)
        log.close()
