"""The square face crop that CoarseNet sees, shared by training data and inference.

One convention everywhere: pixel centres sit at integer coordinates (OpenCV's,
as in engine.rasterizer), so image pixel x covers [x - 0.5, x + 0.5]. A crop
box is (centre x, centre y, side) in image pixels; the crop of out_px pixels
maps the box's edges onto the crop's outer pixel edges, -0.5 and out_px - 0.5.

The box comes from landmarks (MediaPipe's 478 at run time, the same points
projected from the model in synthesis): the square around their extent, grown
by CROP_MARGIN of that extent on every side, so the whole face and a band of
hair, ears and background are in view.

Pixels of the crop that fall outside the image are filled with a constant
(black, BORDER_VALUE): a tracker near the frame edge shows the network black,
never smeared edge pixels, and synthesis reproduces the same black band.
"""
from __future__ import annotations

import cv2
import numpy as np

#: Margin on each side of the landmarks' extent, as a fraction of that extent (side = extent · (1 + 2 · margin)).
CROP_MARGIN = 0.25
#: Default crop size in pixels.
CROP_PX = 128
#: Fill value of crop pixels outside the image.
BORDER_VALUE = 0


def unknown_landmarks_px(n_landmarks: int, out_px: int = CROP_PX) -> np.ndarray:
    """(n_landmarks, 2) float32 crop px: the landmark input of a crop whose landmarks are unknown,
    every point at the crop centre (0 once CoarseNet normalises it). Nets trained with landmark
    dropout (trainers.train_coarse, [train] landmark_dropout) read the face from the picture alone then."""
    return np.full((n_landmarks, 2), (out_px - 1.0) / 2.0, np.float32)


def crop_box(landmarks_px: np.ndarray, margin: float = CROP_MARGIN) -> np.ndarray:
    """Square box (3,) [centre x, centre y, side] px around landmarks (N, 2+) px.

    The centre is the middle of the landmarks' bounding box (not their mean, which
    the dense eye and lip rings pull about); the side is the larger of its width
    and height times (1 + 2 · margin).
    """
    pts = np.asarray(landmarks_px, dtype=np.float64)[:, :2]
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    centre = (lo + hi) / 2.0
    side = float((hi - lo).max()) * (1.0 + 2.0 * margin)
    return np.array([centre[0], centre[1], max(side, 1e-6)])


def crop_transform(box: np.ndarray, out_px: int = CROP_PX) -> np.ndarray:
    """2x3 affine A (image px -> crop px) for a box (3,) [cx, cy, side] px.

    crop = s · (image - box corner) - 0.5 with s = out_px / side, so the box's
    outer edges land on the crop's outer pixel edges.
    """
    cx, cy, side = (float(v) for v in box)
    s = out_px / side
    return np.array([[s, 0.0, -s * (cx - side / 2.0) - 0.5],
                     [0.0, s, -s * (cy - side / 2.0) - 0.5]])


def apply_affine(A: np.ndarray, points_px: np.ndarray) -> np.ndarray:
    """Points (N, 2) px through a 2x3 affine A -> (N, 2) px."""
    p = np.asarray(points_px, dtype=np.float64)[:, :2]
    return p @ A[:, :2].T + A[:, 2]


def crop_image(image: np.ndarray, A: np.ndarray, out_px: int = CROP_PX, antialias: bool = True) -> np.ndarray:
    """The crop (out_px, out_px, C) of an image (H, W, C) under A (image px -> crop px).

    Bilinear (cv2.warpAffine), BORDER_CONSTANT with BORDER_VALUE outside the image.
    antialias: when the crop shrinks the image by more than 2x, halve the image
    with cv2.pyrDown (a 5-tap Gaussian) first, as often as needed, so a large
    face does not alias; A is adjusted to match, so the crop's geometry is the same.
    """
    A = np.asarray(A, dtype=np.float64)
    if antialias:
        while abs(np.linalg.det(A[:, :2])) < 0.25 and min(image.shape[:2]) >= 4:
            # pyrDown's pixel i is centred on the source's pixel 2i: source = 2 · small
            image = cv2.pyrDown(image)
            A = A @ np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    return cv2.warpAffine(image, A, (out_px, out_px), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(BORDER_VALUE,) * 4)


def crop_camera(K: np.ndarray, A: np.ndarray) -> np.ndarray:
    """Pinhole K (3, 3) of the full image -> K_crop (3, 3) of the crop made with A (2x3).

    Projection is linear in homogeneous pixels, so K_crop = [A; 0 0 1] · K: a
    camera-space point projected with K_crop lands where the crop shows it.
    """
    A3 = np.vstack([np.asarray(A, dtype=np.float64), [0.0, 0.0, 1.0]])
    return A3 @ np.asarray(K, dtype=np.float64)


def image_coverage(A: np.ndarray, width: int, height: int, out_px: int = CROP_PX) -> np.ndarray:
    """(out_px, out_px) float32 in [0, 1]: how much of each crop pixel lies inside the W x H image.

    For an axis-aligned A (scale and shift, as crop_transform makes): the image spans
    [-0.5, W - 0.5] x [-0.5, H - 0.5]; each crop pixel's overlap with that span's image
    under A, per axis, multiplied. Synthesis uses it to black out what a real crop
    of a frame that size would not show.
    """
    A = np.asarray(A, dtype=np.float64)
    if abs(A[0, 1]) > 1e-12 or abs(A[1, 0]) > 1e-12:
        raise ValueError("image_coverage needs an axis-aligned crop transform")
    j = np.arange(out_px, dtype=np.float64)

    def axis(scale, shift, n):
        a, b = sorted((scale * -0.5 + shift, scale * (n - 0.5) + shift))
        return np.clip(np.minimum(j + 0.5, b) - np.maximum(j - 0.5, a), 0.0, 1.0)

    cov_x = axis(A[0, 0], A[0, 2], width)
    cov_y = axis(A[1, 1], A[1, 2], height)
    return (cov_y[:, None] * cov_x[None, :]).astype(np.float32)
