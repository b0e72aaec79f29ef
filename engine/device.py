"""Which device a take's networks run on: `--device cpu|cuda|auto` (issue 12).

CUDA backends are tried in order: TensorRT engines built from the shipped ONNX files
(engine.trt_engine; the `gpu` extra), ONNX Runtime's CUDA execution provider (`onnxruntime-gpu`), then
torch on CUDA; each one passed over leaves its reason, and the CPU (ONNX Runtime) always works. So
`auto` and `cuda` choose the same way, and a machine without a usable GPU runs on the CPU with one
line saying why.

A cheap check comes first: without an NVIDIA device node (/dev/nvidia*) nothing is imported, so a
CPU-only machine pays no start-up time for the question.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DEVICES = ("auto", "cpu", "cuda")
#: The backends, fastest first; the last is the CPU, which needs no probe.
CUDA_BACKENDS = ("tensorrt", "onnxruntime-cuda", "torch-cuda")
CPU_BACKEND = "onnxruntime-cpu"
#: Why no CUDA backend was tried.
NO_GPU = "cuda: no NVIDIA GPU on this machine (no /dev/nvidia*)"


@dataclass(frozen=True)
class DeviceChoice:
    """requested: what the user asked; backend: CUDA_BACKENDS or CPU_BACKEND; passed_over: one reason
    per backend not taken (why not the GPU, or why not a faster GPU backend)."""

    requested: str
    backend: str
    passed_over: tuple[str, ...] = ()

    @property
    def device(self) -> str:
        return "cpu" if self.backend == CPU_BACKEND else "cuda"

    def line(self) -> str:
        """The one start-up line."""
        text = f"device: {self.device} ({self.backend})"
        if self.requested == "cpu":
            return text + ", as asked"
        if self.passed_over:
            text += "; not " + "; not ".join(self.passed_over)
        return text


def _check(requested: str) -> None:
    if requested not in DEVICES:
        raise ValueError(f"unknown device {requested!r} (choose from {', '.join(DEVICES)})")


def nvidia_device_present(dev: Path = Path("/dev")) -> bool:
    return (dev / "nvidiactl").exists() or any(dev.glob("nvidia[0-9]*"))


def onnxruntime_cuda_problem() -> str | None:
    """Why ONNX Runtime cannot run on CUDA here (None: it can)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime-cuda: onnxruntime is not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime-cuda: this onnxruntime has no CUDA provider (install onnxruntime-gpu)"
    return None


def torch_cuda_problem() -> str | None:
    """Why torch cannot run on CUDA here (None: it can)."""
    try:
        import torch
    except ImportError:
        return "torch-cuda: torch is not installed"
    if not torch.cuda.is_available():
        return "torch-cuda: torch sees no CUDA GPU (a CPU build of torch, or no driver)"
    return None


def tensorrt_problem() -> str | None:
    """Why TensorRT engines cannot run here (None: they can); engine.trt_engine's check."""
    from engine.trt_engine import tensorrt_problem as problem

    return problem()


PROBES: dict[str, Callable[[], str | None]] = {"tensorrt": tensorrt_problem,
                                               "onnxruntime-cuda": onnxruntime_cuda_problem,
                                               "torch-cuda": torch_cuda_problem}


def backend_problem(backend: str) -> str | None:
    """Why a CUDA backend cannot run here (None: it can): no NVIDIA device node, else its probe's reason."""
    return NO_GPU if not nvidia_device_present() else PROBES[backend]()


def choose_device(requested: str = "auto", probes: dict[str, Callable[[], str | None]] | None = None,
                  gpu_present: Callable[[], bool] = nvidia_device_present) -> DeviceChoice:
    """The backend for `requested` ("auto", "cpu" or "cuda"): the first CUDA backend whose probe finds
    no problem, else the CPU, with the reasons. probes: backend -> callable giving its problem or None
    (default PROBES, in CUDA_BACKENDS order)."""
    _check(requested)
    if requested == "cpu":
        return DeviceChoice(requested, CPU_BACKEND)
    if not gpu_present():
        return DeviceChoice(requested, CPU_BACKEND, (NO_GPU,))
    probes = PROBES if probes is None else probes
    passed_over = []
    for backend in CUDA_BACKENDS:
        problem = probes[backend]()
        if problem is None:
            return DeviceChoice(requested, backend, tuple(passed_over))
        passed_over.append(problem)
    return DeviceChoice(requested, CPU_BACKEND, tuple(passed_over))


def onnx_provider(backend: str) -> str:
    """Where an ONNX graph runs on a backend (engine.runtime.onnx_session's provider): TensorRT's engine,
    ONNX Runtime's CUDA provider, else the CPU (torch-cuda runs torch, not ONNX graphs)."""
    return {"tensorrt": "tensorrt", "onnxruntime-cuda": "cuda"}.get(backend, "cpu")


def coarse_runtime_on(backend: str, kind: str, weights_given: bool) -> tuple[str, str]:
    """(CoarseNet runtime kind, provider) for engine.coarse_fitting.open_runtime on a backend: ONNX
    weights run as a TensorRT engine or on ONNX Runtime's CUDA provider; torch-cuda runs the shipped
    .pt (or the given one) on torch; given weights the backend cannot read stay on the CPU."""
    if backend in ("tensorrt", "onnxruntime-cuda"):
        return kind, onnx_provider(backend) if kind == "onnx" else "cpu"
    if backend == "torch-cuda":
        return ("torch", "cuda") if not weights_given else (kind, "cuda" if kind == "torch" else "cpu")
    return kind, "cpu"


def torch_device(requested: str = "auto") -> tuple[str, str]:
    """("cuda" or "cpu", its one line) for torch work such as training: CUDA when requested is auto or cuda
    and torch can use a GPU here, else the CPU with the reason."""
    _check(requested)
    if requested == "cpu":
        return "cpu", "device: cpu (torch), as asked"
    problem = backend_problem("torch-cuda")
    return ("cuda", "device: cuda (torch)") if problem is None else ("cpu", f"device: cpu (torch); not {problem}")
