"""Self-supervised terms: ~0 on a consistent synthetic scene, larger when perturbed, finite gradients
reaching the right inputs, and gradcheck on tiny cases."""
import numpy as np
import pytest
import torch

from engine.correspondence import LandmarkCorrespondence
from engine.pose import model_to_camera
from engine.rasterizer import rasterize
from engine.shading import render
from trainers import losses
from trainers import selfsup as ss

S = 128
K_CROP = np.array([[300.0, 0.0, 63.5], [0.0, 300.0, 63.5], [0.0, 0.0, 1.0]])
BACKGROUND = 0.2   # linear grey behind the rendered face


@pytest.fixture(scope="module")
def corr():
    return LandmarkCorrespondence.load()


@pytest.fixture(scope="module")
def geom(model, corr):
    return ss.SelfSupGeometry(model, corr)


def _params(identity_seed=0, yaw=0.25, pitch=0.1, shift=(0.0, 0.0, 0.0), jaw=0.0):
    """One frame's parameters as (1, ...) float64 tensors: a face ~75 px wide in the 128 px crop."""
    g = np.random.default_rng(identity_seed)
    identity = torch.tensor(g.normal(0, 0.5, (1, 60)))
    expression = torch.zeros(1, 53, dtype=torch.float64)
    expression[0, 24] = jaw        # any shape: a mouth/jaw-ish deformation
    R = torch.tensor(model_to_camera(yaw, pitch, 0.0))[None]
    anchor = torch.tensor([0.0, -0.26, 9.44], dtype=torch.float64)
    t = torch.tensor([0.0, 0.0, 60.0], dtype=torch.float64) - R[0] @ anchor + torch.tensor(shift)
    sh = torch.zeros(1, 9, 3, dtype=torch.float64)
    sh[0, 0] = 0.8 * ss.SH_UNIT
    sh[0, 3] = 0.6 * ss.SH_UNIT             # light from the side (+x): shading varies over the face
    sh[0, 2] = -0.4 * ss.SH_UNIT            # and from the camera (-z)
    albedo = torch.tensor([[0.55, 0.35, 0.28]], dtype=torch.float64)
    return {"identity": identity, "expression": expression, "rotation": R, "translation": t[None],
            "sh": sh, "albedo": albedo}


def _geom64(geom):
    """The geometry's model arrays in float64 (exact comparisons against float64 renders)."""
    g = geom
    out = type(g).__new__(type(g))
    out.__dict__.update(g.__dict__)
    for k in ("neutral", "identity_modes", "expression_modes", "barycentric"):
        setattr(out, k, getattr(g, k).double())
    return out


def _render_target(verts, triangles, albedo, sh):
    """(1, S, S, 3) uint8 sRGB render at the crop's full resolution over a grey background."""
    img, _ = render(verts[0], triangles, albedo[0].expand(verts.shape[1], 3), sh[0], K_CROP, S, S,
                    background=BACKGROUND, backend="cpu")
    lin = img.detach().clamp(0, 1).numpy()
    srgb = np.where(lin <= 0.0031308, lin * 12.92, 1.055 * lin ** (1 / 2.4) - 0.055)
    return torch.from_numpy(np.round(srgb * 255).astype(np.uint8))[None]


def _dense_flow(verts_a, verts_b, triangles):
    """(1, S, S, 2) exact flow a -> b: each pixel of mesh a's render moved with its surface point."""
    va, vb = verts_a[0].detach().numpy(), verts_b[0].detach().numpy()
    tri = triangles.numpy()
    frags = rasterize(va, tri, K_CROP, S, S, backend="cpu")
    flow = np.zeros((S, S, 2), np.float32)
    ys, xs = np.nonzero(frags.mask)
    pb = (vb[tri[frags.triangle_id[ys, xs]]] * frags.barycentric[ys, xs][..., None]).sum(1)
    uv = pb[:, :2] / pb[:, 2:] * K_CROP[[0, 1], [0, 1]] + K_CROP[:2, 2]
    flow[ys, xs] = uv - np.stack([xs, ys], 1)
    return torch.from_numpy(flow)[None]


def _Kt():
    return torch.tensor(K_CROP)[None]


# ---------------------------------------------------------------- photometric


def test_photometric_vanishes_at_the_truth_and_grows_when_perturbed(geom):
    g = _geom64(geom)
    p = _params()
    verts, _ = g.camera_points(p["identity"], p["expression"], p["rotation"], p["translation"])
    crops = _render_target(verts, g.photo_triangles, p["albedo"], p["sh"])
    K = _Kt()

    def loss(**change):
        q = {**p, **change}
        v, _ = g.camera_points(q["identity"], q["expression"], q["rotation"], q["translation"])
        return ss.photometric_loss(v, g.photo_triangles, q["albedo"], q["sh"], crops, K).item()

    at_truth = loss()
    assert at_truth < 8e-3          # sRGB rounding (~0.002) and rendering at 64 px vs the area-averaged 128 px
    assert loss(translation=p["translation"] + torch.tensor([0.4, 0.0, 0.0])) > 4 * at_truth
    assert loss(albedo=p["albedo"] * 1.2) > 4 * at_truth
    sh = p["sh"].clone()
    sh[0, 3] *= -1.0                 # the light from the other side
    assert loss(sh=sh) > 4 * at_truth
    assert loss(rotation=torch.tensor(model_to_camera(0.35, 0.1, 0.0))[None]) > 4 * at_truth


def test_photometric_gradients_reach_geometry_light_and_albedo(geom):
    p = {k: v.float().clone().requires_grad_(True) for k, v in _params().items()}
    verts, _ = geom.camera_points(p["identity"], p["expression"], p["rotation"], p["translation"])
    target = _render_target(verts.detach().double(), geom.photo_triangles, p["albedo"].detach().double() * 0.8,
                            p["sh"].detach().double())
    loss = ss.photometric_loss(verts, geom.photo_triangles, p["albedo"], p["sh"], target, _Kt().float())
    loss.backward()
    for k in ("identity", "expression", "rotation", "translation", "sh", "albedo"):
        grad = p[k].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, k


def test_photometric_gradcheck_tiny():
    """One quad facing the camera, 8 px render, float64: analytic == numerical gradients."""
    K = torch.tensor([[[20.0, 0.0, 3.5], [0.0, 20.0, 3.5], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    v = torch.tensor([[[-1.0, -1.0, 10.0], [1.2, -1.0, 10.5], [1.0, 1.1, 9.6], [-1.1, 1.0, 10.2]]],
                     dtype=torch.float64, requires_grad=True)
    tri = torch.tensor([[0, 1, 2], [0, 2, 3]])
    sh = torch.zeros(1, 9, 3, dtype=torch.float64)
    sh[0, 0], sh[0, 3], sh[0, 1] = 3.0, 0.8, -0.5
    sh.requires_grad_(True)
    albedo = torch.tensor([[0.5, 0.4, 0.3]], dtype=torch.float64, requires_grad=True)
    crops = torch.from_numpy(np.random.default_rng(0).integers(60, 200, (1, 8, 8, 3)).astype(np.uint8))

    def f(v, albedo, sh):
        return ss.photometric_loss(v, tri, albedo, sh, crops, K, render_px=8, erode_px=0)

    assert f(v, albedo, sh).item() > 0
    assert torch.autograd.gradcheck(f, (v, albedo, sh), eps=1e-6, atol=1e-6)


def test_photometric_counts_only_valid_pixels(geom):
    g = _geom64(geom)
    p = _params()
    verts, _ = g.camera_points(p["identity"], p["expression"], p["rotation"], p["translation"])
    crops = _render_target(verts, g.photo_triangles, p["albedo"], p["sh"])
    valid = torch.ones(1, S, S, dtype=torch.bool)
    valid[:, :, :64] = False
    args = (verts, g.photo_triangles, p["albedo"], p["sh"])
    reference = ss.photometric_loss(*args, crops, _Kt(), valid=valid).item()
    spoiled = crops.clone()
    spoiled[:, :, :64] = 200                        # something else where the crop is not valid
    assert ss.photometric_loss(*args, spoiled, _Kt(), valid=valid).item() == reference
    assert ss.photometric_loss(*args, spoiled, _Kt()).item() > 5 * reference
    spoiled[:, :, :64] = 0                          # black (outside the frame) never counts
    assert ss.photometric_loss(*args, spoiled, _Kt()).item() == reference
    assert ss.photometric_loss(*args, spoiled, _Kt(), valid=torch.zeros_like(valid)).item() == 0.0


# ---------------------------------------------------------------- landmarks


def test_landmark_loss_vanishes_at_the_truth_and_weights_points(geom, model, corr):
    p = _params()
    g = _geom64(geom)
    _, points = g.camera_points(p["identity"], p["expression"], p["rotation"], p["translation"])
    lm = losses.project_points(points, _Kt())
    # the same surface points as the supervised LossGeometry
    lg = losses.LossGeometry(model, corr, dtype=torch.float64)
    _, points_lg = lg.camera_points(p["identity"], p["expression"], p["rotation"], p["translation"])
    assert torch.allclose(points, points_lg, atol=1e-9)
    scrambled = lm.clone()
    scrambled[:, list(ss.IRIS_LANDMARKS)] += 30.0    # iris points do not count
    assert ss.landmark_loss(points, _Kt(), scrambled, size_px=S).item() < 1e-6
    w = ss.landmark_weights()
    moved = lm.clone()
    moved[0, 152] += torch.tensor([4.0, 0.0])       # chin: a face-oval point
    d = (16.0 + 0.1 ** 2) ** 0.5 - 0.1               # Charbonnier of 4 px (eps 0.1 px)
    expect = ss.CONTOUR_WEIGHT * d / w.sum().item()
    assert ss.landmark_loss(points, _Kt(), moved).item() == pytest.approx(expect, rel=1e-3)
    moved = lm.clone()
    moved[0, 1] += torch.tensor([0.0, 4.0])         # nose tip: full weight
    assert ss.landmark_loss(points, _Kt(), moved).item() == pytest.approx(d / w.sum().item(), rel=1e-3)
    shifted = ss.landmark_loss(points + torch.tensor([0.3, 0.0, 0.0], dtype=torch.float64), _Kt(), lm).item()
    assert shifted == pytest.approx(0.3 * 300 / 60, rel=0.15)     # ~1.5 px at z ≈ 60 cm


def test_landmark_loss_gradcheck_tiny():
    K = torch.tensor([[[100.0, 0.0, 32.0], [0.0, 100.0, 32.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    pts = torch.tensor([[[0.1, 0.2, 50.0], [1.0, -0.5, 52.0], [-1.0, 0.3, 49.0]]], dtype=torch.float64,
                       requires_grad=True)
    lm = torch.tensor([[[33.0, 31.0], [35.0, 30.0], [30.0, 33.0]]], dtype=torch.float64)
    w = torch.tensor([1.0, 0.25, 1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: ss.landmark_loss(p, K, lm, w), (pts,))


# ---------------------------------------------------------------- flow


def test_flow_loss_vanishes_for_the_true_motion(geom):
    g = _geom64(geom)
    pa, pb = _params(), _params(yaw=0.29, pitch=0.08, shift=(0.3, -0.2, 0.5), jaw=0.4)
    va, _ = g.camera_points(pa["identity"], pa["expression"], pa["rotation"], pa["translation"])
    vb, _ = g.camera_points(pb["identity"], pb["expression"], pb["rotation"], pb["translation"])
    flow = _dense_flow(va, vb, g.triangles)
    vis = ss.flow_visibility(va, g.triangles, _Kt(), S, g.flow_index)
    assert vis.float().mean() > 0.4                 # a turned head hides part of the region
    idx = g.flow_index
    at_truth = ss.flow_loss(va[:, idx], vb[:, idx], _Kt(), flow, vis).item()
    still = ss.flow_loss(va[:, idx], va[:, idx], _Kt(), flow, vis).item()        # no motion predicted
    pw = _params(yaw=0.29, pitch=0.08, shift=(0.3, -0.2, 0.5), jaw=0.0)         # the jaw did not move
    vw, _ = g.camera_points(pw["identity"], pw["expression"], pw["rotation"], pw["translation"])
    wrong = ss.flow_loss(va[:, idx], vw[:, idx], _Kt(), flow, vis).item()
    assert at_truth < 0.05                           # px: bilinear sampling of a smooth field
    assert still > 1.0 and still > 20 * at_truth
    assert wrong > 5 * at_truth


def test_flow_visibility_hides_the_far_cheek(geom):
    g = _geom64(geom)
    p = _params(yaw=0.9)                             # ~50° towards the subject's left (+x): that cheek turns away
    v, _ = g.camera_points(p["identity"], p["expression"], p["rotation"], p["translation"])
    vis = ss.flow_visibility(v, g.triangles, _Kt(), S, g.flow_index)[0]
    x_model = g.neutral[g.flow_index, 0]
    near, far = vis[x_model < -3.0].float().mean(), vis[x_model > 3.0].float().mean()
    assert near > 0.7 and far < 0.2, (near, far)


def test_flow_loss_gradients_and_gradcheck(geom):
    p = {k: v.float().clone().requires_grad_(True) for k, v in _params().items()}
    va, _ = geom.camera_points(p["identity"], p["expression"], p["rotation"], p["translation"])
    vb = va + torch.tensor([0.1, 0.0, 0.0])
    flow = torch.full((1, S, S, 2), 0.7)
    vis = ss.flow_visibility(va, geom.triangles, _Kt().float(), S, geom.flow_index)
    ss.flow_loss(va[:, geom.flow_index], vb[:, geom.flow_index], _Kt().float(), flow, vis).backward()
    for k in ("identity", "expression", "rotation", "translation"):
        assert torch.isfinite(p[k].grad).all() and p[k].grad.abs().sum() > 0, k
    # tiny float64 cases: mesh b under any flow; mesh a under a constant flow (its sampling point is detached)
    K = torch.tensor([[[50.0, 0.0, 7.5], [0.0, 50.0, 7.5], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    a = torch.tensor([[[0.1, 0.2, 20.0], [0.5, -0.4, 21.0], [-0.6, 0.3, 19.0]]], dtype=torch.float64,
                     requires_grad=True)
    b = (a.detach() + 0.05).requires_grad_(True)
    vis = torch.ones(1, 3, dtype=torch.bool)
    rough = torch.randn(1, 16, 16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(lambda b: ss.flow_loss(a.detach(), b, K, rough, vis), (b,))
    const = torch.full((1, 16, 16, 2), 0.3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: ss.flow_loss(a, b, K, const, vis), (a, b))


def test_sample_flow_is_bilinear_at_pixel_centres():
    flow = torch.zeros(1, 4, 4, 2)
    flow[0, 1, 2] = torch.tensor([1.0, -2.0])
    out = ss.sample_flow(flow, torch.tensor([[[2.0, 1.0], [2.5, 1.0], [3.0, 3.0]]]))
    assert torch.allclose(out[0], torch.tensor([[1.0, -2.0], [0.5, -1.0], [0.0, 0.0]]))


# ---------------------------------------------------------------- same, prior


def test_same_loss_compares_within_a_group_only():
    ident = torch.randn(4, 60, dtype=torch.float64)
    alb = torch.rand(4, 3, dtype=torch.float64)
    group = torch.tensor([0, 1, 2, 3])
    assert ss.same_loss(ident, alb, group).item() == 0.0          # nobody to compare with
    group = torch.tensor([0, 0, 1, 1])
    equal = torch.stack([ident[0], ident[0], ident[2], ident[2]])
    equal_alb = torch.stack([alb[0], alb[0], alb[2], alb[2]])
    assert ss.same_loss(equal, equal_alb, group).item() == 0.0
    expect = (((ident[0] - ident[1]) ** 2).sum() + (((alb[0] - alb[1]) / ss.ALBEDO_SAME_SCALE) ** 2).sum()
              + ((ident[2] - ident[3]) ** 2).sum() + (((alb[2] - alb[3]) / ss.ALBEDO_SAME_SCALE) ** 2).sum()) / 2
    assert ss.same_loss(ident, alb, group).item() == pytest.approx(expect.item(), rel=1e-9)
    ident.requires_grad_(True)
    alb.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda i, a: ss.same_loss(i, a, group), (ident, alb))


def test_prior_loss_is_zero_at_the_prior_and_pulls_towards_it():
    sh = torch.zeros(2, 9, 3, dtype=torch.float64)
    sh[:, 0] = ss.SH_UNIT                                          # white ambient light
    zero_id, zero_exp = torch.zeros(2, 60, dtype=torch.float64), torch.zeros(2, 53, dtype=torch.float64)
    assert ss.prior_loss(zero_id, zero_exp, sh).item() == 0.0
    ident = torch.randn(2, 60, dtype=torch.float64, requires_grad=True)
    expr = torch.rand(2, 53, dtype=torch.float64, requires_grad=True)
    sh_off = (sh + 0.3 * torch.randn(2, 9, 3, dtype=torch.float64)).requires_grad_(True)
    loss = ss.prior_loss(ident, expr, sh_off)
    assert loss.item() > 0
    loss.backward()
    for t in (ident, expr, sh_off):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda i, e, s: ss.prior_loss(i, e, s), (ident, expr, sh_off))


# ---------------------------------------------------------------- the weighted sum on a consistent pair


def test_selfsup_loss_on_a_consistent_synthetic_pair(geom):
    """A pair rendered from known parameters, with exact flow and landmarks: every term is ~0 at the truth
    (same identity and albedo in both frames) and the total grows when the prediction is off."""
    g = _geom64(geom)
    frames = [_params(), _params(yaw=0.29, pitch=0.08, shift=(0.3, -0.2, 0.5), jaw=0.4)]
    verts, crops, lms = [], [], []
    for p in frames:
        v, pts = g.camera_points(p["identity"], p["expression"], p["rotation"], p["translation"])
        verts.append(v)
        crops.append(_render_target(v, g.photo_triangles, p["albedo"], p["sh"])[0].numpy())
        lms.append(losses.project_points(pts, _Kt())[0].numpy())
    pairs = {"crops": np.stack(crops)[None], "landmarks": np.stack(lms)[None], "K_crop": K_CROP[None],
             "flow": _dense_flow(verts[0], verts[1], g.triangles).numpy(), "inside": np.ones((1, S, S), bool),
             "video": np.array(["x"])}
    b = ss.pair_tensors(pairs)
    b["K_crop"], b["K_pair"] = b["K_crop"].double(), b["K_pair"].double()
    pred = {k: torch.cat([frames[0][k], frames[1][k]]) for k in frames[0]}
    total, terms = ss.selfsup_loss(pred, b, g)
    assert set(terms) == set(ss.DEFAULT_REAL_WEIGHTS)
    assert terms["landmark"] < 1e-3 and terms["photo"] < 8e-3 and terms["flow"] < 0.05 and terms["same"] == 0
    off = dict(pred)
    off["translation"] = pred["translation"] + torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0]], dtype=torch.float64)
    total_off, terms_off = ss.selfsup_loss(off, b, g)
    for k in ("landmark", "photo", "flow"):
        assert terms_off[k] > 5 * max(terms[k].item(), 1e-4), k
    assert total_off > total


# ---------------------------------------------------------------- depth (E_geo)


def _sensor_depth(verts, triangles):
    """(1, S, S) float mm: the mesh's exact depth where it covers a pixel, 0 elsewhere."""
    frags = rasterize(verts[0].detach().numpy(), triangles.numpy(), K_CROP, S, S, backend="cpu")
    return torch.from_numpy(np.where(frags.mask, frags.depth_cm * 10.0, 0.0))[None]


def test_depth_loss_vanishes_at_the_truth_and_pulls_the_mesh_onto_the_depth(geom):
    g = _geom64(geom)
    p = _params()
    verts, _ = g.camera_points(p["identity"], p["expression"], p["rotation"], p["translation"])
    depth = _sensor_depth(verts, g.triangles)
    K = _Kt()
    assert ss.depth_loss(verts, g.triangles, depth, K).item() < 1e-8      # the rasterizer's own depth
    # 5 mm too far: a gradient step on the translation alone brings the mesh back to the surface
    t = (p["translation"] + torch.tensor([0.0, 0.0, 0.5])).clone().requires_grad_(True)
    optimiser = torch.optim.SGD([t], lr=0.5)
    for _ in range(30):
        optimiser.zero_grad()
        v, _ = g.camera_points(p["identity"], p["expression"], p["rotation"], t)
        ss.depth_loss(v, g.triangles, depth, K).backward()
        optimiser.step()
    assert abs(float(t[0, 2] - p["translation"][0, 2])) < 0.02             # 0.2 mm, from 5 mm
    # pixels without data or beyond the gate do not count: nothing to pull on, a zero loss
    assert ss.depth_loss(verts, g.triangles, torch.zeros_like(depth), K).item() == 0.0
    far = torch.where(depth > 0, depth + 50.0, depth)                       # 5 cm behind
    assert ss.depth_loss(verts, g.triangles, far, K).item() == 0.0
