"""Differentiable shading on top of the rasterizer, in torch: C(p) = Lᵀ φ(n_p) · ρ_p.

The image formation of seed 002: per-vertex albedo ρ, per-vertex normals n,
both interpolated to each pixel, lit by 2nd-order spherical harmonics (9
coefficients per colour channel).

Conventions
- Everything is in camera space, OpenCV axes: x right, y down, z forward, cm.
  Normals are computed from camera-space vertices, so a surface facing the
  camera has a normal with negative z, and the SH lighting is expressed in
  that same frame (light "from the camera" is the -z direction).
- sh_basis is the plain real SH basis Y_lm (orthonormal on the sphere, no
  Condon-Shortley sign), ordered (l, m) = (0,0), (1,-1), (1,0), (1,1),
  (2,-2), (2,-1), (2,0), (2,1), (2,2), i.e. 1, y, z, x, xy, yz, 3z²-1, xz,
  x²-y² up to constants. The lighting coefficients L (9, 3) are irradiance
  coefficients: any Lambertian convolution factors are folded into L, so
  colour = albedo · Σ_k L_k Y_k(n) with no further factor.
- Shading is per pixel (interpolated, renormalised normal), not per vertex.

Gradients: the rasterizer (engine.rasterizer) only decides which triangle
each pixel sees. The barycentrics are recomputed here in torch from the
projected vertices of that triangle (as nvdiffrast does), so gradients reach
vertex positions through the barycentrics and the normals, and reach albedo
and lighting directly. Visibility itself is not differentiated: moving a
silhouette edge or an occlusion boundary gives no gradient.
"""
from __future__ import annotations

import math

import torch

from engine.rasterizer import rasterize

# real SH normalisation constants (Ramamoorthi & Hanrahan 2001)
SH_C0 = 0.5 * math.sqrt(1.0 / math.pi)           # Y00            0.282095
SH_C1 = math.sqrt(3.0 / (4.0 * math.pi))          # Y1m: y, z, x   0.488603
SH_C2 = 0.5 * math.sqrt(15.0 / math.pi)           # Y2-2, Y2-1, Y21: xy, yz, xz   1.092548
SH_C20 = 0.25 * math.sqrt(5.0 / math.pi)          # Y20: 3z² - 1   0.315392
SH_C22 = 0.25 * math.sqrt(15.0 / math.pi)         # Y22: x² - y²   0.546274


def sh_basis(normals: torch.Tensor) -> torch.Tensor:
    """Unit normals (..., 3) -> the 9 real SH basis functions (..., 9), in the order above."""
    x, y, z = normals.unbind(-1)
    return torch.stack([
        torch.full_like(x, SH_C0),
        SH_C1 * y, SH_C1 * z, SH_C1 * x,
        SH_C2 * x * y, SH_C2 * y * z, SH_C20 * (3.0 * z * z - 1.0), SH_C2 * x * z, SH_C22 * (x * x - y * y),
    ], dim=-1)


def shade(albedo: torch.Tensor, normals: torch.Tensor, sh_coeffs: torch.Tensor) -> torch.Tensor:
    """Colour (..., 3) = albedo (..., 3) · (sh_basis(normals) @ sh_coeffs), sh_coeffs (9, 3).

    normals (..., 3) must be unit length, in the frame the lighting is given in (camera space).
    """
    return albedo * (sh_basis(normals) @ sh_coeffs)


def vertex_normals(vertices: torch.Tensor, triangles: torch.Tensor) -> torch.Tensor:
    """(V, 3) unit area-weighted vertex normals (counter-clockwise = front); zero for unused vertices."""
    tri = torch.as_tensor(triangles, device=vertices.device).long()
    v0, v1, v2 = (vertices[tri[:, i]] for i in range(3))
    face_n = torch.cross(v1 - v0, v2 - v0, dim=-1)   # length = twice the area: the weight
    n = torch.zeros_like(vertices)
    for i in range(3):
        n = n.index_add(0, tri[:, i], face_n)
    return n / torch.linalg.vector_norm(n, dim=-1, keepdim=True).clamp_min(1e-12)


def project(points_cam: torch.Tensor, camera_matrix) -> torch.Tensor:
    """(..., 3) camera-space points -> (..., 2) pixels under pinhole K, as engine.pose.project."""
    K = torch.as_tensor(camera_matrix, dtype=points_cam.dtype, device=points_cam.device)
    z = points_cam[..., 2]
    return torch.stack([K[0, 0] * points_cam[..., 0] / z + K[0, 2], K[1, 1] * points_cam[..., 1] / z + K[1, 2]],
                       dim=-1)


def pixel_barycentrics(corners_cam: torch.Tensor, pixels: torch.Tensor, camera_matrix) -> torch.Tensor:
    """Perspective-correct barycentrics (P, 3) of pixel centres pixels (P, 2) (x, y) in their
    triangles, whose camera-space corners are corners_cam (P, 3, 3); differentiable in the corners.

    The same formula as the rasterizer: screen-space edge weights, divided by corner depth,
    renormalised (1/z is what varies linearly across the screen).
    """
    uv = project(corners_cam, camera_matrix)                 # (P, 3, 2)
    d = uv - pixels.to(uv.dtype)[:, None, :]                  # corners relative to the pixel centre
    # edge function opposite corner i: twice the signed area of (pixel, corner i+1, corner i+2)
    e = torch.stack([d[:, (i + 1) % 3, 0] * d[:, (i + 2) % 3, 1] - d[:, (i + 2) % 3, 0] * d[:, (i + 1) % 3, 1]
                     for i in range(3)], dim=-1)
    w = e / e.sum(dim=-1, keepdim=True)                       # screen-space weights (sum = twice the area)
    q = w / corners_cam[..., 2]
    return q / q.sum(dim=-1, keepdim=True)


def perspective_barycentrics(vertices_cam: torch.Tensor, triangles, triangle_id: torch.Tensor,
                             camera_matrix) -> torch.Tensor:
    """Barycentrics (H, W, 3) for the triangle ids (H, W) a rasterizer found, recomputed from
    vertices_cam (V, 3) so that they carry gradients to the vertices; zero off the mesh."""
    tri = torch.as_tensor(triangles, device=vertices_cam.device).long()
    tid = torch.as_tensor(triangle_id, device=vertices_cam.device).long()
    mask = tid >= 0
    ys, xs = torch.nonzero(mask, as_tuple=True)
    b = pixel_barycentrics(vertices_cam[tri[tid[mask]]], torch.stack([xs, ys], dim=-1), camera_matrix)
    out = vertices_cam.new_zeros(tid.shape + (3,))
    out[mask] = b
    return out


def interpolate(attributes: torch.Tensor, triangles, triangle_id: torch.Tensor,
                barycentric: torch.Tensor) -> torch.Tensor:
    """Per-vertex attributes (V, C) -> per-pixel (H, W, C), zero off the mesh; differentiable in
    the attributes and in the barycentrics (H, W, 3)."""
    tri = torch.as_tensor(triangles, device=attributes.device).long()
    tid = torch.as_tensor(triangle_id, device=attributes.device).long()
    mask = tid >= 0
    corners = attributes[tri[tid[mask]]]                      # (P, 3, C)
    values = (corners * barycentric[mask].to(attributes.dtype)[..., None]).sum(dim=1)
    out = attributes.new_zeros(tid.shape + (attributes.shape[-1],))
    out[mask] = values
    return out


def render(vertices_cam: torch.Tensor, triangles, albedo: torch.Tensor, sh_coeffs: torch.Tensor, camera_matrix,
           width: int, height: int, near_cm: float = 1.0, background: float = 0.0,
           backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Shaded image (H, W, 3) and coverage mask (H, W) bool of a mesh.

    vertices_cam (V, 3) cm in camera space, triangles (T, 3), albedo (V, 3) per vertex,
    sh_coeffs (9, 3) camera-space lighting, camera_matrix (3, 3) pixels. Differentiable in
    vertices_cam (through barycentrics and normals), albedo and sh_coeffs; background pixels
    are `background` and carry no gradient. Normals come from the triangles given, so pass
    the triangles whose shading matters (e.g. all of a closed mesh) even if some are hidden.
    """
    tri = torch.as_tensor(triangles, device=vertices_cam.device).long()
    frags = rasterize(vertices_cam.detach(), tri, camera_matrix, width, height, near_cm=near_cm, backend=backend)
    tid = frags.triangle_id.long()
    mask = tid >= 0
    ys, xs = torch.nonzero(mask, as_tuple=True)
    corners = tri[tid[mask]]                                               # (P, 3) vertex ids
    b = pixel_barycentrics(vertices_cam[corners], torch.stack([xs, ys], dim=-1), camera_matrix)[..., None]
    normals = (vertex_normals(vertices_cam, tri)[corners] * b).sum(dim=1)
    normals = normals / torch.linalg.vector_norm(normals, dim=-1, keepdim=True).clamp_min(1e-12)
    colour = shade((albedo[corners] * b).sum(dim=1), normals, sh_coeffs)
    image = torch.full((height, width, 3), float(background), dtype=colour.dtype, device=colour.device)
    image = image.index_put((ys, xs), colour)
    return image, mask
