"""Small, distant faces: capture.tracking.FaceTracker and the pipeline on them.

Frames of d12.mp4 are shrunk so the face spans ~64 px and pasted into a grey
1280x720 picture. MediaPipe's own FaceMesh detector is short-range and misses
such faces; FaceTracker(small_faces=True) must find them (full-range detector,
then a crop) and keep following them frame after frame, with landmarks where
the full-size frame's landmarks land after the same shrink and shift.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from capture.pipeline import CaptureSettings, FaceCapture, run_take
from capture.sinks import load_track
from capture.sources import Frame, FrameSource
from capture.tracking import FaceTracker
from engine.correspondence import LandmarkCorrespondence
from engine.facemodel import DEFAULT_FACE_MODEL, FaceModel

D12 = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos" / "d12.mp4"
pytestmark = pytest.mark.skipif(not (D12.is_file() and DEFAULT_FACE_MODEL.is_file()),
                                reason="shared video or face model missing")

CANVAS_WH = (1280, 720)
SCALE = 0.32  # d12's face is ~200 px wide at 512x512: ~64 px after the shrink
N_FRAMES = 30
MP_OUTER_EYE_CORNERS = (33, 263)


def _paste(rgb: np.ndarray, x: int, y: int) -> np.ndarray:
    small = cv2.resize(rgb, None, fx=SCALE, fy=SCALE, interpolation=cv2.INTER_AREA)
    canvas = np.full((CANVAS_WH[1], CANVAS_WH[0], 3), 128, np.uint8)
    canvas[y:y + small.shape[0], x:x + small.shape[1]] = small
    return canvas


def _position(i: int) -> tuple[int, int]:
    """The pasted face drifts right and down a little every frame."""
    return 200 + 5 * i, 300 + 2 * i


@pytest.fixture(scope="module")
def d12(tracked_frames) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The first frames (RGB) and MediaPipe's landmarks on them at full size."""
    return tracked_frames(D12, N_FRAMES)


def _error_rel_iod(found: np.ndarray, reference: np.ndarray, x: int, y: int) -> float:
    """Median distance of the found landmarks from the shrunk, shifted reference, over its IOD."""
    want = reference[:, :2] * SCALE + np.array([x, y])
    iod = np.linalg.norm(want[MP_OUTER_EYE_CORNERS[0]] - want[MP_OUTER_EYE_CORNERS[1]])
    return float(np.median(np.linalg.norm(found[:, :2] - want, axis=1)) / iod)


def test_small_face_is_small(d12):
    frames, reference = d12
    widths = [np.ptp(r[:, 0]) * SCALE for r in reference]
    assert 55 < min(widths) and max(widths) < 75


@pytest.mark.parametrize("index", [0, 12, 24])
def test_single_small_face_needs_small_faces(d12, index):
    frames, reference = d12
    x, y = 600, 300
    picture = _paste(frames[index], x, y)
    with FaceTracker(static=True, small_faces=True) as tracker:
        found = tracker.track(picture)
        assert found is not None
        assert tracker.mode == "crop"
    assert found.shape == (478, 3)
    assert _error_rel_iod(found, reference[index], x, y) < 0.05  # measured 1-2.5%
    # measured: the short-range FaceMesh alone misses all 30 of 10 frames x 3 places tried
    with FaceTracker(static=True, small_faces=False) as tracker:
        assert tracker.track(picture) is None


def test_small_face_is_tracked_through_a_sequence(d12):
    frames, reference = d12
    errors, modes = [], []
    with FaceTracker(static=False, small_faces=True) as tracker:
        for i, rgb in enumerate(frames):
            x, y = _position(i)
            found = tracker.track(_paste(rgb, x, y))
            assert found is not None, f"lost the face at frame {i}"
            modes.append(tracker.mode)
            errors.append(_error_rel_iod(found, reference[i], x, y))
    assert set(modes) == {"crop"}
    assert max(errors) < 0.05, np.round(errors, 3)  # measured at most 2.7%
    with FaceTracker(static=False, small_faces=False) as tracker:
        assert all(tracker.track(_paste(rgb, *_position(i))) is None for i, rgb in enumerate(frames))


class _Pictures(FrameSource):
    """A list of RGB pictures as a recorded source at 25 fps."""

    def __init__(self, pictures):
        self.pictures = pictures
        self.fps = 25.0
        self.frame_count = len(pictures)
        self.size = (pictures[0].shape[1], pictures[0].shape[0])

    def __iter__(self):
        for i, picture in enumerate(self.pictures):
            yield Frame(i, i / self.fps, picture, "")


@pytest.fixture(scope="module")
def face_model() -> FaceModel:
    return FaceModel.load()


def test_pipeline_fits_small_face_where_it_is(d12, face_model, tmp_path):
    """The whole pipeline (the landmark optimiser, whose figures these are) on 12 small-face
    frames and on the same frames at full size: a face on every frame, the small fit's 68
    landmarks where the full fit's land after the shrink and shift, and the small face
    fitted far away; nothing at all when small faces are switched off."""
    frames, _ = d12
    corr = LandmarkCorrespondence.load()
    n = 12
    small = [_paste(f, *_position(i)) for i, f in enumerate(frames[:n])]
    tracks = {}
    for name, pictures in (("full", frames[:n]), ("small", small)):
        capture = FaceCapture(face_model, corr, CaptureSettings(filtering=False, engine="fit"))
        try:
            summary = run_take(_Pictures(pictures), capture, tmp_path / name, "none", progress=False)
        finally:
            capture.close()
        assert summary.frames == summary.faces == n
        tracks[name] = load_track(tmp_path / name / "track.npz")
        assert tracks[name]["face_found"].all()

    offset = np.array([_position(i) for i in range(n)], np.float64)[:, None, :]
    want = tracks["full"]["landmarks68"] * SCALE + offset
    iod = np.linalg.norm(want[:, 36] - want[:, 45], axis=1)  # iBUG outer eye corners, ~40 px
    err = np.median(np.linalg.norm(tracks["small"]["landmarks68"] - want, axis=2), axis=1) / iod
    assert err.max() < 0.05, np.round(err, 3)  # measured at most 3.2%

    # A pinhole camera puts the same head (focal 1280 px, picture shrunk 0.32x) 7.8x as far
    # away as at full size (focal 512 px). Measured 6.4x: the identity fitted from 64 px
    # faces is a head ~18% smaller (the size/distance ambiguity of a monocular fit).
    ratio = np.median(tracks["small"]["translation"][:, 2] / tracks["full"]["translation"][:, 2])
    expected = (CANVAS_WH[0] / 512) / SCALE
    assert 0.75 < ratio / expected < 1.1, ratio

    capture = FaceCapture(face_model, corr, CaptureSettings(small_faces=False))
    try:
        summary = run_take(_Pictures(small[:5]), capture, None, progress=False)
    finally:
        capture.close()
    assert summary.frames == 5 and summary.faces == 0


class _LiveBlank(_Pictures):
    """Blank pictures from a live source (no face: quick to process)."""

    live = True


def test_live_take_keeps_per_frame_records_of_its_newest_frames_only(face_model, monkeypatch):
    """Hours of live streaming must not grow memory: a live take's stage timings and frames without a
    face are kept for its last LIVE_HISTORY_FRAMES frames; a recorded take keeps every frame's."""
    import capture.pipeline as pipeline

    monkeypatch.setattr(pipeline, "LIVE_HISTORY_FRAMES", 4)
    blank = [np.zeros((96, 96, 3), np.uint8)] * 10
    capture = FaceCapture(face_model, LandmarkCorrespondence.load(), CaptureSettings())
    try:
        live = run_take(_LiveBlank(blank), capture, None, progress=False, queue_size=len(blank))
        recorded = run_take(_Pictures(blank), capture, None, progress=False)
    finally:
        capture.close()
    assert live.frames == recorded.frames == 10 and live.dropped == 0
    assert list(live.frames_without_face) == [6, 7, 8, 9]
    assert all(len(live.timings_s[stage]) == 4 for stage in pipeline.STAGES)
    assert list(recorded.frames_without_face) == list(range(10))
    assert all(len(recorded.timings_s[stage]) == 10 for stage in pipeline.STAGES)


def test_both_engines_give_results_of_the_same_shapes(d12, face_model):
    """CoarseNet (the default) and the landmark optimiser fill the same FrameResult fields with
    arrays of the same shapes, time themselves under the same stage names, and lock identity."""
    frames, _ = d12
    corr = LandmarkCorrespondence.load()
    shapes, stages = {}, {}
    for engine in ("coarse", "fit"):
        capture = FaceCapture(face_model, corr, CaptureSettings(engine=engine, identity_frames=2))
        try:
            results = [capture.process(f, i / 25.0, i) for i, f in enumerate(frames[:3])]
            assert capture.fitter.identity_locked
        finally:
            capture.close()
        assert all(r.face_found and np.isfinite(r.rms_px) for r in results)
        np.testing.assert_array_equal(results[1].identity, results[2].identity)
        shapes[engine] = {k: np.shape(v) for k, v in vars(results[-1]).items() if isinstance(v, np.ndarray)}
        stages[engine] = set(results[-1].timings_s)
        assert results[-1].timings_s["fit"] > 0
    assert CaptureSettings().engine == "coarse"
    assert shapes["coarse"] == shapes["fit"] and len(shapes["fit"]) == 10
    assert stages["coarse"] == stages["fit"] == {"landmarks", "fit", "filter"}


def test_coarse_engine_without_weights_names_the_file(face_model, tmp_path):
    from engine.coarse_fitting import CoarseWeightsError

    corr = LandmarkCorrespondence.load()
    missing = tmp_path / "coarsenet.onnx"
    with pytest.raises(CoarseWeightsError, match="coarsenet.onnx"):
        FaceCapture(face_model, corr, CaptureSettings(coarse_weights=missing))
    FaceCapture(face_model, corr, CaptureSettings(engine="fit", coarse_weights=missing)).close()  # needs none
    with pytest.raises(ValueError, match="unknown engine"):
        FaceCapture(face_model, corr, CaptureSettings(engine="fine"))


# ----------------------------------------------------------------------------- RGB-D frames

BIWI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rgbd" / "biwi01"


@pytest.mark.skipif(not BIWI.is_dir(), reason=f"the BIWI RGB-D frames are not at {BIWI}")
def test_depth_refines_real_kinect_frames(face_model):
    """On BIWI's Kinect frames the colour-only fit sits centimetres off the measured surface (a face's
    distance from its apparent size); with the depth, within about a millimetre of it."""
    from capture.sources import RGBDFolderSource
    from engine.depth_fit import depth_residual_mm
    from engine.fitting import FitResult

    with RGBDFolderSource(BIWI) as source:
        frames = list(source)
        K = source.camera_matrix
    capture = FaceCapture(face_model, LandmarkCorrespondence.load(), CaptureSettings(filtering=False))
    try:
        colour = [capture.process(f.image, f.time_s, f.index, camera_matrix=K) for f in frames]
        capture.reset()
        rgbd = [capture.process(f.image, f.time_s, f.index, f.depth_mm, K) for f in frames]
    finally:
        capture.close()
    for frame, c, d in zip(frames, colour, rgbd):
        assert c.face_found and d.face_found
        assert c.depth_samples == 0 and np.isnan(c.depth_residual_mm)
        assert d.depth_samples > 300 and d.depth_residual_mm < 2.5
        before, _ = depth_residual_mm(capture.depth_basis, frame.depth_mm * np.float32(0.1), K,
                                      FitResult(c.rotation, c.translation, c.expression, c.identity, 0.0),
                                      capture.settings.depth)
        assert np.isnan(before) or before > 4 * d.depth_residual_mm
        # the face's distance agrees with the depth under the nose tip's landmark (index 1)
        u, v = np.rint(d.landmarks[1, :2]).astype(int)
        nose_cm = frame.depth_mm[v - 2:v + 3, u - 2:u + 3]
        nose_cm = np.median(nose_cm[nose_cm > 0]) / 10
        tip = capture.basis.points(d.identity, d.expression)[1] @ d.rotation.T + d.translation
        assert abs(tip[2] - nose_cm) < 0.5


def test_with_depth_the_mesh_takes_the_depths_expression_and_the_blendshapes_the_engines(face_model):
    """The depth refines the expression for the mesh; its weights fit the surface but read worse as
    blendshapes, so those stay the engine's: the same as the colour-only take's on the same frames
    (CoarseNet's expression does not depend on the identity or the depth), apart from the eyes' gaze
    and blink, which are pinned at each take's own head pose."""
    from capture.sources import RGBDFolderSource
    from engine.arkit import ARKIT_NAMES, arkit_from_model

    with RGBDFolderSource(BIWI) as source:
        frames = list(source)
        K = source.camera_matrix
    takes = {}
    for name in ("colour", "rgbd"):  # a capture each: MediaPipe's tracking state starts alike
        capture = FaceCapture(face_model, LandmarkCorrespondence.load(),
                              CaptureSettings(filtering=False, auto_neutral=False))
        try:
            takes[name] = [capture.process(f.image, f.time_s, f.index, f.depth_mm if name == "rgbd" else None, K)
                           for f in frames]
        finally:
            capture.close()
    colour, rgbd = takes["colour"], takes["rgbd"]
    mapping = face_model.arkit_mapping()
    not_eyes = [i for i, name in enumerate(ARKIT_NAMES) if not name.startswith(("eyeLook", "eyeBlink"))]
    for c, d in zip(colour, rgbd):
        np.testing.assert_allclose(c.blendshapes, arkit_from_model(c.expression, mapping), atol=1e-12)
        np.testing.assert_allclose(d.blendshapes[not_eyes], c.blendshapes[not_eyes], atol=1e-9)
        assert np.abs(d.expression - c.expression).max() > 0.01  # the mesh's weights moved with the depth


def _photo_fits(face_model, image, engine: str, sources) -> dict:
    """{source: FrameResult} of one photo fitted by `engine` with each expression source; only "merged"
    gives the fitter the landmark MLP."""
    out = {}
    for source in sources:
        capture = FaceCapture(face_model, LandmarkCorrespondence.load(),
                              CaptureSettings(engine=engine, static=True, expression=source))
        try:
            out[source] = capture.process(image, 0.0)
            assert (capture.fitter.landmark_expression is not None) == (source == "merged")
        finally:
            capture.close()
    return out


def _not_pinned(face_model) -> np.ndarray:
    """(M,) bool: the shapes neither gaze nor blink pins at the pose."""
    return np.array([not (n.startswith("eyeLook") or n.startswith("eyeBlink")) for n in face_model.expression_names])


def test_coarse_expression_takes_the_landmark_mlps_shapes_and_the_networks_others(d12, face_model):
    """expression="merged" (the default): on a photo (no filter, no automatic neutral) the shapes the
    MLP took over read what it reads from the frame's landmarks, the others what the network alone
    ("network") gives; gaze and blink are pinned at the pose either way, so they are left out."""
    from engine.landmark_expression import LandmarkExpression

    frames, _ = d12
    corr = LandmarkCorrespondence.load()
    assert CaptureSettings().expression == "merged"
    out = _photo_fits(face_model, frames[0], "coarse", ("merged", "network"))
    free = _not_pinned(face_model)
    reg = LandmarkExpression.load()
    assert (reg.use & free).any() and out["merged"].face_found
    want = reg.predict(out["merged"].landmarks[:, :2])
    np.testing.assert_allclose(out["merged"].expression[reg.use & free], want[reg.use & free], atol=1e-6)
    np.testing.assert_allclose(out["merged"].expression[~reg.use & free],
                               out["network"].expression[~reg.use & free], atol=1e-6)
    assert np.abs(out["merged"].expression[reg.use & free] - out["network"].expression[reg.use & free]).max() > 0.01
    with pytest.raises(ValueError, match="unknown expression source"):
        FaceCapture(face_model, corr, CaptureSettings(expression="guess"))


def test_fit_engine_reads_every_shape_with_the_landmark_mlp(d12, face_model):
    """engine="fit" with the default expression ("merged"): every weight but the pinned gaze and blink
    is the MLP's reading of the frame's landmarks; "solve" leaves the optimiser to solve them itself
    (and gives other weights); a source the engine cannot use is refused in one line."""
    from engine.landmark_expression import LandmarkExpression

    frames, _ = d12
    corr = LandmarkCorrespondence.load()
    out = _photo_fits(face_model, frames[0], "fit", ("merged", "solve"))
    free = _not_pinned(face_model)
    assert out["merged"].face_found and out["solve"].face_found
    want = LandmarkExpression.load().predict(out["merged"].landmarks[:, :2])
    np.testing.assert_allclose(out["merged"].expression[free], want[free], atol=1e-9)
    assert np.abs(out["solve"].expression[free] - want[free]).max() > 0.05
    for engine, source in (("fit", "network"), ("coarse", "solve")):
        with pytest.raises(ValueError, match=f"expression source '{source}' needs the"):
            FaceCapture(face_model, corr, CaptureSettings(engine=engine, expression=source))
