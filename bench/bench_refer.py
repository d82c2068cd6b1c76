"""Referring-expression benchmark: transformers `generate` baseline vs this package's paths.

    scripts/ros-env python bench/bench_refer.py              # small toy checkpoint (seconds)
    scripts/ros-env python bench/bench_refer.py --full-size  # real architecture, random weights
    python bench/bench_refer.py --full-size --device cuda --backends torch,tensorrt   # on a GPU

Workload: frames arrive one after another; each frame gets 1 (or 4) referring expressions
`<grounding><phrase> {expr}</phrase>`. Every frame is new, so every path pays for vision
encoding and the image prefix at least once per frame.

* baseline: the naive way, per command: `processor(text, image)` + `model.generate(greedy,
  max_new_tokens=5)`; 5 covers `<object><p><p></object></s>`, a one-box answer and its eos.
* ours: `Pipeline.run_batch(commands, frame)` per frame (vision once, prefix KV shared,
  suffixes prefilled together, decode steps batched), for torch and onnxruntime backends,
  free (max_new_tokens 5) and constrained decoding.

Latency per command is the wall time until its answer (a batch's commands are answered
together, so each gets the batch's time); commands/s = commands / time spent in that path.
Paths take turns frame by frame, so load from other processes hits them alike. CPU s/cmd is
the process's CPU time per command, a second view of the same work. `boxes ==` checks
location tokens against the baseline's wherever the baseline produced a well-formed box
(random full-size weights never do); `tokens ==` checks free decoding's token ids exactly.
p95 over few samples is just the worst; the iteration counts are printed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kosmos2_ros.core.checkpoints import EXPRESSIONS, build_toy_grounding_checkpoint, toy_image  # noqa: E402


def _patches(ids: List[int], vocab) -> List[int]:
    return [t for t in ids if vocab.is_patch(t)]


def _stats(lat: List[float], total_s: float, n: int, cpu_s: float) -> Dict[str, float]:
    return {"p50": float(np.percentile(lat, 50)) * 1e3, "p95": float(np.percentile(lat, 95)) * 1e3,
            "cps": n / total_s, "cpu": cpu_s / n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full-size", action="store_true", help="real architecture (1.66 B params), random weights")
    ap.add_argument("--model", default="", help="an existing checkpoint directory instead of building one")
    ap.add_argument("--frames", type=int, default=0, help="frames per workload (default 6 small, 2 full size)")
    ap.add_argument("--workdir", default="", help="where checkpoints and ONNX graphs go (default: a temp dir)")
    ap.add_argument("--backends", default="torch,onnxruntime", help="any of torch, onnxruntime, tensorrt")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU run (baseline on the same device)")
    ap.add_argument("--precision", default="fp16", help="tensorrt engines' precision (the others run fp32)")
    args = ap.parse_args(argv)

    import torch
    from transformers import Kosmos2ForConditionalGeneration

    from kosmos2_ros.core.backends.torch.backend import TorchBackend
    from kosmos2_ros.core.checkpoints import build_tiny_checkpoint
    from kosmos2_ros.core.config import Kosmos2Config
    from kosmos2_ros.core.frames import Frame
    from kosmos2_ros.core.loading import load_processor
    from kosmos2_ros.core.pipeline import Command, Pipeline

    work = Path(args.workdir or tempfile.mkdtemp(prefix="kosmos2_bench_"))
    frames = args.frames or (2 if args.full_size else 6)
    t0 = time.perf_counter()
    if args.model:
        model_dir = Path(args.model)
    elif args.full_size:
        model_dir = work / "full_size"
        if not (model_dir / "config.json").exists():
            build_tiny_checkpoint(model_dir, full_size=True)
    else:
        model_dir = work / "toy"
        if not (model_dir / "config.json").exists():
            build_toy_grounding_checkpoint(str(build_tiny_checkpoint(work / "tiny")), str(model_dir))
    print(f"checkpoint {model_dir} ready in {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}",
          flush=True)
    processor = load_processor(str(model_dir))
    model = Kosmos2ForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).to(args.device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    max_new = 5
    images = [toy_image(100 + i, size=224) for i in range(frames)]

    def workload(k: int):
        return [(f, [EXPRESSIONS[(f * 3 + j) % len(EXPRESSIONS)] for j in range(k)]) for f in range(frames)]

    # -- baseline ------------------------------------------------------------------------------
    from kosmos2_ros.core.loading import checkpoint_no_repeat_ngram_size
    from kosmos2_ros.core.reference import reference_generate
    from kosmos2_ros.core.vocab import GroundingVocab
    vocab = GroundingVocab.from_tokenizer(processor.tokenizer)

    def baseline_one(img: np.ndarray, expr: str) -> List[int]:
        return reference_generate(model, processor, f"<grounding><phrase> {expr}</phrase>", img, max_new).new_ids

    # -- ours: one backend object per kind, shared by its two modes ------------------------------
    pipes = {}
    for backend_name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        t = time.perf_counter()
        precision = args.precision if backend_name == "tensorrt" else "fp32"
        if backend_name == "torch":
            backend = TorchBackend(str(model_dir), device=args.device, model=model)
        elif backend_name == "onnxruntime":
            from kosmos2_ros.core.backends.onnx.backend import OnnxBackend
            backend = OnnxBackend(str(model_dir), device=args.device, artifacts_dir=str(work / "artifacts"),
                                  model=model if args.device == "cpu" else None)
        elif backend_name == "tensorrt":
            from kosmos2_ros.core.backends.tensorrt.backend import TensorRTBackend
            backend = TensorRTBackend(str(model_dir), device=args.device, precision=precision,
                                      artifacts_dir=str(work / "artifacts"), build_engines=True)
        else:
            raise SystemExit(f"unknown backend {backend_name}")
        print(f"{backend_name} backend ready in {time.perf_counter() - t:.1f} s", flush=True)
        for mode in ("free", "constrained"):
            cfg = Kosmos2Config(model=str(model_dir), backend=backend_name, device=args.device, decoding=mode,
                                precision=precision, max_new_tokens=max_new, enable_3d=False)
            pipes[(backend_name, mode)] = Pipeline(cfg, backend, processor,
                                                   checkpoint_no_repeat_ngram_size(str(model_dir)))

    # Paths take turns frame by frame, so load from other processes hits them alike.
    baseline_one(images[0], EXPRESSIONS[0])  # warm-up
    for pipe in pipes.values():
        pipe.run(Command(id="w", task="refer", text=EXPRESSIONS[0]), Frame(rgb=images[0], stamp_ns=1, frame_id="cam"))
    rows = []
    for k in (1, 4):
        acc: Dict[str, dict] = {key: {"lat": [], "wall": 0.0, "cpu": 0.0, "n": 0, "same": True, "checked": 0,
                                      "tok": True} for key in ["baseline"] + list(pipes)}
        for f, exprs in workload(k):
            reference, ref_tokens = {}, {}
            a = acc["baseline"]
            for e in exprs:
                t, c = time.perf_counter(), time.process_time()
                out = baseline_one(images[f], e)
                dt = time.perf_counter() - t
                a["lat"].append(dt)
                a["wall"] += dt
                a["cpu"] += time.process_time() - c
                a["n"] += 1
                ref_tokens[e] = out
                # Only a well-formed box (<object> p p </object>) must be reproduced by every path.
                reference[e] = _patches(out, vocab) if vocab.object_close in out else None
            for (backend_name, mode), pipe in pipes.items():
                a = acc[(backend_name, mode)]
                frame = Frame(rgb=images[f], stamp_ns=1000 + f, frame_id="cam")  # a new frame: no cache
                cmds = [Command(id=str(j), task="refer", text=e, max_new_tokens=max_new) for j, e in enumerate(exprs)]
                t, c = time.perf_counter(), time.process_time()
                results = pipe.run_batch(cmds, frame)
                dt = time.perf_counter() - t
                a["wall"] += dt
                a["cpu"] += time.process_time() - c
                for e, res in zip(exprs, results):
                    if res.status != 0:
                        raise SystemExit(f"{backend_name}/{mode}: {res.status.name} {res.error}")
                    if mode == "free":
                        a["tok"] &= res.token_ids == ref_tokens[e]
                    if reference[e] is not None:
                        a["checked"] += 1
                        a["same"] &= _patches(res.token_ids, vocab) == reference[e]
                    a["lat"].append(dt)
                    a["n"] += 1
            print(f"k={k} frame {f} done", flush=True)
        base = _stats(acc["baseline"]["lat"], acc["baseline"]["wall"], acc["baseline"]["n"], acc["baseline"]["cpu"])
        rows.append(("transformers generate (baseline)", "free", k, base, (1.0, 1.0), ("ref", "ref"), acc["baseline"]["n"]))
        for (backend_name, mode) in pipes:
            a = acc[(backend_name, mode)]
            st = _stats(a["lat"], a["wall"], a["n"], a["cpu"])
            rows.append((backend_name, mode, k, st, (st["cps"] / base["cps"], base["cpu"] / st["cpu"]),
                         (f"{'yes' if a['same'] else 'NO'} {a['checked']}/{a['n']}",
                          ("yes" if a["tok"] else "NO") if mode == "free" else "-"), a["n"]))

    print()
    print(f"checkpoint: {'full-size architecture, random weights' if args.full_size else 'toy (tiny, trained)'}"
          f" ({n_params / 1e9:.3f} B params), fp32 (tensorrt: {args.precision}), {args.device},"
          f" {torch.get_num_threads()} threads, {os.cpu_count()} cores;"
          f" {frames} frames per workload, max_new_tokens {max_new}")
    head = (f"| {'path':34} | {'decoding':11} | expr/frame | cmds | p50 ms/cmd | p95 ms/cmd | cmds/s "
            "| cmds/s x base | CPU s/cmd | CPU x base | boxes == (well-formed) | tokens == |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name, mode, k, st, ratio, same, n in rows:
        print(f"| {name:34} | {mode:11} | {k:10d} | {n:4d} | {st['p50']:10.1f} | {st['p95']:10.1f} | {st['cps']:6.2f} |"
              f" {ratio[0]:12.2f}x | {st['cpu']:9.3f} | {ratio[1]:9.2f}x | {same[0]:22} | {same[1]:9} |")
    if args.full_size and args.device == "cpu":   # tiny checkpoints: per-call overhead, not compute, sets the time
        print_floor(model, processor, torch, [r for r in rows if r[0].startswith("transformers")], max_new)
    return 0


def print_floor(model, processor, torch, baselines, max_new: int) -> None:
    """The exact-fp32 floor of our path next to the measured baseline: the largest ratio possible here."""
    from bench import roofline
    from kosmos2_ros.core.loading import TextCodec

    machine = roofline.measure(torch)
    sizes = roofline.model_sizes(model, torch)
    codec = TextCodec(processor)
    ids = [codec.encode(f"<grounding><phrase> {e}</phrase>").input_ids for e in EXPRESSIONS]
    head = ids[0].index(codec.vocab.grounding) + 1
    print()
    print(f"exact fp32 floor on this machine: {machine.gflops:.0f} GFLOP/s GEMM, {machine.gbs:.1f} GB/s weight streaming"
          f" (best measured); vision {sizes[0]} tokens x {sizes[1] / 1e6:.0f} M, decoder {sizes[2] / 1e6:.0f} M"
          f" + lm_head {sizes[3] / 1e6:.0f} M matrix params")
    print("| expr/frame | baseline ms/cmd (measured p50) | baseline floor ms/cmd | constrained floor ms/cmd "
          "| best possible x baseline |")
    print("|---|---|---|---|---|")
    for _, _, k, st, *_ in baselines:
        mean_len = sum(len(i) for i in ids) / len(ids)
        base = roofline.floor_s(sizes, machine, int(mean_len), max_new - 1) * 1e3
        # ours: one prefix per frame, k suffixes (+ the forced <object>), two batched steps (p2, close)
        ours = roofline.floor_s(sizes, machine, int(head + k * (mean_len - head + 1)), 2) * 1e3 / k
        print(f"| {k} | {st['p50']:.0f} | {base:.0f} | {ours:.0f} | {st['p50'] / ours:.2f}x |")


if __name__ == "__main__":
    raise SystemExit(main())
