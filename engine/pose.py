"""Head pose: rotations, the model-to-camera convention and yaw/pitch/roll.

Camera coordinates are OpenCV's: x right, y down, z forward (cm). The model
looks down +z with +y up, so a head facing the camera has rotation
FRONTAL = diag(1, -1, -1). Pose is X_cam = R · X_model + t.

Yaw, pitch and roll (radians) describe the head relative to a frontal head in
a y-up frame (ARKit's face-anchor axes: +x the subject's left, +y up, +z out
of the face): R_head = FRONTAL · R = Ry(yaw) · Rx(pitch) · Rz(roll).
Yaw > 0 turns the face towards the subject's left, pitch > 0 tips the chin
down, roll > 0 tilts the head towards the subject's right shoulder.
"""
from __future__ import annotations

import numpy as np

FRONTAL = np.diag([1.0, -1.0, -1.0])


def rodrigues(omega: np.ndarray) -> np.ndarray:
    """Axis-angle (3,) radians -> rotation (3, 3)."""
    omega = np.asarray(omega, dtype=np.float64)
    theta = np.linalg.norm(omega)
    if theta < 1e-12:
        k = skew(omega)
        return np.eye(3) + k
    k = skew(omega / theta)
    return np.eye(3) + np.sin(theta) * k + (1.0 - np.cos(theta)) * (k @ k)


def skew(v: np.ndarray) -> np.ndarray:
    """(3,) -> (3, 3) cross-product matrix."""
    return np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])


def rotation_to_axis_angle(R: np.ndarray) -> np.ndarray:
    """Rotation (3, 3) -> axis-angle (3,) radians."""
    cos = np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0)
    theta = np.arccos(cos)
    w = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    if theta < 1e-6:
        return w / 2.0
    if np.pi - theta < 1e-4:
        # near 180°: the axis from the symmetric part, its sign from the skew part
        S = (R + R.T) / 2.0
        i = int(np.argmax(np.diag(S)))
        axis = (S[:, i] + np.eye(3)[:, i]) / 2.0
        axis /= np.linalg.norm(axis)
        if axis @ w < 0:
            axis = -axis
        return axis * theta
    return w * theta / (2.0 * np.sin(theta))


def euler_yxz(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Ry(yaw) · Rx(pitch) · Rz(roll), radians."""
    cy, sy = np.cos(yaw), np.sin(yaw)
    cp, sp = np.cos(pitch), np.sin(pitch)
    cr, sr = np.cos(roll), np.sin(roll)
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    Rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return Ry @ Rx @ Rz


def yaw_pitch_roll(R_head: np.ndarray) -> np.ndarray:
    """Inverse of euler_yxz: (3, 3) -> (yaw, pitch, roll) radians."""
    pitch = np.arcsin(np.clip(-R_head[1, 2], -1.0, 1.0))
    yaw = np.arctan2(R_head[0, 2], R_head[2, 2])
    roll = np.arctan2(R_head[1, 0], R_head[1, 1])
    return np.array([yaw, pitch, roll])


def head_rotation(R_model_to_camera: np.ndarray) -> np.ndarray:
    """Model-to-camera rotation -> head rotation in the y-up frame."""
    return FRONTAL @ R_model_to_camera


def model_to_camera(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Head yaw/pitch/roll (radians) -> model-to-camera rotation R."""
    return FRONTAL @ euler_yxz(yaw, pitch, roll)


def project(points_cam: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(N, 3) camera-space points (z forward) -> (N, 2) pixels under pinhole K."""
    return np.stack([K[0, 0] * points_cam[:, 0] / points_cam[:, 2] + K[0, 2],
                     K[1, 1] * points_cam[:, 1] / points_cam[:, 2] + K[1, 2]], axis=1)


def default_camera_matrix(width: int, height: int, focal_px: float | None = None) -> np.ndarray:
    """Pinhole K for an uncalibrated camera: focal = max(width, height) px
    (about 53° across the larger side) unless given; principal point at the centre."""
    f = float(focal_px) if focal_px else float(max(width, height))
    return np.array([[f, 0.0, (width - 1) / 2.0], [0.0, f, (height - 1) / 2.0], [0.0, 0.0, 1.0]])
