"""One validated config: each bad value refused with its reason; YAML and ROS params files; coercion."""
from __future__ import annotations

from pathlib import Path

import pytest

from kosmos2_ros.core.serving.config import ConfigError, Kosmos2Config, check_queries


def test_defaults_are_valid() -> None:
    cfg = Kosmos2Config()
    cfg.validate()
    assert cfg.model == "microsoft/kosmos-2-patch14-224" and cfg.backend == "auto"
    assert Kosmos2Config.from_dict(cfg.to_dict()) == cfg


BAD = [
    ("backend", "tensorflow", "backend"),
    ("device", "gpu", "device"),
    ("device", "cudafoo", "device"),
    ("device", "cuda:", "device"),
    ("precision", "int3", "precision"),
    ("decoding", "beam", "decoding"),
    ("image_qos", "best_effort", "image_qos"),
    ("image_transport", "theora", "image_transport"),
    ("depth_transport", "compressed", "depth_transport"),   # depth's transport is compressedDepth
    ("target_frame", "base link", "may not hold spaces"),
    ("max_new_tokens", 0, "max_new_tokens"),
    ("max_new_tokens", 600, "max_new_tokens"),       # over the default limit 512
    ("max_new_tokens_limit", 0, "max_new_tokens_limit"),
    ("max_new_tokens_limit", 5000, "max_new_tokens_limit"),
    ("score_threshold", -0.1, "score_threshold"),
    ("score_threshold", 1.5, "score_threshold"),
    ("score_threshold", float("inf"), "score_threshold"),
    ("max_prompt_chars", 0, "max_prompt_chars"),
    ("max_prompt_chars", 100_001, "max_prompt_chars"),
    ("max_frame_age_s", -1.0, "max_frame_age_s"),
    ("max_frame_age_s", float("inf"), "max_frame_age_s"),
    ("frame_cache_size", 0, "frame_cache_size"),
    ("frame_cache_size", 257, "frame_cache_size"),
    ("queue_size", 0, "queue_size"),
    ("queue_size", 1025, "queue_size"),
    ("depth_inner_fraction", 0.0, "depth_inner_fraction"),
    ("depth_inner_fraction", 1.01, "depth_inner_fraction"),
    ("min_depth_m", -0.1, "min_depth_m"),
    ("min_depth_m", 30.0, "min_depth_m"),             # above max_depth_m 20
    ("max_depth_m", 0.01, "max_depth_m"),             # below min_depth_m 0.05
]


@pytest.mark.parametrize("name,value,needle", BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_each_bad_value_is_refused(name: str, value, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        Kosmos2Config.from_dict({name: value})
    with pytest.raises(ConfigError, match=needle):
        Kosmos2Config().with_changes({name: value})
    with pytest.raises(ConfigError, match=needle):
        Kosmos2Config(**{name: value})


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_good_devices(device: str) -> None:
    assert Kosmos2Config(device=device).device == device


def test_what_configure_needs_together_is_checked_apart() -> None:
    """cameras and target_frames (and camera_topics) are set one at a time by ros2 param set: each value is
    valid alone, and configure says when they disagree."""
    assert Kosmos2Config().configure_problem() == ""
    lone = Kosmos2Config(camera_topics=True)
    assert "camera_topics needs named cameras" in lone.configure_problem()
    grown = Kosmos2Config(cameras=("r1/front",), target_frames=("r1/base_link", "r2/base_link"))
    assert "target_frames has 2 entries" in grown.configure_problem()
    fewer = Kosmos2Config(cameras=("r1/front", "r2/front"), target_frames=("r1/base_link",))
    assert fewer.configure_problem() == ""              # r2/front uses target_frame


def test_unknown_parameter() -> None:
    with pytest.raises(ConfigError, match="unknown parameter 'max_tokens'"):
        Kosmos2Config.from_dict({"max_tokens": 3})


def test_with_changes_keeps_other_values() -> None:
    cfg = Kosmos2Config.from_dict({"max_new_tokens": 10, "backend": "onnxruntime"})
    cfg2 = cfg.with_changes({"score_threshold": 0.3})
    assert (cfg2.max_new_tokens, cfg2.backend, cfg2.score_threshold) == (10, "onnxruntime", 0.3)
    assert cfg.score_threshold == 0.0   # frozen: the original is unchanged
    with pytest.raises(ConfigError):
        cfg.with_changes(["not", "a", "mapping"])  # type: ignore[arg-type]


# -- coercion ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [(True, True), (False, False), ("true", True), ("False", False),
                                            ("1", True), ("0", False), ("yes", True), ("no", False)])
def test_bool_coercion(value, expected: bool) -> None:
    assert Kosmos2Config.from_dict({"enable_3d": value}).enable_3d is expected


@pytest.mark.parametrize("value", ["maybe", 1, 0, 1.0, None, [True]])
def test_bool_refuses(value) -> None:
    with pytest.raises(ConfigError, match="enable_3d.*bool"):
        Kosmos2Config.from_dict({"enable_3d": value})


@pytest.mark.parametrize("value,expected", [(32, 32), (32.0, 32), ("32", 32)])
def test_int_coercion(value, expected: int) -> None:
    got = Kosmos2Config.from_dict({"max_new_tokens": value}).max_new_tokens
    assert got == expected and isinstance(got, int)


@pytest.mark.parametrize("value", [32.5, True, "32.5", "many", None, float("nan"), float("inf"), [1]])
def test_int_refuses(value) -> None:
    with pytest.raises(ConfigError, match="max_new_tokens.*int"):
        Kosmos2Config.from_dict({"max_new_tokens": value})


@pytest.mark.parametrize("value,expected", [(1, 1.0), (0.25, 0.25), ("0.5", 0.5), ("1e-1", 0.1)])
def test_float_coercion(value, expected: float) -> None:
    got = Kosmos2Config.from_dict({"score_threshold": value}).score_threshold
    assert got == expected and isinstance(got, float)


@pytest.mark.parametrize("value", [float("nan"), "nan", False, "high", None])
def test_float_refuses(value) -> None:
    with pytest.raises(ConfigError, match="score_threshold.*float"):
        Kosmos2Config.from_dict({"score_threshold": value})


@pytest.mark.parametrize("value", [5, None, ["a"], b"dir"])
def test_str_refuses(value) -> None:
    with pytest.raises(ConfigError, match="model.*str"):
        Kosmos2Config.from_dict({"model": value})


def test_direct_construction_with_a_wrong_type() -> None:
    with pytest.raises(ConfigError, match="max_new_tokens"):
        Kosmos2Config(max_new_tokens="64")  # type: ignore[arg-type]


# -- files ------------------------------------------------------------------------------------------

def test_plain_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: /models/kosmos2\nmax_new_tokens: 32\nenable_3d: false\nscore_threshold: 0.2\n")
    cfg = Kosmos2Config.from_yaml(path)
    assert (cfg.model, cfg.max_new_tokens, cfg.enable_3d, cfg.score_threshold) == ("/models/kosmos2", 32, False, 0.2)


def test_ros_params_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("kosmos2_grounding:\n  ros__parameters:\n    backend: onnxruntime\n    queue_size: 4\n"
                    "    device: \"cuda:0\"\n")
    cfg = Kosmos2Config.from_yaml(path)
    assert (cfg.backend, cfg.queue_size, cfg.device) == ("onnxruntime", 4, "cuda:0")


def test_ros_params_wildcard_and_sections(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("/**:\n  ros__parameters:\n    max_new_tokens: 7\n")
    assert Kosmos2Config.from_yaml(path).max_new_tokens == 7
    path.write_text("node_a:\n  ros__parameters:\n    max_new_tokens: 5\n"
                    "node_b:\n  ros__parameters:\n    max_new_tokens: 9\n")
    assert Kosmos2Config.from_yaml(path, section="node_b").max_new_tokens == 9
    assert Kosmos2Config.from_yaml(path, section="node_a").max_new_tokens == 5
    path.write_text("ros__parameters:\n  precision: bf16\n")
    assert Kosmos2Config.from_yaml(path).precision == "bf16"


def test_empty_yaml_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert Kosmos2Config.from_yaml(path) == Kosmos2Config()


@pytest.mark.parametrize("content,needle", [
    ("- a\n- b\n", "mapping"),
    ("just a string\n", "mapping"),
    ("max_new_tokens: [1, 2\n", "cannot read"),
    ("node:\n  ros__parameters:\n    max_new_tokens: 0\n", "max_new_tokens"),
    ("node:\n  ros__parameters:\n    colour: red\n", "unknown parameter 'colour'"),
    ("node:\n  ros__parameters: [1]\n", "mapping"),
])
def test_bad_yaml(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=needle):
        Kosmos2Config.from_yaml(path)


def test_missing_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Kosmos2Config.from_yaml(tmp_path / "absent.yaml")


def test_repository_config_file_is_valid() -> None:
    path = Path(__file__).resolve().parents[1] / "config" / "grounding.yaml"
    if not path.exists():
        pytest.fail(f"{path} is missing")
    Kosmos2Config.from_yaml(path)


# -- live perception -------------------------------------------------------------------------
def test_cameras_and_queries_are_string_arrays() -> None:
    cfg = Kosmos2Config.from_dict({"cameras": ["front", "arm/wrist"], "queries": ["the  red\tmug"]})
    assert cfg.cameras == ("front", "arm/wrist") and cfg.camera_names == ("front", "arm/wrist")
    assert cfg.queries == ("the  red\tmug",)
    assert Kosmos2Config().camera_names == ("",)
    assert Kosmos2Config.from_dict({"cameras": b"", "queries": None}).queries == ()   # how rclpy gives `[]`


@pytest.mark.parametrize("values, needle", [
    ({"cameras": ["front", "front"]}, "listed twice"),
    ({"cameras": ["/front"]}, "relative topic name"),
    ({"cameras": ["front camera"]}, "relative topic name"),
    ({"cameras": "front"}, "must be a"),
    ({"cameras": [f"c{i}" for i in range(17)]}, "at most 16"),
    ({"queries": ["a <phrase>mug"]}, "control token"),
    ({"queries": [""]}, "empty"),
    ({"queries": ["x" * 2000]}, "limit"),
    ({"queries": [f"q{i}" for i in range(9)]}, "at most 8"),
    ({"query_rate_hz": -1.0}, "query_rate_hz"),
    ({"encode_ahead_hz": -0.5}, "encode_ahead_hz"),
])
def test_bad_live_parameters_are_refused(values: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        Kosmos2Config.from_dict(values)


def test_check_queries_knows_the_tokenizers_control_strings() -> None:
    assert check_queries(["the  mug"], 100) == ("the mug",)
    with pytest.raises(ConfigError, match="control token"):
        check_queries(["the [SPECIAL] mug"], 100, ("[SPECIAL]",))


def test_the_model_is_given_else_the_environment_else_the_default(monkeypatch) -> None:
    """One rule for every entry point (node parameter, YAML, CLIs): KOSMOS2_MODEL when no model is given."""
    from kosmos2_ros.cli import _ground_parser
    from kosmos2_ros.core.defaults import DEFAULT_MODEL

    monkeypatch.delenv("KOSMOS2_MODEL", raising=False)
    assert Kosmos2Config().model == DEFAULT_MODEL and Kosmos2Config(model="").model == DEFAULT_MODEL
    monkeypatch.setenv("KOSMOS2_MODEL", "/models/kosmos2")
    assert Kosmos2Config().model == "/models/kosmos2"
    assert Kosmos2Config.from_dict({"model": ""}).model == "/models/kosmos2"          # the shipped YAML's value
    assert Kosmos2Config(model="/other").model == "/other"                           # a given model wins
    assert _ground_parser().parse_args(["--image", "x.png"]).model == "/models/kosmos2"
