"""What exact fp32 can reach on this machine: the floor under any faithful referring-expression path.

A path that reproduces the model's numbers must still run the vision encoder (every patch token
through every layer), prefill the prompt and take its decode steps. Their matrix products
cannot go faster than this machine's best measured fp32 GEMM rate, and each decode step must
stream the decoder's weights at least once at the best measured bandwidth. Dividing the
baseline's measured time by that floor bounds the speed-up any exact path could show.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Tuple


@dataclass
class Machine:
    gflops: float   # best fp32 GEMM rate seen (prefill / vision shapes)
    gbs: float      # best weight-streaming rate seen (batch-1 GEMV over a decoder-sized matrix)


def _best(fn, repeat: int = 8) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure(torch: Any) -> Machine:
    """Peak-ish GEMM and streaming rates with torch's own kernels, at the model's shapes."""
    rates = []
    for m, k, n in ((257, 1024, 4096), (96, 2048, 8192), (256, 2048, 2048)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        rates.append(2 * m * k * n / _best(lambda a=a, b=b: a @ b) / 1e9)
    w = torch.randn(8192, 8192)   # 256 MB: far beyond the caches
    x = torch.randn(1, 8192)
    gbs = w.numel() * 4 / _best(lambda: x @ w, repeat=5) / 1e9
    return Machine(max(rates), gbs)


def _linear_params(module: Any, torch: Any) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def model_sizes(model: Any, torch: Any) -> Tuple[int, int, int, int]:
    """(vision tokens, vision matrix params, decoder-layer matrix params, lm_head params)."""
    vcfg = model.config.vision_config
    tokens = (int(vcfg.image_size) // int(vcfg.patch_size)) ** 2 + 1
    text = model.text_model
    return (tokens, _linear_params(model.vision_model, torch), _linear_params(text.model.layers, torch),
            int(text.lm_head.weight.numel()))


def floor_s(sizes: Tuple[int, int, int, int], machine: Machine, prefill_tokens: int, steps: int) -> float:
    """Seconds for one frame: vision, `prefill_tokens` through the decoder (one lm_head row), `steps`
    decode steps (weights streamed once each, whatever the batch)."""
    vis_tokens, vis_params, dec_params, head = sizes
    flops = 2 * vis_tokens * vis_params + 2 * prefill_tokens * dec_params + 2 * head
    return flops / (machine.gflops * 1e9) + steps * (dec_params + head) * 4 / (machine.gbs * 1e9)
