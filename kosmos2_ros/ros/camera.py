"""One camera of the node: its subscriptions, frames, depth pairing, intrinsics and image state.

The node serves several cameras on one model (parameter `cameras`); each is one `Camera`,
kept in a map by name. With no `cameras` the one unnamed camera reads today's topics
(`image`, `image/compressed`, `camera_info`, `depth/image`); a camera `front` reads the same
names under `front/`. camera_info and compressed follow the image topic when it is remapped
(image_transport's convention, `topics.py`), per camera.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Deque, List, Optional, Tuple

from rclpy.expand_topic_name import expand_topic_name
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import String

from kosmos2_ros.core.serving.config import Kosmos2Config
from kosmos2_ros.core.serving.frames import Frame, FrameStore, FrameUnavailable
from kosmos2_ros.core.serving.pipeline import Command, Result, Status
from kosmos2_ros.core.serving.standing import QueryState

from . import convert, visualize
from .camera_qos import MatchedSubscription
from .topics import camera_info_for, compressed_for
from .worker import FrameRejected

# Depth and colour frames are paired by stamp; a depth image this close to the colour frame counts.
DEPTH_SYNC_S = 0.5


def named_after_image(node: Any, name: str, convention: str) -> str:
    """`name` where a remap rule names it, else the image topic's sibling or child (`convention`)."""
    expanded = expand_topic_name(name, node.get_name(), node.get_namespace())
    if hasattr(node, "resolve_topic_name"):
        resolved = node.resolve_topic_name(name)
    else:  # pragma: no cover - an rclpy without Node.resolve_topic_name
        probe = node.create_subscription(String, name, lambda _msg: None, 1)
        resolved = probe.topic_name
        node.destroy_subscription(probe)
    return resolved if resolved != expanded else convention


class Camera:
    """A camera's state. Sensor callbacks (one mutually exclusive group) write it; the worker reads it."""

    def __init__(self, node: Any, name: str, config: Kosmos2Config, on_frame: Any = None) -> None:
        self._node = node
        self.name = name
        self.frames = FrameStore(config.frame_cache_size)
        self.image_error: Optional[Tuple[int, str, str]] = None   # (stamp_ns, frame_id, reason)
        self._depths: Deque[Tuple[int, Any]] = deque(maxlen=8)
        self.intrinsics = None
        self.stats = visualize.Stats()
        self.subs: List[MatchedSubscription] = []
        self.standing = QueryState()
        self._on_frame = on_frame

    def topic(self, relative: str) -> str:
        """`image` -> `front/image` for camera `front`; unchanged for the unnamed camera."""
        return f"{self.name}/{relative}" if self.name else relative

    @property
    def label(self) -> str:
        return self.name or "(default)"

    # -- subscriptions ---------------------------------------------------------------------
    def subscribe(self, cfg: Kosmos2Config, group: Any) -> None:
        """Image, camera_info, depth (and compressed), camera_info and compressed named after the image."""
        node = self._node

        def sub(msg_type: Any, topic: str, callback: Any) -> MatchedSubscription:
            return MatchedSubscription(node, msg_type, topic, callback, cfg.image_qos, group)

        image = sub(Image, self.topic("image"), self._on_image)
        subs = [image, sub(CameraInfo, named_after_image(node, self.topic("camera_info"),
                                                         camera_info_for(image.topic_name)), self._on_camera_info)]
        if cfg.enable_3d:
            subs.append(sub(Image, self.topic("depth/image"), self._on_depth))
        if cfg.use_compressed:
            subs.append(sub(CompressedImage, named_after_image(node, self.topic("image/compressed"),
                                                               compressed_for(image.topic_name)), self._on_compressed))
        self.subs = subs

    def rematch(self) -> List[str]:
        """image_qos auto: follow the publishers' reliability; what changed, to log."""
        return [change for change in (sub.rematch() for sub in list(self.subs)) if change]

    def unsubscribe(self) -> None:
        for sub in self.subs:
            sub.destroy()
        self.subs = []

    def clear(self) -> None:
        self.frames.clear()
        self.image_error = None
        self.standing.forget_frames()

    # -- sensor callbacks ------------------------------------------------------------------
    def _on_image(self, msg: Image) -> None:
        self.take_frame(msg.header, lambda: convert.image_to_rgb(msg))

    def _on_compressed(self, msg: CompressedImage) -> None:
        self.take_frame(msg.header, lambda: convert.compressed_to_rgb(msg))

    def take_frame(self, header: Any, decode: Any) -> None:
        stamp = convert.stamp_to_ns(header.stamp)
        try:
            frame = Frame(rgb=decode(), stamp_ns=stamp, frame_id=header.frame_id)
        except Exception as exc:  # noqa: BLE001 - a bad image must never kill the node
            reason = str(exc) or type(exc).__name__
            self.image_error = (stamp, header.frame_id, reason)
            self.stats.frame(False, reason)
            self._node.get_logger().warning(f"{self.topic('image')}: image rejected: {reason}",
                                            throttle_duration_sec=5.0)
            return
        self.frames.put(frame)
        self.image_error = None
        self.stats.frame(True)
        if self._on_frame is not None:
            self._on_frame(self)

    def _on_depth(self, msg: Image) -> None:
        try:
            depth = convert.depth_to_m(msg)
        except Exception as exc:  # noqa: BLE001
            self._node.get_logger().warning(f"{self.topic('depth/image')}: depth image rejected: {exc}",
                                            throttle_duration_sec=5.0)
            return
        self._depths.append((convert.stamp_to_ns(msg.header.stamp), depth))

    def _on_camera_info(self, msg: CameraInfo) -> None:
        image = self.subs[0].topic_name if self.subs else self.topic("image")
        intr = convert.intrinsics_from(msg, rectified=convert.is_rectified(image))
        if intr is not None:
            self.intrinsics = intr

    # -- frames for commands ---------------------------------------------------------------
    def resolve(self, command: Command, cfg: Kosmos2Config) -> Frame:
        """The frame a command runs on, or FrameRejected with its result (no frame, stale, bad image)."""
        error = self.image_error
        if error is not None and command.image_stamp_ns in (0, error[0]):
            res = Result.failure(command, Status.INVALID, f"last image was rejected: {error[2]}")
            res.stamp_ns, res.frame_id = error[0], error[1]
            raise FrameRejected(res)
        try:
            frame = self.frames.select(command.image_stamp_ns, cfg.max_frame_age_s)
        except FrameUnavailable as exc:
            status = Status.STALE_FRAME if exc.status == "stale_frame" else Status.NO_FRAME
            where = f"camera {self.name!r}: " if self.name else ""
            res = Result.failure(command, status, where + str(exc))
            newest = self.frames.newest()
            if status is Status.STALE_FRAME and newest is not None:
                res.stamp_ns, res.frame_id = newest.stamp_ns, newest.frame_id
            raise FrameRejected(res) from None
        self.attach_depth(frame, cfg)
        return frame

    def fresh_frame(self, cfg: Kosmos2Config) -> Optional[Frame]:
        """The newest frame if it is usable now (not stale, not rejected), with depth attached."""
        if self.image_error is not None:
            return None
        try:
            frame = self.frames.select(0, cfg.max_frame_age_s)
        except FrameUnavailable:
            return None
        self.attach_depth(frame, cfg)
        return frame

    def attach_depth(self, frame: Frame, cfg: Kosmos2Config) -> None:
        if not cfg.enable_3d or self.intrinsics is None:
            return
        if frame.intrinsics is None:
            frame.intrinsics = self.intrinsics
        if frame.depth_m is None and self._depths:
            stamp, depth = min(list(self._depths), key=lambda sd: abs(sd[0] - frame.stamp_ns))
            if abs(stamp - frame.stamp_ns) <= DEPTH_SYNC_S * 1e9:
                frame.depth_m = depth

    def diagnostics(self) -> List[Tuple[str, Any]]:
        """This camera's own entries for /diagnostics."""
        return [("frames_replaced_unused", self.frames.replaced_unused),
                ("image_error_now", self.image_error is not None),
                ("standing_queries", len(self.standing.queries)),
                ("tracks_published", self.standing.published)]
