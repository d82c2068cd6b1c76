"""What a command is and what it gets back: the data every stage of the pipeline reads or fills, and
the one description of a result that the node's message and the command line's JSON both come from.

A `Result` is filled stage by stage (`pipeline`): `interpret` gives its text, entities (normalised
boxes, scores), objects, presence, candidates and the not-found decision; `place` their source
pixels; `lift` their 3D points and geometry.

`describe` gives every GroundingResult field but the mask image, by its message name, as plain
values (a nested message as a dict of its fields): `ros/convert.result_to_msg` fills the message
from it, and `to_json` (`kosmos2-ground --json`, the demo's results.json) prints it with what only
a command-line user reads. A field added there appears in both; `test_results.py` holds it to the
`.msg` files.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..model import grounding
from ..model.grounding import Box
from ..spatial.object_geometry import ObjectGeometry, quaternion
from .frames import Frame


class Status(enum.IntEnum):
    """GroundingResult.STATUS_*, for a core without ROS (test_convert checks they agree)."""
    OK = 0
    BUSY = 1
    NO_FRAME = 2
    STALE_FRAME = 3
    INVALID = 4
    CANCELLED = 5
    MODEL_ERROR = 6
    NOT_ACTIVE = 7


@dataclass
class Command:
    id: str = ""
    task: str = "refer"
    text: str = ""
    region_px: Optional[Box] = None        # pixels of the source image (REGION task)
    image_stamp_ns: int = 0                # 0 = newest frame
    max_new_tokens: int = 0                # 0 = config default
    decoding: str = ""                     # "" = config default
    no_repeat_ngram_size: int = -1         # -1 = config default; 0 = off
    camera: str = ""                       # which camera's frame (the node's `cameras`; "" = the only one)
    max_candidates: int = -1               # -1 = config default; 0 = off
    describe_candidates: int = -1          # -1 = config default; 0 = no, 1 = yes


@dataclass
class GroundedBox:
    phrase: str
    entity_index: int
    span: Tuple[int, int]
    box_px: Box
    box_norm: Box
    score: float
    point: Optional[Tuple[float, float, float]] = None
    geometry: Optional[ObjectGeometry] = None   # mask, refined box, 3D box, grasp, cloud (`object_geometry`)
    description: str = ""                       # the box described in words (describe_candidates)
    point_error: str = ""                       # why there is no point
    box_index: int = 0                          # which of its entity's boxes it is (`place`: a region's own box)


@dataclass
class Result:
    id: str
    task: str
    status: Status = Status.OK
    error: str = ""
    stamp_ns: int = 0
    frame_id: str = ""
    width: int = 0
    height: int = 0
    text: str = ""
    raw_text: str = ""
    entities: List[grounding.Entity] = field(default_factory=list)
    objects: List[GroundedBox] = field(default_factory=list)
    token_ids: List[int] = field(default_factory=list)
    prompt_ids: List[int] = field(default_factory=list)
    timings_ms: dict = field(default_factory=dict)
    model_calls: int = 0
    no_repeat_ngram_size: int = 0          # the value the command was decoded with
    camera: str = ""
    geometry_frame_id: str = ""            # frame of the objects' geometry (the camera's, or target_frame)
    presence: float = -1.0                 # p(<object>) after the phrase (refer: its one; phrase grounding: the least); -1 n/a
    not_found_reason: str = ""             # why a refer result holds no object
    candidates: List[GroundedBox] = field(default_factory=list)   # other boxes the model considered, best first
    ambiguity: float = 0.0                 # best candidate's score / the chosen box's (0 without candidates)
    ambiguous: bool = False                # ambiguity >= ambiguity_ratio
    answer: str = ""                       # check: "yes" or "no" (answer_probability >= 0.5)
    answer_probability: float = -1.0       # check: p(yes) / (p(yes) + p(no)) at the first answer token; -1 n/a

    @classmethod
    def failure(cls, command: Command, status: Status, error: str, frame: Optional[Frame] = None) -> Result:
        res = cls(id=command.id, task=command.task, status=status, error=error, camera=command.camera)
        if frame is not None:
            res.stamp_ns, res.frame_id, res.width, res.height = frame.stamp_ns, frame.frame_id, frame.width, frame.height
        return res

    def to_json(self) -> dict:
        """What `kosmos2-ground --json` prints (`to_json`)."""
        return to_json(self)


#: What a point, pose or size is when it was not computed (its `*_valid` flag is false).
ZERO_POINT = {"x": 0.0, "y": 0.0, "z": 0.0}
ZERO_POSE = {"position": ZERO_POINT, "orientation": {"x": 0.0, "y": 0.0, "z": 0.0, "w": 1.0}}
ZERO_BOX = {"x_min": 0.0, "y_min": 0.0, "x_max": 0.0, "y_max": 0.0}


def finite(value: float) -> float:
    """A float32 field's value: NaN or infinity (a score that was not computed) as 0."""
    return float(value) if math.isfinite(value) else 0.0


def pixel_box(box: Sequence[float]) -> Dict[str, float]:
    return {"x_min": float(box[0]), "y_min": float(box[1]), "x_max": float(box[2]), "y_max": float(box[3])}


def xyz(v: Sequence[float]) -> Dict[str, float]:
    return {"x": float(v[0]), "y": float(v[1]), "z": float(v[2])}


def pose(position: np.ndarray, rotation: np.ndarray) -> Dict[str, Any]:
    x, y, z, w = quaternion(rotation)
    return {"position": xyz(position), "orientation": {"x": x, "y": y, "z": z, "w": w}}


def describe_object(obj: GroundedBox) -> Dict[str, Any]:
    """Every GroundedObject field of one object or candidate."""
    out: Dict[str, Any] = {
        "phrase": obj.phrase, "entity_index": int(obj.entity_index),
        "span_start": int(max(0, obj.span[0])), "span_end": int(max(0, obj.span[1])),
        "box": pixel_box(obj.box_px), "box_normalized": [float(v) for v in obj.box_norm],
        "score": finite(obj.score),
        "point": xyz(obj.point) if obj.point is not None else dict(ZERO_POINT),
        "point_valid": obj.point is not None,
        "point_error": "" if obj.point is not None else (obj.point_error or "no 3D point computed"),
        "description": obj.description,
    }
    geo = obj.geometry
    if geo is not None and geo.valid:
        out.update(box_refined=pixel_box(geo.box_refined), pose=pose(geo.center, geo.rotation), size=xyz(geo.size),
                   grasp=pose(geo.grasp_position, geo.grasp_rotation), grasp_width=float(geo.grasp_width),
                   geometry_valid=True, geometry_error="")
    else:
        out.update(box_refined=dict(ZERO_BOX), pose=dict(ZERO_POSE), size=dict(ZERO_POINT), grasp=dict(ZERO_POSE),
                   grasp_width=0.0, geometry_valid=False,
                   geometry_error=geo.error if geo is not None else "no geometry computed")
    return out


def describe(res: Result, queue_ms: float = 0.0) -> Dict[str, Any]:
    """Every GroundingResult field but `mask` (an image: `ros/convert.mask_image`); the header is the
    source image's stamp and frame, never a clock's."""
    t = res.timings_ms
    return {
        "id": res.id, "task": res.task, "camera": res.camera, "status": int(res.status), "error": res.error,
        "header": {"stamp": {"sec": int(res.stamp_ns // 1_000_000_000), "nanosec": int(res.stamp_ns % 1_000_000_000)},
                   "frame_id": res.frame_id},
        "image_width": int(res.width), "image_height": int(res.height),
        "text": res.text, "raw_text": res.raw_text,
        "objects": [describe_object(o) for o in res.objects],
        "presence": float(res.presence), "not_found_reason": res.not_found_reason,
        "candidates": [describe_object(o) for o in res.candidates],
        "ambiguous": bool(res.ambiguous), "ambiguity": finite(res.ambiguity),
        "answer": res.answer, "answer_probability": float(res.answer_probability),
        "geometry_frame_id": res.geometry_frame_id or res.frame_id,
        "token_ids": [int(t) for t in res.token_ids], "no_repeat_ngram_size": int(res.no_repeat_ngram_size),
        "queue_ms": float(queue_ms), "encode_ms": float(t.get("encode", 0.0)),
        "generate_ms": float(t.get("generate", 0.0)), "total_ms": float(t.get("total", 0.0)) + float(queue_ms),
    }


def to_json(res: Result, queue_ms: Optional[float] = None) -> Dict[str, Any]:
    """`describe` as a command-line user reads it: the status by name, and what the message leaves out
    (entities with all their boxes and scores, the prompt's length, model calls, each stage's ms)."""
    out = describe(res, queue_ms or 0.0)
    out.update(
        status=res.status.name.lower(),
        entities=[{"phrase": e.phrase, "span": list(e.span), "boxes_px": [list(b) for b in e.boxes_px],
                   "boxes_norm": [list(b) for b in e.boxes_norm],
                   "scores": [s if math.isfinite(s) else None for s in e.scores]} for e in res.entities],
        prompt_length=len(res.prompt_ids), model_calls=res.model_calls,
        timings_ms={k: round(v, 3) for k, v in res.timings_ms.items()})
    return out
