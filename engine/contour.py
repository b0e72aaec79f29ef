"""The 68 iBUG landmarks of a fitted mesh, with the jaw line on the silhouette.

Where the points sit on the face: `engine/assets/landmarks68.npz` holds per
point a surface location (model triangle + barycentrics), derived by
`python -m trainers.landmarks68` from photos with points in the iBUG 300-W
convention (the model's own 68 landmark vertices are not where iBUG annotators
put them). Without the asset the model's own vertices are used.

iBUG annotators put the 17 jaw points on the face's visible outline. On a head
turned away from the camera that outline is not a fixed set of surface points:
it slides forward over the cheek. Each jaw point therefore has a band of
candidate vertices at its height, from its own location forwards; the
candidate that projects outermost in the picture is the silhouette point. On
the near side and in frontal views this is often the point's own location.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.facemodel import FACE_VERTICES, FaceModel
from engine.fitting import LandmarkBasis
from engine.pose import project

DEFAULT_LANDMARKS68_PATH = Path(__file__).resolve().parent / "assets" / "landmarks68.npz"

JAW_POINTS = range(0, 17)
CHIN = 8


def _mirror68() -> np.ndarray:
    pairs = [(i, 16 - i) for i in range(8)]                     # jaw
    pairs += [(17 + i, 26 - i) for i in range(5)]               # brows
    pairs += [(31, 35), (32, 34)]                               # nostrils
    pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
    pairs += [(48, 54), (49, 53), (50, 52), (59, 55), (58, 56)]            # outer lips
    pairs += [(60, 64), (61, 63), (67, 65)]                                # inner lips
    m = np.arange(68)
    for a, b in pairs:
        m[a], m[b] = b, a
    return m


#: Each iBUG point's left/right mirror partner (itself on the midline).
MIRROR68 = _mirror68()

#: Point groups for reports.
GROUPS68 = {"jaw": range(0, 17), "brows": range(17, 27), "nose": range(27, 36),
            "eyes": range(36, 48), "mouth": range(48, 68)}


@dataclass(frozen=True)
class SurfacePoints:
    """68 points on the model's surface: triangle (68,) ids, barycentric (68, 3)."""

    triangle: np.ndarray
    barycentric: np.ndarray

    @classmethod
    def load(cls, path: str | Path | None = None) -> "SurfacePoints":
        with np.load(Path(path) if path else DEFAULT_LANDMARKS68_PATH) as d:
            return cls(d["triangle"].astype(np.int64), d["barycentric"].astype(np.float64))

    @classmethod
    def from_vertices(cls, model: FaceModel, vertex_ids: np.ndarray | None = None) -> "SurfacePoints":
        """Each vertex as a corner of one of its triangles (default: the model's 68 landmark vertices)."""
        vid = model.landmark68_vertices if vertex_ids is None else np.asarray(vertex_ids)
        tri = np.empty(len(vid), np.int64)
        bary = np.zeros((len(vid), 3))
        for n, v in enumerate(vid):
            t, corner = np.argwhere(model.triangles == v)[0]
            tri[n], bary[n, corner] = t, 1.0
        return cls(tri, bary)

    def save(self, path: str | Path, **extra) -> None:
        np.savez(path, triangle=self.triangle.astype(np.int32), barycentric=self.barycentric.astype(np.float32),
                 **extra)

    def on(self, model: FaceModel, vertices: np.ndarray) -> np.ndarray:
        """(68, 3) the points on a mesh with the model's topology, vertices (V, 3)."""
        corners = model.triangles[self.triangle]
        return np.einsum("nij,ni->nj", vertices[corners].astype(np.float64), self.barycentric)


def default_surface_points(model: FaceModel) -> SurfacePoints:
    """The derived asset when present, else the model's own landmark vertices."""
    if DEFAULT_LANDMARKS68_PATH.is_file():
        return SurfacePoints.load(DEFAULT_LANDMARKS68_PATH)
    return SurfacePoints.from_vertices(model)


def jaw_candidates(model: FaceModel, points: SurfacePoints | None = None,
                   band_cm: float = 0.35) -> list[np.ndarray]:
    """Per jaw point, the face vertices at its height (±band_cm), on its side, not behind it
    (the point itself, a surface location, is the first candidate of each band and not listed)."""
    points = default_surface_points(model) if points is None else points
    rest = model.neutral
    base = points.on(model, rest)
    face = np.arange(FACE_VERTICES.stop)
    out = []
    for j in JAW_POINTS:
        x, y, z = base[j]
        if j == CHIN:
            out.append(np.zeros(0, np.int64))
            continue
        out.append(face[(np.abs(rest[face, 1] - y) < band_cm) & (np.sign(rest[face, 0]) == np.sign(x))
                        & (np.abs(rest[face, 0]) > 1.0) & (rest[face, 2] >= z)])
    return out


class Landmarks68:
    """Projects a fitted face's 68 landmarks; the jaw follows the silhouette.

    points: the 68 surface locations (default: engine/assets/landmarks68.npz)."""

    def __init__(self, model: FaceModel, n_identity: int = 60, points: SurfacePoints | None = None):
        self.points = default_surface_points(model) if points is None else points
        cands = jaw_candidates(model, self.points)
        self._owner = np.concatenate([np.full(len(c), j) for j, c in zip(JAW_POINTS, cands)]).astype(np.int64)
        # one basis: the 68 surface points, then every jaw candidate vertex
        corners = np.concatenate([model.triangles[self.points.triangle],
                                  np.repeat(np.concatenate(cands)[:, None], 3, axis=1)])
        weights = np.concatenate([self.points.barycentric, np.tile([1.0, 0.0, 0.0], (len(self._owner), 1))])

        def at(arr):  # (..., V, 3) -> (..., N, 3)
            return np.einsum("...nij,ni->...nj", arr[..., corners, :].astype(np.float64), weights)

        self._basis = LandmarkBasis(mean=at(model.neutral), identity=at(model.identity_modes[:n_identity]),
                                    expression=at(model.expression_modes), weight=np.ones(len(weights)))
        self._side = np.sign(self.points.on(model, model.neutral)[list(JAW_POINTS), 0])
        self._groups = [np.flatnonzero(self._owner == j) for j in JAW_POINTS]

    def model_points(self, identity: np.ndarray, expression: np.ndarray) -> np.ndarray:
        """(68 + candidates, 3) model-space points: the 68 surface points, then the jaw candidates."""
        return self._basis.points(identity, expression)

    def project(self, identity: np.ndarray, expression: np.ndarray, R: np.ndarray, t: np.ndarray,
                K: np.ndarray) -> np.ndarray:
        """(68, 2) pixels for a face posed by R, t (model to camera) under camera K."""
        px = project(self.model_points(identity, expression) @ R.T + t, K)
        return self.silhouette(px, R, t, K)

    def silhouette(self, px: np.ndarray, R: np.ndarray, t: np.ndarray, K: np.ndarray) -> np.ndarray:
        """(68, 2): projected model_points px with each jaw point moved to the outermost of its
        own location and its band's candidates."""
        out, jaw = px[:68].copy(), px[68:]
        centre = project(t[None], K)[0]
        side_axis = project((R[:, 0] + t)[None], K)[0] - centre
        side_axis /= max(np.linalg.norm(side_axis), 1e-9)
        for j, mine in zip(JAW_POINTS, self._groups):
            if j == CHIN or len(mine) == 0:
                continue
            own = (out[j] @ side_axis) * self._side[j]
            outward = (jaw[mine] @ side_axis) * self._side[j]
            k = np.argmax(outward)
            if outward[k] > own:
                out[j] = jaw[mine[k]]
        return out
