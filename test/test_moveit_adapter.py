"""The target as a MoveIt collision object (`ros/moveit_adapter.py`): moveit_msgs is not on PyPI, so what the
message holds is checked here (a box of the target's size at its pose; ADD for a new id, then MOVE), and a
node asked for it without moveit_msgs names what to install."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from kosmos2_ros.core.serving.config import Kosmos2Config
from kosmos2_ros.ros.moveit_adapter import ADD, BOX, MOVE, MOVEIT_MISSING, collision_object_fields, collision_objects_or_none

POSE = {"position": {"x": 0.4, "y": -0.1, "z": 0.05}, "orientation": {"x": 0.0, "y": 0.0, "z": 0.38, "w": 0.92}}
SIZE = {"x": 0.09, "y": 0.07, "z": 0.11}


def test_a_new_object_is_added_as_a_box_and_then_moved() -> None:
    known: set = set()
    first = collision_object_fields("cmd-1", None, POSE, SIZE, known)
    assert first["id"] == "cmd-1" and first["operation"] == ADD
    assert first["primitives"] == [{"type": BOX, "dimensions": [0.09, 0.07, 0.11]}]
    assert first["primitive_poses"] == [POSE] and first["pose"] == POSE
    again = collision_object_fields("cmd-1", None, POSE, SIZE, known)
    assert again["operation"] == MOVE and "primitives" not in again        # MOVE changes the pose only
    assert collision_object_fields("cmd-2", None, POSE, SIZE, known)["operation"] == ADD


def test_off_by_default_and_without_moveit_msgs_says_what_to_install(monkeypatch) -> None:
    assert collision_objects_or_none(SimpleNamespace(), Kosmos2Config(model="x")) is None
    monkeypatch.setitem(sys.modules, "moveit_msgs", None)
    monkeypatch.setitem(sys.modules, "moveit_msgs.msg", None)
    with pytest.raises(ImportError, match="apt install ros-\\$ROS_DISTRO-moveit-msgs"):
        collision_objects_or_none(SimpleNamespace(), Kosmos2Config(model="x", collision_object=True))
    assert "collision_object is true but moveit_msgs is not importable" in MOVEIT_MISSING
