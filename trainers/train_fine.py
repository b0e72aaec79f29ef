"""Train FineNet self-supervised: the photometric detail loss on real frame pairs (and synthetic faces).

    capture train fine --data DATA_DIR --out RUN_DIR [--config trainers/configs/fine.toml] [--steps N] [--resume]
                       [--device auto|cpu|cuda]

DATA_DIR comes from `python -m trainers.fine_data --out DATA_DIR` (real pairs of the training videos
in DATA_DIR/train, of the held-out videos in DATA_DIR/heldout, synthetic faces with known detail in
DATA_DIR/synthetic_train and DATA_DIR/synthetic_heldout).

Every step: batch_real pairs of consecutive real frames and batch_synthetic synthetic faces go through
FineNet; the loss (trainers.detail_loss) is the photometric term on every frame, the smoothness and
magnitude priors, the temporal term between each pair's two maps (warped by the DIS optical flow
between their unwrapped colour), and, where [loss] supervised > 0 (trainers/configs/fine.toml: 50), a
squared-error term (mm², supervised_loss) against the synthetic faces' known detail; at 0 the synthetic
faces only go through the photometric terms.
Batches are a pure function of the step (seeded permutations), so --resume continues exactly.
The net, its batches and losses run on an NVIDIA GPU when torch can use one (--device auto, the
default; engine.device.torch_device), else on the CPU; the weights are written from the CPU.

Validation every val_every steps on the held-out sets (`evaluate`): photometric error with and
without the detail on held-out real frames, displacement error on held-out synthetic faces beside the
zero map's, and frame-to-frame change of the map on held-out pairs.

Outputs in RUN_DIR: checkpoint.pt (atomically), metrics.jsonl, and at the end finenet.pt and
finenet.onnx (engine.finenet).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine.device import torch_device
from engine.facemodel import FaceModel
from engine.fine_runtime import ALBEDO_SIGMA_TEXELS, detail_inputs
from engine.finenet import FineNet, FineNetConfig, export_onnx, save_weights
from engine.uvmap import FaceUV
from trainers.detail_loss import albedo_residual, magnitude_prior, photometric_loss, smoothness_prior, temporal_loss
from trainers.fine_data import read_samples
from trainers.real_frames import optical_flow
from trainers.train_coarse import ConfigError, _merge, save_checkpoint

DEFAULT_CONFIG: dict = {
    "model": {},                      # FineNetConfig fields (map_px, widths, max_mm)
    "train": {"steps": 600, "batch_real": 4, "batch_synthetic": 4, "lr": 2e-3, "seed": 0, "threads": 2,
              "log_every": 20, "val_every": 250, "checkpoint_every": 250, "grad_clip": 1.0},
    "loss": {"photometric": 1.0, "smoothness": 0.05, "magnitude": 0.1, "temporal": 0.5, "supervised": 0.0,
             "charbonnier_eps": 0.02, "albedo_sigma_texels": ALBEDO_SIGMA_TEXELS},
    "data": {"dir": None, "val_real": 60, "val_synthetic": 40},
}


def load_config(config: str | Path | dict | None) -> dict:
    """A TOML path or dict over DEFAULT_CONFIG; unknown keys and non-positive counts are a ConfigError."""
    import tomllib

    user = {} if config is None else config if isinstance(config, dict) else tomllib.loads(Path(config).read_text())
    for section, values in user.items():
        if section not in DEFAULT_CONFIG:
            raise ConfigError(f"unknown config section [{section}]")
        if section != "model":
            unknown = set(values) - set(DEFAULT_CONFIG[section])
            if unknown:
                raise ConfigError(f"unknown [{section}] keys in config: {sorted(unknown)}")
    cfg = _merge(DEFAULT_CONFIG, user)
    for key in ("steps", "lr", "threads", "log_every", "val_every", "checkpoint_every"):
        value = cfg["train"][key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ConfigError(f"[train] {key} must be a number > 0, got {value!r}")
    if cfg["train"]["batch_real"] < 0 or cfg["train"]["batch_synthetic"] < 0 or \
            cfg["train"]["batch_real"] + cfg["train"]["batch_synthetic"] == 0:
        raise ConfigError("[train] batch_real and batch_synthetic must be >= 0 and not both 0")
    return cfg


class FrameSet:
    """Samples of trainers.fine_data with each frame's geometry maps and each pair's flow, in memory.

    x (N, 2, 7, R, R) float16 network inputs; colour (N, 2, R, R, 3) float16 linear; visible (N, 2, R, R)
    bool; normals, Pu, Pv (N, 2, R, R, 3) float16; sh (N, 2, 9, 3); flow (N, R, R, 2) float16 texels
    from frame 0's map to frame 1's; truth_mm (N, R, R) (NaN for real frames).
    """

    def __init__(self, samples: dict, face_uv: FaceUV, n_vertices: int, progress: bool = False):
        from engine.detail import texel_geometry
        from trainers.synthesis import srgb_to_linear

        N = len(samples["colour"])
        R = face_uv.resolution
        self.truth_mm = samples["truth_mm"].astype(np.float32)
        self.sh = samples["sh"].astype(np.float32)
        self.visible = samples["visible"]
        self.colour = srgb_to_linear(samples["colour"] / 255.0).astype(np.float16)
        self.x = np.zeros((N, 2, 7, R, R), np.float16)
        self.normals = np.zeros((N, 2, R, R, 3), np.float16)
        self.Pu = np.zeros_like(self.normals)
        self.Pv = np.zeros_like(self.normals)
        self.flow = np.zeros((N, R, R, 2), np.float16)
        verts = np.zeros((n_vertices, 3), np.float32)
        for i in _bar(range(N), progress, "preparing maps"):
            for k in range(2):
                if k == 1 and np.array_equal(samples["vertices"][i, 0], samples["vertices"][i, 1]):
                    for a in (self.x, self.normals, self.Pu, self.Pv):
                        a[i, 1] = a[i, 0]
                    continue
                verts[: samples["vertices"].shape[2]] = samples["vertices"][i, k]
                g = texel_geometry(face_uv, verts)
                self.normals[i, k], self.Pu[i, k], self.Pv[i, k] = g["normals"], g["Pu"], g["Pv"]
                self.x[i, k] = detail_inputs(samples["colour"][i, k] / 255.0, self.visible[i, k], g,
                                             samples["sh"][i, k])
            self.flow[i] = optical_flow(samples["colour"][i, 0], samples["colour"][i, 1])

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, ids: np.ndarray, frames: int = 2) -> dict[str, torch.Tensor]:
        """Tensors of the samples ids, their first `frames` frames flattened into the batch (B·frames, ...)."""
        def t(a):
            return torch.as_tensor(a[ids][:, :frames].reshape((-1,) + a.shape[2:]).astype(np.float32))

        return {"x": t(self.x), "colour": t(self.colour), "visible": t(self.visible), "normals": t(self.normals),
                "Pu": t(self.Pu), "Pv": t(self.Pv), "sh": t(self.sh),
                "flow": torch.as_tensor(self.flow[ids].astype(np.float32)),
                "truth_mm": torch.as_tensor(self.truth_mm[ids])}


def _bar(iterable, show: bool, desc: str):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, disable=not show, leave=False)


def frame_losses(d_mm: torch.Tensor, b: dict, mask: torch.Tensor, lc: dict) -> dict[str, torch.Tensor]:
    """(B,) photometric, smoothness and magnitude terms of maps d_mm (B, R, R) on a batch's frames."""
    sigma = float(lc["albedo_sigma_texels"]) * d_mm.shape[-1] / 256
    r = albedo_residual(b["colour"], b["visible"], b["normals"], b["Pu"], b["Pv"], b["sh"], d_mm, sigma)
    return {"photometric": photometric_loss(r, b["visible"], float(lc["charbonnier_eps"])),
            "smoothness": smoothness_prior(d_mm, mask), "magnitude": magnitude_prior(d_mm, mask)}


def supervised_loss(d_mm: torch.Tensor, truth_mm: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Mean squared error, mm², of maps d_mm (B, R, R) against known detail over the visible texels.

    Squared, not absolute: most texels of a synthetic face are flat, and an L1 term's optimum where a
    wrinkle's place is not yet certain is the flat map (the median), which stalls the net there."""
    seen = visible * torch.isfinite(truth_mm)
    return ((d_mm - torch.nan_to_num(truth_mm)) ** 2 * seen).sum() / seen.sum().clamp_min(1)


def predict(net: FineNet, x: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """(B, R, R) maps, mm, in eval mode without gradients (on x's device)."""
    net.eval()
    with torch.no_grad():
        return torch.cat([net(x[i:i + batch])[:, 0] for i in range(0, len(x), batch)])


def on(device: str, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def evaluate(net: FineNet, real: FrameSet | None, synthetic: FrameSet | None, mask: torch.Tensor, lc: dict,
             device: str = "cpu") -> dict:
    """Held-out figures, medians over frames (module docstring); net and mask on device."""
    out: dict = {}
    if real is not None and len(real):
        ids = np.arange(len(real))
        b = on(device, real.batch(ids))
        d = predict(net, b["x"])
        coarse = frame_losses(torch.zeros_like(d), b, mask, lc)["photometric"]
        detail = frame_losses(d, b, mask, lc)["photometric"]
        out["photometric_coarse"] = float(coarse.median())
        out["photometric_detail"] = float(detail.median())
        out["photometric_ratio"] = float((detail / coarse).median())
        pairs = d.view(len(ids), 2, *d.shape[1:])
        both = b["visible"].view(len(ids), 2, *d.shape[1:]).prod(dim=1)
        out["flicker_mm"] = float(temporal_loss(pairs[:, 0], pairs[:, 1], b["flow"], both).median())
        out["flicker_unwarped_mm"] = float(temporal_loss(pairs[:, 0], pairs[:, 1], torch.zeros_like(b["flow"]),
                                                         both).median())
        out["mean_abs_mm"] = float((d.abs() * b["visible"]).sum() / b["visible"].sum())
    if synthetic is not None and len(synthetic):
        b = on(device, synthetic.batch(np.arange(len(synthetic)), frames=1))
        d = predict(net, b["x"])
        errs, zeros, flat = [], [], []
        for i in range(len(d)):
            seen = b["visible"][i] > 0
            truth = b["truth_mm"][i]
            detail = seen & (truth.abs() > 0.1)
            if detail.sum() < 20:
                continue
            errs.append(float((d[i] - truth)[detail].abs().median()))
            zeros.append(float(truth[detail].abs().median()))
            flat.append(float(d[i][seen & (truth.abs() < 0.02)].abs().median()))
        out["synthetic_error_mm"] = float(np.median(errs)) if errs else float("nan")
        out["synthetic_zero_map_mm"] = float(np.median(zeros)) if zeros else float("nan")
        out["synthetic_flat_mm"] = float(np.median(flat)) if flat else float("nan")
    return out


def train(config: str | Path | dict | None, data_dir: str | Path, out_dir: str | Path, resume: bool = False,
          progress: bool = True, stop_at: int | None = None, device: str = "cpu") -> dict:
    """Run (or continue) a FineNet training run; returns {step, loss, val, seconds}. stop_at: leave after
    that step with a checkpoint, as an interrupted run would (no weights written). device: "cpu" or
    "cuda" (torch's; engine.device.torch_device chooses), where the net, its batches and losses live."""
    from tqdm import tqdm

    cfg = load_config(config)
    tc, lc = cfg["train"], cfg["loss"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(tc["threads"]))
    ncfg = FineNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg["model"].items()})
    model = FaceModel.load()
    face_uv = FaceUV.from_model(model, ncfg.map_px)
    mask = torch.as_tensor(face_uv.mask).to(device)
    data = Path(data_dir)

    def frame_set(name: str, limit: int | None = None) -> FrameSet | None:
        if not (data / name).is_dir():
            return None
        return FrameSet(read_samples(data / name, limit), face_uv, model.n_vertices, progress)

    real = frame_set("train") if tc["batch_real"] else None
    synthetic = frame_set("synthetic_train") if tc["batch_synthetic"] else None
    if (tc["batch_real"] and real is None) or (tc["batch_synthetic"] and synthetic is None):
        raise ConfigError(f"{data} lacks the train/ or synthetic_train/ samples the batches ask for "
                          "(make them with python -m trainers.fine_data --out DIR)")
    val_real = frame_set("heldout", int(cfg["data"]["val_real"]))
    val_synthetic = frame_set("synthetic_heldout", int(cfg["data"]["val_synthetic"]))

    torch.manual_seed(int(tc["seed"]))
    net = FineNet(ncfg).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=float(tc["lr"]))
    steps = int(tc["steps"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    step = 0
    ckpt = out / "checkpoint.pt"
    if resume:
        if not ckpt.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = int(state["step"])
    metrics = open(out / "metrics.jsonl", "a")
    bar = tqdm(total=steps, initial=step, desc="train fine", unit="step", disable=not progress)
    last, val = {}, {}
    t0 = time.time()
    while step < steps:
        rng = np.random.default_rng([int(tc["seed"]), step])
        net.train()
        terms: dict[str, torch.Tensor] = {}
        parts = []
        if real is not None:
            b = on(device, real.batch(rng.choice(len(real), int(tc["batch_real"]),
                                                 replace=len(real) < int(tc["batch_real"]))))
            d = net(b["x"])[:, 0]
            parts.append(frame_losses(d, b, mask, lc))
            pairs = d.view(-1, 2, *d.shape[1:])
            both = b["visible"].view(-1, 2, *d.shape[1:]).prod(dim=1)
            terms["temporal"] = temporal_loss(pairs[:, 0], pairs[:, 1], b["flow"], both).mean()
        if synthetic is not None:
            n = int(tc["batch_synthetic"])
            b = on(device, synthetic.batch(rng.choice(len(synthetic), n, replace=len(synthetic) < n), frames=1))
            d = net(b["x"])[:, 0]
            parts.append(frame_losses(d, b, mask, lc))
            terms["supervised"] = supervised_loss(d, b["truth_mm"], b["visible"])
        for key in ("photometric", "smoothness", "magnitude"):
            terms[key] = torch.cat([p[key] for p in parts]).mean()
        loss = sum(float(lc[k]) * v for k, v in terms.items())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), float(tc["grad_clip"]))
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        last = {k: float(v.detach()) for k, v in terms.items()} | {"loss": float(loss.detach())}
        if step % int(tc["log_every"]) == 0:
            metrics.write(json.dumps({"step": step, **last, "lr": sched.get_last_lr()[0]}) + "\n")
            metrics.flush()
            bar.set_postfix(loss=f"{last['loss']:.4f}")
        if step % int(tc["val_every"]) == 0 or step == steps:
            val = evaluate(net, val_real, val_synthetic, mask, lc, device)
            metrics.write(json.dumps({"step": step, "val": val}) + "\n")
            metrics.flush()
            (tqdm.write if progress else print)(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
        if step % int(tc["checkpoint_every"]) == 0 or step == steps or step == stop_at:
            save_checkpoint(ckpt, net, opt, sched, step, cfg)
        if step == stop_at:
            break
    bar.close()
    metrics.close()
    if step < steps:
        return {"step": step, "loss": last, "val": val, "seconds": round(time.time() - t0, 1)}
    net.cpu()
    save_weights(net, out / "finenet.pt")
    export_onnx(net, out / "finenet.onnx")
    return {"step": step, "loss": last, "val": val, "seconds": round(time.time() - t0, 1)}


def main(argv=None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="sample sets of python -m trainers.fine_data")
    ap.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, metrics, weights, ONNX")
    ap.add_argument("--config", type=Path, default=Path(__file__).resolve().parent / "configs" / "fine.toml",
                    help="TOML config (default trainers/configs/fine.toml)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    ap.add_argument("--steps", type=int, help="total steps (overrides the config)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto (default) and cuda train on an NVIDIA GPU when torch can use one, else the CPU; "
                    "one line says which")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.steps is not None and args.steps <= 0:
        raise ConfigError(f"--steps must be > 0, got {args.steps}")
    if not args.data.is_dir():
        raise ConfigError(f"--data {args.data} is not a folder (make it with python -m trainers.fine_data --out DIR)")
    cfg = load_config(args.config)
    if args.steps is not None:
        cfg["train"]["steps"] = args.steps
    device, line = torch_device(args.device)
    print(f"train fine: {line}", file=sys.stderr)
    summary = train(cfg, args.data, args.out, resume=args.resume, progress=not args.no_progress, device=device)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
