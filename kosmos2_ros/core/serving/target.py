"""The arm's target: which object of a result a planner may reach for, or why none.

The chosen object of an OK, unambiguous `refer` or `region` result whose geometry is valid (a region
command is how a planner answers "which one?"). Free of ROS: `ros/target.py` republishes it as the
messages MoveIt, GraspGen and FoundationPose take.
"""
from __future__ import annotations

from typing import Optional, Tuple

from .results import GroundedBox, Result, Status

#: Tasks whose result names one object to act on.
TARGET_TASKS = ("refer", "region")


def choose_target(res: Result) -> Tuple[Optional[GroundedBox], str]:
    """(the object to reach for, "") or (None, why this result names none)."""
    if res.status is not Status.OK:
        return None, f"the result is not OK ({res.status.name})"
    if res.task not in TARGET_TASKS:
        return None, f"a {res.task} result names no one object (refer or region does)"
    if res.ambiguous:
        return None, "ambiguous: ask which one, and send the chosen box back as a region command"
    if not res.objects:
        return None, res.not_found_reason or "no object"
    obj = res.objects[0]
    if obj.geometry is None or not obj.geometry.valid:
        return None, f"no geometry: {obj.geometry.error if obj.geometry is not None else 'not computed'}"
    return obj, ""
