"""MediaPipe's 478-point face landmarks (FaceMesh with iris refinement), in pixels.

The models ship inside the mediapipe 0.10.21 wheel; nothing is downloaded.
"""
from __future__ import annotations

import os

import numpy as np

N_LANDMARKS = 478

os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


_POINT = np.dtype([("tags", "u1", 3), ("x", "<f4"), ("tag_y", "u1"), ("y", "<f4"), ("tag_z", "u1"), ("z", "<f4")])


def landmarks_array(landmark_list) -> np.ndarray:
    """A NormalizedLandmarkList -> (N, 3) float32 x, y, z (normalised).

    Reads the serialised message directly when it has the fixed 17-byte layout of
    x, y, z per point (ten times faster than a loop over 478 Python objects);
    anything else goes through the loop.
    """
    raw = landmark_list.SerializeToString()
    if len(raw) % _POINT.itemsize == 0:
        pts = np.frombuffer(raw, dtype=_POINT)
        if (np.all(pts["tags"] == (0x0A, 0x0F, 0x0D)) and np.all(pts["tag_y"] == 0x15)
                and np.all(pts["tag_z"] == 0x1D)):
            return np.stack([pts["x"], pts["y"], pts["z"]], axis=1).astype(np.float32)
    return np.array([(p.x, p.y, p.z) for p in landmark_list.landmark], dtype=np.float32)


class MediaPipeLandmarker:
    """One FaceMesh graph. static=False tracks from frame to frame (re-detecting
    when the face is lost); static=True detects in every image independently."""

    def __init__(self, static: bool = False, min_detection_confidence: float = 0.5,
                 min_tracking_confidence: float = 0.5):
        from mediapipe.python.solutions import face_mesh

        self._mesh = face_mesh.FaceMesh(
            static_image_mode=static, max_num_faces=1, refine_landmarks=True,
            min_detection_confidence=min_detection_confidence,
            min_tracking_confidence=min_tracking_confidence,
        )

    def detect(self, rgb: np.ndarray) -> np.ndarray | None:
        """(H, W, 3) uint8 RGB -> (478, 3) float32 [x_px, y_px, z_px] or None.

        z is MediaPipe's relative depth, scaled like x (pixels), smaller is nearer.
        """
        h, w = rgb.shape[:2]
        view = np.ascontiguousarray(rgb).view()
        view.flags.writeable = False  # lets MediaPipe avoid a copy; the caller's array stays writable
        result = self._mesh.process(view)
        if not result.multi_face_landmarks:
            return None
        out = landmarks_array(result.multi_face_landmarks[0])
        out[:, 0] *= w
        out[:, 1] *= h
        out[:, 2] *= w
        return out

    def close(self) -> None:
        self._mesh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class MediaPipeFaceDetector:
    """MediaPipe's full-range face detector: finds small and distant faces the
    FaceMesh graph's own short-range detector misses."""

    def __init__(self, min_detection_confidence: float = 0.4, full_range: bool = True):
        from mediapipe.python.solutions import face_detection

        self._det = face_detection.FaceDetection(
            model_selection=1 if full_range else 0, min_detection_confidence=min_detection_confidence)

    def detect(self, rgb: np.ndarray) -> np.ndarray | None:
        """(H, W, 3) RGB -> best face box (4,) [x0, y0, x1, y1] px, or None."""
        h, w = rgb.shape[:2]
        result = self._det.process(np.ascontiguousarray(rgb))
        if not result.detections:
            return None
        best = max(result.detections, key=lambda d: d.score[0])
        b = best.location_data.relative_bounding_box
        return np.array([b.xmin * w, b.ymin * h, (b.xmin + b.width) * w, (b.ymin + b.height) * h],
                        dtype=np.float32)

    def close(self) -> None:
        self._det.close()
