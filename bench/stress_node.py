"""Stress a running grounding node over real DDS and print what happened to every command.

Starts the node (unless --attach), publishes frames at camera rate and commands at a rate
several times what the node can serve, for a bounded count or time, then waits for the
stragglers and prints: commands sent, results by status, lost (no result), duplicated
(more than one result), latency p50/p95/p99, and the node's resident memory at start and
end. Lost and duplicated must be 0. Not a test: a tool whose table goes in the README.

  scripts/ros-env python bench/stress_node.py --count 2000 --rate 40
  scripts/ros-env python bench/stress_node.py --count 10000 --rate 60 --soak   # memory trend

The node it starts is the real one (`python -m kosmos2_ros.ros.node`) on its own
ROS_DOMAIN_ID (--domain), discovery limited to localhost, its log in --log. Latency is from
publishing a command to receiving its result, per status (BUSY answers are immediate).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import camera  # noqa: E402 - bench/camera.py, the camera process

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test"))
from node_helpers import free_domain  # noqa: E402

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def percentile(values: List[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def start_node(model: str, node_name: str, extra: List[str], log_path: Path) -> subprocess.Popen:
    """The real node as a child process; its output goes to a file (a pipe nobody reads would block it)."""
    cmd = [sys.executable, "-m", "kosmos2_ros.ros.node", "--ros-args", "-r", f"__node:={node_name}",
           "-p", f"model:={model}", "-p", "allow_download:=false", "-p", "max_frame_age_s:=0.0", *extra]
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    log = open(log_path, "w")  # noqa: SIM115 - the child keeps it open for its lifetime
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)


def trend_mb_per_1k(trace: List[tuple]) -> float:
    """Least-squares slope of RSS over commands sent, second half of the run (after warm-up)."""
    half = trace[len(trace) // 2:]
    if len(half) < 2:
        return float("nan")
    x = np.array([c for c, _ in half], dtype=float)
    y = np.array([m for _, m in half], dtype=float)
    if np.ptp(x) == 0:
        return float("nan")
    return float(np.polyfit(x, y, 1)[0] * 1000.0)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model dir (default: build a tiny test checkpoint)")
    ap.add_argument("--attach", action="store_true", help="use a node that is already running")
    ap.add_argument("--node", default="kosmos2", help="node name (topics /<node>/command, /<node>/result)")
    ap.add_argument("--count", type=int, default=1000, help="commands to send")
    ap.add_argument("--duration", type=float, default=600.0, help="stop sending after this many seconds")
    ap.add_argument("--rate", type=float, default=40.0, help="commands per second")
    ap.add_argument("--camera-hz", type=float, default=15.0)
    ap.add_argument("--size", default="320x240", help="frame WxH")
    ap.add_argument("--task-mix", default="refer", help="comma list of tasks to cycle: refer,caption,vqa,region")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--drain", type=float, default=60.0, help="seconds to wait for results after sending")
    ap.add_argument("--soak", action="store_true", help="also print memory every 10%% of the run")
    ap.add_argument("--param", action="append", default=[], help="extra node parameter name:=value")
    ap.add_argument("--domain", type=int, default=0,
                    help="ROS_DOMAIN_ID for the node and this tool (default: one no test run holds)")
    ap.add_argument("--pid", type=int, default=0, help="with --attach: the node's pid, for its RSS")
    ap.add_argument("--log", default="", help="the started node's log file (default: a temp file)")
    args = ap.parse_args(argv)
    os.environ["ROS_DOMAIN_ID"] = str(args.domain or free_domain())

    import rclpy
    from rclpy.node import Node
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

    from kosmos2_ros.msg import GroundingCommand, GroundingResult

    proc = None
    if not args.attach:
        model = args.model
        if not model:
            from kosmos2_ros.fixtures.checkpoints import build_tiny_checkpoint

            model = str(build_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny"))
        extra = []
        for p in args.param:
            extra += ["-p", p]
        log_path = Path(args.log or tempfile.mkstemp(prefix="kosmos2_stress_", suffix=".log")[1])
        print(f"node log: {log_path}", flush=True)
        proc = start_node(model, args.node, extra, log_path)

    rclpy.init()
    node = Node("kosmos2_stress")
    w, h = (int(v) for v in args.size.split("x"))
    reliable = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
    cmd_pub = node.create_publisher(GroundingCommand, f"/{args.node}/command", reliable)
    sent: Dict[str, float] = {}
    got: Dict[str, List[int]] = defaultdict(list)
    latency: Dict[int, List[float]] = defaultdict(list)
    lock = threading.Lock()

    def on_result(msg: GroundingResult) -> None:
        now = time.monotonic()
        with lock:
            got[msg.id].append(int(msg.status))
            if msg.id in sent and len(got[msg.id]) == 1:
                latency[int(msg.status)].append((now - sent[msg.id]) * 1e3)

    node.create_subscription(GroundingResult, f"/{args.node}/result", on_result, reliable)
    spin = threading.Thread(target=rclpy.spin, args=(node,), daemon=True)
    spin.start()
    stop = threading.Event()
    # The camera is its own process, as a driver is: frames made and published here would
    # compete with the commands and results this process times, on the same interpreter lock.
    camera_proc = camera.start(args.size, args.camera_hz, reliable=False, seconds=args.duration + args.drain + 180)

    # Wait until the node answers (it may be loading the model).
    t_wait = time.monotonic()
    ready = False
    while time.monotonic() - t_wait < 120 and (proc is None or proc.poll() is None):
        probe = GroundingCommand(id=f"probe-{time.monotonic_ns()}", task="refer", text="a red square",
                                 max_new_tokens=args.max_new_tokens)
        cmd_pub.publish(probe)
        time.sleep(1.0)
        with lock:
            if any(s and s[0] == 0 for k, s in got.items() if k.startswith("probe-")):
                ready = True
                break
    if not ready:
        print("node did not become ready (see the node log)", file=sys.stderr)
        stop.set()
        camera_proc.terminate()
        if proc is not None:
            proc.terminate()
        return 1
    # A third process timing the node from outside this one (see bench/observer.py).
    observer = subprocess.Popen([sys.executable, str(Path(__file__).with_name("observer.py")), f"/{args.node}",
                                 str(args.count / args.rate + args.drain + 5)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    observer.stdout.readline()   # "ready": subscribed
    time.sleep(2.0)              # and matched
    pid = proc.pid if proc is not None else args.pid
    rss_start = rss_mb(pid) if pid else float("nan")
    rss_trace = [(0, rss_start)]
    tasks = args.task_mix.split(",")
    t0 = time.monotonic()
    period = 1.0 / args.rate
    for i in range(args.count):
        if time.monotonic() - t0 > args.duration:
            break
        task = tasks[i % len(tasks)]
        cmd = GroundingCommand(id=f"c{i}", task=task, text={"refer": "a red square", "vqa": "what is it?"}.get(task, ""),
                               max_new_tokens=args.max_new_tokens)
        if task == "region":
            cmd.use_region = True
            cmd.region.x_min, cmd.region.y_min, cmd.region.x_max, cmd.region.y_max = 10.0, 10.0, w / 2.0, h / 2.0
        with lock:
            sent[cmd.id] = time.monotonic()
        cmd_pub.publish(cmd)
        if args.soak and pid and args.count >= 10 and i % (args.count // 10) == 0 and i:
            rss_trace.append((i, rss_mb(pid)))
            with lock:
                ok_so_far = sum(1 for k in sent if got.get(k) and got[k][0] == 0)
            print(f"  sent {i:6d}  ok {ok_so_far:6d}  node RSS {rss_trace[-1][1]:8.1f} MB", flush=True)
        target = t0 + (i + 1) * period
        time.sleep(max(0.0, target - time.monotonic()))
    send_s = time.monotonic() - t0
    deadline = time.monotonic() + args.drain
    while time.monotonic() < deadline:
        with lock:
            if all(k in got for k in sent):
                break
        time.sleep(0.2)
    time.sleep(1.0)   # let duplicates, if any, arrive
    stop.set()
    camera_proc.terminate()
    observed = {}
    try:
        observed = json.loads(observer.communicate(timeout=30)[0].strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        pass
    rss_end = rss_mb(pid) if pid else float("nan")
    rss_trace.append((len(sent), rss_end))
    alive = proc is None or proc.poll() is None
    with lock:
        statuses = Counter()
        lost = dup = 0
        for k in sent:
            s = got.get(k, [])
            if not s:
                lost += 1
            elif len(s) > 1:
                dup += 1
            if s:
                statuses[s[0]] += 1
    names = {0: "ok", 1: "busy", 2: "no_frame", 3: "stale_frame", 4: "invalid", 5: "cancelled", 6: "model_error",
             7: "not_active"}
    lost_ids = [k for k in sent if not got.get(k)]
    if lost_ids:
        print(f"lost ids (first 20): {' '.join(lost_ids[:20])}", file=sys.stderr)
    all_lat = [v for vs in latency.values() for v in vs]
    print()
    print("| metric | value |")
    print("|---|---|")
    print(f"| commands sent | {len(sent)} in {send_s:.1f} s ({len(sent) / max(send_s, 1e-9):.1f}/s) |")
    print(f"| frames | {args.camera_hz:g} Hz, {w}x{h} rgb8, best effort, from a camera process |")
    for code, n in sorted(statuses.items()):
        print(f"| results {names.get(code, code)} | {n} |")
    print(f"| lost (no result) | {lost} |")
    print(f"| duplicated | {dup} |")
    for label, values in [("all results", all_lat)] + [(names.get(c, str(c)), v) for c, v in sorted(latency.items())]:
        print(f"| latency p50 / p95 / p99 ms ({label}) | {percentile(values, 50):.1f} / "
              f"{percentile(values, 95):.1f} / {percentile(values, 99):.1f} |")
    for code, (p50, p95, p99, n) in sorted((int(k), v) for k, v in observed.items()):
        print(f"| latency p50 / p95 / p99 ms ({names.get(code, code)}, at the node: an observer process sees "
              f"command -> result, {n} commands) | {p50:.1f} / {p95:.1f} / {p99:.1f} |")
    print(f"| node RSS start / end MB | {rss_start:.1f} / {rss_end:.1f} |")
    print(f"| node alive at the end | {'yes' if alive else 'NO'} |")
    if args.soak:
        print(f"| node RSS trace MB (commands sent: MB) | {' '.join(f'{c}:{m:.1f}' for c, m in rss_trace)} |")
        print(f"| RSS slope, second half, MB per 1000 commands | {trend_mb_per_1k(rss_trace):+.2f} |")
    node.destroy_node()
    rclpy.try_shutdown()
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0 if lost == 0 and dup == 0 else 2


if __name__ == "__main__":
    sys.exit(main())
