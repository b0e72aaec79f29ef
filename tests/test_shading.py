"""engine.shading: SH basis, shading, torch interpolation and normals, gradients, and renders
checked against an independent ray caster and analytic spheres."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import rasterizer as rast
from engine.facemodel import FACE_VERTICES
from engine.pose import default_camera_matrix, model_to_camera, project
from engine.shading import (SH_C0, SH_C1, interpolate, perspective_barycentrics, render, sh_basis, shade,
                            vertex_normals)

f64 = torch.float64


def _sphere(radius: float, centre, n_lat: int = 32, n_lon: int = 64):
    """UV sphere (V, 3), (T, 3) with outward counter-clockwise winding."""
    th = np.pi * np.arange(1, n_lat) / n_lat
    ph = 2 * np.pi * np.arange(n_lon) / n_lon
    ring = np.stack([np.sin(th)[:, None] * np.cos(ph), np.sin(th)[:, None] * np.sin(ph),
                     np.cos(th)[:, None] + 0 * ph], axis=-1).reshape(-1, 3)
    verts = np.vstack([[0, 0, 1.0], ring, [0, 0, -1.0]])

    def idx(i, j):
        return 1 + (i - 1) * n_lon + (j % n_lon)

    tris = [[0, idx(1, j), idx(1, j + 1)] for j in range(n_lon)]
    for i in range(1, n_lat - 1):
        for j in range(n_lon):
            a, b, c, d = idx(i, j), idx(i, j + 1), idx(i + 1, j), idx(i + 1, j + 1)
            tris += [[a, c, d], [a, d, b]]
    tris += [[len(verts) - 1, idx(n_lat - 1, j + 1), idx(n_lat - 1, j)] for j in range(n_lon)]
    return verts * radius + np.asarray(centre), np.array(tris)


# ---------------------------------------------------------------- SH basis and shading


def test_sh_basis_is_orthonormal_on_the_sphere():
    """Equal-area (Fibonacci) quadrature of Y_i · Y_j over the sphere gives the identity: checks
    every constant and polynomial independently of any table."""
    n = 200_000
    k = np.arange(n) + 0.5
    z = 1 - 2 * k / n
    phi = np.pi * (1 + 5 ** 0.5) * k
    r = np.sqrt(1 - z * z)
    dirs = torch.tensor(np.c_[r * np.cos(phi), r * np.sin(phi), z])
    Y = sh_basis(dirs)
    gram = (Y.T @ Y) * (4 * np.pi / n)
    np.testing.assert_allclose(gram.numpy(), np.eye(9), atol=1e-4)


def test_sh_basis_order_and_signs():
    """(l, m) order 00, 1-1, 10, 11, 2-2, 2-1, 20, 21, 22 = 1, y, z, x, xy, yz, 3z²-1, xz, x²-y²."""
    s = 1 / np.sqrt(2)
    cases = {(0, 0, 1.0): [0, 2, 6], (1.0, 0, 0): [0, 3, 6, 8], (0, 1.0, 0): [0, 1, 6, 8],
             (s, s, 0): [0, 1, 3, 4, 6], (0, s, s): [0, 1, 2, 5, 6, 8], (s, 0, -s): [0, 2, 3, 6, 7, 8]}
    for n, nonzero in cases.items():
        Y = sh_basis(torch.tensor(n, dtype=f64)).numpy()
        assert set(np.flatnonzero(np.abs(Y) > 1e-12)) == set(nonzero), n
        np.testing.assert_allclose(Y[[0, 1, 2, 3]], [0.2820947918, *(0.4886025119 * np.array([n[1], n[2], n[0]]))],
                                   atol=1e-9)
    assert sh_basis(torch.tensor((s, 0, -s), dtype=f64))[7] == pytest.approx(-1.0925484306 * 0.5)


def test_shade_is_albedo_times_lighting():
    rng = np.random.default_rng(1)
    n = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(5, 3))), dim=-1)
    albedo = torch.tensor(rng.uniform(0, 1, (5, 3)))
    L = torch.tensor(rng.normal(size=(9, 3)))
    expect = albedo.numpy() * np.einsum("pk,kc->pc", sh_basis(n).numpy(), L.numpy())
    np.testing.assert_allclose(shade(albedo, n, L).numpy(), expect, rtol=1e-12)


# ---------------------------------------------------------------- torch pieces against numpy ones


TILTED = np.array([[-9.0, -6.3, 20.0], [14.7, -3.1, 60.0], [-4.1, 13.9, 35.0], [12.0, 12.0, 40.0]])
QUAD = np.array([[0, 1, 2], [1, 3, 2]])
K = np.array([[60.0, 0.0, 31.5], [0.0, 60.0, 23.5], [0.0, 0.0, 1.0]])


def test_torch_barycentrics_interpolation_and_normals_match_the_numpy_ones():
    frags = rast.rasterize(TILTED, QUAD, K, 64, 48, backend="cpu")
    tid = torch.from_numpy(frags.triangle_id)
    assert len(np.unique(frags.triangle_id)) == 3     # both triangles and background
    b = perspective_barycentrics(torch.tensor(TILTED), QUAD, tid, K)
    np.testing.assert_allclose(b.numpy(), frags.barycentric, atol=1e-6)
    attrs = np.random.default_rng(0).normal(size=(4, 5))
    np.testing.assert_allclose(interpolate(torch.tensor(attrs), QUAD, tid, b).numpy(),
                               rast.interpolate(frags, attrs, QUAD), atol=1e-5)
    v, t = _sphere(2.0, (1.0, -2.0, 30.0), 8, 16)
    np.testing.assert_allclose(vertex_normals(torch.tensor(v), torch.tensor(t)).numpy(), rast.vertex_normals(v, t),
                               atol=1e-12)


# ---------------------------------------------------------------- gradients


# two triangles tilted in depth, whose edges pass no pixel centre of a 12 x 9 image closer than 0.03 px
TINY = np.array([[-1.77, -1.46, 10.0], [1.94, -1.32, 12.5], [-1.66, 1.53, 11.0], [2.18, 1.37, 13.0]])


def _edge_margin_px(uv: np.ndarray, tris: np.ndarray, width: int, height: int) -> float:
    """Smallest distance (px) from any pixel centre to any projected triangle edge (as a line)."""
    ys, xs = np.mgrid[0:height, 0:width]
    p = np.c_[xs.ravel(), ys.ravel()].astype(np.float64)
    best = np.inf
    for t in tris:
        for i in range(3):
            a, b = uv[t[i]], uv[t[(i + 1) % 3]]
            d = b - a
            best = min(best, np.min(np.abs(d[0] * (p[:, 1] - a[1]) - d[1] * (p[:, 0] - a[0])) / np.hypot(*d)))
    return best


def test_render_gradients_match_finite_differences():
    """gradcheck in float64 w.r.t. vertex positions, albedo and SH lighting on a two-triangle mesh.
    No pixel centre lies within 0.02 px of an edge, so the finite-difference steps (1e-6 cm)
    never change which triangle a pixel sees."""
    w, h = 12, 9
    Kt = np.array([[30.0, 0.0, 5.5], [0.0, 30.0, 4.0], [0.0, 0.0, 1.0]])
    verts = TINY.copy()
    assert _edge_margin_px(project(verts, Kt), QUAD, w, h) > 0.02
    frags = rast.rasterize(verts, QUAD, Kt, w, h, backend="cpu")
    assert (frags.triangle_id == 0).sum() > 10 and (frags.triangle_id == 1).sum() > 10 and (~frags.mask).sum() > 10
    rng = np.random.default_rng(3)
    v = torch.tensor(verts, dtype=f64, requires_grad=True)
    albedo = torch.tensor(rng.uniform(0.2, 0.9, (4, 3)), requires_grad=True)
    L = torch.tensor(rng.normal(0, 0.5, (9, 3)), requires_grad=True)
    L.data[0] += 2.0

    def image(v, albedo, L):
        return render(v, QUAD, albedo, L, Kt, w, h, background=0.25, backend="cpu")[0]

    assert torch.autograd.gradcheck(image, (v, albedo, L), eps=1e-6, atol=1e-6, rtol=1e-5)
    # and the vertices really matter (gradcheck would also pass a function that ignored them)
    image(v, albedo, L).sum().backward()
    assert v.grad.abs().min() > 1e-4


def test_gradients_reach_vertices_through_the_barycentrics_alone():
    """Constant lighting (no normal dependence): the image still depends on the vertex positions
    through where each pixel lands in the albedo gradient; gradcheck that path on its own."""
    w, h = 12, 9
    Kt = np.array([[30.0, 0.0, 5.5], [0.0, 30.0, 4.0], [0.0, 0.0, 1.0]])
    verts = TINY.copy()
    albedo = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]], dtype=f64)
    L = torch.zeros(9, 3, dtype=f64)
    L[0] = 1.0
    v = torch.tensor(verts, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: render(v, QUAD, albedo, L, Kt, w, h, backend="cpu")[0], (v,),
                                    eps=1e-6, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- renders against independent geometry


def _ray_cast(origin_dirs: np.ndarray, verts: np.ndarray, tris: np.ndarray, cand: list[np.ndarray]):
    """Nearest hit (triangle id, camera z) of rays from the camera centre along dirs (N, 3) among
    candidate triangles (Möller–Trumbore); id -1 where nothing is hit."""
    hit_t = np.full(len(origin_dirs), -1)
    hit_z = np.full(len(origin_dirs), np.inf)
    for k, (d, c) in enumerate(zip(origin_dirs, cand)):
        if len(c) == 0:
            continue
        a, b, e = (verts[tris[c, i]] for i in range(3))
        e1, e2 = b - a, e - a
        pv = np.cross(d, e2)
        det = np.einsum("ij,ij->i", e1, pv)
        ok = np.abs(det) > 1e-12
        inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
        tv = -a
        u = np.einsum("ij,ij->i", tv, pv) * inv
        qv = np.cross(tv, e1)
        vv = (qv @ d) * inv
        s = np.einsum("ij,ij->i", e2, qv) * inv           # ray parameter: z = s since d_z = 1
        tol = 1e-9
        inside = ok & (u >= -tol) & (vv >= -tol) & (u + vv <= 1 + tol) & (s > 0)
        if inside.any():
            j = np.argmin(np.where(inside, s, np.inf))
            hit_t[k], hit_z[k] = c[j], s[j]
    return hit_t, hit_z


def test_face_render_agrees_with_projected_vertices_and_a_ray_caster(model):
    """At the pixel under each projected vertex (engine.pose.project), an independent ray caster
    says what is visible. Where that is the vertex's own fan (visible, not at a silhouette), the
    render's triangle must be in that fan and its depth the ray's hit depth, which is the vertex's
    z up to the sub-pixel offset; where something nearer hides the vertex, the render must show
    something nearer too."""
    from trainers.correspondence import drawn_triangles

    w, h = 160, 120
    Kc = default_camera_matrix(w, h)
    cam = model.neutral.astype(np.float64) @ model_to_camera(0.45, 0.1, 0.0).T + np.array([0.0, 0.0, 45.0])
    tris = model.triangles[drawn_triangles(model)]
    albedo = torch.full((len(cam), 3), 0.6, dtype=f64)
    L = torch.zeros(9, 3, dtype=f64)
    L[0], L[2] = 2.0, -1.0
    image, mask = render(torch.tensor(cam), tris, albedo, L, Kc, w, h, backend="cpu")
    frags = rast.rasterize(cam, tris, Kc, w, h, backend="cpu")
    np.testing.assert_array_equal(mask.numpy(), frags.mask)
    assert torch.all(image[mask] > 0) and torch.all(image[~mask] == 0)

    rng = np.random.default_rng(0)
    used = np.intersect1d(np.unique(tris), np.arange(FACE_VERTICES.stop))
    in_view = used[np.all((project(cam[used], Kc) > 0) & (project(cam[used], Kc) < [w - 1, h - 1]), axis=1)]
    assert len(in_view) > 0.9 * len(used)
    sample = rng.choice(in_view, 400, replace=False)
    px = np.round(project(cam[sample], Kc)).astype(int)
    dirs = np.c_[(px[:, 0] - Kc[0, 2]) / Kc[0, 0], (px[:, 1] - Kc[1, 2]) / Kc[1, 1], np.ones(len(px))]
    uv = project(cam, Kc)
    lo, hi = uv[tris].min(axis=1), uv[tris].max(axis=1)
    cand = [np.flatnonzero(np.all((lo <= p + 1e-6) & (hi >= p - 1e-6), axis=1)) for p in px]
    hit_t, hit_z = _ray_cast(dirs, cam, tris, cand)

    tid = frags.triangle_id[px[:, 1], px[:, 0]]
    depth = frags.depth_cm[px[:, 1], px[:, 0]].astype(np.float64)
    fan = [np.flatnonzero(np.any(tris == v, axis=1)) for v in sample]
    visible = np.array([t in f for t, f in zip(hit_t, fan)])
    hidden = (hit_t >= 0) & ~visible & (hit_z < cam[sample, 2] - 0.5)
    assert visible.sum() > 120 and hidden.sum() > 50        # the pose shows plenty of both kinds
    for k in np.flatnonzero(visible):
        assert tid[k] in fan[k], f"vertex {sample[k]}: render shows triangle {tid[k]}, not one of its fan"
    np.testing.assert_allclose(depth[visible], hit_z[visible], rtol=2e-6)
    offset = np.abs(depth[visible] - cam[sample[visible], 2])
    assert offset.max() < 0.5 and np.median(offset) < 0.05
    assert np.all(depth[hidden] < cam[sample[hidden], 2] - 0.4)
    np.testing.assert_allclose(depth[hidden], hit_z[hidden], rtol=2e-6)


def _sphere_scene():
    w = h = 64
    Ks = np.array([[120.0, 0.0, 31.5], [0.0, 120.0, 31.5], [0.0, 0.0, 1.0]])
    centre, radius = np.array([0.4, -0.3, 30.0]), 5.0
    verts, tris = _sphere(radius, centre)
    ys, xs = np.mgrid[0:h, 0:w]
    d = np.stack([(xs - Ks[0, 2]) / Ks[0, 0], (ys - Ks[1, 2]) / Ks[1, 1], np.ones((h, w))], axis=-1)
    # analytic ray-sphere intersection: |s d - c|² = r²
    a, b, c = np.sum(d * d, -1), -2 * d @ centre, centre @ centre - radius ** 2
    disc = b * b - 4 * a * c
    s = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
    normal = (s[..., None] * d - centre) / radius
    return verts, tris, Ks, w, h, disc > 0, normal


def test_sphere_under_constant_light_has_uniform_colour():
    verts, tris, Ks, w, h, inside, _ = _sphere_scene()
    albedo = torch.tensor([0.8, 0.6, 0.4], dtype=f64).expand(len(verts), 3)
    L = torch.zeros(9, 3, dtype=f64)
    L[0] = torch.tensor([1.0, 2.0, 3.0])
    image, mask = render(torch.tensor(verts), tris, albedo, L, Ks, w, h, background=-1.0, backend="cpu")
    m = mask.numpy()
    assert np.sum(m != inside) < 0.05 * inside.sum() and 800 < m.sum() < w * h - 800
    np.testing.assert_allclose(image.numpy()[m], np.broadcast_to([0.8 * SH_C0, 1.2 * SH_C0, 1.2 * SH_C0],
                                                                 (m.sum(), 3)), rtol=1e-12)
    assert np.all(image.numpy()[~m] == -1.0)


@pytest.mark.parametrize("band, side", [(3, "right"), (1, "bottom"), (2, "centre")])
def test_linear_sh_band_brightens_the_side_it_points_to(band, side):
    """Camera-space frame: x right (Y11), y down (Y1-1), z away from the camera (Y10, so a negative
    coefficient lights the side facing the camera). Checked against analytic sphere normals."""
    verts, tris, Ks, w, h, inside, normal = _sphere_scene()
    albedo = torch.full((len(verts), 3), 0.5, dtype=f64)
    L = torch.zeros(9, 3, dtype=f64)
    L[0] = 1.0
    L[band] = -0.8 if band == 2 else 0.8
    image, mask = render(torch.tensor(verts), tris, albedo, L, Ks, w, h, backend="cpu")
    img, m = image.numpy()[..., 1], mask.numpy()
    # away from the silhouette, the shading follows the analytic normal of the true sphere
    core = m & inside & (normal[..., 2] < -0.5)
    axis = {3: 0, 1: 1, 2: 2}[band]
    expect = 0.5 * (SH_C0 + L[band, 1].item() * SH_C1 * normal[..., axis])
    np.testing.assert_allclose(img[core], expect[core], atol=5e-3)
    ys, xs = np.nonzero(core)
    centre_px = np.array([xs.mean(), ys.mean()])
    if side == "centre":
        r = np.hypot(xs - centre_px[0], ys - centre_px[1])
        assert np.corrcoef(r, img[ys, xs])[0, 1] < -0.9
    else:
        coord = xs if side == "right" else ys
        assert np.corrcoef(coord, img[ys, xs])[0, 1] > 0.9
        mid = centre_px[int(side == "bottom")]
        far_side = img[ys, xs][coord > mid + 5].mean()
        near_side = img[ys, xs][coord < mid - 5].mean()
        assert far_side > near_side + 0.05


def test_render_on_the_gpu_matches_the_cpu():
    """Same image and gradients whichever backend rasterizes (the rest is the same torch code)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: torch.cuda.is_available() is False")
    if not rast.cuda_backend_available():
        pytest.skip(f"CUDA rasterizer library not built ({rast.cuda_library_path()}): cmake -S . -B build && "
                    "cmake --build build")
    verts, tris, Ks, w, h, _, _ = _sphere_scene()
    rng = np.random.default_rng(5)
    albedo = rng.uniform(0.2, 0.9, (len(verts), 3))
    L = rng.normal(0, 0.3, (9, 3))
    L[0] += 1.5
    out = {}
    for device in ("cpu", "cuda"):
        v, a, sh = (torch.tensor(x, device=device, requires_grad=True) for x in (verts, albedo, L))
        image, mask = render(v, tris, a, sh, Ks, w, h, backend=device)
        assert image.device.type == device
        (image * image).sum().backward()
        out[device] = [t.detach().cpu().numpy() for t in (image, mask, v.grad, a.grad, sh.grad)]
    for c, g in zip(out["cpu"], out["cuda"]):
        np.testing.assert_allclose(g, c, rtol=1e-9, atol=1e-12)
