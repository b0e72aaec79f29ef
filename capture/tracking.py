"""Face tracking: MediaPipe's 478 landmarks frame after frame, also for small faces.

FaceMesh's own detector is short-range: it misses faces smaller than about a
fifth of the picture. When it finds nothing, MediaPipe's full-range detector
looks for a face; a square crop around it, enlarged to CROP_SIZE_PX, goes to a
second FaceMesh, and the crop then follows the landmarks from frame to frame
until the face grows large enough for the whole-frame tracker, or is lost.
"""
from __future__ import annotations

import cv2
import numpy as np

from engine.landmarks import MediaPipeFaceDetector, MediaPipeLandmarker

CROP_SIZE_PX = 256
#: A face followed in a crop goes back to the whole-frame tracker once its
#: landmarks span more than this many pixels.
HANDOVER_SPAN_PX = 150.0


def square_box(points_or_box: np.ndarray, scale: float) -> np.ndarray:
    """Square box (4,) [x0, y0, x1, y1] around (N, 2) points or a box, enlarged by scale."""
    p = np.asarray(points_or_box, np.float64).reshape(-1, 2)
    lo, hi = p.min(axis=0), p.max(axis=0)
    c = (lo + hi) / 2
    half = max(hi - lo) * scale / 2
    return np.array([c[0] - half, c[1] - half, c[0] + half, c[1] + half])


def crop(image: np.ndarray, box: np.ndarray, size_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Resample the square box of image to size_px², padding with black outside.

    Returns the crop and the 2x3 affine that maps crop pixels back to image pixels.
    """
    scale = (box[2] - box[0]) / size_px
    to_image = np.array([[scale, 0.0, box[0]], [0.0, scale, box[1]]])
    to_crop = cv2.invertAffineTransform(to_image)
    out = cv2.warpAffine(image, to_crop, (size_px, size_px), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT)
    return out, to_image


class FaceTracker:
    """Landmarks (478, 3) in image pixels per frame, or None when no face is found.

    static=True treats every frame as unrelated (photos); otherwise landmarks are
    tracked and the detector runs only when the face is lost.
    """

    def __init__(self, static: bool = False, small_faces: bool = True):
        self.static = static
        self.small_faces = small_faces
        self._mesh = MediaPipeLandmarker(static=static)
        self._crop_mesh: MediaPipeLandmarker | None = None
        self._detector: MediaPipeFaceDetector | None = None
        self._roi: np.ndarray | None = None
        self.mode = "none"  # how the last frame was found: "full", "crop" or "none"

    def track(self, rgb: np.ndarray) -> np.ndarray | None:
        if self._roi is None:
            lm = self._mesh.detect(rgb)
            if lm is not None:
                self.mode = "full"
                return lm
            if not self.small_faces:
                self.mode = "none"
                return None
            box = self._detect_box(rgb)
            if box is None:
                self.mode = "none"
                return None
            self._roi = square_box(box, 2.0)
        lm = self._track_in_crop(rgb)
        if lm is None:
            self._roi = None
            self.mode = "none"
            return None
        span = np.ptp(lm[:, :2], axis=0).max()
        self._roi = None if span > HANDOVER_SPAN_PX else square_box(lm[:, :2], 1.7)
        self.mode = "crop"
        return lm

    def _detect_box(self, rgb: np.ndarray) -> np.ndarray | None:
        if self._detector is None:
            self._detector = MediaPipeFaceDetector(full_range=True)
        return self._detector.detect(rgb)

    def _track_in_crop(self, rgb: np.ndarray) -> np.ndarray | None:
        if self._crop_mesh is None:
            self._crop_mesh = MediaPipeLandmarker(static=self.static)
        patch, to_image = crop(rgb, self._roi, CROP_SIZE_PX)
        lm = self._crop_mesh.detect(patch)
        if lm is None:
            return None
        out = lm.copy()
        out[:, :2] = lm[:, :2] @ to_image[:, :2].T + to_image[:, 2]
        out[:, 2] = lm[:, 2] * to_image[0, 0]
        return out

    def reset(self) -> None:
        """Forget the tracked face (a new take starts)."""
        self._roi = None

    def close(self) -> None:
        for part in (self._mesh, self._crop_mesh, self._detector):
            if part is not None:
                part.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
