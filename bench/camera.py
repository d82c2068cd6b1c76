"""A camera as its own process, as a driver would be: rgb8 frames at a fixed rate on a topic.

  scripts/ros-env python bench/camera.py 640x480 15 best_effort 30 [--topic /image]

Frames are stamped with the ROS clock when published; their pixels are one random image
(frame content does not matter to delivery or admission, and generating it anew would load
the machine being measured). Prints the number of frames sent when done.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np


def start(size: str, hz: float, reliable: bool, seconds: float, env: Optional[Dict[str, str]] = None,
          topic: str = "/image") -> subprocess.Popen:
    """This script as a child process; its frame count comes on its stdout."""
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), size, str(hz),
                             "reliable" if reliable else "best_effort", str(seconds), "--topic", topic],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("size", help="WxH")
    ap.add_argument("hz", type=float)
    ap.add_argument("qos", choices=("best_effort", "reliable"))
    ap.add_argument("seconds", type=float)
    ap.add_argument("--topic", default="/image")
    args = ap.parse_args(argv)

    import rclpy
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from kosmos2_ros.ros.convert import uint8_array

    width, height = (int(v) for v in args.size.split("x"))
    rclpy.init()
    node = rclpy.create_node("bench_camera")
    reliability = ReliabilityPolicy.RELIABLE if args.qos == "reliable" else ReliabilityPolicy.BEST_EFFORT
    pub = node.create_publisher(Image, args.topic, QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                                                              reliability=reliability))
    data = uint8_array(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))
    sent, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < args.seconds:
        msg = Image(height=height, width=width, encoding="rgb8", step=width * 3, data=data)
        msg.header.stamp = node.get_clock().now().to_msg()
        msg.header.frame_id = "bench_camera"
        pub.publish(msg)
        sent += 1
        time.sleep(max(0.0, t0 + sent / args.hz - time.monotonic()))
    print(sent, flush=True)
    node.destroy_node()
    rclpy.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
