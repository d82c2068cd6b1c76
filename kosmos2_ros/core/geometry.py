"""Boxes between the model's input image and source pixels; depth + intrinsics to 3D points.

Kosmos-2 predicts boxes on the image its processor made (resized, maybe centre-cropped), so
mapping back to the camera's pixels must undo exactly what the processor did. The processor's
own settings (`size`, `do_center_crop`, `crop_size`) decide the mapping.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from .grounding import Box


@dataclass(frozen=True)
class InputGeometry:
    """Where the model's input image sits in source pixels: a window (x, y, w, h) of the source.

    A plain resize to a fixed size sees the whole image (0, 0, W, H); shortest-edge resize plus
    centre crop sees a centred window.
    """
    src_width: int
    src_height: int
    win_x: float
    win_y: float
    win_w: float
    win_h: float

    @classmethod
    def from_processor(cls, image_processor: Any, width: int, height: int) -> InputGeometry:
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        size = dict(getattr(image_processor, "size", None) or {})
        do_resize = bool(getattr(image_processor, "do_resize", True))
        do_crop = bool(getattr(image_processor, "do_center_crop", False))
        crop = dict(getattr(image_processor, "crop_size", None) or {})
        # Size of the image after the resize step, in resized pixels.
        if not do_resize:
            rw, rh = float(width), float(height)
        elif "height" in size and "width" in size:
            rw, rh = float(size["width"]), float(size["height"])
        elif "shortest_edge" in size:
            short = float(size["shortest_edge"])
            # transformers rounds the long side with int(); keep its arithmetic.
            if width <= height:
                rw, rh = short, float(int(short * height / width))
            else:
                rw, rh = float(int(short * width / height)), short
        else:
            raise ValueError(f"unsupported image processor size {size!r}")
        sx, sy = width / rw, height / rh  # source pixels per resized pixel
        if do_crop and "height" in crop and "width" in crop:
            cw, ch = float(crop["width"]), float(crop["height"])
            # transformers' center_crop: top = (h - ch) // 2 (integers), may pad when smaller.
            top = (rh - ch) // 2
            left = (rw - cw) // 2
            return cls(width, height, left * sx, top * sy, cw * sx, ch * sy)
        return cls(width, height, 0.0, 0.0, float(width), float(height))

    def to_pixels(self, box_norm: Sequence[float], clip: bool = True) -> Box:
        x0, y0, x1, y1 = box_norm
        px = (self.win_x + x0 * self.win_w, self.win_y + y0 * self.win_h,
              self.win_x + x1 * self.win_w, self.win_y + y1 * self.win_h)
        if not clip:
            return px
        return (min(max(px[0], 0.0), self.src_width), min(max(px[1], 0.0), self.src_height),
                min(max(px[2], 0.0), self.src_width), min(max(px[3], 0.0), self.src_height))

    def to_normalized(self, box_px: Sequence[float]) -> Box:
        """A pixel box -> normalised model-input coordinates, clipped to what the model sees."""
        x0, y0, x1, y1 = (float(v) for v in box_px)
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            raise ValueError("region coordinates must be finite numbers")
        if x1 < x0:
            x0, x1 = x1, x0
        if y1 < y0:
            y0, y1 = y1, y0

        def clamp(v: float) -> float:
            return min(max(v, 0.0), 1.0)

        return (clamp((x0 - self.win_x) / self.win_w), clamp((y0 - self.win_y) / self.win_h),
                clamp((x1 - self.win_x) / self.win_w), clamp((y1 - self.win_y) / self.win_h))


@dataclass(frozen=True)
class CameraIntrinsics:
    fx: float
    fy: float
    cx: float
    cy: float
    width: int = 0
    height: int = 0

    @classmethod
    def from_k(cls, k: Sequence[float], width: int = 0, height: int = 0) -> CameraIntrinsics:
        return cls(float(k[0]), float(k[4]), float(k[2]), float(k[5]), width, height)

    def valid(self) -> bool:
        return self.fx > 0 and self.fy > 0 and all(math.isfinite(v) for v in (self.fx, self.fy, self.cx, self.cy))


def depth_to_meters(depth: np.ndarray, encoding: str) -> np.ndarray:
    """16UC1 millimetres or 32FC1 metres -> float32 metres, invalid readings as NaN."""
    if encoding in ("16UC1", "mono16"):
        out = depth.astype(np.float32) / 1000.0
        out[depth == 0] = np.nan
        return out
    if encoding == "32FC1":
        out = depth.astype(np.float32, copy=True)
        out[~np.isfinite(out) | (out <= 0)] = np.nan
        return out
    raise ValueError(f"unsupported depth encoding {encoding!r}; expected 16UC1 (mm) or 32FC1 (m)")


def box_point_3d(box_px: Sequence[float], depth_m: np.ndarray, intrinsics: CameraIntrinsics,
                 inner_fraction: float = 0.5, min_depth: float = 0.05,
                 max_depth: float = 20.0) -> Optional[Tuple[float, float, float]]:
    """3D point (camera optical frame, metres) for a box: the median depth of its central part,
    back-projected through the box centre. None when there is no valid depth there.

    The depth image must be aligned with the colour image; when its size differs, the box is
    scaled to it.
    """
    if not intrinsics.valid():
        return None
    h, w = depth_m.shape[:2]
    x0, y0, x1, y1 = box_px
    sx = w / intrinsics.width if intrinsics.width else 1.0
    sy = h / intrinsics.height if intrinsics.height else 1.0
    cx_box, cy_box = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    hw, hh = (x1 - x0) * inner_fraction / 2.0, (y1 - y0) * inner_fraction / 2.0
    c0 = int(max(0, math.floor((cx_box - hw) * sx)))
    c1 = int(min(w, math.ceil((cx_box + hw) * sx)))
    r0 = int(max(0, math.floor((cy_box - hh) * sy)))
    r1 = int(min(h, math.ceil((cy_box + hh) * sy)))
    if c1 <= c0 or r1 <= r0:
        return None
    patch = depth_m[r0:r1, c0:c1]
    patch = patch[np.isfinite(patch) & (patch >= min_depth) & (patch <= max_depth)]
    if patch.size == 0:
        return None
    z = float(np.median(patch))
    x = (cx_box - intrinsics.cx) * z / intrinsics.fx
    y = (cy_box - intrinsics.cy) * z / intrinsics.fy
    return (x, y, z)
