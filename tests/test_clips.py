"""Synthetic evaluation clips (trainers.clips): the frames render, and the ground truth describes them."""
from dataclasses import replace

import numpy as np
import pytest

from engine.arkit import arkit_from_model
from engine.correspondence import LandmarkCorrespondence
from engine.gaze import IRIS_LANDMARKS
from trainers.clips import ClipConfig, clip_rng, load_gt, render_clip, write_clips
from trainers.synthesis import SynthesisAssets, gaze_to_eye_look

NON_IRIS = np.setdiff1d(np.arange(478), IRIS_LANDMARKS)
GREY = (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def assets(model):
    return SynthesisAssets.build(model, LandmarkCorrespondence.load())


def test_clip_files_and_ground_truth_shapes(tmp_path, model):
    cfg = ClipConfig(width=160, height=120, flat_background=GREY)
    (folder,) = write_clips(tmp_path, 1, 2, seed=3, cfg=cfg, real_backgrounds=False, progress=False, model=model)
    assert (folder / "clip.avi").is_file()
    gt = load_gt(folder)
    shapes = {"identity": (60,), "identity_per_frame": (2, 60), "expression": (2, 53), "blendshapes": (2, 52),
              "gaze_rad": (2, 2, 2), "rotation": (2, 3, 3), "translation_cm": (2, 3), "head_ypr_rad": (2, 3),
              "K": (3, 3), "image_size": (2,), "landmarks": (2, 478, 2), "fps": ()}
    for name, shape in shapes.items():
        assert gt[name].shape == shape, name
    assert gt["image_size"].tolist() == [160, 120] and float(gt["fps"]) == 30.0
    assert np.allclose(gt["blendshapes"], arkit_from_model(gt["expression"], model.arkit_mapping()), atol=1e-6)
    # eyeLook labels follow the gaze the eyeballs were turned by, as synthesis labels them
    names = model.expression_names
    for f in range(2):
        for n, v in gaze_to_eye_look(gt["gaze_rad"][f]).items():
            assert gt["expression"][f, names.index(n)] == pytest.approx(v, abs=1e-6)
    assert np.allclose(gt["rotation"] @ gt["rotation"].transpose(0, 2, 1), np.eye(3), atol=1e-5)
    import cv2

    cap = cv2.VideoCapture(str(folder / "clip.avi"))
    ok, frame = cap.read()
    cap.release()
    assert ok and frame.shape == (120, 160, 3)


def test_clip_seeds_are_apart_from_training_seeds():
    a = clip_rng(0, 0).random(4)
    assert not np.allclose(a, np.random.default_rng([0, 0]).random(4))
    assert np.allclose(a, clip_rng(0, 0).random(4))   # reproducible


def test_ground_truth_projects_onto_the_rendered_face(assets):
    frames = []
    cfg = ClipConfig(width=320, height=240, flat_background=GREY)
    gt = render_clip(clip_rng(5, 0), assets, 2, cfg, on_frame=lambda i, img: frames.append(img))
    grey = np.round(np.array(GREY) * 255)
    for f, img in enumerate(frames):
        face = np.any(np.abs(img.astype(float) - grey) > 2, axis=2)   # the head covers these pixels
        uv = np.round(gt["landmarks"][f][NON_IRIS]).astype(int)
        inside = (uv[:, 0] >= 0) & (uv[:, 0] < 320) & (uv[:, 1] >= 0) & (uv[:, 1] < 240)
        assert inside.all()
        assert face[uv[:, 1], uv[:, 0]].mean() > 0.97
        # and the head is where the labels say: its pixels are around the landmarks, not elsewhere
        lo, hi = gt["landmarks"][f].min(axis=0), gt["landmarks"][f].max(axis=0)
        ys, xs = np.nonzero(face)
        assert abs(np.median(xs) - (lo[0] + hi[0]) / 2) < 0.25 * (hi[0] - lo[0])


def test_mediapipe_agrees_with_the_ground_truth_landmarks(assets):
    from capture.tracking import FaceTracker

    frames = []
    gt = render_clip(clip_rng(0, 1), assets, 1, ClipConfig(), on_frame=lambda i, img: frames.append(img))
    tracker = FaceTracker()
    try:
        lm = tracker.track(frames[0])
    finally:
        tracker.close()
    assert lm is not None, "MediaPipe found no face in a 640x480 clip frame"
    truth = gt["landmarks"][0]
    size = np.linalg.norm(truth.max(axis=0) - truth.min(axis=0))   # the face's landmark box diagonal
    err = np.linalg.norm(lm[NON_IRIS, :2] - truth[NON_IRIS], axis=1)
    assert err.mean() < 0.03 * size, f"mean {err.mean():.1f} px, face {size:.0f} px"


def test_scripted_performances_show_one_person_in_other_takes(assets, model):
    cfg = ClipConfig(width=160, height=120, flat_background=GREY, expression_key_s=0.1)
    takes = {p: render_clip(clip_rng(7, 2), assets, 31, replace(cfg, performance=p)) for p in ("neutral", "wink")}
    neutral, wink = takes["neutral"], takes["wink"]
    assert np.array_equal(neutral["identity"], wink["identity"])       # the same person, skin and light
    assert np.array_equal(neutral["sh"], wink["sh"]) and neutral["albedo_seed"] == wink["albedo_seed"]
    assert not np.allclose(neutral["rotation"], wink["rotation"])      # another take: other head motion
    assert not np.any(neutral["expression"]) and not np.any(neutral["gaze_rad"])
    names = model.expression_names
    blink_l, blink_r = (wink["expression"][:, names.index(n)] for n in ("eyeBlink_L", "eyeBlink_R"))
    # keys every 0.1 s at 30 frames/s: neutral, neutral, left, left, neutral, neutral, right, right, ...
    assert blink_l[6:10].min() == 1.0 and blink_r[6:10].max() == 0.0
    assert blink_r[18:22].min() == 1.0 and blink_l[18:22].max() == 0.0
    others = np.delete(wink["expression"], [names.index("eyeBlink_L"), names.index("eyeBlink_R")], axis=1)
    assert not np.any(others)
    with pytest.raises(ValueError, match="unknown performance"):
        render_clip(clip_rng(7, 2), assets, 2, replace(cfg, performance="dance"))
