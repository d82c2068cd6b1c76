"""Standing-query scheduling (core/serving/standing.py): rate, newest frame only, no starvation, duty-cycle budget."""
from __future__ import annotations

import pytest

from kosmos2_ros.core.serving.standing import EncodeAhead, QueryState, RateBudget, next_camera, worth_encoding_ahead


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


def test_encode_ahead_paces_real_encodings(tiny_model_dir) -> None:
    """The oldest unprepared frame first, never one twice, within the rate; its duration measured."""
    import time

    import numpy as np

    from kosmos2_ros.core.serving.config import Kosmos2Config
    from kosmos2_ros.core.serving.frames import Frame
    from kosmos2_ros.core.serving.pipeline import Pipeline

    pipe = Pipeline.load(Kosmos2Config(model=str(tiny_model_dir), backend="torch", device="cpu", allow_download=False))
    rgb = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    now = time.monotonic()
    old, new = Frame(rgb=rgb, stamp_ns=1, received=now - 0.2), Frame(rgb=rgb, stamp_ns=2, received=now - 0.1)
    ahead = EncodeAhead()
    assert ahead.run(pipe, [(new, None), (old, None)], 0.0, now) is None          # rate 0: off
    assert ahead.run(pipe, [(new, None), (old, None)], 2.0, now) == 0.0
    assert old.encoding is not None and old.encoding.prefix_caches and new.encoding is None
    assert ahead.frames == 1 and ahead.encode_s is not None and ahead.encode_s > 0
    assert abs(ahead.run(pipe, [(new, None)], 2.0, now + 0.1) - 0.4) < 1e-9      # the budget: 1 frame per 0.5 s
    assert ahead.run(pipe, [(new, None)], 2.0, now + 0.5) == 0.0 and new.encoding.prefix_caches
    assert ahead.run(pipe, [(new, None), (old, None)], 2.0, now + 5.0) is None    # both prepared: nothing to do
    late = Frame(rgb=rgb, stamp_ns=3, received=now + 5.0 - 0.9)
    ahead.encode_s = 0.5
    assert ahead.run(pipe, [(late, 1.0)], 2.0, now + 5.0) is None                 # cannot finish before the next frame
    assert ahead.frames == 2 and late.encoding is None
