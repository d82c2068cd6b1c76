"""Start the Kosmos-2 grounding node (and optionally RViz).

    ros2 launch kosmos2_ros grounding.launch.py image_topic:=/camera/color/image_raw \
        depth_topic:=/camera/aligned_depth_to_color/image_raw

camera_info is read from the image topic's sibling (`/camera/color/camera_info` above) unless
camera_info_topic is given. Several cameras get their driver topics the same way, one per camera:

    ros2 launch kosmos2_ros grounding.launch.py cameras:="[front, wrist]" \
        image_topics:="[/front/color/image_raw, /wrist/color/image_raw]" \
        depth_topics:="[/front/aligned_depth_to_color/image_raw, /wrist/aligned_depth_to_color/image_raw]"

Topic defaults are relative, so `namespace:=robot1` moves them too.
The node reads config/grounding.yaml (or params_file); the model, backend, use_compressed,
image_transport, depth_transport, enable_3d and autostart arguments override it when given (an empty value keeps the YAML's).
Everything is checked before anything starts: a missing rviz2 or a bad argument stops the
launch with one line, and no node is left running.
"""
from __future__ import annotations

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from kosmos2_ros.ros import launch_args

PACKAGE = "kosmos2_ros"


def _arguments(share: str) -> list:
    return [
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node and its topics"),
        DeclareLaunchArgument("image_topic", default_value="camera/image_raw",
                              description="sensor_msgs/Image colour topic (remapped to the node's `image`); "
                                          "its /compressed child is read when use_compressed is true"),
        DeclareLaunchArgument("camera_info_topic", default_value="",
                              description="sensor_msgs/CameraInfo of the colour camera, for 3D points "
                                          "(empty: the image topic's sibling camera_info)"),
        DeclareLaunchArgument("depth_topic", default_value="camera/depth/image_raw",
                              description="Depth aligned to the colour image: 16UC1 millimetres or 32FC1 metres"),
        DeclareLaunchArgument("use_compressed", default_value="",
                              description="true: also subscribe to <image_topic>/compressed (empty: the YAML's value)"),
        DeclareLaunchArgument("image_transport", default_value="",
                              description="raw | compressed: read only <image_topic>/compressed, as over WiFi "
                                          "(empty: the YAML's value)"),
        DeclareLaunchArgument("depth_transport", default_value="",
                              description="raw | compressedDepth: read only <depth_topic>/compressedDepth "
                                          "(empty: the YAML's value)"),
        DeclareLaunchArgument("enable_3d", default_value="",
                              description="true: 3D point per box from depth + camera_info (empty: the YAML's value)"),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "grounding.yaml"),
                              description="ROS parameters file for the node"),
        DeclareLaunchArgument("model", default_value="",
                              description="Hub id or local directory of the checkpoint (empty: the YAML's value)"),
        DeclareLaunchArgument("backend", default_value="",
                              description="auto | tensorrt | onnxruntime | torch (empty: the YAML's value)"),
        DeclareLaunchArgument("image_topics", default_value="",
                              description="Per camera, in the order of cameras: its driver's colour topic, e.g. "
                                          "\"[/front/color/image_raw, /wrist/color/image_raw]\" (camera_info: "
                                          "each one's sibling; empty: <camera>/image)"),
        DeclareLaunchArgument("depth_topics", default_value="",
                              description="Per camera, in the order of cameras: its aligned depth topic, e.g. "
                                          "\"[/front/aligned_depth_to_color/image_raw, /wrist/aligned_depth_to_color/"
                                          "image_raw]\" (empty: <camera>/depth/image)"),
        DeclareLaunchArgument("camera_info_topics", default_value="",
                              description="Per camera, in the order of cameras: its CameraInfo topic "
                                          "(empty: the sibling of its image topic)"),
        DeclareLaunchArgument("cameras", default_value="",
                              description="Cameras served by the one model, e.g. \"[front, wrist]\": topics front/image, "
                                          "front/camera_info, front/depth/image, ... unless image_topics / "
                                          "depth_topics name each camera's driver topics; "
                                          "image_topic, camera_info_topic and depth_topic apply with no cameras "
                                          "(empty or []: the YAML's value)"),
        DeclareLaunchArgument("queries", default_value="",
                              description="Standing referring expressions on every camera, e.g. \"[the red mug]\", "
                                          "published on ~/tracks (empty or []: the YAML's value)"),
        DeclareLaunchArgument("query_rate_hz", default_value="",
                              description="Most standing-query frames per second per camera; 0 = as fast as the "
                                          "model allows (empty: the YAML's value)"),
        DeclareLaunchArgument("encode_ahead_hz", default_value="",
                              description="Most frames per second encoded ahead while idle; 0 = off "
                                          "(empty: the YAML's value)"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="Configure and activate the lifecycle node on start-up"),
        DeclareLaunchArgument("dds_profile", default_value=os.path.join(share, "config", "fastdds_large_frames.xml"),
                              description="Fast DDS profile for the node (large frames); ignored when "
                                          "FASTDDS_DEFAULT_PROFILES_FILE is set; empty: none"),
        DeclareLaunchArgument("use_rviz", default_value="false",
                              description="Start RViz2 with config/grounding.rviz"),
        DeclareLaunchArgument("log_level", default_value="info",
                              description="Logging level: debug, info, warn, error, fatal"),
    ]


def _actions(context, share: str) -> list:
    """Validate every argument, then return the node (and RViz): all or nothing."""
    arg = {name: LaunchConfiguration(name).perform(context) for name in
           ("image_topic", "camera_info_topic", "depth_topic", "dds_profile", "use_rviz", "params_file",
            *launch_args.CAMERA_TOPIC_ARGUMENTS, *launch_args.OVERRIDE_ARGUMENTS)}
    use_rviz = launch_args.parse_bool("use_rviz", arg["use_rviz"])
    problem = launch_args.missing_packages(use_rviz, launch_args.ament_package_exists)
    if problem:
        raise launch_args.LaunchArgumentError(problem)
    actions = [Node(
        package=PACKAGE,
        executable="grounding_node",
        name="kosmos2",
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        emulate_tty=True,
        parameters=[arg["params_file"], launch_args.parameter_overrides(arg)],
        remappings=(launch_args.remappings(arg["image_topic"], arg["camera_info_topic"], arg["depth_topic"])
                    + launch_args.camera_remappings(arg)),
        additional_env=launch_args.dds_environment(arg["dds_profile"], os.environ),
        arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level")],
    )]
    if use_rviz:
        actions.append(Node(package="rviz2", executable="rviz2", name="kosmos2_rviz", output="log",
                            arguments=["-d", os.path.join(share, "config", "grounding.rviz")]))
    return actions


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory(PACKAGE)
    return LaunchDescription(_arguments(share) + [OpaqueFunction(function=_actions, args=[share])])
