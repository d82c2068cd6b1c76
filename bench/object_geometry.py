"""Object geometry from a grounded box and RGB-D, measured on synthetic scenes with ground truth.

Boxes, cylinders and spheres standing on a table (`core/rgbd_scenes.py`: exact ray casting, a
structured-light depth noise model), seen from a robot-like viewpoint 0.4-2 m away; each object's
box as Kosmos-2 gives it (the true box snapped to the 32x32 grid, each edge moved by up to a cell).
Prints one table per resolution: for the new method (`core/object_geometry.py`) and today's one
point (`geometry.box_point_3d`: the median depth of the box's inner half through its centre), the
median and p90 of each error, split by distance, and milliseconds per object.

    scripts/ros-env python bench/object_geometry.py [--objects 240] [--sizes 640x480,1280x720]
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

from kosmos2_ros.core.geometry import box_point_3d  # noqa: E402
from kosmos2_ros.core.grounding import box_iou as iou  # noqa: E402
from kosmos2_ros.core.object_geometry import object_geometry  # noqa: E402
from kosmos2_ros.core.rgbd_scenes import model_box, noisy_depth, plain_geometry, random_scene  # noqa: E402

BANDS = ((0.0, 1.0), (1.0, 1.5), (1.5, 3.0))


def yaw_error(rotation, cam_to_world, truth_yaw) -> float:
    """Smallest angle between the estimated and true box axes about the vertical, modulo 90 degrees."""
    axis = cam_to_world[:3, :3] @ rotation[:, 0]
    est = math.atan2(axis[1], axis[0])
    diff = (est - truth_yaw) % (math.pi / 2)
    return math.degrees(min(diff, math.pi / 2 - diff))


def measure(size: str, objects: int, seed: int) -> List[Dict[str, float]]:
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
            geo = object_geometry(box, scene.rgb, depth, scene.intrinsics, cell)
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
            rows.append(row)
    return rows[:objects]


def mask_cost(size: str, seed: int) -> str:
    """What GroundingResult.mask costs per result at this size: bytes, and ms to build the message
    with and without it (a 4-object scene; needs the built messages: scripts/ros-env)."""
    try:
        from kosmos2_ros.core.pipeline import GroundedBox, Result
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
    args = ap.parse_args(argv)
    for size in args.sizes.split(","):
        rows = measure(size, args.objects, args.seed)
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
        print(mask_cost(size, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
