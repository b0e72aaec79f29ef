"""engine.pose: rotations, the model-to-camera convention, yaw/pitch/roll and the default camera."""
from __future__ import annotations


import numpy as np
import pytest


from engine.pose import (
    FRONTAL,
    default_camera_matrix,
    euler_yxz,
    head_rotation,
    model_to_camera,
    rodrigues,
    rotation_to_axis_angle,
    skew,
    yaw_pitch_roll,
)


def _unit(rng) -> np.ndarray:
    a = rng.normal(size=3)
    return a / np.linalg.norm(a)


def _is_rotation(R, atol=1e-12):
    return np.allclose(R @ R.T, np.eye(3), atol=atol) and np.isclose(np.linalg.det(R), 1.0, atol=atol)


# ---------------------------------------------------------------- axis-angle


def test_skew_is_the_cross_product():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=3), rng.normal(size=3)
    np.testing.assert_allclose(skew(a) @ b, np.cross(a, b), atol=1e-15)


def test_rodrigues_known_rotations():
    np.testing.assert_allclose(rodrigues(np.zeros(3)), np.eye(3))
    Rz90 = rodrigues(np.array([0.0, 0.0, np.pi / 2]))
    np.testing.assert_allclose(Rz90 @ [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], atol=1e-15)  # right-handed
    np.testing.assert_allclose(rodrigues(np.array([np.pi, 0.0, 0.0])), FRONTAL, atol=1e-15)


def test_axis_angle_round_trip_random():
    rng = np.random.default_rng(1)
    for _ in range(300):
        w = _unit(rng) * rng.uniform(1e-3, np.pi - 1e-3)
        R = rodrigues(w)
        assert _is_rotation(R)
        np.testing.assert_allclose(rotation_to_axis_angle(R), w, atol=1e-9)


@pytest.mark.parametrize("theta", [0.0, 1e-13, 1e-10, 1e-8, 1e-7, 1e-6, 2e-6, 1e-5, 1e-4])
def test_axis_angle_round_trip_near_zero(theta):
    rng = np.random.default_rng(2)
    for _ in range(20):
        w = _unit(rng) * theta
        R = rodrigues(w)
        assert _is_rotation(R, atol=1e-12)
        np.testing.assert_allclose(rotation_to_axis_angle(R), w, atol=1e-12)


@pytest.mark.parametrize("gap", [0.0, 1e-7, 1e-5, 5e-5, 2e-4, 1e-3])
def test_axis_angle_round_trip_near_pi(gap):
    """Within 1e-4 of π the axis comes from the symmetric part; its sign must still be the
    one that rotates the right way (rodrigues of the result is the same rotation)."""
    rng = np.random.default_rng(3)
    for _ in range(50):
        a = _unit(rng)
        w = a * (np.pi - gap)
        R = rodrigues(w)
        back = rotation_to_axis_angle(R)
        assert abs(np.linalg.norm(back) - (np.pi - gap)) < 1e-7
        np.testing.assert_allclose(rodrigues(back), R, atol=1e-6)
        if gap > 0:  # below π the axis-angle vector is unique
            np.testing.assert_allclose(back, w, atol=1e-6)


def test_axis_angle_of_frontal_is_pi_about_x():
    w = rotation_to_axis_angle(FRONTAL)
    assert np.isclose(np.linalg.norm(w), np.pi)
    np.testing.assert_allclose(np.abs(w), [np.pi, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(rodrigues(w), FRONTAL, atol=1e-12)


# ---------------------------------------------------------------- yaw / pitch / roll


def test_euler_round_trip_random():
    rng = np.random.default_rng(4)
    for _ in range(500):
        ypr = np.array([rng.uniform(-np.pi + 1e-6, np.pi - 1e-6), np.radians(rng.uniform(-80, 80)),
                        rng.uniform(-np.pi + 1e-6, np.pi - 1e-6)])
        R = euler_yxz(*ypr)
        assert _is_rotation(R)
        np.testing.assert_allclose(yaw_pitch_roll(R), ypr, atol=1e-9)


def test_euler_is_yaw_then_pitch_then_roll_about_fixed_axes():
    y, p, r = 0.3, -0.2, 0.5
    Ry = rodrigues(np.array([0.0, y, 0.0]))
    Rx = rodrigues(np.array([p, 0.0, 0.0]))
    Rz = rodrigues(np.array([0.0, 0.0, r]))
    np.testing.assert_allclose(euler_yxz(y, p, r), Ry @ Rx @ Rz, atol=1e-14)


def test_model_to_camera_zero_is_frontal():
    np.testing.assert_array_equal(model_to_camera(0.0, 0.0, 0.0), FRONTAL)
    assert _is_rotation(FRONTAL)


def test_head_rotation_inverts_model_to_camera():
    rng = np.random.default_rng(5)
    for _ in range(50):
        ypr = rng.uniform(-1.2, 1.2, 3)
        R = model_to_camera(*ypr)
        assert _is_rotation(R)
        np.testing.assert_allclose(head_rotation(R), euler_yxz(*ypr), atol=1e-14)
        np.testing.assert_allclose(yaw_pitch_roll(head_rotation(R)), ypr, atol=1e-9)


FACE = np.array([0.0, 0.0, 1.0])   # model +z: where the face looks
LEFT = np.array([1.0, 0.0, 0.0])   # model +x: the subject's left
UP = np.array([0.0, 1.0, 0.0])     # model +y: the top of the head


def test_frontal_faces_the_camera():
    """Camera: x right, y down, z forward. A frontal face looks back at the camera (-z), its
    left is on the image's right (+x) and the top of its head is up in the image (-y)."""
    np.testing.assert_array_equal(FRONTAL @ FACE, [0, 0, -1])
    np.testing.assert_array_equal(FRONTAL @ LEFT, [1, 0, 0])
    np.testing.assert_array_equal(FRONTAL @ UP, [0, -1, 0])


def test_positive_yaw_turns_towards_the_subjects_left():
    a = np.radians(20.0)
    R = model_to_camera(a, 0.0, 0.0)
    face = R @ FACE
    # the face turns towards its own left, which the camera sees on the image's right
    assert face[0] > 0.3 and face[2] < 0 and abs(face[1]) < 1e-12
    np.testing.assert_allclose(face, [np.sin(a), 0.0, -np.cos(a)], atol=1e-14)
    # the subject's left ear goes away from the camera, the right ear comes nearer
    assert (R @ LEFT)[2] > 0.3 and (R @ -LEFT)[2] < -0.3
    # in the y-up head frame: the face direction gains +x (the subject's left)
    assert (head_rotation(R) @ FACE)[0] > 0.3


def test_positive_pitch_tips_the_chin_down():
    a = np.radians(15.0)
    R = model_to_camera(0.0, a, 0.0)
    face = R @ FACE
    assert face[1] > 0.2 and face[2] < 0 and abs(face[0]) < 1e-12  # looks down in the image (+y)
    # the forehead comes towards the camera, the chin goes back
    assert (R @ UP)[2] < -0.2 and (R @ -UP)[2] > 0.2
    np.testing.assert_allclose(face, [0.0, np.sin(a), -np.cos(a)], atol=1e-14)


def test_positive_roll_tilts_towards_the_subjects_right_shoulder():
    a = np.radians(10.0)
    R = model_to_camera(0.0, 0.0, a)
    top = R @ UP
    # the subject's right shoulder is on the image's left (-x): the top of the head goes there
    assert top[0] < -0.1 and top[1] < 0 and abs(top[2]) < 1e-12
    np.testing.assert_allclose(R @ FACE, [0.0, 0.0, -1.0], atol=1e-14)  # roll keeps the face direction
    # in the y-up head frame: the top of the head moves towards -x, the subject's right
    assert (head_rotation(R) @ UP)[0] < -0.1


# ---------------------------------------------------------------- camera


def test_default_camera_matrix():
    K = default_camera_matrix(640, 480)
    np.testing.assert_array_equal(K, [[640.0, 0.0, 319.5], [0.0, 640.0, 239.5], [0.0, 0.0, 1.0]])
    # about 53 degrees across the larger side
    assert np.degrees(2 * np.arctan(320.0 / K[0, 0])) == pytest.approx(53.13, abs=0.01)
    K = default_camera_matrix(480, 640)
    assert K[0, 0] == K[1, 1] == 640.0 and (K[0, 2], K[1, 2]) == (239.5, 319.5)
    K = default_camera_matrix(1920, 1080, focal_px=1500)
    assert K[0, 0] == K[1, 1] == 1500.0 and (K[0, 2], K[1, 2]) == (959.5, 539.5)


def test_default_camera_projects_the_optical_axis_to_the_centre_pixel():
    K = default_camera_matrix(101, 51)
    p = K @ np.array([0.0, 0.0, 7.0])
    np.testing.assert_allclose(p[:2] / p[2], [50.0, 25.0])  # pixel centres at integer coordinates
