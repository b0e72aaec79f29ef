"""CoarseNet as the per-frame fitter: the network's counterpart of engine.fitting.TakeFitter.

One network pass per frame on the face crop (made from the tracker's landmarks
exactly as the training data's, engine.crop; nets that also read the landmarks
get them in crop pixels) gives the pose and expression directly; no landmark
optimisation. Identity is shared by the take as in
TakeFitter: the running mean of the network's per-frame identity over the first
`identity_frames` frames with a face, then locked. The tracked landmarks then
refine the head pose (a Gauss-Newton step) and, with a landmark-expression MLP
(engine.landmark_expression), give the shapes it reads better than the network.

Weights ship in engine/weights/ (coarsenet.onnx for ONNX Runtime, coarsenet.pt
for torch); `capture train coarse` reproduces them.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.crop import apply_affine, crop_box, crop_camera, crop_image, crop_transform, unknown_landmarks_px
from engine.fitting import (FitResult, FitSettings, LandmarkBasis, gauss_newton_frame, landmark_rms_px,
                            locked_identity)
from engine.pose import head_rotation, yaw_pitch_roll

if TYPE_CHECKING:  # engine.runtime loads torch (about a second): only when a runtime is opened
    from engine.landmark_expression import LandmarkExpression
    from engine.runtime import CoarseRuntime

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: The landmark pose refinement is skipped for a head the network sees turned this far (yaw, degrees).
REFINE_MAX_YAW_DEG = 45.0
#: The runtimes CoarseFitter can run on, and the weights file each reads by default.
DEFAULT_WEIGHTS = {"onnx": WEIGHTS_DIR / "coarsenet.onnx", "torch": WEIGHTS_DIR / "coarsenet.pt"}


class CoarseWeightsError(Exception):
    """CoarseNet weights missing or unreadable; the message is one line naming the file."""


def runtime_for(weights: str | Path | None) -> str:
    """The runtime a weights file runs on: "torch" for a .pt file, else "onnx" (the shipped default)."""
    return "torch" if weights is not None and Path(weights).suffix == ".pt" else "onnx"


def open_runtime(kind: str = "onnx", weights: str | Path | None = None, provider: str = "cpu") -> CoarseRuntime:
    """The CoarseNet runtime `kind` ("onnx": ONNX Runtime, one thread, no spinning; "torch")
    on `weights` (None: the file shipped in engine/weights/ for that runtime), on the CPU or on the
    GPU: provider "cuda" (ONNX Runtime's CUDA provider, or torch on CUDA) or "tensorrt" (the ONNX
    file's TensorRT engine); engine.device.choose_device says which backend can."""
    if kind not in DEFAULT_WEIGHTS:
        raise ValueError(f"unknown CoarseNet runtime {kind!r} (choose from {', '.join(DEFAULT_WEIGHTS)})")
    path = Path(weights) if weights is not None else DEFAULT_WEIGHTS[kind]
    if not path.is_file():
        raise CoarseWeightsError(f"CoarseNet weights not found: {path} (capture ships them in engine/weights/; "
                                 "`capture train coarse` reproduces them; `--engine fit` needs none)")
    try:
        if kind == "onnx":
            from engine.runtime import OnnxRuntime

            return OnnxRuntime(path, intra_op_threads=1, spinning=False, provider=provider)
        from engine.coarsenet import load_weights
        from engine.runtime import TorchRuntime

        return TorchRuntime(load_weights(path).to("cpu" if provider == "cpu" else "cuda"))
    except Exception as exc:  # noqa: BLE001 - protobuf, zip, pickle and shape errors all mean "unreadable"
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CoarseWeightsError(f"cannot read CoarseNet weights {path} as {kind}: {why}") from exc


class CoarseFitter:
    """Fits every frame of one take with one CoarseNet pass; identity converges over the
    first frames (running mean of the network's), then locks. Duck-types TakeFitter.

    identity: a known identity (an actor profile's), locked from the first frame, as
    TakeFitter(identity=...) takes it.
    landmark_expression: the shapes it reads better than the network (engine.landmark_expression)
    take its value from the tracked landmarks' shape; None: the network's expression alone.
    refine_iterations: Gauss-Newton steps on the head pose alone (engine.fitting, expression and
    identity held at the network's) against the tracked landmarks after the network's pass;
    0 leaves the network's pose. The network places the head from a 128 px crop; the landmarks
    pin it better (bench/eval_accuracy.py), but not a head the network sees turned
    REFINE_MAX_YAW_DEG or more: MediaPipe squashes a turned face's hidden half onto the visible
    one, and the refined yaw reads low (bench/eval_profile.py: 19 degrees off at 65-75, the
    network's own 10).
    """

    def __init__(self, basis: LandmarkBasis, runtime: CoarseRuntime, identity_frames: int = 40,
                 identity: np.ndarray | None = None, refine_iterations: int = 1,
                 landmark_expression: LandmarkExpression | None = None):
        self.basis = basis
        self.runtime = runtime
        self.landmark_expression = landmark_expression
        self.refine_iterations = max(0, int(refine_iterations))
        self._settings = FitSettings()
        self.identity_frames = max(1, int(identity_frames))
        self.identity = np.zeros(basis.identity.shape[0])
        self.identity_locked = False
        if identity is not None:
            self.identity = locked_identity(basis, identity)
            self.identity_locked = True
        self._frames_for_identity = 0

    def lose_track(self) -> None:
        """The face was lost. Nothing carries over between frames but the identity, which is kept."""

    def warm_up(self) -> None:
        """One pass on a blank crop, so the first live frame does not pay for the runtime's setup."""
        from engine.runtime import nominal_crop_camera

        S = self.runtime.input_size
        self.runtime.run(np.zeros((1, S, S, 3), np.uint8), nominal_crop_camera(S)[None], self._unknown_landmarks())

    def predict(self, image: np.ndarray, landmarks_px: np.ndarray, K: np.ndarray) -> dict[str, np.ndarray]:
        """The network's raw outputs (batch of one removed) for the face at landmarks_px in image
        (a net that reads no landmarks ignores them)."""
        return self._run_on_crop(image, landmarks_px, K, feed_landmarks=True)

    def predict_batch(self, images: list[np.ndarray], landmarks_px: list[np.ndarray],
                      Ks: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """`predict` for several faces in one network pass (a GPU runs a batch for little more than
        one crop): images (H, W, 3) uint8, landmarks (N, 2+) px and K (3, 3) per face."""
        crops, cameras, fed = zip(*(self._crop(image, np.asarray(points, np.float64), K)
                                    for image, points, K in zip(images, landmarks_px, Ks)))
        out = self.runtime.run(np.stack(crops), np.stack(cameras), np.stack(fed))
        return [{name: value[i] for name, value in out.items()} for i in range(len(images))]

    def _crop(self, image: np.ndarray, points_px: np.ndarray, K: np.ndarray):
        """(crop (S, S, 3) uint8, its camera (3, 3) float32, points_px (N, 2) in crop px float32) for the
        crop made from points_px (N, 2+) image px."""
        A = crop_transform(crop_box(points_px), self.runtime.input_size)
        crop = crop_image(np.ascontiguousarray(image), A, self.runtime.input_size)
        return crop, crop_camera(K, A).astype(np.float32), apply_affine(A, points_px).astype(np.float32)

    def _run_on_crop(self, image: np.ndarray, points_px: np.ndarray, K: np.ndarray,
                     feed_landmarks: bool) -> dict[str, np.ndarray]:
        """The net on the crop made from points_px (N, 2), fed those points in crop pixels or, without
        feed_landmarks, the stand-in for unknown ones; raw outputs, batch of one removed."""
        crop, camera, points = self._crop(image, points_px, K)
        fed = points[None] if feed_landmarks else self._unknown_landmarks()
        out = self.runtime.run(crop[None], camera[None], fed)
        return {name: value[0] for name, value in out.items()}

    def _unknown_landmarks(self) -> np.ndarray | None:
        """(1, L, 2) the landmark input meaning "not tracked" (None for a net that reads none)."""
        n = self.runtime.n_landmarks
        return unknown_landmarks_px(n, self.runtime.input_size)[None] if n else None

    def fit_from_picture(self, image: np.ndarray, points_px: np.ndarray, K: np.ndarray) -> FitResult:
        """Fit a frame without landmarks: the crop made from points_px (N, 2), where the face's
        landmarks are expected (capture.pipeline: the tracker's last ones), and the net reads no landmarks
        (engine.crop.unknown_landmarks_px). For a face turned past what MediaPipe tracks; nets
        trained without landmark dropout were never shown such input (stage 4 is). The identity
        is the take's, never updated from such a frame; rms_px is nan (nothing to measure it on)."""
        out = self._run_on_crop(image, np.asarray(points_px, np.float64), K, feed_landmarks=False)
        e = np.clip(out["expression"].astype(np.float64), 0.0, 1.0)
        return FitResult(out["rotation"].astype(np.float64), out["translation"].astype(np.float64), e,
                         self.identity.copy(), float("nan"))

    def fit(self, landmarks_px: np.ndarray, K: np.ndarray, pin=None, image: np.ndarray | None = None,
            predicted: dict[str, np.ndarray] | None = None) -> FitResult:
        """Fit one frame: image (H, W, 3) uint8 RGB, its (N, 2+) landmarks px, camera matrix K.

        pin: optional callable (R, t) -> {expression index: value}, called with the
        final (refined) pose; those weights replace the network's (gaze, as in TakeFitter).
        predicted: the network's outputs for this frame when it has already run (`predict_batch`).
        """
        landmarks_px = np.asarray(landmarks_px, np.float64)
        if predicted is None:
            if image is None:
                raise ValueError("CoarseFitter.fit needs the image: CoarseNet reads the face crop")
            predicted = self.predict(image, landmarks_px, K)
        out = predicted
        k, M = len(self.identity), self.basis.expression.shape[0]
        if out["identity"].shape != (k,) or out["expression"].shape != (M,):
            raise ValueError(f"CoarseNet gives {out['identity'].shape[0]} identity and {out['expression'].shape[0]} "
                             f"expression weights; the face model needs {k} and {M}")
        R = out["rotation"].astype(np.float64)
        t = out["translation"].astype(np.float64)
        e = np.clip(out["expression"].astype(np.float64), 0.0, 1.0)
        if not self.identity_locked:
            n = self._frames_for_identity = self._frames_for_identity + 1
            self.identity = self.identity + (out["identity"].astype(np.float64) - self.identity) / n
            self.identity_locked = n >= self.identity_frames
        if self.refine_iterations and abs(np.degrees(yaw_pitch_roll(head_rotation(R))[0])) < REFINE_MAX_YAW_DEG:
            R, t, _ = gauss_newton_frame(self.basis, landmarks_px[:, :2], K, R, t, e, self.identity, self._settings,
                                         self.refine_iterations, solve_expression=False)
        if self.landmark_expression is not None:
            e = self.landmark_expression.merge(e, landmarks_px[:, :2])
        if pin is not None:
            for index, value in pin(R, t).items():
                e[index] = value
        rms = landmark_rms_px(self.basis, landmarks_px[:, :2], K, R, t, e, self.identity)
        return FitResult(R, t, e, self.identity.copy(), rms)
