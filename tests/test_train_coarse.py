"""CoarseNet training: losses vanish at the truth, training fits a small batch, resume is exact."""
import json

import numpy as np
import pytest
import torch

from engine.coarsenet import CoarseNetConfig, crop_params_from_translation, load_weights, save_weights
from engine.correspondence import LandmarkCorrespondence
from trainers import losses
from trainers import synthesis as syn
from trainers import train_coarse as tc

S = 64   # the net pools globally, so a 64 px crop and a narrow net keep these tests fast
TINY_MODEL = {"input_size": S, "width": 0.25, "last_channels": 64}


@pytest.fixture(scope="module")
def corr():
    return LandmarkCorrespondence.load()


@pytest.fixture(scope="module")
def geometry(model, corr):
    return losses.LossGeometry(model, corr)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, model, corr):
    """8 clean 64 px samples in one shard, plus 4 validation samples with another seed."""
    root = tmp_path_factory.mktemp("synth")
    cfg = syn.SynthesisConfig().clean()
    for name, seed, n in (("train", 3, 8), ("val", 4, 4)):
        ds = syn.SyntheticFaces(n, seed=seed, out_px=S, config=cfg, real_backgrounds=False,
                                model=model, correspondence=corr)
        (root / name).mkdir()
        syn.write_shard(root / name / "shard-00000.npz", [ds[i] for i in range(n)])
    return root


@pytest.fixture(scope="module")
def batch(shard_dir):
    return tc.to_tensors(tc.load_shards(shard_dir / "train"))


def tiny_config(shard_dir, steps, **train):
    return {"model": TINY_MODEL,
            "train": {"steps": steps, "batch_size": 4, "lr": 3e-3, "warmup_steps": 0, "log_every": 1,
                      "val_every": 1000, "checkpoint_every": 1000, "noise_std": 0.02, **train},
            "data": {"dir": str(shard_dir / "train"), "val_dir": str(shard_dir / "val"), "val_count": 4}}


def truth_as_prediction(b, ncfg):
    """The labels in decode's output form (what a perfect net would return)."""
    xy, ls = crop_params_from_translation(b["translation_cm"], b["rotation"], b["K_crop"], ncfg)
    return {"identity": b["identity"], "expression": b["expression"], "rotation": b["rotation"],
            "translation": b["translation_cm"], "crop_xy": xy, "log_scale": ls, "sh": b["sh"],
            "albedo": b["skin_rgb"]}


def test_losses_vanish_at_the_truth_and_not_elsewhere(batch, geometry):
    ncfg = CoarseNetConfig(**TINY_MODEL)
    pred = truth_as_prediction(batch, ncfg)
    total, terms = losses.coarse_loss(pred, batch, geometry, ncfg)
    assert set(terms) == set(losses.DEFAULT_WEIGHTS)
    for k, v in terms.items():
        # landmarks: the labels are the same surface points projected (eyeballs turned by the gaze are masked)
        assert v.item() < (1e-3 if k == "landmark" else 1e-4), k
    off = dict(pred)
    off["expression"] = (pred["expression"] + 0.1).clamp(0, 1)
    off["identity"] = pred["identity"] + 0.5
    off["rotation"] = pred["rotation"] @ torch.as_tensor(syn.euler_yxz(0.1, 0.0, 0.0), dtype=torch.float32)
    off["translation"] = pred["translation"] + torch.tensor([0.5, 0.0, 0.0])
    off["crop_xy"] = pred["crop_xy"] + 0.05
    off["sh"] = pred["sh"] + 0.1
    off["albedo"] = pred["albedo"] + 0.05
    total_off, terms_off = losses.coarse_loss(off, batch, geometry, ncfg)
    for k, v in terms_off.items():
        assert v.item() > 10 * max(terms[k].item(), 1e-4), k
    assert total_off > total
    assert terms_off["rotation"].item() == pytest.approx(0.1, abs=1e-4)        # rad
    assert terms_off["albedo"].item() == pytest.approx(0.05, abs=1e-5)


def test_vertex_loss_is_millimetres(batch, geometry):
    """Shifting t by 1 cm moves every vertex by 10 mm; a hand computation agrees."""
    v_true, _ = geometry.camera_points(batch["identity"], batch["expression"], batch["rotation"],
                                       batch["translation_cm"])
    v_shift, _ = geometry.camera_points(batch["identity"], batch["expression"], batch["rotation"],
                                        batch["translation_cm"] + torch.tensor([0.0, 0.6, 0.8]))
    assert losses.vertex_loss_mm(v_shift, v_true).item() == pytest.approx(10.0, rel=1e-4)
    a = torch.zeros(1, 2, 3)
    b = torch.tensor([[[0.3, 0.4, 0.0], [0.0, 0.0, 0.1]]])       # 5 mm and 1 mm
    assert losses.vertex_loss_mm(b, a).item() == pytest.approx(3.0, rel=1e-4)
    assert v_true.shape[1] == losses.N_LOSS_VERTICES


def test_landmark_loss_counts_visible_points_only():
    K = torch.tensor([[[100.0, 0, 32], [0, 100.0, 32], [0, 0, 1]]])
    pts = torch.tensor([[[0.0, 0.0, 50.0], [1.0, 0.0, 50.0]]])              # -> (32, 32), (34, 32) px
    lm = torch.tensor([[[32.0, 35.0], [0.0, 0.0]]])
    vis = torch.tensor([[True, False]])
    assert losses.landmark_loss_px(pts, K, lm, vis).item() == pytest.approx(3.0, rel=1e-5)
    assert losses.landmark_loss_px(pts, K, lm, torch.zeros_like(vis)).item() == 0.0


def test_training_fits_a_small_batch(shard_dir, model, corr):
    """40 AdamW steps on one fixed batch of 4 at least halve the loss (the whole loss is trainable)."""
    ncfg = CoarseNetConfig(**TINY_MODEL)
    torch.manual_seed(0)
    net = tc.CoarseNet(ncfg)
    geometry = losses.LossGeometry(model, corr)
    b = tc.to_tensors({k: v[:4] for k, v in tc.load_shards(shard_dir / "train").items()})
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    history = []
    for _ in range(40):
        pred = tc.decode(net(b["image"], tc.input_landmarks(b, ncfg.input_size)), b["K_crop"], ncfg)
        loss, _ = losses.coarse_loss(pred, b, geometry, ncfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.5 * history[0], history


def test_resume_is_exact_and_outputs_are_written(shard_dir, model, corr, tmp_path):
    """6 steps straight == 3 steps, stop, resume for 3 more (same params, same last loss)."""
    kw = {"face_model": model, "correspondence": corr, "progress": False}
    straight = tc.train(tiny_config(shard_dir, 6), tmp_path / "a", export=False, **kw)
    first = tiny_config(shard_dir, 6, checkpoint_every=3)
    with pytest.raises(KeyboardInterrupt):
        _interrupt_after(3, lambda: tc.train(first, tmp_path / "b", export=False, **kw))
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 3
    resumed = tc.train(first, tmp_path / "b", resume=True, **kw)
    assert resumed["step"] == straight["step"] == 6
    assert resumed["loss"] == straight["loss"]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the end products: weights that load, an ONNX file, metrics with validation records
    net = load_weights(tmp_path / "b" / "coarsenet.pt")
    assert net.config.input_size == S
    assert (tmp_path / "b" / "coarsenet.onnx").stat().st_size > 10_000
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    vals = [line for line in lines if '"val"' in line]
    assert len(vals) >= 2 and "vertex_mm" in vals[-1]
    assert np.isfinite(resumed["val"]["rotation_deg"])


def test_init_starts_from_weights_and_data_may_be_several_folders(shard_dir, model, corr, tmp_path,
                                                                  randomised_net):
    """A fine-tuning stage: train.init loads the weights (step 0 validates the given net, not a random
    one); data.dir as a list reads every folder; another architecture is refused."""
    kw = {"face_model": model, "correspondence": corr, "progress": False, "export": False}
    start = randomised_net(seed=7, config=CoarseNetConfig(**TINY_MODEL))
    save_weights(start, tmp_path / "start.pt")
    cfg = tiny_config(shard_dir, 1, init=str(tmp_path / "start.pt"))
    cfg["data"]["dir"] = [str(shard_dir / "train"), str(shard_dir / "val")]
    tc.train(cfg, tmp_path / "run", **kw)
    first_val = next(r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
                     if "val" in r)
    val = tc.load_shards(shard_dir / "val", limit=4)
    assert first_val["val"] == tc.evaluate(start, val, tc.face_region_arrays(model), 64)
    assert len(tc.load_shards(cfg["data"]["dir"])["image"]) == 12
    other = dict(cfg, model=dict(TINY_MODEL, width=0.35))
    with pytest.raises(ValueError, match="architecture"):
        tc.train(other, tmp_path / "other", **kw)


def _interrupt_after(n_steps, run):
    """Run `run` with the optimiser's step raising KeyboardInterrupt once n_steps have happened."""
    original = torch.optim.AdamW.step
    count = {"n": 0}

    def step(self, *a, **k):
        if count["n"] == n_steps:
            raise KeyboardInterrupt
        count["n"] += 1
        return original(self, *a, **k)

    torch.optim.AdamW.step = step
    try:
        run()
    finally:
        torch.optim.AdamW.step = original


def test_config_file_loads_and_rejects_unknown_terms():
    from pathlib import Path

    cfg = tc.load_config(Path(tc.__file__).parent / "configs" / "coarse.toml")
    assert cfg["model"]["input_size"] == 128 and cfg["loss"]["vertex"] == 0.05
    with pytest.raises(ValueError):
        tc.load_config({"loss": {"photometric": 1.0}})
    assert cfg["loss"]["expression_loss"] in losses.EXPRESSION_LOSSES
    assert tc.load_config({"loss": {"expression_loss": "l2"}})["loss"]["expression_loss"] == "l2"
    with pytest.raises(ValueError):
        tc.load_config({"loss": {"expression_loss": "huber"}})


@pytest.mark.parametrize("kind", losses.EXPRESSION_LOSSES)
def test_expression_loss_kinds(kind):
    """Zero at the truth, positive elsewhere; under a two-point target (0 w.p. 3/4, 1 w.p. 1/4: a
    sparse expression weight) L1's best constant is the median (0), L2's the mean (0.25)."""
    target = torch.tensor([[0.0], [0.0], [0.0], [1.0]])
    assert losses.expression_loss(target, target, kind).item() == 0.0
    assert losses.expression_loss(target + 0.1, target, kind).item() > 0.0
    c = torch.linspace(0, 1, 101)
    values = torch.stack([losses.expression_loss(v.expand(4, 1), target, kind) for v in c])
    best = c[values.argmin()].item()
    assert best == pytest.approx({"l1": 0.0, "l2": 0.25}[kind], abs=1e-6)
    with pytest.raises(ValueError):
        losses.expression_loss(target, target, "huber")


def test_coarse_loss_takes_the_expression_loss_option(batch, geometry):
    ncfg = CoarseNetConfig(**TINY_MODEL)
    pred = dict(truth_as_prediction(batch, ncfg))
    pred["expression"] = (pred["expression"] + 0.1).clamp(0, 1)
    err = pred["expression"] - batch["expression"]
    _, t1 = losses.coarse_loss(pred, batch, geometry, ncfg, {"expression_loss": "l1"})
    _, t2 = losses.coarse_loss(pred, batch, geometry, ncfg, {"expression_loss": "l2"})
    assert t1["expression"].item() == pytest.approx(err.abs().mean().item(), rel=1e-5)
    assert t2["expression"].item() == pytest.approx((err ** 2).mean().item(), rel=1e-5)


def test_on_the_fly_batches_follow_the_step(model, corr):
    """Without shards, batch s holds SyntheticFaces samples s·B ... s·B + B − 1 (so resume needs no state)."""
    it = tc.synthetic_batches(2, seed=9, out_px=S, real_backgrounds=False, start=1, steps=2, workers=0)
    b = next(it)
    ds = syn.SyntheticFaces(4, seed=9, out_px=S, real_backgrounds=False, model=model, correspondence=corr)
    assert b["image"].shape == (2, S, S, 3) and set(b) == set(tc.FIELDS)
    assert np.array_equal(b["image"][1], ds[3]["image"])
    assert np.array_equal(b["expression"][0], ds[2]["expression"])
    with pytest.raises(StopIteration):
        next(it)


# ---------------------------------------------------------------- the real-frame stage (trainers.selfsup)


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    """A few 64 px real pairs: d3's first frames for training, d20's (a held-out video) for evaluation."""
    from trainers import real_frames as rf

    videos = [rf.DEFAULT_VIDEO_DIR / "d3.mp4", rf.DEFAULT_VIDEO_DIR / "d20.mp4"]
    if not all(v.is_file() for v in videos):
        pytest.skip("the sample videos are not there")
    out = tmp_path_factory.mktemp("real")
    assert rf.main(["--out", str(out), "--videos", *map(str, videos), "--max-frames", "6",
                    "--pairs-per-video", "0", "--out-px", str(S)]) == 0
    return out


def real_config(shard_dir, real_dir, steps, **train):
    cfg = tiny_config(shard_dir, steps, **train)
    cfg["real"] = {"dir": str(real_dir), "batch_size": 2, "val_count": 4}
    return cfg


def test_mixed_real_training_logs_the_real_terms_and_resumes_exactly(shard_dir, real_dir, model, corr, tmp_path):
    """Synthetic batches plus real pairs: the real terms are in metrics.jsonl beside the synthetic ones,
    held-out real pairs are scored, and 3 steps straight == 2 steps, stop, resume for 1 more."""
    import json

    kw = {"face_model": model, "correspondence": corr, "progress": False, "export": False}
    straight = tc.train(real_config(shard_dir, real_dir, 3), tmp_path / "a", **kw)
    first = real_config(shard_dir, real_dir, 3, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        _interrupt_after(2, lambda: tc.train(first, tmp_path / "b", **kw))
    resumed = tc.train(first, tmp_path / "b", resume=True, **kw)
    assert resumed["step"] == straight["step"] == 3
    assert resumed["loss"] == straight["loss"]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert len(train_records) == 3
    for k in ("real_landmark", "real_photo", "real_flow", "real_same", "real_prior", "vertex", "expression"):
        assert np.isfinite(train_records[-1][k]), k
    assert train_records[-1]["real_photo"] > 0 and train_records[-1]["real_flow"] > 0
    val_real = [r["val_real"] for r in records if "val_real" in r]
    assert len(val_real) == 2                          # at step 0 and at the end
    assert val_real[-1]["pairs"] == 4
    for k in ("landmark_px", "landmark_iod", "flow_px", "flow_zero_px"):
        assert np.isfinite(val_real[-1][k]) and val_real[-1][k] > 0, k


def test_real_section_defaults_off_and_rejects_unknown_keys():
    from pathlib import Path

    cfg = tc.load_config(Path(tc.__file__).parent / "configs" / "coarse.toml")
    assert cfg["real"]["dir"] is None and cfg["real"]["synthetic"] is True
    assert tc.load_config({"real": {"photo": 2.0}})["real"]["photo"] == 2.0
    with pytest.raises(ValueError):
        tc.load_config({"real": {"photometric": 1.0}})


def test_landmark_dropout_feeds_the_crop_centre_to_the_chosen_samples():
    """input_landmarks: dropout / dropout_untracked replace a sample's landmarks by
    engine.crop.unknown_landmarks_px (0 once normalised); tracked and untracked samples apart."""
    S, B = 128, 64
    g = torch.Generator().manual_seed(0)
    batch = {"landmarks": torch.rand(B, 478, 2) * S, "tracked_landmarks": torch.rand(B, 478, 2) * S,
             "tracked": torch.arange(B) % 2 == 0}
    plain = tc.input_landmarks(batch, S)
    assert (plain.abs().sum(dim=(1, 2)) > 0).all()
    dropped = tc.input_landmarks(batch, S, generator=g, dropout=0.0, dropout_untracked=1.0)
    gone = dropped.abs().sum(dim=(1, 2)) == 0
    assert torch.equal(gone, ~batch["tracked"])
    assert torch.equal(dropped[batch["tracked"]], plain[batch["tracked"]])
    half = tc.input_landmarks(batch, S, generator=g, dropout=0.5, dropout_untracked=0.0)
    gone = half.abs().sum(dim=(1, 2)) == 0
    assert not gone[~batch["tracked"]].any() and 6 < gone[batch["tracked"]].sum() < 26


def test_landmark_dropout_must_be_a_share():
    cfg = tc.load_config({"train": {"landmark_dropout": 0.2, "landmark_dropout_untracked": 1}})
    assert cfg["train"]["landmark_dropout"] == 0.2
    for bad in (1.5, -0.1, True, "half"):
        with pytest.raises(ValueError, match="landmark_dropout"):
            tc.load_config({"train": {"landmark_dropout": bad}})


def test_depth_term_is_small_at_the_truth_and_grows_with_a_wrong_depth(batch, shard_dir, model, corr):
    """E_geo against the simulated depth camera: the true mesh sits within the sensor's noise (a few
    tenths of a millimetre of Huber mean), a mesh 1 cm too far does not (the Huber loss grows linearly)."""
    from trainers.selfsup import SelfSupGeometry

    ncfg = CoarseNetConfig(**TINY_MODEL)
    geom = SelfSupGeometry(model, corr, n_identity=ncfg.n_identity)
    truth = truth_as_prediction(batch, ncfg)
    raw = tc.load_shards(shard_dir / "train")["image"]
    at_truth = tc.synthetic_depth_loss(truth, batch, raw, geom, S, np.random.default_rng(0)).item()
    far = dict(truth, translation=truth["translation"] + torch.tensor([0.0, 0.0, 1.0]))
    too_far = tc.synthetic_depth_loss(far, batch, raw, geom, S, np.random.default_rng(0)).item()
    assert 0.0 < at_truth < 0.05, at_truth          # cm: the sensor's own noise
    assert too_far > 10 * at_truth, (at_truth, too_far)


def test_depth_section_defaults_off_and_is_checked(shard_dir, model, corr, tmp_path):
    assert tc.load_config(None)["depth"]["weight"] == 0.0
    with pytest.raises(tc.ConfigError):
        tc.load_config({"depth": {"weight": -1.0}})
    with pytest.raises(tc.ConfigError):
        tc.load_config({"depth": {"noise": 1.0}})
    with pytest.raises(tc.ConfigError, match="synthetic batch"):
        tc.load_config({"depth": {"weight": 1.0}, "real": {"dir": "pairs", "synthetic": False}})
    cfg = tiny_config(shard_dir, 2)
    cfg["depth"] = {"weight": 0.5}
    kw = {"face_model": model, "correspondence": corr, "progress": False, "export": False}
    tc.train(cfg, tmp_path / "a", **kw)
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    depth = [r["depth"] for r in records if "loss" in r]
    assert len(depth) == 2 and all(np.isfinite(d) and d > 0 for d in depth)


def test_every_tensor_of_a_training_step_follows_the_nets_device(shard_dir, model, corr):
    """A training step on torch's "meta" device (shapes only, no numbers): most operations given a CPU
    tensor beside meta ones raise, as they would beside CUDA tensors (a CPU tensor made in the
    landmarks' dropout does; a CPU operand of a matrix product does not, so this is a partial check).
    This machine has no GPU; this is how far the GPU path is checked here."""
    ncfg = CoarseNetConfig(**TINY_MODEL)
    net = tc.CoarseNet(ncfg).to("meta")
    geometry = losses.LossGeometry(model, corr).to("meta")
    b = {k: v.to("meta") for k, v in tc.to_tensors({k: v[:4] for k, v in
                                                     tc.load_shards(shard_dir / "train").items()}).items()}
    lm = tc.input_landmarks(b, ncfg.input_size, noise_px=1.0, dropout=0.2, dropout_untracked=0.5)
    assert lm.device.type == "meta"
    pred = tc.decode(net(b["image"], lm), b["K_crop"], ncfg)
    loss, terms = losses.coarse_loss(pred, b, geometry, ncfg)
    loss.backward()
    assert loss.device.type == "meta" and all(t.device.type == "meta" for t in terms.values())
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in net.parameters() if p.requires_grad)


def test_training_on_a_gpu_refuses_the_cpu_rendered_terms(shard_dir, tmp_path):
    cfg = tiny_config(shard_dir, 1)
    cfg["depth"] = {"weight": 0.5}
    with pytest.raises(tc.ConfigError, match="--device cpu"):
        tc.train(cfg, tmp_path, progress=False, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: torch.cuda.is_available() is False")
def test_a_run_on_cuda_matches_the_cpu(shard_dir, model, corr, tmp_path):
    """The same 4 steps on the GPU and on the CPU: the same validation figures, weights written either way."""
    cpu = tc.train(tiny_config(shard_dir, 4), tmp_path / "cpu", progress=False, face_model=model,
                   correspondence=corr, device="cpu")
    gpu = tc.train(tiny_config(shard_dir, 4), tmp_path / "cuda", progress=False, face_model=model,
                   correspondence=corr, device="cuda")
    for key, value in cpu["val"].items():
        assert gpu["val"][key] == pytest.approx(value, rel=2e-3, abs=1e-4), key
    a = torch.load(tmp_path / "cpu" / "coarsenet.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "cuda" / "coarsenet.pt", weights_only=False)["state_dict"]
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), rtol=1e-3, atol=1e-4), name
