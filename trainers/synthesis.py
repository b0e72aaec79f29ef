"""Synthetic CoarseNet training samples: face crops rendered from the model, with exact labels.

Seed 002 trains CoarseNet on images whose every parameter is known. This is the
synthetic half of that data: a random person (identity, skin, hair, eyes) with
an expression people make, in a random head pose, camera, light, background and
with occluders, rendered with the project's rasterizer and the SH image
formation of engine.shading, cropped the way the runtime crops a tracked face
(engine.crop from the 478 landmark points). The inverse-rendered real frames
come later and use the same sample fields (`source` tells them apart).

Image formation (exact, the labels reproduce it):
    linear colour = albedo · (sh_basis(n) @ sh), n the camera-space unit normal
    (interpolated per pixel), pixel = sRGB(linear colour), composited over the
    background; rendered at 2x the crop and area-averaged (antialiased edges).
On top, and not in the labels: a faint specular sheen, hair standing off the
scalp (behind the face, over ears and neck), shoulders, occluders, the frame's
resolution (a small face is upsampled as the runtime crop upsamples it),
blur, sensor noise, JPEG, a little contrast/saturation jitter, and black
where the crop leaves the frame (engine.crop.BORDER_VALUE). The eyeballs
turn with the gaze (posed_vertices), which the model's eyeLook shapes do not do.

Sample fields (one sample; shards stack them along a new first axis):
    image            (S, S, 3) uint8   RGB crop, S = out_px (128)
    identity         (60,) float32     identity weights, ~N(0, 1) per mode (the model's scaling)
    expression       (53,) float32     model expression weights in [0, 1], model.expression_names order
    gaze_rad         (2, 2) float32    eyeball rotation [yaw, pitch] per eye (subject's left, right),
                                       engine.gaze's convention; the eyeLook weights are its image
    expression_kind  () int16          index into EXPRESSION_KINDS (the mixture component)
    rotation         (3, 3) float32    model -> camera, X_cam = R X_model + t (engine.pose)
    translation_cm   (3,) float32      t, cm
    head_ypr_rad     (3,) float32      yaw, pitch, roll of R (engine.pose.yaw_pitch_roll)
    K_crop           (3, 3) float32    pinhole of the crop: project(R X + t, K_crop) lands in crop px
    K_frame          (3, 3) float32    pinhole of the full frame
    frame_size       (2,) int32        full frame width, height px
    crop_affine      (2, 3) float32    frame px -> crop px (engine.crop.crop_transform)
    sh               (9, 3) float32    camera-space SH irradiance (engine.shading convention)
    skin_rgb         (3,) float32      base skin albedo, linear RGB
    hair_rgb         (3,) float32      hair / brow albedo, linear RGB
    albedo_seed      () int64          vertex_albedo(assets, default_rng(seed)) rebuilds the exact
                                       per-vertex albedo (V, 3)
    landmarks        (478, 2) float32  the correspondence points projected, crop px
    landmark_visible (478,) bool       inside the crop and not hidden by the head itself
    landmark_occluded (478,) bool      under an occluder
    mask             (S, S) uint8      1 where the rendered head covers at least half the pixel and the
                                       pixel lies inside the frame
    occluder_mask    (S, S) uint8      1 where an occluder (or hair over ears and neck) covers at least
                                       half the pixel
    occlusion        () float32        fraction of the face region's pixels under occluders
    occluders        () uint8          bit flags OCCLUDER_BITS
    source           () uint8          SOURCE_SYNTHETIC (0); SOURCE_REAL (1) for trainers.inverse_render's
                                       re-rendered real faces (their albedo_seed is -1)
    tracked_landmarks (478, 2) float32 MediaPipe's landmarks found on the image itself, crop px (zeros
                                       when it found no face): what CoarseNet reads at run time
    tracked          () bool           whether MediaPipe found the face (SyntheticFaces(track=True) and the
                                       CLI add these two; --add-tracking adds them to existing shards)

CLI: python -m trainers.synthesis --count N --out DIR [--workers 2]
    writes DIR/shard-00000.npz ... (write_shard / read_shard) and DIR/sheet.png.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from engine.correspondence import LandmarkCorrespondence
from engine.crop import CROP_PX, crop_box, crop_camera, crop_transform, image_coverage
from engine.facemodel import FACE_VERTICES, FaceModel, barycentric_points
from engine.gaze import FULL_LOOK_PITCH, FULL_LOOK_YAW, sphere_centre
from engine.lighting import SH_C0, linear_to_srgb, sh_basis_np, srgb_to_linear  # noqa: F401 - trainers import them here
from engine.pose import default_camera_matrix, euler_yxz, head_rotation, model_to_camera, project, yaw_pitch_roll
from engine.rasterizer import rasterize, vertex_normals

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
N_IDENTITY = 60
SOURCE_SYNTHETIC, SOURCE_REAL = 0, 1
OCCLUDER_BITS = {"glasses": 1, "hand": 2, "hair": 4, "object": 8}
SUPERSAMPLE = 2   # render and composite at 2x the crop, then area-average: antialiased edges

# ----------------------------------------------------------------------------- colour helpers


#: Lambertian (clamped-cosine) convolution per SH band: a light of irradiance I from
#: direction d gives irradiance coefficients I · A_l · Y_lm(d) (Ramamoorthi & Hanrahan 2001).
SH_BAND_LAMBERT = np.array([np.pi, 2 * np.pi / 3, 2 * np.pi / 3, 2 * np.pi / 3] + [np.pi / 4] * 5)

#: Skin tones, light to dark, as sRGB 0-255 (photographed skin under neutral light).
SKIN_TONES_SRGB = np.array([(238, 200, 178), (224, 172, 143), (200, 142, 108), (164, 108, 76),
                            (118, 76, 52), (74, 48, 34)], dtype=np.float32)
HAIR_COLOURS_SRGB = np.array([(22, 18, 16), (48, 34, 26), (86, 60, 40), (130, 96, 64), (190, 155, 105),
                              (140, 66, 38), (150, 148, 142), (200, 198, 192)], dtype=np.float32)
HAIR_COLOUR_WEIGHTS = np.array([0.28, 0.24, 0.16, 0.1, 0.08, 0.05, 0.06, 0.03])
IRIS_COLOURS_SRGB = np.array([(40, 24, 14), (78, 48, 26), (110, 80, 45), (90, 100, 60), (70, 100, 130),
                              (110, 125, 135)], dtype=np.float32)
IRIS_COLOUR_WEIGHTS = np.array([0.35, 0.25, 0.12, 0.08, 0.13, 0.07])

# ----------------------------------------------------------------------------- expressions

#: The expression mixture: component -> probability. Each component is a combination
#: people make (see _EXPRESSION_COMPONENTS); overlays (gaze, small noise, partial
#: blinks) are added on top, then antagonists are resolved and values clipped to [0, 1].
EXPRESSION_MIXTURE: dict[str, float] = {
    "neutral": 0.10, "blink": 0.07, "wink": 0.07, "smile": 0.10, "smirk": 0.07, "jaw_open": 0.08,
    "jaw_open_pucker": 0.06, "pucker": 0.04, "brow_raise": 0.06, "frown": 0.06, "sneer": 0.04,
    "cheek_puff": 0.03, "mouth_sideways": 0.04, "lips": 0.04, "talk": 0.05, "sparse_mix": 0.09,
}
EXPRESSION_KINDS: tuple[str, ...] = tuple(EXPRESSION_MIXTURE)
GAZE_PROBABILITY = 0.5        # eyes turned (both together, small vergence), except in blinks and winks
NOISE_PROBABILITY = 0.7       # small positive noise on a quarter of the shapes (not blinks or eyeLook)
PARTIAL_BLINK_PROBABILITY = 0.1
#: Shapes that pull against each other: the smaller of each pair is zeroed.
ANTAGONISTS = (("jawLeft", "jawRight"), ("mouthLeft", "mouthRight"), ("eyeBlink_L", "eyeWide_L"),
               ("eyeBlink_R", "eyeWide_R"), ("mouthSmile_L", "mouthFrown_L"), ("mouthSmile_R", "mouthFrown_R"),
               ("browDown_L", "browOuterUp_L"), ("browDown_R", "browOuterUp_R"))


class _Expr:
    """A weight vector being built by name."""

    def __init__(self, names, rng):
        self.names, self.rng = names, rng
        self.index = {n: i for i, n in enumerate(names)}
        self.w = np.zeros(len(names), np.float64)

    def set(self, name, value):
        self.w[self.index[name]] = value

    def add(self, name, value):
        self.w[self.index[name]] += value

    def get(self, name):
        return self.w[self.index[name]]

    def u(self, lo, hi):
        return self.rng.uniform(lo, hi)

    def p(self, prob):
        return self.rng.random() < prob

    def side(self):
        return "_L" if self.rng.random() < 0.5 else "_R"

    def both(self, stem, value, asym=0.08):
        for s in ("_L", "_R"):
            self.set(stem + s, value * (1 + self.rng.normal(0, asym)))


def _other(side):
    return "_R" if side == "_L" else "_L"


def _neutral(e):
    pass


def _blink(e):
    e.both("eyeBlink", e.u(0.6, 1.0), 0.05)
    if e.p(0.3):
        e.both("eyeSquint", e.u(0.0, 0.4))


def _wink(e):
    s = e.side()
    e.set("eyeBlink" + s, e.u(0.75, 1.0))
    e.set("eyeBlink" + _other(s), e.u(0.0, 0.15))
    e.set("eyeSquint" + s, e.u(0.0, 0.5))
    if e.p(0.6):
        e.set("cheekSquint" + s, e.u(0.2, 0.7))
    if e.p(0.5):
        e.set("mouthSmile" + s, e.u(0.2, 0.8))


def _smile(e):
    s = e.u(0.35, 1.0)
    e.both("mouthSmile", s, 0.1)
    e.both("cheekSquint", e.u(0.0, 0.6) * s)
    if e.p(0.6):
        e.both("eyeSquint", e.u(0.0, 0.5) * s)
    if e.p(0.4):   # laughing
        e.set("jawOpen", e.u(0.1, 0.5))
        e.both("mouthUpperUp", e.u(0.0, 0.5))
        e.both("mouthLowerDown", e.u(0.0, 0.5))
    if e.p(0.3):
        e.both("mouthDimple", e.u(0.0, 0.4))
    if e.p(0.2):
        e.both("mouthStretch", e.u(0.0, 0.4))


def _smirk(e):
    s = e.side()
    e.set("mouthSmile" + s, e.u(0.4, 1.0))
    e.set("mouthSmile" + _other(s), e.u(0.0, 0.15))
    if e.p(0.4):
        e.set("mouthLeft" if s == "_L" else "mouthRight", e.u(0.0, 0.4))
    if e.p(0.5):
        e.set("cheekSquint" + s, e.u(0.0, 0.5))
    if e.p(0.3):
        e.set("mouthDimple" + s, e.u(0.0, 0.5))


def _jaw_open(e):
    e.set("jawOpen", e.u(0.3, 1.0))
    if e.p(0.4):
        e.both("mouthLowerDown", e.u(0.0, 0.5))
    if e.p(0.2):
        e.both("mouthUpperUp", e.u(0.0, 0.4))
    if e.p(0.35):   # surprise
        e.both("eyeWide", e.u(0.3, 1.0))
        e.both("browInnerUp", e.u(0.3, 1.0))
        e.both("browOuterUp", e.u(0.2, 0.9))
    if e.p(0.2):
        e.both("mouthStretch", e.u(0.0, 0.5))


def _jaw_open_pucker(e):
    e.set("jawOpen", e.u(0.1, 0.55))
    r = e.rng.random()
    if r < 0.4:
        e.set("mouthFunnel", e.u(0.4, 1.0))
    elif r < 0.8:
        e.set("mouthPucker", e.u(0.4, 1.0))
    else:
        e.set("mouthFunnel", e.u(0.3, 0.8))
        e.set("mouthPucker", e.u(0.3, 0.8))


def _pucker(e):
    e.set("mouthPucker", e.u(0.5, 1.0))
    e.set("jawOpen", e.u(0.0, 0.1))
    if e.p(0.3):
        e.set("mouthFunnel", e.u(0.0, 0.3))
    if e.p(0.2):
        e.set("mouthLeft" if e.p(0.5) else "mouthRight", e.u(0.0, 0.4))


def _brow_raise(e):
    if e.p(0.3):   # one brow
        s = e.side()
        e.set("browOuterUp" + s, e.u(0.4, 1.0))
        e.set("browInnerUp" + s, e.u(0.0, 0.6))
    else:
        e.both("browInnerUp", e.u(0.3, 1.0))
        e.both("browOuterUp", e.u(0.3, 1.0))
    if e.p(0.5):
        e.both("eyeWide", e.u(0.0, 0.7))


def _frown(e):
    if e.p(0.3):   # sad: inner brows up, mouth corners down
        e.both("browInnerUp", e.u(0.4, 1.0))
        e.both("mouthFrown", e.u(0.2, 0.8))
        if e.p(0.4):
            e.set("mouthShrugLower", e.u(0.0, 0.6))
        return
    e.both("browDown", e.u(0.3, 1.0))
    if e.p(0.6):
        e.both("mouthFrown", e.u(0.0, 0.8))
    if e.p(0.4):
        e.both("mouthPress", e.u(0.0, 0.6))
    if e.p(0.5):
        e.both("eyeSquint", e.u(0.0, 0.6))
    if e.p(0.3):
        e.both("noseSneer", e.u(0.0, 0.4))
    if e.p(0.3):
        e.set("mouthShrugLower", e.u(0.0, 0.6))


def _sneer(e):
    sides = ("_L", "_R") if e.p(0.5) else (e.side(),)
    for s in sides:
        e.set("noseSneer" + s, e.u(0.4, 1.0))
        e.set("mouthUpperUp" + s, e.u(0.2, 0.8))
        if e.p(0.4):
            e.set("cheekSquint" + s, e.u(0.0, 0.5))
    if e.p(0.5):
        e.both("browDown", e.u(0.0, 0.5))


def _cheek_puff(e):
    if e.p(0.7):
        e.both("cheekPuff", e.u(0.4, 1.0))
    else:
        e.set("cheekPuff" + e.side(), e.u(0.4, 1.0))
    if e.p(0.3):
        e.both("mouthPress", e.u(0.0, 0.4))


def _mouth_sideways(e):
    choices = [("mouthLeft", "mouthRight"), ("jawLeft", "jawRight"), ("jawForward",)]
    for k in e.rng.choice(len(choices), size=e.rng.integers(1, 3), replace=False):
        names = choices[k]
        e.set(names[e.rng.integers(len(names))], e.u(0.3, 1.0))
    if e.p(0.4):
        e.set("jawOpen", e.u(0.0, 0.3))


def _lips(e):
    options = ["mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper", "mouthPress", "mouthClose"]
    for k in e.rng.choice(len(options), size=e.rng.integers(1, 4), replace=False):
        name = options[k]
        if name == "mouthPress":
            e.both("mouthPress", e.u(0.3, 1.0))
        elif name == "mouthClose":   # lips together while the jaw hangs open
            j = e.u(0.2, 0.6)
            e.set("jawOpen", max(e.get("jawOpen"), j))
            e.set("mouthClose", j * e.u(0.6, 1.0))
        else:
            e.set(name, e.u(0.3, 1.0))


def _talk(e):
    e.set("jawOpen", e.u(0.0, 0.45))
    for name, prob, hi in (("mouthFunnel", 0.3, 0.4), ("mouthPucker", 0.3, 0.4), ("mouthRollLower", 0.15, 0.6)):
        if e.p(prob):
            e.set(name, e.u(0.0, hi))
    for stem, prob, hi in (("mouthLowerDown", 0.4, 0.5), ("mouthUpperUp", 0.3, 0.4), ("mouthStretch", 0.2, 0.4),
                           ("mouthSmile", 0.3, 0.3), ("browInnerUp", 0.3, 0.4)):
        if e.p(prob):
            e.both(stem, e.u(0.0, hi))
    if e.p(0.2):
        e.set("mouthClose", e.get("jawOpen") * e.u(0.0, 1.0))


def _sparse_mix(e):
    pool = [i for i, n in enumerate(e.names) if not n.startswith("eyeLook")]
    for i in e.rng.choice(pool, size=e.rng.integers(2, 7), replace=False):
        e.w[i] = e.u(0.1, 1.0)


_EXPRESSION_COMPONENTS = {
    "neutral": _neutral, "blink": _blink, "wink": _wink, "smile": _smile, "smirk": _smirk, "jaw_open": _jaw_open,
    "jaw_open_pucker": _jaw_open_pucker, "pucker": _pucker, "brow_raise": _brow_raise, "frown": _frown,
    "sneer": _sneer, "cheek_puff": _cheek_puff, "mouth_sideways": _mouth_sideways, "lips": _lips, "talk": _talk,
    "sparse_mix": _sparse_mix,
}


def gaze_to_eye_look(gaze_rad: np.ndarray) -> dict[str, float]:
    """Eyeball angles (2, 2) [yaw, pitch] (left, right eye) -> the model's eight eyeLook weights.

    The mapping of engine.gaze.eye_look_weights (linear up to FULL_LOOK_YAW / FULL_LOOK_PITCH),
    so the runtime reads back what synthesis rendered.
    """
    (yl, pl), (yr, pr) = gaze_rad
    h = lambda a: float(np.clip(a / FULL_LOOK_YAW, 0.0, 1.0))     # noqa: E731
    v = lambda a: float(np.clip(a / FULL_LOOK_PITCH, 0.0, 1.0))   # noqa: E731
    return {"eyeLookOut_L": h(yl), "eyeLookIn_L": h(-yl), "eyeLookDown_L": v(pl), "eyeLookUp_L": v(-pl),
            "eyeLookOut_R": h(-yr), "eyeLookIn_R": h(yr), "eyeLookDown_R": v(pr), "eyeLookUp_R": v(-pr)}


def sample_expression(rng: np.random.Generator, names, kind: str | None = None):
    """(expression (M,) float32 in [0, 1], gaze_rad (2, 2) float32, kind) from EXPRESSION_MIXTURE.

    kind forces one component (for tests and inspection). Gaze angles stay inside the
    linear range of the eyeLook mapping, so the eyeLook weights and the gaze agree.
    """
    if kind is None:
        kind = EXPRESSION_KINDS[rng.choice(len(EXPRESSION_KINDS), p=np.array(list(EXPRESSION_MIXTURE.values())))]
    e = _Expr(tuple(names), rng)
    _EXPRESSION_COMPONENTS[kind](e)
    eyes_busy = kind in ("blink", "wink")
    if not eyes_busy and e.p(PARTIAL_BLINK_PROBABILITY):
        e.both("eyeBlink", e.u(0.2, 0.6), 0.1)
    if e.p(NOISE_PROBABILITY):
        pool = [i for i, n in enumerate(e.names) if not (n.startswith("eyeLook") or n.startswith("eyeBlink"))]
        pick = e.rng.choice(pool, size=len(pool) // 4, replace=False)
        e.w[pick] += np.abs(e.rng.normal(0.0, 0.04 if kind == "neutral" else 0.06, size=len(pick)))
    for a, b in ANTAGONISTS:
        if a in e.index and b in e.index:
            e.set(a if e.get(a) < e.get(b) else b, 0.0)
    if "mouthClose" in e.index:
        e.set("mouthClose", min(e.get("mouthClose"), e.get("jawOpen")))
    gaze = np.zeros((2, 2))
    if not eyes_busy and e.p(GAZE_PROBABILITY):
        yaw = e.u(-1.0, 1.0) * FULL_LOOK_YAW * 0.95
        pitch = e.u(-1.0, 1.0) * FULL_LOOK_PITCH * 0.95
        verge = e.rng.normal(0.0, np.radians(1.5))
        gaze = np.array([[yaw - verge, pitch], [yaw + verge, pitch]])
        gaze = np.clip(gaze, -np.array([FULL_LOOK_YAW, FULL_LOOK_PITCH]), np.array([FULL_LOOK_YAW, FULL_LOOK_PITCH]))
    for n, v in gaze_to_eye_look(gaze).items():
        if n in e.index:
            e.set(n, v)
    return np.clip(e.w, 0.0, 1.0).astype(np.float32), gaze.astype(np.float32), kind


# ----------------------------------------------------------------------------- per-model assets


#: Materials synthesis does not draw (the iris spheres sit inside the sclera; the rest are overlays).
UNDRAWN_MATERIALS = ("M_IrisLeft", "M_IrisRight", "M_LacrimalFluid", "M_EyeBlend", "M_EyeOcclusion")


@dataclass
class SynthesisAssets:
    """What synthesis precomputes once per model and correspondence (all rest-mesh, model space, cm)."""

    model: FaceModel
    correspondence: LandmarkCorrespondence
    draw_triangles: np.ndarray      # (T', 3) int32: the opaque surfaces (iris spheres sit inside the sclera)
    face_region: np.ndarray         # (T',) bool: front of the face, eyes and mouth (not scalp, ears, neck)
    skin_vertices: np.ndarray       # (V,) bool
    lip_weight: np.ndarray          # (V,) [0, 1]
    brow_weight: np.ndarray         # (V,) [0, 1]
    mouth_ao: np.ndarray            # (V,) [0, 1] darkening deep inside the mouth
    scalp_height: np.ndarray        # (V,) cm above the brows (their mean height)
    scalp_depth: np.ndarray         # (V,) cm behind the forehead
    eye_vertices: tuple             # per eye (left, right): eyeball vertex ids
    eye_centre: np.ndarray          # (2, 3) eyeball sphere centres
    sclera_vertices: tuple          # per eye: sclera vertex ids
    sclera_angle: tuple             # per eye: angle (rad) of each sclera vertex from the iris centre direction
    iris_angle: np.ndarray          # (2,) rad: the iris's angular radius, from MediaPipe's iris ring
    lashes_vertices: np.ndarray
    teeth_vertices: np.ndarray
    gums_vertices: np.ndarray
    ear_vertices: np.ndarray        # (2,) the 68-point jaw ends (0, 16), at the ears: glasses temples end there

    @classmethod
    def build(cls, model: FaceModel, corr: LandmarkCorrespondence) -> "SynthesisAssets":
        rest = model.neutral.astype(np.float64)
        V = len(rest)
        keep = ~model.material_mask(*UNDRAWN_MATERIALS)
        tri_ids = np.flatnonzero(keep)
        tris = model.triangles[tri_ids].astype(np.int32)
        mat = model.triangle_material[tri_ids]
        face_mat = model.materials.index("M_Face")
        inner = model.material_mask("M_Teeth", "M_GumsTongue", "M_ScleraLeft", "M_ScleraRight", "M_EyeLashes")
        front = (mat == face_mat) & (tris.max(axis=1) < FACE_VERTICES.stop)
        # the face region: front skin in front of the ears (z > ear z) plus eyes and mouth
        lm68 = rest[model.landmark68_vertices]
        ear_z = lm68[[0, 16], 2].mean()
        centroid_z = rest[tris].mean(axis=1)[:, 2]
        face_region = (front & (centroid_z > ear_z + 1.0)) | inner[tri_ids]
        skin = np.zeros(V, bool)
        skin[model.material_vertices("M_Face", "M_BackHead")] = True

        def poly_weight(poly_xy, verts, soft_cm):
            """Soft inside-ness of the vertices' xy in a polygon: 1 inside, fading over soft_cm outside."""
            contour = poly_xy.astype(np.float32).reshape(-1, 1, 2)
            d = np.array([cv2.pointPolygonTest(contour, (float(x), float(y)), True) for x, y in rest[verts, :2]])
            return np.clip(1.0 + d / soft_cm, 0.0, 1.0)

        front_verts = np.flatnonzero(skin & (rest[:, 2] > lm68[48:60, 2].min() - 1.5))
        lip_weight = np.zeros(V)
        lip_weight[front_verts] = poly_weight(lm68[48:60, :2], front_verts, 0.25)
        brow_weight = np.zeros(V)
        brow_verts = np.flatnonzero(skin & (rest[:, 2] > lm68[17:27, 2].min() - 1.0)
                                    & (np.arange(V) < FACE_VERTICES.stop))
        for idx in (range(17, 22), range(22, 27)):
            b = lm68[list(idx), :2]
            # a band along the brow line, thickest at the end nearer the nose
            thick = np.linspace(0.4, 1.0, len(b)) if abs(b[0, 0]) > abs(b[-1, 0]) else np.linspace(1.0, 0.4, len(b))
            top = b + np.array([0.0, 0.3]) * thick[:, None]
            bottom = b - np.array([0.0, 0.45]) * thick[:, None]
            poly = np.concatenate([top, bottom[::-1]])
            brow_weight[brow_verts] = np.maximum(brow_weight[brow_verts], poly_weight(poly, brow_verts, 0.2))
        # mouth interior: darker the deeper behind the lips (ambient occlusion, roughly)
        mouth = np.zeros(V, bool)
        mouth[model.material_vertices("M_Teeth", "M_GumsTongue")] = True
        mouth[11248:13294] = True   # the mouth socket (upstream vertex ranges)
        lip_z = lm68[48:60, 2].max()
        mouth_ao = np.ones(V)
        mouth_ao[mouth] = np.clip(1.0 - (lip_z - rest[mouth, 2]) / 3.5, 0.12, 1.0) ** 1.5
        brow_y = lm68[17:27, 1].mean()
        scalp_height = rest[:, 1] - brow_y
        scalp_depth = rest[:, 2].max() - rest[:, 2]
        pts = barycentric_points(rest, model.triangles, corr.triangle, corr.barycentric)
        eye_vertices, sclera_vertices, sclera_angle, centres, iris_angle = [], [], [], [], []
        for side in ("Left", "Right"):
            sclera = model.material_vertices("M_Sclera" + side)
            eyeball = model.material_vertices("M_Sclera" + side, "M_Iris" + side)
            c = sphere_centre(rest[sclera])
            iris_idx = 468 if np.sign(pts[468, 0]) == np.sign(c[0]) else 473
            front_dir = _unit(pts[iris_idx] - c)
            ring = np.array([np.arccos(np.clip(_unit(pts[j] - c) @ front_dir, -1, 1))
                             for j in range(iris_idx + 1, iris_idx + 5)])
            iris_angle.append(np.sort(ring)[-2:].mean())   # the horizontal pair: the lids cut the vertical
            d = rest[sclera] - c
            sclera_angle.append(np.arccos(np.clip(d @ front_dir / np.linalg.norm(d, axis=1), -1, 1)))
            eye_vertices.append(eyeball)
            sclera_vertices.append(sclera)
            centres.append(c)
        return cls(model=model, correspondence=corr, draw_triangles=tris, face_region=face_region,
                   skin_vertices=skin, lip_weight=lip_weight.astype(np.float32),
                   brow_weight=brow_weight.astype(np.float32), mouth_ao=mouth_ao.astype(np.float32),
                   scalp_height=scalp_height.astype(np.float32), scalp_depth=scalp_depth.astype(np.float32),
                   eye_vertices=tuple(eye_vertices), eye_centre=np.array(centres),
                   sclera_vertices=tuple(sclera_vertices), sclera_angle=tuple(sclera_angle),
                   iris_angle=np.array(iris_angle), lashes_vertices=model.material_vertices("M_EyeLashes"),
                   teeth_vertices=model.material_vertices("M_Teeth"),
                   gums_vertices=model.material_vertices("M_GumsTongue"),
                   ear_vertices=model.landmark68_vertices[[0, 16]])


def _unit(v):
    return v / np.linalg.norm(v)


# ----------------------------------------------------------------------------- geometry


def posed_vertices(assets: SynthesisAssets, identity: np.ndarray, expression: np.ndarray,
                   gaze_rad: np.ndarray) -> np.ndarray:
    """(V, 3) cm model-space vertices: the model's, with each eyeball turned by its gaze.

    The model's eyeLook shapes move only the lids; a real eye turns, so the eyeball
    (sclera and iris) rotates by Ry(yaw) · Rx(pitch) about its sphere centre, which
    identity and expression carry along with the eyeball's mean displacement.
    """
    model = assets.model
    v = model.vertices(identity, expression)
    for i in range(2):
        if not np.any(gaze_rad[i]):
            continue
        ids = assets.eye_vertices[i]
        c = assets.eye_centre[i] + (v[ids] - model.neutral[ids]).mean(axis=0)
        Rg = euler_yxz(float(gaze_rad[i, 0]), float(gaze_rad[i, 1]), 0.0)
        v[ids] = ((v[ids] - c) @ Rg.T + c).astype(np.float32)
    return v


def landmark_points(assets: SynthesisAssets, vertices: np.ndarray) -> np.ndarray:
    """(478, 3) the correspondence's surface points on a mesh (V, 3)."""
    c = assets.correspondence
    return barycentric_points(vertices, assets.model.triangles, c.triangle, c.barycentric)


# ----------------------------------------------------------------------------- appearance


def vertex_albedo(assets: SynthesisAssets, rng: np.random.Generator):
    """(albedo (V, 3) float32 linear RGB, params dict) of one random person.

    Skin: a tone between SKIN_TONES_SRGB anchors with a red/yellow tilt, a few
    smooth random fields over the rest mesh (blotchiness), and per-vertex speckle.
    Lips redder and darker inside the 68-point lip polygon; brows and the scalp above
    a random hairline in the hair colour (8% bald); eyes: white-ish sclera with an
    iris (random colour) and pupil painted by angle from the iris direction; teeth
    off-white, gums red, lashes dark; the mouth interior darkened with depth.
    """
    a = assets
    V = a.model.n_vertices
    rest = a.model.neutral
    tone = rng.uniform(0.0, 1.0)
    x = tone * (len(SKIN_TONES_SRGB) - 1)
    k = min(int(x), len(SKIN_TONES_SRGB) - 2)
    skin_srgb = (SKIN_TONES_SRGB[k] * (k + 1 - x) + SKIN_TONES_SRGB[k + 1] * (x - k)) / 255.0
    skin = srgb_to_linear(skin_srgb) * np.exp(rng.normal(0, [0.05, 0.03, 0.06]))
    skin = np.clip(skin, 0.005, 0.9).astype(np.float32)
    albedo = np.tile(skin, (V, 1))
    # low-frequency variation: random plane waves over the rest positions, wavelengths 4-15 cm
    field = np.zeros((V, 3))
    for _ in range(4):
        w = _unit(rng.normal(size=3)) * 2 * np.pi / rng.uniform(4.0, 15.0)
        wave = np.sin(rest @ w + rng.uniform(0, 2 * np.pi))
        field += wave[:, None] * (rng.normal(0, 0.06) + rng.normal(0, 0.025, 3))
    field += rng.normal(0, 0.03, (V, 1))   # speckle (pores, freckles) at the mesh's ~2 mm spacing
    albedo *= np.exp(field).astype(np.float32)
    # hair (scalp, brows, lashes)
    hair_srgb = HAIR_COLOURS_SRGB[rng.choice(len(HAIR_COLOURS_SRGB), p=HAIR_COLOUR_WEIGHTS)] / 255.0
    hair = srgb_to_linear(np.clip(hair_srgb * np.exp(rng.normal(0, 0.08, 3)), 0, 1))
    w_hair = np.zeros(V, np.float32)
    if rng.random() > 0.08:
        hairline = rng.uniform(3.0, 6.0)       # cm above the brows at the front
        slope = rng.uniform(0.25, 0.55)        # the line drops this much per cm towards the back
        h = (a.scalp_height - hairline + slope * a.scalp_depth) / 0.6
        w_hair = (1.0 / (1.0 + np.exp(-h))) * a.skin_vertices * rng.uniform(0.85, 1.0)
        w_hair[a.lip_weight > 0] = 0.0
        albedo = albedo * (1 - w_hair[:, None]) + hair * w_hair[:, None]
    brow_hair = srgb_to_linear(np.clip(hair_srgb * rng.uniform(0.5, 0.9), 0, 1)) if hair_srgb.mean() > 0.5 \
        else hair
    wb = (a.brow_weight * rng.uniform(0.55, 0.95))[:, None]
    albedo = albedo * (1 - wb) + brow_hair * wb
    lips = skin * np.array([1.0, 0.62, 0.68]) * rng.uniform(0.6, 0.95)
    wl = (a.lip_weight * rng.uniform(0.6, 1.0))[:, None]
    albedo = albedo * (1 - wl) + lips * wl
    # eyes, mouth
    albedo[a.lashes_vertices] = skin * 0.35 + hair * 0.25
    albedo[a.teeth_vertices] = srgb_to_linear(np.array([0.92, 0.89, 0.80]) * rng.uniform(0.8, 1.0))
    albedo[a.gums_vertices] = srgb_to_linear(np.array([0.72, 0.35, 0.35]) * rng.uniform(0.8, 1.0))
    iris_srgb = IRIS_COLOURS_SRGB[rng.choice(len(IRIS_COLOURS_SRGB), p=IRIS_COLOUR_WEIGHTS)] / 255.0
    iris = srgb_to_linear(np.clip(iris_srgb * np.exp(rng.normal(0, 0.1, 3)), 0, 1))
    sclera = srgb_to_linear(np.array([0.93, 0.88, 0.85]) * rng.uniform(0.8, 1.0))
    pupil_frac = rng.uniform(0.3, 0.5)
    for i in range(2):
        ang = a.sclera_angle[i]
        r = ang / a.iris_angle[i]
        col = np.where((r < 1.0)[:, None], iris, sclera)
        col = np.where((r > 0.85)[:, None] & (r < 1.05)[:, None], iris * 0.5, col)   # limbal ring
        col = np.where((r < pupil_frac)[:, None], np.float32(0.01), col)
        albedo[a.sclera_vertices[i]] = col
    albedo *= a.mouth_ao[:, None]
    params = {"skin_rgb": skin.astype(np.float32), "hair_rgb": hair.astype(np.float32), "skin_tone": float(tone),
              "hair_weight": w_hair.astype(np.float32)}
    return np.clip(albedo, 0.0, 1.0).astype(np.float32), params


def directional_sh(direction: np.ndarray, rgb) -> np.ndarray:
    """(9, 3) SH irradiance of a distant light of irradiance rgb (3,) from unit direction (3,)
    (pointing from the surface to the light): E(n) ≈ rgb · max(n · direction, 0)."""
    return SH_BAND_LAMBERT[:, None] * sh_basis_np(np.asarray(direction, np.float64))[:, None] \
        * np.asarray(rgb, np.float64)[None, :]


def sample_lighting(rng: np.random.Generator):
    """(sh (9, 3) camera-space SH irradiance, key light direction (3,), key intensity (3,)).

    An ambient term, a key light mostly from the front and above, sometimes a fill
    light; each light's irradiance is projected onto the SH basis with the Lambertian
    band factors, so the coefficients are physically consistent (dominant DC,
    directional band 1, small band 2). A colour cast (white balance) and exposure
    multiply the whole: they live in the label, since they are linear in it.
    """
    def direction(az_deg, el_deg):
        az, el = np.radians(az_deg), np.radians(el_deg)
        # camera space: x right, y down, -z towards the camera; el > 0 is from above
        return np.array([np.sin(az) * np.cos(el), -np.sin(el), -np.cos(az) * np.cos(el)])

    ambient = rng.uniform(0.2, 0.6)
    sh = np.zeros((9, 3))
    sh[0] = ambient / SH_C0 * np.exp(rng.normal(0, 0.05, 3))
    key_dir = direction(rng.uniform(-80, 80), rng.uniform(-15, 65))
    key = rng.uniform(0.3, 1.0) * np.exp(rng.normal(0, 0.06, 3))
    sh += directional_sh(key_dir, key)
    if rng.random() < 0.5:
        fill_dir = direction(rng.uniform(-150, 150), rng.uniform(-40, 60))
        sh += directional_sh(fill_dir, rng.uniform(0.0, 0.4) * np.ones(3))
    sh[4:] += rng.normal(0, 0.03, (5, 3)) * sh[0].mean()
    warm = rng.normal(0.0, 0.06)
    exposure = np.exp(rng.normal(0.0, 0.2))
    sh *= exposure * np.array([1.0 + warm, 1.0, 1.0 - warm])
    return sh.astype(np.float32), key_dir, key * exposure


# ----------------------------------------------------------------------------- backgrounds


def procedural_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float32 sRGB in [0, 1]: a gradient, smooth noise, or blurred shapes."""
    kind = rng.integers(3)
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    g = np.cos(ang) * ramp[None, :] + np.sin(ang) * ramp[:, None]
    g = (g - g.min()) / max(np.ptp(g), 1e-6)
    img = (c0 * (1 - g[..., None]) + c1 * g[..., None]).astype(np.float32)
    if kind == 1:
        cells = rng.integers(2, 12)
        noise = rng.uniform(0, 1, (cells, cells, 3)).astype(np.float32)
        noise = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
        img = np.clip(0.4 * img + 0.6 * noise, 0, 1)
    elif kind == 2:
        for _ in range(rng.integers(3, 15)):
            col = tuple(float(c) for c in rng.uniform(0, 1, 3))
            p = rng.uniform(-0.2, 1.2, 2) * size
            s = rng.uniform(0.05, 0.5) * size
            if rng.random() < 0.5:
                cv2.circle(img, (int(p[0]), int(p[1])), int(s / 2), col, -1, cv2.LINE_AA)
            else:
                q = p + rng.uniform(-1, 1, 2) * s
                cv2.rectangle(img, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), col, -1, cv2.LINE_AA)
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 6.0) * size / 128)
    return np.clip(img, 0, 1).astype(np.float32)


class BackgroundBank:
    """Real photos and video frames to cut background patches from, with their faces boxed out.

    images: list of (H, W, 3) uint8 RGB; face_boxes: per image (n, 4) [x0, y0, x1, y1] px,
    already grown to cover hair and chin. Patches never overlap a box.
    """

    def __init__(self, images: list, face_boxes: list):
        self.images = images
        self.face_boxes = [np.asarray(b, np.float32).reshape(-1, 4) for b in face_boxes]

    def __len__(self):
        return len(self.images)

    @classmethod
    def from_data_dir(cls, data_dir: str | Path | None = None, frames_per_video: int = 8, max_side: int = 640,
                      grow: float = 1.8) -> "BackgroundBank":
        """Frames of data_dir/videos/*.mp4 (evenly spread) and data_dir/images/**; faces found with
        MediaPipe's full-range detector and boxed out (grown by `grow`). Empty when the folder is missing."""
        data_dir = Path(data_dir) if data_dir else DEFAULT_DATA_DIR
        images = []
        for path in sorted((data_dir / "videos").glob("*.mp4")):
            cap = cv2.VideoCapture(str(path))
            n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            for k in np.linspace(0, max(n - 1, 0), frames_per_video).astype(int):
                cap.set(cv2.CAP_PROP_POS_FRAMES, int(k))
                ok, frame = cap.read()
                if ok:
                    images.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            cap.release()
        for path in sorted((data_dir / "images").rglob("*")):
            if path.suffix.lower() in (".jpg", ".jpeg", ".png", ".ppm", ".bmp"):
                img = cv2.imread(str(path), cv2.IMREAD_COLOR)
                if img is not None:
                    images.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
        out = []
        for img in images:
            s = max_side / max(img.shape[:2])
            out.append(cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA) if s < 1 else img)
        from mediapipe.python.solutions import face_detection

        with face_detection.FaceDetection(model_selection=1, min_detection_confidence=0.3) as det:
            return cls(out, [detect_faces(img, grow, det) for img in out])

    def sample(self, rng: np.random.Generator, size: int, tries: int = 100) -> np.ndarray | None:
        """(size, size, 3) float32 sRGB patch clear of faces, or None when none was found."""
        for _ in range(tries):
            i = rng.integers(len(self.images))
            img, boxes = self.images[i], self.face_boxes[i]
            h, w = img.shape[:2]
            side = rng.uniform(0.12, 0.5) * min(h, w)
            x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
            x1, y1 = x0 + side, y0 + side
            if len(boxes) and np.any((boxes[:, 0] < x1) & (boxes[:, 2] > x0) & (boxes[:, 1] < y1) & (boxes[:, 3] > y0)):
                continue
            patch = img[int(y0):int(y1), int(x0):int(x1)]
            if rng.random() < 0.5:
                patch = patch[:, ::-1]
            return cv2.resize(np.ascontiguousarray(patch), (size, size), interpolation=cv2.INTER_LINEAR
                              ).astype(np.float32) / 255.0
        return None


def detect_faces(rgb: np.ndarray, grow: float = 1.8, detector=None) -> np.ndarray:
    """(n, 4) boxes [x0, y0, x1, y1] px of every face MediaPipe's full-range detector finds (score >= 0.3),
    grown about their centre by `grow` and a further half height downwards (chin, neck).
    detector: an open mediapipe FaceDetection to reuse (one is made when None)."""
    if detector is None:
        from mediapipe.python.solutions import face_detection

        with face_detection.FaceDetection(model_selection=1, min_detection_confidence=0.3) as det:
            return detect_faces(rgb, grow, det)
    h, w = rgb.shape[:2]
    result = detector.process(np.ascontiguousarray(rgb))
    boxes = []
    for d in result.detections or []:
        b = d.location_data.relative_bounding_box
        cx, cy = (b.xmin + b.width / 2) * w, (b.ymin + b.height / 2) * h
        bw, bh = b.width * w * grow, b.height * h * grow
        boxes.append([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2 + b.height * h * 0.5])
    return np.array(boxes, np.float32).reshape(-1, 4)


def default_background_bank(data_dir: str | Path | None = None) -> BackgroundBank | None:
    """The bank from ../shared/data (a few seconds to build: keep it); None when there is no media."""
    folder = Path(data_dir or DEFAULT_DATA_DIR)
    bank = BackgroundBank.from_data_dir(data_dir) if folder.is_dir() else None
    return bank if bank is not None and len(bank) else None


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SynthesisConfig:
    """Sampling ranges and nuisance probabilities (angles in degrees, distances in cm)."""

    out_px: int = CROP_PX
    yaw_deg: float = 60.0
    yaw_uniform_share: float = 0.3            # of samples with yaw uniform over +-yaw_deg; the rest ~N(0, 25 deg)
    pitch_deg: float = 35.0
    roll_deg: float = 30.0
    distance_cm: tuple = (35.0, 120.0)
    frame_sizes: tuple = ((640, 480), (1280, 720), (1920, 1080), (512, 512), (480, 640), (720, 1280),
                          (960, 540), (800, 600))
    focal_jitter_probability: float = 0.25    # else focal = max(w, h) px, the pipeline's default
    frame_edge_probability: float = 0.15      # the crop box may leave the frame (black band); else it is inside
    crop_centre_jitter: float = 0.04          # std of the box centre, fraction of the side (tracker noise)
    crop_scale_jitter: float = 0.06           # std of log side
    real_background_probability: float = 0.5
    glasses_probability: float = 0.25
    hand_probability: float = 0.15
    hair_probability: float = 0.3             # strands (and sometimes a fringe) over the forehead
    hair_volume_probability: float = 0.8      # hair standing off the painted scalp, sometimes long
    torso_probability: float = 0.75           # shoulders and clothes below the neck (background, behind the head)
    object_probability: float = 0.08
    specular_probability: float = 0.5
    blur_probability: float = 0.4
    motion_blur_probability: float = 0.1
    noise_probability: float = 0.8
    jpeg_probability: float = 0.5
    tone_jitter_probability: float = 0.3
    flat_background: tuple | None = None      # an sRGB colour in [0, 1] instead of random backgrounds (tests)

    def clean(self) -> "SynthesisConfig":
        """No occluders and no post effects: the image is exactly the labels' image formation."""
        return replace(self, glasses_probability=0.0, hand_probability=0.0, hair_probability=0.0,
                       hair_volume_probability=0.0, torso_probability=0.0,
                       object_probability=0.0, specular_probability=0.0, blur_probability=0.0,
                       motion_blur_probability=0.0, noise_probability=0.0, jpeg_probability=0.0,
                       tone_jitter_probability=0.0)


# ----------------------------------------------------------------------------- rendering


def interpolate_many(frags, triangles: np.ndarray, *attributes: np.ndarray) -> list[np.ndarray]:
    """engine.rasterizer.interpolate for several per-vertex attributes (V, C) at once -> (H, W, C) each,
    zero off the mesh; the covered pixels' corners are looked up once."""
    m = frags.mask
    corners = triangles[frags.triangle_id[m]]          # (P, 3)
    b = frags.barycentric[m]                            # (P, 3)
    packed = np.concatenate([np.asarray(a, np.float32) for a in attributes], axis=1)   # one gather for all
    c = packed[corners]                                 # (P, 3, C)
    values = c[:, 0] * b[:, 0:1] + c[:, 1] * b[:, 1:2] + c[:, 2] * b[:, 2:3]
    out, k = [], 0
    for attr in attributes:
        o = np.zeros(m.shape + (attr.shape[1],), np.float32)
        o[m] = values[:, k:k + attr.shape[1]]
        out.append(o)
        k += attr.shape[1]
    return out


def shade_pixels(frags, vertices_cam: np.ndarray, triangles: np.ndarray, albedo: np.ndarray, sh: np.ndarray):
    """Linear colour (H, W, 3) = albedo · (sh_basis(n) @ sh) per covered pixel, 0 elsewhere; also the
    per-pixel unit normals (H, W, 3) and camera-space positions (H, W, 3)."""
    normals = vertex_normals(np.asarray(vertices_cam, np.float64), triangles)
    n, rho, pos = interpolate_many(frags, triangles, normals, albedo, vertices_cam)
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    colour = rho * (sh_basis_np(n) @ sh)
    colour[~frags.mask] = 0.0
    return colour, n, pos


def _supersample_camera(K: np.ndarray, factor: int) -> np.ndarray:
    """K of an image `factor` times finer: pixel centres u' = factor · u + (factor - 1) / 2."""
    S = np.array([[factor, 0.0, (factor - 1) / 2.0], [0.0, factor, (factor - 1) / 2.0], [0.0, 0.0, 1.0]])
    return S @ K


def _sample_pose(rng, cfg: SynthesisConfig):
    """(yaw, pitch, roll) radians: mostly near frontal, a fifth to a third uniform over the full range."""
    def angle(limit, std, p_uniform):
        a = rng.uniform(-limit, limit) if rng.random() < p_uniform else rng.normal(0.0, std)
        return np.radians(float(np.clip(a, -limit, limit)))

    return angle(cfg.yaw_deg, 25.0, cfg.yaw_uniform_share), angle(cfg.pitch_deg, 12.0, 0.2), angle(cfg.roll_deg, 10.0, 0.2)


def _sample_camera_and_translation(rng, cfg, landmarks_model, R):
    """Frame size, K (3, 3) and t (3,) cm. The face (>= 97% of its landmarks) is inside the frame,
    and, but for cfg.frame_edge_probability of the samples, so is the whole crop box around it."""
    w, h = cfg.frame_sizes[rng.integers(len(cfg.frame_sizes))]
    f = float(max(w, h))
    if rng.random() < cfg.focal_jitter_probability:
        f *= float(np.exp(rng.uniform(-0.25, 0.25)))
    K = default_camera_matrix(w, h, f)
    lo, hi = np.log(cfg.distance_cm[0]), np.log(cfg.distance_cm[1])
    z = float(np.exp(rng.uniform(lo, hi)))
    at_edge = rng.random() < cfg.frame_edge_probability
    for attempt in range(30):
        u, v = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        if attempt == 29:
            u, v = w / 2, h / 2
        t = z * np.linalg.inv(K) @ np.array([u, v, 1.0])
        uv = project(landmarks_model @ R.T + t, K)
        inside = (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h)
        if inside.mean() < 0.97:
            continue
        cx, cy, side = crop_box(uv)
        box_inside = cx - side / 2 >= 0 and cy - side / 2 >= 0 and cx + side / 2 <= w and cy + side / 2 <= h
        if at_edge or box_inside:
            break
    return (w, h), K, t


def synthesize(rng: np.random.Generator, model: FaceModel, correspondence: LandmarkCorrespondence,
               out_px: int = CROP_PX, config: SynthesisConfig | None = None,
               backgrounds: BackgroundBank | None = None, expression_kind: str | None = None,
               assets: SynthesisAssets | None = None, identity: np.ndarray | None = None,
               albedo: tuple[np.ndarray, dict] | None = None, source: int = SOURCE_SYNTHETIC) -> dict:
    """One training sample (fields in the module docstring) drawn from rng.

    backgrounds: real patches for config.real_background_probability of the samples
    (procedural ones otherwise, or always when None). expression_kind forces a mixture component.
    assets: SynthesisAssets.build(model, correspondence), passed in by callers that draw many
    samples (building them costs about as much as a sample).
    identity (60,) / albedo (per-vertex (V, 3) linear RGB, params dict with skin_rgb, hair_rgb,
    hair_weight): a given person instead of a random one (trainers.inverse_render's lifted real
    faces); albedo_seed is then -1, as no seed rebuilds that albedo. source: the sample's source field.
    """
    cfg = replace(config or SynthesisConfig(), out_px=out_px)
    a = assets if assets is not None else SynthesisAssets.build(model, correspondence)
    ss = SUPERSAMPLE
    S = out_px * ss
    # --- who, what expression, where
    if identity is None:
        identity = np.clip(rng.normal(0.0, 1.0, N_IDENTITY), -3.0, 3.0).astype(np.float32)
    identity = np.asarray(identity, np.float32)
    expression, gaze, kind = sample_expression(rng, model.expression_names, expression_kind)
    if albedo is None:
        albedo_seed = int(rng.integers(0, 2 ** 63 - 1))
        albedo, albedo_params = vertex_albedo(a, np.random.default_rng(albedo_seed))
    else:
        albedo_seed = -1
        albedo, albedo_params = albedo
    sh, key_dir, key_rgb = sample_lighting(rng)
    verts = posed_vertices(a, identity, expression, gaze)
    lm3d = landmark_points(a, verts)
    yaw, pitch, roll = _sample_pose(rng, cfg)
    R = model_to_camera(yaw, pitch, roll)
    (fw, fh), K, t = _sample_camera_and_translation(rng, cfg, lm3d, R)
    # --- the crop, as the runtime makes it from the 478 points, with tracker jitter
    lm_frame = project(lm3d @ R.T + t, K)
    cx, cy, side = crop_box(lm_frame)
    side *= float(np.exp(rng.normal(0.0, cfg.crop_scale_jitter)))
    cx, cy = np.array([cx, cy]) + rng.normal(0.0, cfg.crop_centre_jitter, 2) * side
    A = crop_transform(np.array([cx, cy, side]), out_px)
    K_crop = crop_camera(K, A)
    K_ss = _supersample_camera(K_crop, ss)
    # --- render at ss x the crop
    cam = (verts.astype(np.float64) @ R.T + t)
    frags = rasterize(cam, a.draw_triangles, K_ss, S, S, backend="cpu")
    linear, normals, pos = shade_pixels(frags, cam, a.draw_triangles, albedo, sh)
    if rng.random() < cfg.specular_probability:
        view = -pos / np.maximum(np.linalg.norm(pos, axis=-1, keepdims=True), 1e-9)
        half = view + key_dir
        half /= np.maximum(np.linalg.norm(half, axis=-1, keepdims=True), 1e-9)
        spec = np.clip((normals * half).sum(-1), 0, 1) ** rng.uniform(8, 40) * rng.uniform(0.02, 0.12)
        skin_px = a.skin_vertices[a.draw_triangles[np.maximum(frags.triangle_id, 0), 0]] & frags.mask
        linear += (spec * skin_px)[..., None] * key_rgb
    face = linear_to_srgb(linear)
    cover = frags.mask.astype(np.float32)
    bg = _background(rng, cfg, backgrounds, S)
    occ_rgb = np.zeros((S, S, 3), np.float32)
    occ_alpha = np.zeros((S, S), np.float32)
    flags = 0
    px_per_cm = K_ss[0, 0] / t[2]
    lm_ss = project(lm3d @ R.T + t, K_ss)
    skin_lin, hair_lin = albedo_params["skin_rgb"], albedo_params["hair_rgb"]
    # the irradiance of a surface facing the camera lights the flat occluders
    front_light = np.clip(sh_basis_np(np.array([0.0, 0.0, -1.0])) @ sh, 0.05, 3.0)
    face_px = frags.mask & a.face_region[np.maximum(frags.triangle_id, 0)]
    if rng.random() < cfg.torso_probability:
        _draw_torso(rng, bg, R, t, K_ss, (yaw, pitch, roll), front_light)
    if rng.random() < cfg.hair_volume_probability:
        # hair standing off the scalp (and hanging down when long): behind the face, over ears and neck
        hair_w = interpolate_many(frags, a.draw_triangles, albedo_params["hair_weight"][:, None])[0][..., 0]
        hair_px = frags.mask & (hair_w > 0.5)
        h_rgb, h_alpha = _hair_volume(rng, hair_px, face_px, hair_lin, front_light, px_per_cm)
        bg = bg * (1 - h_alpha[..., None]) + h_rgb * h_alpha[..., None]
        over_head = h_alpha * (frags.mask & ~face_px & ~hair_px)
        occ_rgb[:] = h_rgb
        occ_alpha[:] = over_head
    img = bg * (1 - cover[..., None]) + face * cover[..., None]
    # --- occluders, in front of everything
    if rng.random() < cfg.hair_probability:
        _draw_hair(rng, occ_rgb, occ_alpha, lm_ss, lm3d, R, t, K_ss, hair_lin, front_light, px_per_cm)
        flags |= OCCLUDER_BITS["hair"]
    if rng.random() < cfg.glasses_probability:
        _draw_glasses(rng, occ_rgb, occ_alpha, a, verts, R, t, K_ss, frags.depth_cm, front_light)
        flags |= OCCLUDER_BITS["glasses"]
    if rng.random() < cfg.hand_probability:
        _draw_hand(rng, occ_rgb, occ_alpha, lm_ss, skin_lin, front_light, px_per_cm)
        flags |= OCCLUDER_BITS["hand"]
    if rng.random() < cfg.object_probability:
        _draw_object(rng, occ_rgb, occ_alpha, lm_ss, cfg, backgrounds, S)
        flags |= OCCLUDER_BITS["object"]
    img = img * (1 - occ_alpha[..., None]) + occ_rgb * occ_alpha[..., None]
    # --- down to the crop, then the camera
    img = cv2.resize(img, (out_px, out_px), interpolation=cv2.INTER_AREA)
    in_frame = image_coverage(A, fw, fh, out_px)
    mask = (cv2.resize(cover, (out_px, out_px), interpolation=cv2.INTER_AREA) >= 0.5) & (in_frame >= 0.5)
    occ_small = cv2.resize(occ_alpha, (out_px, out_px), interpolation=cv2.INTER_AREA) >= 0.5
    img = _camera_effects(rng, cfg, img, side / out_px)
    img *= in_frame[..., None]
    image = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    # --- labels
    lm_crop = project(lm3d @ R.T + t, K_crop)
    lm_z = (lm3d @ R.T + t)[:, 2]
    ij = np.clip(np.round(lm_ss).astype(int), 0, S - 1)
    in_crop = np.all((lm_crop >= -0.5) & (lm_crop <= out_px - 0.5), axis=1)
    self_visible = in_crop & (lm_z <= frags.depth_cm[ij[:, 1], ij[:, 0]] + 0.3)
    occluded = in_crop & (occ_alpha[ij[:, 1], ij[:, 0]] >= 0.5)
    occlusion = float((face_px & (occ_alpha >= 0.5)).sum() / max(face_px.sum(), 1))
    return {
        "image": image,
        "identity": identity,
        "expression": expression,
        "gaze_rad": gaze,
        "expression_kind": np.int16(EXPRESSION_KINDS.index(kind)),
        "rotation": R.astype(np.float32),
        "translation_cm": t.astype(np.float32),
        "head_ypr_rad": yaw_pitch_roll(head_rotation(R)).astype(np.float32),
        "K_crop": K_crop.astype(np.float32),
        "K_frame": K.astype(np.float32),
        "frame_size": np.array([fw, fh], np.int32),
        "crop_affine": A.astype(np.float32),
        "sh": sh.astype(np.float32),
        "skin_rgb": skin_lin.astype(np.float32),
        "hair_rgb": hair_lin.astype(np.float32),
        "albedo_seed": np.int64(albedo_seed),
        "landmarks": lm_crop.astype(np.float32),
        "landmark_visible": self_visible,
        "landmark_occluded": occluded,
        "mask": mask.astype(np.uint8),
        "occluder_mask": occ_small.astype(np.uint8),
        "occlusion": np.float32(occlusion),
        "occluders": np.uint8(flags),
        "source": np.uint8(source),
    }


def _background(rng, cfg: SynthesisConfig, bank: BackgroundBank | None, size: int) -> np.ndarray:
    if cfg.flat_background is not None:
        return np.broadcast_to(np.asarray(cfg.flat_background, np.float32), (size, size, 3)).copy()
    if bank is not None and len(bank) and rng.random() < cfg.real_background_probability:
        patch = bank.sample(rng, size)
        if patch is not None:
            return patch
    return procedural_background(rng, size)


# ----------------------------------------------------------------------------- occluders


def _lit(albedo_lin, light, shade=1.0):
    """sRGB (3,) of an albedo under the front irradiance `light`, with an extra shading factor."""
    return linear_to_srgb(np.asarray(albedo_lin) * light * shade)


def _paint(occ_rgb, occ_alpha, mask_u8, colour, alpha=1.0):
    """Lay a colour (3,) or image (S, S, 3) over the occluder layer where mask_u8 (0-255) is set."""
    x, y, w, h = cv2.boundingRect(mask_u8)
    if w == 0 or h == 0:
        return
    roi = (slice(y, y + h), slice(x, x + w))
    m = (mask_u8[roi].astype(np.float32) * (alpha / 255.0))[..., None]
    colour = np.asarray(colour, np.float32)
    c = colour[roi] if colour.ndim == 3 else colour
    occ_rgb[roi] = occ_rgb[roi] * (1 - m) + c * m
    occ_alpha[roi] = occ_alpha[roi] + m[..., 0] * (1 - occ_alpha[roi])


def _draw_hair(rng, occ_rgb, occ_alpha, lm_ss, lm3d, R, t, K, hair_lin, light, px_per_cm):
    """Strands falling over the forehead from above the hairline, sometimes a fringe under them."""
    S = occ_alpha.shape[0]
    forehead = [162, 21, 54, 103, 67, 109, 10, 338, 297, 332, 284, 251, 389]
    line = lm_ss[forehead]
    up3 = lm3d[forehead] + np.array([0.0, 1.0, 0.0])
    up = project(up3 @ R.T + t, K) - line        # image direction of model +y, px per cm, per point
    up_mean = up.mean(axis=0)
    up_unit = up_mean / max(np.linalg.norm(up_mean), 1e-6)
    side_unit = np.array([-up_unit[1], up_unit[0]])

    def along(s):
        i = np.clip(s * (len(line) - 1), 0, len(line) - 1 - 1e-6)
        k = int(i)
        f = i - k
        return line[k] * (1 - f) + line[k + 1] * f

    base = np.asarray(hair_lin)
    if rng.random() < 0.35:   # a fringe: hair from above the forehead line down to a ragged edge
        s0, s1 = sorted(rng.uniform(0.0, 1.0, 2))
        s1 = max(s1, s0 + 0.35)
        n = 24
        ss = np.linspace(s0, min(s1, 1.0), n)
        top = np.array([along(s) + up_unit * 1.5 * px_per_cm for s in ss])
        depth = rng.uniform(1.0, 4.0) * px_per_cm
        bottom = np.array([along(s) - up_unit * (depth * (1 + 0.3 * rng.normal())) for s in ss])
        poly = np.concatenate([top, bottom[::-1]]).astype(np.int32)
        m = np.zeros((S, S), np.uint8)
        cv2.fillPoly(m, [poly], 255, cv2.LINE_AA)
        streaks = rng.uniform(0.75, 1.15, (1, S)).astype(np.float32)
        streaks = cv2.GaussianBlur(cv2.resize(streaks, (S, S)), (0, 0), 1.0)
        col = linear_to_srgb(base[None, None, :] * light * streaks[..., None])
        _paint(occ_rgb, occ_alpha, m, col)
    sweep = rng.normal(0.0, 1.2)                       # one combing direction for all strands, cm sideways
    for _ in range(rng.integers(8, 60)):
        p0 = along(rng.uniform(0, 1)) + up_unit * rng.uniform(0.0, 2.0) * px_per_cm
        length = rng.uniform(2.0, 7.0) * px_per_cm
        p2 = p0 - up_unit * length + side_unit * (sweep + rng.normal(0, 0.5)) * length / 4
        p1 = (p0 + p2) / 2 + side_unit * rng.normal(0, 0.4) * px_per_cm
        s = np.linspace(0, 1, 16)[:, None]
        curve = ((1 - s) ** 2 * p0 + 2 * (1 - s) * s * p1 + s ** 2 * p2)
        m = np.zeros((S, S), np.uint8)
        cv2.polylines(m, [np.round(curve * 4).astype(np.int32)], False, 255,
                      max(1, int(rng.uniform(0.04, 0.12) * px_per_cm)), cv2.LINE_AA, shift=2)
        _paint(occ_rgb, occ_alpha, m, _lit(base, light, rng.uniform(0.6, 1.4)), rng.uniform(0.6, 1.0))


#: Torso outline (x, y) cm in a frame at the base of the neck, facing +z like the model.
TORSO_OUTLINE_CM = np.array([(-8.5, 1.0), (-14.0, -2.5), (-20.0, -6.0), (-23.0, -12.0), (-24.0, -70.0),
                             (24.0, -70.0), (23.0, -12.0), (20.0, -6.0), (14.0, -2.5), (8.5, 1.0)])
NECK_BASE_CM = np.array([0.0, -17.5, -1.0])   # model space: behind the lowest front vertices of the neck


def _draw_torso(rng, bg, R, t, K, head_ypr, light):
    """Shoulders and clothes behind the head, turned only partly with it (people turn the head more
    than the body); a flat clothing colour with soft folds, lit like the face."""
    S = bg.shape[0]
    yaw, pitch, roll = head_ypr
    R_torso = model_to_camera(yaw * rng.uniform(0.0, 0.6) + rng.normal(0, 0.15), rng.normal(0, 0.1),
                              roll * rng.uniform(0.0, 0.5))
    anchor = R @ NECK_BASE_CM + t
    scale = rng.uniform(0.85, 1.15)
    outline = np.c_[TORSO_OUTLINE_CM * scale, np.zeros(len(TORSO_OUTLINE_CM))]
    cam = outline @ R_torso.T + anchor
    if np.any(cam[:, 2] < 5.0):
        return
    uv = project(cam, K)
    m = np.zeros((S, S), np.uint8)
    cv2.fillPoly(m, [np.round(uv * 4).astype(np.int32)], 255, cv2.LINE_AA, shift=2)
    colour = srgb_to_linear(rng.uniform(0.02, 0.9, 3) * (rng.uniform(0.3, 1.0) if rng.random() < 0.5 else 1.0))
    folds = cv2.resize(rng.uniform(0.75, 1.15, (6, 6)).astype(np.float32), (S, S), interpolation=cv2.INTER_CUBIC)
    rgb = linear_to_srgb(colour[None, None, :] * light[None, None, :] * folds[..., None])
    a = (m.astype(np.float32) / 255.0)[..., None]
    bg[:] = bg * (1 - a) + rgb * a


def _hair_volume(rng, hair_px, face_px, hair_lin, light, px_per_cm):
    """(rgb (S, S, 3), alpha (S, S)) of hair standing off the painted scalp pixels hair_px (S, S) bool:
    the scalp's silhouette grown by a random thickness, for long hair also dragged down the image,
    never over the face region face_px. Streaked along the image's vertical, ragged at the edge."""
    S = hair_px.shape[0]
    if not hair_px.any():
        return np.zeros((S, S, 3), np.float32), np.zeros((S, S), np.float32)
    r = max(int(rng.uniform(0.3, 2.5) * px_per_cm), 1)
    vol = cv2.dilate(hair_px.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    if rng.random() < 0.35:   # long: fall downwards from the grown scalp
        length = max(int(rng.uniform(5.0, 25.0) * px_per_cm), 1)
        kernel = np.zeros((2 * length + 1, 1), np.uint8)
        kernel[:length + 1] = 1   # dilation with the upper half: every pixel takes the max of those above it
        fall = cv2.dilate(vol, kernel)
        # not straight down the middle of the head: keep only what is outside the grown scalp's columns' core
        vol = np.maximum(vol, fall)
    vol = vol.astype(bool) & ~(face_px & ~hair_px)
    noise = cv2.resize(rng.uniform(0.0, 1.0, (8, 8)).astype(np.float32), (S, S), interpolation=cv2.INTER_CUBIC)
    alpha = cv2.GaussianBlur(vol.astype(np.float32), (0, 0), 1.0) * np.clip(0.7 + noise, 0, 1)
    streaks = cv2.resize(rng.uniform(0.7, 1.2, (1, S // 2)).astype(np.float32), (S, S),
                         interpolation=cv2.INTER_LINEAR)
    shade = streaks * (0.8 + 0.4 * noise)
    rgb = linear_to_srgb(np.asarray(hair_lin)[None, None, :] * light[None, None, :] * shade[..., None])
    return rgb, alpha.astype(np.float32)


def _glasses_geometry(rng, a: SynthesisAssets, verts):
    """Model-space polylines (cm) of a pair of glasses fitted to this face: rims (2, N, 3), bridge, temples."""
    centres = np.array([a.eye_centre[i] + (verts[ids] - a.model.neutral[ids]).mean(axis=0)
                        for i, ids in enumerate(a.eye_vertices)])
    half_w, half_h = rng.uniform(2.0, 2.8), rng.uniform(1.4, 2.1)
    power = rng.uniform(2.0, 5.0)          # superellipse: 2 round ... 5 rectangular
    ahead = rng.uniform(2.6, 3.4)          # lens plane in front of the eyeball centre (cornea + ~1.2 cm)
    drop = rng.uniform(-0.4, 0.3)
    th = np.linspace(0, 2 * np.pi, 48)
    c, s = np.cos(th), np.sin(th)
    ex = np.sign(c) * np.abs(c) ** (2 / power)
    ey = np.sign(s) * np.abs(s) ** (2 / power)
    rims = []
    for i, cen in enumerate(centres):
        outward = np.sign(cen[0])
        x = cen[0] + outward * 0.25 + ex * half_w
        y = cen[1] + drop + ey * half_h
        # the frame wraps round the face: the outer side sits further back
        z = cen[2] + ahead - 0.25 * np.clip(outward * ex, 0, None) * half_w / 2
        rims.append(np.stack([x, y, z], axis=1))
    rims = np.array(rims)
    inner = [np.argmin(np.abs(r[:, 0])) for r in rims]          # the rim points nearest the nose
    bridge = np.stack([rims[0][inner[0]] + [0, 0.3, 0], (rims[0][inner[0]] + rims[1][inner[1]]) / 2 + [0, 0.5, 0.2],
                       rims[1][inner[1]] + [0, 0.3, 0]])
    temples = []
    ears = verts[a.ear_vertices]
    for r in rims:
        outer = r[np.argmax(np.abs(r[:, 0]))]
        ear = ears[np.argmin(np.abs(ears[:, 0] - outer[0]))]
        end = np.array([ear[0] + np.sign(ear[0]) * 0.3, ear[1] + 1.2, ear[2] - 1.5])
        temples.append(np.linspace(outer, end, 12))
    return rims, bridge, temples


def _draw_depth_tested(m, pts_uv, pts_z, zbuf, thickness, tol_cm=0.2):
    """Draw a polyline (N, 2) px into mask m, only where it is in front of the head's depth buffer."""
    S = m.shape[0]
    seg = np.linalg.norm(np.diff(pts_uv, axis=0), axis=1)
    n = max(int(seg.sum()), 2)
    s = np.concatenate([[0], np.cumsum(seg)])
    q = np.linspace(0, s[-1], n)
    uv = np.stack([np.interp(q, s, pts_uv[:, 0]), np.interp(q, s, pts_uv[:, 1])], axis=1)
    z = np.interp(q, s, pts_z)
    ij = np.round(uv).astype(int)
    inside = (ij[:, 0] >= 0) & (ij[:, 0] < S) & (ij[:, 1] >= 0) & (ij[:, 1] < S)
    zb = np.full(n, np.inf)
    zb[inside] = zbuf[ij[inside, 1], ij[inside, 0]]
    vis = z <= zb + tol_cm
    runs = np.split(np.arange(n), np.flatnonzero(np.diff(vis.astype(int))) + 1)
    for r in runs:
        if vis[r[0]] and len(r) > 1:
            cv2.polylines(m, [np.round(uv[r] * 4).astype(np.int32)], False, 255, thickness, cv2.LINE_AA, shift=2)


def _draw_glasses(rng, occ_rgb, occ_alpha, a, verts, R, t, K, zbuf, light):
    S = occ_alpha.shape[0]
    rims, bridge, temples = _glasses_geometry(rng, a, verts)

    def to_cam(p):
        return p @ R.T + t

    thick_cm = rng.uniform(0.12, 0.45)
    px = K[0, 0] * thick_cm / t[2]
    frame_col = np.array([(0.02, 0.02, 0.02), (0.25, 0.15, 0.08), (0.6, 0.6, 0.6), (0.7, 0.55, 0.25),
                          (0.5, 0.1, 0.1), (0.1, 0.1, 0.3)][rng.integers(6)])
    # lenses first: sunglasses dark, clear lenses a faint reflection
    dark = rng.random() < 0.3
    for r in rims:
        rc = to_cam(r)
        uv = project(rc, K)
        m = np.zeros((S, S), np.uint8)
        cv2.fillPoly(m, [np.round(uv * 4).astype(np.int32)], 255, cv2.LINE_AA, shift=2)
        m[zbuf < rc[:, 2].min() - 0.3] = 0        # the nose in front of the far lens
        if dark:
            _paint(occ_rgb, occ_alpha, m, linear_to_srgb(rng.uniform(0.0, 0.05, 3)), rng.uniform(0.75, 0.95))
        else:
            _paint(occ_rgb, occ_alpha, m, np.full(3, 0.9, np.float32), rng.uniform(0.03, 0.12))
    m = np.zeros((S, S), np.uint8)
    for poly in [np.concatenate([r, r[:1]]) for r in rims] + [bridge] + list(temples):
        pc = to_cam(poly)
        _draw_depth_tested(m, project(pc, K), pc[:, 2], zbuf, max(1, int(round(px))))
    _paint(occ_rgb, occ_alpha, m, linear_to_srgb(srgb_to_linear(frame_col) * light))


def _draw_hand(rng, occ_rgb, occ_alpha, lm_ss, skin_lin, light, px_per_cm):
    """A hand over the lower face: palm, four fingers and a thumb as rounded strokes, maybe a forearm."""
    S = occ_alpha.shape[0]
    anchor = lm_ss[[152, 61, 291, 172, 397, 50, 280, 13][rng.integers(8)]]
    c = anchor + rng.normal(0, 1.5, 2) * px_per_cm
    ang = -np.pi / 2 + rng.normal(0.0, 0.7)           # fingers mostly up, the arm from below (image y is down)
    u = np.array([np.cos(ang), np.sin(ang)])          # towards the fingertips
    v = np.array([-u[1], u[0]])
    skin = skin_lin * np.exp(rng.normal(0, 0.05, 3))
    col = _lit(skin, light)
    dark = _lit(skin, light, 0.55)
    layers = []
    if rng.random() < 0.6:
        layers.append(("line", c - u * 3 * px_per_cm, c - u * 40 * px_per_cm, 6.5 * px_per_cm))
    layers.append(("ellipse", c, (4.3 * px_per_cm, 5.0 * px_per_cm), np.degrees(ang)))
    curl = rng.uniform(0.4, 1.0)
    for off, length in zip((-2.4, -0.8, 0.8, 2.4), (6.0, 7.5, 7.0, 5.5)):
        d = u + v * rng.normal(0, 0.08)
        base = c + u * 3.5 * px_per_cm + v * off * px_per_cm
        layers.append(("line", base, base + d * length * curl * px_per_cm, 1.8 * px_per_cm))
    thumb_dir = u * np.cos(0.9) + v * np.sin(0.9) * (1 if rng.random() < 0.5 else -1)
    tb = c + v * np.sign(thumb_dir @ v) * 2.8 * px_per_cm
    layers.append(("line", tb, tb + thumb_dir * 5.5 * px_per_cm, 2.1 * px_per_cm))
    grad = (np.mgrid[:S, :S][::-1].transpose(1, 2, 0) - c) @ _unit(rng.normal(size=2)) / (10 * px_per_cm)
    shade = np.clip(1.0 + 0.35 * grad, 0.6, 1.3).astype(np.float32)[..., None]
    for kind, p, q, w in layers:
        outline, fill = np.zeros((S, S), np.uint8), np.zeros((S, S), np.uint8)
        if kind == "line":
            a0, a1 = tuple(np.round(p * 4).astype(int)), tuple(np.round(q * 4).astype(int))
            cv2.line(outline, a0, a1, 255, int(w + 2), cv2.LINE_AA, shift=2)
            cv2.line(fill, a0, a1, 255, max(int(w), 1), cv2.LINE_AA, shift=2)
        else:
            centre = tuple(np.round(p * 4).astype(int))
            axes = tuple(np.round(np.asarray(q) * 4).astype(int))
            cv2.ellipse(outline, centre, (axes[0] + 4, axes[1] + 4), w, 0, 360, 255, -1, cv2.LINE_AA, shift=2)
            cv2.ellipse(fill, centre, axes, w, 0, 360, 255, -1, cv2.LINE_AA, shift=2)
        _paint(occ_rgb, occ_alpha, outline, dark[None, None, :] * shade)
        _paint(occ_rgb, occ_alpha, fill, col[None, None, :] * shade)


def _draw_object(rng, occ_rgb, occ_alpha, lm_ss, cfg, bank, S):
    """A random polygon textured with a background patch, over part of the face (cups, phones, microphones)."""
    centre = lm_ss[rng.integers(len(lm_ss))]
    r = rng.uniform(0.1, 0.3) * S
    n = rng.integers(3, 9)
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    poly = centre + np.stack([np.cos(ang), np.sin(ang)], 1) * r * rng.uniform(0.5, 1.2, (n, 1))
    m = np.zeros((S, S), np.uint8)
    cv2.fillPoly(m, [np.round(poly * 4).astype(np.int32)], 255, cv2.LINE_AA, shift=2)
    tex = _background(rng, replace(cfg, flat_background=None), bank, S)
    _paint(occ_rgb, occ_alpha, m, tex)


# ----------------------------------------------------------------------------- camera


def _camera_effects(rng, cfg: SynthesisConfig, img: np.ndarray, frame_px_per_crop_px: float) -> np.ndarray:
    """The camera and codec on a crop (S, S, 3) float sRGB, at the frame's own resolution.

    frame_px_per_crop_px (box side / out_px) < 1 means the face was small in the frame: the
    runtime crop upsamples it, so the crop is taken down to the frame's resolution, noised and
    compressed there, and brought back up bilinearly as engine.crop does. Above 1 the crop
    shrinks the frame, which averages the frame's noise: its std is divided by the factor.
    Blur (focus, motion) is drawn in crop pixels: it is about the face, whatever its size.
    """
    out = img.shape[0]
    scale = frame_px_per_crop_px
    low = max(int(round(out * scale)), 16) if scale < 0.95 else out
    x = cv2.resize(img, (low, low), interpolation=cv2.INTER_AREA) if low < out else img.copy()
    work_px_per_frame_px = 1.0 if low < out else 1.0 / scale     # < 1: a working pixel averages frame pixels
    work_px_per_crop_px = low / out
    if rng.random() < cfg.tone_jitter_probability:
        grey = x.mean(axis=2, keepdims=True)
        x = grey + (x - grey) * rng.uniform(0.8, 1.15)
        x = (x - 0.5) * rng.uniform(0.9, 1.1) + 0.5 + rng.normal(0, 0.02)
    if rng.random() < cfg.blur_probability:
        sigma = rng.uniform(0.3, 1.2) * work_px_per_crop_px
        if sigma >= 0.25:
            x = cv2.GaussianBlur(x, (0, 0), sigma)
    if rng.random() < cfg.motion_blur_probability:
        k = int(rng.integers(3, 9))
        kern = np.zeros((k, k), np.float32)
        kern[k // 2] = 1.0 / k
        rot = cv2.getRotationMatrix2D(((k - 1) / 2, (k - 1) / 2), rng.uniform(0, 180), 1.0)
        kern = cv2.warpAffine(kern, rot, (k, k))
        x = cv2.filter2D(x, -1, kern / max(kern.sum(), 1e-6))
    if rng.random() < cfg.noise_probability:
        sigma = rng.uniform(0.003, 0.025) * work_px_per_frame_px
        x = x + rng.normal(0, 1, x.shape).astype(np.float32) * sigma * np.sqrt(np.clip(x, 0.02, 1.0) / 0.25)
    x = np.clip(x, 0, 1)
    if rng.random() < cfg.jpeg_probability:
        q = int(rng.uniform(30, 95))
        ok, buf = cv2.imencode(".jpg", np.round(x * 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, q])
        x = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED).astype(np.float32) / 255.0
    if low < out:
        # back up the way engine.crop.crop_image upsamples: bilinear, pixel centres aligned
        x = cv2.resize(x, (out, out), interpolation=cv2.INTER_LINEAR)
    return x.astype(np.float32)


# ----------------------------------------------------------------------------- dataset, shards, CLI


def track_crop(landmarker, image: np.ndarray, upscale: int = 2, follower=None) -> np.ndarray | None:
    """MediaPipe's 478 landmarks (478, 2) in crop px on a crop (S, S, 3) uint8, or None.

    The crop is enlarged `upscale` times first (MediaPipe's landmark model reads 192 px): a
    128 px crop is what the run time sees, while the tracker there works on the full frame.
    follower: an engine.landmarks.MediaPipeRoiLandmarker, run on the whole crop where FaceMesh finds
    no face, its landmarks kept at a face-presence score of ROI_MIN_PRESENCE or more: what the run
    time feeds the net for a face turned past FaceMesh's reach (capture.tracking follows it so)."""
    from engine.landmarks import ROI_MIN_PRESENCE

    S = image.shape[0]
    big = cv2.resize(image, (S * upscale, S * upscale), interpolation=cv2.INTER_LINEAR)
    lm = landmarker.detect(big)
    if lm is None and follower is not None:
        lm, presence = follower.detect(big, ((S * upscale - 1) / 2.0,) * 2, float(S * upscale))
        lm = lm if presence >= ROI_MIN_PRESENCE else None
    if lm is None:
        return None
    return ((lm[:, :2] + 0.5) / upscale - 0.5).astype(np.float32)


def add_tracking(sample: dict, landmarker, follower=None) -> dict:
    """The sample with tracked_landmarks / tracked (module docstring) from `track_crop`."""
    lm = track_crop(landmarker, sample["image"], follower=follower)
    sample["tracked"] = np.bool_(lm is not None)
    sample["tracked_landmarks"] = lm if lm is not None else np.zeros((len(sample["landmarks"]), 2), np.float32)
    return sample


@dataclass
class SyntheticFaces:
    """Dataset-like: sample i is synthesize(default_rng([seed, i]), ...), so it is reproducible
    and independent of order and worker. Returns the sample dict (numpy arrays)."""

    length: int
    seed: int = 0
    out_px: int = CROP_PX
    config: SynthesisConfig = field(default_factory=SynthesisConfig)
    real_backgrounds: bool = True
    model: FaceModel | None = None
    correspondence: LandmarkCorrespondence | None = None
    track: bool = False     # run MediaPipe on each image (add_tracking): ~8 ms a sample
    follow_lost: bool = False  # where FaceMesh finds no face, follow it as the run time does (track_crop)

    def __post_init__(self):
        self.model = self.model or FaceModel.load()
        self.correspondence = self.correspondence or LandmarkCorrespondence.load()
        self.assets = SynthesisAssets.build(self.model, self.correspondence)
        self._bank = None
        self._landmarker = None
        self._follower = None

    def __len__(self):
        return self.length

    def backgrounds(self) -> BackgroundBank | None:
        if self.real_backgrounds and self._bank is None:
            self._bank = default_background_bank()
        return self._bank

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, int(i)])
        sample = synthesize(rng, self.model, self.correspondence, self.out_px, self.config, self.backgrounds(),
                            assets=self.assets)
        if self.track:
            if self._landmarker is None:
                from engine.landmarks import MediaPipeLandmarker

                self._landmarker = MediaPipeLandmarker(static=True)
            if self.follow_lost and self._follower is None:
                from engine.landmarks import MediaPipeRoiLandmarker

                self._follower = MediaPipeRoiLandmarker()
            add_tracking(sample, self._landmarker, self._follower)
        return sample


def stack_samples(samples: list[dict]) -> dict:
    """Sample dicts -> one dict of arrays with a leading sample axis (a shard)."""
    return {k: np.stack([np.asarray(s[k]) for s in samples]) for k in samples[0]}


def write_samples(samples, out_dir: Path, shard_size: int, first_shard: int = 0, sheet_count: int = 0) -> None:
    """An iterable of samples -> out_dir/shard-NNNNN.npz of shard_size each (the last may be
    shorter), and sheet.png of the first sheet_count images."""
    batch, sheet, shard = [], [], first_shard
    for s in samples:
        batch.append(s)
        if len(sheet) < sheet_count:
            sheet.append(s["image"])
        if len(batch) == shard_size:
            write_shard(out_dir / f"shard-{shard:05d}.npz", batch)
            batch, shard = [], shard + 1
    if batch:
        write_shard(out_dir / f"shard-{shard:05d}.npz", batch)
    if sheet:
        cv2.imwrite(str(out_dir / "sheet.png"), cv2.cvtColor(contact_sheet(sheet), cv2.COLOR_RGB2BGR))


def write_shard(path: str | Path, samples: list[dict]) -> None:
    """Samples -> one compressed .npz, each field stacked (N, ...)."""
    np.savez_compressed(path, **stack_samples(samples))


def read_shard(path: str | Path) -> dict:
    """A shard written by write_shard -> dict of (N, ...) arrays."""
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def contact_sheet(images: list[np.ndarray], columns: int = 8, captions: list[str] | None = None) -> np.ndarray:
    """Images (S, S, 3) uint8 -> one (rows·S, columns·S, 3) uint8 grid, optional captions per tile."""
    s = images[0].shape[0]
    rows = math.ceil(len(images) / columns)
    sheet = np.zeros((rows * s, columns * s, 3), np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, columns)
        tile = img.copy()
        if captions:
            cv2.putText(tile, captions[k], (2, s - 4), cv2.FONT_HERSHEY_PLAIN, 0.7, (255, 255, 0), 1, cv2.LINE_AA)
        sheet[r * s:(r + 1) * s, c * s:(c + 1) * s] = tile
    return sheet


def add_tracking_to_shards(directory: str | Path) -> None:
    """Rewrite every shard-*.npz in directory with tracked_landmarks / tracked (add_tracking)."""
    from tqdm import tqdm

    from engine.landmarks import MediaPipeLandmarker

    paths = sorted(Path(directory).glob("shard-*.npz"))
    if not paths:
        raise FileNotFoundError(f"no shard-*.npz in {directory}")
    with MediaPipeLandmarker(static=True) as landmarker:
        for path in tqdm(paths, desc="tracking", unit="shard"):
            shard = read_shard(path)
            tracked = [add_tracking({"image": image, "landmarks": truth}, landmarker)
                       for image, truth in zip(shard["image"], shard["landmarks"])]
            for key in ("tracked", "tracked_landmarks"):
                shard[key] = np.stack([t[key] for t in tracked])
            tmp = path.with_name("partial-" + path.name)   # outside the shard-*.npz glob until renamed
            np.savez_compressed(tmp, **shard)
            tmp.replace(path)


_WORKER: dict = {}


def _worker_init(seed: int, out_px: int, real_backgrounds: bool, length: int, track: bool = True,
                 config: SynthesisConfig | None = None, follow_lost: bool = False) -> None:
    cv2.setNumThreads(1)
    _WORKER["ds"] = SyntheticFaces(length, seed=seed, out_px=out_px, config=config or SynthesisConfig(),
                                   real_backgrounds=real_backgrounds, track=track, follow_lost=follow_lost)
    _WORKER["ds"].backgrounds()


def _worker_sample(i: int):
    t0 = time.process_time()
    s = _WORKER["ds"][i]
    return s, time.process_time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, help="number of samples")
    ap.add_argument("--out", type=Path, help="output folder for shard-XXXXX.npz and sheet.png")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="first sample index (to extend a set; a multiple of "
                    "--shard-size)")
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--out-px", type=int, default=CROP_PX)
    ap.add_argument("--workers", type=int, default=1, help="processes, one CPU thread each")
    ap.add_argument("--no-real-backgrounds", action="store_true", help="procedural backgrounds only")
    ap.add_argument("--sheet", type=int, default=32, help="samples on the contact sheet (0: none)")
    ap.add_argument("--no-track", action="store_true", help="skip MediaPipe on the images (no tracked_landmarks)")
    ap.add_argument("--add-tracking", type=Path, metavar="DIR",
                    help="instead: add tracked_landmarks / tracked to the shards already in DIR")
    ap.add_argument("--yaw-deg", type=float, default=SynthesisConfig.yaw_deg,
                    help=f"head yaw limit, degrees (default {SynthesisConfig.yaw_deg:g}; 90 reaches full profile)")
    ap.add_argument("--yaw-uniform", type=float, default=SynthesisConfig.yaw_uniform_share,
                    help="share of samples with yaw uniform over the limit, the rest near frontal "
                         f"(default {SynthesisConfig.yaw_uniform_share:g})")
    ap.add_argument("--follow-lost", action="store_true",
                    help="where FaceMesh finds no face (profiles), take the landmarks the run time's follower "
                         "would give (MediaPipe's landmark model on the crop, kept when it sees a face)")
    args = ap.parse_args(argv)
    if args.add_tracking:
        add_tracking_to_shards(args.add_tracking)
        return 0
    if args.count is None or args.out is None:
        ap.error("--count and --out are required (or --add-tracking DIR)")
    if args.start % args.shard_size:
        ap.error("--start must be a multiple of --shard-size (shards are numbered start // shard_size on)")
    import multiprocessing as mp
    import os

    from tqdm import tqdm

    args.out.mkdir(parents=True, exist_ok=True)
    # workers are spawned with one BLAS/OpenMP thread each: numpy's threads only spin on these small arrays
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    ctx = mp.get_context("spawn")
    if not (0.0 < args.yaw_deg <= 90.0) or not (0.0 <= args.yaw_uniform <= 1.0):
        ap.error("--yaw-deg must be in (0, 90] and --yaw-uniform in [0, 1]")
    config = replace(SynthesisConfig(), yaw_deg=args.yaw_deg, yaw_uniform_share=args.yaw_uniform)
    init = (args.seed, args.out_px, not args.no_real_backgrounds, args.start + args.count, not args.no_track, config,
            args.follow_lost)
    cpu_s = 0.0
    t0 = time.perf_counter()
    with ctx.Pool(max(args.workers, 1), initializer=_worker_init, initargs=init) as pool:
        stream = pool.imap(_worker_sample, range(args.start, args.start + args.count), chunksize=4)
        timed = tqdm(stream, total=args.count, desc="synthesizing", unit="sample")

        def samples():
            nonlocal cpu_s
            for s, cpu in timed:
                cpu_s += cpu
                yield s
        write_samples(samples(), args.out, args.shard_size, args.start // args.shard_size, args.sheet)
    wall = time.perf_counter() - t0
    print(f"{args.count} samples in {wall:.1f} s wall with {args.workers} worker(s) (start-up included); "
          f"{args.count / max(cpu_s, 1e-9):.1f} samples/s per CPU core ({1000 * cpu_s / args.count:.0f} ms CPU "
          f"each); shards in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
