"""Frames and the store the node keeps: newest, lookup by stamp, stale, none yet, capacity."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from kosmos2_ros.core.serving.frames import Frame, FrameStore, FrameUnavailable


def frame(stamp: int, received: float = 100.0) -> Frame:
    return Frame(rgb=np.zeros((4, 6, 3), np.uint8), stamp_ns=stamp, frame_id="cam", received=received)


def test_frame_checks_its_pixels() -> None:
    f = frame(1)
    assert (f.width, f.height) == (6, 4)
    for bad in (np.zeros((4, 6), np.uint8), np.zeros((4, 6, 4), np.uint8), np.zeros((4, 6, 3), np.float32),
                np.zeros((0, 6, 3), np.uint8)):
        with pytest.raises(ValueError):
            Frame(rgb=bad)


def test_no_frame_yet() -> None:
    store = FrameStore()
    assert store.newest() is None
    with pytest.raises(FrameUnavailable) as info:
        store.select()
    assert info.value.status == "no_frame" and "no image" in str(info.value)
    with pytest.raises(FrameUnavailable):
        store.select(stamp_ns=5)


def test_newest_and_lookup_by_stamp() -> None:
    store = FrameStore(capacity=3)
    for s in (10, 20, 30):
        store.put(frame(s))
    assert store.newest().stamp_ns == 30
    assert store.select(now=100.0).stamp_ns == 30
    assert store.select(stamp_ns=20).stamp_ns == 20
    with pytest.raises(FrameUnavailable) as info:
        store.select(stamp_ns=25)
    assert info.value.status == "no_frame" and "25" in str(info.value)


def test_capacity_drops_the_oldest() -> None:
    store = FrameStore(capacity=2)
    for s in (1, 2, 3):
        store.put(frame(s))
    with pytest.raises(FrameUnavailable, match="last 2 frames"):
        store.select(stamp_ns=1)
    assert store.select(stamp_ns=2).stamp_ns == 2 and store.select(stamp_ns=3).stamp_ns == 3
    assert FrameStore(capacity=0).capacity == 1


def test_same_stamp_replaces() -> None:
    store = FrameStore(capacity=2)
    a, b = frame(7), frame(7)
    store.put(a)
    store.put(b)
    assert store.select(stamp_ns=7) is b and store.newest() is b


def test_stale_newest_frame() -> None:
    store = FrameStore()
    store.put(frame(1, received=100.0))
    assert store.select(max_age_s=2.0, now=101.5).stamp_ns == 1
    with pytest.raises(FrameUnavailable) as info:
        store.select(max_age_s=2.0, now=102.5)
    assert info.value.status == "stale_frame" and "2.50 s old" in str(info.value)
    assert store.select(max_age_s=0.0, now=1e9).stamp_ns == 1   # 0 = no limit


def test_stamp_lookup_ignores_age() -> None:
    store = FrameStore()
    store.put(frame(1, received=0.0))
    assert store.select(stamp_ns=1, max_age_s=1.0, now=1000.0).stamp_ns == 1


def test_counts_frames_replaced_before_use() -> None:
    store = FrameStore()
    store.put(frame(1))
    store.put(frame(2))
    used = frame(3)
    store.put(used)
    used.encoding = object()  # type: ignore[assignment]  # as if a command had encoded it
    store.put(frame(4))
    assert store.received == 4 and store.replaced_unused == 2


def test_clear() -> None:
    store = FrameStore()
    store.put(frame(1))
    store.clear()
    with pytest.raises(FrameUnavailable):
        store.select()


def test_concurrent_puts_and_selects() -> None:
    store = FrameStore(capacity=4)
    errors = []

    def writer() -> None:
        for s in range(1, 500):
            store.put(frame(s))

    def reader() -> None:
        for _ in range(500):
            try:
                store.select()
            except FrameUnavailable:
                pass
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.newest().stamp_ns == 499 and len(store._frames) == 4


def test_store_smooths_the_interval_between_frames() -> None:
    store = FrameStore(4)
    assert store.interval_s is None
    for k in range(5):
        store.put(Frame(rgb=np.zeros((2, 2, 3), np.uint8), stamp_ns=k + 1, received=10.0 + 0.5 * k))
    assert store.interval_s == pytest.approx(0.5)
    store.clear()
    assert store.interval_s is None


# -- compressed frames decode when needed ----------------------------------------------------------
def test_a_compressed_frame_decodes_once_when_asked() -> None:
    calls = []

    def decode() -> np.ndarray:
        calls.append(1)
        return np.zeros((4, 6, 3), np.uint8)

    f = Frame(pending=decode, stamp_ns=5, frame_id="cam")
    assert f.rgb is None and not calls                 # nothing decoded on arrival
    with pytest.raises(ValueError, match="not decoded"):
        _ = f.width
    assert f.decode() == "" and f.decode() == ""
    assert len(calls) == 1 and (f.width, f.height) == (6, 4) and f.pending is None


def test_a_compressed_frame_that_will_not_decode_keeps_its_reason() -> None:
    calls = []

    def broken() -> np.ndarray:
        calls.append(1)
        raise ValueError("cannot decode compressed image (format 'jpeg', 7 bytes)")

    f = Frame(pending=broken)
    assert "cannot decode" in f.decode() and "cannot decode" in f.decode()
    assert len(calls) == 1 and f.rgb is None
    bad_pixels = Frame(pending=lambda: np.zeros((4, 6), np.uint8))
    assert "H x W x 3 uint8" in bad_pixels.decode()
    with pytest.raises(ValueError, match="decoder"):
        Frame()
