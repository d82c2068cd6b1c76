"""compressedDepth (image_transport's format, read from compressed_depth_image_transport's codec.cpp):
16UC1 and quantised 32FC1 PNGs with their 12-byte header, both format strings, and every way a
robot's message can be malformed, answered with the reason."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from kosmos2_ros.core.serving.images import DEPTH_HEADER, ImageError, decode_compressed_depth, encode_compressed_depth


def slanted_depth(height: int = 48, width: int = 64, near: float = 0.4, far: float = 3.0) -> np.ndarray:
    """A floor seen at an angle: depth grows with the row, plus a little texture; holes at the corners."""
    rows = np.linspace(far, near, height, dtype=np.float32)[:, None]
    depth = rows + 0.01 * np.sin(np.arange(width, dtype=np.float32))[None, :]
    depth[0, 0] = depth[-1, -1] = np.nan
    return depth


@pytest.mark.parametrize("suffix", [True, False])       # Jazzy's "...; compressedDepth png", Humble's without
def test_16uc1_round_trip_is_exact_in_millimetres(suffix: bool) -> None:
    mm = np.round(np.nan_to_num(slanted_depth()) * 1000).astype(np.uint16)
    fmt, data = encode_compressed_depth(mm, "16UC1", codec_suffix=suffix)
    assert fmt == ("16UC1; compressedDepth png" if suffix else "16UC1; compressedDepth")
    assert data[DEPTH_HEADER.size:DEPTH_HEADER.size + 4] == b"\x89PNG"
    depth = decode_compressed_depth(fmt, data)
    assert depth.dtype == np.float32 and depth.shape == mm.shape
    valid = mm > 0
    np.testing.assert_allclose(depth[valid], mm[valid] / 1000.0, rtol=0, atol=1e-6)
    assert np.isnan(depth[~valid]).all()                # 0 mm = no reading


def test_32fc1_round_trip_within_the_quantisation() -> None:
    """Inverse depth in 16 bits: the step at depth d is d^2 / A (A = 100 * 101 by default), so 0.1 mm at 1 m."""
    metres = slanted_depth()
    fmt, data = encode_compressed_depth(metres, "32FC1")
    _, quant_a, quant_b = struct.unpack("<iff", data[:12])
    assert quant_a == pytest.approx(100.0 * 101.0) and quant_b == pytest.approx(1.0 - quant_a / 10.0)
    depth = decode_compressed_depth(fmt, data)
    valid = np.isfinite(metres)
    step = metres[valid] ** 2 / quant_a
    assert (np.abs(depth[valid] - metres[valid]) <= step * 1.01).all()
    assert np.isnan(depth[~valid]).all()


def test_32fc1_beyond_depth_max_is_no_reading() -> None:
    metres = np.array([[0.5, 9.9, 10.0, 25.0]], np.float32)
    depth = decode_compressed_depth(*encode_compressed_depth(metres, "32FC1", depth_max=10.0))
    assert np.isfinite(depth[0, :2]).all() and np.isnan(depth[0, 2:]).all()


def _with_payload(payload: bytes, header: bytes = DEPTH_HEADER.pack(0, 10100.0, -1009.0)) -> bytes:
    return header + payload


@pytest.mark.parametrize("fmt, data, reason", [
    ("16UC1; compressedDepth png", b"", "too short"),
    ("16UC1; compressedDepth png", DEPTH_HEADER.pack(0, 0.0, 0.0), "too short"),
    ("16UC1; compressedDepth png", _with_payload(b"not a png at all"), "not a PNG"),
    ("16UC1; compressedDepth png", _with_payload(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40), "16-bit PNG"),
    ("16UC1; compressedDepth rvl", _with_payload(b"\x00" * 40), "rvl"),
    ("jpeg", _with_payload(b"\x00" * 40), "not a compressedDepth"),
    ("8UC1; compressedDepth png", _with_payload(b"\x00" * 40), "unsupported compressedDepth encoding"),
])
def test_malformed_compressed_depth_says_why(fmt: str, data: bytes, reason: str) -> None:
    with pytest.raises(ImageError, match=reason):
        decode_compressed_depth(fmt, data)


def test_an_8_bit_png_is_refused_and_a_32fc1_without_quantisation_too() -> None:
    import cv2

    _, png8 = cv2.imencode(".png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ImageError, match="16-bit PNG"):
        decode_compressed_depth("16UC1; compressedDepth png", _with_payload(png8.tobytes()))
    _, good = encode_compressed_depth(np.ones((4, 4), np.float32), "32FC1")
    with pytest.raises(ImageError, match="quantisation"):    # Humble 2.5.0's bug wrote A = 0
        decode_compressed_depth("32FC1; compressedDepth", DEPTH_HEADER.pack(0, 0.0, 1.0) + good[12:])
