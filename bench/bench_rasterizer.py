#!/usr/bin/env python
"""Rasterizer speed: the numba kernel (CPU) against cuda_ext on the GPU, the face model at 512 x 512.

Median and p95 ms over repeats of one frontal face filling most of the frame, and the ratio
CPU / GPU measured in the same run; the GPU figures need a CUDA GPU and the built library
(cmake -S . -B build && cmake --build build, or $CAPTURE_CUDA_LIB).

    python bench/bench_rasterizer.py [--size 512] [--repeats 50]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.facemodel import FaceModel  # noqa: E402
from engine.pose import FRONTAL, default_camera_matrix  # noqa: E402
from engine.rasterizer import cuda_backend_available, rasterize  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median, p95) ms of fn() over repeats calls, after two warm-up calls."""
    fn()
    fn()
    ms = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(ms)), float(np.percentile(ms, 95))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="image side, px (default 512)")
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args(argv)
    model = FaceModel.load()
    S = args.size
    K = default_camera_matrix(S, S)
    pts = model.neutral.astype(np.float64) @ FRONTAL.T + np.array([0.0, 0.0, 35.0])  # the face fills the frame
    tris = model.triangles.astype(np.int32)
    cpu = timed(lambda: rasterize(pts, tris, K, S, S, backend="cpu"), args.repeats)
    print(f"{S}x{S}, {len(tris)} triangles; median / p95 ms")
    print(f"  numba (CPU)  {cpu[0]:8.3f} / {cpu[1]:8.3f}")
    if not cuda_backend_available():
        print("  cuda_ext     skipped: no CUDA GPU or no built library")
        return 0
    import torch

    pts_gpu, tris_gpu = torch.tensor(pts, device="cuda"), torch.tensor(tris, device="cuda")

    def gpu_frame():
        rasterize(pts_gpu, tris_gpu, K, S, S, backend="cuda")
        torch.cuda.synchronize()
    gpu = timed(gpu_frame, args.repeats)
    same = rasterize(pts, tris, K, S, S, backend="cuda")
    ref = rasterize(pts, tris, K, S, S, backend="cpu")
    exact = np.array_equal(same.triangle_id, ref.triangle_id) and np.array_equal(same.barycentric, ref.barycentric)
    print(f"  cuda_ext     {gpu[0]:8.3f} / {gpu[1]:8.3f}   ({torch.cuda.get_device_name()}; tensors on the GPU)")
    print(f"  ratio CPU / GPU (medians): {cpu[0] / gpu[0]:.1f}x; GPU output equal to numba's bit for bit: {exact}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
