"""One prepared GPU check: build TensorRT engines for a tiny and a full-size random checkpoint,
compare token ids with the torch backend, and time decode against the bandwidth floor.

Equality covers free decoding of several prompts alone, three rows decoded together (rows
finish at different steps, so the arena idles some) and constrained decoding. Decode ms/token
is timed on the static arena with the step replayed as a CUDA graph and without it.

    scripts/ros-env python bench/device_check.py [--skip-full] [--out DIR]

Needs tensorrt (10.x), a CUDA build of torch and a GPU; prints one table and exits 0 when
every row's tokens equal torch's. Not a test: it is what a lent GPU machine runs once.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ("<grounding><phrase> the red mug</phrase>", "<grounding>An image of")


def bandwidth_gbs(torch) -> float:
    """Device-to-device copy bandwidth (read + write), GB/s."""
    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 20 / (time.perf_counter() - t) / 1e9


def check(name, model_dir, precision, art, torch, rows, max_new=8):
    from kosmos2_ros.core.backends.tensorrt_backend import TensorRTBackend
    from kosmos2_ros.core.backends.torch_backend import TorchBackend
    from kosmos2_ros.core.decoding import Row, generate
    from kosmos2_ros.core.loading import TextCodec, load_processor

    codec = TextCodec(load_processor(str(model_dir)))
    t0 = time.perf_counter()
    trt_b = TensorRTBackend(str(model_dir), device="cuda", precision=precision, artifacts_dir=str(art),
                            build_engines=True)
    build_s = time.perf_counter() - t0
    ref_b = TorchBackend(str(model_dir), device="cuda", precision="fp32")
    pv = np.random.RandomState(0).randn(1, 3, 224, 224).astype(np.float32)
    e_ref, e_trt = ref_b.encode_image(pv), trt_b.encode_image(pv)
    same, diffs = True, []
    encoded = [codec.encode(prompt) for prompt in PROMPTS]
    for p in encoded:
        a = generate(ref_b, e_ref, [Row(p.input_ids, p.image_mask, max_new)], codec.vocab)[0].token_ids
        b = generate(trt_b, e_trt, [Row(p.input_ids, p.image_mask, max_new)], codec.vocab)[0].token_ids
        same &= a == b
        la, _ = ref_b.prefill(e_ref, p.input_ids, p.image_mask)
        lb, _ = trt_b.prefill(e_trt, p.input_ids, p.image_mask)
        diffs.append(float(np.abs(la - lb).max()))
    lengths = [max_new, max_new // 2, 3]   # rows finishing at different steps
    alone = [generate(ref_b, e_ref, [Row(p.input_ids, p.image_mask, n)], codec.vocab)[0].token_ids
             for p, n in zip(encoded, lengths)]
    together = generate(trt_b, e_trt, [Row(p.input_ids, p.image_mask, n) for p, n in zip(encoded, lengths)], codec.vocab)
    same &= [g.token_ids for g in together] == alone
    p = encoded[0]
    a = generate(ref_b, e_ref, [Row(p.input_ids, p.image_mask, 8, constrained=True)], codec.vocab)[0].token_ids
    b = generate(trt_b, e_trt, [Row(p.input_ids, p.image_mask, 8, constrained=True)], codec.vocab)[0].token_ids
    same &= a == b
    timing = {}
    for graph in (False, True):     # decode ms/token, one row, on the arena
        trt_b.cuda_graph = graph
        trt_b._step = None          # rebind the step context (and recapture) for this mode
        _, cache = trt_b.prefill(e_trt, p.input_ids, p.image_mask)
        for _ in range(4):
            _, cache = trt_b.decode(cache, 5)
        torch.cuda.synchronize()
        n, t = 32, time.perf_counter()
        for _ in range(n):
            _, cache = trt_b.decode(cache, 5)
        timing[graph] = (time.perf_counter() - t) / n * 1e3
    if trt_b.graph_error:
        print(f"{name}/{precision}: {trt_b.graph_error}")
    text_bytes = sum(x.numel() for x in ref_b.model.text_model.parameters()) * (2 if precision != "fp32" else 4)
    floor_ms = text_bytes / (bandwidth_gbs(torch) * 1e9) * 1e3
    rows.append((name, precision, build_s, same, max(diffs), timing[False], timing[True], floor_ms))
    trt_b.close()
    ref_b.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    import torch

    from kosmos2_ros.core.checkpoints import build_tiny_checkpoint

    work = Path(args.out or tempfile.mkdtemp(prefix="kosmos2_device_"))
    art = work / "artifacts"
    rows, failures = [], []
    tiny = build_tiny_checkpoint(work / "tiny")
    plan = [("tiny", tiny, "fp32"), ("tiny", tiny, "fp16")]
    if not args.skip_full:
        plan.append(("full-size", build_tiny_checkpoint(work / "full", full_size=True), "fp16"))
    for name, d, prec in plan:
        try:
            check(name, d, prec, art, torch, rows)
        except Exception:  # noqa: BLE001 - report every failure, keep checking the rest
            failures.append(f"{name}/{prec}:\n{traceback.format_exc()}")
    print(f"GPU: {torch.cuda.get_device_name(0)}")
    print("| checkpoint | precision | engine build s | tokens == torch | max |dlogits| | decode ms/token plain "
          "| decode ms/token CUDA graph | floor ms | graph x floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, prec, build_s, same, diff, plain, graph, floor in rows:
        print(f"| {name} | {prec} | {build_s:.0f} | {'yes' if same else 'NO'} | {diff:.2e} | {plain:.2f} | {graph:.2f} |"
              f" {floor:.2f} | {graph / floor:.2f} |")
    for f in failures:
        print(f)
    return 0 if rows and all(r[3] for r in rows) and not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
