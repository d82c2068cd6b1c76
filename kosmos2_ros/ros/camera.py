"""One camera of the node: its subscriptions, frames, depth pairing, intrinsics and image state.

The node serves several cameras on one model (parameter `cameras`); each is one `Camera`,
kept in a map by name. With no `cameras` the one unnamed camera reads today's topics
(`image`, `image/compressed`, `camera_info`, `depth/image`); a camera `front` reads the same
names under `front/`. camera_info and compressed follow the image topic when it is remapped,
and compressedDepth the depth topic (image_transport's convention, `topics.py`), per camera.

Compressed colour and depth (`image_transport: compressed`, `depth_transport: compressedDepth`:
what a robot sends over WiFi) are kept as bytes when they arrive and decoded on the worker thread
when a command or a standing query needs them; raw ones are converted as they arrive (a copy).
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Tuple, Union

from rclpy.expand_topic_name import expand_topic_name
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import String

from kosmos2_ros.core.serving.config import Kosmos2Config
from kosmos2_ros.core.serving.frames import Frame, FrameStore, FrameUnavailable
from kosmos2_ros.core.serving.pipeline import Command, Result, Status
from kosmos2_ros.core.serving.standing import QueryState

from . import convert, visualize
from .camera_qos import MatchedSubscription
from .topics import camera_info_for, compressed_depth_for, compressed_for
from .worker import FrameRejected

# Depth and colour frames are paired by stamp; a depth image this close to the colour frame counts.
DEPTH_SYNC_S = 0.5


def resolved_name(node: Any, name: str) -> str:
    """The topic `name` stands for after the node's remap rules."""
    if hasattr(node, "resolve_topic_name"):
        return node.resolve_topic_name(name)
    probe = node.create_subscription(String, name, lambda _msg: None, 1)   # pragma: no cover - older rclpy
    resolved = probe.topic_name
    node.destroy_subscription(probe)
    return resolved


def named_after_image(node: Any, name: str, convention: str) -> str:
    """`name` where a remap rule names it, else the image topic's sibling or child (`convention`)."""
    resolved = resolved_name(node, name)
    return resolved if resolved != expand_topic_name(name, node.get_name(), node.get_namespace()) else convention


#: A depth image as it arrived: metres, or the compressed bytes' decoder (run when a frame needs it),
#: or the reason it could not be read.
DepthEntry = Union[Any, Callable[[], Any], str]


class Camera:
    """A camera's state. Sensor callbacks (one mutually exclusive group) write it; the worker reads it."""

    def __init__(self, node: Any, name: str, config: Kosmos2Config, on_frame: Any = None) -> None:
        self._node = node
        self.name = name
        self.frames = FrameStore(config.frame_cache_size)
        self.image_error: Optional[Tuple[int, str, str]] = None   # (stamp_ns, frame_id, reason)
        self._depths: Deque[Tuple[int, DepthEntry]] = deque(maxlen=8)
        self._depth_lock = threading.Lock()       # the sensor thread appends, the worker decodes in place
        self.intrinsics = None
        self.stats = visualize.Stats()
        self.subs: List[MatchedSubscription] = []
        self._image_topic = self.topic("image")
        self.decoded = 0                          # compressed frames decoded (only those a command or query used)
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
        """Image (raw, compressed or both), camera_info, depth (raw or compressedDepth); camera_info and the
        compressed topics named after the image and depth topics."""
        node = self._node

        def sub(msg_type: Any, topic: str, callback: Any) -> MatchedSubscription:
            return MatchedSubscription(node, msg_type, topic, callback, cfg.image_qos, group)

        image_topic = resolved_name(node, self.topic("image"))
        subs = []
        if cfg.image_transport == "raw":
            subs.append(sub(Image, self.topic("image"), self._on_image))
        if cfg.image_transport == "compressed" or cfg.use_compressed:
            subs.append(sub(CompressedImage, named_after_image(node, self.topic("image/compressed"),
                                                               compressed_for(image_topic)), self._on_compressed))
        subs.append(sub(CameraInfo, named_after_image(node, self.topic("camera_info"), camera_info_for(image_topic)),
                        self._on_camera_info))
        if cfg.enable_3d and cfg.depth_transport == "raw":
            subs.append(sub(Image, self.topic("depth/image"), self._on_depth))
        elif cfg.enable_3d:
            depth_topic = resolved_name(node, self.topic("depth/image"))
            subs.append(sub(CompressedImage, named_after_image(node, self.topic("depth/image/compressedDepth"),
                                                               compressed_depth_for(depth_topic)),
                            self._on_compressed_depth))
        self._image_topic = image_topic
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
        with self._depth_lock:
            self._depths.clear()
        self.image_error = None
        self.standing.forget_frames()

    # -- sensor callbacks ------------------------------------------------------------------
    def _on_image(self, msg: Image) -> None:
        self.take_frame(msg.header, lambda: convert.image_to_rgb(msg))

    def _on_compressed(self, msg: CompressedImage) -> None:
        """Kept as bytes: decoded on the worker thread if a command or standing query needs this frame."""
        stamp = convert.stamp_to_ns(msg.header.stamp)
        if not len(msg.data):
            self._reject_image(stamp, msg.header.frame_id, "compressed image has no data")
            return
        self._keep(Frame(pending=lambda: convert.compressed_to_rgb(msg), stamp_ns=stamp,
                         frame_id=msg.header.frame_id))

    def take_frame(self, header: Any, decode: Any) -> None:
        stamp = convert.stamp_to_ns(header.stamp)
        try:
            frame = Frame(rgb=decode(), stamp_ns=stamp, frame_id=header.frame_id)
        except Exception as exc:  # noqa: BLE001 - a bad image must never kill the node
            self._reject_image(stamp, header.frame_id, str(exc) or type(exc).__name__)
            return
        self._keep(frame)

    def _keep(self, frame: Frame) -> None:
        self.frames.put(frame)
        self.image_error = None
        self.stats.frame(True)
        if self._on_frame is not None:
            self._on_frame(self)

    def _reject_image(self, stamp: int, frame_id: str, reason: str) -> None:
        self.image_error = (stamp, frame_id, reason)
        self.stats.frame(False, reason)
        self._node.get_logger().warning(f"{self._image_topic}: image rejected: {reason}", throttle_duration_sec=5.0)

    def _on_depth(self, msg: Image) -> None:
        try:
            depth = convert.depth_to_m(msg)
        except Exception as exc:  # noqa: BLE001
            self._reject_depth(str(exc))
            return
        self._add_depth(convert.stamp_to_ns(msg.header.stamp), depth)

    def _on_compressed_depth(self, msg: CompressedImage) -> None:
        """Kept as bytes, like a compressed colour frame; decoded when a frame pairs with it."""
        self._add_depth(convert.stamp_to_ns(msg.header.stamp), lambda: convert.compressed_depth_to_m(msg))

    def _add_depth(self, stamp: int, entry: DepthEntry) -> None:
        self.stats.depth(True)
        with self._depth_lock:
            self._depths.append((stamp, entry))

    def _reject_depth(self, reason: str) -> None:
        self.stats.depth(False, reason)
        self._node.get_logger().warning(f"{self.topic('depth/image')}: depth image rejected: {reason}",
                                        throttle_duration_sec=5.0)

    def _on_camera_info(self, msg: CameraInfo) -> None:
        intr = convert.intrinsics_from(msg, rectified=convert.is_rectified(self._image_topic))
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
        why = self._decode(frame)
        if why:
            res = Result.failure(command, Status.INVALID, f"image rejected: {why}")
            res.stamp_ns, res.frame_id = frame.stamp_ns, frame.frame_id
            raise FrameRejected(res)
        self.attach_depth(frame, cfg)
        return frame

    def fresh_frame(self, cfg: Kosmos2Config, decode: bool = True) -> Optional[Frame]:
        """The newest frame if it is usable now (not stale, not rejected), ready (`ready`) unless `decode` is
        False: idle work asks first and decodes only the frame it will use."""
        if self.image_error is not None:
            return None
        try:
            frame = self.frames.select(0, cfg.max_frame_age_s)
        except FrameUnavailable:
            return None
        if frame.decode_error:
            return None
        return self.ready(frame, cfg) if decode else frame

    def ready(self, frame: Frame, cfg: Kosmos2Config) -> Optional[Frame]:
        """The frame with its pixels decoded and its depth attached; None when its pixels would not decode."""
        if not self.decode_pixels(frame):
            return None
        self.attach_depth(frame, cfg)
        return frame

    def decode_pixels(self, frame: Frame) -> bool:
        """Whether the frame's pixels are there, decoding compressed ones now (encoding ahead needs no depth)."""
        return not self._decode(frame)

    def _decode(self, frame: Frame) -> str:
        """A compressed frame's pixels decoded now (worker thread); why not, counted the first time. Only the
        worker calls it; Frame.decode itself is locked, so the check outside it is only a shortcut."""
        if frame.rgb is not None or frame.decode_error:
            return frame.decode_error
        why = frame.decode()
        self.decoded += not why
        if why:
            self.stats.rejected_late(why)
            self._node.get_logger().warning(f"{self._image_topic}: image rejected: {why}", throttle_duration_sec=5.0)
        return why

    def attach_depth(self, frame: Frame, cfg: Kosmos2Config) -> None:
        """The depth image nearest the frame's stamp (within DEPTH_SYNC_S), decoded here when compressed."""
        if not cfg.enable_3d or self.intrinsics is None:
            return
        if frame.intrinsics is None:
            frame.intrinsics = self.intrinsics
        if frame.depth_m is not None or frame.depth_error:
            return
        with self._depth_lock:
            if not self._depths:
                return
            stamp, entry = min(self._depths, key=lambda sd: abs(sd[0] - frame.stamp_ns))
        if abs(stamp - frame.stamp_ns) > DEPTH_SYNC_S * 1e9:
            return
        if callable(entry):
            decoder = entry
            try:
                entry = decoder()
            except Exception as exc:  # noqa: BLE001 - a bad depth image costs this frame its 3D, nothing more
                entry = str(exc) or type(exc).__name__
                self._reject_depth(entry)
            with self._depth_lock:       # decoded once, whichever frames pair with it (found by identity:
                for i, (_, held) in enumerate(self._depths):   # the deque may have shifted meanwhile)
                    if held is decoder:
                        self._depths[i] = (stamp, entry)
                        break
        if isinstance(entry, str):
            frame.depth_error = entry
        else:
            frame.depth_m = entry

    def diagnostics(self) -> List[Tuple[str, Any]]:
        """This camera's own entries for /diagnostics."""
        return [("frames_replaced_unused", self.frames.replaced_unused),
                ("image_topic", self._image_topic),
                ("compressed_frames_decoded", self.decoded),
                ("image_error_now", self.image_error is not None),
                ("standing_queries", len(self.standing.queries)),
                ("standing_checks", len(self.standing.checks)),
                ("tracks_published", self.standing.published)]
