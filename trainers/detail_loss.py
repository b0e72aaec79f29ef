"""FineNet's losses, in the face's UV map (engine.uvmap), batched over (B, R, R, ...) tensors.

Photometric: the frame's colour I against a Lambertian face, I ≈ ρ · S_d, with S_d = sh_basis(n_d) · L
the shading of the displaced normals n_d (engine.detail.displaced_normals, engine.shading.sh_basis)
under the frame's SH light L (trainers.fine_data), and an albedo model that is smooth: ρ = blur(I / S_d),
a Gaussian of sigma texels over the visible ones. The residual is relative,
r = (I / S_d) / blur(I / S_d) - 1, the albedo's own fine variation once the shading is divided out, so
the term asks the displacement to explain what a smooth albedo under the coarse shading cannot, in a
scale that does not depend on skin tone or exposure. Charbonnier-robust (eps), so the sharp albedo
edges no shading explains (brows, lashes, lip lines) weigh less than their size.

Priors: smoothness (squared differences of neighbouring texels, mm) and magnitude (squared mm over the
face). Temporal: consecutive frames' maps agree where the optical flow between their unwrapped colour
says a texel of one went (the coarse fit slides a little over the skin from frame to frame).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.detail import displaced_normals
from engine.shading import sh_basis


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """(2r + 1,) normalised Gaussian taps, r = ceil(3 sigma)."""
    r = max(int(math.ceil(3.0 * sigma)), 1)
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W), zero outside the map."""
    g = gaussian_kernel(sigma).to(x)
    r = (len(g) - 1) // 2
    C = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0)), g.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(F.pad(x, (0, 0, r, r)), g.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def masked_blur(values: torch.Tensor, weight: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur of values (B, R, R, C) over weight (B, R, R) (normalised by the blurred weight)."""
    v = values.permute(0, 3, 1, 2) * weight[:, None]
    out = blur(v, sigma) / blur(weight[:, None], sigma).clamp_min(1e-3)
    return out.permute(0, 2, 3, 1)


def shading(normals: torch.Tensor, sh: torch.Tensor) -> torch.Tensor:
    """(B, R, R, 3) irradiance of unit normals (B, R, R, 3) under SH light (B, 9, 3)."""
    return torch.einsum("bijk,bkc->bijc", sh_basis(normals), sh)


def albedo_residual(colour: torch.Tensor, visible: torch.Tensor, normals: torch.Tensor, Pu: torch.Tensor,
                    Pv: torch.Tensor, sh: torch.Tensor, displacement_mm: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, R, R, 3) relative residual r = ρ / blur(ρ) - 1, ρ = I / S_d (module docstring); colour (B, R, R, 3)
    linear, visible (B, R, R) float 0/1, normals/Pu/Pv (B, R, R, 3) the coarse surface, sh (B, 9, 3),
    displacement_mm (B, R, R). Zero where not visible."""
    n = displaced_normals(normals, Pu, Pv, displacement_mm / 10.0, xp=torch)
    rho = colour / shading(n, sh).clamp_min(1e-3)
    smooth = masked_blur(rho, visible, sigma)
    return (rho / smooth.clamp_min(1e-4) - 1.0) * visible[..., None]


def photometric_loss(residual: torch.Tensor, visible: torch.Tensor, eps: float = 0.02) -> torch.Tensor:
    """(B,) Charbonnier mean of the residual (B, R, R, 3) over each sample's visible texels."""
    rho = torch.sqrt(residual ** 2 + eps ** 2) - eps
    return rho.sum(dim=(1, 2, 3)) / (3 * visible.sum(dim=(1, 2)).clamp_min(1.0))


def smoothness_prior(displacement_mm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared difference (mm²) between neighbouring face texels of (B, R, R) maps; mask (R, R)."""
    d = displacement_mm
    m = mask.to(d)
    mx, my = m[:, 1:] * m[:, :-1], m[1:] * m[:-1]
    gx = (d[:, :, 1:] - d[:, :, :-1]) ** 2 * mx
    gy = (d[:, 1:] - d[:, :-1]) ** 2 * my
    return (gx.sum(dim=(1, 2)) + gy.sum(dim=(1, 2))) / (mx.sum() + my.sum()).clamp_min(1.0)


def magnitude_prior(displacement_mm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared displacement (mm²) over the face texels (mask (R, R))."""
    m = mask.to(displacement_mm)
    return (displacement_mm ** 2 * m).sum(dim=(1, 2)) / m.sum().clamp_min(1.0)


def warp(maps: torch.Tensor, flow_px: torch.Tensor) -> torch.Tensor:
    """maps (B, R, R) sampled at x + flow (B, R, R, 2) texels (x, y), bilinear, border values outside."""
    B, H, W = maps.shape
    ys, xs = torch.meshgrid(torch.arange(H, dtype=maps.dtype, device=maps.device),
                            torch.arange(W, dtype=maps.dtype, device=maps.device), indexing="ij")
    gx = (xs + flow_px[..., 0]) * (2.0 / (W - 1)) - 1.0
    gy = (ys + flow_px[..., 1]) * (2.0 / (H - 1)) - 1.0
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(maps[:, None], grid, mode="bilinear", padding_mode="border", align_corners=True)[:, 0]


def temporal_loss(displacement_a: torch.Tensor, displacement_b: torch.Tensor, flow_ab_px: torch.Tensor,
                  both_visible: torch.Tensor) -> torch.Tensor:
    """(B,) mean |d_a(x) - d_b(x + flow_ab(x))| (mm) over texels both frames see; flow_ab (B, R, R, 2)
    texels from map a to map b."""
    diff = (displacement_a - warp(displacement_b, flow_ab_px)).abs() * both_visible
    return diff.sum(dim=(1, 2)) / both_visible.sum(dim=(1, 2)).clamp_min(1.0)
