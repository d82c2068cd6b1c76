"""Geometry into `target_frame`: the one place that imports tf2_ros, and the policy around it.

tf2_ros is not on PyPI (CI cannot have it), so the tf2 call is `TfTransforms.lookup`, a few lines;
everything behind it (applying the transform to poses, points and clouds, the stamp, what a
missing transform does to a result) is `GeometryFrames`, which takes any object with that
`lookup` and is tested with transforms given directly (`test/test_tf_adapter.py`).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Tuple

import numpy as np

from kosmos2_ros.core.serving.pipeline import Result, Status
from kosmos2_ros.core.spatial.object_geometry import invalidate_objects, move_objects, rotation_matrix

#: What configure says when target_frame is set and tf2_ros is missing.
# The Python module tf2_ros is in the package tf2_ros_py (tf2_ros is C++ only), on Humble as on later distros.
TF2_MISSING = ("target_frame is set but tf2_ros is not importable: install it (apt install ros-$ROS_DISTRO-tf2-ros-py) "
               "or leave target_frame empty (geometry in the camera's optical frame)")


class TransformUnavailable(Exception):
    """No transform from the image's frame into target_frame at its stamp (the text says which and why)."""


class Transforms(Protocol):
    def lookup(self, target: str, source: str, stamp_ns: int, timeout_s: float) -> Tuple[np.ndarray, np.ndarray]:
        """(rotation 3x3, translation) taking points in `source` to `target` at `stamp_ns`."""


class TfTransforms:
    """tf2's buffer and listener on the node (raises ImportError without tf2_ros)."""

    def __init__(self, node: Any) -> None:
        import tf2_ros

        self._buffer = tf2_ros.Buffer()
        self._listener = tf2_ros.TransformListener(self._buffer, node)

    def close(self) -> None:
        """Stop listening (the listener's /tf subscriptions go with it)."""
        self._listener.unregister()

    def lookup(self, target: str, source: str, stamp_ns: int, timeout_s: float) -> Tuple[np.ndarray, np.ndarray]:
        from rclpy.duration import Duration
        from rclpy.time import Time

        try:
            tf = self._buffer.lookup_transform(target, source, Time(nanoseconds=int(stamp_ns)),
                                               timeout=Duration(seconds=float(timeout_s)))
        except Exception as exc:  # noqa: BLE001 - tf2's LookupException, ExtrapolationException, ...
            # tf2's text names the frames and, for a stamp outside the buffer, the newest data's time
            raise TransformUnavailable(f"no transform {source} -> {target} at the image's stamp: {exc}") from None
        q, t = tf.transform.rotation, tf.transform.translation
        return rotation_matrix(q.x, q.y, q.z, q.w), np.array([t.x, t.y, t.z])


class GeometryFrames:
    """Puts each result's object geometry in target_frame (or leaves it in the camera's frame).

    A node serving several robots has one target frame per robot (`per_camera`: camera name -> frame,
    from the parameter target_frames): r1's grasp in r1/base_link, r2's in r2/base_link."""

    def __init__(self, target_frame: str, timeout_s: float, transforms: Optional[Transforms],
                 warn: Callable[[str], None], per_camera: Optional[Mapping[str, str]] = None) -> None:
        self.target, self.timeout_s, self.transforms, self._warn = target_frame, timeout_s, transforms, warn
        self.per_camera = {camera: frame for camera, frame in (per_camera or {}).items() if frame}
        self._warned: set = set()          # target frames already warned about (each robot's once)
        self.failures = 0

    def target_of(self, camera: str) -> str:
        return self.per_camera.get(camera, self.target)

    def close(self) -> None:
        if self.transforms is not None and hasattr(self.transforms, "close"):
            self.transforms.close()
        self.transforms = None

    def place(self, results: Iterable[Result]) -> None:
        """Every box a result holds (its objects and its candidates: a planner may act on either, and
        `geometry_frame_id` names one frame for all) moved into target_frame, or made invalid with why."""
        for res in results:
            target = self.target_of(res.camera)
            if not target or res.status is not Status.OK:
                continue
            held = list(res.objects) + list(res.candidates)
            objects = [o for o in held if o.geometry is not None and o.geometry.valid]
            res.geometry_frame_id = target
            if not objects or res.frame_id == target:
                continue
            try:
                if self.transforms is None:
                    raise TransformUnavailable("tf2 is not running")
                rotation, translation = self.transforms.lookup(target, res.frame_id, res.stamp_ns, self.timeout_s)
            except TransformUnavailable as exc:
                self.failures += 1
                invalidate_objects(held, str(exc))
                if target not in self._warned:
                    self._warned.add(target)
                    self._warn(f"{exc}. Check it with: ros2 run tf2_ros tf2_echo {target} {res.frame_id} "
                               "(is the robot's TF published, and is the camera's frame_id in it?)")
                continue
            move_objects(held, rotation, translation, target)


def make_geometry_frames(node: Any, target_frame: str, timeout_s: float,
                         per_camera: Optional[Mapping[str, str]] = None) -> GeometryFrames:
    """The node's GeometryFrames; ImportError (TF2_MISSING) when a target frame is set without tf2_ros."""
    transforms = None
    if target_frame or any((per_camera or {}).values()):
        try:
            transforms = TfTransforms(node)
        except ImportError:
            raise ImportError(TF2_MISSING) from None
    return GeometryFrames(target_frame, timeout_s, transforms, lambda text: node.get_logger().warning(text),
                          per_camera)
