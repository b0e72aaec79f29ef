"""engine.fitting: pose, expression and identity from 2D landmarks.

The synthetic recovery test generates a take from the real face model and the committed
MediaPipe correspondence (one random identity, sparse random expressions, a smooth random walk
of head poses, 0.5 px landmark noise) and checks what the TakeFitter recovers once the
identity has locked.
"""
from __future__ import annotations


import numpy as np
import pytest


from engine.correspondence import LandmarkCorrespondence
from engine.facemodel import FACE_VERTICES
from engine.fitting import FitSettings, LandmarkBasis, TakeFitter, gram, initial_pose
from engine.gaze import IRIS_LANDMARKS
from engine.pose import default_camera_matrix, model_to_camera, project, rotation_to_axis_angle

W, H = 640, 480
N_FRAMES, IDENTITY_FRAMES, MEASURED = 30, 20, 10
NOISE_PX = 0.5



@pytest.fixture(scope="module")
def basis(model) -> LandmarkBasis:
    # as the pipeline builds it: the iris landmarks take no part (gaze is solved apart)
    return LandmarkBasis.from_correspondence(model, LandmarkCorrespondence.load(), exclude=IRIS_LANDMARKS)


def _rotation_error_deg(R_fit, R_true) -> float:
    return float(np.degrees(np.linalg.norm(rotation_to_axis_angle(R_fit @ R_true.T))))


# ---------------------------------------------------------------- the synthetic take


def _synthetic_take(model, basis, seed=0):
    rng = np.random.default_rng(seed)
    K = default_camera_matrix(W, H)
    identity = np.zeros(basis.identity.shape[0])
    identity[:20] = rng.normal(0.0, 1.0, 20)
    M = model.n_expression
    expression = np.zeros((N_FRAMES, M))
    for f in range(N_FRAMES):
        active = rng.choice(M, 5, replace=False)
        expression[f, active] = rng.uniform(0.0, 0.8, 5)
    # a smooth random walk of the head: angular velocity and velocity with inertia
    limit = np.radians(25.0)
    angles, omega = np.radians(rng.uniform(-10.0, 10.0, 3)), np.zeros(3)
    pos, vel = np.r_[rng.uniform(-3.0, 3.0, 2), rng.uniform(50.0, 65.0)], np.zeros(3)
    ypr, trans = np.zeros((N_FRAMES, 3)), np.zeros((N_FRAMES, 3))
    for f in range(N_FRAMES):
        omega = 0.8 * omega + rng.normal(0.0, np.radians(1.5), 3)
        angles = np.clip(angles + omega, -limit, limit)
        vel = 0.8 * vel + rng.normal(0.0, [0.3, 0.3, 1.0])
        pos = pos + vel
        pos[:2] = np.clip(pos[:2], -5.0, 5.0)
        pos[2] = np.clip(pos[2], 45.0, 70.0)
        ypr[f], trans[f] = angles, pos
    rotations = np.array([model_to_camera(*a) for a in ypr])
    landmarks = np.array([project(basis.points(identity, expression[f]) @ rotations[f].T + trans[f], K)
                          for f in range(N_FRAMES)])
    landmarks += rng.normal(0.0, NOISE_PX, landmarks.shape)
    return K, identity, expression, rotations, trans, landmarks


@pytest.fixture(scope="module")
def recovery(model, basis):
    """Fit the take frame by frame; the figures of the last MEASURED frames (identity locked)."""
    K, identity, expression, rotations, trans, landmarks = _synthetic_take(model, basis)
    assert np.all((landmarks >= 0) & (landmarks < [W, H]))   # the face stays in the picture
    look = [i for i, n in enumerate(model.expression_names) if n.startswith("eyeLook")]
    fitter = TakeFitter(basis, FitSettings(identity_frames=IDENTITY_FRAMES))
    results, locked_at = [], None
    for f in range(N_FRAMES):
        # as in the pipeline, the eyeLook lid shapes are pinned to the gaze, here the true one
        pin = lambda R, t, f=f: {i: float(expression[f, i]) for i in look}
        results.append(fitter.fit(landmarks[f], K, pin=pin))
        if fitter.identity_locked and locked_at is None:
            locked_at = f
    face = np.arange(FACE_VERTICES.stop)
    figs = {k: [] for k in ("rotation_deg", "translation_mm", "vertex_mm", "expression_mae", "neutral_mae",
                            "rms_px")}
    for f in range(N_FRAMES - MEASURED, N_FRAMES):
        r = results[f]
        figs["rotation_deg"].append(_rotation_error_deg(r.rotation, rotations[f]))
        figs["translation_mm"].append(10.0 * np.linalg.norm(r.translation - trans[f]))
        true_v = model.vertices(identity, expression[f])[face] @ rotations[f].T + trans[f]
        fit_v = model.vertices(r.identity, r.expression)[face] @ r.rotation.T + r.translation
        figs["vertex_mm"].append(10.0 * np.linalg.norm(true_v - fit_v, axis=1).mean())
        figs["expression_mae"].append(np.abs(r.expression - expression[f]).mean())
        figs["neutral_mae"].append(np.abs(expression[f]).mean())   # what "no expression at all" scores
        figs["rms_px"].append(r.rms_px)
    out = {k: float(np.mean(v)) for k, v in figs.items()}
    out["max_rotation_deg"] = float(np.max(figs["rotation_deg"]))
    out["locked_at"] = locked_at
    out["results"] = results
    out["expression"] = expression
    return out


def test_recovery_figures(recovery, capsys):
    r = recovery
    with capsys.disabled():
        print(f"\nsynthetic take, last {MEASURED} of {N_FRAMES} frames: rotation {r['rotation_deg']:.2f} deg "
              f"(max {r['max_rotation_deg']:.2f}), translation {r['translation_mm']:.1f} mm, "
              f"face vertices {r['vertex_mm']:.1f} mm, expression MAE {r['expression_mae']:.3f} "
              f"(neutral face scores {r['neutral_mae']:.3f}), landmark rms {r['rms_px']:.2f} px")
    assert r["locked_at"] == IDENTITY_FRAMES - 1
    for res in r["results"]:
        assert np.all(np.isfinite(res.rotation)) and np.all(np.isfinite(res.translation))
        assert np.all((res.expression >= 0.0) & (res.expression <= 1.0))
    # identity is fixed once locked
    for res in r["results"][IDENTITY_FRAMES:]:
        np.testing.assert_array_equal(res.identity, r["results"][-1].identity)


def test_recovery_head_rotation(recovery):
    """Sub-millimetre landmark noise over a ~15 cm face: the head rotation within a degree."""
    assert recovery["rotation_deg"] < 1.0, recovery["rotation_deg"]


def test_recovery_head_translation(recovery):
    assert recovery["translation_mm"] < 10.0, recovery["translation_mm"]


def test_recovery_face_vertices(recovery):
    """Identity is not fully observable from 2D landmarks: a few mm over the face, posed."""
    assert recovery["vertex_mm"] < 5.0, recovery["vertex_mm"]


def test_recovery_expressions(recovery):
    """The expression weights must say clearly more than a neutral face does."""
    assert recovery["expression_mae"] < 0.03, (recovery["expression_mae"], recovery["neutral_mae"])


# ---------------------------------------------------------------- exact data


@pytest.mark.parametrize("ypr_deg,t", [((0, 0, 0), (0.0, 0.0, 60.0)),
                                       ((22, -17, 11), (4.0, -3.0, 50.0)),
                                       ((-25, 20, -12), (-5.0, 3.0, 70.0))])
def test_exact_pose_from_exact_landmarks(model, basis, ypr_deg, t):
    rng = np.random.default_rng(7)
    identity = np.zeros(basis.identity.shape[0])
    identity[:20] = rng.normal(0.0, 1.0, 20)
    K = default_camera_matrix(W, H)
    R = model_to_camera(*np.radians(ypr_deg))
    t = np.asarray(t)
    lm = project(basis.points(identity, np.zeros(model.n_expression)) @ R.T + t, K)
    fitter = TakeFitter(basis, identity=identity)
    assert fitter.identity_locked
    for _ in range(2):   # from scratch, then tracked from the previous frame
        res = fitter.fit(lm, K)
        np.testing.assert_allclose(res.rotation, R, atol=1e-6)
        np.testing.assert_allclose(res.translation, t, atol=1e-6)
        np.testing.assert_allclose(res.expression, 0.0, atol=1e-6)
        np.testing.assert_array_equal(res.identity, identity)
        assert res.rms_px < 1e-6


def test_exact_expression_from_exact_landmarks(model, basis):
    """Known identity, a few well-observed shapes: the solver recovers them from exact
    landmarks (prior switched off: it is there for real landmarks and shrinks on purpose)."""
    names = model.expression_names
    e = np.zeros(model.n_expression)
    for n, v in {"jawOpen": 0.5, "mouthSmile_L": 0.6, "browDown_R": 0.4, "eyeBlink_L": 0.7}.items():
        e[names.index(n)] = v
    K = default_camera_matrix(W, H)
    R, t = model_to_camera(*np.radians([10.0, -5.0, 3.0])), np.array([1.0, 0.5, 55.0])
    lm = project(basis.points(np.zeros(basis.identity.shape[0]), e) @ R.T + t, K)
    res = TakeFitter(basis, FitSettings(expression_prior=1e-6), identity=np.zeros(basis.identity.shape[0])).fit(lm, K)
    np.testing.assert_allclose(res.expression, e, atol=0.02)
    assert _rotation_error_deg(res.rotation, R) < 0.05


# ---------------------------------------------------------------- bounds and pins


def test_expressions_stay_within_bounds_on_bad_landmarks(model, basis):
    """Landmarks no face can make (5 px noise, then a squashed face) still give weights in [0, 1]."""
    rng = np.random.default_rng(3)
    K = default_camera_matrix(W, H)
    R, t = model_to_camera(0.2, 0.1, 0.0), np.array([0.0, 0.0, 60.0])
    lm = project(basis.points(np.zeros(60), np.zeros(model.n_expression)) @ R.T + t, K)
    fitter = TakeFitter(basis, FitSettings(identity_frames=3))
    for f in range(6):
        noisy = lm + rng.normal(0.0, 5.0, lm.shape)
        if f >= 3:
            noisy = (noisy - noisy.mean(axis=0)) * [1.3, 0.6] + noisy.mean(axis=0)
        res = fitter.fit(noisy, K)
        assert np.all(res.expression >= 0.0) and np.all(res.expression <= 1.0)
        assert np.all(np.isfinite(res.identity))
        assert res.expression.max() > 0.0   # the fit did use the shapes


def test_pinned_weight_is_exact(model, basis):
    names = model.expression_names
    i = names.index("eyeLookDown_L")
    j = names.index("jawOpen")
    e = np.zeros(model.n_expression)
    e[j] = 0.6
    K = default_camera_matrix(W, H)
    R, t = model_to_camera(0.1, 0.0, 0.0), np.array([0.0, 0.0, 60.0])
    lm = project(basis.points(np.zeros(60), e) @ R.T + t, K)
    calls = []

    def pin(R_, t_):
        calls.append((R_.copy(), t_.copy()))
        return {i: 0.3, j: 0.6}

    fitter = TakeFitter(basis, FitSettings(identity_frames=2))
    for _ in range(3):
        res = fitter.fit(lm, K, pin=pin)
        assert res.expression[i] == 0.3
        assert res.expression[j] == 0.6
    assert len(calls) == 3   # once per fit
    assert all(np.allclose(c[0] @ c[0].T, np.eye(3)) for c in calls)   # with a head pose (a rotation)
    # pinning 0 keeps a weight at 0 even where the landmarks ask for it
    res = TakeFitter(basis, identity=np.zeros(60)).fit(lm, K, pin=lambda R_, t_: {j: 0.0})
    assert res.expression[j] == 0.0


def test_held_expression_is_the_readers_and_the_pose_is_still_solved(model, basis):
    """With a landmark_expression reader, every weight is its reading (the pinned one the pin's) and the
    fit solves the head pose around it: given the true weights, the pose comes out right."""
    K, identity, expression, rotations, trans, landmarks = _synthetic_take(model, basis, seed=3)
    look = model.expression_names.index("eyeLookDown_L")

    class Reader:  # duck-types engine.landmark_expression.LandmarkExpression: the true weights, in order
        calls = 0

        def predict(self, points_px):
            assert points_px.shape == (len(basis.mean), 2)
            self.calls += 1
            return expression[self.calls - 1]

    reader = Reader()
    fitter = TakeFitter(basis, FitSettings(identity_frames=IDENTITY_FRAMES),
                        landmark_expression=reader)
    errors = []
    for f in range(N_FRAMES):
        res = fitter.fit(landmarks[f], K, pin=lambda R_, t_: {look: 0.25})
        want = expression[f].copy()
        want[look] = 0.25
        np.testing.assert_array_equal(res.expression, want)
        errors.append(_rotation_error_deg(res.rotation, rotations[f]))
    assert reader.calls == N_FRAMES
    assert fitter.identity_locked
    assert np.median(errors[-MEASURED:]) < 1.0, errors
    # the same landmarks with every weight read as 0: held at 0, not solved back from the landmarks
    zero = TakeFitter(basis, identity=identity, landmark_expression=type("Zero", (), {
        "predict": lambda self, p: np.zeros(model.n_expression)})())
    assert not zero.fit(landmarks[0], K).expression.any()
    assert TakeFitter(basis, identity=identity).fit(landmarks[0], K).expression.max() > 0.1


# ---------------------------------------------------------------- pieces


def test_project_and_initial_pose(model, basis):
    K = default_camera_matrix(W, H)
    pts = np.array([[0.0, 0.0, 50.0], [10.0, -5.0, 100.0]])
    np.testing.assert_allclose(project(pts, K), [[319.5, 239.5], [319.5 + 64.0, 239.5 - 32.0]])
    R, t = model_to_camera(0.0, 0.0, 0.0), np.array([2.0, -1.0, 55.0])
    lm = project(basis.points(np.zeros(60), np.zeros(model.n_expression)) @ R.T + t, K)
    R0, t0 = initial_pose(basis, lm, K)
    np.testing.assert_array_equal(R0, model_to_camera(0.0, 0.0, 0.0))
    assert np.linalg.norm(t0 - t) < 0.05 * t[2]   # the right place and the right distance, roughly


def test_landmark_basis_points_match_the_mesh(model):
    corr = LandmarkCorrespondence.load()
    basis = LandmarkBasis.from_correspondence(model, corr, n_identity=10, exclude=(0, 5))
    assert basis.mean.shape == (478, 3) and basis.identity.shape == (10, 478, 3)
    assert basis.expression.shape == (model.n_expression, 478, 3)
    assert basis.weight[0] == 0.0 and basis.weight[5] == 0.0 and np.all(basis.weight[[1, 2, 3]] > 0)
    rng = np.random.default_rng(0)
    a, e = rng.normal(size=10), rng.uniform(size=model.n_expression) * 0.3
    v = model.vertices(a, e).astype(np.float64)
    want = np.einsum("nij,ni->nj", v[model.triangles[corr.triangle]], corr.barycentric.astype(np.float64))
    np.testing.assert_allclose(basis.points(a, e), want, atol=1e-4)
    b68 = LandmarkBasis.from_vertices(model, model.landmark68_vertices, n_identity=10)
    np.testing.assert_allclose(b68.points(a, e), v[model.landmark68_vertices], atol=1e-4)


def test_identity_locks_after_the_configured_frames_and_survives_lost_track(model, basis):
    K = default_camera_matrix(W, H)
    rng = np.random.default_rng(5)
    identity = np.zeros(60)
    identity[:10] = rng.normal(0.0, 1.0, 10)
    R, t = model_to_camera(0.1, 0.05, 0.0), np.array([0.0, 0.0, 60.0])
    lm = project(basis.points(identity, np.zeros(model.n_expression)) @ R.T + t, K)
    fitter = TakeFitter(basis, FitSettings(identity_frames=4))
    seen = []
    for _ in range(6):
        fitter.fit(lm, K)
        seen.append(fitter.identity_locked)
    assert seen == [False, False, False, True, True, True]
    kept = fitter.identity.copy()
    assert np.linalg.norm(kept) > 0.1       # it did estimate something
    fitter.lose_track()
    fitter.fit(lm, K)
    np.testing.assert_array_equal(fitter.identity, kept)


def test_gram_is_the_jacobians_product_with_itself():
    rng = np.random.default_rng(0)
    for rows, n in ((6, 50), (119, 1500)):
        Jt = rng.normal(size=(rows + 3, n))[:rows]          # a row slice, as gauss_newton_frame passes
        H = gram(Jt)
        np.testing.assert_allclose(H, Jt @ Jt.T, rtol=1e-12, atol=1e-9)
        assert np.array_equal(H, H.T)
