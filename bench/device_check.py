"""One prepared GPU check: build TensorRT engines for a tiny and a full-size random checkpoint,
compare token ids with the torch backend, and time decode against the bandwidth floor.

The engines are strongly typed, built from the fp32 / fp16 / bf16 graphs with no precision
builder flag: the one build path for TensorRT 10.x (JetPack 6) and 11.x (desktop pip). The
first line names the TensorRT that ran; each row gives the engine's KV-cache dtype as read
from the engine itself.

Equality covers free decoding of several prompts alone, three rows decoded together (rows
finish at different steps, so the arena idles some) and constrained decoding. Decode ms/token
is timed on the static arena with the step replayed as a CUDA graph and without it.

    scripts/ros-env python bench/device_check.py [--skip-full] [--out DIR]

Needs tensorrt (>= 10.3, 10.x or 11.x), a CUDA build of torch and a GPU; prints one table and
exits 0 when every row's tokens equal torch's (fp16/bf16: or differ only where torch's own top
two logits are within four times the measured logit error, `export.precision_verdict`: random
full-size weights give flat logits). bf16 rows run where the GPU has bf16 (sm80 and newer).
Not a test: it is what a lent GPU machine runs once. Within a short device budget run it
twice: `--skip-full --out W` (minutes), then `--only-full --out W`.
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
    from kosmos2_ros.core.backends.onnx import export
    from kosmos2_ros.core.backends.tensorrt.backend import TensorRTBackend
    from kosmos2_ros.core.backends.torch.backend import TorchBackend
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
    same, diffs, margins = True, [], []
    encoded = [codec.encode(prompt) for prompt in PROMPTS]
    for p in encoded:
        a = generate(ref_b, e_ref, [Row(p.input_ids, p.image_mask, max_new)], codec.vocab)[0].token_ids
        b = generate(trt_b, e_trt, [Row(p.input_ids, p.image_mask, max_new)], codec.vocab)[0].token_ids
        same &= a == b
        diff, more = export.forced_margins(ref_b, trt_b, e_ref, e_trt, p.input_ids, p.image_mask, a)
        diffs.append(diff)
        margins += more
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
    text = ref_b.model.text_model   # what a step must read: every decoder layer and the lm_head
    n_read = sum(x.numel() for x in text.model.layers.parameters()) + text.lm_head.weight.numel()
    floor_ms = n_read * (2 if precision != "fp32" else 4) / (bandwidth_gbs(torch) * 1e9) * 1e3
    kv = str(trt_b.kv_dtype).replace("torch.", "")
    rows.append((name, precision, kv, build_s, export.precision_verdict(same, margins, max(diffs), precision),
                 max(diffs), timing[False], timing[True], floor_ms))
    trt_b.close()
    ref_b.close()


HEADER = ("| checkpoint | precision | KV dtype | engine build s | tokens == torch | max |dlogits| "
          "| decode ms/token plain | decode ms/token CUDA graph | floor ms | graph x floor |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def row_text(name, prec, kv, build_s, same, diff, plain, graph, floor) -> str:
    return (f"| {name} | {prec} | {kv} | {build_s:.0f} | {same[0]} | {diff:.2e} | {plain:.2f} | {graph:.2f} |"
            f" {floor:.2f} | {graph / floor:.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-full", action="store_true", help="tiny checkpoint only (a few minutes)")
    ap.add_argument("--only-full", action="store_true", help="full-size checkpoint only (engine build: minutes)")
    ap.add_argument("--out", default="", help="work directory (reuse it to keep checkpoints, graphs and engines)")
    args = ap.parse_args(argv)
    import torch

    from kosmos2_ros.core.backends.tensorrt import engines
    from kosmos2_ros.core.checkpoints import build_tiny_checkpoint

    try:
        trt, _ = engines.require_tensorrt(), engines.require_cuda_torch()
    except engines.BackendUnavailable as exc:
        print(f"device_check: {exc}", file=sys.stderr)
        return 2
    cc = torch.cuda.get_device_capability(0)
    work = Path(args.out or tempfile.mkdtemp(prefix="kosmos2_device_"))
    art = work / "artifacts"
    rows, failures = [], []
    print(f"GPU: {torch.cuda.get_device_name(0)} (sm{cc[0]}{cc[1]}); TensorRT {trt.__version__}, strongly typed "
          f"engines; torch {torch.__version__}; rows print as they finish", flush=True)
    print(HEADER, flush=True)
    plan = []
    if not args.only_full:
        tiny = build_tiny_checkpoint(work / "tiny")
        plan += [("tiny", lambda: tiny, "fp32"), ("tiny", lambda: tiny, "fp16")]
        if tuple(cc) >= engines.MIN_SM["bf16"]:
            plan.append(("tiny", lambda: tiny, "bf16"))
    if not args.skip_full:
        plan.append(("full-size", lambda: build_tiny_checkpoint(work / "full", full_size=True), "fp16"))
    for name, make, prec in plan:
        try:
            check(name, make(), prec, art, torch, rows)
            print(row_text(*rows[-1]), flush=True)
        except Exception:  # noqa: BLE001 - report every failure, keep checking the rest
            failures.append(f"{name}/{prec}:\n{traceback.format_exc()}")
            print(failures[-1], flush=True)
    return 0 if rows and all(r[4][1] for r in rows) and not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
