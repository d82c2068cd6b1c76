"""What grounding.launch.py decides, as plain functions (no launch import), so CI can test it.

The launch file reads its arguments, asks these functions for the node's parameters,
remappings and environment, and whether everything it was asked to start exists, all before
it starts anything: a launch that fails half-way leaves an orphaned node serving commands.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Mapping, Optional, Tuple

from .topics import camera_info_for

BOOL_ARGUMENTS = ("use_compressed", "enable_3d", "autostart")
LIST_ARGUMENTS = ("cameras", "queries")            # a YAML list, "[front, wrist]"; a bare value is one item
FLOAT_ARGUMENTS = ("query_rate_hz", "encode_ahead_hz")
STRING_ARGUMENTS = ("model", "backend", "image_transport", "depth_transport")
OVERRIDE_ARGUMENTS = STRING_ARGUMENTS + BOOL_ARGUMENTS + LIST_ARGUMENTS + FLOAT_ARGUMENTS
# The Fast DDS settings that carry large camera frames (config/fastdds_large_frames*.xml).
PROFILE_VARIABLES = ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE")
FAST_DDS_2_DISTROS = ("humble", "iron", "jazzy")   # they read the FASTRTPS_ name


class LaunchArgumentError(ValueError):
    """A launch argument that cannot be used, with the reason; raised before anything starts."""


def parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered not in ("true", "false", "1", "0"):
        raise LaunchArgumentError(f"launch argument {name} must be true or false, got {value!r}")
    return lowered in ("true", "1")


def parse_list(name: str, value: str) -> List[str]:
    """`[front, wrist]` (YAML flow list) -> ["front", "wrist"]; a bare `front` -> ["front"]; `[]` -> []."""
    import yaml

    text = value.strip()
    if not text.startswith("["):
        return [text]
    try:
        items = yaml.safe_load(text)
    except yaml.YAMLError:
        items = None
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise LaunchArgumentError(f"launch argument {name} must be a list of strings like \"[front, wrist]\", "
                                  f"got {value!r}")
    return items


def parse_float(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise LaunchArgumentError(f"launch argument {name} must be a number, got {value!r}") from None


def parameter_overrides(arguments: Mapping[str, str]) -> Dict[str, object]:
    """Only the arguments actually given override the parameters file (empty = keep it).

    An empty list (`cameras:="[]"`) counts as not given: launch_ros turns `[]` into `()` and then
    refuses it as a parameter value on every distro, after this file promised a checked launch.
    """
    out: Dict[str, object] = {}
    for name in OVERRIDE_ARGUMENTS:
        value = arguments.get(name, "").strip()
        if not value:
            continue
        if name in BOOL_ARGUMENTS:
            out[name] = parse_bool(name, value)
        elif name in LIST_ARGUMENTS:
            items = parse_list(name, value)
            if items:
                out[name] = items
        elif name in FLOAT_ARGUMENTS:
            out[name] = parse_float(name, value)
        else:
            out[name] = value
    try:   # each given value checked as the node will check it, before anything starts
        from kosmos2_ros.core.serving.config import ConfigError, Kosmos2Config

        Kosmos2Config.from_dict(out)
    except ConfigError as exc:
        raise LaunchArgumentError(f"launch argument: {exc}") from None
    return out


#: Per-camera topic lists, aligned with `cameras` (the one place cameras are set up).
CAMERA_TOPIC_ARGUMENTS = ("image_topics", "depth_topics", "camera_info_topics")


def remappings(image_topic: str, camera_info_topic: str, depth_topic: str) -> List[Tuple[str, str]]:
    """The node's camera topics. camera_info defaults to the image topic's sibling and the
    compressed image follows the image (image_transport's convention, applied by the node)."""
    remaps = [("image", image_topic), ("camera_info", camera_info_topic.strip() or camera_info_for(image_topic))]
    if depth_topic.strip():
        remaps.append(("depth/image", depth_topic))
    return remaps


def camera_remappings(arguments: Mapping[str, str]) -> List[Tuple[str, str]]:
    """Each named camera's driver topics: `image_topics`, `depth_topics` and `camera_info_topics`
    are lists in the order of `cameras` (empty: the camera keeps `<name>/image`, ...; an empty
    item keeps that camera's default). camera_info defaults to each image topic's sibling, as
    for one camera. For two RealSense drivers in namespaces front and wrist:

        cameras:="[front, wrist]" image_topics:="[/front/color/image_raw, /wrist/color/image_raw]"
        depth_topics:="[/front/aligned_depth_to_color/image_raw, /wrist/aligned_depth_to_color/image_raw]"
    """
    cameras = parse_list("cameras", arguments.get("cameras", "").strip() or "[]")
    lists = {name: parse_list(name, arguments.get(name, "").strip() or "[]") for name in CAMERA_TOPIC_ARGUMENTS}
    return camera_topic_remappings(cameras, lists)


def camera_topic_remappings(cameras: List[str], lists: Mapping[str, List[str]]) -> List[Tuple[str, str]]:
    """`camera_remappings` on parsed lists (`lists` keyed by CAMERA_TOPIC_ARGUMENTS; empty: defaults)."""
    for name, topics in lists.items():
        if topics and not cameras:
            raise LaunchArgumentError(f"launch argument {name} lists topics per camera, but no cameras are named "
                                      "(set cameras:=\"[front, wrist]\"; for one camera use image_topic, "
                                      "depth_topic and camera_info_topic)")
        if topics and len(topics) != len(cameras):
            raise LaunchArgumentError(f"launch argument {name} has {len(topics)} topics for {len(cameras)} cameras "
                                      f"{cameras}: give one per camera, in the same order (\"\" keeps a default)")
    remaps: List[Tuple[str, str]] = []
    for i, camera in enumerate(cameras):
        image, depth, info = (lists[n][i].strip() if lists.get(n) else "" for n in CAMERA_TOPIC_ARGUMENTS)
        if image:
            remaps.append((f"{camera}/image", image))
        if info or image:
            remaps.append((f"{camera}/camera_info", info or camera_info_for(image)))
        if depth:
            remaps.append((f"{camera}/depth/image", depth))
    return remaps


def dds_environment(profile: str, environ: Mapping[str, str]) -> Dict[str, str]:
    """Fast DDS profile variables for the node: `profile` unless the user set one (or gave '')."""
    if not profile.strip() or any(environ.get(v) for v in PROFILE_VARIABLES):
        return {}
    if not os.path.isfile(profile):
        raise LaunchArgumentError(f"dds_profile {profile!r} does not exist (give a Fast DDS XML file, "
                                  "or dds_profile:='' to keep the environment's settings)")
    if environ.get("ROS_DISTRO", "") in FAST_DDS_2_DISTROS:
        return {variable: profile for variable in PROFILE_VARIABLES}
    return {"FASTDDS_DEFAULT_PROFILES_FILE": profile}   # Fast DDS 3 warns that the FASTRTPS_ name is deprecated


def missing_packages(use_rviz: bool, package_exists: Callable[[str], bool]) -> Optional[str]:
    """One line naming what this launch needs but is not installed, or None."""
    if use_rviz and not package_exists("rviz2"):
        return ("use_rviz:=true but rviz2 is not installed (sudo apt install ros-$ROS_DISTRO-rviz2); "
                "nothing was started. Launch without use_rviz, or install it")
    return None


def ament_package_exists(name: str) -> bool:
    from ament_index_python.packages import PackageNotFoundError, get_package_prefix

    try:
        get_package_prefix(name)
    except PackageNotFoundError:
        return False
    return True
