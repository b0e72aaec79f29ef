#!/usr/bin/env python
"""Tracking through profile views (issue 13, item 11): frames kept and head-yaw error on exact-truth clips
whose head turns up to 90 degrees, with FaceMesh alone (CaptureSettings.follow_profiles off: the code
before) and with a lost face followed from the previous fit (on, the default), measured in the same run.

Clips: trainers.clips with ClipConfig(yaw_deg=90, pitch_deg=10, roll_deg=10): a random person, head
pose keys every 1.5 s with yaw drawn in +-90 degrees, random expressions, 640x480 at 30 fps; set seed
21 (training never uses it; the accuracy benches use 11), rendered once into
runs/eval_clips/profile/. Each clip runs through FaceCapture as `capture video` runs it (filtering and
automatic calibration on, default engine CoarseNet).

Per band of the true |yaw| (degrees) and over all frames, for each setting:
    kept %          frames with a face in the output (the rest are dropped: no CSV row, no mesh)
    yaw err         |fitted head yaw - true yaw|, degrees, median and p95 over the kept frames
    head err        geodesic angle between fitted and true head rotation, degrees, median and p95
    confidence      track.npz's per-frame confidence (1: FaceMesh's own, <= 0.5: followed, 0.05: fitted from
                    the picture alone), median; "followed" counts frames under 1, "picture" the last kind
and per setting the longest run of frames without a face, and the landmark stage's time (ms, median and
p95) on frames found by FaceMesh and on followed frames.

    python bench/eval_profile.py [--clips 6] [--frames 150] [--seed 21] [--engine coarse] [--json OUT]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")   # as `capture` runs

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from eval_coarsenet import DEFAULT_CACHE, ensure_clips, geodesic_deg, open_capture, run_take, save_json  # noqa: E402

from capture.pipeline import EXPRESSION_SOURCES, expression_needs  # noqa: E402
from engine.correspondence import LandmarkCorrespondence  # noqa: E402
from engine.facemodel import FaceModel  # noqa: E402
from trainers.clips import ClipConfig, clip_media, load_gt  # noqa: E402

#: The turns the clips make: yaw keys anywhere in +-90 degrees, little pitch and roll.
PROFILE_CLIPS = ClipConfig(yaw_deg=90.0, pitch_deg=10.0, roll_deg=10.0)
#: Bands of the true |yaw|, degrees.
BANDS = ((0.0, 45.0), (45.0, 60.0), (60.0, 75.0), (75.0, 90.0))


def pct(values, q: float) -> float:
    a = np.asarray(values, np.float64)
    a = a[np.isfinite(a)]
    return float(np.percentile(a, q)) if a.size else float("nan")


def longest_loss(found: np.ndarray) -> int:
    """The longest run of False in a per-frame bool array."""
    best = run = 0
    for f in found:
        run = 0 if f else run + 1
        best = max(best, run)
    return best


def score(takes: list, gts: list) -> dict:
    """Per band and overall: kept share, yaw and head errors, confidence; the longest loss; landmark ms."""
    rows = []  # (true |yaw| deg, found, yaw err deg, head err deg, confidence, followed, landmarks ms, from picture)
    longest = 0
    for take, gt in zip(takes, gts):
        found = np.array([r.face_found for _, r, _ in take])
        longest = max(longest, longest_loss(found))
        for index, r, _ in take:
            true_yaw = float(np.degrees(gt["head_ypr_rad"][index][0]))
            yaw_err = head_err = np.nan
            if r.face_found:
                yaw_err = abs(float(np.degrees(r.head_ypr_rad[0])) - true_yaw)
                head_err = geodesic_deg(np.asarray(r.rotation), gt["rotation"][index])
            rows.append((abs(true_yaw), r.face_found, yaw_err, head_err, r.confidence if r.face_found else np.nan,
                         r.face_found and r.confidence < 1.0, 1e3 * r.timings_s.get("landmarks", np.nan),
                         r.from_picture))
    a = np.array(rows, np.float64)
    out = {"bands": {}, "longest_loss_frames": longest, "frames": len(a)}
    for lo, hi in (*BANDS, (0.0, 90.0)):
        sel = a[(a[:, 0] >= lo) & (a[:, 0] < hi + (hi == 90.0))]
        kept = sel[sel[:, 1] > 0]
        out["bands"][f"{lo:.0f}-{hi:.0f}"] = {
            "frames": len(sel), "kept_percent": 100.0 * len(kept) / max(len(sel), 1),
            "yaw_err_median": pct(kept[:, 2], 50), "yaw_err_p95": pct(kept[:, 2], 95),
            "head_err_median": pct(kept[:, 3], 50), "head_err_p95": pct(kept[:, 3], 95),
            "confidence_median": pct(kept[:, 4], 50), "followed": int(kept[:, 5].sum()),
            "from_picture": int(kept[:, 7].sum())}
    found = a[a[:, 1] > 0]
    own, followed = found[found[:, 5] == 0], found[found[:, 5] > 0]
    out["landmarks_ms"] = {"facemesh": [pct(own[:, 6], 50), pct(own[:, 6], 95)],
                           "followed": [pct(followed[:, 6], 50), pct(followed[:, 6], 95)]}
    return out


def print_report(res: dict) -> None:
    print(f"\nprofile views: {res['clips']} clips x {res['frames_per_clip']} frames (seed {res['seed']}), "
          f"engine {res['engine']}; errors over kept frames, degrees")
    print(f"{'|yaw| band':<11}{'frames':>7}  {'setting':<9}{'kept %':>7}{'yaw err med':>12}{'p95':>7}"
          f"{'head err med':>13}{'p95':>7}{'conf med':>9}{'followed':>9}{'picture':>8}")
    for band in res["settings"]["before"]["bands"]:
        for name, s in res["settings"].items():
            b = s["bands"][band]
            print(f"{band:<11}{b['frames']:>7}  {name:<9}{b['kept_percent']:>7.1f}{b['yaw_err_median']:>12.2f}"
                  f"{b['yaw_err_p95']:>7.2f}{b['head_err_median']:>13.2f}{b['head_err_p95']:>7.2f}"
                  f"{b['confidence_median']:>9.3f}{b['followed']:>9d}{b.get('from_picture', 0):>8d}")
    for name, s in res["settings"].items():
        ms = s["landmarks_ms"]
        print(f"{name}: longest run without a face {s['longest_loss_frames']} frames; landmark stage ms "
              f"(median, p95): FaceMesh's own {ms['facemesh'][0]:.2f}, {ms['facemesh'][1]:.2f}; "
              f"followed {ms['followed'][0]:.2f}, {ms['followed'][1]:.2f}")
    print(f"run time {res['runtime_s']:.0f} s (rendering {res['render_s']:.0f} s); "
          f"load average {res['load_avg_1min'][0]:.2f} -> {res['load_avg_1min'][1]:.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=6)
    ap.add_argument("--frames", type=int, default=150, help="frames per clip (default 150: 5 s)")
    ap.add_argument("--seed", type=int, default=21, help="clip set seed (default 21; training never uses it)")
    ap.add_argument("--engine", choices=("coarse", "fit"), default="coarse")
    ap.add_argument("--expression", choices=EXPRESSION_SOURCES, default="merged",
                    help="capture's --expression (network: coarse only; solve: fit only)")
    ap.add_argument("--weights", type=Path, default=None, help="CoarseNet weights (default: shipped)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE / "profile",
                    help=f"clip cache (default {DEFAULT_CACHE / 'profile'})")
    ap.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    args = ap.parse_args(argv)
    if expression_needs(args.engine, args.expression):
        ap.error(f"--expression {args.expression} needs the other engine than --engine {args.engine}")
    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    model, corr = FaceModel.load(), LandmarkCorrespondence.load()
    t0 = time.perf_counter()
    clips = ensure_clips(args.cache, args.clips, args.frames, args.seed, PROFILE_CLIPS, model, corr)
    render_s = time.perf_counter() - t0
    gts = [load_gt(c) for c in clips]
    res = {"clips": args.clips, "frames_per_clip": args.frames, "seed": args.seed, "engine": args.engine,
           "expression": args.expression, "settings": {}}
    capture = open_capture(model, corr, args.engine, True, args.weights, args.expression)
    base = capture.settings
    try:
        for name, follow in (("before", False), ("after", True)):
            capture.settings = replace(base, follow_profiles=follow)
            print(f"eval: {name} (follow_profiles={follow}): {len(clips)} clips", file=sys.stderr)
            takes = [run_take(capture, clip_media(c), float(g["fps"])) for c, g in zip(clips, gts)]
            res["settings"][name] = score(takes, gts)
    finally:
        capture.close()
    res["runtime_s"], res["render_s"] = time.perf_counter() - t_start, render_s
    res["load_avg_1min"] = [load0, os.getloadavg()[0]]
    print_report(res)
    save_json(res, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
