"""Eye-state training: each patch carries its own eye's weights, and a short run yields a net capture loads."""
import numpy as np

from engine.eyenet import OUTPUTS
from engine.eyestate import EyeClosure, PATCH_H, PATCH_W
from trainers import synthesis as syn
from trainers import train_eyes


def _shard(model, corr, tmp_path, n=24):
    assets = syn.SynthesisAssets.build(model, corr)
    cfg = syn.replace(syn.SynthesisConfig().clean(), flat_background=(0.4, 0.5, 0.45))
    samples = [syn.synthesize(np.random.default_rng(700 + i), model, corr, 128, cfg, assets=assets,
                              expression_kind="wink" if i % 2 else None) for i in range(n)]
    syn.write_shard(tmp_path / "shard-00000.npz", samples)
    return samples


def test_patches_carry_their_own_eyes_weights(model, tmp_path):
    """patch_set: two patches a sample and view, the first eye's labels from sides' suffix; views add
    jittered cuts of the same eyes (same labels, different pixels)."""
    from engine.correspondence import LandmarkCorrespondence

    corr = LandmarkCorrespondence.load()
    samples = _shard(model, corr, tmp_path, n=4)
    shards = train_eyes.load_shards(tmp_path, train_eyes.FIELDS)
    x, y = train_eyes.patch_set(shards, {0: "_R", 1: "_L"}, np.random.default_rng(0), views=2)
    assert x.shape == (4 * 2 * 2, 1, PATCH_H, PATCH_W) and y.shape == (16, len(OUTPUTS))
    names = model.expression_names
    for i, s in enumerate(samples):
        for v in range(2):
            row = (2 * i + v) * 2
            assert np.allclose(y[row], [s["expression"][names.index(o + "_R")] for o in OUTPUTS])
            assert np.allclose(y[row + 1], [s["expression"][names.index(o + "_L")] for o in OUTPUTS])
        assert not np.allclose(x[4 * i], x[4 * i + 2])                       # the second view is cut elsewhere
    assert np.allclose(x.mean(axis=(1, 2, 3)), 0, atol=1e-4)                # normalised per patch


def test_short_training_run_writes_a_net_capture_loads(model, tmp_path):
    from engine.correspondence import LandmarkCorrespondence

    corr = LandmarkCorrespondence.load()
    data, val = tmp_path / "train", tmp_path / "val"
    data.mkdir()
    val.mkdir()
    samples = _shard(model, corr, data, n=16)
    syn.write_shard(val / "shard-00000.npz", samples[:4])
    out = tmp_path / "eyes.onnx"
    s = train_eyes.train([data], val, out, steps=40, batch=32, views=1, threads=1)
    assert set(s) == set(OUTPUTS) and all(np.isfinite(v["mae"]) for v in s.values())
    read = EyeClosure((0, 1), out)(samples[0]["image"], samples[0]["landmarks"])
    assert read.shape == (2,) and ((read >= 0) & (read <= 1)).all()
