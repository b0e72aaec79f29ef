"""Train EyeStateNet (engine.eyenet) on the eye patches of synthetic training crops.

    python -m trainers.train_eyes --data runs/data/synth0 runs/data/synth2 --val runs/data/synth_val \\
        --out engine/weights/eyestate.onnx [--steps 3000]

The shards of trainers.synthesis hold the 128 px crop, MediaPipe's landmarks on it (what the
runtime has) and the exact eyeBlink / eyeSquint / eyeWide weights. Each eye gives one patch
(engine.eyestate.patch_transform, the subject's right eye mirrored onto the left), cut with
MediaPipe's landmarks where it found the face, else with the true ones moved by tracker-sized
noise. Every sample is cut `views` times with the landmarks jittered, so the net does not learn
one exact framing. L2 loss on the three weights (an L1 start collapses to zero on sparse targets).
Prints the validation MAE and correlation per output beside predicting zeros; about 8 minutes
on 2 cores for the shipped net (3000 steps, 4 shard folders).

Real eyes are the net's weak side: it reads a real open eye as 0.15-0.25 shut (median over the
shared videos' frames where MediaPipe's lid gap says open). Adding real frames labelled by that
lid gap (7 videos, a quarter of each batch) made it worse on the two held-out videos (0.25 ->
0.38), so capture's default blink stays the lid gap (capture.pipeline.BLINK_SOURCES).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine.correspondence import LandmarkCorrespondence
from engine.eyenet import OUTPUTS, EyeStateNet, export_onnx
from engine.eyestate import DEFAULT_WEIGHTS, normalise_patches, patch_transform, subject_left_first, warp_patch
from engine.facemodel import FaceModel
from trainers.train_coarse import load_shards

FIELDS = ("image", "landmarks", "expression")


def patch_set(shards: dict, sides: dict, rng: np.random.Generator, views: int = 1,
              jitter_px: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """(N·views·2, 1, H, W) normalised patches and (N·views·2, 3) OUTPUTS weights of a shard dict.

    sides: {eye index (EYE_CORNERS order): model shape suffix "_L" / "_R"}. jitter_px: std of the
    per-point noise on the true landmarks and of the shared shift on every view, crop px."""
    names = FaceModel.load().expression_names
    cols = {e: [names.index(o + sides[e]) for o in OUTPUTS] for e in (0, 1)}
    tracked = shards.get("tracked", np.zeros(len(shards["image"]), bool))
    patches, labels = [], []
    for i, image in enumerate(shards["image"]):
        base = shards["tracked_landmarks"][i] if tracked[i] else \
            shards["landmarks"][i] + rng.normal(0, jitter_px, shards["landmarks"][i].shape)
        for v in range(views):
            lm = base if v == 0 else base + rng.normal(0, jitter_px, 2) + rng.normal(0, 0.3 * jitter_px, base.shape)
            for e in (0, 1):
                patches.append(warp_patch(image, patch_transform(lm, e)))
                labels.append(shards["expression"][i, cols[e]])
    return normalise_patches(np.stack(patches)), np.asarray(labels, np.float32)


def scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Per output: MAE, the all-zero MAE and Pearson r."""
    out = {}
    for j, name in enumerate(OUTPUTS):
        r = float(np.corrcoef(pred[:, j], truth[:, j])[0, 1]) if truth[:, j].std() > 0 else float("nan")
        out[name] = {"mae": float(np.abs(pred[:, j] - truth[:, j]).mean()),
                     "zeros": float(np.abs(truth[:, j]).mean()), "r": r}
    return out


def predict(net: EyeStateNet, x: np.ndarray, batch: int = 1024) -> np.ndarray:
    net.eval()
    with torch.no_grad():
        out = np.concatenate([net(torch.from_numpy(x[i:i + batch])).numpy() for i in range(0, len(x), batch)])
    net.train()
    return np.clip(out, 0.0, 1.0)


def train(data: list[Path], val: Path, out: Path, steps: int = 3000, batch: int = 256, lr: float = 2e-3,
          views: int = 2, seed: int = 0, threads: int = 2) -> dict:
    """Train, print validation figures, write the ONNX net to `out`; returns the final scores."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    model, corr = FaceModel.load(), LandmarkCorrespondence.load()
    left, right = subject_left_first(model, corr)
    sides = {left: "_L", right: "_R"}
    t0 = time.perf_counter()
    x, y = patch_set(load_shards(data, FIELDS), sides, rng, views)
    xv, yv = patch_set(load_shards(val, FIELDS), sides, np.random.default_rng(seed + 1))
    print(f"eyes: {len(x)} training and {len(xv)} validation patches in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    net = EyeStateNet()
    opt = torch.optim.AdamW(net.parameters(), lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(X), (batch,), generator=gen)
        xb = X[idx]
        # contrast and noise: the normalisation removes gain, not texture
        xb = xb * (1 + 0.2 * torch.randn(batch, 1, 1, 1, generator=gen)) \
            + 0.05 * torch.randn(xb.shape, generator=gen)
        loss = ((net(xb) - Y[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 500 == 0 or step + 1 == steps:
            s = scores(predict(net, xv), yv)
            figures = "  ".join(f"{k} MAE {v['mae']:.3f} (zeros {v['zeros']:.3f}) r {v['r']:.2f}" for k, v in s.items())
            print(f"step {step + 1}/{steps} loss {loss.item():.4f}  {figures}", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(net, out)
    return scores(predict(net, xv), yv)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, nargs="+", required=True, help="training shard folders")
    ap.add_argument("--val", type=Path, required=True, help="validation shard folder (a seed training never used)")
    ap.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS, help=f"ONNX file (default {DEFAULT_WEIGHTS})")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--views", type=int, default=2, help="jittered cuts per sample (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for d in [*args.data, args.val]:
        if not d.is_dir():
            ap.error(f"no shard folder {d} (write one with python -m trainers.synthesis)")
    train(args.data, args.val, args.out, args.steps, views=args.views, seed=args.seed)
    print(f"eye-state net written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
