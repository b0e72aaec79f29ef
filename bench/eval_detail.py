#!/usr/bin/env python
"""FineNet's detail against the coarse face alone (issue 10), on sample sets training never saw.

(a) Held-out real frames (trainers.fine_data's DATA/heldout: videos d12 and d20, never trained on),
    each fitted by the capture pipeline as it runs: the photometric error of the face region
    (trainers.detail_loss: the relative residual against a smooth albedo under the frame's SH light,
    Charbonnier mean over the visible texels) with FineNet's detail and with none, the same light
    and albedo model for both; median over frames and the median per-frame ratio.
(b) Held-out synthetic faces with known wrinkles (DATA/synthetic_heldout, seeds apart from the
    training ones): median |d - truth| where the truth has detail (|truth| > 0.1 mm, visible),
    beside the zero map's error there (the trivial baseline), and the median |d| on flat skin.
(c) Frame-to-frame change of the map on held-out consecutive frames: median over texels both see
    of |d_n(x) - d_n+1(x + flow)| (flow: DIS between the two unwrapped frames), median over pairs;
    and without the flow.
(d) Time on one core (ONNX Runtime, one thread, spinning off): FineNet alone at the shipped size,
    and the whole --detail step on a real frame (unwrap, network, displaced mesh, normal map);
    median and p95.
(e) A contact sheet (--sheet): held-out real frames, then the coarse face and the detailed face
    rendered in grey under one light from above the camera, cropped to the face; look at it.

    python bench/eval_detail.py [--data runs/fine_data] [--weights engine/weights/finenet.pt] [--sheet PNG]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")   # as `capture` runs

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.facemodel import FaceModel  # noqa: E402
from engine.fine_runtime import FineRuntime  # noqa: E402
from engine.finenet import export_onnx, load_weights  # noqa: E402
from engine.pose import default_camera_matrix, project  # noqa: E402
from engine.rasterizer import rasterize  # noqa: E402
from engine.runtime import onnx_session  # noqa: E402
from engine.uvmap import FaceUV  # noqa: E402
from trainers.fine_data import read_samples  # noqa: E402
from trainers.synthesis import directional_sh, shade_pixels  # noqa: E402
from trainers.train_fine import DEFAULT_CONFIG, FrameSet, evaluate, predict  # noqa: E402


def timings(values_s) -> str:
    ms = np.asarray(values_s) * 1e3
    return f"median {np.median(ms):.2f} ms, p95 {np.percentile(ms, 95):.2f} ms"


def grey_render(vertices: np.ndarray, triangles: np.ndarray, K: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8: the mesh in grey under one light from above the camera, black elsewhere."""
    w, h = size
    frags = rasterize(vertices.astype(np.float64), triangles, K, w, h, backend="cpu")
    sh = directional_sh(np.array([0.0, -0.5, -0.87]), np.ones(3)) + directional_sh(np.array([0.0, 0.0, -1.0]),
                                                                                    0.3 * np.ones(3))
    colour, _, _ = shade_pixels(frags, vertices.astype(np.float64), triangles, np.full((len(vertices), 3), 0.6), sh)
    return np.clip(np.clip(colour[..., 0], 0, 1) ** (1 / 2.2) * 255, 0, 255).astype(np.uint8)


def contact_sheet(runtime: FineRuntime, model: FaceModel, videos: list[Path], out: Path, per_video: int = 3) -> None:
    """Rows: a held-out frame's face, its coarse face, its detailed face (grey renders), for a few frames."""
    from capture.pipeline import CaptureSettings, FaceCapture
    from engine.correspondence import LandmarkCorrespondence

    tiles = []
    for video in videos:
        cap = cv2.VideoCapture(str(video))
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        wanted = set(np.linspace(n // 4, n - 1, per_video).astype(int).tolist())
        capture = FaceCapture(model, LandmarkCorrespondence.load(), CaptureSettings())
        for i in range(n):
            ok, bgr = cap.read()
            if not ok:
                break
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            result = capture.process(rgb, i / 30.0, i)
            if i not in wanted or not result.face_found:
                continue
            K = result.camera_matrix
            coarse = capture.mesh_vertices(result)
            d, _ = runtime.displacement(rgb, coarse, K)
            fine = runtime.mesh_vertices(coarse, d)
            size = (rgb.shape[1], rgb.shape[0])
            px = project(coarse[:9409].astype(np.float64), K)
            lo = np.maximum(px.min(axis=0).astype(int) - 10, 0)
            hi = np.minimum(px.max(axis=0).astype(int) + 10, size)
            images = [rgb, grey_render(coarse, model.triangles, K, size), grey_render(fine, runtime.triangles, K, size)]
            row = [cv2.resize(np.atleast_3d(im)[lo[1]:hi[1], lo[0]:hi[0]], (256, 256)) for im in images]
            row = [np.repeat(r[..., None], 3, 2) if r.ndim == 2 else r for r in row]
            tiles.append(np.concatenate(row, axis=1))
        cap.release()
        capture.close()
    sheet = np.concatenate(tiles, axis=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    print(f"contact sheet (frame | coarse | detailed): {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "fine_data", help="python -m trainers.fine_data's folder")
    ap.add_argument("--weights", type=Path, default=ROOT / "engine" / "weights" / "finenet.pt")
    ap.add_argument("--sheet", type=Path, default=None, help="write the contact sheet here (PNG)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args(argv)
    for path in (args.data / "heldout", args.data / "synthetic_heldout", args.weights):
        if not path.exists():
            print(f"eval_detail: {path} not found (sample sets: python -m trainers.fine_data --out {args.data})",
                  file=sys.stderr)
            return 1
    torch.set_num_threads(1)
    model = FaceModel.load()
    net = load_weights(args.weights)
    face_uv = FaceUV.from_model(model, net.config.map_px)
    mask = torch.as_tensor(face_uv.mask)
    real = FrameSet(read_samples(args.data / "heldout"), face_uv, model.n_vertices)
    synthetic = FrameSet(read_samples(args.data / "synthetic_heldout"), face_uv, model.n_vertices)
    figures = evaluate(net, real, synthetic, mask, DEFAULT_CONFIG["loss"])
    print(f"held-out real frames: {len(real)} pairs; held-out synthetic faces: {len(synthetic)}")
    print(f"(a) photometric error, face region: coarse {figures['photometric_coarse']:.4f}, "
          f"with detail {figures['photometric_detail']:.4f}; per-frame ratio {figures['photometric_ratio']:.3f} "
          f"(target <= 0.80)")
    print(f"(b) synthetic detail: error {figures['synthetic_error_mm']:.3f} mm where the truth has detail, "
          f"zero map {figures['synthetic_zero_map_mm']:.3f} mm (target <= 0.3); flat skin |d| "
          f"{figures['synthetic_flat_mm']:.3f} mm")
    print(f"(c) frame-to-frame change: {figures['flicker_mm']:.4f} mm with the flow, "
          f"{figures['flicker_unwarped_mm']:.4f} mm without (target <= 0.05); mean |d| {figures['mean_abs_mm']:.3f} mm")
    # (d) time
    session = onnx_session(export_onnx(net), 1, spinning=False)
    x = real.batch(np.arange(1))["x"][:1].numpy()
    for _ in range(10):
        session.run(None, {"maps": x})
    net_s = []
    for _ in range(200):
        t = time.perf_counter()
        session.run(None, {"maps": x})
        net_s.append(time.perf_counter() - t)
    figures["finenet_ms_median"] = float(np.median(net_s) * 1e3)
    figures["finenet_ms_p95"] = float(np.percentile(net_s, 95) * 1e3)
    print(f"(d) FineNet alone, {net.config.map_px} px, one core: {timings(net_s)} (target <= 4 ms median)")
    onnx_path = args.data / "finenet_eval.onnx"
    export_onnx(net, onnx_path)
    runtime = FineRuntime(model, onnx_path)
    samples = read_samples(args.data / "heldout", 1)
    cap = cv2.VideoCapture(str(ROOT.parent / "shared" / "data" / "videos" / f"{samples['source'][0]}.mp4"))
    cap.set(cv2.CAP_PROP_POS_FRAMES, int(samples["frame"][0]))
    ok, bgr = cap.read()
    cap.release()
    if not ok:
        print("eval_detail: cannot read the held-out video frame for the timing", file=sys.stderr)
        return 1
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    verts = np.zeros((model.n_vertices, 3), np.float32)
    verts[:9409] = samples["vertices"][0, 0]
    K = default_camera_matrix(rgb.shape[1], rgb.shape[0])     # as the pipeline fitted it
    step_s = []
    for i in range(60):
        t = time.perf_counter()
        d, g = runtime.displacement(rgb, verts, K)
        runtime.mesh_vertices(verts, d)
        runtime.normal_map(g, d)
        step_s.append(time.perf_counter() - t)
    print(f"    the whole --detail step on a {rgb.shape[1]}x{rgb.shape[0]} frame: {timings(step_s[5:])}")
    if args.sheet is not None:
        videos = [ROOT.parent / "shared" / "data" / "videos" / f"{v}.mp4" for v in ("d12", "d20")]
        contact_sheet(runtime, model, videos, args.sheet)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
