"""capture.tracking through profile views: the region made from a fit, and a head turning to profile.

The turning head is the face model itself, rendered by trainers.clips (a neutral face, grey
background, 320x240) with a known yaw: from facing the camera to 88 degrees and back, with a cut
to an empty picture in between. FaceMesh alone loses it past about 80 degrees; followed from the
previous fit it is kept, marked with a confidence of at most 0.5. Held at full profile, where
MediaPipe's landmark model sees no face at all, CoarseNet fits it from the picture alone
(capture.pipeline.PICTURE_CONFIDENCE), until the picture holds no turned face.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from capture.pipeline import PICTURE_CONFIDENCE, CaptureSettings, FaceCapture
from capture.tracking import FOLLOW_CONFIDENCE, FOLLOW_SCALE, FaceTracker, FollowRegion, follow_region
from engine.correspondence import LandmarkCorrespondence
from engine.facemodel import DEFAULT_FACE_MODEL
from engine.fitting import LandmarkBasis
from engine.pose import default_camera_matrix, model_to_camera, project

pytestmark = pytest.mark.skipif(not DEFAULT_FACE_MODEL.is_file(), reason="face model missing")

SIZE = (320, 240)
DISTANCE_CM = 45.0
#: The performance: yaw (degrees) per frame; None is a picture without a face.
YAWS = [0, 16, 32, 48, 60, 68, 76, 80, 84, 88, 88, 88, 84, 80, 76, None, None, None, 0, 0]


@pytest.fixture(scope="module")
def points(model) -> np.ndarray:
    """The model's 478 landmark points (mean face, cm; x towards the subject's left)."""
    return LandmarkBasis.from_correspondence(model, LandmarkCorrespondence.load()).mean


def _region(points, yaw_deg=0.0, roll_deg=0.0) -> tuple[FollowRegion, np.ndarray]:
    K = default_camera_matrix(*SIZE)
    R = model_to_camera(math.radians(yaw_deg), 0.0, math.radians(roll_deg))
    t = np.array([0.0, 0.0, DISTANCE_CM])
    return follow_region(points, R, t, K), project(points @ R.T + t, K)


def test_region_of_a_face_facing_the_camera(points):
    region, uv = _region(points)
    lo, hi = uv.min(axis=0), uv.max(axis=0)
    assert region.centre_px == pytest.approx((lo + hi) / 2, abs=1e-6)
    assert region.side_px == pytest.approx(FOLLOW_SCALE * (hi - lo).max())
    assert region.rotation_rad == pytest.approx(0.0, abs=1e-6)
    assert region.front_px == (0.0, 0.0) and region.centres_px() == [region.centre_px]


@pytest.mark.parametrize("roll_deg", [-25.0, 12.0])
def test_region_turns_with_the_eye_line_as_mediapipe_measures_it(points, roll_deg):
    """MediaPipe turns its region by the angle of the line from landmark 33 to 263 (the outer eye
    corners) in the picture; the region from a fit turns the same way."""
    region, uv = _region(points, roll_deg=roll_deg)
    dx, dy = uv[263] - uv[33]
    assert region.rotation_rad == pytest.approx(math.atan2(dy, dx), abs=math.radians(1.0))
    assert abs(math.degrees(region.rotation_rad)) == pytest.approx(abs(roll_deg), abs=1.0)


@pytest.mark.parametrize("yaw_deg", [-88.0, 88.0])
def test_region_of_a_turned_face_boxes_its_visible_half(points, yaw_deg):
    """The region is the box of the half that shows. In profile, the hidden half's contour behind
    the ear can project beside the visible face (at +88 degrees: the box of all points starts 22 px
    further out, 172 px against 194 px)."""
    region, uv = _region(points, yaw_deg=yaw_deg)
    near = points[:, 0] * math.copysign(1.0, yaw_deg) < 0  # turned to its left (+yaw), its right half shows
    lo, hi = uv[near].min(axis=0), uv[near].max(axis=0)
    assert region.centre_px[0] == pytest.approx((lo[0] + hi[0]) / 2, abs=0.01 * region.side_px)
    if yaw_deg > 0:
        all_lo, all_hi = uv.min(axis=0), uv.max(axis=0)
        assert abs(region.centre_px[0] - (all_lo[0] + all_hi[0]) / 2) > 0.05 * region.side_px
    # a face turned to its own left looks towards the picture's right (an unmirrored camera)
    assert region.front_px[0] == pytest.approx(math.copysign(1.0, yaw_deg), abs=0.05)
    first, shifted = region.centres_px()
    assert (shifted[0] - first[0]) * yaw_deg > 0


def _render(model, yaws: list) -> list[np.ndarray]:
    """The neutral mean face at each yaw (degrees; None: an empty grey picture), RGB uint8."""
    from trainers.clips import render_frame
    from trainers.synthesis import SynthesisAssets, posed_vertices, sample_lighting, vertex_albedo

    assets = SynthesisAssets.build(model, LandmarkCorrespondence.load())
    K = default_camera_matrix(*SIZE)
    vertices = posed_vertices(assets, np.zeros(60, np.float32), np.zeros(model.n_expression, np.float32),
                              np.zeros((2, 2), np.float32))
    albedo, _ = vertex_albedo(assets, np.random.default_rng(0))
    sh, _, _ = sample_lighting(np.random.default_rng(0))
    background = np.full((SIZE[1], SIZE[0], 3), 0.5, np.float32)
    t = np.array([0.0, 0.0, DISTANCE_CM])
    empty = np.full((SIZE[1], SIZE[0], 3), 128, np.uint8)
    return [empty if yaw is None else
            render_frame(assets, vertices, model_to_camera(math.radians(yaw), 0.0, 0.0), t, K, albedo, sh, background)
            for yaw in yaws]


@pytest.fixture(scope="module")
def turning_head(model) -> list[np.ndarray]:
    """The pictures of YAWS, rendered once."""
    return _render(model, YAWS)


def _take(model, pictures, follow: bool, engine: str = "coarse") -> list:
    capture = FaceCapture(model, LandmarkCorrespondence.load(), CaptureSettings(follow_profiles=follow, engine=engine))
    try:
        return [capture.process(p, i / 30.0, i) for i, p in enumerate(pictures)]
    finally:
        capture.close()


def test_a_head_turning_to_profile_is_followed_and_marked(model, turning_head):
    before = _take(model, turning_head, follow=False)
    after = _take(model, turning_head, follow=True)
    face = np.array([yaw is not None for yaw in YAWS])
    lost = np.array([not r.face_found for r in before]) & face
    # FaceMesh alone: the face goes past 80 degrees and is not found again until it faces us
    assert lost.sum() >= 5 and all(abs(YAWS[i]) >= 76 for i in np.flatnonzero(lost))
    found = np.array([r.face_found for r in after])
    np.testing.assert_array_equal(found, face)  # every picture with a face, none without
    for i, (b, a) in enumerate(zip(before, after)):
        if b.face_found:  # FaceMesh's own frames: confidence 1, and the same fit until the first loss
            assert a.confidence == b.confidence == 1.0
            if i < np.argmax(lost):
                np.testing.assert_allclose(a.rotation, b.rotation, atol=1e-9)
    followed = [a for a, was_lost in zip(after, lost) if was_lost]
    assert all(0.0 < a.confidence <= FOLLOW_CONFIDENCE for a in followed)
    yaw_deg = np.degrees([a.head_ypr_rad[0] for a in followed])
    assert (yaw_deg > 10.0).all(), yaw_deg  # turned the right way; it reads low (measured 24-45 for 76-88)
    assert after[-1].confidence == 1.0  # facing us again, FaceMesh's own


def test_tracker_without_a_region_or_for_photos_does_not_follow(turning_head):
    profile = turning_head[YAWS.index(88)]
    with FaceTracker(static=True) as tracker:
        region = FollowRegion((160.0, 120.0), 150.0, 0.0)
        tracker.track(profile, lambda: region)  # photos: every picture on its own, no region tried
        assert tracker.mode != "follow" and tracker._follower is None
    with FaceTracker() as tracker:
        assert tracker.track(turning_head[-1]) is not None and tracker.mode == "full"
        assert tracker.track(turning_head[YAWS.index(None)], lambda: FollowRegion((160.0, 120.0), 150.0, 0.0)) is None
        assert tracker.mode != "follow"


#: Turned to full profile and held there, then an empty picture while the head is still turned.
HELD = [0, 40, 60, 72, 80, 86, 90, 90, 90, 90, 90, 90, None, None]


def test_a_head_held_in_full_profile_is_fitted_from_the_picture(model):
    pictures = _render(model, HELD)
    results = _take(model, pictures, follow=True)
    face = np.array([yaw is not None for yaw in HELD])
    np.testing.assert_array_equal([r.face_found for r in results], face)  # the empty pictures: no face
    from_picture = [r for r in results if r.from_picture]
    assert len(from_picture) >= 4  # MediaPipe sees no face at 90 degrees, even where it is told to look
    for r in from_picture:
        assert r.confidence == PICTURE_CONFIDENCE < FOLLOW_CONFIDENCE
        assert r.landmarks.shape == (478, 3)  # the fit's own points stand in for the tracker's
    held = np.degrees([r.head_ypr_rad[0] for r, yaw in zip(results, HELD) if yaw == 90])
    assert (held > 60.0).all(), held  # turned the right way and far (the 60-degree net read 40-50)
    # the optimiser needs landmarks: it never fits from the picture, so of a face held at 90 degrees it
    # keeps only what FaceMesh still reports where it is told to look (followed, at most FOLLOW_CONFIDENCE)
    fit = _take(model, pictures, follow=True, engine="fit")
    assert not any(r.from_picture for r in fit)
    held_fit = [r for r, yaw in zip(fit, HELD) if yaw == 90]
    assert all(0.0 < r.confidence <= FOLLOW_CONFIDENCE for r in held_fit if r.face_found)


def test_tracker_asks_for_the_region_only_when_facemesh_misses(turning_head):
    """A caller that fits frames later (run_take's batches) must finish the earlier fits before the
    tracker reads a region from them: so the region is asked for only on a frame FaceMesh misses."""
    asked = []

    def region():
        asked.append(True)
        return FollowRegion((160.0, 120.0), 150.0, 0.0)

    with FaceTracker() as tracker:
        assert tracker.track(turning_head[0], region) is not None and not asked
        assert tracker.track(turning_head[YAWS.index(None)], region) is None
        assert len(asked) == 1  # once per frame, though both the small-face search and the follow want it
        assert tracker.track(turning_head[YAWS.index(None)], lambda: None) is None  # nothing to follow
        assert tracker.mode != "follow"


class _Pictures:
    """Pictures as a recorded source at 30 frames/s."""

    live = False
    fps = 30.0
    camera_matrix = None

    def __init__(self, pictures):
        from capture.sources import Frame

        self.frames = [Frame(i, i / self.fps, p, "") for i, p in enumerate(pictures)]
        self.frame_count = len(pictures)

    def __iter__(self):
        return iter(self.frames)

    def close(self):
        pass


@pytest.mark.parametrize("yaws", [YAWS, HELD], ids=["turning", "held"])
def test_a_batched_take_gives_what_one_frame_at_a_time_gives(model, yaws, tmp_path):
    """run_take(batch=N): frames tracked ahead, CoarseNet on their crops in one pass, fitted in order.
    Through profiles followed from the previous fit, faces fitted from the picture alone and empty
    pictures, where the earlier frames must be finished before the next is tracked, the take's
    files are those of one frame at a time (the network's batched arithmetic aside)."""
    from capture.pipeline import run_take
    from capture.sinks import load_track

    pictures = _render(model, yaws)
    tracks = {}
    for batch in (1, 4):
        capture = FaceCapture(model, LandmarkCorrespondence.load(), CaptureSettings())
        try:
            summary = run_take(_Pictures(pictures), capture, tmp_path / str(batch), "none", progress=False,
                               batch=batch)
        finally:
            capture.close()
        assert summary.frames == len(yaws)
        tracks[batch] = load_track(tmp_path / str(batch) / "track.npz")
    one, batched = tracks[1], tracks[4]
    np.testing.assert_array_equal(batched["face_found"], [yaw is not None for yaw in yaws])
    np.testing.assert_array_equal(batched["face_found"], one["face_found"])
    np.testing.assert_array_equal(batched["confidence"], one["confidence"])  # followed and picture frames alike
    assert (batched["confidence"] < 1.0).sum() >= 4
    for name in ("blendshapes", "expression", "rotation", "translation", "landmarks68"):
        np.testing.assert_allclose(batched[name], one[name], atol=1e-4, err_msg=name)


def _video_frames(name: str, n: int) -> list[np.ndarray]:
    """The first n frames (RGB) of ../shared's video name.mp4, read as `capture video` reads it."""
    from itertools import islice

    from capture.sources import VideoSource

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos" / f"{name}.mp4"
    if not path.is_file():
        pytest.skip(f"shared video {name}.mp4 missing")
    with VideoSource(path) as source:
        frames = [frame.image for frame in islice(source, n)]
    assert len(frames) == n, f"{path} has fewer than {n} frames"
    return frames


def test_reset_forgets_the_face_facemesh_was_tracking():
    """After reset a new take's first frame gets what a fresh tracker gives it: FaceMesh's graph
    keeps the last frame's region, and without its own reset the next take's first landmarks
    came out up to 62 px off (d12's face, then d10's)."""
    first_take, next_take = _video_frames("d12", 5), _video_frames("d10", 1)
    with FaceTracker() as fresh:
        expected = fresh.track(next_take[0])
    with FaceTracker() as tracker:
        for rgb in first_take:
            assert tracker.track(rgb) is not None
        tracker.reset()
        got = tracker.track(next_take[0])
    assert expected is not None and got is not None
    np.testing.assert_array_equal(got, expected)
