"""Is it there, and which one, through the node: a real node process over loopback DDS, the tiny
checkpoint. Results carry presence, candidates and the ambiguity flag with the parameters'
defaults and the command's overrides; descriptions of an ambiguous result's boxes when asked; the
action reports the candidates before its result; standing queries carry them too."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from node_helpers import free_domain, running_node

from kosmos2_ros.fixtures.scenes import draw_scene

OK = 0
pytestmark = pytest.mark.timeout(180)
_stamp = [1_900_000_000_000_000_000]


@pytest.fixture(scope="module")
def node(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    log = tmp_path_factory.mktemp("candidates_node") / "node.log"
    with running_node({"model": str(tiny_model_dir), "max_frame_age_s": 0, "max_new_tokens": 16,
                       "ambiguity_ratio": 0.0, "queries": ["a red square"], "query_rate_hz": 20.0},
                      free_domain(), log) as running:
        yield running


def fresh(t) -> int:
    _stamp[0] += 1_000_000_000
    rgb, _ = draw_scene(320, 240, np.random.default_rng(_stamp[0] % 97), count=3)
    t.publish_frame(rgb, _stamp[0])
    assert t.wait_frame(_stamp[0]).status == OK
    return _stamp[0]


def test_refer_results_carry_presence_and_candidates(node: tuple) -> None:
    _, t = node
    stamp = fresh(t)
    res = t.run(t.command("cand-default", "refer", "a red square", stamp_ns=stamp))
    assert res.status == OK, res.error
    assert 0.0 < res.presence <= 1.0 and res.not_found_reason == ""
    assert 1 <= len(res.candidates) <= 3                       # the parameter's default, 3
    assert res.ambiguous and res.ambiguity == pytest.approx(res.candidates[0].score / res.objects[0].score, rel=1e-5)
    for cand in res.candidates:
        assert cand.phrase == "a red square" and 0.0 <= cand.score <= 1.0 and cand.box.x_max > cand.box.x_min
    one = t.command("cand-one", "refer", "a red square", stamp_ns=stamp)
    one.max_candidates = 1
    res1 = t.run(one)
    assert len(res1.candidates) == 1 and res1.objects[0].box == res.objects[0].box
    off = t.command("cand-off", "refer", "a red square", stamp_ns=stamp)
    off.max_candidates = 0
    res0 = t.run(off)
    assert res0.candidates == [] and not res0.ambiguous and list(res0.token_ids) == list(res.token_ids)
    bad = t.command("cand-bad", "refer", "a red square", stamp_ns=stamp)
    bad.max_candidates = 99
    assert t.run(bad).status == 4                              # INVALID, with the range in the error
    caption = t.run(t.command("cand-caption", "caption", stamp_ns=stamp))
    assert caption.presence == -1.0 and caption.candidates == []


def test_descriptions_when_asked(node: tuple) -> None:
    _, t = node
    stamp = fresh(t)
    cmd = t.command("cand-describe", "refer", "a blue square", stamp_ns=stamp)
    cmd.describe_candidates = 1
    res = t.run(cmd)
    assert res.status == OK and res.ambiguous
    assert all(o.description for o in list(res.objects[:1]) + list(res.candidates))
    plain = t.run(t.command("cand-plain", "refer", "a blue square", stamp_ns=stamp))
    assert all(not o.description for o in list(plain.objects) + list(plain.candidates))   # off by default


def test_the_action_reports_candidates_before_its_result(node: tuple) -> None:
    from kosmos2_ros.action import GroundTask

    _, t = node
    stamp = fresh(t)
    assert t.action_client.wait_for_server(timeout_sec=10)
    feedback, when = [], {}
    goal = GroundTask.Goal(command=t.command("cand-act", "refer", "a green square", stamp_ns=stamp))
    goal.command.describe_candidates = 1

    def on_feedback(fb) -> None:
        if fb.feedback.candidates and "first" not in when:
            when["first"] = time.monotonic()
        feedback.append(fb.feedback)

    handle = t.wait_for(t.action_client.send_goal_async(goal, feedback_callback=on_feedback))
    result = t.wait_for(handle.get_result_async()).result.result
    when["result"] = time.monotonic()
    with_candidates = [fb for fb in feedback if fb.candidates]
    assert with_candidates and when["first"] <= when["result"]
    assert [c.box for c in with_candidates[0].candidates] == [c.box for c in result.candidates]
    assert all(not c.description for c in with_candidates[0].candidates)   # reported before they were described
    assert all(c.description for c in result.candidates)


def test_standing_queries_carry_presence_and_candidates(node: tuple) -> None:
    from kosmos2_ros.msg import Tracks

    _, t = node
    got = []
    t.node.create_subscription(Tracks, "/kosmos2/tracks", got.append, 10)
    stamp = fresh(t)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(m.header.stamp.sec * 10**9 + m.header.stamp.nanosec == stamp
                                                  for m in got):
        time.sleep(0.05)
    msg = [m for m in got if m.header.stamp.sec * 10**9 + m.header.stamp.nanosec == stamp][-1]
    (entry,) = msg.queries
    assert entry.found and 0.0 < entry.presence <= 1.0
    assert 1 <= len(entry.candidates) <= 3 and entry.ambiguous
