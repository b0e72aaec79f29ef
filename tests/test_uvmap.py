"""engine.uvmap: the face's UV layout from the model's own UVs, the texel lookup, the detail mesh."""
from __future__ import annotations

import numpy as np
import pytest

from engine.facemodel import FACE_VERTICES
from engine.uvmap import DetailMesh, FaceUV, UVLayoutError, face_triangles_and_uv, signed_uv_areas, texel_values


@pytest.fixture(scope="module")
def face_uv(model):
    return FaceUV.from_model(model, 128)


def test_face_layout_is_one_sheet_without_flips(model):
    tri, vertex_uv = face_triangles_and_uv(model)
    assert np.array_equal(np.unique(tri), np.arange(FACE_VERTICES.stop))     # the whole face region
    areas = signed_uv_areas(tri, vertex_uv)
    assert (areas > 0).all()                                                  # no flipped or empty triangle
    uv = vertex_uv[: FACE_VERTICES.stop]
    assert np.isfinite(uv).all() and uv.min() >= 0.0 and uv.max() <= 1.0     # all in tile 0
    assert np.isnan(vertex_uv[FACE_VERTICES.stop:]).all()


def test_a_split_layout_is_refused(model):
    from dataclasses import replace

    uv = model.uv.copy()
    first = model.triangle_uv[model.material_mask("M_Face")][0, 0]
    shared = np.flatnonzero((model.triangle_uv == first).any(axis=1))
    assert len(shared) > 1
    moved = model.triangle_uv.copy()
    moved[shared[0]] = np.where(moved[shared[0]] == first, len(uv), moved[shared[0]])   # a second UV for one vertex
    uv = np.vstack([uv, uv[first] + 0.01])
    with pytest.raises(UVLayoutError, match="seams"):
        face_triangles_and_uv(replace(model, uv=uv, triangle_uv=moved))


def test_texels_cover_the_face_and_interpolate_exactly(model, face_uv):
    R = face_uv.resolution
    assert face_uv.mask.mean() > 0.9
    # every texel centre inside the mask lies in its triangle, and reproduces its own UV
    uv_map = texel_values(face_uv, np.nan_to_num(face_uv.vertex_uv))
    jj, ii = np.meshgrid(np.arange(R), np.arange(R))
    expected = np.stack([(jj + 0.5) / R, 1.0 - (ii + 0.5) / R], axis=-1)
    assert np.abs(uv_map[face_uv.mask] - expected[face_uv.mask]).max() < 1e-4
    assert (face_uv.texel_bary[face_uv.mask] >= -1e-5).all()
    # a linear function of position is reproduced, and so are its u and v derivatives
    rng = np.random.default_rng(0)
    a = rng.normal(size=2)
    f = (np.nan_to_num(face_uv.vertex_uv) @ a)[:, None]
    assert np.abs(face_uv.d_du @ f - a[0]).max() < 1e-6
    assert np.abs(face_uv.d_dv @ f - a[1]).max() < 1e-6


def test_detail_mesh_subdivides_once(model, face_uv):
    dm = DetailMesh.from_face_uv(face_uv)
    T = len(face_uv.triangles)
    assert len(dm.triangles) == 4 * T
    # Euler: each edge gives one new vertex; V' = V + E
    edges = np.unique(np.sort(np.concatenate([face_uv.triangles[:, [0, 1]], face_uv.triangles[:, [1, 2]],
                                              face_uv.triangles[:, [2, 0]]]), axis=1), axis=0)
    assert dm.n_vertices == FACE_VERTICES.stop + len(edges)
    assert (signed_uv_areas(dm.triangles, dm.uv) > 0).all()                  # orientation kept
    base = dm.base_vertices(model.neutral)
    assert np.allclose(base[: FACE_VERTICES.stop], model.neutral[: FACE_VERTICES.stop])
    e = np.concatenate([dm.triangles[:, [0, 1]], dm.triangles[:, [1, 2]], dm.triangles[:, [2, 0]]])
    edge_mm = 10 * np.linalg.norm(base[e[:, 0]] - base[e[:, 1]], axis=1)
    assert 1.0 < np.median(edge_mm) < 1.8                                    # half the model's 2.8 mm
