"""Messages <-> core types. Unpacks message fields; the pixel decoding itself is core.images.

No cv_bridge: Humble's `imgmsg_to_cv2` skews images whose row padding (`step`) is not a whole
number of pixels, and core.images reads every encoding, padding and byte order right without it.
Large arrays go into messages as `array('B')` (`uint8_array`): Humble's generated setters take it
as it is and check any other sequence element by element (about 100 ms for a 640x480 frame).
"""
from __future__ import annotations

import array
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2, PointField
from std_msgs.msg import Header

from kosmos2_ros.core.serving import images
from kosmos2_ros.core.serving.pipeline import Command, GroundedBox, Result
from kosmos2_ros.core.serving.results import describe, describe_object
from kosmos2_ros.core.spatial.geometry import CameraIntrinsics
from kosmos2_ros.core.spatial.object_geometry import ObjectGeometry
from kosmos2_ros.msg import GroundedObject, GroundingCommand, GroundingResult, PixelBox

ImageError = images.ImageError

try:  # pragma: no cover - vision_msgs is optional
    from vision_msgs.msg import Detection2D, Detection2DArray, ObjectHypothesisWithPose

    HAVE_VISION_MSGS = True
except ImportError:
    HAVE_VISION_MSGS = False


# -- time ------------------------------------------------------------------------------------
def stamp_to_ns(stamp: Time) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(ns: int) -> Time:
    return Time(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


def header_of(stamp_ns: int, frame_id: str) -> Header:
    return Header(stamp=ns_to_stamp(stamp_ns), frame_id=frame_id)


# -- images ----------------------------------------------------------------------------------
def uint8_array(data: Union[bytes, np.ndarray]) -> array.array:
    """A `uint8[]` field's value that every distro's setter takes without a per-element check."""
    out = array.array("B")
    out.frombytes(data.tobytes() if isinstance(data, np.ndarray) else data)
    return out


def _check_size(msg: Image) -> None:
    """The message's own size fields against its data, before any pixel is read."""
    if msg.height == 0 or msg.width == 0:
        raise ImageError(f"zero-size image ({msg.width}x{msg.height})")
    fmt = images.pixel_format(msg.encoding)
    need = msg.height * msg.step
    if len(msg.data) < need:
        raise ImageError(f"image data is truncated: {len(msg.data)} bytes, expected height*step = "
                         f"{msg.height}*{msg.step} = {need}")
    if msg.step < msg.width * fmt.channels * np.dtype(fmt.dtype).itemsize:
        raise ImageError(f"step {msg.step} is smaller than one row of {msg.width} {msg.encoding} pixels")


def image_to_rgb(msg: Image) -> np.ndarray:
    """sensor_msgs/Image -> H x W x 3 uint8 RGB, or ImageError with the reason."""
    _check_size(msg)
    return images.to_rgb8(msg.encoding, msg.height, msg.width, msg.step, bool(msg.is_bigendian), msg.data)


def depth_to_m(msg: Image) -> np.ndarray:
    """sensor_msgs/Image with 16UC1 (mm) or 32FC1 (m) depth -> H x W float32 metres (NaN invalid)."""
    _check_size(msg)
    return images.to_depth_m(msg.encoding, msg.height, msg.width, msg.step, bool(msg.is_bigendian), msg.data)


def compressed_to_rgb(msg: CompressedImage) -> np.ndarray:
    return images.decode_compressed(msg.format, msg.data)


def compressed_depth_to_m(msg: CompressedImage) -> np.ndarray:
    """image_transport's compressedDepth (16UC1 or quantised 32FC1 PNG) -> H x W float32 metres."""
    return images.decode_compressed_depth(msg.format, msg.data)


def rgb_to_image(rgb: np.ndarray, header: Header, encoding: str = "bgr8") -> Image:
    data, step = images.from_rgb8(rgb, encoding)
    return Image(header=header, height=int(rgb.shape[0]), width=int(rgb.shape[1]), encoding=encoding,
                 is_bigendian=0, step=step, data=uint8_array(data))


#: Distortion models the node undoes, and the D lengths OpenCV takes for them.
DISTORTION_LENGTHS = {"plumb_bob": (4, 5), "rational_polynomial": (8, 12, 14), "equidistant": (4,)}
#: Image topics whose pixels are rectified (image_proc's names: image_rect, image_rect_color, ...).
RECTIFIED_MARK = "image_rect"


def is_rectified(image_topic: str) -> bool:
    return RECTIFIED_MARK in image_topic.rstrip("/").rpartition("/")[2]


def intrinsics_from(msg: CameraInfo, rectified: bool = False) -> Optional[CameraIntrinsics]:
    """What camera_info says about the image topic's pixels: P for a rectified image (no
    distortion left; falls back to K when P is unset), else K with the distortion D to undo."""
    width, height = int(msg.width), int(msg.height)
    p = list(msg.p)
    if rectified and len(p) == 12 and p[0] > 0:
        intr = CameraIntrinsics.from_p(p, width, height)
    else:
        k = list(msg.k)
        if len(k) != 9:
            return None
        d = () if rectified else tuple(float(v) for v in msg.d)
        model = msg.distortion_model or "plumb_bob"
        if len(d) not in DISTORTION_LENGTHS.get(model, ()):
            d = ()      # a model or length OpenCV does not take: no undistortion rather than a failing command
        intr = CameraIntrinsics.from_k(k, width, height, d, model)
    return intr if intr.valid() else None


# -- commands and results --------------------------------------------------------------------
def command_from_msg(msg: GroundingCommand) -> Command:
    region: Optional[Tuple[float, float, float, float]] = None
    if msg.use_region:
        r = msg.region
        region = (float(r.x_min), float(r.y_min), float(r.x_max), float(r.y_max))
    return Command(id=msg.id, task=msg.task or "refer", text=msg.text, region_px=region,
                   image_stamp_ns=stamp_to_ns(msg.image_stamp), max_new_tokens=int(msg.max_new_tokens),
                   decoding=msg.decoding, no_repeat_ngram_size=int(msg.no_repeat_ngram_size), camera=msg.camera,
                   max_candidates=int(msg.max_candidates), describe_candidates=int(msg.describe_candidates))


def command_to_msg(cmd: Command) -> GroundingCommand:
    msg = GroundingCommand(id=cmd.id, task=cmd.task, text=cmd.text, max_new_tokens=int(cmd.max_new_tokens),
                           decoding=cmd.decoding, image_stamp=ns_to_stamp(cmd.image_stamp_ns),
                           no_repeat_ngram_size=int(cmd.no_repeat_ngram_size), camera=cmd.camera,
                           max_candidates=int(cmd.max_candidates), describe_candidates=int(cmd.describe_candidates))
    if cmd.region_px is not None:
        msg.use_region = True
        msg.region = PixelBox(x_min=float(cmd.region_px[0]), y_min=float(cmd.region_px[1]),
                              x_max=float(cmd.region_px[2]), y_max=float(cmd.region_px[3]))
    return msg


def fill(msg: Any, values: Dict[str, Any]) -> Any:
    """A message filled from a description (`core.serving.results.describe`): each key sets the field of
    that name; a dict fills a nested message, a list of dicts a sequence of the field's element type."""
    for name, value in values.items():
        if isinstance(value, dict):
            fill(getattr(msg, name), value)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            setattr(msg, name, [fill(SEQUENCE_TYPES[name](), v) for v in value])
        else:
            setattr(msg, name, value)
    return msg


#: The element type of each message sequence a description fills (GroundingResult's objects and candidates).
SEQUENCE_TYPES = {"objects": GroundedObject, "candidates": GroundedObject}


def object_to_msg(obj: GroundedBox) -> GroundedObject:
    return fill(GroundedObject(), describe_object(obj))


def mask_image(res: Result, header: Header) -> Image:
    """The objects' masks as one mono8 label image (0 background, i = objects[i-1]; first object wins
    an overlap); an empty Image when no object has a mask."""
    masks = [(i + 1, o.geometry.mask) for i, o in enumerate(res.objects[:255])
             if o.geometry is not None and o.geometry.valid and o.geometry.mask is not None]
    if not masks:
        return Image(header=header)
    labels = np.zeros(masks[0][1].shape, dtype=np.uint8)
    for label, mask in reversed(masks):
        labels[mask] = label
    return mono8_image(labels, header)


def mono8_image(labels: np.ndarray, header: Header) -> Image:
    """An H x W uint8 array as a mono8 Image (the result's label mask, the target's mask)."""
    return Image(header=header, height=labels.shape[0], width=labels.shape[1], encoding="mono8", is_bigendian=0,
                 step=labels.shape[1], data=uint8_array(labels))


def result_to_msg(res: Result, queue_ms: float = 0.0, masks: bool = True) -> GroundingResult:
    """A core Result -> GroundingResult, from its one description (`describe`, which the CLI's JSON prints
    too); the header is the source image's, never the node clock."""
    msg = fill(GroundingResult(), describe(res, queue_ms))
    if masks:
        msg.mask = mask_image(res, msg.header)
    return msg


#: ~/object_cloud's point layout: x, y, z, rgb (packed as rviz reads it), object (index in the result).
CLOUD_FIELDS = (("x", 0, PointField.FLOAT32), ("y", 4, PointField.FLOAT32), ("z", 8, PointField.FLOAT32),
                ("rgb", 12, PointField.FLOAT32), ("object", 16, PointField.UINT32))
CLOUD_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<u4"), ("object", "<u4")])


def cloud_of(res: Result) -> Optional[PointCloud2]:
    """Every object's points of a result as one PointCloud2 in its geometry frame, or None when there are none."""
    parts = [(i, o.geometry) for i, o in enumerate(res.objects)
             if o.geometry is not None and o.geometry.valid and len(o.geometry.points)]
    if not parts:
        return None
    cloud = np.zeros(sum(len(g.points) for _, g in parts), dtype=CLOUD_DTYPE)
    at = 0
    for index, geo in parts:
        n = len(geo.points)
        rows = cloud[at:at + n]
        rows["x"], rows["y"], rows["z"] = geo.points[:, 0], geo.points[:, 1], geo.points[:, 2]
        c = geo.colors.astype(np.uint32)
        rows["rgb"] = (c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]
        rows["object"] = index
        at += n
    fields = [PointField(name=n, offset=o, datatype=t, count=1) for n, o, t in CLOUD_FIELDS]
    return PointCloud2(header=header_of(res.stamp_ns, res.geometry_frame_id or res.frame_id), height=1,
                       width=len(cloud), fields=fields, is_bigendian=False, point_step=CLOUD_DTYPE.itemsize,
                       row_step=CLOUD_DTYPE.itemsize * len(cloud), is_dense=True,
                       data=uint8_array(cloud))


#: ~/target/cloud's point layout: x, y, z, rgb (as GraspGen's and rviz's readers take it).
TARGET_CLOUD_FIELDS = CLOUD_FIELDS[:4]
TARGET_CLOUD_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<u4")])


def object_cloud(geo: Optional[ObjectGeometry], header: Header) -> Optional[PointCloud2]:
    """One object's points (xyz + packed rgb) as a PointCloud2 with `header`, or None without points."""
    if geo is None or not geo.valid or not len(geo.points):
        return None
    cloud = np.zeros(len(geo.points), dtype=TARGET_CLOUD_DTYPE)
    cloud["x"], cloud["y"], cloud["z"] = geo.points[:, 0], geo.points[:, 1], geo.points[:, 2]
    c = geo.colors.astype(np.uint32)
    cloud["rgb"] = (c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]
    fields = [PointField(name=n, offset=o, datatype=t, count=1) for n, o, t in TARGET_CLOUD_FIELDS]
    return PointCloud2(header=header, height=1, width=len(cloud), fields=fields, is_bigendian=False,
                       point_step=16, row_step=16 * len(cloud), is_dense=True, data=uint8_array(cloud))


def cloud_points(msg: PointCloud2) -> np.ndarray:
    """The structured points of a cloud `cloud_of` or `object_cloud` made (tests and tools)."""
    dtype = CLOUD_DTYPE if msg.point_step == CLOUD_DTYPE.itemsize else TARGET_CLOUD_DTYPE
    return np.frombuffer(bytes(msg.data), dtype=dtype)


def _hypothesis(obj: GroundedObject) -> Any:  # pragma: no cover - vision_msgs absent here
    """The object's phrase and score as a vision_msgs hypothesis (Humble+: `.hypothesis.class_id`; older: `.id`)."""
    hyp = ObjectHypothesisWithPose()
    target = getattr(hyp, "hypothesis", hyp)
    if hasattr(target, "class_id"):
        target.class_id = obj.phrase
    else:
        target.id = obj.phrase
    target.score = float(obj.score)
    return hyp


def detections_from(msg: GroundingResult) -> Optional[Any]:
    """vision_msgs/Detection2DArray (phrase as class_id) where vision_msgs is installed, else None."""
    if not HAVE_VISION_MSGS:
        return None
    out = Detection2DArray(header=msg.header)  # pragma: no cover - vision_msgs absent here
    for obj in msg.objects:  # pragma: no cover
        det = Detection2D(header=msg.header)
        b = obj.box
        center = det.bbox.center
        pos = getattr(center, "position", center)   # Humble+: Pose2D.position; older: geometry_msgs/Pose2D
        pos.x, pos.y = (b.x_min + b.x_max) / 2.0, (b.y_min + b.y_max) / 2.0
        det.bbox.size_x, det.bbox.size_y = b.x_max - b.x_min, b.y_max - b.y_min
        hyp = _hypothesis(obj)
        if obj.point_valid:
            hyp.pose.pose.position = obj.point
        det.results.append(hyp)
        if hasattr(det, "id"):
            det.id = msg.id
        out.detections.append(det)
    return out


def detections_3d_from(msg: GroundingResult) -> Optional[Any]:
    """vision_msgs/Detection3DArray of the objects with geometry (3D box centre and size, in the result's
    geometry frame) where vision_msgs is installed, else None."""
    if not HAVE_VISION_MSGS:
        return None
    from vision_msgs.msg import Detection3D, Detection3DArray  # pragma: no cover - vision_msgs absent here

    header = Header(stamp=msg.header.stamp, frame_id=msg.geometry_frame_id or msg.header.frame_id)  # pragma: no cover
    out = Detection3DArray(header=header)  # pragma: no cover
    for obj in msg.objects:  # pragma: no cover
        if not obj.geometry_valid:
            continue
        det = Detection3D(header=header)
        det.bbox.center = obj.pose
        det.bbox.size = obj.size
        hyp = _hypothesis(obj)
        hyp.pose.pose = obj.pose
        det.results.append(hyp)
        if hasattr(det, "id"):
            det.id = msg.id
        out.detections.append(det)
    return out
