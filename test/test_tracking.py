"""Track ids of standing queries (core/spatial/tracking.py): same id for a small move, new id for a jump."""
from __future__ import annotations

import itertools

import pytest

from kosmos2_ros.core.spatial.tracking import QueryTracker, iou, same_object


def test_iou() -> None:
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == pytest.approx(1.0)
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_same_object_for_small_moves_only() -> None:
    box = (100, 100, 140, 140)
    assert same_object(box, (104, 102, 144, 142))              # overlaps
    assert same_object((100, 100, 140, 140), (150, 100, 190, 140), max_center_shift=1.0)   # centre within a diagonal
    assert not same_object((100, 100, 104, 104), (106, 100, 110, 104))   # a small box moved more than half its size
    assert not same_object(box, (300, 300, 340, 340))          # a jump
    assert not same_object(box, (150, 100, 190, 140))          # beside it, no overlap, centre far


def test_tracker_keeps_the_id_while_the_box_moves_smoothly() -> None:
    tracker = QueryTracker(itertools.count(1))
    first = tracker.update("the mug", (100, 100, 140, 140))
    ids = [tracker.update("the mug", (100 + 3 * k, 100 + 2 * k, 140 + 3 * k, 140 + 2 * k)) for k in range(1, 20)]
    assert first >= 1 and set(ids) == {first}       # drifted 57 px in total, in small steps


def test_tracker_gives_a_new_id_on_a_jump_and_after_a_miss() -> None:
    tracker = QueryTracker(itertools.count(1))
    a = tracker.update("the mug", (10, 10, 50, 50))
    b = tracker.update("the mug", (200, 200, 240, 240))
    assert b != a
    assert tracker.update("the mug", None) == 0
    c = tracker.update("the mug", (200, 200, 240, 240))
    assert c not in (a, b)


def test_queries_have_their_own_tracks() -> None:
    tracker = QueryTracker(itertools.count(1))
    a = tracker.update("the mug", (10, 10, 50, 50))
    b = tracker.update("the cup", (10, 10, 50, 50))
    assert a != b
    tracker.keep_only(["the cup"])
    assert tracker.update("the cup", (12, 10, 52, 50)) == b
    assert tracker.update("the mug", (10, 10, 50, 50)) not in (a, b)
