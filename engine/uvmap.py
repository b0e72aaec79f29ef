"""The face's UV layout, and the detail mesh that FineNet's displacement maps displace.

The model has its own UVs: tile 0 of its UDIM layout (u, v in [0, 1)) is the face skin
(M_Face: vertices 0-9408, 18460 triangles). All of those triangles turn the same way in UV,
none has zero area, and the 138 vertices where the layout has two UV corners have the same
coordinates at both, so one UV per vertex is exact (tests/test_uvmap.py checks all three).

Map convention: a map is an image (R, R, C); texel (row i, column j) is centred on
u = (j + 0.5) / R, v = 1 - (i + 0.5) / R (row 0 is the top of the face, as an image shows it).
At R = 256 a texel is about 1.2 mm of skin on the cheeks (29 cm per UV unit, median).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

from engine.facemodel import FaceModel
from engine.rasterizer import rasterize

#: Side of FineNet's displacement map, texels.
DETAIL_MAP_PX = 256
FACE_MATERIAL = "M_Face"


class UVLayoutError(ValueError):
    """The model's UVs cannot serve as the face's layout (flipped, missing or split corners)."""


def face_triangles_and_uv(model: FaceModel) -> tuple[np.ndarray, np.ndarray]:
    """The face skin's triangles (T, 3) (model vertex ids) and one UV per model vertex (V, 2) float32
    (NaN for vertices off the face skin); raises UVLayoutError where a vertex has two different UVs."""
    mask = model.material_mask(FACE_MATERIAL)
    tri = model.triangles[mask]
    tuv = model.triangle_uv[mask]
    if (tuv < 0).any():
        raise UVLayoutError("face triangles without UV corners")
    vertex_uv = np.full((model.n_vertices, 2), np.nan, np.float32)
    vertex_uv[tri.ravel()] = model.uv[tuv.ravel()]
    spread = np.abs(vertex_uv[tri.ravel()] - model.uv[tuv.ravel()]).max() if tri.size else 0.0
    if spread > 1e-6:
        raise UVLayoutError(f"face vertices with two different UVs ({spread:.3g} apart): the layout has seams")
    return tri.astype(np.int64), vertex_uv


def signed_uv_areas(triangles: np.ndarray, vertex_uv: np.ndarray) -> np.ndarray:
    """(T,) twice the signed UV area of each triangle (positive: counter-clockwise in u, v)."""
    a, b, c = (vertex_uv[triangles[:, i]].astype(np.float64) for i in range(3))
    return (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])


def uv_to_map_px(uv: np.ndarray, resolution: int) -> np.ndarray:
    """UV (..., 2) -> map pixel positions (..., 2) (x, y), texel centres at integers."""
    uv = np.asarray(uv, np.float64)
    return np.stack([uv[..., 0] * resolution - 0.5, (1.0 - uv[..., 1]) * resolution - 0.5], axis=-1)


@dataclass(frozen=True)
class FaceUV:
    """Where each texel of an (R, R) map lies on the face mesh.

    triangles (T, 3) model vertex ids of the face skin; vertex_uv (V, 2) per model vertex (NaN off
    the face); texel_triangle (R, R) int32 index into triangles, -1 where no face triangle covers
    the texel; texel_bary (R, R, 3) float32 barycentrics in that triangle (affine in UV).
    interpolation, d_du, d_dv: sparse (P, V) matrices over the P face texels (row-major order of
    mask): per-vertex values -> their value, u-derivative and v-derivative at each texel (the
    derivatives are constant over a triangle: they depend on the UVs only).
    """

    triangles: np.ndarray
    vertex_uv: np.ndarray
    texel_triangle: np.ndarray
    texel_bary: np.ndarray
    interpolation: sparse.csr_matrix
    d_du: sparse.csr_matrix
    d_dv: sparse.csr_matrix

    @classmethod
    def from_model(cls, model: FaceModel, resolution: int = DETAIL_MAP_PX) -> "FaceUV":
        tri, vertex_uv = face_triangles_and_uv(model)
        areas = signed_uv_areas(tri, vertex_uv)
        if (areas <= 0).any():
            raise UVLayoutError(f"{int((areas <= 0).sum())} face triangles are flipped or empty in UV")
        # rasterize the layout itself: points (x_px, y_px, 1) under the identity camera
        used = np.unique(tri)
        pts = np.zeros((model.n_vertices, 3))
        pts[:, 2] = 1.0
        pts[used, :2] = uv_to_map_px(vertex_uv[used], resolution)
        frags = rasterize(pts, tri, np.eye(3), resolution, resolution, near_cm=0.5, backend="cpu")
        tid_map = frags.triangle_id.astype(np.int32)
        bary = frags.barycentric.astype(np.float32)
        tid = tid_map[tid_map >= 0]
        ids = tri[tid]                                            # (P, 3)
        shape = (len(tid), model.n_vertices)
        rows = np.repeat(np.arange(len(tid)), 3)

        def matrix(weights):
            return sparse.csr_matrix((np.asarray(weights, np.float64).ravel(), (rows, ids.ravel())), shape=shape)

        # d/du and d/dv of a linear function over a triangle: inv([uv1 - uv0; uv2 - uv0]) @ [f1 - f0; f2 - f0]
        uv = vertex_uv[tri].astype(np.float64)
        e1, e2 = uv[:, 1] - uv[:, 0], uv[:, 2] - uv[:, 0]
        det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
        inv = np.stack([np.stack([e2[:, 1], -e1[:, 1]], 1), np.stack([-e2[:, 0], e1[:, 0]], 1)], 1) / det[:, None, None]
        coef = np.stack([-(inv[:, :, 0] + inv[:, :, 1]), inv[:, :, 0], inv[:, :, 1]], axis=-1)   # (T, 2, 3)
        return cls(tri, vertex_uv, tid_map, bary, matrix(bary[tid_map >= 0]),
                   matrix(coef[tid, 0]), matrix(coef[tid, 1]))

    @property
    def resolution(self) -> int:
        return self.texel_triangle.shape[0]

    @property
    def mask(self) -> np.ndarray:
        """(R, R) bool: texels on the face."""
        return self.texel_triangle >= 0

    def texel_corners(self) -> tuple[np.ndarray, np.ndarray]:
        """(vertex ids (P, 3), barycentrics (P, 3)) of the P face texels, in row-major order of mask."""
        tid = self.texel_triangle[self.mask]
        return self.triangles[tid], self.texel_bary[self.mask]


def scatter_texels(face_uv: FaceUV, values: np.ndarray) -> np.ndarray:
    """Values (P, C) of the face texels -> an (R, R, C) float32 map, zero off the face."""
    R = face_uv.resolution
    out = np.zeros((R, R, values.shape[-1]), np.float32)
    out[face_uv.mask] = values
    return out


def texel_values(face_uv: FaceUV, attributes, xp=np):
    """Per-vertex attributes (V, C) -> (R, R, C) map, zero off the face; numpy, or torch with xp=torch
    (differentiable in the attributes)."""
    R = face_uv.resolution
    if xp is np:
        return scatter_texels(face_uv, face_uv.interpolation @ np.asarray(attributes, np.float64))
    ids, bary = face_uv.texel_corners()
    import torch

    dev = attributes.device
    ids_t = torch.as_tensor(ids, device=dev)
    bary_t = torch.as_tensor(bary, device=dev, dtype=attributes.dtype)
    values = (attributes[ids_t] * bary_t[..., None]).sum(dim=1)
    out = attributes.new_zeros((R * R, attributes.shape[-1]))
    flat = torch.as_tensor(np.flatnonzero(face_uv.mask), device=dev)
    return out.index_copy(0, flat, values).reshape(R, R, -1)


@dataclass(frozen=True)
class DetailMesh:
    """The face skin subdivided: each triangle into 4 per level, new vertices at edge midpoints.

    parents (D, 2) model vertex ids whose midpoint each detail vertex starts at (twice the same id
    for the model's own vertices, which come first, in face-skin order), uv (D, 2), triangles (F, 3)
    into the detail vertices, the model's orientation kept. Only one level: a second makes both
    parents detail vertices, which this layout does not express, and at one level the edges
    (1.4 mm median) already match a 256-texel map's 1.2 mm.
    """

    parents: np.ndarray
    uv: np.ndarray
    triangles: np.ndarray

    @classmethod
    def from_face_uv(cls, face_uv: FaceUV) -> "DetailMesh":
        tri = face_uv.triangles
        verts = np.unique(tri)
        local = np.full(int(verts.max()) + 1, -1, np.int64)
        local[verts] = np.arange(len(verts))
        edges = np.sort(np.concatenate([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]]), axis=1)
        unique_edges, edge_of = np.unique(edges, axis=0, return_inverse=True)
        edge_of = edge_of.reshape(3, -1).T                       # (T, 3): edges 01, 12, 20 of each triangle
        mid = len(verts) + edge_of                                # detail ids of the midpoints
        a, b, c = (local[tri[:, i]] for i in range(3))
        ab, bc, ca = mid[:, 0], mid[:, 1], mid[:, 2]
        triangles = np.concatenate([np.stack(t, axis=1) for t in
                                    ((a, ab, ca), (ab, b, bc), (ca, bc, c), (ab, bc, ca))])
        parents = np.concatenate([np.stack([verts, verts], axis=1), unique_edges])
        uv = face_uv.vertex_uv[parents].mean(axis=1).astype(np.float32)
        return cls(parents.astype(np.int64), uv, triangles.astype(np.int64))

    @property
    def n_vertices(self) -> int:
        return len(self.parents)

    def base_vertices(self, vertices):
        """(D, 3) detail vertices on the coarse mesh (V, 3), numpy or torch."""
        return 0.5 * (vertices[self.parents[:, 0]] + vertices[self.parents[:, 1]])
