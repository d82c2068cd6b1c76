"""`kosmos2-build-engines`: export the ONNX graphs and build TensorRT engines, offline.

Also `ros2 run kosmos2_ros build_engines`. The node only uses existing engines unless its
`build_engines` parameter allows building them. The same command builds on TensorRT 10.x
(JetPack 6) and 11.x (desktop pip): engines are strongly typed, their precision comes from
the fp16 / bf16 graphs it exports (`core/backends/onnx/export.py`), never from a builder flag.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, List, Optional


def build_engines_main(argv: Optional[List[str]] = None) -> int:
    from .core.backends.base import BackendUnavailable
    from .core.backends.onnx import export
    from .core.backends.onnx.quantize import QuantizeError
    from .core.defaults import ARTIFACTS_DIR, PRECISIONS, QUANTIZED_PRECISIONS, default_model
    from .core.model.loading import ModelNotFound, resolve_model

    ap = argparse.ArgumentParser(prog="kosmos2-build-engines", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=default_model(),
                    help="hub id or local directory (default: $KOSMOS2_MODEL, else the hub id)")
    ap.add_argument("--artifacts-dir", default=ARTIFACTS_DIR)
    ap.add_argument("--precision", default="fp16", choices=PRECISIONS + QUANTIZED_PRECISIONS,
                    help="int8 / int4: onnxruntime's quantized graphs (implies --onnx-only); quantizing the "
                         "full-size model peaks at 18 GB (int8) and 7.5 GB (int4), so make them on a desktop and "
                         "copy the artifacts directory to a small robot")
    ap.add_argument("--device", default="cuda", help="the GPU the engines are for and built on: cuda or cuda:N")
    ap.add_argument("--onnx-only", action="store_true", help="export the ONNX graphs only (no TensorRT needed)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-prompt", type=int, default=256)
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--allow-download", action="store_true")
    ap.add_argument("--skip-fp16-check", action="store_true",
                    help="do not measure fp16 headroom of the model's activations before an fp16 build")
    args = ap.parse_args(argv)
    args.onnx_only = args.onnx_only or args.precision in QUANTIZED_PRECISIONS
    try:
        model_dir = resolve_model(args.model, allow_download=args.allow_download)
        check_fp16 = args.precision == "fp16" and not args.skip_fp16_check and not args.onnx_only
        # Loaded once for both the export (if the graphs are missing) and the fp16 check.
        model = export.load_for_export(model_dir) if check_fp16 else None
        # fp16 / bf16: the strongly typed graphs of that precision too (they can be exported on any
        # machine and copied with the artifacts directory to the one that builds the engines).
        out, _ = export.ensure_exported(model_dir, args.artifacts_dir, allow_export=True, model=model, log=print,
                                        precision=args.precision)
        print(f"ONNX graphs: {out}")
        if args.onnx_only:
            return 0
        from .core.backends.tensorrt import engines

        if check_fp16 and not fp16_check(model_dir, model):
            print("kosmos2-build-engines: activations come too close to fp16's range; build with --precision bf16 "
                  "(or pass --skip-fp16-check to build fp16 anyway)", file=sys.stderr)
            return 5
        limits = engines.EngineLimits(args.max_batch, args.max_prompt, args.max_context)
        out, _ = engines.ensure_engines(model_dir, args.artifacts_dir, args.precision, allow_build=True,
                                        limits=limits, device=args.device, log=print)
        print(f"TensorRT engines: {out}")
        return 0
    except (BackendUnavailable, ModelNotFound, export.ExportError, QuantizeError) as exc:
        print(f"kosmos2-build-engines: {exc}", file=sys.stderr)
        return 2


#: fp16's largest value over the largest activation seen must stay above this: real images and
#: prompts vary, and an engine's fused kernels may round intermediates differently.
FP16_MIN_HEADROOM = 4.0


def fp16_check(model_dir: str, model: Any = None) -> bool:
    """Largest activation of an fp32 forward (a synthetic scene, a caption and a grounding prompt)
    against fp16's range, printed; False when the tensors the fp16 graphs keep in fp16 (every
    matrix product's output; the residual streams stay fp32) come within FP16_MIN_HEADROOM."""
    import torch

    from .core.backends.onnx import export
    from .core.model.loading import TextCodec, load_processor
    from .fixtures.scenes import draw_scene

    model = model if model is not None else export.load_for_export(model_dir)
    processor = load_processor(model_dir)
    codec = TextCodec(processor)
    rgb, _ = draw_scene(640, 480)
    pixels = processor.image_processor(rgb, return_tensors="pt")["pixel_values"]
    worst = None
    for prompt in ("<grounding>An image of", "<grounding><phrase> the red square on the left</phrase>"):
        p = codec.encode(prompt)
        report = export.fp16_headroom(model, pixels, torch.tensor([p.input_ids]), torch.tensor([p.image_mask]))
        if worst is None or report["reduced_headroom"] < worst["reduced_headroom"]:
            worst = report
    assert worst is not None
    print(f"fp16 check: largest fp16 tensor {worst['reduced_max_abs']:.1f} at {worst['reduced_worst_at']} "
          f"(KV {worst['kv_max_abs']:.1f}); fp16 headroom {worst['reduced_headroom']:.1f}x. "
          f"fp32 residual stream and scaled image embeddings peak at {worst['max_abs']:.1f} "
          f"({worst['worst_at']}; {worst['headroom']:.1f}x)")
    return worst["reduced_headroom"] >= FP16_MIN_HEADROOM


if __name__ == "__main__":
    raise SystemExit(build_engines_main())
