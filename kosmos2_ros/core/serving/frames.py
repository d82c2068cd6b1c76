"""Camera frames, their cached image encoding, and the small store the node keeps.

A frame is encoded (image processor + vision encoder) once; every command about it reuses
the embeddings and the shared prompt-prefix caches held here.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..spatial.geometry import CameraIntrinsics, InputGeometry


@dataclass
class FrameEncoding:
    pixel_values: np.ndarray
    image_embeds: Any                 # backend-native
    geometry: InputGeometry
    encode_ms: float
    prefix_caches: Dict[Tuple[int, ...], Any] = field(default_factory=dict)


@dataclass
class Frame:
    rgb: np.ndarray                   # H x W x 3 uint8, RGB
    stamp_ns: int = 0
    frame_id: str = ""
    depth_m: Optional[np.ndarray] = None          # aligned depth in metres (NaN = invalid)
    intrinsics: Optional[CameraIntrinsics] = None
    received: float = field(default_factory=time.monotonic)
    encoding: Optional[FrameEncoding] = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.rgb.ndim != 3 or self.rgb.shape[2] != 3 or self.rgb.dtype != np.uint8:
            raise ValueError(f"a frame needs H x W x 3 uint8 pixels, got {self.rgb.shape} {self.rgb.dtype}")
        if self.rgb.shape[0] == 0 or self.rgb.shape[1] == 0:
            raise ValueError("a frame needs a non-empty image")

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


class FrameUnavailable(Exception):
    """No frame fits a command; `status` says why (no_frame or stale_frame)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


class FrameStore:
    """The newest frames, by stamp. Thread-safe; holding a few lets a command name its frame."""

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = max(1, capacity)
        self._frames: OrderedDict[int, Frame] = OrderedDict()
        self._newest: Optional[Frame] = None
        self._lock = threading.Lock()
        self.received = 0
        self.replaced_unused = 0   # frames dropped before any command used them
        self.interval_s: Optional[float] = None   # smoothed time between frames (None: fewer than two yet)
        self._last_put: Optional[float] = None

    def put(self, frame: Frame) -> None:
        with self._lock:
            self.received += 1
            if self._last_put is not None:
                gap = frame.received - self._last_put
                self.interval_s = gap if self.interval_s is None else 0.8 * self.interval_s + 0.2 * gap
            self._last_put = frame.received
            if self._newest is not None and self._newest.encoding is None:
                self.replaced_unused += 1
            self._frames[frame.stamp_ns] = frame
            self._frames.move_to_end(frame.stamp_ns)
            while len(self._frames) > self.capacity:
                self._frames.popitem(last=False)
            self._newest = frame

    def clear(self) -> None:
        with self._lock:
            self._frames.clear()
            self._newest = None
            self.interval_s, self._last_put = None, None

    def newest(self) -> Optional[Frame]:
        with self._lock:
            return self._newest

    def select(self, stamp_ns: int = 0, max_age_s: float = 0.0, now: Optional[float] = None) -> Frame:
        """The frame with `stamp_ns` (0: the newest), or FrameUnavailable."""
        with self._lock:
            if self._newest is None:
                raise FrameUnavailable("no_frame", "no image received yet")
            if stamp_ns:
                frame = self._frames.get(stamp_ns)
                if frame is None:
                    raise FrameUnavailable("no_frame", f"no cached frame with stamp {stamp_ns} ns "
                                           f"(the last {len(self._frames)} frames are kept)")
                return frame
            frame = self._newest
        age = (time.monotonic() if now is None else now) - frame.received
        if max_age_s > 0 and age > max_age_s:
            raise FrameUnavailable("stale_frame", f"newest frame is {age:.2f} s old (max_frame_age_s={max_age_s})")
        return frame
