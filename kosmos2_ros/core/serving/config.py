"""One typed, validated configuration for the pipeline and the node.

Every source (YAML file, CLI flags, ROS parameters) goes through `Kosmos2Config.from_dict`
or `Kosmos2Config.with_changes`, so a bad value is refused with a reason in one place
before anything uses it. Field names are the ROS parameter names.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple, Union

from ..backends.kv_cache import ARENA_BUDGET_MB
from ..backends.registry import AUTO, PRECISION_CHOICES, precision_problem
from ..backends.registry import CHOICES as BACKENDS
from ..defaults import ARTIFACTS_DIR, TORCH_MODES, default_model
from ..model.decoding import DecodingMode
from ..model.tasks import PromptError, sanitize_text

DECODING = tuple(m.value for m in DecodingMode)
QOS = ("auto", "sensor_data", "reliable")
IMAGE_TRANSPORTS = ("raw", "compressed")          # image_transport's names for the colour topic
DEPTH_TRANSPORTS = ("raw", "compressedDepth")     # ... and for the depth topic
MAX_NGRAM = 64          # largest no_repeat_ngram_size accepted
MAX_CANDIDATES = 16     # most candidate boxes a command may ask for
MAX_CAMERAS = 16        # most cameras one node serves
MAX_QUERIES = 8         # most standing queries per camera (they decode as one batch per frame)
# A camera name is a relative ROS name: its topics are <name>/image, <name>/camera_info, ...
CAMERA_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*(/[A-Za-z][A-Za-z0-9_]*)*")


# Closed ranges [low, high] of numeric parameters: validated here, and shown by
# `ros2 param describe` (the node puts them in its parameter descriptors).
RANGES: Dict[str, Tuple[float, float]] = {
    "max_new_tokens": (1, 4096),           # and at most max_new_tokens_limit
    "max_new_tokens_limit": (1, 4096),
    "no_repeat_ngram_size": (-1, MAX_NGRAM),
    "score_threshold": (0.0, 1.0),
    "presence_threshold": (0.0, 1.0),
    "max_candidates": (0, MAX_CANDIDATES),
    "ambiguity_ratio": (0.0, 1.0),
    "max_prompt_chars": (1, 100_000),
    "frame_cache_size": (1, 256),
    "queue_size": (1, 1024),
    "depth_inner_fraction": (0.0, 1.0),    # and above 0
    "query_rate_hz": (0.0, 1000.0),        # 0 = as fast as the model allows
    "encode_ahead_hz": (0.0, 1000.0),      # 0 = off
    "track_hold_s": (0.0, 3600.0),         # 0 = a track ends on the first frame its query is not found
    "tf_timeout_s": (0.0, 5.0),
    "arena_budget_mb": (1.0, 1_048_576.0),
}


class ConfigError(ValueError):
    """A configuration value that is refused, with the reason."""


@dataclass(frozen=True)
class Kosmos2Config:
    # Model
    model: str = ""                                  # hub id or local directory; "" = $KOSMOS2_MODEL, else the default
    backend: str = AUTO                              # auto | tensorrt | onnxruntime | torch (backends.registry)
    device: str = "auto"                             # auto | cpu | cuda | cuda:N
    precision: str = AUTO                            # auto (fp16 on a GPU, fp32 on the CPU) | fp32 | fp16 | bf16 | int8 | int4
    allow_download: bool = True                      # may fetch the model from the hub
    allow_pickle_weights: bool = False               # refuse *.bin/*.pt weights unless true
    artifacts_dir: str = ARTIFACTS_DIR               # ONNX graphs and TensorRT engines
    build_engines: bool = False                      # the node may build missing engines itself
    cuda_graph: bool = True                          # tensorrt, torch on a GPU: replay the decode step as a CUDA graph
    torch_mode: str = "auto"                         # torch: auto (static on a GPU) | reference | static
    arena_budget_mb: float = ARENA_BUDGET_MB         # tensorrt, torch on a GPU: device memory kept decode arenas take
    # Generation
    max_new_tokens: int = 64
    max_new_tokens_limit: int = 512                  # commands asking for more are refused
    decoding: str = DecodingMode.CONSTRAINED.value   # free | constrained: default for refer/phrase grounding
    no_repeat_ngram_size: int = -1                   # -1 = the checkpoint's generation config; 0 = off
    score_threshold: float = 0.0                     # boxes scoring below are dropped
    presence_threshold: float = 0.0                  # refer: p(<object>) below it -> no object, with the reason
    max_candidates: int = 3                          # other boxes the model considered (refer, phrase grounding)
    ambiguity_ratio: float = 0.5                     # best candidate's score / the chosen box's >= it -> ambiguous
    describe_candidates: bool = False                # an ambiguous result's boxes each described in words
    max_prompt_chars: int = 1000
    # Frames and commands
    max_frame_age_s: float = 2.0                     # older newest frame -> STALE_FRAME; 0 = no limit
    frame_cache_size: int = 8                        # recent frames kept for commands with a stamp
    queue_size: int = 8                              # pending commands; past it -> BUSY at once
    # Topics
    image_qos: str = "auto"                          # auto (match the publishers) | sensor_data | reliable
    use_compressed: bool = False                     # also image/compressed beside the raw image
    image_transport: str = "raw"                     # raw | compressed: which colour topic (compressed: only it)
    depth_transport: str = "raw"                     # raw | compressedDepth: which depth topic
    enable_3d: bool = True
    depth_inner_fraction: float = 0.5                # central part of a box used for its depth
    min_depth_m: float = 0.05
    max_depth_m: float = 20.0
    object_geometry: bool = True                     # mask, refined box, 3D box, grasp, cloud per object (with depth)
    candidate_geometry: bool = False                 # the same for every candidate (each still gets its box and point)
    result_masks: bool = True                        # the label image GroundingResult.mask (with depth)
    target_frame: str = ""                           # frame of poses, grasps and clouds ("" = the camera's optical frame)
    tf_timeout_s: float = 0.05                       # longest wait for the transform into target_frame
    target_frames: Tuple[str, ...] = ()              # per camera (order of cameras): its robot's frame; "" = target_frame
    publish_debug_image: bool = True                 # only when someone subscribes
    autostart: bool = True
    # Live perception
    cameras: Tuple[str, ...] = ()                    # () = one camera on image, camera_info, ...
    queries: Tuple[str, ...] = ()                    # standing referring expressions, every camera
    checks: Tuple[str, ...] = ()                     # standing yes/no checks, every camera ("Is [the mug] in the gripper?")
    query_rate_hz: float = 2.0                       # standing-query frames per second per camera; 0 = max
    encode_ahead_hz: float = 0.0                     # most frames per second encoded while idle; 0 = off
    track_hold_s: float = 2.0                        # a standing query's track held this long while not found (occluded)
    # The arm's target (~/target/*)
    target_query: str = ""                           # the standing query whose object is the target ("" = commands only)
    collision_object: bool = False                   # also a moveit_msgs/CollisionObject (needs moveit_msgs)
    collision_object_topic: str = "/collision_object"   # MoveIt's planning-scene topic
    # Serving robots over the network
    camera_topics: bool = False                      # per camera: <camera>/kosmos2/{command,ground,result,tracks,target/*}

    def __post_init__(self) -> None:
        if not self.model.strip():   # the one rule of every entry point: given, else $KOSMOS2_MODEL, else the default
            object.__setattr__(self, "model", default_model())
        # Direct construction is validated too, so no unchecked config reaches the pipeline.
        self.validate()

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Kosmos2Config:
        return cls().with_changes(values)

    @classmethod
    def from_yaml(cls, path: Union[str, Path], section: str = "") -> Kosmos2Config:
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of parameter names to values")
        # Accept a ROS params file: {node: {ros__parameters: {...}}}.
        if section and section in data:
            data = data[section]
        if len(data) == 1 and isinstance(next(iter(data.values())), dict):
            inner = next(iter(data.values()))
            data = inner.get("ros__parameters", inner)
        elif "ros__parameters" in data:
            data = data["ros__parameters"]
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of parameter names to values")
        return cls.from_dict(data)

    def with_changes(self, values: Mapping[str, Any]) -> Kosmos2Config:
        if not isinstance(values, Mapping):
            raise ConfigError(f"parameters must be a mapping of names to values, got {type(values).__name__}")
        known = {f.name: f for f in fields(self)}
        updates: Dict[str, Any] = {}
        for name, value in values.items():
            if name not in known:
                raise ConfigError(f"unknown parameter {name!r}")
            updates[name] = _coerce(name, known[name].type, value)
        cfg = dataclasses.replace(self, **updates)
        cfg.validate()
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    # -- validation ------------------------------------------------------------------------
    def configure_problem(self) -> str:
        """What stops the node configuring with these values together ("" = nothing). Kept out of `validate`:
        ros2 param set changes one parameter at a time, so cameras and target_frames may disagree between
        two sets; configure (and the launch files, before anything starts) need them to agree."""
        if self.camera_topics and not self.cameras:
            return ("camera_topics needs named cameras (cameras: [r1/front, r2/front]): the one unnamed camera's "
                    "topics are the node's own")
        if len(self.target_frames) > len(self.cameras):
            return (f"target_frames has {len(self.target_frames)} entries ({list(self.target_frames)}) for "
                    f"{len(self.cameras)} cameras {list(self.cameras)}: one per camera in the order of cameras, "
                    "fewer is fine (the rest use target_frame)")
        return ""

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for f in fields(self):
            value, kind = getattr(self, f.name), f.type if isinstance(f.type, str) else f.type.__name__
            ok = {"bool": isinstance(value, bool),
                  "int": isinstance(value, int) and not isinstance(value, bool),
                  "float": isinstance(value, (int, float)) and not isinstance(value, bool),
                  "str": isinstance(value, str)}.get(kind, True)
            need(ok, f"parameter {f.name!r} must be a {kind}, got {value!r}")
        need(bool(self.model.strip()), "model must name a hub id or a directory")
        need(self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}")
        need(self.precision in PRECISION_CHOICES, f"precision must be one of {PRECISION_CHOICES}, got {self.precision!r}")
        problem = precision_problem(self.backend, self.precision)
        need(not problem, problem)
        need(self.torch_mode in TORCH_MODES, f"torch_mode must be one of {TORCH_MODES}, got {self.torch_mode!r}")
        need(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
             f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        need(self.decoding in DECODING, f"decoding must be one of {DECODING}, got {self.decoding!r}")
        need(self.image_qos in QOS, f"image_qos must be one of {QOS}, got {self.image_qos!r}")
        need(self.image_transport in IMAGE_TRANSPORTS,
             f"image_transport must be one of {IMAGE_TRANSPORTS}, got {self.image_transport!r}")
        need(self.depth_transport in DEPTH_TRANSPORTS,
             f"depth_transport must be one of {DEPTH_TRANSPORTS}, got {self.depth_transport!r}")
        need(-1 <= self.no_repeat_ngram_size <= MAX_NGRAM,
             f"no_repeat_ngram_size must be in [-1, {MAX_NGRAM}] (-1 = the checkpoint's, 0 = off), "
             f"got {self.no_repeat_ngram_size}")
        for name, (low, high) in RANGES.items():
            need(low <= getattr(self, name) <= high, f"{name} must be in [{low:g}, {high:g}]")
        need(self.max_new_tokens <= self.max_new_tokens_limit,
             f"max_new_tokens must be in [1, max_new_tokens_limit={self.max_new_tokens_limit}]")
        need(math.isfinite(self.max_frame_age_s) and self.max_frame_age_s >= 0,
             "max_frame_age_s must be >= 0 (0 = no limit)")
        need(self.depth_inner_fraction > 0.0, "depth_inner_fraction must be in (0, 1]")
        need(0.0 <= self.min_depth_m < self.max_depth_m, "need 0 <= min_depth_m < max_depth_m")
        need(len(self.cameras) <= MAX_CAMERAS, f"cameras: at most {MAX_CAMERAS}, got {len(self.cameras)}")
        for name in self.cameras:
            need(CAMERA_NAME_RE.fullmatch(name) is not None,
                 f"cameras: {name!r} is not a relative topic name (letters, digits, _ and /, starting with a letter)")
        need(len(set(self.cameras)) == len(self.cameras), f"cameras: a name is listed twice in {list(self.cameras)}")
        for frame in (self.target_frame, *self.target_frames):
            need(frame == frame.strip() and " " not in frame, f"a target frame may not hold spaces, got {frame!r}")
        check_queries(self.queries, self.max_prompt_chars)
        check_queries(self.checks, self.max_prompt_chars, name="checks")

    @property
    def camera_names(self) -> Tuple[str, ...]:
        """The cameras' names; ("",) for the single unnamed camera on today's topics."""
        return self.cameras or ("",)


def check_queries(queries: Any, max_chars: int, control_strings: Tuple[str, ...] = (),
                  name: str = "queries") -> Tuple[str, ...]:
    """Standing queries (or checks: `name`), validated like command text (control tokens, length) and counted.

    Returns them cleaned (whitespace collapsed); ConfigError says what is wrong.
    """
    if len(queries) > MAX_QUERIES:
        raise ConfigError(f"{name}: at most {MAX_QUERIES} standing {name} per camera, got {len(queries)}")
    out = []
    for text in queries:
        try:
            clean = sanitize_text(text, control_strings, max_chars)
        except PromptError as exc:
            raise ConfigError(f"{name}: {text!r}: {exc}") from None
        if not clean:
            example = "'the red mug'" if name == "queries" else "'Is [the red mug] in the gripper?'"
            raise ConfigError(f"{name}: an empty entry (give one, e.g. {example})")
        out.append(clean)
    return tuple(out)


def _coerce(name: str, type_name: Any, value: Any) -> Any:
    type_name = type_name if isinstance(type_name, str) else type_name.__name__
    try:
        if type_name == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise TypeError
        if type_name == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if type_name == "float":
            if isinstance(value, bool):
                raise TypeError
            out = float(value)
            if math.isnan(out):
                raise TypeError
            return out
        if type_name == "str":
            if not isinstance(value, str):
                raise TypeError
            return value
        if type_name.startswith("Tuple[str"):
            # A ROS string array. An empty one arrives as whatever rclpy made of `[]`: an empty
            # byte array, or no value at all (`[]` in a parameters file).
            if value is None:
                return ()
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return tuple(value)
    except (TypeError, ValueError):
        raise ConfigError(f"parameter {name!r} must be a {type_name}, got {value!r}") from None
    raise ConfigError(f"parameter {name!r} has unsupported type {type_name}")  # pragma: no cover
