"""The command queue and the one thread that runs inference.

ROS callbacks only enqueue (or answer BUSY at once) and never wait on the model, so camera
callbacks keep the newest frame fresh however slow generation is. Free of rclpy: the node
hands in how to find a frame and what to do with each result.

The guarantee: every job handed to `submit` (or `complete`) gets exactly one `finish` call.
Queued jobs are answered by `drain`; the running one is stopped by `abort` (CANCELLED) and any
exception out of the model, whatever its type, answers every job of the batch (MODEL_ERROR).

Plain commands waiting together are served as one batch, also when they are about different
frames (several cameras): `Pipeline.run_frames`. When no command waits, the thread does the
node's idle work (`idle`: standing queries, encoding ahead), one frame at a time, so a command
never waits behind more than one frame's worth of it.
"""
from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, List, Optional, Tuple

from kosmos2_ros.core.serving.frames import Frame
from kosmos2_ros.core.serving.pipeline import Command, Pipeline, Result, Status


@dataclass
class Job:
    command: Command
    on_token: Optional[Callable] = None          # pipeline on_token (action feedback)
    on_candidates: Optional[Callable] = None     # pipeline on_candidates (action feedback)
    should_stop: Optional[Callable[[], bool]] = None
    enqueued: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)
    message: Any = None                           # the published result message, set before `future`
    claimed: bool = False                         # set (under the worker's lock) by the one `complete`

    @property
    def batchable(self) -> bool:
        """Plain topic commands may share a batch; jobs with feedback or cancel run alone."""
        return self.on_token is None and self.should_stop is None and self.on_candidates is None


class FrameRejected(Exception):
    """The command cannot run: `result` already says why (no frame, stale, bad image)."""

    def __init__(self, result: Result) -> None:
        super().__init__(result.error)
        self.result = result


# resolve(command) -> Frame or raise FrameRejected; finish(job, result, frame, queue_ms) publishes.
Resolve = Callable[[Command], Frame]
Finish = Callable[[Job, Result, Optional[Frame], float], None]
# idle(should_stop) -> seconds until it has work again (None: until `poke`); runs on the worker thread.
Idle = Callable[[Callable[[], bool]], Optional[float]]
#: The longest the worker sleeps between looks at idle work, whatever `idle` said.
IDLE_WAIT_MAX_S = 0.5


class Worker:
    """A bounded queue of commands and a thread running them through the pipeline."""

    def __init__(self, get_pipeline: Callable[[], Optional[Pipeline]], resolve: Resolve, finish: Finish,
                 capacity: Callable[[], int], max_batch: int = 8, idle: Optional[Idle] = None) -> None:
        self._get_pipeline = get_pipeline
        self._idle = idle
        self._resolve = resolve
        self._finish = finish
        self._capacity = capacity
        self.max_batch = max_batch
        self._queue: Deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._claim_lock = threading.Lock()
        self._running = True
        self._abort_reason = ""                   # non-empty: the running command stops (CANCELLED)
        self.busy = False
        self.model_errors = 0
        self.last_model_error = ""
        self.finish_errors = 0                    # results that could not be published
        self.last_finish_error = ""
        self.idle_errors = 0                      # idle work (standing queries, encoding ahead) that failed
        self.last_idle_error = ""
        self._thread = threading.Thread(target=self._loop, name="kosmos2-worker", daemon=True)
        self._thread.start()

    def depth(self) -> int:
        with self._cv:
            return len(self._queue)

    def submit(self, job: Job) -> bool:
        """Queue a job; False (and nothing queued) when the queue is full."""
        with self._cv:
            if not self._running or len(self._queue) >= max(1, self._capacity()):
                return False
            self._queue.append(job)
            self._cv.notify()
            return True

    def drain(self, status: Status, error: str) -> None:
        """Answer every queued job with `status` (deactivation, shutdown)."""
        with self._cv:
            jobs = list(self._queue)
            self._queue.clear()
        for job in jobs:
            self.complete(job, Result.failure(job.command, status, error), None)

    def poke(self) -> None:
        """Wake the thread to look at its idle work (a new frame arrived, queries changed)."""
        with self._cv:
            self._cv.notify()

    def abort(self, reason: str) -> None:
        """Stop the running command at its next token (CANCELLED, `reason`); until `resume`."""
        self._abort_reason = reason

    def resume(self) -> None:
        self._abort_reason = ""

    def wait_idle(self, timeout: float) -> bool:
        """Until no command runs (True), or `timeout` seconds passed (False)."""
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self.busy

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down: queued jobs get NOT_ACTIVE, the running one CANCELLED, then the thread ends."""
        with self._cv:
            self._running = False
            self._cv.notify_all()
        self.abort("node shutting down")
        self.drain(Status.NOT_ACTIVE, "node shutting down")
        self._thread.join(timeout=timeout)
        self.drain(Status.NOT_ACTIVE, "node shutting down")   # anything submitted during the join

    # -- the thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        wait: Optional[float] = 0.0 if self._idle is not None else None
        while True:
            with self._cv:
                if self._running and not self._queue and wait != 0.0:
                    self._cv.wait(None if self._idle is None else min(wait or IDLE_WAIT_MAX_S, IDLE_WAIT_MAX_S))
                if not self._running:
                    return
                job = self._queue.popleft() if self._queue else None
                self.busy = True
            try:
                if job is not None:
                    self._run(job)
                    wait = 0.0
                elif self._idle is not None and not self._abort_reason:
                    wait = self._idle(self._stopper(None))
                else:
                    wait = None
            except Exception as exc:  # noqa: BLE001 - a command (or idle work) must never kill the worker
                if job is not None:
                    self.complete(job, self._model_error(job.command, exc), None)
                else:
                    self.idle_errors += 1
                    self.last_idle_error = f"{type(exc).__name__}: {exc}"[:500]
                    wait = IDLE_WAIT_MAX_S
            finally:
                self.busy = False

    def complete(self, job: Job, result: Result, frame: Optional[Frame]) -> None:
        """Answer `job` with `result` unless it was answered already (exactly once)."""
        with self._claim_lock:
            if job.claimed:
                return
            job.claimed = True
        queue_ms = (time.monotonic() - job.enqueued) * 1e3 - result.timings_ms.get("total", 0.0)
        try:
            self._finish(job, result, frame, max(0.0, queue_ms))
        except Exception as exc:  # noqa: BLE001 - e.g. publishing after the context shut down
            self.finish_errors += 1
            self.last_finish_error = f"{type(exc).__name__}: {exc}"
        finally:
            job.future.set_result(result)

    def _model_error(self, command: Command, exc: Exception) -> Result:
        self.model_errors += 1
        self.last_model_error = f"{type(exc).__name__}: {exc}"[:500]
        return Result.failure(command, Status.MODEL_ERROR, self.last_model_error)

    def _stopper(self, job: Optional[Job]) -> Callable[[], bool]:
        """should_stop for the pipeline: the job's own (action cancel) or the worker's abort."""
        own = job.should_stop if job is not None else None
        return lambda: bool(self._abort_reason) or (own is not None and bool(own()))

    def _cancelled(self, result: Result) -> Result:
        if result.status is Status.CANCELLED and self._abort_reason:
            result.error = f"cancelled: {self._abort_reason}"
        return result

    def _run(self, job: Job) -> None:
        if job.should_stop is not None and job.should_stop():
            self.complete(job, Result.failure(job.command, Status.CANCELLED, "cancelled before it started"), None)
            return
        pipeline = self._get_pipeline()
        if pipeline is None:
            self.complete(job, Result.failure(job.command, Status.NOT_ACTIVE, "node is not active"), None)
            return
        problem = pipeline.check_command(job.command)   # the command first: a bad one is INVALID, whatever the camera
        if problem is not None:
            self.complete(job, Result.failure(job.command, Status.INVALID, problem), None)
            return
        try:
            frame = self._resolve(job.command)
        except FrameRejected as rej:
            self.complete(job, rej.result, None)
            return
        batch = [(job, frame)] + (self._take_batchable() if job.batchable else [])
        frames: List[Frame] = []
        for _, f in batch:
            if all(f is not seen for seen in frames):
                frames.append(f)
        raised = False
        try:
            if len(batch) == 1:
                results = [pipeline.run(job.command, frame, on_token=job.on_token, should_stop=self._stopper(job),
                                        on_candidates=job.on_candidates)]
            elif len(frames) == 1:
                results = pipeline.run_batch([j.command for j, _ in batch], frame, should_stop=self._stopper(None))
            else:
                per_frame = pipeline.run_frames([(f, [j.command for j, g in batch if g is f]) for f in frames],
                                                should_stop=self._stopper(None))
                cursor = {id(f): iter(res) for f, res in zip(frames, per_frame)}
                results = [next(cursor[id(f)]) for _, f in batch]
        except Exception as exc:  # noqa: BLE001 - whatever the backend raised, answer the whole batch
            failure = self._model_error(job.command, exc)
            raised = True
            results = [Result.failure(j.command, Status.MODEL_ERROR, failure.error, f) for j, f in batch]
        errors = [res.error for res in results if res.status is Status.MODEL_ERROR]
        if errors and not raised:   # the pipeline caught it itself
            self.model_errors += 1
            self.last_model_error = errors[0][:500]
        for (j, f), res in zip(batch, results):
            self.complete(j, self._cancelled(res), f)

    def _take_batchable(self) -> List[Tuple[Job, Frame]]:
        """Queued plain commands with a frame to run on (any camera's), removed to share the batch.

        Commands about one frame share its encoding and prompt head; commands about other frames
        join the same decode batch (`Pipeline.run_frames`). A command whose frame is unavailable
        stays queued and is answered in its turn (so does one whose frame lookup raised: its own turn
        answers it). Jobs leave the queue only once their frames are in hand, so nothing raised here
        can lose a queued command.
        """
        # Frames are looked up outside the lock: a compressed frame is decoded then (milliseconds), and
        # submit() and poke() from the executor's threads must not wait for that.
        with self._cv:
            waiting = [other for other in self._queue if other.batchable][:max(0, self.max_batch - 1)]
        found = [(other, self._frame_of(other)) for other in waiting]
        taken: List[Tuple[Job, Frame]] = []
        with self._cv:
            for other, frame in found:
                # still queued (a drain meanwhile answered the others)
                if frame is not None and any(q is other for q in self._queue):
                    taken.append((other, frame))
            chosen = {id(other) for other, _ in taken}
            self._queue = collections.deque(q for q in self._queue if id(q) not in chosen)
        return taken

    def _frame_of(self, job: Job) -> Optional[Frame]:
        try:
            return self._resolve(job.command)
        except Exception:  # noqa: BLE001 - FrameRejected, or a lookup that broke: the job waits for its turn
            return None

