"""Colour and light in numpy (no torch): the sRGB curve, the real SH basis, and a robust SH light fit.

The numpy side of engine.shading's image formation (colour = albedo · sh_basis(n) @ L, the same
basis order and constants; tests/test_synthesis.py checks they agree), for what runs without torch:
synthesis, inverse rendering, and FineNet's run-time inputs (engine.fine_runtime).
"""
from __future__ import annotations

import math

import numpy as np


def srgb_to_linear(c):
    """sRGB in [0, 1] -> linear (the IEC 61966-2-1 curve)."""
    c = np.asarray(c, dtype=np.float32)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_to_srgb(c):
    """Linear -> sRGB in [0, 1], clipped."""
    c = np.clip(np.asarray(c, dtype=np.float32), 0.0, 1.0)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1 / 2.4) - 0.055).astype(np.float32)


# engine.shading's real SH constants, mirrored so that synthesis needs no torch (tests check they agree)
SH_C0 = 0.5 * math.sqrt(1.0 / math.pi)
SH_C1 = math.sqrt(3.0 / (4.0 * math.pi))
SH_C2 = 0.5 * math.sqrt(15.0 / math.pi)
SH_C20 = 0.25 * math.sqrt(5.0 / math.pi)
SH_C22 = 0.25 * math.sqrt(15.0 / math.pi)


def sh_basis_np(normals: np.ndarray) -> np.ndarray:
    """numpy twin of engine.shading.sh_basis: unit normals (..., 3) -> (..., 9), same order and constants."""
    x, y, z = normals[..., 0], normals[..., 1], normals[..., 2]
    return np.stack([np.full_like(x, SH_C0), SH_C1 * y, SH_C1 * z, SH_C1 * x,
                     SH_C2 * x * y, SH_C2 * y * z, SH_C20 * (3.0 * z * z - 1.0), SH_C2 * x * z,
                     SH_C22 * (x * x - y * y)], axis=-1)


def fit_sh_lighting(normals: np.ndarray, colour: np.ndarray, rounds: int = 4,
                    ridge: tuple[float, float] = (1e-2, 1e-1), max_band1_ratio: float = 1.0,
                    colour_pull: float | None = 0.02) -> np.ndarray:
    """(9, 3) L with colour (P, 3) ≈ albedo · sh_basis(normals (P, 3)) @ L, for one albedo (3,) over
    all P points and a white light: the SH light (9,) is fitted to the channels' mean colour and
    L = that light in every channel times the mean colour's per-channel ratio (the albedo colour rides in L).

    A white light is the gauge's assumption anyway (module docstring); fitting channels apart let
    the chroma of shadows and make-up bend each channel's light differently (unphysical lights, very
    saturated albedos). Least squares, reweighted `rounds` times to play down points far from the
    fit (Cauchy weights, scale 2 robust sigmas of the residual: brows, lips, shadows, highlights).
    ridge: pulls of the band-1 and band-2 coefficients to 0, relative to the DC term's scale (a
    face shows about a hemisphere of normals: unpulled, band 2 bends the light negative at grazing
    normals and explains the nose's own shape by light). max_band1_ratio: |band 1| / DC at most
    this (a single distant light with no ambient gives 1.15): a stronger band 1 would make the
    light negative on the unseen side (under the chin). colour_pull: then each channel gets its own
    light, pulled towards the white one with this weight (relative to the DC scale; None: white only),
    so a light whose colour varies with direction (a warm key over a cool ambient) is followed a little.
    """
    Y = sh_basis_np(np.asarray(normals, np.float64))
    C = np.asarray(colour, np.float64)
    g = C.mean(axis=1)
    w = np.ones(len(Y))
    reg = np.diag([0.0] + [ridge[0]] * 3 + [ridge[1]] * 5) * len(Y) * Y[:, 0].mean() ** 2
    light = np.zeros(9)
    for _ in range(rounds + 1):
        Yw = Y * w[:, None]
        light = np.linalg.solve(Yw.T @ Y + reg, Yw.T @ g)
        r = g - Y @ light
        scale = max(2.0 * 1.4826 * np.median(np.abs(r - np.median(r))), 1e-6)   # 2 robust sigmas
        w = 1.0 / (1.0 + (r / scale) ** 2)
    ratio = np.linalg.norm(light[1:4]) / max(light[0], 1e-9)
    if ratio > max_band1_ratio:
        light[1:] *= max_band1_ratio / ratio
    chroma = (w[:, None] * C).sum(axis=0) / max((w * g).sum(), 1e-9)      # per-channel albedo ratio
    white = light[:, None] * chroma[None, :]
    if colour_pull is None:
        return white
    # each channel's own light, pulled towards the white one (the same robust weights)
    Yw = Y * w[:, None]
    pull = np.eye(9) * colour_pull * len(Y) * Y[:, 0].mean() ** 2
    return np.linalg.solve(Yw.T @ Y + reg + pull, Yw.T @ C + pull @ white)
