"""The grounding node: camera frames in, Kosmos-2 commands in, grounded results out.

A lifecycle node. Camera and command callbacks only convert and enqueue; one worker thread
(`worker.Worker`) runs the model, so slow generation never blocks callbacks nor queues old
frames (only the newest few are kept). The service and the action wait for the worker's
future in a reentrant callback group under a multi-threaded executor, so they cannot deadlock.

Several cameras share the one model (parameter `cameras`; one `camera.Camera` each, in
`self.cameras`). When no command waits, the worker grounds each camera's standing queries on
its newest frame (~/tracks) and encodes frames ahead (`live.LiveWork`).

Reliability: every accepted command gets exactly one result on ~/result (see worker.py);
at most `queue_size` wait, past that BUSY at once. Deactivate, cleanup and shutdown answer
what is queued (NOT_ACTIVE) and stop what runs (CANCELLED) before the model is freed; a
backend failure is a MODEL_ERROR result plus a diagnostics entry, and the next command runs.
"""
from __future__ import annotations

import itertools
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Set

import rclpy
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import MultiThreadedExecutor
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import State, TransitionCallbackReturn
from std_msgs.msg import String

from kosmos2_ros.action import GroundTask
from kosmos2_ros.core.model.grounding import parse_generation
from kosmos2_ros.core.model.loading import quiet_libraries
from kosmos2_ros.core.serving.config import ConfigError, Kosmos2Config, check_queries
from kosmos2_ros.core.serving.frames import Frame
from kosmos2_ros.core.serving.pipeline import Command, Pipeline, Result, Status
from kosmos2_ros.core.spatial.object_geometry import invalidate_objects
from kosmos2_ros.msg import GroundingCommand, GroundingResult, Tracks
from kosmos2_ros.srv import Ground, SetQueries

from . import convert
from .camera import Camera
from .camera_interface import CameraInterface, camera_interfaces
from .command_intake import COMMAND_HISTORY, CommandPublisherCheck, without_event_waitables
from .live import LiveWork
from .moveit_adapter import collision_objects_or_none
from .parameters import ParametersMixin
from .publishing import ResultPublishers
from .target import TargetPublishers
from .tf_adapter import make_geometry_frames
from .worker import FrameRejected, Job, Worker

try:  # Humble and later
    from rclpy.executors import ExternalShutdownException
except ImportError:  # pragma: no cover
    ExternalShutdownException = KeyboardInterrupt  # type: ignore[misc,assignment]

NODE_NAME = "kosmos2"
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
        self._ids = itertools.count(1)
        self.cameras: Dict[str, Camera] = {}
        self.camera_interfaces: Dict[str, CameraInterface] = {}   # camera_topics: each camera's own topics
        self._make_cameras()
        self.live = LiveWork(self)

        self._commands_group = ReentrantCallbackGroup()
        self._sensor_group = MutuallyExclusiveCallbackGroup()
        self.outputs = ResultPublishers(self)
        self.targets = TargetPublishers(self)     # its CollisionObject publisher comes with configure
        # Object geometry stays in the camera's frame until configure sets target_frame up.
        self.geometry_frames = make_geometry_frames(self, "", 0.0)
        # No QoS-event waitables on the command topics (they slowed command intake many-fold under
        # load; command_intake explains); `_command_publishers` gives their warning instead.
        self._command_sub = self.create_subscription(GroundingCommand, "~/command", self._on_command, COMMAND_HISTORY,
                                                     callback_group=self._commands_group,
                                                     event_callbacks=without_event_waitables())
        refer_sub = self.create_subscription(String, "~/refer", self._on_refer, COMMAND_HISTORY,
                                             callback_group=self._commands_group,
                                             event_callbacks=without_event_waitables())
        self._command_publishers = CommandPublisherCheck([self._command_sub.topic_name, refer_sub.topic_name])
        self.create_service(Ground, "~/ground", self._on_ground, callback_group=self._commands_group)
        self.create_service(SetQueries, "~/set_queries", self._on_set_queries, callback_group=self._commands_group)
        self._action = ActionServer(self, GroundTask, "~/ground_task", execute_callback=self._on_goal,
                                    goal_callback=lambda _goal: GoalResponse.ACCEPT,
                                    cancel_callback=lambda _goal: CancelResponse.ACCEPT,
                                    callback_group=self._commands_group)
        self.worker = Worker(self.active_pipeline, self._resolve, self._finish,
                             capacity=lambda: self.config.queue_size, idle=self.live.idle)
        self.create_timer(1.0, self._every_second, callback_group=self._sensor_group)

    # -- parameters (declared, validated and set in ParametersMixin) ---------------------------
    def _config_changed(self, new: Kosmos2Config, changed: Set[str]) -> None:
        """A valid parameter change: what applies at once (frames kept, standing queries, generation)."""
        for cam in self.cameras.values():
            cam.frames.capacity = new.frame_cache_size
            if "queries" in changed:
                cam.standing.set(new.queries)   # every camera, replacing what ~/set_queries set
            if "checks" in changed:
                cam.standing.set_checks(new.checks)
        self.worker.poke()
        pipeline = self._pipeline
        if pipeline is not None:
            pipeline.config = new     # generation settings apply from the next command

    # -- lifecycle -------------------------------------------------------------------------
    def on_configure(self, state: State) -> TransitionCallbackReturn:
        if self.param_error:
            self.get_logger().error(f"cannot configure: bad parameter: {self.param_error}")
            return TransitionCallbackReturn.FAILURE
        cfg = self.config
        if cfg.configure_problem():
            self.get_logger().error(f"cannot configure: {cfg.configure_problem()}")
            return TransitionCallbackReturn.FAILURE
        try:
            self.geometry_frames.close()
            self.geometry_frames = make_geometry_frames(self, cfg.target_frame, cfg.tf_timeout_s,
                                                        dict(zip(cfg.cameras, cfg.target_frames)))
            self.targets.collision = collision_objects_or_none(self, cfg)
        except ImportError as exc:
            self.get_logger().error(f"cannot configure: {exc}")
            return TransitionCallbackReturn.FAILURE
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
        self.get_logger().info(f"model loaded in {time.perf_counter() - t0:.2f} s: {pipeline.backend_reason}")
        if pipeline.backend.caveat:
            self.get_logger().warning(pipeline.backend.caveat)
        self._make_cameras()
        for cam in self.cameras.values():
            cam.subscribe(cfg, self._sensor_group)
        self.camera_interfaces = camera_interfaces(self, cfg, self._commands_group)
        self.state_label = "inactive"
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        self.worker.resume()
        self._active = True
        self.state_label = "active"
        image_topics = [cam.subs[0].topic_name for cam in self.cameras.values() if cam.subs] or ["image"]
        self._rematch_sensor_qos()
        self.get_logger().info(f"active: waiting for images on {', '.join(image_topics)} and commands on "
                               f"{self._command_sub.topic_name}")
        self.worker.poke()
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
        for cam in self.cameras.values():
            cam.unsubscribe()
        interfaces, self.camera_interfaces = self.camera_interfaces, {}   # results from now on: node-wide only
        for iface in interfaces.values():
            iface.destroy()
        self.geometry_frames.close()
        self.geometry_frames = make_geometry_frames(self, "", 0.0)
        with self._lock:
            pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            # The worker may still be mid-command (a long encode); wait for it before freeing the backend.
            self.worker.wait_idle(30.0)
            pipeline.close()
            del pipeline
            import gc

            gc.collect()
            self.get_logger().info("model released")
        for cam in self.cameras.values():
            cam.clear()

    def _make_cameras(self) -> None:
        """One Camera per name in `cameras` (the unnamed one when empty); made anew on configure."""
        cfg = self.config
        self.cameras = {name: Camera(self, name, cfg, on_frame=self._on_frame) for name in cfg.camera_names}
        for cam in self.cameras.values():
            cam.standing.set(cfg.queries)
            cam.standing.set_checks(cfg.checks)

    def _on_frame(self, cam: Camera) -> None:
        if cam.standing.standing or self.config.encode_ahead_hz > 0:
            self.worker.poke()

    def active_pipeline(self) -> Optional[Pipeline]:
        """The loaded pipeline while the node is active, else None."""
        return self._pipeline if self._active else None

    def camera_of(self, command: Command) -> Camera:
        """The command's camera (empty: the first), or FrameRejected INVALID naming the cameras."""
        name = command.camera or next(iter(self.cameras))
        cam = self.cameras.get(name)
        if cam is None:
            known = ", ".join(repr(n) for n in self.cameras if n) or "one unnamed camera (leave camera empty)"
            raise FrameRejected(Result.failure(command, Status.INVALID,
                                               f"unknown camera {command.camera!r}; this node has: {known} "
                                               "(parameter cameras)"))
        return cam

    def _rematch_sensor_qos(self) -> None:
        """image_qos auto: follow the publishers' reliability (checked on activate and every second)."""
        for cam in list(self.cameras.values()):
            for change in cam.rematch():
                self.get_logger().info(change)

    # -- commands --------------------------------------------------------------------------
    def _on_command(self, msg: GroundingCommand) -> None:
        self.submit(convert.command_from_msg(msg))

    def _on_refer(self, msg: String) -> None:
        self.submit(Command(task="refer", text=msg.data))

    def _on_ground(self, request: Ground.Request, response: Ground.Response) -> Ground.Response:
        job = self.submit(convert.command_from_msg(request.command))
        response.result = self.answer(job)
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

        def on_candidates(result: Result) -> None:
            # the candidates as soon as they are known, before any descriptions of them
            goal_handle.publish_feedback(GroundTask.Feedback(
                tokens_generated=len(result.token_ids), partial_text=result.text, partial_raw_text=result.raw_text,
                candidates=convert.result_to_msg(result, masks=False).candidates))

        job = self.submit(cmd, on_token=on_token, should_stop=lambda: goal_handle.is_cancel_requested,
                          on_candidates=on_candidates)
        msg = self.answer(job)
        if msg.status == GroundingResult.STATUS_CANCELLED and goal_handle.is_cancel_requested:
            goal_handle.canceled()
        elif msg.status == GroundingResult.STATUS_OK:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return GroundTask.Result(result=msg)

    def submit(self, command: Command, on_token: Any = None, should_stop: Any = None, on_candidates: Any = None) -> Job:
        """Queue a command; not active or a full queue is answered at once. Returns its job."""
        if not command.id:
            command.id = f"{self.get_name()}-{next(self._ids)}"
        if not command.camera:
            command.camera = next(iter(self.cameras))
        job = Job(command, on_token=on_token, should_stop=should_stop, on_candidates=on_candidates)
        if not self._active or self._pipeline is None:
            self.worker.complete(job, Result.failure(command, Status.NOT_ACTIVE,
                                                     f"node is not active (state: {self.state_label})"), None)
        elif not self.worker.submit(job):
            self.worker.complete(job, Result.failure(command, Status.BUSY,
                                                     f"queue full ({self.config.queue_size} commands pending; "
                                                     "parameter queue_size)"), None)
        return job

    def refuse(self, command: Command, status: Status, reason: str) -> Job:
        """Answer a command at once with `status` and `reason` (it never reaches the queue). Returns its job."""
        if not command.id:
            command.id = f"{self.get_name()}-{next(self._ids)}"
        job = Job(command)
        self.worker.complete(job, Result.failure(command, status, reason), None)
        return job

    def _resolve(self, command: Command) -> Frame:
        """The frame a command runs on, or FrameRejected with its result (unknown camera, no frame,
        stale, bad image)."""
        return self.camera_of(command).resolve(command, self.config)

    def _on_set_queries(self, request: SetQueries.Request, response: SetQueries.Response) -> SetQueries.Response:
        """Set, replace or clear a camera's standing queries and checks (every camera's with camera empty)."""
        if request.camera and request.camera not in self.cameras:
            known = ", ".join(repr(n) for n in self.cameras if n) or "one unnamed camera (leave camera empty)"
            response.success, response.error = False, f"unknown camera {request.camera!r}; this node has: {known}"
            return response
        targets = [self.cameras[request.camera]] if request.camera else list(self.cameras.values())
        pipeline = self._pipeline
        controls = tuple(sorted(pipeline.vocab.control_strings)) if pipeline is not None else ()
        try:
            queries = check_queries(list(request.queries), self.config.max_prompt_chars, controls)
            checks = check_queries(list(request.checks), self.config.max_prompt_chars, controls, name="checks") \
                if request.set_checks else None
        except ConfigError as exc:
            # refused: nothing changed, so answer what is in force (the first target camera's)
            response.success, response.error = False, str(exc)
            response.queries = list(targets[0].standing.queries) if targets else []
            response.checks = list(targets[0].standing.checks) if targets else []
            return response
        for cam in targets:
            cam.standing.set(queries)
            if checks is not None:        # set_checks false: a client that only sets queries keeps the checks
                cam.standing.set_checks(checks)
        self.worker.poke()
        response.success, response.queries = True, list(queries)
        response.checks = list(targets[0].standing.checks) if targets else []
        return response

    def place_geometry(self, results: List[Result]) -> None:
        """Objects' geometry into target_frame, where one is set (worker thread, before publishing)."""
        self.geometry_frames.place(results)

    def publish_tracks(self, msg: Tracks, frame: Frame, combined: Result) -> None:
        """A frame's standing-query answers: ~/tracks, and the usual views (worker thread)."""
        self.outputs.publish_tracks(msg, frame, combined, self.config)
        iface = self.camera_interfaces.get(msg.camera)
        if iface is not None:
            iface.tracks.publish(msg)

    def offer_target(self, result: Result, object_id: str) -> None:
        """`result`'s object as the arm's target, on ~/target/* and on its camera's own target topics."""
        self.targets.offer(result, object_id)
        iface = self.camera_interfaces.get(result.camera)
        if iface is not None:
            iface.targets.offer(result, object_id)

    def _finish(self, job: Job, result: Result, frame: Optional[Frame], queue_ms: float) -> None:
        """Publish a command's one result (and debug image, markers, detections). The message is made and
        kept for the service or action before anything is published, so a publisher that raises (the worker
        counts it) cannot leave them without an answer."""
        cam = self.cameras.get(result.camera) or next(iter(self.cameras.values()))
        try:
            self.place_geometry([result])
        except Exception as exc:  # noqa: BLE001 - a geometry failure must never lose the result
            invalidate_objects(result.objects + result.candidates,
                               f"could not move the geometry into "
                               f"{self.geometry_frames.target_of(result.camera)}: {exc}")
        try:
            job.message = convert.result_to_msg(result, queue_ms, masks=self.config.result_masks)
        except Exception as exc:  # noqa: BLE001 - a result that cannot become a message is still answered
            result = Result.failure(job.command, Status.MODEL_ERROR, f"the result could not be converted: {exc}", frame)
            job.message = convert.result_to_msg(result, queue_ms)
        iface = self.camera_interfaces.get(result.camera)
        if iface is not None:      # the robot's own copy first: it crosses the network, the views stay here
            try:
                iface.result.publish(job.message)
            except Exception as exc:  # noqa: BLE001 - the node-wide result still goes out
                self.get_logger().warning(f"{iface.result.topic_name}: {exc}", throttle_duration_sec=5.0)
        self.outputs.publish(job.message, result, frame, self.config, cam.stats)
        self.offer_target(result, result.id)

    @staticmethod
    def answer(job: Job) -> GroundingResult:
        """The one result message of a job the worker completed (waits for it): the published one, or, where
        none could be made, the result the worker answered with."""
        result = job.future.result()
        return job.message if job.message is not None else convert.result_to_msg(result)

    def _every_second(self) -> None:
        self._rematch_sensor_qos()
        self._command_publishers.check(self)
        self._publish_diagnostics()

    def _publish_diagnostics(self) -> None:
        """One status per camera: its frames, its commands' results, and the node's queue and model."""
        pipeline = self._pipeline
        common = [("queue_depth", self.worker.depth()),
                  ("backend", pipeline.backend.name if pipeline is not None else self.config.backend),
                  ("queue_size", self.config.queue_size), ("model_errors", self.worker.model_errors),
                  ("last_model_error", self.worker.last_model_error),
                  ("results_unpublished", self.worker.finish_errors),
                  ("frames_encoded_ahead", self.live.frames_encoded_ahead),
                  ("idle_work_errors", self.worker.idle_errors), ("last_idle_work_error", self.worker.last_idle_error)]
        if pipeline is not None:
            common += sorted(pipeline.backend.counters().items())
        self.outputs.publish_diagnostics(self.state_label, self.config.model,
                                         [(cam.name, cam.stats, cam.diagnostics() + common)
                                          for cam in list(self.cameras.values())])

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


def _stop_executor(executor: MultiThreadedExecutor, node: GroundingNode, timeout_s: float = 2.0) -> None:
    """Shut the executor down without racing its own threads.

    rclpy's MultiThreadedExecutor.shutdown destroys its guard condition before it joins the threads
    still running callbacks, and a callback finishing then triggers the destroyed guard: at exit
    Python printed "The following exception was never retrieved: cannot use Destroyable because
    destruction was requested" (with a camera streaming, nearly every Ctrl-C). So no new work
    first (the node leaves the executor), then the callbacks in flight finish and their outcomes
    are collected, then the executor shuts down.
    """
    try:
        executor.remove_node(node)
    except Exception:  # noqa: BLE001 - already removed, or an rclpy without it: shut down anyway
        pass
    in_flight = list(getattr(executor, "_futures", ()))   # MultiThreadedExecutor's handler tasks
    deadline = time.monotonic() + timeout_s
    while any(not f.done() for f in in_flight) and time.monotonic() < deadline:
        time.sleep(0.01)
    for f in in_flight:
        error = f.exception() if f.done() else None      # fetched: nothing is printed for it at exit
        if error is not None and type(error).__name__ != "InvalidHandle":
            node.get_logger().warning(f"a callback failed while shutting down: {type(error).__name__}: {error}")
    executor.shutdown()


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
    # Service and action callbacks each hold a thread while their command runs (at most queue_size + 1 at
    # once; more are answered BUSY at once): that many and spare ones for frames and commands.
    executor = MultiThreadedExecutor(num_threads=max(8, node.config.queue_size + 4))
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
        _stop_executor(executor, node)
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()


if __name__ == "__main__":
    main()

