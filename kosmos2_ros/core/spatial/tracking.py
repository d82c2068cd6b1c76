"""Track ids for standing queries: the same id while a query's box moves smoothly, a new one on a jump.

Kosmos-2 grounds a referring expression afresh on every frame; it has no notion of identity.
A robot following "the red mug" still wants to know whether this frame's box is the same mug
as the last one. Between consecutive grounded frames a box that overlaps its predecessor
(IoU at least `min_iou`) or whose centre moved less than `max_center_shift` of its size keeps
the track id; anything else (the query landed on another object) starts a new id.

**A track holds while the arm covers its object.** A frame on which the query is not found does
not end the track at once (that is exactly when the gripper reaches the object): for `hold_s`
seconds of image time the track stays, `occluded`, with what was last published for it and when
it was last seen; found again within the hold near where it was, it keeps its id. Each track also
fuses its object's geometry over frames (`fusion.PoseFusion`). Pure Python, no ROS: the node
keeps one `QueryTracker` per camera.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

from .fusion import PoseFusion

Box = Tuple[float, float, float, float]

#: Boxes overlapping at least this much continue a track.
MIN_IOU = 0.3
#: ... or whose centres moved less than this fraction of the previous box's diagonal.
MAX_CENTER_SHIFT = 0.5


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x_min, y_min, x_max, y_max) boxes; 0 for empty ones."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def same_object(prev: Box, new: Box, min_iou: float = MIN_IOU, max_center_shift: float = MAX_CENTER_SHIFT) -> bool:
    """Whether `new` continues the track whose last box was `prev` (a small, smooth move)."""
    if iou(prev, new) >= min_iou:
        return True
    diag = ((prev[2] - prev[0]) ** 2 + (prev[3] - prev[1]) ** 2) ** 0.5
    shift = (((new[0] + new[2]) - (prev[0] + prev[2])) ** 2 + ((new[1] + new[3]) - (prev[1] + prev[3])) ** 2) ** 0.5 / 2
    return diag > 0 and shift <= max_center_shift * diag


@dataclass
class Track:
    """One query's track: its id, last box, when it was last found, and what the node last published."""
    track_id: int
    box: Box
    last_seen_ns: int = 0
    occluded: bool = False              # not found on the latest frame, held (`hold_s`)
    fusion: PoseFusion = field(default_factory=PoseFusion)
    held: Any = None                    # what was last published for it (shown again while occluded)


class QueryTracker:
    """Track ids for one camera's standing queries, keyed by query text. Ids start at 1; 0 = not found."""

    def __init__(self, ids: Optional[Iterator[int]] = None, min_iou: float = MIN_IOU,
                 max_center_shift: float = MAX_CENTER_SHIFT, hold_s: float = 0.0) -> None:
        self._ids = ids if ids is not None else itertools.count(1)
        self._tracks: Dict[str, Track] = {}
        self.min_iou = min_iou
        self.max_center_shift = max_center_shift
        self.hold_s = hold_s

    def update(self, query: str, box: Optional[Box], stamp_ns: int = 0) -> int:
        """The track id of `query`'s box on the frame of `stamp_ns` (box None: not found there; the track
        is held, `occluded`, while its object was seen within `hold_s`, else it ends and 0 is returned)."""
        track = self._tracks.get(query)
        if box is None:
            if track is not None and self.hold_s > 0 and stamp_ns - track.last_seen_ns <= self.hold_s * 1e9:
                track.occluded = True
                return track.track_id
            self._tracks.pop(query, None)
            return 0
        if track is None or not same_object(track.box, box, self.min_iou, self.max_center_shift):
            track = Track(next(self._ids), box)
            self._tracks[query] = track
        track.box, track.last_seen_ns, track.occluded = box, stamp_ns, False
        return track.track_id

    def track(self, query: str) -> Optional[Track]:
        """The query's current track (None: none)."""
        return self._tracks.get(query)

    def keep_only(self, queries: Sequence[str]) -> None:
        """Forget tracks of queries no longer standing (a query set again later starts a new track)."""
        for query in list(self._tracks):
            if query not in queries:
                del self._tracks[query]
