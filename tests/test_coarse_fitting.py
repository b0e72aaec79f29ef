"""engine.coarse_fitting: CoarseNet as the per-frame fitter, on real frames of d3.mp4.

Two nets: a randomised one (tests/conftest.py) exported to an ONNX file, whose outputs
vary strongly with the input (so identity averaging and runtime agreement are not
checked on constants), and the committed weights in engine/weights/, which must give
a plausible face: a pose in front of the camera, near where MediaPipe sees the face.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.coarse_fitting import DEFAULT_WEIGHTS, CoarseFitter, CoarseWeightsError, open_runtime, runtime_for
from engine.correspondence import LandmarkCorrespondence
from engine.facemodel import DEFAULT_FACE_MODEL
from engine.fitting import LandmarkBasis, landmark_rms_px, linearise
from engine.pose import default_camera_matrix
from engine.runtime import AGREEMENT_TOLERANCE, OnnxRuntime, TorchRuntime, export_onnx

D3 = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos" / "d3.mp4"
pytestmark = pytest.mark.skipif(not (D3.is_file() and DEFAULT_FACE_MODEL.is_file()),
                                reason="shared video or face model missing")

N_FRAMES = 6
MP_OUTER_EYE_CORNERS = (33, 263)


@pytest.fixture(scope="module")
def d3(tracked_frames) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """The first frames (RGB), MediaPipe's 478 landmarks on them (px) and the default K."""
    frames, landmarks = tracked_frames(D3, N_FRAMES)
    h, w = frames[0].shape[:2]
    return frames, landmarks, default_camera_matrix(w, h)


@pytest.fixture(scope="module")
def basis(model) -> LandmarkBasis:
    return LandmarkBasis.from_correspondence(model, LandmarkCorrespondence.load())


@pytest.fixture(scope="module")
def random_onnx(randomised_net, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("coarsenet") / "random.onnx"
    export_onnx(randomised_net(0), path)
    return path


@pytest.fixture(scope="module")
def runtimes(random_onnx):
    """name -> ONNX Runtime on that net's file, opened the way FaceCapture opens it."""
    return {"random": open_runtime("onnx", random_onnx), "committed": open_runtime("onnx")}


def _fit_all(fitter: CoarseFitter, d3, pin=None) -> list:
    frames, landmarks, K = d3
    return [fitter.fit(lm, K, pin=pin, image=f) for f, lm in zip(frames, landmarks)]


@pytest.mark.parametrize("net", ["random", "committed"])
def test_fit_gives_a_rigid_pose_and_bounded_expression(net, runtimes, basis, d3, model):
    frames, landmarks, K = d3
    for lm, result in zip(landmarks, _fit_all(CoarseFitter(basis, runtimes[net]), d3)):
        R, t = result.rotation, result.translation
        assert R.shape == (3, 3) and t.shape == (3,)
        assert np.isfinite(R).all() and np.isfinite(t).all()
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-5)
        assert np.linalg.det(R) == pytest.approx(1.0, abs=1e-5)
        assert result.expression.shape == (model.n_expression,)
        assert ((result.expression >= 0) & (result.expression <= 1)).all()
        assert result.identity.shape == (60,) and np.isfinite(result.identity).all()
        want = landmark_rms_px(basis, lm[:, :2], K, R, t, result.expression, result.identity)
        assert result.rms_px == pytest.approx(want)
        if net == "committed":  # a random net may put the head anywhere, even behind the camera
            assert t[2] > 0


def test_committed_weights_put_the_face_where_mediapipe_sees_it(runtimes, basis, d3):
    """Interim weights measured 9-16 px rms at an inter-ocular distance of ~185 px (5-9%)."""
    _, landmarks, _ = d3
    for lm, result in zip(landmarks, _fit_all(CoarseFitter(basis, runtimes["committed"]), d3)):
        iod = np.linalg.norm(lm[MP_OUTER_EYE_CORNERS[0], :2] - lm[MP_OUTER_EYE_CORNERS[1], :2])
        assert result.rms_px < 0.2 * iod, (result.rms_px, iod)


def test_identity_is_the_running_mean_then_locks(runtimes, basis, d3):
    frames, landmarks, K = d3
    fitter = CoarseFitter(basis, runtimes["random"], identity_frames=3)
    own = [fitter.predict(f, lm, K)["identity"] for f, lm in zip(frames, landmarks)]
    assert np.abs(own[0] - own[1]).max() > 0.1  # the net's identity moves with the frame
    locked, identities = [], []
    for f, lm in zip(frames, landmarks):
        result = fitter.fit(lm, K, image=f)
        locked.append(fitter.identity_locked)
        identities.append(result.identity)
        np.testing.assert_array_equal(result.identity, fitter.identity)
    assert locked == [False, False, True, True, True, True]
    for n in (1, 2, 3):
        np.testing.assert_allclose(identities[n - 1], np.mean(own[:n], axis=0), rtol=1e-6, atol=1e-6)
    for later in identities[3:]:
        np.testing.assert_array_equal(later, identities[2])
    assert fitter.identity.dtype == np.float64
    fitter.lose_track()  # losing the face keeps the take's identity
    fitter.fit(landmarks[0], K, image=frames[0])
    np.testing.assert_array_equal(fitter.identity, identities[2])


def test_photo_identity_is_the_frames_own(runtimes, basis, d3):
    frames, landmarks, K = d3
    fitter = CoarseFitter(basis, runtimes["random"], identity_frames=1)
    result = fitter.fit(landmarks[4], K, image=frames[4])
    assert fitter.identity_locked
    np.testing.assert_array_equal(result.identity, fitter.predict(frames[4], landmarks[4], K)["identity"])


def test_pin_overrides_those_weights_only(runtimes, basis, d3, model):
    frames, landmarks, K = d3
    names = ("eyeLookOut_L", "eyeLookIn_R", "eyeLookUp_L")
    index = [model.expression_names.index(n) for n in names]
    seen = []

    def pin(R, t):
        seen.append((R, t))
        return dict(zip(index, (0.7, 0.0, 1.0)))

    free = _fit_all(CoarseFitter(basis, runtimes["random"]), d3)
    pinned = _fit_all(CoarseFitter(basis, runtimes["random"]), d3, pin=pin)
    assert len(seen) == N_FRAMES
    others = np.setdiff1d(np.arange(model.n_expression), index)
    for a, b, (R, t) in zip(free, pinned, seen):
        np.testing.assert_array_equal(b.expression[index], [0.7, 0.0, 1.0])
        np.testing.assert_array_equal(b.expression[others], a.expression[others])
        np.testing.assert_array_equal(R, b.rotation)  # the pin sees the pose the result has
        np.testing.assert_array_equal(t, b.translation)
        np.testing.assert_array_equal(a.rotation, b.rotation)
        assert not np.array_equal(a.expression[index], b.expression[index])


@pytest.mark.parametrize("net", ["random", "committed"])
def test_torch_and_onnx_runtimes_agree(net, randomised_net, random_onnx, basis, d3):
    frames, landmarks, K = d3
    if net == "random":
        onnx_rt, torch_rt = OnnxRuntime(random_onnx), TorchRuntime(randomised_net(0))
    else:
        onnx_rt, torch_rt = open_runtime("onnx"), open_runtime("torch")
        assert isinstance(torch_rt, TorchRuntime) and isinstance(onnx_rt, OnnxRuntime)
    a = CoarseFitter(basis, onnx_rt).fit(landmarks[2], K, image=frames[2])
    b = CoarseFitter(basis, torch_rt).fit(landmarks[2], K, image=frames[2])
    tol = AGREEMENT_TOLERANCE
    assert np.abs(a.identity - b.identity).max() <= tol["identity"]
    assert np.abs(a.expression - b.expression).max() <= tol["expression"]
    assert np.abs(a.rotation - b.rotation).max() <= tol["rotation"]
    assert np.linalg.norm(a.translation - b.translation) / np.linalg.norm(b.translation) <= tol["translation"]


def test_the_image_is_required(runtimes, basis, d3):
    _, landmarks, K = d3
    with pytest.raises(ValueError, match="needs the image"):
        CoarseFitter(basis, runtimes["committed"]).fit(landmarks[0], K)


def test_weights_ship_beside_the_engine():
    for kind, path in DEFAULT_WEIGHTS.items():
        assert path.is_file() and path.parent.name == "weights" and path.parent.parent.name == "engine", kind


@pytest.mark.parametrize("kind", ["onnx", "torch"])
def test_missing_weights_are_a_one_line_error_naming_the_file(kind, tmp_path):
    missing = tmp_path / "nowhere" / "coarsenet.onnx"
    with pytest.raises(CoarseWeightsError) as error:
        open_runtime(kind, missing)
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert str(missing) in message and "capture train coarse" in message


@pytest.mark.parametrize("kind", ["onnx", "torch"])
def test_unreadable_weights_are_a_one_line_error_naming_the_file(kind, tmp_path):
    bad = tmp_path / f"bad.{'onnx' if kind == 'onnx' else 'pt'}"
    bad.write_bytes(b"not a network\n" * 20)
    with pytest.raises(CoarseWeightsError) as error:
        open_runtime(kind, bad)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and str(bad) in message and "cannot read" in message


def test_unknown_runtime():
    with pytest.raises(ValueError, match="tensorrt"):
        open_runtime("tensorrt")


def test_pose_refinement_moves_only_the_pose_towards_the_landmarks(runtimes, basis, d3):
    _, landmarks, K = d3
    net_only = _fit_all(CoarseFitter(basis, runtimes["committed"], refine_iterations=0), d3)
    refined = _fit_all(CoarseFitter(basis, runtimes["committed"], refine_iterations=2), d3)

    def objective(lm, fit):  # what the Gauss-Newton steps minimise: weighted squared residuals, cm²
        r, _ = linearise(basis, lm[:, :2], K, fit.rotation, fit.translation, fit.expression, fit.identity, False)
        return r @ r

    for lm, a, b in zip(landmarks, net_only, refined):
        np.testing.assert_array_equal(a.expression, b.expression)
        np.testing.assert_array_equal(a.identity, b.identity)
        assert not np.allclose(a.rotation, b.rotation)
        assert objective(lm, b) < objective(lm, a)
        np.testing.assert_allclose(b.rotation @ b.rotation.T, np.eye(3), atol=1e-5)   # float32 from the net


def test_the_weights_file_picks_the_runtime():
    assert runtime_for(None) == "onnx" and runtime_for(DEFAULT_WEIGHTS["onnx"]) == "onnx"
    assert runtime_for("runs/x/coarsenet.pt") == "torch" and runtime_for(Path("a.pt")) == "torch"


def test_fit_from_picture_reads_no_landmarks_and_keeps_the_identity(runtimes, basis, d3):
    """A frame without landmarks: the crop from the given points, the net's landmark input all at
    the crop centre (engine.crop.unknown_landmarks_px); pose and expression are the net's for that
    input, the identity the take's (not averaged in), rms nan."""
    from engine.crop import apply_affine, crop_box, crop_camera, crop_image, crop_transform, unknown_landmarks_px

    frames, landmarks, K = d3
    runtime = runtimes["random"]
    fitter = CoarseFitter(basis, runtime, identity_frames=10)
    fitter.fit(landmarks[0], K, image=frames[0])
    identity = fitter.identity.copy()
    result = fitter.fit_from_picture(frames[1], landmarks[1][:, :2], K)
    np.testing.assert_array_equal(result.identity, identity)
    np.testing.assert_array_equal(fitter.identity, identity)
    assert np.isnan(result.rms_px) and fitter._frames_for_identity == 1
    S = runtime.input_size
    A = crop_transform(crop_box(landmarks[1][:, :2]), S)
    own = runtime.run(crop_image(frames[1], A, S)[None], crop_camera(K, A)[None].astype(np.float32),
                      unknown_landmarks_px(runtime.n_landmarks, S)[None])
    np.testing.assert_allclose(result.rotation, own["rotation"][0], atol=1e-6)
    np.testing.assert_allclose(result.expression, np.clip(own["expression"][0], 0, 1), atol=1e-6)
    tracked = fitter.predict(frames[1], landmarks[1], K)   # the landmarks do move this net's output
    assert np.abs(tracked["rotation"] - own["rotation"][0]).max() > 1e-3
    assert np.allclose(apply_affine(A, landmarks[1][:, :2]).mean(axis=0), (S - 1) / 2, atol=0.1 * S)
