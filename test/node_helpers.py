"""Test helpers: start the grounding node as its own process and talk to it over real DDS."""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# DDS domain ids a test run may take: 0-101 and 215-232 are valid for Fast DDS's default ports.
# KOSMOS2_TEST_DOMAINS="A-B" narrows them (e.g. to keep clear of nodes you run by hand).
DOMAIN_LOCK_DIR = Path(os.environ.get("KOSMOS2_TEST_DOMAIN_LOCKS", "/tmp/kosmos2_ros_test_domains"))
_held_domains: List[Any] = []     # open lock files: a domain stays ours until this process exits


def _candidate_domains() -> List[int]:
    spec = os.environ.get("KOSMOS2_TEST_DOMAINS", "")
    if spec:
        low, _, high = spec.partition("-")
        return list(range(int(low), int(high or low) + 1))
    return [d for d in list(range(1, 102)) + list(range(215, 233)) if str(d) != os.environ.get("ROS_DOMAIN_ID")]


def free_domain() -> int:
    """A DDS domain id no other test run on this machine holds, held until this process exits.

    Fixed ids let two runs (two CI jobs, or a run beside a node started by hand) talk to each
    other's nodes; an exclusive lock file per id makes every concurrent run take its own.
    """
    DOMAIN_LOCK_DIR.mkdir(parents=True, exist_ok=True)
    for domain in _candidate_domains():
        handle = open(DOMAIN_LOCK_DIR / f"{domain}.lock", "w")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _held_domains.append(handle)
        return domain
    raise RuntimeError(f"every DDS domain id for tests is taken (locks in {DOMAIN_LOCK_DIR})")


def node_env(domain_id: int) -> Dict[str, str]:
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = str(domain_id)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    if env.get("ROS_DISTRO") == "humble":   # Humble predates ROS_AUTOMATIC_DISCOVERY_RANGE
        env["ROS_LOCALHOST_ONLY"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


class NodeProcess:
    """`python -m kosmos2_ros.ros.node --ros-args -p ...` (or another module) as a child process."""

    def __init__(self, params: Dict[str, Any], domain_id: int, log_path: Path,
                 module: str = "kosmos2_ros.ros.node", remaps: Optional[Dict[str, str]] = None,
                 script: Optional[str] = None, params_file: Optional[Path] = None,
                 env: Optional[Dict[str, str]] = None) -> None:
        args = [sys.executable, script] if script else [sys.executable, "-m", module]
        args.append("--ros-args")
        if params_file is not None:
            args += ["--params-file", str(params_file)]
        # torch unless a test says otherwise: `backend: auto` would export ONNX graphs into ~/.cache
        for key, value in {"backend": "torch", **params}.items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            args += ["-p", f"{key}:={text}"]
        for src, dst in (remaps or {}).items():
            args += ["-r", f"{src}:={dst}"]
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, env={**node_env(domain_id), **(env or {})}, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=str(ROOT))

    def log(self) -> str:
        return self.log_path.read_text()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def running_node(params: Dict[str, Any], domain_id: int, log_path: Path, *, debug: bool = False,
                 check_exit: bool = True, **node_kwargs: Any) -> Iterator[Tuple[NodeProcess, Tester]]:
    """A node process and a tester on its domain, the node active; stopped (exit code checked) after."""
    proc = NodeProcess(params, domain_id, log_path, **node_kwargs)
    tester = Tester(domain_id)
    try:
        if debug:
            tester.subscribe_debug()
        tester.wait_active(proc=proc)
        yield proc, tester
    finally:
        tester.close()
        code = proc.stop()
        if check_exit:
            assert code == 0, f"node exited with {code}:\n{proc.log()}"


def rgb_image_msg(rgb: np.ndarray, stamp_ns: int, frame_id: str = "camera_optical", encoding: str = "rgb8") -> Any:
    from sensor_msgs.msg import Image

    from kosmos2_ros.ros.convert import header_of, uint8_array

    arr = rgb if encoding == "rgb8" else rgb[:, :, ::-1]
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return Image(header=header_of(stamp_ns, frame_id), height=arr.shape[0], width=arr.shape[1], encoding=encoding,
                 is_bigendian=0, step=arr.shape[1] * 3, data=uint8_array(arr))


def scene(width: int = 64, height: int = 48, seed: int = 0) -> np.ndarray:
    """A small synthetic colour image: a gradient with two coloured rectangles."""
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3), np.uint8)
    img[:, :, 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    img[:, :, 1] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    img[5:20, 5:25] = (255, 0, 0)
    img[25:45, 35:60] = rng.integers(0, 255, 3, dtype=np.uint8)
    return img


class Tester:
    """A test-side rclpy node in its own context and domain, spun in a background thread."""

    __test__ = False

    def __init__(self, domain_id: int, node_ns: str = "/kosmos2", topic_ns: str = "") -> None:
        import rclpy
        from rclpy.action import ActionClient
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, CompressedImage, Image
        from std_msgs.msg import String

        from kosmos2_ros.action import GroundTask
        from kosmos2_ros.msg import GroundingCommand, GroundingResult
        from kosmos2_ros.srv import Ground

        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node(f"kosmos2_tester_{os.getpid()}", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        reliable = QoSProfile(depth=20, reliability=ReliabilityPolicy.RELIABLE)
        self.results: Dict[str, List[Any]] = {}
        self.debug_images: List[Any] = []
        self.markers: List[Any] = []
        self.diagnostics: List[Any] = []
        self._cv = threading.Condition()
        n = self.node
        self.node_ns = node_ns
        n.create_subscription(GroundingResult, f"{node_ns}/result", self._on_result, QoSProfile(depth=200))
        self.image_pub = n.create_publisher(Image, f"{topic_ns}/image", reliable)
        self.compressed_pub = n.create_publisher(CompressedImage, f"{topic_ns}/image/compressed", reliable)
        self.depth_pub = n.create_publisher(Image, f"{topic_ns}/depth/image", reliable)
        self.info_pub = n.create_publisher(CameraInfo, f"{topic_ns}/camera_info", reliable)
        self.command_pub = n.create_publisher(GroundingCommand, f"{node_ns}/command", reliable)
        self.refer_pub = n.create_publisher(String, f"{node_ns}/refer", reliable)
        self.ground_client = n.create_client(Ground, f"{node_ns}/ground")
        self.action_client = ActionClient(n, GroundTask, f"{node_ns}/ground_task")
        self._probes = 0
        self._sent_frames: Dict[int, Any] = {}
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._running = True
        self._thread.start()

    def _spin(self) -> None:
        while self._running and self.context.ok():
            self.executor.spin_once(timeout_sec=0.05)

    def _on_result(self, msg: Any) -> None:
        with self._cv:
            self.results.setdefault(msg.id, []).append(msg)
            self._cv.notify_all()

    def subscribe_debug(self) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from sensor_msgs.msg import Image
        from visualization_msgs.msg import MarkerArray

        self.node.create_subscription(Image, f"{self.node_ns}/debug_image", self.debug_images.append, 10)
        self.node.create_subscription(MarkerArray, f"{self.node_ns}/markers", self.markers.append, 10)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 10)

    def close(self) -> None:
        import rclpy

        self._running = False
        self._thread.join(timeout=5)
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)

    # -- waiting ---------------------------------------------------------------------------
    def wait_for(self, future: Any, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while not future.done():
            if time.monotonic() > deadline:
                raise TimeoutError("timed out waiting for a ROS future")
            time.sleep(0.01)
        return future.result()

    def wait_result(self, cmd_id: str, timeout: float = 30.0, count: int = 1) -> Any:
        deadline = time.monotonic() + timeout
        with self._cv:
            while len(self.results.get(cmd_id, [])) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no result for command {cmd_id!r} within {timeout} s")
                self._cv.wait(left)
            return self.results[cmd_id][count - 1]

    def wait_active(self, timeout: float = 90.0, proc: Optional[NodeProcess] = None, raw_image: bool = True) -> None:
        """Until the node's lifecycle state is active (the model is loaded) and hears our command (and, with
        `raw_image`, our image) publisher."""
        from lifecycle_msgs.srv import GetState

        client = self.node.create_client(GetState, f"{self.node_ns}/get_state")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and not proc.alive():
                raise RuntimeError("node process exited:\n" + proc.log())
            if client.wait_for_service(timeout_sec=0.5):
                state = self.wait_for(client.call_async(GetState.Request()), 10.0)
                if state.current_state.label == "active":
                    # Wait for our publishers to be matched so nothing is lost at start (a frame sent
                    # before discovery completes is dropped, and the first command would say NO_FRAME).
                    while time.monotonic() < deadline and (self.command_pub.get_subscription_count() == 0 or
                                                           (raw_image and self.image_pub.get_subscription_count() == 0)):
                        time.sleep(0.05)
                    return
            time.sleep(0.2)
        raise TimeoutError("node did not become active" + ("\n" + proc.log() if proc else ""))

    # -- commands --------------------------------------------------------------------------
    def command(self, cmd_id: str, task: str = "refer", text: str = "", region: Optional[tuple] = None,
                stamp_ns: int = 0, max_new_tokens: int = 0, decoding: str = "") -> Any:
        from kosmos2_ros.msg import GroundingCommand, PixelBox
        from kosmos2_ros.ros.convert import ns_to_stamp

        msg = GroundingCommand(id=cmd_id, task=task, text=text, max_new_tokens=max_new_tokens, decoding=decoding,
                               image_stamp=ns_to_stamp(stamp_ns))
        if region is not None:
            msg.use_region = True
            msg.region = PixelBox(x_min=float(region[0]), y_min=float(region[1]),
                                  x_max=float(region[2]), y_max=float(region[3]))
        return msg

    def run(self, msg: Any, timeout: float = 30.0) -> Any:
        self.command_pub.publish(msg)
        return self.wait_result(msg.id, timeout)

    def wait_frame(self, stamp_ns: int, timeout: float = 20.0) -> Any:
        """Until the node has handled the image with `stamp_ns` (kept or rejected): probe commands
        naming that stamp answer NO_FRAME until it arrives. Returns the last probe's result."""
        deadline = time.monotonic() + timeout
        while True:
            self._probes += 1
            probe = self.command(f"probe-{self._probes}", task="caption", stamp_ns=stamp_ns, max_new_tokens=1)
            res = self.run(probe, max(1.0, deadline - time.monotonic()))
            resend = self._sent_frames.get(stamp_ns)
            if res.status == 2 and "no image received yet" in res.error and resend is not None:
                # Sent before the node's subscription had matched ours (discovery is not symmetric):
                # that copy is gone, so send it again. Same stamp, so the node keeps one frame.
                self.image_pub.publish(resend)
            elif not (res.status == 2 and "no cached frame" in res.error):
                return res
            if time.monotonic() > deadline:
                raise TimeoutError(f"the node never received the image stamped {stamp_ns}")
            time.sleep(0.05)

    def publish_frame(self, rgb: np.ndarray, stamp_ns: int, frame_id: str = "camera_optical") -> None:
        msg = rgb_image_msg(rgb, stamp_ns, frame_id)
        self._sent_frames = {stamp_ns: msg}   # the latest only: wait_frame may need to resend it
        self.image_pub.publish(msg)

    def change_state(self, transition: str, timeout: float = 30.0) -> bool:
        """A lifecycle transition by name (configure, activate, deactivate, cleanup, active_shutdown...)."""
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        client = self.node.create_client(ChangeState, f"{self.node_ns}/change_state")
        assert client.wait_for_service(timeout_sec=10)
        tid = getattr(Transition, f"TRANSITION_{transition.upper()}")
        return self.wait_for(client.call_async(ChangeState.Request(transition=Transition(id=tid))), timeout).success

    def state(self) -> str:
        from lifecycle_msgs.srv import GetState

        client = self.node.create_client(GetState, f"{self.node_ns}/get_state")
        assert client.wait_for_service(timeout_sec=10)
        return self.wait_for(client.call_async(GetState.Request()), 10).current_state.label

    def set_parameters(self, values: Dict[str, Any]) -> List[Any]:
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        client = self.node.create_client(SetParameters, f"{self.node_ns}/set_parameters")
        assert client.wait_for_service(timeout_sec=10.0)
        req = SetParameters.Request(parameters=[Parameter(k, value=v).to_parameter_msg() for k, v in values.items()])
        return list(self.wait_for(client.call_async(req), 10.0).results)



class CameraStream:
    """A camera publishing frames stamped with the wall clock at a fixed rate, like a driver."""

    def __init__(self, tester: Tester, width: int, height: int, hz: float, reliable: bool,
                 topic: str = "/image", frame_id: str = "camera_optical") -> None:
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image

        reliability = ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT
        self._node = tester.node
        self._pub = tester.node.create_publisher(
            Image, topic, QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=reliability))
        self._rgb = scene(width, height)
        self._period, self._frame_id = 1.0 / hz, frame_id
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self._pub.publish(rgb_image_msg(self._rgb, time.time_ns(), self._frame_id))
            self.sent += 1
            next_at += self._period
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._node.destroy_publisher(self._pub)   # gone from the graph, as a camera that stops


# -- a slowed-down real backend, for plumbing tests only (busy queue, cancel) ------------------
class SlowBackend:
    """Wraps the real backend: sleeps before each decode step and never lets eos win, so a
    generation reliably lasts long enough to fill the queue or be cancelled."""

    def __init__(self, inner: Any, eos: int, delay_s: float) -> None:
        self._inner, self._eos, self._delay = inner, eos, delay_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _no_eos(self, logits: Any) -> Any:
        out = np.array(logits, dtype=np.float32, copy=True)
        out[..., self._eos] = -np.inf
        return out

    def prefill(self, *args: Any, **kwargs: Any) -> Any:
        logits, cache = self._inner.prefill(*args, **kwargs)
        return self._no_eos(logits), cache

    def prefill_batch(self, *args: Any, **kwargs: Any) -> Any:
        # generate() prefills rows on a shared prefix through this; keep eos out of them too.
        logits, caches = self._inner.prefill_batch(*args, **kwargs)
        return self._no_eos(logits), caches

    def decode_batch(self, caches: Any, token_ids: Any) -> Any:
        time.sleep(self._delay)
        logits, caches = self._inner.decode_batch(caches, token_ids)
        return self._no_eos(logits), caches


def run_node_with_backend(wrap: Callable[[Any, Any], Any]) -> None:
    """The real node and checkpoint, with the loaded backend replaced by `wrap(backend, pipeline)`."""
    from kosmos2_ros.core.serving import pipeline as pipeline_module
    from kosmos2_ros.ros import node

    original = pipeline_module.Pipeline.load.__func__

    def load(cls: Any, config: Any, **options: Any) -> Any:
        pipe = original(cls, config, **options)
        pipe.backend = wrap(pipe.backend, pipe)
        return pipe

    pipeline_module.Pipeline.load = classmethod(load)
    node.main()


def slow_node_main() -> None:
    """The real node behind SlowBackend (env KOSMOS2_TEST_DELAY_S)."""
    delay = float(os.environ.get("KOSMOS2_TEST_DELAY_S", "0.05"))
    run_node_with_backend(lambda backend, pipe: SlowBackend(backend, pipe.vocab.eos, delay))


# -- a fault-injecting real backend, for reliability tests --------------------------------------
FAULT_DIR_ENV = "KOSMOS2_TEST_FAULT_DIR"
FAULTS = {
    "memory": lambda: MemoryError("simulated: cannot allocate host memory"),
    "cuda_oom": lambda: RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"),
    "runtime": lambda: RuntimeError("simulated backend failure"),
    "value": lambda: ValueError("simulated: engine file from another version"),
    "key": lambda: KeyError("simulated missing output"),
}


def fault_at(control: Path, where: str, rows: int = 1) -> None:
    """Raise the fault the control folder's `fault` file asks for at `where`, once (see FaultyBackend)."""
    path = control / "fault"
    try:
        words = path.read_text().split()
    except OSError:
        return
    if len(words) < 2 or words[1] != where or rows < (int(words[2]) if len(words) > 2 else 1):
        return
    try:
        path.unlink()
    except OSError:
        return   # another call fired it
    raise FAULTS[words[0]]()


class FaultyBackend:
    """Wraps the real backend; files in a control folder steer it while the node runs.

    `delay`: seconds to sleep before each decode step, eos suppressed (long, cancellable work).
    `fault`: "<kind> <where> [min_rows]" makes the next matching call raise FAULTS[kind]
    (where: encode | prefill | decode; min_rows: only a decode of at least that many rows;
    `fault_node_main` adds publish: the node's next result publication), once: the file is removed
    when it fires.
    """

    def __init__(self, inner: Any, eos: int, control: Path) -> None:
        self._inner, self._eos, self._control = inner, eos, control

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _delay(self) -> float:
        try:
            return float((self._control / "delay").read_text().strip() or 0)
        except (OSError, ValueError):
            return 0.0

    def _maybe_fail(self, where: str, rows: int = 1) -> None:
        fault_at(self._control, where, rows)

    def _no_eos(self, logits: Any) -> Any:
        if self._delay() <= 0:
            return logits
        out = np.array(logits, dtype=np.float32, copy=True)
        out[..., self._eos] = -np.inf
        return out

    def encode_image(self, *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail("encode")
        return self._inner.encode_image(*args, **kwargs)

    def encode_images(self, *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail("encode")
        return self._inner.encode_images(*args, **kwargs)

    def prefill_images(self, *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail("prefill")
        return self._inner.prefill_images(*args, **kwargs)

    def prefill(self, *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail("prefill")
        logits, cache = self._inner.prefill(*args, **kwargs)
        return self._no_eos(logits), cache

    def prefill_batch(self, *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail("prefill")
        logits, caches = self._inner.prefill_batch(*args, **kwargs)
        return self._no_eos(logits), caches

    def decode(self, cache: Any, token_id: int) -> Any:
        logits, caches = self.decode_batch([cache], [token_id])
        return logits[0], caches[0]

    def decode_batch(self, caches: Any, token_ids: Any) -> Any:
        self._maybe_fail("decode", len(token_ids))
        delay = self._delay()
        if delay > 0:
            time.sleep(delay)
        logits, caches = self._inner.decode_batch(caches, token_ids)
        return self._no_eos(logits), caches


def fault_node_main() -> None:
    """The real node behind FaultyBackend (control folder: env KOSMOS2_TEST_FAULT_DIR)."""
    from kosmos2_ros.ros import publishing

    control = Path(os.environ[FAULT_DIR_ENV])
    publish = publishing.ResultPublishers.publish

    def faulty_publish(self: Any, *args: Any, **kwargs: Any) -> Any:
        fault_at(control, "publish")
        return publish(self, *args, **kwargs)

    publishing.ResultPublishers.publish = faulty_publish   # type: ignore[method-assign]
    run_node_with_backend(lambda backend, pipe: FaultyBackend(backend, pipe.vocab.eos, control))


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux /proc), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


if __name__ == "__main__":
    if os.environ.get(FAULT_DIR_ENV):
        fault_node_main()
    else:
        slow_node_main()
