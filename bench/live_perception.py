"""Live perception benchmark (issue 12): a live camera, standing queries, two cameras on one model.

  scripts/ros-env python bench/live_perception.py            # full-size architecture, random weights (~20 min)
  scripts/ros-env python bench/live_perception.py --small    # tiny checkpoint: a smoke run of the same code

"Ours" runs on each of --backends (default `auto,torch`: the backend the node picks here, which
on a CPU is onnxruntime, and the torch backend, which runs the same library as the naive node,
so what the node's design gains is visible apart from what its runtime gains). The naive node
always runs transformers' own model and `generate`.

1. Command latency with a live camera. A camera thread puts a new frame into the node's frame
   store every 1/--camera-hz s; referring expressions arrive at random times (exponential gaps,
   one seed for every path), each about the newest frame. Command-to-result p50/p95 for:
   * naive: transformers `generate` (max_new_tokens 5: `<object><p><p></object></s>`) on the
     newest frame when the command arrives, one command after another;
   * ours: the node's worker (`ros/worker.Worker`) and pipeline, constrained decoding (the
     node's default, same token budget), frames encoded when a command needs them;
   * ours + encode ahead: the same, and while idle the newest frame's vision encoding and
     grounding-head KV are computed ahead (at most --camera-hz frames/s), as `encode_ahead_hz` does.
   In-process (no DDS): what is measured is the model work and the queueing, not transport.
2. Standing queries: grounded frames per second with 1 and 4 queries, every frame new:
   `Pipeline.run_batch` of the frame's queries (what the node runs per frame) against
   `generate` once per query per frame.
3. Two cameras: one node process serving both (`cameras: [a, b]`) against two node processes
   (one camera each), real nodes over DDS; each camera gets a closed-loop command stream (the
   next command when the last result came). Resident memory (sum over processes, peak) and
   commands/s over --two-cam-s seconds, on the first of --backends. Runs last, after the
   in-process models are freed (and a graph backend's export is cached for the nodes).

Random full-size weights cost the same compute as real ones, so times are honest; boxes are not.
"""
from __future__ import annotations

import argparse
import gc
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "test"))

from node_helpers import free_domain  # noqa: E402
from stress_node import percentile, rss_mb, start_node  # noqa: E402

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

EXPRESSIONS = ("the red mug", "the laptop", "the person on the left", "the green ball")
# Every path's token budget: `<object><p><p></object></s>`, one box and eos (as bench_refer.py).
# Random weights never choose eos; constrained decoding stops at `</object>` or at this budget.
MAX_NEW = 5


def frame_pixels(seed: int, width: int = 320, height: int = 240) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


class Camera:
    """Puts a new frame into `store` every 1/hz s (a camera driver feeding the node)."""

    def __init__(self, store: Any, hz: float, on_frame: Optional[Callable[[], None]] = None) -> None:
        from kosmos2_ros.core.serving.frames import Frame

        self._frame_cls, self._store, self._period, self._on_frame = Frame, store, 1.0 / hz, on_frame
        self._stop = threading.Event()
        self.sent = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.sent += 1
            self._store.put(self._frame_cls(rgb=frame_pixels(self.sent), stamp_ns=time.time_ns(), frame_id="cam"))
            if self._on_frame is not None:
                self._on_frame()
            next_at += self._period
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def arrivals(count: int, mean_gap_s: float, seed: int = 1) -> List[float]:
    """Command times (s from the start): exponential gaps, the same for every path."""
    gaps = np.random.default_rng(seed).exponential(mean_gap_s, count)
    return list(np.cumsum(np.maximum(gaps, 0.05)))


def latency_naive(model: Any, processor: Any, hz: float, times: List[float], warmup_s: float) -> List[float]:
    """The naive node: transformers' own model and `generate`, one command after another."""
    from kosmos2_ros.core.model.reference import reference_generate
    from kosmos2_ros.core.serving.frames import FrameStore

    store = FrameStore(4)
    cam = Camera(store, hz)
    todo: queue.Queue = queue.Queue()
    out: List[float] = []

    def serve() -> None:
        while True:
            item = todo.get()
            if item is None:
                return
            arrived, frame = item
            reference_generate(model, processor, f"<grounding><phrase> {EXPRESSIONS[len(out) % 4]}</phrase>",
                               frame.rgb, MAX_NEW)
            out.append(time.monotonic() - arrived)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    time.sleep(warmup_s)
    t0 = time.monotonic()
    for at in times:
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        todo.put((time.monotonic(), store.newest()))
    todo.put(None)
    server.join()
    cam.stop()
    return out


def latency_ours(pipeline: Any, hz: float, times: List[float], warmup_s: float, encode_ahead_hz: float) -> List[float]:
    from kosmos2_ros.core.serving.frames import FrameStore
    from kosmos2_ros.core.serving.pipeline import Command
    from kosmos2_ros.core.serving.standing import EncodeAhead
    from kosmos2_ros.ros.worker import Job, Worker

    store = FrameStore(4)
    ahead = EncodeAhead()
    done: List[float] = []

    def idle(_should_stop: Callable[[], bool]) -> Optional[float]:
        """Encoding ahead, as the node's LiveWork does it for one camera."""
        frame = store.newest()
        if frame is None:
            return None
        return ahead.run(pipeline, [(frame, store.interval_s)], encode_ahead_hz, time.monotonic())

    def finish(job: Any, result: Any, _frame: Any, _queue_ms: float) -> None:
        done.append(time.monotonic() - job.enqueued)

    worker = Worker(lambda: pipeline, lambda _cmd: store.newest(), finish, capacity=lambda: 64,
                    idle=idle if encode_ahead_hz > 0 else None)
    cam = Camera(store, hz, on_frame=worker.poke)
    time.sleep(warmup_s)
    t0 = time.monotonic()
    jobs = []
    for k, at in enumerate(times):
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        job = Job(Command(id=f"c{k}", task="refer", text=EXPRESSIONS[k % 4], decoding="constrained",
                          max_new_tokens=MAX_NEW))
        jobs.append(job)
        worker.submit(job)
    for job in jobs:
        job.future.result()
    worker.stop()
    cam.stop()
    return done


def standing_fps(pipeline: Any, queries: int, frames: int) -> float:
    """Ours: frames/s grounding `queries` standing queries per frame, every frame new."""
    from kosmos2_ros.core.serving.frames import Frame
    from kosmos2_ros.core.serving.pipeline import Command

    texts = EXPRESSIONS[:queries]
    t0 = time.perf_counter()
    for f in range(frames):
        frame = Frame(rgb=frame_pixels(1000 + f), stamp_ns=f + 1)
        pipeline.run_batch([Command(task="refer", text=t, decoding="constrained", max_new_tokens=MAX_NEW)
                            for t in texts], frame)
    return frames / (time.perf_counter() - t0)


def standing_fps_naive(model: Any, processor: Any, queries: int, frames: int) -> float:
    """The baseline: `generate` once per query per frame."""
    from kosmos2_ros.core.model.reference import reference_generate

    t0 = time.perf_counter()
    for f in range(frames):
        rgb = frame_pixels(2000 + f)
        for t in EXPRESSIONS[:queries]:
            reference_generate(model, processor, f"<grounding><phrase> {t}</phrase>", rgb, MAX_NEW)
    return frames / (time.perf_counter() - t0)


# -- two cameras: real node processes ------------------------------------------------------------
def two_cameras(model: str, backend: str, seconds: float, load_timeout: float,
                log_dir: Path) -> Dict[str, Tuple[float, float, float]]:
    """{"one node": (peak RSS MiB, commands/s, p50 s), "two nodes": (...)}."""
    import rclpy

    os.environ["ROS_DOMAIN_ID"] = str(free_domain())
    rclpy.init()
    out = {}
    common = ["-p", "max_frame_age_s:=0.0", "-p", f"backend:={backend}"]
    try:
        procs = [start_node(model, "kosmos2", ["-p", "cameras:=[a, b]"] + common, log_dir / "one_node.log")]
        out["one node"] = command_streams(procs, {"a": ("kosmos2", "a"), "b": ("kosmos2", "b")}, seconds,
                                          load_timeout, log_dir)
        procs = [start_node(model, f"kosmos2_{c}", ["-r", f"image:=/{c}/image"] + common,
                            log_dir / f"node_{c}.log") for c in ("a", "b")]
        out["two nodes"] = command_streams(procs, {"a": ("kosmos2_a", ""), "b": ("kosmos2_b", "")}, seconds,
                                           load_timeout, log_dir)
    finally:
        rclpy.shutdown()
    return out


def command_streams(procs: List[subprocess.Popen], routes: Dict[str, Tuple[str, str]], seconds: float,
                    load_timeout: float, log_dir: Path) -> Tuple[float, float, float]:
    """Frames to /<camera>/image at 1 Hz and a closed-loop command stream per camera (routes:
    camera -> (node name, the command's camera field)); (peak RSS MiB, OK commands/s, p50 s).
    The node processes are stopped at the end."""
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from kosmos2_ros.msg import GroundingCommand, GroundingResult
    from kosmos2_ros.ros.convert import uint8_array

    node = rclpy.create_node(f"bench_two_cameras_{len(procs)}")
    reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
    image_pubs = {c: node.create_publisher(Image, f"/{c}/image", reliable) for c in routes}
    cmd_pubs = {c: node.create_publisher(GroundingCommand, f"/{n}/command", reliable) for c, (n, _) in routes.items()}
    results: queue.Queue = queue.Queue()
    for name in {n for n, _ in routes.values()}:
        node.create_subscription(GroundingResult, f"/{name}/result", results.put, reliable)
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            rclpy.spin_once(node, timeout_sec=0.05)

    def publish_frames() -> None:
        k = 0
        while not stop.is_set():
            k += 1
            for c, pub in image_pubs.items():
                rgb = frame_pixels(k * 7 + ord(c))
                msg = Image(height=rgb.shape[0], width=rgb.shape[1], encoding="rgb8", step=rgb.shape[1] * 3,
                            data=uint8_array(rgb))
                msg.header.stamp = node.get_clock().now().to_msg()
                msg.header.frame_id = f"{c}_optical"
                pub.publish(msg)
            stop.wait(1.0)

    threads = [threading.Thread(target=spin, daemon=True), threading.Thread(target=publish_frames, daemon=True)]
    for t in threads:
        t.start()
    sent: Dict[str, float] = {}
    count = [0]

    def send(cam: str) -> None:
        count[0] += 1
        cid = f"{cam}-{count[0]}"
        sent[cid] = time.monotonic()
        cmd_pubs[cam].publish(GroundingCommand(id=cid, task="refer", text=EXPRESSIONS[count[0] % 4],
                                               camera=routes[cam][1], max_new_tokens=MAX_NEW))

    try:
        # Until every camera is answered OK (models loaded, frames arriving): one command per
        # camera at a time, so no backlog of warm-up commands is left queued for the measurement.
        deadline = time.monotonic() + load_timeout
        names = {n for n, _ in routes.values()}
        while time.monotonic() < deadline and not (
                all(pub.get_subscription_count() for pub in cmd_pubs.values())
                and all(node.count_publishers(f"/{n}/result") for n in names)):
            time.sleep(0.1)
        ready: set = set()
        for cam in routes:
            send(cam)
        while ready != set(routes) and time.monotonic() < deadline:
            try:
                msg = results.get(timeout=1.0)
            except queue.Empty:
                for cid in [c for c, at in sent.items() if time.monotonic() - at > 60.0]:
                    del sent[cid]       # lost before discovery completed: ask again
                    send(cid.split("-")[0])
                continue
            if msg.id not in sent:
                continue
            del sent[msg.id]
            cam = msg.id.split("-")[0]
            if msg.status == 0:
                ready.add(cam)
            else:
                time.sleep(1.0)     # not active yet, or no frame yet
                send(cam)
        if ready != set(routes):
            raise RuntimeError(f"nodes not ready within {load_timeout:.0f} s (logs in {log_dir})")
        sent.clear()
        latencies: List[float] = []
        ok, peak = 0, 0.0
        t0 = time.monotonic()
        for cam in routes:
            send(cam)
        while time.monotonic() - t0 < seconds:
            peak = max(peak, sum(rss_mb(p.pid) for p in procs))
            try:
                msg = results.get(timeout=1.0)
            except queue.Empty:
                continue
            if msg.id in sent:
                latencies.append(time.monotonic() - sent.pop(msg.id))
                ok += msg.status == 0
                send(msg.id.split("-")[0])
        if not ok:
            raise RuntimeError(f"no command answered OK within {seconds:g} s (logs in {log_dir})")
        return peak, ok / (time.monotonic() - t0), percentile(latencies, 50)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)
        node.destroy_node()
        for p in procs:
            p.send_signal(2)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny checkpoint (a smoke run)")
    ap.add_argument("--model", default="", help="a saved checkpoint to use instead of building one")
    ap.add_argument("--backends", default="auto,torch",
                    help="comma list: the backends 'ours' runs on (auto = the node's default choice here); "
                         "backend:precision for another precision, e.g. onnxruntime:int8")
    ap.add_argument("--artifacts-dir", default="", help="where graphs are cached (default: the config's)")
    ap.add_argument("--camera-hz", type=float, default=0.0, help="live camera rate (default 0.25 full size, 5 small)")
    ap.add_argument("--commands", type=int, default=0, help="commands per path (default 16 full size, 20 small)")
    ap.add_argument("--gap-s", type=float, default=0.0, help="mean gap between commands (default 6 s full size)")
    ap.add_argument("--frames", type=int, default=0, help="frames per standing-query row (default 2 full size)")
    ap.add_argument("--two-cam-s", type=float, default=0.0, help="seconds of command streams (default 45 full size)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: latency,standing,cameras")
    args = ap.parse_args(argv)
    small = args.small
    hz = args.camera_hz or (5.0 if small else 0.25)
    n_cmd = args.commands or (20 if small else 16)
    gap = args.gap_s or (0.3 if small else 6.0)
    n_frames = args.frames or (6 if small else 2)
    two_cam_s = args.two_cam_s or (8.0 if small else 45.0)
    skip = set(filter(None, args.skip.split(",")))
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]

    import torch

    from kosmos2_ros.core.backends.modules import load_kosmos2
    from kosmos2_ros.core.defaults import QUANTIZED_PRECISIONS
    from kosmos2_ros.core.model.loading import load_processor, quiet_libraries
    from kosmos2_ros.core.serving.config import Kosmos2Config
    from kosmos2_ros.core.serving.pipeline import Pipeline
    from kosmos2_ros.fixtures.checkpoints import build_tiny_checkpoint

    quiet_libraries()
    work = Path(tempfile.mkdtemp(prefix="kosmos2_live_"))
    model = args.model
    if not model:
        t0 = time.perf_counter()
        model = str(build_tiny_checkpoint(work / ("tiny" if small else "full_size"), full_size=not small))
        print(f"checkpoint built in {time.perf_counter() - t0:.0f} s: {model}", flush=True)
    print(f"{'tiny' if small else 'full-size'} checkpoint, fp32 on CPU, {torch.get_num_threads()} torch threads; "
          f"camera {hz:g} Hz, {n_cmd} commands per path, mean gap {gap:g} s", flush=True)

    # The naive node's transformers model; the torch backend shares its weights.
    processor = load_processor(model)
    reference = load_kosmos2(model, dtype=torch.float32)
    pipelines: Dict[str, Any] = {}
    artifacts = {"artifacts_dir": args.artifacts_dir} if args.artifacts_dir else {}
    for name in backends:
        t0 = time.perf_counter()
        backend, _, precision = name.partition(":")
        pipe = Pipeline.load(Kosmos2Config(model=model, backend=backend, device="cpu", allow_download=False,
                                           precision=precision or "auto", **artifacts), model=reference)
        pipelines[name] = pipe
        print(f"ours on {name}: {pipe.backend_reason}; ready in {time.perf_counter() - t0:.0f} s", flush=True)

    labels = {name: f"ours ({pipe.backend.name}{', backend auto' if name == 'auto' else ''}"
                    f"{', ' + pipe.backend.precision if pipe.backend.precision in QUANTIZED_PRECISIONS else ''})"
              for name, pipe in pipelines.items()}

    rows: List[str] = []
    if "latency" not in skip:
        times = arrivals(n_cmd, gap)
        warm = 2.0 / hz
        naive = latency_naive(reference, processor, hz, times, warm)
        base = f"naive {percentile(naive, 50):.2f} / {percentile(naive, 95):.2f} s"
        print(f"naive (transformers generate): {base}", flush=True)
        for name, pipe in pipelines.items():
            for extra, ahead_hz in (("", 0.0), (" + encode ahead", hz)):
                lat = latency_ours(pipe, hz, times, warm, ahead_hz)
                rows.append(f"| command latency p50 / p95, camera {hz:g} Hz: {labels[name]}{extra} | {base} | "
                            f"{percentile(lat, 50):.2f} / {percentile(lat, 95):.2f} s | "
                            f"{percentile(naive, 50) / percentile(lat, 50):.2f}x lower p50 |")
                print(rows[-1], flush=True)
    if "standing" not in skip:
        for q in (1, 4):
            naive_fps = standing_fps_naive(reference, processor, q, n_frames)
            for name, pipe in pipelines.items():
                ours = standing_fps(pipe, q, n_frames)
                rows.append(f"| standing queries: frames/s with {q} quer{'y' if q == 1 else 'ies'}: {labels[name]} | "
                            f"generate per query per frame {naive_fps:.3f} | {ours:.3f} | {ours / naive_fps:.2f}x |")
                print(rows[-1], flush=True)
    node_backend = backends[0].partition(":")[0]
    for pipe in pipelines.values():
        pipe.close()
    pipelines.clear()
    del reference
    gc.collect()
    if "cameras" not in skip:
        # After the in-process parts: their models are freed, and a graph backend's export is cached.
        two = two_cameras(model, node_backend, two_cam_s, 600.0, work)
        (rss1, cps1, p1), (rss2, cps2, p2) = two["one node"], two["two nodes"]
        rows += [f"| two cameras: resident memory (peak, all node processes; backend {node_backend}) | "
                 f"two nodes {rss2:.0f} MiB | one node {rss1:.0f} MiB | {rss1 / rss2:.0%} |",
                 f"| two cameras: commands/s (closed loop per camera; p50 latency; backend {node_backend}) | "
                 f"two nodes {cps2:.2f} ({p2:.2f} s) | one node {cps1:.2f} ({p1:.2f} s) | {cps1 / cps2:.2f}x |"]
        print("\n".join(rows[-2:]), flush=True)
    print("\n| measurement | baseline | ours | ratio |\n|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
