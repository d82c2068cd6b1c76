"""Peak host memory of loading the torch static path in fp16 (a Jetson shares its 8 or 16 GB with the GPU).

Each way runs in a process of its own, on the CPU (what a Jetson's loader does before the weights move to
the GPU), and reports its peak resident memory (VmHWM, which counts the checkpoint's file pages while
they are mapped) and its peak anonymous memory (RssAnon sampled every 5 ms: what only the process holds)
after the modules are built:

- baseline: the checkpoint read in fp32, then fp16 copies of the matrix products (the static path before);
- ours: the checkpoint read once in fp16 with plain reads (`torch.static.read_in_dtype`: no mapping of the
  file), the fp32 islands (LayerNorms, the ViT's embeddings, the image-to-text projection) read again in
  fp32 (`torch.static.static_modules`).

Against the fp16 weights the modules hold (target: ours at most 1.25x). The full-size checkpoint is the real
architecture with random weights, saved once in fp32 safetensors (6.6 GB) under --workdir.

  scripts/ros-env python bench/load_memory.py --workdir /tmp/kb     # full size, ~3 min (+1 min to build it once)
  scripts/ros-env python bench/load_memory.py --small               # the tiny checkpoint, seconds (CI's smoke run)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[1]
WAYS = {"baseline": "fp32 read, then fp16 copies (before)", "ours": "read in fp16 by plain reads, fp32 islands re-read"}


def status_kb(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":")))


def child(model_dir: str, way: str) -> None:
    """Build the fp16 modules one way and print {"peak_mb", "anon_peak_mb", "weights_mb"} as JSON.

    VmHWM counts the checkpoint's pages while they are mapped (safetensors files are read through mmap:
    clean file pages the kernel can drop under pressure); RssAnon, sampled every 5 ms, is the memory only
    the process holds (weights, copies).
    """
    sys.path.insert(0, str(ROOT))
    import threading

    import torch

    from kosmos2_ros.core.backends.torch.backend import load_model
    from kosmos2_ros.core.backends.torch.static import static_modules

    torch.set_num_threads(2)
    anon, done = [status_kb("RssAnon")], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            anon.append(status_kb("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    model = load_model(model_dir, "fp32", False) if way == "baseline" else None
    decoder, vision, _ = static_modules(model_dir, "fp16", model=model)
    del model
    done.set()
    sampler.join()
    anon.append(status_kb("RssAnon"))
    seen, weights = set(), 0
    for module in (decoder, vision):
        for t in list(module.parameters()) + list(module.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                weights += t.numel() * t.element_size()
    print(json.dumps({"peak_mb": status_kb("VmHWM") / 1024, "anon_peak_mb": max(anon) / 1024,
                      "weights_mb": weights / (1 << 20)}))


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="the tiny checkpoint (checks the script runs)")
    ap.add_argument("--workdir", default="", help="where the full-size checkpoint is kept (default: a temp dir)")
    ap.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "WAY"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    sys.path.insert(0, str(ROOT))
    from kosmos2_ros.fixtures.checkpoints import build_tiny_checkpoint

    work = Path(args.workdir or tempfile.mkdtemp(prefix="kosmos2_load_"))
    model_dir = work / ("tiny_random" if args.small else "full_size")
    if not (model_dir / "config.json").exists():
        build_tiny_checkpoint(model_dir, full_size=not args.small, train=False)
    on_disk = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / (1 << 20)
    rows = {}
    for way in WAYS:
        env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
        out = subprocess.run([sys.executable, __file__, "--child", str(model_dir), way], capture_output=True,
                             text=True, env=env, check=True).stdout
        rows[way] = json.loads(out.strip().splitlines()[-1])
    fp16 = rows["ours"]["weights_mb"]
    print(f"{'tiny' if args.small else 'full-size'} checkpoint, {on_disk:.0f} MiB of fp32 safetensors; "
          f"fp16 modules hold {fp16:.0f} MiB")
    print("| way | peak resident (VmHWM) MiB | / fp16 weights | vs baseline | peak anonymous (RssAnon) MiB | "
          "/ fp16 weights | vs baseline |")
    print("|---|---|---|---|---|---|---|")
    base = rows["baseline"]
    for way, label in WAYS.items():
        peak, anon = rows[way]["peak_mb"], rows[way]["anon_peak_mb"]
        print(f"| {way}: {label} | {peak:.0f} | {peak / fp16:.2f}x | {peak / base['peak_mb']:.2f}x | {anon:.0f} | "
              f"{anon / fp16:.2f}x | {anon / base['anon_peak_mb']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
