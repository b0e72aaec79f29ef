"""engine.rasterizer: coverage, perspective-correct barycentrics, depth, z-buffer, normals."""
from __future__ import annotations


import numpy as np
import pytest


from engine.pose import default_camera_matrix, model_to_camera
from engine.pose import project
from engine.rasterizer import interpolate, rasterize, vertex_normals

W, H = 64, 48
K = np.array([[60.0, 0.0, 31.5], [0.0, 60.0, 23.5], [0.0, 0.0, 1.0]])


def _inside(uv: np.ndarray, width: int, height: int) -> np.ndarray:
    """Analytic inside test of one projected triangle at integer pixel centres (either winding)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    (x0, y0), (x1, y1), (x2, y2) = uv
    e0 = (x1 - xs) * (y2 - ys) - (x2 - xs) * (y1 - ys)
    e1 = (x2 - xs) * (y0 - ys) - (x0 - xs) * (y2 - ys)
    e2 = (x0 - xs) * (y1 - ys) - (x1 - xs) * (y0 - ys)
    return ((e0 >= 0) & (e1 >= 0) & (e2 >= 0)) | ((e0 <= 0) & (e1 <= 0) & (e2 <= 0))


# a triangle strongly tilted in depth (z from 20 to 60 cm), so that perspective matters
TILTED = np.array([[-9.0, -6.3, 20.0], [14.7, -3.1, 60.0], [-4.1, 13.9, 35.0]])


@pytest.mark.parametrize("winding", [(0, 1, 2), (0, 2, 1)])
def test_single_triangle_coverage_matches_the_analytic_inside_test(winding):
    tri = np.array([winding])
    frags = rasterize(TILTED, tri, K, W, H)
    uv = project(TILTED, K)[list(winding)]
    expect = _inside(uv, W, H)
    assert 100 < expect.sum() < W * H - 100   # a real triangle, not the whole image
    np.testing.assert_array_equal(frags.mask, expect)
    assert np.all(frags.triangle_id[expect] == 0)


def test_triangle_partly_off_screen_is_clipped_to_the_image():
    pts = np.array([[-30.0, -20.0, 10.0], [30.0, -5.0, 10.0], [0.0, 40.0, 10.0]])
    frags = rasterize(pts, np.array([[0, 1, 2]]), K, W, H)
    expect = _inside(project(pts, K), W, H)
    np.testing.assert_array_equal(frags.mask, expect)
    assert frags.mask.sum() > 0.5 * W * H


def test_barycentrics_are_perspective_correct():
    """Interpolating the camera-space corners with the barycentrics gives the 3D point on the
    triangle that projects exactly onto the pixel centre, and its z is the depth."""
    frags = rasterize(TILTED, np.array([[0, 1, 2]]), K, W, H)
    ys, xs = np.nonzero(frags.mask)
    b = frags.barycentric[ys, xs].astype(np.float64)
    assert np.all(b >= -1e-6)
    np.testing.assert_allclose(b.sum(axis=1), 1.0, atol=1e-6)
    P = b @ TILTED                                     # (n, 3) camera-space points
    uv = project(P, K)
    np.testing.assert_allclose(uv[:, 0], xs, atol=1e-3)
    np.testing.assert_allclose(uv[:, 1], ys, atol=1e-3)
    # on the triangle's plane
    n = np.cross(TILTED[1] - TILTED[0], TILTED[2] - TILTED[0])
    n /= np.linalg.norm(n)
    assert np.abs((P - TILTED[0]) @ n).max() < 1e-4
    # depth is that point's z
    np.testing.assert_allclose(frags.depth_cm[ys, xs], P[:, 2], rtol=1e-6)
    # and interpolate() of camera-space positions agrees
    pos = interpolate(frags, TILTED, np.array([[0, 1, 2]]))
    np.testing.assert_allclose(pos[ys, xs], P, rtol=1e-5, atol=1e-5)
    # screen-space (affine) weights would be visibly different on this triangle
    uvc = project(TILTED, K)
    A = np.vstack([uvc.T, np.ones(3)])
    affine = np.linalg.solve(A, np.vstack([xs, ys, np.ones_like(xs)]).astype(np.float64)).T
    assert np.abs(affine - b).max() > 0.05


def test_fronto_parallel_triangle_has_constant_depth():
    pts = np.array([[-10.0, -8.0, 42.0], [12.0, -6.0, 42.0], [1.0, 11.0, 42.0]])
    frags = rasterize(pts, np.array([[0, 1, 2]]), K, W, H)
    assert frags.mask.sum() > 100
    np.testing.assert_allclose(frags.depth_cm[frags.mask], 42.0, rtol=1e-6)


def test_empty_pixels():
    pts = np.array([[-2.0, -2.0, 40.0], [2.0, -2.0, 40.0], [0.0, 2.0, 40.0]])
    frags = rasterize(pts, np.array([[0, 1, 2]]), K, W, H)
    off = ~frags.mask
    assert 0 < frags.mask.sum() < off.sum()
    assert frags.triangle_id.dtype == np.int32 and np.all(frags.triangle_id[off] == -1)
    assert np.all(np.isinf(frags.depth_cm[off])) and np.all(frags.depth_cm[off] > 0)
    assert np.all(frags.barycentric[off] == 0.0)
    assert frags.barycentric.shape == (H, W, 3) and frags.depth_cm.shape == (H, W)
    # nothing at all
    empty = rasterize(pts, np.zeros((0, 3), np.int64), K, W, H)
    assert not empty.mask.any() and np.all(np.isinf(empty.depth_cm))


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_z_buffer_keeps_the_nearer_triangle(order):
    near = np.array([[-6.0, -5.0, 30.0], [6.0, -5.0, 30.0], [0.0, 6.0, 30.0]])
    far = np.array([[-8.0, -3.0, 50.0], [8.0, -7.0, 50.0], [1.0, 9.0, 50.0]]) * [50 / 30, 50 / 30, 1.0]
    pts = np.vstack([near, far])
    tris = np.array([[0, 1, 2], [3, 4, 5]])[list(order)]
    frags = rasterize(pts, tris, K, W, H)
    near_id = order.index(0)
    in_near = _inside(project(near, K), W, H)
    in_far = _inside(project(far, K), W, H)
    both = in_near & in_far
    assert both.sum() > 50 and (in_far & ~in_near).sum() > 20
    assert np.all(frags.triangle_id[both] == near_id)
    np.testing.assert_allclose(frags.depth_cm[both], 30.0, rtol=1e-6)
    assert np.all(frags.triangle_id[in_far & ~in_near] == 1 - near_id)
    np.testing.assert_allclose(frags.depth_cm[in_far & ~in_near], 50.0, rtol=1e-6)


def test_z_buffer_with_interpenetrating_triangles():
    """Two triangles crossing in depth: per pixel the nearer surface wins."""
    a = np.array([[-10.0, -8.0, 30.0], [10.0, -8.0, 50.0], [0.0, 10.0, 40.0]])   # depth rises with x
    b = np.array([[-10.0, -8.0, 50.0], [10.0, -8.0, 30.0], [0.0, 10.0, 40.0]])   # depth falls with x
    frags = rasterize(np.vstack([a, b]), np.array([[0, 1, 2], [3, 4, 5]]), K, W, H)
    ys, xs = np.nonzero(frags.mask)
    for tid, pts in ((0, a), (1, b)):
        sel = frags.triangle_id[ys, xs] == tid
        assert sel.sum() > 20
    # at every covered pixel, depth is the minimum over the triangles that cover it
    for pts in (a, b):
        inside = _inside(project(pts, K), W, H)
        # ray-plane depth of this triangle at each pixel centre
        n = np.cross(pts[1] - pts[0], pts[2] - pts[0])
        rays = np.stack([(np.arange(W)[None, :] - K[0, 2]) / K[0, 0] + 0 * np.arange(H)[:, None],
                         (np.arange(H)[:, None] - K[1, 2]) / K[1, 1] + 0 * np.arange(W)[None, :],
                         np.ones((H, W))], axis=-1)
        z = (n @ pts[0]) / (rays @ n)
        assert np.all(frags.depth_cm[inside] <= z[inside] * (1 + 1e-6))


def test_near_plane_skips_triangles():
    pts = np.array([[-1.0, -1.0, 0.5], [1.0, -1.0, 20.0], [0.0, 1.0, 20.0]])
    frags = rasterize(pts, np.array([[0, 1, 2]]), K, W, H, near_cm=1.0)
    assert not frags.mask.any()
    assert rasterize(pts, np.array([[0, 1, 2]]), K, W, H, near_cm=0.25).mask.any()


def test_degenerate_triangle_draws_nothing():
    pts = np.array([[0.0, 0.0, 20.0], [1.0, 1.0, 20.0], [2.0, 2.0, 20.0]])
    assert not rasterize(pts, np.array([[0, 1, 2]]), K, W, H).mask.any()


# ---------------------------------------------------------------- the real face model



def test_face_model_silhouette_matches_projected_vertices(model):
    from trainers.correspondence import drawn_triangles

    w, h = 320, 240
    Kc = default_camera_matrix(w, h)
    R = model_to_camera(0.15, -0.1, 0.05)
    cam = model.neutral.astype(np.float64) @ R.T + np.array([0.0, -1.0, 90.0])
    tris = model.triangles[drawn_triangles(model)]
    frags = rasterize(cam, tris, Kc, w, h)
    used = np.unique(tris)
    uv = project(cam[used], Kc)
    lo, hi = uv.min(axis=0), uv.max(axis=0)
    assert np.all(lo > 0) and np.all(hi < [w - 1, h - 1])   # the whole head is in the picture
    ys, xs = np.nonzero(frags.mask)
    assert abs(xs.min() - lo[0]) <= 1.0 and abs(xs.max() - hi[0]) <= 1.0
    assert abs(ys.min() - lo[1]) <= 1.0 and abs(ys.max() - hi[1]) <= 1.0
    # the nose tip is the nearest thing in its pixel: depth there is (about) the vertex's z
    nose = model.landmark68_vertices[30]
    u, v = np.round(project(cam[[nose]], Kc)[0]).astype(int)
    assert frags.mask[v, u]
    assert abs(frags.depth_cm[v, u] - cam[nose, 2]) < 0.3
    # every covered pixel's surface point projects onto its pixel centre
    sel = np.random.default_rng(0).choice(len(ys), 500, replace=False)
    t_ids = frags.triangle_id[ys[sel], xs[sel]]
    P = np.einsum("nij,ni->nj", cam[tris[t_ids]], frags.barycentric[ys[sel], xs[sel]].astype(np.float64))
    np.testing.assert_allclose(project(P, Kc), np.c_[xs[sel], ys[sel]], atol=2e-3)


# ---------------------------------------------------------------- normals


def _uv_sphere(n_lat=16, n_lon=32, radius=2.0, centre=(1.0, -2.0, 3.0)):
    """A closed sphere mesh with counter-clockwise (outward) winding seen from outside."""
    verts = [[0.0, 0.0, radius]]
    for i in range(1, n_lat):
        th = np.pi * i / n_lat
        for j in range(n_lon):
            ph = 2 * np.pi * j / n_lon
            verts.append([radius * np.sin(th) * np.cos(ph), radius * np.sin(th) * np.sin(ph), radius * np.cos(th)])
    verts.append([0.0, 0.0, -radius])
    verts = np.array(verts)
    ring = lambda i, j: 1 + (i - 1) * n_lon + (j % n_lon)
    tris = []
    for j in range(n_lon):
        tris.append([0, ring(1, j), ring(1, j + 1)])
    for i in range(1, n_lat - 1):
        for j in range(n_lon):
            a, b, c, d = ring(i, j), ring(i, j + 1), ring(i + 1, j), ring(i + 1, j + 1)
            tris += [[a, c, d], [a, d, b]]
    bottom = len(verts) - 1
    for j in range(n_lon):
        tris.append([bottom, ring(n_lat - 1, j + 1), ring(n_lat - 1, j)])
    return verts + np.asarray(centre), np.array(tris), np.asarray(centre)


def test_vertex_normals_of_a_sphere_point_outward():
    v, t, c = _uv_sphere()
    # sanity of the fixture: positive signed volume means outward winding
    vol = np.einsum("ij,ij->i", v[t[:, 0]] - c, np.cross(v[t[:, 1]] - c, v[t[:, 2]] - c)).sum() / 6
    assert vol > 0
    n = vertex_normals(v, t)
    np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0, atol=1e-12)
    radial = (v - c) / np.linalg.norm(v - c, axis=1, keepdims=True)
    assert np.min(np.sum(n * radial, axis=1)) > 0.99
    # reversed winding flips them
    assert np.max(np.sum(vertex_normals(v, t[:, ::-1]) * radial, axis=1)) < -0.99


def test_face_model_normals_point_out_of_the_face(model):
    n = vertex_normals(model.neutral.astype(np.float64), model.triangles)
    nose = model.landmark68_vertices[30]
    assert n[nose, 2] > 0.9
    chin = model.landmark68_vertices[8]
    assert n[chin, 2] > 0.3 and n[chin, 1] < 0
