"""The grounding node: camera frames in, Kosmos-2 commands in, grounded results out.

A lifecycle node. Camera and command callbacks only convert and enqueue; one worker thread
(`worker.Worker`) runs the model, so slow generation never blocks callbacks nor queues old
frames (only the newest few are kept). The service and the action wait for the worker's
future in a reentrant callback group under a multi-threaded executor, so they cannot deadlock.

Reliability: every accepted command gets exactly one result on ~/result (see worker.py);
at most `queue_size` wait, past that BUSY at once. Deactivate, cleanup and shutdown answer
what is queued (NOT_ACTIVE) and stop what runs (CANCELLED) before the model is freed; a
backend failure is a MODEL_ERROR result plus a diagnostics entry, and the next command runs.
"""
from __future__ import annotations

import gc
import itertools
import signal
import sys
import threading
import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

import rclpy
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import MultiThreadedExecutor
from rclpy.expand_topic_name import expand_topic_name
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import State, TransitionCallbackReturn
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import String

from kosmos2_ros.action import GroundTask
from kosmos2_ros.core.config import ConfigError, Kosmos2Config
from kosmos2_ros.core.frames import Frame, FrameStore, FrameUnavailable
from kosmos2_ros.core.grounding import parse_generation
from kosmos2_ros.core.loading import quiet_libraries
from kosmos2_ros.core.pipeline import Command, Pipeline, Result, Status
from kosmos2_ros.msg import GroundingCommand, GroundingResult
from kosmos2_ros.srv import Ground

from . import convert, visualize
from .camera_qos import MatchedSubscription
from .parameters import ParametersMixin
from .publishing import ResultPublishers
from .topics import camera_info_for, compressed_for
from .worker import FrameRejected, Job, Worker

try:  # Humble and later
    from rclpy.executors import ExternalShutdownException
except ImportError:  # pragma: no cover
    ExternalShutdownException = KeyboardInterrupt  # type: ignore[misc,assignment]

NODE_NAME = "kosmos2"
# Depth and colour frames are paired by stamp; a depth image this close to the colour frame counts.
DEPTH_SYNC_S = 0.5
COMMAND_HISTORY = 1000
# The worker's Python decode loop holds the GIL; with the default 5 ms switch interval every GIL
# hand-off to an executor thread can wait that long, and a command callback needs several, so
# BUSY answers lagged by seconds under load. 0.5 ms keeps callbacks prompt at a small cost.
GIL_SWITCH_INTERVAL_S = 0.0005
# How long deactivate/cleanup/shutdown wait for the running command to stop at its next token.
STOP_WAIT_S = 10.0


class GroundingNode(ParametersMixin, LifecycleNode):
    """Kosmos-2 grounding as a managed node (see the module docstring for the threading)."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        # Start-up values rclpy itself refused (out of a descriptor's range, wrong type): the
        # parameter holds its default, and configure fails until the user sets it.
        self._refused_at_start: Dict[str, str] = {}
        self._declare_parameters()
        problem = ""
        try:
            self.config = Kosmos2Config.from_dict(self._parameter_values())
        except ConfigError as exc:
            problem = str(exc)
            self.config = Kosmos2Config()
        self.param_error = self._parameter_problems(problem)
        if self.param_error:
            self.get_logger().error(f"bad parameter: {self.param_error}; the node will not configure until it is "
                                    "fixed (ros2 param set, then configure)")
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self._lock = threading.Lock()
        self._pipeline: Optional[Pipeline] = None
        self._active = False
        self.state_label = "unconfigured"
        self.frames = FrameStore(self.config.frame_cache_size)
        self._image_error: Optional[Tuple[int, str, str]] = None   # (stamp_ns, frame_id, reason)
        self._depths: Deque[Tuple[int, Any]] = deque(maxlen=8)
        self._intrinsics = None
        self._ids = itertools.count(1)
        self.stats = visualize.Stats()
        self._sensor_subs: List[MatchedSubscription] = []

        self._commands_group = ReentrantCallbackGroup()
        self._sensor_group = MutuallyExclusiveCallbackGroup()
        self.outputs = ResultPublishers(self, self.stats)
        self._command_sub = self.create_subscription(GroundingCommand, "~/command", self._on_command, COMMAND_HISTORY,
                                                     callback_group=self._commands_group)
        self.create_subscription(String, "~/refer", self._on_refer, COMMAND_HISTORY, callback_group=self._commands_group)
        self.create_service(Ground, "~/ground", self._on_ground, callback_group=self._commands_group)
        self._action = ActionServer(self, GroundTask, "~/ground_task", execute_callback=self._on_goal,
                                    goal_callback=lambda _goal: GoalResponse.ACCEPT,
                                    cancel_callback=lambda _goal: CancelResponse.ACCEPT,
                                    callback_group=self._commands_group)
        self.worker = Worker(lambda: self._pipeline if self._active else None, self._resolve, self._finish,
                             capacity=lambda: self.config.queue_size)
        self.create_timer(1.0, self._every_second, callback_group=self._sensor_group)

    # -- lifecycle -------------------------------------------------------------------------
    def on_configure(self, state: State) -> TransitionCallbackReturn:
        if self.param_error:
            self.get_logger().error(f"cannot configure: bad parameter: {self.param_error}")
            return TransitionCallbackReturn.FAILURE
        cfg = self.config
        self.get_logger().info(f"loading model {cfg.model!r} (backend {cfg.backend}, device {cfg.device})")
        t0 = time.perf_counter()
        try:
            pipeline = Pipeline.load(cfg)
        except Exception as exc:  # noqa: BLE001 - ModelNotFound, BackendError, OSError...: all fail the transition
            self.get_logger().error(f"cannot load model {cfg.model!r} with backend {cfg.backend}: "
                                    f"{type(exc).__name__}: {exc}")
            return TransitionCallbackReturn.FAILURE
        with self._lock:
            self._pipeline = pipeline
        self.get_logger().info(f"model loaded in {time.perf_counter() - t0:.2f} s; {pipeline.backend_reason}")
        self._make_sensor_subscriptions(cfg)
        self.state_label = "inactive"
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        self.worker.resume()
        self._active = True
        self.state_label = "active"
        image_topic = self._sensor_subs[0].topic_name if self._sensor_subs else "image"
        self._rematch_sensor_qos()
        self.get_logger().info(f"active: waiting for images on {image_topic} and commands on "
                               f"{self._command_sub.topic_name}")
        return super().on_activate(state)

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        self._active = False
        self.state_label = "inactive"
        self._stop_commands("node deactivated")
        return super().on_deactivate(state)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        self._release()
        self.state_label = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        self._release()
        self.state_label = "finalized"
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: State) -> TransitionCallbackReturn:
        self.get_logger().error("lifecycle error: freeing the model")
        self._release()
        self.state_label = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def _stop_commands(self, reason: str) -> None:
        """Queued commands get NOT_ACTIVE, the running one CANCELLED; wait until it has stopped."""
        self.worker.abort(reason)
        self.worker.drain(Status.NOT_ACTIVE, reason)
        if not self.worker.wait_idle(STOP_WAIT_S):
            self.get_logger().warning(f"{reason}: the running command did not stop within {STOP_WAIT_S:g} s")
        self.worker.drain(Status.NOT_ACTIVE, reason)   # anything that slipped in meanwhile

    def _release(self) -> None:
        self._active = False
        self._stop_commands("node is not active")
        for sub in self._sensor_subs:
            sub.destroy()
        self._sensor_subs = []
        with self._lock:
            pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            # The worker may still be mid-command (a long encode); wait for it before freeing the backend.
            self.worker.wait_idle(30.0)
            pipeline.close()
            del pipeline
            gc.collect()
            self.get_logger().info("model released")
        self.frames.clear()
        self._image_error = None

    def _make_sensor_subscriptions(self, cfg: Kosmos2Config) -> None:
        """Image, camera_info, depth (and compressed), with camera_info and compressed named
        after the image topic unless remapped themselves (image_transport's convention)."""
        def subscribe(msg_type: Any, topic: str, callback: Any) -> MatchedSubscription:
            return MatchedSubscription(self, msg_type, topic, callback, cfg.image_qos, self._sensor_group)

        image = subscribe(Image, "image", self._on_image)
        subs = [image, subscribe(CameraInfo, self._named_after_image("camera_info", camera_info_for(image.topic_name)),
                                 self._on_camera_info)]
        if cfg.enable_3d:
            subs.append(subscribe(Image, "depth/image", self._on_depth))
        if cfg.use_compressed:
            subs.append(subscribe(CompressedImage,
                                  self._named_after_image("image/compressed", compressed_for(image.topic_name)),
                                  self._on_compressed))
        self._sensor_subs = subs

    def _named_after_image(self, name: str, convention: str) -> str:
        """`name` where a remap rule names it, else the image topic's sibling or child."""
        expanded = expand_topic_name(name, self.get_name(), self.get_namespace())
        if hasattr(self, "resolve_topic_name"):
            resolved = self.resolve_topic_name(name)
        else:  # pragma: no cover - an rclpy without Node.resolve_topic_name
            probe = self.create_subscription(String, name, lambda _msg: None, 1)
            resolved = probe.topic_name
            self.destroy_subscription(probe)
        return resolved if resolved != expanded else convention

    def _rematch_sensor_qos(self) -> None:
        """image_qos auto: follow the publishers' reliability (checked on activate and every second)."""
        for sub in list(self._sensor_subs):
            change = sub.rematch()
            if change:
                self.get_logger().info(change)

    # -- sensors ---------------------------------------------------------------------------
    def _on_image(self, msg: Image) -> None:
        self._take_frame(msg.header, lambda: convert.image_to_rgb(msg))

    def _on_compressed(self, msg: CompressedImage) -> None:
        self._take_frame(msg.header, lambda: convert.compressed_to_rgb(msg))

    def _take_frame(self, header: Any, decode: Any) -> None:
        stamp = convert.stamp_to_ns(header.stamp)
        try:
            frame = Frame(rgb=decode(), stamp_ns=stamp, frame_id=header.frame_id)
        except Exception as exc:  # noqa: BLE001 - a bad image must never kill the node
            reason = str(exc) or type(exc).__name__
            self._image_error = (stamp, header.frame_id, reason)
            self.stats.frame(False, reason)
            self.get_logger().warning(f"image rejected: {reason}", throttle_duration_sec=5.0)
            return
        self.frames.put(frame)
        self._image_error = None
        self.stats.frame(True)

    def _on_depth(self, msg: Image) -> None:
        try:
            depth = convert.depth_to_m(msg)
        except Exception as exc:  # noqa: BLE001
            self.get_logger().warning(f"depth image rejected: {exc}", throttle_duration_sec=5.0)
            return
        self._depths.append((convert.stamp_to_ns(msg.header.stamp), depth))

    def _on_camera_info(self, msg: CameraInfo) -> None:
        intr = convert.intrinsics_from(msg)
        if intr is not None:
            self._intrinsics = intr

    # -- commands --------------------------------------------------------------------------
    def _on_command(self, msg: GroundingCommand) -> None:
        self.submit(convert.command_from_msg(msg))

    def _on_refer(self, msg: String) -> None:
        self.submit(Command(task="refer", text=msg.data))

    def _on_ground(self, request: Ground.Request, response: Ground.Response) -> Ground.Response:
        job = self.submit(convert.command_from_msg(request.command))
        job.future.result()
        response.result = job.message
        return response

    def _on_goal(self, goal_handle: Any) -> GroundTask.Result:
        cmd = convert.command_from_msg(goal_handle.request.command)
        last = [0.0]

        def on_token(_row: int, gen: Any) -> None:
            now = time.monotonic()
            if now - last[0] < 0.05:
                return
            last[0] = now
            pipeline = self._pipeline
            raw = pipeline.codec.decode(gen.token_ids) if pipeline is not None else ""
            goal_handle.publish_feedback(GroundTask.Feedback(tokens_generated=len(gen.token_ids),
                                                             partial_text=parse_generation(raw).text,
                                                             partial_raw_text=raw))

        job = self.submit(cmd, on_token=on_token, should_stop=lambda: goal_handle.is_cancel_requested)
        job.future.result()
        msg: GroundingResult = job.message
        if msg.status == GroundingResult.STATUS_CANCELLED and goal_handle.is_cancel_requested:
            goal_handle.canceled()
        elif msg.status == GroundingResult.STATUS_OK:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return GroundTask.Result(result=msg)

    def submit(self, command: Command, on_token: Any = None, should_stop: Any = None) -> Job:
        """Queue a command; not active or a full queue is answered at once. Returns its job."""
        if not command.id:
            command.id = f"{self.get_name()}-{next(self._ids)}"
        job = Job(command, on_token=on_token, should_stop=should_stop)
        if not self._active or self._pipeline is None:
            self.worker.complete(job, Result.failure(command, Status.NOT_ACTIVE,
                                                     f"node is not active (state: {self.state_label})"), None)
        elif not self.worker.submit(job):
            self.worker.complete(job, Result.failure(command, Status.BUSY,
                                                     f"queue full ({self.config.queue_size} commands pending; "
                                                     "parameter queue_size)"), None)
        return job

    def _resolve(self, command: Command) -> Frame:
        """The frame a command runs on, or FrameRejected with its result (no frame, stale, bad image)."""
        error = self._image_error
        if error is not None and command.image_stamp_ns in (0, error[0]):
            res = Result.failure(command, Status.INVALID, f"last image was rejected: {error[2]}")
            res.stamp_ns, res.frame_id = error[0], error[1]
            raise FrameRejected(res)
        try:
            frame = self.frames.select(command.image_stamp_ns, self.config.max_frame_age_s)
        except FrameUnavailable as exc:
            status = Status.STALE_FRAME if exc.status == "stale_frame" else Status.NO_FRAME
            res = Result.failure(command, status, str(exc))
            newest = self.frames.newest()
            if status is Status.STALE_FRAME and newest is not None:
                res.stamp_ns, res.frame_id = newest.stamp_ns, newest.frame_id
            raise FrameRejected(res) from None
        self._attach_depth(frame)
        return frame

    def _attach_depth(self, frame: Frame) -> None:
        if not self.config.enable_3d or self._intrinsics is None:
            return
        if frame.intrinsics is None:
            frame.intrinsics = self._intrinsics
        if frame.depth_m is None and self._depths:
            stamp, depth = min(list(self._depths), key=lambda sd: abs(sd[0] - frame.stamp_ns))
            if abs(stamp - frame.stamp_ns) <= DEPTH_SYNC_S * 1e9:
                frame.depth_m = depth

    def _finish(self, job: Job, result: Result, frame: Optional[Frame], queue_ms: float) -> None:
        """Publish a command's one result (and debug image, markers, detections)."""
        job.message = self.outputs.publish(result, frame, queue_ms, self.config)

    def _every_second(self) -> None:
        self._rematch_sensor_qos()
        self._publish_diagnostics()

    def _publish_diagnostics(self) -> None:
        pipeline = self._pipeline
        extra = [("queue_depth", self.worker.depth()), ("frames_replaced_unused", self.frames.replaced_unused),
                 ("image_error_now", self._image_error is not None),
                 ("backend", pipeline.backend.name if pipeline is not None else self.config.backend),
                 ("queue_size", self.config.queue_size), ("model_errors", self.worker.model_errors),
                 ("last_model_error", self.worker.last_model_error),
                 ("results_unpublished", self.worker.finish_errors)]
        self.outputs.publish_diagnostics(self.state_label, self.config.model, extra)

    def destroy_node(self) -> None:
        self.worker.stop()
        self._release()
        super().destroy_node()


def _init_rclpy(args: List[str]) -> bool:
    """rclpy.init without its SIGINT/SIGTERM handlers (they shut the context down at once, and
    pending results could no longer be published); True when our own handlers may be used."""
    try:
        from rclpy.signals import SignalHandlerOptions

        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
        return True
    except (ImportError, TypeError):  # pragma: no cover - an rclpy without the option
        rclpy.init(args=args)
        return False


def _spin_once(executor: MultiThreadedExecutor, timeout_sec: float) -> None:
    """One executor turn that survives entities destroyed under it.

    A lifecycle transition (cleanup, shutdown) runs in an executor thread and destroys the
    subscriptions while this thread may be building its wait set; rclpy then raises
    InvalidHandle for that turn only. The next turn builds the wait set anew.
    """
    try:
        executor.spin_once(timeout_sec=timeout_sec)
    except Exception as exc:  # noqa: BLE001 - rclpy's InvalidHandle lives in a private module
        if type(exc).__name__ != "InvalidHandle":
            raise


def main(args: Optional[List[str]] = None) -> None:
    """`ros2 run kosmos2_ros grounding_node [--ros-args ...]`.

    SIGINT/SIGTERM stop spinning; then every queued command is answered (NOT_ACTIVE), the
    running one is stopped (CANCELLED), and the executor spins a moment longer so those
    results and any waiting service/action replies go out before the context shuts down.
    """
    own_signals = _init_rclpy(args if args is not None else sys.argv)
    quiet_libraries()   # transformers' loading progress bar would print a blank line under launch
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    stop = threading.Event()
    if own_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    node = GroundingNode()
    # Service and action callbacks each hold a thread while their command runs; keep spare ones.
    executor = MultiThreadedExecutor(num_threads=8)
    executor.add_node(node)
    if node.config.autostart and not node.param_error:
        if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            node.trigger_activate()
        else:
            node.get_logger().error("autostart: configure failed; the node stays unconfigured "
                                    "(fix the parameters and call the lifecycle change_state service)")
    try:
        # The lifecycle shutdown transition ends the process too, as launch and supervisors expect.
        while rclpy.ok() and not stop.is_set() and node.state_label != "finalized":
            _spin_once(executor, 0.1)
        if rclpy.ok():
            node.get_logger().info("shutting down: answering pending commands")
            node._active = False
            node.worker.stop()
            flush_until = time.monotonic() + 0.5
            while rclpy.ok() and time.monotonic() < flush_until:
                _spin_once(executor, 0.05)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown()
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()


if __name__ == "__main__":
    main()

