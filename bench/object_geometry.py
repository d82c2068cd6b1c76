"""Object geometry from a grounded box and RGB-D, measured on synthetic scenes with ground truth.

Boxes, cylinders and spheres standing on a table (`fixtures/rgbd_scenes.py`: exact ray casting, a
structured-light depth noise model), seen from a robot-like viewpoint 0.4-2 m away; each object's
box as Kosmos-2 gives it (the true box snapped to the 32x32 grid, each edge moved by up to a cell).
Prints one table per resolution: for the new method (`core/spatial/object_geometry.py`) and today's one
point (`geometry.box_point_3d`: the median depth of the box's inner half through its centre), the
median and p90 of each error, split by distance, and milliseconds per object; then the box-size
sweep: one object's geometry from boxes of its own size up to the whole image, ms per object (p95 of
`--repeat`) with the window examined whole (before: every pixel) and sampled (now: at most
`max_window_px`), and each box's mask IoU against the whole-window answer.

    scripts/ros-env python bench/object_geometry.py [--objects 240] [--sizes 640x480,1280x720,1920x1080]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kosmos2_ros.core.model.grounding import box_iou as iou  # noqa: E402
from kosmos2_ros.core.spatial.geometry import box_point_3d  # noqa: E402
from kosmos2_ros.core.spatial.object_geometry import GeometryConfig, object_geometry  # noqa: E402
from kosmos2_ros.fixtures.rgbd_scenes import model_box, noisy_depth, plain_geometry, random_scene  # noqa: E402

BANDS = ((0.0, 1.0), (1.0, 1.5), (1.5, 3.0))


def yaw_error(rotation, cam_to_world, truth_yaw) -> float:
    """Smallest angle between the estimated and true box axes about the vertical, modulo 90 degrees."""
    axis = cam_to_world[:3, :3] @ rotation[:, 0]
    est = math.atan2(axis[1], axis[0])
    diff = (est - truth_yaw) % (math.pi / 2)
    return math.degrees(min(diff, math.pi / 2 - diff))


#: The sweep's boxes: the object's own, then boxes around it of these fractions of the image's area.
SWEEP = (("own box", 0.0), ("10 %", 0.10), ("25 %", 0.25), ("50 %", 0.50), ("whole image", 1.0))
#: "Before": a window never sampled (every pixel examined, as before `max_window_px`).
WHOLE_WINDOW = GeometryConfig(max_window_px=10 ** 9)


def sweep_box(truth_box, fraction: float, width: int, height: int):
    """A box of `fraction` of the image's area (the image's aspect) centred on the object, inside the image."""
    if fraction <= 0:
        return truth_box
    if fraction >= 1:
        return (0.0, 0.0, float(width), float(height))
    w, h = width * math.sqrt(fraction), height * math.sqrt(fraction)
    cx = min(max((truth_box[0] + truth_box[2]) / 2, w / 2), width - w / 2)
    cy = min(max((truth_box[1] + truth_box[3]) / 2, h / 2), height - h / 2)
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def box_sweep(size: str, repeat: int, seed: int) -> str:
    """The box-size sweep's table at one resolution (a 0.9 m tabletop scene, its first object)."""
    width, height = (int(v) for v in size.split("x"))
    rng = np.random.default_rng(seed)
    scene = random_scene(rng, width, height, count=4, distance=0.9)
    depth = noisy_depth(scene.depth_m, rng)
    cell = (width / 32.0, height / 32.0)
    truth = scene.truths[0]
    lines = [f"\n{size}: box-size sweep, ms per object (p95 of {repeat}), before (every pixel) / now "
             f"(at most {GeometryConfig().max_window_px} examined); mask IoU now vs before",
             "| box | before ms | now ms | before / now | mask IoU now vs before | valid before / now |",
             "|---|---|---|---|---|---|"]
    for label, fraction in SWEEP:
        box = sweep_box(truth.box, fraction, width, height)
        out = {}
        for name, cfg in (("before", WHOLE_WINDOW), ("now", GeometryConfig())):
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                geo = object_geometry(box, scene.rgb, depth, scene.intrinsics, cell, cfg)
                times.append((time.perf_counter() - t0) * 1e3)
            out[name] = (float(np.percentile(times, 95)), geo)
        (tb, gb), (tn, gn) = out["before"], out["now"]
        same = (gb.mask & gn.mask).sum() / max(1, (gb.mask | gn.mask).sum()) if gb.valid and gn.valid else math.nan
        lines.append(f"| {label} | {tb:.1f} | {tn:.1f} | {tb / tn:.1f}x | {same:.3f} | {gb.valid} / {gn.valid} |")
    return "\n".join(lines)


def measure(size: str, objects: int, seed: int, config: GeometryConfig = GeometryConfig()) -> List[Dict[str, float]]:
    width, height = (int(v) for v in size.split("x"))
    rng = np.random.default_rng(seed)
    geometry = plain_geometry(width, height)
    cell = (width / 32.0, height / 32.0)
    rows: List[Dict[str, float]] = []
    while len(rows) < objects:
        scene = random_scene(rng, width, height, count=4, touching=bool(rng.random() < 0.3))
        depth = noisy_depth(scene.depth_m, rng)
        for obj, truth in zip(scene.objects, scene.truths):
            if truth.mask.sum() < 30 or truth.box[0] <= 0 or truth.box[2] >= width or truth.box[3] >= height:
                continue
            box = model_box(truth.box, geometry, rng)
            t0 = time.perf_counter()
            geo = object_geometry(box, scene.rgb, depth, scene.intrinsics, cell, config)
            ms = (time.perf_counter() - t0) * 1e3
            old, _ = box_point_3d(box, depth, scene.intrinsics)   # (point, why there is none)
            row = {"distance": truth.distance, "ms": ms, "valid": float(geo.valid), "model_iou": iou(box, truth.box),
                   "old_centroid_mm": 1e3 * float(np.linalg.norm(np.asarray(old) - truth.centre)) if old else math.nan}
            if geo.valid:
                inter = (geo.mask & truth.mask).sum()
                row.update(mask_iou=inter / max(1, (geo.mask | truth.mask).sum()), refined_iou=iou(geo.box_refined, truth.box),
                           centroid_mm=1e3 * float(np.linalg.norm(geo.center - truth.centre)),
                           top_mm=1e3 * float(np.linalg.norm(geo.grasp_position - truth.top)))
                est = np.sort(geo.size[:2])
                true = np.sort(np.asarray(truth.size[:2]))
                row["size_mm"] = 1e3 * float(np.abs(np.concatenate([est - true, [geo.size[2] - truth.size[2]]])).mean())
                if obj.kind == "box" and geo.plane is not None:
                    row["yaw_deg"] = yaw_error(geo.rotation, scene.cam_to_world, obj.yaw)
            row["close_neighbour"] = float(close_neighbour(scene.ids, truth.mask, obj_index(scene, obj), cell))
            rows.append(row)
    return rows[:objects]


def obj_index(scene, obj) -> int:
    return next(i for i, o in enumerate(scene.objects) if o is obj)


def close_neighbour(ids: np.ndarray, mask: np.ndarray, index: int, cell) -> bool:
    """Whether another object's pixels lie within one grid cell of this object's (a model-like box, off by
    up to a cell per edge, then takes in part of the neighbour)."""
    import cv2

    kernel = np.ones((2 * int(math.ceil(cell[1])) + 1, 2 * int(math.ceil(cell[0])) + 1), np.uint8)
    near = cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)
    return bool(((ids >= 0) & (ids != index) & near).any())


def mask_cost(size: str, seed: int) -> str:
    """What GroundingResult.mask costs per result at this size: bytes, and ms to build the message
    with and without it (a 4-object scene; needs the built messages: scripts/ros-env)."""
    try:
        from kosmos2_ros.core.serving.pipeline import GroundedBox, Result
        from kosmos2_ros.ros.convert import result_to_msg
    except ImportError:
        return "mask cost: run through scripts/ros-env to measure it"
    width, height = (int(v) for v in size.split("x"))
    rng = np.random.default_rng(seed)
    scene = random_scene(rng, width, height, count=4, distance=0.8)
    depth = noisy_depth(scene.depth_m, rng)
    res = Result(id="m", task="refer", width=width, height=height, frame_id="cam")
    for t in scene.truths:
        geo = object_geometry(t.box, scene.rgb, depth, scene.intrinsics, (width / 32.0, height / 32.0))
        res.objects.append(GroundedBox("o", 0, (0, 1), t.box, (0, 0, 1, 1), 1.0, None, geo))
    times = {}
    for masks in (True, False):
        t0 = time.perf_counter()
        for _ in range(20):
            result_to_msg(res, masks=masks)
        times[masks] = (time.perf_counter() - t0) / 20 * 1e3
    return (f"mask label image: {width * height} bytes (mono8, a byte a pixel) per result; "
            f"a result message built in {times[True]:.2f} ms with it, {times[False]:.2f} ms without")


def stat(rows, key, band=None) -> str:
    vals = [r[key] for r in rows if key in r and not math.isnan(r[key]) and (band is None or band[0] <= r["distance"] < band[1])]
    if not vals:
        return "-"
    return f"{np.median(vals):.3g} / {np.percentile(vals, 90):.3g}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=240)
    ap.add_argument("--sizes", default="640x480,1280x720")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=10, help="runs per box in the sweep (p95 of them)")
    ap.add_argument("--whole-window", action="store_true",
                    help="the accuracy tables with every pixel of the window examined (before max_window_px)")
    args = ap.parse_args(argv)
    for size in args.sizes.split(","):
        rows = measure(size, args.objects, args.seed, WHOLE_WINDOW if args.whole_window else GeometryConfig())
        valid = sum(r["valid"] for r in rows)
        print(f"\n{size}: {len(rows)} objects, geometry valid for {valid:.0f}; median / p90")
        header = "| metric | all | < 1 m | 1-1.5 m | >= 1.5 m |"
        print(header + "\n|---|---|---|---|---|")
        for key, label in (("mask_iou", "mask IoU"), ("refined_iou", "refined-box IoU"), ("model_iou", "model-like box IoU"),
                           ("centroid_mm", "centroid error mm"), ("old_centroid_mm", "today's point: error to centre mm"),
                           ("size_mm", "size error mm"), ("yaw_deg", "yaw error deg (boxes)"),
                           ("top_mm", "top-surface point error mm"), ("ms", "ms per object")):
            print(f"| {label} | {stat(rows, key)} | " + " | ".join(stat(rows, key, b) for b in BANDS) + " |")
        counts = [sum(1 for r in rows if b[0] <= r["distance"] < b[1]) for b in BANDS]
        print(f"| objects | {len(rows)} | " + " | ".join(map(str, counts)) + " |")
        close = [r for r in rows if r.get("close_neighbour")]
        print(f"close neighbours (another object within one grid cell): {len(close)} objects; centroid error mm "
              f"median / p90: all {stat(close, 'centroid_mm')}, up to 1.5 m "
              f"{stat([r for r in close if r['distance'] < 1.5], 'centroid_mm')}, 1-1.5 m "
              f"{stat(close, 'centroid_mm', BANDS[1])}; size error mm {stat(close, 'size_mm')}")
        print(mask_cost(size, args.seed))
    for size in args.sizes.split(","):
        print(box_sweep(size, args.repeat, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
