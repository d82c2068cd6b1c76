"""What candidates and their descriptions cost a referring expression, measured in one run.

    scripts/ros-env python bench/bench_candidates.py [--full-size] [--backend onnxruntime] [--frames 3]

A refer command (constrained decoding) on fresh frames, the same commands with max_candidates 0, 3
and 8, and with describe_candidates on an ambiguous result (every box of it described in one batch);
p50 latency per command and the extra over max_candidates 0 as a fraction. The chosen box's tokens
are checked equal across the rows (candidates never change the answer). Full size: the real
architecture (1.66 B parameters) with random weights, whose compute is the real model's. Target: 3
candidates add at most 15 % to a refer command.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full-size", action="store_true", help="real architecture, random weights")
    ap.add_argument("--backend", default="auto", help="backend (default auto: onnxruntime on this CPU)")
    ap.add_argument("--frames", type=int, default=3, help="fresh frames (one command each) per row")
    ap.add_argument("--workdir", default="", help="reuse checkpoints and graphs from an earlier run")
    args = ap.parse_args(argv)
    import numpy as np

    from kosmos2_ros.core.serving.config import Kosmos2Config
    from kosmos2_ros.core.serving.frames import Frame
    from kosmos2_ros.core.serving.pipeline import Command, Pipeline
    from kosmos2_ros.fixtures.checkpoints import build_tiny_checkpoint
    from kosmos2_ros.fixtures.scenes import draw_scene

    work = Path(args.workdir or tempfile.mkdtemp(prefix="kosmos2_candidates_"))
    model = work / ("full_size" if args.full_size else "tiny")
    if not (model / "config.json").is_file():
        build_tiny_checkpoint(model, full_size=args.full_size)
    pipe = Pipeline.load(Kosmos2Config(model=str(model), backend=args.backend, device="cpu", allow_download=False,
                                       artifacts_dir=str(work / "artifacts"), enable_3d=False, ambiguity_ratio=0.0))
    print(f"{pipe.backend_reason}; checkpoint {model}", flush=True)
    rng = np.random.default_rng(0)
    scenes = [draw_scene(640, 480, rng, count=3)[0] for _ in range(args.frames + 1)]
    rows = [("max_candidates 0", dict(max_candidates=0)), ("max_candidates 3", dict(max_candidates=3)),
            ("max_candidates 8", dict(max_candidates=8)),
            ("max_candidates 3 + descriptions", dict(max_candidates=3, describe_candidates=1))]
    pipe.run(Command(id="warm", task="refer", text="a red square"), Frame(rgb=scenes[-1]))   # first-call costs
    measured, tokens = {}, {}
    for name, extra in rows:
        times = []
        for i, rgb in enumerate(scenes[:-1]):
            frame = Frame(rgb=rgb.copy(), stamp_ns=i + 1)      # a fresh frame: vision encoding included
            t = time.perf_counter()
            res = pipe.run(Command(id=f"{name}-{i}", task="refer", text="a red square", **extra), frame)
            times.append((time.perf_counter() - t) * 1e3)
            assert res.status == 0, res.error
            tokens.setdefault(i, res.token_ids)
            assert res.token_ids == tokens[i], "candidates changed the chosen box's tokens"
        measured[name] = (statistics.median(times), len(res.candidates), sum(bool(o.description) for o in
                                                                          res.objects + res.candidates))
    base = measured["max_candidates 0"][0]
    print("\n| row | candidates | described boxes | p50 ms / refer | extra over 0 candidates |\n|---|---|---|---|---|")
    for name, (ms, count, described) in measured.items():
        print(f"| {name} | {count} | {described} | {ms:.1f} | {100 * (ms / base - 1):+.1f} % |")
    print(f"\n(backend {pipe.backend.name}, {args.frames} fresh 640x480 frames per row, constrained decoding; "
          "the chosen box's tokens were equal in every row)")
    pipe.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
