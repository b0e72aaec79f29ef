"""Supervised CoarseNet losses on synthetic samples (exact labels from trainers.synthesis).

Each term is a plain function of batched tensors with the shapes in its docstring and
returns a scalar averaged over the batch. `coarse_loss` builds the weighted sum from a
decoded prediction (engine.coarsenet.decode) and a batch of sample fields.

Geometry terms go through the face model itself (model_vertices_torch), so the net is
judged on the mesh it produces, not only on parameter distances whose scales differ
(an identity mode's std is not worth the same millimetres as an expression shape).
For speed they use `LossGeometry`: a fixed subsample of the FACE region vertices plus
the triangle corners of the 478 landmark points, with the model's arrays restricted to them.

Not here yet (seed 002's self-supervised terms on real frames): the photometric term
through engine.shading, E_flow and E_same. They need real video and the differentiable
renderer in the loop and come with the real-frame trainer.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from engine.coarsenet import CoarseNetConfig, crop_params_from_translation
from engine.correspondence import LandmarkCorrespondence
from engine.facemodel import FACE_VERTICES, FaceModel, model_vertices_torch
from engine.gaze import IRIS_LANDMARKS

#: Vertices of the FACE region used by the vertex loss (a fixed subsample, seed 0): 2000 of 9409
#: gives the mean distance within ~1% of the full region at a fifth of the cost.
N_LOSS_VERTICES = 2000

#: Default term weights: each term in its natural unit (radians, mm, px, weights), scaled so
#: that typical errors of a half-trained net contribute comparable amounts.
DEFAULT_WEIGHTS = {
    "expression": 1.0,      # expression_loss (l1: MAE; l2: MSE), expression weight units ([0, 1])
    "identity": 0.1,        # smooth-L1, prior-std units
    "rotation": 1.0,        # geodesic, rad
    "crop": 1.0,            # L1 on crop_xy (crop half-widths) + log_scale
    "vertex": 0.1,          # mean Euclidean distance, mm
    "landmark": 0.02,       # mean reprojection distance, crop px
    "sh": 0.1,              # L1 on the (9, 3) SH coefficients
    "albedo": 1.0,          # L1 on linear RGB skin albedo
}

#: Non-weight loss options (config [loss] keys that are not term weights) and their defaults.
#: expression_loss: "l1" (optimum under label uncertainty: the per-weight median) or "l2"
#: (squared error; optimum: the mean). The 53 expression weights are sparse (median ~0), so
#: under L1 a net that cannot yet tell an expression apart collapses to predicting ~0.
DEFAULT_OPTIONS = {"expression_loss": "l1"}
EXPRESSION_LOSSES = ("l1", "l2")


class LossGeometry:
    """The face model restricted to the vertices the losses need, as torch tensors.

    vertex_ids (N,) FACE-region subsample; the landmark points are barycentric mixes of
    `corner` (478, 3) rows of the restricted vertex array with `barycentric` (478, 3).
    Iris landmarks are left out of `landmark_mask`: synthesis turns the eyeballs with the
    gaze, which the model's expression shapes alone do not reproduce.
    """

    def __init__(self, model: FaceModel, correspondence: LandmarkCorrespondence,
                 n_vertices: int = N_LOSS_VERTICES, seed: int = 0, dtype=torch.float32):
        face = np.arange(FACE_VERTICES.start, FACE_VERTICES.stop)
        rng = np.random.default_rng(seed)
        self.vertex_ids = np.sort(rng.choice(face, size=min(n_vertices, len(face)), replace=False))
        corners = model.triangles[correspondence.triangle]                    # (478, 3) vertex ids
        ids = np.concatenate([self.vertex_ids, corners.reshape(-1)])
        self.n_sample = len(self.vertex_ids)
        self.neutral = torch.as_tensor(model.neutral[ids], dtype=dtype)                   # (N', 3) cm
        self.identity_modes = torch.as_tensor(model.identity_modes[:, ids], dtype=dtype)  # (K, N', 3)
        self.expression_modes = torch.as_tensor(model.expression_modes[:, ids], dtype=dtype)
        self.corner = torch.arange(self.n_sample, len(ids)).reshape(-1, 3)               # (478, 3)
        self.barycentric = torch.as_tensor(correspondence.barycentric, dtype=dtype)      # (478, 3)
        mask = torch.ones(len(corners), dtype=torch.bool)
        mask[list(IRIS_LANDMARKS)] = False
        self.landmark_mask = mask                                                         # (478,)

    def to(self, device) -> "LossGeometry":
        """The same geometry with its tensors on device (torch's; e.g. "cuda" for training there)."""
        for name in ("neutral", "identity_modes", "expression_modes", "corner", "barycentric", "landmark_mask"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def camera_points(self, identity: torch.Tensor, expression: torch.Tensor, rotation: torch.Tensor,
                      translation_cm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """identity (B, K'), expression (B, M), R (B, 3, 3), t (B, 3) cm ->
        (vertices (B, N, 3), landmark points (B, 478, 3)), both camera space, cm."""
        v = model_vertices_torch(self.neutral, self.identity_modes, self.expression_modes, identity, expression)
        v = torch.einsum("bij,bnj->bni", rotation, v) + translation_cm.unsqueeze(1)
        corners = v[:, self.corner]                                                       # (B, 478, 3, 3)
        points = torch.einsum("blcj,lc->blj", corners, self.barycentric)
        return v[:, :self.n_sample], points


# ---------------------------------------------------------------- terms


def expression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Between (B, M) expression weights in [0, 1]: kind "l1" is the mean absolute error itself,
    "l2" the mean squared error."""
    if kind == "l1":
        return (pred - target).abs().mean()
    if kind == "l2":
        return ((pred - target) ** 2).mean()
    raise ValueError(f"unknown expression loss {kind!r} (one of {EXPRESSION_LOSSES})")


def identity_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 (beta 1) between (B, K) identity weights in prior-std units; robust to the tails."""
    return F.smooth_l1_loss(pred, target[:, :pred.shape[1]], beta=1.0)


def rotation_angle(R_pred: torch.Tensor, R_true: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(B,) geodesic angle in radians between (B, 3, 3) rotations, via atan2 (finite gradient at 0)."""
    M = R_pred.transpose(-1, -2) @ R_true
    cos = (M[..., 0, 0] + M[..., 1, 1] + M[..., 2, 2] - 1.0) / 2.0
    w = torch.stack([M[..., 2, 1] - M[..., 1, 2], M[..., 0, 2] - M[..., 2, 0], M[..., 1, 0] - M[..., 0, 1]], -1)
    sin = torch.sqrt((w * w).sum(-1) / 4.0 + eps)
    return torch.atan2(sin, cos)


def rotation_loss(R_pred: torch.Tensor, R_true: torch.Tensor) -> torch.Tensor:
    """Mean geodesic angle (rad) between (B, 3, 3) rotations."""
    return rotation_angle(R_pred, R_true).mean()


def crop_translation_loss(crop_xy: torch.Tensor, log_scale: torch.Tensor, translation_cm: torch.Tensor,
                          rotation: torch.Tensor, K_crop: torch.Tensor, config: CoarseNetConfig) -> torch.Tensor:
    """L1 on what the net predicts for position: crop_xy (B, 2) and log_scale (B, 1) against the
    targets from the true t (B, 3) cm, R (B, 3, 3) and K_crop (B, 3, 3). Both are O(1) and
    depth-independent, unlike t in cm, whose z error grows with distance."""
    with torch.no_grad():
        xy_true, ls_true = crop_params_from_translation(translation_cm, rotation, K_crop, config)
    return (crop_xy - xy_true).abs().sum(-1).mean() + (log_scale - ls_true).abs().mean()


def vertex_loss_mm(vertices_pred_cm: torch.Tensor, vertices_true_cm: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance in mm between (B, N, 3) camera-space vertices given in cm."""
    d2 = ((vertices_pred_cm - vertices_true_cm) ** 2).sum(-1)
    return 10.0 * torch.sqrt(d2 + 1e-12).mean()


def project_points(points_cam: torch.Tensor, K: torch.Tensor, min_depth_cm: float = 1.0) -> torch.Tensor:
    """(B, L, 3) camera-space cm, K (B, 3, 3) px -> (B, L, 2) px; depth clamped so a wild
    prediction behind the camera cannot divide by zero."""
    p = torch.einsum("bij,blj->bli", K, points_cam)
    return p[..., :2] / p[..., 2:3].clamp_min(min_depth_cm)


def landmark_loss_px(points_cam: torch.Tensor, K_crop: torch.Tensor, landmarks_px: torch.Tensor,
                     visible: torch.Tensor) -> torch.Tensor:
    """Mean reprojection distance (crop px) of (B, L, 3) predicted surface points against the
    (B, L, 2) labelled landmarks over the (B, L) bool `visible` ones (0 when none are)."""
    d = torch.sqrt(((project_points(points_cam, K_crop) - landmarks_px) ** 2).sum(-1) + 1e-12)
    w = visible.to(d.dtype)
    return (d * w).sum() / w.sum().clamp_min(1.0)


def sh_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between (B, 9, 3) SH irradiance coefficients (engine.shading's order, camera frame)."""
    return (pred - target).abs().mean()


def albedo_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between (B, 3) linear-RGB skin albedos in [0, 1]."""
    return (pred - target).abs().mean()


# ---------------------------------------------------------------- the weighted sum


def coarse_loss(pred: dict, batch: dict, geometry: LossGeometry, config: CoarseNetConfig,
                weights: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the supervised terms and the terms themselves (detached).

    pred: engine.coarsenet.decode output with translation (decode was given K_crop); the terms read
    the unclamped expression_linear, so a weight below 0 or above 1 still gets a gradient.
    batch: tensors identity (B, 60), expression (B, 53), rotation (B, 3, 3), translation_cm (B, 3),
    K_crop (B, 3, 3), landmarks (B, 478, 2) crop px, landmark_visible (B, 478) bool,
    sh (B, 9, 3), skin_rgb (B, 3). A term whose weight is 0 is skipped.
    `weights` may also hold the DEFAULT_OPTIONS keys (expression_loss).
    """
    w = {**DEFAULT_WEIGHTS, **DEFAULT_OPTIONS, **(weights or {})}
    terms: dict[str, torch.Tensor] = {}
    expression = pred.get("expression_linear", pred["expression"])
    if w["expression"]:
        terms["expression"] = expression_loss(expression, batch["expression"], w["expression_loss"])
    if w["identity"]:
        terms["identity"] = identity_loss(pred["identity"], batch["identity"])
    if w["rotation"]:
        terms["rotation"] = rotation_loss(pred["rotation"], batch["rotation"])
    if w["crop"]:
        terms["crop"] = crop_translation_loss(pred["crop_xy"], pred["log_scale"], batch["translation_cm"],
                                              batch["rotation"], batch["K_crop"], config)
    if w["vertex"] or w["landmark"]:
        n_id = pred["identity"].shape[1]
        v_pred, lm_pred = geometry.camera_points(pred["identity"], expression, pred["rotation"],
                                                 pred["translation"])
        with torch.no_grad():
            v_true, _ = geometry.camera_points(batch["identity"][:, :n_id], batch["expression"],
                                               batch["rotation"], batch["translation_cm"])
        if w["vertex"]:
            terms["vertex"] = vertex_loss_mm(v_pred, v_true)
        if w["landmark"]:
            visible = batch["landmark_visible"] & geometry.landmark_mask
            terms["landmark"] = landmark_loss_px(lm_pred, batch["K_crop"], batch["landmarks"], visible)
    if w["sh"]:
        terms["sh"] = sh_loss(pred["sh"], batch["sh"])
    if w["albedo"]:
        terms["albedo"] = albedo_loss(pred["albedo"], batch["skin_rgb"])
    total = sum(w[k] * v for k, v in terms.items())
    return total, {k: v.detach() for k, v in terms.items()}
