"""A grounded box + aligned RGB-D -> what a grasp planner takes: mask, tight box, 3D box, grasp, cloud.

Kosmos-2's box is snapped to a 32x32 grid of its input (20x15 px cells on 640x480), so each edge
can be off by half a cell or more, and a loose box holds table and background. The object is
found inside a search window one grid cell larger than the box on every side:

1. **Support plane**: RANSAC over the window's points outside the box's centre (the table around
   the object), refined by least squares; kept only if the object stands on it (its lowest
   points lie within a few noise widths of the plane).
2. **Mask**: points above the plane (or, without one, in the depth layer of the box's centre),
   cut at depth discontinuities (touching and occluding objects separate there), cleaned by a
   morphological opening; the connected component that covers the box's centre most; depth
   holes inside it and next to it of the object's colour (Lab distance) joined. So colour and
   depth decide together, and a partly occluded or cut-off object keeps the pixels it shows.
3. **3D box**: with a plane, gravity-aligned through its normal, yawed to the footprint's
   minimum-area rectangle; its centre under the top surface's centre (for boxes, cylinders and
   spheres standing on a plane the top's centre is above the footprint's), its half-extents the
   points' robust (98th percentile) reach from there, so a hidden back side is mirrored from
   the visible front and a few stray points cannot grow it. Without a plane: principal axes of
   the points, robust extents.
**Cost bounded by points, not pixels.** A window of more than `max_window_px` pixels (a loose box
on a large image) is examined every `step`-th pixel in each direction (the sample at each block's
centre), so steps 1-3 see at most that many pixels whatever the box's size; the mask is then made
full-resolution again only along its edge (a band `step` pixels wide either side, each pixel
judged by the same depth, plane and colour rules), and the 3D box comes from the sampled points.
A window within the limit is examined whole, as before.

4. **Grasp**: at the top surface's centre; approach along the plane's normal (down onto the
   object), else along the viewing ray; closing across the narrower side, opening = that width.
   Pose convention: **z approaches** (points from the gripper into the object), **y closes**
   (the fingers move along it), x = y x z.

OpenCV does the image work (morphology, connected components, Lab colour, the minimum-area
rectangle); the plane is a small vectorised RANSAC in numpy (Open3D's `segment_plane` would do
the same, but Open3D is a ~300 MB wheel with no Python 3.10 build for JetPack, for ~20 lines).
Everything is in the camera's optical frame; `ObjectGeometry.transformed` moves it to another.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Tuple

import numpy as np

from .geometry import CameraIntrinsics

#: Depth noise model used for thresholds: sigma(z) = DEPTH_NOISE_K * z^2 (a D435-class camera).
DEPTH_NOISE_K = 0.0025


@dataclass(frozen=True)
class GeometryConfig:
    margin_cells: float = 1.0          # search window: the box grown by this many grid cells per side
    min_height_m: float = 0.008        # points this far above the plane (or 3 sigma, if more) are object
    plane_iterations: int = 120
    min_points: int = 20
    max_points: int = 20000            # points an object's box and cloud are computed from (a random subset beyond)
    max_window_px: int = 30000         # pixels the search window is examined at (a larger one is sampled; see above)
    min_depth_m: float = 0.05
    max_depth_m: float = 20.0
    seed: int = 0


@dataclass
class ObjectGeometry:
    """One object's geometry, camera optical frame (metres), or why there is none."""
    valid: bool
    error: str = ""
    mask: Optional[np.ndarray] = None           # bool, the colour image's full size
    box_refined: Optional[Tuple[float, float, float, float]] = None   # tight pixel box of the mask
    center: Optional[np.ndarray] = None         # 3D box centre
    rotation: Optional[np.ndarray] = None       # 3 x 3, columns: the box's axes (z = the plane's normal)
    size: Optional[np.ndarray] = None           # extents along those axes
    grasp_position: Optional[np.ndarray] = None
    grasp_rotation: Optional[np.ndarray] = None  # columns x, y (closing), z (approach)
    grasp_width: float = 0.0
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.float32))
    colors: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.uint8))
    plane: Optional[np.ndarray] = None          # (nx, ny, nz, d): n . p + d = 0, n towards the camera
    frame_id: str = ""

    @classmethod
    def invalid(cls, why: str) -> ObjectGeometry:
        return cls(False, why)

    def transformed(self, rotation: np.ndarray, translation: np.ndarray, frame_id: str) -> ObjectGeometry:
        """The same geometry in another frame: p' = rot p + t (mask and pixel box unchanged)."""
        if not self.valid:
            return replace(self, frame_id=frame_id)
        rot, t = np.asarray(rotation, float), np.asarray(translation, float)

        def point(p: Optional[np.ndarray]) -> Optional[np.ndarray]:
            return None if p is None else rot @ p + t

        plane = None
        if self.plane is not None:
            n = rot @ self.plane[:3]
            plane = np.concatenate([n, [self.plane[3] - n @ t]])
        return replace(self, center=point(self.center), rotation=rot @ self.rotation,
                       grasp_position=point(self.grasp_position), grasp_rotation=rot @ self.grasp_rotation,
                       points=(self.points @ rot.T + t).astype(np.float32), plane=plane, frame_id=frame_id)


def rotation_matrix(x: float, y: float, z: float, w: float) -> np.ndarray:
    """The rotation matrix of a unit quaternion (x, y, z, w)."""
    n = math.sqrt(x * x + y * y + z * z + w * w) or 1.0
    x, y, z, w = x / n, y / n, z / n, w / n
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def move_objects(objects: Sequence, rotation: np.ndarray, translation: np.ndarray, frame_id: str) -> None:
    """Every object's geometry (`obj.geometry`) into another frame: p' = R p + t."""
    for obj in objects:
        if getattr(obj, "geometry", None) is not None:
            obj.geometry = obj.geometry.transformed(rotation, translation, frame_id)


def invalidate_objects(objects: Sequence, why: str) -> None:
    """Every object's geometry made invalid with the reason (its pixels, box and mask kept)."""
    for obj in objects:
        geo = getattr(obj, "geometry", None)
        if geo is not None and geo.valid:
            obj.geometry = replace(geo, valid=False, error=why)


def quaternion(rotation: np.ndarray) -> Tuple[float, float, float, float]:
    """(x, y, z, w) of a rotation matrix (geometry_msgs/Quaternion order)."""
    m = np.asarray(rotation, float)
    tr = m[0, 0] + m[1, 1] + m[2, 2]
    if tr > 0:
        s = math.sqrt(tr + 1.0) * 2
        w, x, y, z = 0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2]) * 2
        w, x, y, z = (m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s
    elif m[1, 1] > m[2, 2]:
        s = math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2]) * 2
        w, x, y, z = (m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s
    else:
        s = math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1]) * 2
        w, x, y, z = (m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s
    return (x, y, z, w)


def depth_like(depth_m: np.ndarray, width: int, height: int) -> np.ndarray:
    """Aligned depth at the colour image's resolution (nearest neighbour keeps holes as holes)."""
    import cv2

    d = np.squeeze(depth_m).astype(np.float32)   # H x W x 1 as some drivers' arrays come
    if d.shape[:2] == (height, width):
        return d
    return cv2.resize(d, (width, height), interpolation=cv2.INTER_NEAREST)


def object_geometry(box_px: Sequence[float], rgb: np.ndarray, depth_m: np.ndarray, intrinsics: CameraIntrinsics,
                    cell_px: Tuple[float, float], config: GeometryConfig = GeometryConfig(),
                    with_mask: bool = True) -> ObjectGeometry:
    """Geometry of the object in `box_px` (colour pixels); `cell_px`: the location grid's cell in pixels.

    `depth_m`: metres, NaN = no reading, aligned with `rgb` (any resolution). Never raises on bad
    data: an invalid result says why.
    """

    height, width = rgb.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box_px)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 - x0 < 1 or y1 - y0 < 1:
        return ObjectGeometry.invalid("the box has no area")
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        return ObjectGeometry.invalid("the box is outside the image")
    if not intrinsics.valid():
        return ObjectGeometry.invalid("camera_info has no valid intrinsics (k)")
    k = intrinsics.scaled(width, height)
    depth = depth_like(depth_m, width, height)
    mx, my = config.margin_cells * cell_px[0], config.margin_cells * cell_px[1]
    wx0, wy0 = int(max(0, math.floor(x0 - mx))), int(max(0, math.floor(y0 - my)))
    wx1, wy1 = int(min(width, math.ceil(x1 + mx))), int(min(height, math.ceil(y1 + my)))
    step = max(1, math.ceil(math.sqrt((wy1 - wy0) * (wx1 - wx0) / config.max_window_px)))
    off = (step - 1) // 2                   # each sample at its step x step block's centre
    rows_at, cols_at = slice(wy0 + off, wy1, step), slice(wx0 + off, wx1, step)
    z = _usable(depth[rows_at, cols_at], config)
    valid = np.isfinite(z)
    rgb_w = rgb[rows_at, cols_at]
    ys, xs = np.mgrid[rows_at, cols_at]
    inner = _inside(xs, ys, _shrunk((x0, y0, x1, y1), 0.5))
    in_box = _inside(xs, ys, (x0, y0, x1, y1))
    if not (valid & in_box).any():
        return ObjectGeometry.invalid(f"no valid depth inside the box (0 of {int(in_box.sum())} pixels)")
    if (valid & inner).sum() < 0.1 * max(1, inner.sum()):
        # a black, shiny or transparent object (or one nearer than min_depth_m) leaves a hole: what
        # depth there is in the box is its surroundings, not the object
        return ObjectGeometry.invalid(f"no depth on the object: {int((valid & inner).sum())} of {int(inner.sum())} "
                                      "pixels at the box's centre have depth")
    xn, yn = k.normalized(xs, ys)        # camera_info's K: pixel (i, j)'s centre at (i, j) (OpenCV's convention)
    pts = np.stack([xn * z, yn * z, z], axis=-1)
    sigma = DEPTH_NOISE_K * np.nan_to_num(z, nan=1.0) ** 2
    rng = np.random.default_rng(config.seed)
    # The plane from what surrounds the box (the window's margin), or from all but its centre if that is too little.
    around = valid & ~in_box if (valid & ~in_box).sum() >= 200 else valid & ~inner
    plane = _support_plane(pts[around], sigma[around], rng, config.plane_iterations, pts[valid & in_box])
    edges = _depth_edges(z, sigma, step)
    seg = None
    if plane is not None:
        h = pts @ plane[:3] + plane[3]
        above = valid & (h > np.maximum(config.min_height_m, 3 * sigma)) & ~edges
        seg = _component(above, inner, in_box)
        if seg is not None:
            hs = h[seg & valid]
            # A support has the object standing on it: its lowest visible points within 25 cm (seen
            # from above, a box shows only its top, a sphere its upper half, so no tighter bound
            # holds); a wall far behind the object is not one.
            if np.percentile(hs, 3) > 0.25:
                plane, seg = None, None
        if seg is None and plane is not None:
            return ObjectGeometry.invalid("nothing stands above the support plane in the box")
    if seg is None and _flat(pts[valid & inner], pts[around], sigma[valid & inner]):
        return ObjectGeometry.invalid("nothing stands above the support plane in the box")
    layer: Optional[Tuple[float, float]] = None
    if seg is None:
        plane = None
        z_ref = float(np.nanmedian(z[inner & valid]))
        reach = max(0.04, 1.5 * (x1 - x0) * z_ref / k.fx)
        layer = (z_ref, reach)
        seg = _component(valid & (np.abs(z - z_ref) < reach) & ~edges, inner, in_box)
    if seg is None:
        return ObjectGeometry.invalid("no object surface found in the box")
    seg, colour = _with_colour(seg, valid, z, rgb_w, inner)
    obj = seg & valid
    if int(obj.sum()) < config.min_points:
        return ObjectGeometry.invalid(f"too few object points with depth ({int(obj.sum())})")
    points = pts[obj].astype(np.float64)
    colours = rgb_w[obj]
    if len(points) > config.max_points:   # a whole-image box: the statistics need no more (and the cloud is capped)
        pick = rng.choice(len(points), config.max_points, replace=False)
        points, colours = points[pick], colours[pick]
    if plane is not None:
        box3d = _standing_box(points, plane)
    else:
        box3d = _free_box(points)
    center, rotation, size, top, approach, closing, opening = box3d
    if step > 1:
        rule = _PixelRule(k, plane, layer, colour, config)
        seg = _edge_at_full_resolution(seg, step, (wx0, wy0, wx1, wy1), depth, rgb, rule)
    rows, cols = np.nonzero(seg)
    refined = (float(wx0 + cols.min()), float(wy0 + rows.min()), float(wx0 + cols.max() + 1),
               float(wy0 + rows.max() + 1))
    mask = None
    if with_mask:
        mask = np.zeros((height, width), dtype=bool)
        mask[wy0:wy1, wx0:wx1] = seg
    y_axis = closing / np.linalg.norm(closing)
    z_axis = approach / np.linalg.norm(approach)
    grasp_rot = np.stack([np.cross(y_axis, z_axis), y_axis, z_axis], axis=1)
    keep = _robust(points)
    return ObjectGeometry(True, "", mask, refined, center, rotation, size, top, grasp_rot, float(opening),
                          points[keep].astype(np.float32), colours[keep].astype(np.uint8), plane)


# -- steps -----------------------------------------------------------------------------------------
def _inside(xs: np.ndarray, ys: np.ndarray, box: Sequence[float]) -> np.ndarray:
    return (xs + 0.5 >= box[0]) & (xs + 0.5 < box[2]) & (ys + 0.5 >= box[1]) & (ys + 0.5 < box[3])


def _shrunk(box: Sequence[float], keep: float) -> Tuple[float, float, float, float]:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    hw, hh = (box[2] - box[0]) * keep / 2, (box[3] - box[1]) * keep / 2
    return (cx - hw, cy - hh, cx + hw, cy + hh)


def _support_plane(points: np.ndarray, sigma: np.ndarray, rng: np.random.Generator, iterations: int,
                   inside: np.ndarray) -> Optional[np.ndarray]:
    """The dominant plane of `points` that nothing in the box lies behind (RANSAC, then least
    squares on its inliers), normal towards the camera; None when there is no such plane.

    `inside`: the box's points. A support has the object on its near side; the front faces of a
    neighbour (or a wall) beside the object have part of it behind them, so they are passed over.
    """
    if len(points) < 50:
        return None
    if len(points) > 3000:
        pick = rng.choice(len(points), 3000, replace=False)
        points, sigma = points[pick], sigma[pick]
    tol = np.maximum(0.006, 3 * sigma)
    inside_tol = np.maximum(0.01, 3 * DEPTH_NOISE_K * inside[:, 2] ** 2)
    need = max(30, 0.2 * len(points))
    for _ in range(3):                           # sequential RANSAC: a refused plane's points go, the next is tried
        if len(points) < need:
            return None
        triples = rng.integers(0, len(points), (iterations, 3))
        a, b, c = points[triples[:, 0]], points[triples[:, 1]], points[triples[:, 2]]
        normals = np.cross(b - a, c - a)
        norms = np.linalg.norm(normals, axis=1)
        ok = norms > 1e-9
        if not ok.any():
            return None
        normals, a = normals[ok] / norms[ok, None], a[ok]
        inliers = np.abs(points @ normals.T - (a * normals).sum(axis=1)) < tol[:, None]   # [points, candidates]
        best = int(inliers.sum(axis=0).argmax())
        chosen = inliers[:, best]
        if chosen.sum() < need:
            return None
        sel = points[chosen]
        centroid = sel.mean(axis=0)
        normal = np.linalg.svd(sel - centroid, full_matrices=False)[2][2]
        if normal @ -centroid < 0:
            normal = -normal                     # towards the camera (at the origin)
        heights = inside @ normal - normal @ centroid
        refused = (abs(normal @ (centroid / np.linalg.norm(centroid))) < 0.15     # seen edge-on
                   or (len(inside) and (heights < -inside_tol).mean() > 0.1)      # part of the object behind it
                   or (len(inside) and (heights > inside_tol).mean() < 0.03))     # nothing above it: a top face
        if not refused:
            return np.concatenate([normal, [-normal @ centroid]])
        points, sigma, tol = points[~chosen], sigma[~chosen], tol[~chosen]
    return None


def _flat(inside: np.ndarray, around: np.ndarray, sigma: np.ndarray) -> bool:
    """Whether the box's centre is one plane with most of its surroundings: a bare surface, no object."""
    if len(inside) < 10 or len(around) < 10:
        return False
    centroid = inside.mean(axis=0)
    normal = np.linalg.svd(inside - centroid, full_matrices=False)[2][2]
    tol = np.maximum(0.006, 3 * sigma)
    if np.mean(np.abs((inside - centroid) @ normal) < tol) < 0.9:
        return False
    return bool(np.mean(np.abs((around - centroid) @ normal) < float(np.median(tol))) >= 0.6)


def _usable(z: np.ndarray, config: GeometryConfig) -> np.ndarray:
    """Depth in metres (float64) with readings outside [min_depth_m, max_depth_m] as NaN."""
    z = z.astype(np.float64)
    return np.where(np.isfinite(z) & (z >= config.min_depth_m) & (z <= config.max_depth_m), z, np.nan)


def _depth_edges(z: np.ndarray, sigma: np.ndarray, step: int = 1) -> np.ndarray:
    """Pixels at a depth discontinuity (where surfaces at different depths meet). `step`: pixels between
    samples; a slanted surface's depth changes more between samples further apart, so the jump that
    counts grows with it."""
    filled = np.nan_to_num(z, nan=0.0)
    jump = np.zeros_like(filled)
    jump[1:, :] = np.maximum(jump[1:, :], np.abs(np.diff(filled, axis=0)))
    jump[:, 1:] = np.maximum(jump[:, 1:], np.abs(np.diff(filled, axis=1)))
    both = np.isfinite(z)
    both[1:, :] &= np.isfinite(z[:-1, :])
    both[:, 1:] &= np.isfinite(z[:, :-1])
    return both & (jump > np.maximum(0.015, 8 * sigma) * max(1.0, step / 2.0))


def _component(candidates: np.ndarray, inner: np.ndarray, in_box: np.ndarray) -> Optional[np.ndarray]:
    """The connected component of `candidates` (after an opening) covering the box's centre most."""
    import cv2

    m = candidates.astype(np.uint8)
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, labels = cv2.connectedComponents(m, connectivity=8)
    if n <= 1:
        return None
    # The component that fits the box best (pixel IoU with it; its centre counts double), so a
    # neighbour reaching into a loose box loses to the object the box was placed on.
    area = np.bincount(labels.ravel(), minlength=n).astype(float)
    inter = np.bincount(labels[in_box], minlength=n).astype(float) + np.bincount(labels[inner], minlength=n)
    score = inter / (area + in_box.sum() - inter + 1e-9)
    score[0] = 0
    best = int(score.argmax())
    return labels == best if score[best] > 0 else None


def _chromaticity(rgb: np.ndarray) -> np.ndarray:
    """r, g chromaticity (the last axis): shading scales it away."""
    rgbf = rgb.astype(np.float32) + 1.0
    return rgbf[..., :2] / rgbf.sum(axis=-1, keepdims=True)


def _with_colour(seg: np.ndarray, valid: np.ndarray, z: np.ndarray, rgb: np.ndarray,
                 inner: np.ndarray) -> Tuple[np.ndarray, Optional[Tuple[np.ndarray, float]]]:
    """Colour and depth together: keep the part of the mask of the object's colour (a touching object
    of another colour at the same depth falls away), then join holes (no depth) inside or next to it
    of that colour. Colour is compared as rg chromaticity, so shading does not split an object.
    Returns the mask and the colour it took (chromaticity, distance threshold; None without one)."""
    import cv2

    core = seg & valid & inner
    if core.sum() < 10:
        core = seg & valid
    if not core.any():
        return seg, None
    chrom = _chromaticity(rgb)
    ref = np.median(chrom[core], axis=0)
    dist = np.linalg.norm(chrom - ref, axis=2)
    threshold = max(0.04, 3.0 * float(np.median(dist[core])))
    alike = dist < threshold
    kept = _component(seg & alike, inner, seg)
    if kept is not None and kept.sum() >= 0.3 * seg.sum():
        seg = kept
    # Grow a few pixels into neighbours of the object's colour: depth holes, and the strip just
    # above the table (too low to tell from it by depth) and the silhouette (cut by depth edges).
    depth_near = ~valid | (np.abs(np.nan_to_num(z, nan=0.0) - np.median(z[core])) < 0.1)
    out = seg
    for _ in range(3):
        near = cv2.dilate(out.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        out = out | (near & alike & depth_near)
    closed = cv2.morphologyEx(out.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8)).astype(bool)
    return out | (closed & (~valid | alike)), (ref, threshold)


@dataclass
class _PixelRule:
    """What made a sample part of the object (above the plane, or in the centre's depth layer; of its
    colour), to judge single full-resolution pixels by."""
    k: CameraIntrinsics
    plane: Optional[np.ndarray]
    layer: Optional[Tuple[float, float]]      # (depth of the box's centre, reach) without a plane
    colour: Optional[Tuple[np.ndarray, float]]
    config: GeometryConfig

    def judge(self, us: np.ndarray, vs: np.ndarray, z: np.ndarray, rgb: np.ndarray,
              coarse: np.ndarray) -> np.ndarray:
        """Pixels (us, vs) with depth `z` (NaN: none) and colours `rgb`: the object's? `coarse`: the sampled
        mask's answer there. Depth says object and the colour agrees (or the samples said so), or no depth
        and both the samples and the colour say so."""
        valid = np.isfinite(z)
        if self.plane is not None:
            xn, yn = self.k.normalized(us, vs)
            h = np.stack([xn * z, yn * z, z], axis=-1) @ self.plane[:3] + self.plane[3]
            sigma = DEPTH_NOISE_K * np.nan_to_num(z, nan=1.0) ** 2
            by_depth = valid & (h > np.maximum(self.config.min_height_m, 3 * sigma))
        else:
            z_ref, reach = self.layer if self.layer is not None else (np.nan, 0.0)
            by_depth = valid & (np.abs(np.nan_to_num(z, nan=np.inf) - z_ref) < reach)
        if self.colour is None:
            alike = np.ones(len(z), dtype=bool)
        else:
            ref, threshold = self.colour
            alike = np.linalg.norm(_chromaticity(rgb) - ref, axis=-1) < threshold
        return (by_depth & (alike | coarse)) | (~valid & alike & coarse)


def _edge_at_full_resolution(seg: np.ndarray, step: int, window: Tuple[int, int, int, int],
                             depth: np.ndarray, rgb: np.ndarray, rule: _PixelRule) -> np.ndarray:
    """The sampled mask at the window's full resolution: each sample's block takes its answer, and the
    pixels within `step` of the mask's edge are judged one by one (`rule`), so the cost grows with
    the object's size and its edge's length, not the window's area (only the mask's own bounding
    region, grown by two blocks, is made at full resolution)."""
    import cv2

    wx0, wy0, wx1, wy1 = window
    hh, ww = wy1 - wy0, wx1 - wx0
    out = np.zeros((hh, ww), dtype=bool)
    rows, cols = np.nonzero(seg)
    if not len(rows):
        return out
    # the samples' rows/cols r0..r1, c0..c1 (two more each side) and the window pixels their blocks cover
    r0, r1 = max(0, rows.min() - 2), min(seg.shape[0], rows.max() + 3)
    c0, c1 = max(0, cols.min() - 2), min(seg.shape[1], cols.max() + 3)
    sub = seg[r0:r1, c0:c1].astype(np.uint8)
    up = np.repeat(np.repeat(sub, step, axis=0), step, axis=1)
    y0, x0 = r0 * step, c0 * step                  # block i covers window pixels i*step .. (the sample at + off)
    y1, x1 = min(hh, y0 + up.shape[0]), min(ww, x0 + up.shape[1])
    if r1 == seg.shape[0]:
        y1 = hh                                    # the last blocks reach the window's edge
    if c1 == seg.shape[1]:
        x1 = ww
    up = np.pad(up, ((0, max(0, y1 - y0 - up.shape[0])), (0, max(0, x1 - x0 - up.shape[1]))), mode="edge")
    up = up[:y1 - y0, :x1 - x0]
    kernel = np.ones((2 * step + 1, 2 * step + 1), np.uint8)
    inside = cv2.erode(up, kernel).astype(bool)
    band = cv2.dilate(up, kernel).astype(bool) & ~inside
    vs, us = np.nonzero(band)
    gy, gx = vs + y0 + wy0, us + x0 + wx0
    z = _usable(depth[gy, gx], rule.config)
    inside[vs, us] = rule.judge(gx.astype(np.float64), gy.astype(np.float64), z, rgb[gy, gx], up[vs, us].astype(bool))
    out[y0:y1, x0:x1] = inside
    return out


def _robust(points: np.ndarray) -> np.ndarray:
    """Points within a robust radius of the median (drops flying pixels far from the object)."""
    med = np.median(points, axis=0)
    dist = np.linalg.norm(points - med, axis=1)
    return dist <= np.percentile(dist, 98) * 1.5 + 1e-6


def _standing_box(points: np.ndarray, plane: np.ndarray):
    """3D box, top centre, approach, closing direction and opening of an object standing on `plane`."""
    import cv2

    n, d = plane[:3], plane[3]
    h = points @ n + d
    ex = np.cross([0.0, 1.0, 0.0], n)            # any direction in the plane
    if np.linalg.norm(ex) < 1e-3:
        ex = np.cross([1.0, 0.0, 0.0], n)
    ex /= np.linalg.norm(ex)
    ey = np.cross(n, ex)
    origin = -d * n
    q = np.stack([(points - origin) @ ex, (points - origin) @ ey], axis=1)
    height = float(np.percentile(h, 98))
    keep = (q[:, 0] >= np.percentile(q[:, 0], 1)) & (q[:, 0] <= np.percentile(q[:, 0], 99)) & \
           (q[:, 1] >= np.percentile(q[:, 1], 1)) & (q[:, 1] <= np.percentile(q[:, 1], 99))
    (_, _), (_, _), angle = cv2.minAreaRect((q[keep] * 1000.0).astype(np.float32))
    a = math.radians(angle)
    u = math.cos(a) * ex + math.sin(a) * ey
    v = np.cross(n, u)
    # The top surface: within a few noise widths of the highest points (a wider band takes in the
    # upper front face and pulls the centre towards the camera).
    sigma_top = DEPTH_NOISE_K * float(np.median(points[:, 2])) ** 2
    band = h >= height - max(0.005, 3 * sigma_top)
    # Its centre as the middle of its extent (not its mean: depth edges thin its far rim).
    top_q = (np.percentile(q[band], 2, axis=0) + np.percentile(q[band], 98, axis=0)) / 2 if band.sum() > 5 \
        else np.median(q, axis=0)
    top_xy = origin + top_q[0] * ex + top_q[1] * ey
    cu, cv = (top_xy - origin) @ u, (top_xy - origin) @ v
    pu, pv = (points - origin) @ u, (points - origin) @ v
    half_u = float(np.percentile(np.abs(pu - cu), 98))
    half_v = float(np.percentile(np.abs(pv - cv), 98))
    center = top_xy + (height / 2.0) * n
    rotation = np.stack([u, v, n], axis=1)
    size = np.array([2 * half_u, 2 * half_v, height])
    top = top_xy + height * n
    closing = u if half_u <= half_v else v
    return center, rotation, size, top, -n, closing, 2 * min(half_u, half_v)


def _free_box(points: np.ndarray):
    """3D box from the points alone (principal axes, robust extents); grasp along the viewing ray.

    The gripper closes across the ray: along whichever of two directions perpendicular to it the
    object is narrower (robust extents), the opening that extent. Both are perpendicular to the ray
    by construction, so a principal axis lying along the ray cannot leave it without a direction."""
    centroid = np.median(points, axis=0)
    axes = np.linalg.svd(points - centroid, full_matrices=False)[2]
    if np.linalg.det(axes) < 0:
        axes[2] = -axes[2]
    local = (points - centroid) @ axes.T
    lo, hi = np.percentile(local, 2, axis=0), np.percentile(local, 98, axis=0)
    center = centroid + ((lo + hi) / 2) @ axes
    size = hi - lo
    near = points[:, 2] <= np.percentile(points[:, 2], 10)
    top = points[near].mean(axis=0)
    ray = top / np.linalg.norm(top)
    # the principal axis least along the ray, made perpendicular to it, and the third direction
    first = axes[int(np.argmin(np.abs(axes @ ray)))]
    first = first - (first @ ray) * ray
    first /= np.linalg.norm(first)
    across = (first, np.cross(ray, first))
    widths = [float(np.percentile(points @ a, 98) - np.percentile(points @ a, 2)) for a in across]
    i = int(np.argmin(widths))
    return center, axes.T, size, top, ray, across[i], widths[i]
