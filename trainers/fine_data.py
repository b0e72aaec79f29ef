"""FineNet's samples: a frame and its coarse fit read into the face's UV map, with the frame's light,
so the photometric loss (trainers.detail_loss) can ask what detail explains the rest of the shading.

Per frame (frame_maps): the coarse surface in the map (engine.detail.texel_geometry), the frame
unwrapped (engine.detail.unwrap, sRGB decoded to linear), the visible texels, and an SH light
fitted to those texels and the coarse normals (engine.fine_runtime.frame_light, a white
light with a weak colour freedom). The albedo model, the frame divided by the shading and blurred
by engine.fine_runtime.ALBEDO_SIGMA_TEXELS (about 6 mm), is the loss's; the same light and albedo model serve the
coarse and the detailed face when they are compared (bench/eval_detail.py).

Synthetic frames with exact detail (synthetic_detail_frame): a random synthesis person, expression,
light and pose, its face skin replaced by the detail mesh displaced by trainers.wrinkles' map,
rendered with trainers.synthesis' shading at 2x and averaged down, sRGB, 8 bits.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from engine.detail import displaced_normals, displaced_vertices, sample_map, texel_geometry, unwrap
from engine.facemodel import FACE_VERTICES, FaceModel
from engine.fine_runtime import frame_light
from engine.pose import default_camera_matrix, model_to_camera
from engine.rasterizer import rasterize
from engine.uvmap import DetailMesh, FaceUV
from trainers.inverse_render import vertex_adjacency
from trainers.synthesis import (N_IDENTITY, UNDRAWN_MATERIALS, SynthesisAssets, interpolate_many, linear_to_srgb,
                                posed_vertices, sample_expression,
                                sample_lighting, sh_basis_np, shade_pixels, srgb_to_linear, vertex_albedo)
from trainers.wrinkles import random_wrinkles



def frame_maps(image_rgb: np.ndarray, vertices_cam: np.ndarray, K: np.ndarray, face_uv: FaceUV) -> dict:
    """One frame's FineNet maps (module docstring): float32 positions, normals, Pu, Pv (R, R, 3),
    colour (R, R, 3) linear, visible (R, R) bool, sh (9, 3); image_rgb (H, W, 3) uint8, vertices_cam
    (V, 3) cm."""
    g = texel_geometry(face_uv, vertices_cam)
    srgb, visible = unwrap(image_rgb, vertices_cam, g, face_uv, K)
    colour = srgb_to_linear(srgb / 255.0).astype(np.float32)
    out = {k: v.astype(np.float32) for k, v in g.items()}
    out.update(colour=colour, visible=visible)
    sh = frame_light(colour, visible, g["normals"])
    shading = sh_basis_np(g["normals"].astype(np.float64)) @ sh
    out.update(sh=sh, visible=visible & (shading.min(axis=-1) > 1e-3))   # unlit texels say nothing
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


# ----------------------------------------------------------------------------- sample sets on disk
#
# A sample set is a folder of shards (shard-NNNNN.npz), each stacking samples along a new first axis:
#     colour     (2, R, R, 3) uint8   the two frames unwrapped (sRGB); a synthetic sample repeats its one frame
#     visible    (2, R, R) bool
#     vertices   (2, V, 3) float32    the face vertices (0-9408) of the coarse fit, camera space, cm
#     sh         (2, 9, 3) float32    each frame's fitted light
#     truth_mm   (R, R) float32       the known displacement (synthetic), NaN for real frames
#     source     () str               the video's stem, or "synthetic"
#     frame      () int64             the first frame's index in its video (synthetic: the sample's seed)
# Real samples are consecutive frames (n, n + 1) of a video tracked by the capture pipeline as it
# runs (CoarseNet, tracking, filtering); the held-out videos (trainers.real_frames.HELDOUT_VIDEOS)
# go to OUT/heldout, the rest to OUT/train. Synthetic samples: OUT/synthetic_train, OUT/synthetic_heldout
# (different seeds).

SAMPLE_FIELDS = ("colour", "visible", "vertices", "sh", "truth_mm", "source", "frame")


def _sample(maps_a: dict, maps_b: dict, vertices_a, vertices_b, truth, source: str, frame: int) -> dict:
    def srgb(m):
        return np.clip(np.round(linear_to_srgb(np.clip(m["colour"], 0, 1)) * 255), 0, 255).astype(np.uint8)

    n_face = FACE_VERTICES.stop
    return {"colour": np.stack([srgb(maps_a), srgb(maps_b)]), "visible": np.stack([maps_a["visible"], maps_b["visible"]]),
            "vertices": np.stack([vertices_a[:n_face], vertices_b[:n_face]]).astype(np.float32),
            "sh": np.stack([maps_a["sh"], maps_b["sh"]]).astype(np.float32),
            "truth_mm": np.asarray(truth, np.float32), "source": np.asarray(source), "frame": np.asarray(frame)}


def video_samples(video: Path, face_uv: FaceUV, pairs: int, model, correspondence, progress=None) -> list[dict]:
    """Up to `pairs` samples of consecutive frames, evenly spread over the video, fitted by the capture
    pipeline as it runs (every frame is processed, in order: tracking and filtering see a normal take).
    Only pairs where both frames have a face that the tracker's landmarks placed are kept."""
    from capture.pipeline import CaptureSettings, FaceCapture

    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise FileNotFoundError(f"cannot open video {video}")
    n_frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
    wanted = set(np.linspace(0, max(n_frames - 2, 0), pairs).astype(int).tolist())
    capture = FaceCapture(model, correspondence, CaptureSettings())
    out, previous, index = [], None, -1
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            index += 1
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            result = capture.process(rgb, index / fps, index)
            if progress is not None:
                progress.update(1)
            good = result.face_found and not result.from_picture and result.confidence >= 0.9
            current = (rgb, capture.mesh_vertices(result), result.camera_matrix) if good else None
            if current is not None and previous is not None and index - 1 in wanted:
                maps = [frame_maps(f[0], f[1], f[2], face_uv) for f in (previous, current)]
                if min(m["visible"].mean() for m in maps) > 0.05:
                    out.append(_sample(maps[0], maps[1], previous[1], current[1],
                                       np.full(maps[0]["visible"].shape, np.nan), video.stem, index - 1))
            previous = current
    finally:
        cap.release()
        capture.close()
    return out


def synthetic_samples(seed: int, count: int, face_uv: FaceUV, assets: SynthesisAssets, progress=None,
                      size: tuple[int, int] = (640, 480)) -> list[dict]:
    """count synthetic faces with known detail (synthetic_detail_frame, seeds seed, seed + 1, ...)."""
    detail_mesh = DetailMesh.from_face_uv(face_uv)
    out = []
    for i in range(count):
        f = synthetic_detail_frame(np.random.default_rng(seed + i), assets, face_uv, detail_mesh, size)
        maps = frame_maps(f["image"], f["vertices_cam"], f["K"], face_uv)
        out.append(_sample(maps, maps, f["vertices_cam"], f["vertices_cam"], f["displacement_mm"], "synthetic",
                           seed + i))
        if progress is not None:
            progress.update(1)
    return out


def write_samples(samples: list[dict], folder: Path, shard_size: int = 64) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(0, len(samples), shard_size):
        chunk = samples[k:k + shard_size]
        np.savez(folder / f"shard-{k // shard_size:05d}.npz", **{f: np.stack([s[f] for s in chunk])
                                                                for f in SAMPLE_FIELDS})


def read_samples(folder: str | Path, limit: int | None = None) -> dict[str, np.ndarray]:
    """All shards of a sample set, concatenated (fields: SAMPLE_FIELDS)."""
    shards = sorted(Path(folder).glob("shard-*.npz"))
    if not shards:
        raise FileNotFoundError(f"no FineNet sample shards in {folder} (make them with python -m trainers.fine_data)")
    parts = []
    for p in shards:
        with np.load(p) as d:
            parts.append({f: d[f] for f in SAMPLE_FIELDS})
    out = {f: np.concatenate([p[f] for p in parts]) for f in SAMPLE_FIELDS}
    return {f: v[:limit] for f, v in out.items()} if limit else out


def main(argv=None) -> int:
    import argparse

    from tqdm import tqdm

    from engine.correspondence import LandmarkCorrespondence
    from trainers.real_frames import DEFAULT_VIDEO_DIR, split_of

    ap = argparse.ArgumentParser(prog="python -m trainers.fine_data", description=
                                 "Make FineNet's sample sets: real frame pairs from videos (held-out videos apart) "
                                 "and synthetic faces with known detail.")
    ap.add_argument("--out", type=Path, required=True, help="writes OUT/{train,heldout,synthetic_train,synthetic_heldout}")
    ap.add_argument("--videos", type=Path, nargs="*", help=f"default: every video in {DEFAULT_VIDEO_DIR}")
    ap.add_argument("--pairs-per-video", type=int, default=60)
    ap.add_argument("--synthetic", type=int, default=600, help="synthetic training faces")
    ap.add_argument("--synthetic-heldout", type=int, default=40, help="synthetic held-out faces (other seeds)")
    ap.add_argument("--map-px", type=int, default=256)
    args = ap.parse_args(argv)
    for name in ("pairs_per_video", "synthetic", "synthetic_heldout", "map_px"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be 0 or more")
    videos = args.videos if args.videos else sorted(DEFAULT_VIDEO_DIR.glob("*.mp4"))
    for v in videos:
        if not v.is_file():
            ap.error(f"no video at {v}")
    model = FaceModel.load()
    correspondence = LandmarkCorrespondence.load()
    face_uv = FaceUV.from_model(model, args.map_px)
    split: dict[str, list] = {"train": [], "heldout": []}
    total = sum(int(cv2.VideoCapture(str(v)).get(cv2.CAP_PROP_FRAME_COUNT)) for v in videos)
    with tqdm(total=total, desc="tracking videos", unit="frame") as bar:
        for v in videos:
            split[split_of(v)] += video_samples(v, face_uv, args.pairs_per_video, model, correspondence, bar)
    assets = SynthesisAssets.build(model, correspondence)
    with tqdm(total=args.synthetic + args.synthetic_heldout, desc="synthetic faces", unit="face") as bar:
        split["synthetic_train"] = synthetic_samples(1_000_000, args.synthetic, face_uv, assets, bar)
        split["synthetic_heldout"] = synthetic_samples(2_000_000, args.synthetic_heldout, face_uv, assets, bar)
    for name, samples in split.items():
        if samples:
            write_samples(samples, args.out / name)
        print(f"{name}: {len(samples)} samples")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
