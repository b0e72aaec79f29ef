"""Derive where MediaPipe's 478 landmarks sit on the face model's surface.

The model is rendered under varied identities, expressions and poses; MediaPipe
runs on each render; the rasterizer says which triangle and barycentrics lie
under every detected landmark. Those surface points, taken back to the rest
mesh, are combined per landmark (a robust median) and snapped back onto the
rest surface. The spread across renders becomes each landmark's reliability.

Reproduce the committed asset with `python -m trainers.correspondence`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from engine.correspondence import DEFAULT_CORRESPONDENCE_PATH, LandmarkCorrespondence
from engine.facemodel import FACE_VERTICES, FaceModel, barycentric_points
from engine.gaze import IRIS_LANDMARKS
from engine.landmarks import N_LANDMARKS, MediaPipeLandmarker
from engine.pose import model_to_camera
from engine.rasterizer import Fragments, interpolate, rasterize, vertex_normals

# Linear RGB-ish colours per material (0..1); None = not drawn (translucent shells).
MATERIAL_COLOURS = {
    "M_Face": (0.80, 0.62, 0.52), "M_BackHead": (0.80, 0.62, 0.52),
    "M_GumsTongue": (0.65, 0.30, 0.30), "M_Teeth": (0.92, 0.90, 0.85),
    "M_ScleraLeft": (0.95, 0.95, 0.95), "M_ScleraRight": (0.95, 0.95, 0.95),
    "M_IrisLeft": (0.20, 0.12, 0.08), "M_IrisRight": (0.20, 0.12, 0.08),
    "M_LacrimalFluid": None, "M_EyeBlend": None, "M_EyeOcclusion": None,
    "M_EyeLashes": (0.08, 0.06, 0.05),
}
LIP_COLOUR = (0.72, 0.42, 0.40)
BROW_COLOUR = (0.30, 0.22, 0.16)
IRIS_COLOUR = (0.28, 0.17, 0.10)
PUPIL_COLOUR = (0.03, 0.03, 0.03)


def drawn_triangles(model: FaceModel) -> np.ndarray:
    """Indices of triangles with an opaque material."""
    opaque = [m for m in model.materials if MATERIAL_COLOURS.get(m) is not None]
    return np.flatnonzero(model.material_mask(*opaque))


def vertex_colours(model: FaceModel) -> np.ndarray:
    """(V, 3) albedo: skin, with darker lips and brows painted around the 68 landmarks."""
    V = model.n_vertices
    colours = np.zeros((V, 3), np.float32)
    for m in model.materials:
        c = MATERIAL_COLOURS.get(m)
        if c is not None:
            colours[model.material_vertices(m)] = c
    rest = model.neutral
    face = np.arange(FACE_VERTICES.stop)
    lm = rest[model.landmark68_vertices]

    def paint(centres: np.ndarray, radius_cm: float, colour) -> None:
        d = np.linalg.norm(rest[face, None, :] - centres[None], axis=2).min(axis=1)
        w = np.clip(1.0 - d / radius_cm, 0.0, 1.0)[:, None] ** 0.5
        colours[face] = colours[face] * (1 - w) + np.asarray(colour) * w

    for side in ("Left", "Right"):
        sclera = model.material_vertices("M_Sclera" + side)
        centre = rest[sclera].mean(axis=0)
        front = rest[sclera[np.argmax(rest[sclera, 2])]] - centre
        cos = (rest[sclera] - centre) @ front / (np.linalg.norm(rest[sclera] - centre, axis=1) * np.linalg.norm(front))
        colours[sclera[cos > np.cos(np.radians(32))]] = IRIS_COLOUR
        colours[sclera[cos > np.cos(np.radians(13))]] = PUPIL_COLOUR
    outer_lip = lm[48:60]
    dense_lip = _densify(np.concatenate([outer_lip, outer_lip[:1]]), 4)
    paint(dense_lip, 0.45, LIP_COLOUR)
    dense_brow = np.concatenate([_densify(lm[17:22], 6), _densify(lm[22:27], 6)])
    paint(dense_brow, 0.5, BROW_COLOUR)
    return colours


def _densify(polyline: np.ndarray, steps: int) -> np.ndarray:
    """Points along a polyline (N, 3), `steps` per segment."""
    s = np.linspace(0.0, 1.0, steps, endpoint=False)[:, None]
    return np.concatenate([a + (b - a) * s for a, b in zip(polyline[:-1], polyline[1:])] + [polyline[-1:]])


def render(model: FaceModel, vertices_model: np.ndarray, rotation: np.ndarray, translation_cm: np.ndarray,
           camera_matrix: np.ndarray, size: tuple[int, int], tris: np.ndarray, colours: np.ndarray,
           background: float = 0.35) -> tuple[np.ndarray, Fragments]:
    """Lambert-shaded RGB uint8 render (H, W, 3) and its fragments (triangle ids index `tris`)."""
    width, height = size
    cam = vertices_model @ rotation.T + translation_cm
    triangles = model.triangles[tris]
    frags = rasterize(cam, triangles, camera_matrix, width, height)
    normals = vertex_normals(cam, model.triangles)
    n = interpolate(frags, normals, triangles)
    n /= np.maximum(np.linalg.norm(n, axis=2, keepdims=True), 1e-9)
    light = np.array([0.3, -0.4, -1.0])
    light /= np.linalg.norm(light)
    shade = 0.35 + 0.65 * np.clip(n @ light, 0.0, 1.0)
    albedo = interpolate(frags, colours, triangles)
    img = albedo * shade[..., None]
    img[~frags.mask] = background
    return (np.clip(img, 0, 1) ** (1 / 2.2) * 255).astype(np.uint8), frags


def landmark_surface_points(frags: Fragments, landmarks_px: np.ndarray, on_eyeball: np.ndarray,
                            is_eyeball: np.ndarray, search_px: int = 4):
    """Triangle id (N,) and barycentrics (N, 3) under each landmark; -1 where none is near.

    on_eyeball (N,) says which landmarks belong on the eyeballs (the irises) and
    is_eyeball (T,) which triangles are eyeball: lid landmarks must land on the
    lids, which move in a blink, never on the rigid eyeball behind them.
    """
    h, w = frags.triangle_id.shape
    tri = np.full(len(landmarks_px), -1, np.int64)
    bary = np.zeros((len(landmarks_px), 3), np.float32)
    for i, (x, y) in enumerate(landmarks_px[:, :2]):
        cx, cy = int(round(x)), int(round(y))
        best = None
        for r in range(search_px + 1):
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    px, py = cx + dx, cy + dy
                    if not (0 <= px < w and 0 <= py < h):
                        continue
                    t = frags.triangle_id[py, px]
                    if t >= 0 and is_eyeball[t] == on_eyeball[i]:
                        d = dx * dx + dy * dy
                        if best is None or d < best[0]:
                            best = (d, px, py)
            if best is not None:
                break
        if best is not None:
            tri[i] = frags.triangle_id[best[2], best[1]]
            bary[i] = frags.barycentric[best[2], best[1]]
    return tri, bary


def eyeball_triangles(model: FaceModel, tris: np.ndarray) -> np.ndarray:
    """(len(tris),) True where the triangle is sclera or iris."""
    return model.material_mask("M_ScleraLeft", "M_ScleraRight", "M_IrisLeft", "M_IrisRight")[tris]


def closest_points_on_mesh(points: np.ndarray, vertices: np.ndarray, triangles: np.ndarray):
    """For each point (N, 3) the nearest triangle id and barycentrics on the mesh (brute force)."""
    a, b, c = (vertices[triangles[:, i]] for i in range(3))
    tri_out = np.zeros(len(points), np.int64)
    bary_out = np.zeros((len(points), 3), np.float32)
    centres = (a + b + c) / 3
    for i, p in enumerate(points):
        cand = np.argsort(np.linalg.norm(centres - p, axis=1))[:64]
        best = (np.inf, 0, None)
        for t in cand:
            q, w = _closest_point_triangle(p, a[t], b[t], c[t])
            d = np.sum((q - p) ** 2)
            if d < best[0]:
                best = (d, t, w)
        tri_out[i], bary_out[i] = best[1], best[2]
    return tri_out, bary_out


def _closest_point_triangle(p, a, b, c):
    """Closest point to p on triangle abc and its barycentrics (Ericson's method)."""
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = ab @ ap, ac @ ap
    if d1 <= 0 and d2 <= 0:
        return a, np.array([1, 0, 0.0])
    bp = p - b
    d3, d4 = ab @ bp, ac @ bp
    if d3 >= 0 and d4 <= d3:
        return b, np.array([0, 1, 0.0])
    vc = d1 * d4 - d3 * d2
    if vc <= 0 and d1 >= 0 and d3 <= 0:
        v = d1 / (d1 - d3)
        return a + v * ab, np.array([1 - v, v, 0.0])
    cp = p - c
    d5, d6 = ab @ cp, ac @ cp
    if d6 >= 0 and d5 <= d6:
        return c, np.array([0, 0, 1.0])
    vb = d5 * d2 - d1 * d6
    if vb <= 0 and d2 >= 0 and d6 <= 0:
        w = d2 / (d2 - d6)
        return a + w * ac, np.array([1 - w, 0, w])
    va = d3 * d6 - d5 * d4
    if va <= 0 and (d4 - d3) >= 0 and (d5 - d6) >= 0:
        w = (d4 - d3) / ((d4 - d3) + (d5 - d6))
        return b + w * (c - b), np.array([0, 1 - w, w])
    denom = 1.0 / (va + vb + vc)
    v, w = vb * denom, vc * denom
    return a + ab * v + ac * w, np.array([1 - v - w, v, w])


def render_views(n_identities: int, seed: int):
    """(identity, expression, yaw, pitch, roll) tuples covering near-frontal variation."""
    rng = np.random.default_rng(seed)
    views = []
    expressions = [{}, {"jawOpen": 0.35}, {"mouthSmile_L": 0.5, "mouthSmile_R": 0.5},
                   {"jawOpen": 0.2, "mouthFunnel": 0.3}, {"browInnerUp_L": 0.5, "browInnerUp_R": 0.5}]
    for k in range(n_identities):
        identity = np.zeros(100) if k == 0 else rng.normal(0, 0.7, 100) * (np.arange(100) < 30)
        for expr in expressions:
            for yaw in (-0.25, 0.0, 0.25):
                for pitch in (-0.15, 0.1):
                    views.append((identity, expr, yaw, pitch, rng.uniform(-0.1, 0.1)))
    return views


def derive(model: FaceModel, n_identities: int = 4, seed: int = 0, size: int = 512, verbose: bool = True):
    """Render, detect and combine: returns a LandmarkCorrespondence on the rest mesh."""
    from tqdm import tqdm

    tris = drawn_triangles(model)
    is_eyeball = eyeball_triangles(model, tris)
    on_eyeball = np.isin(np.arange(N_LANDMARKS), IRIS_LANDMARKS)
    colours = vertex_colours(model)
    K = np.array([[1200.0, 0, (size - 1) / 2], [0, 1200.0, (size - 1) / 2], [0, 0, 1]])
    t = np.array([0.0, -1.0, 75.0])
    names = list(model.expression_names)
    rest = model.neutral
    samples = [[] for _ in range(N_LANDMARKS)]
    detected = 0
    views = render_views(n_identities, seed)
    with MediaPipeLandmarker(static=True) as lmk:
        for identity, expr, yaw, pitch, roll in tqdm(views, desc="rendering and detecting", disable=not verbose):
            e = np.zeros(model.n_expression)
            for n, v in expr.items():
                e[names.index(n)] = v
            verts = model.vertices(identity, e)
            img, frags = render(model, verts, model_to_camera(yaw, pitch, roll), t, K, (size, size), tris, colours)
            lms = lmk.detect(img)
            if lms is None:
                continue
            detected += 1
            tri_local, bary = landmark_surface_points(frags, lms, on_eyeball, is_eyeball)
            ok = tri_local >= 0
            tri_global = tris[np.where(ok, tri_local, 0)]
            pts = barycentric_points(rest, model.triangles, tri_global, bary)
            for i in np.flatnonzero(ok):
                samples[i].append(pts[i])
    if detected < len(views) // 2:
        raise RuntimeError(f"MediaPipe found a face in only {detected} of {len(views)} renders")
    centre = np.zeros((N_LANDMARKS, 3))
    spread = np.zeros(N_LANDMARKS)
    for i, s in enumerate(samples):
        if not s:
            raise RuntimeError(f"landmark {i} never fell on the mesh")
        s = np.asarray(s)
        centre[i] = np.median(s, axis=0)
        spread[i] = np.median(np.linalg.norm(s - centre[i], axis=1))
    triangle = np.zeros(N_LANDMARKS, np.int64)
    bary = np.zeros((N_LANDMARKS, 3), np.float32)
    for eyeball in (False, True):
        rows = np.flatnonzero(on_eyeball == eyeball)
        allowed = tris[is_eyeball == eyeball]
        nearest, b = closest_points_on_mesh(centre[rows], rest, model.triangles[allowed])
        triangle[rows], bary[rows] = allowed[nearest], b
    return LandmarkCorrespondence(triangle=triangle.astype(np.int32), barycentric=bary,
                                  spread_cm=spread.astype(np.float32), n_views=detected)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--face-model", help="face model .npz (default: ../shared/facemodel or $CAPTURE_FACE_MODEL)")
    ap.add_argument("--out", type=Path, default=DEFAULT_CORRESPONDENCE_PATH)
    ap.add_argument("--identities", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model = FaceModel.load(args.face_model)
    corr = derive(model, args.identities, args.seed)
    corr.save(args.out)
    print(f"wrote {args.out}: {corr.n_views} renders, median spread {np.median(corr.spread_cm) * 10:.2f} mm")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
