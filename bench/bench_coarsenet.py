"""CoarseNet latency at batch 1: torch vs ONNX Runtime (1 and 2 intra-op threads, spinning on/off).

Each configuration runs in a fresh subprocess pinned with os.sched_setaffinity to as
many CPUs as it has threads (1 thread = one core), started with
OMP_NUM_THREADS=OPENBLAS_NUM_THREADS=MKL_NUM_THREADS=1 as the capture command does.
A timed call is the runtime interface end to end, `rt.run(crops, K_crop, landmarks)`: one uint8
128 px crop and its 478 tracked landmarks in, the decoded dict out (preprocessing and decoding are in the graph).
After --warmup calls, --runs calls are timed; median and p95 in ms, and median / 2 ms
(the CoarseNet target on one core).

    .venv/bin/python bench/bench_coarsenet.py                      # chosen config (width 0.5)
    .venv/bin/python bench/bench_coarsenet.py --sweep 0.35,0.5,0.75,1.0   # widths, ORT 1 thread + torch
    .venv/bin/python bench/bench_coarsenet.py --weights coarsenet.pt

Weights are the untrained initialisation unless --weights is given (latency does not
depend on the values). The machine should be otherwise idle; the 1-minute load
average is printed before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_pipeline import cpu_name  # the script's own folder is on sys.path

REPO = Path(__file__).resolve().parents[1]
TARGET_MS = 2.0


def child_env() -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def pick_cores(n: int) -> list[int] | None:
    available = sorted(os.sched_getaffinity(0))
    return available[:n] if len(available) >= n else None


# ---------------------------------------------------------------- worker (pinned subprocess)


def worker(args) -> int:
    cores = [int(c) for c in args.cores.split(",")]
    os.sched_setaffinity(0, cores)
    import numpy as np
    import torch

    from engine.coarsenet import CoarseNet, CoarseNetConfig, count_macs, load_weights
    from engine.runtime import OnnxRuntime, TorchRuntime

    torch.set_num_threads(args.threads)
    model = load_weights(args.weights) if args.weights else CoarseNet(CoarseNetConfig(width=args.width)).eval()
    if args.backend == "torch":
        rt = TorchRuntime(model, num_threads=args.threads)
    else:
        rt = OnnxRuntime.from_model(model, intra_op_threads=args.threads, spinning=args.spin)
    S = model.config.input_size
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (1, S, S, 3), dtype=np.uint8)
    K = np.array([[250.0, 0, 60], [0, 250.0, 66], [0, 0, 1]], np.float32)
    L = model.config.n_landmarks
    landmarks = rng.uniform(16, S - 16, (1, L, 2)).astype(np.float32) if L else None
    for _ in range(args.warmup):
        rt.run(crops, K, landmarks)
    times = np.empty(args.runs)
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    for i in range(args.runs):
        t0 = time.perf_counter()
        rt.run(crops, K, landmarks)
        times[i] = time.perf_counter() - t0
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    print(json.dumps({
        "median_ms": float(np.median(times) * 1e3), "p95_ms": float(np.percentile(times, 95) * 1e3),
        "min_ms": float(times.min() * 1e3), "cpu_per_wall": cpu / wall,
        "params": model.n_parameters, "macs": count_macs(model), "width": model.config.width,
        "affinity": sorted(os.sched_getaffinity(0)),
    }))
    return 0


def run_worker(args, backend: str, threads: int, spin: bool, width: float) -> dict | None:
    cores = pick_cores(threads)
    if cores is None:
        return None
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", "--backend", backend,
           "--threads", str(threads), "--cores", ",".join(map(str, cores)), "--width", str(width),
           "--runs", str(args.runs), "--warmup", str(args.warmup)]
    if spin:
        cmd.append("--spin")
    if args.weights:
        cmd += ["--weights", str(args.weights)]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True,
                          preexec_fn=lambda: os.sched_setaffinity(0, cores))
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"bench worker failed: {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- report


def row(label: str, r: dict | None) -> str:
    if r is None:
        return f"| {label} | skipped (not enough CPUs) | | | |"
    return (f"| {label} | {r['median_ms']:.3f} | {r['p95_ms']:.3f} | {r['median_ms'] / TARGET_MS:.2f} "
            f"| {r['cpu_per_wall']:.2f} |")


def main(argv=None) -> int:
    doc = (__doc__ or "").strip().split("\n\n")
    p = argparse.ArgumentParser(description="\n\n".join(doc[:2]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=float, default=0.5, help="width multiplier of the untrained model (default 0.5)")
    p.add_argument("--weights", type=Path, default=None, help="a CoarseNet .pt (save_weights) instead")
    p.add_argument("--runs", type=int, default=500, help="timed calls per configuration (default 500)")
    p.add_argument("--warmup", type=int, default=50, help="untimed calls first (default 50)")
    p.add_argument("--sweep", default=None, help="comma-separated widths: ORT 1 thread and torch 1 thread each")
    p.add_argument("--_worker", dest="is_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", choices=("torch", "ort"), default="ort", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--spin", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cores", default="0", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if args.is_worker:
        return worker(args)

    import onnxruntime
    import torch

    print(f"CoarseNet latency, batch 1, {cpu_name()}, {len(os.sched_getaffinity(0))} CPUs available; "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    print(f"{args.runs} timed calls after {args.warmup} warm-up calls; load average before: "
          f"{os.getloadavg()[0]:.2f}")
    t0 = time.perf_counter()
    if args.sweep:
        widths = [float(w) for w in args.sweep.split(",")]
        print("\n| width | params | MMACs | GFLOPs | ORT 1 thr median ms | p95 ms | x 2 ms | torch 1 thr median ms |")
        print("|---|---|---|---|---|---|---|---|")
        for w in widths:
            ort1 = run_worker(args, "ort", 1, False, w)
            tor1 = run_worker(args, "torch", 1, False, w)
            print(f"| {w} | {ort1['params']:,} | {ort1['macs'] / 1e6:.1f} | {2 * ort1['macs'] / 1e9:.3f} "
                  f"| {ort1['median_ms']:.3f} | {ort1['p95_ms']:.3f} | {ort1['median_ms'] / TARGET_MS:.2f} "
                  f"| {tor1['median_ms']:.3f} |")
    else:
        configs = [("torch, 1 thread (1 core)", "torch", 1, False),
                   ("ONNX Runtime, 1 intra-op thread, spinning off (1 core)", "ort", 1, False),
                   ("ONNX Runtime, 1 intra-op thread, spinning on (1 core)", "ort", 1, True),
                   ("ONNX Runtime, 2 intra-op threads, spinning off (2 cores)", "ort", 2, False),
                   ("ONNX Runtime, 2 intra-op threads, spinning on (2 cores)", "ort", 2, True)]
        results = [(label, run_worker(args, backend, threads, spin, args.width))
                   for label, backend, threads, spin in configs]
        info = next(r for _, r in results if r is not None)
        print(f"\nwidth {info['width']}: {info['params']:,} parameters, {info['macs'] / 1e6:.1f} M MACs "
              f"({2 * info['macs'] / 1e9:.3f} GFLOPs) per 128 px crop")
        print("\n| runtime | median ms | p95 ms | median / 2 ms | cpu/wall |")
        print("|---|---|---|---|---|")
        for label, r in results:
            print(row(label, r))
    print(f"\nload average after: {os.getloadavg()[0]:.2f}; {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
