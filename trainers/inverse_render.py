"""Inverse-rendered real faces: CoarseNet training samples with real skin and exact labels.

Seed 002's "inverse-rendered photo-realistic" data: a real video frame is fitted
(MediaPipe landmarks -> engine.fitting.TakeFitter, identity converged over the take
and locked), the fitted mesh is laid over the frame, the frame's colour is read
at every visible vertex and divided by an SH lighting estimated from those very
colours, which leaves a per-vertex albedo of that real person. The person is then
re-rendered by trainers.synthesis with a NEW expression, head pose, camera,
light, background, occluders and camera effects, so the image shows real skin
and every label (identity, expression, pose, K, SH light, landmarks) is exact:
the image is rendered from the labels.

Lifting (lift_albedo), and its assumptions:
  * image formation is synthesis's: linear colour = albedo · (sh_basis(n) @ sh), sRGB encoded;
    no specular, no cast shadows, no inter-reflection (shiny or shadowed skin goes into the albedo);
  * the skin albedo is constant enough that a least-squares fit of colour ≈ sh_basis(n) @ L over
    the visible skin recovers the light (robustly reweighted: brows, lips, stubble are outliers),
    and the light is white but for a weak per-channel freedom (fit_sh_lighting), with band 1 at
    most the DC term's size and band 2 damped: a face shows half the sphere of normals at most;
  * albedo and light are ambiguous up to a scale per colour channel (a·L = (a·s)(L/s)); the gauge
    taken is: the estimated irradiance averaged over the visible skin vertices is 1 in each
    channel. So the real light is taken as white on average (its colour cast stays in the
    albedo) and the albedo is about the linear colour the skin showed in the frame;
  * the fit is right: where the landmark fit misses the silhouette, background leaks into the
    outermost vertices (grazing vertices are left out to limit this);
  * a vertex is seen when it projects into the frame (1 px margin), is not behind the depth buffer
    of the fitted mesh (0.3 cm) nor on its silhouette, faces the camera (cos > 0.25), and its colour is neither
    saturated (any channel >= 250) nor black (all <= 3);
  * eyes, lashes, lid margins, teeth, gums and the mouth socket are never lifted (the fit does not place them
    to the pixel, and a new gaze or jaw would misplace the lifted colours); samples take them from
    a synthetic person (synthesis.vertex_albedo);
  * unseen vertices take the colour of their mirror vertex when that was seen (the model is
    left-right symmetric: mirror_map), else of the nearest seen vertex, smoothed over the mesh.

Sample fields: exactly trainers.synthesis's, with source = SOURCE_REAL (1) and albedo_seed = -1;
skin_rgb is the median lifted skin albedo, hair_rgb the median colour of the seen top of the scalp
(the hair in the frame) divided by the estimated light, or a dark brown when no scalp was seen.
The hairline is a synthetic one (synthesis.vertex_albedo's hair_weight) in that hair colour, kept
off the skin that was seen in the frame.

CLI: python -m trainers.inverse_render --videos ../shared/data/videos/d10.mp4 ... --count N --out DIR
    writes DIR/shard-00000.npz ... (synthesis.write_samples), DIR/lifted.npz (the lifted faces),
    DIR/sheet.png (samples) and DIR/lift_sheet.png (per lifted face: the real crop, then the face
    re-rendered in its own pose and estimated light, then its albedo under a flat white light).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree

from engine.correspondence import LandmarkCorrespondence
from engine.crop import CROP_PX, crop_box, crop_camera, crop_image, crop_transform
from engine.facemodel import FaceModel
from engine.fitting import FitSettings, LandmarkBasis, TakeFitter
from engine.gaze import IRIS_LANDMARKS
from engine.landmarks import MediaPipeLandmarker
from engine.lighting import fit_sh_lighting
from engine.pose import default_camera_matrix, project
from engine.rasterizer import rasterize, vertex_normals
from trainers.synthesis import (SOURCE_REAL, SynthesisAssets, SynthesisConfig, contact_sheet,
                                default_background_bank, landmark_points, linear_to_srgb,
                                posed_vertices, sh_basis_np, shade_pixels, srgb_to_linear, synthesize,
                                vertex_albedo, write_samples)

#: sRGB code values (0-255) outside which a pixel says nothing about the albedo
SATURATED_CODE, BLACK_CODE = 250, 3
DEFAULT_HAIR_LINEAR = srgb_to_linear(np.array([48, 34, 26]) / 255.0)

# ----------------------------------------------------------------------------- mesh helpers


def mirror_map(rest_cm: np.ndarray, tol_cm: float = 0.05) -> np.ndarray:
    """(V,) int: the vertex at the mirror image (-x, y, z) of each rest vertex (V, 3) cm.

    An involution by construction: only mutual nearest neighbours closer than tol_cm are
    paired; every other vertex (a few on the midline or where the mesh is not symmetric)
    maps to itself.
    """
    rest = np.asarray(rest_cm, np.float64)
    d, nn = cKDTree(rest).query(rest * np.array([-1.0, 1.0, 1.0]))
    ids = np.arange(len(rest))
    mutual = (nn[nn] == ids) & (d <= tol_cm)
    return np.where(mutual, nn, ids)


def vertex_adjacency(triangles: np.ndarray, n_vertices: int) -> sparse.csr_matrix:
    """(V, V) 0/1 sparse matrix of mesh edges (symmetric, no diagonal)."""
    t = np.asarray(triangles, np.int64)
    i = np.concatenate([t[:, 0], t[:, 1], t[:, 2], t[:, 1], t[:, 2], t[:, 0]])
    j = np.concatenate([t[:, 1], t[:, 2], t[:, 0], t[:, 0], t[:, 1], t[:, 2]])
    a = sparse.csr_matrix((np.ones(len(i)), (i, j)), shape=(n_vertices, n_vertices))
    a.data[:] = 1.0
    return a


def fill_unseen(values: np.ndarray, known: np.ndarray, positions_cm: np.ndarray, triangles: np.ndarray,
                mirror: np.ndarray | None = None, smooth_iterations: int = 30) -> np.ndarray:
    """(V, C) values with the rows not `known` filled: from the mirror vertex when it is known,
    else from the nearest known vertex (by position, cm), then averaged over mesh neighbours
    (smooth_iterations Jacobi steps on the filled rows only, the known rows fixed) so the nearest-
    neighbour patches do not show. Returns a new array."""
    out = np.array(values, np.float64)
    known = np.asarray(known, bool).copy()
    if not known.any():
        raise ValueError("no known vertex to fill from")
    if mirror is not None:
        take = ~known & known[mirror]
        out[take] = out[mirror[take]]
        known |= take
    missing = ~known
    if missing.any():
        _, nn = cKDTree(positions_cm[known]).query(positions_cm[missing])
        out[missing] = out[np.flatnonzero(known)[nn]]
        adj = vertex_adjacency(triangles, len(out))
        deg = np.maximum(np.asarray(adj.sum(axis=1)).ravel(), 1.0)
        for _ in range(smooth_iterations):
            out[missing] = (adj @ out)[missing] / deg[missing, None]
    return out


def sample_bilinear(image: np.ndarray, uv_px: np.ndarray) -> np.ndarray:
    """(N, C) float32 values of an (H, W, C) float32 image at pixel positions (N, 2) (pixel centres at integers)."""
    uv = np.asarray(uv_px, np.float32)
    out = cv2.remap(image, uv[:, 0].reshape(-1, 1), uv[:, 1].reshape(-1, 1), cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(len(uv), -1)


# ----------------------------------------------------------------------------- lifting


def visible_vertices(vertices_cam: np.ndarray, triangles: np.ndarray, K: np.ndarray, width: int, height: int,
                     depth_tol_cm: float = 0.3, min_cos: float = 0.25, margin_px: float = 1.0):
    """(seen (V,) bool, uv (V, 2) px, normals (V, 3)): vertices inside the frame (margin_px in), not
    behind the mesh's own depth buffer (depth_tol_cm), not on its silhouette (the 3x3 pixels about the
    vertex all covered) and facing the camera (cos > min_cos)."""
    cam = np.asarray(vertices_cam, np.float64)
    frags = rasterize(cam, triangles, K, width, height, backend="cpu")
    uv = project(cam, K)
    normals = vertex_normals(cam, np.asarray(triangles))
    inside = ((uv[:, 0] >= margin_px) & (uv[:, 0] <= width - 1 - margin_px) & (uv[:, 1] >= margin_px)
              & (uv[:, 1] <= height - 1 - margin_px) & (cam[:, 2] > 1.0))
    ij = np.clip(np.round(uv).astype(int), 0, [width - 1, height - 1])
    # the nearest surface within a pixel of the vertex: a vertex on an edge may land on its neighbour
    zbuf = cv2.erode(np.where(np.isfinite(frags.depth_cm), frags.depth_cm, 1e9).astype(np.float32),
                     np.ones((3, 3), np.uint8))
    unoccluded = cam[:, 2] <= zbuf[ij[:, 1], ij[:, 0]] + depth_tol_cm
    # not on the silhouette: a pixel there mixes the face with what is behind it
    covered = cv2.erode(frags.mask.astype(np.uint8), np.ones((3, 3), np.uint8))
    unoccluded &= covered[ij[:, 1], ij[:, 0]] > 0
    view = -cam / np.maximum(np.linalg.norm(cam, axis=1, keepdims=True), 1e-9)
    facing = (normals * view).sum(axis=1) > min_cos
    return inside & unoccluded & facing, uv, normals


def lift_albedo(image_rgb: np.ndarray, vertices_cam: np.ndarray, triangles: np.ndarray, K: np.ndarray,
                exclude: np.ndarray | None = None, mirror: np.ndarray | None = None):
    """Lift a per-vertex albedo off a real frame under a fitted mesh.

    image_rgb (H, W, 3) uint8 sRGB; vertices_cam (V, 3) cm, the fitted mesh in camera space;
    triangles (T, 3) the opaque surfaces (they define visibility); K (3, 3) px; exclude (V,)
    bool vertices never lifted (eyes, mouth interior); mirror (V,) int from mirror_map (None:
    no symmetric fill). Returns (albedo (V, 3) float32 linear RGB in [0, 1], valid (V,) bool the
    vertices read off the image, sh (9, 3) float32 the frame's estimated camera-space SH light)
    in the gauge of the module docstring (mean irradiance over the valid vertices = 1 per channel).
    """
    h, w = image_rgb.shape[:2]
    seen, uv, normals = visible_vertices(vertices_cam, triangles, K, w, h)
    codes = sample_bilinear(image_rgb.astype(np.float32), uv)
    colour = srgb_to_linear(codes / 255.0)
    valid = seen & (codes.max(axis=1) < SATURATED_CODE) & (codes.max(axis=1) > BLACK_CODE)
    if exclude is not None:
        valid &= ~np.asarray(exclude, bool)
    if valid.sum() < 50:
        raise ValueError(f"only {int(valid.sum())} vertices of the mesh are visible in the frame")
    L = fit_sh_lighting(normals[valid], colour[valid])
    shading = sh_basis_np(normals) @ L                               # (V, 3), in the fitted-albedo's units
    valid &= np.all(shading > 0.1 * np.median(shading[valid], axis=0), axis=1)   # deep shade: unreliable
    gauge = shading[valid].mean(axis=0)                             # mean irradiance -> 1 per channel
    sh = L / gauge
    albedo = np.zeros_like(colour, dtype=np.float64)
    albedo[valid] = colour[valid] / (shading[valid] / gauge)
    albedo = fill_unseen(np.clip(albedo, 0.0, 1.0), valid, np.asarray(vertices_cam, np.float64), triangles, mirror)
    return np.clip(albedo, 0.0, 1.0).astype(np.float32), valid, sh.astype(np.float32)


# ----------------------------------------------------------------------------- fitting real frames


@dataclass
class FittedFrame:
    """One real frame and its fit: image (H, W, 3) uint8 RGB, identity (60,), expression (53,),
    rotation (3, 3) model -> camera, translation_cm (3,), K (3, 3) px; index the frame number."""

    image: np.ndarray
    identity: np.ndarray
    expression: np.ndarray
    rotation: np.ndarray
    translation_cm: np.ndarray
    K: np.ndarray
    index: int
    rms_px: float


def fit_frames(video_path: str | Path, every_n: int = 15, max_frames: int = 8, model: FaceModel | None = None,
               correspondence: LandmarkCorrespondence | None = None, identity_frames: int = 40,
               max_rms_px: float = 4.0) -> list[FittedFrame]:
    """Fit a take with MediaPipe landmarks and the engine's TakeFitter, as the runtime does (every
    frame tracked, identity converging over identity_frames frames with a face, then locked; iris
    landmarks out of the fit; focal max(w, h) px). Returns up to max_frames frames, every_n apart,
    fitted after the identity locked and with a landmark rms <= max_rms_px (a bad fit lifts the
    background). The gaze is not estimated: the eyes are not lifted, so it is not needed."""
    model = model or FaceModel.load()
    correspondence = correspondence or LandmarkCorrespondence.load()
    basis = LandmarkBasis.from_correspondence(model, correspondence, exclude=IRIS_LANDMARKS)
    fitter = TakeFitter(basis, FitSettings(identity_frames=identity_frames))
    cap = cv2.VideoCapture(str(video_path))
    if not cap.isOpened():
        raise FileNotFoundError(video_path)
    out, index, since_lock = [], -1, 0
    with MediaPipeLandmarker(static=False) as lm:
        while len(out) < max_frames:
            ok, bgr = cap.read()
            if not ok:
                break
            index += 1
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            points = lm.detect(rgb)
            if points is None:
                fitter.lose_track()
                continue
            h, w = rgb.shape[:2]
            K = default_camera_matrix(w, h)
            fit = fitter.fit(points[:, :2], K)
            if not fitter.identity_locked:
                continue
            if since_lock % every_n == 0 and fit.rms_px <= max_rms_px:
                out.append(FittedFrame(rgb, fit.identity.astype(np.float32), fit.expression.astype(np.float32),
                                       fit.rotation, fit.translation, K, index, float(fit.rms_px)))
            since_lock += 1
    cap.release()
    return out


@dataclass
class LiftedFace:
    """A real person ready to re-render: identity (60,), albedo (V, 3) linear RGB (filled where
    unseen), valid (V,) the vertices read off the frame, sh (9, 3) the frame's estimated light,
    skin_rgb / hair_rgb (3,) linear, and the frame it came from."""

    identity: np.ndarray
    albedo: np.ndarray
    valid: np.ndarray
    sh: np.ndarray
    skin_rgb: np.ndarray
    hair_rgb: np.ndarray
    frame: FittedFrame | None = None


def not_lifted(assets: SynthesisAssets, lid_margin_cm: float = 0.4) -> np.ndarray:
    """(V,) bool: the vertices never read off a frame: all but the skin of the face region (in front of
    the ears: hair covers ears, neck and scalp in most frames), the mouth socket (mouth_ao < 1), and the
    lid margins (skin within lid_margin_cm of lashes or eyeballs: lashes overlap it in the image)."""
    front = np.zeros(assets.model.n_vertices, bool)
    front[np.unique(assets.draw_triangles[assets.face_region])] = True
    rest = assets.model.neutral
    eyes = np.concatenate([assets.lashes_vertices, *assets.eye_vertices])
    d, _ = cKDTree(rest[eyes]).query(rest, distance_upper_bound=lid_margin_cm)
    return ~(assets.skin_vertices & front) | (assets.mouth_ao < 1.0) | np.isfinite(d)


def luminance(rgb: np.ndarray) -> np.ndarray:
    """(...,) Rec. 709 luminance of linear RGB (..., 3)."""
    return np.asarray(rgb) @ np.array([0.2126, 0.7152, 0.0722])


def lift_frame(frame: FittedFrame, assets: SynthesisAssets, outlier_ratio=(0.45, 2.2)) -> LiftedFace:
    """Lift the albedo of one fitted frame (the rest gaze is used: the eyes are not lifted).
    outlier_ratio: plain-skin vertices whose luminance is outside these multiples of the median
    skin's are left out and filled (hair, background, highlights)."""
    verts = posed_vertices(assets, frame.identity, frame.expression, np.zeros((2, 2)))
    cam = verts.astype(np.float64) @ frame.rotation.T + frame.translation_cm
    mirror = mirror_map(assets.model.neutral)
    exclude = not_lifted(assets)
    albedo, valid, sh = lift_albedo(frame.image, cam, assets.draw_triangles, frame.K, exclude, mirror)
    plain = (assets.lip_weight == 0) & (assets.brow_weight == 0)
    plain_skin = valid & plain & (assets.scalp_height < 2.0)
    skin = np.median(albedo[plain_skin if plain_skin.sum() > 20 else valid], axis=0)
    # second pass without what is not skin (hair over the forehead, background past the silhouette,
    # highlights): outside brows and lips, a luminance far from the skin's; they are filled instead
    ratio = luminance(albedo) / max(luminance(skin), 1e-6)
    outliers = valid & plain & ((ratio < outlier_ratio[0]) | (ratio > outlier_ratio[1]))
    if outliers.any():
        albedo, valid, sh = lift_albedo(frame.image, cam, assets.draw_triangles, frame.K, exclude | outliers, mirror)
    # hair: the frame's colour over the seen top of the scalp (the hair lies there in most frames),
    # divided by the estimated light like the skin
    h, w = frame.image.shape[:2]
    seen, uv, normals = visible_vertices(cam, assets.draw_triangles, frame.K, w, h)
    top = seen & assets.skin_vertices & (assets.scalp_height > 6.0)
    hair = DEFAULT_HAIR_LINEAR
    if top.sum() > 20:
        colour = srgb_to_linear(sample_bilinear(frame.image.astype(np.float32), uv[top]) / 255.0)
        shading = np.maximum(sh_basis_np(normals[top]) @ sh, 0.05)
        hair = np.clip(np.median(colour / shading, axis=0), 0.0, 1.0)
    return LiftedFace(frame.identity, albedo, valid, sh, skin.astype(np.float32), np.asarray(hair, np.float32),
                      frame)


# ----------------------------------------------------------------------------- samples


def person_albedo(rng: np.random.Generator, lifted: LiftedFace, assets: SynthesisAssets):
    """(albedo (V, 3), params) for synthesize: the lifted skin, with eyes, lashes, mouth interior and
    hairline from a synthetic person drawn from rng (plausible, not this person's), the hair in the
    lifted hair colour."""
    synthetic, params = vertex_albedo(assets, rng)
    albedo = lifted.albedo.copy()
    inner = ~assets.skin_vertices | (assets.mouth_ao < 1.0)
    albedo[inner] = synthetic[inner]
    # the synthetic hairline (its hair_weight), painted in the hair colour lifted off the frame, but
    # not over skin seen in the frame (a high real forehead stays)
    seen = lifted.valid.astype(np.float64)
    adj = vertex_adjacency(assets.model.triangles, len(seen))
    deg = np.maximum(np.asarray(adj.sum(axis=1)).ravel(), 1.0)
    for _ in range(3):      # spread over 3 rings: isolated unseen vertices inside the seen skin stay skin
        seen = np.maximum(seen, adj @ seen / deg)
    hair_weight = (params["hair_weight"] * (seen < 0.5)).astype(np.float32)
    w = hair_weight[:, None]
    albedo = albedo * (1 - w) + lifted.hair_rgb * w
    params = {"skin_rgb": lifted.skin_rgb, "hair_rgb": lifted.hair_rgb, "hair_weight": hair_weight}
    return albedo.astype(np.float32), params


def inverse_rendered_sample(rng: np.random.Generator, lifted: LiftedFace, assets: SynthesisAssets,
                            out_px: int = CROP_PX, config: SynthesisConfig | None = None, backgrounds=None,
                            expression_kind: str | None = None) -> dict:
    """One sample (trainers.synthesis fields, source = SOURCE_REAL) of a lifted real person: their
    identity and albedo with a new expression, pose, camera, light, background and nuisances."""
    albedo = person_albedo(np.random.default_rng(rng.integers(0, 2 ** 63 - 1)), lifted, assets)
    return synthesize(rng, assets.model, assets.correspondence, out_px, config, backgrounds,
                      expression_kind=expression_kind, assets=assets, identity=lifted.identity, albedo=albedo,
                      source=SOURCE_REAL)


def render_lifted(lifted: LiftedFace, assets: SynthesisAssets, sh: np.ndarray | None = None, out_px: int = CROP_PX):
    """(real crop, re-render) (out_px, out_px, 3) uint8 each: the frame's face cropped as the runtime
    does, and the lifted person rendered into the same crop in the frame's fitted pose and expression
    under sh (default: the estimated light), over the real crop. A check of the lift."""
    f = lifted.frame
    verts = posed_vertices(assets, f.identity, f.expression, np.zeros((2, 2)))
    cam = verts.astype(np.float64) @ f.rotation.T + f.translation_cm
    A = crop_transform(crop_box(project(landmark_points(assets, verts) @ f.rotation.T + f.translation_cm, f.K)),
                       out_px)
    Kc = crop_camera(f.K, A)
    real = crop_image(f.image, A, out_px)
    frags = rasterize(cam, assets.draw_triangles, Kc, out_px, out_px, backend="cpu")
    albedo, _ = person_albedo(np.random.default_rng(0), lifted, assets)
    linear, _, _ = shade_pixels(frags, cam, assets.draw_triangles, albedo, lifted.sh if sh is None else sh)
    img = np.where(frags.mask[..., None], linear_to_srgb(linear), real.astype(np.float32) / 255.0)
    return real, np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=Path, nargs="+", required=True)
    ap.add_argument("--count", type=int, required=True, help="number of samples (spread over the lifted faces)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--every-n", type=int, default=30, help="frames between lifted frames of a video")
    ap.add_argument("--frames-per-video", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--out-px", type=int, default=CROP_PX)
    ap.add_argument("--no-real-backgrounds", action="store_true")
    ap.add_argument("--sheet", type=int, default=32, help="samples on the contact sheet (0: none)")
    args = ap.parse_args(argv)
    from tqdm import tqdm

    args.out.mkdir(parents=True, exist_ok=True)
    model, corr = FaceModel.load(), LandmarkCorrespondence.load()
    assets = SynthesisAssets.build(model, corr)
    t0 = time.perf_counter()
    faces = []
    for video in tqdm(args.videos, desc="fitting + lifting", unit="video"):
        for frame in fit_frames(video, args.every_n, args.frames_per_video, model, corr):
            faces.append(lift_frame(frame, assets))
    t_lift = time.perf_counter() - t0
    if not faces:
        ap.error("no frame could be fitted")
    np.savez_compressed(args.out / "lifted.npz", identity=np.stack([f.identity for f in faces]),
                        albedo=np.stack([f.albedo for f in faces]), valid=np.stack([f.valid for f in faces]),
                        sh=np.stack([f.sh for f in faces]), frame_index=np.array([f.frame.index for f in faces]))
    tiles = []
    for f in faces:
        flat = np.zeros((9, 3), np.float32)
        flat[0] = 1.0 / sh_basis_np(np.zeros(3))[0]        # irradiance 1 from every direction: the albedo itself
        real, again = render_lifted(f, assets, out_px=args.out_px)
        tiles += [real, again, render_lifted(f, assets, flat, args.out_px)[1]]
    cv2.imwrite(str(args.out / "lift_sheet.png"), cv2.cvtColor(contact_sheet(tiles, columns=9), cv2.COLOR_RGB2BGR))
    bank = None if args.no_real_backgrounds else default_background_bank()
    t1 = time.perf_counter()
    samples = (inverse_rendered_sample(np.random.default_rng([args.seed, i]), faces[i % len(faces)], assets,
                                       args.out_px, backgrounds=bank)
               for i in tqdm(range(args.count), desc="re-rendering", unit="sample"))
    write_samples(samples, args.out, args.shard_size, sheet_count=args.sheet)
    t_render = time.perf_counter() - t1
    print(f"{len(faces)} faces fitted and lifted from {len(args.videos)} video(s) in {t_lift:.1f} s; "
          f"{args.count} samples in {t_render:.1f} s ({1000 * t_render / max(args.count, 1):.0f} ms each, "
          f"one process); out in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
