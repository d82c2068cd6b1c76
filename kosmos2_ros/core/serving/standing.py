"""Standing queries and idle work: which camera the model grounds next, and when.

Pure Python (no ROS, no model): the node's worker asks `next_camera` whenever no one-shot
command waits, so commands always go first. Each camera's standing queries run at most at
`query_rate_hz` on its newest frame only (a frame already grounded is never grounded again,
frames in between are skipped); among the cameras that are due, the one served longest ago
goes first, so no camera starves another. `EncodeAhead` paces encoding ahead: `RateBudget`
bounds its duty cycle, and `worth_encoding_ahead` skips it when it could not finish before the
next frame.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

from ..model.tasks import MARKED
from ..spatial.tracking import QueryTracker

_TRACK_IDS: Iterator[int] = itertools.count(1)   # track ids unique across the node's cameras


@dataclass
class QueryState:
    """One camera's standing queries (and yes/no checks) and where they stand."""
    queries: Tuple[str, ...] = ()
    checks: Tuple[str, ...] = ()
    tracker: QueryTracker = field(default_factory=lambda: QueryTracker(_TRACK_IDS))
    last_stamp: Optional[int] = None        # the last frame grounded (never the same one twice)
    last_run: float = float("-inf")         # monotonic time that grounding started
    published: int = 0

    def set(self, queries: Tuple[str, ...]) -> None:
        """Replace the queries (the `queries` parameter for every camera, or the service for one:
        the latest wins). Tracks of queries still standing keep their ids."""
        self.queries = tuple(queries)
        self.tracker.keep_only(self.queries)

    def set_checks(self, checks: Tuple[str, ...]) -> None:
        """Replace the standing yes/no checks (as `set`: the latest wins)."""
        self.checks = tuple(checks)

    @property
    def standing(self) -> bool:
        """Whether there is anything to ask on each frame."""
        return bool(self.queries or self.checks)

    def forget_frames(self) -> None:
        self.last_stamp = None
        self.last_run = float("-inf")


def asked_about(check: str, queries: Sequence[str]) -> str:
    """The standing query a check is asked about: its [bracketed] phrase when that is one of `queries`
    (case and spaces aside); "" = the whole image."""
    found = MARKED.search(check)
    if found is None:
        return ""
    phrase = " ".join(found.group(1).split()).lower()
    return next((q for q in queries if " ".join(q.split()).lower() == phrase), "")


def next_camera(cameras: Sequence[Tuple[str, QueryState, Optional[int]]], rate_hz: float,
                now: float) -> Tuple[Optional[str], Optional[float]]:
    """(camera to ground now, None) or (None, seconds until one is due; None = nothing to wait for).

    `cameras`: (name, state, stamp of its newest usable frame or None). A camera is a candidate
    when it has queries or checks and a frame it has not grounded yet; it is due once 1/rate_hz passed
    since its last run (rate 0: at once). The due camera served longest ago wins.
    """
    period = 1.0 / rate_hz if rate_hz > 0 else 0.0
    due, waits = [], []
    for name, state, stamp in cameras:
        if not state.standing or stamp is None or stamp == state.last_stamp:
            continue
        left = state.last_run + period - now
        if left <= 0:
            due.append((state.last_run, name))
        else:
            waits.append(left)
    if due:
        return min(due)[1], None
    return None, (min(waits) if waits else None)


def worth_encoding_ahead(encode_s: Optional[float], interval_s: Optional[float], age_s: float) -> bool:
    """Whether encoding a frame `age_s` old ahead can finish before the camera's next frame.

    Work that a newer frame supersedes before it ends is wasted, and a command arriving
    meanwhile would wait for it and then pay the full cost anyway (seen on a loaded CPU). Unknown
    duration or frame interval: yes (the first encoding measures it).
    """
    if encode_s is None or interval_s is None:
        return True
    return encode_s < interval_s - age_s


class RateBudget:
    """At most `rate_hz` events per second (0 = none): a bound on a duty cycle."""

    def __init__(self) -> None:
        self._last = float("-inf")

    def wait(self, rate_hz: float, now: float) -> Optional[float]:
        """Seconds until the next event is allowed (0 = now); None when the rate is 0 (off)."""
        if rate_hz <= 0:
            return None
        return max(0.0, self._last + 1.0 / rate_hz - now)

    def spend(self, now: float) -> None:
        self._last = now


class EncodeAhead:
    """Encoding ahead, paced: at most `rate_hz` frames a second, each a frame not prepared yet
    that can be finished before its camera's next frame (by the measured, smoothed duration).

    The node's idle work (`ros.live`) and the live-perception benchmark both run it.
    """

    def __init__(self) -> None:
        self.budget = RateBudget()
        self.encode_s: Optional[float] = None     # smoothed duration of one frame's encoding ahead
        self.frames = 0                           # frames encoded ahead so far

    def run(self, pipeline: Any, frames: Sequence[Tuple[Any, Optional[float]]], rate_hz: float,
            now: float, ready: Callable[[Any], bool] = lambda frame: True) -> Optional[float]:
        """Encode the oldest wanted frame of `frames` ((frame, its camera's frame interval or None))
        if the budget allows: 0.0 after one was encoded, else seconds until the budget allows one,
        None when no frame is wanted or the rate is 0. `ready` prepares the chosen frame alone (decodes
        compressed pixels; False: it would not decode, nothing is encoded)."""
        todo = [f for f, interval_s in frames
                if (f.encoding is None or not f.encoding.prefix_caches)
                and worth_encoding_ahead(self.encode_s, interval_s, now - f.received)]
        if not todo:
            return None
        wait = self.budget.wait(rate_hz, now)
        if wait != 0.0:
            return wait
        self.budget.spend(now)
        chosen = min(todo, key=lambda f: f.received)
        if not ready(chosen):
            return 0.0
        self.frames += pipeline.encode_ahead([chosen])
        took = time.monotonic() - now
        self.encode_s = took if self.encode_s is None else 0.7 * self.encode_s + 0.3 * took
        return 0.0
