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

#: MediaPipe eye contour points per eye: two corners, then the mid upper and lower lid.
EYE_LIDS = ((33, 133, 159, 145), (362, 263, 386, 374))
#: Lid aperture (gap / width) below which gaze fades out, and above which it is fully trusted.
CLOSED_APERTURE = 0.12
OPEN_APERTURE = 0.22

#: How far eyes turn in the head (yaw, pitch), radians: about 50° sideways, 40° up or down.
MAX_EYE_ROTATION = np.radians([50.0, 40.0])

#: Gaze angle at which an ARKit eyeLook value reaches 1 (radians).
FULL_LOOK_YAW = np.radians(30.0)
FULL_LOOK_PITCH = np.radians(25.0)


def sphere_centre(points: np.ndarray) -> np.ndarray:
    """Least-squares sphere centre (3,) of points (N, 3) on a sphere.

    |p|² = 2 p·c + (r² − |c|²) is linear in c. The sclera is a partial shell,
    so its mean lies in front of the eyeball's centre; the fit does not.
    """
    points = np.asarray(points, dtype=np.float64)
    A = np.c_[2.0 * points, np.ones(len(points))]
    return np.linalg.lstsq(A, (points ** 2).sum(axis=1), rcond=None)[0][:3]


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
        landmarks (IRIS_CENTRES order) sit on this mesh. Gaze at rest points from
        each eyeball centre through its iris landmark, so a face looking the way
        the model does reads as gaze 0."""
        # the subject's left eye has +x; order the iris landmarks to match
        left_first = iris_points_model[0, 0] > iris_points_model[1, 0]
        order = np.array(IRIS_CENTRES) if left_first else np.array(IRIS_CENTRES[::-1])
        iris = iris_points_model if left_first else iris_points_model[::-1]
        centres, radii, rests = [], [], []
        for side, p_iris in zip(("Left", "Right"), iris):
            c = sphere_centre(vertices[model.material_vertices("M_Sclera" + side)])
            centres.append(c)
            radii.append(np.linalg.norm(p_iris - c))  # the iris sits inside the sclera shell
            rests.append((p_iris - c) / np.linalg.norm(p_iris - c))
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
        # g = Ry(yaw) Rx(pitch) (0, 0, 1) = (sin yaw cos pitch, -sin pitch, cos yaw cos pitch)
        yaw = np.arctan2(g[0], g[2]) - np.arctan2(g0[0], g0[2])
        pitch = np.arcsin(np.clip(-g[1], -1, 1)) - np.arcsin(np.clip(-g0[1], -1, 1))
        out[i] = yaw, pitch
    # an iris near the eye corner, with the eyeball a millimetre off, can read beyond what eyes do
    return np.clip(out, -MAX_EYE_ROTATION, MAX_EYE_ROTATION)


def lid_aperture(landmarks_px: np.ndarray, iris_landmark: int) -> float:
    """Lid gap over eye width for the eye around an iris landmark (about 0.3 open, under 0.1 shut)."""
    iris = landmarks_px[iris_landmark, :2]
    lids = min(EYE_LIDS, key=lambda e: np.linalg.norm((landmarks_px[e[0], :2] + landmarks_px[e[1], :2]) / 2 - iris))
    c0, c1, up, down = (landmarks_px[j, :2] for j in lids)
    return float(np.linalg.norm(up - down) / max(np.linalg.norm(c0 - c1), 1e-6))


def gaze_visibility(aperture: float) -> float:
    """How far an eye's gaze can be trusted, 0..1: a closing lid drags MediaPipe's iris
    down with it, which would read as looking down; a shut eye has no gaze."""
    return float(np.clip((aperture - CLOSED_APERTURE) / (OPEN_APERTURE - CLOSED_APERTURE), 0.0, 1.0))


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


#: Lid aperture (gap / width) of an open eye before a take has shown its own, and of a shut eye.
DEFAULT_OPEN_APERTURE = 0.33
SHUT_APERTURE = 0.06


class LidClosure:
    """eyeBlink per eye from MediaPipe's lid aperture, against the performer's own open eye.

    The network reads closure off a 128 px crop and MediaPipe's landmarks; the lid gap is the
    direct measurement (a wink the network reads as 0.2 shows a gap a sixth of the open
    eye's). An eye's open aperture differs between people (0.3-0.45), so it is the median
    aperture over the take's first `frames` frames (eyes are open most of the time; blinks
    are short), re-estimated every `every` frames, then frozen; before `warm_up` frames
    DEFAULT_OPEN_APERTURE stands in. blink = (open - aperture) / (open - SHUT_APERTURE) in [0, 1].
    """

    def __init__(self, frames: int = 300, every: int = 15, warm_up: int = 15):
        self.frames, self.every, self.warm_up = frames, every, warm_up
        self._seen = np.zeros((frames, 2))
        self.count = 0
        self.open_aperture = np.full(2, DEFAULT_OPEN_APERTURE)

    def __call__(self, apertures: np.ndarray) -> np.ndarray:
        """(2,) lid apertures (subject's left, right eye) -> (2,) eyeBlink weights in [0, 1]."""
        a = np.asarray(apertures, np.float64)
        if self.count < self.frames and np.isfinite(a).all():
            self._seen[self.count] = a
            self.count += 1
            if self.count >= self.warm_up and (self.count % self.every == 0 or self.count == self.frames):
                self.open_aperture = np.maximum(np.median(self._seen[:self.count], axis=0), 2 * SHUT_APERTURE)
        return np.clip((self.open_aperture - a) / (self.open_aperture - SHUT_APERTURE), 0.0, 1.0)
