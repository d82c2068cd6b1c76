"""The target as a MoveIt planning-scene object: the one place that imports moveit_msgs.

moveit_msgs is not on PyPI (CI cannot have it): `collision_object_fields` (what the message holds: a
box primitive of the target's size at its pose, ADD the first time an id is seen and MOVE after) is
plain Python and tested here; `CollisionObjects` only fills a moveit_msgs/CollisionObject from it.
MoveIt Task Constructor needs that object id in the planning scene to attach and pick it.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Set

from kosmos2_ros.core.serving.config import Kosmos2Config

#: moveit_msgs/CollisionObject.operation and shape_msgs/SolidPrimitive.type values (their .msg constants).
ADD, MOVE = 0, 3
BOX = 1
#: What configure says when collision_object is on and moveit_msgs is missing.
MOVEIT_MISSING = ("collision_object is true but moveit_msgs is not importable: install it "
                  "(apt install ros-$ROS_DISTRO-moveit-msgs) or set collision_object: false")


def collision_object_fields(object_id: str, header: Any, pose: Dict[str, Any], size: Dict[str, float],
                            known: Set[str]) -> Dict[str, Any]:
    """The CollisionObject's fields (a description `convert.fill` sets): ADD for a new id (remembered in
    `known`), MOVE for one MoveIt has (only its pose changes)."""
    first = object_id not in known
    known.add(object_id)
    out: Dict[str, Any] = {"id": object_id, "operation": ADD if first else MOVE,
                           "primitive_poses": [pose], "pose": pose}
    if first:
        out["primitives"] = [{"type": BOX, "dimensions": [float(size["x"]), float(size["y"]), float(size["z"])]}]
    return out


class CollisionObjects:
    """Publishes moveit_msgs/CollisionObject (raises ImportError without moveit_msgs)."""

    def __init__(self, node: Any, topic: str) -> None:
        from moveit_msgs.msg import CollisionObject
        from shape_msgs.msg import SolidPrimitive

        from . import convert

        self._message, self._primitive, self._fill = CollisionObject, SolidPrimitive, convert.fill
        self._publisher = node.create_publisher(CollisionObject, topic, 10)
        self._known: Set[str] = set()

    def publish(self, object_id: str, header: Any, pose: Dict[str, Any], size: Dict[str, float]) -> None:
        fields = collision_object_fields(object_id, header, pose, size, self._known)
        msg = self._message(header=header, id=fields["id"], operation=fields["operation"])
        self._fill(msg, {"pose": fields["pose"]})
        msg.primitive_poses = [self._fill(type(msg.pose)(), p) for p in fields["primitive_poses"]]
        msg.primitives = [self._primitive(type=p["type"], dimensions=p["dimensions"])
                          for p in fields.get("primitives", [])]
        self._publisher.publish(msg)


def collision_objects_or_none(node: Any, config: Kosmos2Config) -> Optional[CollisionObjects]:
    """The node's collision-object publisher where asked for; ImportError (MOVEIT_MISSING) without moveit_msgs."""
    if not config.collision_object:
        return None
    try:
        return CollisionObjects(node, config.collision_object_topic)
    except ImportError:
        raise ImportError(MOVEIT_MISSING) from None
