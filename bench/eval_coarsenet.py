#!/usr/bin/env python
"""Accuracy of the face engines (CoarseNet "coarse" vs the landmark optimiser "fit"), run as `capture video` runs them.

(a) Synthetic clips with exact ground truth (trainers.clips: full 640x480 frames of a
    random person moving and talking, never seen in training). Each clip goes through
    FaceCapture, MediaPipe included, as one take (identity locks after 40 frames),
    with filtering on (what `capture video` writes) and off (filtering lags). Per frame
    with a face:
      vertex mm, camera    mean distance over the face region (engine.facemodel.FACE_VERTICES)
                           between the engine's and the true camera-space mesh, mm;
      vertex mm, centred   the same after removing the frame's mean offset (pred - true):
                           shape and expression without the translation/depth ambiguity;
      blendshape MAE       mean |error| over the 52 ARKit values (in [0, 1]);
      head pose deg        geodesic angle between the engine's and the true rotation;
      landmark NME %       the engine's mesh at the 478 correspondence points (no iris)
                           projected, vs the true projected points, mean px over the
                           inter-ocular (outer eye corner) distance.
    A row "mediapipe" gives MediaPipe's own landmarks vs the truth (the engines' input).
    Frames where MediaPipe finds no face are counted apart (detect %).
(b) Real videos (no 3D truth): landmark agreement (the engine's projected mesh vs
    MediaPipe's own landmarks, as NME above) and jitter (bench_filtering.jitter: median
    over frames of the mean |second difference| of the 52 ARKit values) over the whole
    clip and at rest: frames whose MediaPipe landmarks move least (speed at or below the
    clip's 25th percentile).

Every figure is the median and p95 over frames; also the engines' fit-stage time
(indicative only) and the 1-minute load average. `--json OUT` writes all figures.

    python bench/eval_coarsenet.py [--weights engine/weights/coarsenet.onnx] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")   # as `capture` runs

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_filtering import jitter_per_frame  # noqa: E402

from capture.pipeline import CaptureSettings, FaceCapture  # noqa: E402
from capture.sources import VideoSource  # noqa: E402
from engine.coarse_fitting import runtime_for  # noqa: E402
from engine.correspondence import LandmarkCorrespondence  # noqa: E402
from engine.facemodel import FACE_VERTICES, FaceModel  # noqa: E402
from engine.gaze import IRIS_LANDMARKS  # noqa: E402
from engine.pose import project  # noqa: E402
from trainers.clips import ClipConfig, clip_media, load_gt, write_clips  # noqa: E402

VIDEOS = REPO.parent / "shared" / "data" / "videos"
DEFAULT_CACHE = REPO / "runs" / "eval_clips"
ENGINES = ("coarse", "fit")
#: MediaPipe's outer eye corners (subject's right, left): the inter-ocular distance.
EYE_CORNERS = (33, 263)
NON_IRIS = np.setdiff1d(np.arange(478), IRIS_LANDMARKS)
REST_PERCENTILE = 25.0


# ----------------------------------------------------------------------------- metrics


def stats(values) -> dict:
    """{'median', 'p95', 'mean', 'n'} of a 1-D sequence (NaN when empty)."""
    a = np.asarray(values, np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return {"median": float("nan"), "p95": float("nan"), "mean": float("nan"), "n": 0}
    return {"median": float(np.median(a)), "p95": float(np.percentile(a, 95)), "mean": float(a.mean()),
            "n": int(a.size)}


def geodesic_deg(Ra: np.ndarray, Rb: np.ndarray) -> float:
    """Angle (degrees) of the rotation taking Rb to Ra, both (3, 3)."""
    c = (np.trace(Ra.T @ Rb) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def landmark_nme(pred_px: np.ndarray, ref_px: np.ndarray) -> float:
    """Mean distance (%) of (478, 2) points to (478, 2+) reference points over the reference's
    inter-ocular distance (outer eye corners), iris points excluded."""
    ref = ref_px[:, :2]
    iod = np.linalg.norm(ref[EYE_CORNERS[0]] - ref[EYE_CORNERS[1]])
    return float(np.linalg.norm(pred_px[NON_IRIS] - ref[NON_IRIS], axis=1).mean() / max(iod, 1e-9) * 100.0)


class FaceRegion:
    """The face model restricted to FACE_VERTICES, for the ground truth and the engines' meshes alike."""

    def __init__(self, model: FaceModel, n_identity: int = 60):
        f = slice(FACE_VERTICES.start, FACE_VERTICES.stop)
        self.neutral = model.neutral[f].astype(np.float64)
        self.identity = model.identity_modes[:n_identity, f].reshape(n_identity, -1).astype(np.float64)
        self.expression = model.expression_modes[:, f].reshape(model.n_expression, -1).astype(np.float64)

    def camera(self, identity, expression, R, t) -> np.ndarray:
        """(Vf, 3) cm camera-space face vertices of identity (≤60,), expression (53,), pose R (3, 3), t (3,) cm."""
        k = len(identity)
        v = self.neutral.reshape(-1) + identity @ self.identity[:k] + expression @ self.expression
        return v.reshape(-1, 3) @ np.asarray(R, np.float64).T + np.asarray(t, np.float64)


def correspondence_px(capture: FaceCapture, result) -> np.ndarray:
    """(478, 2) px: the engine's mesh at MediaPipe's 478 surface points (LandmarkBasis), projected."""
    pts = capture.basis.points(np.asarray(result.identity, np.float64), np.asarray(result.expression, np.float64))
    return project(pts @ np.asarray(result.rotation).T + np.asarray(result.translation), result.camera_matrix)


# ----------------------------------------------------------------------------- running the engines


def frames_of(media: Path, fps: float | None = None, max_frames: int | None = None):
    """(index, time_s, RGB (H, W, 3) uint8) of a video file (VideoSource, as `capture video`) or a png folder."""
    if media.is_dir():
        import cv2

        for i, p in enumerate(sorted(media.glob("*.png"))):
            if max_frames is not None and i >= max_frames:
                return
            yield i, i / (fps or 30.0), cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
        return
    source = VideoSource(media)
    try:
        for frame in source:
            if max_frames is not None and frame.index >= max_frames:
                return
            yield frame.index, frame.time_s, frame.image
    finally:
        source.close()


def run_take(capture: FaceCapture, media: Path, fps: float | None = None, max_frames: int | None = None) -> list:
    """One take through FaceCapture (reset first): per frame (index, FrameResult, landmarks px (478, 2) of
    the engine's mesh or None)."""
    capture.reset()
    out = []
    for index, time_s, image in frames_of(media, fps, max_frames):
        r = capture.process(image, time_s, index)
        out.append((index, r, correspondence_px(capture, r) if r.face_found else None))
    return out


def open_capture(model, corr, engine: str, filtering: bool, weights: Path | None,
                 expression: str = "merged") -> FaceCapture:
    """FaceCapture as `capture video --engine ENGINE [--coarse-weights W] [--no-filter] [--expression E]`
    builds it."""
    runtime = runtime_for(weights)
    return FaceCapture(model, corr, CaptureSettings(engine=engine, coarse_weights=weights, coarse_runtime=runtime,
                                                    filtering=filtering, expression=expression))


def timing_stats(takes: list) -> dict:
    """Fit-stage and landmark-stage ms (median, p95) over the frames with a face."""
    fit = [r.timings_s.get("fit", np.nan) * 1e3 for take in takes for _, r, _ in take if r.face_found]
    lm = [r.timings_s.get("landmarks", np.nan) * 1e3 for take in takes for _, r, _ in take if r.face_found]
    return {"fit_ms": stats(fit), "landmarks_ms": stats(lm)}


# ----------------------------------------------------------------------------- (a) synthetic


def ensure_clips(cache: Path, n_clips: int, n_frames: int, seed: int, cfg: ClipConfig, model, corr) -> list[Path]:
    """The clip folders of set (seed, n_clips, n_frames, size) under cache, rendered when absent."""
    script = "" if cfg.performance == "random" else f"{cfg.performance}-"   # scripted takes apart
    folder = cache / f"{script}seed{seed}-{n_clips}x{n_frames}-{cfg.width}x{cfg.height}"
    clips = [folder / f"clip-{i:03d}" for i in range(n_clips)]
    if all((c / "gt.npz").is_file() for c in clips):
        return clips
    print(f"eval: rendering {n_clips} {script}clips x {n_frames} frames into {folder} (once; cached)",
          file=sys.stderr)
    return write_clips(folder, n_clips, n_frames, seed, cfg, "avi", True, True, model, corr)


def score_synthetic(takes: list, gts: list, region: FaceRegion, arkit: np.ndarray) -> dict:
    """Per-frame errors of takes (run_take outputs) against their clips' gt dicts -> stats."""
    err = {k: [] for k in ("vertex_mm_camera", "vertex_mm_centred", "blendshape_mae", "head_pose_deg",
                           "landmark_nme", "mediapipe_nme", "depth_mm", "depth_signed_mm")}
    per_shape, frames, found = [], 0, 0
    for take, gt in zip(takes, gts):
        for index, r, lm_px in take:
            frames += 1
            if not r.face_found:
                continue
            found += 1
            true = region.camera(gt["identity"], gt["expression"][index], gt["rotation"][index],
                                 gt["translation_cm"][index])
            pred = region.camera(r.identity, r.expression, r.rotation, r.translation)
            d = pred - true
            err["vertex_mm_camera"].append(10.0 * np.linalg.norm(d, axis=1).mean())
            err["vertex_mm_centred"].append(10.0 * np.linalg.norm(d - d.mean(axis=0), axis=1).mean())
            bs_err = np.abs(np.asarray(r.blendshapes) - gt["blendshapes"][index])
            per_shape.append(bs_err)
            err["blendshape_mae"].append(bs_err.mean())
            err["head_pose_deg"].append(geodesic_deg(np.asarray(r.rotation), gt["rotation"][index]))
            dz = 10.0 * (float(r.translation[2]) - float(gt["translation_cm"][index][2]))
            err["depth_mm"].append(abs(dz))
            err["depth_signed_mm"].append(dz)   # JSON only: > 0 the engine puts the head too far
            err["landmark_nme"].append(landmark_nme(lm_px, gt["landmarks"][index]))
            err["mediapipe_nme"].append(landmark_nme(np.asarray(r.landmarks)[:, :2], gt["landmarks"][index]))
    out = {k: stats(v) for k, v in err.items()}
    out["frames"], out["faces"] = frames, found
    out["detect_rate"] = found / max(frames, 1)
    if per_shape:
        from engine.arkit import ARKIT_NAMES

        mae = np.mean(per_shape, axis=0)
        out["blendshape_mae_per_shape"] = {n: float(v) for n, v in zip(ARKIT_NAMES, mae)}
    return out


# ----------------------------------------------------------------------------- (b) real videos


def score_real(takes: list) -> dict:
    """Landmark agreement with MediaPipe and blendshape jitter (whole clip, at rest) of takes on real videos."""
    nme, jit_all, jit_rest, frames, found = [], [], [], 0, 0
    for take in takes:
        frames += len(take)
        face = [(r, lm) for _, r, lm in take if r.face_found]
        found += len(face)
        nme += [landmark_nme(lm, np.asarray(r.landmarks)) for r, lm in face]
        if len(face) < 5:
            continue
        bs = np.array([r.blendshapes for r, _ in face])
        mp = np.array([np.asarray(r.landmarks)[NON_IRIS, :2] for r, _ in face])
        iod = np.array([np.linalg.norm(np.asarray(r.landmarks)[EYE_CORNERS[0], :2]
                                       - np.asarray(r.landmarks)[EYE_CORNERS[1], :2]) for r, _ in face])
        # MediaPipe's landmark speed about each interior frame (central difference), in inter-ocular distances
        speed = np.linalg.norm(mp[2:] - mp[:-2], axis=2).mean(axis=1) / 2.0 / iod[1:-1]
        j = jitter_per_frame(bs)
        jit_all += j.tolist()
        jit_rest += j[speed <= np.percentile(speed, REST_PERCENTILE)].tolist()
    return {"landmark_nme": stats(nme), "jitter": stats(jit_all), "jitter_rest": stats(jit_rest),
            "frames": frames, "faces": found, "detect_rate": found / max(frames, 1)}


# ----------------------------------------------------------------------------- report


def fmt(s: dict, scale: float = 1.0, digits: int = 2) -> str:
    """'median / p95' of a stats dict."""
    if not s["n"]:
        return f"{'n/a':>15}"
    return f"{s['median'] * scale:>7.{digits}f} /{s['p95'] * scale:>7.{digits}f}"


def print_report(res: dict) -> None:
    syn = res.get("synthetic", {})
    if syn:
        c = res["config"]
        print(f"\n(a) synthetic clips: {c['clips']} clips x {c['frames']} frames, {c['size']}, set seed {c['seed']} "
              f"(clip i: default_rng([1000000 + {c['seed']}, i])); median / p95 over frames with a face")
        print(f"  {'engine':<8}{'filter':<7}{'detect%':>8}{'vertex mm cam':>17}{'vertex mm ctr':>17}"
              f"{'bs MAE x100':>17}{'head deg':>17}{'lm NME %':>17}{'depth mm':>17}{'fit ms':>17}")
        mp_row = None
        for engine, by_filter in syn.items():
            for filt, s in by_filter.items():
                print(f"  {engine:<8}{filt:<7}{100 * s['detect_rate']:>8.1f}{fmt(s['vertex_mm_camera']):>17}"
                      f"{fmt(s['vertex_mm_centred']):>17}{fmt(s['blendshape_mae'], 100):>17}"
                      f"{fmt(s['head_pose_deg']):>17}{fmt(s['landmark_nme']):>17}{fmt(s['depth_mm'], 1, 1):>17}"
                      f"{fmt(s['timing']['fit_ms']):>17}")
                mp_row = mp_row or s
        if mp_row:
            print(f"  {'mediapipe (its own landmarks vs the truth)':<47}{'':>34}{fmt(mp_row['mediapipe_nme']):>17}")
        print("  vertex mm cam: camera space, as written (translation and depth errors included); vertex mm ctr: "
              "after removing each frame's mean offset (shape + expression only). bs MAE x100: mean |ARKit error| "
              "over the 52 values, in hundredths. head deg: geodesic rotation error. lm NME %: projected mesh at the "
              "478 correspondence points (no iris) vs the true projected points, % of the outer-eye-corner distance."
              " depth mm: |t_z error|.")
    real = res.get("real", {})
    if real:
        print(f"\n(b) real videos ({', '.join(res['config']['videos'])}; at most "
              f"{res['config']['video_frames']} frames each); median / p95 over frames with a face")
        print(f"  {'engine':<8}{'filter':<7}{'detect%':>8}{'lm NME % vs MP':>17}{'jitter x1000':>17}"
              f"{'jitter rest x1000':>19}{'fit ms':>17}")
        for engine, by_filter in real.items():
            for filt, s in by_filter.items():
                print(f"  {engine:<8}{filt:<7}{100 * s['detect_rate']:>8.1f}{fmt(s['landmark_nme']):>17}"
                      f"{fmt(s['jitter'], 1000):>17}{fmt(s['jitter_rest'], 1000):>19}"
                      f"{fmt(s['timing']['fit_ms']):>17}")
        print("  lm NME % vs MP: the engine's projected mesh vs MediaPipe's own landmarks (no iris), % of the "
              "outer-eye-corner distance. jitter: mean |second difference| of the 52 ARKit values per frame "
              f"(bench_filtering); rest: frames whose MediaPipe landmarks move least (<= p{REST_PERCENTILE:g} "
              "of the clip's speed).")
    for engine, err in res.get("errors", {}).items():
        print(f"\n  engine {engine!r} skipped: {err}")
    print(f"\nload average (1 min): {res['load_avg_1min'][0]:.2f} before, {res['load_avg_1min'][1]:.2f} after "
          "(timings are indicative only on a busy machine); run time "
          f"{res['runtime_s']:.0f} s (clip rendering {res['render_s']:.0f} s)")


def save_json(res: dict, path: Path | None) -> None:
    """Every figure of a run to path as JSON (nothing when path is None)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    print(f"figures -> {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("coarse", "fit", "both"), default="both")
    ap.add_argument("--weights", type=Path, default=None,
                    help="CoarseNet weights, .onnx (ONNX Runtime) or .pt (torch) (default: engine/weights/"
                         "coarsenet.onnx, as `capture`)")
    ap.add_argument("--clips", type=int, default=8, help="synthetic clips (default 8; 0: none)")
    ap.add_argument("--frames", type=int, default=60, help="frames per synthetic clip (default 60)")
    ap.add_argument("--seed", type=int, default=0, help="synthetic set seed (default 0)")
    ap.add_argument("--size", default="640x480", help="synthetic frame WIDTHxHEIGHT (default 640x480)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"clip cache folder (default {DEFAULT_CACHE})")
    ap.add_argument("--videos", type=Path, nargs="*", default=None,
                    help=f"real videos (default: every *.mp4 in {VIDEOS}); none given after the flag: skip (b)")
    ap.add_argument("--video-frames", type=int, default=150, help="first N frames of each real video (default 150)")
    ap.add_argument("--no-unfiltered", action="store_true", help="only the filtered runs (as `capture video`)")
    ap.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    engines = ENGINES if args.engine == "both" else (args.engine,)
    filters = (True,) if args.no_unfiltered else (True, False)
    videos = sorted(VIDEOS.glob("*.mp4")) if args.videos is None else args.videos
    w, h = (int(v) for v in args.size.lower().split("x"))
    model, corr = FaceModel.load(), LandmarkCorrespondence.load()
    region, arkit = FaceRegion(model), model.arkit_mapping()

    clips, gts = [], []
    t0 = time.perf_counter()
    if args.clips > 0:
        clips = ensure_clips(args.cache, args.clips, args.frames, args.seed, ClipConfig(width=w, height=h), model, corr)
        gts = [load_gt(c) for c in clips]
    render_s = time.perf_counter() - t0

    res = {"config": {"clips": args.clips, "frames": args.frames, "seed": args.seed, "size": f"{w}x{h}",
                      "videos": [v.name for v in videos], "video_frames": args.video_frames,
                      "weights": str(args.weights) if args.weights else "default", "engines": list(engines)},
           "synthetic": {}, "real": {}, "errors": {}}
    for engine in engines:
        for filtering in filters:
            label = "on" if filtering else "off"
            try:
                capture = open_capture(model, corr, engine, filtering, args.weights)
            except Exception as exc:   # noqa: BLE001 - e.g. missing weights: report and go on with the other engine
                res["errors"][engine] = f"{type(exc).__name__}: {exc}"
                print(f"eval: engine {engine} unavailable: {exc}", file=sys.stderr)
                break
            try:
                if clips:
                    print(f"eval: {engine}, filtering {label}: {len(clips)} synthetic clips", file=sys.stderr)
                    takes = [run_take(capture, clip_media(c), float(g["fps"])) for c, g in zip(clips, gts)]
                    s = score_synthetic(takes, gts, region, arkit)
                    s["timing"] = timing_stats(takes)
                    res["synthetic"].setdefault(engine, {})[label] = s
                if videos:
                    print(f"eval: {engine}, filtering {label}: {len(videos)} real videos", file=sys.stderr)
                    takes = [run_take(capture, v, None, args.video_frames) for v in videos]
                    s = score_real(takes)
                    s["timing"] = timing_stats(takes)
                    res["real"].setdefault(engine, {})[label] = s
            finally:
                capture.close()
    res["load_avg_1min"] = [load0, os.getloadavg()[0]]
    res["runtime_s"] = time.perf_counter() - t_start
    res["render_s"] = render_s
    print_report(res)
    save_json(res, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
