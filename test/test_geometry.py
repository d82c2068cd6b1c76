"""Boxes between the model's input image and source pixels, checked through the real image processor;
depth and intrinsics to 3D points."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessor

from kosmos2_ros.core.spatial.geometry import CameraIntrinsics, InputGeometry, box_point_3d, depth_to_meters

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


def exact_resize_processor() -> CLIPImageProcessor:
    """As microsoft/kosmos-2-patch14-224: resize to 224x224, no crop."""
    return CLIPImageProcessor(do_resize=True, size={"height": 224, "width": 224}, do_center_crop=False,
                              do_normalize=True, image_mean=MEAN, image_std=STD, resample=3)


def crop_processor(short: int = 224, crop: int = 224) -> CLIPImageProcessor:
    """CLIP's usual set-up: shortest edge to `short`, then centre crop."""
    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": short}, do_center_crop=True,
                              crop_size={"height": crop, "width": crop}, do_normalize=True, image_mean=MEAN,
                              image_std=STD, resample=3)


def find_rectangle(pixel_values: np.ndarray) -> tuple:
    """The red rectangle's box (x0, y0, x1 exclusive, y1 exclusive) in model-input pixels."""
    red = pixel_values[0, 0] * STD[0] + MEAN[0]       # back to [0, 1]
    green = pixel_values[0, 1] * STD[1] + MEAN[1]
    mask = (red > 0.5) & (green < 0.5)
    ys, xs = np.nonzero(mask)
    assert xs.size, "rectangle not found in pixel_values"
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def draw(width: int, height: int, box: tuple) -> np.ndarray:
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    rgb[:] = (20, 20, 20)
    x0, y0, x1, y1 = box
    rgb[y0:y1, x0:x1] = (255, 0, 0)
    return rgb


CASES = [
    # (width, height, rectangle in source pixels, x1/y1 exclusive)
    (333, 251, (41, 67, 190, 201)),
    (251, 333, (70, 100, 181, 260)),
    (97, 211, (20, 70, 77, 151)),
    (640, 481, (201, 99, 455, 387)),
    (1001, 99, (430, 17, 611, 83)),
]


@pytest.mark.parametrize("mode", ["exact", "crop"])
@pytest.mark.parametrize("width,height,box", CASES)
def test_box_maps_back_to_source_pixels(mode: str, width: int, height: int, box: tuple) -> None:
    processor = exact_resize_processor() if mode == "exact" else crop_processor()
    rgb = draw(width, height, box)
    pixel_values = processor(images=Image.fromarray(rgb), return_tensors="np")["pixel_values"]
    assert pixel_values.shape == (1, 3, 224, 224)
    found = find_rectangle(pixel_values)
    geometry = InputGeometry.from_processor(processor, width, height)
    norm = tuple(v / 224.0 for v in found)
    back = geometry.to_pixels(norm)
    # Source pixels per model-input pixel, plus one for the resampling filter at the edge.
    sx, sy = geometry.win_w / 224.0, geometry.win_h / 224.0
    want = box
    if mode == "crop":  # only what the crop window shows can be found
        want = (max(box[0], geometry.win_x), max(box[1], geometry.win_y),
                min(box[2], geometry.win_x + geometry.win_w), min(box[3], geometry.win_y + geometry.win_h))
    for got, exp, scale in zip(back, want, (sx, sy, sx, sy)):
        assert abs(got - exp) <= 1.0 * scale + 1.0, (mode, width, height, back, want)


@pytest.mark.parametrize("width,height", [(333, 251), (251, 333), (97, 211), (1001, 99), (224, 224)])
def test_crop_window_matches_the_processor(width: int, height: int) -> None:
    """The window the geometry claims the crop shows is what the processor's output holds."""
    processor = crop_processor()
    geometry = InputGeometry.from_processor(processor, width, height)
    short = min(width, height)
    assert math.isclose(min(geometry.win_w, geometry.win_h), short, rel_tol=0.02)
    # A frame that is red exactly inside the claimed window: the output is red throughout.
    x0, y0 = int(math.ceil(geometry.win_x)), int(math.ceil(geometry.win_y))
    x1, y1 = int(geometry.win_x + geometry.win_w), int(geometry.win_y + geometry.win_h)
    rgb = draw(width, height, (x0, y0, x1, y1))
    pv = processor(images=Image.fromarray(rgb), return_tensors="np")["pixel_values"]
    found = find_rectangle(pv)
    assert found[0] <= 2 and found[1] <= 2 and found[2] >= 222 and found[3] >= 222


def test_exact_resize_sees_the_whole_image() -> None:
    g = InputGeometry.from_processor(exact_resize_processor(), 333, 251)
    assert (g.win_x, g.win_y, g.win_w, g.win_h) == (0.0, 0.0, 333.0, 251.0)
    assert g.to_pixels((0.0, 0.0, 1.0, 1.0)) == (0.0, 0.0, 333.0, 251.0)
    assert g.to_pixels((0.25, 0.5, 0.75, 1.0)) == (83.25, 125.5, 249.75, 251.0)


def test_no_resize_keeps_pixels() -> None:
    proc = CLIPImageProcessor(do_resize=False, do_center_crop=False)
    g = InputGeometry.from_processor(proc, 300, 200)
    assert g.to_pixels((0.5, 0.5, 1.0, 1.0)) == (150.0, 100.0, 300.0, 200.0)


def test_invalid_image_size() -> None:
    with pytest.raises(ValueError):
        InputGeometry.from_processor(exact_resize_processor(), 0, 10)


def test_to_pixels_clips_unless_asked() -> None:
    g = InputGeometry(100, 50, -10.0, 0.0, 120.0, 50.0)
    assert g.to_pixels((0.0, 0.0, 1.0, 1.0)) == (0.0, 0.0, 100.0, 50.0)
    assert g.to_pixels((0.0, 0.0, 1.0, 1.0), clip=False) == (-10.0, 0.0, 110.0, 50.0)


@pytest.mark.parametrize("mode", ["exact", "crop"])
@pytest.mark.parametrize("width,height", [(333, 251), (97, 211)])
def test_to_normalized_inverts_to_pixels(mode: str, width: int, height: int) -> None:
    processor = exact_resize_processor() if mode == "exact" else crop_processor()
    g = InputGeometry.from_processor(processor, width, height)
    rng = np.random.default_rng(3)
    for _ in range(200):
        a, b = np.sort(rng.random(2)), np.sort(rng.random(2))
        norm = (float(a[0]), float(b[0]), float(a[1]), float(b[1]))
        px = g.to_pixels(norm, clip=False)
        back = g.to_normalized(px)
        assert all(abs(x - y) < 1e-9 for x, y in zip(back, norm))


def test_to_normalized_orders_and_clips() -> None:
    g = InputGeometry.from_processor(exact_resize_processor(), 200, 100)
    assert g.to_normalized((150, 80, 50, 20)) == (0.25, 0.2, 0.75, 0.8)      # swapped corners
    assert g.to_normalized((-50, -10, 400, 300)) == (0.0, 0.0, 1.0, 1.0)     # clipped to the image
    for bad in [(float("nan"), 0, 1, 1), (0, float("inf"), 1, 1)]:
        with pytest.raises(ValueError, match="finite"):
            g.to_normalized(bad)


def test_region_outside_crop_window_clips_to_it() -> None:
    g = InputGeometry.from_processor(crop_processor(), 400, 200)      # window x in [100, 300]
    assert math.isclose(g.win_x, 100.0, abs_tol=1.0) and math.isclose(g.win_w, 200.0, abs_tol=1.0)
    x0, _, x1, _ = g.to_normalized((0, 0, 50, 200))
    assert x0 == x1 == 0.0


# -- depth ------------------------------------------------------------------------------------------

def test_depth_16uc1_millimetres() -> None:
    raw = np.array([[0, 1000], [1500, 65535]], dtype=np.uint16)
    m = depth_to_meters(raw, "16UC1")
    assert m.dtype == np.float32
    assert math.isnan(m[0, 0]) and m[0, 1] == 1.0 and m[1, 0] == 1.5 and math.isclose(m[1, 1], 65.535, rel_tol=1e-6)
    assert raw[0, 0] == 0  # input untouched
    assert np.array_equal(depth_to_meters(raw, "mono16"), m, equal_nan=True)


def test_depth_32fc1_metres() -> None:
    raw = np.array([[0.0, 2.5], [np.nan, np.inf], [-1.0, 0.3]], dtype=np.float32)
    m = depth_to_meters(raw, "32FC1")
    assert np.isnan(m[0, 0]) and m[0, 1] == 2.5 and np.isnan(m[1, 0]) and np.isnan(m[1, 1]) and np.isnan(m[2, 0])
    assert math.isclose(m[2, 1], 0.3, rel_tol=1e-6)
    assert raw[0, 1] == 2.5 and raw[0, 0] == 0.0  # a copy


def test_depth_unknown_encoding() -> None:
    with pytest.raises(ValueError, match="16UC1"):
        depth_to_meters(np.zeros((2, 2), np.uint8), "8UC1")


K = CameraIntrinsics(fx=500.0, fy=400.0, cx=320.0, cy=240.0, width=640, height=480)


def pinhole(u: float, v: float, z: float, k: CameraIntrinsics = K) -> tuple:
    """The point at continuous pixel coordinates (u, v): camera_info's K has pixel i's centre at i."""
    return ((u - 0.5 - k.cx) * z / k.fx, (v - 0.5 - k.cy) * z / k.fy, z)


def test_box_point_3d_matches_pinhole() -> None:
    depth = np.full((480, 640), 2.0, dtype=np.float32)
    point, why = box_point_3d((100, 50, 200, 150), depth, K)
    assert point is not None and why == ""
    assert np.allclose(point, pinhole(150, 100, 2.0))
    assert np.allclose(point, (-0.682, -0.7025, 2.0))        # through pixel index (149.5, 99.5)


def test_box_point_3d_uses_median_of_the_inner_part() -> None:
    depth = np.full((480, 640), 5.0, dtype=np.float32)    # background far away
    depth[90:110, 140:160] = 1.2                           # the object, at the box centre
    depth[95, 150] = np.nan                                # a hole
    point, _ = box_point_3d((130, 80, 170, 120), depth, K, inner_fraction=0.5)
    assert point is not None and math.isclose(point[2], 1.2, rel_tol=1e-6)
    assert np.allclose(point, pinhole(150, 100, 1.2))


def test_box_point_3d_scales_box_to_a_smaller_depth_image() -> None:
    depth = np.full((240, 320), 3.0, dtype=np.float32)
    depth[40:60, 60:90] = 1.0                                # object at colour box (120..180, 80..120)
    point, _ = box_point_3d((120, 80, 180, 120), depth, K)
    assert point is not None and math.isclose(point[2], 1.0)
    assert np.allclose(point, pinhole(150, 100, 1.0))        # back-projected with colour intrinsics


def test_box_point_3d_scales_camera_info_to_the_colour_image() -> None:
    """camera_info for 640x480 and a 1280x960 colour image (a driver publishing both sizes): the box is in
    the colour image's pixels, so K is scaled to it (it was used unscaled: the point twice as far out)."""
    depth = np.full((480, 640), 2.0, dtype=np.float32)
    point, _ = box_point_3d((200, 100, 400, 300), depth, K, image_size=(1280, 960))
    assert np.allclose(point, pinhole(300, 200, 2.0, K.scaled(1280, 960)))
    assert np.allclose(point, pinhole(150, 100, 2.0), atol=2e-3)    # the same place as the 640x480 box


def test_a_centre_far_behind_the_box_is_not_the_object() -> None:
    """A hollow or thin object (a frame, a mug seen through its handle): the box's centre sees the
    wall 2 m behind it, its rim is at 0.6 m. The point is the rim, where the object is."""
    depth = np.full((480, 640), 2.0, dtype=np.float32)
    depth[100:200, 200:300] = 0.6
    depth[125:175, 225:275] = 2.0                            # the hole in the middle
    point, why = box_point_3d((200, 100, 300, 200), depth, K)
    assert why == "" and point[2] == pytest.approx(0.6)
    assert np.allclose(point, pinhole(250, 150, 0.6), atol=2e-3)
    # A box holding only the wall has no nearer surface: the wall is what it shows.
    assert box_point_3d((400, 300, 450, 350), depth, K)[0][2] == pytest.approx(2.0)
    # A speck nearer than the wall (under 10 % of the box) is not taken for the object.
    depth[300:303, 400:403] = 0.5
    assert box_point_3d((400, 300, 450, 350), depth, K)[0][2] == pytest.approx(2.0)


@pytest.mark.parametrize("depth_value", [np.nan, 0.0, 0.01, 50.0])
def test_box_point_3d_invalid_depth_says_why(depth_value: float) -> None:
    depth = np.full((480, 640), depth_value, dtype=np.float32)
    point, why = box_point_3d((100, 50, 200, 150), depth, K, min_depth=0.05, max_depth=20.0)
    assert point is None and why.startswith("no valid depth at the box's centre (none in [0.05, 20] m of 2500 pixels")


def test_box_point_3d_invalid_intrinsics_or_box() -> None:
    depth = np.full((480, 640), 2.0, dtype=np.float32)
    bad = "camera_info has no valid intrinsics"
    assert box_point_3d((100, 50, 200, 150), depth, CameraIntrinsics(0.0, 400.0, 320.0, 240.0)) == (None, bad)
    assert box_point_3d((100, 50, 200, 150), depth, CameraIntrinsics(500.0, float("nan"), 320.0, 240.0)) == (None, bad)
    outside = (None, "the box is empty or outside the depth image")
    assert box_point_3d((700, 500, 800, 600), depth, K) == outside
    assert box_point_3d((100, 50, 100, 150), depth, K) == outside


def test_raw_images_are_undistorted_with_d() -> None:
    """A point projected through a distorting lens (OpenCV's model, as camera_info's D) comes back
    where it was; the pinhole alone would miss it by centimetres at the image's edge."""
    import cv2

    d = (-0.3, 0.1, 0.001, -0.002, 0.0)
    raw = CameraIntrinsics.from_k([500.0, 0, 320.0, 0, 400.0, 240.0, 0, 0, 1], 640, 480, d, "plumb_bob")
    truth = np.array([[0.5, -0.35, 1.5]])
    kmat = np.array([[500.0, 0, 320.0], [0, 400.0, 240.0], [0, 0, 1]])
    (u, v), = cv2.projectPoints(truth, np.zeros(3), np.zeros(3), kmat, np.array(d))[0].reshape(-1, 2)
    depth = np.full((480, 640), 1.5, dtype=np.float32)
    u, v = u + 0.5, v + 0.5                  # OpenCV's pixel index -> the box's continuous pixel coordinates
    box = (u - 10, v - 10, u + 10, v + 10)
    point, _ = box_point_3d(box, depth, raw)
    assert np.allclose(point, truth[0], atol=1e-3)
    pinhole_only, _ = box_point_3d(box, depth, K)
    assert np.abs(np.array(pinhole_only) - truth[0]).max() > 0.02
    fisheye = CameraIntrinsics.from_k([500.0, 0, 320.0, 0, 400.0, 240.0, 0, 0, 1], 640, 480, (0.1, 0.01, 0, 0),
                                      "equidistant")
    (fu, fv), = cv2.fisheye.projectPoints(truth.reshape(-1, 1, 3), np.zeros(3), np.zeros(3), kmat,
                                          np.array([0.1, 0.01, 0, 0]))[0].reshape(-1, 2)
    fu, fv = fu + 0.5, fv + 0.5
    point, _ = box_point_3d((fu - 10, fv - 10, fu + 10, fv + 10), depth, fisheye)
    assert np.allclose(point, truth[0], atol=1e-3)
    assert raw.scaled(320, 240).distortion == d and raw.scaled(320, 240).fx == 250.0


def test_intrinsics_from_k() -> None:
    k = [500.0, 0.0, 320.0, 0.0, 400.0, 240.0, 0.0, 0.0, 1.0]
    assert CameraIntrinsics.from_k(k, 640, 480) == K
    p = [510.0, 0.0, 318.0, 0.0, 0.0, 405.0, 242.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert CameraIntrinsics.from_p(p, 640, 480) == CameraIntrinsics(510.0, 405.0, 318.0, 242.0, 640, 480, (), matrix="P")
    assert K.valid()
