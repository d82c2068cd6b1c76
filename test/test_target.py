"""The arm's target (`core/serving/target.py`): only an OK, unambiguous refer or region result with valid
geometry names one, and every other says why."""
from __future__ import annotations

import copy

from kosmos2_ros.core.serving.results import Result, Status
from kosmos2_ros.core.serving.target import choose_target
from kosmos2_ros.core.spatial.object_geometry import ObjectGeometry


def test_a_plain_refer_or_region_result_names_its_chosen_object(result_with_geometry: Result) -> None:
    for task in ("refer", "region"):
        res = copy.deepcopy(result_with_geometry)
        res.task = task
        obj, why = choose_target(res)
        assert obj is res.objects[0] and why == ""


def test_every_other_result_says_why_it_names_none(result_with_geometry: Result) -> None:
    cases = []
    failed = copy.deepcopy(result_with_geometry)
    failed.status = Status.MODEL_ERROR
    cases.append((failed, "not OK (MODEL_ERROR)"))
    caption = copy.deepcopy(result_with_geometry)
    caption.task = "caption"
    cases.append((caption, "names no one object"))
    ambiguous = copy.deepcopy(result_with_geometry)
    ambiguous.ambiguous = True
    cases.append((ambiguous, "ask which one"))
    empty = copy.deepcopy(result_with_geometry)
    empty.objects, empty.not_found_reason = [], "presence 0.04 < presence_threshold 0.3"
    cases.append((empty, "presence 0.04"))
    flat = copy.deepcopy(result_with_geometry)
    flat.objects[0].geometry = ObjectGeometry.invalid("no depth on the object")
    cases.append((flat, "no geometry: no depth on the object"))
    for res, words in cases:
        obj, why = choose_target(res)
        assert obj is None and words in why, (why, words)
