"""The depth term of the fit (E_geo of seed 002): the model's face against a depth image.

A fixed, even sample of the model's front-face vertices is posed, projected into the
depth image (registered to the colour camera, so the colour K serves both), and each
sample is compared with the surface seen at its pixel: a robust point-to-plane distance
along the depth surface's normal (projective association, as in depth-camera tracking).
Samples the depth cannot see (no data, grazing surface, occluded, or further than a gate
from the model) take no part. Residuals are in cm, as the landmark term's (engine.fitting),
so both sit in one Gauss-Newton system.

DepthRefiner runs that system after either engine's fit: the head pose moves, placed by
the depth with the landmarks weighted low (expression stays the engine's: refining it against
depth and landmarks made the blendshapes worse, bench/eval_rgbd.py,
DepthSettings.solve_expression), and over the first frames with depth the identity is
solved from the depth alone (the landmarks' own biases, a few mm where MediaPipe's points
and the model's disagree, would pass into it), together with those frames' poses, and
locked, sooner than landmarks alone allow.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from engine.facemodel import FACE_VERTICES, FaceModel
from engine.fitting import FitResult, FitSettings, LandmarkBasis, gauss_newton_frame, linearise
from engine.pose import project, rodrigues
from engine.rasterizer import vertex_normals


@dataclass(frozen=True)
class DepthSettings:
    """Weights and gates of the depth term; lengths in cm."""

    weight: float = 3.0                 # per depth sample, against landmarks of mean weight 1
    huber_cm: float = 0.3               # residuals beyond this count linearly (robust to depth noise)
    gate_cm: float = 2.0                # a sample further than this from the depth surface is not seen
    min_normal_z: float = 0.3           # depth normals more grazing than this are too noisy
    min_normal_agreement: float = 0.7   # cos between the model's and the depth's normal: else another surface
    normal_step_px: int = 2             # neighbour distance for the depth surface's normal
    iterations: int = 1                 # Gauss-Newton steps per frame
    solve_expression: bool = False      # refine the expression too (else pose and identity only)
    expression_prior: float = 0.5       # pulls the expression towards the engine's (cm² per unit²)
    identity_frames: int = 10           # frames with depth before the identity locks
    identity_prior: float = 0.2         # per frame, against identity weights ~ N(0, 1)
    identity_landmark_weight: float = 0.0  # the landmarks' part in shaping the identity (0: depth alone)
    identity_rounds: int = 16           # at lock time: Gauss-Newton steps on the identity and its frames' poses
    identity_gate_cm: float = 1.2       # the identity solve's gate: tighter than the pose's (a sample 2 cm off
                                        # has met another surface: the nose's side, the chin), wide enough for
                                        # sensor noise (0.5 cm dropped good samples of a noisy depth: bench/
                                        # eval_rgbd.py dev seeds 37 and 41, face vertices 2.5 -> 2.2 mm)
    landmark_weight: float = 0.03       # the landmarks' part in placing the head beside the depth: their
                                        # bias against the model turned the head and shaped the face wrong
    min_samples: int = 50               # fewer seen samples than this: the frame is left as fitted


def front_face_vertices(model: FaceModel, spacing_cm: float = 0.6) -> np.ndarray:
    """About one front-face vertex per spacing_cm square (x, y of the rest mesh), forehead to chin,
    in front of the ears: the part of the face a camera facing it sees in every pose, where
    depth_residual_mm reports the fit's distance to the depth."""
    rest = model.neutral
    face = _face_skin(model)
    x, y, z = rest[face].T
    return _one_per_cell(rest, face[_in_front(model, x, y, z)], spacing_cm, dims=2)


def depth_sample_vertices(model: FaceModel, spacing_cm: float = 0.6, side_spacing_cm: float = 1.0) -> np.ndarray:
    """The points the depth term compares: the front face (front_face_vertices), and the rest of
    the face's skin (the sides, the ears, the jaw's underside) at one vertex per side_spacing_cm
    cube. A sample counts in a frame only where the depth sees its surface (_seen); the sides,
    seen as the head turns, hold the face's width and depth, which the front alone leaves to the
    identity's other modes (vertex error 3.17 -> 2.50 and 2.79 -> 2.40 mm on two development
    take sets, as bench/eval_rgbd.py measures)."""
    rest = model.neutral
    face = _face_skin(model)
    x, y, z = rest[face].T
    front = front_face_vertices(model, spacing_cm)
    sides = _one_per_cell(rest, face[~_in_front(model, x, y, z)], side_spacing_cm, dims=3)
    return np.union1d(front, sides)


def _face_skin(model: FaceModel) -> np.ndarray:
    face = model.material_vertices("M_Face")
    return face[face < FACE_VERTICES.stop]


def _in_front(model: FaceModel, x, y, z) -> np.ndarray:
    """Rest-mesh points forehead to chin, in front of the ears, inside the jaw line's width."""
    lm = model.neutral[model.landmark68_vertices]
    ear_z = lm[[0, 16], 2].mean()
    top_y = lm[17:27, 1].max() + 4.0
    half_width = 0.9 * np.abs(lm[0:17, 0]).max()
    return (z > ear_z + 1.0) & (y < top_y) & (y > lm[8, 1] - 0.3) & (np.abs(x) < half_width)


def _one_per_cell(rest: np.ndarray, ids: np.ndarray, spacing_cm: float, dims: int) -> np.ndarray:
    """The first of ids in each spacing_cm cell of the rest mesh's first dims coordinates."""
    cells = np.floor(rest[ids, :dims] / spacing_cm).astype(np.int64)
    _, first = np.unique(cells, axis=0, return_index=True)
    return np.sort(ids[first])


@dataclass(frozen=True)
class DepthBasis:
    """The face model at the depth samples (a LandmarkBasis of vertices, weight 1 each), their
    rest-mesh normals (S, 3), which tell a sample from the surface hiding it, and which of them
    are on the front face (S,) bool, where the residual is reported."""

    basis: LandmarkBasis
    vertex_ids: np.ndarray
    normals: np.ndarray
    front: np.ndarray

    @classmethod
    def build(cls, model: FaceModel, n_identity: int = 60, spacing_cm: float = 0.6) -> "DepthBasis":
        vid = depth_sample_vertices(model, spacing_cm)
        normals = vertex_normals(model.neutral.astype(np.float64), model.triangles)[vid]
        front = np.isin(vid, front_face_vertices(model, spacing_cm))
        return cls(LandmarkBasis.from_vertices(model, vid, n_identity), vid, normals, front)


def depth_at(depth_cm: np.ndarray, K: np.ndarray, uv_px: np.ndarray, step_px: int):
    """The depth surface at pixels uv_px (N, 2): points (N, 3) cm, unit normals (N, 3) towards
    the camera, and which of them are valid (N,) (in the image, depth there and at the four
    neighbours step_px away, no jump between them)."""
    H, W = depth_cm.shape
    s = int(step_px)
    u = np.rint(uv_px[:, 0]).astype(np.int64)
    v = np.rint(uv_px[:, 1]).astype(np.int64)
    ok = (u >= s) & (u < W - s) & (v >= s) & (v < H - s)
    u, v = np.where(ok, u, s), np.where(ok, v, s)
    # the pixel and its left, right, upper and lower neighbours: (5, N)
    uu = u + np.array([0, -s, s, 0, 0])[:, None]
    vv = v + np.array([0, 0, 0, -s, s])[:, None]
    z = depth_cm[vv, uu].astype(np.float64)
    x = (uu - K[0, 2]) * z / K[0, 0]
    y = (vv - K[1, 2]) * z / K[1, 1]
    P = np.stack([x[0], y[0], z[0]], axis=1)
    a = np.stack([x[2] - x[1], y[2] - y[1], z[2] - z[1]], axis=1)   # right - left
    c = np.stack([x[4] - x[3], y[4] - y[3], z[4] - z[3]], axis=1)   # down - up
    n = np.cross(a, c)
    norm = np.sqrt(np.einsum("ij,ij->i", n, n))
    ok &= (z > 0).all(axis=0) & (np.ptp(z, axis=0) < 1.0) & (norm > 0)
    n /= np.maximum(norm, 1e-12)[:, None]
    n *= np.where(n[:, 2] > 0, -1.0, 1.0)[:, None]  # towards the camera (-z)
    return P, n, ok


def depth_linearise(dbasis: DepthBasis, depth_cm: np.ndarray, K: np.ndarray, R: np.ndarray, t: np.ndarray,
                    expression: np.ndarray, identity: np.ndarray, settings: DepthSettings,
                    solve_expression: bool = True, solve_identity: bool = False):
    """Weighted point-to-plane residuals r (S,) cm and Jacobian rows Jt (6 [+ M] [+ K], S) over the
    S samples the depth sees, rows ordered as engine.fitting.linearise's."""
    b = dbasis.basis
    M, k = b.expression.shape[0], len(identity)
    p = b.points(identity, expression)
    RP = p @ R.T
    X = RP + t
    P, n, ok = depth_at(depth_cm, K, project(X, K), settings.normal_step_px)
    r = np.einsum("ij,ij->i", n, X - P)
    ok &= _seen(dbasis, R, X, n, r, settings)
    idx = np.flatnonzero(ok)
    r, n, RP = r[idx], n[idx], RP[idx]
    a = np.abs(r)
    w = np.sqrt(settings.weight * np.where(a <= settings.huber_cm, 1.0, settings.huber_cm / np.maximum(a, 1e-12)))
    rows = 6 + (M if solve_expression else 0) + (k if solve_identity else 0)
    Jt = np.empty((rows, len(idx)))
    Jt[:3] = np.cross(RP, n).T                 # δω moves X by δω × RP: n · (δω × RP) = δω · (RP × n)
    Jt[3:6] = n.T
    g = n @ R                                  # model-space gradient of the residual, per sample
    if solve_expression:
        Jt[6:6 + M] = _directional(b.expression_xyz, idx, g)
    if solve_identity:
        Jt[rows - k:] = _directional(b.identity_xyz[:, :k], idx, g)
    return r * w, Jt * w


def _seen(dbasis: DepthBasis, R: np.ndarray, X: np.ndarray, n: np.ndarray, r: np.ndarray,
          settings: DepthSettings) -> np.ndarray:
    """(S,) which samples meet their own surface in the depth: near it, not at a grazing angle,
    and with a normal like the model's there (a sample hidden behind the nose or the chin
    meets theirs)."""
    agree = np.einsum("ij,ij->i", dbasis.normals @ R.T, n)
    return ((np.abs(r) < settings.gate_cm) & (-n[:, 2] > settings.min_normal_z) & (X[:, 2] > 0)
            & (agree > settings.min_normal_agreement))


def _directional(dirs_xyz: np.ndarray, idx: np.ndarray, g: np.ndarray) -> np.ndarray:
    """(Q, S): each model direction dirs_xyz (3, Q, N) at samples idx (S,) dotted with g (S, 3)."""
    return dirs_xyz[0][:, idx] * g[:, 0] + dirs_xyz[1][:, idx] * g[:, 1] + dirs_xyz[2][:, idx] * g[:, 2]


def depth_shift_cm(dbasis: DepthBasis, depth_cm: np.ndarray, K: np.ndarray, R: np.ndarray, t: np.ndarray,
                   expression: np.ndarray, identity: np.ndarray) -> tuple[np.ndarray, int]:
    """(3,) cm: the translation that moves the posed face along its viewing ray to the depth's
    distance (median over the front-face samples of depth minus model z), and how many of them
    have depth at their pixel (no shift below 10).
    A colour fit places the face from its apparent size, centimetres off; the gated
    point-to-plane term needs to start within its gate. Only the front counts: it faces the
    camera in every pose, where a side sample's pixel may show the cheek in front of it."""
    X = (dbasis.basis.points(identity, expression) @ R.T + t)[dbasis.front]
    H, W = depth_cm.shape
    u, v = np.rint(project(X, K)).astype(np.int64).T
    inside = (u >= 0) & (u < W) & (v >= 0) & (v < H) & (X[:, 2] > 0)
    z = depth_cm[v[inside], u[inside]]
    seen = z > 0
    if seen.sum() < 10:
        return np.zeros(3), int(seen.sum())
    dz = float(np.median(z[seen] - X[inside, 2][seen]))
    centre = X.mean(axis=0)
    return centre / centre[2] * dz, int(seen.sum())


def depth_residual_mm(dbasis: DepthBasis, depth_cm: np.ndarray, K: np.ndarray, fit: FitResult,
                      settings: DepthSettings) -> tuple[float, int]:
    """Median |model − depth| (mm, point to plane) over the front-face samples the depth sees (nan:
    none), and how many samples in all it sees."""
    p = dbasis.basis.points(fit.identity, fit.expression) @ fit.rotation.T + fit.translation
    P, n, ok = depth_at(depth_cm, K, project(p, K), settings.normal_step_px)
    r = np.abs(np.einsum("ij,ij->i", n, p - P))
    ok &= _seen(dbasis, fit.rotation, p, n, r, settings)
    front = ok & dbasis.front
    return (float(np.median(r[front]) * 10.0) if front.any() else float("nan")), int(ok.sum())


@dataclass
class DepthRefiner:
    """Refines each fitted frame against its depth image; over the first frames with depth it
    solves the identity (from the depth; landmarks at settings.identity_landmark_weight), then
    locks it."""

    landmarks: LandmarkBasis
    depth: DepthBasis
    settings: DepthSettings = field(default_factory=DepthSettings)
    identity: np.ndarray | None = None
    identity_locked: bool = False
    _A: np.ndarray | None = None
    _b: np.ndarray | None = None
    _frames: int = 0
    _kept: list = field(default_factory=list)   # the identity frames: [lm, K, R, t, e, depth cm]

    def __post_init__(self):
        k = self.landmarks.identity.shape[0]
        self._A, self._b = np.zeros((k, k)), np.zeros(k)

    def lock(self, identity: np.ndarray) -> None:
        """A known identity (an actor profile's): no identity solve."""
        self.identity, self.identity_locked = np.asarray(identity, np.float64).copy(), True

    def refine(self, fit: FitResult, landmarks_px: np.ndarray, K: np.ndarray, depth_mm: np.ndarray,
               pinned: dict[int, float] | None = None) -> tuple[FitResult, int, float]:
        """fit refined with the depth (H, W) mm (0 = none) registered to the colour camera K;
        pinned expression weights (gaze, blink) stay as they are. Returns the refined fit,
        how many depth samples it sees and their median |model - depth| in mm
        (0 and nan: too few samples, the frame is returned as fitted)."""
        s = self.settings
        depth_cm = np.asarray(depth_mm, np.float32) * np.float32(0.1)
        identity = fit.identity if self.identity is None else self.identity
        M = self.landmarks.expression.shape[0]
        lower, upper = np.zeros(M), np.ones(M)
        for i, value in (pinned or {}).items():
            lower[i] = upper[i] = value
        prior_e = np.clip(fit.expression, lower, upper)
        fit_settings = FitSettings(expression_prior=s.expression_prior)
        lm = np.asarray(landmarks_px, np.float64)[:, :2]

        def extra(R, t, e):
            return depth_linearise(self.depth, depth_cm, K, R, t, e, identity, s)

        R, t, e = fit.rotation, fit.translation, prior_e
        shift, seen = depth_shift_cm(self.depth, depth_cm, K, R, t, e, identity)
        if seen < s.min_samples:
            return fit, 0, float("nan")
        t = t + shift
        R, t, e = gauss_newton_frame(self.landmarks, lm, K, R, t, e, identity, fit_settings, s.iterations,
                                     lower=lower, upper=upper, extra=extra, expression_target=prior_e,
                                     solve_expression=s.solve_expression, landmark_weight=s.landmark_weight)
        if not self.identity_locked:
            self._kept.append([lm, K, R, t, e, depth_cm])
            identity = self._update_identity(lm, K, R, t, e, identity, depth_cm)
            if self.identity_locked:
                identity = self.identity = self._settle_identity(identity)
            R, t, e = gauss_newton_frame(self.landmarks, lm, K, R, t, e, identity, fit_settings, 1,
                                         lower=lower, upper=upper, extra=extra, expression_target=prior_e,
                                         solve_expression=s.solve_expression, landmark_weight=s.landmark_weight)
        refined = FitResult(R, t, e, identity.copy(), fit.rms_px)
        residual_mm, seen = depth_residual_mm(self.depth, depth_cm, K, refined, s)
        return refined, seen, residual_mm

    def _update_identity(self, lm, K, R, t, e, identity, depth_cm) -> np.ndarray:
        """Add this frame's identity normal equations (depth, pose and expression held) and solve;
        lock after settings.identity_frames frames."""
        s = self.settings
        k = len(identity)
        r, J = self._frame_equations(lm, K, R, t, e, identity, depth_cm)
        J = J[6:]
        A = J @ J.T
        self._A += A
        self._b += A @ identity - J @ r
        self._frames += 1
        self.identity = np.linalg.solve(self._A + s.identity_prior * self._frames * np.eye(k), self._b)
        self.identity_locked = self._frames >= s.identity_frames
        return self.identity

    def _settle_identity(self, identity: np.ndarray) -> np.ndarray:
        """Gauss-Newton on the identity and every identity frame's pose together (expression held),
        the poses eliminated by their Schur complement. Solving them in turn converges slowly:
        part of a face-shape error looks like a small turn or shift of the head, and a pose
        solved under the wrong face keeps it."""
        s = self.settings
        k = len(identity)
        frames = self._kept
        for _ in range(s.identity_rounds):
            S = s.identity_prior * len(frames) * np.eye(k)
            c = s.identity_prior * len(frames) * identity
            blocks = []
            for frame in frames:
                r, J = self._frame_equations(*frame[:5], identity, frame[5])
                H, g = J @ J.T, J @ r
                Hpp = H[:6, :6] + 1e-6 * np.eye(6)
                Hpi, gp = H[:6, 6:], g[:6]
                X = np.linalg.solve(Hpp, np.column_stack([Hpi, gp]))
                S += H[6:, 6:] - Hpi.T @ X[:, :k]
                c += g[6:] - Hpi.T @ X[:, k]
                blocks.append(X)
            step = -np.linalg.solve(S, c)
            identity = identity + step
            for frame, X in zip(frames, blocks):
                dp = -(X[:, k] + X[:, :k] @ step)
                frame[2] = rodrigues(dp[:3]) @ frame[2]
                frame[3] = frame[3] + dp[3:]
        self._kept = []
        return identity

    def _frame_equations(self, lm, K, R, t, e, identity, depth_cm):
        """Residuals (n,) and pose-then-identity Jacobian rows (6 + K, n) of one frame, expression
        held: the depth; the landmarks at settings.landmark_weight placing the head only (their
        few millimetres of bias against the model would pass into the face shape); and, at
        settings.identity_landmark_weight, the landmarks shaping the face too."""
        s = self.settings
        r, J = depth_linearise(self.depth, depth_cm, K, R, t, e, identity, replace(s, gate_cm=s.identity_gate_cm),
                               solve_expression=False, solve_identity=True)
        parts_r, parts_J = [r], [J]
        if s.landmark_weight > 0 or s.identity_landmark_weight > 0:
            r1, J1 = linearise(self.landmarks, lm, K, R, t, e, identity, solve_expression=False, solve_identity=True)
            if s.landmark_weight > 0:
                w = np.sqrt(s.landmark_weight)
                pose_only = J1 * w
                pose_only[6:] = 0.0
                parts_r.append(r1 * w)
                parts_J.append(pose_only)
            if s.identity_landmark_weight > 0:
                w = np.sqrt(s.identity_landmark_weight)
                parts_r.append(r1 * w)
                parts_J.append(J1 * w)
        return np.concatenate(parts_r), np.concatenate(parts_J, axis=1)

