"""What serve_robots.launch.py decides: which nodes (shards) start here and which cameras each serves.

Plain functions (no launch import), tested like launch_args. One GPU desktop serving several
robots runs one shard; when one GPU is not enough, the cameras are split over shards, each its own
node (on its own GPU, or its own machine). A robot never needs to know which: every shard turns
camera_topics on, so a camera's commands and results live under the camera's own name
(`r1/front/kosmos2/command`, `.../result`), whichever node serves it.

The shards file (YAML, or the same inline):

    shards:
      - name: kosmos2_gpu0              # node name (default kosmos2_<index>); unique
        machine: gpu-desktop            # start only where machine:=gpu-desktop ("" or absent: everywhere)
        parameters: {device: "cuda:0"}  # this node's own parameters, over the params file's
        cameras:
          - name: r1/front              # the camera's name (its topics' namespace on the node)
            image: /r1/camera/color/image_raw                   # its driver's topics (optional: a bare
            depth: /r1/camera/aligned_depth_to_color/image_raw  # name reads <name>/image, ...)
            target_frame: r1/base_link  # its robot's frame for poses and grasps (optional: target_frame)
          - r2/front
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Tuple

from .launch_args import LaunchArgumentError, camera_topic_remappings

#: A camera entry's keys and the per-camera lists they fill (the launch file's topic lists, target_frames).
CAMERA_KEYS = {"image": "image_topics", "depth": "depth_topics", "camera_info": "camera_info_topics",
               "target_frame": "target_frames"}
SHARD_KEYS = ("name", "machine", "parameters", "cameras")
#: Set by the launch file for every shard: these are not a shard's to choose.
FIXED_PARAMETERS = ("cameras", "camera_topics", "target_frames")


@dataclass
class Shard:
    name: str
    cameras: List[str]
    remappings: List[Tuple[str, str]]
    machine: str = ""
    parameters: Dict[str, Any] = field(default_factory=dict)
    target_frames: List[str] = field(default_factory=list)     # per camera; empty: none set

    def node_parameters(self, common: Mapping[str, Any]) -> Dict[str, Any]:
        """The node's parameter overrides: the launch's common ones, the shard's own, its cameras."""
        frames = {"target_frames": list(self.target_frames)} if self.target_frames else {}
        return {**common, **self.parameters, "cameras": list(self.cameras), "camera_topics": True, **frames}


def read_shards(text: str) -> Dict[str, Any]:
    """The shards YAML: a file's path, or the YAML itself."""
    import yaml

    source = text.strip()
    if not source:
        raise LaunchArgumentError("launch argument shards is empty: give a shards file or inline YAML "
                                  "(config/robots.yaml is an example)")
    if not source.startswith(("{", "[")) and (os.path.isfile(source) or source.endswith((".yaml", ".yml"))):
        try:
            with open(source) as handle:
                source = handle.read()
        except OSError as exc:
            raise LaunchArgumentError(f"cannot read shards file {text!r}: {exc}") from None
    try:
        data = yaml.safe_load(source)
    except yaml.YAMLError as exc:
        raise LaunchArgumentError(f"shards is not valid YAML: {exc}") from None
    if isinstance(data, list):
        data = {"shards": data}
    if not isinstance(data, dict) or not isinstance(data.get("shards"), list) or not data["shards"]:
        raise LaunchArgumentError("shards must be a list of shards (each with cameras), or a mapping with one")
    return data


def parse_shards(text: str) -> List[Shard]:
    """Every shard, checked before anything starts: names unique, each camera served once, parameters
    valid as the node checks them."""
    shards = [_shard(i, entry) for i, entry in enumerate(read_shards(text)["shards"])]
    seen_names: Dict[str, int] = {}
    served_by: Dict[str, str] = {}
    for shard in shards:
        if shard.name in seen_names:
            raise LaunchArgumentError(f"two shards are named {shard.name!r}: node names must be unique")
        seen_names[shard.name] = 1
        for camera in shard.cameras:
            if camera in served_by:
                raise LaunchArgumentError(f"camera {camera!r} is served by shards {served_by[camera]!r} and "
                                          f"{shard.name!r}: each camera by one node, or its commands would be "
                                          "answered twice")
            served_by[camera] = shard.name
    return shards


def _shard(index: int, entry: Any) -> Shard:
    if not isinstance(entry, dict):
        raise LaunchArgumentError(f"shard {index} must be a mapping with cameras, got {entry!r}")
    unknown = sorted(set(entry) - set(SHARD_KEYS))
    if unknown:
        raise LaunchArgumentError(f"shard {index}: unknown keys {unknown}; a shard has {list(SHARD_KEYS)}")
    name = str(entry.get("name") or f"kosmos2_{index}")
    cameras, lists = _cameras(name, entry.get("cameras"))
    frames = lists.pop("target_frames")
    parameters = entry.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise LaunchArgumentError(f"shard {name!r}: parameters must be a mapping, got {parameters!r}")
    fixed = sorted(set(parameters) & set(FIXED_PARAMETERS))
    if fixed:
        raise LaunchArgumentError(f"shard {name!r}: {fixed} are set from its cameras, not in parameters")
    from kosmos2_ros.core.serving.config import ConfigError, Kosmos2Config

    try:
        problem = Kosmos2Config.from_dict({**parameters, "cameras": cameras, "camera_topics": True,
                                           "target_frames": frames}).configure_problem()
    except ConfigError as exc:
        problem = str(exc)
    if problem:
        raise LaunchArgumentError(f"shard {name!r}: {problem}")
    return Shard(name=name, cameras=cameras, remappings=camera_topic_remappings(cameras, lists),
                 machine=str(entry.get("machine") or ""), parameters=dict(parameters), target_frames=frames)


def _cameras(shard: str, entries: Any) -> Tuple[List[str], Dict[str, List[str]]]:
    """Camera names and their per-camera lists (as the launch file's image_topics, ..., and target_frames)."""
    if not isinstance(entries, list) or not entries:
        raise LaunchArgumentError(f"shard {shard!r} needs a list of cameras")
    names: List[str] = []
    lists: Dict[str, List[str]] = {arg: [] for arg in CAMERA_KEYS.values()}
    for entry in entries:
        spec = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise LaunchArgumentError(f"shard {shard!r}: a camera is a name or a mapping with name, got {entry!r}")
        unknown = sorted(set(spec) - {"name", *CAMERA_KEYS})
        if unknown:
            raise LaunchArgumentError(f"shard {shard!r}, camera {spec['name']!r}: unknown keys {unknown}; "
                                      f"a camera has name, {', '.join(CAMERA_KEYS)}")
        names.append(spec["name"])
        for key, arg in CAMERA_KEYS.items():
            lists[arg].append(str(spec.get(key) or ""))
    return names, {arg: topics if any(topics) else [] for arg, topics in lists.items()}


def shards_here(shards: List[Shard], machine: str) -> List[Shard]:
    """The shards this machine starts: those naming it, and those naming none."""
    here = [s for s in shards if not s.machine or s.machine == machine]
    if not here:
        machines = sorted({s.machine for s in shards})
        raise LaunchArgumentError(f"no shard runs on machine {machine!r}; the shards name {machines} "
                                  "(set machine:=NAME)")
    return here


def shard_of(shards: List[Shard], camera: str) -> Shard:
    """The shard serving `camera` (what the launch file arranges: a camera's commands reach its node)."""
    for shard in shards:
        if camera in shard.cameras:
            return shard
    raise LaunchArgumentError(f"no shard serves camera {camera!r}")
