#!/usr/bin/env python
"""RGB-D against colour alone (issue 11): the same frames fitted with and without their depth, in one run.

(a) Exact-truth synthetic RGB-D takes: trainers.clips' random performances (a person moving and
    making expressions, seeds apart from every training seed: clip i of --seed S is drawn from
    default_rng([1_000_000 + S, i])), each frame's depth rendered exactly (trainers.rgbd) and
    passed through the Kinect-like noise model (disparity steps, distance-dependent noise,
    projector shadows, holes on dark surfaces, dropouts), over a wall 1.5-2.5 m behind. Written
    as RGB-D takes (capture.sources.RGBDTakeWriter; cached) and read back as `capture video TAKE`
    reads them. Per frame with a face:
      vertex mm (sim.)     face-region vertices after a similarity alignment to the truth (as
                           eval_accuracy), and the same over the front face the depth samples;
      head rotation deg    geodesic; translation mm: |t - t_true|, the model origin in camera space;
      blendshape MAE       over eval_accuracy's 43 scored shapes; baseline all zeros.
    Baselines in the same run: colour alone (the same engine on the same frames without depth),
    and the mean face with zero expression for the vertex error.
(b) BIWI's five Kinect frames (../shared/data/rgbd/biwi01), the take run three times over (15
    frames, so the identity locks): median |model - depth| over the face samples the depth
    sees, after the fit with depth and for the colour-only fit of the same frames.
(c) Time on one core: registration (engine.depth.register_depth) and the optional smoothing
    (`--smooth-depth`; off by default, as here) of a BIWI frame, and the depth refinement per
    frame (FaceCapture's "depth" timing, part of "fit") beside the colour-only "fit" stage of
    the same frames.

Every figure is a median over frames unless said; p95 beside it.

    python bench/eval_rgbd.py [--clips 6] [--frames 90] [--seed 31] [--engine coarse|fit] [--weights W]
                              [--depth-set NAME=VALUE] [--json OUT]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")   # as `capture` runs

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from eval_accuracy import SCORED, similarity_aligned_mm  # noqa: E402
from eval_coarsenet import FaceRegion, geodesic_deg, save_json, stats  # noqa: E402

from capture.pipeline import CaptureSettings, FaceCapture  # noqa: E402
from capture.sources import RGBDFolderSource, RGBDTakeWriter  # noqa: E402
from engine.coarse_fitting import runtime_for  # noqa: E402
from engine.correspondence import LandmarkCorrespondence  # noqa: E402
from engine.depth import DepthCalibration, denoise_depth, register_depth  # noqa: E402
from engine.depth_fit import DepthSettings, depth_residual_mm, front_face_vertices  # noqa: E402
from engine.facemodel import FaceModel  # noqa: E402
from engine.fitting import FitResult  # noqa: E402
from trainers.clips import ClipConfig, clip_rng, render_clip  # noqa: E402
from trainers.rgbd import kinect_depth, render_depth_mm  # noqa: E402
from trainers.synthesis import SynthesisAssets, posed_vertices  # noqa: E402

DEFAULT_CACHE = REPO / "runs" / "eval_rgbd"
BIWI = REPO.parent / "shared" / "data" / "rgbd" / "biwi01"
GT_FIELDS = ("identity", "expression", "blendshapes", "rotation", "translation_cm", "K", "fps")


def ensure_rgbd_clips(cache: Path, n_clips: int, n_frames: int, seed: int, model: FaceModel,
                      corr: LandmarkCorrespondence) -> list[Path]:
    """The RGB-D takes of this set, rendered once and kept under cache (gt.npz written last marks a
    finished take)."""
    folders = [cache / f"seed{seed}-{n_frames}" / f"take-{i:03d}" for i in range(n_clips)]
    todo = [i for i, f in enumerate(folders) if not (f / "gt.npz").is_file()]
    if not todo:
        return folders
    from tqdm import tqdm

    assets = SynthesisAssets.build(model, corr)
    cfg = ClipConfig()
    for i in tqdm(todo, desc="rendering RGB-D takes", unit="take"):
        rng = clip_rng(seed, i)
        frames = []
        gt = render_clip(rng, assets, n_frames, cfg, on_frame=lambda f, image: frames.append(image))
        noise_rng = np.random.default_rng([2_000_000 + seed, i])
        wall_mm = float(noise_rng.uniform(1500.0, 2500.0))
        K = gt["K"]
        with RGBDTakeWriter(folders[i], DepthCalibration.registered(K), float(gt["fps"])) as writer:
            for f, image in enumerate(frames):
                verts = posed_vertices(assets, gt["identity"], gt["expression"][f], gt["gaze_rad"][f])
                cam = verts.astype(np.float64) @ gt["rotation"][f].T.astype(np.float64) + gt["translation_cm"][f]
                exact, cos = render_depth_mm(cam, assets.draw_triangles, K, (cfg.width, cfg.height), wall_mm)
                writer.write(image, kinect_depth(exact, cos, image, noise_rng))
        np.savez(folders[i] / "gt.npz", **{k: gt[k] for k in GT_FIELDS})
    return folders


def run_modes(capture: FaceCapture, folder: Path):
    """Each frame of one take fitted without and with its depth: ([(colour result, rgbd result)], frames)."""
    with RGBDFolderSource(folder, denoise=False) as source:  # as `capture video` reads it
        frames = list(source)
        K = source.camera_matrix
    out = {}
    for mode in ("colour", "rgbd"):
        capture.reset()
        out[mode] = [capture.process(f.image, f.time_s, f.index, f.depth_mm if mode == "rgbd" else None, K)
                     for f in frames]
    return out, frames


def score_clips(capture: FaceCapture, folders: list[Path], model: FaceModel) -> dict:
    region = FaceRegion(model)
    front = front_face_vertices(model)
    names = ("vertex_mm_sim", "front_mm_sim", "head_deg", "translation_mm", "bs_mae", "bs_mae_zero",
             "fit_ms", "depth_ms", "depth_residual_mm")
    err = {mode: {k: [] for k in names} for mode in ("colour", "rgbd")}
    mean_face = []
    zero = region.camera(np.zeros(60), np.zeros(model.n_expression), np.eye(3), np.zeros(3))  # the mean face
    for folder in folders:
        gt = dict(np.load(folder / "gt.npz"))
        results, _ = run_modes(capture, folder)
        for mode, rs in results.items():
            e = err[mode]
            for i, r in enumerate(rs):
                if not r.face_found:
                    continue
                true_v = region.camera(gt["identity"], gt["expression"][i], np.eye(3), np.zeros(3))
                pred_v = region.camera(r.identity, r.expression, np.eye(3), np.zeros(3))
                e["vertex_mm_sim"].append(similarity_aligned_mm(pred_v, true_v))
                e["front_mm_sim"].append(similarity_aligned_mm(pred_v[front], true_v[front]))
                e["head_deg"].append(geodesic_deg(np.asarray(r.rotation), gt["rotation"][i]))
                e["translation_mm"].append(10.0 * float(np.linalg.norm(r.translation - gt["translation_cm"][i])))
                truth = gt["blendshapes"][i][SCORED]
                e["bs_mae"].append(float(np.abs(np.asarray(r.blendshapes)[SCORED] - truth).mean()))
                e["bs_mae_zero"].append(float(np.abs(truth).mean()))
                e["fit_ms"].append(1000.0 * r.timings_s["fit"])
                if "depth" in r.timings_s:
                    e["depth_ms"].append(1000.0 * r.timings_s["depth"])
                    e["depth_residual_mm"].append(r.depth_residual_mm)
                if mode == "colour" and i % 5 == 0:
                    mean_face.append(similarity_aligned_mm(zero, true_v))
    return {"colour": {k: stats(v) for k, v in err["colour"].items()},
            "rgbd": {k: stats(v) for k, v in err["rgbd"].items()},
            "mean_face_mm": stats(mean_face)}


def score_biwi(capture: FaceCapture, repeats: int = 3) -> dict:
    """Median |model - depth| (mm) over the face samples, with depth and for the colour-only fit."""
    with RGBDFolderSource(BIWI, denoise=False) as source:
        frames = list(source)
        K = source.camera_matrix
    out = {}
    for mode in ("colour", "rgbd"):
        capture.reset()
        residuals, seen = [], []
        for k in range(repeats):
            for f in frames:
                r = capture.process(f.image, (k * len(frames) + f.index) / source.fps, k * len(frames) + f.index,
                                    f.depth_mm if mode == "rgbd" else None, K)
                if not r.face_found:
                    continue
                fit = FitResult(r.rotation, r.translation, r.expression, r.identity, 0.0)
                res, n = depth_residual_mm(capture.depth_basis, f.depth_mm * np.float32(0.1), K, fit,
                                           capture.settings.depth)
                residuals.append(res)
                seen.append(n)
        out[mode] = {"residual_mm": stats([r for r in residuals if np.isfinite(r)]),
                     "samples_seen": stats(seen), "frames": len(residuals)}
    # time: registration and denoising of the raw Kinect frames
    import cv2
    calib = DepthCalibration.biwi(BIWI)
    raws = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted((BIWI / "depth").glob("*.png"))]
    reg, den = [], []
    for _ in range(20):
        for raw in raws:
            t0 = time.perf_counter()
            d = register_depth(raw, calib, (640, 480))
            t1 = time.perf_counter()
            denoise_depth(d)
            reg.append(1000.0 * (t1 - t0))
            den.append(1000.0 * (time.perf_counter() - t1))
    out["register_ms"], out["denoise_ms"] = stats(reg[len(raws):]), stats(den[len(raws):])
    return out


def print_report(res: dict) -> None:
    c, d = res["clips"]["colour"], res["clips"]["rgbd"]

    def row(name, key, note=""):
        a, b = c[key]["median"], d[key]["median"]
        ratio = a / b if b else float("nan")
        print(f"{name:<40} {a:9.3f} {b:9.3f}   x{ratio:5.2f} better   p95 {c[key]['p95']:.2f} / {d[key]['p95']:.2f}"
              f"{note}")

    cfg = res["config"]
    print(f"\nissue 11, RGB-D vs colour alone (engine {cfg['engine']}); medians over frames; "
          f"{cfg['clips']} synthetic takes x {cfg['frames']} frames, seed {cfg['seed']}")
    print(f"{'measure':<40} {'colour':>9} {'RGB-D':>9}")
    row("(a) face vertices, similarity-aligned, mm", "vertex_mm_sim",
        f"; mean face {res['clips']['mean_face_mm']['median']:.2f} (target <= 1.5 and 2x lower)")
    row("(a) front face (depth samples), mm", "front_mm_sim")
    row("(a) head rotation, deg", "head_deg")
    row("(a) head translation, mm", "translation_mm", " (target <= 2)")
    row("(a) blendshape MAE", "bs_mae", f"; zeros {c['bs_mae_zero']['median']:.4f}")
    b = res["biwi"]
    print(f"(b) BIWI median |model - depth|, mm        {b['colour']['residual_mm']['median']:9.3f} "
          f"{b['rgbd']['residual_mm']['median']:9.3f}   samples seen {b['colour']['samples_seen']['median']:.0f} / "
          f"{b['rgbd']['samples_seen']['median']:.0f} (target <= 2.5)")
    print(f"(c) one core: register {b['register_ms']['median']:.2f} ms (p95 {b['register_ms']['p95']:.2f}), "
          f"denoise {b['denoise_ms']['median']:.2f} ms (p95 {b['denoise_ms']['p95']:.2f}), "
          f"depth refine {d['depth_ms']['median']:.2f} ms (p95 {d['depth_ms']['p95']:.2f}); "
          f"fit stage colour {c['fit_ms']['median']:.2f} ms, RGB-D {d['fit_ms']['median']:.2f} ms "
          f"(target: depth adds <= 4 ms)")
    print(f"run time {res['runtime_s']:.0f} s (rendering {res['render_s']:.0f} s)")


def depth_settings(changes: list[str]) -> DepthSettings:
    """DepthSettings with NAME=VALUE changes, each value read as its field's default's type."""
    base = DepthSettings()
    values = {}
    for change in changes:
        name, sep, text = change.partition("=")
        if not sep or not hasattr(base, name):
            raise ValueError(f"--depth-set {change!r}: expected NAME=VALUE with NAME a DepthSettings field")
        kind = type(getattr(base, name))
        values[name] = text.lower() in ("1", "true", "yes", "on") if kind is bool else kind(text)
    return replace(base, **values)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("coarse", "fit"), default="coarse")
    ap.add_argument("--clips", type=int, default=6, help="synthetic RGB-D takes (default 6)")
    ap.add_argument("--frames", type=int, default=90, help="frames per take (default 90)")
    ap.add_argument("--seed", type=int, default=31, help="take set seed (default 31; training never uses it)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"take cache (default {DEFAULT_CACHE})")
    ap.add_argument("--one-core", action=argparse.BooleanOptionalAction, default=True,
                    help="pin to one CPU, as the time targets are stated (default on)")
    ap.add_argument("--weights", type=Path, default=None, help="CoarseNet weights (.onnx or .pt; default: shipped)")
    ap.add_argument("--depth-set", action="append", default=[], metavar="NAME=VALUE",
                    help="change one engine.depth_fit.DepthSettings field for this run (repeatable; development runs)")
    ap.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    args = ap.parse_args(argv)
    try:
        depth = depth_settings(args.depth_set)
    except ValueError as e:
        ap.error(str(e))
    if args.clips < 1 or args.frames < 15:
        ap.error("--clips must be at least 1 and --frames at least 15")
    if not BIWI.is_dir():
        ap.error(f"the BIWI frames are not at {BIWI}")
    if args.one_core and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    t_start = time.perf_counter()
    model, corr = FaceModel.load(), LandmarkCorrespondence.load()
    folders = ensure_rgbd_clips(args.cache, args.clips, args.frames, args.seed, model, corr)
    render_s = time.perf_counter() - t_start
    capture = FaceCapture(model, corr, CaptureSettings(engine=args.engine, coarse_weights=args.weights,
                                                       coarse_runtime=runtime_for(args.weights), depth=depth))
    try:
        res = {"config": vars(args) | {"cache": str(args.cache), "json": str(args.json)},
               "clips": score_clips(capture, folders, model), "biwi": score_biwi(capture)}
    finally:
        capture.close()
    res["runtime_s"], res["render_s"] = time.perf_counter() - t_start, render_s
    print_report(res)
    save_json(res, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
