"""Eye patches and the eye-state net: geometry, resolution, and that the shipped net reads a wink."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine import eyestate as es
from engine.correspondence import LandmarkCorrespondence

PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "images" / "misc" / "emma.jpg"


def _eye_landmarks(outer_l, inner_l, outer_r, inner_r):
    lm = np.zeros((478, 2))
    (a, b), (c, d) = es.EYE_CORNERS
    lm[a], lm[b], lm[c], lm[d] = outer_l, inner_l, outer_r, inner_r
    return lm


def test_patch_runs_from_outer_to_inner_corner_and_mirrors_the_other_eye():
    """Each eye's corners land on the patch's horizontal midline, SPAN_X eye widths apart from its
    edges, outer corner left: the image's left-hand eye and its mirror image give the same patch."""
    lm = _eye_landmarks((60, 100), (90, 102), (170, 102), (140, 100))   # a face seen from the front
    for eye in (0, 1):
        A = es.patch_transform(lm, eye)
        outer, inner = (A[:, :2] @ lm[j] + A[:, 2] for j in es.EYE_CORNERS[eye])
        half = es.PATCH_W / es.SPAN_X / 2
        assert np.allclose(outer, [(es.PATCH_W - 1) / 2 - half, (es.PATCH_H - 1) / 2], atol=1e-9)
        assert np.allclose(inner, [(es.PATCH_W - 1) / 2 + half, (es.PATCH_H - 1) / 2], atol=1e-9)
    image = np.zeros((200, 230, 3), np.uint8)
    cv2.circle(image, (66, 96), 3, (255, 255, 255), -1)     # a mark above the left-hand eye's outer corner
    mirrored = image[:, ::-1].copy()                        # the mark is now by the right-hand eye's outer corner
    lm_m = lm.copy()
    lm_m[:, 0] = 229 - lm[:, 0]
    lm_m = _eye_landmarks(lm_m[es.EYE_CORNERS[1][0]], lm_m[es.EYE_CORNERS[1][1]],
                          lm_m[es.EYE_CORNERS[0][0]], lm_m[es.EYE_CORNERS[0][1]])
    p = es.warp_patch(image, es.patch_transform(lm, 0))
    q = es.warp_patch(mirrored, es.patch_transform(lm_m, 1))
    assert p.max() > 200 and np.argmax(p.max(axis=0)) < es.PATCH_W / 2 and np.abs(p.astype(int) - q).max() <= 2


def test_patch_holds_no_more_detail_than_the_resolution_asked():
    """warp_patch(resolution=r): fine stripes that the frame holds vanish at a quarter of its resolution;
    a large face at full resolution is halved (pyrDown) rather than aliased."""
    x = np.arange(800)
    image = np.repeat(((x // 2) % 2 * 255).astype(np.uint8)[None, :, None], 400, axis=0).repeat(3, axis=2)
    lm = _eye_landmarks((300, 200), (400, 200), (600, 200), (500, 200))
    A = es.patch_transform(lm, 0)           # 100 px eye: 48 patch px over 160 frame px
    sharp_enough = es.warp_patch(image, A).astype(float).std()
    blurred = es.warp_patch(image, A, resolution=0.25).astype(float).std()
    assert blurred < 5 and sharp_enough < 30       # 2 px stripes are below both patches' resolution: grey
    coarse = np.repeat(((x // 16) % 2 * 255).astype(np.uint8)[None, :, None], 400, axis=0).repeat(3, axis=2)
    assert es.warp_patch(coarse, A).astype(float).std() > 80      # 16 px stripes stay


def test_eye_corners_pair_with_the_iris_beside_them(model):
    """On a real photo each EYE_CORNERS pair surrounds IRIS_CENTRES' iris of the same index, and the
    subject's left eye (the model's +x side) is the image's right-hand eye of a face seen from the front."""
    from engine.gaze import IRIS_CENTRES
    from engine.landmarks import MediaPipeLandmarker

    image = cv2.cvtColor(cv2.imread(str(PHOTO)), cv2.COLOR_BGR2RGB)
    with MediaPipeLandmarker(static=True) as landmarker:
        lm = landmarker.detect(image)[:, :2]
    for eye, iris in enumerate(IRIS_CENTRES):
        mids = [(lm[a] + lm[b]) / 2 for a, b in es.EYE_CORNERS]
        assert np.argmin([np.linalg.norm(m - lm[iris]) for m in mids]) == eye
    left, right = es.subject_left_first(model, LandmarkCorrespondence.load())
    assert {left, right} == {0, 1}
    assert lm[es.EYE_CORNERS[left][0], 0] > lm[es.EYE_CORNERS[right][0], 0]


@pytest.mark.parametrize("kind", ["wink"])
def test_shipped_net_reads_which_eye_is_shut(model, kind):
    """On clean synthetic winks (seeds no training used), the shut eye reads closed, the open one open."""
    from trainers import synthesis as syn

    corr = LandmarkCorrespondence.load()
    assets = syn.SynthesisAssets.build(model, corr)
    closure = es.EyeClosure(es.subject_left_first(model, corr))
    names = model.expression_names
    cfg = syn.replace(syn.SynthesisConfig().clean(), flat_background=(0.4, 0.5, 0.45), yaw_deg=25.0)
    right = 0
    for seed in range(900_001, 900_007):
        s = syn.synthesize(np.random.default_rng(seed), model, corr, 128, cfg, expression_kind=kind, assets=assets)
        truth = s["expression"][[names.index("eyeBlink_L"), names.index("eyeBlink_R")]]
        read = closure(s["image"], s["landmarks"])
        shut, open_ = np.argmax(truth), np.argmin(truth)
        assert read.shape == (2,) and ((read >= 0) & (read <= 1)).all()
        right += read[shut] > 0.5 and read[open_] < 0.3
    assert right >= 5, right


def test_capture_pins_eyeblink_from_the_eye_net(model):
    """blink="eyes": the fit's eyeBlink weights are the net's reading of the frame's eyes (a photo: no
    filter, no automatic neutral, so they reach the output unchanged); the default (lids) and the fit
    leave the net out; an unknown source is refused."""
    from capture.pipeline import CaptureSettings, FaceCapture

    image = cv2.cvtColor(cv2.imread(str(PHOTO)), cv2.COLOR_BGR2RGB)
    corr = LandmarkCorrespondence.load()
    blink = [model.expression_names.index(n) for n in ("eyeBlink_L", "eyeBlink_R")]
    assert CaptureSettings().blink == "lids"
    capture = FaceCapture(model, corr, CaptureSettings(static=True, blink="eyes"))
    try:
        r = capture.process(image, 0.0)
        assert r.face_found
        np.testing.assert_allclose(r.expression[blink], capture.eye_closure(image, r.landmarks), atol=1e-6)
    finally:
        capture.close()
    for other in ("lids", "fit"):
        capture = FaceCapture(model, corr, CaptureSettings(static=True, blink=other))
        assert capture.eye_closure is None
        capture.close()
    with pytest.raises(ValueError, match="unknown blink source"):
        FaceCapture(model, corr, CaptureSettings(blink="lashes"))
