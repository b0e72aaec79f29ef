"""trainers.rgbd: exact depth from the rasterizer, and the Kinect-like noise model on top."""
from __future__ import annotations

import numpy as np

from engine.pose import default_camera_matrix
from trainers.rgbd import DepthNoise, kinect_depth, render_depth_mm

W, H = 160, 120
K = default_camera_matrix(W, H)


def _square(z_cm: float, half_cm: float, tilt: float = 0.0):
    """Two triangles: a square facing the camera at z_cm (optionally tilted about the vertical axis)."""
    x = np.array([-half_cm, half_cm, half_cm, -half_cm])
    y = np.array([-half_cm, -half_cm, half_cm, half_cm])
    points = np.stack([x * np.cos(tilt), y, z_cm + x * np.sin(tilt)], axis=1)
    return points, np.array([[0, 1, 2], [0, 2, 3]])


def test_exact_depth_of_a_square_and_its_viewing_angle():
    points, tris = _square(80.0, 10.0)
    depth, cos = render_depth_mm(points, tris, K, (W, H), background_mm=2000.0)
    assert depth[H // 2, W // 2] == np.float32(800.0) and cos[H // 2, W // 2] > 0.999
    assert depth[0, 0] == 2000.0 and cos[0, 0] == 0.0          # off the square
    tilted, tilted_cos = render_depth_mm(*_square(80.0, 10.0, np.radians(60)), K, (W, H))
    assert abs(tilted_cos[H // 2, W // 2] - 0.5) < 0.01         # 60° from the ray


def test_depth_comes_in_disparity_steps_with_distance_dependent_noise():
    rng = np.random.default_rng(0)
    flat = np.full((H, W), 800.0, np.float32)
    facing = np.ones((H, W), np.float32)
    grey = np.full((H, W, 3), 128, np.uint8)
    quiet = DepthNoise(sigma_mm=0.0, sigma_growth_per_m2=0.0, dropout=0.0)
    out = kinect_depth(flat + rng.uniform(-3, 3, flat.shape).astype(np.float32), facing, grey, rng, quiet)
    levels = np.unique(out)
    steps = np.diff(levels)
    # Δz = z² / (8 · 43.5 m px) ≈ 1.84 mm at 80 cm (whole mm after rounding to the 16-bit image)
    assert 3 <= len(levels) <= 6 and np.all((steps >= 1) & (steps <= 3))
    noisy = kinect_depth(flat, facing, grey, rng, DepthNoise(dropout=0.0)).astype(float)
    far = kinect_depth(flat * 2, facing, grey, rng, DepthNoise(dropout=0.0)).astype(float)
    assert 1.0 < noisy.std() < 2.5                              # σ ≈ 1.2 + 1.9 · 0.4² ≈ 1.5 mm
    assert far.std() > 2 * noisy.std()                          # and grows with distance


def test_holes_beside_near_edges_on_dark_surfaces_and_at_random():
    rng = np.random.default_rng(1)
    depth = np.full((H, W), 1500.0, np.float32)                  # a far wall ...
    depth[40:80, 40:80] = 700.0                                  # ... a near box in front of it
    facing = np.ones((H, W), np.float32)
    image = np.full((H, W, 3), 160, np.uint8)
    image[90:110, 100:140] = 10                                  # a dark patch on the wall
    noise = DepthNoise(dropout=0.01)
    out = kinect_depth(depth, facing, image, rng, noise)
    shadow = out[40:80, 80:80 + noise.shadow_px]
    assert (shadow == 0).all()                                   # the projector's shadow right of the box
    assert (out[40:80, 60:78] > 0).mean() > 0.95                 # the box itself is there
    dark = (out[90:110, 100:140] == 0).mean()
    assert abs(dark - (noise.dark_dropout + (1 - noise.dark_dropout) * noise.dropout)) < 0.08
    elsewhere = (out[:30] == 0).mean()
    assert 0.002 < elsewhere < 0.03                              # scattered single-pixel dropouts
    assert (kinect_depth(np.zeros((H, W), np.float32), facing, image, rng) == 0).all()  # nothing there: no data
