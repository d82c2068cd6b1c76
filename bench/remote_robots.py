"""One node serving robots over the network (issue 31): simulated robots as processes, real DDS.

  scripts/ros-env python bench/remote_robots.py             # 1, 2, 4, 8 robots, 60 s each, relay at 4
  scripts/ros-env python bench/remote_robots.py --full-size # + the full-size architecture at 2 robots
  scripts/ros-env python bench/remote_robots.py --small     # CI smoke: 1 and 2 robots, 4 s, relay at 2

Each robot is its own process (this script, --role robot), as a robot's computer would be: its
camera publishes what a robot sends over WiFi, compressed colour (JPEG, quality 80) and
compressedDepth (16UC1 PNG with image_transport's header) of a 640x480 ray-cast table scene with
realistic depth noise, plus camera_info, at its own rate (5 to 15 Hz across the robots), and it
sends referring expressions at random times (exponential gaps, the same mean for every robot: equal
load) on its camera's own topic, `r<i>/front/kosmos2/command`, reading `.../result`. One node (tiny
checkpoint unless --full-size) serves every camera with image_transport compressed,
depth_transport compressedDepth and camera_topics on; object geometry and result masks are on (the
node's defaults).

Measured per robot: bytes per second of its colour and depth as sent (compressed) against what raw
rgb8 and 16UC1 would be (the serialised size of the raw messages at the same rate), of its results
with masks (as received) and without (the same results with the mask emptied); command latency (send
to result, both on the robot's clock) p50 / p95; commands sent and answered. Per run: commands served
per second, fairness (the largest robot p95 over the smallest), commands lost.

Relay: robot 1's camera goes through a relay process (--role relay) that drops 20 % of its frames and
delays the rest by 60-100 ms (tc netem is not available here); the other robots' p50 / p95 against the
same number of robots without the relay, and every command still answered.

Loopback on a 2-core machine that also runs the node and every robot: transport costs are real,
the compute share is not a GPU desktop's; docs/benchmarks.md reads the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "test"))

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

EXPRESSIONS = ("the red box", "the blue cylinder", "the ball on the left", "the tallest object")
WIDTH, HEIGHT = 640, 480
DROP, DELAY_MS = 0.2, (60.0, 100.0)


def camera_topics(name: str, prefix: str = "") -> Dict[str, str]:
    """A robot camera's topics as the node reads them (`r1/front/image/compressed`, ...), under `prefix`
    when a relay stands between them."""
    base = f"{prefix}/{name}/front"
    return {"colour": f"{base}/image/compressed", "depth": f"{base}/depth/image/compressedDepth",
            "info": f"{base}/camera_info"}


# -- a robot ------------------------------------------------------------------------------------
class Robot:
    """A robot's computer: its camera's messages at `hz`, and commands at random times."""

    def __init__(self, args: argparse.Namespace) -> None:
        import cv2
        import rclpy
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from rclpy.serialization import serialize_message
        from sensor_msgs.msg import CameraInfo, CompressedImage, Image

        from kosmos2_ros.core.serving.images import encode_compressed_depth
        from kosmos2_ros.fixtures.rgbd_scenes import noisy_depth, random_scene
        from kosmos2_ros.msg import GroundingCommand, GroundingResult
        from kosmos2_ros.ros.convert import uint8_array
        from kosmos2_ros.ros.topics import camera_interface

        self.args, self.name = args, args.name
        rng = np.random.default_rng(args.seed)
        self.frames = []
        for _ in range(4):
            s = random_scene(rng, WIDTH, HEIGHT)
            jpeg = cv2.imencode(".jpg", np.ascontiguousarray(s.rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 80])[1]
            fmt, depth = encode_compressed_depth(s.depth_16uc1(noisy_depth(s.depth_m, rng)), "16UC1")
            self.frames.append((uint8_array(jpeg.tobytes()), fmt, uint8_array(depth), s.intrinsics))
        raw_colour = Image(height=HEIGHT, width=WIDTH, encoding="rgb8", step=WIDTH * 3,
                           data=uint8_array(bytes(WIDTH * HEIGHT * 3)))
        raw_depth = Image(height=HEIGHT, width=WIDTH, encoding="16UC1", step=WIDTH * 2,
                          data=uint8_array(bytes(WIDTH * HEIGHT * 2)))
        self.raw_bytes = {"colour": len(serialize_message(raw_colour)), "depth": len(serialize_message(raw_depth))}
        self.serialize = serialize_message

        rclpy.init()
        self.node = rclpy.create_node(f"robot_{self.name}")
        reliable = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        topics = camera_topics(self.name, "/relay" if args.relay else "")
        self.colour = self.node.create_publisher(CompressedImage, topics["colour"], reliable)
        self.depth = self.node.create_publisher(CompressedImage, topics["depth"], reliable)
        self.info = self.node.create_publisher(CameraInfo, topics["info"], reliable)
        self.commands = self.node.create_publisher(GroundingCommand, "/" + camera_interface(f"{self.name}/front",
                                                                                            "command"),
                                                   QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
        self.node.create_subscription(GroundingResult, "/" + camera_interface(f"{self.name}/front", "result"),
                                      self._on_result, QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE))
        self.sent: Dict[str, float] = {}
        self.answers: Dict[str, Dict[str, Any]] = {}
        self.bytes = {"colour": 0, "depth": 0, "results_masks": 0, "results_no_masks": 0, "results_with_a_mask": 0}
        self.published = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def _on_result(self, msg: Any) -> None:
        now = time.monotonic()
        with_masks = len(self.serialize(msg))
        has_mask = len(msg.mask.data) > 0
        msg.mask = type(msg.mask)()
        without = len(self.serialize(msg))
        with self._lock:
            if msg.id in self.sent and msg.id not in self.answers:
                self.answers[msg.id] = {"latency_ms": (now - self.sent[msg.id]) * 1e3, "status": msg.status,
                                        "geometry": [o.geometry_error or "valid" for o in msg.objects]}
                self.bytes["results_masks"] += with_masks
                self.bytes["results_with_a_mask"] += has_mask
                self.bytes["results_no_masks"] += without

    def _camera(self, until: float) -> None:
        from sensor_msgs.msg import CameraInfo, CompressedImage

        from kosmos2_ros.ros.convert import header_of

        period, i = 1.0 / self.args.hz, 0
        next_t = time.monotonic()
        while not self._stop.is_set() and time.monotonic() < until:
            jpeg, fmt, depth, intr = self.frames[i % len(self.frames)]
            header = header_of(time.time_ns(), f"{self.name}_front_optical")
            info = CameraInfo(header=header, width=WIDTH, height=HEIGHT,
                              k=[intr.fx, 0.0, intr.cx, 0.0, intr.fy, intr.cy, 0.0, 0.0, 1.0])
            colour = CompressedImage(header=header, format="jpeg", data=jpeg)
            depth_msg = CompressedImage(header=header, format=fmt, data=depth)
            self.info.publish(info)
            self.depth.publish(depth_msg)
            self.colour.publish(colour)
            self.bytes["colour"] += len(self.serialize(colour))
            self.bytes["depth"] += len(self.serialize(depth_msg))
            self.published += 1
            i += 1
            next_t += period
            time.sleep(max(0.0, next_t - time.monotonic()))

    def run(self) -> Dict[str, Any]:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        executor = SingleThreadedExecutor()
        executor.add_node(self.node)

        def spin() -> None:
            while not self._stop.is_set():
                executor.spin_once(timeout_sec=0.05)

        spinner = threading.Thread(target=spin, daemon=True)
        spinner.start()
        deadline = time.monotonic() + self.args.wait
        while time.monotonic() < deadline and (self.commands.get_subscription_count() == 0
                                               or self.colour.get_subscription_count() == 0):
            time.sleep(0.1)
        time.sleep(1.0)     # the node's side of discovery
        start = time.monotonic()
        until = start + self.args.duration
        camera = threading.Thread(target=self._camera, args=(until,), daemon=True)
        camera.start()
        time.sleep(min(1.0, self.args.duration / 4))       # frames first
        rng = random.Random(self.args.seed)
        from kosmos2_ros.msg import GroundingCommand

        k = 0
        while time.monotonic() < until:
            k += 1
            cmd_id = f"{self.name}-{k}"
            with self._lock:
                self.sent[cmd_id] = time.monotonic()
            self.commands.publish(GroundingCommand(id=cmd_id, task="refer", text=rng.choice(EXPRESSIONS)))
            time.sleep(min(rng.expovariate(self.args.command_rate), max(0.0, until - time.monotonic())))
        camera.join()
        drain = time.monotonic() + self.args.drain
        while time.monotonic() < drain and len(self.answers) < len(self.sent):
            time.sleep(0.05)
        elapsed = time.monotonic() - start
        self._stop.set()
        spinner.join(timeout=2)
        executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown()
        with self._lock:
            lat = [a["latency_ms"] for a in self.answers.values()]
            return {"name": self.name, "hz": self.args.hz, "seconds": self.args.duration, "elapsed": elapsed,
                    "frames": self.published, "sent": len(self.sent), "answered": len(self.answers),
                    "ok": sum(a["status"] == 0 for a in self.answers.values()), "latencies_ms": lat,
                    "geometry": sorted({g for a in self.answers.values() for g in a["geometry"]}),
                    "bytes": dict(self.bytes), "raw_bytes_per_frame": self.raw_bytes}


# -- a relay between a robot and the node (a bad link) -------------------------------------------
def relay(args: argparse.Namespace) -> int:
    """Republish robot `name`'s camera from /relay/... to the node's topics, dropping DROP of its frames
    (colour and depth of a stamp together) and delaying the rest by DELAY_MS."""
    import heapq

    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, CompressedImage

    from kosmos2_ros.ros.convert import stamp_to_ns

    rclpy.init()
    node = rclpy.create_node(f"relay_{args.name}")
    reliable = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
    src, dst = camera_topics(args.name, "/relay"), camera_topics(args.name)
    rng = random.Random(args.seed)
    dropped: Dict[int, bool] = {}
    pending: List[Any] = []
    lock = threading.Condition()
    pubs = {kind: node.create_publisher(CameraInfo if kind == "info" else CompressedImage, dst[kind], reliable)
            for kind in dst}

    def forward(kind: str, msg: Any) -> None:
        stamp = stamp_to_ns(msg.header.stamp)
        if kind != "info":
            drop = dropped.setdefault(stamp, rng.random() < DROP)
            if drop:
                return
        with lock:
            heapq.heappush(pending, (time.monotonic() + rng.uniform(*DELAY_MS) / 1e3, id(msg), kind, msg))
            lock.notify()

    for kind in src:
        node.create_subscription(CameraInfo if kind == "info" else CompressedImage, src[kind],
                                 lambda msg, kind=kind: forward(kind, msg), reliable)

    def sender() -> None:
        while rclpy.ok():
            with lock:
                if not pending:
                    lock.wait(0.05)
                    continue
                due = pending[0][0] - time.monotonic()
                if due > 0:
                    lock.wait(due)
                    continue
                _, _, kind, msg = heapq.heappop(pending)
            pubs[kind].publish(msg)

    threading.Thread(target=sender, daemon=True).start()
    end = time.monotonic() + args.duration + args.wait + args.drain
    while rclpy.ok() and time.monotonic() < end:
        rclpy.spin_once(node, timeout_sec=0.05)
    frames = sum(1 for v in dropped.values() if not v)
    print(json.dumps({"relayed": frames, "dropped": sum(dropped.values())}), flush=True)
    node.destroy_node()
    rclpy.shutdown()
    return 0


# -- one run: a node and its robots -------------------------------------------------------------
def run_fleet(label: str, model: str, robots: int, seconds: float, command_rate: float, work: Path,
              relay_first: bool, wait_s: float, drain_s: float, extra: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """One node and `robots` robot processes (robot 1 through the relay with `relay_first`); their reports."""
    from stress_node import start_node

    cams = "[" + ", ".join(f"r{i}/front" for i in range(1, robots + 1)) + "]"
    params = ["-p", f"cameras:={cams}", "-p", "image_transport:=compressed", "-p", "depth_transport:=compressedDepth",
              "-p", "camera_topics:=true", "-p", "queue_size:=64", "-p", "backend:=torch", *(extra or [])]
    run = work / label.replace(" ", "_").replace(",", "")
    run.mkdir(parents=True, exist_ok=True)
    node = start_node(model, "kosmos2", params, run / "node.log")
    procs, outs = [], []
    try:
        for i in range(1, robots + 1):
            hz = 5.0 + 10.0 * (i - 1) / max(1, robots - 1)           # 5 to 15 Hz across the robots
            out = run / f"robot_{i}.json"
            through_relay = relay_first and i == 1
            common = ["--name", f"r{i}", "--duration", str(seconds), "--wait", str(wait_s), "--drain", str(drain_s),
                      "--seed", str(i)]
            procs.append(subprocess.Popen([sys.executable, __file__, "--role", "robot", *common, "--hz", str(hz),
                                           "--command-rate", str(command_rate), "--out", str(out),
                                           *(["--relay"] if through_relay else [])], cwd=str(ROOT)))
            if through_relay:
                procs.append(subprocess.Popen([sys.executable, __file__, "--role", "relay", *common],
                                              cwd=str(ROOT), stdout=subprocess.DEVNULL))
            outs.append(out)
        for proc in procs:
            proc.wait(timeout=wait_s + seconds + drain_s + 120)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        node.terminate()
        try:
            node.wait(timeout=20)
        except subprocess.TimeoutExpired:
            node.kill()
    return [json.loads(p.read_text()) for p in outs if p.exists()]


def pct(values: List[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def per_robot_rows(label: str, results: List[Dict[str, Any]]) -> List[str]:
    rows = []
    for r in results:
        secs, raw = r["elapsed"], r["raw_bytes_per_frame"]
        kb = {k: v / secs / 1e3 for k, v in r["bytes"].items() if k.startswith(("colour", "depth", "results_m"))}
        kb["results_no_masks"] = r["bytes"]["results_no_masks"] / secs / 1e3
        raw_colour, raw_depth = r["frames"] * raw["colour"] / secs / 1e3, r["frames"] * raw["depth"] / secs / 1e3
        rows.append(f"| {label} | {r['name']} | {r['hz']:.1f} | {raw_colour:,.0f} / {kb['colour']:,.0f} | "
                    f"{raw_depth:,.0f} / {kb['depth']:,.0f} | {kb['results_masks']:,.1f} / {kb['results_no_masks']:,.1f} | "
                    f"{r['sent']} / {r['answered']} | {pct(r['latencies_ms'], 50):.0f} / {pct(r['latencies_ms'], 95):.0f} |")
    return rows


def summary_row(label: str, results: List[Dict[str, Any]], expected: int) -> str:
    sent = sum(r["sent"] for r in results)
    answered = sum(r["answered"] for r in results)
    secs = max(r["elapsed"] for r in results) if results else float("nan")
    p95 = [pct(r["latencies_ms"], 95) for r in results if r["latencies_ms"]]
    fairness = max(p95) / min(p95) if p95 and min(p95) > 0 else float("nan")
    lat = [v for r in results for v in r["latencies_ms"]]
    return (f"| {label} | {len(results)}/{expected} | {answered / secs:.2f} | {pct(lat, 50):.0f} / {pct(lat, 95):.0f} | "
            f"{fairness:.2f} | {sent - answered} |")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=("main", "robot", "relay"), default="main")
    ap.add_argument("--small", action="store_true", help="CI smoke run: 1 and 2 robots, a few seconds each")
    ap.add_argument("--full-size", action="store_true", help="add the full-size architecture at 2 robots")
    ap.add_argument("--model", help="checkpoint (default: build the tiny test checkpoint)")
    ap.add_argument("--robots", default="", help="robot counts (default 1,2,4,8; small 1,2)")
    ap.add_argument("--seconds", type=float, default=0.0, help="commands sent for this long per run (60; small 4)")
    ap.add_argument("--command-rate", type=float, default=1.0, help="commands per second per robot (mean)")
    ap.add_argument("--relay-robots", type=int, default=0, help="robots in the relay comparison (4; small 2)")
    # robot / relay roles
    ap.add_argument("--name", default="r1")
    ap.add_argument("--hz", type=float, default=10.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--wait", type=float, default=120.0)
    ap.add_argument("--drain", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--relay", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if args.role == "robot":
        result = Robot(args).run()
        Path(args.out).write_text(json.dumps(result))
        return 0
    if args.role == "relay":
        return relay(args)

    from node_helpers import free_domain

    os.environ["ROS_DOMAIN_ID"] = str(free_domain())
    counts = [int(n) for n in (args.robots or ("1,2" if args.small else "1,2,4,8")).split(",")]
    seconds = args.seconds or (4.0 if args.small else 60.0)
    relay_robots = args.relay_robots or (2 if args.small else 4)
    work = Path(tempfile.mkdtemp(prefix="kosmos2_remote_"))
    model = args.model
    if not model:
        from kosmos2_ros.fixtures.checkpoints import build_tiny_checkpoint

        model = str(build_tiny_checkpoint(work / "tiny"))
    print(f"one node (tiny checkpoint, torch on this CPU) serving N robots over loopback DDS; 640x480 JPEG + "
          f"compressedDepth at 5-15 Hz per robot; {args.command_rate:g} commands/s per robot for {seconds:g} s; "
          f"logs in {work}", flush=True)
    runs: Dict[str, List[Dict[str, Any]]] = {}
    for n in counts:
        runs[f"{n} robots"] = run_fleet(f"{n} robots", model, n, seconds, args.command_rate, work, False, 120.0, 30.0)
        print(f"{n} robots: done", flush=True)
    if relay_robots not in counts:
        runs[f"{relay_robots} robots"] = run_fleet(f"{relay_robots} robots", model, relay_robots, seconds,
                                                   args.command_rate, work, False, 120.0, 30.0)
    relayed = run_fleet("relay", model, relay_robots, seconds, args.command_rate, work, True, 120.0, 30.0)
    full: List[Dict[str, Any]] = []
    if args.full_size:
        from kosmos2_ros.fixtures.checkpoints import build_tiny_checkpoint

        big = str(build_tiny_checkpoint(work / "full_size", full_size=True))
        full = run_fleet("full size", big, 2, max(seconds, 60.0), 0.1, work, False, 600.0, 300.0,
                         ["-p", "max_new_tokens:=16"])

    print()
    print("Per robot: bytes/s as kB/s (raw if sent uncompressed / compressed as sent), results received "
          "(with masks / without), commands sent / answered, latency p50 / p95 ms")
    print()
    print("| run | robot | camera Hz | colour kB/s raw / compressed | depth kB/s raw / compressedDepth | "
          "results kB/s masks / no masks | sent / answered | latency ms p50 / p95 |")
    print("|---|---|---|---|---|---|---|---|")
    for label, results in runs.items():
        for row in per_robot_rows(label, results):
            print(row)
    for row in per_robot_rows(f"{relay_robots} robots, r1 through the relay", relayed):
        print(row)
    for row in per_robot_rows("full size, 2 robots", full):
        print(row)
    from rclpy.serialization import serialize_message
    from sensor_msgs.msg import Image

    mask = len(serialize_message(Image(height=HEIGHT, width=WIDTH, encoding="mono8", step=WIDTH,
                                       data=bytes(WIDTH * HEIGHT))))
    every = [r for rs in (*runs.values(), relayed, full) for r in rs]
    print(f"\nA result's mask (mono8, {WIDTH}x{HEIGHT}) adds {mask / 1e3:.0f} kB. Results carrying one here: "
          f"{sum(r['bytes']['results_with_a_mask'] for r in every)} of {sum(r['answered'] for r in every)} (a mask "
          "needs an object on the table inside the box; the tiny checkpoint's boxes mostly miss them: "
          f"{'; '.join(sorted({g for r in every for g in r.get('geometry', [])}))}). At 1 command/s with a mask "
          f"each, a robot receives {mask / 1e3:.0f} kB/s; result_masks: false keeps a result at a few kB.")
    print()
    print("| run | robots reporting | commands served /s | latency ms p50 / p95 (all) | fairness (max p95 / min p95) "
          "| commands lost |")
    print("|---|---|---|---|---|---|")
    for label, results in runs.items():
        print(summary_row(label, results, int(label.split()[0])))
    print(summary_row(f"{relay_robots} robots, r1 through the relay", relayed, relay_robots))
    if args.full_size:
        print(summary_row("full size, 2 robots, 0.1 commands/s each", full, 2))
    print()
    base = {r["name"]: r for r in runs[f"{relay_robots} robots"]}
    print("Relay (r1's camera drops 20 % of frames, the rest 60-100 ms late): the other robots against the run "
          "without it")
    print()
    print("| robot | p50 ms without / with | p95 ms without / with | p50 ratio | p95 ratio | lost |")
    print("|---|---|---|---|---|---|")
    for r in relayed:
        b = base.get(r["name"])
        if b is None:
            continue
        p50 = (pct(b["latencies_ms"], 50), pct(r["latencies_ms"], 50))
        p95 = (pct(b["latencies_ms"], 95), pct(r["latencies_ms"], 95))
        print(f"| {r['name']}{' (relayed)' if r['name'] == 'r1' else ''} | {p50[0]:.0f} / {p50[1]:.0f} | "
              f"{p95[0]:.0f} / {p95[1]:.0f} | {p50[1] / p50[0]:.2f} | {p95[1] / p95[0]:.2f} | "
              f"{r['sent'] - r['answered']} |")
    reported = sum(len(v) for v in runs.values()) + len(relayed)
    expected = sum(int(k.split()[0]) for k in runs) + relay_robots
    if reported != expected:
        print(f"only {reported} of {expected} robots reported (logs in {work})", file=sys.stderr)
        return 1
    silent = [label for label, results in [*runs.items(), ("relay", relayed), ("full size", full)]
              if results and not sum(r["answered"] for r in results)]
    if silent:
        print(f"no command was answered in {silent}: the node failed (logs in {work})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
