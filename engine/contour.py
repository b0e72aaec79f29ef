"""The 68 iBUG landmarks of a fitted mesh, with the jaw line on the silhouette.

iBUG annotators put the 17 jaw points on the face's visible outline. On a head
turned away from the camera that outline is not a fixed set of vertices: it
slides forward over the cheek. Each jaw point therefore has a band of
candidate vertices at its height, from its own vertex forwards; the candidate
that projects outermost in the picture is the silhouette point. On the near
side and in frontal views this is the model's own landmark vertex.
"""
from __future__ import annotations

import numpy as np

from engine.facemodel import FACE_VERTICES, FaceModel
from engine.fitting import LandmarkBasis
from engine.pose import project

JAW_POINTS = range(0, 17)
CHIN = 8


def jaw_candidates(model: FaceModel, band_cm: float = 0.35) -> list[np.ndarray]:
    """Per jaw point, the face vertices at its height (±band_cm), on its side, not behind it.
    The point's own vertex comes first."""
    rest = model.neutral
    face = np.arange(FACE_VERTICES.stop)
    out = []
    for j in JAW_POINTS:
        v = model.landmark68_vertices[j]
        x, y, z = rest[v]
        if j == CHIN:
            out.append(np.array([v]))
            continue
        near = face[(np.abs(rest[face, 1] - y) < band_cm) & (np.sign(rest[face, 0]) == np.sign(x))
                    & (np.abs(rest[face, 0]) > 1.0) & (rest[face, 2] >= z)]
        out.append(np.concatenate([[v], near[near != v]]))
    return out


class Landmarks68:
    """Projects a fitted face's 68 landmarks; the jaw follows the silhouette."""

    def __init__(self, model: FaceModel, n_identity: int = 60):
        cands = jaw_candidates(model)
        self._owner = np.concatenate([np.full(len(c), j) for j, c in zip(JAW_POINTS, cands)])
        # one basis: the 68 landmark vertices, then every jaw candidate
        self._basis = LandmarkBasis.from_vertices(
            model, np.concatenate([model.landmark68_vertices, np.concatenate(cands)]), n_identity)
        self._side = np.sign(model.neutral[model.landmark68_vertices[list(JAW_POINTS)], 0])
        self._groups = [np.flatnonzero(self._owner == j) for j in JAW_POINTS]

    def project(self, identity: np.ndarray, expression: np.ndarray, R: np.ndarray, t: np.ndarray,
                K: np.ndarray) -> np.ndarray:
        """(68, 2) pixels for a face posed by R, t (model to camera) under camera K."""
        px = project(self._basis.points(identity, expression) @ R.T + t, K)
        out, jaw = px[:68], px[68:]
        centre = project(t[None], K)[0]
        side_axis = project((R[:, 0] + t)[None], K)[0] - centre
        side_axis /= max(np.linalg.norm(side_axis), 1e-9)
        outward = (jaw @ side_axis) * self._side[self._owner]
        for j, mine in zip(JAW_POINTS, self._groups):
            if j != CHIN:
                out[j] = jaw[mine[np.argmax(outward[mine])]]
        return out
