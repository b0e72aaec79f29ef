#!/usr/bin/env python
"""Where issue 9's accuracy is lost: the colour engine's figures beside what its inputs could give.

Each row puts the shipped coarse engine beside the same computation with one input replaced by the
truth, on data with exact truth, so the loss can be assigned to an input rather than guessed at:

(1) What the landmarks carry of each expression shape (synthetic shards, `--shards`, `--val`):
    a ridge regression from the aligned 478 landmarks (engine.landmark_expression.aligned_shape)
    to the 53 expression weights, fitted on the training shards and scored on the validation
    shard (Pearson r per shape), once on the face model's own points projected exactly (the
    shards' `landmarks`) and once on MediaPipe's landmarks of the same rendered crops
    (`tracked_landmarks`). What the exact points carry and MediaPipe's do not, no reader of
    MediaPipe's landmarks can recover.
(2) Identity and head pose (development clips, `--seed`, default 23: never the test set's 11):
    the coarse engine runs as `capture video` runs it, then
      face vertices    similarity-aligned mm (eval_accuracy): as shipped; the same frames with the
                       true identity in place of the locked one; the mean face, zero expression;
      identity alone   the neutral face of an identity against the true one (similarity-aligned
                       mm): the locked one; solved from MediaPipe's landmarks of the first
                       `--identity-frames` frames given the TRUE pose and expression (ridge, prior
                       `--identity-prior`, default 10: the best of 1, 10 and 100 on these clips;
                       engine.fitting.identity_normal_equations); zeros;
      head rotation    geodesic degrees: as shipped; Gauss-Newton on the pose alone (5 steps from
                       the engine's pose, engine.fitting.gauss_newton_frame) with the true identity,
                       with the true identity and expression, and on the exact landmarks with the
                       engine's identity and expression; a frontal guess.

    python bench/accuracy_ceilings.py [--seed 23] [--clips 6]
        [--shards runs/data/synth0 runs/data/synth2] [--val runs/data/synth_val]

The shards are scripts/train_coarse.sh's (its `synth` steps, about 3 minutes per 6000 samples);
part (1) is skipped, saying so, when they are absent.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")   # as `capture` runs

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from eval_accuracy import similarity_aligned_mm  # noqa: E402
from eval_coarsenet import DEFAULT_CACHE, FaceRegion, ensure_clips, geodesic_deg, run_take  # noqa: E402

from capture.pipeline import CaptureSettings, FaceCapture  # noqa: E402
from engine.correspondence import LandmarkCorrespondence  # noqa: E402
from engine.facemodel import FaceModel  # noqa: E402
from engine.fitting import FitSettings, LandmarkBasis, gauss_newton_frame, identity_normal_equations  # noqa: E402
from engine.pose import FRONTAL  # noqa: E402
from trainers.clips import ClipConfig, clip_media, load_gt  # noqa: E402

DEFAULT_SHARDS = [REPO / "runs/data/synth0", REPO / "runs/data/synth2"]
DEFAULT_VAL = REPO / "runs/data/synth_val"
#: Model shape stems whose readability part (1) prints (both sides where there are two).
SHOWN_STEMS = ("jawOpen", "eyeBlink", "mouthSmile", "browInnerUp", "browDown", "browOuterUp", "mouthPucker",
               "mouthFunnel", "eyeWide", "cheekPuff", "eyeSquint", "mouthLowerDown")


# ----------------------------------------------------------------------------- (1) readability

def ridge_correlations(X: np.ndarray, Y: np.ndarray, Xv: np.ndarray, Yv: np.ndarray,
                       ridge: float = 1e-7) -> np.ndarray:
    """Per output column, Pearson r on (Xv, Yv) of the ridge regression X -> Y fitted on (X, Y); the ridge
    is per sample (aligned landmarks have unit RMS radius: 1e-7 barely regularises)."""
    mx, my = X.mean(axis=0), Y.mean(axis=0)
    A = X - mx
    W = np.linalg.solve(A.T @ A + ridge * len(A) * np.eye(A.shape[1]), A.T @ (Y - my))
    P = (Xv - mx) @ W + my
    return np.array([np.corrcoef(P[:, j], Yv[:, j])[0, 1] if Yv[:, j].std() > 0 else np.nan
                     for j in range(Y.shape[1])])


def landmark_readability(train_dirs: list[Path], val_dir: Path) -> dict[str, np.ndarray]:
    """{"exact": r (53,), "mediapipe": r (53,)}: each expression weight read linearly from the aligned
    landmarks, on the samples MediaPipe tracked."""
    from engine.landmark_expression import aligned_shape
    from trainers.train_coarse import load_shards
    from trainers.train_landmark_expression import reference_shape

    def tracked(folders):
        d = load_shards(folders, fields=("expression", "landmarks"), optional=("tracked_landmarks", "tracked"))
        if "tracked" not in d:
            raise ValueError(f"{folders}: no tracked landmarks in these shards")
        keep = d["tracked"].astype(bool)
        return d["expression"][keep].astype(np.float64), d["landmarks"][keep], d["tracked_landmarks"][keep]

    E, exact, mp = tracked(train_dirs)
    Ev, exact_v, mp_v = tracked([val_dir])
    out = {}
    for name, tr, va in (("exact", exact, exact_v), ("mediapipe", mp, mp_v)):
        ref = reference_shape(tr)
        X = aligned_shape(tr, ref).reshape(len(tr), -1)
        Xv = aligned_shape(va, ref).reshape(len(va), -1)
        out[name] = ridge_correlations(X, E, Xv, Ev)
    out["samples"] = np.array([len(E), len(Ev)])
    return out


# ----------------------------------------------------------------------------- (2) identity and pose

def engine_takes(model, corr, clips: list[Path], gts: list[dict]) -> list[list[tuple]]:
    """Per clip, per frame with a face: (index, MediaPipe landmarks px (478, 2), K, identity, R, t, expression)
    of the coarse engine run as `capture video` runs it."""
    cap = FaceCapture(model, corr, CaptureSettings(engine="coarse"))
    try:
        return [[(i, np.asarray(r.landmarks)[:, :2], np.asarray(r.camera_matrix), np.asarray(r.identity),
                  np.asarray(r.rotation), np.asarray(r.translation), np.asarray(r.expression))
                 for i, r, _ in run_take(cap, clip_media(c), float(g["fps"])) if r.face_found]
                for c, g in zip(clips, gts)]
    finally:
        cap.close()


def identity_from_landmarks(basis: LandmarkBasis, frames: list[tuple], gt: dict, prior: float,
                            rounds: int = 4) -> np.ndarray:
    """(K,) identity solved from the frames' MediaPipe landmarks with the true pose and expression held."""
    k = basis.identity.shape[0]
    a = np.zeros(k)
    for _ in range(rounds):
        A, b = prior * np.eye(k), np.zeros(k)
        for i, lm, K, *_ in frames:
            Ai, bi = identity_normal_equations(basis, lm, K, gt["rotation"][i].astype(np.float64),
                                               gt["translation_cm"][i].astype(np.float64),
                                               gt["expression"][i].astype(np.float64), a)
            A += Ai
            b += bi
        a = np.linalg.solve(A, b)
    return a


def refined_rotation(basis: LandmarkBasis, points_px, K, R, t, expression, identity) -> np.ndarray:
    """(3, 3) the head rotation after 5 Gauss-Newton steps on the pose alone against points_px (N, 2)."""
    R2, _, _ = gauss_newton_frame(basis, points_px, K, R, t, expression, identity, FitSettings(), 5,
                                  solve_expression=False)
    return R2


def identity_and_pose(model, basis, region: FaceRegion, takes, gts, identity_frames: int,
                      identity_prior: float) -> dict:
    """Part (2)'s rows: lists of per-frame (or per-clip, for identities) errors."""
    zero_e = np.zeros(model.n_expression)
    rows = {k: [] for k in ("vert_engine", "vert_true_identity", "vert_mean_face", "id_engine", "id_landmarks",
                            "id_zeros", "rot_engine", "rot_true_id", "rot_true_id_expr", "rot_exact_landmarks",
                            "rot_frontal")}

    def neutral(a):
        return region.camera(a, zero_e, np.eye(3), np.zeros(3))

    for frames, g in zip(takes, gts):
        true_id = g["identity"].astype(np.float64)
        for i, lm, K, ident, R, t, e in frames:
            truth = region.camera(true_id, g["expression"][i], np.eye(3), np.zeros(3))
            rows["vert_engine"].append(similarity_aligned_mm(region.camera(ident, e, np.eye(3), np.zeros(3)), truth))
            rows["vert_true_identity"].append(similarity_aligned_mm(region.camera(true_id, e, np.eye(3), np.zeros(3)),
                                                                    truth))
            rows["vert_mean_face"].append(similarity_aligned_mm(neutral(np.zeros_like(true_id)), truth))
            R_true = g["rotation"][i].astype(np.float64)
            rows["rot_engine"].append(geodesic_deg(R, R_true))
            rows["rot_true_id"].append(geodesic_deg(refined_rotation(basis, lm, K, R, t, e, true_id), R_true))
            rows["rot_true_id_expr"].append(geodesic_deg(
                refined_rotation(basis, lm, K, R, t, g["expression"][i].astype(np.float64), true_id), R_true))
            rows["rot_exact_landmarks"].append(geodesic_deg(
                refined_rotation(basis, g["landmarks"][i].astype(np.float64), K, R, t, e, ident), R_true))
            rows["rot_frontal"].append(geodesic_deg(FRONTAL, R_true))
        truth_neutral = neutral(true_id)
        rows["id_engine"].append(similarity_aligned_mm(neutral(frames[-1][3]), truth_neutral))
        solved = identity_from_landmarks(basis, frames[:identity_frames], g, identity_prior)
        rows["id_landmarks"].append(similarity_aligned_mm(neutral(solved), truth_neutral))
        rows["id_zeros"].append(similarity_aligned_mm(neutral(np.zeros_like(true_id)), truth_neutral))
    return rows


# ----------------------------------------------------------------------------- report

def med(values) -> float:
    a = np.asarray(values, np.float64)
    return float(np.median(a)) if a.size else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=23, help="development clip set (default 23; the test set is 11)")
    ap.add_argument("--clips", type=int, default=6, help="clips of 90 frames (default 6)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"clip cache (default {DEFAULT_CACHE})")
    ap.add_argument("--shards", type=Path, nargs="*", default=DEFAULT_SHARDS, help="training shards for (1)")
    ap.add_argument("--val", type=Path, default=DEFAULT_VAL, help="validation shard for (1)")
    ap.add_argument("--identity-frames", type=int, default=40, help="frames the landmark identity is solved over")
    ap.add_argument("--identity-prior", type=float, default=10.0, help="its ridge prior, per unit² of weight")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    model, corr = FaceModel.load(), LandmarkCorrespondence.load()
    names = model.expression_names

    if args.shards and all(Path(d).is_dir() for d in args.shards) and args.val.is_dir():
        r = landmark_readability(list(args.shards), args.val)
        print(f"(1) expression read linearly from aligned landmarks: Pearson r on the validation shard "
              f"({r['samples'][1]} samples; ridge fitted on {r['samples'][0]})")
        print(f"    {'shape':18s} {'exact points':>12s} {'MediaPipe':>10s}")
        for j, n in enumerate(names):
            if n.removesuffix("_L").removesuffix("_R") in SHOWN_STEMS:
                print(f"    {n:18s} {r['exact'][j]:12.2f} {r['mediapipe'][j]:10.2f}")
        print(f"    {'median of all 53':18s} {np.nanmedian(r['exact']):12.2f} {np.nanmedian(r['mediapipe']):10.2f}")
    else:
        print(f"(1) skipped: no shards at {[str(d) for d in args.shards]} / {args.val} "
              "(scripts/train_coarse.sh's synth steps write them)")

    clips = ensure_clips(args.cache, args.clips, 90, args.seed, ClipConfig(), model, corr)
    gts = [load_gt(c) for c in clips]
    print(f"eval: the coarse engine on {len(clips)} clips of set {args.seed}", file=sys.stderr)
    takes = engine_takes(model, corr, clips, gts)
    basis = LandmarkBasis.from_correspondence(model, corr)
    region = FaceRegion(model)
    rows = identity_and_pose(model, basis, region, takes, gts, args.identity_frames, args.identity_prior)
    n_frames = len(rows["vert_engine"])
    print(f"\n(2) clip set {args.seed}: {len(clips)} clips, {n_frames} frames with a face; medians")
    table = [
        ("face vertices, mm", "coarse engine as shipped", "vert_engine"),
        ("", "the same with the TRUE identity", "vert_true_identity"),
        ("", "baseline: mean face, no expression", "vert_mean_face"),
        ("identity alone (neutral), mm", "the engine's locked identity", "id_engine"),
        ("", f"MediaPipe landmarks, TRUE pose+expression, {args.identity_frames} fr", "id_landmarks"),
        ("", "baseline: mean face", "id_zeros"),
        ("head rotation, deg", "coarse engine as shipped", "rot_engine"),
        ("", "pose refit on MediaPipe, TRUE identity", "rot_true_id"),
        ("", "pose refit on MediaPipe, TRUE identity+expression", "rot_true_id_expr"),
        ("", "pose refit on EXACT landmarks, engine's id+expr", "rot_exact_landmarks"),
        ("", "baseline: frontal guess", "rot_frontal"),
    ]
    for measure, what, key in table:
        print(f"    {measure:30s} {what:52s} {med(rows[key]):7.2f}")

    print(f"\nrun time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
