"""engine.gaze: eyeballs of the face model, gaze angles from iris centres, eyeLook weights."""
from __future__ import annotations


import numpy as np
import pytest


from engine.correspondence import LandmarkCorrespondence
from engine.facemodel import barycentric_points
from engine.gaze import (DEFAULT_OPEN_APERTURE, FULL_LOOK_PITCH, FULL_LOOK_YAW, IRIS_CENTRES, SHUT_APERTURE, EyeModel,
                         LidClosure, eye_look_weights, gaze_angles)
from engine.pose import default_camera_matrix, euler_yxz, model_to_camera, project

K = default_camera_matrix(640, 480)
HEAD_POSES = [  # (yaw, pitch, roll) degrees, translation cm
    ((0.0, 0.0, 0.0), (0.0, 0.0, 60.0)),
    ((20.0, -10.0, 5.0), (4.0, 2.0, 55.0)),
    ((-25.0, 12.0, -8.0), (-3.0, -1.5, 70.0)),
]



@pytest.fixture(scope="module")
def iris_rest(model) -> np.ndarray:
    """(2, 3) where MediaPipe's iris centres (IRIS_CENTRES order) sit on the rest mesh."""
    corr = LandmarkCorrespondence.load()
    return barycentric_points(model.neutral, model.triangles, corr.triangle, corr.barycentric)[list(IRIS_CENTRES)]


@pytest.fixture(scope="module")
def eyes(model, iris_rest) -> EyeModel:
    return EyeModel.from_model(model, model.neutral, iris_rest)


def _direction_angles(g):
    """Yaw then pitch (engine.pose's Ry(yaw)·Rx(pitch)) of a unit direction in the y-up head frame."""
    return np.arctan2(g[0], g[2]), np.arcsin(-g[1])


def _landmarks(points_model: dict[int, np.ndarray], R, t) -> np.ndarray:
    lm = np.zeros((478, 3))
    for index, p in points_model.items():
        lm[index, :2] = project((np.asarray(p, float) @ R.T + t)[None], K)[0]
    return lm


def _looking(eyes: EyeModel, yaw: float, pitch: float) -> dict[int, np.ndarray]:
    """Each eye's front point (on its sphere, along its rest direction), turned by yaw then pitch."""
    out = {}
    for i in range(2):
        y0, p0 = _direction_angles(eyes.rest_direction[i].astype(np.float64))
        g = euler_yxz(y0 + yaw, p0 + pitch, 0.0) @ [0.0, 0.0, 1.0]
        out[int(eyes.iris_landmark[i])] = eyes.centre_cm[i] + eyes.radius_cm[i] * g
    return out


def _pose(ypr_deg, t):
    return model_to_camera(*np.radians(ypr_deg)), np.asarray(t, float)


# ---------------------------------------------------------------- the eye model


def test_eye_model_of_the_face_model(model, eyes):
    left, right = eyes.centre_cm
    assert left[0] > 2.0 and right[0] < -2.0               # the subject's left eye has +x
    np.testing.assert_allclose(left * [-1, 1, 1], right, atol=0.05)  # the model is symmetric
    assert np.all((eyes.radius_cm > 0.9) & (eyes.radius_cm < 1.8))   # a human eyeball: ~1.2 cm radius
    np.testing.assert_allclose(np.linalg.norm(eyes.rest_direction, axis=1), 1.0, atol=1e-6)
    assert np.all(eyes.rest_direction[:, 2] > 0.95)        # at rest the eyes look down +z, ahead
    # MediaPipe's 473 is the subject's left iris (on the image's right), 468 the right one
    assert eyes.iris_landmark.tolist() == [473, 468]


def test_eyeball_centre_is_the_sclera_spheres(model, eyes):
    """Every sclera vertex lies at nearly one distance from the centre (a sphere; the
    cornea bulges a little), which the sclera's mean, in front of the centre, does not give."""
    for i, side in enumerate(("Left", "Right")):
        sclera = model.neutral[model.material_vertices("M_Sclera" + side)].astype(np.float64)
        r = np.linalg.norm(sclera - eyes.centre_cm[i], axis=1)
        assert r.std() / r.mean() < 0.05
        r_mean = np.linalg.norm(sclera - sclera.mean(axis=0), axis=1)
        assert r_mean.std() / r_mean.mean() > 0.15


def test_gaze_of_a_turned_eyeball_mesh(model, eyes, iris_rest):
    """Turn the whole eyeball mesh (sclera and iris) about the centre of its vertices' bounding
    box (an estimate independent of the eye model's) and read the iris landmark carried with it."""
    R, t = _pose((10, -5, 0), (1.0, -2.0, 55.0))
    for yaw_deg, pitch_deg in ((20, 0), (0, -15), (-18, 12)):
        turned = {}
        for i, side in enumerate(("Left", "Right")):
            ball = model.neutral[model.material_vertices("M_Sclera" + side, "M_Iris" + side)].astype(np.float64)
            centre = (ball.min(axis=0) + ball.max(axis=0)) / 2.0
            turn = euler_yxz(np.radians(yaw_deg), np.radians(pitch_deg), 0.0)
            index = int(eyes.iris_landmark[i])
            turned[index] = centre + turn @ (iris_rest[IRIS_CENTRES.index(index)] - centre)
        got = np.degrees(gaze_angles(eyes, _landmarks(turned, R, t), R, t, K))
        np.testing.assert_allclose(got, [[yaw_deg, pitch_deg]] * 2, atol=2.0)


def test_eye_model_orders_the_iris_landmarks_by_side(model, iris_rest):
    swapped = EyeModel.from_model(model, model.neutral, iris_rest[::-1])
    assert swapped.iris_landmark.tolist() == [468, 473]


# ---------------------------------------------------------------- gaze angles


@pytest.mark.parametrize("ypr,t", HEAD_POSES)
@pytest.mark.parametrize("yaw_deg,pitch_deg", [(0, 0), (15, 0), (-20, 0), (0, 12), (0, -15)])
def test_gaze_angles_recover_single_axis_rotations(eyes, ypr, t, yaw_deg, pitch_deg):
    R, t = _pose(ypr, t)
    lm = _landmarks(_looking(eyes, np.radians(yaw_deg), np.radians(pitch_deg)), R, t)
    got = np.degrees(gaze_angles(eyes, lm, R, t, K))
    np.testing.assert_allclose(got, [[yaw_deg, pitch_deg]] * 2, atol=1.0)


@pytest.mark.parametrize("ypr,t", HEAD_POSES[:2])
@pytest.mark.parametrize("yaw_deg,pitch_deg", [(20, 15), (-25, -20), (25, 20), (-15, 18)])
def test_gaze_angles_recover_combined_rotations(eyes, ypr, t, yaw_deg, pitch_deg):
    """Yaw and pitch together, in engine.pose's convention (yaw, then pitch: Ry·Rx), which the
    module docstring says the angles follow."""
    R, t = _pose(ypr, t)
    lm = _landmarks(_looking(eyes, np.radians(yaw_deg), np.radians(pitch_deg)), R, t)
    got = np.degrees(gaze_angles(eyes, lm, R, t, K))
    np.testing.assert_allclose(got, [[yaw_deg, pitch_deg]] * 2, atol=1.0)


@pytest.mark.parametrize("ypr,t", HEAD_POSES)
def test_rest_iris_from_the_correspondence_reads_as_straight_ahead(model, eyes, iris_rest, ypr, t):
    """The correspondence says where MediaPipe puts the iris centre of the model's rest eye.
    That point, seen from any head pose, must read as gaze (0, 0): otherwise every frame pins
    the eyeLook lid shapes to a gaze the subject does not have."""
    R, t = _pose(ypr, t)
    lm = _landmarks({IRIS_CENTRES[0]: iris_rest[0], IRIS_CENTRES[1]: iris_rest[1]}, R, t)
    got = np.degrees(gaze_angles(eyes, lm, R, t, K))
    np.testing.assert_allclose(got, 0.0, atol=1.0)


def test_ray_missing_the_eyeball_gives_finite_angles(eyes):
    R, t = _pose((0, 0, 0), (0, 0, 60))
    far_left = {int(eyes.iris_landmark[0]): eyes.centre_cm[0] + [3.0, 0.0, 1.0],
                int(eyes.iris_landmark[1]): eyes.centre_cm[1] + [-3.0, 0.0, 1.0]}
    got = gaze_angles(eyes, _landmarks(far_left, R, t), R, t, K)
    assert np.all(np.isfinite(got))
    assert got[0, 0] > np.radians(30) and got[1, 0] < -np.radians(30)   # out to each side


def test_gaze_uses_the_head_pose(eyes):
    """The same pixels mean a different gaze under a different head pose."""
    R, t = _pose((0, 0, 0), (0, 0, 60))
    lm = _landmarks(_looking(eyes, np.radians(10.0), 0.0), R, t)
    R2, _ = _pose((10, 0, 0), (0, 0, 60))
    a1 = gaze_angles(eyes, lm, R, t, K)
    a2 = gaze_angles(eyes, lm, R2, t, K)
    assert np.all(np.abs(a1[:, 0] - a2[:, 0]) > np.radians(5))


# ---------------------------------------------------------------- eyeLook weights


def test_eye_look_weights_looking_to_the_subjects_left():
    a = np.radians([[15.0, 0.0], [15.0, 0.0]])
    w = eye_look_weights(a)
    assert set(w) == {f"eyeLook{d}_{s}" for d in ("Out", "In", "Down", "Up") for s in "LR"}
    assert w["eyeLookOut_L"] > 0 and w["eyeLookIn_R"] > 0
    assert w["eyeLookIn_L"] == 0 and w["eyeLookOut_R"] == 0
    assert w["eyeLookOut_L"] == pytest.approx(15.0 / np.degrees(FULL_LOOK_YAW))
    assert all(w[k] == 0 for k in ("eyeLookUp_L", "eyeLookUp_R", "eyeLookDown_L", "eyeLookDown_R"))


def test_eye_look_weights_looking_to_the_subjects_right_and_down():
    a = np.radians([[-10.0, 12.0], [-10.0, 12.0]])
    w = eye_look_weights(a)
    assert w["eyeLookIn_L"] > 0 and w["eyeLookOut_R"] > 0
    assert w["eyeLookOut_L"] == 0 and w["eyeLookIn_R"] == 0
    assert w["eyeLookDown_L"] == pytest.approx(12.0 / np.degrees(FULL_LOOK_PITCH))
    assert w["eyeLookDown_R"] > 0 and w["eyeLookUp_L"] == 0 and w["eyeLookUp_R"] == 0


def test_eye_look_weights_are_clipped_to_unit_range():
    w = eye_look_weights(np.radians([[80.0, -70.0], [80.0, -70.0]]))
    assert w["eyeLookOut_L"] == 1.0 and w["eyeLookIn_R"] == 1.0
    assert w["eyeLookUp_L"] == 1.0 and w["eyeLookUp_R"] == 1.0
    assert all(0.0 <= v <= 1.0 for v in w.values())
    assert all(v == 0.0 for v in eye_look_weights(np.zeros((2, 2))).values())


def test_eye_look_weights_name_real_model_shapes(model):
    for name in eye_look_weights(np.zeros((2, 2))):
        assert name in model.expression_names


def test_lid_closure_reads_a_wink_against_the_takes_own_open_eye():
    closure = LidClosure(frames=60, every=15, warm_up=15)
    first = closure(np.array([DEFAULT_OPEN_APERTURE, SHUT_APERTURE]))   # before the take shows its open eye
    np.testing.assert_allclose(first, [0.0, 1.0])
    rng = np.random.default_rng(0)
    for _ in range(59):   # a performer whose open eyes read 0.42 / 0.38, with a few blinks
        blink = rng.random() < 0.1
        closure(np.array([0.42, 0.38]) * (0.2 if blink else 1.0) + rng.normal(0, 0.005, 2))
    np.testing.assert_allclose(closure.open_aperture, [0.42, 0.38], atol=0.01)
    assert closure.count == 60   # frozen from here: a long closed spell does not become the open eye
    left_wink = closure(np.array([SHUT_APERTURE, 0.38]))
    assert left_wink[0] == pytest.approx(1.0) and left_wink[1] < 0.05
    half = closure(np.array([(0.42 + SHUT_APERTURE) / 2, 0.38]))[0]
    assert half == pytest.approx(0.5, abs=0.03)
    for _ in range(100):
        closure(np.array([SHUT_APERTURE, SHUT_APERTURE]))
    np.testing.assert_allclose(closure.open_aperture, [0.42, 0.38], atol=0.01)
    assert np.all(closure(np.array([0.6, 0.6])) == 0.0)   # wider than open: not closed, never negative
