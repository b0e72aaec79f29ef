"""trainers.train_fine: config checks, a short run's outputs and figures, and an exact resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.correspondence import LandmarkCorrespondence
from engine.finenet import load_weights
from engine.uvmap import FaceUV
from trainers.fine_data import read_samples, synthetic_samples, write_samples
from trainers.synthesis import SynthesisAssets
from trainers.train_coarse import ConfigError
from trainers.train_fine import load_config, supervised_loss, train

TINY = {"model": {"map_px": 64}, "train": {"steps": 4, "batch_real": 0, "batch_synthetic": 2, "val_every": 2,
                                           "checkpoint_every": 2, "log_every": 1, "threads": 1},
        "data": {"val_synthetic": 2}}


@pytest.fixture(scope="module")
def tiny_data(model, tmp_path_factory):
    """Three synthetic faces with known detail at 64 texels (two to train on, one held out)."""
    folder = tmp_path_factory.mktemp("fine_data")
    face_uv = FaceUV.from_model(model, 64)
    assets = SynthesisAssets.build(model, LandmarkCorrespondence.load())
    samples = synthetic_samples(5, 3, face_uv, assets, size=(320, 240))
    write_samples(samples[:2], folder / "synthetic_train")
    write_samples(samples[2:], folder / "synthetic_heldout")
    return folder


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown"):
        load_config({"loss": {"photometrik": 1.0}})
    with pytest.raises(ConfigError, match="steps"):
        load_config({"train": {"steps": 0}})
    with pytest.raises(ConfigError, match="batch_real"):
        load_config({"train": {"batch_real": 0, "batch_synthetic": 0}})


def test_supervised_loss_is_the_mean_square_over_visible_texels_with_known_truth():
    truth = torch.zeros(2, 4, 4)
    truth[0, 1, 1] = 0.5
    truth[1] = float("nan")                                  # a real frame: no truth, no term
    visible = torch.ones(2, 4, 4)
    visible[0, 3] = 0.0                                      # a hidden row does not count either
    d = torch.full((2, 4, 4), 0.1)
    d[0, 3] = 9.0
    expected = (11 * 0.1 ** 2 + 0.4 ** 2) / 12
    assert float(supervised_loss(d, truth, visible)) == pytest.approx(expected, rel=1e-6)
    assert float(supervised_loss(torch.nan_to_num(truth), truth, visible)) == 0.0


def test_samples_round_trip(tiny_data):
    s = read_samples(tiny_data / "synthetic_train")
    assert s["colour"].shape == (2, 2, 64, 64, 3) and s["vertices"].shape == (2, 2, 9409, 3)
    assert np.isfinite(s["truth_mm"]).all() and (s["source"] == "synthetic").all()


def test_short_run_and_exact_resume(tiny_data, tmp_path):
    summary = train(TINY, tiny_data, tmp_path / "straight", progress=False)
    assert summary["step"] == 4
    val = summary["val"]
    assert val["synthetic_zero_map_mm"] > 0.05 and np.isfinite(val["synthetic_error_mm"])
    assert (tmp_path / "straight" / "finenet.onnx").stat().st_size > 1000
    straight = load_weights(tmp_path / "straight" / "finenet.pt")
    # the same run stopped after 2 steps and resumed gives the same weights
    stopped = train(TINY, tiny_data, tmp_path / "resumed", progress=False, stop_at=2)
    assert stopped["step"] == 2 and not (tmp_path / "resumed" / "finenet.pt").exists()
    train(TINY, tiny_data, tmp_path / "resumed", resume=True, progress=False)
    resumed = load_weights(tmp_path / "resumed" / "finenet.pt")
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_capture_train_fine_cli(tmp_path, capsys):
    from capture import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "fine", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: capture train fine") and "--resume" in out and "--data" in out
    status = cli.main(["train", "fine", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1 and err[0].startswith("capture: error: --data")
    status = cli.main(["train", "fine", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and err[-1].startswith("capture: error:") and "train/" in err[-1]


def test_device_choice_for_training():
    from engine.device import nvidia_device_present, torch_device

    assert torch_device("cpu") == ("cpu", "device: cpu (torch), as asked")
    device, line = torch_device("auto")
    assert device in ("cpu", "cuda") and line.startswith(f"device: {device} (torch)")
    if not nvidia_device_present():
        assert device == "cpu" and "no NVIDIA GPU" in line
    with pytest.raises(ValueError):
        torch_device("tpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: torch.cuda.is_available() is False")
def test_a_run_on_cuda_matches_the_cpu(tiny_data, tmp_path):
    """The same 4 steps on the GPU and on the CPU: the same figures, weights written either way."""
    cpu = train(TINY, tiny_data, tmp_path / "cpu", progress=False, device="cpu")
    gpu = train(TINY, tiny_data, tmp_path / "cuda", progress=False, device="cuda")
    for key, value in cpu["val"].items():
        assert gpu["val"][key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
    a, b = load_weights(tmp_path / "cpu" / "finenet.pt"), load_weights(tmp_path / "cuda" / "finenet.pt")
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.allclose(x, y, rtol=1e-3, atol=1e-5)
