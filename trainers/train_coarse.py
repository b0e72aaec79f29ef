"""Train CoarseNet on synthetic faces (seed 002, supervised stage).

    python -m trainers.train_coarse --config trainers/configs/coarse.toml --out RUN_DIR \\
        [--data SHARD_DIR] [--steps N] [--workers 2] [--depth-weight W] [--resume] [--device auto|cpu|cuda]

The net, its batches and the synthetic losses run on an NVIDIA GPU when torch can use one (--device
auto, the default; engine.device.torch_device), else on the CPU; the data is made on the CPU, the
weights are written from it. The [real] and [depth] terms render with the CPU rasterizer, so runs
with them train on the CPU. (Never run on a GPU yet: tests/test_train_coarse.py runs a step on torch's
"meta" device, which catches most tensors left on the CPU, and compares a CUDA run with the CPU's
where there is a GPU.)

Data: shards written once by `python -m trainers.synthesis --count N --out DIR` (fast: the
run only decodes arrays), or, without --data, samples synthesized on the fly by DataLoader
workers (sample index = step · batch + j, so a run never repeats a sample).
Batches are a pure function of the step (a per-epoch permutation seeded by (seed, epoch)),
so --resume from RUN_DIR/checkpoint.pt continues exactly where the run stopped.

Validation: `val_count` synthetic samples with their own seed (`val_seed`, distinct from the
training seed), read from `val_data` shards or synthesized once and cached in RUN_DIR/val.npz;
every `val_every` steps it prints the face-region vertex error (mm, all 9409 FACE vertices,
camera space), the expression MAE and the rotation error (deg).

Real frames (optional, config [real], off unless real.dir is set): pairs of consecutive real
video frames (`python -m trainers.real_frames --out DIR`: DIR/train and DIR/heldout) are added
to every step: `real.batch_size` pairs go through the same forward pass as the synthetic batch
and seed 002's self-supervised terms (trainers.selfsup: landmarks, photometric, E_flow, E_same,
priors), weighted by the [real] weights, are added to the synthetic supervised loss (which keeps
running unless real.synthetic = false). Pair batches are a pure function of the step too, so
resume stays exact. The terms are logged as real_<term>; held-out pairs (DIR/heldout, videos
never trained on) are scored by `evaluate_real` at every validation (records "val_real").

Depth (optional, config [depth], off unless depth.weight > 0; issue 11's E_geo): each synthetic
sample's true front face is rendered into its crop as a depth camera would measure it
(trainers.rgbd: Kinect-like noise, quantisation, projector shadows, holes on dark surfaces), and
trainers.selfsup.depth_loss (the predicted mesh's rendered depth against it, Huber, cm) is added
with that weight (logged as "depth"). The noise is a pure function of (depth.seed, step).

Outputs in RUN_DIR: checkpoint.pt (every `checkpoint_every` steps, written atomically),
metrics.jsonl (train terms every `log_every` steps, validation records), and at the end
coarsenet.pt (engine.coarsenet.save_weights) and coarsenet.onnx (engine.runtime.export_onnx).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import torch

from engine.coarsenet import CoarseNet, CoarseNetConfig, decode, normalise_landmarks, preprocess, save_weights
from engine.correspondence import LandmarkCorrespondence
from engine.crop import unknown_landmarks_px
from engine.device import torch_device
from engine.facemodel import FACE_VERTICES, FaceModel
from trainers.losses import (DEFAULT_OPTIONS, DEFAULT_WEIGHTS, EXPRESSION_LOSSES, LossGeometry, coarse_loss,
                             rotation_angle)
from trainers.rgbd import sensor_depth_batch
from trainers.selfsup import DEFAULT_REAL_WEIGHTS, SelfSupGeometry, depth_loss, pair_tensors, selfsup_loss

#: The sample fields training reads (the rest of a shard is left on disk).
FIELDS = ("image", "identity", "expression", "rotation", "translation_cm", "K_crop", "landmarks",
          "landmark_visible", "sh", "skin_rgb")
#: Fields read when a shard has them: MediaPipe's landmarks on the sample's own crop (what the net
#: reads at run time) and whether MediaPipe found the face (trainers.synthesis.track_crop).
OPTIONAL_FIELDS = ("tracked_landmarks", "tracked")

DEFAULT_CONFIG: dict = {
    "model": {},                       # CoarseNetConfig fields (input_size, width, last_channels, ...)
    "train": {
        "steps": 20000, "batch_size": 32, "lr": 2e-3, "weight_decay": 1e-4, "warmup_steps": 500,
        "schedule": "cosine",          # "cosine" (to min_lr_ratio · lr) or "step" (× 0.1 at step_at fractions)
        "min_lr_ratio": 0.01, "step_at": [0.6, 0.85], "grad_clip": 5.0, "seed": 0,
        "noise_std": 0.02,             # Gaussian pixel noise augmentation, normalised units ([-1, 1] range)
        "landmark_noise_px": 1.0,      # Gaussian noise on the true landmarks fed where none were tracked
        "landmark_dropout": 0.0,       # share of tracked samples fed no landmarks (engine.crop.unknown_landmarks_px)
        "landmark_dropout_untracked": 0.0,  # the same for samples MediaPipe did not track (profiles, mostly)
        "threads": 2, "log_every": 20, "val_every": 500, "checkpoint_every": 500,
        "init": None,                  # a coarsenet.pt to start from (fine-tuning stage); None: random
    },
    "data": {
        "dir": None,                   # shards of trainers.synthesis (a folder or a list); None: on the fly
        "workers": 2, "seed": 0,       # on-the-fly synthesis seed (SyntheticFaces seed)
        "real_backgrounds": True,
        "val_dir": None, "val_count": 256, "val_seed": 1, "val_batch": 64,
    },
    "loss": dict(DEFAULT_WEIGHTS, **DEFAULT_OPTIONS),   # term weights + options (expression_loss)
    "real": {                          # self-supervised real-frame pairs (trainers.real_frames, trainers.selfsup)
        "dir": None,                   # pair folder with train/ and heldout/ (or shards directly); None: off
        "batch_size": 4,               # pairs per step (2 frames each), alongside the synthetic batch
        "synthetic": True,             # keep the synthetic supervised loss running (mixed batches)
        "render_px": 64,               # photometric render and flow visibility resolution, px
        "val_count": 256,              # held-out pairs scored by evaluate_real at each validation (0: none)
        "seed": 0,                     # pair batch permutation seed
        **DEFAULT_REAL_WEIGHTS,        # term weights (0 = off): landmark, photo, flow, same, prior
    },
    "depth": {                         # E_geo on the synthetic batch against a simulated depth camera
        "weight": 0.0,                 # 0 = off
        "seed": 0,                     # noise stream: default_rng((seed, step))
        "background_mm": 1500.0,       # the wall behind the face in the simulated depth
    },
}


# ---------------------------------------------------------------- config


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class ConfigError(ValueError):
    """A training config or option that cannot work; the message is one line."""


#: Config numbers that must be finite and > 0 (section, key); "workers" may be 0 (in-process).
POSITIVE_SETTINGS = (("train", "steps"), ("train", "batch_size"), ("train", "lr"), ("train", "threads"),
                     ("train", "log_every"), ("train", "val_every"), ("train", "checkpoint_every"),
                     ("data", "val_batch"), ("real", "batch_size"), ("real", "render_px"))


def _check_numbers(cfg: dict) -> None:
    for section, key in POSITIVE_SETTINGS:
        value = cfg[section][key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ConfigError(f"[{section}] {key} must be a number > 0, got {value!r}")
    workers = cfg["data"]["workers"]
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"[data] workers must be a whole number >= 0, got {workers!r}")
    for key in ("landmark_dropout", "landmark_dropout_untracked"):
        value = cfg["train"][key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"[train] {key} must be a share in [0, 1], got {value!r}")


def load_config(config: str | Path | dict | None) -> dict:
    """A TOML/JSON path or a dict, merged over DEFAULT_CONFIG (unknown loss terms, and counts,
    sizes and rates that are not > 0, are a ConfigError)."""
    if config is None:
        user = {}
    elif isinstance(config, dict):
        user = config
    else:
        path = Path(config)
        user = json.loads(path.read_text()) if path.suffix == ".json" else tomllib.loads(path.read_text())
    cfg = _merge(DEFAULT_CONFIG, user)
    unknown = set(cfg["loss"]) - set(DEFAULT_WEIGHTS) - set(DEFAULT_OPTIONS)
    if unknown:
        raise ConfigError(f"unknown loss terms in config: {sorted(unknown)}")
    if cfg["loss"]["expression_loss"] not in EXPRESSION_LOSSES:
        raise ConfigError(f"unknown expression_loss {cfg['loss']['expression_loss']!r} (one of {EXPRESSION_LOSSES})")
    for section in ("real", "depth"):
        unknown = set(cfg[section]) - set(DEFAULT_CONFIG[section])
        if unknown:
            raise ConfigError(f"unknown [{section}] keys in config: {sorted(unknown)}")
    weight = cfg["depth"]["weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight) and weight >= 0):
        raise ConfigError(f"[depth] weight must be a number >= 0, got {weight!r}")
    if weight and batches_are_real_only(cfg):
        raise ConfigError("[depth] weight needs the synthetic batch (real.synthetic = false reads none)")
    _check_numbers(cfg)
    return cfg


def net_config(cfg: dict) -> CoarseNetConfig:
    return CoarseNetConfig(**cfg["model"])


# ---------------------------------------------------------------- data


def load_shards(directory: str | Path | list, fields=FIELDS, limit: int | None = None,
                optional=OPTIONAL_FIELDS) -> dict[str, np.ndarray]:
    """All shard-*.npz of a trainers.synthesis folder (or a list of folders, in order) -> dict of
    (N, ...) arrays (only `fields`, plus those of `optional` that every shard has)."""
    folders = [directory] if isinstance(directory, (str, Path)) else list(directory)
    paths = [p for folder in folders for p in sorted(Path(folder).glob("shard-*.npz"))]
    if not paths:
        raise FileNotFoundError(f"no shard-*.npz in {directory} (write them with python -m trainers.synthesis)")
    for p in paths:
        with np.load(p) as d:
            optional = tuple(k for k in optional if k in d.files)
    fields = tuple(fields) + optional
    parts: dict[str, list] = {k: [] for k in fields}
    n = 0
    for p in paths:
        with np.load(p) as d:
            for k in fields:
                parts[k].append(d[k])
            n += len(d[fields[0]])
        if limit is not None and n >= limit:
            break
    out = {k: np.concatenate(v) for k, v in parts.items()}
    return {k: v[:limit] for k, v in out.items()} if limit is not None else out


class ShardBatches:
    """Batch of step s from in-memory arrays: epoch e = s // per_epoch uses permutation(seed, e)."""

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int):
        self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
        self.n = len(arrays["image"])
        if self.n < batch_size:
            raise ValueError(f"{self.n} samples cannot fill a batch of {batch_size}")
        self.per_epoch = self.n // batch_size
        self._perm = (None, None)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        epoch, k = divmod(step, self.per_epoch)
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        idx = np.sort(self._perm[1][k * self.batch_size:(k + 1) * self.batch_size])
        return {f: a[idx] for f, a in self.arrays.items()}


class _SynthStepDataset(torch.utils.data.Dataset):
    """Item s = the stacked samples s · B ... s · B + B − 1 of SyntheticFaces(seed)."""

    def __init__(self, batch_size: int, seed: int, out_px: int, real_backgrounds: bool, steps: int):
        self.batch_size, self.seed, self.out_px, self.real_backgrounds = batch_size, seed, out_px, real_backgrounds
        self.steps = steps
        self.ds = None

    def __len__(self):
        return self.steps

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        from trainers.synthesis import SyntheticFaces

        if self.ds is None:   # built in the worker, so the model is loaded there and not pickled
            self.ds = SyntheticFaces(1 << 40, seed=self.seed, out_px=self.out_px,
                                     real_backgrounds=self.real_backgrounds)
        samples = [self.ds[step * self.batch_size + j] for j in range(self.batch_size)]
        return {f: np.stack([np.asarray(s[f]) for s in samples]) for f in FIELDS}


def synthetic_batches(batch_size: int, seed: int, out_px: int, real_backgrounds: bool, start: int, steps: int,
                      workers: int):
    """Iterator of the batches of steps start ... steps − 1, synthesized by `workers` processes."""
    ds = _SynthStepDataset(batch_size, seed, out_px, real_backgrounds, steps)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, sampler=range(start, steps), num_workers=workers,
                                         prefetch_factor=2 if workers else None,
                                         persistent_workers=False, collate_fn=lambda b: b)
    return iter(loader)


def synthesize_arrays(count: int, seed: int, out_px: int, real_backgrounds: bool) -> dict[str, np.ndarray]:
    """`count` SyntheticFaces(seed) samples in this process, stacked (FIELDS only)."""
    from trainers.synthesis import SyntheticFaces

    ds = SyntheticFaces(count, seed=seed, out_px=out_px, real_backgrounds=real_backgrounds)
    samples = [ds[i] for i in range(count)]
    return {f: np.stack([np.asarray(s[f]) for s in samples]) for f in FIELDS}


def input_landmarks(batch: dict[str, torch.Tensor], input_size: int, noise_px: float = 0.0,
                    generator: torch.Generator | None = None, dropout: float = 0.0,
                    dropout_untracked: float = 0.0) -> torch.Tensor:
    """(B, 478, 2) normalised landmarks the net reads: MediaPipe's on the crop where it found the
    face (the run-time input), else the true ones plus `noise_px` Gaussian noise (crop px).

    dropout / dropout_untracked: the share of tracked / untracked samples given no landmarks at all
    (engine.crop.unknown_landmarks_px: every point at the crop centre), so the net learns to
    read the face from the picture alone where the run time has no landmarks (a face turned to
    profile that MediaPipe lost)."""
    lm = batch["landmarks"]
    if noise_px > 0:   # drawn on the CPU (where a generator lives), then moved: the same numbers on any device
        lm = lm + (noise_px * torch.randn(lm.shape, generator=generator, dtype=lm.dtype)).to(lm.device)
    tracked = torch.zeros(len(lm), dtype=torch.bool, device=lm.device)
    if "tracked_landmarks" in batch:
        tracked = batch["tracked"].reshape(-1)
        lm = torch.where(tracked.reshape(-1, 1, 1), batch["tracked_landmarks"], lm)
    if dropout > 0 or dropout_untracked > 0:
        p = torch.where(tracked, float(dropout), float(dropout_untracked))
        drop = torch.rand(len(lm), generator=generator).to(lm.device) < p
        unknown = torch.from_numpy(unknown_landmarks_px(lm.shape[1], input_size)).to(lm.device, lm.dtype)
        lm = torch.where(drop.reshape(-1, 1, 1), unknown.expand_as(lm), lm)
    return normalise_landmarks(lm, input_size)


def batches_are_real_only(cfg: dict) -> bool:
    return bool(cfg["real"]["dir"]) and not cfg["real"]["synthetic"]


def needs_cpu(cfg: dict) -> bool:
    """Whether the run has terms our CPU rasterizer renders ([real], [depth]): it trains on the CPU."""
    return bool(cfg["real"]["dir"]) or bool(float(cfg["depth"]["weight"]))


def synthetic_depth_loss(pred: dict, batch: dict[str, torch.Tensor], images_rgb: np.ndarray, geometry,
                         size_px: int, rng: np.random.Generator, background_mm: float = 1500.0) -> torch.Tensor:
    """E_geo on synthetic samples: the predicted front face (geometry: trainers.selfsup.SelfSupGeometry)
    against the depth a Kinect-like camera would measure of the true one in the same crop
    (trainers.rgbd.sensor_depth_batch). images_rgb (B, S, S, 3) uint8, the crops themselves."""
    n_id = pred["identity"].shape[1]
    expression = pred.get("expression_linear", pred["expression"])
    with torch.no_grad():
        v_true, _ = geometry.camera_points(batch["identity"][:, :n_id], batch["expression"], batch["rotation"],
                                           batch["translation_cm"])
    triangles = geometry.triangles.numpy()
    sensor = sensor_depth_batch(v_true.numpy(), triangles, batch["K_crop"].numpy(), size_px, images_rgb, rng,
                                background_mm)
    v_pred, _ = geometry.camera_points(pred["identity"], expression, pred["rotation"], pred["translation"])
    return depth_loss(v_pred, geometry.triangles, torch.from_numpy(sensor.astype(np.float32)), batch["K_crop"])


def to_tensors(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """numpy batch -> torch: float32 labels, bool visibility, the image as the net's input (B, 3, S, S)."""
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        if k == "image":
            out[k] = preprocess(t)
        elif k in ("landmark_visible", "tracked"):
            out[k] = t.bool()
        else:
            out[k] = t.float()
    return out


class PairBatches:
    """Real pair batch of step s (trainers.real_frames fields): epoch e = s // per_epoch uses
    permutation((seed, e, 1)), a stream of its own beside the synthetic batches'."""

    def __init__(self, pairs: dict[str, np.ndarray], batch_size: int, seed: int):
        self.pairs, self.batch_size, self.seed = pairs, batch_size, seed
        self.n = len(pairs["crops"])
        if self.n < batch_size:
            raise ValueError(f"{self.n} real pairs cannot fill a batch of {batch_size}")
        self.per_epoch = self.n // batch_size
        self._perm = (None, None)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        epoch, k = divmod(step, self.per_epoch)
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch, 1]).permutation(self.n))
        idx = np.sort(self._perm[1][k * self.batch_size:(k + 1) * self.batch_size])
        return {f: a[idx] for f, a in self.pairs.items()}


def load_real_pairs(directory: str | Path, split: str, limit: int | None = None) -> dict[str, np.ndarray] | None:
    """The pairs of DIR/split (trainers.real_frames), or of DIR itself for split "train" when it holds
    shards directly; None when there are none. Pair groups (E_same) come from the video names."""
    from trainers.real_frames import load_pairs, video_groups

    d = Path(directory)
    folder = d / split if (d / split).is_dir() else (d if split == "train" else None)
    if folder is None or not any(folder.glob("shard-*.npz")):
        return None
    pairs = load_pairs(folder, limit)
    pairs["group"] = video_groups(pairs["video"])
    return pairs


@torch.no_grad()
def evaluate_real(net: CoarseNet, pairs: dict[str, np.ndarray], geometry=None, batch: int = 32,
                  render_px: int = 64) -> dict[str, float]:
    """Agreement with real frames the net never saw labels for (held-out pairs, trainers.real_frames):
    landmark_px, the mean crop-px distance between the projected model landmarks and MediaPipe's
    (the 468 non-iris points, both frames of each pair), landmark_iod, the same per frame divided by
    MediaPipe's inter-ocular distance (outer eye corners 33 and 263), flow_px, the mean distance between
    the predicted vertex motion a -> b and the optical flow over the visible flow vertices, and
    flow_zero_px, that residual for a prediction that does not move (the flow's own size, for scale).
    geometry: a trainers.selfsup.SelfSupGeometry (built from the default model when None). Eval mode."""
    from trainers.selfsup import SelfSupGeometry, flow_visibility, pair_tensors, sample_flow
    from trainers.losses import project_points

    if geometry is None:
        geometry = SelfSupGeometry(FaceModel.load(), LandmarkCorrespondence.load())
    was = net.training
    net.eval()
    S = net.config.input_size
    keep = torch.ones(geometry.landmark_weight.shape[0], dtype=torch.bool)
    keep[geometry.landmark_weight == 0] = False                        # the iris points
    sums = {"landmark_px": 0.0, "landmark_iod": 0.0, "flow_px": 0.0, "flow_zero_px": 0.0}
    n_frames = n_pairs = 0
    P = len(pairs["crops"])
    for i in range(0, P, batch):
        b = pair_tensors({k: v[i:i + batch] for k, v in pairs.items()})
        params = net(b["image"], normalise_landmarks(b["landmarks"], S))
        pred = decode(params, b["K_crop"], net.config)
        verts, points = geometry.camera_points(pred["identity"], pred["expression"], pred["rotation"],
                                               pred["translation"])
        d = (project_points(points, b["K_crop"]) - b["landmarks"]).norm(dim=-1)[:, keep].mean(-1)   # (2B,)
        iod = (b["landmarks"][:, 33] - b["landmarks"][:, 263]).norm(dim=-1).clamp_min(1.0)
        sums["landmark_px"] += d.sum().item()
        sums["landmark_iod"] += (d / iod).sum().item()
        n_frames += len(d)
        idx = geometry.flow_index
        va, vb = verts[0::2][:, idx], verts[1::2][:, idx]
        vis = flow_visibility(verts[0::2], geometry.triangles, b["K_pair"], S, idx, raster_px=render_px)
        pa = project_points(va, b["K_pair"])
        flow = sample_flow(b["flow"], pa)
        w = vis.float()
        cnt = w.sum(-1).clamp_min(1.0)
        residual = ((project_points(vb, b["K_pair"]) - pa) - flow).norm(dim=-1)
        sums["flow_px"] += ((residual * w).sum(-1) / cnt).sum().item()
        sums["flow_zero_px"] += ((flow.norm(dim=-1) * w).sum(-1) / cnt).sum().item()
        n_pairs += len(va)
    net.train(was)
    out = {k: v / max(n_frames if k.startswith("landmark") else n_pairs, 1) for k, v in sums.items()}
    out["pairs"] = P
    return out


# ---------------------------------------------------------------- schedule, checkpoints


def lr_factor(step: int, tc: dict) -> float:
    """Multiplier of the base lr at `step`: linear warm-up, then cosine or step decay."""
    total, warm = int(tc["steps"]), int(tc["warmup_steps"])
    if warm and step < warm:
        return (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    if tc["schedule"] == "cosine":
        lo = float(tc["min_lr_ratio"])
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
    if tc["schedule"] == "step":
        return 0.1 ** sum(step >= f * total for f in tc["step_at"])
    raise ValueError(f"unknown schedule {tc['schedule']!r} (cosine or step)")


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def save_checkpoint(path: Path, net, opt, sched, step: int, cfg: dict) -> None:
    """Everything --resume needs, written to a temporary file and renamed (never half a file)."""
    tmp = path.with_suffix(".tmp")
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "step": step, "rng": _rng_state(), "config": cfg}, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------- evaluation


def face_region_arrays(face_model: FaceModel) -> dict[str, torch.Tensor]:
    """The model restricted to the FACE region (neutral, identity_modes, expression_modes), for `evaluate`."""
    face = slice(FACE_VERTICES.start, FACE_VERTICES.stop)
    return {"neutral": torch.as_tensor(face_model.neutral[face]),
            "identity_modes": torch.as_tensor(face_model.identity_modes[:, face]),
            "expression_modes": torch.as_tensor(face_model.expression_modes[:, face])}


@torch.no_grad()
def evaluate(net: CoarseNet, val: dict[str, np.ndarray], model_arrays: dict, batch: int = 64,
             device: str = "cpu") -> dict[str, float]:
    """Validation figures over all of `val` (model_arrays: `face_region_arrays`, on device, the net's):
    vertex_mm (mean Euclidean distance over the FACE region's camera-space vertices), expression_mae,
    rotation_deg (mean geodesic); per-sample means, averaged. Runs in eval mode."""
    from engine.facemodel import model_vertices_torch

    was = net.training
    net.eval()
    n = len(val["image"])
    sums = {"vertex_mm": 0.0, "expression_mae": 0.0, "rotation_deg": 0.0}
    for i in range(0, n, batch):
        b = {k: t.to(device) for k, t in to_tensors({k: v[i:i + batch] for k, v in val.items()}).items()}
        pred = decode(net(b["image"], input_landmarks(b, net.config.input_size)), b["K_crop"], net.config)
        k = pred["identity"].shape[1]

        def cam(identity, expression, R, t):
            v = model_vertices_torch(model_arrays["neutral"], model_arrays["identity_modes"],
                                     model_arrays["expression_modes"], identity, expression)
            return torch.einsum("bij,bnj->bni", R, v) + t.unsqueeze(1)

        vp = cam(pred["identity"], pred["expression"], pred["rotation"], pred["translation"])
        vt = cam(b["identity"][:, :k], b["expression"], b["rotation"], b["translation_cm"])
        sums["vertex_mm"] += 10.0 * (vp - vt).norm(dim=-1).mean(-1).sum().item()
        sums["expression_mae"] += (pred["expression"] - b["expression"]).abs().mean(-1).sum().item()
        sums["rotation_deg"] += torch.rad2deg(rotation_angle(pred["rotation"], b["rotation"])).sum().item()
    net.train(was)
    return {k: v / n for k, v in sums.items()}


# ---------------------------------------------------------------- training


def train(config: str | Path | dict | None, out_dir: str | Path, resume: bool = False, progress: bool = True,
          face_model: FaceModel | None = None, correspondence: LandmarkCorrespondence | None = None,
          export: bool = True, device: str = "cpu") -> dict:
    """Run (or with resume=True continue) a training run into out_dir; returns a summary dict
    {step, loss (last training loss), val (last validation figures), steps_per_s}. device: torch's
    ("cpu", "cuda"; engine.device.torch_device chooses), where the net, its batches and the synthetic
    losses live; the real-frame and E_geo terms render with the CPU rasterizer, so they train on the CPU."""
    cfg = load_config(config)
    tc, dc = cfg["train"], cfg["data"]
    if device != "cpu" and needs_cpu(cfg):
        raise ConfigError("the [real] and [depth] terms render with the CPU rasterizer: train them with --device cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(tc["threads"]))
    ncfg = net_config(cfg)
    S = ncfg.input_size

    face_model = face_model or FaceModel.load()
    correspondence = correspondence or LandmarkCorrespondence.load()
    geometry = LossGeometry(face_model, correspondence).to(device)
    val_arrays = {k: v.to(device) for k, v in face_region_arrays(face_model).items()}

    # fresh runs seed everything; resumed runs restore the RNG states below
    seed = int(tc["seed"])
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    net = CoarseNet(ncfg)
    if tc["init"] and not resume:
        from engine.coarsenet import load_weights

        start = load_weights(tc["init"])
        if start.config != ncfg:
            raise ValueError(f"init weights {tc['init']} have another architecture than [model] asks for")
        net.load_state_dict(start.state_dict())
    net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=float(tc["lr"]), weight_decay=float(tc["weight_decay"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, tc))
    step = 0
    ckpt_path = out / "checkpoint.pt"
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)   # our own file (numpy RNG state)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step = int(ck["step"])
        _set_rng_state(ck["rng"])

    # validation set: shards, or synthesized once with its own seed and cached
    val = None
    if dc["val_count"]:
        cache = out / "val.npz"
        if dc["val_dir"]:
            val = load_shards(dc["val_dir"], limit=int(dc["val_count"]))
        elif cache.is_file():
            with np.load(cache) as d:
                val = {k: d[k] for k in FIELDS + OPTIONAL_FIELDS if k in d.files}
        else:
            if int(dc["val_seed"]) == int(dc["seed"]) and not dc["dir"]:
                raise ValueError("val_seed must differ from the training seed")
            val = synthesize_arrays(int(dc["val_count"]), int(dc["val_seed"]), S, bool(dc["real_backgrounds"]))
            np.savez(cache, **val)

    total = int(tc["steps"])
    B = int(tc["batch_size"])
    rc = cfg["real"]
    real_source = real_val = selfsup_geometry = None
    real_weights = {k: float(rc[k]) for k in DEFAULT_REAL_WEIGHTS}
    if rc["dir"]:
        real_pairs = load_real_pairs(rc["dir"], "train")
        if real_pairs is None:
            raise FileNotFoundError(f"real.dir: no pairs in {rc['dir']} (python -m trainers.real_frames --out DIR)")
        if real_pairs["crops"].shape[2] != S:
            raise ValueError(f"real pairs are {real_pairs['crops'].shape[2]} px crops; the net reads {S} px "
                             "(build them with python -m trainers.real_frames --out-px)")
        real_source = PairBatches(real_pairs, int(rc["batch_size"]), int(rc["seed"]))
        if int(rc["val_count"]):
            real_val = load_real_pairs(rc["dir"], "heldout", int(rc["val_count"]))
    depth_weight = float(cfg["depth"]["weight"])
    if rc["dir"] or depth_weight:    # the front-face geometry of the real terms and of E_geo
        selfsup_geometry = SelfSupGeometry(face_model, correspondence, n_identity=ncfg.n_identity)
    if batches_are_real_only(cfg):
        batches = (None for _ in range(step, total))     # real pairs only: no synthetic data is read
    elif dc["dir"]:
        source = ShardBatches(load_shards(dc["dir"]), B, seed)
        batches = (source(s) for s in range(step, total))
    else:
        batches = synthetic_batches(B, int(dc["seed"]), S, bool(dc["real_backgrounds"]), step, total,
                                    int(dc["workers"]))

    metrics = open(out / "metrics.jsonl", "a")

    def log(record: dict) -> None:
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()

    def validate(at: int) -> dict | None:
        if real_val is not None:
            real_figures = evaluate_real(net, real_val, selfsup_geometry, int(dc["val_batch"]), int(rc["render_px"]))
            log({"step": at, "val_real": real_figures})
            (tqdm.write if progress else print)(
                f"step {at}: held-out real landmarks {real_figures['landmark_px']:.2f} px "
                f"({100 * real_figures['landmark_iod']:.2f}% IOD), flow residual {real_figures['flow_px']:.2f} px "
                f"(no motion: {real_figures['flow_zero_px']:.2f} px)")
        if val is None:
            return None
        figures = evaluate(net, val, val_arrays, int(dc["val_batch"]), device)
        log({"step": at, "val": figures})
        msg = (f"step {at}: val vertex {figures['vertex_mm']:.2f} mm, expression MAE "
               f"{figures['expression_mae']:.4f}, rotation {figures['rotation_deg']:.2f} deg")
        (tqdm.write if progress else print)(msg)
        return figures

    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, desc="train coarse", unit="step", disable=not progress,
               dynamic_ncols=True)
    last_val = validate(step) if step == 0 else None
    net.train()
    loss_value, t0, step0 = float("nan"), time.perf_counter(), step
    noise = float(tc["noise_std"])
    try:
        for batch in batches:
            loss, terms = 0.0, {}
            xs, lms = [], []
            if batch is not None:
                b = {k: v.to(device) for k, v in to_tensors(batch).items()}
                x = b["image"]
                if noise > 0:
                    x = x + noise * torch.randn(x.shape, dtype=x.dtype).to(x.device)  # the CPU's RNG on any device
                xs.append(x)
                lms.append(input_landmarks(b, S, float(tc["landmark_noise_px"]), dropout=float(tc["landmark_dropout"]),
                                           dropout_untracked=float(tc["landmark_dropout_untracked"])))
            if real_source is not None:
                rb = pair_tensors(real_source(step))
                xr = rb["image"]
                if noise > 0:
                    xr = xr + noise * torch.randn(xr.shape, dtype=xr.dtype).to(xr.device)
                xs.append(xr)
                lms.append(normalise_landmarks(rb["landmarks"], S))
            # one forward pass over synthetic and real crops: BatchNorm sees the mixture
            params = net(torch.cat(xs), torch.cat(lms)) if len(xs) > 1 else net(xs[0], lms[0])
            n_syn = len(xs[0]) if batch is not None else 0
            if batch is not None:
                pred = decode(params[:n_syn], b["K_crop"], ncfg)
                loss, terms = coarse_loss(pred, b, geometry, ncfg, cfg["loss"])
                if depth_weight:
                    terms["depth"] = synthetic_depth_loss(pred, b, batch["image"], selfsup_geometry, S,
                                                          np.random.default_rng((int(cfg["depth"]["seed"]), step)),
                                                          float(cfg["depth"]["background_mm"]))
                    loss = loss + depth_weight * terms["depth"]
                    terms["depth"] = terms["depth"].detach()
            if real_source is not None:
                pred_real = decode(params[n_syn:], rb["K_crop"], ncfg)
                real_loss, real_terms = selfsup_loss(pred_real, rb, selfsup_geometry, real_weights,
                                                     int(rc["render_px"]))
                loss = loss + real_loss
                terms.update({f"real_{k}": v for k, v in real_terms.items()})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(net.parameters(), float(tc["grad_clip"]))
            opt.step()
            sched.step()
            step += 1
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at step {step}")
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", vert=f"{terms.get('vertex', torch.nan):.1f}mm")
            if step % int(tc["log_every"]) == 0 or step == total:
                log({"step": step, "loss": loss_value, "lr": sched.get_last_lr()[0],
                     **{k: v.item() for k, v in terms.items()}})
            if step % int(tc["val_every"]) == 0 and step != total:
                last_val = validate(step)
            if step % int(tc["checkpoint_every"]) == 0 or step == total:
                save_checkpoint(ckpt_path, net, opt, sched, step, cfg)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    if step == total and step > step0:
        last_val = validate(step)
    metrics.close()
    if export:
        net.eval().cpu()
        save_weights(net, out / "coarsenet.pt")
        from engine.runtime import export_onnx

        export_onnx(net, out / "coarsenet.onnx")
    rate = (step - step0) / elapsed if elapsed > 0 else float("nan")
    return {"step": step, "loss": loss_value, "val": last_val, "steps_per_s": rate}


def main(argv=None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=Path(__file__).resolve().parent / "configs" / "coarse.toml",
                    help="TOML or JSON config (default trainers/configs/coarse.toml)")
    ap.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, metrics, weights, ONNX")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    ap.add_argument("--steps", type=int, help="total steps (overrides the config; also the schedule's length)")
    ap.add_argument("--data", type=Path, help="folder of trainers.synthesis shards (default: synthesize on the fly)")
    ap.add_argument("--val-data", type=Path, help="folder of validation shards (distinct seed from --data)")
    ap.add_argument("--workers", type=int, help="on-the-fly synthesis processes")
    ap.add_argument("--depth-weight", type=float, help="[depth] weight: E_geo against a simulated depth camera (0 = off)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto (default) and cuda train on an NVIDIA GPU when torch can use one, else the CPU; "
                    "one line says which (the [real] and [depth] terms need the CPU)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.steps is not None and args.steps <= 0:
        raise ConfigError(f"--steps must be > 0, got {args.steps}")
    if args.workers is not None and args.workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {args.workers}")
    cfg = load_config(args.config)
    if args.depth_weight is not None:
        cfg = load_config(_merge(cfg, {"depth": {"weight": args.depth_weight}}))
    if args.steps is not None:
        cfg["train"]["steps"] = args.steps
    if args.data is not None:
        cfg["data"]["dir"] = str(args.data)
    if args.val_data is not None:
        cfg["data"]["val_dir"] = str(args.val_data)
    if args.workers is not None:
        cfg["data"]["workers"] = args.workers
    device, line = torch_device(args.device)
    if device != "cpu" and needs_cpu(cfg):
        device, line = "cpu", "device: cpu (torch); the [real] and [depth] terms render with the CPU rasterizer"
    print(f"train coarse: {line}", file=sys.stderr)
    summary = train(cfg, args.out, resume=args.resume, progress=not args.no_progress, device=device)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
