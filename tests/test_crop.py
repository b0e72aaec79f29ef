"""The face crop: box from landmarks, image -> crop affine, crop camera, coverage."""
import numpy as np
import pytest

from engine.crop import (CROP_MARGIN, apply_affine, crop_box, crop_camera, crop_image, crop_transform,
                         image_coverage)
from engine.pose import default_camera_matrix, project


def _blob_image(w, h, x, y, sigma):
    """(h, w) float32 Gaussian blob centred at pixel (x, y)."""
    xs, ys = np.meshgrid(np.arange(w), np.arange(h))
    return np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma ** 2)).astype(np.float32)


def _centroid(img):
    ys, xs = np.mgrid[:img.shape[0], :img.shape[1]]
    return np.array([(img * xs).sum(), (img * ys).sum()]) / img.sum()


def test_box_is_square_around_the_landmarks_with_the_margin():
    rng = np.random.default_rng(0)
    pts = rng.uniform([100, 50], [300, 400], size=(478, 2))
    cx, cy, side = crop_box(pts)
    lo, hi = pts.min(0), pts.max(0)
    extent = (hi - lo).max()
    assert side == pytest.approx(extent * (1 + 2 * CROP_MARGIN))
    assert (cx, cy) == pytest.approx(tuple((lo + hi) / 2))
    # every landmark lies inside, at least margin · extent from the box edges
    A = crop_transform(np.array([cx, cy, side]), 128)
    q = apply_affine(A, pts)
    gap_px = CROP_MARGIN * extent * 128 / side
    assert q.min() >= -0.5 + gap_px - 1e-6 and q.max() <= 127.5 - gap_px + 1e-6


def test_transform_maps_box_edges_to_crop_edges():
    box = np.array([321.3, 211.7, 157.0])
    A = crop_transform(box, 128)
    corners = np.array([[box[0] - box[2] / 2, box[1] - box[2] / 2], [box[0] + box[2] / 2, box[1] + box[2] / 2]])
    assert apply_affine(A, corners) == pytest.approx(np.array([[-0.5, -0.5], [127.5, 127.5]]))
    assert apply_affine(A, box[None, :2])[0] == pytest.approx([63.5, 63.5])


@pytest.mark.parametrize("side", [90.0, 400.0, 1100.0])   # upscale, 3x and 8.6x downscale (pyrDown path)
def test_crop_image_shows_a_point_where_A_and_K_crop_put_it(side):
    w, h = 1280, 720
    K = default_camera_matrix(w, h)
    X = np.array([[4.0, -3.0, 60.0]])                      # a camera-space point, cm
    uv = project(X, K)[0]
    sigma = side / 128 * 2.5                               # about 2.5 crop px wide whatever the scale
    img = _blob_image(w, h, uv[0], uv[1], sigma)
    box = np.array([uv[0] + 0.17 * side, uv[1] - 0.11 * side, side])
    A = crop_transform(box, 128)
    crop = crop_image(img, A, 128)
    via_A = apply_affine(A, uv[None])[0]
    via_K = project(X, crop_camera(K, A))[0]
    assert via_K == pytest.approx(via_A, abs=1e-9)
    assert _centroid(crop) == pytest.approx(via_A, abs=0.15)


def test_antialias_keeps_geometry_and_removes_aliasing():
    rng = np.random.default_rng(1)
    w = h = 1024
    img = (rng.random((h, w)) > 0.5).astype(np.float32)   # pixel-level checkerboard noise: pure aliasing bait
    A = crop_transform(np.array([512.0, 512.0, 1000.0]), 128)
    plain = crop_image(img, A, 128, antialias=False)
    smooth = crop_image(img, A, 128, antialias=True)
    # a bilinear 8x shrink picks pixels (variance stays ~0.25/4); the pyramid averages them out
    assert smooth[10:-10, 10:-10].std() < 0.5 * plain[10:-10, 10:-10].std()
    assert smooth.mean() == pytest.approx(img.mean(), abs=0.02)


def test_outside_the_image_is_black_and_coverage_matches():
    img = np.full((100, 120, 3), 200, np.uint8)
    A = np.array([[1.0, 0.0, 30.0], [0.0, 1.0, -20.0]])    # scale 1: bilinear equals area overlap
    crop = crop_image(img, A, 128, antialias=False)
    cov = image_coverage(A, 120, 100, 128)
    assert crop[0, 0].tolist() == [0, 0, 0] and crop[60, 60].tolist() == [200, 200, 200]
    assert np.abs(crop[..., 0] / 200.0 - cov).max() < 0.01
    # a half-pixel shift: the edge pixels are half covered
    cov = image_coverage(np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]), 120, 100, 128)
    assert cov[50, 0] == pytest.approx(0.5) and cov[50, 1] == 1.0
    assert cov[50, 120] == pytest.approx(0.5) and cov[50, 121] == 0.0
    assert cov[99, 50] == 1.0 and cov[100, 50] == 0.0


def test_coverage_scaled():
    # 2x shrink of a 100 px wide image: crop spans [-0.5, 49.5] exactly
    A = np.array([[0.5, 0.0, -0.25], [0.0, 0.5, -0.25]])
    cov = image_coverage(A, 100, 100, 64)
    assert cov[:50, :50].min() == 1.0 and cov[50:, :].max() == 0.0 and cov[:, 50:].max() == 0.0
