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
OVERRIDE_ARGUMENTS = ("model", "backend") + BOOL_ARGUMENTS + LIST_ARGUMENTS + FLOAT_ARGUMENTS
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
    """Only the arguments actually given override the parameters file (empty = keep it)."""
    out: Dict[str, object] = {}
    for name in OVERRIDE_ARGUMENTS:
        value = arguments.get(name, "").strip()
        if not value:
            continue
        if name in BOOL_ARGUMENTS:
            out[name] = parse_bool(name, value)
        elif name in LIST_ARGUMENTS:
            out[name] = parse_list(name, value)
        elif name in FLOAT_ARGUMENTS:
            out[name] = parse_float(name, value)
        else:
            out[name] = value
    try:   # each given value checked as the node will check it, before anything starts
        from kosmos2_ros.core.config import ConfigError, Kosmos2Config

        Kosmos2Config.from_dict(out)
    except ConfigError as exc:
        raise LaunchArgumentError(f"launch argument: {exc}") from None
    return out


def remappings(image_topic: str, camera_info_topic: str, depth_topic: str) -> List[Tuple[str, str]]:
    """The node's camera topics. camera_info defaults to the image topic's sibling and the
    compressed image follows the image (image_transport's convention, applied by the node)."""
    remaps = [("image", image_topic), ("camera_info", camera_info_topic.strip() or camera_info_for(image_topic))]
    if depth_topic.strip():
        remaps.append(("depth/image", depth_topic))
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
