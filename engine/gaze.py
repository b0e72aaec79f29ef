"""Eye gaze from MediaPipe's iris centres and the fitted head pose.

The face model's eyeballs are rigid (its eyeLook shapes only move the lids),
so gaze is solved apart from the landmark fit: the iris centre's viewing ray
is intersected with the eyeball sphere, and the direction from the eyeball
centre to that point, in head coordinates, gives yaw and pitch. The ARKit
eyeLook values follow from the angles, and the fit pins the model's eyeLook
lid shapes to them.

Angles are radians in the head frame of engine.pose: yaw > 0 looks towards
the subject's left, pitch > 0 looks down.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.facemodel import FaceModel

#: MediaPipe's iris centre landmarks; which eye each is comes from the correspondence.
IRIS_CENTRES = (468, 473)
IRIS_LANDMARKS = tuple(range(468, 478))

#: Gaze angle at which an ARKit eyeLook value reaches 1 (radians).
FULL_LOOK_YAW = np.radians(30.0)
FULL_LOOK_PITCH = np.radians(25.0)


@dataclass(frozen=True)
class EyeModel:
    """centre_cm (2, 3) eyeball centres (subject's left, right) in model space,
    radius_cm (2,), rest_direction (2, 3) unit gaze at rest, iris_landmark (2,) the
    MediaPipe index of each eye's iris centre."""

    centre_cm: np.ndarray
    radius_cm: np.ndarray
    rest_direction: np.ndarray
    iris_landmark: np.ndarray

    @classmethod
    def from_model(cls, model: FaceModel, vertices: np.ndarray, iris_points_model: np.ndarray) -> "EyeModel":
        """Eyeballs of a mesh (V, 3); iris_points_model (2, 3) where the two iris
        landmarks (IRIS_CENTRES order) sit on the rest mesh, to tell left from right."""
        centres, radii, rests = [], [], []
        for side in ("Left", "Right"):
            sclera = np.unique(model.triangles[model.triangle_material == model.materials.index("M_Sclera" + side)])
            p = vertices[sclera]
            c = p.mean(axis=0)
            front = p[np.argmax(p[:, 2])] - c
            centres.append(c)
            radii.append(np.linalg.norm(p - c, axis=1).mean())
            rests.append(front / np.linalg.norm(front))
        # the subject's left eye has +x; order the iris landmarks to match
        order = np.array(IRIS_CENTRES) if iris_points_model[0, 0] > iris_points_model[1, 0] else np.array(IRIS_CENTRES[::-1])
        return cls(np.array(centres), np.array(radii), np.array(rests), order)


def gaze_angles(eyes: EyeModel, landmarks_px: np.ndarray, R: np.ndarray, t: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(2, 2) [yaw, pitch] radians per eye (left, right) from the iris centres."""
    Kinv = np.linalg.inv(K)
    out = np.zeros((2, 2))
    for i in range(2):
        u, v = landmarks_px[eyes.iris_landmark[i], :2]
        d = Kinv @ np.array([u, v, 1.0])
        d /= np.linalg.norm(d)
        c = R @ eyes.centre_cm[i] + t
        r = eyes.radius_cm[i]
        b = d @ c
        disc = b * b - (c @ c - r * r)
        s = b - np.sqrt(disc) if disc > 0 else b  # nearest hit, or the ray's closest approach
        g = R.T @ (s * d - c)
        g /= np.linalg.norm(g)
        g0 = eyes.rest_direction[i]
        yaw = np.arctan2(g[0], g[2]) - np.arctan2(g0[0], g0[2])
        pitch = np.arctan2(-g[1], g[2]) - np.arctan2(-g0[1], g0[2])
        out[i] = yaw, pitch
    return out


def eye_look_weights(angles: np.ndarray) -> dict[str, float]:
    """Gaze angles (2, 2) -> the model's eight eyeLook weights in [0, 1].

    Looking towards the subject's left is 'out' for the left eye and 'in' for the right.
    """
    (yl, pl), (yr, pr) = angles
    h = lambda a: float(np.clip(a / FULL_LOOK_YAW, 0.0, 1.0))
    v = lambda a: float(np.clip(a / FULL_LOOK_PITCH, 0.0, 1.0))
    return {
        "eyeLookOut_L": h(yl), "eyeLookIn_L": h(-yl), "eyeLookDown_L": v(pl), "eyeLookUp_L": v(-pl),
        "eyeLookOut_R": h(-yr), "eyeLookIn_R": h(yr), "eyeLookDown_R": v(pr), "eyeLookUp_R": v(-pr),
    }
