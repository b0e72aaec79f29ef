"""Synthetic depth for RGB-D samples with exact truth: the renderer's depth and a Kinect-like noise model.

A structured-light camera (Kinect v1, the BIWI data) measures disparity, not depth:
  - depth comes in disparity steps: with baseline x focal ≈ 0.075 m x 580 px and 1/8 px
    sub-pixel steps, Δz = z² / (8 · 43.5 m px), ≈ 1.8 mm at 80 cm;
  - axial noise grows with distance, σ ≈ 1.2 mm + 1.9 mm/m² · (z − 0.4 m)², and at grazing
    angles (Nguyen et al. 2012's fit);
  - the projector sits beside the camera, so the background just beside a near object's edge
    is in its shadow: a band of missing depth along silhouettes;
  - dark surfaces (hair, brows, pupils) return too little of the pattern: holes there;
  - scattered single-pixel dropouts.
Depth is in millimetres, 0 = no data, as the camera's 16-bit images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.rasterizer import interpolate, rasterize, vertex_normals


@dataclass(frozen=True)
class DepthNoise:
    """The noise model's parameters (module docstring); lengths in mm."""

    baseline_focal_mm_px: float = 75.0 * 580.0  # disparity d = this / z
    subpixel: float = 8.0                       # disparity steps per pixel
    sigma_mm: float = 1.2                       # axial noise at 0.4 m ...
    sigma_growth_per_m2: float = 1.9            # ... growing as (z - 0.4 m)²
    shadow_px: int = 3                          # missing band beside a near edge (projector shadow)
    edge_jump_mm: float = 30.0                  # a depth step larger than this is an edge
    dark_luma: float = 0.12                     # darker than this (0..1) ...
    dark_dropout: float = 0.7                   # ... loses its depth with this chance
    dropout: float = 0.01                       # anywhere


def render_depth_mm(points_cam_cm: np.ndarray, triangles: np.ndarray, K: np.ndarray, size: tuple[int, int],
                    background_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Exact depth (H, W) float32 mm of the mesh (camera z; background_mm where no triangle) and
    the cosine (H, W) between the surface normal and the viewing ray (1 facing, 0 grazing; 0 off
    the mesh). points_cam_cm (V, 3), triangles (T, 3), K (3, 3) px, size (W, H)."""
    W, H = size
    frags = rasterize(points_cam_cm, triangles, K, W, H, backend="cpu")
    mask = frags.mask
    depth = np.where(mask, frags.depth_cm * 10.0, background_mm).astype(np.float32)
    n = interpolate(frags, vertex_normals(points_cam_cm, triangles), triangles)
    u, v = np.meshgrid(np.arange(W), np.arange(H))
    ray = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u, float)], axis=2)
    ray /= np.linalg.norm(ray, axis=2, keepdims=True)
    n /= np.maximum(np.linalg.norm(n, axis=2, keepdims=True), 1e-9)
    cos = np.abs(np.sum(n * ray, axis=2)) * mask
    return depth, cos.astype(np.float32)


def kinect_depth(depth_mm: np.ndarray, cos_view: np.ndarray, image_rgb: np.ndarray, rng: np.random.Generator,
                 noise: DepthNoise = DepthNoise()) -> np.ndarray:
    """What a structured-light camera would return for exact depth (H, W) mm (0 = nothing there):
    (H, W) uint16 mm, 0 = no data. cos_view (H, W) from render_depth_mm; image_rgb (H, W, 3) uint8,
    the colour frame registered to the depth (for the dark-surface holes)."""
    z = depth_mm.astype(np.float64)
    valid = z > 0
    z_m = z / 1000.0
    grazing = np.clip(cos_view, 0.05, 1.0)
    sigma = noise.sigma_mm + noise.sigma_growth_per_m2 * (z_m - 0.4) ** 2
    sigma = sigma * np.where(cos_view > 0, 1.0 + 0.5 * (1.0 / grazing - 1.0) ** 0.5, 1.0)
    noisy = z + rng.normal(0.0, 1.0, z.shape) * sigma
    # disparity quantisation
    d = noise.baseline_focal_mm_px / np.maximum(noisy, 1.0)
    d = np.round(d * noise.subpixel) / noise.subpixel
    out = noise.baseline_focal_mm_px / np.maximum(d, 1e-6)
    # projector shadow: background pixels just right of a near edge (projector on the camera's left)
    near_edge = np.zeros_like(valid)
    jump = (z[:, :-1] > 0) & ((z[:, 1:] - z[:, :-1]) > noise.edge_jump_mm)   # near at x, far at x+1
    ys, xs = np.nonzero(jump)
    for k in range(1, noise.shadow_px + 1):
        x = np.minimum(xs + k, z.shape[1] - 1)
        near_edge[ys, x] = True
    luma = (image_rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])) / 255.0
    dark = (luma < noise.dark_luma) & (rng.random(z.shape) < noise.dark_dropout)
    drop = rng.random(z.shape) < noise.dropout
    keep = valid & ~near_edge & ~dark & ~drop
    return np.where(keep, np.clip(np.rint(out), 0, 65535), 0).astype(np.uint16)


def sensor_depth_batch(vertices_cam_cm: np.ndarray, triangles: np.ndarray, K: np.ndarray, size_px: int,
                       images_rgb: np.ndarray, rng: np.random.Generator, background_mm: float = 1500.0,
                       noise: DepthNoise = DepthNoise()) -> np.ndarray:
    """(B, S, S) uint16 mm: what the Kinect-like camera would measure of each mesh in its crop, a wall
    background_mm behind (so the silhouettes cast projector shadows). vertices_cam_cm (B, V, 3), triangles
    (T, 3), K (B, 3, 3) crop cameras, images_rgb (B, S, S, 3) uint8 (dark surfaces lose their depth)."""
    out = np.empty((len(vertices_cam_cm), size_px, size_px), np.uint16)
    for i, (v, k, image) in enumerate(zip(vertices_cam_cm, K, images_rgb)):
        depth, cos = render_depth_mm(np.asarray(v, np.float64), triangles, np.asarray(k, np.float64),
                                     (size_px, size_px), background_mm)
        out[i] = kinect_depth(depth, cos, image, rng, noise)
    return out
