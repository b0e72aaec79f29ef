"""Procedural skin detail with exact truth: random wrinkle displacement maps in the face's UV layout.

Forehead lines, frown lines between the brows, crow's feet at the outer eye corners and
nasolabial folds, each a groove (negative displacement, mm) with a Gaussian cross-section along
a curve placed from the model's 68 landmarks on the rest mesh. Curves and distances live in the
rest mesh's front view (x, y, cm), so a groove's width is in cm of skin where the skin faces the
front and somewhat narrower where it turns away (the temples): what matters is that the truth is
exact, not that it looks like one person's wrinkles.

Used to check that FineNet's photometric loss recovers known detail (tests/test_train_fine.py) and,
rendered onto synthetic faces, to measure FineNet's displacement error (bench/eval_detail.py).
"""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from engine.detail import texel_geometry
from engine.facemodel import FaceModel
from engine.uvmap import FaceUV


def _bezier(p0, p1, p2, n: int = 64) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def _groove(xy: np.ndarray, curve: np.ndarray, depth_mm: float, sigma_cm: float) -> np.ndarray:
    """(P,) mm: a groove of depth_mm along a curve (N, 2) cm, Gaussian across (sigma_cm), tapering to 0
    at both ends (sine envelope along the curve)."""
    seg = np.linalg.norm(np.diff(curve, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    dense = np.concatenate([np.linspace(curve[i], curve[i + 1], max(int(seg[i] / 0.02), 1), endpoint=False)
                            for i in range(len(curve) - 1)] + [curve[-1:]])
    s_dense = np.interp(np.linspace(0, len(curve) - 1, len(dense)), np.arange(len(curve)), s)
    dist, idx = cKDTree(dense).query(xy, distance_upper_bound=4 * sigma_cm)
    out = np.zeros(len(xy))
    near = np.isfinite(dist)
    along = s_dense[idx[near]] / max(s[-1], 1e-9)
    out[near] = -depth_mm * np.exp(-0.5 * (dist[near] / sigma_cm) ** 2) * np.sin(np.pi * along) ** 0.5
    return out


def random_wrinkles(rng: np.random.Generator, model: FaceModel, face_uv: FaceUV,
                    rest_geometry: dict | None = None) -> np.ndarray:
    """(R, R) float32 displacement map, mm (negative: into the skin), zero off the detail; each kind of
    wrinkle is present with probability 0.75, depths 0.2-1.0 mm, widths (sigma) 0.8-2.5 mm."""
    g = rest_geometry or texel_geometry(face_uv, model.neutral)
    mask = face_uv.mask
    xy = g["positions"][mask][:, :2].astype(np.float64)
    front = g["normals"][mask][:, 2] > 0.35             # skin that faces the front (not ears, jaw underside)
    lm = model.neutral[model.landmark68_vertices].astype(np.float64)[:, :2]
    d = np.zeros(len(xy))
    brow_y = lm[17:27, 1].mean()
    if rng.random() < 0.75:                              # forehead lines: 2-4 arcs above the brows
        half = rng.uniform(3.0, 4.5)
        for k in range(rng.integers(2, 5)):
            y0 = brow_y + rng.uniform(1.6, 2.2) + k * rng.uniform(0.8, 1.2)
            bend = rng.uniform(-0.04, 0.04)
            x = np.linspace(-half, half, 9) + rng.normal(0, 0.2)
            curve = np.stack([x, y0 + bend * x ** 2 + rng.normal(0, 0.08, 9)], axis=1)
            d += _groove(xy, curve, rng.uniform(0.2, 0.7), rng.uniform(0.08, 0.16))
    if rng.random() < 0.75:                              # frown lines between the brows
        gap = np.abs(lm[21, 0] - lm[22, 0]) / 2
        for side in (-1, 1):
            x0 = side * gap * rng.uniform(0.4, 0.8)
            curve = np.array([[x0, brow_y - 0.4], [x0 + side * 0.1, brow_y + 0.6], [x0 + side * 0.2, brow_y + 1.4]])
            d += _groove(xy, curve, rng.uniform(0.2, 0.6), rng.uniform(0.08, 0.14))
    if rng.random() < 0.75:                              # crow's feet: 3 rays from each outer eye corner
        for corner in (36, 45):
            c = lm[corner]
            out = np.sign(c[0])
            for angle in np.radians(rng.uniform(-35, 35, 3)):
                direction = np.array([out * np.cos(angle), np.sin(angle)])
                start = c + direction * 0.4
                curve = np.stack([start, start + direction * rng.uniform(0.8, 1.6)])
                d += _groove(xy, curve, rng.uniform(0.15, 0.4), rng.uniform(0.06, 0.1))
    if rng.random() < 0.75:                              # nasolabial folds: nose wing to past the mouth corner
        for wing, mouth in ((31, 48), (35, 54)):
            out = np.sign(lm[wing, 0] - lm[33, 0])
            p0 = lm[wing] + [out * 0.35, 0.2]
            p2 = lm[mouth] + [out * rng.uniform(0.4, 0.7), -rng.uniform(0.6, 1.2)]
            p1 = (p0 + p2) / 2 + [out * rng.uniform(0.2, 0.5), 0.0]
            d += _groove(xy, _bezier(p0, p1, p2), rng.uniform(0.4, 1.0), rng.uniform(0.15, 0.25))
    d[~front] = 0.0
    out = np.zeros(mask.shape, np.float32)
    out[mask] = d
    return out
