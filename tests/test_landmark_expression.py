"""The landmark-expression MLP: alignment, the numpy forward pass, its weights file, and what the
shipped weights read from MediaPipe's landmarks on rendered faces."""
import numpy as np
import pytest

from engine import landmark_expression as lx
from engine.correspondence import LandmarkCorrespondence


def _similar(points, angle, scale, shift):
    c, s = np.cos(angle), np.sin(angle)
    return scale * points @ np.array([[c, s], [-s, c]]) + shift


def test_aligned_shape_forgets_place_size_and_in_plane_turn_but_not_mirroring():
    rng = np.random.default_rng(0)
    ref = lx.aligned_shape(rng.normal(size=(478, 2)))
    shape = ref + 0.05 * rng.normal(size=ref.shape)
    a = lx.aligned_shape(shape, ref)
    b = lx.aligned_shape(_similar(shape, 2.5, 37.0, [300.0, -40.0]), ref)
    np.testing.assert_allclose(a, b, atol=1e-9)
    np.testing.assert_allclose(a.mean(axis=0), 0.0, atol=1e-12)
    assert np.sqrt((a ** 2).sum() / len(a)) == pytest.approx(1.0)
    assert np.abs(a - ref).mean() < 0.05             # turned onto the reference, not left as it was
    mirrored = lx.aligned_shape(shape * [-1.0, 1.0], ref)
    assert np.abs(mirrored - a).mean() > 0.3          # a mirror image is not a turn
    np.testing.assert_allclose(lx.aligned_shape(np.stack([shape, shape * 2.0]), ref), np.stack([a, a]), atol=1e-9)


def test_numpy_forward_is_the_trainers_torch_mlp_and_survives_a_round_trip(tmp_path):
    """to_regressor(torch MLP) then predict() gives what the torch module gives (tanh GELU, clamp);
    save/load keeps every number; merge takes the `use` shapes from the landmarks, the rest from the net."""
    import torch

    from trainers.train_landmark_expression import build_mlp, to_regressor

    rng = np.random.default_rng(1)
    torch.manual_seed(0)
    mlp = build_mlp(2 * 478, 53).eval()
    with torch.no_grad():
        mlp[-1].bias.add_(0.3)                       # some outputs inside (0, 1), not all clamped
    ref = lx.aligned_shape(rng.normal(size=(478, 2)))
    mean = 0.01 * rng.normal(size=(478, 2))
    reg = to_regressor(mlp, ref, mean, np.arange(53) < 20)
    points = rng.normal(size=(3, 478, 2)) * 40 + 200
    with torch.no_grad():
        want = mlp(torch.from_numpy(reg.features(points))).clamp(0, 1).numpy()
    got = reg.predict(points)
    assert ((got > 0) & (got < 1)).any()
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(reg.predict(points[1]), got[1], atol=1e-5)   # float32 sums, another order
    reg.save(tmp_path / "w.npz")
    back = lx.LandmarkExpression.load(tmp_path / "w.npz")
    np.testing.assert_array_equal(back.predict(points), got)
    assert (back.use == reg.use).all() and back.n_expression == 53
    net = np.full(53, 0.7)
    merged = back.merge(net, points[0])
    np.testing.assert_allclose(merged[:20], got[0, :20], atol=1e-5)
    assert (merged[20:] == 0.7).all()


def test_unreadable_weights_are_one_line_errors(tmp_path):
    with pytest.raises(lx.LandmarkExpressionError, match="not found"):
        lx.LandmarkExpression.load(tmp_path / "none.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(lx.LandmarkExpressionError, match="is not a landmark-expression weights file"):
        lx.LandmarkExpression.load(tmp_path / "bad.npz")


@pytest.fixture(scope="module")
def rendered(model):
    """Clean renders (seeds no training used) of chosen expression kinds with MediaPipe's landmarks on them:
    list of (kind, true expression (53,), landmarks (478, 2) crop px)."""
    from engine.landmarks import MediaPipeLandmarker
    from trainers import synthesis as syn

    corr = LandmarkCorrespondence.load()
    assets = syn.SynthesisAssets.build(model, corr)
    cfg = syn.replace(syn.SynthesisConfig().clean(), flat_background=(0.4, 0.5, 0.45), yaw_deg=20.0,
                      yaw_uniform_share=0.0)
    out = []
    with MediaPipeLandmarker(static=True) as landmarker:
        for kind in ("neutral", "jaw_open", "smile"):
            for seed in range(910_001, 910_007):
                s = syn.synthesize(np.random.default_rng(seed), model, corr, 128, cfg, expression_kind=kind,
                                   assets=assets)
                lm = syn.track_crop(landmarker, s["image"])
                if lm is not None:
                    out.append((kind, s["expression"], lm))
    return out


def test_shipped_weights_read_an_open_jaw_and_a_smile_from_the_landmarks(model, rendered):
    """The shipped MLP on MediaPipe's landmarks of rendered faces: jawOpen and the smiles it takes over
    from the network read higher where the face makes them than on neutral faces, and come within
    0.25 of the truth on the open jaws."""
    reg = lx.LandmarkExpression.load()
    names = model.expression_names
    assert reg.n_expression == len(names) and reg.use.any()
    read = {k: [] for k in ("neutral", "jaw_open", "smile")}
    for kind, truth, lm in rendered:
        e = reg.predict(lm)
        assert e.shape == (len(names),) and ((e >= 0) & (e <= 1)).all()
        read[kind].append((truth, e))
    assert all(len(v) >= 4 for v in read.values()), {k: len(v) for k, v in read.items()}
    jaw, smile = names.index("jawOpen"), [names.index("mouthSmile_L"), names.index("mouthSmile_R")]
    neutral_jaw = max(e[jaw] for _, e in read["neutral"])
    assert np.median([e[jaw] for _, e in read["jaw_open"]]) > neutral_jaw + 0.2
    assert np.median([abs(e[jaw] - t[jaw]) for t, e in read["jaw_open"]]) < 0.25
    neutral_smile = np.median([e[smile].mean() for _, e in read["neutral"]])
    assert np.median([e[smile].mean() for _, e in read["smile"]]) > neutral_smile + 0.15
