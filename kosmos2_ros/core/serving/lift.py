"""Stage 5, lift: the boxes a result keeps -> 3D points and manipulation geometry, where depth allows.

Runs for the result's objects and candidates only (everything `interpret` dropped is gone by
now), and decides what that costs. Never fails a result: a point or geometry that cannot be
made says why.
"""
from __future__ import annotations

from ..model.grounding import GRID, Box
from ..spatial.geometry import InputGeometry, box_point_3d
from ..spatial.object_geometry import GeometryConfig, ObjectGeometry, object_geometry
from .config import Kosmos2Config
from .frames import Frame
from .results import GroundedBox, Result

#: Why a candidate has no geometry by default.
CANDIDATE_GEOMETRY_OFF = ("candidate geometry is off (candidate_geometry: false): send the candidate back as a region "
                          "command for its geometry")


class Lifter:
    """Boxes in pixels + the frame's depth and camera_info -> points and geometry, with the config's limits."""

    def __init__(self, config: Kosmos2Config) -> None:
        self.config = config

    def lift(self, res: Result, frame: Frame, geometry: InputGeometry) -> None:
        """Every object's and candidate's 3D point and geometry, in the frame's optical frame."""
        no_depth = self.no_depth_reason(frame)
        for obj in res.objects:
            self._lift_one(obj, frame, geometry, no_depth, with_geometry=True)
        for cand in res.candidates:    # each costs about an object's geometry: only when asked
            self._lift_one(cand, frame, geometry, no_depth, with_geometry=self.config.candidate_geometry)
        res.geometry_frame_id = frame.frame_id

    def no_depth_reason(self, frame: Frame) -> str:
        """Why no object of this frame can have a 3D point or geometry ("" when it can)."""
        if not self.config.enable_3d:
            return "3D is off (enable_3d: false)"
        if frame.depth_m is None and frame.depth_error:
            return f"depth image rejected: {frame.depth_error}"
        if frame.depth_m is None:
            return "no depth image paired with this frame"
        if frame.intrinsics is None:
            return "no camera_info for this camera"
        return ""

    def _lift_one(self, obj: GroundedBox, frame: Frame, geometry: InputGeometry, no_depth: str,
                  with_geometry: bool) -> None:
        cfg = self.config
        point, why = None, no_depth
        if not no_depth:
            try:
                point, why = box_point_3d(obj.box_px, frame.depth_m, frame.intrinsics, cfg.depth_inner_fraction,
                                          cfg.min_depth_m, cfg.max_depth_m, (frame.width, frame.height))
            except Exception as exc:  # noqa: BLE001 - a point that cannot be made must not fail the result
                point, why = None, f"3D point failed: {type(exc).__name__}: {exc}"
        obj.point, obj.point_error = point, why
        obj.geometry = self._object_geometry(obj.box_px, frame, geometry, no_depth) if with_geometry else \
            ObjectGeometry.invalid(CANDIDATE_GEOMETRY_OFF)

    def _object_geometry(self, box_px: Box, frame: Frame, geometry: InputGeometry, no_depth: str) -> ObjectGeometry:
        """The object's manipulation geometry, or why there is none (`no_depth`: the frame's
        `no_depth_reason`); never an error for the result."""
        cfg = self.config
        if cfg.enable_3d and not cfg.object_geometry:
            return ObjectGeometry.invalid("object geometry is off (object_geometry: false)")
        if no_depth:
            return ObjectGeometry.invalid(no_depth)
        cell = (geometry.win_w / GRID, geometry.win_h / GRID)
        try:
            return object_geometry(box_px, frame.rgb, frame.depth_m, frame.intrinsics, cell,
                                   GeometryConfig(min_depth_m=cfg.min_depth_m, max_depth_m=cfg.max_depth_m))
        except Exception as exc:  # noqa: BLE001 - a geometry failure must never lose or fail the result
            return ObjectGeometry.invalid(f"geometry failed: {type(exc).__name__}: {exc}")
