"""Face tracking: MediaPipe's 478 landmarks frame after frame, also for small faces.

FaceMesh's own detector is short-range: it misses faces smaller than about a
fifth of the picture. When it finds nothing, MediaPipe's full-range detector
looks for a face; a square crop around it, enlarged to CROP_SIZE_PX, goes to a
second FaceMesh, and the crop then follows the landmarks from frame to frame
until the face grows large enough for the whole-frame tracker, or is lost.

Profiles: FaceMesh drops a face turned past about 60-80 degrees (its landmark
model's face-presence score falls under 0.5) and its detector does not find a
profile again. The caller may then hand `track` a region made from its
previous fit (`follow_region`: the square around the fitted face's visible
half); FaceMesh's landmark model runs there alone, and, near profile, once
more a little towards where the face looks (its presence score swings with
small changes of the region there). The best presence score, kept when it
is at least FOLLOW_MIN_PRESENCE, makes the frame's confidence: half of it,
so a followed frame never reads above 0.5, where FaceMesh's own are 1. Such
frames are past what FaceMesh trusts. A face lost while turned 45 degrees or
more is not followed here at all: its landmarks would be guesses, and
capture.pipeline fits it from the picture alone (bench/eval_profile.py).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from engine.landmarks import ROI_MIN_PRESENCE, MediaPipeFaceDetector, MediaPipeLandmarker, MediaPipeRoiLandmarker
from engine.pose import project

CROP_SIZE_PX = 256
#: A face followed in a crop goes back to the whole-frame tracker once its
#: landmarks span more than this many pixels.
HANDOVER_SPAN_PX = 150.0
#: FaceMesh keeps a face while its landmark model's face-presence score is at least this.
FACEMESH_MIN_PRESENCE = 0.5
#: A face followed from the previous fit is kept while FaceMesh's landmark model gives it at least this
#: face-presence score (on a picture without a face it reads < 0.01).
FOLLOW_MIN_PRESENCE = ROI_MIN_PRESENCE
#: FaceMesh's own region: its landmarks' box, the longer side times this (FaceLandmarkLandmarksToRoi).
FOLLOW_SCALE = 1.5
#: Past this yaw (degrees) only the half of the model turned towards the camera makes the region.
VISIBLE_HALF_YAW_DEG = 30.0
#: Model points within this distance (cm) of the face's midline belong to both halves.
MIDLINE_CM = 1.0
#: A face turned past VISIBLE_HALF_YAW_DEG is also looked for this share of the region's side towards
#: where it looks.
FOLLOW_FRONT_SHIFT = 0.15
#: Frames without a face for which the caller may keep trying the last fit's region.
FOLLOW_PATIENCE_FRAMES = 10
#: A followed frame's confidence per unit of presence score: below FaceMesh's own frames' 1.
FOLLOW_CONFIDENCE = 0.5


@dataclass(frozen=True)
class FollowRegion:
    """Where to look for a face that FaceMesh lost: a square of side_px pixels centred at centre_px
    (x, y), turned by rotation_rad (MediaPipe's: the eye line's angle, clockwise in the picture)."""

    centre_px: tuple[float, float]
    side_px: float
    rotation_rad: float
    front_px: tuple[float, float] = (0.0, 0.0)  # unit: where a turned face looks in the picture; 0 facing us

    def centres_px(self) -> list[tuple[float, float]]:
        """The centres to try, best first: the region's own, then (a turned face) shifted towards its front."""
        if self.front_px == (0.0, 0.0):
            return [self.centre_px]
        shift = FOLLOW_FRONT_SHIFT * self.side_px
        return [self.centre_px, (self.centre_px[0] + shift * self.front_px[0],
                                 self.centre_px[1] + shift * self.front_px[1])]


def follow_region(points_model: np.ndarray, R: np.ndarray, t: np.ndarray, K: np.ndarray) -> FollowRegion:
    """The region for the next frame from a fitted face: points_model (N, 3) cm (the model's
    landmark points, x towards the subject's left), pose R (3, 3), t (3,) cm, camera K (3, 3).

    Turned more than VISIBLE_HALF_YAW_DEG from the camera, the far half of the face is hidden and
    only the near half (and the midline) is boxed: FaceMesh makes its region from landmarks on what
    it sees. The rotation is the fitted head's "up" as the picture shows it; front_px its forward
    axis (the model's +z), once the face is turned that far.
    """
    cam = points_model @ R.T + t
    centre = cam.mean(axis=0)
    toward_camera = -centre / np.linalg.norm(centre)
    facing = float(R[:, 0] @ toward_camera)  # > 0: the model's +x half is turned towards the camera
    keep = np.ones(len(cam), bool)
    front = (0.0, 0.0)
    axes = project(np.stack([centre, centre + R[:, 1], centre + R[:, 2]]), K)  # centre, up, forward (1 cm)
    if abs(facing) > math.sin(math.radians(VISIBLE_HALF_YAW_DEG)):
        x = points_model[:, 0] * math.copysign(1.0, facing)
        keep = x > -MIDLINE_CM
        forward = axes[2] - axes[0]
        front = tuple(float(v) for v in forward / max(np.linalg.norm(forward), 1e-9))
    uv = project(cam[keep], K)
    lo, hi = uv.min(axis=0), uv.max(axis=0)
    dx, dy = axes[1] - axes[0]
    return FollowRegion((float((lo[0] + hi[0]) / 2), float((lo[1] + hi[1]) / 2)),
                        float(FOLLOW_SCALE * (hi - lo).max()), math.atan2(dx, -dy), front)


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
        self._follower: MediaPipeRoiLandmarker | None = None
        self._roi: np.ndarray | None = None
        self.mode = "none"  # how the last frame was found: "full", "crop", "follow" or "none"
        self.confidence = 0.0  # the last frame's: 1 found by FaceMesh, <= 0.5 followed (FOLLOW_CONFIDENCE), 0 none

    def track(self, rgb: np.ndarray, follow: Callable[[], FollowRegion | None] | None = None) -> np.ndarray | None:
        """The landmarks of the face in rgb (H, W, 3) uint8, or None. follow: gives where the face was
        (the previous frame's fit), or None where there is nothing to follow; called only when FaceMesh
        finds nothing (not for photos), so a caller that fits frames later (capture.pipeline's batches)
        needs the previous fit only then. While a region is followed, no new small face is searched for."""
        follow = functools.cache(follow) if follow is not None and not self.static else None  # asked once a frame
        landmarks = self._find(rgb, search_small=lambda: follow is None or follow() is None)
        self.confidence = 1.0 if landmarks is not None else 0.0
        region = follow() if landmarks is None and follow is not None else None
        if region is not None:
            landmarks, presence = self._follow(rgb, region)
            if landmarks is None or presence < FOLLOW_MIN_PRESENCE:
                return None
            self.mode, self.confidence = "follow", FOLLOW_CONFIDENCE * presence
        return landmarks

    def _follow(self, rgb: np.ndarray, region: FollowRegion) -> tuple[np.ndarray | None, float]:
        """FaceMesh's landmark model at the region's centres in turn, until one gives a presence
        score FaceMesh would keep (FACEMESH_MIN_PRESENCE): (landmarks, score) of the best."""
        if self._follower is None:
            self._follower = MediaPipeRoiLandmarker()
        best, best_presence = None, 0.0
        for centre in region.centres_px():
            landmarks, presence = self._follower.detect(rgb, centre, region.side_px, region.rotation_rad)
            if landmarks is not None and presence > best_presence:
                best, best_presence = landmarks, presence
            if best_presence >= FACEMESH_MIN_PRESENCE:
                break
        return best, best_presence

    def _find(self, rgb: np.ndarray, search_small: Callable[[], bool] = lambda: True) -> np.ndarray | None:
        """FaceMesh on the whole frame, else (small faces) in a crop that follows its landmarks.
        search_small, asked only when FaceMesh misses: False, no full-range detector for a new small
        face (a face is being followed)."""
        if self._roi is None:
            lm = self._mesh.detect(rgb)
            if lm is not None:
                self.mode = "full"
                return lm
            if not (self.small_faces and search_small()):
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
        """Forget the tracked face (a new take starts), FaceMesh's own tracking state included."""
        self._roi = None
        if not self.static:
            for mesh in (self._mesh, self._crop_mesh):
                if mesh is not None:
                    mesh.reset()

    def close(self) -> None:
        for part in (self._mesh, self._crop_mesh, self._detector, self._follower):
            if part is not None:
                part.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
