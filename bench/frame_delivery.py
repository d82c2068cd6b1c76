"""Camera frames delivered to the grounding node over Fast DDS, frames/s, as a table.

The real node (default parameters: image_qos auto, the environment's Fast DDS profile) runs
as its own process; a camera (bench/camera.py) runs as another, like a driver, publishing rgb8 frames
at a fixed rate with a best-effort or reliable publisher, with or without the large-frame
profile on its side. Frames delivered = the node's `frames_received` (decoded frames) over a
measured window, read from /diagnostics. "busy": a command stream keeps the model working
meanwhile (describe, 24 tokens, 4 per second).

  scripts/ros-env python bench/frame_delivery.py                  # every row, ~5 min
  scripts/ros-env python bench/frame_delivery.py --sizes 640x480 --rates 15 --seconds 4
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "test"))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from node_helpers import NodeProcess, free_domain  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
import camera  # noqa: E402 - bench/camera.py, the camera process


class NodeWatch:
    """The bench's own rclpy node: reads the node's diagnostics and sends the busy command stream."""

    def __init__(self) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        from kosmos2_ros.msg import GroundingCommand

        rclpy.init()
        self.node = rclpy.create_node("bench_frame_delivery")
        self.latest: Dict[str, str] = {}
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)
        self._cmd_pub = self.node.create_publisher(GroundingCommand, "/kosmos2/command",
                                                   QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
        self._command = GroundingCommand
        self._busy = threading.Event()
        self._stop = threading.Event()
        threading.Thread(target=self._spin, daemon=True).start()
        threading.Thread(target=self._commands, daemon=True).start()

    def _on_diag(self, msg) -> None:
        for status in msg.status:
            if status.name.endswith("kosmos2: grounding"):
                self.latest = {kv.key: kv.value for kv in status.values}
                self.latest["_t"] = str(time.monotonic())

    def _spin(self) -> None:
        import rclpy

        while not self._stop.is_set():
            rclpy.spin_once(self.node, timeout_sec=0.05)

    def _commands(self) -> None:
        i = 0
        while not self._stop.is_set():
            if self._busy.is_set():
                i += 1
                self._cmd_pub.publish(self._command(id=f"busy-{i}", task="describe", max_new_tokens=24))
            time.sleep(0.25)

    def busy(self, on: bool) -> None:
        (self._busy.set if on else self._busy.clear)()

    def frames_received(self, after: float, timeout: float = 5.0) -> Optional[tuple]:
        """(frames_received, monotonic time) from the first diagnostics published after `after`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snap = self.latest
            if snap and float(snap["_t"]) > after:
                return int(snap["frames_received"]), float(snap["_t"])
            time.sleep(0.02)
        return None

    def close(self) -> None:
        import rclpy

        self._stop.set()
        time.sleep(0.1)
        self.node.destroy_node()
        rclpy.shutdown()


def measure(watch: NodeWatch, width: int, height: int, hz: float, reliable: bool, camera_profile: bool,
            busy: bool, seconds: float) -> Dict[str, float]:
    env = dict(os.environ)
    if not camera_profile:
        env.pop("FASTDDS_DEFAULT_PROFILES_FILE", None)
        env.pop("FASTRTPS_DEFAULT_PROFILES_FILE", None)
    warmup = 3.0
    camera_proc = camera.start(f"{width}x{height}", hz, reliable, warmup + seconds + 1.5, env=env)
    watch.busy(busy)
    time.sleep(warmup)          # process start, discovery, image_qos auto matching this camera
    start = watch.frames_received(time.monotonic())
    time.sleep(seconds)
    end = watch.frames_received(time.monotonic())
    watch.busy(False)
    camera_proc.wait(timeout=60)
    if start is None or end is None:
        return {"delivered_fps": float("nan")}
    return {"delivered_fps": (end[0] - start[0]) / max(end[1] - start[1], 1e-9)}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model dir (default: build a tiny test checkpoint)")
    ap.add_argument("--sizes", default="640x480,1280x720")
    ap.add_argument("--rates", default="15,30")
    ap.add_argument("--seconds", type=float, default=4.0, help="measured window per row")
    args = ap.parse_args(argv)
    os.environ["ROS_DOMAIN_ID"] = str(free_domain())
    model = args.model
    if not model:
        from kosmos2_ros.fixtures.checkpoints import build_tiny_checkpoint

        model = str(build_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny"))
    log = Path(tempfile.mkstemp(prefix="kosmos2_frames_", suffix=".log")[1])
    node = NodeProcess({"model": model, "allow_download": False}, int(os.environ["ROS_DOMAIN_ID"]), log)
    watch = NodeWatch()
    try:
        if watch.frames_received(0.0, timeout=120) is None:
            print(f"the node published no diagnostics (log: {log})", file=sys.stderr)
            return 1
        profile = os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE", "")
        print(f"node: default parameters (image_qos auto); node-side Fast DDS profile: {profile or 'none'}")
        print()
        print("| frame | camera Hz | camera publisher | camera-side profile | node | delivered frames/s | delivered |")
        print("|---|---|---|---|---|---|---|")
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
        rates = [float(r) for r in args.rates.split(",")]
        for (w, h), hz, reliable, camera_profile, busy in itertools.product(
                sizes, rates, (False, True), (True, False), (False, True)):
            row = measure(watch, w, h, hz, reliable, camera_profile, busy, args.seconds)
            fps = row["delivered_fps"]
            print(f"| {w}x{h} | {hz:g} | {'reliable' if reliable else 'best effort'} | "
                  f"{'yes' if camera_profile else 'no'} | {'busy' if busy else 'idle'} | {fps:.1f} | "
                  f"{100.0 * fps / hz:.0f} % |", flush=True)
    finally:
        watch.close()
        node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
