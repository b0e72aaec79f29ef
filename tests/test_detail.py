"""engine.detail: a frame unwrapped into the face's map, displacement turned into normals and vertices."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.detail import displaced_normals, displaced_vertices, ramp_normals, sample_map, texel_geometry, unwrap
from engine.pose import default_camera_matrix, model_to_camera
from engine.rasterizer import interpolate, rasterize, vertex_normals
from engine.uvmap import DetailMesh, FaceUV, texel_values, uv_to_map_px


@pytest.fixture(scope="module")
def face_uv(model):
    return FaceUV.from_model(model, 256)


@pytest.fixture(scope="module")
def detail_mesh(face_uv):
    return DetailMesh.from_face_uv(face_uv)


def _forehead_ripples(R: int) -> np.ndarray:
    """(R, R) mm: horizontal ripples, 0.5 mm deep, 7 mm apart, on the forehead of the map."""
    jj, ii = np.meshgrid(np.arange(R), np.arange(R))
    u, v = (jj + 0.5) / R, 1 - (ii + 0.5) / R
    return (0.5 * np.sin(2 * np.pi * v * 40) * np.exp(-((u - 0.5) / 0.12) ** 2 - ((v - 0.75) / 0.06) ** 2)
            ).astype(np.float32)


def test_displaced_normals_match_the_displaced_mesh(model, face_uv, detail_mesh):
    R = face_uv.resolution
    d_mm = _forehead_ripples(R)
    g = texel_geometry(face_uv, model.neutral)
    verts = displaced_vertices(detail_mesh, model.neutral, face_uv.triangles, d_mm)
    mesh_n = vertex_normals(verts.astype(np.float64), detail_mesh.triangles)
    # the displaced mesh's own normals, read at each texel
    pts = np.zeros((detail_mesh.n_vertices, 3))
    pts[:, 2] = 1.0
    pts[:, :2] = uv_to_map_px(detail_mesh.uv, R)
    frags = rasterize(pts, detail_mesh.triangles, np.eye(3), R, R, near_cm=0.5, backend="cpu")
    truth = interpolate(frags, mesh_n, detail_mesh.triangles)
    truth /= np.maximum(np.linalg.norm(truth, axis=-1, keepdims=True), 1e-12)
    predicted = displaced_normals(g["normals"], g["Pu"], g["Pv"], d_mm / 10.0)
    rippled = frags.mask & (np.abs(d_mm) > 0.05)

    def angle_deg(a, b):
        return np.degrees(np.arccos(np.clip((a * b).sum(-1), -1, 1)))[rippled]

    assert np.median(angle_deg(predicted, truth)) < 1.5
    assert np.median(angle_deg(g["normals"], truth)) > 3.0            # the ripples do tilt the normals
    # torch gives the same, with a gradient to the displacement
    d = torch.tensor(d_mm / 10.0, requires_grad=True)
    n_t = displaced_normals(*(torch.as_tensor(g[k], dtype=torch.float64) for k in ("normals", "Pu", "Pv")), d,
                            xp=torch)
    assert np.abs(n_t.detach().numpy() - predicted).max() < 1e-4
    n_t[..., 2].sum().backward()
    assert torch.isfinite(d.grad).all() and d.grad.abs().sum() > 0


def test_ramp_normals_are_the_displaced_normals_of_ramps(model, face_uv):
    """FineNet's slope-response inputs: ramp_normals gives what displaced_normals gives for a map rising
    the same along u (columns) or along v (up the map, down the rows), and the two tilt differently."""
    R = face_uv.resolution
    g = texel_geometry(face_uv, model.neutral)
    rise_cm = 0.002                                            # per texel
    ramp = np.arange(R, dtype=np.float64) * rise_cm
    along_u, along_v = ramp_normals(g["normals"], g["Pu"], g["Pv"], rise_cm * R)
    ramps = (np.broadcast_to(ramp[None, :], (R, R)), np.broadcast_to(-ramp[:, None], (R, R)))
    for ours, d in zip((along_u, along_v), ramps):
        reference = displaced_normals(g["normals"], g["Pu"], g["Pv"], d)
        assert np.abs(ours - reference)[face_uv.mask].max() < 1e-5
    tilt = np.degrees(np.arccos(np.clip((along_u * along_v).sum(-1), -1, 1)))[face_uv.mask]
    assert np.median(tilt) > 1.0


def test_displaced_vertices_move_along_the_normals(model, face_uv, detail_mesh):
    R = face_uv.resolution
    base = displaced_vertices(detail_mesh, model.neutral, face_uv.triangles, np.zeros((R, R), np.float32))
    assert np.allclose(base, detail_mesh.base_vertices(model.neutral), atol=1e-6)
    raised = displaced_vertices(detail_mesh, model.neutral, face_uv.triangles, np.ones((R, R), np.float32))
    step = np.linalg.norm(raised - base, axis=1)
    assert np.allclose(step, 0.1, atol=1e-5)                               # 1 mm, in cm
    n = detail_mesh.base_vertices(vertex_normals(model.neutral, face_uv.triangles))
    assert (((raised - base) * n).sum(axis=1) > 0).all()                   # outwards


def test_sample_map_is_bilinear():
    R = 16
    jj, ii = np.meshgrid(np.arange(R), np.arange(R))
    plane = (0.3 * jj - 0.7 * ii).astype(np.float32)
    uv = np.random.default_rng(1).uniform(0.1, 0.9, (50, 2))
    px = uv_to_map_px(uv, R)
    assert np.allclose(sample_map(plane, uv), 0.3 * px[:, 0] - 0.7 * px[:, 1], atol=1e-4)


def test_unwrap_reads_each_texel_from_where_it_is_seen(model, face_uv):
    """A frame whose pixels hold the UV of the face they show: each visible texel reads its own UV."""
    R = face_uv.resolution
    K = default_camera_matrix(640, 480)
    cam = model.neutral @ model_to_camera(np.radians(35.0), np.radians(5.0), 0.0).T + np.array([0.0, 0.0, 45.0])
    frags = rasterize(cam, face_uv.triangles, K, 640, 480, backend="cpu")
    image = interpolate(frags, np.nan_to_num(face_uv.vertex_uv), face_uv.triangles)
    g = texel_geometry(face_uv, cam)
    read, visible = unwrap(image, cam, g, face_uv, K)
    jj, ii = np.meshgrid(np.arange(R), np.arange(R))
    expected = np.stack([(jj + 0.5) / R, 1.0 - (ii + 0.5) / R], axis=-1)
    err_texels = np.linalg.norm(read - expected, axis=-1)[visible] * R
    assert 0.2 < visible.mean() < 0.7                                      # turned 35 degrees: one side hidden
    assert np.median(err_texels) < 0.5 and np.percentile(err_texels, 95) < 2.0
    # turned to its left, the face shows its right side (x < 0) and hides its left, behind the nose
    rest = texel_values(face_uv, model.neutral)
    front = face_uv.mask & (rest[..., 2] > 0)
    assert visible[front & (rest[..., 0] < -3)].mean() > 0.8
    assert visible[front & (rest[..., 0] > 6)].mean() < 0.1
    # a face behind the camera is not seen at all
    _, none = unwrap(image, cam - [0, 0, 60.0], texel_geometry(face_uv, cam - [0, 0, 60.0]), face_uv, K)
    assert not none.any()
