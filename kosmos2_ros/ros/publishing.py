"""What the node publishes for each result, for each frame of standing queries, and its diagnostics.

One result message per command on ~/result (reliable, deep history), then, for a result with
boxes, the debug image (only while someone subscribes), RViz markers (3D boxes, grasp approaches
and labels where objects have geometry; points otherwise; one namespace per camera), the objects'
points on ~/object_cloud (only while someone subscribes) and vision_msgs detections (2D, and 3D
where objects have geometry) where that package exists; standing queries' answers on ~/tracks
with the same views. Visualisation failing never loses a result.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Tuple

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image, PointCloud2
from std_msgs.msg import Header
from visualization_msgs.msg import MarkerArray

from kosmos2_ros.core.serving.config import Kosmos2Config
from kosmos2_ros.core.serving.frames import Frame
from kosmos2_ros.core.serving.pipeline import Result, Status
from kosmos2_ros.msg import GroundingResult, ObjectCloud, Tracks

from . import convert, visualize
from .camera_qos import image_qos

# Result publisher history: reliable KEEP_LAST drops unacknowledged samples past this depth, so it
# is far above what a burst of BUSY answers can produce before the subscriber acknowledges them.
RESULT_HISTORY = 1000


class ResultPublishers:
    """The node's output topics: ~/result, ~/tracks, ~/debug_image, ~/markers, ~/detections, /diagnostics."""

    def __init__(self, node: Any) -> None:
        self._node = node
        reliable = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=RESULT_HISTORY,
                              reliability=ReliabilityPolicy.RELIABLE)
        self.result = node.create_publisher(GroundingResult, "~/result", reliable)
        self.tracks = node.create_publisher(Tracks, "~/tracks", 10)
        self.debug = node.create_publisher(Image, "~/debug_image", image_qos("reliable"))
        self.markers = node.create_publisher(MarkerArray, "~/markers", 10)
        self.diagnostics = node.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.cloud = node.create_publisher(PointCloud2, "~/object_cloud", 10)
        self.clouds = node.create_publisher(ObjectCloud, "~/object_clouds", 10)   # the same, with its result's id
        self.detections = self.detections_3d = None
        if convert.HAVE_VISION_MSGS:  # pragma: no cover - vision_msgs absent here
            from vision_msgs.msg import Detection2DArray, Detection3DArray

            self.detections = node.create_publisher(Detection2DArray, "~/detections", 10)
            self.detections_3d = node.create_publisher(Detection3DArray, "~/detections_3d", 10)

    def publish(self, msg: GroundingResult, result: Result, frame: Optional[Frame], config: Kosmos2Config,
                stats: visualize.Stats) -> None:
        """Publish a command's one result message (and its views); counts it in `stats`."""
        self.result.publish(msg)
        stats.result(msg.status, msg.total_ms)
        self._count_geometry(result, stats)
        if result.status is Status.MODEL_ERROR:
            self._node.get_logger().error(f"command {result.id!r}: model error: {result.error}",
                                          throttle_duration_sec=1.0)
        if frame is not None and result.status is Status.OK:
            self._views(msg, result, frame, config, cloud=True)

    def publish_tracks(self, msg: Tracks, frame: Frame, combined: Result, config: Kosmos2Config) -> None:
        """A frame's standing-query answers on ~/tracks, and the usual views of them."""
        self.tracks.publish(msg)
        self._views(convert.result_to_msg(combined, masks=False), combined, frame, config)

    def _views(self, msg: GroundingResult, result: Result, frame: Frame, config: Kosmos2Config,
               cloud: bool = False) -> None:
        """Debug image, markers, detections; the object cloud for command results (`cloud`) only, so
        a cloud on ~/object_cloud is always one result's (its stamp and frame say which frame)."""
        try:
            if self.detections is not None:  # pragma: no cover - vision_msgs absent here
                self.detections.publish(convert.detections_from(msg))
            if config.publish_debug_image and self.debug.get_subscription_count() > 0:
                self.debug.publish(visualize.debug_image(frame.rgb, result, msg.header))
            if self.detections_3d is not None and any(o.geometry_valid for o in msg.objects):  # pragma: no cover
                self.detections_3d.publish(convert.detections_3d_from(msg))
            if config.enable_3d and any(o.point_valid or o.geometry_valid for o in msg.objects):
                ns = f"kosmos2/{result.camera}" if result.camera else "kosmos2"
                self.markers.publish(visualize.markers(msg, ns=ns))
            if cloud and (self.cloud.get_subscription_count() > 0 or self.clouds.get_subscription_count() > 0):
                points = convert.cloud_of(result)
                if points is not None:
                    self.cloud.publish(points)
                    self.clouds.publish(ObjectCloud(header=points.header, result_id=result.id, camera=result.camera,
                                                    cloud=points))
        except Exception as exc:  # noqa: BLE001 - visualisation must not lose the result
            self._node.get_logger().warning(f"visualisation failed: {exc}", throttle_duration_sec=5.0)

    def _count_geometry(self, result: Result, stats: visualize.Stats) -> None:
        """Why objects have no 3D point or no geometry, counted per reason (diagnostics); the first of
        each kind logged. A reason that is a parameter turned off says nothing new and is not counted."""
        for obj in result.objects:
            if obj.point is None and obj.point_error and not obj.point_error.endswith(": false)") \
                    and stats.point_invalid(obj.point_error):
                self._node.get_logger().warning(f"command {result.id!r}: object {obj.phrase!r} has no 3D point: "
                                                f"{obj.point_error} (counted in /diagnostics; logged once per kind)")
            geo = obj.geometry
            if geo is None or geo.valid or geo.error.endswith(": false)"):
                continue
            if stats.geometry_invalid(geo.error):
                self._node.get_logger().warning(f"command {result.id!r}: object {obj.phrase!r} has no geometry: "
                                                f"{geo.error} (counted in /diagnostics; logged once per kind)")

    def publish_diagnostics(self, state_label: str, model: str,
                            cameras: Iterable[Tuple[str, visualize.Stats, list]]) -> None:
        """One status per camera (name, stats, extra key/values), named by the node's full name."""
        node = self._node
        stamp = node.get_clock().now().to_msg()
        out = DiagnosticArray(header=Header(stamp=stamp))
        for name, stats, extra in cameras:
            suffix = f" ({name})" if name else ""
            out.status.extend(visualize.diagnostics(stats, stamp, state_label, model, extra,
                                                    name=f"{node.get_fully_qualified_name()}: grounding{suffix}").status)
        self.diagnostics.publish(out)
