"""What the node publishes for each result, and its diagnostics.

One result message per command on ~/result (reliable, deep history), then, for a result with
boxes, the debug image (only while someone subscribes), RViz markers (objects with 3D points) and
vision_msgs detections where that package exists. Visualisation failing never loses the result.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Tuple

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from visualization_msgs.msg import MarkerArray

from kosmos2_ros.core.config import Kosmos2Config
from kosmos2_ros.core.frames import Frame
from kosmos2_ros.core.pipeline import Result, Status
from kosmos2_ros.msg import GroundingResult

from . import convert, visualize
from .camera_qos import image_qos

# Result publisher history: reliable KEEP_LAST drops unacknowledged samples past this depth, so it
# is far above what a burst of BUSY answers can produce before the subscriber acknowledges them.
RESULT_HISTORY = 1000


class ResultPublishers:
    """The node's output topics: ~/result, ~/debug_image, ~/markers, ~/detections and /diagnostics."""

    def __init__(self, node: Any, stats: visualize.Stats) -> None:
        self._node = node
        self.stats = stats
        reliable = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=RESULT_HISTORY,
                              reliability=ReliabilityPolicy.RELIABLE)
        self.result = node.create_publisher(GroundingResult, "~/result", reliable)
        self.debug = node.create_publisher(Image, "~/debug_image", image_qos("reliable"))
        self.markers = node.create_publisher(MarkerArray, "~/markers", 10)
        self.diagnostics = node.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.detections = None
        if convert.HAVE_VISION_MSGS:  # pragma: no cover - vision_msgs absent here
            from vision_msgs.msg import Detection2DArray

            self.detections = node.create_publisher(Detection2DArray, "~/detections", 10)

    def publish(self, result: Result, frame: Optional[Frame], queue_ms: float, config: Kosmos2Config) -> GroundingResult:
        """Publish a command's one result (and debug image, markers, detections); returns its message."""
        logger = self._node.get_logger()
        msg = convert.result_to_msg(result, queue_ms)
        self.result.publish(msg)
        self.stats.result(msg.status, msg.total_ms)
        if result.status is Status.MODEL_ERROR:
            logger.error(f"command {result.id!r}: model error: {result.error}", throttle_duration_sec=1.0)
        if frame is None or result.status is not Status.OK:
            return msg
        try:
            if self.detections is not None:  # pragma: no cover - vision_msgs absent here
                self.detections.publish(convert.detections_from(msg))
            if config.publish_debug_image and self.debug.get_subscription_count() > 0:
                self.debug.publish(visualize.debug_image(frame.rgb, result, msg.header))
            if config.enable_3d and any(o.point_valid for o in msg.objects):
                self.markers.publish(visualize.markers(msg))
        except Exception as exc:  # noqa: BLE001 - visualisation must not lose the result
            logger.warning(f"visualisation failed: {exc}", throttle_duration_sec=5.0)
        return msg

    def publish_diagnostics(self, state_label: str, model: str, extra: Iterable[Tuple[str, Any]]) -> None:
        node = self._node
        self.diagnostics.publish(visualize.diagnostics(self.stats, node.get_clock().now().to_msg(), state_label,
                                                       model, list(extra),
                                                       name=f"{node.get_fully_qualified_name()}: grounding"))
