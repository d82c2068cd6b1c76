"""Image and message conversion: every encoding, row padding, byte order, and the errors."""
from __future__ import annotations

import array
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kosmos2_ros.core.serving import images
from kosmos2_ros.core.serving.images import ImageError

RNG = np.random.default_rng(7)
RGB = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)


def image_msg(arr: np.ndarray, encoding: str, pad: int = 0, bigendian: bool = False):
    """A sensor_msgs/Image holding `arr` (H x W [x C]) with `pad` bytes of padding per row."""
    from sensor_msgs.msg import Image

    arr = np.ascontiguousarray(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if bigendian:
        arr = arr.astype(arr.dtype.newbyteorder(">"))
    h, w = arr.shape[:2]
    row = arr.reshape(h, -1).view(np.uint8)
    padded = np.zeros((h, row.shape[1] + pad), np.uint8)
    padded[:, : row.shape[1]] = row
    padded[:, row.shape[1]:] = 0xAB
    return Image(height=h, width=w, encoding=encoding, is_bigendian=int(bigendian), step=padded.shape[1],
                 data=padded.tobytes())


def to_rgb(msg) -> np.ndarray:
    from kosmos2_ros.ros.convert import image_to_rgb

    return image_to_rgb(msg)   # what the node's camera calls


# -- colour encodings ------------------------------------------------------------------------
@pytest.mark.parametrize("pad", [0, 3, 16])
@pytest.mark.parametrize("encoding,make", [
    ("rgb8", lambda a: a),
    ("bgr8", lambda a: a[:, :, ::-1]),
    ("8UC3", lambda a: a[:, :, ::-1]),
    ("rgba8", lambda a: np.dstack([a, np.full(a.shape[:2], 9, np.uint8)])),
    ("bgra8", lambda a: np.dstack([a[:, :, ::-1], np.full(a.shape[:2], 9, np.uint8)])),
    ("8UC4", lambda a: np.dstack([a[:, :, ::-1], np.full(a.shape[:2], 9, np.uint8)])),
])
def test_8bit_colour_encodings(encoding: str, make, pad: int) -> None:
    out = to_rgb(image_msg(make(RGB), encoding, pad))
    assert out.dtype == np.uint8 and out.shape == RGB.shape
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize("bigendian", [False, True])
@pytest.mark.parametrize("encoding,make", [
    ("rgb16", lambda a: a), ("bgr16", lambda a: a[:, :, ::-1]), ("16UC3", lambda a: a[:, :, ::-1]),
    ("rgba16", lambda a: np.dstack([a, np.zeros(a.shape[:2], np.uint16)])),
    ("bgra16", lambda a: np.dstack([a[:, :, ::-1], np.zeros(a.shape[:2], np.uint16)])),
])
def test_16bit_colour_encodings_scale_to_8bit(encoding: str, make, bigendian: bool) -> None:
    wide = RGB.astype(np.uint16) * 257      # 255 -> 65535
    out = to_rgb(image_msg(make(wide), encoding, pad=2, bigendian=bigendian))
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize("encoding", ["mono8", "8UC1"])
def test_mono8(encoding: str) -> None:
    grey = RGB[:, :, 1]
    out = to_rgb(image_msg(grey, encoding, pad=5))
    assert out.shape == RGB.shape
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey)


@pytest.mark.parametrize("bigendian", [False, True])
@pytest.mark.parametrize("encoding", ["mono16", "16UC1"])
def test_mono16_byte_order(encoding: str, bigendian: bool) -> None:
    grey = RGB[:, :, 0].astype(np.uint16) * 257
    msg = image_msg(grey, encoding, pad=4, bigendian=bigendian)
    out = to_rgb(msg)
    np.testing.assert_array_equal(out[:, :, 2], RGB[:, :, 0])
    # Values whose two bytes differ read back exactly, and differently with the flag flipped.
    values = np.array([[1, 258, 4660, 65280]], np.uint16)
    msg = image_msg(values, encoding, pad=4, bigendian=bigendian)
    raw = images.unpack_raw(encoding, 1, 4, msg.step, bool(msg.is_bigendian), msg.data)
    assert raw.dtype == np.uint16 and raw[0, :, 0].tolist() == [1, 258, 4660, 65280]
    flipped = images.unpack_raw(encoding, 1, 4, msg.step, not bigendian, msg.data)
    assert flipped[0, :, 0].tolist() == [256, 513, 13330, 255]


@pytest.mark.parametrize("bigendian", [False, True])
def test_32fc1_as_colour_is_zero_to_one(bigendian: bool) -> None:
    values = np.array([[0.0, 0.5, 1.0, 2.0, -1.0, np.nan]], np.float32)
    out = to_rgb(image_msg(values, "32FC1", pad=4, bigendian=bigendian))
    assert out[0, :, 0].tolist() == [0, 128, 255, 255, 0, 0]


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
@pytest.mark.parametrize("use_opencv", [True, False])
def test_bayer_flat_colours(pattern: str, use_opencv: bool) -> None:
    """A flat scene of one colour, mosaicked in `pattern`, demosaics to that colour inside."""
    colour = {"r": 200, "g": 90, "b": 30}
    mosaic = np.zeros((8, 10), np.uint8)
    mosaic[0::2, 0::2] = colour[pattern[0]]
    mosaic[0::2, 1::2] = colour[pattern[1]]
    mosaic[1::2, 0::2] = colour[pattern[2]]
    mosaic[1::2, 1::2] = colour[pattern[3]]
    if use_opencv:
        out = to_rgb(image_msg(mosaic, f"bayer_{pattern}8", pad=2))
    else:
        out = images._demosaic(mosaic, pattern, use_opencv=False)
    assert out[2:6, 2:8].reshape(-1, 3).tolist() == [[200, 90, 30]] * 24


def test_bayer16() -> None:
    mosaic = np.zeros((4, 4), np.uint16)
    mosaic[0::2, 0::2] = 65535  # red only, rggb
    out = to_rgb(image_msg(mosaic, "bayer_rggb16", bigendian=True))
    assert out[1:3, 1:3, 0].min() > 0 and out[:, :, 2].max() == 0


def test_every_listed_encoding_converts() -> None:
    for encoding in images.ENCODINGS:
        fmt = images.pixel_format(encoding)
        arr = np.ones((4, 6, fmt.channels), np.dtype(fmt.dtype))
        out = to_rgb(image_msg(arr, encoding, pad=1))
        assert out.shape == (4, 6, 3) and out.dtype == np.uint8, encoding


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), pad=st.integers(0, 7), seed=st.integers(0, 2**16))
def test_padding_never_leaks_into_pixels(h: int, w: int, pad: int, seed: int) -> None:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_rgb(image_msg(arr[:, :, ::-1], "bgr8", pad)), arr)


def test_array_typed_data_as_received_from_dds() -> None:
    msg = image_msg(RGB, "rgb8")
    msg.data = array.array("B", bytes(msg.data))
    np.testing.assert_array_equal(to_rgb(msg), RGB)


# -- errors ----------------------------------------------------------------------------------
def test_truncated_data() -> None:
    msg = image_msg(RGB, "rgb8", pad=2)
    msg.data = bytes(msg.data)[:-1]
    with pytest.raises(ImageError, match="truncated"):
        to_rgb(msg)


def test_unknown_encoding() -> None:
    with pytest.raises(ImageError, match="unsupported image encoding 'yuv_weird'"):
        to_rgb(image_msg(RGB, "yuv_weird"))


@pytest.mark.parametrize("h,w", [(0, 5), (5, 0), (0, 0)])
def test_zero_size(h: int, w: int) -> None:
    from sensor_msgs.msg import Image

    with pytest.raises(ImageError, match="zero-size"):
        to_rgb(Image(height=h, width=w, encoding="rgb8", step=w * 3, data=b""))


def test_step_smaller_than_a_row() -> None:
    msg = image_msg(RGB, "rgb8")
    msg.step = 7 * 3 - 1
    with pytest.raises(ImageError, match="step"):
        to_rgb(msg)


def test_core_unpack_checks_too() -> None:
    with pytest.raises(ImageError, match="truncated"):
        images.to_rgb8("mono8", 2, 2, 2, False, b"abc")
    with pytest.raises(ImageError, match="zero-size"):
        images.to_rgb8("mono8", 0, 2, 2, False, b"")
    with pytest.raises(ImageError, match="depth encoding"):
        images.to_depth_m("rgb8", 1, 1, 3, False, b"abc")


# -- depth and compressed --------------------------------------------------------------------
@pytest.mark.parametrize("bigendian", [False, True])
def test_depth_16uc1_millimetres(bigendian: bool) -> None:
    from kosmos2_ros.ros.convert import depth_to_m

    mm = np.array([[0, 1000, 1500], [65535, 250, 3]], np.uint16)
    out = depth_to_m(image_msg(mm, "16UC1", pad=2, bigendian=bigendian))
    assert math.isnan(out[0, 0])
    np.testing.assert_allclose(out[0, 1:], [1.0, 1.5])
    np.testing.assert_allclose(out[1], [65.535, 0.25, 0.003], rtol=1e-6)


@pytest.mark.parametrize("bigendian", [False, True])
def test_depth_32fc1_metres(bigendian: bool) -> None:
    from kosmos2_ros.ros.convert import depth_to_m

    m = np.array([[1.25, np.nan, -1.0, 0.0, np.inf]], np.float32)
    out = depth_to_m(image_msg(m, "32FC1", pad=4, bigendian=bigendian))
    assert out[0, 0] == pytest.approx(1.25) and np.isnan(out[0, 1:]).all()


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_compressed_roundtrip(ext: str) -> None:
    import cv2
    from sensor_msgs.msg import CompressedImage

    from kosmos2_ros.ros.convert import compressed_to_rgb

    smooth = np.zeros((16, 24, 3), np.uint8)
    smooth[:, :, 0] = np.linspace(0, 250, 24, dtype=np.uint8)[None, :]
    smooth[:, :, 1] = 40
    smooth[:, :, 2] = np.linspace(200, 0, 16, dtype=np.uint8)[:, None]
    ok, buf = cv2.imencode(ext, smooth[:, :, ::-1])
    assert ok
    out = compressed_to_rgb(CompressedImage(format=ext[1:], data=buf.tobytes()))
    assert out.shape == smooth.shape
    if ext == ".png":
        np.testing.assert_array_equal(out, smooth)
    else:
        assert np.abs(out.astype(int) - smooth).mean() < 8


@pytest.mark.parametrize("data", [b"", b"\xff\xd8\xff\xe0garbage" * 5, b"\x89PNG\r\n\x1a\n" + b"\x00" * 30])
def test_corrupt_compressed(data: bytes) -> None:
    from sensor_msgs.msg import CompressedImage

    from kosmos2_ros.ros.convert import compressed_to_rgb

    with pytest.raises(ImageError):
        compressed_to_rgb(CompressedImage(format="jpeg", data=data))


def test_publish_roundtrip_bgr8() -> None:
    from std_msgs.msg import Header

    from kosmos2_ros.ros.convert import rgb_to_image

    msg = rgb_to_image(RGB, Header(frame_id="f"), "bgr8")
    assert msg.encoding == "bgr8" and msg.step == 21
    np.testing.assert_array_equal(to_rgb(msg), RGB)


def test_row_padding_that_is_not_whole_pixels() -> None:
    """bgr8, width 5, step 16 (one byte past 5 pixels): Humble's cv_bridge builds rows of step / 3 pixels and
    skews this image; the node's own decoder (the only one it uses) reads it right."""
    from sensor_msgs.msg import Image

    bgr = RNG.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    rows = np.full((4, 16), 0xAB, np.uint8)
    rows[:, :15] = bgr.reshape(4, 15)
    msg = Image(height=4, width=5, encoding="bgr8", step=16, data=rows.tobytes())
    np.testing.assert_array_equal(to_rgb(msg), bgr[:, :, ::-1])


def test_large_fields_are_arrays_the_setters_take_as_they_are() -> None:
    """Humble checks a uint8[] set from anything but array('B') element by element (about 100 ms a 640x480
    frame); the debug image, masks and clouds are handed over as array('B')."""
    from std_msgs.msg import Header

    from kosmos2_ros.ros.convert import rgb_to_image, uint8_array

    msg = rgb_to_image(np.zeros((480, 640, 3), np.uint8), Header(frame_id="f"))
    assert isinstance(msg.data, array.array) and msg.data.typecode == "B" and len(msg.data) == 640 * 480 * 3
    assert uint8_array(b"\x01\x02").tolist() == [1, 2]
    assert uint8_array(np.arange(3, dtype=np.uint8)).tolist() == [0, 1, 2]


# -- commands, results, stamps ---------------------------------------------------------------
def test_stamps_roundtrip() -> None:
    from kosmos2_ros.ros.convert import ns_to_stamp, stamp_to_ns

    for ns in (0, 1, 999_999_999, 1_000_000_000, 1_700_000_123_456_789_012):
        t = ns_to_stamp(ns)
        assert 0 <= t.nanosec < 10**9 and stamp_to_ns(t) == ns


def test_command_roundtrip() -> None:
    from kosmos2_ros.core.serving.pipeline import Command
    from kosmos2_ros.ros.convert import command_from_msg, command_to_msg

    cmd = Command(id="c", task="region", text="", region_px=(1.0, 2.0, 30.5, 40.0), image_stamp_ns=5_000_000_123,
                  max_new_tokens=17, decoding="free")
    assert command_from_msg(command_to_msg(cmd)) == cmd
    plain = command_from_msg(command_to_msg(Command(id="d", task="", text="a cat")))
    assert plain.task == "refer" and plain.region_px is None and plain.image_stamp_ns == 0
    assert plain.no_repeat_ngram_size == -1            # the message's default: the node's parameter
    assert command_from_msg(command_to_msg(Command(id="e", no_repeat_ngram_size=3))).no_repeat_ngram_size == 3
    from kosmos2_ros.msg import GroundingCommand

    assert GroundingCommand().no_repeat_ngram_size == -1


def test_result_to_msg() -> None:
    from kosmos2_ros.core.serving.pipeline import GroundedBox, Result, Status
    from kosmos2_ros.ros.convert import result_to_msg

    res = Result(id="r", task="refer", status=Status.OK, stamp_ns=3_000_000_007, frame_id="cam", width=64, height=48,
                 text="a cat", raw_text="<phrase> a cat</phrase>", token_ids=[5, 6],
                 objects=[GroundedBox("a cat", 0, (0, 5), (1.0, 2.0, 3.0, 4.0), (0.1, 0.2, 0.3, 0.4), 0.75, (0.1, 0.2, 1.5)),
                          GroundedBox("a cat", 0, (0, 5), (5.0, 6.0, 7.0, 8.0), (0.5, 0.6, 0.7, 0.8), float("nan"))],
                 timings_ms={"encode": 1.0, "generate": 2.0, "total": 4.0}, no_repeat_ngram_size=3)
    msg = result_to_msg(res, queue_ms=1.5)
    assert msg.no_repeat_ngram_size == 3
    assert msg.header.stamp.sec == 3 and msg.header.stamp.nanosec == 7 and msg.header.frame_id == "cam"
    assert (msg.image_width, msg.image_height, msg.status, list(msg.token_ids)) == (64, 48, 0, [5, 6])
    a, b = msg.objects
    assert a.point_valid and (a.point.x, a.point.y, a.point.z) == pytest.approx((0.1, 0.2, 1.5))
    assert (a.box.x_min, a.box.y_max, a.score) == (1.0, 4.0, 0.75) and (a.span_start, a.span_end) == (0, 5)
    assert not b.point_valid and b.score == 0.0
    assert msg.total_ms == pytest.approx(5.5) and msg.queue_ms == pytest.approx(1.5)


def test_intrinsics_from_camera_info() -> None:
    from sensor_msgs.msg import CameraInfo

    from kosmos2_ros.ros.convert import intrinsics_from

    intr = intrinsics_from(CameraInfo(width=64, height=48, k=[60.0, 0.0, 31.5, 0.0, 55.0, 23.5, 0.0, 0.0, 1.0]))
    assert (intr.fx, intr.fy, intr.cx, intr.cy, intr.width, intr.height) == (60.0, 55.0, 31.5, 23.5, 64, 48)
    assert intrinsics_from(CameraInfo()) is None     # all-zero K: uncalibrated


def test_camera_info_matrix_follows_the_image_topic() -> None:
    """Rectified topics (image_rect*) use P and no distortion; raw ones use K and D."""
    from sensor_msgs.msg import CameraInfo

    from kosmos2_ros.ros.convert import intrinsics_from, is_rectified

    info = CameraInfo(width=640, height=480, distortion_model="plumb_bob", d=[-0.3, 0.1, 0.0, 0.0, 0.0],
                      k=[500.0, 0.0, 320.0, 0.0, 400.0, 240.0, 0.0, 0.0, 1.0],
                      p=[480.0, 0.0, 322.0, 0.0, 0.0, 390.0, 238.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    rect = intrinsics_from(info, rectified=True)
    assert (rect.fx, rect.fy, rect.cx, rect.cy, rect.matrix, rect.distorted) == (480.0, 390.0, 322.0, 238.0, "P", False)
    raw = intrinsics_from(info)
    assert (raw.fx, raw.cx, raw.matrix, raw.distortion[:2], raw.distorted) == (500.0, 320.0, "K", (-0.3, 0.1), True)
    assert intrinsics_from(CameraInfo(width=64, height=48, k=[60.0, 0.0, 31.5, 0.0, 55.0, 23.5, 0.0, 0.0, 1.0]),
                           rectified=True).matrix == "K"      # no P given: K
    odd = CameraInfo(width=640, height=480, distortion_model="plumb_bob", d=[0.1, 0.2, 0.3],   # 3: OpenCV takes none
                     k=[500.0, 0.0, 320.0, 0.0, 400.0, 240.0, 0.0, 0.0, 1.0])
    assert intrinsics_from(odd).distortion == ()
    assert intrinsics_from(CameraInfo(width=640, height=480, distortion_model="equidistant", d=[0.1, 0.0, 0.0, 0.0],
                                      k=[500.0, 0.0, 320.0, 0.0, 400.0, 240.0, 0.0, 0.0, 1.0])).distorted
    assert is_rectified("/cam/color/image_rect") and is_rectified("image_rect_color")
    assert not is_rectified("/cam/color/image_raw") and not is_rectified("/image_rect/raw")


def test_python_statuses_are_the_message_constants():
    """`pipeline.Status` (the core has no ROS) names and numbers exactly GroundingResult.STATUS_*."""
    from kosmos2_ros.core.serving.pipeline import Status
    from kosmos2_ros.msg import GroundingResult

    constants = {n[len("STATUS_"):]: getattr(GroundingResult, n) for n in dir(GroundingResult) if n.startswith("STATUS_")}
    assert constants == {s.name: s.value for s in Status}
