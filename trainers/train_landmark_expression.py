"""Train the landmark-expression MLP (engine.landmark_expression) on the synthetic shards.

    python -m trainers.train_landmark_expression --data runs/data/synth0 runs/data/synth2 \\
        --val runs/data/synth_val --out engine/weights/landmark_expression.npz [--steps 8000]

Reads each shard's MediaPipe landmarks on its own crop (`tracked_landmarks`, the samples MediaPipe
found; trainers.synthesis) and true expression weights; the loss is L1 (the weights are sparse: L1's
optimum is the median, 0 where the shape does not show). Then it runs CoarseNet (`--coarse-weights`,
default the shipped ONNX) on the validation shard and keeps, per shape, the MLP's reading where it was
closer to the truth there than the network's and followed it better (`use`; a left/right pair
together; never the eyes' shapes). Deterministic for a seed and the same shards (the same file,
byte for byte); about 2-3 min on 2 cores for 8000 steps. Shards synthesised again are not bit
for bit the ones before (in a new checkout, the reference shape of MediaPipe's landmarks on them
differed by up to 6e-6 of its unit radius), and a retrained MLP then differs in its weights
(though not in its validation MAE there: 0.0496 both) and may choose a shape or two differently
(mouthStretch there).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine.facemodel import FaceModel
from engine.landmark_expression import DEFAULT_WEIGHTS, FEATURE_SCALE, LandmarkExpression, aligned_shape

HIDDEN = (512, 256)
#: Shapes the MLP never takes over (stems, without _L/_R). eyeBlink: on real eyes it reads an open eye
#: as partly shut (d18: median 0.19 where the network reads 0.03), as the eye-state net does; by default
#: the lid gap pins it anyway. eyeLook*: the eye model pins the gaze.
NEVER_TAKEN = ("eyeBlink", "eyeLookDown", "eyeLookIn", "eyeLookOut", "eyeLookUp")


def tracked_samples(folders, with_images: bool = False) -> dict[str, np.ndarray]:
    """The samples of these shard folders that MediaPipe tracked: expression (B, M), landmarks (B, N, 2)
    crop px (MediaPipe's), and with_images the crop, its camera and the landmarks again for CoarseNet."""
    from trainers.train_coarse import load_shards

    fields = ("expression", "landmarks") + (("image", "K_crop") if with_images else ())
    d = load_shards(folders, fields=fields, optional=("tracked_landmarks", "tracked"))
    if "tracked" not in d:
        raise ValueError(f"{folders}: the shards have no tracked landmarks (python -m trainers.synthesis "
                         "--add-tracking DIR adds them)")
    keep = d["tracked"].astype(bool)
    out = {"expression": d["expression"][keep], "landmarks": d["tracked_landmarks"][keep]}
    if with_images:
        out.update(image=d["image"][keep], K_crop=d["K_crop"][keep])
    return out


def reference_shape(landmarks: np.ndarray) -> np.ndarray:
    """(N, 2) the mean aligned shape (two rounds: aligned to the plain mean, then to that), unit RMS."""
    ref = aligned_shape(landmarks).mean(axis=0)
    for _ in range(2):
        ref = aligned_shape(aligned_shape(landmarks, aligned_shape(ref)).mean(axis=0))
    return ref


def build_mlp(n_in: int, n_out: int) -> torch.nn.Sequential:
    layers, width = [], n_in
    for i, h in enumerate(HIDDEN):
        layers += [torch.nn.Linear(width, h), torch.nn.GELU(approximate="tanh")]
        if i == 0:
            layers.append(torch.nn.Dropout(0.1))
        width = h
    layers.append(torch.nn.Linear(width, n_out))
    return torch.nn.Sequential(*layers)


def to_regressor(mlp: torch.nn.Sequential, reference: np.ndarray, mean: np.ndarray,
                 use: np.ndarray) -> LandmarkExpression:
    """The numpy regressor with the torch MLP's weights (its Linear layers, in order)."""
    linears = [m for m in mlp if isinstance(m, torch.nn.Linear)]
    layers = [(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy()) for m in linears]
    return LandmarkExpression(reference, mean, layers, use)


def pearson_per_shape(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(M,) Pearson r over samples per shape of (B, M) arrays; 0 where either does not vary."""
    p, t = pred - pred.mean(axis=0), truth - truth.mean(axis=0)
    den = np.sqrt((p ** 2).sum(axis=0) * (t ** 2).sum(axis=0))
    return np.where(den > 1e-12, (p * t).sum(axis=0) / np.maximum(den, 1e-12), 0.0)


def choose_landmark_shapes(mlp_err, net_err, mlp_r, net_r, names) -> np.ndarray:
    """(M,) bool: the shapes the MLP takes over, where on validation it is both closer to the truth
    (MAE) and follows it better (Pearson r) than the network. An MLP that reads a shape as a constant 0
    can beat a weak network on MAE alone while losing the network's signal (browInnerUp, pucker).
    A left/right pair (names ending _L/_R) is decided together, on the pair's sums. The eyes' shapes
    (NEVER_TAKEN) stay the network's."""
    stems = [n[:-2] if n.endswith(("_L", "_R")) else n for n in names]
    use = np.zeros(len(names), bool)
    for stem in set(stems) - set(NEVER_TAKEN):
        ids = [i for i, s in enumerate(stems) if s == stem]
        use[ids] = mlp_err[ids].sum() < net_err[ids].sum() and mlp_r[ids].sum() > net_r[ids].sum()
    return use


def network_expression(images: np.ndarray, K_crop: np.ndarray, landmarks: np.ndarray,
                       weights: Path | None) -> np.ndarray:
    """CoarseNet's (B, M) expression weights in [0, 1] on crops, fed their tracked landmarks."""
    from engine.coarse_fitting import open_runtime, runtime_for

    runtime = open_runtime(runtime_for(weights), weights)
    out = [runtime.run(images[i:i + 256], K_crop[i:i + 256], landmarks[i:i + 256])["expression"]
           for i in range(0, len(images), 256)]
    return np.clip(np.concatenate(out), 0.0, 1.0)


def train(data, val, out: Path, steps: int = 8000, batch: int = 256, lr: float = 1e-3, seed: int = 0,
          threads: int = 2, coarse_weights: Path | None = None, progress: bool = True,
          jitter: float = 0.002) -> dict:
    """Train, choose each shape's source on `val`, write `out`; returns the validation figures.
    jitter: std of the Gaussian noise added to the aligned points (unit RMS radius), the tracker's."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    tr = tracked_samples(data)
    ref = reference_shape(tr["landmarks"])
    mean = aligned_shape(tr["landmarks"], ref).mean(axis=0)
    regressor = LandmarkExpression(ref, mean, [], np.zeros(tr["expression"].shape[1], bool))
    X = torch.from_numpy(regressor.features(tr["landmarks"]))
    Y = torch.from_numpy(tr["expression"].astype(np.float32))
    mlp = build_mlp(X.shape[1], Y.shape[1])
    opt = torch.optim.AdamW(mlp.parameters(), lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    noise = jitter * FEATURE_SCALE
    bar = range(steps)
    if progress:
        from tqdm import tqdm
        bar = tqdm(bar, desc="landmark expression", unit="step")
    t0 = time.perf_counter()
    for _ in bar:
        idx = torch.randint(0, len(X), (batch,), generator=gen)
        x = X[idx] + noise * torch.randn(X[idx].shape, generator=gen)
        loss = (mlp(x) - Y[idx]).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    mlp.eval()

    va = tracked_samples(val, with_images=True)
    regressor = to_regressor(mlp, ref, mean, np.zeros(Y.shape[1], bool))
    truth = va["expression"]
    read = regressor.predict(va["landmarks"])
    net = network_expression(va["image"], va["K_crop"], va["landmarks"], coarse_weights)
    mlp_err, net_err = np.abs(read - truth).mean(axis=0), np.abs(net - truth).mean(axis=0)
    regressor.use = choose_landmark_shapes(mlp_err, net_err, pearson_per_shape(read, truth),
                                           pearson_per_shape(net, truth), FaceModel.load().expression_names)
    out.parent.mkdir(parents=True, exist_ok=True)
    regressor.save(out)
    merged = np.where(regressor.use, mlp_err, net_err)
    return {"train_s": time.perf_counter() - t0, "samples": len(X), "val_samples": len(truth),
            "val_mae": {"landmarks": float(mlp_err.mean()), "network": float(net_err.mean()),
                        "merged": float(merged.mean()), "zeros": float(np.abs(truth).mean())},
            "shapes_from_landmarks": int(regressor.use.sum())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, nargs="+", required=True, help="trainers.synthesis shard folders")
    ap.add_argument("--val", type=Path, required=True, help="validation shard folder (chooses each shape's source)")
    ap.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--coarse-weights", type=Path, default=None, help="CoarseNet to compare with (default: shipped)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.steps <= 0:
        ap.error("--steps must be > 0")
    for folder in [*args.data, args.val]:
        if not folder.is_dir():
            print(f"train landmark expression: no shard folder {folder}", file=sys.stderr)
            return 1
    try:
        res = train(args.data, args.val, args.out, args.steps, seed=args.seed, threads=args.threads,
                    coarse_weights=args.coarse_weights, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as exc:
        print(f"train landmark expression: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    v = res["val_mae"]
    print(f"{res['samples']} tracked samples, {res['train_s']:.0f} s; validation ({res['val_samples']}) "
          f"expression MAE: landmarks {v['landmarks']:.4f}, network {v['network']:.4f}, merged {v['merged']:.4f}, "
          f"zeros {v['zeros']:.4f}; {res['shapes_from_landmarks']} shapes from the landmarks -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
