"""Standing-query scheduling (core/standing.py): rate, newest frame only, no starvation, duty-cycle budget."""
from __future__ import annotations

import pytest

from kosmos2_ros.core.standing import QueryState, RateBudget, next_camera, worth_encoding_ahead


def state(*queries: str) -> QueryState:
    st = QueryState()
    st.set(tuple(queries))
    return st


def test_a_camera_without_queries_or_a_new_frame_is_never_chosen() -> None:
    idle, done = state(), state("the mug")
    done.last_stamp = 5
    assert next_camera([("a", idle, 7), ("b", done, 5), ("c", state("x"), None)], 2.0, 100.0) == (None, None)


def test_rate_is_honoured_and_the_wait_is_reported() -> None:
    st = state("the mug")
    st.last_stamp, st.last_run = 1, 100.0
    assert next_camera([("a", st, 2)], 2.0, 100.2) == (None, pytest.approx(0.3))
    assert next_camera([("a", st, 2)], 2.0, 100.5)[0] == "a"
    assert next_camera([("a", st, 2)], 0.0, 100.01)[0] == "a"     # 0 = as fast as the model allows


def test_no_camera_starves_another() -> None:
    """Served in turn: whichever due camera ran longest ago goes first, whatever the order given."""
    a, b = state("x"), state("y")
    served = []
    now = 0.0
    for stamp in range(1, 9):
        name, _ = next_camera([("a", a, stamp), ("b", b, stamp)], 0.0, now)
        chosen = a if name == "a" else b
        chosen.last_stamp, chosen.last_run = stamp, now
        served.append(name)
        now += 1.0
    assert served.count("a") == served.count("b") == 4


def test_replacing_queries_keeps_the_tracks_of_those_still_standing() -> None:
    st = state("the mug", "the cup")
    mug = st.tracker.update("the mug", (0, 0, 10, 10))
    cup = st.tracker.update("the cup", (50, 50, 60, 60))
    st.set(("the cup", "the plate"))
    assert st.queries == ("the cup", "the plate")
    assert st.tracker.update("the cup", (51, 50, 61, 60)) == cup
    assert st.tracker.update("the mug", (0, 0, 10, 10)) != mug       # dropped, then set again: a new track


def test_rate_budget() -> None:
    budget = RateBudget()
    assert budget.wait(0.0, 10.0) is None          # off
    assert budget.wait(4.0, 10.0) == 0.0
    budget.spend(10.0)
    assert abs(budget.wait(4.0, 10.1) - 0.15) < 1e-9
    assert budget.wait(4.0, 10.3) == 0.0


def test_encoding_ahead_only_when_it_can_finish_before_the_next_frame() -> None:
    assert worth_encoding_ahead(None, 4.0, 0.0) and worth_encoding_ahead(2.0, None, 0.0)   # not measured yet
    assert worth_encoding_ahead(2.0, 4.0, 1.0)           # done 1 s before the next frame
    assert not worth_encoding_ahead(2.0, 4.0, 2.5)       # the next frame comes first
    assert not worth_encoding_ahead(5.0, 4.0, 0.0)       # slower than the camera: never worth it
