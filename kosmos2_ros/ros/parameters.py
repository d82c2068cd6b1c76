"""The node's parameters: one per config field, with descriptions, ranges and runtime changes.

Every value goes through `Kosmos2Config` (validated in one place). A start-up value rclpy itself
refuses (outside a descriptor's range) leaves the parameter at its default and the node unable to
configure until it is set; a runtime change that makes the parameters valid is accepted.
`ParametersMixin` is the node's parameter handling; it expects the node's `config`,
`state_label` and `_config_changed(new_config, changed_names)` (what applies at once).
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Dict, List, Set, Tuple

from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException

from kosmos2_ros.core.backends import registry as backend_registry
from kosmos2_ros.core.defaults import PRECISIONS, QUANTIZED_PRECISIONS
from kosmos2_ros.core.serving.config import RANGES, ConfigError, Kosmos2Config

PARAMETER_DOCS: Dict[str, str] = {
    "model": "Hugging Face hub id or local directory saved with save_pretrained; empty = $KOSMOS2_MODEL, "
             "else microsoft/kosmos-2-patch14-224 (the one rule of every entry point)",
    "backend": backend_registry.describe(),
    "device": "auto | cpu | cuda | cuda:N",
    "precision": "auto (fp16 on a GPU, fp32 on the CPU) | " + " | ".join(PRECISIONS + QUANTIZED_PRECISIONS)
                 + " (int8 / int4: onnxruntime)",
    "allow_download": "may fetch the model from the hub when it is not cached",
    "allow_pickle_weights": "accept *.bin / *.pt weights (pickle); refused by default",
    "artifacts_dir": "where ONNX graphs and TensorRT engines are cached",
    "build_engines": "the node may build missing ONNX/TensorRT artifacts itself on configure",
    "cuda_graph": "tensorrt, torch on a GPU: replay each decode step as one CUDA graph launch",
    "arena_budget_mb": "tensorrt, torch on a GPU: device memory (MiB) the decode arenas kept for reuse may take; each "
                       "kept arena shape keeps its captured CUDA graph, so traffic that fits never captures again "
                       "(least recently used dropped first)",
    "torch_mode": "torch backend: auto (static KV arena + CUDA graphs on a GPU, transformers' modules on the CPU) "
                  "| reference (transformers' modules step by step) | static",
    "max_new_tokens": "default generation limit for a command (commands may ask for another)",
    "max_new_tokens_limit": "commands asking for more tokens are refused (STATUS_INVALID)",
    "decoding": "default decoding for refer/phrase grounding: constrained (always a box) | free",
    "no_repeat_ngram_size": "no n-gram of this many tokens twice in a sequence; -1 = the checkpoint's "
                            "generation config (3 for microsoft/kosmos-2-patch14-224), 0 = off",
    "score_threshold": "boxes scoring below this are dropped, in [0, 1]",
    "presence_threshold": "refer: when p(<object>) after the phrase (presence) is below this, answer OK with no "
                          "object and say so in not_found_reason; a standing query is found: false. 0 = off; pick it "
                          "from kosmos2-eval's presence figures on the real weights",
    "max_candidates": "refer, phrase grounding, standing queries: up to this many other boxes the model considered "
                      "(candidates); 0 = off",
    "ambiguity_ratio": "a result is ambiguous when its best candidate scores at least this fraction of the chosen box",
    "describe_candidates": "describe each box of an ambiguous result in words (region description, one batch)",
    "max_prompt_chars": "longest accepted command text",
    "max_frame_age_s": "a newest frame older than this gives STATUS_STALE_FRAME; 0 = no limit",
    "frame_cache_size": "recent frames kept so a command can name its frame by stamp",
    "queue_size": "pending commands; past this a command gets STATUS_BUSY at once",
    "image_qos": "QoS of the camera subscriptions (depth 1): auto (reliable when every publisher is, else best "
                 "effort; follows publishers as they change) | sensor_data (best effort) | reliable",
    "use_compressed": "also subscribe to image/compressed (sensor_msgs/CompressedImage) beside the raw image",
    "image_transport": "which colour topic: raw (image) | compressed (only image/compressed, JPEG or PNG: what a "
                       "robot should send over WiFi); decoded on the worker thread when a command needs the frame",
    "depth_transport": "which depth topic: raw (depth/image) | compressedDepth (only depth/image/compressedDepth, "
                       "image_transport's PNG format, 16UC1 or quantised 32FC1); decoded when a command needs it",
    "camera_topics": "per named camera, <camera>/kosmos2/command, ground, result, tracks and target/* beside the "
                     "node's own, so each robot receives only its cameras' results (docs/remote-serving.md)",
    "enable_3d": "compute a 3D point per box from depth/image + camera_info",
    "depth_inner_fraction": "central fraction of a box whose median depth gives its 3D point",
    "min_depth_m": "depth readings below this are ignored (metres)",
    "max_depth_m": "depth readings above this are ignored (metres)",
    "object_geometry": "per object with depth: mask, refined box, 3D box (pose, size), grasp pose and ~/object_cloud",
    "candidate_geometry": "object geometry for every candidate too (each costs about an object's); off: a candidate "
                          "has its box and 3D point, and gets its geometry when sent back as a region command",
    "result_masks": "fill GroundingResult.mask, a mono8 label image of the source image's size (with depth)",
    "target_frame": "frame of the objects' poses, grasps and clouds, through tf2 at the image's stamp; "
                    "empty = the camera's optical frame",
    "target_frames": "per camera, in the order of cameras, the frame its geometry goes into (robot r1's camera: "
                     "r1/base_link); an empty item or no list: target_frame",
    "tf_timeout_s": "longest wait for the transform into target_frame; past it the result's geometry is invalid",
    "publish_debug_image": "publish ~/debug_image (only while someone subscribes)",
    "autostart": "configure and activate on start-up (else wait for lifecycle transitions)",
    "cameras": "camera names served by the one model: [front, wrist] reads front/image, front/camera_info, "
               "front/depth/image, ... ; empty = one camera on image, camera_info, depth/image",
    "queries": "standing referring expressions grounded on every camera's newest frame (~/tracks); "
               "~/set_queries replaces them per camera",
    "checks": "standing yes/no checks asked on every camera's grounded frames, answer and p(yes) on ~/tracks; a "
              "[bracketed] standing query is asked about by its box ('Is [the red mug] in the gripper?'), else the "
              "whole image; ~/set_queries replaces them per camera",
    "query_rate_hz": "most standing-query frames per second per camera; 0 = as fast as the model allows",
    "encode_ahead_hz": "most frames per second encoded (vision encoder + prompt head) while idle, summed over all "
                       "cameras (two 10 Hz cameras want 20), so a command pays only its own suffix and decode; 0 = off",
    "target_query": "the standing query whose (fused) object is also the arm's target on ~/target/*; empty = the "
                    "target comes from refer and region commands only",
    "collision_object": "also publish the target as a moveit_msgs/CollisionObject (a box; ADD then MOVE) on "
                        "collision_object_topic; needs moveit_msgs",
    "collision_object_topic": "where the target's CollisionObject goes (MoveIt's planning scene listens on "
                              "/collision_object)",
    "track_hold_s": "a standing query's track is held this long (image time) while its object is not found (the "
                    "arm covers it): ~/tracks repeats its last fused pose with occluded true and last_seen; found "
                    "again near it within the hold, it keeps its id; 0 = the track ends at once",
}
# Changing these at runtime is accepted and validated, but takes effect on the next configure
# (lifecycle cleanup + configure): they need the model reloaded or subscriptions remade.
DEFERRED_PARAMETERS = frozenset({"model", "backend", "device", "precision", "allow_download",
                                 "allow_pickle_weights", "artifacts_dir", "build_engines", "cuda_graph", "torch_mode",
                                 "arena_budget_mb",
                                 "target_frame", "target_frames", "tf_timeout_s",
                                 "image_qos", "use_compressed", "image_transport",
                                 "depth_transport", "cameras", "camera_topics"})
CONFIG_FIELDS = tuple(f.name for f in fields(Kosmos2Config))


#: What each parameter type accepts, for the node's own refusal line.
KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", tuple: "a list of strings"}


def typed_value(default: Any, value: Any) -> Tuple[bool, Any]:
    """(whether `value` fits the parameter whose default is `default`, the value in the default's
    type). An integer fits a double (and becomes one), an integral double fits an integer, and an
    empty array of any type (`[]` parses as a byte or bool array) fits a string array."""
    if isinstance(default, bool) or isinstance(default, str):
        return isinstance(value, type(default)), value
    if isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return isinstance(value, int) and not isinstance(value, bool), value
    if isinstance(default, tuple):
        items = list(value) if isinstance(value, (list, tuple)) else None
        ok = items is not None and all(isinstance(i, str) for i in items)
        return ok, items if ok else value
    return True, value


def type_refusal(name: str, default: Any, value: Any) -> str:
    kind = KIND_NAMES[tuple if isinstance(default, tuple) else type(default)]
    return f"{name} must be {kind}, got {value!r} ({type(value).__name__})"


def parameter_descriptor(name: str, default: Any) -> ParameterDescriptor:
    """Description and (where the config has one) range, as `ros2 param describe` shows them.

    Dynamically typed, so that rclpy passes every value to the node, which keeps each parameter
    its own type (`typed_value`, before the value is stored) and refuses the rest with its own line
    instead of rclpy's "Wrong parameter type, expected '2' got '4'"."""
    doc = PARAMETER_DOCS.get(name, name)
    if name in DEFERRED_PARAMETERS:
        doc += " (a change applies on the next configure)"
    low_high = RANGES.get(name)
    if isinstance(default, tuple):
        doc += " (string array)"
    descriptor = ParameterDescriptor(description=doc, dynamic_typing=True)
    if low_high and isinstance(default, float):
        descriptor.floating_point_range = [FloatingPointRange(from_value=float(low_high[0]),
                                                              to_value=float(low_high[1]), step=0.0)]
    elif low_high and isinstance(default, int) and not isinstance(default, bool):
        descriptor.integer_range = [IntegerRange(from_value=int(low_high[0]), to_value=int(low_high[1]), step=1)]
    return descriptor


def ros_parameter(name: str, value: Any) -> Any:
    """An rclpy Parameter holding `value` as its Python type says (an empty list: a string array)."""
    from rclpy.parameter import Parameter

    if isinstance(value, list) and not value:
        return Parameter(name, Parameter.Type.STRING_ARRAY, [])
    return Parameter(name, value=value)


class ParametersMixin:
    """Declaring the parameters, reading them into the config, and accepting or refusing changes."""

    config: Kosmos2Config
    param_error: str
    _refused_at_start: Dict[str, str]

    def _config_changed(self, new: Kosmos2Config, changed: Set[str]) -> None:
        raise NotImplementedError

    def _declare_parameters(self) -> None:
        defaults = Kosmos2Config()
        overrides = getattr(self, "_parameter_overrides", {})   # -p / params file values (rclpy's own map)
        for name in CONFIG_FIELDS:
            default = getattr(defaults, name)
            descriptor = parameter_descriptor(name, default)
            initial = list(default) if isinstance(default, tuple) else default   # rclpy takes lists
            value = initial
            if name in overrides and overrides[name].value is not None:   # (a YAML `[]` arrives unset)
                ok, given = typed_value(default, overrides[name].value)
                if ok:
                    value = given           # `-p max_frame_age_s:=1` declares the double 1.0
                else:
                    self._refused_at_start[name] = (f"{name}: start-up value refused "
                                                    f"({type_refusal(name, default, given)}); set it to configure")
            try:
                self.declare_parameter(name, value, descriptor, ignore_override=True)
            except (InvalidParameterValueException, InvalidParameterTypeException) as exc:
                low_high = RANGES.get(name)
                why = f"must be in [{low_high[0]:g}, {low_high[1]:g}]" if low_high else str(exc)
                self._refused_at_start[name] = f"{name}: start-up value refused ({why}); set it to configure"
                self.declare_parameter(name, initial, descriptor, ignore_override=True)
        if hasattr(self, "add_pre_set_parameters_callback"):    # rclpy of Jazzy and later (not Humble)
            self.add_pre_set_parameters_callback(self._keep_parameter_types)

    def _keep_parameter_types(self, params: List[Any]) -> List[Any]:
        """Before rclpy stores a change: a value that fits its parameter in another type (an integer
        for a double, `[]` for a string array) is stored in the parameter's own type. On Humble,
        without this hook, such a value is accepted and keeps the type it was sent as."""
        defaults = Kosmos2Config()
        out = []
        for p in params:
            if p.name in CONFIG_FIELDS:
                ok, value = typed_value(getattr(defaults, p.name), p.value)
                if ok and (type(value) is not type(p.value) or (isinstance(value, list) and not value)):
                    p = ros_parameter(p.name, value)
            out.append(p)
        return out

    def _parameter_values(self) -> Dict[str, Any]:
        return {name: self.get_parameter(name).value for name in CONFIG_FIELDS}

    def _on_set_parameters(self, params: List[Any]) -> SetParametersResult:
        defaults = Kosmos2Config()
        changes = {}
        for p in params:
            if p.name in CONFIG_FIELDS:
                ok, changes[p.name] = typed_value(getattr(defaults, p.name), p.value)
                if not ok:
                    return SetParametersResult(successful=False,
                                               reason=type_refusal(p.name, getattr(defaults, p.name), p.value))
        if not changes:
            return SetParametersResult(successful=True)
        try:
            new, problem = self._config_after(changes)
        except ConfigError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        if {"backend", "device"} & set(changes):
            missing = backend_registry.machine_problem(new.backend, new.device)
            if missing:
                return SetParametersResult(successful=False, reason=missing)
        for name in changes:
            self._refused_at_start.pop(name, None)
        self.param_error = self._parameter_problems(problem)
        self.config = new
        self._config_changed(new, set(changes))
        deferred = sorted(set(changes) & DEFERRED_PARAMETERS)
        if deferred and self.state_label != "unconfigured":
            note = f"{', '.join(deferred)}: takes effect at the next configure (lifecycle cleanup + configure)"
            self.get_logger().info(note)
            return SetParametersResult(successful=True, reason=note)
        return SetParametersResult(successful=True)

    def _config_after(self, changes: Dict[str, Any]) -> Tuple[Kosmos2Config, str]:
        """The config with `changes` applied, and what is still wrong with the parameters ("" = nothing).

        While the parameters are wrong (given so at start-up), they are judged with the change
        applied, so a set that makes them valid is accepted and configure can then succeed; a set
        that is valid in itself but leaves another parameter wrong is accepted too, and the node
        still will not configure. ConfigError: the change itself is wrong.
        """
        if not self.param_error:
            return self.config.with_changes(changes), ""
        try:
            return Kosmos2Config.from_dict({**self._parameter_values(), **changes}), ""
        except ConfigError as exc:
            Kosmos2Config().with_changes(changes)
            return self.config, str(exc)

    def _parameter_problems(self, config_problem: str) -> str:
        return "; ".join([p for p in [config_problem] if p] + list(self._refused_at_start.values()))
