"""Camera topic names by the image_transport convention (plain strings; no rclpy).

`camera_info` is the sibling of the image topic and `compressed` its child, so remapping the
image alone (`-r image:=/cam/color/image_raw`, or the launch file's `image_topic`) also reads
`/cam/color/camera_info` and `/cam/color/image_raw/compressed`, unless those are remapped too.
"""
from __future__ import annotations


def camera_info_for(image_topic: str) -> str:
    """`/cam/image_raw` -> `/cam/camera_info`; `image` -> `camera_info`."""
    head, sep, _ = image_topic.rstrip("/").rpartition("/")
    return f"{head}{sep}camera_info"


def compressed_for(image_topic: str) -> str:
    """`/cam/image_raw` -> `/cam/image_raw/compressed`."""
    return image_topic.rstrip("/") + "/compressed"
