"""`kosmos2-build-engines`: export the ONNX graphs and build TensorRT engines, offline.

Also `ros2 run kosmos2_ros build_engines`. The node only uses existing engines unless its
`build_engines` parameter allows building them.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def build_engines_main(argv: Optional[List[str]] = None) -> int:
    from .core import export
    from .core.backends.base import BackendUnavailable
    from .core.loading import ModelNotFound, resolve_model

    ap = argparse.ArgumentParser(prog="kosmos2-build-engines", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="microsoft/kosmos-2-patch14-224", help="hub id or local directory")
    ap.add_argument("--artifacts-dir", default="~/.cache/kosmos2_ros")
    ap.add_argument("--precision", default="fp16", choices=("fp16", "bf16", "fp32"))
    ap.add_argument("--onnx-only", action="store_true", help="export the ONNX graphs only (no TensorRT needed)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-prompt", type=int, default=256)
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--allow-download", action="store_true")
    args = ap.parse_args(argv)
    try:
        model_dir = resolve_model(args.model, allow_download=args.allow_download)
        out, _ = export.ensure_exported(model_dir, args.artifacts_dir, allow_export=True, log=print)
        print(f"ONNX graphs: {out}")
        if args.onnx_only:
            return 0
        from .core import engines

        limits = engines.EngineLimits(args.max_batch, args.max_prompt, args.max_context)
        out, _ = engines.ensure_engines(model_dir, args.artifacts_dir, args.precision, allow_build=True,
                                        limits=limits, log=print)
        print(f"TensorRT engines: {out}")
        return 0
    except (BackendUnavailable, ModelNotFound, export.ExportError) as exc:
        print(f"kosmos2-build-engines: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(build_engines_main())
