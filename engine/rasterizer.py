"""Z-buffer rasterizer: per pixel the visible triangle, its barycentrics and its depth.

The CPU kernel is numba. Pixel centres sit at integer coordinates (OpenCV's
convention), so a pinhole camera matrix K from OpenCV applies unchanged.
Barycentrics are perspective-correct: they weight the triangle's corners in
3D, so attributes interpolated with them are what a camera sees.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from engine.pose import project


@dataclass
class Fragments:
    """Rasterizer output for an (H, W) image.

    triangle_id (H, W) int32, -1 where no triangle covers the pixel;
    barycentric (H, W, 3) float32, perspective-correct, zero off the mesh;
    depth_cm (H, W) float32 camera z of the surface, inf off the mesh.
    """

    triangle_id: np.ndarray
    barycentric: np.ndarray
    depth_cm: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        return self.triangle_id >= 0


def rasterize(points_cam: np.ndarray, triangles: np.ndarray, camera_matrix: np.ndarray,
              width: int, height: int, near_cm: float = 1.0) -> Fragments:
    """Rasterize a mesh given in camera coordinates (cm, z forward, y down).

    points_cam (V, 3), triangles (T, 3) int, camera_matrix (3, 3) pixels.
    Triangles with a corner nearer than near_cm are skipped.
    """
    points_cam = np.ascontiguousarray(points_cam, dtype=np.float64)
    uv = project(points_cam, np.asarray(camera_matrix, dtype=np.float64))
    tri = np.ascontiguousarray(triangles, dtype=np.int64)
    tri_id = np.full((height, width), -1, dtype=np.int32)
    bary = np.zeros((height, width, 3), dtype=np.float32)
    depth = np.full((height, width), np.inf, dtype=np.float32)
    _rasterize_kernel(np.ascontiguousarray(uv), points_cam[:, 2].copy(), tri, float(near_cm),
                      tri_id, bary, depth)
    return Fragments(tri_id, bary, depth)


@numba.njit(cache=True, nogil=True)
def _rasterize_kernel(uv, z, tri, near, tri_id, bary, depth):
    height, width = tri_id.shape
    for t in range(tri.shape[0]):
        i0, i1, i2 = tri[t, 0], tri[t, 1], tri[t, 2]
        z0, z1, z2 = z[i0], z[i1], z[i2]
        if z0 < near or z1 < near or z2 < near:
            continue
        x0, y0 = uv[i0, 0], uv[i0, 1]
        x1, y1 = uv[i1, 0], uv[i1, 1]
        x2, y2 = uv[i2, 0], uv[i2, 1]
        area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
        if abs(area) < 1e-12:
            continue
        xmin = max(int(np.ceil(min(x0, x1, x2))), 0)
        xmax = min(int(np.floor(max(x0, x1, x2))), width - 1)
        ymin = max(int(np.ceil(min(y0, y1, y2))), 0)
        ymax = min(int(np.floor(max(y0, y1, y2))), height - 1)
        if xmin > xmax or ymin > ymax:
            continue
        inv_area = 1.0 / area
        for py in range(ymin, ymax + 1):
            for px in range(xmin, xmax + 1):
                # screen-space barycentrics from edge functions
                w0 = ((x1 - px) * (y2 - py) - (x2 - px) * (y1 - py)) * inv_area
                w1 = ((x2 - px) * (y0 - py) - (x0 - px) * (y2 - py)) * inv_area
                w2 = 1.0 - w0 - w1
                if w0 < 0.0 or w1 < 0.0 or w2 < 0.0:
                    continue
                # perspective correction: interpolate 1/z linearly in screen space
                q0, q1, q2 = w0 / z0, w1 / z1, w2 / z2
                inv_z = q0 + q1 + q2
                d = 1.0 / inv_z
                if d < depth[py, px]:
                    depth[py, px] = d
                    tri_id[py, px] = t
                    bary[py, px, 0] = q0 * d
                    bary[py, px, 1] = q1 * d
                    bary[py, px, 2] = q2 * d


def interpolate(fragments: Fragments, attributes: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Per-vertex attributes (V, C) -> per-pixel (H, W, C), zero off the mesh."""
    tid = fragments.triangle_id
    out = np.zeros(tid.shape + (attributes.shape[1],), dtype=np.float32)
    m = tid >= 0
    corners = attributes[triangles[tid[m]]]  # (P, 3, C)
    out[m] = np.einsum("pic,pi->pc", corners, fragments.barycentric[m])
    return out


def vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """(V, 3) unit area-weighted vertex normals of a mesh."""
    v0, v1, v2 = (vertices[triangles[:, i]] for i in range(3))
    face_n = np.cross(v1 - v0, v2 - v0)
    n = np.zeros_like(vertices)
    for i in range(3):
        np.add.at(n, triangles[:, i], face_n)
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    return n / np.maximum(norm, 1e-12)
