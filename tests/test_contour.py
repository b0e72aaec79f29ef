"""The 68 iBUG landmarks of a fitted mesh (engine/contour.py) and their derivation (trainers/landmarks68.py)."""
from __future__ import annotations

import numpy as np
import pytest

from engine.contour import (CHIN, DEFAULT_LANDMARKS68_PATH, JAW_POINTS, MIRROR68, Landmarks68, SurfacePoints,
                            default_surface_points)
from engine.facemodel import FACE_VERTICES
from engine.pose import FRONTAL, default_camera_matrix, euler_yxz, project


@pytest.fixture(scope="module")
def points() -> SurfacePoints:
    assert DEFAULT_LANDMARKS68_PATH.is_file(), "make it with: python -m trainers.landmarks68"
    return SurfacePoints.load()


def _pose(yaw_deg: float = 0.0, distance_cm: float = 60.0):
    """Model to camera for a head turned by yaw (towards the subject's left for yaw > 0)."""
    R = FRONTAL @ euler_yxz(np.radians(yaw_deg), 0.0, 0.0)
    return R, np.array([0.0, 0.0, distance_cm]), default_camera_matrix(640, 480)


def test_asset_holds_68_valid_face_surface_points(model, points):
    assert points.triangle.shape == (68,) and points.barycentric.shape == (68, 3)
    corners = model.triangles[points.triangle]
    assert (corners < FACE_VERTICES.stop).all()  # on the face, not the eyeballs, teeth or mouth socket
    assert (points.barycentric >= -1e-6).all()
    np.testing.assert_allclose(points.barycentric.sum(axis=1), 1.0, atol=1e-5)
    assert default_surface_points(model).triangle.tolist() == points.triangle.tolist()


def test_mirror_table_is_an_involution():
    np.testing.assert_array_equal(MIRROR68[MIRROR68], np.arange(68))
    midline = {8, 27, 28, 29, 30, 33, 51, 57, 62, 66}
    assert set(np.flatnonzero(MIRROR68 == np.arange(68))) == midline


def test_derived_points_are_left_right_symmetric_on_the_rest_mesh(model, points):
    rest = points.on(model, model.neutral)
    np.testing.assert_allclose(rest[MIRROR68] * [-1, 1, 1], rest, atol=0.01)  # cm
    # iBUG 0-7 and the annotator's left-side points are the subject's right (model -x)
    assert (rest[:8, 0] < 0).all() and (rest[9:17, 0] > 0).all()
    assert rest[36, 0] < rest[39, 0] < 0 < rest[42, 0] < rest[45, 0]  # eye corners in order


def test_derived_points_stay_near_the_model_landmarks(model, points):
    """The derivation moves points by millimetres, not onto other features."""
    moved = np.linalg.norm(points.on(model, model.neutral) - model.neutral[model.landmark68_vertices], axis=1)
    assert moved.max() < 2.5, moved.round(2)


def test_project_is_the_surface_points_on_a_frontal_face(model, points):
    lm = Landmarks68(model, 60)
    R, t, K = _pose()
    identity, expression = np.zeros(60), np.zeros(model.n_expression)
    px = lm.project(identity, expression, R, t, K)
    want = project(points.on(model, model.neutral) @ R.T + t, K)
    np.testing.assert_allclose(px[17:], want[17:], atol=1e-6)
    np.testing.assert_allclose(px[CHIN], want[CHIN], atol=1e-6)
    # the jaw line is mirror-symmetric in the picture for a frontal face
    cx = K[0, 2]
    np.testing.assert_allclose(px[MIRROR68[list(JAW_POINTS)], 0] - cx, -(px[list(JAW_POINTS), 0] - cx), atol=0.05)
    np.testing.assert_allclose(px[MIRROR68[list(JAW_POINTS)], 1], px[list(JAW_POINTS), 1], atol=0.05)


@pytest.mark.parametrize("yaw_deg", [-40.0, 40.0])
def test_jaw_slides_outward_on_the_far_side_of_a_turned_head(model, yaw_deg):
    """Turned 40°: the far side's jaw points leave their own surface location for the silhouette,
    which projects further out; the near side's stay where they were in the picture."""
    lm = Landmarks68(model, 60)
    R, t, K = _pose(yaw_deg)
    identity, expression = np.zeros(60), np.zeros(model.n_expression)
    px = lm.project(identity, expression, R, t, K)
    own = project(lm.points.on(model, model.neutral) @ R.T + t, K)
    # the far side: the subject's left (iBUG 10-16) when turning to the subject's left (yaw > 0)
    far = list(range(10, 17)) if yaw_deg > 0 else list(range(0, 7))
    centre_x = project(t[None], K)[0, 0]
    outward = np.sign(own[far, 0] - centre_x)
    gain = (px[far, 0] - own[far, 0]) * outward
    assert (gain >= -1e-9).all()
    assert (gain > 2.0).sum() >= 4, gain.round(1)  # px: several points move onto the outline
    # no jaw point lies inside the outline the face's own vertices make at its height
    rest = model.neutral[: FACE_VERTICES.stop]
    cam = project(rest @ R.T + t, K)
    for j in far:
        level = np.abs(cam[:, 1] - px[j, 1]) < 1.0
        side = np.sign(rest[:, 0]) == np.sign(lm.points.on(model, model.neutral)[j, 0])
        extreme = (cam[level & side, 0] * outward[far.index(j)]).max()
        assert px[j, 0] * outward[far.index(j)] > extreme - 6.0, (j, px[j, 0], extreme)


def test_derive_recovers_known_points_from_synthetic_annotations(model):
    """Annotations made by projecting known surface points of random fitted faces: derive finds
    locations that reproduce them (within a fraction of a pixel at the synthetic face size)."""
    from trainers.landmarks68 import Fits, box_errors, derive, predicted

    from scipy.spatial import cKDTree

    rng = np.random.default_rng(0)
    # the "annotators' points": face vertices about 3 mm below the model's own, mirror-symmetric
    rest = model.neutral[: FACE_VERTICES.stop].astype(np.float64)
    tree = cKDTree(rest)
    own = rest[model.landmark68_vertices]
    target = own + [0.0, -0.3, 0.0]
    target[MIRROR68 == np.arange(68), 0] = 0.0
    left = own[:, 0] > 0
    target[left] = target[MIRROR68[left]] * [-1, 1, 1]  # the subject's left mirrors the right
    vid = tree.query(target)[1]
    truth = SurfacePoints.from_vertices(model, vid)
    n = 6
    R, t, K, ident, expr = [], [], [], [], []
    for _ in range(n):
        Ri, ti, Ki = _pose(rng.uniform(-15, 15), rng.uniform(50, 70))
        R.append(Ri), t.append(ti), K.append(Ki)
        ident.append(rng.normal(size=20) * 0.5), expr.append(rng.uniform(0, 0.2, model.n_expression))
    fits = Fits(["fit"] * n, [f"synthetic{i}" for i in range(n)], np.array(R), np.array(t), np.array(K),
                np.array(ident), np.array(expr), np.zeros((n, 68, 2)), np.ones(n))
    fits.points = predicted(model, fits, truth)
    fits.scale = np.array([np.sqrt(np.prod(np.ptp(p, axis=0))) for p in fits.points])
    found = derive(model, fits, radius_cm=0.7, subdivisions=2)
    moved = np.linalg.norm(found.on(model, model.neutral) - own, axis=1)
    assert np.median(moved) > 0.2  # it did move off the model's vertices
    err = box_errors(predicted(model, fits, found), fits)
    assert err.mean() < 0.003, err.mean()  # < 0.3% of the box on average
