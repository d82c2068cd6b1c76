"""Command-line tools without ROS: `kosmos2-ground` (one image, one task) and `kosmos2-demo`.

`kosmos2-build-engines` lives in `engine_cli` and is re-exported here.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import List, NoReturn, Optional, Sequence

from .core.defaults import DEFAULT_MODEL, default_model
from .core.model.loading import MODEL_ENV, quiet_libraries

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_MODEL, EXIT_COMMAND = 0, 1, 2, 3, 4


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line, without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore")
    quiet_libraries()


class ModelLoadError(RuntimeError):
    """The model or backend cannot be loaded; the message is one line saying why."""


def load_pipeline(config):
    """`Pipeline.load`, with every failure a user can fix turned into a one-line ModelLoadError."""
    from .core.backends.base import BackendError
    from .core.model.loading import ModelNotFound, UnsafeCheckpoint
    from .core.serving.pipeline import Pipeline

    try:
        return Pipeline.load(config)
    except (ModelNotFound, UnsafeCheckpoint, BackendError, ImportError, OSError, ValueError) as exc:
        raise ModelLoadError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def _fail(prog: str, code: int, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def load_rgb(path: str):
    """An image file -> H x W x 3 uint8 RGB (PIL, so every common format loads)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def load_depth(path: str):
    """A depth file aligned with the image -> float32 metres (NaN = no reading): a 16-bit PNG in millimetres
    (as a RealSense or Azure Kinect driver saves 16UC1), or a .npy of metres (32FC1)."""
    import numpy as np

    from .core.spatial.geometry import depth_to_meters

    if path.endswith(".npy"):
        return depth_to_meters(np.load(path).astype(np.float32), "32FC1")
    from PIL import Image

    with Image.open(path) as img:
        depth = np.asarray(img)
    if depth.dtype not in (np.uint16, np.int32) or depth.ndim != 2:
        raise ValueError(f"expected a single-channel 16-bit PNG in millimetres, got {depth.dtype} {depth.shape}")
    return depth_to_meters(depth.astype(np.uint16), "16UC1")


def save_rgb(path: str, rgb) -> None:
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def _ground_parser() -> _Parser:
    from .core.backends.registry import AUTO, CHOICES
    from .core.model.tasks import Task
    from .core.serving.config import DECODING, PRECISION_CHOICES, Kosmos2Config

    p = _Parser(prog="kosmos2-ground", description="Run one Kosmos-2 task on one image (no ROS needed).")
    p.add_argument("--model", default=default_model(),
                   help=f"hub id or local directory (default: ${MODEL_ENV} or {DEFAULT_MODEL})")
    p.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    p.add_argument("--task", default="refer", choices=[t.value for t in Task])
    p.add_argument("--text", default="", help="expression, caption with [phrases], question, or raw prompt")
    p.add_argument("--region", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"),
                   help="region in pixels: --task region describes it; vqa and check ask about it (its [bracketed] "
                        "phrase, or the first this/that/it of the question, is the region)")
    p.add_argument("--backend", default=AUTO, choices=CHOICES,
                   help="auto (default): tensorrt where a GPU and engines exist, else onnxruntime, else torch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                   help="auto: fp16 on a GPU, fp32 on the CPU; int8 / int4: onnxruntime's quantized graphs")
    p.add_argument("--artifacts-dir", default=Kosmos2Config.artifacts_dir,
                   help="where ONNX graphs (and their int8 / int4 variants) and TensorRT engines are cached")
    p.add_argument("--decoding", default=Kosmos2Config.decoding, choices=DECODING,
                   help="constrained: referring expressions decode only location tokens (fast); free: plain greedy")
    p.add_argument("--max-new-tokens", type=int, default=64)
    add_ngram_argument(p)
    p.add_argument("--score-threshold", type=float, default=0.0)
    p.add_argument("--presence-threshold", type=float, default=Kosmos2Config.presence_threshold,
                   help="refer: p(<object>) below it answers 'not found' with the reason (as the node's parameter)")
    p.add_argument("--max-candidates", type=int, default=Kosmos2Config.max_candidates,
                   help="other boxes the model considered, best first (0 = none)")
    p.add_argument("--describe-candidates", action="store_true",
                   help="describe an ambiguous result's boxes in words (a second pass)")
    p.add_argument("--depth", metavar="DEPTH",
                   help="depth aligned with --image: a 16-bit PNG in millimetres or a .npy in metres (3D points and "
                        "object geometry; needs --intrinsics)")
    p.add_argument("--intrinsics", nargs=4, type=float, metavar=("FX", "FY", "CX", "CY"),
                   help="the colour camera's K (camera_info's fx, fy, cx, cy) for the image's size")
    p.add_argument("--no-download", action="store_true", help="never fetch the model from the hub")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--annotate", metavar="OUT.png", help="write the image with boxes and phrases drawn")
    return p


def add_ngram_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-repeat-ngram-size", type=int, default=-1, metavar="N",
                   help="no n-gram of N tokens twice (0 = off; default -1: the checkpoint's generation config, "
                        "3 for microsoft/kosmos-2-patch14-224)")


def ground_main(argv: Optional[Sequence[str]] = None) -> int:
    prog = "kosmos2-ground"
    args = _ground_parser().parse_args(argv)
    _quiet_libraries()
    from .core.serving.config import ConfigError, Kosmos2Config
    from .core.serving.frames import Frame
    from .core.serving.pipeline import Command, Status

    if args.task == "region" and args.region is None:
        return _fail(prog, EXIT_USAGE, "--task region needs --region X0 Y0 X1 Y1")
    if (args.depth is None) != (args.intrinsics is None):
        return _fail(prog, EXIT_USAGE, "--depth and --intrinsics go together (3D needs both)")
    try:
        rgb = load_rgb(args.image)
    except (OSError, ValueError) as exc:
        return _fail(prog, EXIT_USAGE, f"cannot read image {args.image!r}: {exc}")
    try:
        depth_m = load_depth(args.depth) if args.depth else None
    except (OSError, ValueError) as exc:
        return _fail(prog, EXIT_USAGE, f"cannot read depth {args.depth!r}: {exc}")
    try:
        config = Kosmos2Config.from_dict(dict(
            model=args.model, backend=args.backend, device=args.device, precision=args.precision,
            artifacts_dir=args.artifacts_dir, decoding=args.decoding, max_new_tokens=args.max_new_tokens,
            no_repeat_ngram_size=args.no_repeat_ngram_size,
            max_new_tokens_limit=max(512, args.max_new_tokens), score_threshold=args.score_threshold,
            presence_threshold=args.presence_threshold, max_candidates=args.max_candidates,
            describe_candidates=args.describe_candidates,
            allow_download=not args.no_download, enable_3d=depth_m is not None))
    except ConfigError as exc:
        return _fail(prog, EXIT_USAGE, str(exc))
    t0 = time.perf_counter()
    try:
        pipeline = load_pipeline(config)
    except ModelLoadError as exc:
        return _fail(prog, EXIT_MODEL, str(exc))
    load_ms = (time.perf_counter() - t0) * 1e3
    if args.backend == "auto" or pipeline.backend.caveat:
        print(f"{prog}: {pipeline.backend_reason}", file=sys.stderr)
    command = Command(id="cli", task=args.task, text=args.text,
                      region_px=tuple(args.region) if args.region else None)
    intrinsics = None
    if args.intrinsics:
        from .core.spatial.geometry import CameraIntrinsics

        fx, fy, cx, cy = args.intrinsics
        intrinsics = CameraIntrinsics(fx, fy, cx, cy, rgb.shape[1], rgb.shape[0])
    result = pipeline.run(command, Frame(rgb=rgb, frame_id=Path(args.image).name, depth_m=depth_m,
                                         intrinsics=intrinsics))
    result.timings_ms["load"] = load_ms
    if args.annotate and result.status is Status.OK:
        from .core.serving.annotate import draw_result

        save_rgb(args.annotate, draw_result(rgb, result))
    if args.json:
        out = result.to_json()
        out.update(model=args.model, backend=args.backend, decoding=args.decoding,
                   max_new_tokens=args.max_new_tokens)
        print(json.dumps(out, allow_nan=False, default=_json_default).replace("NaN", "null"))
    else:
        print(_human(result))
    if result.status is not Status.OK:
        if not args.json:
            print(f"{prog}: error: {result.status.name.lower()}: {result.error}", file=sys.stderr)
        return EXIT_COMMAND
    return EXIT_OK


def _json_default(value):
    return None


def _human(result) -> str:
    lines = [f"status: {result.status.name.lower()}" + (f" ({result.error})" if result.error else ""),
             f"text:   {result.text}"]
    if result.answer:
        lines.append(f"answer: {result.answer} (p(yes) {result.answer_probability:.3f})")
    for obj in result.objects:
        x0, y0, x1, y1 = obj.box_px
        lines.append(f"  - {obj.phrase!r}: box px ({x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f}) score {obj.score:.3f}")
    t = result.timings_ms
    lines.append("time ms: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    return "\n".join(lines)


# -- demo --------------------------------------------------------------------------------------

def demo_scene(width: int = 640, height: int = 480):
    """A synthetic table-top scene with objects at known places (no files needed)."""
    import numpy as np

    from .fixtures.scenes import draw_scene

    rgb, objects = draw_scene(width, height, np.random.default_rng(7))
    return rgb, objects


def demo_main(argv: Optional[Sequence[str]] = None) -> int:
    from .core.backends.registry import AUTO, CHOICES

    prog = "kosmos2-demo"
    p = _Parser(prog=prog, description="Ground a few commands on generated images and write annotated PNGs.")
    p.add_argument("--model", default=default_model())
    p.add_argument("--backend", default=AUTO, help=" | ".join(CHOICES))
    p.add_argument("--out", default="out/demo", help="folder for annotated images and results.json")
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args(argv)
    _quiet_libraries()
    from .core.backends.base import BackendError
    from .core.model.loading import ModelNotFound, resolve_model
    from .core.serving.annotate import draw_result
    from .core.serving.config import ConfigError, Kosmos2Config
    from .core.serving.frames import Frame
    from .core.serving.pipeline import Command, Pipeline
    from .fixtures.checkpoints import build_tiny_checkpoint

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    label = args.model
    try:
        model_dir = resolve_model(args.model)
    except ModelNotFound as exc:
        print(f"[demo] The model {args.model!r} is not available here:\n[demo]   {exc}")
        tiny = out / "tiny-test-checkpoint"
        if not (tiny / "config.json").exists():
            print(f"[demo] Building a TINY TEST CHECKPOINT in {tiny} instead (trained for seconds on synthetic"
                  " scenes; it shows the pipeline working end to end, not Kosmos-2's quality).")
            build_tiny_checkpoint(tiny)
        model_dir, label = str(tiny), "TINY TEST CHECKPOINT (not the real model)"
    try:
        config = Kosmos2Config(model=model_dir, backend=args.backend, max_new_tokens=args.max_new_tokens,
                               allow_download=False)
        t0 = time.perf_counter()
        pipeline = Pipeline.load(config)
    except (ConfigError, BackendError, ImportError, OSError) as exc:
        return _fail(prog, EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_MODEL, str(exc))
    print(f"[demo] model: {label}; {pipeline.backend_reason}; loaded in {time.perf_counter() - t0:.1f} s")
    rgb, objects = demo_scene()
    frame = Frame(rgb=rgb, frame_id="demo_camera")
    first = objects[0]
    commands = [
        Command(id="refer", task="refer", text=first["name"]),
        Command(id="caption", task="caption"),
        Command(id="describe", task="describe"),
        Command(id="region", task="region", region_px=tuple(first["box"])),
        Command(id="vqa", task="vqa", text="What is on the table?"),
    ]
    save_rgb(str(out / "input.png"), rgb)
    report = []
    for cmd in commands:
        res = pipeline.run(cmd, frame)
        path = out / f"{cmd.id}.png"
        save_rgb(str(path), draw_result(rgb, res, title=f"{cmd.task}: {res.text[:60]}  [{label[:28]}]"))
        boxes = ", ".join(f"{o.phrase!r} ({o.box_px[0]:.0f},{o.box_px[1]:.0f},{o.box_px[2]:.0f},{o.box_px[3]:.0f})"
                          for o in res.objects)
        print(f"[demo] {cmd.task:9s} {res.status.name.lower():5s} {res.timings_ms['total']:8.1f} ms  "
              f"text={res.text[:70]!r}  boxes=[{boxes}]  -> {path}")
        report.append(res.to_json())
    (out / "results.json").write_text(json.dumps({"model": label, "results": report}, indent=2, default=_json_default))
    print(f"[demo] annotated images and results.json written to {out}/ (ground truth: {first['name']} at "
          f"{tuple(first['box'])})")
    return EXIT_OK


def build_engines_main(argv: Optional[List[str]] = None) -> int:
    from .engine_cli import build_engines_main as _main

    return _main(argv)


if __name__ == "__main__":
    sys.exit(ground_main())
