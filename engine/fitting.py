"""Fit head pose, expression and identity to 2D landmarks (E_lan + E_reg of seed 002).

Per frame a few Gauss-Newton steps solve for the head rotation, translation
and the expression weights (bounded to [0, 1]) given the landmarks. Identity
is shared by the whole take: a running estimate over the first frames with a
face, then one joint solve of the identity with all those frames' poses and
expressions, after which it is locked.

Residuals are measured in centimetres at the face (pixels divided by the
focal length over depth), so the priors mean the same at any image size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numba
import numpy as np
from scipy.linalg.blas import dsyrk

from engine.correspondence import LandmarkCorrespondence
from engine.facemodel import FaceModel
from engine.pose import FRONTAL, project, rodrigues

if TYPE_CHECKING:
    from engine.landmark_expression import LandmarkExpression


@dataclass(frozen=True)
class LandmarkBasis:
    """The face model restricted to N landmark points.

    mean (N, 3) cm, identity (K, N, 3) cm per unit weight, expression (M, N, 3),
    weight (N,) relative reliability of each landmark.
    """

    mean: np.ndarray
    identity: np.ndarray
    expression: np.ndarray
    weight: np.ndarray

    weight2: np.ndarray = field(init=False, repr=False)
    expression_xyz: np.ndarray = field(init=False, repr=False)
    identity_xyz: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        for name in ("mean", "identity", "expression", "weight"):
            object.__setattr__(self, name, np.ascontiguousarray(getattr(self, name), dtype=np.float64))
        object.__setattr__(self, "weight2", np.tile(self.weight, 2))  # per residual: all u, then all v
        # coordinate-major copies (3, M, N) and (3, K, N) make the Jacobians a few fused multiplies
        object.__setattr__(self, "expression_xyz", np.ascontiguousarray(np.moveaxis(self.expression, 2, 0)))
        object.__setattr__(self, "identity_xyz", np.ascontiguousarray(np.moveaxis(self.identity, 2, 0)))

    @classmethod
    def from_correspondence(cls, model: FaceModel, corr: LandmarkCorrespondence,
                            n_identity: int = 60, floor_cm: float = 0.15, exclude=()) -> "LandmarkBasis":
        """Landmark weights follow the spread of the derivation; `exclude` lists
        landmarks that take no part in the fit (weight 0)."""
        corners = model.triangles[corr.triangle]  # (N, 3)
        b = corr.barycentric.astype(np.float64)

        def at(points):  # (..., V, 3) -> (..., N, 3)
            return np.einsum("...nij,ni->...nj", points[..., corners, :], b)

        weight = 1.0 / np.sqrt(corr.spread_cm.astype(np.float64) ** 2 + floor_cm ** 2)
        weight[list(exclude)] = 0.0
        return cls(mean=at(model.neutral.astype(np.float64)),
                   identity=at(model.identity_modes[:n_identity].astype(np.float64)),
                   expression=at(model.expression_modes.astype(np.float64)),
                   weight=weight / weight.mean())

    @classmethod
    def from_vertices(cls, model: FaceModel, vertex_ids: np.ndarray, n_identity: int = 60) -> "LandmarkBasis":
        """A basis on given model vertices, e.g. the 68 iBUG landmark vertices."""
        vid = np.asarray(vertex_ids)
        return cls(mean=model.neutral[vid].astype(np.float64),
                   identity=model.identity_modes[:n_identity, vid].astype(np.float64),
                   expression=model.expression_modes[:, vid].astype(np.float64),
                   weight=np.ones(len(vid)))

    def points(self, identity: np.ndarray, expression: np.ndarray) -> np.ndarray:
        """(N, 3) model-space points."""
        k, M = len(identity), self.expression.shape[0]
        flat = (self.mean.reshape(-1) + identity @ self.identity[:k].reshape(k, -1)
                + expression @ self.expression.reshape(M, -1))
        return flat.reshape(-1, 3)


@dataclass
class FitSettings:
    """Weights of the priors, in cm² of landmark error per unit² of weight."""

    expression_prior: float = 0.05     # pulls shapes the landmarks barely see towards 0
    identity_prior: float = 0.5        # per frame with a face, against weights ~ N(0, 1)
    iterations: int = 2                # Gauss-Newton steps per tracked frame (1 already converges on video)
    first_iterations: int = 12         # steps when (re)starting without a previous pose
    identity_frames: int = 40          # frames with a face before identity locks
    identity_prior_joint: float = 0.05  # for the whole take, in the joint solve at lock time
    identity_rounds: int = 3           # rounds of the joint solve over the stored frames
    identity_joint_frames: int = 20    # at most this many of them, evenly spread (bounds the one-off cost)


#: FitSettings' identity priors for a TakeFitter that holds the expression at the landmark MLP's reading:
#: with no expression weights left to take up MediaPipe's own errors, the default priors let the identity
#: take them (development clips, seed 23: face vertices 4.26 mm, the mean face's 3.64; with these 3.21).
HELD_EXPRESSION_PRIORS = {"identity_prior": 8.0, "identity_prior_joint": 5.0}


@dataclass
class FitResult:
    """One frame's fit. rotation (3, 3) and translation (3,) cm map model to camera;
    expression (M,) in [0, 1]; rms_px the weighted landmark error."""

    rotation: np.ndarray
    translation: np.ndarray
    expression: np.ndarray
    identity: np.ndarray
    rms_px: float


def initial_pose(basis: LandmarkBasis, landmarks_px: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frontal rotation and a translation that puts the mean face over the landmarks at their scale."""
    pts = basis.mean
    span_cm = np.ptp(pts[:, :2], axis=0).max()
    span_px = np.ptp(landmarks_px, axis=0).max()
    z = K[0, 0] * span_cm / max(span_px, 1e-6)
    c = landmarks_px.mean(axis=0)
    centre = (FRONTAL @ pts.mean(axis=0))
    x = (c[0] - K[0, 2]) * z / K[0, 0] - centre[0]
    y = (c[1] - K[1, 2]) * z / K[1, 1] - centre[1]
    return FRONTAL.copy(), np.array([x, y, z - centre[2]])


def _camera_gradients(R: np.ndarray, X: np.ndarray, K: np.ndarray, cm_per_px: float):
    """Per point, how u and v (cm at the face) change with a model-space motion: (N, 3) each.

    For a model-space direction d, du = cu · d and dv = cv · d, since the camera-space
    motion is R d and u = fx x / z + cx.
    """
    inv_z = 1.0 / X[:, 2]
    ax = (K[0, 0] * cm_per_px * inv_z)[:, None]
    ay = (K[1, 1] * cm_per_px * inv_z)[:, None]
    cu = ax * (R[0] - (X[:, 0] * inv_z)[:, None] * R[2])
    cv = ay * (R[1] - (X[:, 1] * inv_z)[:, None] * R[2])
    return cu, cv


@numba.njit(cache=True, nogil=True, fastmath=True)
def _model_jacobian(dirs_xyz: np.ndarray, cu: np.ndarray, cv: np.ndarray, out: np.ndarray) -> None:
    """Fill out (Q, 2N) with the Jacobian of model-space directions dirs_xyz (3, Q, N)."""
    Q, N = dirs_xyz.shape[1], dirs_xyz.shape[2]
    for q in range(Q):
        for n in range(N):
            bx, by, bz = dirs_xyz[0, q, n], dirs_xyz[1, q, n], dirs_xyz[2, q, n]
            out[q, n] = bx * cu[n, 0] + by * cu[n, 1] + bz * cu[n, 2]
            out[q, N + n] = bx * cv[n, 0] + by * cv[n, 1] + bz * cv[n, 2]


def _pose_jacobian(RP: np.ndarray, R: np.ndarray, cu: np.ndarray, cv: np.ndarray, out: np.ndarray) -> None:
    """Fill out (6, 2N) for R <- exp(δω) R and t <- t + δt.

    A rotation δω moves a point by δω × RP in camera space; a translation by δt.
    With gu = R cu (the camera-space gradient of u), du = gu · (δω × RP) = δω · (RP × gu).
    """
    N = cu.shape[0]
    for rows, c in ((slice(0, N), cu), (slice(N, 2 * N), cv)):
        g = c @ R.T
        out[0, rows] = RP[:, 1] * g[:, 2] - RP[:, 2] * g[:, 1]
        out[1, rows] = RP[:, 2] * g[:, 0] - RP[:, 0] * g[:, 2]
        out[2, rows] = RP[:, 0] * g[:, 1] - RP[:, 1] * g[:, 0]
        out[3:, rows] = g.T


def _residual(X: np.ndarray, landmarks_px: np.ndarray, K: np.ndarray, cm_per_px: float) -> np.ndarray:
    """(2N,) projection minus landmarks, all u then all v, in cm at the face."""
    d = project(X, K) - landmarks_px
    return np.concatenate([d[:, 0], d[:, 1]]) * cm_per_px


def linearise(basis: LandmarkBasis, landmarks_px: np.ndarray, K: np.ndarray, R: np.ndarray, t: np.ndarray,
              expression: np.ndarray, identity: np.ndarray, solve_expression: bool = True,
              solve_identity: bool = False):
    """Weighted residual r (2N,) and Jacobian rows Jt (6 [+ M] [+ K], 2N) at one frame's state.

    Rows: rotation δω (R <- exp(δω) R), translation, then expression, then identity.
    Units: cm at the face.
    """
    M, N, k = basis.expression.shape[0], basis.mean.shape[0], len(identity)
    w = basis.weight2
    RP = basis.points(identity, expression) @ R.T
    X = RP + t
    cm_per_px = X[:, 2].mean() / K[0, 0]
    r = _residual(X, landmarks_px, K, cm_per_px) * w
    cu, cv = _camera_gradients(R, X, K, cm_per_px)
    rows = 6 + (M if solve_expression else 0) + (k if solve_identity else 0)
    Jt = np.empty((rows, 2 * N))
    _pose_jacobian(RP, R, cu, cv, Jt[:6])
    if solve_expression:
        _model_jacobian(basis.expression_xyz, cu, cv, Jt[6:6 + M])
    if solve_identity:
        _model_jacobian(basis.identity_xyz[:, :k], cu, cv, Jt[rows - k:])
    Jt *= w
    return r, Jt


def landmark_rms_px(basis: LandmarkBasis, landmarks_px, K, R, t, expression, identity) -> float:
    """Weighted rms distance (px) between the model's projected landmarks and the detections."""
    X = basis.points(identity, expression) @ R.T + t
    err2 = np.sum((project(X, K) - landmarks_px) ** 2, axis=1)
    return float(np.sqrt(np.average(err2, weights=basis.weight)))


def gram(Jt: np.ndarray) -> np.ndarray:
    """(q, q) Jt Jtᵀ of Jacobian rows Jt (q, n) by BLAS's syrk, which computes one triangle: about 3x
    numpy's matmul at the depth solves' shapes (119 x 1500: 0.5 against 1.5 ms on one core). Below
    about 24 rows (the pose alone: 6) the call costs more than it saves, and matmul does it."""
    if len(Jt) < 24:
        return Jt @ Jt.T
    upper = dsyrk(1.0, np.asarray(Jt, np.float64).T, trans=1)
    return np.triu(upper) + np.triu(upper, 1).T


def gauss_newton_frame(basis: LandmarkBasis, landmarks_px: np.ndarray, K: np.ndarray,
                       R: np.ndarray, t: np.ndarray, expression: np.ndarray, identity: np.ndarray,
                       settings: FitSettings, iterations: int, solve_expression: bool = True,
                       lower: np.ndarray | None = None, upper: np.ndarray | None = None,
                       extra=None, expression_target: np.ndarray | None = None,
                       landmark_weight: float = 1.0, landmark_expression: bool = True):
    """Gauss-Newton on pose and bounded expression; returns (R, t, expression).

    Expression weights stay in [lower, upper] (default [0, 1]); equal bounds pin a weight.
    extra: optional (R, t, expression) -> (r, Jt) of more residuals in cm with linearise's
    rows (e.g. engine.depth_fit's depth term), solved together with the landmarks.
    expression_target: where the expression prior pulls (default 0).
    landmark_weight: scales the landmarks' squared residuals against extra's.
    landmark_expression False: the landmarks place the pose only; the expression is extra's and the prior's.
    """
    M = basis.expression.shape[0]
    lower = np.zeros(M) if lower is None else lower
    upper = np.ones(M) if upper is None else upper
    e = np.clip(expression, lower, upper)
    n_var = 6 + (M if solve_expression else 0)
    reg = np.full(n_var, settings.expression_prior)
    reg[:6] = 1e-6
    target = np.zeros(M) if expression_target is None else expression_target
    for _ in range(iterations):
        r, Jt = linearise(basis, landmarks_px, K, R, t, e, identity, solve_expression and landmark_expression)
        if landmark_weight != 1.0:
            r, Jt = r * np.sqrt(landmark_weight), Jt * np.sqrt(landmark_weight)
        H, g = np.zeros((n_var, n_var)), np.zeros(n_var)
        q = len(Jt)
        H[:q, :q], g[:q] = gram(Jt), Jt @ r
        if extra is not None:
            r2, Jt2 = extra(R, t, e)
            H += gram(Jt2[:n_var])
            g += Jt2[:n_var] @ r2
        H[np.diag_indices(n_var)] += reg
        if solve_expression:
            g[6:] += settings.expression_prior * (e - target)
        delta = _bounded_step(H, g, e if solve_expression else None, lower, upper)
        R = rodrigues(delta[:3]) @ R
        t = t + delta[3:6]
        if solve_expression:
            e = np.clip(e + delta[6:], lower, upper)
    return R, t, e


def _bounded_step(H: np.ndarray, g: np.ndarray, e: np.ndarray | None,
                  lower: np.ndarray | None = None, upper: np.ndarray | None = None) -> np.ndarray:
    """Solve H δ = -g with lower ≤ e + δ_e ≤ upper (a small active-set loop).

    Pinned weights (lower == upper) start fixed; weights the step would carry
    out of the box are clamped at the bound and the rest re-solved.
    """
    if e is None:
        return -np.linalg.solve(H, g)
    lower = np.zeros_like(e) if lower is None else lower
    upper = np.ones_like(e) if upper is None else upper
    n_pose = len(g) - len(e)
    fixed = np.zeros(len(g), dtype=bool)
    fixed[n_pose:] = lower == upper
    delta = np.zeros(len(g))
    for _ in range(4):
        free = ~fixed
        delta[n_pose:][fixed[n_pose:]] = np.clip(e + delta[n_pose:], lower, upper)[fixed[n_pose:]] - e[fixed[n_pose:]]
        rhs = -g[free] - H[np.ix_(free, fixed)] @ delta[fixed]
        delta[free] = np.linalg.solve(H[np.ix_(free, free)], rhs)
        new = e + delta[n_pose:]
        leaving = ((new < lower) | (new > upper)) & ~fixed[n_pose:]
        if not leaving.any():
            break
        fixed[n_pose:] |= leaving
    return delta


def identity_normal_equations(basis: LandmarkBasis, landmarks_px: np.ndarray, K: np.ndarray,
                              R: np.ndarray, t: np.ndarray, expression: np.ndarray, identity: np.ndarray):
    """One frame's linearised contribution (A (K, K), b (K,)) to the identity solve A α = b,
    with the frame's pose and expression held."""
    r, Jt = linearise(basis, landmarks_px, K, R, t, expression, identity, solve_expression=False,
                      solve_identity=True)
    J = Jt[6:]
    A = gram(J)
    return A, A @ identity - J @ r


def joint_identity_step(basis: LandmarkBasis, frames: list, identity: np.ndarray, settings: FitSettings) -> np.ndarray:
    """One Gauss-Newton step on identity and every frame's pose and expression together.

    frames: lists [landmarks_px, K, R, t, expression, lower, upper], updated in place.
    Each frame's block is eliminated (Schur complement), so the shared identity
    sees how every frame's pose and expression would move with it.
    """
    M, k = basis.expression.shape[0], len(identity)
    S = settings.identity_prior_joint * np.eye(k)
    rhs = -settings.identity_prior_joint * identity
    solved = []
    for landmarks_px, K, R, t, e, lower, upper in frames:
        r, Jt = linearise(basis, landmarks_px, K, R, t, e, identity, solve_identity=True)
        Jf, Ja = Jt[:6 + M], Jt[6 + M:]
        free = np.r_[np.ones(6, bool), lower < upper]
        Jf = Jf[free]
        Hff = Jf @ Jf.T
        Hff[np.diag_indices(len(Hff))] += np.r_[np.full(6, 1e-6), np.full(int(free[6:].sum()), settings.expression_prior)]
        gf = Jf @ r
        gf[6:] += settings.expression_prior * e[free[6:]]
        Hfa = Jf @ Ja.T
        X = np.linalg.solve(Hff, np.column_stack([Hfa, gf]))
        S += Ja @ Ja.T - Hfa.T @ X[:, :k]
        rhs -= Ja @ r - Hfa.T @ X[:, k]
        solved.append((free, X))
    delta_a = np.linalg.solve(S, rhs)
    for frame, (free, X) in zip(frames, solved):
        delta_f = -X[:, k] - X[:, :k] @ delta_a
        R, t, e, lower, upper = frame[2], frame[3], frame[4], frame[5], frame[6]
        e = e.copy()
        e[free[6:]] += delta_f[6:]
        frame[2:5] = rodrigues(delta_f[:3]) @ R, t + delta_f[3:6], np.clip(e, lower, upper)
    return identity + delta_a


def locked_identity(basis: LandmarkBasis, identity: np.ndarray) -> np.ndarray:
    """A known identity (e.g. an actor profile's) checked against the basis, as fitters lock it."""
    identity = np.array(identity, dtype=np.float64)
    if identity.shape != (basis.identity.shape[0],) or not np.isfinite(identity).all():
        raise ValueError(f"a locked identity must be {basis.identity.shape[0]} finite weights, "
                         f"got shape {identity.shape}")
    return identity


@dataclass
class TakeFitter:
    """Fits every frame of one take; identity converges over the first frames, then locks.

    identity: a known identity (an actor profile's), locked from the first frame.
    landmark_expression: an engine.landmark_expression.LandmarkExpression: when given, it reads every
    expression weight from the landmarks' shape and the fit solves the pose (and, until it locks, the
    identity) with those weights held. Solving the 53 weights from the landmarks instead (None) makes
    them explain MediaPipe's own errors: on exact-truth clips that reading was 2.6 x further from the
    truth than all zeros, and a neutral face read jawForward near 1 (bench/README.md).
    """

    basis: LandmarkBasis
    settings: FitSettings = field(default_factory=FitSettings)
    identity: np.ndarray | None = None
    identity_locked: bool = False
    landmark_expression: LandmarkExpression | None = None
    _A: np.ndarray | None = None
    _b: np.ndarray | None = None
    _frames_for_identity: int = 0
    _previous: FitResult | None = None
    _kept: list = field(default_factory=list)

    def __post_init__(self):
        k = self.basis.identity.shape[0]
        if self.identity is None:
            self.identity = np.zeros(k)
        else:
            self.identity = locked_identity(self.basis, self.identity)
            self.identity_locked = True
        self._A = np.zeros((k, k))
        self._b = np.zeros(k)

    def lose_track(self) -> None:
        """The face was lost: the next fit starts from scratch (identity is kept)."""
        self._previous = None

    def fit(self, landmarks_px: np.ndarray, K: np.ndarray, pin=None, image=None) -> FitResult:
        """Fit one frame's (N, 2) landmarks with camera matrix K.

        pin: optional callable (R, t) -> {expression index: value}, called once the
        head pose is known, for weights measured apart from the landmark fit (gaze).
        image: unused (landmarks are all this fit reads); accepted so that callers can
        drive this and engine.coarse_fitting.CoarseFitter alike.
        """
        s = self.settings
        landmarks_px = np.asarray(landmarks_px, np.float64)[:, :2]
        M = self.basis.expression.shape[0]
        if self._previous is None:
            R, t = initial_pose(self.basis, landmarks_px, K)
            R, t, _ = gauss_newton_frame(self.basis, landmarks_px, K, R, t, np.zeros(M), self.identity,
                                            s, s.first_iterations, solve_expression=False)
            e = np.zeros(M)
            iterations = s.first_iterations
        else:
            R, t, e = self._previous.rotation, self._previous.translation, self._previous.expression
            iterations = s.iterations
        lower, upper = np.zeros(M), np.ones(M)
        solve = self.landmark_expression is None
        if not solve:  # every weight held at the MLP's reading: lower = upper
            lower = self.landmark_expression.predict(landmarks_px).astype(np.float64)
            upper = lower.copy()
        if pin is not None:
            if self._previous is not None:  # the pin needs this frame's pose, not the last one's
                R, t, _ = gauss_newton_frame(self.basis, landmarks_px, K, R, t, e, self.identity, s, 1,
                                                solve_expression=False)
            for index, value in pin(R, t).items():
                lower[index] = upper[index] = value
        if not solve:
            e = lower.copy()
        R, t, e = gauss_newton_frame(self.basis, landmarks_px, K, R, t, e, self.identity, s, iterations,
                                          solve_expression=solve, lower=lower, upper=upper)
        if not self.identity_locked:
            # a running estimate with a firm prior while few frames are in...
            A, b = identity_normal_equations(self.basis, landmarks_px, K, R, t, e, self.identity)
            self._A += A
            self._b += b
            self._frames_for_identity += 1
            n = self._frames_for_identity
            stride = max(1, s.identity_frames // s.identity_joint_frames)
            if (n - 1) % stride == 0:
                self._kept.append([landmarks_px, K, R, t, e, lower, upper])
            self.identity = np.linalg.solve(self._A + s.identity_prior * n * np.eye(len(self._b)), self._b)
            if n >= s.identity_frames:
                # ...then one joint solve over every kept frame, and the identity locks
                self.identity = self._joint_identity()
                self.identity_locked = True
                self._kept = []
            R, t, e = gauss_newton_frame(self.basis, landmarks_px, K, R, t, e, self.identity, s, 1,
                                              solve_expression=solve, lower=lower, upper=upper)
        rms = landmark_rms_px(self.basis, landmarks_px, K, R, t, e, self.identity)
        result = FitResult(R, t, e, self.identity.copy(), rms)
        self._previous = result
        return result

    def _joint_identity(self) -> np.ndarray:
        """Joint Gauss-Newton steps on the identity and every kept frame, each followed by a
        bounded refit of the frames' pose and expression under the new identity."""
        s = self.settings
        identity = self.identity
        for _ in range(s.identity_rounds):
            identity = joint_identity_step(self.basis, self._kept, identity, s)
            for frame in self._kept:
                landmarks_px, K, R, t, e, lower, upper = frame
                frame[2:5] = gauss_newton_frame(self.basis, landmarks_px, K, R, t, e, identity, s, 1,
                                                solve_expression=self.landmark_expression is None,
                                                lower=lower, upper=upper)
        return identity
