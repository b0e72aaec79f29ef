"""Tests for engine.depth: calibration files, registration to the colour camera, clean-up,
back-projection, normals and point clouds; the BIWI Kinect frames from ../shared read-only."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from capture.sinks import read_ply
from engine.depth import (
    BIWI_COLOUR_K_PX,
    BIWI_R_DEPTH_TO_COLOUR,
    BIWI_T_DEPTH_TO_COLOUR_MM,
    DepthCalibration,
    TemporalDepthFilter,
    backproject,
    denoise_depth,
    fill_depth_cracks,
    organized_normals,
    register_depth,
    write_ply_points,
)
from engine.pose import project

BIWI = Path(__file__).resolve().parents[2] / "shared" / "data" / "rgbd" / "biwi01"
needs_biwi = pytest.mark.skipif(not (BIWI / "depth_intrinsics.txt").is_file(), reason=f"no BIWI frames at {BIWI}")

try:
    import open3d as o3d
except ImportError:  # optional: the cross-checks skip
    o3d = None
needs_open3d = pytest.mark.skipif(o3d is None, reason="open3d is not installed (optional; pip install open3d)")


def _K(f_px: float, cx: float, cy: float) -> np.ndarray:
    return np.array([[f_px, 0.0, cx], [0.0, f_px, cy], [0.0, 0.0, 1.0]])


def _rot_y(deg: float) -> np.ndarray:
    a = np.radians(deg)
    return np.array([[np.cos(a), 0.0, np.sin(a)], [0.0, 1.0, 0.0], [-np.sin(a), 0.0, np.cos(a)]])


def _plane_depth_mm(K: np.ndarray, size: tuple[int, int], normal: np.ndarray, offset_mm: float) -> np.ndarray:
    """Exact z (mm) of the plane normal·X = offset_mm along each pixel centre's ray, (H, W) float64."""
    W, H = size
    u, v = np.meshgrid(np.arange(W), np.arange(H))
    rays = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u, float)], axis=-1)
    return offset_mm / (rays @ normal)


# ---------------------------------------------------------------- calibration


def test_calibration_json_round_trip_keeps_extra_keys(tmp_path: Path) -> None:
    calib = DepthCalibration(_K(580.0, 319.5, 239.5), _K(575.8, 320.0, 240.0), _rot_y(3.0),
                             np.array([-25.0, 1.5, -3.0]), depth_unit_mm=0.25)
    path = tmp_path / "rgbd.json"
    calib.to_json(path, fps=30.0)
    assert json.loads(path.read_text())["fps"] == 30.0
    back = DepthCalibration.from_json(path)
    for name in ("colour_K", "depth_K", "R_depth_to_colour", "t_depth_to_colour_mm"):
        assert np.array_equal(getattr(back, name), getattr(calib, name)), name
    assert back.depth_unit_mm == 0.25
    assert not back.is_registered
    assert DepthCalibration.registered(_K(500.0, 320.0, 240.0)).is_registered
    with pytest.raises(ValueError):  # frozen, read-only
        back.colour_K[0, 0] = 1.0


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("depth_K"), "missing depth_K"),
    (lambda d: d.update(R_depth_to_colour=[[1, 0, 0], [0, 1, 0], [0, 0, 2]]), "not a rotation"),
    (lambda d: d.update(colour_K=[[500, 0, 320], [0, 500, 240]]), "colour_K has shape (2, 3)"),
    (lambda d: d.update(t_depth_to_colour_mm=[0, 0, float("nan")]), "not finite"),
    (lambda d: d.update(depth_unit_mm=0), "depth_unit_mm must be"),
    (lambda d: d.update(depth_K=[[-500, 0, 320], [0, 500, 240], [0, 0, 1]]), "not a pinhole"),
])
def test_calibration_json_errors_name_the_file(tmp_path: Path, change, message: str) -> None:
    data = DepthCalibration.registered(_K(500.0, 320.0, 240.0)).to_dict()
    change(data)
    path = tmp_path / "rgbd.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as info:
        DepthCalibration.from_json(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
    assert "\n" not in str(info.value)


def test_calibration_json_not_json(tmp_path: Path) -> None:
    path = tmp_path / "rgbd.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"^{path}: "):
        DepthCalibration.from_json(path)
    with pytest.raises(ValueError, match="rgbd.json: "):
        DepthCalibration.from_json(tmp_path / "missing" / "rgbd.json")


def test_biwi_layout_reads_depth_intrinsics_and_documented_defaults(tmp_path: Path) -> None:
    (tmp_path / "depth_intrinsics.txt").write_text("575.816 575.816 320.0 240.0\n")
    calib = DepthCalibration.biwi(tmp_path)
    assert np.array_equal(calib.depth_K, _K(575.816, 320.0, 240.0))
    assert np.array_equal(calib.colour_K, BIWI_COLOUR_K_PX)
    assert calib.colour_K[0, 0] == 517.679 and calib.colour_K[1, 2] == 240.5  # the data README's numbers
    assert np.array_equal(calib.R_depth_to_colour, BIWI_R_DEPTH_TO_COLOUR)
    assert np.array_equal(calib.t_depth_to_colour_mm, BIWI_T_DEPTH_TO_COLOUR_MM)
    (tmp_path / "depth_intrinsics.txt").write_text("575.816 575.816 320.0\n")
    with pytest.raises(ValueError, match="depth_intrinsics.txt: 3 numbers, expected four"):
        DepthCalibration.biwi(tmp_path)


# ---------------------------------------------------------------- registration


def test_identity_registration_reproduces_the_depth_exactly() -> None:
    rng = np.random.default_rng(1)
    K = _K(575.0, 320.0, 240.0)
    calib = DepthCalibration(K, K, np.eye(3), np.zeros(3))
    sparse = rng.integers(400, 4000, (480, 640)).astype(np.uint16)
    sparse[rng.random((480, 640)) < 0.7] = 0  # mostly empty: the foreground-only path
    dense = rng.integers(400, 4000, (480, 640)).astype(np.uint16)
    dense[rng.random((480, 640)) < 0.1] = 0  # mostly valid: the full-frame path
    for depth in (sparse, dense):
        assert np.array_equal(register_depth(depth, calib, (640, 480), fill_cracks=False), depth.astype(np.float32))
    unit = DepthCalibration(K, K, np.eye(3), np.zeros(3), depth_unit_mm=0.5)
    assert np.array_equal(register_depth(dense, unit, (640, 480), fill_cracks=False), dense * np.float32(0.5))


def test_tilted_plane_lands_where_the_closed_form_says() -> None:
    """A plane seen by the depth camera, moved through a known rotation and translation: every
    registered pixel holds the colour camera's z of that plane along the pixel's ray, and the
    covered area is the depth image's outline projected into the colour camera."""
    depth_K, colour_K = _K(575.8, 320.0, 240.0), _K(520.0, 318.0, 242.0)
    R, t_mm = _rot_y(4.0), np.array([-25.0, 6.0, -13.0])
    calib = DepthCalibration(colour_K, depth_K, R, t_mm)
    normal_d = np.array([0.2, -0.1, 1.0]) / np.linalg.norm([0.2, -0.1, 1.0])
    offset_d = 900.0
    raw = _plane_depth_mm(depth_K, (640, 480), normal_d, offset_d).astype(np.float32)
    # the same plane in the colour camera: n_c = R n_d, n_c·X = offset_d + n_c·t
    normal_c = R @ normal_d
    expected = _plane_depth_mm(colour_K, (640, 480), normal_c, offset_d + normal_c @ t_mm)
    # a registered value is the z of a point within half a pixel of the centre: on this plane,
    # about 0.7 mm/px deep, within 0.47 mm of the centre's; a filled crack takes a neighbour's
    holed = register_depth(raw, calib, (640, 480), fill_cracks=False)
    registered = register_depth(raw, calib, (640, 480))
    valid = registered > 0
    assert np.abs(holed[holed > 0] - expected[holed > 0]).max() < 0.6
    assert np.abs(registered[valid] - expected[valid]).max() < 1.5
    corners = np.array([[0, 0], [639, 0], [639, 479], [0, 479]], float)
    z = raw[corners[:, 1].astype(int), corners[:, 0].astype(int)]
    X = (np.linalg.inv(depth_K) @ np.c_[corners, np.ones(4)].T * z).T @ R.T + t_mm
    uv = project(X, colour_K)
    outline = np.zeros((480, 640), np.uint8)  # the depth image's outline, projected: a quadrilateral
    cv2.fillConvexPoly(outline, np.rint(uv * 16).astype(np.int32), 1, shift=4)
    kernel = np.ones((5, 5), np.uint8)
    assert np.all(valid[cv2.erode(outline, kernel) > 0])  # no holes inside
    assert not np.any(valid[cv2.dilate(outline, kernel) == 0])  # nothing outside
    assert valid.sum() > 0.75 * valid.size


def test_zbuffer_keeps_the_nearer_surface_and_leaves_the_disocclusion_empty() -> None:
    """A square 500 mm away in front of a wall 2000 mm away; the colour camera 50 mm to the right
    of the depth camera: the square shifts 50 px left, the wall 12.5 px, so the square covers
    wall points and uncovers a strip of wall that the depth camera never saw."""
    K = _K(500.0, 320.0, 240.0)
    calib = DepthCalibration(K, K, np.eye(3), np.array([-50.0, 0.0, 0.0]))
    depth = np.full((480, 640), 2000, np.uint16)
    depth[200:280, 300:380] = 500
    registered = register_depth(depth, calib, (640, 480))
    # square: u' = u - 500·50/500 = u - 50; wall: u' = u - 12.5
    assert np.all(registered[200:280, 250:330] == 500)
    assert np.all(registered[200:280, 240:249] == 2000)
    # behind the square's right edge, wall pixels 330 ... 367 come from depth columns 342.5 ... 380,
    # hidden behind the square in the depth camera: no data there, and nothing filled in
    assert np.all(registered[202:278, 331:367] == 0)
    assert np.all(registered[200:280, 368:375] == 2000)


def test_crack_filling_fills_splat_holes_but_never_across_an_edge() -> None:
    depth = np.zeros((40, 40), np.float32)
    depth[5:35, 5:20] = 800.0
    depth[5:35, 20:35] = 1200.0  # a 400 mm step at column 20
    depth[10:30, 12] = 0.0  # a crack inside the near surface
    depth[10:30, 20] = 0.0  # a crack on the step
    depth[25, 27] = 0.0  # a single hole in the far surface
    filled = fill_depth_cracks(depth)
    assert np.all(filled[10:30, 12] == 800.0)
    assert np.all(filled[10:30, 20] == 0.0)  # neighbours disagree by 400 mm
    assert filled[25, 27] == 1200.0
    assert np.array_equal(filled[:5], depth[:5]) and np.array_equal(filled[35:], depth[35:])  # silhouette not grown
    assert np.array_equal(filled[:, :5], depth[:, :5]) and np.array_equal(filled[:, 35:], depth[:, 35:])
    sloped = depth.copy()
    sloped[5:35, 5:20] += np.arange(15, dtype=np.float32) * 3.0  # 3 mm per pixel: still one surface
    sloped[10:30, 12] = 0.0
    assert np.all(fill_depth_cracks(sloped, tolerance_mm=10.0)[10:30, 12] > 0)
    assert np.all(fill_depth_cracks(sloped, tolerance_mm=5.0)[10:30, 12] == 0)


def test_magnifying_colour_camera_cracks_are_filled_without_growing_the_silhouette() -> None:
    """A colour focal 1.3 times the depth's spreads the depth pixels apart: forward projection leaves
    a grid of empty pixels, which the fill closes; outside the surface nothing appears."""
    K_d, K_c = _K(400.0, 320.0, 240.0), _K(520.0, 320.0, 240.0)
    calib = DepthCalibration(K_c, K_d, np.eye(3), np.zeros(3))
    depth = np.zeros((480, 640), np.uint16)
    depth[140:340, 220:420] = 1000
    holed = register_depth(depth, calib, (640, 480), fill_cracks=False)
    filled = register_depth(depth, calib, (640, 480))
    ys, xs = np.nonzero(holed)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    assert (holed[box] == 0).mean() > 0.2  # the cracks
    inner = (slice(box[0].start + 1, box[0].stop - 1), slice(box[1].start + 1, box[1].stop - 1))
    assert np.all(filled[inner] == 1000)  # on the outline, where a crack meets the edge, a few stay empty
    assert np.count_nonzero(filled[box] == 0) < 0.01 * filled[box].size
    assert np.count_nonzero(filled) == np.count_nonzero(filled[box])  # nothing outside the box


# ---------------------------------------------------------------- clean-up


def test_denoise_smooths_noise_keeps_edges_and_leaves_empty_pixels_empty() -> None:
    rng = np.random.default_rng(2)
    depth = np.zeros((120, 160), np.float32)
    depth[20:100, 20:80] = 900.0
    depth[20:100, 80:140] = 1000.0  # a 100 mm step
    truth = depth.copy()
    noisy = np.where(depth > 0, depth + rng.normal(0.0, 3.0, depth.shape).astype(np.float32), 0).astype(np.float32)
    out = denoise_depth(noisy)
    valid = truth > 0
    assert np.array_equal(out > 0, valid)  # nothing grows, nothing is lost
    assert np.abs(out - truth)[valid].max() < 10.0  # edge pixels are not pulled towards 0 or the other side
    interior = np.zeros_like(valid)
    interior[25:95, 25:75] = interior[25:95, 85:135] = True
    assert np.std((out - truth)[interior]) < 0.5 * np.std((noisy - truth)[interior])
    assert np.all(np.abs(out[20:100, 78:80] - 900.0) < 8.0) and np.all(np.abs(out[20:100, 80:82] - 1000.0) < 8.0)
    assert not denoise_depth(np.zeros((10, 10), np.float32)).any()


def test_temporal_filter_smooths_still_depth_and_restarts_where_it_moves() -> None:
    rng = np.random.default_rng(3)
    smooth = TemporalDepthFilter(alpha=0.3, reset_mm=10.0)
    frames = [np.full((8, 8), 900.0, np.float32) + rng.normal(0.0, 2.0, (8, 8)).astype(np.float32)
              for _ in range(30)]
    outs = [smooth(f) for f in frames]
    assert np.std(outs[-1] - 900.0) < 0.6 * np.std(frames[-1] - 900.0)
    moved = np.full((8, 8), 950.0, np.float32)
    moved[0, 0] = 0.0
    out = smooth(moved)
    assert np.array_equal(out, moved)  # 50 mm away: restarted, not smeared; empty stays empty


# ---------------------------------------------------------------- points, normals, clouds


def test_backproject_then_project_round_trip() -> None:
    rng = np.random.default_rng(4)
    K = _K(517.7, 320.0, 240.5)
    depth = rng.uniform(400.0, 3000.0, (48, 64)).astype(np.float32)
    depth[rng.random(depth.shape) < 0.2] = 0.0
    points = backproject(depth, K)
    assert points.shape == (48, 64, 3) and points.dtype == np.float32
    valid = depth > 0
    assert np.all(np.isnan(points[~valid]))
    v, u = np.nonzero(valid)
    uv = project(points[valid].astype(np.float64), K)
    assert np.abs(uv - np.c_[u, v]).max() < 1e-3
    assert np.allclose(points[valid][:, 2] * 10.0, depth[valid], rtol=1e-6)  # cm


def test_normals_of_a_tilted_plane_face_the_camera() -> None:
    K = _K(500.0, 160.0, 120.0)
    normal = np.array([0.3, -0.4, -1.0]) / np.linalg.norm([0.3, -0.4, -1.0])  # towards the camera
    depth = _plane_depth_mm(K, (320, 240), normal, -800.0).astype(np.float32)
    depth[100:110, 150:160] = 0.0  # a hole
    normals = organized_normals(backproject(depth, K))
    ok = ~np.isnan(normals[..., 0])
    assert np.abs(normals[ok] - normal).max() < 1e-3
    assert not ok[0].any() and not ok[-1].any() and not ok[:, 0].any() and not ok[:, -1].any()
    assert not ok[99:111, 150:160].any() and not ok[100:110, 149:161].any()  # the hole and its ring
    assert ok[1:-1, 1:-1].sum() == 238 * 318 - 12 * 12 + 4  # everything else (the ring's corners see no hole)
    far = organized_normals(backproject(depth, K), step_px=3)
    assert np.abs(far[~np.isnan(far[..., 0])] - normal).max() < 1e-3


def test_ply_point_cloud_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    points = rng.normal(0.0, 10.0, (50, 3)).astype(np.float32)
    plain = tmp_path / "plain.ply"
    write_ply_points(plain, points)
    vertices, faces = read_ply(plain)  # the mesh writer's layout: capture's own reader takes it
    assert np.array_equal(vertices, points) and faces.shape == (0, 3)
    normals = rng.normal(size=(50, 3)).astype(np.float32)
    colours = rng.integers(0, 256, (50, 3)).astype(np.uint8)
    full = tmp_path / "full.ply"
    write_ply_points(full, points, normals, colours)
    data = full.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii")
    assert "format binary_little_endian 1.0" in header and "element vertex 50" in header
    rows = np.frombuffer(data[end:], dtype=[("p", "<f4", 3), ("n", "<f4", 3), ("c", "u1", 3)])
    assert np.array_equal(rows["p"], points) and np.array_equal(rows["n"], normals)
    assert np.array_equal(rows["c"], colours)
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ValueError, match="colours must be"):
        write_ply_points(full, points, colours=colours.astype(np.float32))


# ---------------------------------------------------------------- against Open3D


@needs_open3d
def test_open3d_reads_our_point_cloud(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    points = rng.normal(0.0, 10.0, (40, 3)).astype(np.float32)
    normals = rng.normal(size=(40, 3)).astype(np.float32)
    colours = rng.integers(0, 256, (40, 3)).astype(np.uint8)
    write_ply_points(tmp_path / "c.ply", points, normals, colours)
    cloud = o3d.io.read_point_cloud(str(tmp_path / "c.ply"))
    assert np.allclose(np.asarray(cloud.points), points)
    assert np.allclose(np.asarray(cloud.normals), normals)
    assert np.allclose(np.asarray(cloud.colors) * 255.0, colours)


@needs_open3d
def test_backprojection_and_normals_agree_with_open3d() -> None:
    K = _K(517.7, 320.0, 240.5)
    normal = np.array([0.2, 0.3, -1.0]) / np.linalg.norm([0.2, 0.3, -1.0])
    depth = _plane_depth_mm(K, (640, 480), normal, -700.0).astype(np.float32)
    holed = depth.copy()
    holed[200:240, 300:350] = 0.0

    def vertex_map(depth_mm):
        image = o3d.t.geometry.Image(o3d.core.Tensor(depth_mm * np.float32(0.1)))
        return image.create_vertex_map(o3d.core.Tensor(K), invalid_fill=float("nan"))

    ours, theirs = backproject(holed, K), vertex_map(holed).as_tensor().numpy()
    valid = holed > 0
    assert np.all(np.isnan(ours[~valid])) and not np.any(theirs[~valid])  # Open3D: zeros
    assert np.abs(ours[valid] - theirs[valid]).max() < 1e-3  # cm
    ours = backproject(depth, K)
    their_normals = vertex_map(depth).create_normal_map(invalid_fill=float("nan")).as_tensor().numpy()
    our_normals = organized_normals(ours)
    both = ~np.isnan(our_normals[..., 0]) & ~np.isnan(their_normals[..., 0])
    assert both.sum() > 0.9 * depth.size
    assert np.abs(np.abs(np.einsum("ij,ij->i", our_normals[both], their_normals[both])) - 1.0).max() < 1e-3


@needs_open3d
@needs_biwi
def test_registration_agrees_with_open3d_projection() -> None:
    """Open3D's way: a point cloud from the depth image, moved, projected to a depth image at the
    colour camera. The same pixels have depth; the values agree except where two points compete
    for a pixel within a few mm (Open3D keeps the first of equals)."""
    calib = DepthCalibration.biwi(BIWI)
    raw = cv2.imread(str(BIWI / "depth" / "frame_00000.png"), cv2.IMREAD_UNCHANGED)
    ours = register_depth(raw, calib, (640, 480), fill_cracks=False)
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = calib.R_depth_to_colour, calib.t_depth_to_colour_mm / 1000.0
    cloud = o3d.t.geometry.PointCloud.create_from_depth_image(
        o3d.t.geometry.Image(o3d.core.Tensor(raw)), o3d.core.Tensor(calib.depth_K), depth_scale=1000.0, depth_max=10.0)
    theirs = cloud.project_to_depth_image(640, 480, o3d.core.Tensor(calib.colour_K), o3d.core.Tensor(T),
                                          depth_scale=1000.0, depth_max=10.0).as_tensor().numpy()[..., 0]
    assert np.array_equal(ours > 0, theirs > 0)
    diff = np.abs(ours - theirs)[ours > 0]
    assert np.mean(diff < 0.01) > 0.99 and diff.max() < 10.0


# ---------------------------------------------------------------- BIWI Kinect frames


def _edge_score(gradient: np.ndarray, mask: np.ndarray, above_row: int) -> float:
    """Mean colour gradient along the mask's outline, above a row (the picture's bottom cuts the body)."""
    edge = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    edge[above_row:] = False
    return float(gradient[edge].mean())


@needs_biwi
def test_biwi_registered_depth_meets_the_colour_head() -> None:
    """Registered, the depth silhouette's outline runs along the colour picture's edges (hair
    against the wall) and the nearest point of the face is the nose tip MediaPipe finds; the raw,
    unregistered depth misses both by some 20 px."""
    from engine.landmarks import MediaPipeLandmarker

    calib = DepthCalibration.biwi(BIWI)
    with MediaPipeLandmarker(static=True) as mesh:
        for i in range(5):
            raw = cv2.imread(str(BIWI / "depth" / f"frame_{i:05d}.png"), cv2.IMREAD_UNCHANGED)
            rgb = cv2.cvtColor(cv2.imread(str(BIWI / "rgb" / f"frame_{i:05d}.png")), cv2.COLOR_BGR2RGB)
            registered = denoise_depth(register_depth(raw, calib, (640, 480)))
            grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
            gradient = np.hypot(cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1))
            assert _edge_score(gradient, registered > 0, 300) > 3.0 * _edge_score(gradient, raw > 0, 300)
            landmarks = mesh.detect(rgb)
            assert landmarks is not None
            x0, y0 = np.floor(landmarks[:, :2].min(axis=0)).astype(int)
            x1, y1 = np.ceil(landmarks[:, :2].max(axis=0)).astype(int)
            nose_px = landmarks[1, :2]
            for depth, near, far in ((registered, 0.0, 8.0), (raw.astype(np.float32), 12.0, np.inf)):
                face = np.where(depth[y0:y1, x0:x1] > 0, depth[y0:y1, x0:x1], np.inf)
                v, u = np.unravel_index(np.argmin(face), face.shape)
                assert near <= np.hypot(u + x0 - nose_px[0], v + y0 - nose_px[1]) <= far
