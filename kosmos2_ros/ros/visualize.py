"""What people look at: the debug image, RViz markers, and /diagnostics.

Built from results the node already has; nothing here touches the model.
"""
from __future__ import annotations

import threading
from collections import Counter, deque
from typing import Deque, Dict, Iterable, Optional

import numpy as np
from builtin_interfaces.msg import Duration
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Point
from sensor_msgs.msg import Image
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

from kosmos2_ros.core.serving.annotate import PALETTE, draw_result
from kosmos2_ros.core.serving.pipeline import Result, Status
from kosmos2_ros.core.spatial.object_geometry import rotation_matrix
from kosmos2_ros.msg import GroundingResult

from .convert import rgb_to_image


def debug_image(rgb: np.ndarray, result: Result, header: Header) -> Image:
    """The frame with the result's boxes and phrases drawn (bgr8, the source image's header)."""
    title = result.text[:80] if result.text else None
    return rgb_to_image(draw_result(rgb, result, title), header, "bgr8")


def markers(result: GroundingResult, lifetime_s: float = 5.0, ns: str = "kosmos2") -> MarkerArray:
    """Per object with geometry: its 3D box (translucent CUBE), the grasp approach (ARROW along the
    grasp's z, ending at the grasp point) and a label, in the result's geometry frame; per object
    with only a 3D point: a sphere and a label in the image's frame."""
    out = MarkerArray()
    life = Duration(sec=int(lifetime_s), nanosec=int((lifetime_s % 1) * 1e9))
    out.markers.append(Marker(header=result.header, ns=ns, action=Marker.DELETEALL))
    geo_header = Header(stamp=result.header.stamp, frame_id=result.geometry_frame_id or result.header.frame_id)
    next_id = 0

    def add(header: Header, kind: int, color: ColorRGBA, **fields) -> Marker:
        nonlocal next_id
        m = Marker(header=header, ns=ns, id=next_id, type=kind, action=Marker.ADD, lifetime=life, color=color, **fields)
        next_id += 1
        out.markers.append(m)
        return m

    for obj in result.objects:
        r, g, b = PALETTE[obj.entity_index % len(PALETTE)]
        if obj.geometry_valid:
            cube = add(geo_header, Marker.CUBE, ColorRGBA(r=r / 255.0, g=g / 255.0, b=b / 255.0, a=0.35))
            cube.pose = obj.pose
            cube.scale.x, cube.scale.y, cube.scale.z = (max(obj.size.x, 0.005), max(obj.size.y, 0.005),
                                                        max(obj.size.z, 0.005))
            arrow = add(geo_header, Marker.ARROW, ColorRGBA(r=1.0, g=1.0, b=1.0, a=0.9))
            tip = np.array([obj.grasp.position.x, obj.grasp.position.y, obj.grasp.position.z])
            q = obj.grasp.orientation
            approach = rotation_matrix(q.x, q.y, q.z, q.w)[:, 2]
            arrow.points = [Point(x=float(p[0]), y=float(p[1]), z=float(p[2])) for p in (tip - 0.12 * approach, tip)]
            arrow.scale.x, arrow.scale.y, arrow.scale.z = 0.01, 0.02, 0.03   # shaft, head diameters, head length
            label = add(geo_header, Marker.TEXT_VIEW_FACING, ColorRGBA(r=1.0, g=1.0, b=1.0, a=1.0),
                        text=obj.phrase or "?")
            label.pose.position = Point(x=float(tip[0] - 0.15 * approach[0]), y=float(tip[1] - 0.15 * approach[1]),
                                        z=float(tip[2] - 0.15 * approach[2]))
            label.pose.orientation.w = 1.0
            label.scale.z = 0.05
        elif obj.point_valid:
            sphere = add(result.header, Marker.SPHERE, ColorRGBA(r=r / 255.0, g=g / 255.0, b=b / 255.0, a=0.9))
            sphere.pose.position = obj.point
            sphere.pose.orientation.w = 1.0
            sphere.scale.x = sphere.scale.y = sphere.scale.z = 0.08
            text = add(result.header, Marker.TEXT_VIEW_FACING, ColorRGBA(r=1.0, g=1.0, b=1.0, a=1.0),
                       text=obj.phrase or "?")
            text.pose.position.x, text.pose.position.y = obj.point.x, obj.point.y - 0.08   # optical frame: y is down
            text.pose.position.z = obj.point.z
            text.pose.orientation.w = 1.0
            text.scale.z = 0.06
    return out


class Stats:
    """Counters and recent latencies for /diagnostics. Thread-safe."""

    def __init__(self, window: int = 200) -> None:
        self._lock = threading.Lock()
        self.latencies_ms: Deque[float] = deque(maxlen=window)
        self.by_status: Counter = Counter()
        self.frames_received = 0
        self.frames_rejected = 0
        self.last_image_error = ""
        self.depth_received = 0
        self.depth_rejected = 0
        self.last_depth_error = ""
        self.geometry_reasons: Counter = Counter()
        self.point_reasons: Counter = Counter()

    def frame(self, ok: bool, error: str = "") -> None:
        with self._lock:
            self.frames_received += 1
            if not ok:
                self.frames_rejected += 1
                self.last_image_error = error

    def rejected_late(self, error: str) -> None:
        """A frame counted when it arrived whose compressed pixels would not decode when it was needed."""
        with self._lock:
            self.frames_rejected += 1
            self.last_image_error = error

    def depth(self, ok: bool, error: str = "") -> None:
        """A depth image arrived (ok), or one would not read (counted once, when it arrives or is decoded)."""
        with self._lock:
            if ok:
                self.depth_received += 1
            else:
                self.depth_rejected += 1
                self.last_depth_error = error

    def geometry_invalid(self, error: str) -> bool:
        """Count an object without geometry by the kind of reason; True the first time that kind is seen."""
        return self._count(self.geometry_reasons, error)

    def point_invalid(self, error: str) -> bool:
        """Count an object without a 3D point by the kind of reason; True the first time that kind is seen."""
        return self._count(self.point_reasons, error)

    def _count(self, reasons: Counter, error: str) -> bool:
        kind = error.split(" (")[0].split(":")[0].strip() or "unknown"
        with self._lock:
            reasons[kind] += 1
            return reasons[kind] == 1

    def result(self, status: int, total_ms: float) -> None:
        with self._lock:
            self.by_status[Status(status).name] += 1
            if status == Status.OK:
                self.latencies_ms.append(total_ms)

    def percentile(self, q: float) -> float:
        with self._lock:
            data = list(self.latencies_ms)
        return float(np.percentile(data, q)) if data else 0.0

    def snapshot(self) -> Dict[str, str]:
        p50, p95 = self.percentile(50), self.percentile(95)
        with self._lock:
            values = {
                "latency_p50_ms": f"{p50:.1f}", "latency_p95_ms": f"{p95:.1f}",
                "frames_received": str(self.frames_received), "frames_rejected": str(self.frames_rejected),
                "commands_ok": str(self.by_status.get("OK", 0)),
                "commands_failed": str(sum(v for k, v in self.by_status.items() if k != "OK")),
                "last_image_error": self.last_image_error,
                "depth_received": str(self.depth_received), "depth_rejected": str(self.depth_rejected),
                "last_depth_error": self.last_depth_error,
                "geometry_invalid": str(sum(self.geometry_reasons.values())),
                "geometry_invalid_reasons": "; ".join(f"{k}: {v}" for k, v in self.geometry_reasons.most_common()),
                "point_invalid": str(sum(self.point_reasons.values())),
                "point_invalid_reasons": "; ".join(f"{k}: {v}" for k, v in self.point_reasons.most_common()),
            }
            for st in Status:
                if st is not Status.OK:
                    values[f"commands_{st.name.lower()}"] = str(self.by_status.get(st.name, 0))
        return values


def diagnostics(stats: Stats, stamp, state: str, model: str, extra: Optional[Iterable] = None,
                name: str = "kosmos2: grounding") -> DiagnosticArray:
    """One DiagnosticStatus: OK when active, WARN when not active or the last image was rejected."""
    values = stats.snapshot()
    values["state"] = state
    for key, value in extra or ():
        values[key] = str(value)
    level, message = DiagnosticStatus.OK, "active"
    if state != "active":
        level, message = DiagnosticStatus.WARN, f"not active ({state})"
    elif values.get("image_error_now") == "True":
        level, message = DiagnosticStatus.WARN, "last image rejected: " + values["last_image_error"]
    status = DiagnosticStatus(level=level, name=name, message=message, hardware_id=model,
                              values=[KeyValue(key=k, value=v) for k, v in values.items()])
    return DiagnosticArray(header=Header(stamp=stamp), status=[status])
