#!/usr/bin/env python
"""Benchmark batched recorded video: `capture video --batch N` against `--batch 1` in the same run.

Each configuration is the real command, `capture video VIDEO --mesh-format none --quiet --batch B
--device D`, pinned to the cores asked for (sched_setaffinity before it starts, one BLAS thread
as `capture` sets), repeated --repeat times with the two batch sizes interleaved so that drift in the
machine's speed hits both alike. Per configuration it prints the median and p95 over the repeats of
the milliseconds per frame `capture video` reports itself (run_take's wall time over its frames:
decode on the reader thread, tracking, the network, fit, filters and the files, without start-up),
the frames/s that makes, and the ratio of batch N to batch 1 (below 1: batched is faster).

The batched take must be the take of one frame at a time: the script also prints the largest
difference between the two takes' blendshapes, pose and 68 landmarks (0 when the network gives the
same arithmetic for a batch as for one crop, as ONNX Runtime on the CPU does).

--height H first re-encodes the video so its frames are H px high (for the issue's 720p figure; the
shared videos are 512 px), into a temporary file.

Run from the repository root:  .venv/bin/python bench/bench_batch.py [VIDEO] [--batch 16] [--cores 1,2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import child_env, fmt, pick_cores, pinned, stats_ms  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_VIDEO = REPO.parent / "shared" / "data" / "videos" / "d10.mp4"
COMPARED = ("blendshapes", "rotation", "translation", "landmarks68")


def resized_video(video: Path, height: int, out: Path) -> Path:
    """video re-encoded with frames `height` px high (width in proportion, even), mp4v."""
    import cv2

    cap = cv2.VideoCapture(str(video))
    fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
    writer = None
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        h, w = frame.shape[:2]
        size = (2 * round(w * height / h / 2), height)
        if writer is None:
            writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
        writer.write(cv2.resize(frame, size, interpolation=cv2.INTER_CUBIC))
    cap.release()
    if writer is None:
        raise SystemExit(f"cannot read a frame of {video}")
    writer.release()
    return out


def run(args, video: Path, cores: list[int], batch: int, out: Path) -> float:
    """One pinned `capture video` run: seconds per frame as it reports them (frames / frames/s)."""
    cmd = [sys.executable, "-m", "capture.cli", "video", str(video), "--out", str(out), "--overwrite", "--quiet",
           "--mesh-format", "none", "--batch", str(batch), "--device", args.device]
    if args.frames is not None:
        cmd += ["--max-frames", str(args.frames)]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), preexec_fn=pinned(cores), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"`{' '.join(cmd)}` failed (exit {proc.returncode})")
    line = next((ln for ln in reversed(proc.stderr.splitlines()) if " frames/s" in ln), "")
    fps = float(line.split(" frames/s")[0].rsplit(",", 1)[1])
    return 1.0 / fps


def largest_difference(a: Path, b: Path) -> dict:
    ta, tb = np.load(a / "track.npz"), np.load(b / "track.npz")
    same_faces = bool(np.array_equal(ta["face_found"], tb["face_found"]))
    return {"face_found equal": same_faces,
            **{name: float(np.nanmax(np.abs(ta[name] - tb[name]), initial=0.0)) for name in COMPARED}}


def main(argv=None) -> int:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(description="\n\n".join(doc[:-1]), epilog=doc[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", nargs="?", type=Path, default=DEFAULT_VIDEO, help="default: ../shared/data/videos/d10.mp4")
    p.add_argument("--batch", type=int, default=16, help="the batch size measured against 1 (default 16)")
    p.add_argument("--cores", default="1,2", help="core counts to pin to, comma-separated (default 1,2)")
    p.add_argument("--repeat", type=int, default=5, help="runs per configuration (default 5)")
    p.add_argument("--frames", type=int, default=None, help="only the first frames of the video")
    p.add_argument("--height", type=int, default=None, help="re-encode the video to this height first (e.g. 720)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="capture's --device")
    args = p.parse_args(argv)
    if not args.video.is_file():
        raise SystemExit(f"video not found: {args.video}")
    if args.batch < 2:
        raise SystemExit("--batch must be at least 2 (it is measured against 1)")
    with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp_name:
        tmp = Path(tmp_name)
        video = resized_video(args.video, args.height, tmp / "video.mp4") if args.height else args.video
        batches = (1, args.batch)
        print(f"video   {args.video}" + (f", re-encoded to {args.height} px high" if args.height else ""))
        print(f"command capture video VIDEO --mesh-format none --batch B --device {args.device}; "
              f"{args.repeat} runs each, interleaved")
        for n in (int(c) for c in args.cores.split(",")):
            cores = pick_cores(n)
            if cores is None:
                print(f"\n{n} cores: skipped, this machine has fewer")
                continue
            per_frame = {b: [] for b in batches}
            for r in range(args.repeat):
                for b in batches:
                    out = tmp / f"take_{b}"
                    per_frame[b].append(run(args, video, cores, b, out))
                    if r == 0 and b == batches[-1]:
                        diff = largest_difference(tmp / "take_1", out)
            print(f"\n{n} core{'s' if n > 1 else ''} ({','.join(map(str, cores))})")
            print(f"  {'':<14}{'ms/frame median':>16}{'p95':>8}{'frames/s':>10}")
            med1 = None
            for b in batches:
                med, p95 = stats_ms(per_frame[b])
                med1 = med1 or med
                print(f"  {'batch ' + str(b):<14}{fmt(med, 16)}{fmt(p95, 8)}{fmt(1000.0 / med, 10, 1)}")
            med, _ = stats_ms(per_frame[args.batch])
            print(f"  ratio batch {args.batch} / batch 1: {med / med1:.2f} (median ms per frame)")
            print("  largest difference batch N vs 1: " + ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in diff.items()))
            shutil.rmtree(tmp / "take_1", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
