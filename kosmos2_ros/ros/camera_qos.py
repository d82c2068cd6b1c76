"""The camera subscriptions' QoS: match what the camera publishes, and say so when it cannot.

Large frames (640x480 and up) over Fast DDS arrive intact on a reliable subscription to a
reliable publisher, but a best-effort subscription drops most of them: a frame is hundreds of
UDP fragments, and one lost fragment loses the frame. So with `image_qos: auto` the node
subscribes reliably when every publisher on the topic is reliable, and best effort as soon as
one is not (a reliable subscription would not match it at all). rmw's BEST_AVAILABLE (Iron
and later) decides this once, when the subscription is made, and picks reliable when no
camera is up yet, which then never matches a best-effort camera started later; the node
instead re-decides whenever the publishers change, the same way on every distro.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, Optional

from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

try:  # Iron and later
    from rclpy.event_handler import SubscriptionEventCallbacks
except ImportError:  # pragma: no cover - Humble
    from rclpy.qos_event import SubscriptionEventCallbacks  # type: ignore[no-redef]

__all__ = ["MatchedSubscription", "image_qos", "matching_reliability", "reliability_name"]


def matching_reliability(publishers: Iterable[ReliabilityPolicy]) -> ReliabilityPolicy:
    """Reliable when every publisher (at least one) is reliable; best effort otherwise.

    Best effort is compatible with every publisher, so it is also the choice while no camera
    publishes yet; the node switches once one appears.
    """
    policies = list(publishers)
    if policies and all(p == ReliabilityPolicy.RELIABLE for p in policies):
        return ReliabilityPolicy.RELIABLE
    return ReliabilityPolicy.BEST_EFFORT


def image_qos(name: str, reliability: Optional[ReliabilityPolicy] = None) -> QoSProfile:
    """Depth 1 (newest frame only). sensor_data: best effort; reliable: reliable;
    auto: `reliability` (from `matching_reliability`)."""
    if name == "sensor_data":
        reliability = ReliabilityPolicy.BEST_EFFORT
    elif name == "reliable":
        reliability = ReliabilityPolicy.RELIABLE
    elif reliability is None:
        reliability = ReliabilityPolicy.BEST_EFFORT
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=reliability)


def reliability_name(policy: ReliabilityPolicy) -> str:
    return "reliable" if policy == ReliabilityPolicy.RELIABLE else "best effort"


class MatchedSubscription:
    """One camera-side subscription; with `image_qos: auto` its reliability follows its publishers.

    Any incompatible publisher (e.g. a best-effort camera against `image_qos: reliable`) is
    logged with what to change, since DDS otherwise drops every frame without a word.
    """

    def __init__(self, node: Any, msg_type: Any, topic: str, callback: Callable[[Any], None], mode: str,
                 group: Any) -> None:
        self._node, self._msg_type, self._callback, self._mode, self._group = node, msg_type, callback, mode, group
        self._topic = topic
        # activate and the node's one-second timer rematch from two threads: one at a time, or
        # both destroy the same subscription (seen on Jazzy: "cannot use Destroyable ...").
        self._lock = threading.Lock()
        self.sub: Any = None
        self.reliability: Optional[ReliabilityPolicy] = None
        self._make(None)

    @property
    def topic_name(self) -> str:
        return self.sub.topic_name

    def _make(self, reliability: Optional[ReliabilityPolicy]) -> None:
        qos = image_qos(self._mode, reliability)
        events = SubscriptionEventCallbacks(incompatible_qos=self._on_incompatible)
        self.sub = self._node.create_subscription(self._msg_type, self._topic, self._callback, qos,
                                                  callback_group=self._group, event_callbacks=events)
        self.reliability = qos.reliability

    def rematch(self) -> Optional[str]:
        """auto: subscribe anew when the publishers call for the other reliability; says so."""
        if self._mode != "auto":
            return None
        with self._lock:
            infos = self._node.get_publishers_info_by_topic(self.sub.topic_name)
            want = matching_reliability(info.qos_profile.reliability for info in infos)
            if want == self.reliability:
                return None
            self._node.destroy_subscription(self.sub)
            self._make(want)
        offered = sorted({reliability_name(info.qos_profile.reliability) for info in infos}) or ["none yet"]
        return (f"{self.sub.topic_name}: publishers offer {', '.join(offered)}; "
                f"subscribing {reliability_name(want)} (image_qos: auto)")

    def _on_incompatible(self, event: Any) -> None:
        self._node.get_logger().warning(
            f"{self.sub.topic_name}: a publisher's QoS is incompatible with this subscription "
            f"({reliability_name(self.reliability)}; policy {getattr(event, 'last_policy_kind', '?')}), so its "
            f"messages are dropped; set image_qos: auto (or sensor_data for a best-effort camera)",
            throttle_duration_sec=10.0)

    def destroy(self) -> None:
        with self._lock:
            self._node.destroy_subscription(self.sub)
