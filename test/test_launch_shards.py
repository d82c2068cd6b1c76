"""serve_robots.launch.py's decisions: the shards file read and checked before anything starts,
which shards a machine starts, and which node serves a camera (its commands reach it by name)."""
from __future__ import annotations

from pathlib import Path

import pytest

from kosmos2_ros.ros.launch_args import LaunchArgumentError
from kosmos2_ros.ros.launch_shards import parse_shards, shard_of, shards_here
from kosmos2_ros.ros.topics import camera_interface

ROOT = Path(__file__).resolve().parents[1]

TWO_GPUS = """
shards:
  - name: kosmos2_gpu0
    parameters: {device: "cuda:0"}
    cameras:
      - {name: r1/front, image: /r1/camera/color/image_raw, depth: /r1/camera/aligned_depth_to_color/image_raw,
         target_frame: r1/base_link}
      - r2/front
  - machine: desk2
    parameters: {device: "cuda:1", backend: torch}
    cameras: [{name: r3/wrist, image: /r3/wrist/color/image_rect, camera_info: /r3/wrist/info}]
"""


def test_each_shard_is_a_node_with_its_cameras_and_their_driver_topics() -> None:
    gpu0, second = parse_shards(TWO_GPUS)
    assert (gpu0.name, gpu0.machine, gpu0.cameras) == ("kosmos2_gpu0", "", ["r1/front", "r2/front"])
    assert second.name == "kosmos2_1" and second.machine == "desk2"    # unnamed: by its index
    assert gpu0.remappings == [("r1/front/image", "/r1/camera/color/image_raw"),
                               ("r1/front/camera_info", "/r1/camera/color/camera_info"),   # the image's sibling
                               ("r1/front/depth/image", "/r1/camera/aligned_depth_to_color/image_raw")]
    assert second.remappings == [("r3/wrist/image", "/r3/wrist/color/image_rect"),
                                 ("r3/wrist/camera_info", "/r3/wrist/info")]
    params = gpu0.node_parameters({"model": "m", "image_transport": "compressed", "device": "cpu"})
    assert params == {"model": "m", "image_transport": "compressed", "device": "cuda:0",     # the shard's own wins
                      "cameras": ["r1/front", "r2/front"], "camera_topics": True,
                      "target_frames": ["r1/base_link", ""]}                                  # "": target_frame
    assert "target_frames" not in second.node_parameters({})


def test_a_camera_reaches_the_node_serving_it_by_its_own_topic_names() -> None:
    shards = parse_shards(TWO_GPUS)
    assert shard_of(shards, "r3/wrist").name == "kosmos2_1"
    assert shard_of(shards, "r2/front").name == "kosmos2_gpu0"
    assert camera_interface("r3/wrist", "command") == "r3/wrist/kosmos2/command"   # the same on any shard
    with pytest.raises(LaunchArgumentError, match="no shard serves camera 'r9/front'"):
        shard_of(shards, "r9/front")


def test_a_machine_starts_its_shards_and_those_naming_none() -> None:
    shards = parse_shards(TWO_GPUS)
    assert [s.name for s in shards_here(shards, "desk1")] == ["kosmos2_gpu0"]
    assert [s.name for s in shards_here(shards, "desk2")] == ["kosmos2_gpu0", "kosmos2_1"]
    only_named = parse_shards("[{machine: a, cameras: [c1]}, {machine: b, cameras: [c2]}]")
    with pytest.raises(LaunchArgumentError, match=r"no shard runs on machine 'c'; the shards name \['a', 'b'\]"):
        shards_here(only_named, "c")


@pytest.mark.parametrize("text, message", [
    ("[{cameras: [r1/front]}, {cameras: [r2/front, r1/front]}]", "camera 'r1/front' is served by shards"),
    ("[{name: a, cameras: [c1]}, {name: a, cameras: [c2]}]", "two shards are named 'a'"),
    ("[{cameras: []}]", "needs a list of cameras"),
    ("[{cameras: [c1], gpu: 1}]", "unknown keys \\['gpu'\\]"),
    ("[{cameras: [{name: c1, colour: /x}]}]", "unknown keys \\['colour'\\]"),
    ("[{cameras: [{image: /x}]}]", "a camera is a name or a mapping with name"),
    ("[{cameras: [c1], parameters: {device: gpu}}]", "shard 'kosmos2_0': device must be"),
    ("[{cameras: [c1], parameters: {cameras: [c2]}}]", "are set from its cameras"),
    ("[{cameras: [c1], parameters: {target_frames: [a]}}]", "are set from its cameras"),
    ("[{cameras: [{name: c1, target_frame: base link}]}]", "may not hold spaces"),
    ("[{cameras: [1bad]}]", "not a relative topic name"),
    ("[]", "must be a list of shards"),
    ("shards: [", "not valid YAML"),
    ("", "shards is empty"),
    ("/nonexistent/robots.yaml", "cannot read shards file"),
])
def test_a_bad_shards_file_stops_the_launch_with_one_line(text: str, message: str) -> None:
    with pytest.raises(LaunchArgumentError, match=message):
        parse_shards(text)


def test_the_shipped_example_serves_two_robots_from_one_gpu() -> None:
    (shard,) = parse_shards(str(ROOT / "config" / "robots.yaml"))
    assert shard.cameras == ["r1/front", "r2/front"] and shard.parameters == {"device": "cuda:0"}
    assert shard.target_frames == ["r1/base_link", "r2/base_link"]
    assert ("r2/front/depth/image", "/r2/camera/aligned_depth_to_color/image_raw") in shard.remappings
