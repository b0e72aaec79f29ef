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

        self.static = static
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

    def reset(self) -> None:
        """Forget the face tracked so far: FaceMesh's graph keeps the last frame's region and would
        look there first in the next take's first frames."""
        self._mesh.reset()

    def close(self) -> None:
        self._mesh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


#: FaceMesh's landmark stage alone (MediaPipe's FaceLandmarkCpu subgraph, attention model, 478 points)
#: on a region given by the caller, with its face-presence score as an output instead of a gate.
#: MediaPipeRoiLandmarker's landmarks are used where its face-presence score is at least this (on a
#: picture without a face it reads < 0.01); the run time's follower and the training data's both.
ROI_MIN_PRESENCE = 0.1

_ROI_LANDMARK_GRAPH = """
input_stream: "image"
input_stream: "roi"
output_stream: "face_presence_score"
output_stream: "face_landmarks"
input_side_packet: "with_attention"
node {
  calculator: "ImageToTensorCalculator"
  input_stream: "IMAGE:image"
  input_stream: "NORM_RECT:roi"
  output_stream: "TENSORS:input_tensors"
  options { [mediapipe.ImageToTensorCalculatorOptions.ext] {
    output_tensor_width: 192 output_tensor_height: 192 output_tensor_float_range { min: 0 max: 1 } } }
}
node {
  calculator: "FaceLandmarksModelLoader"
  input_side_packet: "WITH_ATTENTION:with_attention"
  output_side_packet: "MODEL:model"
}
node { calculator: "TfLiteCustomOpResolverCalculator" output_side_packet: "OP_RESOLVER:op_resolver" }
node {
  calculator: "InferenceCalculator"
  input_stream: "TENSORS:input_tensors"
  output_stream: "TENSORS:output_tensors"
  input_side_packet: "MODEL:model"
  input_side_packet: "OP_RESOLVER:op_resolver"
  options { [mediapipe.InferenceCalculatorOptions.ext] { delegate { xnnpack {} } } }
}
node {
  calculator: "SplitTensorVectorCalculator"
  input_stream: "output_tensors"
  output_stream: "landmark_tensors"
  output_stream: "face_flag_tensor"
  options { [mediapipe.SplitVectorCalculatorOptions.ext] { ranges { begin: 0 end: 6 } ranges { begin: 6 end: 7 } } }
}
node {
  calculator: "TensorsToFloatsCalculator"
  input_stream: "TENSORS:face_flag_tensor"
  output_stream: "FLOAT:face_presence_score"
  options { [mediapipe.TensorsToFloatsCalculatorOptions.ext] { activation: SIGMOID } }
}
node {
  calculator: "TensorsToFaceLandmarksWithAttention"
  input_stream: "TENSORS:landmark_tensors"
  output_stream: "LANDMARKS:landmarks"
}
node {
  calculator: "LandmarkProjectionCalculator"
  input_stream: "NORM_LANDMARKS:landmarks"
  input_stream: "NORM_RECT:roi"
  output_stream: "NORM_LANDMARKS:face_landmarks"
}
"""


class MediaPipeRoiLandmarker:
    """FaceMesh's landmark model run on a region the caller chooses, with no detector.

    FaceMesh finds a face with its detector, then follows it with regions made
    from its own landmarks, and drops the face when the model's face-presence
    score falls under 0.5. Past about 60-80 degrees of yaw that happens, and the
    detector does not find a profile again. This runs the same model (the one
    FaceMesh runs with iris refinement) on a region from elsewhere, e.g. the
    previous frame's fitted head, and returns the presence score with the
    landmarks, so the caller decides what to keep.
    """

    def __init__(self):
        from google.protobuf import text_format
        from mediapipe.framework import calculator_pb2
        from mediapipe.python.solution_base import PacketDataType, SolutionBase

        config = text_format.Parse(_ROI_LANDMARK_GRAPH, calculator_pb2.CalculatorGraphConfig())
        self._graph = SolutionBase(graph_config=config, side_inputs={"with_attention": True},
                                   stream_type_hints={"roi": PacketDataType.PROTO})

    def detect(self, rgb: np.ndarray, centre_px, side_px: float,
               rotation_rad: float = 0.0) -> tuple[np.ndarray | None, float]:
        """Landmarks (478, 3) float32 px, as MediaPipeLandmarker gives them, and the face-presence
        score in [0, 1] for the square of side_px pixels centred at centre_px (x, y), turned by
        rotation_rad (MediaPipe's: the angle of the eye line, clockwise in the picture).
        (None, 0.0) when the model gives nothing."""
        from mediapipe.framework.formats import rect_pb2

        h, w = rgb.shape[:2]
        roi = rect_pb2.NormalizedRect(x_center=float(centre_px[0]) / w, y_center=float(centre_px[1]) / h,
                                      width=float(side_px) / w, height=float(side_px) / h,
                                      rotation=float(rotation_rad))
        result = self._graph.process({"image": np.ascontiguousarray(rgb), "roi": roi})
        if result.face_landmarks is None or result.face_presence_score is None:
            return None, 0.0
        out = landmarks_array(result.face_landmarks)
        out[:, 0] *= w
        out[:, 1] *= h
        out[:, 2] *= w
        return out, float(result.face_presence_score)

    def close(self) -> None:
        self._graph.close()


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
