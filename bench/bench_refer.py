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
  free (max_new_tokens 5) and constrained decoding; onnxruntime at each of `--precisions`
  (fp32, and the int8 / int4 graphs quantized from it).

Latency per command is the wall time until its answer (a batch's commands are answered
together, so each gets the batch's time); commands/s = commands / time spent in that path.
Paths take turns frame by frame, so load from other processes hits them alike. CPU s/cmd is
the process's CPU time per command, a second view of the same work. `boxes ==` checks
location tokens against the baseline's wherever the baseline produced a well-formed box
(random full-size weights never do); `tokens ==` checks free decoding's token ids exactly.
p95 over few samples is just the worst; the iteration counts are printed.

A second table takes each path apart: vision ms per frame, prefill ms of one whole prompt (image
and expression), decode ms per token at batch 1, resident memory (peak RSS of a process that
loads only that path and answers one command), graph size on disk, and how many free-decoding
commands gave fp32's tokens (quantized paths against onnxruntime fp32; the others against the
baseline). On CPU full-size runs a third gives each precision's floor (`roofline.py`).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import roofline  # noqa: E402
from kosmos2_ros.core.defaults import QUANTIZED_PRECISIONS  # noqa: E402
from kosmos2_ros.fixtures.checkpoints import EXPRESSIONS, build_toy_grounding_checkpoint, toy_image  # noqa: E402


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
    ap.add_argument("--precisions", default="fp32", help="onnxruntime's precisions, e.g. fp32,int8,int4")
    ap.add_argument("--resident", default="", help=argparse.SUPPRESS)   # internal: peak RSS of one path
    args = ap.parse_args(argv)
    if args.resident:
        return resident_child(args)

    import torch

    from kosmos2_ros.core.backends.modules import load_kosmos2
    from kosmos2_ros.core.model.loading import load_processor
    from kosmos2_ros.core.serving.config import Kosmos2Config
    from kosmos2_ros.core.serving.frames import Frame
    from kosmos2_ros.core.serving.pipeline import Command, Pipeline
    from kosmos2_ros.fixtures.checkpoints import build_tiny_checkpoint

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
    # The graphs first, before anything else is loaded: quantizing holds the fp32 weights a second time.
    from kosmos2_ros.core.backends.onnx import export
    for precision in [p for _, b, p in paths(args) if b == "onnxruntime"]:
        export.ensure_exported(str(model_dir), str(work / "artifacts"), precision=precision, log=print)
        gc.collect()
    processor = load_processor(str(model_dir))
    model = load_kosmos2(str(model_dir), dtype=torch.float32).to(args.device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    max_new = 5
    images = [toy_image(100 + i, size=224) for i in range(frames)]

    def workload(k: int):
        return [(f, [EXPRESSIONS[(f * 3 + j) % len(EXPRESSIONS)] for j in range(k)]) for f in range(frames)]

    # -- baseline ------------------------------------------------------------------------------
    from kosmos2_ros.core.model.loading import checkpoint_no_repeat_ngram_size
    from kosmos2_ros.core.model.reference import reference_generate
    from kosmos2_ros.core.model.vocab import GroundingVocab
    vocab = GroundingVocab.from_tokenizer(processor.tokenizer)

    def baseline_one(img: np.ndarray, expr: str) -> List[int]:
        return reference_generate(model, processor, f"<grounding><phrase> {expr}</phrase>", img, max_new).new_ids

    # -- ours: one backend object per path, shared by its two modes ------------------------------
    pipes, backends = {}, {}
    for label, backend_name, precision in paths(args):
        t = time.perf_counter()
        backends[label] = backend = make_backend(backend_name, precision, model_dir, work, args.device, model)
        print(f"{label} backend ready in {time.perf_counter() - t:.1f} s", flush=True)
        for mode in ("free", "constrained"):
            cfg = Kosmos2Config(model=str(model_dir), backend=backend_name, device=args.device, decoding=mode,
                                precision=precision, max_new_tokens=max_new, enable_3d=False)
            pipes[(label, mode)] = Pipeline(cfg, backend, processor, checkpoint_no_repeat_ngram_size(str(model_dir)))

    # Paths take turns frame by frame, so load from other processes hits them alike.
    baseline_one(images[0], EXPRESSIONS[0])  # warm-up
    for pipe in pipes.values():
        pipe.run(Command(id="w", task="refer", text=EXPRESSIONS[0]), Frame(rgb=images[0], stamp_ns=1, frame_id="cam"))
    rows, fp32_rate = [], {}
    precision_of = {label: precision for label, _, precision in paths(args)}
    for k in (1, 4):
        acc: Dict[str, dict] = {key: {"lat": [], "wall": 0.0, "cpu": 0.0, "n": 0, "same": True, "checked": 0,
                                      "tok": True, "tok_n": 0} for key in ["baseline"] + list(pipes)}
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
            fp32_tokens = {}
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
                        if backend_name == "onnxruntime":
                            fp32_tokens[e] = res.token_ids
                        quantized = precision_of[backend_name] in QUANTIZED_PRECISIONS
                        want = fp32_tokens.get(e) if quantized else ref_tokens[e]
                        a["tok"] &= res.token_ids == want
                        a["tok_n"] += res.token_ids == want
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
                          f"{'yes' if a['tok'] else 'NO'} {a['tok_n']}/{a['n']}" if mode == "free" else "-"), a["n"]))
        fp32_rate[k] = {label: acc[(label, "free")]["tok_n"] / max(acc[(label, "free")]["n"], 1) for label, _ in pipes}

    print()
    print(f"checkpoint: {'full-size architecture, random weights' if args.full_size else 'toy (tiny, trained)'}"
          f" ({n_params / 1e9:.3f} B params), fp32 (tensorrt: {args.precision}), {args.device},"
          f" {torch.get_num_threads()} threads, {os.cpu_count()} cores; onnxruntime {args.precisions};"
          f" {frames} frames per workload, max_new_tokens {max_new}")
    head = (f"| {'path':34} | {'decoding':11} | expr/frame | cmds | p50 ms/cmd | p95 ms/cmd | cmds/s "
            "| cmds/s x base | CPU s/cmd | CPU x base | boxes == (well-formed) | tokens == |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name, mode, k, st, ratio, same, n in rows:
        print(f"| {name:34} | {mode:11} | {k:10d} | {n:4d} | {st['p50']:10.1f} | {st['p95']:10.1f} | {st['cps']:6.2f} |"
              f" {ratio[0]:12.2f}x | {st['cpu']:9.3f} | {ratio[1]:9.2f}x | {same[0]:22} | {same[1]:9} |")
    phases = phase_rows(args, processor, backends, images[0])
    sizes = roofline.model_sizes(model, torch)
    # Free this process's paths before measuring each alone in its own process (the full-size model
    # and three graph sets would not fit twice in 24 GB).
    for backend in backends.values():
        backend.close()
    pipes.clear()
    backends.clear()
    model = None
    gc.collect()
    print()
    print_phases(args, model_dir, work, phases, fp32_rate)
    if args.full_size and args.device == "cpu":   # tiny checkpoints: per-call overhead, not compute, sets the time
        print_floor(sizes, processor, torch, rows, max_new,
                    {label: p for label, b, p in paths(args) if b == "onnxruntime"})
    return 0


def paths(args) -> List[tuple]:
    """(label, backend, precision) of every path of ours, onnxruntime fp32 before its quantized graphs."""
    out = []
    for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if name == "onnxruntime":
            asked = {p.strip() for p in args.precisions.split(",") if p.strip()} | {"fp32"}
            precisions = [p for p in ("fp32",) + QUANTIZED_PRECISIONS if p in asked]
            out += [(name if p == "fp32" else f"{name} {p}", name, p) for p in precisions]
        else:
            out.append((name, name, args.precision if name == "tensorrt" else "fp32"))
    return out


def make_backend(name: str, precision: str, model_dir: Path, work: Path, device: str, model=None):
    if name == "torch":
        from kosmos2_ros.core.backends.torch.backend import TorchBackend
        return TorchBackend(str(model_dir), device=device, model=model)
    if name == "onnxruntime":
        from kosmos2_ros.core.backends.onnx.backend import OnnxBackend
        return OnnxBackend(str(model_dir), device=device, precision=precision, artifacts_dir=str(work / "artifacts"),
                           model=model if device == "cpu" else None)
    if name == "tensorrt":
        from kosmos2_ros.core.backends.tensorrt.backend import TensorRTBackend
        return TensorRTBackend(str(model_dir), device=device, precision=precision,
                               artifacts_dir=str(work / "artifacts"), build_engines=True)
    raise SystemExit(f"unknown backend {name}")


def resident_child(args) -> int:
    """Load one path alone (`--resident label`), answer one command, print the peak RSS in bytes."""
    from kosmos2_ros.core.model.loading import load_processor
    from kosmos2_ros.core.serving.config import Kosmos2Config
    from kosmos2_ros.core.serving.frames import Frame
    from kosmos2_ros.core.serving.pipeline import Command, Pipeline

    model_dir = Path(args.model)
    processor = load_processor(str(model_dir))
    image = toy_image(100, size=224)
    if args.resident == "baseline":
        import torch

        from kosmos2_ros.core.backends.modules import load_kosmos2
        from kosmos2_ros.core.model.reference import reference_generate
        model = load_kosmos2(str(model_dir), dtype=torch.float32)
        reference_generate(model, processor, f"<grounding><phrase> {EXPRESSIONS[0]}</phrase>", image, 5)
    else:
        _, name, precision = next(p for p in paths(args) if p[0] == args.resident)
        backend = make_backend(name, precision, model_dir, Path(args.workdir), args.device)
        cfg = Kosmos2Config(model=str(model_dir), backend=name, device=args.device, precision=precision,
                            max_new_tokens=5, enable_3d=False)
        res = Pipeline(cfg, backend, processor).run(Command(id="m", task="refer", text=EXPRESSIONS[0]),
                                                    Frame(rgb=image, stamp_ns=1, frame_id="cam"))
        assert res.status == 0, res.error
    # VmHWM, this process's own peak: ru_maxrss would carry the parent's peak over fork and exec.
    peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(f"RESIDENT {peak_kb * 1024}")
    return 0


def resident_gb(args, label: str, model_dir: Path, work: Path) -> float:
    """Peak RSS of a process that loads only `label`'s path and answers one command."""
    import subprocess

    cmd = [sys.executable, __file__, "--resident", label, "--model", str(model_dir), "--workdir", str(work),
           "--backends", args.backends, "--precisions", args.precisions, "--device", args.device,
           "--precision", args.precision]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return int(out.rsplit("RESIDENT ", 1)[1].split()[0]) / 1e9


def _median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def _phase_ms(backend, pixels, prompt, repeat: int):
    """(vision, prefill of the whole prompt, one decode step at batch 1) medians in ms."""
    from kosmos2_ros.core.backends.logits import Readout, read_scores

    embeds = backend.encode_image(pixels)
    vision = _median_ms(lambda: backend.encode_image(pixels), repeat)
    prefill = _median_ms(lambda: backend.prefill(embeds, prompt.input_ids, prompt.image_mask), repeat)
    state = {"cache": backend.prefill(embeds, prompt.input_ids, prompt.image_mask)[1]}

    def step():   # a token as the decode loop pays it: the step, and the read of its logits
        logits, state["cache"] = backend.decode(state["cache"], 5)
        read_scores(logits, Readout())
    return vision, prefill, _median_ms(step, 4 * repeat)


def phase_rows(args, processor, backends, image) -> dict:
    """label -> (vision ms, prefill ms, decode ms/token, graphs on disk) of each path of ours."""
    from kosmos2_ros.core.backends.onnx import export, quantize
    from kosmos2_ros.core.model.loading import TextCodec

    prompt = TextCodec(processor).encode(f"<grounding><phrase> {EXPRESSIONS[0]}</phrase>")
    pixels = np.asarray(processor.image_processor(image, return_tensors="np")["pixel_values"], dtype=np.float32)
    rows = {}
    for label, backend in backends.items():
        vision, prefill, decode = _phase_ms(backend, pixels, prompt, 3 if args.full_size else 10)
        disk = "-"
        if backend.name == "onnxruntime":
            files = export.graph_files(backend.manifest, backend.precision)
            disk = f"{quantize.graph_bytes(backend.graph_dir, files) / 1e9:.2f}"
        rows[label] = (vision, prefill, decode, disk, len(prompt.input_ids))
    return rows


def print_phases(args, model_dir, work, phases, fp32_rate) -> None:
    """The phases table, with each path's resident memory measured alone."""
    resident = {label: resident_gb(args, label, model_dir, work) for label in ["baseline"] + list(phases)}
    ref = phases.get("onnxruntime")
    base = resident.get("onnxruntime", float("nan"))
    tokens = next(iter(phases.values()))[4] if phases else 0
    print(f"phases (a prompt of {tokens} tokens, medians); resident = peak RSS of a process with only that path "
          "loaded, one command answered")
    print("| path | vision ms | prefill ms | decode ms/token | decode x fp32 ort | resident GB | resident / fp32 ort "
          "| graphs on disk GB | free tokens == fp32 (1, 4 expr/frame) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| transformers generate (baseline) | - | - | - | - | {resident['baseline']:.2f} | "
          f"{resident['baseline'] / base:.2f} | - | ref |")
    for label, (vision, prefill, decode, disk, _) in phases.items():
        rate = ", ".join(f"{fp32_rate[k][label] * 100:.0f} %" for k in (1, 4))
        print(f"| {label} | {vision:.1f} | {prefill:.1f} | {decode:.1f} | "
              f"{ref[2] / decode if ref else float('nan'):.2f}x | {resident[label]:.2f} | "
              f"{resident[label] / base:.2f} | {disk} | {rate} |")


def print_floor(sizes, processor, torch, rows, max_new: int, onnx_precisions: Dict[str, str]) -> None:
    """Each precision's floor on this machine (`roofline`) next to the measured path
    (`onnx_precisions`: the onnxruntime paths' labels and precisions)."""
    from kosmos2_ros.core.model.loading import TextCodec

    machines = roofline.measure(torch, tuple(dict.fromkeys(["fp32", *onnx_precisions.values()])))
    codec = TextCodec(processor)
    ids = [codec.encode(f"<grounding><phrase> {e}</phrase>").input_ids for e in EXPRESSIONS]
    head = ids[0].index(codec.vocab.grounding) + 1
    mean_len = sum(len(i) for i in ids) / len(ids)
    print()
    print(f"floors (bench/roofline.py: rates measured with torch's and onnxruntime's kernels at the model's shapes); "
          f"vision {sizes[0]} tokens x {sizes[1] / 1e6:.0f} M, decoder {sizes[2] / 1e6:.0f} M + lm_head "
          f"{sizes[3] / 1e6:.0f} M matrix params")
    print(f"  memory read {next(iter(machines.values())).gbs:.1f} GB/s (the best of one pass over 1 GB and every "
          "kernel's streaming: the decode steps' bound)")
    for kind, m in machines.items():
        print(f"  {kind} weights: {m.gflops:.0f} G(FL)OP/s matrix rate, kernels stream {m.kernel_gbs:.1f} GB/s of "
              f"their bytes ({m.source})")
    print("| path | expr/frame | measured p50 ms/cmd | floor ms/cmd | measured / floor |")
    print("|---|---|---|---|---|")
    for name, mode, k, st, *_ in rows:
        if name.startswith("transformers"):
            floor = roofline.floor_s(sizes, machines, int(mean_len), max_new - 1) * 1e3
        elif mode == "constrained" and name in onnx_precisions:
            # one prefix per frame, k suffixes (+ the forced <object>), two batched steps (p2, close)
            floor = roofline.floor_s(sizes, machines, int(head + k * (mean_len - head + 1)), 2,
                                     onnx_precisions[name]) * 1e3 / k
        else:
            continue
        print(f"| {name} ({mode}) | {k} | {st['p50']:.0f} | {floor:.0f} | {st['p50'] / floor:.2f}x |")


if __name__ == "__main__":
    raise SystemExit(main())
