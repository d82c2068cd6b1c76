"""What grounding.launch.py decides (kosmos2_ros/ros/launch_args.py), tested without ros2/launch."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kosmos2_ros.ros import launch_args
from kosmos2_ros.ros.launch_args import LaunchArgumentError
from kosmos2_ros.ros.topics import camera_info_for, compressed_for

ROOT = Path(__file__).resolve().parents[1]


def test_camera_info_is_the_image_topics_sibling() -> None:
    assert camera_info_for("/cam/color/image_raw") == "/cam/color/camera_info"
    assert camera_info_for("camera/image_raw") == "camera/camera_info"
    assert camera_info_for("/image") == "/camera_info"
    assert camera_info_for("image") == "camera_info"
    assert camera_info_for("/cam/image/") == "/cam/camera_info"
    assert compressed_for("/cam/image_raw") == "/cam/image_raw/compressed"


def test_remappings_default_to_relative_siblings() -> None:
    remaps = dict(launch_args.remappings("camera/image_raw", "", "camera/depth/image_raw"))
    assert remaps == {"image": "camera/image_raw", "camera_info": "camera/camera_info",
                      "depth/image": "camera/depth/image_raw"}
    assert dict(launch_args.remappings("/cam/image", "/other/info", ""))["camera_info"] == "/other/info"
    assert "depth/image" not in dict(launch_args.remappings("/cam/image", "", ""))


def test_each_camera_gets_its_driver_topics() -> None:
    realsense = {"cameras": "[front, wrist]",
                 "image_topics": "[/front/color/image_raw, /wrist/color/image_raw]",
                 "depth_topics": "[/front/aligned_depth_to_color/image_raw, /wrist/aligned_depth_to_color/image_raw]"}
    assert dict(launch_args.camera_remappings(realsense)) == {
        "front/image": "/front/color/image_raw", "front/camera_info": "/front/color/camera_info",
        "front/depth/image": "/front/aligned_depth_to_color/image_raw",
        "wrist/image": "/wrist/color/image_raw", "wrist/camera_info": "/wrist/color/camera_info",
        "wrist/depth/image": "/wrist/aligned_depth_to_color/image_raw"}
    # An empty item keeps that camera's defaults; camera_info_topics overrides the sibling.
    mixed = {"cameras": "[front, wrist]", "image_topics": '["", /w/image_rect]', "camera_info_topics": '["", /w/info]'}
    assert dict(launch_args.camera_remappings(mixed)) == {"wrist/image": "/w/image_rect", "wrist/camera_info": "/w/info"}
    assert launch_args.camera_remappings({"cameras": "[front, wrist]"}) == []
    assert launch_args.camera_remappings({}) == []


@pytest.mark.parametrize("arguments, message", [
    ({"image_topics": "[/a/image]"}, "no cameras are named"),
    ({"cameras": "[front, wrist]", "image_topics": "[/a/image]"}, "1 topics for 2 cameras"),
    ({"cameras": "[front]", "depth_topics": "[/a, /b]"}, "depth_topics has 2 topics for 1 cameras"),
    ({"cameras": "[front]", "image_topics": "[[/a]]"}, "must be a list of strings"),
])
def test_per_camera_topics_are_checked_before_anything_starts(arguments, message) -> None:
    with pytest.raises(LaunchArgumentError, match=message):
        launch_args.camera_remappings(arguments)


def test_parameter_overrides_only_given_arguments() -> None:
    assert launch_args.parameter_overrides({"model": "", "backend": " ", "autostart": "true"}) == {"autostart": True}
    assert launch_args.parameter_overrides({"model": "/m", "enable_3d": "0"}) == {"model": "/m", "enable_3d": False}
    with pytest.raises(LaunchArgumentError, match="use_compressed must be true or false"):
        launch_args.parameter_overrides({"use_compressed": "maybe"})


@pytest.mark.ros   # asks the real ament index
def test_missing_rviz_is_one_line_before_anything_starts() -> None:
    assert launch_args.missing_packages(False, lambda name: False) is None
    assert launch_args.missing_packages(True, lambda name: True) is None
    line = launch_args.missing_packages(True, lambda name: name != "rviz2")
    assert line is not None and "rviz2 is not installed" in line and "\n" not in line
    # On this machine rviz2 really is absent, and the real ament index says so.
    assert not launch_args.ament_package_exists("rviz2")
    assert launch_args.ament_package_exists("kosmos2_ros")


def test_dds_profile_applies_unless_the_user_set_one() -> None:
    profile = str(ROOT / "config" / "fastdds_large_frames.xml")
    assert launch_args.dds_environment(profile, {}) == {"FASTDDS_DEFAULT_PROFILES_FILE": profile}
    assert launch_args.dds_environment(profile, {"ROS_DISTRO": "humble"}) == {
        "FASTDDS_DEFAULT_PROFILES_FILE": profile, "FASTRTPS_DEFAULT_PROFILES_FILE": profile}
    assert launch_args.dds_environment(profile, {"FASTDDS_DEFAULT_PROFILES_FILE": "/mine.xml"}) == {}
    assert launch_args.dds_environment("", {}) == {}
    with pytest.raises(LaunchArgumentError, match="does not exist"):
        launch_args.dds_environment("/no/such/profile.xml", {})


@pytest.mark.parametrize("name", ["fastdds_large_frames.xml", "fastdds_large_frames_localhost.xml"])
def test_shipped_dds_profiles_are_well_formed(name: str) -> None:
    ns = {"d": "http://www.eprosima.com"}
    root = ET.parse(ROOT / "config" / name).getroot()
    segment = root.find(".//d:transport_descriptor[d:type='SHM']/d:segment_size", ns)
    assert segment is not None and int(segment.text) >= 8 * 1920 * 1080 * 3 // 2   # several 1080p frames
    whitelist = root.findall(".//d:interfaceWhiteList/d:address", ns)
    assert [a.text for a in whitelist] == (["127.0.0.1"] if "localhost" in name else [])
    participant = root.find(".//d:participant", ns)
    assert participant is not None and participant.get("is_default_profile") == "true"


def test_live_perception_arguments() -> None:
    out = launch_args.parameter_overrides({"cameras": "[front, wrist]", "queries": "[the red mug]",
                                           "query_rate_hz": "5", "encode_ahead_hz": ""})
    assert out == {"cameras": ["front", "wrist"], "queries": ["the red mug"], "query_rate_hz": 5.0}
    assert launch_args.parameter_overrides({"cameras": "front", "queries": "[ ]"}) == {"cameras": ["front"]}


def test_empty_lists_count_as_not_given() -> None:
    """`cameras:="[]"` / `queries:="[]"` keep the params file's value: launch_ros turns `[]` into `()` and refuses
    it as a parameter value, so no empty list may reach the Node action (nor an empty camera topic list)."""
    for name in launch_args.LIST_ARGUMENTS:
        assert launch_args.parameter_overrides({name: "[]"}) == {}
    given = {name: "[]" for name in launch_args.LIST_ARGUMENTS + launch_args.CAMERA_TOPIC_ARGUMENTS}
    assert not any(value == [] for value in launch_args.parameter_overrides(given).values())
    assert launch_args.camera_remappings(given) == []
    with pytest.raises(LaunchArgumentError, match="cameras must be a list of strings"):
        launch_args.parameter_overrides({"cameras": "[front, [wrist]]"})
    with pytest.raises(LaunchArgumentError, match="query_rate_hz must be a number"):
        launch_args.parameter_overrides({"query_rate_hz": "fast"})


def test_every_given_value_is_checked_before_anything_starts() -> None:
    """A camera listed twice, or any value the node would refuse, stops the launch with the node's reason."""
    with pytest.raises(LaunchArgumentError, match="launch argument: cameras: a name is listed twice"):
        launch_args.parameter_overrides({"cameras": "[front, front]"})
    with pytest.raises(LaunchArgumentError, match="launch argument: .*backend must be one of"):
        launch_args.parameter_overrides({"backend": "llama.cpp"})
    with pytest.raises(LaunchArgumentError, match="query_rate_hz"):
        launch_args.parameter_overrides({"query_rate_hz": "-3"})
