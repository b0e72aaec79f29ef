"""engine.landmarks: MediaPipe's landmarks read into arrays."""
import numpy as np
from mediapipe.framework.formats import landmark_pb2

from engine.landmarks import landmarks_array


def _list(points, visibility=False):
    msg = landmark_pb2.NormalizedLandmarkList()
    for x, y, z in points:
        p = msg.landmark.add(x=x, y=y, z=z)
        if visibility:
            p.visibility = 0.5
    return msg


def test_fast_path_reads_what_the_loop_reads():
    pts = np.random.default_rng(0).normal(size=(478, 3)).astype(np.float32)
    pts[5] = 0.0  # zeros are still serialised (explicit presence)
    np.testing.assert_array_equal(landmarks_array(_list(pts)), pts)


def test_other_layouts_fall_back_to_the_loop():
    pts = np.random.default_rng(1).normal(size=(10, 3)).astype(np.float32)
    np.testing.assert_array_equal(landmarks_array(_list(pts, visibility=True)), pts)
