"""Synthetic evaluation clips: whole video frames of a moving, talking model face with exact ground truth.

The training samples of trainers.synthesis are face crops; an engine's accuracy
has to be measured the way `capture video` meets a face: a full camera frame,
MediaPipe finding the face, tracking over time, identity locking, filtering.
A clip here is one random person (identity, albedo) under one light in front of
one background, filmed by the project's default camera
(engine.pose.default_camera_matrix, 640x480 unless told), whose head turns and
moves smoothly (yaw within ±35°, pitch ±20°, roll ±15°, 45-100 cm away) while
the expression glides between keyframes drawn from synthesis.sample_expression
(a new key every 0.5 s, smoothstep in between, so every frame is a convex blend
of two keys and stays a plausible expression). No occluders, no camera effects:
the image is exactly the labels' image formation (synthesis.SynthesisConfig.clean).

Seeds: clip i of a set is drawn from default_rng([1_000_000 + seed, i]); training
(SyntheticFaces) uses default_rng([seed, i]) with small seeds (0, 1, ...), so the
evaluation people, poses and lights are never training samples.

Gaze: as in synthesis, the eyeballs turn (posed_vertices) and the model's eyeLook
weights are synthesis.gaze_to_eye_look of the gaze angles. The gaze angles are
interpolated between keys and the eyeLook weights recomputed from them every
frame (blending the weights instead would give both eyeLookIn and eyeLookOut
mid-way when the gaze crosses the centre), so labels and image agree per frame.

Files per clip (DIR/clip-NNN/):
    clip.avi    FFV1, lossless (default; the benchmark must not be about compression), or
    frames/NNNNNN.png (--format png), or clip.mp4 (--format mp4: OpenCV's mp4v, lossy, for viewing)
    gt.npz      fps () float64; K (3, 3) float64 pinhole in frame px; image_size (2,) int64 (w, h);
                identity (60,) float32 (also per frame: identity_per_frame (F, 60));
                expression (F, 53) float32 model weights in [0, 1] (eyeLook from gaze_rad);
                blendshapes (F, 52) float32 ARKit values (engine.arkit.arkit_from_model);
                gaze_rad (F, 2, 2) float32 [yaw, pitch] per eye (subject's left, right);
                rotation (F, 3, 3) float32 model -> camera; translation_cm (F, 3) float32;
                head_ypr_rad (F, 3) float32; landmarks (F, 478, 2) float32 the correspondence
                points projected (frame px); sh (9, 3) float32; albedo_seed () int64; seed () int64.

CLI: python -m trainers.clips --out DIR --clips N --frames F --seed S [--size 640x480] [--fps 30]
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from engine.arkit import arkit_from_model
from engine.correspondence import LandmarkCorrespondence
from engine.facemodel import FaceModel
from engine.pose import default_camera_matrix, head_rotation, model_to_camera, project, yaw_pitch_roll
from engine.rasterizer import rasterize
from trainers.synthesis import (N_IDENTITY, SUPERSAMPLE, BackgroundBank, SynthesisAssets, default_background_bank,
                                gaze_to_eye_look, landmark_points, linear_to_srgb, posed_vertices,
                                procedural_background, sample_expression, sample_lighting, shade_pixels,
                                vertex_albedo)

#: Added to the user's seed: evaluation clips never share a generator with training samples.
SEED_OFFSET = 1_000_000
FORMATS = ("avi", "png", "mp4")
#: What the face does: "random" (keys from synthesis.sample_expression), or a script for one person:
#: "neutral" (a still, neutral face; only the head moves), "wink" (neutral, left wink, neutral, right wink).
PERFORMANCES = ("random", "neutral", "wink")
#: The wink script, one entry per expression key: "" neutral, else the eye (model suffix) that is shut.
WINK_SCRIPT = ("", "", "_L", "_L", "", "", "_R", "_R", "", "")


@dataclass(frozen=True)
class ClipConfig:
    """How clips move (degrees, cm, seconds) and look."""

    width: int = 640
    height: int = 480
    fps: float = 30.0
    expression_key_s: float = 0.5      # a new expression keyframe every this many seconds
    pose_key_s: float = 1.5            # a new head pose / position keyframe every this many seconds
    yaw_deg: float = 35.0
    pitch_deg: float = 20.0
    roll_deg: float = 15.0
    distance_cm: tuple = (45.0, 100.0)
    centre_range: float = 0.15         # face centre within ±this fraction of the frame around its middle
    real_background_probability: float = 0.5
    flat_background: tuple | None = None    # an sRGB colour in [0, 1] instead of a random background (tests)
    performance: str = "random"             # PERFORMANCES: what the face does


def smoothstep(x: np.ndarray) -> np.ndarray:
    """C1 ease 3x² - 2x³ on [0, 1]: keyframes are reached with zero velocity, no overshoot."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def interpolate_keys(keys: np.ndarray, key_s: float, times_s: np.ndarray) -> np.ndarray:
    """Keyframes (K, ...) every key_s seconds -> (F, ...) at times_s, smoothstep between neighbours.

    Each output is a convex blend of two keys, so bounds and linear constraints of the keys hold."""
    pos = np.asarray(times_s, np.float64) / key_s
    i = np.clip(np.floor(pos).astype(int), 0, len(keys) - 2)
    w = smoothstep(pos - i).reshape((-1,) + (1,) * (keys.ndim - 1))
    return keys[i] * (1.0 - w) + keys[i + 1] * w


def full_frame_background(rng: np.random.Generator, cfg: ClipConfig, bank: BackgroundBank | None) -> np.ndarray:
    """(H, W, 3) float32 sRGB: a real patch (faces boxed out) or a procedural one, centre-cropped."""
    if cfg.flat_background is not None:
        return np.broadcast_to(np.asarray(cfg.flat_background, np.float32), (cfg.height, cfg.width, 3)).copy()
    side = max(cfg.width, cfg.height)
    img = None
    if bank is not None and len(bank) and rng.random() < cfg.real_background_probability:
        img = bank.sample(rng, side)
    if img is None:
        img = procedural_background(rng, side)
    y0, x0 = (side - cfg.height) // 2, (side - cfg.width) // 2
    return np.ascontiguousarray(img[y0:y0 + cfg.height, x0:x0 + cfg.width], dtype=np.float32)


def _pose_keys(rng, cfg: ClipConfig, K: np.ndarray, lm_model: np.ndarray, n_keys: int):
    """(ypr (n, 3) rad, t (n, 3) cm) keyframes with the face's landmarks inside the frame (5% margin)."""
    lim = np.radians([cfg.yaw_deg, cfg.pitch_deg, cfg.roll_deg])
    w, h = cfg.width, cfg.height
    yprs, ts = [], []
    for _ in range(n_keys):
        for attempt in range(50):
            ypr = rng.uniform(-1.0, 1.0, 3) * lim
            z = float(np.exp(rng.uniform(*np.log(cfg.distance_cm))))
            u, v = (0.5 + rng.uniform(-cfg.centre_range, cfg.centre_range, 2)) * np.array([w, h])
            if attempt == 49:   # give up: frontal, far, centred
                ypr, z, u, v = np.zeros(3), cfg.distance_cm[1], w / 2, h / 2
            t = z * np.linalg.inv(K) @ np.array([u, v, 1.0])
            uv = project(lm_model @ model_to_camera(*ypr).T + t, K)
            if np.all(uv.min(axis=0) >= 0.05 * np.array([w, h])) and np.all(uv.max(axis=0) <= 0.95 * np.array([w, h])):
                break
        yprs.append(ypr)
        ts.append(t)
    return np.array(yprs), np.array(ts)


def scripted_keys(performance: str, names, n_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """(expression keys (n_keys, M), gaze keys (n_keys, 2, 2) rad) of a scripted performance (PERFORMANCES)."""
    exprs, gazes = np.zeros((n_keys, len(names))), np.zeros((n_keys, 2, 2))
    if performance == "wink":
        for k in range(n_keys):
            eye = WINK_SCRIPT[k % len(WINK_SCRIPT)]
            if eye:
                exprs[k, names.index("eyeBlink" + eye)] = 1.0
    elif performance != "neutral":
        raise ValueError(f"unknown performance {performance!r} (choose from {', '.join(PERFORMANCES)})")
    return exprs, gazes


def sample_clip(rng: np.random.Generator, model: FaceModel, n_frames: int, cfg: ClipConfig) -> dict:
    """Who and what of one clip: identity (60,), expression (F, 53), gaze_rad (F, 2, 2), times (F,) s,
    K (3, 3), sh (9, 3), albedo_seed; the pose is drawn later (it needs the person's landmarks).

    A scripted performance draws no expression from rng, so clip i of a set shows the same person
    (identity, skin, light) whatever the performance."""
    names = model.expression_names
    dt = 1.0 / cfg.fps
    times = np.arange(n_frames) * dt
    duration = max(times[-1], dt)
    identity = np.clip(rng.normal(0.0, 1.0, N_IDENTITY), -3.0, 3.0).astype(np.float32)
    n_expr = int(np.ceil(duration / cfg.expression_key_s)) + 2
    if cfg.performance == "random":
        exprs, gazes = zip(*[sample_expression(rng, names)[:2] for _ in range(n_expr)])
    else:
        exprs, gazes = scripted_keys(cfg.performance, names, n_expr)
    exprs = interpolate_keys(np.array(exprs, np.float64), cfg.expression_key_s, times)
    gazes = interpolate_keys(np.array(gazes, np.float64), cfg.expression_key_s, times)
    look = [names.index(n) for n in gaze_to_eye_look(np.zeros((2, 2)))]
    for f in range(n_frames):   # eyeLook from the interpolated gaze, as synthesis labels it
        exprs[f, look] = list(gaze_to_eye_look(gazes[f]).values())
    albedo_seed = int(rng.integers(0, 2 ** 63 - 1))
    sh, _, _ = sample_lighting(rng)
    K = default_camera_matrix(cfg.width, cfg.height)
    return {"identity": identity, "expression": exprs.astype(np.float32), "gaze_rad": gazes.astype(np.float32),
            "times": times, "K": K, "sh": sh, "albedo_seed": np.int64(albedo_seed)}


def render_clip(rng: np.random.Generator, assets: SynthesisAssets, n_frames: int, cfg: ClipConfig,
                bank: BackgroundBank | None = None, on_frame=None) -> dict:
    """Draw one clip from rng and render it frame by frame.

    on_frame(index, image (H, W, 3) uint8 RGB) receives each frame as it is made (write it out);
    returns the ground truth dict (gt.npz fields, module docstring)."""
    model = assets.model
    gt = sample_clip(rng, model, n_frames, cfg)
    if cfg.performance != "random":  # another take of the same person: its own head motion and background
        rng = np.random.default_rng([*(int(v) for v in rng.integers(0, 2 ** 31, 2)),
                                     PERFORMANCES.index(cfg.performance)])
    K = gt["K"]
    albedo, _ = vertex_albedo(assets, np.random.default_rng(int(gt["albedo_seed"])))
    neutral_face = posed_vertices(assets, gt["identity"], np.zeros(model.n_expression, np.float32),
                                  np.zeros((2, 2), np.float32))
    lm_rest = landmark_points(assets, neutral_face)
    n_pose = int(np.ceil(max(gt["times"][-1], 1e-9) / cfg.pose_key_s)) + 2
    ypr_keys, t_keys = _pose_keys(rng, cfg, K, lm_rest, n_pose)
    yprs = interpolate_keys(ypr_keys, cfg.pose_key_s, gt["times"])
    ts = interpolate_keys(t_keys, cfg.pose_key_s, gt["times"])
    background = full_frame_background(rng, cfg, bank)
    arkit = model.arkit_mapping()
    out = {k: [] for k in ("rotation", "translation_cm", "head_ypr_rad", "landmarks", "blendshapes")}
    for f in range(n_frames):
        R = model_to_camera(*yprs[f])
        t = ts[f]
        verts = posed_vertices(assets, gt["identity"], gt["expression"][f], gt["gaze_rad"][f])
        image = render_frame(assets, verts, R, t, K, albedo, gt["sh"], background)
        if on_frame is not None:
            on_frame(f, image)
        out["rotation"].append(R.astype(np.float32))
        out["translation_cm"].append(t.astype(np.float32))
        out["head_ypr_rad"].append(yaw_pitch_roll(head_rotation(R)).astype(np.float32))
        out["landmarks"].append(project(landmark_points(assets, verts) @ R.T + t, K).astype(np.float32))
        out["blendshapes"].append(arkit_from_model(gt["expression"][f], arkit).astype(np.float32))
    return {"fps": np.float64(cfg.fps), "K": K.astype(np.float64),
            "image_size": np.array([cfg.width, cfg.height], np.int64), "identity": gt["identity"],
            "identity_per_frame": np.tile(gt["identity"], (n_frames, 1)), "expression": gt["expression"],
            "gaze_rad": gt["gaze_rad"], "sh": gt["sh"].astype(np.float32), "albedo_seed": gt["albedo_seed"],
            **{k: np.stack(v) for k, v in out.items()}}


def render_frame(assets: SynthesisAssets, verts: np.ndarray, R: np.ndarray, t: np.ndarray, K: np.ndarray,
                 albedo: np.ndarray, sh: np.ndarray, background: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB: the mesh verts (V, 3) model cm posed by R, t (cm), shaded with albedo (V, 3)
    linear RGB and sh (9, 3), over background (H, W, 3) float sRGB.

    Synthesis' image formation: rendered at SUPERSAMPLE x, sRGB, area-averaged (antialiased edges);
    only the face's bounding box is rasterized (a shifted K), the rest is background."""
    H, W = background.shape[:2]
    ss = SUPERSAMPLE
    cam = verts.astype(np.float64) @ R.T + t
    uv = project(cam, K)
    x0, y0 = (np.floor(uv.min(axis=0)).astype(int) - 2).clip(0, [W, H])
    x1, y1 = (np.ceil(uv.max(axis=0)).astype(int) + 3).clip(0, [W, H])
    image = background.copy()
    if x1 > x0 and y1 > y0:
        # the window's pixel (i, j) at ss x: full-frame pixel centre (x0 + (i + 0.5) / ss - 0.5, ...)
        Kw = K.astype(np.float64).copy()
        Kw[:2] *= ss
        Kw[0, 2] += (ss - 1) / 2.0 - ss * x0
        Kw[1, 2] += (ss - 1) / 2.0 - ss * y0
        ww, hw = (x1 - x0) * ss, (y1 - y0) * ss
        frags = rasterize(cam, assets.draw_triangles, Kw, ww, hw, backend="cpu")
        linear, _, _ = shade_pixels(frags, cam, assets.draw_triangles, albedo, sh)
        face = linear_to_srgb(linear) * frags.mask[..., None]
        cover = cv2.resize(frags.mask.astype(np.float32), (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
        face = cv2.resize(face, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
        win = image[y0:y1, x0:x1]
        image[y0:y1, x0:x1] = win * (1.0 - cover[..., None]) + face
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


class ClipWriter:
    """Frames (H, W, 3) uint8 RGB -> clip.avi (FFV1, lossless), frames/*.png or clip.mp4 (lossy)."""

    def __init__(self, folder: Path, fmt: str, fps: float, size: tuple[int, int]):
        self.folder, self.fmt = Path(folder), fmt
        self.folder.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if fmt == "png":
            (self.folder / "frames").mkdir(exist_ok=True)
        else:
            fourcc = cv2.VideoWriter_fourcc(*("FFV1" if fmt == "avi" else "mp4v"))
            self.path = self.folder / f"clip.{fmt}"
            self.writer = cv2.VideoWriter(str(self.path), fourcc, fps, size)
            if not self.writer.isOpened():
                raise RuntimeError(f"OpenCV cannot write {self.path} ({fmt})")

    def __call__(self, index: int, rgb: np.ndarray) -> None:
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        if self.writer is None:
            cv2.imwrite(str(self.folder / "frames" / f"{index:06d}.png"), bgr)
        else:
            self.writer.write(bgr)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()


def clip_media(folder: Path) -> Path:
    """The clip's video file, or its frames/ folder."""
    folder = Path(folder)
    for name in ("clip.avi", "clip.mp4"):
        if (folder / name).is_file():
            return folder / name
    return folder / "frames"


def clip_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of clip `index` of set `seed`: disjoint from SyntheticFaces' default_rng([seed, i])."""
    return np.random.default_rng([SEED_OFFSET + int(seed), int(index)])


def write_clips(out: Path, n_clips: int, n_frames: int, seed: int, cfg: ClipConfig | None = None, fmt: str = "avi",
                real_backgrounds: bool = True, progress: bool = True, model: FaceModel | None = None,
                correspondence: LandmarkCorrespondence | None = None) -> list[Path]:
    """Render clips 0..n_clips-1 of set `seed` into out/clip-NNN/ (media + gt.npz); returns the folders."""
    from tqdm import tqdm

    cfg = cfg or ClipConfig()
    model = model or FaceModel.load()
    assets = SynthesisAssets.build(model, correspondence or LandmarkCorrespondence.load())
    bank = default_background_bank() if real_backgrounds else None
    folders = []
    with tqdm(total=n_clips * n_frames, unit="frame", desc="rendering clips", disable=not progress) as bar:
        for i in range(n_clips):
            folder = Path(out) / f"clip-{i:03d}"
            writer = ClipWriter(folder, fmt, cfg.fps, (cfg.width, cfg.height))

            def on_frame(f, img, writer=writer):
                writer(f, img)
                bar.update(1)
            try:
                gt = render_clip(clip_rng(seed, i), assets, n_frames, cfg, bank, on_frame)
            finally:
                writer.close()
            np.savez_compressed(folder / "gt.npz", seed=np.int64(seed), clip_index=np.int64(i), **gt)
            folders.append(folder)
    return folders


def load_gt(folder: Path) -> dict:
    """gt.npz of a clip folder -> dict of arrays."""
    with np.load(Path(folder) / "gt.npz") as d:
        return {k: d[k] for k in d.files}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output folder (clip-NNN/ inside)")
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--frames", type=int, default=60, help="frames per clip")
    ap.add_argument("--seed", type=int, default=0, help=f"set seed; clip i uses default_rng([{SEED_OFFSET} + "
                    "seed, i]), apart from every training seed")
    ap.add_argument("--size", default="640x480", help="frame WIDTHxHEIGHT px (default 640x480)")
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--format", choices=FORMATS, default="avi",
                    help="avi: FFV1 lossless (default); png: one file per frame; mp4: mp4v, lossy (viewing)")
    ap.add_argument("--no-real-backgrounds", action="store_true", help="procedural backgrounds only")
    ap.add_argument("--performance", choices=PERFORMANCES, default="random",
                    help="random expressions (default), or a script for clip i's person: neutral, wink")
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    t0 = time.perf_counter()
    cfg = ClipConfig(width=w, height=h, fps=args.fps, performance=args.performance)
    write_clips(args.out, args.clips, args.frames, args.seed, cfg, args.format, not args.no_real_backgrounds)
    print(f"{args.clips} clips x {args.frames} frames ({w}x{h}, {args.format}) in "
          f"{time.perf_counter() - t0:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
