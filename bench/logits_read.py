"""What a decode step costs the host: every row's 65k logits read back and reduced in numpy (the loop
before), against the loop's read (`backends.logits.DeviceLogits.read`: argmax, normaliser, location span
and control tokens computed where the logits are, one small transfer). Prints one table.

    scripts/ros-env python bench/logits_read.py [--device cuda] [--small]

Per row count: bytes crossing to the host per step, and ms per step for the read plus what the loop
derives from it (the greedy token and its probability, a constrained row's location-token choice).
It times the GPU's reduction (`read_on_device`) wherever it runs: on the CPU (where the loop itself
reads a CPU tensor in place as a host array) it only shows the script works and the bytes; the times
that matter are `--device cuda`'s, also a row of the device check.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, List, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: microsoft/kosmos-2-patch14-224's vocabulary and location tokens (1024 at the vocabulary's end).
VOCAB, PATCH_LO = 65037, 64007
HEADER = ("| rows | full rows: bytes to host | full rows: ms/step | loop's read: bytes | loop's read: ms/step "
          "| bytes, full / read | time, full / read |\n|---|---|---|---|---|---|---|")


def full_size_readout() -> Any:
    """What the decode loop reads of a full-size step (`decoding.readout_for`): the 1024 location tokens and
    four control tokens (their ids as in the full-size vocabulary's layout; the cost does not depend on them)."""
    from kosmos2_ros.core.backends.logits import Readout

    return Readout(PATCH_LO, PATCH_LO + 1024, (64004, 64005, 64006, 2))


def _ms(run: Callable[[], Any], n: int, sync: Callable[[], None]) -> float:
    for _ in range(3):
        run()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        run()
    sync()
    return (time.perf_counter() - t0) * 1000.0 / n


def measure(device: str, rows_list: List[int], n: int) -> List[Tuple[int, int, float, int, float]]:
    """(rows, full bytes, full ms, read bytes, read ms) per row count."""
    import torch

    from kosmos2_ros.core.backends.logits import DeviceLogits
    from kosmos2_ros.core.model.decoding import token_prob

    readout = full_size_readout()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out = []
    for rows in rows_list:
        z = torch.randn((rows, VOCAB), device=device) * 4

        def full(z: Any = z) -> None:
            host = z.float().cpu().numpy()
            for row in host:
                tok = int(np.argmax(row))
                token_prob(row, tok)
                int(np.argmax(row[PATCH_LO:PATCH_LO + 1024]))

        def loop_read(z: Any = z) -> None:
            for s in DeviceLogits(z).read_on_device(readout):
                s.prob(s.argmax)
                int(np.argmax(s.span))

        per_row = 5 + len(readout.tokens) + (readout.hi - readout.lo)
        out.append((rows, rows * VOCAB * 4, _ms(full, n, sync), rows * per_row * 4, _ms(loop_read, n, sync)))
    return out


def table(results: List[Tuple[int, int, float, int, float]]) -> str:
    lines = [HEADER]
    for rows, fb, fms, rb, rms in results:
        lines.append(f"| {rows} | {fb:,} | {fms:.3f} | {rb:,} | {rms:.3f} | {fb / rb:.0f}x | {fms / rms:.2f}x |")
    return "\n".join(lines)


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--small", action="store_true", help="a few steps per row count (CI's smoke run)")
    args = ap.parse_args(argv)
    import torch

    print(f"device {args.device}; torch {torch.__version__}; vocabulary {VOCAB}")
    print(table(measure(args.device, [1, 4, 8], 5 if args.small else 200)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
