"""The node's parameter typing rules (kosmos2_ros/ros/parameters.py), without a node."""
from __future__ import annotations

import pytest

from kosmos2_ros.ros.parameters import parameter_descriptor, ros_parameter, type_refusal, typed_value


@pytest.mark.parametrize("default, value, expected", [
    (0.5, 1, (True, 1.0)), (0.5, 0.25, (True, 0.25)), (0.5, True, (False, True)), (0.5, "1", (False, "1")),
    (4, 2.0, (True, 2)), (4, 2.5, (False, 2.5)), (4, "abc", (False, "abc")), (4, False, (False, False)),
    (True, 1, (False, 1)), (True, False, (True, False)), ("a", 3, (False, 3)),
    ((), [], (True, [])), ((), ["the mug"], (True, ["the mug"])), ((), [1, 2], (False, [1, 2])),
    ((), "the mug", (False, "the mug")),
])
def test_values_fit_the_parameters_own_type(default, value, expected) -> None:
    ok, got = typed_value(default, value)
    assert (ok, got) == expected and type(got) is type(expected[1])


def test_refusals_name_the_type_wanted() -> None:
    assert type_refusal("queue_size", 4, "abc") == "queue_size must be an integer, got 'abc' (str)"
    assert type_refusal("queries", (), 3) == "queries must be a list of strings, got 3 (int)"


def test_descriptors_are_dynamic_with_ranges() -> None:
    d = parameter_descriptor("queue_size", 4)
    assert d.dynamic_typing and d.integer_range[0].to_value == 1024
    d = parameter_descriptor("score_threshold", 0.3)
    assert d.dynamic_typing and d.floating_point_range[0].to_value == 1.0
    assert "string array" in parameter_descriptor("queries", ()).description


def test_an_empty_list_is_a_string_array() -> None:
    from rclpy.parameter import Parameter

    assert ros_parameter("queries", []).type_ == Parameter.Type.STRING_ARRAY
    assert ros_parameter("max_frame_age_s", 1.0).type_ == Parameter.Type.DOUBLE
