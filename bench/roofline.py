"""What each precision can reach on this machine: the floor under a referring-expression path.

A path must still run the vision encoder (every patch token through every layer), prefill the
prompt and take its decode steps. Their matrix products cannot go faster than the best matrix
rate this machine's kernels reach, and each decode step must read the decoder's weights from
memory at least once, at no more than the machine's memory read rate. Dividing a measured time by
that floor says how far a path is from what this machine's kernels allow.

The rates are measured, not taken from a datasheet, with every kernel the package runs: torch's
and onnxruntime's fp32 MatMul for fp32 (the best of both), onnxruntime's dynamic-int8 MatMul for
int8 and its 4-bit MatMulNBits for int4, each on one matrix of the model's shapes (a 2-core VM
gives no reliable clock or port count to compute a peak from). The weight bytes a step streams
are each precision's own: 4 per weight in fp32, 1 in int8, 0.5 + a 4-byte scale per 128
weights in int4. The read rate is one pass over 1 GB; beside it, each kind of kernel's own
streaming rate is measured through two decoder layers' matrices at their own sizes, one token
after another, as a decode step reads them (what a path that stays under the floor is limited by).
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import numpy as np

#: Shapes of the model's matrix products: (tokens, in, out) of vision and prefill.
GEMM_SHAPES = ((257, 1024, 4096), (96, 2048, 8192))
#: Two decoder layers' weight matrices (q, k, v, out, fc1, fc2), applied one after another to one
#: token: what a decode step streams, at its own sizes (384 MB in fp32, far beyond the caches).
STREAM_CHAIN = ((2048, 2048),) * 4 + ((2048, 8192), (8192, 2048))
STREAM_LAYERS = 2


def weight_bytes(recipe: Any) -> float:
    """Bytes per weight a decode step streams: 4 in fp32; bits / 8 quantized, plus an fp32 scale per block."""
    if recipe is None:
        return 4.0
    return recipe.bits / 8 + (4.0 / recipe.block_size if recipe.block_size else 0.0)


@dataclass
class Machine:
    gflops: float     # best matrix rate seen (prefill / vision shapes), GFLOP/s (int8: GOP/s)
    kernel_gbs: float  # best weight-streaming rate of the kernels (one token through two decoder layers'
                       # matrices), GB/s of these weights' bytes
    gbs: float        # the best memory read rate seen (1 GB read once, or any kernel's streaming): the bound
    source: str       # which kernels reached the matrix rates


def read_gbs(torch: Any) -> float:
    """Memory read bandwidth: the best rate of one pass over 1 GB (a max: one compare per element)."""
    a = torch.randn(256 * 1024 * 1024)
    return a.numel() * 4 / _best(lambda: torch.max(a), repeat=4) / 1e9


def _best(fn: Callable[[], Any], repeat: int = 6) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _chain() -> Tuple[Tuple[int, int], ...]:
    return STREAM_CHAIN * STREAM_LAYERS


def _torch_rates(torch: Any) -> Tuple[float, float]:
    rates = []
    for m, k, n in GEMM_SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        rates.append(2 * m * k * n / _best(lambda a=a, b=b: a @ b) / 1e9)
    weights = [torch.randn(k, n) for k, n in _chain()]

    def step():
        x = torch.randn(1, 2048)
        for w in weights:
            x = x @ w
    return max(rates), sum(w.numel() for w in weights) * 4 / _best(step, repeat=4) / 1e9


def _session(shapes: Tuple[Tuple[int, int], ...], recipe: Any, work: Path, name: str) -> Any:
    """MatMuls with constant weights of `shapes`, one after another, quantized as `recipe` says (None: fp32)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i, (k, n) in enumerate(shapes):
        inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"], name=f"/fc{i}/MatMul"))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", shapes[0][0]])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["m", shapes[-1][1]])], inits)
    src = work / name / "fp32.onnx"
    src.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    path = src
    if recipe is not None:
        from kosmos2_ros.core.backends.onnx import quantize

        path = src.with_name("quantized.onnx")
        quantize.quantize_graph(src, path, recipe)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ort_rates(recipe: Any, work: Path) -> Tuple[float, float]:
    rates, rng = [], np.random.default_rng(1)
    for m, k, n in GEMM_SHAPES:
        s, x = _session(((k, n),), recipe, work, f"gemm{k}x{n}"), rng.standard_normal((m, k)).astype(np.float32)
        rates.append(2 * m * k * n / _best(lambda s=s, x=x: s.run(None, {"x": x})) / 1e9)
    s, x = _session(_chain(), recipe, work, "chain"), rng.standard_normal((1, 2048)).astype(np.float32)
    weights = sum(k * n for k, n in _chain())
    return max(rates), weights * weight_bytes(recipe) / _best(lambda: s.run(None, {"x": x}), repeat=4) / 1e9


def recipe_kind(recipe: Any) -> str:
    return "fp32" if recipe is None else f"{recipe.method} int{recipe.bits}"


def measure(torch: Any, precisions: Tuple[str, ...] = ("fp32",)) -> Dict[str, Machine]:
    """The best matrix and streaming rates of every kind of weights the precisions use (fp32,
    dynamic int8, 4-bit weight-only), with the kernels the package runs; keyed by `recipe_kind`."""
    from kosmos2_ros.core.backends.onnx import quantize

    recipes = {"fp32": None}
    for p in precisions:
        for r in quantize.RECIPES.get(p, {}).values():
            recipes[recipe_kind(r)] = r
    out = {}
    memory = read_gbs(torch)
    with tempfile.TemporaryDirectory(prefix="kosmos2_roofline_") as tmp:
        for kind, recipe in recipes.items():
            gf, gb = _ort_rates(recipe, Path(tmp) / kind.replace(" ", "_"))
            source = "onnxruntime"
            if recipe is None:
                tgf, tgb = _torch_rates(torch)
                source = f"GEMM {'torch' if tgf > gf else 'onnxruntime'}, streaming {'torch' if tgb > gb else 'onnxruntime'}"
                gf, gb = max(gf, tgf), max(gb, tgb)
            out[kind] = Machine(gf, gb, memory, source)
    # The decode steps' bound: the best rate anything here read memory at (one pass, or a kernel).
    best = max([memory] + [m.kernel_gbs for m in out.values()])
    for m in out.values():
        m.gbs = best
    return out


def _linear_params(module: Any, torch: Any) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def model_sizes(model: Any, torch: Any) -> Tuple[int, int, int, int]:
    """(vision tokens, vision matrix params, decoder-layer matrix params, lm_head params)."""
    vcfg = model.config.vision_config
    tokens = (int(vcfg.image_size) // int(vcfg.patch_size)) ** 2 + 1
    text = model.text_model
    return (tokens, _linear_params(model.vision_model, torch), _linear_params(text.model.layers, torch),
            int(text.lm_head.weight.numel()))


def floor_s(sizes: Tuple[int, int, int, int], machines: Dict[str, Machine], prefill_tokens: int, steps: int,
            precision: str = "fp32") -> float:
    """Seconds for one frame: vision, `prefill_tokens` through the decoder (one lm_head row), `steps`
    decode steps (weights streamed once each, whatever the batch), each graph at its own weights' rates."""
    from kosmos2_ros.core.backends.onnx import quantize

    recipes = quantize.RECIPES.get(precision, {})
    vision, decoder = (machines[recipe_kind(recipes.get(g))] for g in ("vision", "decoder"))
    vis_tokens, vis_params, dec_params, head = sizes
    return (2 * vis_tokens * vis_params / (vision.gflops * 1e9)
            + (2 * prefill_tokens * dec_params + 2 * head) / (decoder.gflops * 1e9)
            + steps * (dec_params + head) * weight_bytes(recipes.get("decoder")) / (decoder.gbs * 1e9))
