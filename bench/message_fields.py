"""What a large message field costs to fill on Humble's Python: the debug image, a mask and a cloud.

Humble's generated `uint8[]` setters check every element of anything but `array('B')` under
`__debug__`, in the constructor too; Jazzy and later do so only with ROS_PYTHON_CHECK_FIELDS=1, which this
script sets (before any message module is imported), and only in the setter, which the baseline goes
through, so it measures here what Humble does. Per frame size, the
debug image's conversion the old way (`bytes`: baseline) and as the node does it (`array('B')`, through
`convert.rgb_to_image`), and the whole `~/debug_image` (drawing included), best of N, in ms.

  scripts/ros-env python bench/message_fields.py             # 640x480, 1280x720, 1920x1080; ~1 min
  scripts/ros-env python bench/message_fields.py --small     # 320x240 only, 2 repeats (CI's smoke run)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from typing import Callable, List

os.environ["ROS_PYTHON_CHECK_FIELDS"] = "1"   # Humble's behaviour, on Jazzy / Kilted

import numpy as np  # noqa: E402


def bytes_into_image(rgb: np.ndarray, header: object) -> object:
    """The debug image as the node made it before: `bytes` through the checked setter (Humble's constructor does
    this; Kilted's wraps constructor arguments in an array first)."""
    from sensor_msgs.msg import Image

    from kosmos2_ros.core.serving.images import from_rgb8

    data, step = from_rgb8(rgb, "bgr8")
    msg = Image(header=header, height=rgb.shape[0], width=rgb.shape[1], encoding="bgr8", step=step)
    msg.data = data
    return msg


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="640x480,1280x720,1920x1080")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="320x240, 2 repeats: checks the script runs")
    args = ap.parse_args(argv)
    sizes = ["320x240"] if args.small else args.sizes.split(",")
    repeats = 2 if args.small else args.repeats

    from sensor_msgs.msg import Image
    from std_msgs.msg import Header

    from kosmos2_ros.core.serving.pipeline import GroundedBox, Result, Status
    from kosmos2_ros.ros.convert import rgb_to_image
    from kosmos2_ros.ros.visualize import debug_image

    probe = Image()
    try:
        probe.data = [256]
        checked = False
    except (AssertionError, ValueError):
        checked = True
    print(f"field checks: {'on' if checked else 'OFF (this distro ignores ROS_PYTHON_CHECK_FIELDS)'}; "
          f"ROS_DISTRO={os.environ.get('ROS_DISTRO', '?')}, best of {repeats}")
    print("| frame | bytes into Image.data (baseline) ms | array('B') (the node) ms | ratio | whole ~/debug_image ms |")
    print("|---|---|---|---|---|")
    header = Header(frame_id="camera")
    for size in sizes:
        w, h = (int(v) for v in size.split("x"))
        rgb = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)

        box = GroundedBox(phrase="the red mug", entity_index=0, span=(0, 11), box_norm=(0.2, 0.2, 0.5, 0.6),
                          box_px=(0.2 * w, 0.2 * h, 0.5 * w, 0.6 * h), score=0.9)
        result = Result(id="b", task="refer", status=Status.OK, text="the red mug", objects=[box], width=w, height=h)
        baseline = best_ms(partial(bytes_into_image, rgb, header), repeats)
        ours = best_ms(partial(rgb_to_image, rgb, header, "bgr8"), repeats)
        whole = best_ms(partial(debug_image, rgb, result, header), repeats)
        print(f"| {w}x{h} | {baseline:.1f} | {ours:.2f} | {baseline / max(ours, 1e-6):.0f}x | {whole:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
