"""The detail layer's geometry: a frame unwrapped into the face's UV map, and a displacement map
along the coarse mesh's normals turned into shading normals, displaced vertices and normal maps.

A displacement d (metres of skin, here cm or mm as named) moves each point of the coarse surface
P(u, v) along its smooth normal n: S = P + d n. Its normal follows from the surface's tangents,
S_u × S_v = P_u × P_v + d_v (P_u × n) + d_u (n × P_v) (the d · n_u terms dropped: d is a few
tenths of a mm on a surface that bends over cm). P_u × P_v is taken as |P_u × P_v| n, so the coarse
shading stays smooth and only the displacement's slope tilts it.

Maps follow engine.uvmap's convention (row 0 at v = 1); camera space is OpenCV's, cm.
"""
from __future__ import annotations

import cv2
import numpy as np

from engine.pose import project
from engine.rasterizer import rasterize, vertex_normals
from engine.uvmap import DetailMesh, FaceUV, scatter_texels, texel_values, uv_to_map_px


#: Visible texels this close to the edge of what is visible are left out (unwrap).
EDGE_TEXELS = 2


def texel_geometry(face_uv: FaceUV, vertices: np.ndarray) -> dict:
    """The coarse surface in the map: positions (R, R, 3) cm, unit smooth normals (R, R, 3), and the
    tangents P_u, P_v (R, R, 3), the surface's derivatives along u and v (cm per UV unit, constant over
    a triangle); all zero off the face. vertices (V, 3) cm, camera or model space: the maps are in the same.
    """
    v = np.asarray(vertices, np.float64)
    n = vertex_normals(v, face_uv.triangles)
    normals = texel_values(face_uv, n)
    normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)
    return {"positions": texel_values(face_uv, v), "normals": normals,
            "Pu": scatter_texels(face_uv, face_uv.d_du @ v), "Pv": scatter_texels(face_uv, face_uv.d_dv @ v)}


def unwrap(image: np.ndarray, vertices_cam: np.ndarray, geometry: dict, face_uv: FaceUV, K: np.ndarray,
           min_cos: float = 0.2, depth_tol_cm: float = 0.3, edge_texels: int = EDGE_TEXELS
           ) -> tuple[np.ndarray, np.ndarray]:
    """A frame (H, W, C) read into the face map: (colour (R, R, C) float32 in the image's own scale,
    visible (R, R) bool). vertices_cam (V, 3) cm, geometry = texel_geometry(face_uv, vertices_cam),
    K (3, 3) px.

    A texel is visible when it projects inside the frame, faces the camera (cos > min_cos), is not
    behind the face's own depth buffer (nose over cheek) by more than depth_tol_cm, and is at least
    edge_texels from the edge of what is visible (the outline mixes in what lies behind the face).
    """
    H, W = image.shape[:2]
    channels = image.shape[2] if image.ndim == 3 else 1
    mask = face_uv.mask
    colour = np.zeros(mask.shape + (channels,), np.float32)
    visible = np.zeros(mask.shape, bool)
    P = geometry["positions"][mask].astype(np.float64)
    if (P[:, 2] <= 1.0).any():
        return colour, visible
    px = project(P, np.asarray(K, np.float64))
    lo = np.maximum(np.floor(px.min(axis=0)).astype(int) - 2, 0)
    hi = np.minimum(np.ceil(px.max(axis=0)).astype(int) + 3, [W, H])
    if (hi <= lo).any():
        return colour, visible
    # the face's own depth buffer, over the box it covers
    K_box = np.asarray(K, np.float64).copy()
    K_box[0, 2] -= lo[0]
    K_box[1, 2] -= lo[1]
    size = hi - lo
    frags = rasterize(np.asarray(vertices_cam, np.float64), face_uv.triangles, K_box, int(size[0]), int(size[1]),
                      backend="cpu")
    zbuf = np.where(np.isfinite(frags.depth_cm), frags.depth_cm, 1e9).astype(np.float32)
    zbuf = cv2.erode(zbuf, np.ones((3, 3), np.uint8))      # nearest surface within a pixel
    ij = np.clip(np.round(px - lo).astype(int), 0, size - 1)
    inside = (px[:, 0] >= 0) & (px[:, 0] <= W - 1) & (px[:, 1] >= 0) & (px[:, 1] <= H - 1)
    unoccluded = P[:, 2] <= zbuf[ij[:, 1], ij[:, 0]] + depth_tol_cm
    view = -P / np.linalg.norm(P, axis=1, keepdims=True)
    facing = (geometry["normals"][mask] * view).sum(axis=1) > min_cos
    visible[mask] = inside & unoccluded & facing
    if edge_texels > 0:
        visible = cv2.erode(visible.astype(np.uint8), np.ones((2 * edge_texels + 1,) * 2, np.uint8)) > 0
    map_x = np.full(mask.shape, -1.0, np.float32)
    map_y = np.full(mask.shape, -1.0, np.float32)
    map_x[mask], map_y[mask] = px[:, 0], px[:, 1]
    sampled = cv2.remap(np.ascontiguousarray(image), map_x, map_y, cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REPLICATE).reshape(colour.shape)
    colour[visible] = sampled[visible]
    return colour, visible


def map_slopes(displacement_cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(d_u, d_v) of a map (R, R), cm per UV unit: central differences, one-sided at the map's edge;
    v runs up while rows run down."""
    d = np.asarray(displacement_cm, np.float64)
    step = 1.0 / d.shape[-1]                                 # UV units per texel
    return np.gradient(d, step, axis=1), -np.gradient(d, step, axis=0)


def displaced_normals(normals, Pu, Pv, displacement_cm, xp=np):
    """Unit normals (R, R, 3) of the surface P + d n, from the smooth normals n (R, R, 3), the tangents
    P_u, P_v (R, R, 3) (cm per UV unit) and d (R, R) cm (module docstring). Slopes of d by central
    differences (one-sided at the map's edge). numpy, or torch with xp=torch (differentiable in d)."""
    if xp is np:
        d_u, d_v = map_slopes(displacement_cm)
        area = np.linalg.norm(np.cross(Pu, Pv), axis=-1)[..., None]
        n = area * normals + d_v[..., None] * np.cross(Pu, normals) + d_u[..., None] * np.cross(normals, Pv)
        return (n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)).astype(np.float32)
    import torch

    d = displacement_cm
    step = 1.0 / d.shape[-1]
    d_u = _torch_gradient(d, step, dim=-1)                   # as map_slopes, differentiable
    d_v = -_torch_gradient(d, step, dim=-2)
    area = torch.linalg.vector_norm(torch.cross(Pu, Pv, dim=-1), dim=-1, keepdim=True)
    n = (area * normals + d_v[..., None] * torch.cross(Pu, normals, dim=-1)
         + d_u[..., None] * torch.cross(normals, Pv, dim=-1))
    return n / torch.linalg.vector_norm(n, dim=-1, keepdim=True).clamp_min(1e-12)


def ramp_normals(normals, Pu, Pv, slope_cm_per_uv: float) -> tuple[np.ndarray, np.ndarray]:
    """displaced_normals for a map rising slope_cm_per_uv along u, and for one rising as much along v
    (up), each (R, R, 3) float32: a ramp's slopes are that constant everywhere, so they are not taken
    by differences, and the two share the rest of the work."""
    area = np.linalg.norm(np.cross(Pu, Pv), axis=-1)[..., None]
    base = area * normals
    out = []
    for n in (base + slope_cm_per_uv * np.cross(normals, Pv), base + slope_cm_per_uv * np.cross(Pu, normals)):
        out.append((n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)).astype(np.float32))
    return out[0], out[1]


def _torch_gradient(d, step: float, dim: int):
    """np.gradient along one dim of a torch tensor: central inside, one-sided at the ends."""
    import torch

    first = (d.narrow(dim, 1, 1) - d.narrow(dim, 0, 1)) / step
    inner = (d.narrow(dim, 2, d.shape[dim] - 2) - d.narrow(dim, 0, d.shape[dim] - 2)) / (2 * step)
    last = (d.narrow(dim, d.shape[dim] - 1, 1) - d.narrow(dim, d.shape[dim] - 2, 1)) / step
    return torch.cat([first, inner, last], dim=dim)


def sample_map(map_image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear values (N,) or (N, C) of a map (R, R[, C]) at UV (N, 2), clamped at the map's edge."""
    R = map_image.shape[0]
    px = np.clip(uv_to_map_px(uv, R), 0.0, R - 1.0)
    x0 = np.minimum(np.floor(px).astype(np.int64), R - 2)
    f = px - x0
    m = np.asarray(map_image, np.float32)
    if m.ndim == 3:
        f = f[:, None, :]
    top = m[x0[:, 1], x0[:, 0]] * (1 - f[..., 0]) + m[x0[:, 1], x0[:, 0] + 1] * f[..., 0]
    bottom = m[x0[:, 1] + 1, x0[:, 0]] * (1 - f[..., 0]) + m[x0[:, 1] + 1, x0[:, 0] + 1] * f[..., 0]
    return (top * (1 - f[..., 1]) + bottom * f[..., 1]).astype(np.float32)


def displaced_vertices(detail_mesh: DetailMesh, vertices: np.ndarray, triangles: np.ndarray,
                       displacement_mm: np.ndarray) -> np.ndarray:
    """(D, 3) cm: the detail mesh on the coarse vertices (V, 3) cm, each detail vertex moved along the
    coarse surface's smooth normal (from triangles (T, 3), the face's) by the map (R, R) mm at its UV."""
    v = np.asarray(vertices, np.float32)
    n = vertex_normals(v, triangles)
    base = detail_mesh.base_vertices(v)
    nd = detail_mesh.base_vertices(n)
    nd /= np.maximum(np.linalg.norm(nd, axis=1, keepdims=True), 1e-12)
    d_cm = sample_map(displacement_mm, detail_mesh.uv) / 10.0
    return (base + d_cm[:, None] * nd).astype(np.float32)


def tangent_normal_map(Pu: np.ndarray, Pv: np.ndarray, displacement_mm: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(R, R, 3) float32 unit normals in tangent space (x along u, y along v, z out of the skin) of the
    displaced surface, for a renderer's normal texture: (-∂d/∂s_u, -∂d/∂s_v, 1) normalised, s the skin
    distance along u and v (d's slope per cm of skin); (0, 0, 1) off the face."""
    d_cm = np.asarray(displacement_mm, np.float64) / 10.0
    d_u, d_v = map_slopes(d_cm)
    su = np.maximum(np.linalg.norm(Pu, axis=-1), 1e-9)
    sv = np.maximum(np.linalg.norm(Pv, axis=-1), 1e-9)
    n = np.stack([-d_u / su, -d_v / sv, np.ones_like(d_cm)], axis=-1)
    n[~mask] = (0.0, 0.0, 1.0)
    return (n / np.linalg.norm(n, axis=-1, keepdims=True)).astype(np.float32)


def detailed_face_triangles(model_triangles: np.ndarray, face_mask: np.ndarray, detail_mesh: DetailMesh,
                            n_vertices: int) -> np.ndarray:
    """Triangles of the whole head with its face skin subdivided: the model's other triangles as they
    are, then the detail mesh's, whose vertices are the model's own (the face skin's ids are the detail
    mesh's first ids) followed by the edge midpoints, numbered from n_vertices on (detailed_vertices)."""
    n_face = int((detail_mesh.parents[:, 0] == detail_mesh.parents[:, 1]).sum())
    remap = np.concatenate([detail_mesh.parents[:n_face, 0], n_vertices + np.arange(detail_mesh.n_vertices - n_face)])
    return np.concatenate([model_triangles[~face_mask], remap[detail_mesh.triangles]]).astype(np.int64)


def detailed_vertices(vertices: np.ndarray, detail_vertices: np.ndarray, detail_mesh: DetailMesh) -> np.ndarray:
    """(V + D - F, 3): the model's vertices (V, 3) with the face skin's F taken from the displaced detail
    mesh (D, 3), then the detail mesh's midpoints: the vertex order of detailed_face_triangles."""
    n_face = int((detail_mesh.parents[:, 0] == detail_mesh.parents[:, 1]).sum())
    out = np.concatenate([np.asarray(vertices, np.float32), detail_vertices[n_face:]])
    out[detail_mesh.parents[:n_face, 0]] = detail_vertices[:n_face]
    return out
