"""The depth term of the fit (E_geo of seed 002): the model's face against a depth image.

A fixed, even sample of the model's front-face vertices is posed, projected into the
depth image (registered to the colour camera, so the colour K serves both), and each
sample is compared with the surface seen at its pixel: a robust point-to-plane distance
along the depth surface's normal (projective association, as in depth-camera tracking).
Samples the depth cannot see (no data, grazing surface, occluded, or further than a gate
from the model) take no part. Residuals are in cm, as the landmark term's (engine.fitting),
so both sit in one Gauss-Newton system.

DepthRefiner runs that system after either engine's fit: the head pose and the expression move,
placed by the depth with the landmarks weighted low and the expression pulled loosely towards
the engine's (DepthSettings.solve_expression, expression_prior). The weights the depth finds fit
the surface better but read worse as blendshapes (bench/eval_rgbd.py), so capture.pipeline gives
the mesh the refined expression and the blendshapes the engine's. Over the first frames with
depth the identity is solved from the depth alone (the landmarks' own biases, a few mm where
MediaPipe's points and the model's disagree, would pass into it), together with those frames'
poses and expressions, and locked, sooner than landmarks alone allow; twenty frames later it is
solved once more over every second frame so far, and kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numba
import numpy as np

from engine.facemodel import FACE_VERTICES, FaceModel
from engine.fitting import FitResult, FitSettings, LandmarkBasis, gauss_newton_frame, gram, linearise
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
    solve_expression: bool = True       # refine the expression too (else pose and identity only); the mesh
                                        # takes it, the blendshapes keep the engine's (capture.pipeline)
    expression_prior: float = 8.0       # pulls the expression towards the engine's (cm² per unit²): loose,
                                        # the depth bends the mesh where no weight means it (0.5 did: bench/
                                        # eval_rgbd.py dev seeds 37 and 41, face vertices 2.36 with 0.5, 1.83 with 8)
    identity_frames: int = 10           # frames with depth before the identity locks
    identity_prior: float = 0.1         # per frame, against identity weights ~ N(0, 1)
    identity_refine_frames: int = 30    # > identity_frames: the identity is solved again over this many frames with
                                        # depth, starting from the locked one (0: not)
    identity_refine_rounds: int = 8     # Gauss-Newton steps of that second solve
    identity_refine_every: int = 2      # which of those frames it solves over: every second one, half the time
                                        # and as good (dev seeds 37 and 41, the identity's own error 1.09 / 1.20
                                        # mm over all thirty, 1.11 / 1.19 over fifteen, 1.13 / 1.21 over ten)
    identity_landmark_weight: float = 0.0  # the landmarks' part in shaping the identity (0: depth alone)
    identity_rounds: int = 32           # at lock time: Gauss-Newton steps on the identity and its frames' poses
                                        # (and expressions); it creeps on for tens of steps (dev seeds 37 and 41,
                                        # the identity's own error after 4/8/16/32 steps: 1.72/1.59/1.53/1.48 and
                                        # 1.95/1.74/1.61/1.49 mm)
    identity_expression_prior: float = 8.0  # > 0: those steps also solve each frame's expression, pulled to the
                                        # engine's with this weight (cm² per unit²); 0: the engine's held, whose
                                        # errors the identity then absorbs (dev seeds: given the true expression
                                        # there, the identity's own error fell 1.78 -> 1.28 mm)
    identity_gate_cm: float = 1.2       # the identity solve's gate: tighter than the pose's (a sample 2 cm off
                                        # has met another surface: the nose's side, the chin), wide enough for
                                        # sensor noise (0.5 cm dropped good samples of a noisy depth: bench/
                                        # eval_rgbd.py dev seeds 37 and 41, face vertices 2.5 -> 2.2 mm)
    landmark_expression: bool = False   # the landmarks shape the expression too (else the pose only: dev seeds,
                                        # face vertices 1.84 -> 1.89 and 1.77 -> 1.79 mm, the refinement 0.45 ms faster)
    landmark_weight: float = 0.03       # the landmarks' part in placing the head beside the depth: their
                                        # bias against the model turned the head and shaped the face wrong
    min_samples: int = 50               # fewer seen samples than this: the frame is left as fitted
    identity_spacing_cm: float = 0.45   # the identity solves' samples (DepthRefiner.identity_depth): denser
    identity_side_spacing_cm: float = 0.7  # than every frame's (0.6 and 1.0 cm), at no cost to the frames after
                                        # the lock (dev seeds 37 and 41, the identity's own error 1.25 -> 1.09
                                        # and 1.25 -> 1.20 mm)


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
    expression_per_sample: np.ndarray = field(init=False, repr=False)  # (S, 3, M): a sample's rows gathered fast
    identity_per_sample: np.ndarray = field(init=False, repr=False)    # (S, 3, K)

    def __post_init__(self):
        for name, modes in (("expression_per_sample", self.basis.expression),
                            ("identity_per_sample", self.basis.identity)):
            object.__setattr__(self, name, np.ascontiguousarray(np.transpose(modes, (1, 2, 0))))

    @classmethod
    def build(cls, model: FaceModel, n_identity: int = 60, spacing_cm: float = 0.6,
              side_spacing_cm: float = 1.0) -> "DepthBasis":
        vid = depth_sample_vertices(model, spacing_cm, side_spacing_cm)
        normals = vertex_normals(model.neutral.astype(np.float64), model.triangles)[vid]
        front = np.isin(vid, front_face_vertices(model, spacing_cm))
        return cls(LandmarkBasis.from_vertices(model, vid, n_identity), vid, normals, front)


def depth_at(depth_cm: np.ndarray, K: np.ndarray, uv_px: np.ndarray, step_px: int):
    """The depth surface at pixels uv_px (N, 2): points (N, 3) cm, unit normals (N, 3) towards
    the camera, and which of them are valid (N,) (in the image, depth there and at the four
    neighbours step_px away, no jump between them). A compiled loop: it runs several times a frame,
    and numpy's version spent most of its time gathering and stacking (N, 5) temporaries."""
    return _depth_at(np.ascontiguousarray(depth_cm), float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]),
                     np.ascontiguousarray(uv_px, np.float64), int(step_px))


@numba.njit(cache=True, nogil=True)
def _depth_at(depth, fx, fy, cx, cy, uv, s):
    H, W = depth.shape
    N = uv.shape[0]
    P = np.zeros((N, 3))
    normal = np.zeros((N, 3))
    ok = np.zeros(N, np.bool_)
    du = (0, -s, s, 0, 0)
    dv = (0, 0, 0, -s, s)
    x = np.empty(5)
    y = np.empty(5)
    z = np.empty(5)
    for i in range(N):
        u0 = np.rint(uv[i, 0])
        v0 = np.rint(uv[i, 1])
        inside = (u0 >= s) and (u0 < W - s) and (v0 >= s) and (v0 < H - s)
        u = int(u0) if inside else s
        v = int(v0) if inside else s
        for j in range(5):
            zz = np.float64(depth[v + dv[j], u + du[j]])
            z[j] = zz
            x[j] = (u + du[j] - cx) * zz / fx
            y[j] = (v + dv[j] - cy) * zz / fy
        P[i, 0], P[i, 1], P[i, 2] = x[0], y[0], z[0]
        ax, ay, az = x[2] - x[1], y[2] - y[1], z[2] - z[1]     # right - left
        bx, by, bz = x[4] - x[3], y[4] - y[3], z[4] - z[3]     # down - up
        nx, ny, nz = ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx
        norm = np.sqrt(nx * nx + ny * ny + nz * nz)
        zmin, zmax = z.min(), z.max()
        ok[i] = inside and zmin > 0 and zmax - zmin < 1.0 and norm > 0
        scale = (-1.0 if nz > 0 else 1.0) / max(norm, 1e-12)   # unit, towards the camera (-z)
        normal[i, 0], normal[i, 1], normal[i, 2] = nx * scale, ny * scale, nz * scale
    return P, normal, ok


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
        Jt[6:6 + M] = _directional(dbasis.expression_per_sample, idx, g)
    if solve_identity:
        Jt[rows - k:] = _directional(dbasis.identity_per_sample[:, :, :k], idx, g)
    return r * w, Jt * w


def _seen(dbasis: DepthBasis, R: np.ndarray, X: np.ndarray, n: np.ndarray, r: np.ndarray,
          settings: DepthSettings) -> np.ndarray:
    """(S,) which samples meet their own surface in the depth: near it, not at a grazing angle,
    and with a normal like the model's there (a sample hidden behind the nose or the chin
    meets theirs)."""
    agree = np.einsum("ij,ij->i", dbasis.normals @ R.T, n)
    return ((np.abs(r) < settings.gate_cm) & (-n[:, 2] > settings.min_normal_z) & (X[:, 2] > 0)
            & (agree > settings.min_normal_agreement))


def _directional(dirs: np.ndarray, idx: np.ndarray, g: np.ndarray) -> np.ndarray:
    """(Q, S): each model direction dirs (N, 3, Q) at samples idx (S,) dotted with g (S, 3)."""
    return np.matmul(g[:, None, :], dirs[idx])[:, 0].T


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
    locks it, and at settings.identity_refine_frames solves it once more over every
    settings.identity_refine_every-th of them."""

    landmarks: LandmarkBasis
    depth: DepthBasis
    settings: DepthSettings = field(default_factory=DepthSettings)
    identity_depth: DepthBasis | None = None    # the identity solves' samples (None: depth's)
    identity: np.ndarray | None = None
    identity_locked: bool = False
    _A: np.ndarray | None = None
    _b: np.ndarray | None = None
    _frames: int = 0
    _kept: list = field(default_factory=list)   # the identity frames: [lm, K, R, t, e, depth cm, e as first refined]

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
            return depth_linearise(self.depth, depth_cm, K, R, t, e, identity, s, solve_expression=s.solve_expression)

        R, t, e = fit.rotation, fit.translation, prior_e
        shift, seen = depth_shift_cm(self.depth, depth_cm, K, R, t, e, identity)
        if seen < s.min_samples:
            return fit, 0, float("nan")
        t = t + shift
        R, t, e = gauss_newton_frame(self.landmarks, lm, K, R, t, e, identity, fit_settings, s.iterations,
                                     lower=lower, upper=upper, extra=extra, expression_target=prior_e,
                                     solve_expression=s.solve_expression, landmark_weight=s.landmark_weight,
                                     landmark_expression=s.landmark_expression)
        settled = False
        if not self.identity_locked:
            self._kept.append([lm, K, R, t, e, depth_cm, e.copy()])
            identity = self._update_identity(lm, K, R, t, e, identity, depth_cm)
            if self.identity_locked:
                identity = self.identity = self._settle_identity(identity, s.identity_rounds)
                if len(self._kept) >= s.identity_refine_frames:
                    self._kept = []
            settled = True
        elif self._kept:
            self._kept.append([lm, K, R, t, e, depth_cm, e.copy()])
            if len(self._kept) >= s.identity_refine_frames:
                self._kept = self._kept[::s.identity_refine_every]
                identity = self.identity = self._settle_identity(identity, s.identity_refine_rounds)
                self._kept = []
                settled = True
        if settled:
            R, t, e = gauss_newton_frame(self.landmarks, lm, K, R, t, e, identity, fit_settings, 1,
                                         lower=lower, upper=upper, extra=extra, expression_target=prior_e,
                                         solve_expression=s.solve_expression, landmark_weight=s.landmark_weight,
                                         landmark_expression=s.landmark_expression)
        refined = FitResult(R, t, e, identity.copy(), fit.rms_px)
        residual_mm, seen = depth_residual_mm(self.depth, depth_cm, K, refined, s)
        return refined, seen, residual_mm

    def _update_identity(self, lm, K, R, t, e, identity, depth_cm) -> np.ndarray:
        """Add this frame's identity normal equations (depth, pose and expression held) and solve;
        lock after settings.identity_frames frames."""
        s = self.settings
        k = len(identity)
        H, g = self._frame_equations(lm, K, R, t, e, identity, depth_cm)
        A = H[6:, 6:]
        self._A += A
        self._b += A @ identity - g[6:]
        self._frames += 1
        self.identity = np.linalg.solve(self._A + s.identity_prior * self._frames * np.eye(k), self._b)
        self.identity_locked = self._frames >= s.identity_frames
        return self.identity

    def _settle_identity(self, identity: np.ndarray, rounds: int) -> np.ndarray:
        """Gauss-Newton on the identity and every identity frame's pose (and, with
        settings.identity_expression_prior, expression) together, the frames' unknowns eliminated by
        their Schur complement. Solving them in turn converges slowly:
        part of a face-shape error looks like a small turn or shift of the head, and a pose
        solved under the wrong face keeps it. Near its end the solve alternates between two nearby
        faces (consecutive steps point opposite ways), so the identity is the last two rounds' mean."""
        s = self.settings
        k = len(identity)
        frames = self._kept
        with_e = s.identity_expression_prior > 0
        M = self.landmarks.expression.shape[0] if with_e else 0
        engine_e = [frame[6] for frame in frames]
        last = identity
        for _ in range(rounds):
            S = s.identity_prior * len(frames) * np.eye(k)
            c = s.identity_prior * len(frames) * identity
            blocks = []
            for frame, e0 in zip(frames, engine_e):
                H, g = self._frame_equations(*frame[:5], identity, frame[5], solve_expression=with_e)
                q = 6 + M                  # the frame's own unknowns: pose, then expression
                Hpp = H[:q, :q] + 1e-6 * np.eye(q)
                gp = g[:q].copy()
                if with_e:                 # the expression's pull towards the engine's
                    Hpp[6:, 6:] += s.identity_expression_prior * np.eye(M)
                    gp[6:] += s.identity_expression_prior * (frame[4] - e0)
                Hpi = H[:q, q:]
                X = np.linalg.solve(Hpp, np.column_stack([Hpi, gp]))
                S += H[q:, q:] - Hpi.T @ X[:, :k]
                c += g[q:] - Hpi.T @ X[:, k]
                blocks.append(X)
            step = -np.linalg.solve(S, c)
            last, identity = identity, identity + step
            for frame, X in zip(frames, blocks):
                dp = -(X[:, k] + X[:, :k] @ step)
                frame[2] = rodrigues(dp[:3]) @ frame[2]
                frame[3] = frame[3] + dp[3:6]
                if with_e:
                    frame[4] = np.clip(frame[4] + dp[6:], 0.0, 1.0)
        return 0.5 * (last + identity)

    def _frame_equations(self, lm, K, R, t, e, identity, depth_cm, solve_expression: bool = False):
        """Normal equations H (q, q), g (q,) = J Jᵀ, J r of one frame over its pose[, expression] and the
        identity (q = 6 [+ M] + K), expression held unless solve_expression: the depth; the landmarks
        at settings.landmark_weight placing the head only (their few millimetres of bias against the
        model would pass into the face shape), so they add to the pose block alone; and, at
        settings.identity_landmark_weight, the landmarks shaping the face too."""
        s = self.settings
        dbasis = self.depth if self.identity_depth is None else self.identity_depth
        r, J = depth_linearise(dbasis, depth_cm, K, R, t, e, identity, replace(s, gate_cm=s.identity_gate_cm),
                               solve_expression=solve_expression, solve_identity=True)
        H, g = gram(J), J @ r
        if s.landmark_weight > 0:
            r1, J1 = linearise(self.landmarks, lm, K, R, t, e, identity, solve_expression=False)
            H[:6, :6] += s.landmark_weight * gram(J1)
            g[:6] += s.landmark_weight * (J1 @ r1)
        if s.identity_landmark_weight > 0:
            r1, J1 = linearise(self.landmarks, lm, K, R, t, e, identity, solve_expression=solve_expression,
                               solve_identity=True)
            H += s.identity_landmark_weight * gram(J1)
            g += s.identity_landmark_weight * (J1 @ r1)
        return H, g
