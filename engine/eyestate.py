"""Eye closure from the eye's own pixels: a small CNN on a patch around each eye.

MediaPipe's lid landmarks follow its face prior. On a wink they keep the shut eye
half open: on the evaluation's wink takes the closed eye's lid gap stays at
0.27-0.45 of its width, where the open eye's is 0.33-0.48. The pixels show the shut
lid plainly, so EyeStateNet reads eyeBlink from a patch of each eye. The patch is cut
along the eye's corners, outer corner left. This mirrors one eye onto the other, so
one net serves both.

Training cuts the patches from the 128 px synthetic crops (trainers.train_eyes); at run time
`eye_patches` cuts them from the frame, brought down first to the resolution the face's 128 px
crop would have, so a large face gives the net no more detail than training showed it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from engine.crop import CROP_PX, crop_box, crop_transform
from engine.gaze import IRIS_CENTRES

PATCH_W, PATCH_H = 48, 24          # patch size, px
SPAN_X, SPAN_Y = 1.6, 0.8          # patch extent in eye widths (corner to corner), along and across the eye
#: Eye corners (outer, inner) of MediaPipe's 478 points, each eye's pair beside its iris in IRIS_CENTRES.
EYE_CORNERS = ((33, 133), (263, 362))
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "eyestate.onnx"


def subject_left_first(model, correspondence) -> tuple[int, int]:
    """(left, right): the index into EYE_CORNERS of the subject's left eye, then the right's (the
    model's +x side is the subject's left, as engine.gaze orders them)."""
    from engine.facemodel import barycentric_points

    iris = np.array(IRIS_CENTRES)
    pts = barycentric_points(model.neutral, model.triangles, correspondence.triangle[iris],
                             correspondence.barycentric[iris])
    return (0, 1) if pts[0, 0] > pts[1, 0] else (1, 0)


def patch_transform(landmarks_px: np.ndarray, eye: int) -> np.ndarray:
    """A (2, 3): image px -> patch px of eye (0 or 1, EYE_CORNERS order), from (478, 2+) landmarks px.

    The patch's x axis runs from the outer to the inner corner, its y axis down the image; its
    centre is the corners' midpoint. Width SPAN_X and height SPAN_Y eye widths."""
    outer, inner = (np.asarray(landmarks_px[j, :2], np.float64) for j in EYE_CORNERS[eye])
    u = inner - outer
    width = max(float(np.hypot(*u)), 1e-6)
    u /= width
    v = np.array([-u[1], u[0]])
    if v[1] < 0:        # y down the image: the patch of the eye whose u points left is mirrored
        v = -v
    centre = (outer + inner) / 2
    sx, sy = PATCH_W / (SPAN_X * width), PATCH_H / (SPAN_Y * width)     # patch px per image px
    rows = np.array([u * sx, v * sy])
    shift = np.array([(PATCH_W - 1) / 2, (PATCH_H - 1) / 2]) - rows @ centre
    return np.c_[rows, shift]


def warp_patch(image: np.ndarray, A: np.ndarray, resolution: float | None = None) -> np.ndarray:
    """The (PATCH_H, PATCH_W) grey patch of an RGB image (H, W, 3) uint8 under A (image px -> patch px).

    Only the patch's surroundings are read. resolution (< 1): they are first brought down to that
    many px per image px (INTER_AREA), so the patch holds no more detail than an image that size.
    Then they are halved with pyrDown while A shrinks them by more than 2x (as engine.crop.crop_image
    does), so a large eye does not alias."""
    A = np.asarray(A, np.float64)
    Ainv = np.linalg.inv(np.vstack([A, [0, 0, 1]]))[:2]
    corners = np.array([[-1, -1], [PATCH_W, -1], [-1, PATCH_H], [PATCH_W, PATCH_H]], np.float64)
    pts = corners @ Ainv[:, :2].T + Ainv[:, 2]
    h, w = image.shape[:2]
    x0, y0 = np.clip(np.floor(pts.min(0)).astype(int) - 4, 0, [w, h])
    x1, y1 = np.clip(np.ceil(pts.max(0)).astype(int) + 5, 0, [w, h])
    if x1 - x0 < 4 or y1 - y0 < 4:
        return np.zeros((PATCH_H, PATCH_W), np.uint8)
    roi = cv2.cvtColor(np.ascontiguousarray(image[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY)
    A = A @ np.array([[1.0, 0.0, x0], [0.0, 1.0, y0], [0.0, 0.0, 1.0]])
    if resolution is not None and resolution < 1.0:
        small = (max(int(round(roi.shape[1] * resolution)), 2), max(int(round(roi.shape[0] * resolution)), 2))
        fx, fy = small[0] / roi.shape[1], small[1] / roi.shape[0]
        roi = cv2.resize(roi, small, interpolation=cv2.INTER_AREA)
        # small px i is centred on the roi's (i + 0.5) / f - 0.5
        A = A @ np.array([[1 / fx, 0.0, 0.5 / fx - 0.5], [0.0, 1 / fy, 0.5 / fy - 0.5], [0.0, 0.0, 1.0]])
    while abs(np.linalg.det(A[:, :2])) < 0.25 and min(roi.shape[:2]) >= 4:
        roi = cv2.pyrDown(roi)
        A = A @ np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    return cv2.warpAffine(roi, A[:2], (PATCH_W, PATCH_H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def eye_patches(image: np.ndarray, landmarks_px: np.ndarray, crop_px: int = CROP_PX) -> np.ndarray:
    """(2, PATCH_H, PATCH_W) uint8 grey patches (EYE_CORNERS order) of a frame (H, W, 3) RGB with its
    (478, 2+) landmarks px, holding no more detail than the face's crop_px crop would (what training
    saw: trainers.train_eyes cuts them from the 128 px crops)."""
    A_crop = crop_transform(crop_box(np.asarray(landmarks_px)[:, :2]), crop_px)
    crop_per_frame = float(np.sqrt(abs(np.linalg.det(A_crop[:, :2]))))
    return np.stack([warp_patch(image, patch_transform(landmarks_px, eye), crop_per_frame) for eye in range(2)])


def normalise_patches(patches: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 -> (N, 1, H, W) float32 with zero mean and unit std per patch (light and skin
    tone fall out)."""
    x = patches.astype(np.float32)
    x = x - x.mean(axis=(1, 2), keepdims=True)
    x = x / np.maximum(x.std(axis=(1, 2), keepdims=True), 4.0)
    return x[:, None]


@dataclass
class EyeClosure:
    """eyeBlink of both eyes from their pixels, with the ONNX EyeStateNet (DEFAULT_WEIGHTS).

    order: EYE_CORNERS indices of the subject's left then right eye (`subject_left_first`)."""

    order: tuple[int, int]
    weights: Path = DEFAULT_WEIGHTS

    def __post_init__(self):
        from engine.runtime import onnx_session

        if not Path(self.weights).is_file():
            raise FileNotFoundError(f"eye-state weights not found: {self.weights} (make weights builds them)")
        self._session = onnx_session(self.weights)
        self._input = self._session.get_inputs()[0].name

    def __call__(self, image: np.ndarray, landmarks_px: np.ndarray) -> np.ndarray:
        """(2,) eyeBlink in [0, 1], subject's left then right."""
        patches = eye_patches(image, landmarks_px)
        out = self._session.run(None, {self._input: normalise_patches(patches)})[0][:, 0]   # eyeBlink
        return np.clip(out[list(self.order)], 0.0, 1.0).astype(np.float64)
