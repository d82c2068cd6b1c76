"""The README's picture and example result: region commands on a synthetic RGB-D frame with ground truth.

    scripts/ros-env python scripts/snapshot_rgbd_result.py docs/rgbd_result.png

A ray-cast scene (`fixtures/rgbd_scenes.py`: exact colour, 16UC1 depth with a depth camera's noise,
intrinsics) goes through the pipeline with the tiny test checkpoint; each command is a `region`
command whose region is an object's box as Kosmos-2 would place it (the true box snapped to the
32x32 grid, edges moved by up to a cell), so the picture shows the node's geometry on honest
inputs, not the tiny model's grounding. Drawn as the node's ~/debug_image draws it (masks,
the model-like box, the refined box in white), with the ground-truth boxes in thin magenta. Prints
the first result as the node would publish it (GroundingResult, trimmed).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import cv2
    from PIL import Image

    from kosmos2_ros.core.serving.annotate import draw_result
    from kosmos2_ros.core.serving.config import Kosmos2Config
    from kosmos2_ros.core.serving.frames import Frame
    from kosmos2_ros.core.serving.pipeline import Command, Pipeline, Result
    from kosmos2_ros.core.spatial.geometry import depth_to_meters
    from kosmos2_ros.fixtures.checkpoints import build_tiny_checkpoint
    from kosmos2_ros.fixtures.rgbd_scenes import SceneObject, model_box, noisy_depth, plain_geometry, render
    from kosmos2_ros.ros.convert import result_to_msg

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/rgbd_result.png")
    objects = [SceneObject("box", (-0.12, 0.0), (0.09, 0.07, 0.11), yaw=0.5, colour=(200, 40, 40), name="red box"),
               SceneObject("cylinder", (0.05, 0.03), (0.08, 0.08, 0.13), colour=(40, 90, 200), name="blue can"),
               SceneObject("sphere", (0.0, -0.12), (0.09, 0.09, 0.09), colour=(40, 160, 60), name="green ball")]
    scene = render(objects, 640, 480, distance=0.8, elevation_deg=45.0)
    rng = np.random.default_rng(3)
    depth = depth_to_meters(scene.depth_16uc1(noisy_depth(scene.depth_m, rng)), "16UC1")
    model = build_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny")
    pipe = Pipeline.load(Kosmos2Config(model=str(model), backend="torch", device="cpu", allow_download=False))
    frame = Frame(rgb=scene.rgb, stamp_ns=1_764_576_000_000_000_000, frame_id="camera_color_optical_frame",
                  depth_m=depth, intrinsics=scene.intrinsics)
    results = [pipe.run(Command(id=f"r{i}", task="region", region_px=model_box(t.box, plain_geometry(640, 480), rng)),
                        frame) for i, t in enumerate(scene.truths)]
    msg = result_to_msg(results[0])          # as published, before the picture's labels
    combined = Result(id="all", task="region", width=640, height=480)
    for i, (res, obj) in enumerate(zip(results, objects)):
        for o in res.objects:
            o.phrase, o.entity_index = obj.name, i
            combined.objects.append(o)
    img = draw_result(scene.rgb, combined, "synthetic RGB-D scene; magenta: ground-truth boxes")
    for t in scene.truths:
        x0, y0, x1, y1 = (int(v) for v in t.box)
        cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), (255, 0, 255), 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(out)
    o = msg.objects[0]
    p, s, g = o.pose.position, o.size, o.grasp.position
    print(f"saved {out}\nid: {msg.id}\ntask: {msg.task}\nstatus: {msg.status}\ntext: '{msg.text}'\n"
          f"header: {{frame_id: {msg.header.frame_id}}}\ngeometry_frame_id: {msg.geometry_frame_id}\n"
          f"mask: {{width: {msg.mask.width}, height: {msg.mask.height}, encoding: {msg.mask.encoding}}}\nobjects:\n"
          f"- phrase: '{o.phrase}'\n  box: {{x_min: {o.box.x_min:.0f}, y_min: {o.box.y_min:.0f}, x_max: {o.box.x_max:.0f}, "
          f"y_max: {o.box.y_max:.0f}}}\n  box_refined: {{x_min: {o.box_refined.x_min:.0f}, y_min: {o.box_refined.y_min:.0f}, "
          f"x_max: {o.box_refined.x_max:.0f}, y_max: {o.box_refined.y_max:.0f}}}\n"
          f"  pose: {{position: {{x: {p.x:.3f}, y: {p.y:.3f}, z: {p.z:.3f}}}, orientation: {{...}}}}\n"
          f"  size: {{x: {s.x:.3f}, y: {s.y:.3f}, z: {s.z:.3f}}}\n"
          f"  grasp: {{position: {{x: {g.x:.3f}, y: {g.y:.3f}, z: {g.z:.3f}}}, orientation: {{...}}}}\n"
          f"  grasp_width: {o.grasp_width:.3f}\n  geometry_valid: {str(o.geometry_valid).lower()}\n"
          f"truth: centre {np.round(scene.truths[0].centre, 3).tolist()}, size {list(objects[0].size)}, "
          f"box {scene.truths[0].box}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
