#!/usr/bin/env python
"""Depth registration on one core: engine.depth.register_depth against Open3D's route, in one run.

Two inputs: BIWI's Kinect frames (../shared/data/rgbd/biwi01, a foreground of ~56,000 depth
pixels) and a full 640x480 frame with depth at every pixel (a tilted plane about 1 m away, under
the same calibration). Open3D's route, when `open3d` is installed: a point cloud from the depth
image, moved into the colour camera, projected to a depth image (`project_to_depth_image`, the
same pixels as ours; tests/test_depth.py checks that). Prints median and p95 ms per frame and
the ratio Open3D / ours.

    python bench/bench_registration.py [--runs 40]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from bench_device import timed  # noqa: E402

from engine.depth import DepthCalibration, register_depth  # noqa: E402

BIWI = REPO.parent / "shared" / "data" / "rgbd" / "biwi01"


def timed_ms(fn, inputs, runs: int) -> np.ndarray:
    """(runs · len(inputs),) ms per call of fn on each input, after one untimed call (compilation)."""
    return np.concatenate([timed(lambda: fn(x), runs, warmup=1) for x in inputs])


def open3d_register(calib: DepthCalibration):
    """Open3D's registration as a function of a raw depth image, or None without open3d."""
    try:
        import open3d as o3d
    except ImportError:
        return None
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = calib.R_depth_to_colour, calib.t_depth_to_colour_mm / 1000.0
    K_d, K_c, T = o3d.core.Tensor(calib.depth_K), o3d.core.Tensor(calib.colour_K), o3d.core.Tensor(T)

    def run(raw):
        image = o3d.t.geometry.Image(o3d.core.Tensor(raw))
        cloud = o3d.t.geometry.PointCloud.create_from_depth_image(image, K_d, depth_scale=1000.0,
                                                                  depth_max=10.0)
        return cloud.project_to_depth_image(640, 480, K_c, T, depth_scale=1000.0, depth_max=10.0)
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=40, help="timed passes over each input set (default 40)")
    args = ap.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})   # one core
    if not BIWI.is_dir():
        print(f"bench registration: no BIWI frames at {BIWI}", file=sys.stderr)
        return 1
    calib = DepthCalibration.biwi(BIWI)
    biwi = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted((BIWI / "depth").glob("*.png"))]
    v, u = np.mgrid[0:480, 0:640]
    full = [(1000.0 + 0.2 * (u - 320) + 0.1 * (v - 240)).astype(np.uint16)]
    theirs = open3d_register(calib)
    print(f"registration to the colour camera, one core, ms per frame ({args.runs} runs)")
    print(f"{'input':<50}{'ours median':>12}{'p95':>8}{'Open3D median':>15}{'p95':>8}{'ratio':>8}")
    for name, frames in (("BIWI Kinect frames (foreground)", biwi), ("full 640x480, every pixel", full)):
        for fill in (True, False):
            ours = timed_ms(lambda raw: register_depth(raw, calib, (640, 480), fill_cracks=fill), frames,
                            args.runs)
            label = name + ("" if fill else ", no crack filling")
            row = f"{label:<50}{np.median(ours):>12.2f}{np.percentile(ours, 95):>8.2f}"
            if not fill:    # Open3D's route fills no cracks
                if theirs is None:
                    row += "   (open3d not installed)"
                else:
                    o = timed_ms(theirs, frames, args.runs)
                    ratio = np.median(o) / np.median(ours)
                    row += f"{np.median(o):>15.2f}{np.percentile(o, 95):>8.2f}{ratio:>7.1f}x"
            print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
