"""Standing queries' Tracks messages (`ros/live.py` `LiveWork.tracks_message`) over a scripted run of
frames: a track holds, `occluded`, through 10 frames in which its object is hidden (the arm covers it),
keeps its id when the object reappears, and ends once the hold has passed; the found object's pose is
the track's fused one."""
from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace
from typing import List

import numpy as np
import pytest

from kosmos2_ros.core.serving.frames import Frame
from kosmos2_ros.core.serving.results import Result
from kosmos2_ros.core.serving.standing import QueryState
from kosmos2_ros.ros.convert import stamp_to_ns
from kosmos2_ros.ros.live import LiveWork

QUERY = "the box"
PERIOD_NS = 100_000_000          # 10 Hz


def _frames(result: Result, found: List[bool]):
    """(frame, result) per step: the object found, or an OK result without it (hidden)."""
    rgb = np.zeros((480, 640, 3), dtype=np.uint8)
    for k, seen in enumerate(found):
        stamp = 1_000_000_000 + k * PERIOD_NS
        res = copy.deepcopy(result)
        res.stamp_ns = stamp
        if not seen:
            res.objects = []
        yield Frame(rgb=rgb, stamp_ns=stamp, frame_id="cam_optical"), res


def _run(result: Result, found: List[bool], hold_s: float) -> list:
    cam = SimpleNamespace(name="front", standing=QueryState())
    cam.standing.set((QUERY,))
    return [LiveWork.tracks_message(cam, frame, (QUERY,), [res], hold_s).queries[0]
            for frame, res in _frames(result, found)]


def test_a_track_holds_while_its_object_is_hidden_and_keeps_its_id(result_with_geometry: Result) -> None:
    found = [True] * 5 + [False] * 10 + [True] * 3
    entries = _run(result_with_geometry, found, hold_s=2.0)
    track = entries[0].track_id
    assert track > 0 and all(e.track_id == track for e in entries)       # one id throughout
    hidden = entries[5:15]
    assert all(not e.found and e.occluded for e in hidden)
    assert all(stamp_to_ns(e.last_seen) == 1_000_000_000 + 4 * PERIOD_NS for e in hidden)   # frame 4: last found
    assert all(len(e.objects) == len(entries[4].objects) == 2 for e in hidden)   # what was last published
    last_found = entries[4].objects[0]
    assert hidden[-1].objects[0].pose == last_found.pose and hidden[-1].objects[0].geometry_valid
    back = entries[15]
    assert back.found and not back.occluded and stamp_to_ns(back.last_seen) == 1_000_000_000 + 15 * PERIOD_NS


def test_past_the_hold_the_track_ends_and_a_return_is_a_new_track(result_with_geometry: Result) -> None:
    found = [True] * 3 + [False] * 10 + [True]
    entries = _run(result_with_geometry, found, hold_s=0.5)           # 5 frames at 10 Hz
    first = entries[0].track_id
    assert [e.occluded for e in entries[3:13]] == [True] * 5 + [False] * 5
    assert all(e.track_id == 0 and not e.objects for e in entries[8:13])
    assert entries[13].found and entries[13].track_id not in (0, first)
    without_hold = _run(result_with_geometry, [True, False, True], hold_s=0.0)
    assert without_hold[1].track_id == 0 and not without_hold[1].occluded
    assert without_hold[2].track_id != without_hold[0].track_id


def test_the_published_pose_is_the_tracks_fused_one(result_with_geometry: Result) -> None:
    """Two observations of the same object, the second moved 2 cm: the published centre is their median."""
    res = result_with_geometry
    moved = copy.deepcopy(res)
    geo = moved.objects[0].geometry
    moved.objects[0].geometry = dataclasses.replace(geo, center=geo.center + np.array([0.02, 0.0, 0.0]))
    cam = SimpleNamespace(name="front", standing=QueryState())
    cam.standing.set((QUERY,))
    rgb = np.zeros((480, 640, 3), dtype=np.uint8)
    LiveWork.tracks_message(cam, Frame(rgb=rgb, stamp_ns=1, frame_id="cam_optical"), (QUERY,), [res], 2.0)
    entry = LiveWork.tracks_message(cam, Frame(rgb=rgb, stamp_ns=2, frame_id="cam_optical"), (QUERY,), [moved],
                                    2.0).queries[0]
    p = entry.objects[0].pose.position
    assert p.x == pytest.approx(geo.center[0] + 0.01, abs=1e-9) and p.z == pytest.approx(geo.center[2], abs=1e-9)
