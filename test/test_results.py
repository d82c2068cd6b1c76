"""One description of a result (`core/serving/results.py`): the message and the command line's JSON come
from it, so each names every GroundingResult / GroundedObject field the .msg files define, by that name."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from test_docs import msg_fields

from kosmos2_ros.core.serving.results import GroundedBox, Result, Status, describe, describe_object, to_json


@pytest.fixture(scope="module")
def result(result_with_geometry: Result) -> Result:
    """conftest's result (an object with geometry, one without) with a stamp, timings, presence and a candidate."""
    res = copy.deepcopy(result_with_geometry)
    res.stamp_ns, res.frame_id, res.geometry_frame_id = 1_700_000_000_123_456_789, "cam", ""
    res.text, res.presence, res.ambiguity, res.ambiguous, res.token_ids = "the box", 0.8, 0.6, True, [5, 6]
    res.timings_ms = {"encode": 3.0, "generate": 7.0, "total": 12.0}
    res.objects[1].score, res.objects[1].point_error = float("nan"), "no depth"
    res.candidates = [GroundedBox("the box", 0, (0, 0), (300, 200, 340, 260), (0.5, 0.4, 0.6, 0.5), 0.5,
                                  description="a red box")]
    return res


def test_the_description_names_every_message_field(result: Result) -> None:
    d = describe(result, queue_ms=2.0)
    assert set(d) == msg_fields("GroundingResult") - {"mask"}     # the mask is an image: convert.mask_image
    for obj in d["objects"] + d["candidates"]:
        assert set(obj) == msg_fields("GroundedObject")
        assert set(obj["box"]) == set(obj["box_refined"]) == msg_fields("PixelBox")
        assert set(obj["pose"]) == set(obj["grasp"]) == {"position", "orientation"}
    assert d["header"] == {"stamp": {"sec": 1_700_000_000, "nanosec": 123_456_789}, "frame_id": "cam"}
    assert d["total_ms"] == 14.0 and d["queue_ms"] == 2.0 and d["geometry_frame_id"] == "cam"


def test_objects_say_what_they_have_and_why_not(result: Result) -> None:
    full, empty = (describe_object(o) for o in result.objects)
    geo = result.objects[0].geometry
    assert full["point_valid"] and full["geometry_valid"] and full["geometry_error"] == ""
    np.testing.assert_allclose([full["size"][k] for k in "xyz"], geo.size)
    assert full["grasp_width"] == pytest.approx(geo.grasp_width)
    assert not empty["point_valid"] and empty["point_error"] == "no depth"
    assert not empty["geometry_valid"] and empty["geometry_error"].startswith("no valid depth inside the box")
    assert empty["score"] == 0.0                                   # a NaN score is no float32 value
    assert describe_object(result.candidates[0])["description"] == "a red box"


def test_the_json_is_the_description_and_what_only_the_command_line_reads(result: Result) -> None:
    d, j = describe(result), to_json(result)
    assert set(j) >= set(d) and j["status"] == "ok" and d["status"] == Status.OK
    assert {k: v for k, v in j.items() if k in d and k != "status"} == {k: v for k, v in d.items() if k != "status"}
    assert {"entities", "prompt_length", "model_calls", "timings_ms"} <= set(j)
    assert j["presence"] == 0.8 and j["ambiguous"] and len(j["candidates"]) == 1
    json.loads(json.dumps(result.to_json()))                       # plain values only
