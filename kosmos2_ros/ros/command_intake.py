"""How the node's command subscriptions are made, and the QoS warning they would otherwise lose.

rclpy gives every subscription a QoS-event waitable by default (its incompatible-QoS warning).
On the command topics that waitable costs far more than the warning is worth: under a flood of
300 commands/s on two cores, commands waited 0.1-0.7 s in the subscription before the node read
them with it, and 10-14 ms without it (Kilted; on Jazzy 51 -> 12 ms; bench/stress_node.py,
README "Stress"). So the command subscriptions are created without event waitables, and
`CommandPublisherCheck` (called once a second) gives the warning they would have given: a
best-effort command publisher can never reach the node's reliable command subscription.
"""
from __future__ import annotations

from typing import Any, Iterable, List, Set, Tuple

from rclpy.qos import ReliabilityPolicy

#: Commands a command subscription holds before the executor reads them (a burst waits, is not dropped).
COMMAND_HISTORY = 1000

try:  # Iron and later
    from rclpy.event_handler import SubscriptionEventCallbacks
except ImportError:  # pragma: no cover - Humble
    from rclpy.qos_event import SubscriptionEventCallbacks  # type: ignore[no-redef]


def without_event_waitables() -> Any:
    """`event_callbacks` for a subscription that adds no QoS-event waitable to the executor."""
    return SubscriptionEventCallbacks(use_default_callbacks=False)


def best_effort_publishers(endpoints: Iterable[Any]) -> List[str]:
    """Full names of the nodes among `endpoints` (rclpy TopicEndpointInfo) publishing best effort."""
    out = []
    for info in endpoints:
        if info.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT:
            ns = info.node_namespace.rstrip("/")
            out.append(f"{ns}/{info.node_name}")
    return out


class CommandPublisherCheck:
    """Warns once per (topic, publisher node) about a command publisher the node cannot hear."""

    def __init__(self, topics: Iterable[str]) -> None:
        self.topics = list(topics)
        self.warned: Set[Tuple[str, str]] = set()

    def check(self, node: Any) -> List[str]:
        """Query the graph and log a warning for each new best-effort publisher; returns the new warnings."""
        messages = []
        for topic in self.topics:
            for name in best_effort_publishers(node.get_publishers_info_by_topic(topic)):
                if (topic, name) in self.warned:
                    continue
                self.warned.add((topic, name))
                messages.append(f"{name} publishes {topic} best effort; the node reads commands reliably, so "
                                "none of them will arrive: publish commands with reliable QoS (the default)")
                node.get_logger().warning(messages[-1])
        return messages
