"""engine.coarsenet: shapes, parameter layout, decode ranges, the 6D rotation and the crop
translation parametrisation (checked by projecting with engine.pose), gradients, weights files,
and the MAC counter against hand counts."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.coarsenet import (CoarseNet, CoarseNetConfig, count_macs, crop_focal_px, crop_params_from_translation,
                              decode, load_weights, param_layout, preprocess, prior_params, rotation_from_6d,
                              rotation_to_6d, save_weights, translation_from_crop)
from engine.pose import FRONTAL, model_to_camera, project, rodrigues

f64 = torch.float64
S = 128


def random_rotations(n: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.tensor(np.stack([rodrigues(rng.normal(size=3)) for _ in range(n)]), dtype=f64)


def random_landmarks(n: int, config: CoarseNetConfig | None = None) -> torch.Tensor | None:
    """(n, L, 2) normalised crop coordinates for nets that read landmarks (None for those that do not)."""
    L = (config or CoarseNetConfig()).n_landmarks
    return torch.rand(n, L, 2) * 1.6 - 0.8 if L else None


def crop_camera(fx=410.0, fy=410.0, cx=70.0, cy=52.0, angle=0.0) -> torch.Tensor:
    """A crop's K: a pinhole, optionally with the crop rotated in the image plane (still affine)."""
    K = torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=f64)
    c, s = math.cos(angle), math.sin(angle)
    A = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=f64)
    return A @ K


# ---------------------------------------------------------------- layout and shapes


def test_param_layout_is_contiguous_and_sized():
    cfg = CoarseNetConfig()
    lay = param_layout(cfg)
    assert list(lay) == ["identity", "expression", "rot6d", "crop_xy", "log_scale", "sh", "albedo"]
    stops = 0
    for sl in lay.values():
        assert sl.start == stops
        stops = sl.stop
    assert cfg.n_params == stops == 60 + 53 + 6 + 2 + 1 + 27 + 3 == 152


def test_forward_and_decode_shapes():
    net = CoarseNet().eval()
    x = torch.rand(2, 3, S, S) * 2 - 1
    with torch.no_grad():
        p = net(x, random_landmarks(2))
        out = net.decode(p, crop_camera().float())
    assert p.shape == (2, 152)
    shapes = {"identity": (2, 60), "expression": (2, 53), "expression_linear": (2, 53), "rotation": (2, 3, 3),
              "translation": (2, 3),
              "crop_xy": (2, 2), "log_scale": (2, 1), "sh": (2, 9, 3), "albedo": (2, 3)}
    assert {k: tuple(v.shape) for k, v in out.items()} == shapes
    assert "translation" not in net.decode(p)


def test_preprocess_normalisation_and_layout():
    crops = torch.zeros(1, S, S, 3, dtype=torch.uint8)
    crops[0, 5, 7] = torch.tensor([0, 255, 51], dtype=torch.uint8)
    x = preprocess(crops)
    assert x.shape == (1, 3, S, S) and x.dtype == torch.float32
    assert torch.allclose(x[0, :, 5, 7], torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))
    assert x[0, :, 0, 0].tolist() == [-1.0, -1.0, -1.0]


# ---------------------------------------------------------------- decode ranges


def test_decode_ranges_on_extreme_parameters():
    torch.manual_seed(1)
    p = torch.randn(64, 152) * 20
    out = decode(p, crop_camera().float())
    for key in ("expression", "albedo"):
        assert out[key].min() >= 0 and out[key].max() <= 1
    R = out["rotation"].double()
    eye = torch.eye(3, dtype=f64).expand(64, 3, 3)
    assert torch.allclose(R.transpose(1, 2) @ R, eye, atol=1e-5)
    assert torch.allclose(torch.linalg.det(R), torch.ones(64, dtype=f64), atol=1e-5)
    assert torch.isfinite(out["translation"]).all()
    assert torch.equal(out["identity"], p[:, :60])  # identity weights are passed through, prior-std units
    # expression: the raw outputs clamped (no sigmoid to saturate); the unclamped ones kept for losses
    assert torch.equal(out["expression_linear"], p[:, 60:113])
    assert torch.equal(out["expression"], p[:, 60:113].clamp(0, 1))
    assert torch.equal(out["sh"], p[:, 122:149].reshape(64, 9, 3))  # after 60 + 53 + 6 + 2 + 1


def test_rotation_6d_convention_and_round_trip():
    R = random_rotations(50)
    assert torch.allclose(rotation_from_6d(rotation_to_6d(R)), R, atol=1e-12)
    # Gram-Schmidt keeps the direction of the first vector and the plane of the first two
    r6 = torch.randn(50, 6, dtype=f64)
    Rg = rotation_from_6d(r6)
    a1 = r6[:, :3] / r6[:, :3].norm(dim=1, keepdim=True)
    assert torch.allclose(Rg[:, :, 0], a1, atol=1e-12)
    assert torch.allclose((Rg[:, :, 2] * r6[:, 3:]).sum(1), torch.zeros(50, dtype=f64), atol=1e-12)
    assert ((Rg[:, :, 1] * r6[:, 3:]).sum(1) > 0).all()


# ---------------------------------------------------------------- translation parametrisation


@pytest.mark.parametrize("K", [crop_camera(), crop_camera(380.0, 395.0, 10.0, 120.0), crop_camera(angle=0.4)],
                         ids=["square", "fx!=fy off-centre", "rotated crop"])
def test_translation_round_trip(K):
    cfg = CoarseNetConfig()
    n = 20
    rng = np.random.default_rng(2)
    R = random_rotations(n, seed=3)
    t = torch.tensor(np.column_stack([rng.uniform(-8, 8, n), rng.uniform(-8, 8, n), rng.uniform(25, 150, n)]),
                     dtype=f64)
    xy, log_s = crop_params_from_translation(t, R, K, cfg)
    assert xy.shape == (n, 2) and log_s.shape == (n, 1)
    assert torch.allclose(translation_from_crop(xy, log_s, R, K, cfg), t, atol=1e-9)
    assert torch.allclose(translation_from_crop(xy, log_s, R, K.expand(n, 3, 3), cfg), t, atol=1e-9)


def test_translation_meaning_checked_by_projection():
    """Independently of the inverse: the anchor lands on the stated crop pixel at depth f / s."""
    cfg = CoarseNetConfig()
    K = crop_camera(420.0, 420.0, 75.0, 58.0)
    R = torch.tensor(model_to_camera(0.3, -0.2, 0.1), dtype=f64).unsqueeze(0)
    xy = torch.tensor([[0.12, -0.3]], dtype=f64)
    log_s = torch.tensor([[0.25]], dtype=f64)
    t = translation_from_crop(xy, log_s, R, K, cfg)[0].numpy()
    anchor_cam = R[0].numpy() @ np.array(cfg.anchor_cm) + t
    uv = project(anchor_cam[None], K.numpy())[0]
    assert np.allclose(uv, [(S - 1) / 2 + 0.12 * S / 2, (S - 1) / 2 - 0.3 * S / 2], atol=1e-9)
    s_px_per_cm = S / cfg.scale_ref_cm * math.exp(0.25)
    assert math.isclose(anchor_cam[2], 420.0 / s_px_per_cm, rel_tol=1e-12)
    assert math.isclose(float(crop_focal_px(K)), 420.0, rel_tol=1e-12)


def test_anchor_is_the_landmark_centroid(model):
    centroid = model.neutral[model.landmark68_vertices].mean(axis=0)
    assert np.allclose(CoarseNetConfig().anchor_cm, centroid, atol=0.01)


# ---------------------------------------------------------------- prior and untrained output


def test_prior_decodes_to_a_frontal_neutral_centred_face():
    cfg = CoarseNetConfig()
    K = crop_camera(400.0, 400.0, (S - 1) / 2, (S - 1) / 2)
    out = decode(prior_params(cfg).double().unsqueeze(0), K, cfg)
    assert torch.allclose(out["rotation"][0], torch.tensor(FRONTAL, dtype=f64))
    assert torch.allclose(out["expression"], torch.full((1, 53), 0.05, dtype=f64))
    assert torch.allclose(out["albedo"], torch.full((1, 3), 0.5, dtype=f64))
    assert torch.equal(out["identity"], torch.zeros(1, 60, dtype=f64))
    # ambient light of irradiance 1: SH · Y(n) = 1 for any normal (Y00 = 0.5 / sqrt(pi))
    assert torch.allclose(out["sh"][0, 0] * 0.5 / math.sqrt(math.pi), torch.ones(3, dtype=f64))
    assert torch.count_nonzero(out["sh"][0, 1:]) == 0
    # the anchor straight ahead of the crop's centre, at depth f / (S / scale_ref)
    anchor_cam = out["rotation"][0] @ torch.tensor(cfg.anchor_cm, dtype=f64) + out["translation"][0]
    assert torch.allclose(anchor_cam, torch.tensor([0.0, 0.0, 400.0 * cfg.scale_ref_cm / S], dtype=f64))


def test_untrained_net_outputs_the_prior():
    net = CoarseNet().eval()
    with torch.no_grad():
        p = net(torch.rand(3, 3, S, S) * 2 - 1, random_landmarks(3))
    assert torch.allclose(p, prior_params(net.config).expand(3, -1), atol=0.05)


def test_landmarks_are_required_and_read():
    net = CoarseNet().eval()
    x = torch.rand(2, 3, S, S) * 2 - 1
    with pytest.raises(ValueError, match="landmarks"):
        net(x)
    torch.nn.init.normal_(net.head.weight, std=0.05)
    lm = random_landmarks(2)
    with torch.no_grad():
        assert not torch.allclose(net(x, lm), net(x, lm + 0.1))
        # a crop-only net needs none
        assert CoarseNet(CoarseNetConfig(n_landmarks=0)).eval()(x).shape == (2, 152)


# ---------------------------------------------------------------- training-side properties


def test_gradients_reach_every_parameter(randomised_net):
    net = randomised_net(seed=4).train()
    x = torch.rand(2, 3, S, S) * 2 - 1
    out = net.decode(net(x, random_landmarks(2)), crop_camera().float())
    loss = sum(((v - 0.3) ** 2).mean() for v in out.values())
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"


def test_save_load_round_trip(tmp_path, randomised_net):
    cfg = CoarseNetConfig(width=0.35, last_channels=256)
    net = randomised_net(seed=5, config=cfg)
    path = tmp_path / "coarsenet.pt"
    save_weights(net, path)
    loaded = load_weights(path)
    assert loaded.config == cfg and not loaded.training
    x, lm = torch.rand(2, 3, S, S) * 2 - 1, random_landmarks(2, cfg)
    with torch.no_grad():
        assert torch.equal(net(x, lm), loaded(x, lm))
    assert path.stat().st_size < 4 * net.n_parameters + 200_000  # float32 weights plus small overhead


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not a CoarseNet weights file"):
        load_weights(path)


def test_count_macs_matches_hand_count():
    cfg = CoarseNetConfig(width=1.0, stages=(), last_channels=64, n_landmarks=0)
    net = CoarseNet(cfg)
    stem = 64 * 64 * 32 * 3 * 9           # 3x3 stride 2, 3 -> 32 channels, 64 x 64 output
    last = 64 * 64 * 64 * 32              # 1x1, 32 -> 64 channels
    head = 64 * cfg.n_params
    assert count_macs(net) == stem + last + head
    # one inverted residual block, stride 1, expansion 6: 16 -> 96 -> dw -> 16 (on the 64 x 64 map)
    cfg2 = CoarseNetConfig(width=0.5, stages=((6, 32, 1, 1),), last_channels=64,
                           n_landmarks=0)  # 16 channels after width
    net2 = CoarseNet(cfg2)
    block = 64 * 64 * (16 * 96 + 96 * 9 + 96 * 16)
    assert count_macs(net2) == 64 * 64 * 16 * 27 + block + 64 * 64 * 64 * 16 + 64 * cfg2.n_params
    # the landmark branch: 10 points -> MLP 8 -> head over 64 + 8 + 20 features
    cfg3 = CoarseNetConfig(width=1.0, stages=(), last_channels=64, n_landmarks=10, landmark_hidden=(8,))
    assert count_macs(CoarseNet(cfg3)) == stem + last + 20 * 8 + (64 + 8 + 20) * cfg3.n_params


def test_default_size_stays_small():
    net = CoarseNet()
    assert 300_000 < net.n_parameters < 2_500_000   # the landmark branch and skip are ~1 M of it
    assert count_macs(net) < 40e6
