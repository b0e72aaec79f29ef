"""Self-supervised CoarseNet terms on real frame pairs (seed 002): no labels, only the image.

Each term is a plain function of batched tensors (shapes in its docstring) returning a scalar;
`selfsup_loss` builds their weighted sum for a batch of pairs (trainers.real_frames) from a
decoded prediction. `SelfSupGeometry` restricts the face model to the vertices the terms need
(as trainers.losses.LossGeometry does for the supervised terms) and is passed in explicitly.

- photometric_loss (E_con/E_col): the predicted mesh rendered through engine.shading with the
  predicted SH light and albedo, against the crop in linear RGB, per-pixel Euclidean norm
  averaged over the rendered skin (the L2,1 norm: robust to the pixels the model cannot explain).
  Albedo: CoarseNet predicts one linear-RGB skin tone (B, 3); rendered over the plain skin only
  (lips, brows, eyes, lid margins, mouth, nostril-free forehead above FOREHEAD_CM excluded), one
  tone is what that skin is to first order, and the term does not ask the net for more than it
  outputs. Rendered at `render_px` (64) with the target area-averaged in linear RGB.
- depth_loss (E_geo, RGB-D frames): the predicted mesh's rendered depth against the sensor's,
  Huber in cm over the pixels both cover (for fine-tuning on RGB-D takes; trainers.rgbd makes
  synthetic ones with exact truth).
- landmark_loss (E_lan): MediaPipe's points against the model's surface points, Charbonnier px.
- flow_loss (E_flow): projected vertex motion a -> b against the optical flow at a's projections.
- same_loss (E_same): identity and albedo agree within one video (one person).
- prior_loss (E_reg): Gaussian identity prior, L1 expression sparsity, SH light near white and
  no stronger than its ambient part.

Photometric scale ambiguity: albedo · s with light / s renders the same image; the synthetic
supervised loss, which runs alongside, fixes the gauge (its SH and albedo labels).
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from engine.correspondence import LandmarkCorrespondence
from engine.facemodel import FACE_VERTICES, FaceModel, model_vertices_torch
from engine.gaze import IRIS_LANDMARKS
from engine.rasterizer import rasterize
from engine.shading import pixel_barycentrics, render, vertex_normals
from trainers.losses import project_points

#: MediaPipe's face-oval points (FACEMESH_FACE_OVAL): the jaw and forehead contour. On a turned head
#: MediaPipe puts them on the silhouette, which slides over the surface, while the model's point is
#: fixed, so they are down-weighted by CONTOUR_WEIGHT (not dropped: frontal they locate the jaw).
FACE_OVAL_LANDMARKS = (10, 21, 54, 58, 67, 93, 103, 109, 127, 132, 136, 148, 149, 150, 152, 162, 172, 176,
                       234, 251, 284, 288, 297, 323, 332, 338, 356, 361, 365, 377, 378, 379, 389, 397, 400, 454)
CONTOUR_WEIGHT = 0.25
#: Skin higher than this above the brows is left out of the photometric term (hair often covers it).
FOREHEAD_CM = 3.5
#: Skin within this distance of the eyeballs or lashes (lid margins) is out of both image terms.
LID_MARGIN_CM = 0.4
#: Flow term vertices: a fixed subsample (seed 0) of the flow region's vertices.
N_FLOW_VERTICES = 1500
#: E_same counts an albedo difference of this (linear RGB, per channel) like one identity prior std.
ALBEDO_SAME_SCALE = 0.05
#: Irradiance 1 from every direction is SH DC coefficient 1 / Y00; the SH prior's unit.
SH_UNIT = 1.0 / (0.5 * math.sqrt(1.0 / math.pi))
#: Term weights of `selfsup_loss` (each term in its unit: px, linear RGB, prior stds).
DEFAULT_REAL_WEIGHTS = {"landmark": 0.02, "photo": 1.0, "flow": 0.05, "same": 0.01, "prior": 0.01}


class SelfSupGeometry:
    """The face model restricted to the front-face region, as torch tensors.

    vertex_ids (N,) model ids of the flow region (front face skin in front of the ears, lips and
    brows included, lid margins excluded) followed by the 478 landmark triangles' corners;
    triangles (T, 3) local ids of the region (visibility for the flow term); photo_triangles
    (T', 3) local ids of the plain skin the photometric term renders; flow_index (F,) local ids
    of the flow term's vertices; corner (478, 3) local ids and barycentric (478, 3) of the
    landmark surface points; landmark_weight (478,) iris 0, face oval CONTOUR_WEIGHT, else 1.
    """

    def __init__(self, model: FaceModel, correspondence: LandmarkCorrespondence, n_identity: int = 60,
                 n_flow_vertices: int = N_FLOW_VERTICES, seed: int = 0, dtype=torch.float32):
        from scipy.spatial import cKDTree

        from trainers.synthesis import SynthesisAssets

        assets = SynthesisAssets.build(model, correspondence)
        rest = model.neutral
        tris = model.triangles
        lm68 = rest[model.landmark68_vertices]
        ear_z = lm68[[0, 16], 2].mean()
        front = ((model.triangle_material == model.materials.index("M_Face")) & (tris.max(axis=1) < FACE_VERTICES.stop)
                 & (rest[tris].mean(axis=1)[:, 2] > ear_z + 1.0))
        eyes = np.concatenate([assets.lashes_vertices, *assets.eye_vertices])
        d, _ = cKDTree(rest[eyes]).query(rest, distance_upper_bound=LID_MARGIN_CM)
        lid = np.isfinite(d)
        region = front & ~lid[tris].any(axis=1)
        plain = ((assets.lip_weight == 0) & (assets.brow_weight == 0) & (assets.scalp_height < FOREHEAD_CM)
                 & (assets.mouth_ao >= 1.0))
        photo = region & plain[tris].all(axis=1)
        region_ids = np.unique(tris[region])
        corners = tris[correspondence.triangle]                                          # (478, 3)
        ids = np.concatenate([region_ids, corners.reshape(-1)])
        local = np.full(model.n_vertices, -1, np.int64)
        local[region_ids] = np.arange(len(region_ids))
        self.vertex_ids = ids
        self.n_region = len(region_ids)
        self.triangles = torch.as_tensor(local[tris[region]])
        self.photo_triangles = torch.as_tensor(local[tris[photo]])
        rng = np.random.default_rng(seed)
        self.flow_index = torch.as_tensor(np.sort(rng.choice(self.n_region, min(n_flow_vertices, self.n_region),
                                                             replace=False)))
        self.neutral = torch.as_tensor(rest[ids], dtype=dtype)
        self.identity_modes = torch.as_tensor(model.identity_modes[:n_identity, ids], dtype=dtype)
        self.expression_modes = torch.as_tensor(model.expression_modes[:, ids], dtype=dtype)
        self.corner = torch.arange(self.n_region, len(ids)).reshape(-1, 3)
        self.barycentric = torch.as_tensor(correspondence.barycentric, dtype=dtype)
        self.landmark_weight = landmark_weights(len(corners))

    def camera_points(self, identity: torch.Tensor, expression: torch.Tensor, rotation: torch.Tensor,
                      translation_cm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """identity (B, K'), expression (B, M), R (B, 3, 3), t (B, 3) cm -> (region vertices (B, N_region, 3),
        landmark points (B, 478, 3)), camera space, cm."""
        v = model_vertices_torch(self.neutral, self.identity_modes, self.expression_modes, identity, expression)
        v = torch.einsum("bij,bnj->bni", rotation, v) + translation_cm.unsqueeze(1)
        points = torch.einsum("blcj,lc->blj", v[:, self.corner], self.barycentric)
        return v[:, :self.n_region], points


def landmark_weights(n: int = 478, contour_weight: float = CONTOUR_WEIGHT) -> torch.Tensor:
    """(n,) per-landmark weights: 0 for the iris points (the model's eyeballs do not turn), contour_weight
    for the face oval, 1 elsewhere."""
    w = torch.ones(n)
    w[list(FACE_OVAL_LANDMARKS)] = contour_weight
    w[list(IRIS_LANDMARKS)] = 0.0
    return w


def srgb_to_linear(c: torch.Tensor) -> torch.Tensor:
    """sRGB values in [0, 1] -> linear (the IEC 61966-2-1 curve, as trainers.synthesis)."""
    return torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _scaled_camera(K: torch.Tensor, factor: float) -> torch.Tensor:
    """K (B, 3, 3) of an S px crop -> K of the same crop at S / factor px (pixel centres at integers:
    x' = (x + 0.5) / factor - 0.5)."""
    s = 1.0 / factor
    A = torch.tensor([[s, 0.0, 0.5 * s - 0.5], [0.0, s, 0.5 * s - 0.5], [0.0, 0.0, 1.0]], dtype=K.dtype)
    return A @ K


# ---------------------------------------------------------------- terms


def photometric_loss(vertices_cam: torch.Tensor, triangles: torch.Tensor, albedo: torch.Tensor, sh: torch.Tensor,
                     crops: torch.Tensor, K_crop: torch.Tensor, render_px: int = 64, valid: torch.Tensor | None = None,
                     erode_px: int = 1, eps: float = 1e-3) -> torch.Tensor:
    """Mean per-pixel Euclidean linear-RGB error (L2,1) between the rendered skin and the crop.

    vertices_cam (B, N, 3) cm; triangles (T, 3) local ids (the plain skin); albedo (B, 3) one tone or
    (B, N, 3) per vertex, linear RGB; sh (B, 9, 3) camera-space irradiance SH (engine.shading); crops
    (B, S, S, 3) uint8 sRGB; K_crop (B, 3, 3) px; valid (B, S, S) bool pixels that may count (inside the
    frame). Rendered at render_px (S a multiple of it), the crop area-averaged in linear RGB; counted
    pixels: covered by the render, `erode_px` away from its edge (edge pixels mix in the background),
    and whose every crop pixel is valid, neither black (<= 3) nor saturated (>= 250: specular).
    Gradients reach the vertices (barycentrics, normals), albedo and sh. 0 when no pixel counts.
    """
    B, S = crops.shape[0], crops.shape[1]
    if S % render_px:
        raise ValueError(f"crop size {S} is not a multiple of render_px {render_px}")
    f = S // render_px
    codes = crops.to(vertices_cam.dtype)
    ok = (codes.amax(-1) < 250) & (codes.amax(-1) > 3)
    if valid is not None:
        ok &= valid.bool()
    target = F.avg_pool2d(srgb_to_linear(codes / 255.0).permute(0, 3, 1, 2), f).permute(0, 2, 3, 1)
    ok = -F.max_pool2d(-ok.to(codes.dtype)[:, None], f)[:, 0] > 0.5                # every sub-pixel ok
    K = _scaled_camera(torch.as_tensor(K_crop, dtype=torch.float64), f)
    total = vertices_cam.new_zeros(())
    count = 0
    for i in range(B):
        a = albedo[i].expand(vertices_cam.shape[1], 3) if albedo.dim() == 2 else albedo[i]
        image, mask = render(vertices_cam[i], triangles, a, sh[i], K[i].numpy(), render_px, render_px,
                             backend="cpu")
        m = mask.to(codes.dtype)[None, None]
        if erode_px:
            m = -F.max_pool2d(-m, 2 * erode_px + 1, stride=1, padding=erode_px)
        m = (m[0, 0] > 0.5) & ok[i]
        if not m.any():
            continue
        d2 = ((image - target[i]) ** 2).sum(-1)[m]
        total = total + (torch.sqrt(d2 + eps * eps) - eps).sum()
        count += int(m.sum())
    return total / max(count, 1)


def depth_loss(vertices_cam: torch.Tensor, triangles: torch.Tensor, depth_mm: torch.Tensor, K: torch.Tensor,
               gate_cm: float = 2.0, huber_cm: float = 0.3) -> torch.Tensor:
    """E_geo: the rendered depth of the predicted mesh against a sensor's, a Huber mean in cm.

    vertices_cam (B, N, 3) cm; triangles (T, 3) local ids (the surfaces a depth camera sees, e.g.
    the front face); depth_mm (B, H, W) the sensor depth registered to the image K (B, 3, 3) px
    describes, 0 = no data. The mesh is rasterized at (H, W) (engine.rasterizer, no gradient) and
    each covered pixel's depth is the perspective-correct interpolation of its triangle's corner
    depths (engine.shading.pixel_barycentrics), differentiable in the vertices. Counted pixels:
    covered, with sensor data, and within gate_cm of it (farther is another surface: hair, a hand,
    the background through a hole). 0 when no pixel counts.
    """
    B, H, W = depth_mm.shape
    tri = torch.as_tensor(triangles).long()
    total = vertices_cam.new_zeros(())
    count = 0
    for i in range(B):
        v = vertices_cam[i]
        frags = rasterize(v.detach().numpy(), tri.numpy(), K[i].detach().numpy(), W, H, backend="cpu")
        tid = torch.as_tensor(frags.triangle_id).long()
        ys, xs = torch.nonzero(tid >= 0, as_tuple=True)
        if len(ys) == 0:
            continue
        corners = v[tri[tid[ys, xs]]]                                              # (P, 3, 3)
        b = pixel_barycentrics(corners, torch.stack([xs, ys], dim=-1), K[i].detach().numpy())
        z = (b * corners[..., 2]).sum(-1)
        sensor = depth_mm[i, ys, xs].to(z.dtype) / 10.0
        ok = (sensor > 0) & ((z.detach() - sensor).abs() < gate_cm)
        if not ok.any():
            continue
        total = total + F.huber_loss(z[ok], sensor[ok], delta=huber_cm, reduction="sum")
        count += int(ok.sum())
    return total / max(count, 1)


def landmark_loss(points_cam: torch.Tensor, K_crop: torch.Tensor, landmarks_px: torch.Tensor,
                  weight: torch.Tensor | None = None, size_px: int | None = None, eps_px: float = 0.1) -> torch.Tensor:
    """Weighted mean Charbonnier distance (crop px) between the model's projected surface points
    points_cam (B, L, 3) cm and MediaPipe's landmarks_px (B, L, 2) under K_crop (B, 3, 3).

    weight (L,) per landmark (default landmark_weights(): iris out, face oval down-weighted); a
    distance, not its square, so a MediaPipe miss pulls with bounded force. Landmarks outside the
    size_px crop (when given) do not count. 0 when nothing counts.
    """
    w = (landmark_weights(points_cam.shape[1]) if weight is None else weight).to(points_cam.dtype)
    w = w.expand(landmarks_px.shape[:2])
    if size_px is not None:
        inside = ((landmarks_px >= 0) & (landmarks_px <= size_px - 1)).all(-1)
        w = w * inside.to(w.dtype)
    d = torch.sqrt(((project_points(points_cam, K_crop) - landmarks_px) ** 2).sum(-1) + eps_px ** 2) - eps_px
    return (d * w).sum() / w.sum().clamp_min(1e-9)


@torch.no_grad()
def flow_visibility(vertices_cam: torch.Tensor, triangles: torch.Tensor, K_crop: torch.Tensor, size_px: int,
                    index: torch.Tensor | None = None, raster_px: int = 64, depth_tol_cm: float = 0.5,
                    min_cos: float = 0.2) -> torch.Tensor:
    """(B, F) bool: which of the vertices vertices_cam[:, index] (B, N, 3) cm a camera K_crop (B, 3, 3)
    of a size_px crop sees: inside the crop, not behind the mesh's own depth buffer (rasterized at
    raster_px: the depth at its nearest pixel, depth_tol_cm), not on the silhouette (the 3x3
    pixels about it covered) and facing the camera (cos > min_cos). Not differentiable (visibility)."""
    B = vertices_cam.shape[0]
    idx = torch.arange(vertices_cam.shape[1]) if index is None else index
    f = size_px / raster_px
    K = _scaled_camera(torch.as_tensor(K_crop, dtype=torch.float64), f)
    out = torch.zeros(B, len(idx), dtype=torch.bool)
    for i in range(B):
        v = vertices_cam[i].detach().to(torch.float64)
        frags = rasterize(v.numpy(), triangles.numpy(), K[i].numpy(), raster_px, raster_px, backend="cpu")
        zbuf = np.where(np.isfinite(frags.depth_cm), frags.depth_cm, 1e9)
        covered = cv2.erode(frags.mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        p = v[idx]
        uv = project_points(p[None], K[i][None])[0].numpy()
        inside = ((uv >= 0) & (uv <= raster_px - 1)).all(axis=1) & (p[:, 2].numpy() > 1.0)
        ij = np.clip(np.round(uv).astype(np.int64), 0, raster_px - 1)
        seen = inside & (p[:, 2].numpy() <= zbuf[ij[:, 1], ij[:, 0]] + depth_tol_cm) & covered[ij[:, 1], ij[:, 0]]
        n = vertex_normals(v, triangles)[idx]
        facing = (n * (-p / p.norm(dim=-1, keepdim=True))).sum(-1).numpy() > min_cos
        out[i] = torch.from_numpy(seen & facing)
    return out


def sample_flow(flow: torch.Tensor, points_px: torch.Tensor) -> torch.Tensor:
    """Bilinear samples (B, F, 2) of flow (B, S, S, 2) at pixel positions points_px (B, F, 2) (pixel centres
    at integers; border values beyond the crop)."""
    S_h, S_w = flow.shape[1:3]
    g = torch.stack([2.0 * points_px[..., 0] / (S_w - 1) - 1.0, 2.0 * points_px[..., 1] / (S_h - 1) - 1.0], -1)
    out = F.grid_sample(flow.permute(0, 3, 1, 2).to(points_px.dtype), g[:, :, None], mode="bilinear",
                        padding_mode="border", align_corners=True)
    return out[..., 0].permute(0, 2, 1)


def flow_loss(vertices_a: torch.Tensor, vertices_b: torch.Tensor, K_crop: torch.Tensor, flow: torch.Tensor,
              visible: torch.Tensor, eps_px: float = 0.05) -> torch.Tensor:
    """E_flow: mean Charbonnier distance (crop px) between the projected motion of the same vertices from
    mesh a (B, F, 3) to mesh b (B, F, 3) (cm, one crop camera K_crop (B, 3, 3)) and the optical flow
    (B, S, S, 2) px a -> b sampled (bilinear) at a's projections, over the (B, F) `visible` ones.

    Seed 002 squares the residual; a distance is used because DIS flow fails in patches (occlusions,
    lid and lip motion). The sampling position is detached: the flow field's spatial derivative is
    texture noise, not a direction to move the mesh. 0 when nothing is visible."""
    pa = project_points(vertices_a, K_crop)
    pb = project_points(vertices_b, K_crop)
    target = sample_flow(flow, pa.detach())
    r = torch.sqrt((((pb - pa) - target) ** 2).sum(-1) + eps_px ** 2) - eps_px
    w = visible.to(r.dtype)
    return (r * w).sum() / w.sum().clamp_min(1.0)


def same_loss(identity: torch.Tensor, albedo: torch.Tensor, group: torch.Tensor,
              albedo_scale: float = ALBEDO_SAME_SCALE) -> torch.Tensor:
    """E_same: mean over all pairs (i < j) of one group (one video: one person) of
    ||identity_i - identity_j||² (prior-std units, (N, K)) + ||(albedo_i - albedo_j) / albedo_scale||²
    ((N, 3) linear RGB); group (N,) int. 0 (with a graph) when no two samples share a group."""
    same = (group[:, None] == group[None, :]).triu(diagonal=1)
    if not same.any():
        return identity.sum() * 0.0 + albedo.sum() * 0.0
    i, j = torch.nonzero(same, as_tuple=True)
    d_id = ((identity[i] - identity[j]) ** 2).sum(-1)
    d_alb = (((albedo[i] - albedo[j]) / albedo_scale) ** 2).sum(-1)
    return (d_id + d_alb).mean()


def prior_loss(identity: torch.Tensor, expression: torch.Tensor, sh: torch.Tensor, w_identity: float = 1.0,
               w_expression: float = 1.0, w_sh: float = 1.0) -> torch.Tensor:
    """E_reg, what keeps unlabelled frames from drifting: identity (B, K) mean α² (the model's N(0, 1)
    prior: ~1 for a typical person); expression (B, M) mean weight (L1 on non-negative weights: shapes
    not needed to explain the image go to 0, rather than many small ones fitting noise and shading);
    sh (B, 9, 3): the mean square of bands 1-2 plus that of each coefficient's deviation from the
    channels' mean, in units of SH_UNIT (an ambient irradiance of 1), so light stays mostly ambient and
    white (a face shows half the sphere of normals: unconstrained, band 2 explains the nose by light)."""
    e_id = (identity ** 2).mean()
    e_exp = expression.abs().mean()
    s = sh / SH_UNIT
    e_sh = (s[:, 1:] ** 2).mean() + ((s - s.mean(-1, keepdim=True)) ** 2).mean()
    return w_identity * e_id + w_expression * e_exp + w_sh * e_sh


# ---------------------------------------------------------------- the weighted sum


def pair_tensors(pairs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """numpy pair batch (trainers.real_frames fields, P pairs) -> tensors for `selfsup_loss` and the net:
    image (2P, 3, S, S) normalised net input (pairs interleaved: a0, b0, a1, b1, ...), crops (2P, S, S, 3)
    uint8, landmarks (2P, 478, 2), K_crop (2P, 3, 3), inside (2P, S, S), flow (P, S, S, 2) float32,
    K_pair (P, 3, 3), group (2P,) int64 (from `group` (P,) if present, else from `video`)."""
    from engine.coarsenet import preprocess
    from trainers.real_frames import video_groups

    crops = torch.from_numpy(np.ascontiguousarray(pairs["crops"]))
    P, _, S = crops.shape[:3]
    crops = crops.reshape(2 * P, S, S, 3)
    K = torch.from_numpy(np.asarray(pairs["K_crop"], np.float32))
    group = pairs["group"] if "group" in pairs else video_groups(pairs["video"])
    return {"image": preprocess(crops), "crops": crops,
            "landmarks": torch.from_numpy(np.asarray(pairs["landmarks"], np.float32)).reshape(2 * P, -1, 2),
            "K_crop": K.repeat_interleave(2, 0), "K_pair": K,
            "inside": torch.from_numpy(np.asarray(pairs["inside"], bool)).repeat_interleave(2, 0),
            "flow": torch.from_numpy(np.asarray(pairs["flow"], np.float32)),
            "group": torch.from_numpy(np.asarray(group, np.int64)).repeat_interleave(2, 0)}


def selfsup_loss(pred: dict, batch: dict, geometry: SelfSupGeometry, weights: dict | None = None,
                 render_px: int = 64) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the self-supervised terms and the terms themselves (detached).

    pred: engine.coarsenet.decode output (with translation) for the 2P interleaved frames of
    `pair_tensors(...)` = batch. A term whose weight is 0 is skipped.
    """
    w = {**DEFAULT_REAL_WEIGHTS, **(weights or {})}
    S = batch["crops"].shape[1]
    terms: dict[str, torch.Tensor] = {}
    expression = pred.get("expression_linear", pred["expression"])   # unclamped: gradients outside [0, 1] too
    verts, points = geometry.camera_points(pred["identity"], expression, pred["rotation"], pred["translation"])
    if w["landmark"]:
        terms["landmark"] = landmark_loss(points, batch["K_crop"], batch["landmarks"],
                                          geometry.landmark_weight, size_px=S)
    if w["photo"]:
        terms["photo"] = photometric_loss(verts, geometry.photo_triangles, pred["albedo"], pred["sh"],
                                          batch["crops"], batch["K_crop"], render_px, batch["inside"])
    if w["flow"]:
        va, vb = verts[0::2][:, geometry.flow_index], verts[1::2][:, geometry.flow_index]
        vis = flow_visibility(verts[0::2], geometry.triangles, batch["K_pair"], S, geometry.flow_index,
                              raster_px=render_px)
        terms["flow"] = flow_loss(va, vb, batch["K_pair"], batch["flow"], vis)
    if w["same"]:
        terms["same"] = same_loss(pred["identity"], pred["albedo"], batch["group"])
    if w["prior"]:
        terms["prior"] = prior_loss(pred["identity"], expression, pred["sh"])
    total = sum(w[k] * v for k, v in terms.items())
    return total, {k: v.detach() for k, v in terms.items()}
