"""CoarseNet inference runtimes behind one interface: torch, and ONNX Runtime on the CPU.

Both execute the same graph, `engine.coarsenet.CoarseNetInference`: uint8 crops and the crop camera in,
decoded parameters out (preprocessing and decoding included), so the only difference
between runtimes is the arithmetic of the backend. Use:

    rt = OnnxRuntime.from_model(net)                  # or OnnxRuntime("coarsenet.onnx")
    out = rt.run(crops_uint8_BxSxSx3, K_crop_Bx3x3, landmarks_BxLx2)   # dict of float32 numpy arrays

ONNX graph (`export_onnx`, opset 17, dynamic batch axis "batch"):
  inputs   crops   (B, S, S, 3) uint8 RGB;  K_crop (B, 3, 3) float32 px, the crop's pinhole camera;
           landmarks (B, L, 2) float32 crop px, the tracked landmarks (nets with config.n_landmarks > 0)
  outputs  identity (B, 60), expression (B, 53), rotation (B, 3, 3), translation (B, 3) cm,
           crop_xy (B, 2), log_scale (B, 1), sh (B, 9, 3), albedo (B, 3)
exported with torch's TorchScript-based exporter (dynamo=False): the dynamo exporter
needs onnxscript, and the classic one already gives a plain graph (BatchNorm folded).
K_crop is the full image's K seen through the crop's affine (engine.crop.crop_camera).

Speed (bench/bench_coarsenet.py, batch 1, one EPYC core): ONNX Runtime with one intra-op
thread ≈ 0.8 ms, eager torch ≈ 4.6 ms. Two ORT threads help only with spinning on (≈ 0.55 ms),
which keeps both cores busy; so the default is one thread, spinning off.

On a GPU, OnnxRuntime runs on ONNX Runtime's CUDA provider or on the graph's TensorRT engine
(engine.trt_engine), whichever engine.device chose.
"""
from __future__ import annotations

import io
import json
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch (about a second to import) loads only with TorchRuntime and export_onnx
    from engine.coarsenet import CoarseNet

INPUT_NAMES = ("crops", "K_crop", "landmarks")
OUTPUT_NAMES = ("identity", "expression", "rotation", "translation", "crop_xy", "log_scale", "sh", "albedo")
ONNX_OPSET = 17

#: How far ONNX Runtime (CPU, float32) may differ from torch on the decoded outputs: max abs
#: difference per element, except translation: |Δt| / |t| per sample. About 3x the worst seen
#: on randomised nets whose raw outputs span ±10 (tests/test_runtime.py), where the
#: difference is float32 summation order in the convolutions (≈ 5e-6 relative).
AGREEMENT_TOLERANCE = {
    "identity": 2e-4, "sh": 2e-4, "crop_xy": 2e-4, "log_scale": 2e-4,   # raw outputs, O(1-10)
    "expression": 5e-5, "albedo": 5e-5,                                  # in [0, 1] (clamp, sigmoid)
    "rotation": 3e-4,                                                    # after Gram-Schmidt
    "translation": 3e-4,                                                 # relative: 0.15 mm at 50 cm
}


def nominal_crop_camera(size: int) -> np.ndarray:
    """(3, 3) stand-in K_crop (focal = crop size, centred) for runs without a camera;
    `CoarseRuntime.run` drops the translation it gives."""
    c = (size - 1) / 2.0
    return np.array([[size, 0.0, c], [0.0, size, c], [0.0, 0.0, 1.0]], dtype=np.float32)


def input_names(net_config) -> tuple[str, ...]:
    """The graph's inputs: crops, K_crop, and landmarks when the net reads them."""
    return INPUT_NAMES if net_config.n_landmarks else INPUT_NAMES[:2]


class CoarseRuntime:
    """Runs CoarseNet on uint8 crops; subclasses implement `_run`."""

    name = "base"
    input_size: int
    n_landmarks: int

    def run(self, crops: np.ndarray, K_crop: np.ndarray | None = None,
            landmarks: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """crops (B, S, S, 3) uint8 RGB, K_crop (3, 3) or (B, 3, 3) px, landmarks (B, L, 2+) crop px
        (the tracked ones, for nets that read them) -> dict of float32 arrays
        (OUTPUT_NAMES; without K_crop there is no 'translation', only crop_xy and log_scale)."""
        crops = np.ascontiguousarray(crops)
        S = self.input_size
        if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (S, S, 3):
            raise ValueError(f"crops must be (B, {S}, {S}, 3) uint8, got {crops.shape} {crops.dtype}")
        B = crops.shape[0]
        K = nominal_crop_camera(S) if K_crop is None else np.asarray(K_crop, dtype=np.float32)
        if K.shape == (3, 3):
            K = np.tile(K, (B, 1, 1))
        if K.shape != (B, 3, 3):
            raise ValueError(f"K_crop must be (3, 3) or ({B}, 3, 3), got {K.shape}")
        lm = None
        if self.n_landmarks:
            if landmarks is None:
                raise ValueError(f"this CoarseNet reads {self.n_landmarks} tracked landmarks per crop; none were given")
            lm = np.ascontiguousarray(np.asarray(landmarks, dtype=np.float32)[..., :2])
            if lm.shape != (B, self.n_landmarks, 2):
                raise ValueError(f"landmarks must be ({B}, {self.n_landmarks}, 2+) crop px, got {np.shape(landmarks)}")
        out = dict(zip(OUTPUT_NAMES, self._run(crops, np.ascontiguousarray(K, dtype=np.float32), lm)))
        if K_crop is None:
            del out["translation"]
        return out

    def _run(self, crops: np.ndarray, K_crop: np.ndarray, landmarks: np.ndarray | None) -> list[np.ndarray]:
        raise NotImplementedError

    def __call__(self, crops: np.ndarray, K_crop: np.ndarray | None = None,
                 landmarks: np.ndarray | None = None) -> dict[str, np.ndarray]:
        return self.run(crops, K_crop, landmarks)


class TorchRuntime(CoarseRuntime):
    """Eager torch on the model's device (the model itself, put in eval mode: later weight
    changes are seen). num_threads, when given, is torch's process-wide setting.

    The reference runtime, not the fast one: on one CPU core eager torch spends about 4 ms
    per crop where ONNX Runtime takes under 1 ms (per-operator overhead of ~60 small convs;
    channels_last weights did not help)."""

    name = "torch"

    def __init__(self, model: CoarseNet, num_threads: int | None = None):
        import torch

        from engine.coarsenet import CoarseNetInference

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.graph = CoarseNetInference(model.eval(), OUTPUT_NAMES).eval()
        self.input_size = model.config.input_size
        self.n_landmarks = model.config.n_landmarks
        self.device = next(model.parameters()).device

    def _run(self, crops: np.ndarray, K_crop: np.ndarray, landmarks: np.ndarray | None) -> list[np.ndarray]:
        import torch

        lm = None if landmarks is None else torch.from_numpy(landmarks).to(self.device)
        with torch.inference_mode():
            outs = self.graph(torch.from_numpy(crops).to(self.device), torch.from_numpy(K_crop).to(self.device), lm)
        return [o.float().cpu().numpy() for o in outs]


#: Where an ONNX graph runs (onnx_session's provider): ONNX Runtime's CPU or CUDA provider, or a TensorRT engine.
PROVIDERS = ("cpu", "cuda", "tensorrt")


def onnx_session(model: str | Path | bytes, intra_op_threads: int = 1, spinning: bool = False,
                 optimization: str = "all", provider: str = "cpu"):
    """An ONNX Runtime InferenceSession: sequential, one inter-op thread, spinning off unless asked
    (spinning pool threads take the CPU from the Python around them on a 2-core machine); on the CPU
    provider, or on the CUDA one (nodes it lacks run on the CPU), which engine.device.choose_device
    has found usable. provider "tensorrt": the graph file's TensorRT engine behind the same interface
    (engine.trt_engine.TensorRTSession; built on first use)."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r} (choose from {', '.join(PROVIDERS)})")
    if provider == "tensorrt":
        if isinstance(model, bytes):
            raise ValueError("a TensorRT engine is built from an ONNX file, not from bytes")
        from engine.trt_engine import TensorRTSession

        return TensorRTSession(model, say=lambda line: print(f"capture: {line}", file=sys.stderr))
    try:
        import onnxruntime as ort
    except ImportError as exc:  # optional at import time of engine, needed here
        raise ImportError("ONNX Runtime is needed here (pip install onnxruntime)") from exc
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(intra_op_threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    flag = "1" if spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", flag)
    so.add_session_config_entry("session.inter_op.allow_spinning", flag)
    src = model if isinstance(model, bytes) else str(model)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(src, sess_options=so, providers=providers)


class OnnxRuntime(CoarseRuntime):
    """ONNX Runtime, CPU execution provider (provider "cuda": the CUDA one; "tensorrt": the file's TensorRT
    engine, onnx_session).

    intra_op_threads: threads of one operator (1 = the calling thread only, no pool).
    spinning: whether pool threads busy-wait for work between operators; off by default,
    since spinning threads take the CPU from the Python around them on a 2-core machine.
    """

    name = "onnxruntime"

    def __init__(self, model: str | Path | bytes, intra_op_threads: int = 1, spinning: bool = False,
                 optimization: str = "all", provider: str = "cpu"):
        self.session = onnx_session(model, intra_op_threads, spinning, optimization, provider)
        self.intra_op_threads, self.spinning = int(intra_op_threads), bool(spinning)
        shape = self.session.get_inputs()[0].shape  # [batch, S, S, 3]
        self.input_size = int(shape[1])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.config = json.loads(meta["coarsenet_config"]) if "coarsenet_config" in meta else None
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.n_landmarks = int(inputs["landmarks"].shape[1]) if "landmarks" in inputs else 0

    @classmethod
    def from_model(cls, model: CoarseNet, **kwargs) -> "OnnxRuntime":
        """Export `model` in memory and open it."""
        return cls(export_onnx(model), **kwargs)

    def _run(self, crops: np.ndarray, K_crop: np.ndarray, landmarks: np.ndarray | None) -> list[np.ndarray]:
        feeds = {"crops": crops, "K_crop": K_crop}
        if landmarks is not None:
            feeds["landmarks"] = landmarks
        return self.session.run(list(OUTPUT_NAMES), feeds)


def export_onnx(model: CoarseNet, path: str | Path | None = None, opset: int = ONNX_OPSET,
                dynamic_batch: bool = True) -> bytes:
    """The CoarseNetInference graph of `model` as ONNX bytes (also written to `path` if given).

    The model's config is stored as JSON in the metadata (key 'coarsenet_config'). The model is
    exported in eval mode (BatchNorm folded) and left in the mode it was in."""
    import torch

    from engine.coarsenet import CoarseNetInference

    S = model.config.input_size
    crops = torch.zeros(1, S, S, 3, dtype=torch.uint8)
    K = torch.from_numpy(nominal_crop_camera(S)).unsqueeze(0)
    names = input_names(model.config)
    args = (crops, K)
    if model.config.n_landmarks:
        args += (torch.full((1, model.config.n_landmarks, 2), S / 2.0),)
    axes = {name: {0: "batch"} for name in names + OUTPUT_NAMES} if dynamic_batch else None
    was_training = model.training
    buf = io.BytesIO()
    try:
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
            torch.onnx.export(CoarseNetInference(model, OUTPUT_NAMES), args, buf, dynamo=False, opset_version=opset,
                              input_names=list(names), output_names=list(OUTPUT_NAMES),
                              dynamic_axes=axes, do_constant_folding=True)
    finally:
        model.train(was_training)
    return with_config(buf.getvalue(), "coarsenet_config", model.config, path)


def with_config(onnx_bytes: bytes, key: str, config, path: str | Path | None = None) -> bytes:
    """An exported graph with a network's config (a dataclass) stored as JSON under metadata `key`,
    checked by onnx.checker; also written to path if given."""
    import onnx

    proto = onnx.load_from_string(onnx_bytes)
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, json.dumps(asdict(config))
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    if path is not None:
        Path(path).write_bytes(data)
    return data
