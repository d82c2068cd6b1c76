"""A tracked object's geometry fused over frames, so its pose does not jump with depth noise.

A standing query sees the same object on every frame, and each frame's geometry carries that
frame's noise: the footprint's yaw of a box can flip by 15-20 degrees on one noisy frame in
four, changing its size and grasp width with it. `PoseFusion` keeps a track's last observations
(in one fixed frame: `target_frame`, or the camera's while the camera does not move) and
publishes their robust estimate: the median centre, and for an object standing on a plane the
median yaw about the plane's normal modulo the footprint's 90-degree symmetry (sizes swapped with
it), the median size, and the grasp rebuilt from them as `object_geometry` builds it. Objects
without a plane keep their own rotation; their centre and size are fused. An observation far from
the estimate (`JUMP_M`, or a quarter of the object's size) means the object was moved (or the query
landed on another one): the estimate starts over from it, so a moved object is followed at once.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import replace
from typing import Deque, Optional, Tuple

import numpy as np

from .object_geometry import ObjectGeometry

#: Observations a fused estimate is the median of.
WINDOW = 9
#: The footprint's symmetry: a rectangle turned by a quarter turn is the same rectangle, sizes swapped.
PERIOD = math.pi / 2
#: An observation's centre this far (metres) from the estimate, or a quarter of its size if more, starts over.
JUMP_M = 0.03


def _yaw(rotation: np.ndarray, normal: np.ndarray, ref_x: np.ndarray) -> float:
    """The box's x axis's angle about `normal`, from `ref_x` (a fixed direction in the plane)."""
    ref_y = np.cross(normal, ref_x)
    x = rotation[:, 0]
    return math.atan2(float(x @ ref_y), float(x @ ref_x))


def _wrap(yaw: float, ref: float) -> Tuple[float, bool]:
    """`yaw` moved by quarter turns to within 45 degrees of `ref`; whether the sizes swap with it."""
    turns = round((yaw - ref) / PERIOD)
    return yaw - turns * PERIOD, turns % 2 == 1


class PoseFusion:
    """One track's fused geometry; `add` each frame's, in one frame (`frame_id`: a change starts over)."""

    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self._reset("")

    def _reset(self, frame_id: str) -> None:
        self.frame_id = frame_id
        self._seen: Deque[Tuple[np.ndarray, np.ndarray, float]] = deque(maxlen=self.window)   # centre, size, yaw
        self._normal: Optional[np.ndarray] = None     # the plane's normal and a direction in it, fixed at the start
        self._ref_x: Optional[np.ndarray] = None
        self._yaw_ref = 0.0

    def add(self, geo: ObjectGeometry, frame_id: str) -> ObjectGeometry:
        """This frame's geometry -> the fused estimate to publish (the same geometry where it is not valid)."""
        if not geo.valid or geo.center is None or geo.size is None or geo.rotation is None:
            return geo
        standing = geo.plane is not None
        centre_now = np.asarray(geo.center, dtype=np.float64)
        jump = max(JUMP_M, 0.25 * float(np.max(geo.size)))
        if frame_id != self.frame_id or (self._seen and standing != (self._normal is not None)) or \
                (self._seen and np.linalg.norm(centre_now - self._estimate()) > jump):
            self._reset(frame_id)        # another frame, lost or found its plane, or moved: start over
        size = np.asarray(geo.size, dtype=np.float64).copy()
        yaw = 0.0
        if standing:
            normal = geo.rotation[:, 2] / np.linalg.norm(geo.rotation[:, 2])
            if self._normal is None:
                self._normal, self._ref_x = normal, geo.rotation[:, 0].copy()
                self._yaw_ref = 0.0
            yaw, swap = _wrap(_yaw(geo.rotation, self._normal, self._ref_x), self._yaw_ref)
            if swap:
                size[[0, 1]] = size[[1, 0]]
        self._seen.append((centre_now, size, yaw))
        centre = self._estimate()
        fused_size = np.median(np.stack([s for _, s, _ in self._seen]), axis=0)
        if not standing:
            return replace(geo, center=centre, size=fused_size)
        fused_yaw = float(np.median([y for _, _, y in self._seen]))
        self._yaw_ref = fused_yaw
        return self._standing(geo, centre, fused_size, fused_yaw)

    def _estimate(self) -> np.ndarray:
        """The median centre of the observations kept."""
        return np.median(np.stack([c for c, _, _ in self._seen]), axis=0)

    def _standing(self, geo: ObjectGeometry, centre: np.ndarray, size: np.ndarray, yaw: float) -> ObjectGeometry:
        """The fused box and its grasp, built as `object_geometry._standing_box` builds them."""
        n = self._normal
        ref_y = np.cross(n, self._ref_x)
        u = math.cos(yaw) * self._ref_x + math.sin(yaw) * ref_y
        u -= (u @ n) * n
        u /= np.linalg.norm(u)
        v = np.cross(n, u)
        rotation = np.stack([u, v, n], axis=1)
        top = centre + (size[2] / 2.0) * n
        closing = u if size[0] <= size[1] else v
        approach = -n
        grasp = np.stack([np.cross(closing, approach), closing, approach], axis=1)
        return replace(geo, center=centre, rotation=rotation, size=size, grasp_position=top, grasp_rotation=grasp,
                       grasp_width=float(min(size[0], size[1])))
