"""Serve several robots' cameras from a GPU desktop: one grounding node per shard (config/robots.yaml).

    ros2 launch kosmos2_ros serve_robots.launch.py shards:=/path/to/robots.yaml \
        image_transport:=compressed depth_transport:=compressedDepth

Each shard is a node serving its cameras on one model, with camera_topics on: robot r1 sends commands
on r1/front/kosmos2/command and reads r1/front/kosmos2/result, whichever node serves r1/front. With
shards on several machines, run this launch on each with machine:=NAME (a shard naming no machine
starts wherever the launch runs). Everything is checked before anything starts: a camera served twice,
an unknown key or a bad parameter stops the launch with one line. docs/remote-serving.md explains the
network set-up (DDS discovery across machines, or rmw_zenoh over WiFi) and where tf2 runs.
"""
from __future__ import annotations

import os
import socket

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from kosmos2_ros.ros import launch_args, launch_shards

PACKAGE = "kosmos2_ros"
#: Launch arguments applied to every shard (empty: the params file's value).
COMMON_ARGUMENTS = ("model", "backend", "image_transport", "depth_transport", "queries", "query_rate_hz")


def _arguments(share: str) -> list:
    return [
        DeclareLaunchArgument("shards", default_value=os.path.join(share, "config", "robots.yaml"),
                              description="Shards file (or inline YAML): each node's name, machine, parameters "
                                          "and cameras with their driver topics"),
        DeclareLaunchArgument("machine", default_value=socket.gethostname(),
                              description="This machine's name: starts the shards naming it and those naming none"),
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of the nodes and their topics"),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "grounding.yaml"),
                              description="ROS parameters file for every node (a shard's parameters override it)"),
        DeclareLaunchArgument("model", default_value="", description="Checkpoint (empty: the params file's)"),
        DeclareLaunchArgument("backend", default_value="", description="Backend (empty: the params file's)"),
        DeclareLaunchArgument("image_transport", default_value="compressed",
                              description="raw | compressed: the colour topic read from each robot"),
        DeclareLaunchArgument("depth_transport", default_value="compressedDepth",
                              description="raw | compressedDepth: the depth topic read from each robot"),
        DeclareLaunchArgument("queries", default_value="", description="Standing queries on every camera"),
        DeclareLaunchArgument("query_rate_hz", default_value="", description="Standing-query frames per second"),
        DeclareLaunchArgument("dds_profile", default_value=os.path.join(share, "config", "fastdds_large_frames.xml"),
                              description="Fast DDS profile for the nodes; ignored when FASTDDS_DEFAULT_PROFILES_FILE "
                                          "is set; empty: none"),
        DeclareLaunchArgument("log_level", default_value="info", description="Logging level"),
    ]


def _actions(context) -> list:
    """Every shard checked, then this machine's nodes: all or nothing."""
    arg = {name: LaunchConfiguration(name).perform(context) for name in
           ("shards", "machine", "params_file", "dds_profile", *COMMON_ARGUMENTS)}
    shards = launch_shards.shards_here(launch_shards.parse_shards(arg["shards"]), arg["machine"])
    common = launch_args.parameter_overrides({name: arg[name] for name in COMMON_ARGUMENTS})
    env = launch_args.dds_environment(arg["dds_profile"], os.environ)
    return [Node(package=PACKAGE, executable="grounding_node", name=shard.name,
                 namespace=LaunchConfiguration("namespace"), output="screen", emulate_tty=True,
                 parameters=[arg["params_file"], shard.node_parameters(common)], remappings=shard.remappings,
                 additional_env=env, arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level")])
            for shard in shards]


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory(PACKAGE)
    return LaunchDescription(_arguments(share) + [OpaqueFunction(function=_actions)])
