"""engine.rasterizer: coverage, perspective-correct barycentrics, depth, z-buffer, normals,
tie rules, the backend interface, and the CUDA kernel's build and agreement with the numba one."""
from __future__ import annotations

from pathlib import Path

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

    def ring(i, j):
        return 1 + (i - 1) * n_lon + (j % n_lon)

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


# ---------------------------------------------------------------- tie-breaking, interface


def test_equal_depths_go_to_the_lower_triangle_id():
    """The z-test rule both backends share: a tie keeps the lower id, whatever the order."""
    pts = np.vstack([TILTED, TILTED])                  # the same triangle twice, under other vertex ids
    for tris in (np.array([[0, 1, 2], [3, 4, 5]]), np.array([[3, 4, 5], [0, 1, 2]]), np.array([[0, 1, 2]] * 3)):
        frags = rasterize(pts, tris, K, W, H, backend="cpu")
        assert frags.mask.sum() > 100 and np.all(frags.triangle_id[frags.mask] == 0)


def test_pixel_centres_on_a_shared_edge_go_to_the_lower_id():
    """A fronto-parallel quad whose corners project onto pixel centres: the diagonal's pixel
    centres lie exactly on both triangles (inclusive edges), at equal depth."""
    Kq, z = np.array([[64.0, 0, 32.0], [0, 64.0, 24.0], [0, 0, 1]]), 16.0
    uv = np.array([[8.0, 8.0], [40.0, 8.0], [40.0, 40.0], [8.0, 40.0]])
    pts = np.c_[(uv - [32.0, 24.0]) * z / 64.0, np.full(4, z)]   # exact in binary
    for tris, diagonal_owner in ((np.array([[0, 1, 2], [0, 2, 3]]), 0), (np.array([[0, 2, 3], [0, 1, 2]]), 0)):
        frags = rasterize(pts, tris, Kq, W, H, backend="cpu")
        expect = np.zeros((H, W), bool)
        expect[8:41, 8:41] = True
        np.testing.assert_array_equal(frags.mask, expect)   # closed square: edges included
        d = np.arange(8, 41)
        assert np.all(frags.triangle_id[d, d] == diagonal_owner)
        np.testing.assert_array_equal(frags.depth_cm[frags.mask], np.float32(z))


def test_torch_tensors_in_give_torch_tensors_out():
    torch = pytest.importorskip("torch")
    tris = np.array([[0, 1, 2]])
    ref = rasterize(TILTED, tris, K, W, H, backend="cpu")
    out = rasterize(torch.tensor(TILTED, dtype=torch.float64), torch.tensor(tris), torch.tensor(K), W, H, backend="cpu")
    assert isinstance(out.triangle_id, torch.Tensor) and out.triangle_id.dtype == torch.int32
    for name in ("triangle_id", "barycentric", "depth_cm"):
        np.testing.assert_array_equal(getattr(out, name).numpy(), getattr(ref, name))


def test_bad_triangle_indices_and_backend_names_are_refused():
    with pytest.raises(ValueError, match="triangle indices"):
        rasterize(TILTED, np.array([[0, 1, 3]]), K, W, H, backend="cpu")
    with pytest.raises(ValueError, match="triangle indices"):
        rasterize(TILTED, np.array([[0, -1, 2]]), K, W, H, backend="cpu")
    with pytest.raises(ValueError, match="backend"):
        rasterize(TILTED, np.array([[0, 1, 2]]), K, W, H, backend="gpu")


def test_cuda_backend_says_why_it_cannot_run(monkeypatch, tmp_path):
    """Without a GPU or without the library, backend="cuda" fails with a one-line reason and
    backend="auto" quietly uses the CPU kernel."""
    from engine import rasterizer as r

    missing = tmp_path / "nowhere" / "libcapture_cuda.so"
    monkeypatch.setenv(r.ENV_CUDA_LIB, str(missing))
    with pytest.raises(r.CudaBackendUnavailable) as err:
        rasterize(TILTED, np.array([[0, 1, 2]]), K, W, H, backend="cuda")
    message = str(err.value)
    assert "\n" not in message
    import torch
    if torch.cuda.is_available():
        assert str(missing) in message
    else:
        assert "torch.cuda.is_available() is False" in message
    with pytest.raises(r.CudaBackendUnavailable, match="not found at .*nowhere"):
        r.load_cuda_library(missing)
    assert not r.cuda_backend_available()
    auto = rasterize(TILTED, np.array([[0, 1, 2]]), K, W, H, backend="auto")
    cpu = rasterize(TILTED, np.array([[0, 1, 2]]), K, W, H, backend="cpu")
    np.testing.assert_array_equal(auto.barycentric, cpu.barycentric)


# ---------------------------------------------------------------- the CUDA kernel (cuda_ext)


def _agreement_scenes(model=None):
    """(name, points_cam, triangles, K, width, height, near_cm): edge cases for CPU/CUDA agreement."""
    rng = np.random.default_rng(7)
    near = np.array([[-6.0, -5.0, 30.0], [6.0, -5.0, 30.0], [0.0, 6.0, 30.0]])
    far = np.array([[-13.0, -5.0, 50.0], [13.0, -11.0, 50.0], [1.7, 15.0, 50.0]])
    a = np.array([[-10.0, -8.0, 30.0], [10.0, -8.0, 50.0], [0.0, 10.0, 40.0]])
    b = np.array([[-10.0, -8.0, 50.0], [10.0, -8.0, 30.0], [0.0, 10.0, 40.0]])
    Kq, zq = np.array([[64.0, 0, 32.0], [0, 64.0, 24.0], [0, 0, 1]]), 16.0
    quad_uv = np.array([[8.0, 8.0], [40.0, 8.0], [40.0, 40.0], [8.0, 40.0]])
    quad = np.c_[(quad_uv - [32.0, 24.0]) * zq / 64.0, np.full(4, zq)]
    # a soup of overlapping triangles, a third of them on one shared depth plane (ties), some
    # crossing the border, some behind the near plane, some degenerate
    n = 240
    centres = np.c_[rng.uniform(-14, 14, n), rng.uniform(-11, 11, n), rng.uniform(25, 45, n)]
    soup = centres[:, None, :] + np.c_[rng.normal(0, 4, (n, 3, 2)), rng.normal(0, 3, (n, 3, 1))]
    soup[: n // 3, :, 2] = 33.0
    soup[n // 3: n // 3 + 10, 0, 2] = 0.5
    soup[-5:, 2] = soup[-5:, 0] + 0.5 * (soup[-5:, 1] - soup[-5:, 0])    # collinear corners
    scenes = [
        ("tilted", TILTED, [[0, 1, 2]], K, W, H, 1.0),
        ("tilted, other winding", TILTED, [[0, 2, 1]], K, W, H, 1.0),
        ("off screen", np.array([[-30.0, -20.0, 10.0], [30.0, -5.0, 10.0], [0.0, 40.0, 10.0]]), [[0, 1, 2]], K, W, H,
         1.0),
        ("occlusion", np.vstack([far, near]), [[0, 1, 2], [3, 4, 5]], K, W, H, 1.0),
        ("interpenetrating", np.vstack([a, b]), [[0, 1, 2], [3, 4, 5]], K, W, H, 1.0),
        ("duplicates", np.vstack([TILTED, TILTED]), [[3, 4, 5], [0, 1, 2], [0, 1, 2]], K, W, H, 1.0),
        ("edges on pixel centres", quad, [[0, 1, 2], [0, 2, 3]], Kq, W, H, 1.0),
        ("near plane", np.array([[-1.0, -1.0, 0.5], [1.0, -1.0, 20.0], [0.0, 1.0, 20.0]]), [[0, 1, 2]], K, W, H, 1.0),
        ("soup", soup.reshape(-1, 3), np.arange(3 * n).reshape(n, 3), K, W, H, 1.0),
        ("empty", TILTED, np.zeros((0, 3), np.int64), K, W, H, 1.0),
        ("odd size", TILTED, [[0, 1, 2]], K, 37, 23, 1.0),
    ]
    if model is not None:
        from trainers.correspondence import drawn_triangles

        w, h = 160, 120
        cam = model.neutral.astype(np.float64) @ model_to_camera(0.4, -0.1, 0.05).T + np.array([0.0, -1.0, 60.0])
        scenes.append(("face", cam, model.triangles[drawn_triangles(model)], default_camera_matrix(w, h), w, h, 1.0))
    return [(name, np.asarray(p, np.float64), np.asarray(t), np.asarray(k), w, h, nr)
            for name, p, t, k, w, h, nr in scenes]


def _assert_same_fragments(a, b, name):
    for field in ("triangle_id", "barycentric", "depth_cm"):
        x, y = np.asarray(getattr(a, field)), np.asarray(getattr(b, field))
        assert x.dtype == y.dtype and x.shape == y.shape, (name, field)
        differ = int(np.sum(x != y))
        assert differ == 0, f"{name}: {differ} {field} values differ"


@pytest.fixture(scope="module")
def cuda_build(tmp_path_factory):
    """cuda_ext built with the project's CMake files into a temporary folder; its library's path."""
    import shutil
    import subprocess

    if shutil.which("nvcc") is None or shutil.which("cmake") is None:
        pytest.skip("nvcc or cmake not on PATH: cannot build cuda_ext")
    root = Path(__file__).resolve().parents[1]
    build = tmp_path_factory.mktemp("cuda_build")
    for cmd in (["cmake", "-S", str(root), "-B", str(build)], ["cmake", "--build", str(build), "-j2"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=85)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return build / "cuda_ext" / "libcapture_cuda.so"


def test_cuda_ext_builds_with_cmake(cuda_build):
    import ctypes

    assert cuda_build.is_file()
    lib = ctypes.CDLL(str(cuda_build))    # loads without a GPU: static CUDA runtime, started lazily
    for symbol in ("capture_rasterize_cuda", "capture_rasterize_host", "capture_cuda_error_string"):
        assert hasattr(lib, symbol)


def test_cuda_kernel_code_agrees_with_numba_bit_for_bit(cuda_build, model):
    """cuda_ext's per-triangle and per-pixel code, compiled for the host, against the numba kernel.
    Checks the CUDA file's arithmetic and tie rules here; the GPU launch is the next test."""
    from engine.rasterizer import rasterize_cuda_code_on_host

    for name, pts, tris, Ks, w, h, near in _agreement_scenes(model):
        cpu = rasterize(pts, tris, Ks, w, h, near_cm=near, backend="cpu")
        emulated = rasterize_cuda_code_on_host(pts, tris, Ks, w, h, near_cm=near, library=cuda_build)
        _assert_same_fragments(cpu, emulated, name)
        if name in ("soup", "face"):
            assert cpu.mask.sum() > 0.2 * w * h, name   # the scene really draws something


def test_cuda_backend_agrees_with_cpu_on_the_gpu(request, monkeypatch, model):
    torch = pytest.importorskip("torch")
    from engine import rasterizer as r

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: torch.cuda.is_available() is False")
    if not r.cuda_library_path().is_file():
        monkeypatch.setenv(r.ENV_CUDA_LIB, str(request.getfixturevalue("cuda_build")))
    assert r.cuda_backend_available()
    for name, pts, tris, Ks, w, h, near in _agreement_scenes(model):
        cpu = rasterize(pts, tris, Ks, w, h, near_cm=near, backend="cpu")
        _assert_same_fragments(cpu, rasterize(pts, tris, Ks, w, h, near_cm=near, backend="cuda"), name)
        # torch CUDA tensors in (float32: both kernels widen to float64), CUDA tensors out
        pts32 = pts.astype(np.float32)
        cpu32 = rasterize(pts32, tris, Ks, w, h, near_cm=near, backend="cpu")
        gpu = rasterize(torch.tensor(pts32, device="cuda"), torch.tensor(tris, device="cuda"), Ks, w, h,
                        near_cm=near, backend="auto")
        assert gpu.triangle_id.is_cuda
        _assert_same_fragments(cpu32, r.Fragments(*(x.cpu().numpy() for x in (gpu.triangle_id, gpu.barycentric,
                                                                               gpu.depth_cm))), name + " (torch)")
    # the same render twice on a fresh stream: deterministic whatever the thread order
    name, pts, tris, Ks, w, h, near = _agreement_scenes(model)[-1]
    with torch.cuda.stream(torch.cuda.Stream()):
        a = rasterize(torch.tensor(pts, device="cuda"), tris, Ks, w, h, backend="cuda")
        b = rasterize(torch.tensor(pts, device="cuda"), tris, Ks, w, h, backend="cuda")
    torch.cuda.synchronize()
    assert torch.equal(a.triangle_id, b.triangle_id) and torch.equal(a.barycentric, b.barycentric)
