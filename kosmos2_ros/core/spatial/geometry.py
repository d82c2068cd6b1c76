"""Boxes between the model's input image and source pixels; depth + intrinsics to 3D points.

Kosmos-2 predicts boxes on the image its processor made (resized, maybe centre-cropped), so
mapping back to the camera's pixels must undo exactly what the processor did. The processor's
own settings (`size`, `do_center_crop`, `crop_size`) decide the mapping.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from ..model.grounding import Box


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
    """A camera's projection, as its camera_info gives it for the image topic the node reads.

    Rectified images (`image_rect*`) use P, whose image has no distortion; raw images use K with
    their distortion D, and pixel coordinates are undistorted (OpenCV) before they are back-projected.
    """
    fx: float
    fy: float
    cx: float
    cy: float
    width: int = 0
    height: int = 0
    distortion: Tuple[float, ...] = ()     # D of a raw image, in camera_info's order; () or zeros = none
    distortion_model: str = "plumb_bob"    # camera_info's model: plumb_bob / rational_polynomial, equidistant
    matrix: str = "K"                      # which camera_info matrix the numbers come from: K or P

    @classmethod
    def from_k(cls, k: Sequence[float], width: int = 0, height: int = 0, distortion: Sequence[float] = (),
               distortion_model: str = "plumb_bob") -> CameraIntrinsics:
        return cls(float(k[0]), float(k[4]), float(k[2]), float(k[5]), width, height,
                   tuple(float(v) for v in distortion), distortion_model or "plumb_bob", "K")

    @classmethod
    def from_p(cls, p: Sequence[float], width: int = 0, height: int = 0) -> CameraIntrinsics:
        return cls(float(p[0]), float(p[5]), float(p[2]), float(p[6]), width, height, (), "plumb_bob", "P")

    def valid(self) -> bool:
        return self.fx > 0 and self.fy > 0 and all(math.isfinite(v) for v in (self.fx, self.fy, self.cx, self.cy))

    @property
    def distorted(self) -> bool:
        return any(v != 0.0 for v in self.distortion)

    def scaled(self, width: int, height: int) -> CameraIntrinsics:
        """The same camera for an image of another size than camera_info's (D does not change with scale)."""
        if not self.width or not self.height or (self.width, self.height) == (width, height):
            return self
        sx, sy = width / self.width, height / self.height
        return replace(self, fx=self.fx * sx, fy=self.fy * sy, cx=self.cx * sx, cy=self.cy * sy,
                       width=width, height=height)

    def normalized(self, u: Any, v: Any) -> Tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates -> (x/z, y/z) of their rays, undistorted with D where the image is raw."""
        u, v = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
        if not self.distorted:
            return (u - self.cx) / self.fx, (v - self.cy) / self.fy
        import cv2

        pts = np.stack([u.ravel(), v.ravel()], axis=-1).reshape(-1, 1, 2)
        k = np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])
        d = np.asarray(self.distortion, dtype=np.float64)
        if self.distortion_model == "equidistant":
            out = cv2.fisheye.undistortPoints(pts, k, d[:4])
        else:   # plumb_bob (5) and rational_polynomial (8): OpenCV's own coefficient order
            out = cv2.undistortPoints(pts, k, d)
        out = out.reshape(-1, 2)
        return out[:, 0].reshape(u.shape), out[:, 1].reshape(v.shape)


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


#: The box's centre is "far behind" its nearer surface when its depth exceeds that surface's by
#: more than this (metres), or this fraction of the surface's depth, whichever is larger: the centre
#: then sees the background through or past the object (a mug's handle, a thin or hollow object).
FOREGROUND_GAP_M = 0.10
FOREGROUND_GAP_FRACTION = 0.15
#: The nearer surface must cover this fraction of the box's valid depth to be taken as the object
#: (the 10th percentile defines it, so a smaller share would always pass).
MIN_FOREGROUND_FRACTION = 0.30


def box_point_3d(box_px: Sequence[float], depth_m: np.ndarray, intrinsics: CameraIntrinsics,
                 inner_fraction: float = 0.5, min_depth: float = 0.05, max_depth: float = 20.0,
                 image_size: Optional[Tuple[int, int]] = None) -> Tuple[Optional[Tuple[float, float, float]], str]:
    """(3D point in the camera optical frame (metres), "") for a box, or (None, why there is none).

    The point is the median depth of the box's central part, back-projected through the box centre;
    where that depth lies far behind a nearer surface that covers enough of the box, it is the
    background seen past the object, and the nearer surface (its median depth, through its pixels'
    centre) is the point instead. `box_px` is in the colour image's pixels (`image_size`: its width
    and height; default camera_info's size): camera_info is scaled to it, as `object_geometry` does,
    and the aligned depth image may have another size (the box is scaled to it). Boxes are continuous
    (pixel i spans [i, i + 1)) while camera_info's K puts pixel i's centre at i (OpenCV's convention),
    so a point at continuous x is back-projected at x - 0.5.
    """
    if not intrinsics.valid():
        return None, "camera_info has no valid intrinsics"
    h, w = depth_m.shape[:2]
    x0, y0, x1, y1 = box_px
    width, height = image_size or (intrinsics.width or w, intrinsics.height or h)
    k = intrinsics.scaled(int(width), int(height))
    sx, sy = w / width, h / height

    def window(fraction: float) -> Tuple[int, int, int, int]:
        cx_box, cy_box = (x0 + x1) / 2.0, (y0 + y1) / 2.0
        hw, hh = (x1 - x0) * fraction / 2.0, (y1 - y0) * fraction / 2.0
        return (int(max(0, math.floor((cx_box - hw) * sx))), int(max(0, math.floor((cy_box - hh) * sy))),
                int(min(w, math.ceil((cx_box + hw) * sx))), int(min(h, math.ceil((cy_box + hh) * sy))))

    c0, r0, c1, r1 = window(inner_fraction)
    if c1 <= c0 or r1 <= r0:
        return None, "the box is empty or outside the depth image"
    usable = lambda d: np.isfinite(d) & (d >= min_depth) & (d <= max_depth)  # noqa: E731
    patch = depth_m[r0:r1, c0:c1]
    patch = patch[usable(patch)]
    if patch.size == 0:
        return None, (f"no valid depth at the box's centre (none in [{min_depth:g}, {max_depth:g}] m of "
                      f"{(r1 - r0) * (c1 - c0)} pixels)")
    z = float(np.median(patch))
    u, v = (x0 + x1) / 2.0, (y0 + y1) / 2.0        # continuous colour pixels
    b0, q0, b1, q1 = window(1.0)
    whole = depth_m[q0:q1, b0:b1]
    ok = usable(whole)
    if ok.any():
        near = float(np.percentile(whole[ok], 10))
        gap = max(FOREGROUND_GAP_M, FOREGROUND_GAP_FRACTION * near)
        front = ok & (whole <= near + gap)
        if z - near > gap and front.sum() >= MIN_FOREGROUND_FRACTION * ok.sum():
            rows, cols = np.nonzero(front)
            z = float(np.median(whole[front]))
            u, v = (b0 + cols.mean() + 0.5) / sx, (q0 + rows.mean() + 0.5) / sy
    xn, yn = k.normalized(u - 0.5, v - 0.5)
    return (float(xn) * z, float(yn) * z, z), ""
