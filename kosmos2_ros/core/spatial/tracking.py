"""Track ids for standing queries: the same id while a query's box moves smoothly, a new one on a jump.

Kosmos-2 grounds a referring expression afresh on every frame; it has no notion of identity.
A robot following "the red mug" still wants to know whether this frame's box is the same mug
as the last one. Between consecutive grounded frames a box that overlaps its predecessor
(IoU at least `min_iou`) or whose centre moved less than `max_center_shift` of its size keeps
the track id; anything else (the query landed on another object, or it was lost) starts a new
id. Pure Python, no ROS: the node keeps one `QueryTracker` per camera.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Sequence, Tuple

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
class _Track:
    track_id: int
    box: Box


class QueryTracker:
    """Track ids for one camera's standing queries, keyed by query text. Ids start at 1; 0 = not found."""

    def __init__(self, ids: Optional[Iterator[int]] = None, min_iou: float = MIN_IOU,
                 max_center_shift: float = MAX_CENTER_SHIFT) -> None:
        self._ids = ids if ids is not None else itertools.count(1)
        self._tracks: Dict[str, _Track] = {}
        self.min_iou = min_iou
        self.max_center_shift = max_center_shift

    def update(self, query: str, box: Optional[Box]) -> int:
        """The track id of `query`'s box on the next frame (None: not found there, and the track ends)."""
        if box is None:
            self._tracks.pop(query, None)
            return 0
        track = self._tracks.get(query)
        if track is None or not same_object(track.box, box, self.min_iou, self.max_center_shift):
            track = _Track(next(self._ids), box)
            self._tracks[query] = track
        track.box = box
        return track.track_id

    def keep_only(self, queries: Sequence[str]) -> None:
        """Forget tracks of queries no longer standing (a query set again later starts a new track)."""
        for query in list(self._tracks):
            if query not in queries:
                del self._tracks[query]
