"""The worker without ROS (ros/worker.py): cross-frame batches, idle work after commands, and
one result per job, on a real tiny pipeline."""
from __future__ import annotations

import threading
import time
from typing import Any, Dict, List

import numpy as np
import pytest

from kosmos2_ros.core.serving.config import Kosmos2Config
from kosmos2_ros.core.serving.frames import Frame
from kosmos2_ros.core.serving.pipeline import Command, Pipeline, Status
from kosmos2_ros.ros.worker import Job, Worker


@pytest.fixture(scope="module")
def pipeline(tiny_untrained_dir: Any) -> Pipeline:
    return Pipeline.load(Kosmos2Config(model=str(tiny_untrained_dir), device="cpu", allow_download=False,
                                       decoding="free"))


def frames() -> Dict[str, Frame]:
    rng = np.random.default_rng(3)
    return {cam: Frame(rgb=rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), stamp_ns=i + 1, frame_id=cam)
            for i, cam in enumerate(("front", "wrist"))}


def test_commands_about_several_cameras_share_one_batch(pipeline: Pipeline) -> None:
    store = frames()
    calls: List[int] = []
    run_frames = pipeline.run_frames

    def counting(items: Any, **kw: Any) -> Any:
        calls.append(len(items))
        return run_frames(items, **kw)

    pipeline.run_frames = counting  # type: ignore[method-assign]
    gate = threading.Event()
    idle_calls = [0]

    def idle(_stop: Any) -> Any:
        idle_calls[0] += 1
        gate.wait(10)           # holds the worker until every command is queued
        return None

    finished: List[Any] = []
    worker = Worker(lambda: pipeline, lambda cmd: store[cmd.camera], lambda job, res, f, q: finished.append(res),
                    capacity=lambda: 16, idle=idle)
    try:
        deadline = time.monotonic() + 10
        while not idle_calls[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        cmds = [Command(id=f"{cam}{k}", text=text, camera=cam, max_new_tokens=6)
                for k, (cam, text) in enumerate([("front", "a mug"), ("wrist", "a cup"), ("front", "a box")])]
        jobs = [Job(c) for c in cmds]
        for job in jobs:
            assert worker.submit(job)
        gate.set()
        results = [job.future.result(timeout=60) for job in jobs]
    finally:
        worker.stop()
        pipeline.run_frames = run_frames  # type: ignore[method-assign]
    assert calls == [2]                                  # one batch over both cameras' frames
    assert len(finished) == 3
    for cmd, res in zip(cmds, results):
        alone = pipeline.run(cmd, frames()[cmd.camera])
        assert res.status is Status.OK and res.camera == cmd.camera and res.token_ids == alone.token_ids


def test_a_frame_lookup_that_raises_while_batching_loses_no_queued_command(pipeline: Pipeline) -> None:
    """Queued commands are looked at for the running one's batch; a lookup that raises (not the expected
    FrameRejected) used to lose every queued command. Each gets exactly one answer: OK, or MODEL_ERROR
    for the one whose lookup raises in its own turn."""
    store = frames()
    gate = threading.Event()

    def resolve(cmd: Command) -> Frame:
        if cmd.camera == "broken":
            raise RuntimeError("camera map changed under the lookup")
        if cmd.id == "first":
            gate.wait(10)        # the others queue up while the first looks up its frame
        return store[cmd.camera]

    finished: List[Any] = []
    worker = Worker(lambda: pipeline, resolve, lambda job, res, f, q: finished.append(job.command.id),
                    capacity=lambda: 16)
    try:
        cmds = [Command(id="first", text="a mug", camera="front", max_new_tokens=4),
                Command(id="broken", text="a cup", camera="broken", max_new_tokens=4),
                Command(id="after", text="a box", camera="wrist", max_new_tokens=4)]
        jobs = [Job(c) for c in cmds]
        for job in jobs:
            assert worker.submit(job)
        gate.set()
        results = {job.command.id: job.future.result(timeout=60) for job in jobs}
    finally:
        worker.stop()
    assert sorted(finished) == ["after", "broken", "first"]          # exactly one answer each
    assert results["first"].status is Status.OK and results["after"].status is Status.OK
    assert results["broken"].status is Status.MODEL_ERROR and "camera map changed" in results["broken"].error


def test_idle_work_waits_for_commands_and_survives_its_errors(pipeline: Pipeline) -> None:
    store = frames()
    events: List[str] = []

    def idle(_stop: Any) -> Any:
        events.append("idle")
        if len(events) == 1:
            raise RuntimeError("idle failed once")
        time.sleep(0.01)
        return 0.05

    def finish(job: Any, res: Any, frame: Any, q: float) -> None:
        events.append(f"result {job.command.id}")

    worker = Worker(lambda: pipeline, lambda cmd: store["front"], finish, capacity=lambda: 16, idle=idle)
    try:
        time.sleep(0.6)
        jobs = [Job(Command(id=f"c{k}", text="a mug", camera="front", max_new_tokens=4)) for k in range(3)]
        for job in jobs:
            worker.submit(job)
        for job in jobs:
            job.future.result(timeout=60)
        time.sleep(0.2)
    finally:
        worker.stop()
    assert worker.idle_errors == 1 and "idle failed once" in worker.last_idle_error
    first = events.index("result c0")
    # Once the commands came, no idle work ran until every one of them was answered.
    between = events[first:events.index("result c2") + 1]
    assert "idle" not in between and events[-1] == "idle"
