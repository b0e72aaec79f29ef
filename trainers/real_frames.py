"""Real video frame PAIRS for CoarseNet's self-supervised stage (seed 002's E_flow and E_same).

Every frame of a video is tracked with MediaPipe (engine.landmarks, tracking mode, as the
runtime does); each pair (n-1, n) of consecutive frames that both have a face is a candidate.
Both frames of a pair are cropped with the SAME box, engine.crop.crop_box of frame n-1's
landmarks (128 px), so they share one crop camera K_crop (the full frame's K is the project's
default camera, engine.pose.default_camera_matrix) and a pixel of crop a and one of crop b
are the same ray: optical flow between the crops is the image motion the two predicted
meshes must reproduce.

Flow: OpenCV's DIS (dense inverse search, PRESET_MEDIUM) from crop a to crop b on grey
levels: about 2 ms per 128 px pair on one core, coarse-to-fine with variational refinement,
so it follows the few-pixel head motion of 30 fps video and stays sharp at the face's
outline; Farneback was ~1.5x slower here and over-smooths motion boundaries (its
polynomial expansion blurs over a 15 px window).

Split: the videos named in HELDOUT_VIDEOS never give training pairs; their pairs go to
OUT/heldout/ (evaluation: trainers.train_coarse.evaluate_real), the rest to OUT/train/.

Pair fields (shards stack them along a new first axis; `load_pairs` reads them back):
    crops        (2, S, S, 3) uint8     RGB crops of frames n-1 (a) and n (b), S = out_px (128)
    landmarks    (2, 478, 2) float32    MediaPipe's 478 points of each frame, crop px
    K_crop       (3, 3) float32         pinhole of both crops, px
    flow         (S, S, 2) float16      DIS flow a -> b, crop px: crop_a(x) ≈ crop_b(x + flow(x))
    inside       (S, S) bool            crop pixels wholly inside the frame, 1 px in (bilinear sampling and
                                        the frame's outer row mix in the black border, BORDER_VALUE)
    video        () str                 video name (file stem); one video is one person (E_same)
    frame_index  (2,) int64             n-1, n
    frame_size   (2,) int32             full frame width, height px

CLI: python -m trainers.real_frames --out DIR [--videos V.mp4 ...] [--pairs-per-video N]
    (default: every video of ../shared/data/videos, up to 500 pairs each, evenly spread over the take).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np

from engine.crop import CROP_PX, apply_affine, crop_box, crop_camera, crop_image, crop_transform, image_coverage
from engine.pose import default_camera_matrix

#: Videos (file stems) whose pairs are for evaluation only, never for training.
HELDOUT_VIDEOS = ("d12", "d20")
#: Default video folder (../shared/data/videos beside the repository).
DEFAULT_VIDEO_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"
#: Pair fields in a shard.
PAIR_FIELDS = ("crops", "landmarks", "K_crop", "flow", "inside", "video", "frame_index", "frame_size")


def split_of(video: str | Path) -> str:
    """'heldout' for a video in HELDOUT_VIDEOS (by file stem), else 'train'."""
    return "heldout" if Path(video).stem in HELDOUT_VIDEOS else "train"


def optical_flow(crop_a: np.ndarray, crop_b: np.ndarray, dis=None) -> np.ndarray:
    """(S, S, 2) float32 DIS flow from RGB crop a (S, S, 3) uint8 to crop b, px: a(x) ≈ b(x + flow(x)).
    `dis` may be a reused cv2.DISOpticalFlow (a new PRESET_MEDIUM one otherwise)."""
    dis = dis or cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    a = cv2.cvtColor(np.ascontiguousarray(crop_a), cv2.COLOR_RGB2GRAY)
    b = cv2.cvtColor(np.ascontiguousarray(crop_b), cv2.COLOR_RGB2GRAY)
    return dis.calc(a, b, None)


def warp_by_flow(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """image (S, S, C) sampled at x + flow(x) (bilinear, edge pixels replicated): crop b warped by the
    flow a -> b looks like crop a."""
    h, w = flow.shape[:2]
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    f = flow.astype(np.float32)
    return cv2.remap(image, xs + f[..., 0], ys + f[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def candidate_pairs(video_path: str | Path, out_px: int = CROP_PX, max_frames: int | None = None,
                    progress=None) -> dict[str, np.ndarray]:
    """Track every frame of a video and crop every consecutive pair (n-1, n) with a face in both.

    Returns arrays over the P candidates: crops (P, 2, S, S, 3) uint8, landmarks (P, 2, 478, 2)
    crop px, K_crop (P, 3, 3), inside (P, S, S) bool, frame_index (P, 2), frame_size (P, 2);
    no flow yet (it is computed for the selected pairs only). `progress`: a tqdm bar to update
    per frame."""
    from engine.landmarks import MediaPipeLandmarker

    cap = cv2.VideoCapture(str(video_path))
    if not cap.isOpened():
        raise FileNotFoundError(video_path)
    out: dict[str, list] = {k: [] for k in ("crops", "landmarks", "K_crop", "inside", "frame_index", "frame_size")}
    prev_rgb, prev_lm, index = None, None, -1
    try:
        with MediaPipeLandmarker(static=False) as tracker:
            while max_frames is None or index + 1 < max_frames:
                ok, bgr = cap.read()
                if not ok:
                    break
                index += 1
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                pts = tracker.detect(rgb)
                lm = None if pts is None else pts[:, :2].astype(np.float64)
                if lm is not None and prev_lm is not None:
                    h, w = rgb.shape[:2]
                    A = crop_transform(crop_box(prev_lm), out_px)
                    out["crops"].append(np.stack([crop_image(prev_rgb, A, out_px), crop_image(rgb, A, out_px)]))
                    out["landmarks"].append(np.stack([apply_affine(A, prev_lm), apply_affine(A, lm)]))
                    out["K_crop"].append(crop_camera(default_camera_matrix(w, h), A))
                    full = (image_coverage(A, w, h, out_px) > 0.999).astype(np.uint8)
                    out["inside"].append(cv2.erode(full, np.ones((3, 3), np.uint8), borderValue=1) > 0)
                    out["frame_index"].append((index - 1, index))
                    out["frame_size"].append((w, h))
                prev_rgb, prev_lm = rgb, lm
                if progress is not None:
                    progress.update(1)
    finally:
        cap.release()
    S = out_px
    empty = {"crops": (0, 2, S, S, 3), "landmarks": (0, 2, 478, 2), "K_crop": (0, 3, 3), "inside": (0, S, S),
             "frame_index": (0, 2), "frame_size": (0, 2)}
    dtypes = {"crops": np.uint8, "landmarks": np.float32, "K_crop": np.float32, "inside": bool,
              "frame_index": np.int64, "frame_size": np.int32}
    return {k: (np.asarray(v, dtype=dtypes[k]) if v else np.zeros(empty[k], dtypes[k])) for k, v in out.items()}


def select_evenly(n_candidates: int, n: int | None) -> np.ndarray:
    """Indices of n of n_candidates spread evenly over the take (all when n is None or larger): a take's
    expressions and poses change over seconds, so neighbouring pairs would mostly repeat each other."""
    if n is None or n >= n_candidates:
        return np.arange(n_candidates)
    return np.unique(np.round(np.linspace(0, n_candidates - 1, n)).astype(np.int64))


def video_pairs(video_path: str | Path, pairs_per_video: int | None = None, out_px: int = CROP_PX,
                max_frames: int | None = None, progress=None) -> dict[str, np.ndarray]:
    """The selected pairs of one video with every PAIR_FIELDS field (flow float16, video = file stem)."""
    cand = candidate_pairs(video_path, out_px, max_frames, progress)
    keep = select_evenly(len(cand["crops"]), pairs_per_video)
    pairs = {k: v[keep] for k, v in cand.items()}
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    flow = [optical_flow(c[0], c[1], dis) for c in pairs["crops"]]
    pairs["flow"] = (np.stack(flow) if flow else np.zeros((0, out_px, out_px, 2))).astype(np.float16)
    pairs["video"] = np.full(len(keep), Path(video_path).stem, dtype="<U32")
    return pairs


def concat_pairs(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Pair dicts -> one, concatenated along the first axis."""
    return {k: np.concatenate([p[k] for p in parts]) for k in PAIR_FIELDS}


def write_pair_shards(pairs: dict[str, np.ndarray], out_dir: str | Path, shard_size: int = 500) -> list[Path]:
    """pairs -> out_dir/shard-00000.npz ... (uncompressed: reading is what training waits on)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(pairs["crops"])
    paths = []
    for i, start in enumerate(range(0, n, shard_size)):
        path = out_dir / f"shard-{i:05d}.npz"
        np.savez(path, **{k: v[start:start + shard_size] for k, v in pairs.items()})
        paths.append(path)
    return paths


def load_pairs(directory: str | Path, limit: int | None = None) -> dict[str, np.ndarray]:
    """All shard-*.npz of a pair folder -> dict of (P, ...) arrays (PAIR_FIELDS), at most `limit` pairs."""
    paths = sorted(Path(directory).glob("shard-*.npz"))
    if not paths:
        raise FileNotFoundError(f"no shard-*.npz in {directory} (write them with python -m trainers.real_frames)")
    parts = []
    n = 0
    for p in paths:
        with np.load(p, allow_pickle=False) as d:
            parts.append({k: d[k] for k in PAIR_FIELDS})
        n += len(parts[-1]["crops"])
        if limit is not None and n >= limit:
            break
    out = concat_pairs(parts)
    return {k: v[:limit] for k, v in out.items()} if limit is not None else out


def video_groups(video: np.ndarray) -> np.ndarray:
    """(P,) video names -> (P,) int64 group ids (equal for pairs of one video: one person)."""
    return np.unique(np.asarray(video), return_inverse=True)[1].astype(np.int64)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="writes OUT/train/shard-*.npz and OUT/heldout/shard-*.npz")
    ap.add_argument("--videos", type=Path, nargs="+", help=f"default: every .mp4 in {DEFAULT_VIDEO_DIR}")
    ap.add_argument("--pairs-per-video", type=int, default=500, help="pairs per video, evenly spread (0: all)")
    ap.add_argument("--out-px", type=int, default=CROP_PX)
    ap.add_argument("--max-frames", type=int, help="read at most this many frames per video")
    ap.add_argument("--shard-size", type=int, default=500)
    args = ap.parse_args(argv)
    from tqdm import tqdm

    videos = args.videos or sorted(DEFAULT_VIDEO_DIR.glob("*.mp4"))
    if not videos:
        ap.error("no videos")
    total = 0
    for v in videos:
        cap = cv2.VideoCapture(str(v))
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        cap.release()
        total += min(n, args.max_frames) if args.max_frames else n
    t0 = time.perf_counter()
    split: dict[str, list] = {"train": [], "heldout": []}
    with tqdm(total=total, desc="tracking + cropping", unit="frame") as bar:
        for v in videos:
            bar.set_postfix(video=Path(v).stem)
            split[split_of(v)].append(video_pairs(v, args.pairs_per_video or None, args.out_px, args.max_frames, bar))
    for name, parts in split.items():
        if parts:
            pairs = concat_pairs(parts)
            write_pair_shards(pairs, args.out / name, args.shard_size)
            print(f"{name}: {len(pairs['crops'])} pairs from {len(parts)} video(s) in {args.out / name}")
    print(f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
