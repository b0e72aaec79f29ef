"""FineNet's samples: a frame and its coarse fit read into the face's UV map, with the frame's light,
so the photometric loss (trainers.detail_loss) can ask what detail explains the rest of the shading.

Per frame (frame_maps): the coarse surface in the map (engine.detail.texel_geometry), the frame
unwrapped (engine.detail.unwrap, sRGB decoded to linear), the visible texels (eroded: the outline
mixes in the background), and an SH light fitted to those texels and the coarse normals
(trainers.inverse_render.fit_sh_lighting, a white light with a weak colour freedom). The albedo
model, the frame divided by the shading and blurred by ALBEDO_SIGMA_TEXELS (about 6 mm), is the
loss's; the same light and albedo model serve the coarse and the detailed face when they are
compared (bench/eval_detail.py).

Synthetic frames with exact detail (synthetic_detail_frame): a random synthesis person, expression,
light and pose, its face skin replaced by the detail mesh displaced by trainers.wrinkles' map,
rendered with trainers.synthesis' shading at 2x and averaged down, sRGB, 8 bits.
"""
from __future__ import annotations

import cv2
import numpy as np

from engine.detail import displaced_normals, displaced_vertices, sample_map, texel_geometry, unwrap
from engine.pose import default_camera_matrix, model_to_camera
from engine.rasterizer import rasterize
from engine.uvmap import DetailMesh, FaceUV
from trainers.inverse_render import fit_sh_lighting, vertex_adjacency
from trainers.synthesis import (N_IDENTITY, UNDRAWN_MATERIALS, SynthesisAssets, interpolate_many, linear_to_srgb,
                                posed_vertices, sample_expression,
                                sample_lighting, sh_basis_np, shade_pixels, srgb_to_linear, vertex_albedo)
from trainers.wrinkles import random_wrinkles

#: The albedo model's blur (trainers.detail_loss), texels of a 256 map (scale it with the map).
ALBEDO_SIGMA_TEXELS = 5.0
#: Visible texels this close to the outline of what is visible are left out.
EDGE_TEXELS = 2
#: Texels the light is fitted to, at most (an even subsample).
LIGHT_SAMPLES = 6000


def frame_maps(image_rgb: np.ndarray, vertices_cam: np.ndarray, K: np.ndarray, face_uv: FaceUV) -> dict:
    """One frame's FineNet maps (module docstring): float32 positions, normals, Pu, Pv (R, R, 3),
    colour (R, R, 3) linear, visible (R, R) bool, sh (9, 3); image_rgb (H, W, 3) uint8, vertices_cam
    (V, 3) cm."""
    g = texel_geometry(face_uv, vertices_cam)
    srgb, visible = unwrap(image_rgb, vertices_cam, g, face_uv, K)
    visible = cv2.erode(visible.astype(np.uint8), np.ones((2 * EDGE_TEXELS + 1,) * 2, np.uint8)) > 0
    colour = srgb_to_linear(srgb / 255.0).astype(np.float32)
    out = {k: v.astype(np.float32) for k, v in g.items()}
    out.update(colour=colour, visible=visible)
    ids = np.flatnonzero(visible)
    if len(ids) < 50:
        out.update(sh=np.zeros((9, 3), np.float32), visible=np.zeros_like(visible))
        return out
    pick = ids[np.linspace(0, len(ids) - 1, min(len(ids), LIGHT_SAMPLES)).astype(int)]
    normals = g["normals"].reshape(-1, 3)
    sh = fit_sh_lighting(normals[pick], colour.reshape(-1, 3)[pick])
    shading = (sh_basis_np(normals.astype(np.float64)) @ sh).reshape(colour.shape)
    out.update(sh=sh.astype(np.float32), visible=visible & (shading.min(axis=-1) > 1e-3))   # unlit: nothing to read
    return out


def synthetic_detail_frame(rng: np.random.Generator, assets: SynthesisAssets, face_uv: FaceUV,
                           detail_mesh: DetailMesh, size: tuple[int, int] = (640, 480),
                           distance_cm: tuple[float, float] = (40.0, 65.0), max_yaw_deg: float = 30.0,
                           supersample: int = 2, albedo_smoothing: int = 4, plain_skin: bool = False) -> dict:
    """A random face with known detail: image (H, W, 3) uint8 sRGB, vertices_cam (V, 3) the coarse
    mesh (cm), K (3, 3), displacement_mm (R, R) the truth, sh (9, 3).

    albedo_smoothing: rounds of neighbour averaging over the mesh that take synthesis' per-vertex
    speckle (3 % at the 2.8 mm vertex spacing, a pattern no skin has at that scale) out of the albedo;
    brows, lips and the hairline stay. plain_skin: one skin tone everywhere instead (no brows, lips or
    hair: only the shading varies, the case where the photometric loss alone can pin the detail down).
    """
    model = assets.model
    identity = np.clip(rng.normal(0.0, 1.0, N_IDENTITY), -2.5, 2.5).astype(np.float32)
    expression, gaze, _ = sample_expression(rng, model.expression_names)
    albedo, params = vertex_albedo(assets, rng)
    albedo = _smoothed(albedo, model.triangles, albedo_smoothing)
    if plain_skin:
        albedo[:] = params["skin_rgb"]
    sh, _, _ = sample_lighting(rng)
    verts = posed_vertices(assets, identity, expression, gaze)
    yaw, pitch, roll = (np.radians(rng.uniform(-a, a)) for a in (max_yaw_deg, 12.0, 8.0))
    R = model_to_camera(yaw, pitch, roll)
    w, h = size
    K = default_camera_matrix(w, h)
    t = np.array([rng.uniform(-3, 3), rng.uniform(-2, 2), rng.uniform(*distance_cm)])
    cam = (verts.astype(np.float64) @ R.T + t).astype(np.float32)
    truth = random_wrinkles(rng, model, face_uv)
    detail = displaced_vertices(detail_mesh, cam, face_uv.triangles, truth)
    # the face skin drawn as the displaced detail mesh, everything else as synthesis draws it
    draw = model.triangles[~model.material_mask(*UNDRAWN_MATERIALS, "M_Face")]
    V = len(cam)
    verts_all = np.concatenate([cam, detail]).astype(np.float64)
    tris = np.concatenate([draw, detail_mesh.triangles + V]).astype(np.int64)
    albedo_all = np.concatenate([albedo, albedo[detail_mesh.parents].mean(axis=1)])
    s = supersample
    K_ss = np.array([[s, 0, (s - 1) / 2], [0, s, (s - 1) / 2], [0, 0, 1.0]]) @ K
    frags = rasterize(verts_all, tris, K_ss, w * s, h * s, backend="cpu")
    linear, _, _ = shade_pixels(frags, verts_all, tris, albedo_all, sh)
    # the skin shaded with the detail's own normal map (engine.detail.displaced_normals), as FineNet's
    # loss and a renderer's normal texture see it, not with the detail mesh's faceted vertex normals
    g = texel_geometry(face_uv, cam)
    normal_map = displaced_normals(g["normals"], g["Pu"], g["Pv"], truth / 10.0)
    on_skin = frags.triangle_id >= len(draw)
    uv_all = np.zeros((len(verts_all), 2), np.float32)
    uv_all[V:] = detail_mesh.uv
    uv_px, rho = interpolate_many(frags, tris, uv_all, albedo_all)
    n = sample_map(normal_map, uv_px[on_skin])
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    linear[on_skin] = rho[on_skin] * (sh_basis_np(n) @ sh)
    background = srgb_to_linear(np.full(3, rng.uniform(0.2, 0.6)))
    linear = np.where(frags.mask[..., None], linear, background)
    linear = linear.reshape(h, s, w, s, 3).mean(axis=(1, 3))
    image = np.clip(np.round(linear_to_srgb(np.clip(linear, 0, 1)) * 255), 0, 255).astype(np.uint8)
    return {"image": image, "vertices_cam": cam, "K": K, "displacement_mm": truth, "sh": sh}



def _smoothed(values: np.ndarray, triangles: np.ndarray, rounds: int) -> np.ndarray:
    """values (V, C) averaged with their mesh neighbours (half self, half neighbours' mean) rounds times."""
    if rounds <= 0:
        return values
    adj = vertex_adjacency(triangles, len(values))
    degree = np.maximum(np.asarray(adj.sum(axis=1)).ravel(), 1.0)[:, None]
    v = values.astype(np.float64)
    for _ in range(rounds):
        v = 0.5 * v + 0.5 * (adj @ v) / degree
    return v.astype(values.dtype)
