"""An observer process: when each command and its result pass on DDS, as a third party sees them.

The stress tool's own latency (publish to result received) includes its own process's
scheduling: on a loaded 2-core machine its Python threads wait for the CPU and the
interpreter lock while sending 300 commands/s, and that wait showed as seconds of "BUSY
latency" the node never spent. This process only listens, so result-seen minus command-seen
is the node's answer time plus DDS delivery.

  scripts/ros-env python bench/observer.py /kosmos2 60     # prints one JSON line when done

It stops early when its standard input closes (the stress tool closes it when done).
"""
from __future__ import annotations

import json
import sys
import threading
import time
from typing import Dict, List, Tuple

import numpy as np


def main(argv: List[str]) -> int:
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    from kosmos2_ros.msg import GroundingCommand, GroundingResult

    prefix, seconds = argv[0].rstrip("/"), float(argv[1])
    rclpy.init()
    node = rclpy.create_node("kosmos2_observer")
    reliable = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
    seen_cmd: Dict[str, float] = {}
    seen_res: Dict[str, Tuple[float, int]] = {}
    node.create_subscription(GroundingCommand, f"{prefix}/command",
                             lambda m: seen_cmd.setdefault(m.id, time.monotonic()), reliable)
    node.create_subscription(GroundingResult, f"{prefix}/result",
                             lambda m: seen_res.setdefault(m.id, (time.monotonic(), int(m.status))), reliable)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print("ready", flush=True)
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds and not stop.is_set():
        rclpy.spin_once(node, timeout_sec=0.05)
    by_status: Dict[int, List[float]] = {}
    for cmd_id, t_cmd in seen_cmd.items():
        if cmd_id in seen_res:
            t_res, status = seen_res[cmd_id]
            by_status.setdefault(status, []).append((t_res - t_cmd) * 1e3)
    print(json.dumps({str(k): [float(np.percentile(v, q)) for q in (50, 95, 99)] + [len(v)]
                      for k, v in by_status.items()}), flush=True)
    node.destroy_node()
    rclpy.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
