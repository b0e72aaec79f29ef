"""Where MediaPipe's 478 landmarks sit on the face model's surface.

Each landmark is a point on one triangle of the model (triangle id and
barycentrics), derived by the project itself from renders of the model
(`python -m trainers.correspondence`), plus the spread of the detections,
which the fitter turns into per-landmark weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_CORRESPONDENCE_PATH = Path(__file__).resolve().parent / "assets" / "mediapipe_correspondence.npz"


@dataclass(frozen=True)
class LandmarkCorrespondence:
    """triangle (478,) int32 model triangle ids; barycentric (478, 3) float32;
    spread_cm (478,) median distance of the per-render detections from the chosen point."""

    triangle: np.ndarray
    barycentric: np.ndarray
    spread_cm: np.ndarray
    n_views: int = 0

    @classmethod
    def load(cls, path: str | Path | None = None) -> "LandmarkCorrespondence":
        path = Path(path) if path else DEFAULT_CORRESPONDENCE_PATH
        if not path.is_file():
            raise FileNotFoundError(f"landmark correspondence not found: {path} (make it with 'python -m trainers.correspondence')")
        with np.load(path) as d:
            return cls(d["triangle"], d["barycentric"], d["spread_cm"], int(d["n_views"]))

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, triangle=self.triangle, barycentric=self.barycentric,
                 spread_cm=self.spread_cm, n_views=np.int64(self.n_views))

    def corner_vertices(self, triangles: np.ndarray) -> np.ndarray:
        """(478, 3) the vertex ids of each landmark's triangle corners."""
        return triangles[self.triangle]
