"""The linear face model: vertices = neutral + identity modes · α_id + expression shapes · α_exp.

The model is the ICT Face Model Light as one .npz (see ../shared/facemodel/README.md).
Units are centimetres; the head looks down +z, +y is up, +x is the subject's left.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.arkit import arkit_mapping_matrix

ENV_FACE_MODEL = "CAPTURE_FACE_MODEL"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FACE_MODEL = REPO_ROOT.parent / "shared" / "facemodel" / "ict_face_model_light.npz"

#: Vertex index ranges of the upstream model (end exclusive).
FACE_VERTICES = range(0, 9409)
NARROW_FACE_VERTICES = range(0, 6706)


class FaceModelError(RuntimeError):
    """The face model file is missing or malformed."""


def resolve_face_model_path(path: str | os.PathLike | None = None) -> Path:
    """An explicit path, else $CAPTURE_FACE_MODEL, else ../shared beside the repository."""
    if path is None:
        path = os.environ.get(ENV_FACE_MODEL) or DEFAULT_FACE_MODEL
    path = Path(path).expanduser()
    if not path.is_file():
        raise FaceModelError(
            f"face model not found at {path}: pass --face-model PATH, set ${ENV_FACE_MODEL}, "
            "or build it with 'capture model import FACEXMODEL_DIR'"
        )
    return path


@dataclass(frozen=True)
class FaceModel:
    """The morphable model's arrays; shapes are documented per field.

    neutral (V, 3) cm, triangles (T, 3), identity_modes (K, V, 3) cm per unit
    weight (weights ~ N(0, 1)), expression_modes (M, V, 3) cm per unit weight
    (weights in [0, 1]).
    """

    neutral: np.ndarray
    triangles: np.ndarray
    identity_modes: np.ndarray
    expression_modes: np.ndarray
    expression_names: tuple[str, ...]
    landmark68_vertices: np.ndarray
    triangle_material: np.ndarray
    materials: tuple[str, ...]
    uv: np.ndarray
    triangle_uv: np.ndarray

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "FaceModel":
        path = resolve_face_model_path(path)
        try:
            with np.load(path, allow_pickle=False) as d:
                indices = json.loads(str(d["vertex_indices_json"]))
                model = cls(
                    neutral=d["neutral"].astype(np.float32),
                    triangles=d["triangles"].astype(np.int32),
                    identity_modes=d["identity_modes"].astype(np.float32),
                    expression_modes=d["expression_modes"].astype(np.float32),
                    expression_names=tuple(str(n) for n in d["expression_names"]),
                    landmark68_vertices=np.asarray(indices["idx_to_landmark_verts"], dtype=np.int64),
                    triangle_material=d["triangle_material"].astype(np.int16),
                    materials=tuple(str(m) for m in d["materials"]),
                    uv=d["uv"].astype(np.float32),
                    triangle_uv=d["triangle_uv"].astype(np.int32),
                )
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
            raise FaceModelError(f"face model {path} is not a valid model archive: {exc}") from exc
        model._check()
        return model

    def _check(self) -> None:
        V = self.neutral.shape[0]
        if self.identity_modes.shape[1:] != (V, 3) or self.expression_modes.shape[1:] != (V, 3):
            raise FaceModelError("face model modes do not match the neutral mesh")
        if self.triangles.max() >= V or self.landmark68_vertices.max() >= V:
            raise FaceModelError("face model indices point past the vertex array")
        if len(self.expression_names) != self.expression_modes.shape[0]:
            raise FaceModelError("face model expression names do not match its shapes")

    @property
    def n_vertices(self) -> int:
        return self.neutral.shape[0]

    @property
    def n_identity(self) -> int:
        return self.identity_modes.shape[0]

    @property
    def n_expression(self) -> int:
        return self.expression_modes.shape[0]

    def material_mask(self, *names: str) -> np.ndarray:
        """(T,) True for the triangles of the named materials (e.g. "M_ScleraLeft")."""
        return np.isin(self.triangle_material, [self.materials.index(n) for n in names])

    def material_vertices(self, *names: str) -> np.ndarray:
        """Sorted ids of the vertices of the named materials' triangles."""
        return np.unique(self.triangles[self.material_mask(*names)])

    def arkit_mapping(self) -> np.ndarray:
        """(52, M) matrix from model expression weights to ARKit values."""
        return arkit_mapping_matrix(self.expression_names)

    def vertices(self, identity: np.ndarray | None = None, expression: np.ndarray | None = None) -> np.ndarray:
        """(V, 3) cm model-space vertices; identity (K',) with K' ≤ K, expression (M,)."""
        return model_vertices(self.neutral, self.identity_modes, self.expression_modes, identity, expression)

    def torch_arrays(self, device=None, dtype=None) -> dict:
        """The model's arrays as torch tensors, for `model_vertices_torch`."""
        import torch

        dtype = dtype or torch.float32
        return {
            "neutral": torch.as_tensor(self.neutral, device=device, dtype=dtype),
            "identity_modes": torch.as_tensor(self.identity_modes, device=device, dtype=dtype),
            "expression_modes": torch.as_tensor(self.expression_modes, device=device, dtype=dtype),
        }


def model_vertices(neutral, identity_modes, expression_modes, identity=None, expression=None) -> np.ndarray:
    """neutral (V, 3) + Σ identity[k] identity_modes[k] + Σ expression[m] expression_modes[m]."""
    v = neutral.copy()
    if identity is not None and len(identity):
        k = len(identity)
        v += np.tensordot(np.asarray(identity, np.float32), identity_modes[:k], axes=1)
    if expression is not None:
        v += np.tensordot(np.asarray(expression, np.float32), expression_modes, axes=1)
    return v


def model_vertices_torch(neutral, identity_modes, expression_modes, identity, expression):
    """Batched torch version: identity (B, K'), expression (B, M) -> (B, V, 3)."""
    import torch

    k = identity.shape[-1]
    v = neutral.unsqueeze(0)
    v = v + torch.einsum("bk,kvc->bvc", identity, identity_modes[:k])
    v = v + torch.einsum("bm,mvc->bvc", expression, expression_modes)
    return v


def barycentric_points(vertices: np.ndarray, triangles: np.ndarray, tri_ids: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """Surface points (..., N, 3) from (..., V, 3) vertices, triangle ids (N,) and barycentrics (N, 3)."""
    corners = vertices[..., triangles[tri_ids], :]  # (..., N, 3 corners, 3)
    return np.einsum("...nij,ni->...nj", corners, bary)
