"""The fp16 / bf16 and int8 / int4 graphs against the fp32 graph, on the CPU (where TensorRT cannot run).

For the trained tiny checkpoint and (with --full-size) the full-size architecture with random
weights, prints one row per precision: where it ran (onnxruntime CPU for fp16, int8 and int4;
torch bfloat16 for bf16, whose MatMul onnxruntime's CPU provider lacks), the largest image-embedding
and logit differences from the fp32 graph (teacher-forced on fp32's greedy tokens), the logit
scale for comparison, whether free greedy tokens equal fp32's (or differ only where fp32's
top-two margin is within 4x the measured error: `export.precision_verdict`, the criterion
bench/device_check.py applies to the engines) and, for the trained checkpoint, whether the
boxes of constrained referring expressions equal fp32's.

Quantized weights are not expected to be exact, so their rows also give agreement rates: of
teacher-forced steps whose argmax equals fp32's, and of free generations equal to fp32's, with
every disagreement's fp32 top-two margin against the measured error. With --full-size, a long
run adds the logit error per step and the greedy-token agreement over `--long-steps` steps
(teacher-forced on fp32's own greedy sequence, eos ignored) on the onnxruntime backend.

    scripts/ros-env python bench/precision_check.py [--full-size] [--steps 8] [--out DIR]
        [--precisions fp16,bf16,int8,int4] [--long-steps 300]

The full-size run exports a graph set of a 1.66 B-parameter model per precision and keeps at
most one set loaded at a time (about 10 GB peak); expect several minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kosmos2_ros.core.defaults import QUANTIZED_PRECISIONS  # noqa: E402

PROMPTS = ("<grounding><phrase> the red square</phrase>", "<grounding>An image of")
EXPRESSIONS = ("the red square", "the blue square", "the green square", "a square on the left")

HEADER = ("| checkpoint | precision | runs on | max abs d image_embeds | max abs d logits | logit scale (max abs) "
          "| greedy tokens == fp32 | boxes == fp32 |\n|---|---|---|---|---|---|---|---|")


def record(backend, pixels, codec, steps, tokens=None):
    """(image embeddings, per prompt: free greedy tokens and teacher-forced logits along `tokens`)."""
    from kosmos2_ros.core.backends.onnx import export
    from kosmos2_ros.core.model.decoding import Row, generate

    embeds = backend.encode_image(pixels)
    out = []
    for j, prompt in enumerate(PROMPTS):
        p = codec.encode(prompt)
        free = generate(backend, embeds, [Row(p.input_ids, p.image_mask, steps)], codec.vocab)[0].token_ids
        forced = export.forced_logits(backend, embeds, p.input_ids, p.image_mask, tokens[j] if tokens else free)
        out.append((free, forced))
    return np.asarray(embeds, dtype=np.float32), out


def boxes(backend, model_dir, processor):
    """Boxes of constrained referring expressions on generated scenes (the trained checkpoint)."""
    from kosmos2_ros.core.serving.config import Kosmos2Config
    from kosmos2_ros.core.serving.frames import Frame
    from kosmos2_ros.core.serving.pipeline import Command, Pipeline
    from kosmos2_ros.fixtures.scenes import draw_scene

    pipe = Pipeline(Kosmos2Config(model=str(model_dir), enable_3d=False), backend, processor)
    found = []
    for seed in range(2):
        rgb, _ = draw_scene(320, 240, rng=np.random.default_rng(seed))
        frame = Frame(rgb=rgb, stamp_ns=seed + 1, frame_id="cam")
        for res in pipe.run_batch([Command(id=e, task="refer", text=e) for e in EXPRESSIONS], frame):
            assert res.status == 0, res.error
            found.append([b for ent in res.entities for b in ent.boxes_norm])
    return found


def check(name, model_dir, art, steps, with_boxes, precisions):
    from kosmos2_ros.core.backends.onnx import export
    from kosmos2_ros.core.model.loading import TextCodec, load_processor
    from kosmos2_ros.fixtures.scenes import draw_scene

    processor = load_processor(str(model_dir))
    codec = TextCodec(processor)
    pixels = processor.image_processor(draw_scene(640, 480)[0], return_tensors="np")["pixel_values"]
    pixels = np.asarray(pixels, dtype=np.float32)
    t = time.perf_counter()
    model = export.load_for_export(str(model_dir))
    for prec in ("fp32",) + precisions:
        export.ensure_exported(str(model_dir), str(art), model=model, precision=prec, log=print)
    del model      # one set of weights loaded at a time: the full-size model is 6.7 GB in fp32
    gc.collect()
    print(f"{name}: graphs ready in {time.perf_counter() - t:.0f} s", flush=True)
    runs = {}
    for prec in ("fp32",) + precisions:   # fp32 first: the others are forced on its tokens
        t = time.perf_counter()
        backend = export.GraphBackend(str(model_dir), str(art), prec)
        tokens = [free for free, _ in runs["fp32"][1]] if runs else None
        embeds, rows = record(backend, pixels, codec, steps, tokens)
        runs[prec] = (embeds, rows, backend.runs_on, boxes(backend, model_dir, processor) if with_boxes else None)
        backend.close()
        del backend
        gc.collect()
        print(f"{name}/{prec}: {time.perf_counter() - t:.0f} s", flush=True)
    e32, rows32, _, boxes32 = runs["fp32"]
    scale = max(float(np.abs(f).max()) for _, forced in rows32 for f in forced)
    out = []
    for prec in precisions:
        embeds, rows, runs_on, bx = runs[prec]
        diff, margins, same, steps_total, free_equal = 0.0, [], True, 0, 0
        for (free32, forced32), (free, forced) in zip(rows32, rows):
            d, m = export.compare_logits(forced32, forced)
            diff, margins, same = max(diff, d), margins + m, same and free == free32
            steps_total += len(forced32)
            free_equal += free == free32
        verdict = export.precision_verdict(same, margins, diff, prec)
        if prec in QUANTIZED_PRECISIONS:
            verdict = (f"{verdict[0]}; forced argmax == fp32 at {steps_total - len(margins)}/{steps_total} steps, "
                       f"free generations == {free_equal}/{len(rows)}", verdict[1])
        differ = 0 if bx is None else sum(a != b for a, b in zip(bx, boxes32))
        box_text = "-" if bx is None else (
            f"yes ({sum(map(len, bx))} boxes)" if bx == boxes32 else f"NO ({differ} of {len(bx)} commands differ)")
        out.append((name, prec, runs_on, float(np.abs(embeds - e32).max()), diff, scale, verdict, box_text))
    return out


def long_run(model_dir, art, precision, steps):
    """Teacher-forced on fp32's greedy sequence for `steps` steps (eos ignored), on the onnxruntime
    backend: (per-step max |dlogits| median and max, logit scale, argmax agreement, margins at the
    disagreements)."""
    from kosmos2_ros.core.backends.onnx.backend import OnnxBackend
    from kosmos2_ros.core.model.loading import TextCodec, load_processor
    from kosmos2_ros.fixtures.scenes import draw_scene

    processor = load_processor(str(model_dir))
    p = TextCodec(processor).encode(PROMPTS[1])
    pixels = np.asarray(processor.image_processor(draw_scene(640, 480)[0], return_tensors="np")["pixel_values"],
                        dtype=np.float32)
    from kosmos2_ros.core.backends.onnx import export

    logits = {}
    tokens = []
    for prec in ("fp32", precision):
        backend = OnnxBackend(str(model_dir), device="cpu", precision=prec, artifacts_dir=str(art))
        embeds = backend.encode_image(pixels)
        if prec == "fp32":        # fp32's own greedy sequence, eos ignored
            row, cache = backend.prefill(embeds, p.input_ids, p.image_mask)
            out = [np.asarray(row, dtype=np.float32)]
            for _ in range(steps):
                tokens.append(int(np.argmax(out[-1])))
                row, cache = backend.decode(cache, tokens[-1])
                out.append(np.asarray(row, dtype=np.float32))
            del cache
        else:
            out = export.forced_logits(backend, embeds, p.input_ids, p.image_mask, tokens)
        logits[prec] = out
        backend.close()
        del backend
        gc.collect()
    diffs = [float(np.abs(a - b).max()) for a, b in zip(logits["fp32"], logits[precision])]
    _, margins = export.compare_logits(logits["fp32"], logits[precision])
    scale = max(float(np.abs(a).max()) for a in logits["fp32"])
    return float(np.median(diffs)), max(diffs), scale, len(diffs) - len(margins), len(diffs), margins


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full-size", action="store_true", help="also the full-size architecture (random weights)")
    ap.add_argument("--steps", type=int, default=8, help="greedy tokens per prompt")
    ap.add_argument("--out", default="", help="work directory (reuse it to keep checkpoints and graphs)")
    ap.add_argument("--precisions", default="fp16,bf16,int8,int4", help="precisions to check against fp32")
    ap.add_argument("--long-steps", type=int, default=300, help="full size: steps of the quantized long run")
    args = ap.parse_args(argv)
    from kosmos2_ros.fixtures.checkpoints import build_tiny_checkpoint

    precisions = tuple(p.strip() for p in args.precisions.split(",") if p.strip() and p.strip() != "fp32")
    work = Path(args.out or tempfile.mkdtemp(prefix="kosmos2_precision_"))
    plan = [("tiny (trained)", work / "tiny", dict(train=True), True)]
    if args.full_size:
        plan.append(("full-size (random)", work / "full", dict(full_size=True), False))
    rows = []
    for name, path, kw, with_boxes in plan:
        if not (path / "config.json").is_file():
            build_tiny_checkpoint(path, **kw)
        rows += check(name, path, work / "artifacts", args.steps, with_boxes, precisions)
    print(HEADER)
    for name, prec, runs_on, de, dl, scale, (verdict, _), bx in rows:
        print(f"| {name} | {prec} | {runs_on} | {de:.1e} | {dl:.1e} | {scale:.1f} | {verdict} | {bx} |")
    quantized = [p for p in precisions if p in QUANTIZED_PRECISIONS]
    if args.full_size and quantized:
        print()
        print(f"full-size (random) long run: {args.long_steps} steps teacher-forced on fp32's greedy sequence "
              f"after {PROMPTS[1]!r}")
        print("| precision | median max abs d logits per step | max | logit scale | argmax == fp32 "
              "| fp32 margins at the disagreements | within 4x the max error |")
        print("|---|---|---|---|---|---|---|")
        for prec in quantized:
            med, worst, scale, agree, n, margins = long_run(work / "full", work / "artifacts", prec, args.long_steps)
            shown = ", ".join(f"{m:.2f}" for m in sorted(margins)[-5:]) or "none"
            within = all(m <= 4 * worst for m in margins)
            print(f"| {prec} | {med:.3f} | {worst:.3f} | {scale:.1f} | {agree}/{n} ({agree / n * 100:.1f} %) "
                  f"| {len(margins)} (largest: {shown}) | {'yes' if within else 'NO'} |")
    return 0 if all(r[6][1] and (r[7] == "-" or r[7].startswith("yes")) for r in rows
                    if r[1] not in QUANTIZED_PRECISIONS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
