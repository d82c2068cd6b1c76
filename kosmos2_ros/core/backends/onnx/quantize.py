"""int8 and int4 graphs for onnxruntime on the CPU, made once from the fp32 graphs by onnxruntime's
own quantization tools (no hand-written quantization).

Stored beside the fp32 graphs under `<precision>/` in the same cache directory (the model's hash
and the export version), with the recipe and onnxruntime's version in the manifest: a change of
recipe quantizes again, another onnxruntime does not (`is_current`). What each precision
quantizes, and why, is `QUANTIZED_CHOICES` (the numbers are from bench/bench_refer.py and
bench/precision_check.py on these 2-core machines).
They run on the CPU (onnxruntime's int8 and 4-bit kernels are CPU kernels), whatever `device` says.

Only matrix products with a constant weight are quantized: the projections and FFNs of the ViT's
and the text decoder's layers, and the lm_head. Embeddings (a Gather), LayerNorm, softmax, the
attention products (both operands are activations), the residual streams, the image-to-text
projection and the logits stay fp32, as the graphs have them.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from ...defaults import QUANTIZED_PRECISIONS
from .graph_files import has_external_data


@dataclass(frozen=True)
class GraphRecipe:
    """How one graph's weight matrix products are quantized."""

    method: str                 # "dynamic": int8 weights per output channel, activations per tensor at run time
                                # (DynamicQuantizeMatMul / MatMulInteger); "weight-only": MatMulNBits blocks
    bits: int = 8
    block_size: int = 0         # weight-only: weights per scale along the reduction axis
    accuracy_level: int = 4     # weight-only: 4 = activations quantized to int8, int8 dot products (VNNI)
    keep: Tuple[str, ...] = ()  # node-name prefixes left fp32


#: The image-to-text projection (19 M parameters, once per frame) feeds the sqrt(D)-scaled image
#: embeddings every answer reads: fp32, as in the fp16 graphs.
PROJECTION = "/image_to_text_projection/"

RECIPES: Dict[str, Dict[str, GraphRecipe]] = {
    "int8": {"vision": GraphRecipe("dynamic", keep=(PROJECTION,)), "decoder": GraphRecipe("dynamic")},
    "int4": {"vision": GraphRecipe("dynamic", keep=(PROJECTION,)),
             "decoder": GraphRecipe("weight-only", bits=4, block_size=128)},
}

#: What each precision does to which matrix products, and why. Measured on the full-size
#: architecture in the referring-expression benchmark, 2 cores, onnxruntime 1.32 (fp32 there:
#: vision 890-997 ms, prefill of a 73-token prompt 987-1014 ms, 117-173 ms per decode step).
QUANTIZED_CHOICES = (
    ("ViT layers (q/k/v/out, fc1/fc2), int8 and int4",
     "dynamic int8: weights per output channel, activations per tensor at run time",
     "257 tokens at once make the ViT compute-bound: int8 dot products (851 GOP/s against fp32's 205 GFLOP/s "
     "here) took it to 300-420 ms; 4-bit and 8-bit weight-only blocks took 531 and 491 ms (measured alone) "
     "and would save only 0.2 GB more"),
    ("text decoder layers and lm_head, int8", "dynamic int8 (as the ViT)",
     "prefill 312-324 ms and 47-49 ms per decode step; 8-bit weight-only blocks of 128 (MatMulNBits) gave the "
     "same 47 ms per step and a slower prefill (474 ms), so a command took 1091 ms against 878"),
    ("text decoder layers and lm_head, int4", "weight-only 4-bit, symmetric blocks of 128, int8 compute (VNNI)",
     "decode streams the weights once per step: 24-29 ms per step, prefill 491-526 ms; blocks of 32 cost "
     "32 ms and 874 ms (measured alone). The Q/DQ form (DequantizeLinear with blocks + MatMul, which "
     "TensorRT can build) ran as fast (onnxruntime fuses it) but held 0.35 GB more and needs opset 21"),
    ("embeddings, LayerNorm, softmax, attention q.k and p.v, residual streams", "fp32",
     "a Gather and the activations' own arithmetic: no weight matrix to quantize"),
    ("lm_head (2048 x 65037)", "quantized with the decoder layers, logits out in fp32",
     "kept fp32 it lowered the logit error by 5-6 % (full size, 300 steps: int8 max 0.196 -> 0.182, int4 "
     "1.73 -> 1.62; the same argmax agreement) for 0.53 GB more to hold and to read every step"),
    ("patch embedding (a Conv), image-to-text projection", "fp32",
     "once per frame; they feed the image embeddings every answer reads"),
)

#: A checkpoint whose matrices are narrower than this quantizes too coarsely to say anything about
#: the real model's error (the tiny test checkpoints: 32 and 64 wide); it still runs, to test the path.
MIN_SENSIBLE_WIDTH = 256


class QuantizeError(RuntimeError):
    """Quantizing the fp32 graphs failed."""


def recipe_record(precision: str) -> dict:
    """What made a precision's graphs: compared with the cached record to decide whether to quantize again."""
    import onnxruntime

    record = {"tool": f"onnxruntime {onnxruntime.__version__}",
              "graphs": {g: asdict(r) for g, r in RECIPES[precision].items()}}
    return json.loads(json.dumps(record))     # as the manifest stores it (lists, not tuples)


def missing_tools() -> str:
    """Why the quantization tools cannot run here ("" when they can)."""
    missing = [m for m in ("onnxruntime", "onnx", "onnx_ir") if importlib.util.find_spec(m) is None]
    return f"quantizing needs {' and '.join(missing)} (pip install {' '.join(m.replace('_', '-') for m in missing)})" \
        if missing else ""


def weight_matmuls(graph_path: Path) -> Tuple[List[str], int]:
    """(names of the MatMul nodes whose second input is a 2-D initializer, the smallest such
    reduction width): the weight matrix products a recipe may quantize."""
    import onnx

    model = onnx.load(str(graph_path), load_external_data=False)
    dims = {i.name: tuple(i.dims) for i in model.graph.initializer}
    names, width = [], 1 << 30
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(dims.get(node.input[1], ())) == 2:
            names.append(node.name)
            width = min(width, dims[node.input[1]][0])
    return names, width


class _PreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


_NO_PREPROCESS_HINT = _PreprocessHint()


def quantize_graph(src: Path, dst: Path, recipe: GraphRecipe) -> dict:
    """One fp32 graph -> its quantized copy at `dst`; returns what was quantized."""
    names, width = weight_matmuls(src)
    keep = [n for n in names if n.startswith(recipe.keep)] if recipe.keep else []
    quantized = [n for n in names if n not in keep]

    external = has_external_data(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if recipe.method == "dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # (It warns, through the root logger, that static-quantization pre-processing was not run:
        # that is for calibrated static quantization, not this.)
        logging.getLogger().addFilter(_NO_PREPROCESS_HINT)
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8, nodes_to_quantize=quantized,
                         use_external_data_format=external, extra_options={"MatMulConstBOnly": True})
    elif recipe.method == "weight-only":
        import onnx

        quantizer = weight_only_quantizer(recipe.bits)(
            onnx.load(str(src)), block_size=recipe.block_size, is_symmetric=True,
            accuracy_level=recipe.accuracy_level, nodes_to_exclude=keep, op_types_to_quantize=("MatMul",))
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=external)
    else:
        raise QuantizeError(f"unknown quantization method {recipe.method!r}")
    return {"quantized": len(quantized), "kept_fp32": len(keep), "min_width": width}


def weight_only_quantizer(bits: int) -> Callable[..., Any]:
    """onnxruntime's MatMulNBits quantizer for `bits`: `MatMulNBitsQuantizer` where it exists (1.21+), else the
    4-bit `MatMul4BitsQuantizer` of older releases (NVIDIA's Jetson builds of 1.19-1.20); same arguments but bits."""
    if importlib.util.find_spec("onnxruntime.quantization.matmul_nbits_quantizer") is not None:
        from functools import partial

        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        return partial(MatMulNBitsQuantizer, bits=bits)
    if bits != 4:
        raise QuantizeError(f"{bits}-bit weight-only quantization needs onnxruntime 1.21 or later "
                            f"(its MatMulNBitsQuantizer); this onnxruntime quantizes 4 bits only")
    from onnxruntime.quantization.matmul_4bits_quantizer import MatMul4BitsQuantizer

    return MatMul4BitsQuantizer


def quantize_variant(out_dir: Path, manifest: dict, precision: str, log: Optional[Callable[[str], None]] = None) -> dict:
    """The `precision` graphs made from the fp32 graphs in `out_dir` (under `<precision>/`); returns
    the variant's manifest entry (files relative to `out_dir`, dtypes, recipe and what was quantized)."""
    if precision not in QUANTIZED_PRECISIONS:
        raise QuantizeError(f"precision must be one of {QUANTIZED_PRECISIONS}, got {precision!r}")
    problem = missing_tools()
    if problem:
        raise QuantizeError(problem)
    out_dir = Path(out_dir)
    fp32 = manifest["variants"]["fp32"]["files"]
    tmp = out_dir / f"{precision}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    stats = {}
    for graph, recipe in RECIPES[precision].items():
        t0 = time.perf_counter()
        try:
            stats[graph] = quantize_graph(out_dir / fp32[graph], tmp / fp32[graph], recipe)
        except Exception as exc:   # noqa: BLE001 - the tools raise many types; say which graph failed
            shutil.rmtree(tmp, ignore_errors=True)
            raise QuantizeError(f"quantizing the {graph} graph to {precision} failed: {exc}") from exc
        if log:
            log(f"quantized {graph} to {precision} ({recipe.method}, {stats[graph]['quantized']} matrix products) "
                f"in {time.perf_counter() - t0:.1f} s")
    final = out_dir / precision
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return {"files": {g: f"{precision}/{f}" for g, f in fp32.items()},
            "dtypes": {"pixel_values": "float32", "image_embeds": "float32", "logits": "float32", "kv": "float32"},
            "quantization": dict(recipe_record(precision), stats=stats)}


def is_current(variant: dict, precision: str) -> bool:
    """Whether cached quantized graphs were made by today's recipe. The onnxruntime that made them is
    recorded but not compared: graphs made on a desktop and copied to a robot with another
    onnxruntime must not be quantized again there (that needs 7.5-18 GB)."""
    return variant.get("quantization", {}).get("graphs") == recipe_record(precision)["graphs"]


def cpu_flags() -> frozenset:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_problem(flags: Optional[frozenset] = None) -> str:
    """What this CPU lacks for fast int8 dot products ("" when it has them, or cannot tell)."""
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return ""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        if flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
            return ""
        return "this CPU has no VNNI int8 dot products (AVX-512 VNNI or AVX-VNNI): int8 and int4 run, slower"
    if machine in ("aarch64", "arm64"):
        return "" if flags & {"asimddp", "i8mm"} else "this CPU has no int8 dot products (Arm dotprod): int8 and int4 run, slower"
    return ""


def caveat(variant: dict) -> str:
    """The one line a quantized variant's results come with ("" when none)."""
    notes = []
    widths = [s.get("min_width", 1 << 30) for s in variant.get("quantization", {}).get("stats", {}).values()]
    if widths and min(widths) < MIN_SENSIBLE_WIDTH:
        notes.append(f"this checkpoint is too small to quantize sensibly (matrices {min(widths)} wide, fewer than "
                     f"{MIN_SENSIBLE_WIDTH}): it runs to test the path, and its error says nothing of a real model's")
    problem = cpu_problem()
    if problem:
        notes.append(problem)
    return "; ".join(notes)


def graph_bytes(out_dir: Path, files: Dict[str, str]) -> int:
    """Bytes on disk of a variant's graphs and their weight files."""
    return sum(f.stat().st_size for rel in files.values() for f in (Path(out_dir) / rel).parent.iterdir() if f.is_file())
