"""The command queue and the one thread that runs inference.

ROS callbacks only enqueue (or answer BUSY at once) and never wait on the model, so camera
callbacks keep the newest frame fresh however slow generation is. Free of rclpy: the node
hands in how to find a frame and what to do with each result.

The guarantee: every job handed to `submit` (or `complete`) gets exactly one `finish` call.
Queued jobs are answered by `drain`; the running one is stopped by `abort` (CANCELLED) and any
exception out of the model, whatever its type, answers every job of the batch (MODEL_ERROR).
"""
from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, List, Optional

from kosmos2_ros.core.frames import Frame
from kosmos2_ros.core.pipeline import Command, Pipeline, Result, Status


@dataclass
class Job:
    command: Command
    on_token: Optional[Callable] = None          # pipeline on_token (action feedback)
    should_stop: Optional[Callable[[], bool]] = None
    enqueued: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)
    message: Any = None                           # the published result message, set before `future`
    claimed: bool = False                         # set (under the worker's lock) by the one `complete`

    @property
    def batchable(self) -> bool:
        """Plain topic commands may share a batch; jobs with feedback or cancel run alone."""
        return self.on_token is None and self.should_stop is None


class FrameRejected(Exception):
    """The command cannot run: `result` already says why (no frame, stale, bad image)."""

    def __init__(self, result: Result) -> None:
        super().__init__(result.error)
        self.result = result


# resolve(command) -> Frame or raise FrameRejected; finish(job, result, frame, queue_ms) publishes.
Resolve = Callable[[Command], Frame]
Finish = Callable[[Job, Result, Optional[Frame], float], None]


class Worker:
    """A bounded queue of commands and a thread running them through the pipeline."""

    def __init__(self, get_pipeline: Callable[[], Optional[Pipeline]], resolve: Resolve, finish: Finish,
                 capacity: Callable[[], int], max_batch: int = 8) -> None:
        self._get_pipeline = get_pipeline
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
        while True:
            with self._cv:
                while self._running and not self._queue:
                    self._cv.wait()
                if not self._running:
                    return
                job = self._queue.popleft()
                self.busy = True
            try:
                self._run(job)
            except Exception as exc:  # noqa: BLE001 - a command must never kill the worker
                self.complete(job, self._model_error(job.command, exc), None)
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
        try:
            frame = self._resolve(job.command)
        except FrameRejected as rej:
            self.complete(job, rej.result, None)
            return
        batch = [job] + (self._take_same_frame(frame) if job.batchable else [])
        raised = False
        try:
            if len(batch) == 1:
                results = [pipeline.run(job.command, frame, on_token=job.on_token, should_stop=self._stopper(job))]
            else:
                results = pipeline.run_batch([j.command for j in batch], frame, should_stop=self._stopper(None))
        except Exception as exc:  # noqa: BLE001 - whatever the backend raised, answer the whole batch
            failure = self._model_error(job.command, exc)
            raised = True
            results = [Result.failure(j.command, Status.MODEL_ERROR, failure.error, frame) for j in batch]
        errors = [res.error for res in results if res.status is Status.MODEL_ERROR]
        if errors and not raised:   # the pipeline caught it itself
            self.model_errors += 1
            self.last_model_error = errors[0][:500]
        for j, res in zip(batch, results):
            self.complete(j, self._cancelled(res), frame)

    def _take_same_frame(self, frame: Frame) -> List[Job]:
        """Queued plain commands about the same frame, removed from the queue to share its batch."""
        taken: List[Job] = []
        with self._cv:
            keep: Deque[Job] = collections.deque()
            while self._queue:
                other = self._queue.popleft()
                if len(taken) + 1 < self.max_batch and other.batchable and self._same_frame(other.command, frame):
                    taken.append(other)
                else:
                    keep.append(other)
            self._queue.extend(keep)
        return taken

    def _same_frame(self, command: Command, frame: Frame) -> bool:
        try:
            return self._resolve(command) is frame
        except FrameRejected:
            return False

