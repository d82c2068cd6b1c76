"""Reliability of the grounding node as a process (overload, cameras, safe loading, shutdown), real DDS, real tiny checkpoint.

Domains 60-62. One node process (behind `node_helpers.FaultyBackend`: the real backend, plus
files that slow it down or make its next call raise) serves the load, lifecycle, fault and
camera tests; one more process checks safe loading, one more shutdown under load.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import numpy as np
import pytest
from node_helpers import FAULT_DIR_ENV, ROOT, NodeProcess, Tester, free_domain, scene

from kosmos2_ros.core.serving.pipeline import Status

DOMAIN, LOADING_DOMAIN, SHUTDOWN_DOMAIN = free_domain(), free_domain(), free_domain()
OK, BUSY, NO_FRAME, STALE, INVALID, CANCELLED, MODEL_ERROR, NOT_ACTIVE = Status   # in definition order
QUEUE = 4
HELPER = str(ROOT / "test" / "node_helpers.py")

pytestmark = pytest.mark.timeout(120)

_stamp = [1_700_100_000_000_000_000]


def next_stamp() -> int:
    _stamp[0] += 10_000_000
    return _stamp[0]


class Control:
    """The FaultyBackend's control folder: slow it down, or make its next call raise."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def delay(self, seconds: float) -> None:
        (self.path / "delay").write_text(str(seconds))

    def fault(self, spec: str) -> None:
        (self.path / "fault").write_text(spec)

    def fault_pending(self) -> bool:
        return (self.path / "fault").exists()

    def reset(self) -> None:
        for name in ("delay", "fault"):
            (self.path / name).unlink(missing_ok=True)


def start(params: Dict[str, Any], domain: int, tmp: Path) -> tuple:
    control = Control(tmp)
    proc = NodeProcess(params, domain, tmp / "node.log", script=HELPER, env={FAULT_DIR_ENV: str(tmp)})
    tester = Tester(domain)
    return proc, tester, control


@pytest.fixture(scope="module")
def node(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    tmp = tmp_path_factory.mktemp("reliable_node")
    proc, tester, control = start({"model": str(tiny_model_dir), "queue_size": QUEUE, "max_new_tokens": 24,
                                   "max_frame_age_s": 0}, DOMAIN, tmp)
    try:
        tester.subscribe_debug()
        tester.wait_active(proc=proc)
        yield proc, tester, control
    finally:
        tester.close()
        code = proc.stop()
        assert code == 0, f"node exited with {code}:\n{proc.log()}"


@pytest.fixture(autouse=True)
def _reset(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "node" in request.fixturenames:
        request.getfixturevalue("node")[2].reset()


def fresh_frame(t: Tester, frame_id: str = "camera_optical", width: int = 64, height: int = 48,
                seed: int = 0) -> int:
    """Publish a frame until the node has it (a probe naming its stamp succeeds)."""
    stamp = next_stamp()
    rgb = scene(width, height, seed)
    deadline = time.monotonic() + 20
    while True:
        t.publish_frame(rgb, stamp, frame_id)
        res = t.wait_frame(stamp, timeout=2.0) if time.monotonic() < deadline else None
        if res is not None and res.status == OK:
            return stamp
        assert time.monotonic() < deadline, f"frame never arrived: {res}"


def wait_results(t: Tester, ids: List[str], timeout: float = 30.0) -> Dict[str, Any]:
    got = {i: t.wait_result(i, timeout) for i in ids}
    time.sleep(0.5)   # a duplicate, if any, would arrive by now
    for i in ids:
        assert len(t.results[i]) == 1, f"{i} answered {len(t.results[i])} times"
    return got


def wait_busy_start(t: Tester, cmd_id: str, control: Control) -> None:
    """Start a long command (slowed backend) and return once it is running."""
    control.delay(0.05)
    t.command_pub.publish(t.command(cmd_id, "caption", max_new_tokens=60))   # ~3 s at 50 ms a token
    time.sleep(0.4)
    assert cmd_id not in t.results, "the long command finished too early"


def latest_diagnostics(t: Tester, after: float, timeout: float = 5.0) -> Dict[str, str]:
    count = len(t.diagnostics)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(t.diagnostics) > count and time.monotonic() > after:
            return {kv.key: kv.value for kv in t.diagnostics[-1].status[0].values}
        time.sleep(0.05)
    raise TimeoutError("no diagnostics")


# -- 1. exactly one result per command, on every interface; a bounded queue -------------------
def test_every_interface_gets_exactly_one_result_and_the_queue_is_bounded(node: tuple) -> None:
    from action_msgs.msg import GoalStatus
    from std_msgs.msg import String

    from kosmos2_ros.action import GroundTask
    from kosmos2_ros.srv import Ground

    _, t, control = node
    fresh_frame(t)
    assert t.ground_client.wait_for_service(timeout_sec=10) and t.action_client.wait_for_server(timeout_sec=10)
    before = set(t.results)
    wait_busy_start(t, "long", control)
    topic_ids = [f"burst-{i}" for i in range(16)]
    for i in topic_ids:
        t.command_pub.publish(t.command(i, "refer", "the red box"))
    for _ in range(4):
        t.refer_pub.publish(String(data="the red box"))
    services = [t.ground_client.call_async(Ground.Request(command=t.command(f"svc-{i}", "caption")))
                for i in range(3)]
    goals = [t.action_client.send_goal_async(GroundTask.Goal(command=t.command(f"goal-{i}", "caption")))
             for i in range(2)]
    time.sleep(0.3)
    control.delay(0)    # let the long one and the queued ones finish
    ids = ["long"] + topic_ids + [f"svc-{i}" for i in range(3)] + [f"goal-{i}" for i in range(2)]
    got = wait_results(t, ids)
    replies = [t.wait_for(f, 30).result for f in services]
    for reply, i in zip(replies, range(3)):
        assert reply.id == f"svc-{i}" and reply.status == got[f"svc-{i}"].status
    for f in goals:
        handle = t.wait_for(f, 10)
        assert handle.accepted
        outcome = t.wait_for(handle.get_result_async(), 30)
        res = outcome.result.result
        assert res.status == got[res.id].status
        assert outcome.status == (GoalStatus.STATUS_SUCCEEDED if res.status == OK else GoalStatus.STATUS_ABORTED)
    deadline = time.monotonic() + 10
    refer_ids: List[str] = []
    while len(refer_ids) < 4 and time.monotonic() < deadline:
        refer_ids = [i for i in set(t.results) - before if i.startswith("kosmos2-")]
        time.sleep(0.05)
    assert len(refer_ids) == 4 and all(len(t.results[i]) == 1 for i in refer_ids)
    statuses = [r.status for r in got.values()] + [t.results[i][0].status for i in refer_ids]
    assert set(statuses) <= {OK, BUSY}
    # 26 commands while one ran and at most QUEUE waited: the rest were BUSY, answered at once.
    assert statuses.count(BUSY) >= len(statuses) - 1 - QUEUE - 2
    assert 1 <= statuses.count(OK) <= 1 + QUEUE + 2
    busy = [r for r in got.values() if r.status == BUSY]
    assert all("queue_size" in r.error and r.total_ms < 500 for r in busy)
    assert got["long"].status == OK


def test_a_result_whose_publishing_raises_still_answers_the_service_and_the_action(node: tuple) -> None:
    """The service and the action answer from the result's message, made before it is published: a
    publisher that raises (counted in diagnostics) used to leave them reading None."""
    from kosmos2_ros.action import GroundTask
    from kosmos2_ros.srv import Ground

    _, t, control = node
    fresh_frame(t)
    assert t.ground_client.wait_for_service(timeout_sec=10) and t.action_client.wait_for_server(timeout_sec=10)
    t_fail = time.monotonic()
    control.fault("runtime publish")
    reply = t.wait_for(t.ground_client.call_async(Ground.Request(command=t.command("svc-unpublished", "caption"))),
                       30).result
    assert reply.id == "svc-unpublished" and reply.status == OK, reply.error
    assert not control.fault_pending()
    control.fault("runtime publish")
    handle = t.wait_for(t.action_client.send_goal_async(GroundTask.Goal(command=t.command("goal-unpublished",
                                                                                          "caption"))), 10)
    outcome = t.wait_for(handle.get_result_async(), 30).result.result
    assert outcome.id == "goal-unpublished" and outcome.status == OK, outcome.error
    assert "svc-unpublished" not in t.results and "goal-unpublished" not in t.results   # never reached ~/result
    diag = latest_diagnostics(t, t_fail)
    assert int(diag["results_unpublished"]) >= 2


# -- 2. lifecycle transitions under load -------------------------------------------------------
def test_deactivate_and_cleanup_under_load_answer_everything_then_reactivate(node: tuple) -> None:
    from kosmos2_ros.srv import Ground

    proc, t, control = node
    fresh_frame(t)
    wait_busy_start(t, "running", control)
    queued = [f"queued-{i}" for i in range(QUEUE)]
    for i in queued:
        t.command_pub.publish(t.command(i, "refer", "the red box"))
    service = t.ground_client.call_async(Ground.Request(command=t.command("svc-waiting", "caption")))
    time.sleep(0.3)
    t0 = time.monotonic()
    assert t.change_state("deactivate")
    try:
        _deactivated_under_load(proc, t, control, queued, service, t0)
    finally:
        control.reset()
        if t.state() == "inactive":
            t.change_state("activate")
        elif t.state() == "unconfigured":
            t.change_state("configure") and t.change_state("activate")


def _deactivated_under_load(proc: NodeProcess, t: Tester, control: Control, queued: List[str], service: Any,
                            t0: float) -> None:
    assert time.monotonic() - t0 < 5.0
    got = wait_results(t, ["running", *queued, "svc-waiting"])
    assert got["running"].status == CANCELLED and "deactivated" in got["running"].error
    assert got["running"].header.frame_id == "camera_optical"
    # Queued ones are NOT_ACTIVE (one may have found the queue full: BUSY, answered at once).
    assert [got[i].status for i in queued].count(NOT_ACTIVE) >= QUEUE - 1
    for i in queued:
        assert got[i].status == BUSY or (got[i].status == NOT_ACTIVE and "deactivated" in got[i].error)
    assert got["svc-waiting"].status in (NOT_ACTIVE, BUSY)
    assert t.wait_for(service, 10).result.status == got["svc-waiting"].status
    assert t.run(t.command("while-inactive", "refer", "the red box")).status == NOT_ACTIVE

    assert t.change_state("cleanup") and t.state() == "unconfigured"
    deadline = time.monotonic() + 5
    while "model released" not in proc.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "model released" in proc.log()
    res = t.run(t.command("while-unconfigured", "refer", "the red box"))
    assert res.status == NOT_ACTIVE and "unconfigured" in res.error

    control.reset()
    assert t.change_state("configure") and t.change_state("activate") and t.state() == "active"
    fresh_frame(t, "after_reactivate")
    res = t.run(t.command("after-reactivate", "refer", "the red box"))
    assert res.status == OK and res.header.frame_id == "after_reactivate"
    assert proc.alive()


# -- 3. backend failures mid-command -----------------------------------------------------------
@pytest.mark.parametrize("spec,words", [
    ("memory decode", "MemoryError"),
    ("cuda_oom decode", "CUDA out of memory"),
    ("runtime prefill", "simulated backend failure"),
    ("value encode", "another version"),
    ("key decode", "KeyError"),
])
def test_backend_failure_is_a_model_error_and_the_next_command_runs(node: tuple, spec: str, words: str) -> None:
    proc, t, control = node
    # A frame nobody has encoded yet, so an `encode` fault fires on this command.
    stamp = next_stamp()
    control.fault(spec)
    t.publish_frame(scene(64, 48, 7), stamp, "fault_cam")
    deadline = time.monotonic() + 20
    n = 0
    while True:
        n += 1
        res = t.run(t.command(f"fault-{spec}-{n}", "refer", "the red box", stamp_ns=stamp))
        if res.status != NO_FRAME or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert res.status == MODEL_ERROR and words in res.error, (res.status, res.error)
    assert res.header.frame_id == "fault_cam"
    assert not control.fault_pending()
    t_fail = time.monotonic()
    ok = t.run(t.command(f"after-fault-{spec}", "refer", "the red box", stamp_ns=stamp))
    assert ok.status == OK, ok.error
    diag = latest_diagnostics(t, t_fail)
    assert words in diag["last_model_error"] and int(diag["model_errors"]) >= 1
    assert int(diag["commands_model_error"]) >= 1
    assert "model error" in proc.log()


def test_failure_in_a_batch_answers_every_command_of_it(node: tuple) -> None:
    _, t, control = node
    stamp = fresh_frame(t)
    wait_busy_start(t, "batch-blocker", control)
    ids = [f"batched-{i}" for i in range(3)]
    for i in ids:
        t.command_pub.publish(t.command(i, "refer", "the red box", stamp_ns=stamp))
    time.sleep(0.3)
    control.fault("cuda_oom decode 2")     # fires only on a decode of >= 2 rows: the batch
    control.delay(0)
    got = wait_results(t, ["batch-blocker", *ids])
    assert got["batch-blocker"].status == OK
    assert [got[i].status for i in ids] == [MODEL_ERROR] * 3
    assert all("CUDA out of memory" in got[i].error for i in ids)
    assert t.run(t.command("after-batch-fault", "refer", "the red box")).status == OK


# -- 5. camera faults ---------------------------------------------------------------------------
def test_camera_stops_restarts_resizes_and_renames(node: tuple) -> None:
    _, t, _ = node
    # Ages generous enough for a loaded 2-core CI machine; the stale check only needs age > limit.
    assert all(r.successful for r in t.set_parameters({"max_frame_age_s": 2.0}))
    try:
        fresh_frame(t, "cam_a")
        assert t.run(t.command("cam-ok", "refer", "the red box")).status == OK
        time.sleep(2.5)                                       # the camera stops
        stale = t.run(t.command("cam-stale", "refer", "the red box"))
        assert stale.status == STALE and "max_frame_age_s" in stale.error and stale.header.frame_id == "cam_a"
        stamp = fresh_frame(t, "cam_a")                       # it restarts
        res = t.run(t.command("cam-restarted", "refer", "the red box"))
        assert res.status == OK and res.header.stamp.sec * 10**9 + res.header.stamp.nanosec == stamp
        assert all(r.successful for r in t.set_parameters({"max_frame_age_s": 0.0}))

        stamp = fresh_frame(t, "cam_hd", width=160, height=120, seed=2)   # a new resolution
        for cmd in (t.command("hd-refer", "refer", "the red box", decoding="constrained"),
                    t.command("hd-region", "region", region=(100, 70, 150, 115))):
            res = t.run(cmd)
            assert res.status == OK, res.error
            assert (res.image_width, res.image_height) == (160, 120) and res.header.frame_id == "cam_hd"
            assert res.objects
            for o in res.objects:
                assert 0 <= o.box.x_min <= o.box.x_max <= 160 and 0 <= o.box.y_min <= o.box.y_max <= 120
        region = res.objects[0].box
        assert region.x_min > 64, "the region is mapped with the new size, not the old one"

        fresh_frame(t, "cam_b", width=64, height=48)             # back, under another frame_id
        res = t.run(t.command("cam-b", "caption"))
        assert res.status == OK and res.header.frame_id == "cam_b" and (res.image_width, res.image_height) == (64, 48)
    finally:
        assert all(r.successful for r in t.set_parameters({"max_frame_age_s": 0.0}))


# -- 4. safe loading, and a truncated ONNX graph -------------------------------------------------
def _pickle_checkpoint(src: Path, out: Path) -> Path:
    """The tiny checkpoint with its weights as torch pickle (pytorch_model.bin) and no safetensors."""
    import torch
    from transformers import Kosmos2ForConditionalGeneration

    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors"))
    model = Kosmos2ForConditionalGeneration.from_pretrained(src)
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    return out


def _log_after(proc: NodeProcess, mark: int, words: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while words not in proc.log()[mark:] and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc.log()[mark:]


def test_loading_refuses_pickle_remote_code_and_broken_graphs(tiny_model_dir: Path, tmp_path: Path) -> None:
    from kosmos2_ros.core.backends.onnx import export

    pickled = _pickle_checkpoint(tiny_model_dir, tmp_path / "pickled")
    remote = tmp_path / "remote_code"
    shutil.copytree(tiny_model_dir, remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(cfg))
    artifacts = tmp_path / "artifacts"
    graph_dir, manifest = export.ensure_exported(str(tiny_model_dir), str(artifacts))
    decoder = graph_dir / manifest["files"]["decoder"]
    decoder.write_bytes(decoder.read_bytes()[: decoder.stat().st_size // 3])     # truncated on disk

    proc, t, _ = start({"model": str(pickled), "max_new_tokens": 8, "max_frame_age_s": 0}, LOADING_DOMAIN,
                       tmp_path)
    try:
        log = _log_after(proc, 0, "autostart: configure failed")
        assert "cannot load model" in log and "pickle" in log and "allow_pickle_weights" in log, log
        assert t.state() == "unconfigured"
        while t.command_pub.get_subscription_count() == 0:
            time.sleep(0.05)
        assert t.run(t.command("pickle-refused", "refer", "a dog"), 10).status == NOT_ACTIVE

        mark = len(proc.log())
        assert all(r.successful for r in t.set_parameters({"model": str(remote)}))
        assert not t.change_state("configure")
        log = _log_after(proc, mark, "remote code")
        assert "cannot load model" in log and "remote code" in log and "trust_remote_code" in log, log

        mark = len(proc.log())
        assert all(r.successful for r in t.set_parameters(
            {"model": str(tiny_model_dir), "backend": "onnxruntime", "artifacts_dir": str(artifacts)}))
        assert not t.change_state("configure")
        log = _log_after(proc, mark, "cannot load model")
        assert "cannot load model" in log and "onnxruntime" in log, log
        assert t.state() == "unconfigured" and proc.alive()

        assert all(r.successful for r in t.set_parameters(
            {"model": str(pickled), "backend": "torch", "allow_pickle_weights": True}))
        assert t.change_state("configure") and t.change_state("activate")
        fresh_frame(t, "pickle_ok")
        res = t.run(t.command("pickle-allowed", "refer", "the red box"))
        assert res.status == OK and res.header.frame_id == "pickle_ok"
    finally:
        t.close()
        proc.stop()


# -- 2b. shutdown under load -----------------------------------------------------------------
def test_shutdown_under_load_answers_pending_commands(tiny_model_dir: Path, tmp_path: Path) -> None:
    from kosmos2_ros.srv import Ground

    proc, t, control = start({"model": str(tiny_model_dir), "queue_size": QUEUE, "max_new_tokens": 24,
                              "max_frame_age_s": 0}, SHUTDOWN_DOMAIN, tmp_path)
    try:
        t.wait_active(proc=proc)
        fresh_frame(t)
        assert t.ground_client.wait_for_service(timeout_sec=10)
        wait_busy_start(t, "running", control)
        queued = [f"queued-{i}" for i in range(QUEUE - 1)]
        for i in queued:
            t.command_pub.publish(t.command(i, "refer", "the red box"))
        service = t.ground_client.call_async(Ground.Request(command=t.command("svc-pending", "caption")))
        time.sleep(0.4)
        assert "running" not in t.results
        code = proc.stop()          # SIGINT
        assert code == 0, proc.log()
        got = wait_results(t, ["running", *queued, "svc-pending"], timeout=10)
        assert got["running"].status == CANCELLED and "shutting down" in got["running"].error
        assert all(got[i].status == NOT_ACTIVE for i in queued)
        assert got["svc-pending"].status == NOT_ACTIVE
        assert t.wait_for(service, 10).result.status == NOT_ACTIVE
    finally:
        t.close()
        proc.stop()


def test_fault_helper_runs_the_real_checkpoint() -> None:
    """FaultyBackend is plumbing only: with no control file it returns the real backend's output."""
    from node_helpers import FaultyBackend

    class Inner:
        def decode_batch(self, caches: Any, token_ids: Any) -> Any:
            return np.ones((len(token_ids), 5), np.float32), caches

    with tempfile.TemporaryDirectory() as d:
        fb = FaultyBackend(Inner(), eos=2, control=Path(d))
        logits, _ = fb.decode_batch([None, None], [1, 2])
        assert logits.shape == (2, 5) and logits[0, 2] == 1.0
        (Path(d) / "fault").write_text("memory decode 3")
        fb.decode_batch([None, None], [1, 2])                # two rows: not this one
        with pytest.raises(MemoryError):
            fb.decode_batch([None] * 3, [1, 2, 3])
        assert not (Path(d) / "fault").exists()
