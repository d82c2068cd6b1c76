"""Start the Kosmos-2 grounding node (and optionally RViz).

    ros2 launch kosmos2_ros grounding.launch.py image_topic:=/camera/color/image_raw \
        camera_info_topic:=/camera/color/camera_info depth_topic:=/camera/aligned_depth_to_color/image_raw

The node reads config/grounding.yaml (or params_file); the model, backend, use_compressed,
enable_3d and autostart arguments override it when given (an empty value keeps the YAML's).
"""
from __future__ import annotations

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

PACKAGE = "kosmos2_ros"


def _arguments(share: str) -> list:
    return [
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node and its topics"),
        DeclareLaunchArgument("image_topic", default_value="/camera/image_raw",
                              description="sensor_msgs/Image colour topic (remapped to the node's `image`); "
                                          "its /compressed sibling is read when use_compressed is true"),
        DeclareLaunchArgument("camera_info_topic", default_value="/camera/camera_info",
                              description="sensor_msgs/CameraInfo of the colour camera (for 3D points)"),
        DeclareLaunchArgument("depth_topic", default_value="/camera/depth/image_raw",
                              description="Depth aligned to the colour image: 16UC1 millimetres or 32FC1 metres"),
        DeclareLaunchArgument("use_compressed", default_value="",
                              description="true: also subscribe to <image_topic>/compressed (empty: the YAML's value)"),
        DeclareLaunchArgument("enable_3d", default_value="",
                              description="true: 3D point per box from depth + camera_info (empty: the YAML's value)"),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "grounding.yaml"),
                              description="ROS parameters file for the node"),
        DeclareLaunchArgument("model", default_value="",
                              description="Hub id or local directory of the checkpoint (empty: the YAML's value)"),
        DeclareLaunchArgument("backend", default_value="",
                              description="torch | onnxruntime | tensorrt (empty: the YAML's value)"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="Configure and activate the lifecycle node on start-up"),
        DeclareLaunchArgument("use_rviz", default_value="false",
                              description="Start RViz2 with config/grounding.rviz"),
        DeclareLaunchArgument("log_level", default_value="info",
                              description="Logging level: debug, info, warn, error, fatal"),
    ]


def _overrides(context) -> dict:
    """Only the arguments actually given override the YAML (an empty string means: keep it)."""
    out = {}
    for name in ("model", "backend", "use_compressed", "enable_3d", "autostart"):
        value = LaunchConfiguration(name).perform(context).strip()
        if not value:
            continue
        if name in ("use_compressed", "enable_3d", "autostart"):
            lowered = value.lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError(f"launch argument {name} must be true or false, got {value!r}")
            out[name] = lowered in ("true", "1")
        else:
            out[name] = value
    return out


def _node(context, *_args, **_kwargs) -> list:
    image = LaunchConfiguration("image_topic").perform(context)
    remaps = [
        ("image", image),
        ("image/compressed", image.rstrip("/") + "/compressed"),
        ("camera_info", LaunchConfiguration("camera_info_topic").perform(context)),
        ("depth/image", LaunchConfiguration("depth_topic").perform(context)),
    ]
    node = Node(
        package=PACKAGE,
        executable="grounding_node",
        name="kosmos2",
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        emulate_tty=True,
        parameters=[LaunchConfiguration("params_file"), _overrides(context)],
        remappings=remaps,
        arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level")],
    )
    return [node]


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory(PACKAGE)
    rviz = Node(
        package="rviz2",
        executable="rviz2",
        name="kosmos2_rviz",
        arguments=["-d", os.path.join(share, "config", "grounding.rviz")],
        condition=IfCondition(LaunchConfiguration("use_rviz")),
        output="log",
    )
    return LaunchDescription(_arguments(share) + [OpaqueFunction(function=_node), rviz])
