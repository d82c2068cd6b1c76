"""Camera frames, their cached image encoding, and the small store the node keeps.

A frame is encoded (image processor + vision encoder) once; every command about it reuses
the embeddings and the shared prompt-prefix caches held here.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

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
    rgb: Optional[np.ndarray] = None  # H x W x 3 uint8, RGB; None until `pending` has run (a compressed frame)
    stamp_ns: int = 0
    frame_id: str = ""
    depth_m: Optional[np.ndarray] = None          # aligned depth in metres (NaN = invalid)
    intrinsics: Optional[CameraIntrinsics] = None
    received: float = field(default_factory=time.monotonic)
    encoding: Optional[FrameEncoding] = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # A compressed frame keeps its bytes and decodes them only when a command or a standing query needs it,
    # on the worker thread: a 1080p JPEG costs about 10 ms, and most frames that arrive are never used.
    pending: Optional[Callable[[], np.ndarray]] = field(default=None, repr=False)
    decode_error: str = ""                        # why `pending` failed ("" = not tried, or fine)
    depth_error: str = ""                         # why the depth paired with this frame could not be read

    def __post_init__(self) -> None:
        if self.rgb is None:
            if self.pending is None:
                raise ValueError("a frame needs pixels, or a decoder for its compressed pixels")
            return
        _check_pixels(self.rgb)

    def decode(self) -> str:
        """Decode pending pixels once; "" when the pixels are there, else why they never will be."""
        with self.lock:
            if self.rgb is None and not self.decode_error:
                try:
                    rgb = self.pending()  # type: ignore[misc]
                    _check_pixels(rgb)
                except Exception as exc:  # noqa: BLE001 - any decoder failure is the frame's, with its reason
                    self.decode_error = str(exc) or type(exc).__name__
                else:
                    self.rgb, self.pending = rgb, None
            return self.decode_error

    @property
    def width(self) -> int:
        return int(self._pixels().shape[1])

    @property
    def height(self) -> int:
        return int(self._pixels().shape[0])

    def _pixels(self) -> np.ndarray:
        if self.rgb is None:
            raise ValueError("the frame's compressed pixels were not decoded (Frame.decode)")
        return self.rgb


def _check_pixels(rgb: np.ndarray) -> None:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"a frame needs H x W x 3 uint8 pixels, got {rgb.shape} {rgb.dtype}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError("a frame needs a non-empty image")


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
