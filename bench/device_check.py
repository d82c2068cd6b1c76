"""The one prepared GPU check: torch on CUDA always, TensorRT where it imports. Prints one table.

What a lent GPU machine (H100/H200, Python 3.12, CUDA torch, transformers, no ROS, no network) runs
once, within 6 minutes, from the project's own files: nothing to install. It works in a temporary
folder (checkpoints, engines) and writes only `device_check.md` and `device_check.json` to OUT, the
few small files that come back from the machine.

    python bench/device_check.py --out OUT        # the repository root as working directory

Rows (`check` column):

- `tokens == generate (same precision)`: torch's static path (static KV arena, the decode step
  replayed as a CUDA graph) on the tiny trained checkpoint, free greedy decoding of four prompts,
  against transformers' `generate` on the GPU in the same precision (n of 4 prompts equal). A check
  in fp32 only: in fp16 / bf16 generate runs everything in that precision while the static path keeps
  fp32 islands, so there it is informational; `tokens == fp32` and `graphs == plain` are the checks.
- `tokens == fp32`: the same against fp32 on the GPU; fp16/bf16 may differ only where fp32's own
  top-two logit margin is within 4x the measured logit error (`export.precision_verdict`).
- `boxes == fp32`: constrained referring expressions on generated scenes, the pipeline's boxes.
- `arena switches (1, 2, 1 rows): graphs == plain`: arenas A, B, A, each step replayed as a CUDA graph,
  against the same steps without graphs (torch; and TensorRT, where each step has its own context).
- `decode ms/token, CUDA graph / plain`: full-size architecture (random weights, 1.66 B
  parameters, made in fp16 on the GPU: nothing written or read), one row, against the floor: the
  bytes a step must read (decoder layers and lm_head in fp16) over the device's measured copy
  bandwidth. Target: graph <= 2x the floor.
- `mixed traffic`: the node's mix (a lone refer with candidates, four refers on one frame, a caption,
  a description, a refer with its ambiguous boxes described), two rounds of warm-up then six rounds:
  p50 ms per command kind (OK results only), and CUDA graph captures after warm-up (target: 0).
- `refer p50 ms, fresh frame / encoded ahead / 4 expressions`: a referring expression through the
  pipeline (constrained), against transformers `processor + generate` (fp16, greedy, 5 new tokens)
  on the same frames in the same run; p50 over OK results only, and the row fails if any was not OK.
  Target: encoded ahead <= 15 ms.
- `logits read per step`: what a decode step's logits cost the host, 8 rows of the real vocabulary:
  the loop's read (`DeviceLogits.read_on_device`: argmax, normaliser, location span, control tokens
  computed on the GPU, one ~4 KB-a-row copy) against every row's 65k logits copied back and reduced
  in numpy (`bench/logits_read.py`). Informational.
- `peak GPU memory`: `torch.cuda.max_memory_allocated` over the full-size rows.
- `tensorrt ...`: only where `import tensorrt` works (engines built, tokens against torch).

Exit 0 when every verdict is ok. `--skip-full` runs only the tiny checkpoint (a minute).
`--device cpu` runs the same rows on the CPU (no graphs, fp32 and bf16; a smoke test of this
script before a GPU is lent: `python bench/device_check.py --device cpu --skip-full`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, List, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))     # the other benchmarks' measuring functions

PROMPTS = ("<grounding><phrase> the red square</phrase>", "<grounding>An image of",
           "<grounding> Question: what is on the left? Answer:", "<grounding>Describe this image in detail:")
EXPRESSIONS = ("the red square", "the blue square", "the green square", "a square on the left")
HEADER = "| check | checkpoint | precision | measured | reference | ok |\n|---|---|---|---|---|---|"
Row = Tuple[str, str, str, str, str, bool]


class Table:
    def __init__(self) -> None:
        self.rows: List[Row] = []

    def add(self, check: str, ckpt: str, prec: str, measured: str, reference: str, ok: bool = True) -> None:
        self.rows.append((check, ckpt, prec, measured, reference, ok))
        print(self.text(self.rows[-1]), flush=True)

    @staticmethod
    def text(r: Row) -> str:
        return f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {'yes' if r[5] else 'NO'} |"

    def markdown(self) -> str:
        return "\n".join([HEADER] + [self.text(r) for r in self.rows])


#: Where the rows run: cuda (what the check is for) or cpu (`--device cpu`, a smoke test of the script).
DEVICE = "cuda"


def sync() -> None:
    import torch

    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def p50_ms(run: Callable[[], Any], n: int, warm: int = 2) -> Tuple[float, int]:
    """(p50 ms over the runs that were OK, how many were not). A run is OK unless it returns results
    (a pipeline Result or a list of them) with a status other than OK: a fast error is no latency."""
    for _ in range(warm):
        run()
    times, failed = [], 0
    for _ in range(n):
        sync()
        t = time.perf_counter()
        out = run()
        sync()
        results = out if isinstance(out, list) else [out]
        if all(getattr(r, "status", 0) == 0 for r in results):
            times.append((time.perf_counter() - t) * 1e3)
        else:
            failed += 1
    return (statistics.median(times) if times else float("nan")), failed


def bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth (read + write), GB/s."""
    import torch

    x = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    return 2 * x.numel() * 10 / (time.perf_counter() - t) / 1e9


def frames(n: int, seed: int = 0) -> list:
    from kosmos2_ros.core.serving.frames import Frame
    from kosmos2_ros.fixtures.scenes import draw_scene

    rng = np.random.default_rng(seed)
    return [Frame(rgb=draw_scene(640, 480, rng=rng)[0], stamp_ns=i + 1, frame_id="cam") for i in range(n)]


def pipeline(model_dir: Path, backend: Any, **cfg: Any) -> Any:
    from kosmos2_ros.core.model.loading import load_processor
    from kosmos2_ros.core.serving.config import Kosmos2Config
    from kosmos2_ros.core.serving.pipeline import Pipeline

    return Pipeline(Kosmos2Config(model=str(model_dir), backend="torch", device=DEVICE, enable_3d=False, **cfg),
                    backend, load_processor(str(model_dir)))


def boxes(pipe: Any, scenes: list) -> list:
    from kosmos2_ros.core.serving.pipeline import Command

    out = []
    for frame in scenes:
        for res in pipe.run_batch([Command(id=e, task="refer", text=e) for e in EXPRESSIONS], frame):
            out.append([tuple(round(v, 4) for v in b) for ent in res.entities for b in ent.boxes_norm]
                       if res.status == 0 else res.error)
    return out


# -- tiny trained checkpoint: tokens and boxes ---------------------------------------------------------
def tiny_rows(table: Table, tiny: Path, precisions: List[str]) -> None:
    import torch

    from kosmos2_ros.core.backends.modules import load_kosmos2
    from kosmos2_ros.core.backends.onnx import export
    from kosmos2_ros.core.backends.registry import create_backend
    from kosmos2_ros.core.backends.torch.backend import TorchBackend
    from kosmos2_ros.core.model.decoding import Row as DecodeRow
    from kosmos2_ros.core.model.decoding import generate
    from kosmos2_ros.core.model.loading import TextCodec, load_processor
    from kosmos2_ros.core.model.reference import reference_generate

    processor = load_processor(str(tiny))
    codec = TextCodec(processor)
    scene = frames(1, seed=7)[0].rgb
    pixels = processor.image_processor(scene, return_tensors="np")["pixel_values"].astype(np.float32)
    ref32 = TorchBackend(str(tiny), device=DEVICE, precision="fp32")
    e32 = ref32.encode_image(pixels)
    free32 = [generate(ref32, e32, [DecodeRow(p.input_ids, p.image_mask, 16)], codec.vocab)[0].token_ids
              for p in map(codec.encode, PROMPTS)]
    boxes32 = boxes(pipeline(tiny, ref32, precision="fp32"), frames(3, seed=1))
    for prec in precisions:
        static = create_backend("torch", str(tiny), device=DEVICE, precision=prec, torch_mode="static")
        hf = load_kosmos2(str(tiny), dtype=getattr(torch, {
            "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[prec])).to(DEVICE).eval()
        emb = static.encode_image(pixels)
        same_hf, same32, diff, margins = 0, True, 0.0, []
        for prompt, p, want32 in zip(PROMPTS, map(codec.encode, PROMPTS), free32):
            got = generate(static, emb, [DecodeRow(p.input_ids, p.image_mask, 16)], codec.vocab)[0].token_ids
            same_hf += got == reference_generate(hf, processor, prompt, scene, 16).new_ids
            same32 &= got == want32
            d, m = export.forced_margins(ref32, static, e32, emb, p.input_ids, p.image_mask, want32)
            diff, margins = max(diff, d), margins + m
        verdict, ok = export.precision_verdict(same32, margins, diff, prec)
        graphs = "CUDA graph" if static.cuda_graph else f"no graph ({static.graph_error or 'cpu'})"
        table.add("tokens == generate (same precision)" + ("" if prec == "fp32" else ", informational"), "tiny",
                  prec, f"{same_hf} of {len(PROMPTS)} prompts", f"transformers generate on {DEVICE}, {prec}"
                  + ("" if prec == "fp32" else " (all in that precision; the static path keeps fp32 islands)"),
                  prec != "fp32" or same_hf == len(PROMPTS))
        table.add("tokens == fp32", "tiny", prec, f"{verdict}; max dlogits {diff:.1e}; {graphs}",
                  f"torch fp32 on {DEVICE}", ok)
        arena_switches(table, "torch", static, emb, codec, prec)
        got_boxes = boxes(pipeline(tiny, static, precision=prec), frames(3, seed=1))
        same = sum(a == b for a, b in zip(got_boxes, boxes32))
        table.add("boxes == fp32", "tiny", prec, f"{same} of {len(boxes32)} commands", f"torch fp32 on {DEVICE}",
                  same == len(boxes32) or prec != "fp32")
        static.close()
        del hf
    ref32.close()


def arena_switches(table: Table, name: str, backend: Any, emb: Any, codec: Any, prec: str) -> None:
    """Graphs of several arenas replayed in turn (1 row, 2 rows, 1 row again): tokens as without graphs."""
    from kosmos2_ros.core.model.decoding import Row as DecodeRow
    from kosmos2_ros.core.model.decoding import generate

    runs, stats = {}, backend.graph_stats
    for graph in (True, False):
        backend.set_cuda_graph(graph)       # off drops every graph; on captures anew
        replays = stats.replays
        runs[graph] = [[g.token_ids for g in generate(backend, emb, [DecodeRow(q.input_ids, q.image_mask, 12)
                                                                     for q in map(codec.encode, chunk)], codec.vocab)]
                       for chunk in (PROMPTS[:1], PROMPTS[:2], PROMPTS[:1])]
        if graph:
            replayed = stats.replays - replays
    backend.set_cuda_graph(True)
    same = runs[True] == runs[False]
    table.add(f"{name} arena switches (1, 2, 1 rows): graphs == plain", "tiny", prec,
              f"{'yes' if same else 'NO'}; {replayed} replays",
              "the same steps without CUDA graphs ("
              + (backend.graph_error or ("graphs on" if backend.cuda_graph else f"no graphs on {DEVICE}")) + ")", same)


# -- full-size architecture: speed and memory -------------------------------------------------------------
def logits_rows(table: Table) -> None:
    """The loop's read of a step's logits: timed against full rows, and its numbers against the host's."""
    import torch
    from logits_read import full_size_readout, measure

    from kosmos2_ros.core.backends.logits import DeviceLogits, read_scores

    z = torch.randn((4, 65037), device=DEVICE) * 4
    z[1, 17] = z[1, 40000] = z[1].max() + 1.0                  # a tie: the first index wins
    got = DeviceLogits(z).read_on_device(full_size_readout())
    want = read_scores(z.cpu().numpy(), full_size_readout())
    same = all(g.argmax == w.argmax and g.top == w.top and (g.span == w.span).all() and g.picked == w.picked
               and abs(g.norm - w.norm) <= 1e-6 * w.norm for g, w in zip(got, want))
    table.add("logits read on the device == on the host", "-", "fp32",
              f"{'yes' if same else 'NO'}: argmax (a tie), logit, span, control tokens equal, normaliser within 1e-6",
              "numpy over the same logits", same)
    for rows, fb, fms, rb, rms in measure(DEVICE, [1, 8], 50):
        table.add(f"logits read per step, {rows} row(s)", "-", "fp32",
                  f"{rms:.3f} ms, {rb:,} B (time full / read {fms / rms:.2f}x, bytes {fb / rb:.0f}x)",
                  f"full rows to numpy: {fms:.3f} ms, {fb:,} B", True)


def full_precision() -> str:
    """fp16 on the GPU; bf16 in the CPU smoke test (torch has no CPU fp16 matmul)."""
    return "fp16" if DEVICE != "cpu" else "bf16"


def full_rows(table: Table, work: Path) -> None:
    import torch
    from logits_read import full_size_readout

    from kosmos2_ros.core.backends.logits import read_scores
    from kosmos2_ros.core.backends.torch.static import TorchStaticBackend
    from kosmos2_ros.core.model.loading import TextCodec, load_processor
    from kosmos2_ros.core.serving.pipeline import Command
    from kosmos2_ros.fixtures.checkpoints import full_size_in_memory

    prec = full_precision()
    dtype = getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[prec])
    gbs = bandwidth_gbs()
    if DEVICE != "cpu":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model, full = full_size_in_memory(work / "full", dtype, DEVICE)
    static = TorchStaticBackend(str(full), device=DEVICE, precision=prec, model=model)
    del model
    load_s = time.perf_counter() - t0
    processor = load_processor(str(full))
    codec = TextCodec(processor)
    dec = static._decoder
    n_read = sum(p.numel() * p.element_size() for p in dec.layers.parameters()) + \
        dec.lm_head.weight.numel() * dec.lm_head.weight.element_size()
    floor = n_read / (gbs * 1e9) * 1e3
    p = codec.encode(PROMPTS[0])
    pixels = processor.image_processor(frames(1)[0].rgb, return_tensors="np")["pixel_values"].astype(np.float32)
    emb = static.encode_image(pixels)
    timing = {}
    for graph in (False, True):
        static.set_cuda_graph(graph)
        _, cache = static.prefill(emb, p.input_ids, p.image_mask)
        # Past the arena's first capacity (128 columns for this ~75-token prompt) before timing: the
        # move to the next arena (a copy, two plain steps, a capture) is not a decode step's cost.
        for _ in range(60):
            _, cache = static.decode(cache, 5)
        sync()
        n, t = 48, time.perf_counter()
        for _ in range(n):   # a token as the decode loop pays it: the step, and the read of its logits
            logits, cache = static.decode(cache, 5)
            read_scores(logits, full_size_readout())
        sync()
        timing[graph] = (time.perf_counter() - t) / n * 1e3
    note = f" ({static.graph_error})" if static.graph_error else ""
    table.add("decode ms/token, CUDA graph", "full-size", prec,
              f"{timing[True]:.3f} ({timing[True] / floor:.2f}x floor){note}",
              f"floor {floor:.3f} ms ({n_read / 1e9:.2f} GB at {gbs:.0f} GB/s); target <= 2x", timing[True] <= 2 * floor)
    table.add("decode ms/token, plain", "full-size", prec, f"{timing[False]:.3f} ({timing[False] / floor:.2f}x floor)",
              f"graph is {timing[False] / timing[True]:.1f}x faster", True)
    static.set_cuda_graph(True)
    pipe = pipeline(full, static, precision=prec)
    mixed_traffic(table, pipe, static, prec, floor)
    cmd = Command(id="r", task="refer", text="the red mug")
    fresh = iter(frames(40, seed=3))
    ours_fresh, fresh_failed = p50_ms(lambda: pipe.run(cmd, next(fresh)), 10)

    def ahead() -> Any:
        frame = next(fresh)
        pipe.encode_ahead([frame])
        sync()
        t = time.perf_counter()
        res = pipe.run(cmd, frame)
        sync()
        if res.status == 0:
            ahead_ms.append((time.perf_counter() - t) * 1e3)
        return res

    ahead_ms: List[float] = []
    ahead_failed = sum(ahead().status != 0 for _ in range(12))
    ours_ahead = statistics.median(ahead_ms[2:]) if len(ahead_ms) > 2 else float("nan")
    four = [Command(id=str(i), task="refer", text=e) for i, e in enumerate(EXPRESSIONS)]
    ours_four, four_failed = p50_ms(lambda: pipe.run_batch(four, next(fresh)), 6)
    peak = torch.cuda.max_memory_allocated() / (1 << 30) if DEVICE != "cpu" else float("nan")
    static.close()     # (its weights go with the pipeline, once it is not used any more)
    pipe.backend = None
    hf, _ = full_size_in_memory(work / "full", dtype, DEVICE, seed=1)   # the baseline's own model
    naive_frames = iter(frames(20, seed=4))

    def naive() -> None:
        frame = next(naive_frames)
        inputs = processor(text="<grounding><phrase> the red mug</phrase>", images=frame.rgb, return_tensors="pt")
        inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
        with torch.inference_mode():
            hf.generate(pixel_values=inputs["pixel_values"].to(hf.dtype), input_ids=inputs["input_ids"],
                        attention_mask=inputs["attention_mask"],
                        image_embeds_position_mask=inputs["image_embeds_position_mask"], max_new_tokens=5,
                        do_sample=False, num_beams=1)

    base, _ = p50_ms(naive, 10)

    def failed(n: int) -> str:
        return f"; {n} not OK" if n else ""

    table.add("refer p50 ms, fresh frame", "full-size", prec,
              f"{ours_fresh:.1f} ({base / ours_fresh:.2f}x){failed(fresh_failed)}",
              f"transformers generate {base:.1f}", not fresh_failed)
    table.add("refer p50 ms, encoded ahead", "full-size", prec,
              f"{ours_ahead:.1f} ({base / ours_ahead:.2f}x){failed(ahead_failed)}",
              f"transformers generate {base:.1f}; target <= 15", ours_ahead <= 15 and not ahead_failed)
    table.add("refer p50 ms, 4 expressions on one frame", "full-size", prec,
              f"{ours_four:.1f} for 4 ({4 * base / ours_four:.2f}x){failed(four_failed)}",
              f"transformers generate 4 x {base:.1f}", not four_failed)
    table.add("peak GPU memory", "full-size", prec, f"{peak:.2f} GiB (model made in {load_s:.0f} s)", "-", True)


def mixed_traffic(table: Table, pipe: Any, backend: Any, prec: str, floor: float) -> None:
    """The node's mix, round after round on new frames: p50 per command kind and captures after warm-up."""
    from kosmos2_ros.core.serving.pipeline import Command

    kinds = {"refer": lambda f: pipe.run(Command(id="r", task="refer", text="the red mug"), f),
             "4 refers": lambda f: pipe.run_batch([Command(id=str(i), task="refer", text=e)
                                                   for i, e in enumerate(EXPRESSIONS)], f),
             "caption": lambda f: pipe.run(Command(id="c", task="caption"), f),
             "describe 24": lambda f: pipe.run(Command(id="d", task="describe", max_new_tokens=24), f),
             "refer, boxes described": lambda f: pipe.run(Command(id="a", task="refer", text="a square",
                                                                  describe_candidates=1), f)}
    scenes = iter(frames(8, seed=11))
    times: dict = {k: [] for k in kinds}
    failed, stats = 0, backend.graph_stats
    warm = None
    for rnd in range(8):
        if rnd == 2:
            warm = (stats.captures, stats.replays, stats.plain_steps)
        frame = next(scenes)
        for kind, run in kinds.items():
            sync()
            t = time.perf_counter()
            out = run(frame)
            sync()
            results = out if isinstance(out, list) else [out]
            if all(r.status == 0 for r in results):
                if rnd >= 2:
                    times[kind].append((time.perf_counter() - t) * 1e3)
            else:
                failed += 1
    assert warm is not None
    captures, replays = stats.captures - warm[0], stats.replays - warm[1]
    p50 = ", ".join(f"{k} {statistics.median(v):.1f}" if v else f"{k} -" for k, v in times.items())
    table.add("mixed traffic: p50 ms per command (OK only)", "full-size", prec,
              p50 + (f"; {failed} not OK" if failed else ""),
              f"6 rounds after 2 of warm-up; decode floor {floor:.3f} ms/token", not failed)
    table.add("mixed traffic: CUDA graph captures after warm-up", "full-size", prec,
              f"{captures} captures, {replays} replays, {stats.plain_steps - warm[2]} plain steps; "
              f"{backend.counters()['arena_memory_mb']} MiB of arenas", "target 0 captures",
              captures == 0 or DEVICE == "cpu")


# -- TensorRT, where it imports ---------------------------------------------------------------------------
def tensorrt_rows(table: Table, tiny: Path, art: Path, precisions: List[str]) -> None:
    from kosmos2_ros.core.backends.onnx import export
    from kosmos2_ros.core.backends.tensorrt.backend import TensorRTBackend
    from kosmos2_ros.core.backends.torch.backend import TorchBackend
    from kosmos2_ros.core.model.decoding import Row as DecodeRow
    from kosmos2_ros.core.model.decoding import generate
    from kosmos2_ros.core.model.loading import TextCodec, load_processor

    processor = load_processor(str(tiny))
    codec = TextCodec(processor)
    pixels = processor.image_processor(frames(1, seed=7)[0].rgb, return_tensors="np")["pixel_values"]
    pixels = pixels.astype(np.float32)
    ref = TorchBackend(str(tiny), device=DEVICE, precision="fp32")
    e_ref = ref.encode_image(pixels)
    for prec in precisions:
        t0 = time.perf_counter()
        trt_b = TensorRTBackend(str(tiny), device=DEVICE, precision=prec, artifacts_dir=str(art), build_engines=True)
        build_s = time.perf_counter() - t0
        e_trt = trt_b.encode_image(pixels)
        same, diff, margins = True, 0.0, []
        encoded = [codec.encode(q) for q in PROMPTS]
        for p in encoded:
            a = generate(ref, e_ref, [DecodeRow(p.input_ids, p.image_mask, 8)], codec.vocab)[0].token_ids
            b = generate(trt_b, e_trt, [DecodeRow(p.input_ids, p.image_mask, 8)], codec.vocab)[0].token_ids
            same &= a == b
            d, m = export.forced_margins(ref, trt_b, e_ref, e_trt, p.input_ids, p.image_mask, a)
            diff, margins = max(diff, d), margins + m
        rows = [DecodeRow(p.input_ids, p.image_mask, n) for p, n in zip(encoded, (8, 4, 3, 6))]
        alone = [generate(ref, e_ref, [r], codec.vocab)[0].token_ids for r in rows]
        same &= [g.token_ids for g in generate(trt_b, e_trt, rows, codec.vocab)] == alone
        # the suffix-prefill path: a shared head, then each prompt's suffix (what the pipeline does)
        head = encoded[0].input_ids.index(codec.vocab.grounding) + 1
        _, head_trt = trt_b.prefill(e_trt, encoded[0].input_ids[:head], encoded[0].image_mask[:head])
        _, head_ref = ref.prefill(e_ref, encoded[0].input_ids[:head], encoded[0].image_mask[:head])
        lt, _ = trt_b.prefill_batch([head_trt] * 4, [p.input_ids[head:] for p in encoded])
        lr, _ = ref.prefill_batch([head_ref] * 4, [p.input_ids[head:] for p in encoded])
        suffix_same = [int(np.argmax(a)) for a in lt] == [int(np.argmax(b)) for b in lr]
        verdict, ok = export.precision_verdict(same and suffix_same, margins, diff, prec)
        kv = str(trt_b.kv_dtype).replace("torch.", "")
        table.add("tensorrt tokens == torch", "tiny", prec, f"{verdict}; KV {kv}; build {build_s:.0f} s",
                  f"torch fp32 on cuda ({trt_b.graph_error or 'CUDA graph'})", ok)
        arena_switches(table, "tensorrt", trt_b, e_trt, codec, prec)
        trt_b.close()
    ref.close()


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="", help="directory for device_check.md and device_check.json (only those)")
    ap.add_argument("--workdir", default="", help="checkpoints and engines (default: a temporary folder)")
    ap.add_argument("--skip-full", action="store_true", help="tiny checkpoint only (about a minute)")
    ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a smoke test of this script)")
    args = ap.parse_args(argv)
    import torch

    global DEVICE
    DEVICE = args.device
    if DEVICE != "cpu" and not torch.cuda.is_available():
        print(f"device_check: torch {torch.__version__} sees no CUDA device", file=sys.stderr)
        return 2
    from kosmos2_ros.fixtures.checkpoints import build_tiny_checkpoint

    work = Path(args.workdir or tempfile.mkdtemp(prefix="kosmos2_device_"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else work
    out.mkdir(parents=True, exist_ok=True)
    cc = torch.cuda.get_device_capability(0) if DEVICE != "cpu" else (0, 0)
    precisions = (["fp32", "fp16"] + (["bf16"] if tuple(cc) >= (8, 0) else [])) if DEVICE != "cpu" else ["fp32", "bf16"]
    try:
        import tensorrt
        trt_line = f"TensorRT {tensorrt.__version__}"
    except ImportError:
        tensorrt, trt_line = None, "no TensorRT (its rows are skipped)"
    import transformers

    gpu = torch.cuda.get_device_name(0) if DEVICE != "cpu" else "none (--device cpu)"
    head = (f"GPU: {gpu} (sm{cc[0]}{cc[1]}); torch {torch.__version__}, "
            f"transformers {transformers.__version__}, Python {sys.version.split()[0]}; {trt_line}")
    print(head, flush=True)
    print(HEADER, flush=True)
    table, failures = Table(), []
    t0 = time.perf_counter()
    tiny = work / "tiny"
    if not (tiny / "config.json").is_file():
        build_tiny_checkpoint(tiny, train=True)
    steps: List[Tuple[str, Callable[[], None]]] = [("tiny", lambda: tiny_rows(table, tiny, precisions)),
                                                   ("logits", lambda: logits_rows(table))]
    if not args.skip_full:
        steps.append(("full-size", lambda: full_rows(table, work)))
    if tensorrt is not None and DEVICE != "cpu":
        steps.append(("tensorrt", lambda: tensorrt_rows(table, tiny, work / "artifacts", precisions)))
    for name, step in steps:
        try:
            step()
        except Exception:  # noqa: BLE001 - report every failure, keep checking the rest
            failures.append(f"{name}:\n{traceback.format_exc()}")
            print(failures[-1], flush=True)
    text = f"{head}; {time.perf_counter() - t0:.0f} s\n\n{table.markdown()}\n"
    if failures:
        text += "\nFailures:\n\n```\n" + "\n".join(failures) + "```\n"
    (out / "device_check.md").write_text(text)
    (out / "device_check.json").write_text(json.dumps({"head": head, "seconds": round(time.perf_counter() - t0),
                                                       "rows": [dict(zip(("check", "checkpoint", "precision",
                                                                          "measured", "reference", "ok"), r))
                                                                for r in table.rows], "failures": failures}, indent=1))
    print(f"\nwritten to {out / 'device_check.md'} ({time.perf_counter() - t0:.0f} s)")
    return 0 if table.rows and all(r[5] for r in table.rows) and not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
