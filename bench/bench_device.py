#!/usr/bin/env python
"""CoarseNet and FineNet on each device backend this machine has (issue 12): batch-1 latency and
batched throughput, every row beside the CPU measured in the same run.

Backends (engine.device): onnxruntime-cpu (always; one intra-op thread, spinning off, as `capture`
runs it), tensorrt (FP16 engines of the shipped ONNX files, engine.trt_engine: built first if not
cached), onnxruntime-cuda (onnxruntime-gpu with a GPU), torch-cuda (torch with CUDA: the shipped
.pt files). A backend this machine cannot run is listed with the reason.

Per backend, with the shipped weights (timings do not depend on the inputs, which are random):
  coarse b1      one 128 px crop and its 478 landmarks through CoarseNet, ms (median, p95);
  fine b1        one 7 x 256 x 256 map through FineNet, ms;
  both b1        the two one after the other, ms (issue 12's "CoarseNet + FineNet at batch 1");
  coarse batched crops per second at --batch crops a call.
Results come back as numpy arrays (so a GPU call is timed to its end).

    python bench/bench_device.py [--runs 200] [--batch 64] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.coarse_fitting import open_runtime  # noqa: E402
from engine.device import CPU_BACKEND, CUDA_BACKENDS, backend_problem, onnx_provider  # noqa: E402
from engine.fine_runtime import DEFAULT_WEIGHTS as FINE_ONNX  # noqa: E402
from engine.fine_runtime import IN_CHANNELS  # noqa: E402


def timed(call, runs: int, warmup: int) -> np.ndarray:
    for _ in range(warmup):
        call()
    out = np.empty(runs)
    for i in range(runs):
        t = time.perf_counter()
        call()
        out[i] = time.perf_counter() - t
    return out * 1e3


def stat(ms: np.ndarray) -> dict:
    return {"median": float(np.median(ms)), "p95": float(np.percentile(ms, 95))}


def networks(backend: str):
    """(CoarseNet runtime, FineNet callable (1, 7, R, R) -> numpy) on a backend."""
    from engine.runtime import onnx_session

    if backend == "torch-cuda":
        import torch

        from engine.finenet import load_weights

        coarse = open_runtime("torch", provider="cuda")
        net = load_weights(FINE_ONNX.with_suffix(".pt")).to("cuda").eval()

        def fine(x):
            with torch.inference_mode():
                return net(torch.from_numpy(x).to("cuda")).cpu().numpy()
        return coarse, fine
    provider = onnx_provider(backend)
    session = onnx_session(FINE_ONNX, provider=provider)
    return open_runtime("onnx", provider=provider), lambda x: session.run(None, {"maps": x})[0]


def measure(backend: str, runs: int, warmup: int, batch: int) -> dict:
    coarse, fine = networks(backend)
    rng = np.random.default_rng(0)
    S = coarse.input_size

    def inputs(n):
        crops = rng.integers(0, 256, (n, S, S, 3), dtype=np.uint8)
        lm = (S / 2 + rng.normal(0, S / 6, (n, coarse.n_landmarks, 2))).astype(np.float32)
        K = np.array([[S, 0, S / 2], [0, S, S / 2], [0, 0, 1]], np.float32)
        return crops, K, lm

    one, many = inputs(1), inputs(batch)
    maps = rng.normal(0, 0.3, (1, IN_CHANNELS, 256, 256)).astype(np.float32)
    c1 = timed(lambda: coarse.run(one[0], one[1], one[2]), runs, warmup)
    f1 = timed(lambda: fine(maps), runs, warmup)
    both = timed(lambda: (coarse.run(one[0], one[1], one[2]), fine(maps)), runs, warmup)
    cb = timed(lambda: coarse.run(many[0], many[1], many[2]), max(runs // 10, 10), max(warmup // 10, 3))
    return {"coarse_b1_ms": stat(c1), "fine_b1_ms": stat(f1), "both_b1_ms": stat(both),
            "coarse_batched_crops_s": float(batch / (np.median(cb) / 1e3))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=200, help="timed batch-1 calls per network (default 200)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64, help="crops per batched CoarseNet call (default 64)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.runs < 10 or args.batch < 1:
        ap.error("--runs must be at least 10 and --batch at least 1")
    results, skipped = {}, {}
    for backend in (CPU_BACKEND, *CUDA_BACKENDS):
        problem = None if backend == CPU_BACKEND else backend_problem(backend)
        if problem:
            skipped[backend] = problem
            continue
        print(f"bench_device: {backend} ...", file=sys.stderr)
        results[backend] = measure(backend, args.runs, args.warmup, args.batch)
    cpu = results[CPU_BACKEND]
    print(f"\nCoarseNet and FineNet per backend (medians, p95 in brackets; ratio: CPU / backend, same run); "
          f"batched: {args.batch} crops a call")
    print(f"{'backend':<18}{'coarse b1 ms':>16}{'fine b1 ms':>16}{'both b1 ms':>16}{'ratio':>8}{'crops/s':>12}")
    for backend, r in results.items():
        cells = [f"{r[k]['median']:.3f} ({r[k]['p95']:.2f})" for k in ("coarse_b1_ms", "fine_b1_ms", "both_b1_ms")]
        ratio = cpu["both_b1_ms"]["median"] / r["both_b1_ms"]["median"]
        print(f"{backend:<18}{cells[0]:>16}{cells[1]:>16}{cells[2]:>16}{ratio:>8.2f}{r['coarse_batched_crops_s']:>12.0f}")
    for backend, why in skipped.items():
        print(f"{backend:<18}not run: {why}")
    print("targets (issue 12, on a GPU): both networks <= 1 ms at batch 1; >= 5000 crops/s batched")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "skipped": skipped, "batch": args.batch}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
