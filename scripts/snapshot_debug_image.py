"""Start the node, send it a generated frame and a referring expression, save ~/debug_image as PNG.

Makes the README's picture: `scripts/ros-env python scripts/snapshot_debug_image.py docs/debug_image.png [MODEL_DIR]`.
Without MODEL_DIR it builds the tiny test checkpoint.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/debug_image.png")
    model = sys.argv[2] if len(sys.argv) > 2 else ""
    if not model:
        from kosmos2_ros.fixtures.checkpoints import build_tiny_checkpoint

        model = str(build_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny"))
    node = subprocess.Popen([sys.executable, "-m", "kosmos2_ros.ros.node", "--ros-args", "-p", f"model:={model}",
                             "-p", "allow_download:=false", "-p", "max_frame_age_s:=0.0"])
    import rclpy
    from rclpy.node import Node
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    from kosmos2_ros.fixtures.scenes import draw_scene
    from kosmos2_ros.msg import GroundingResult
    from kosmos2_ros.ros.convert import header_of, uint8_array

    rclpy.init()
    me = Node("snapshot")
    rgb, objects = draw_scene(640, 480, np.random.default_rng(7))
    img_pub = me.create_publisher(Image, "image", 1)
    refer_pub = me.create_publisher(String, "/kosmos2/refer", 10)
    got = {}
    me.create_subscription(Image, "/kosmos2/debug_image", lambda m: got.setdefault("img", m), 1)
    me.create_subscription(GroundingResult, "/kosmos2/result", lambda m: got.__setitem__("res", m), 10)
    deadline = time.monotonic() + 120
    last = 0.0
    while "img" not in got and time.monotonic() < deadline and node.poll() is None:
        if time.monotonic() - last > 1.0:
            msg = Image(header=header_of(time.time_ns(), "camera_color_optical_frame"), height=480, width=640,
                        encoding="rgb8", step=640 * 3, data=uint8_array(rgb))
            img_pub.publish(msg)
            time.sleep(0.2)
            refer_pub.publish(String(data=objects[0]["name"]))
            last = time.monotonic()
        rclpy.spin_once(me, timeout_sec=0.1)
    node.terminate()
    node.wait(timeout=20)
    if "img" not in got:
        print("no debug image received", file=sys.stderr)
        return 1
    m = got["img"]
    bgr = np.frombuffer(bytes(m.data), np.uint8).reshape(m.height, m.width, 3)
    from PIL import Image as PILImage

    out.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(np.ascontiguousarray(bgr[:, :, ::-1])).save(out)
    print(f"saved {out}; ground truth {objects[0]['name']} at {objects[0]['box']}; result: {got.get('res')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
