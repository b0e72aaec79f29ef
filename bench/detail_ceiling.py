#!/usr/bin/env python
"""How far can any displacement map lower the photometric error? (issue 10's target, from above)

FineNet's target asks the detail to lower the photometric error of held-out real frames by 20 %
(bench/eval_detail.py (a)). This script asks what the loss itself allows: it optimises each held-out
pair's two maps directly (Adam on the texels, no network) under FineNet's training loss
(trainers.train_fine.frame_losses: the photometric term, smoothness and magnitude priors, and, with
--temporal > 0, the flow-warped temporal term between the pair's frames), and reports per setting:

  photometric ratio    median over frames of (error with the map) / (error with none), as eval_detail
  flicker mm           median over pairs of the flow-warped |d_0 - d_1| (eval_detail (c))
  mean |d| mm, rms slope mm/texel    how large and how rough the maps came out

beside the shipped FineNet's maps on the same frames. Maps are written as PNGs (--out) beside the
unwrapped frame: look at them, the ratio alone does not say whether a map is skin.

    python bench/detail_ceiling.py [--data runs/fine_data] [--pairs 10] [--steps 200]
        [--setting SMOOTHNESS,MAGNITUDE,TEMPORAL ...] [--out runs/detail_ceiling]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.facemodel import FaceModel  # noqa: E402
from engine.finenet import load_weights  # noqa: E402
from engine.lighting import linear_to_srgb  # noqa: E402
from engine.uvmap import FaceUV  # noqa: E402
from trainers.detail_loss import temporal_loss  # noqa: E402
from trainers.fine_data import read_samples  # noqa: E402
from trainers.train_fine import DEFAULT_CONFIG, FrameSet, frame_losses, load_config, predict  # noqa: E402

WEIGHTS = ROOT / "engine" / "weights" / "finenet.pt"


def figures(d: torch.Tensor, b: dict, mask: torch.Tensor, lc: dict, none: torch.Tensor) -> dict:
    """The report's figures for maps d (2P, R, R) of P pairs; none: (2P,) the error without detail."""
    with torch.no_grad():
        photometric = frame_losses(d, b, mask, lc)["photometric"]
        pairs = d.view(-1, 2, *d.shape[1:])
        both = b["visible"].view(-1, 2, *d.shape[1:]).prod(dim=1)
        seen = b["visible"] > 0
        return {"ratio": float((photometric / none).median()),
                "flicker_mm": float(temporal_loss(pairs[:, 0], pairs[:, 1], b["flow"], both).median()),
                "mean_abs_mm": float(d.abs()[seen].mean()),
                "rms_slope_mm": float(((d[:, :, 1:] - d[:, :, :-1]) ** 2 * seen[:, :, 1:] * seen[:, :, :-1]).sum()
                                      .div((seen[:, :, 1:] * seen[:, :, :-1]).sum()).sqrt())}


def optimise(b: dict, mask: torch.Tensor, lc: dict, smoothness: float, magnitude: float, temporal: float,
             steps: int, lr: float) -> torch.Tensor:
    """(2P, R, R) maps, mm, minimising the training loss with these weights on the batch's frames."""
    from tqdm import tqdm

    d = torch.zeros(b["colour"].shape[:3], requires_grad=True)
    opt = torch.optim.Adam([d], lr=lr)
    both = b["visible"].view(-1, 2, *d.shape[1:]).prod(dim=1)
    for _ in tqdm(range(steps), desc=f"maps ({smoothness}, {magnitude}, {temporal})", leave=False):
        terms = frame_losses(d, b, mask, lc)
        loss = (float(lc["photometric"]) * terms["photometric"] + smoothness * terms["smoothness"]
                + magnitude * terms["magnitude"]).mean()
        if temporal > 0:
            pairs = d.view(-1, 2, *d.shape[1:])
            loss = loss + temporal * temporal_loss(pairs[:, 0], pairs[:, 1], b["flow"], both).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return d.detach()


def save_maps(d: torch.Tensor, b: dict, out: Path, name: str, count: int = 3) -> None:
    """The first count frames: unwrapped colour beside the map (grey, ±0.6 mm full scale)."""
    out.mkdir(parents=True, exist_ok=True)
    for i in range(min(count, len(d) // 2)):
        seen = b["visible"][2 * i].numpy() > 0
        grey = np.clip(d[2 * i].numpy() / 0.6 * 127 + 128, 0, 255).astype(np.uint8)
        grey[~seen] = 0
        colour = (linear_to_srgb(np.clip(b["colour"][2 * i].numpy(), 0, 1)) * 255).astype(np.uint8)[:, :, ::-1]
        cv2.imwrite(str(out / f"{name}-{i}.png"), np.hstack([colour, cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "fine_data",
                    help="trainers.fine_data's output; its heldout/ pairs are used (default runs/fine_data)")
    ap.add_argument("--pairs", type=int, default=10, help="held-out pairs (default 10)")
    ap.add_argument("--steps", type=int, default=200, help="Adam steps per setting (default 200)")
    ap.add_argument("--lr", type=float, default=0.03, help="Adam's step, mm (default 0.03)")
    ap.add_argument("--setting", action="append", default=None, metavar="S,M,T",
                    help="smoothness, magnitude and temporal weights (repeatable; default: the training "
                         "config's without and with its temporal term, and smoothness x40)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "detail_ceiling", help="map PNGs go here")
    args = ap.parse_args(argv)
    held_out = args.data / "heldout"
    if not held_out.is_dir():
        ap.error(f"no held-out pairs at {held_out} (make them: python -m trainers.fine_data --out {args.data})")
    torch.set_num_threads(os.cpu_count() or 1)
    lc = load_config(DEFAULT_CONFIG)["loss"]
    s, m, t = float(lc["smoothness"]), float(lc["magnitude"]), float(lc["temporal"])
    try:
        settings = [tuple(float(v) for v in text.split(",")) for text in args.setting] if args.setting else \
            [(s, m, 0.0), (s, m, t), (40 * s, m, 0.0)]
    except ValueError:
        ap.error("--setting takes three numbers: SMOOTHNESS,MAGNITUDE,TEMPORAL")
    if any(len(x) != 3 for x in settings):
        ap.error("--setting takes three numbers: SMOOTHNESS,MAGNITUDE,TEMPORAL")

    model = FaceModel.load()
    face_uv = FaceUV.from_model(model, 256)
    mask = torch.as_tensor(face_uv.mask)
    frames = FrameSet(read_samples(held_out, args.pairs), face_uv, model.n_vertices)
    b = frames.batch(np.arange(len(frames)), frames=2)
    none = frame_losses(torch.zeros(b["colour"].shape[:3]), b, mask, lc)["photometric"]

    rows = [("shipped FineNet", figures(predict(load_weights(WEIGHTS), b["x"]), b, mask, lc, none))]
    for smoothness, magnitude, temporal in settings:
        t0 = time.perf_counter()
        d = optimise(b, mask, lc, smoothness, magnitude, temporal, args.steps, args.lr)
        name = f"maps s={smoothness:g} m={magnitude:g} t={temporal:g}"
        rows.append((name, figures(d, b, mask, lc, none) | {"seconds": time.perf_counter() - t0}))
        save_maps(d, b, args.out, name.replace(" ", "_").replace("=", ""))
    print(f"\nissue 10: how low the photometric error goes ({len(frames)} held-out pairs, {args.steps} steps; "
          f"no detail: ratio 1, error {float(none.median()):.4f})")
    print(f"{'maps':<34} {'ratio':>7} {'flicker mm':>11} {'mean |d| mm':>12} {'rms slope mm':>13}")
    for name, f in rows:
        print(f"{name:<34} {f['ratio']:7.3f} {f['flicker_mm']:11.4f} {f['mean_abs_mm']:12.3f} {f['rms_slope_mm']:13.4f}")
    print(f"targets: ratio <= 0.80, flicker <= 0.05 mm; maps: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
