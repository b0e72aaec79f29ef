"""What the One-Euro filtering does on real clips: jitter removed, lag added.

Each video is tracked and fitted once; the raw per-frame fits are then
filtered exactly as `capture` filters them (same settings, same timestamps).

- jitter: median over frames of the mean |second difference| of the 52 ARKit
  values (raw vs filtered, and their ratio) — frame-to-frame shake;
- lag: how far the filtered head pose moves the 68 landmarks from where the
  raw pose puts them, in % of the outer-eye-corner distance (median and p95).

    python bench/bench_filtering.py [VIDEO ...]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from capture.pipeline import CaptureSettings, FaceCapture  # noqa: E402
from capture.sources import VideoSource  # noqa: E402
from engine.arkit import arkit_from_model  # noqa: E402
from engine.correspondence import LandmarkCorrespondence  # noqa: E402
from engine.facemodel import FaceModel  # noqa: E402
from engine.filters import OneEuroFilter  # noqa: E402
from engine.pose import FRONTAL, project, rodrigues, rotation_to_axis_angle  # noqa: E402

VIDEOS = REPO.parent / "shared" / "data" / "videos"
DEFAULT_VIDEOS = [VIDEOS / n for n in ("d10.mp4", "d12.mp4", "d14.mp4")]


def raw_fits(capture: FaceCapture, video: Path):
    """(times, rotations, translations, expressions, K) of the frames with a face, unfiltered."""
    out = []
    for frame in VideoSource(video):
        r = capture.process(frame.image, frame.time_s, frame.index)
        if r.face_found:
            out.append((frame.time_s, r.rotation, r.translation, r.expression, r.camera_matrix))
    return out


def jitter_per_frame(x) -> np.ndarray:
    """(F, C) per-frame values -> (F - 2,) mean |second difference| over C, for frames 1..F-2."""
    x = np.asarray(x)
    return np.abs(x[2:] - 2 * x[1:-1] + x[:-2]).mean(axis=1)


def jitter(x) -> float:
    """Frame-to-frame shake of a (F, C) track: the median over frames of jitter_per_frame."""
    return float(np.median(jitter_per_frame(x)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("videos", nargs="*", type=Path, default=DEFAULT_VIDEOS)
    ap.add_argument("--engine", choices=("coarse", "fit"), default="coarse", help="face engine (default: coarse, "
                    "as `capture`)")
    args = ap.parse_args(argv)
    model = FaceModel.load()
    corr = LandmarkCorrespondence.load()
    W = model.arkit_mapping()
    points = model.neutral[model.landmark68_vertices].astype(np.float64)
    s = CaptureSettings()
    print(f"{'video':<12}{'frames':>7}{'jitter raw':>12}{'filtered':>10}{'ratio':>7}{'lag median %':>14}"
          f"{'lag p95 %':>11}")
    for video in args.videos:
        capture = FaceCapture(model, corr, CaptureSettings(engine=args.engine, filtering=False))
        fits = raw_fits(capture, video)
        capture.close()
        e_filter = OneEuroFilter(s.expression_cutoff_hz, s.expression_beta)
        p_filter = OneEuroFilter(s.pose_cutoff_hz, np.r_[np.full(3, s.rotation_beta), np.full(3, s.translation_beta)])
        raw_bs, filt_bs, lag = [], [], []
        for t_s, R, t, e, K in fits:
            raw_bs.append(arkit_from_model(e, W))
            filt_bs.append(arkit_from_model(np.clip(e_filter(e, t_s), 0, 1), W))
            pose = p_filter(np.r_[rotation_to_axis_angle(R @ FRONTAL.T), t], t_s)
            a = project(points @ R.T + t, K)
            b = project(points @ (rodrigues(pose[:3]) @ FRONTAL).T + pose[3:], K)
            lag.append(np.linalg.norm(a - b, axis=1).mean() / np.linalg.norm(a[36] - a[45]) * 100)

        jr, jf = jitter(raw_bs), jitter(filt_bs)
        print(f"{video.name:<12}{len(fits):>7}{jr:>12.4f}{jf:>10.4f}{jr / jf:>7.2f}"
              f"{np.median(lag):>14.2f}{np.percentile(lag, 95):>11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
