"""Synthetic CoarseNet samples: labels reproduce the image, the expression mixture does what it says."""
import cv2
import numpy as np
import pytest
import torch

from engine.correspondence import LandmarkCorrespondence
from engine.crop import crop_box, crop_camera, crop_image
from engine.gaze import EyeModel, eye_look_weights, gaze_angles, lid_aperture
from engine.pose import model_to_camera, project
from engine.rasterizer import rasterize
from engine.shading import render as torch_render
from engine.shading import sh_basis
from trainers import synthesis as syn

FLAT = (0.35, 0.55, 0.45)


@pytest.fixture(scope="module")
def corr():
    return LandmarkCorrespondence.load()


@pytest.fixture(scope="module")
def assets(model, corr):
    return syn.SynthesisAssets.build(model, corr)


def clean_config(**kw):
    return syn.replace(syn.SynthesisConfig().clean(), flat_background=FLAT, **kw)


@pytest.fixture(scope="module")
def clean_samples(model, corr):
    """A few samples with no occluders and no camera effects over a flat background."""
    return [syn.synthesize(np.random.default_rng(10 + i), model, corr, 128, clean_config()) for i in range(4)]


def test_numpy_sh_basis_matches_torch():
    from engine import lighting, shading
    for name in ("SH_C0", "SH_C1", "SH_C2", "SH_C20", "SH_C22"):
        assert getattr(lighting, name) == getattr(shading, name)
    n = np.random.default_rng(0).normal(size=(100, 3))
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    assert np.abs(syn.sh_basis_np(n) - sh_basis(torch.from_numpy(n)).numpy()).max() < 1e-12


def test_directional_light_is_a_clamped_cosine():
    rng = np.random.default_rng(1)
    d = np.array([0.3, -0.5, -0.8])
    d /= np.linalg.norm(d)
    L = syn.directional_sh(d, [1.0, 0.5, 0.25])
    n = rng.normal(size=(2000, 3))
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    E = syn.sh_basis_np(n) @ L
    want = np.clip(n @ d, 0, None)[:, None] * [1.0, 0.5, 0.25]
    assert np.abs(E - want).max() < 0.1                  # 2nd-order SH of a clamped cosine errs by < 0.1
    assert np.corrcoef(E[:, 0], want[:, 0])[0, 1] > 0.99


def test_lighting_is_plausible():
    for i in range(50):
        sh, key_dir, _ = syn.sample_lighting(np.random.default_rng(i))
        front = syn.sh_basis_np(np.array([0.0, 0.0, -1.0])) @ sh   # a surface facing the camera
        assert sh.shape == (9, 3) and np.all(front > 0.1) and np.all(front < 4.0)
        assert np.all(np.abs(sh[0]) > np.abs(sh[4:]).max(axis=0))  # DC dominates band 2


def test_labels_reproduce_landmarks_pose_and_crop(model, corr, assets, clean_samples):
    for s in clean_samples:
        R, t, K = s["rotation"].astype(np.float64), s["translation_cm"].astype(np.float64), s["K_crop"]
        assert np.allclose(model_to_camera(*s["head_ypr_rad"].astype(np.float64)), R, atol=1e-5)
        assert np.allclose(crop_camera(s["K_frame"], s["crop_affine"]), K, rtol=1e-5, atol=1e-3)
        verts = syn.posed_vertices(assets, s["identity"], s["expression"], s["gaze_rad"])
        lm = project(syn.landmark_points(assets, verts) @ R.T + t, K.astype(np.float64))
        assert np.abs(lm - s["landmarks"]).max() < 1e-2
        # the plain model (no eyeball turn) gives the same points away from the irises
        plain = project(syn.landmark_points(assets, model.vertices(s["identity"], s["expression"])) @ R.T + t,
                        K.astype(np.float64))
        assert np.abs(plain[:468] - s["landmarks"][:468]).max() < 1e-2
        # the crop is the runtime's box around the landmarks, give or take the tracker jitter
        A = s["crop_affine"].astype(np.float64)
        frame_lm = (s["landmarks"] - A[:, 2]) / A[0, 0]
        side = crop_box(frame_lm)[2]
        assert 0.7 < 128 / A[0, 0] / side < 1.4
        assert s["landmark_visible"].mean() > 0.4


def test_mask_and_image_match_the_geometry(model, corr, assets, clean_samples):
    for s in clean_samples:
        R, t = s["rotation"].astype(np.float64), s["translation_cm"].astype(np.float64)
        verts = syn.posed_vertices(assets, s["identity"], s["expression"], s["gaze_rad"])
        frags = rasterize(verts @ R.T + t, assets.draw_triangles, s["K_crop"], 128, 128, backend="cpu")
        silhouette = frags.mask & (syn.image_coverage(s["crop_affine"], *s["frame_size"], 128) >= 0.5)
        mask = s["mask"].astype(bool)
        assert (mask & silhouette).sum() / (mask | silhouette).sum() > 0.97
        # the picture itself: the background shows exactly where the head does not
        changed = np.abs(s["image"].astype(int) - np.round(np.array(FLAT) * 255)).max(axis=2) > 3
        in_frame = syn.image_coverage(s["crop_affine"], *s["frame_size"], 128) > 0.99
        agree = (changed == mask)[in_frame]
        assert agree.mean() > 0.98


def test_image_is_the_labels_image_formation(model, corr, assets, clean_samples):
    """Re-render from the labels with engine.shading (torch) and compare the face's pixels."""
    for s in clean_samples:
        R, t = s["rotation"].astype(np.float64), s["translation_cm"].astype(np.float64)
        verts = syn.posed_vertices(assets, s["identity"], s["expression"], s["gaze_rad"])
        albedo, params = syn.vertex_albedo(assets, np.random.default_rng(int(s["albedo_seed"])))
        assert np.allclose(params["skin_rgb"], s["skin_rgb"])
        img, m = torch_render(torch.from_numpy(verts @ R.T + t), assets.draw_triangles,
                              torch.from_numpy(albedo).double(), torch.from_numpy(s["sh"]).double(), s["K_crop"],
                              128, 128, backend="cpu")
        srgb = syn.linear_to_srgb(img.numpy()) * 255
        core = m.numpy() & (s["mask"] > 0)
        core = cv2.erode(core.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        diff = np.abs(srgb - s["image"].astype(np.float64))[core]
        assert np.median(diff) < 2.0 and np.percentile(diff, 90) < 10.0


@pytest.mark.parametrize("frame, distance", [((320, 240), (60.0, 90.0)), ((1280, 720), (40.0, 60.0))])
def test_synthetic_crop_is_what_the_runtime_crop_would_show(model, corr, assets, frame, distance):
    """Render the whole frame, crop it with engine.crop, compare with the sample: the same picture,
    registered to a tenth of a pixel on average (a small face is upsampled, a large one shrunk
    through pyrDown; a quarter-pixel slip in the supersampling camera fails this)."""
    cfg = clean_config(frame_sizes=(frame,), distance_cm=distance)
    w, h = frame
    shifts = []
    for seed in range(4):
        s = syn.synthesize(np.random.default_rng(seed), model, corr, 128, cfg)
        R, t = s["rotation"].astype(np.float64), s["translation_cm"].astype(np.float64)
        verts = syn.posed_vertices(assets, s["identity"], s["expression"], s["gaze_rad"])
        albedo, _ = syn.vertex_albedo(assets, np.random.default_rng(int(s["albedo_seed"])))
        frags = rasterize(verts @ R.T + t, assets.draw_triangles, s["K_frame"], w, h, backend="cpu")
        linear, _, _ = syn.shade_pixels(frags, verts @ R.T + t, assets.draw_triangles, albedo, s["sh"])
        full = np.where(frags.mask[..., None], syn.linear_to_srgb(linear), np.array(FLAT, np.float32))
        crop = crop_image((full * 255).round().astype(np.uint8), s["crop_affine"].astype(np.float64), 128)
        assert np.abs(crop.astype(int) - s["image"].astype(int)).mean() < 1.5
        g1, g2 = (cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.float64) for x in (crop, s["image"]))
        shifts.append(cv2.phaseCorrelate(g1, g2)[0])
    shifts = np.array(shifts)
    assert np.abs(shifts).max() < 0.3 and np.abs(shifts.mean(axis=0)).max() < 0.08, shifts


def test_expression_components_do_what_they_say(model):
    names = model.expression_names
    ix = {n: i for i, n in enumerate(names)}
    rng = np.random.default_rng(0)
    for kind in syn.EXPRESSION_KINDS:
        for _ in range(25):
            e, gaze, k = syn.sample_expression(rng, names, kind)
            assert k == kind and e.shape == (53,) and e.dtype == np.float32
            assert e.min() >= 0.0 and e.max() <= 1.0
            assert e[ix["mouthClose"]] <= e[ix["jawOpen"]] + 1e-6
            blink = sorted([e[ix["eyeBlink_L"]], e[ix["eyeBlink_R"]]])
            if kind == "wink":
                assert blink[1] >= 0.75 and blink[0] <= 0.15
            if kind == "blink":
                assert blink[0] >= 0.5
            if kind == "smirk":
                smile = sorted([e[ix["mouthSmile_L"]], e[ix["mouthSmile_R"]]])
                assert smile[1] >= 0.4 and smile[0] <= 0.15 + 0.25   # the other side: at most the noise overlay
            if kind == "jaw_open":
                assert e[ix["jawOpen"]] >= 0.3
            if kind == "jaw_open_pucker":
                assert e[ix["jawOpen"]] >= 0.1 and max(e[ix["mouthFunnel"]], e[ix["mouthPucker"]]) >= 0.3
            if kind == "cheek_puff":
                assert max(e[ix["cheekPuff_L"]], e[ix["cheekPuff_R"]]) >= 0.4
            if kind == "neutral":
                assert np.sort(e)[-3:].max() < 0.35 or gaze.any()
            # eyeLook weights are the runtime's reading of the gaze
            look = eye_look_weights(gaze.astype(np.float64))
            assert all(abs(e[ix[n]] - v) < 1e-5 for n, v in look.items())


def test_mixture_frequencies(model):
    rng = np.random.default_rng(5)
    kinds = [syn.sample_expression(rng, model.expression_names)[2] for _ in range(3000)]
    for kind, p in syn.EXPRESSION_MIXTURE.items():
        assert abs(kinds.count(kind) / 3000 - p) < 0.025
    assert sum(syn.EXPRESSION_MIXTURE.values()) == pytest.approx(1.0)


def _project_front(assets, verts):
    R, t = model_to_camera(0.0, 0.0, 0.0), np.array([0.0, 0.0, 60.0])
    K = np.array([[1000.0, 0, 320], [0, 1000.0, 240], [0, 0, 1]])
    return project(syn.landmark_points(assets, verts) @ R.T + t, K), R, t, K


def _visible_eyeball_pixels(model, assets, verts):
    """(left, right) counts of sclera pixels a frontal camera sees."""
    R, t = model_to_camera(0.0, 0.0, 0.0), np.array([0.0, 0.0, 60.0])
    K = np.array([[1000.0, 0, 320], [0, 1000.0, 240], [0, 0, 1]])
    frags = rasterize(verts @ R.T + t, assets.draw_triangles, K, 640, 480, backend="cpu")
    tid = frags.triangle_id[frags.mask]
    counts = []
    for side in ("Left", "Right"):
        ids = set(assets.sclera_vertices[0 if side == "Left" else 1].tolist())
        on = np.array([assets.draw_triangles[k, 0] in ids for k in np.unique(tid)])
        counts.append(int(np.isin(tid, np.unique(tid)[on]).sum()))
    return counts


def test_a_wink_closes_one_eye_in_the_geometry(model, assets):
    names = model.expression_names
    rng = np.random.default_rng(2)
    rest = syn.landmark_points(assets, model.neutral)
    left_iris = 468 if rest[468, 0] > 0 else 473      # the subject's left eye has +x
    right_iris = 473 if left_iris == 468 else 468
    for _ in range(4):
        e, gaze, _ = syn.sample_expression(rng, names, "wink")
        lm, *_ = _project_front(assets, syn.posed_vertices(assets, np.zeros(60), e, gaze))
        ap_l, ap_r = lid_aperture(lm, left_iris), lid_aperture(lm, right_iris)
        closed_left = e[names.index("eyeBlink_L")] > e[names.index("eyeBlink_R")]
        shut, open_ = (ap_l, ap_r) if closed_left else (ap_r, ap_l)
        assert open_ > 0.25 and shut < 0.4 * open_
        # and in the picture: the shut eye's eyeball is (almost) hidden behind its lids
        seen = _visible_eyeball_pixels(model, assets, syn.posed_vertices(assets, np.zeros(60), e, gaze))
        shut_px, open_px = (seen[0], seen[1]) if closed_left else (seen[1], seen[0])
        assert open_px > 300 and shut_px < 0.15 * open_px


def test_eyeballs_turn_with_the_gaze_label(model, assets):
    """The iris turns about the eyeball's centre by the labelled angles, and engine.gaze reads its sign."""
    rest_pts = syn.landmark_points(assets, model.neutral)
    eyes = EyeModel.from_model(model, model.neutral, rest_pts[[468, 473]])
    for yaw, pitch in ((0.3, 0.0), (-0.25, 0.15), (0.0, -0.3)):
        gaze = np.array([[yaw, pitch], [yaw, pitch]])
        verts = syn.posed_vertices(assets, np.zeros(60), np.zeros(53), gaze)
        pts = syn.landmark_points(assets, verts)
        for i, iris in enumerate(eyes.iris_landmark):       # left eye first, as gaze_rad
            c = assets.eye_centre[i]
            d0, d1 = rest_pts[iris] - c, pts[iris] - c
            turned = np.arccos(np.clip(d0 @ d1 / np.linalg.norm(d0) / np.linalg.norm(d1), -1, 1))
            want = np.arccos(np.cos(yaw) * np.cos(pitch))   # how far Ry(yaw) Rx(pitch) turns the z axis
            assert abs(np.linalg.norm(d1) - np.linalg.norm(d0)) < 1e-4
            assert turned == pytest.approx(want, abs=0.05)
        lm, R, t, K = _project_front(assets, verts)
        read = gaze_angles(eyes, lm, R, t, K)
        # engine.gaze puts the eyeball centre at the sclera's vertex mean, ~4.5 mm in front of the sphere's
        # centre, so it reads these turns ~1.4x large; the direction must agree
        for got, want in zip(read.ravel(), gaze.ravel()):
            if abs(want) > 0.1:
                assert np.sign(got) == np.sign(want) and 0.8 < got / want < 1.7


def test_same_index_same_sample_and_different_indices_differ(model, corr):
    ds = syn.SyntheticFaces(10, seed=7, model=model, correspondence=corr, real_backgrounds=False)
    a, b, c = ds[3], ds[3], ds[4]
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert not np.array_equal(a["image"], c["image"]) and not np.array_equal(a["identity"], c["identity"])
    with pytest.raises(IndexError):
        ds[10]
    batch = torch.utils.data.default_collate([a, c])       # a torch DataLoader can batch the samples
    assert batch["image"].shape == (2, 128, 128, 3) and batch["albedo_seed"].dtype == torch.int64


def test_full_samples_are_not_degenerate_and_have_the_documented_fields(model, corr):
    ds = syn.SyntheticFaces(6, seed=1, model=model, correspondence=corr, real_backgrounds=False)
    shapes = {"image": (128, 128, 3), "identity": (60,), "expression": (53,), "gaze_rad": (2, 2),
              "rotation": (3, 3), "translation_cm": (3,), "K_crop": (3, 3), "sh": (9, 3), "landmarks": (478, 2),
              "landmark_visible": (478,), "landmark_occluded": (478,), "mask": (128, 128),
              "occluder_mask": (128, 128), "skin_rgb": (3,), "crop_affine": (2, 3)}
    for i in range(len(ds)):
        s = ds[i]
        for k, shape in shapes.items():
            assert s[k].shape == shape, k
        assert s["image"].dtype == np.uint8 and s["source"] == syn.SOURCE_SYNTHETIC
        face = s["mask"] > 0
        assert 0.1 < face.mean() < 0.95
        assert s["image"][face].std() > 4.0                    # not a flat blob
        assert s["image"][face].mean() > 15.0                  # not black
        assert 0.0 <= s["occlusion"] <= 1.0
        assert 20 < s["translation_cm"][2] < 130


def test_occluders_are_labelled(model, corr):
    names = ("glasses", "hand")
    for name in names:
        kw = {f"{n}_probability": 1.0 if n == name else 0.0 for n in ("glasses", "hand", "hair", "object")}
        cfg = syn.replace(syn.SynthesisConfig().clean(), flat_background=FLAT, **kw)
        s = syn.synthesize(np.random.default_rng(21), model, corr, 128, cfg)
        assert s["occluders"] == syn.OCCLUDER_BITS[name]
        assert s["occluder_mask"].sum() > 20 and 0.0 < s["occlusion"] < 1.0
        # the occluded-landmark label agrees with the occluder mask under the landmarks
        ij = np.clip(np.round(s["landmarks"]).astype(int), 0, 127)
        under = s["occluder_mask"][ij[:, 1], ij[:, 0]] > 0
        inside = s["landmark_visible"]
        assert (under == s["landmark_occluded"])[inside].mean() > 0.9
    clean = syn.synthesize(np.random.default_rng(21), model, corr, 128, clean_config())
    assert clean["occluder_mask"].sum() == 0 and clean["occlusion"] == 0.0 and clean["occluders"] == 0


def test_background_patches_avoid_faces():
    img = np.zeros((200, 300, 3), np.uint8)
    img[50:150, 100:200] = 255                                  # "the face"
    bank = syn.BackgroundBank([img], [np.array([[100, 50, 200, 150]])])
    rng = np.random.default_rng(0)
    for _ in range(30):
        p = bank.sample(rng, 64)
        assert p is not None and p.shape == (64, 64, 3) and p.max() < 0.01


def test_cli_writes_shards_and_a_sheet(tmp_path):
    assert syn.main(["--count", "3", "--out", str(tmp_path), "--no-real-backgrounds", "--shard-size", "2",
                     "--sheet", "3"]) == 0
    a, b = syn.read_shard(tmp_path / "shard-00000.npz"), syn.read_shard(tmp_path / "shard-00001.npz")
    assert a["image"].shape == (2, 128, 128, 3) and b["image"].shape == (1, 128, 128, 3)
    assert a["landmarks"].shape == (2, 478, 2) and b["occlusion"].shape == (1,)
    assert (tmp_path / "sheet.png").is_file()
    ds = syn.SyntheticFaces(3, seed=0, real_backgrounds=False)
    assert np.array_equal(ds[2]["image"], b["image"][0])


def test_tracked_landmarks_are_mediapipes_on_the_crop(clean_samples, tmp_path):
    """add_tracking: MediaPipe finds the clean faces, its points lie near the labelled ones (crop px:
    mapped back from the 2x enlargement);
    add_tracking_to_shards writes the same fields into shards that lack them, leaving only shards."""
    from engine.landmarks import MediaPipeLandmarker

    with MediaPipeLandmarker(static=True) as landmarker:
        tracked = [syn.add_tracking(dict(s), landmarker) for s in clean_samples]
    for s, t in zip(clean_samples, tracked):
        assert t["tracked"] and t["tracked_landmarks"].shape == (478, 2) and t["tracked_landmarks"].dtype == np.float32
        span = np.ptp(s["landmarks"], axis=0).max()   # the face's size in the crop (some samples turn 55°)
        error = np.linalg.norm(t["tracked_landmarks"] - s["landmarks"], axis=1)[s["landmark_visible"]].mean()
        assert error < 0.1 * span, (error, span)
    blank = syn.add_tracking({"image": np.zeros((128, 128, 3), np.uint8), "landmarks": clean_samples[0]["landmarks"]},
                             MediaPipeLandmarker(static=True))
    assert not blank["tracked"] and not blank["tracked_landmarks"].any()
    syn.write_shard(tmp_path / "shard-00000.npz", clean_samples)
    syn.add_tracking_to_shards(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.npz"]
    shard = syn.read_shard(tmp_path / "shard-00000.npz")
    assert shard["tracked"].all()
    assert np.allclose(shard["tracked_landmarks"], np.stack([t["tracked_landmarks"] for t in tracked]), atol=1e-3)


def test_yaw_limit_and_uniform_share_shape_the_poses():
    """SynthesisConfig.yaw_deg / yaw_uniform_share (--yaw-deg, --yaw-uniform): the default keeps yaw
    within 60 degrees, mostly near frontal; 90 with a uniform share of 1 reaches full profile, with
    about a third of the heads past 60 degrees."""
    def yaws(cfg):
        rng = np.random.default_rng(5)
        return np.degrees([syn._sample_pose(rng, cfg)[0] for _ in range(2000)])

    default = yaws(syn.SynthesisConfig())
    assert np.abs(default).max() <= 60.0 + 1e-9 and np.median(np.abs(default)) < 25.0
    profile = yaws(syn.SynthesisConfig(yaw_deg=90.0, yaw_uniform_share=1.0))
    assert np.abs(profile).max() <= 90.0 + 1e-9 and np.abs(profile).max() > 85.0
    assert 0.28 < np.mean(np.abs(profile) > 60.0) < 0.39


def test_cli_refuses_a_yaw_past_profile(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        syn.main(["--count", "1", "--out", str(tmp_path), "--yaw-deg", "120"])
    assert exc.value.code == 2 and "--yaw-deg" in capsys.readouterr().err


class _Finds:
    """A landmarker stand-in: detect gives its answer and counts the calls."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def detect(self, image, *region):
        self.calls.append(region)
        return self.answer


def test_track_crop_follows_a_lost_face_as_the_run_time_does():
    """Where FaceMesh finds no face, the follower (MediaPipe's landmark model alone) runs on the whole
    enlarged crop; its landmarks count when its face-presence score reaches ROI_MIN_PRESENCE."""
    from engine.landmarks import ROI_MIN_PRESENCE

    image = np.zeros((128, 128, 3), np.uint8)
    points = np.full((478, 3), 100.0, np.float32)   # px of the 2x crop -> (100 + 0.5) / 2 - 0.5 = 49.75
    lost = _Finds(None)
    sure, unsure = _Finds((points, ROI_MIN_PRESENCE)), _Finds((points, 0.5 * ROI_MIN_PRESENCE))
    lm = syn.track_crop(lost, image, follower=sure)
    assert lm is not None and np.allclose(lm, 49.75)
    assert sure.calls == [((127.5, 127.5), 256.0)]   # the whole 256 px crop, centred
    assert syn.track_crop(lost, image, follower=unsure) is None
    assert syn.track_crop(lost, image) is None      # no follower: as before
    found = _Finds(points)
    assert syn.track_crop(found, image, follower=sure) is not None and len(sure.calls) == 1   # not asked
