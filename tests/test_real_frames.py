"""Real frame pairs: built from a short stretch of a real video, both crops of a pair share one box and
one K_crop, and the stored flow explains the motion between them."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.crop import CROP_MARGIN, CROP_PX, crop_camera, crop_image, image_coverage
from engine.pose import default_camera_matrix
from trainers import real_frames as rf

VIDEO = rf.DEFAULT_VIDEO_DIR / "d3.mp4"
N_FRAMES = 10


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not VIDEO.is_file():
        pytest.skip(f"{VIDEO} not found")
    out = tmp_path_factory.mktemp("pairs")
    assert rf.main(["--out", str(out), "--videos", str(VIDEO), "--max-frames", str(N_FRAMES),
                    "--pairs-per-video", "0"]) == 0
    return out


@pytest.fixture(scope="module")
def pairs(built):
    return rf.load_pairs(built / "train")


@pytest.fixture(scope="module")
def frames():
    cap = cv2.VideoCapture(str(VIDEO))
    out = [cv2.cvtColor(cap.read()[1], cv2.COLOR_BGR2RGB) for _ in range(N_FRAMES)]
    cap.release()
    return out


def test_cli_writes_the_training_split_only_for_a_training_video(built, pairs):
    assert sorted(p.name for p in (built / "train").iterdir()) == ["shard-00000.npz"]
    assert not (built / "heldout").exists()
    assert rf.split_of("x/d12.mp4") == rf.split_of("d20.mp4") == "heldout" and rf.split_of(VIDEO) == "train"
    assert set(pairs) == set(rf.PAIR_FIELDS)


def test_pair_shapes_and_indices(pairs):
    P, S = len(pairs["crops"]), CROP_PX
    assert P == N_FRAMES - 1                       # the face is found in every frame of d3's start
    assert pairs["crops"].shape == (P, 2, S, S, 3) and pairs["crops"].dtype == np.uint8
    assert pairs["landmarks"].shape == (P, 2, 478, 2) and pairs["landmarks"].dtype == np.float32
    assert pairs["K_crop"].shape == (P, 3, 3)
    assert pairs["flow"].shape == (P, S, S, 2) and pairs["flow"].dtype == np.float16
    assert pairs["inside"].shape == (P, S, S) and pairs["inside"].mean() > 0.5
    assert not pairs["inside"].all()               # d3 is a face crop already: the box leaves the frame
    assert list(pairs["video"]) == ["d3"] * P
    assert np.array_equal(pairs["frame_index"], np.stack([np.arange(P), np.arange(1, P + 1)], 1))
    assert np.array_equal(rf.video_groups(np.array(["b", "a", "b"])), [1, 0, 1])


def test_both_crops_share_frame_a_box_and_camera(pairs, frames):
    """K_crop is crop_camera(K, A) for one affine A; cropping both frames with that A reproduces both crops,
    and A is frame a's landmark box (its landmarks' extent fills the crop less the margins)."""
    h, w = frames[0].shape[:2]
    K = default_camera_matrix(w, h)
    for i in (0, len(pairs["crops"]) - 1):
        Kc = pairs["K_crop"][i].astype(np.float64)
        A = (Kc @ np.linalg.inv(K))[:2]
        assert np.allclose(crop_camera(K, A), Kc, atol=1e-3)
        a, b = pairs["frame_index"][i]
        for j, n in enumerate((a, b)):
            diff = np.abs(crop_image(frames[n], A).astype(int) - pairs["crops"][i, j].astype(int))
            assert diff.max() <= 1                 # float32 K round trip
        coverage = image_coverage(A, w, h)
        assert (coverage[pairs["inside"][i]] > 0.999).all()
        assert pairs["crops"][i][:, coverage == 0].max() == 0                  # black outside the frame
        lm = pairs["landmarks"][i, 0]
        lo, hi = lm.min(0), lm.max(0)
        assert np.allclose((lo + hi) / 2, (CROP_PX - 1) / 2, atol=0.05)
        assert (hi - lo).max() == pytest.approx(CROP_PX / (1 + 2 * CROP_MARGIN), abs=0.05)
        assert not np.allclose(pairs["landmarks"][i, 1], lm)       # frame b's points, in the same crop


def test_flow_explains_the_motion(pairs):
    """Warping crop b by the flow a -> b looks more like crop a than crop b itself does."""
    for i in range(len(pairs["crops"])):
        a = pairs["crops"][i, 0].astype(np.float32)
        b = pairs["crops"][i, 1]
        warped = rf.warp_by_flow(b, pairs["flow"][i]).astype(np.float32)
        before = np.abs(a - b.astype(np.float32)).mean()
        after = np.abs(a - warped).mean()
        assert after < 0.75 * before, (i, before, after)
    assert np.abs(pairs["flow"].astype(np.float32)).max() < 10.0       # 30 fps: a few px at most


def test_select_evenly():
    assert list(rf.select_evenly(10, 3)) == [0, 4, 9] or list(rf.select_evenly(10, 3)) == [0, 5, 9]
    assert list(rf.select_evenly(4, 10)) == [0, 1, 2, 3]
    assert list(rf.select_evenly(4, None)) == [0, 1, 2, 3]


def test_optical_flow_recovers_a_shift():
    """A textured image shifted by (2, -1) px: DIS finds that flow in the interior."""
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 255, (160, 160, 3)).astype(np.uint8), (0, 0), 2.0)
    a = img[16:144, 16:144]
    b = img[16 + 1:144 + 1, 16 - 2:144 - 2]        # b(x) = a(x - (2, -1)): a(x) = b(x + (2, -1))
    flow = rf.optical_flow(a, b)
    assert np.allclose(np.median(flow[20:-20, 20:-20].reshape(-1, 2), axis=0), [2.0, -1.0], atol=0.2)
    assert Path(rf.DEFAULT_VIDEO_DIR).name == "videos"
