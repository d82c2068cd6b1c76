"""Synthetic RGB-D scenes with ground truth: boxes, cylinders and spheres on a table, ray cast exactly.

For the object-geometry tests and benchmark (`bench/object_geometry.py`); nothing the node runs
imports it. A pinhole camera looks down at a table from a robot-like viewpoint (0.4-2 m away,
25-60 degrees down). Every pixel's ray is intersected with the table plane (world z = 0), each
object and a back wall; the nearest hit gives depth (the optical-frame z, so 32FC1 metres and
16UC1 millimetres are exact), the object id (the ground-truth masks) and a Lambert-shaded colour.
Ground truth per object: mask, tight 2D box, 3D box centre / size / yaw, top-surface centre,
all in the camera's optical frame (x right, y down, z forward).

`noisy_depth` adds what a structured-light / active-stereo camera does to depth:

- noise growing with the square of depth, sigma = k * z^2 with k = 0.0025 / m (2.5 mm at 1 m,
  10 mm at 2 m): the stereo RMS-error relation z^2 * subpixel / (focal * baseline) with a D435's
  numbers (focal ~640 px at 848x480, baseline 50 mm, subpixel 0.08), from Intel's "Tuning depth
  cameras for best performance" (Grunnet-Jepsen et al.);
- holes (zeros): 1 % of pixels at random, and half the pixels along depth edges (jumps > 3 cm),
  where stereo matching fails on occlusion borders;
- flying pixels: 30 % of the remaining edge pixels take a depth between foreground and background.

`model_box` makes a box as Kosmos-2 gives it: the true box snapped to the 32x32 location grid of
the processor's input, then each edge moved by up to one cell.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .geometry import CameraIntrinsics, InputGeometry

#: Depth noise: sigma = NOISE_K * z^2 (metres).
NOISE_K = 0.0025
HOLE_RATE = 0.01
EDGE_JUMP_M = 0.03
EDGE_HOLE_RATE = 0.5
FLYING_RATE = 0.3
COLOURS = ((200, 40, 40), (40, 90, 200), (40, 160, 60), (220, 200, 40), (150, 60, 170), (240, 130, 30),
           (30, 170, 170), (120, 120, 120))
KINDS = ("box", "cylinder", "sphere")


@dataclass
class SceneObject:
    kind: str                      # box | cylinder | sphere
    xy: Tuple[float, float]        # footprint centre on the table (world, metres)
    size: Tuple[float, float, float]   # box: lx, ly, lz; cylinder: 2r, 2r, h; sphere: 2r, 2r, 2r
    yaw: float = 0.0               # box: rotation about world z (radians)
    colour: Tuple[int, int, int] = (200, 40, 40)
    name: str = ""

    @property
    def height(self) -> float:
        return self.size[2]

    def centre_world(self) -> np.ndarray:
        return np.array([self.xy[0], self.xy[1], self.height / 2.0])

    def top_world(self) -> np.ndarray:
        return np.array([self.xy[0], self.xy[1], self.height])


@dataclass
class Truth:
    """One object's ground truth in the camera's optical frame (pixels and metres)."""
    mask: np.ndarray               # bool, H x W: the pixels where this object is the nearest surface
    box: Tuple[float, float, float, float]   # tight pixel box of the mask (x1, y1 exclusive)
    centre: np.ndarray             # 3D box centre
    size: Tuple[float, float, float]
    yaw: float                     # world yaw (boxes)
    top: np.ndarray                # top-surface centre
    distance: float                # camera to centre


@dataclass
class RgbdScene:
    rgb: np.ndarray                # H x W x 3 uint8
    depth_m: np.ndarray            # float32 metres, exact (0 nowhere: every ray hits the wall)
    intrinsics: CameraIntrinsics
    objects: List[SceneObject]
    truths: List[Truth]
    cam_to_world: np.ndarray       # 4 x 4
    table: bool = True
    ids: np.ndarray = field(default=None, repr=False)   # type: ignore[assignment]  # -2 wall, -1 table, i object

    def depth_16uc1(self, depth_m: Optional[np.ndarray] = None) -> np.ndarray:
        d = self.depth_m if depth_m is None else depth_m
        d = np.nan_to_num(d, nan=0.0)
        return np.clip(np.round(d * 1000.0), 0, 65535).astype(np.uint16)


def look_at(position: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera-to-world rotation of an optical frame at `position` looking at `target` (world z up)."""
    z = target - position
    z = z / np.linalg.norm(z)
    x = np.cross(z, [0.0, 0.0, 1.0])
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    return np.stack([x, y, z], axis=1)


def intrinsics_for(width: int, height: int, hfov_deg: float = 69.0) -> CameraIntrinsics:
    f = width / (2.0 * math.tan(math.radians(hfov_deg) / 2.0))
    return CameraIntrinsics(f, f, width / 2.0, height / 2.0, width, height)


def random_objects(rng: np.random.Generator, count: int, spread: float = 0.25,
                   touching: bool = False) -> List[SceneObject]:
    """`count` objects on the table that do not intersect (or, with `touching`, two that touch)."""
    objs: List[SceneObject] = []
    tries = 0
    while len(objs) < count and tries < 500:
        tries += 1
        kind = KINDS[int(rng.integers(len(KINDS)))]
        if kind == "box":
            size = (float(rng.uniform(0.05, 0.16)), float(rng.uniform(0.05, 0.16)), float(rng.uniform(0.04, 0.2)))
        elif kind == "cylinder":
            r = float(rng.uniform(0.03, 0.06))
            size = (2 * r, 2 * r, float(rng.uniform(0.06, 0.2)))
        else:
            r = float(rng.uniform(0.03, 0.06))
            size = (2 * r, 2 * r, 2 * r)
        xy = (float(rng.uniform(-spread, spread)), float(rng.uniform(-spread, spread)))
        if touching and objs and len(objs) == 1:
            prev = objs[0]
            gap = _radius(prev) + max(size[0], size[1]) / 2.0
            xy = (prev.xy[0] + gap, prev.xy[1])
        new = SceneObject(kind, xy, size, float(rng.uniform(0, math.pi)) if kind == "box" else 0.0,
                          COLOURS[len(objs) % len(COLOURS)], f"{kind}{len(objs)}")
        if all(math.dist(o.xy, xy) >= _radius(o) + _radius(new) - (0.02 if touching else -0.03) for o in objs):
            objs.append(new)
    return objs


def _radius(o: SceneObject) -> float:
    return math.hypot(o.size[0], o.size[1]) / 2.0 if o.kind == "box" else o.size[0] / 2.0


def render(objects: Sequence[SceneObject], width: int = 640, height: int = 480, distance: float = 1.0,
           elevation_deg: float = 45.0, azimuth_deg: float = -90.0, table: bool = True,
           target: Sequence[float] = (0.0, 0.0, 0.05), hfov_deg: float = 69.0,
           table_colour: Optional[Tuple[int, int, int]] = None) -> RgbdScene:
    """Ray cast the scene from a camera `distance` metres from `target`, `elevation_deg` above horizontal.

    `table_colour`: a plain table of that colour (default: a wooden checkerboard)."""
    k_cam = intrinsics_for(width, height, hfov_deg)
    el, az = math.radians(elevation_deg), math.radians(azimuth_deg)
    tgt = np.asarray(target, dtype=np.float64)
    pos = tgt + distance * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    rot = look_at(pos, tgt)
    u, v = np.meshgrid(np.arange(width), np.arange(height))     # pixel centres on integers, as camera_info's K
    d_cam = np.stack([(u - k_cam.cx) / k_cam.fx, (v - k_cam.cy) / k_cam.fy, np.ones_like(u)], axis=-1).reshape(-1, 3)
    d = d_cam @ rot.T                                  # world directions, scaled so that t = optical z
    n_rays = d.shape[0]
    best = np.full(n_rays, np.inf)
    ids = np.full(n_rays, -2, dtype=np.int32)
    normals = np.zeros((n_rays, 3))
    normals[:] = -d / np.linalg.norm(d, axis=1, keepdims=True)

    def take(t: np.ndarray, normal: np.ndarray, ident: int) -> None:
        closer = np.isfinite(t) & (t > 1e-6) & (t < best)
        best[closer] = t[closer]
        ids[closer] = ident
        normals[closer] = normal[closer] if normal.ndim == 2 else normal

    # back wall: a vertical plane 2.5 m behind the target, facing the camera
    back = np.array([-math.cos(az), -math.sin(az), 0.0])
    wall_point = tgt + 2.5 * back
    denom = d @ (-back)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_wall = ((wall_point - pos) @ (-back)) / denom
    take(np.where(denom > 1e-9, t_wall, np.inf), -back, -2)
    if table:
        with np.errstate(divide="ignore", invalid="ignore"):
            t_table = np.where(d[:, 2] < -1e-9, -pos[2] / d[:, 2], np.inf)
        take(t_table, np.array([0.0, 0.0, 1.0]), -1)
    for i, o in enumerate(objects):
        t, n = _intersect(o, pos, d)
        take(t, n, i)
    depth = best.reshape(height, width).astype(np.float32)
    ids = ids.reshape(height, width)
    rgb = _shade(ids.reshape(-1), normals, objects, pos + d * best[:, None], table_colour).reshape(height, width, 3)
    truths = [_truth(o, ids == i, pos, rot) for i, o in enumerate(objects)]
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = rot, pos
    return RgbdScene(rgb, depth, k_cam, list(objects), truths, pose, table, ids)


def _intersect(o: SceneObject, pos: np.ndarray, d: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Nearest positive hit distance along each ray and the surface normal there (world)."""
    n_rays = d.shape[0]
    normal = np.zeros((n_rays, 3))
    with np.errstate(divide="ignore", invalid="ignore"):
        if o.kind == "box":
            c, s = math.cos(o.yaw), math.sin(o.yaw)
            rot_box = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
            org = rot_box.T @ (pos - o.centre_world())
            dl = d @ rot_box
            half = np.asarray(o.size) / 2.0
            t1, t2 = (-half - org) / dl, (half - org) / dl
            tmin, tmax = np.minimum(t1, t2), np.maximum(t1, t2)
            t_near, t_far = tmin.max(axis=1), tmax.min(axis=1)
            hit = (t_near <= t_far) & (t_far > 0)
            axis = tmin.argmax(axis=1)
            local = np.zeros((n_rays, 3))
            local[np.arange(n_rays), axis] = -np.sign(dl[np.arange(n_rays), axis])
            return np.where(hit, t_near, np.inf), local @ rot_box.T
        if o.kind == "cylinder":
            r, h = o.size[0] / 2.0, o.size[2]
            ox, oy = pos[0] - o.xy[0], pos[1] - o.xy[1]
            a = d[:, 0] ** 2 + d[:, 1] ** 2
            b = 2 * (ox * d[:, 0] + oy * d[:, 1])
            cc = ox ** 2 + oy ** 2 - r ** 2
            disc = b * b - 4 * a * cc
            t_side = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
            z_side = pos[2] + t_side * d[:, 2]
            side_ok = (disc >= 0) & (z_side >= 0) & (z_side <= h) & (t_side > 0)
            t_top = (h - pos[2]) / d[:, 2]
            px, py = ox + t_top * d[:, 0], oy + t_top * d[:, 1]
            top_ok = (px ** 2 + py ** 2 <= r ** 2) & (t_top > 0)
            t = np.where(top_ok, t_top, np.inf)
            t = np.where(side_ok & (t_side < t), t_side, t)
            normal[:, 2] = 1.0
            is_side = side_ok & (t == t_side)
            sx, sy = ox + t_side * d[:, 0], oy + t_side * d[:, 1]
            normal[is_side] = np.stack([sx, sy, np.zeros_like(sx)], axis=1)[is_side] / r
            return t, normal
        cen = np.array([o.xy[0], o.xy[1], o.size[2] / 2.0])
        r = o.size[0] / 2.0
        oc = pos - cen
        a = (d * d).sum(axis=1)
        b = 2 * d @ oc
        cc = oc @ oc - r * r
        disc = b * b - 4 * a * cc
        t = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a), np.inf)
        hit_points = pos + d * np.where(np.isfinite(t), t, 0)[:, None]
        return t, (hit_points - cen) / r


def _shade(ids: np.ndarray, normals: np.ndarray, objects: Sequence[SceneObject], points: np.ndarray,
           table_colour: Optional[Tuple[int, int, int]] = None) -> np.ndarray:
    light = np.array([0.3, -0.5, 0.8])
    light = light / np.linalg.norm(light)
    lambert = 0.35 + 0.65 * np.clip(normals @ light, 0.0, 1.0)
    base = np.zeros((ids.size, 3))
    base[ids == -2] = (200, 205, 210)
    checker = ((np.floor(points[:, 0] / 0.1) + np.floor(points[:, 1] / 0.1)) % 2)[:, None]
    table = ids == -1
    base[table] = (np.array([170.0, 140.0, 100.0]) + 12.0 * checker)[table] if table_colour is None else table_colour
    for i, o in enumerate(objects):
        base[ids == i] = o.colour
    return np.clip(base * lambert[:, None], 0, 255).astype(np.uint8)


def _truth(o: SceneObject, mask: np.ndarray, pos: np.ndarray, rot: np.ndarray) -> Truth:
    ys, xs = np.nonzero(mask)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)) if xs.size else \
        (0.0, 0.0, 0.0, 0.0)
    centre = rot.T @ (o.centre_world() - pos)
    return Truth(mask, box, centre, o.size, o.yaw, rot.T @ (o.top_world() - pos), float(np.linalg.norm(centre)))


def noisy_depth(depth_m: np.ndarray, rng: np.random.Generator, k: float = NOISE_K) -> np.ndarray:
    """Depth as a structured-light / stereo camera gives it (module docstring); NaN = no reading."""
    z = depth_m.astype(np.float64)
    out = z + rng.normal(0.0, 1.0, z.shape) * k * z * z
    gy, gx = np.abs(np.diff(z, axis=0, prepend=z[:1])), np.abs(np.diff(z, axis=1, prepend=z[:, :1]))
    edge = np.maximum(gx, gy) > EDGE_JUMP_M
    edge |= np.roll(edge, -1, axis=0) | np.roll(edge, -1, axis=1)
    roll = rng.random(z.shape)
    flying = edge & (roll >= EDGE_HOLE_RATE) & (roll < EDGE_HOLE_RATE + FLYING_RATE * (1 - EDGE_HOLE_RATE))
    far = np.maximum(np.maximum(np.roll(z, 1, 0), np.roll(z, -1, 0)), np.maximum(np.roll(z, 1, 1), np.roll(z, -1, 1)))
    out[flying] = (z + rng.random(z.shape) * (far - z))[flying]
    out[(edge & (roll < EDGE_HOLE_RATE)) | (rng.random(z.shape) < HOLE_RATE)] = np.nan
    return out.astype(np.float32)


def model_box(box_px: Sequence[float], geometry: InputGeometry, rng: np.random.Generator,
              grid: int = 32) -> Tuple[float, float, float, float]:
    """The true pixel box as Kosmos-2 would place it: snapped to the location grid of the model's
    input, then each edge moved by up to one cell (clipped to the image)."""
    norm = geometry.to_normalized(box_px)
    snapped = [round(v * grid) / grid for v in norm]
    moved = [min(max(v + int(rng.integers(-1, 2)) / grid, 0.0), 1.0) for v in snapped]
    x0, y0, x1, y1 = moved
    if x1 <= x0:
        x1 = min(1.0, x0 + 1.0 / grid)
    if y1 <= y0:
        y1 = min(1.0, y0 + 1.0 / grid)
    return geometry.to_pixels((x0, y0, x1, y1))


def random_scene(rng: np.random.Generator, width: int = 640, height: int = 480, count: int = 4,
                 distance: Optional[float] = None, table: bool = True, touching: bool = False) -> RgbdScene:
    """Objects on a table from a random robot-like viewpoint; every object at least partly in view."""
    objs = random_objects(rng, count, touching=touching)
    dist = float(rng.uniform(0.4, 2.0)) if distance is None else distance
    return render(objs, width, height, distance=dist, elevation_deg=float(rng.uniform(25, 60)),
                  azimuth_deg=float(rng.uniform(-120, -60)), table=table)


def plain_geometry(width: int, height: int) -> InputGeometry:
    """The model input's window for a processor that resizes the whole image (the tiny checkpoints')."""
    return InputGeometry(width, height, 0.0, 0.0, float(width), float(height))
