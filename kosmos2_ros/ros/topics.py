"""Camera topic names by the image_transport convention (plain strings; no rclpy).

`camera_info` is the sibling of the image topic and `compressed` its child, so remapping the
image alone (`-r image:=/cam/color/image_raw`, or the launch file's `image_topic`) also reads
`/cam/color/camera_info` and `/cam/color/image_raw/compressed`, unless those are remapped too.
"""
from __future__ import annotations

#: The namespace under each camera's name where its command and output topics live (camera_topics).
CAMERA_INTERFACE = "kosmos2"


def camera_info_for(image_topic: str) -> str:
    """`/cam/image_raw` -> `/cam/camera_info`; `image` -> `camera_info`."""
    head, sep, _ = image_topic.rstrip("/").rpartition("/")
    return f"{head}{sep}camera_info"


def compressed_for(image_topic: str) -> str:
    """`/cam/image_raw` -> `/cam/image_raw/compressed`."""
    return image_topic.rstrip("/") + "/compressed"


def compressed_depth_for(depth_topic: str) -> str:
    """`/cam/aligned_depth_to_color/image_raw` -> `.../image_raw/compressedDepth`."""
    return depth_topic.rstrip("/") + "/compressedDepth"


def camera_interface(camera: str, leaf: str) -> str:
    """A camera's own command and output topics (parameter camera_topics): `r1/front` + `result` ->
    `r1/front/kosmos2/result`, relative to the node's namespace, so a robot finds its results under its
    camera's name whichever node (shard) serves that camera."""
    return f"{camera}/{CAMERA_INTERFACE}/{leaf}"
