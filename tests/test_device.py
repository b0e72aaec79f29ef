"""engine.device: the --device choice (issue 12), and CUDA outputs against the CPU's where a GPU exists."""
import numpy as np
import pytest

from engine import device as dev
from engine.coarse_fitting import open_runtime
from engine.device import CPU_BACKEND, choose_device, coarse_runtime_on

GPU = choose_device("cuda")
needs_ort_cuda = pytest.mark.skipif(dev.backend_problem("onnxruntime-cuda") is not None,
                                    reason=f"no ONNX Runtime CUDA here: {GPU.line()}")
needs_torch_cuda = pytest.mark.skipif(dev.backend_problem("torch-cuda") is not None,
                                      reason=f"no torch CUDA here: {GPU.line()}")


def _probes(**problems):
    """Probes answering as given: backend name (with _ for -) -> problem text or None."""
    return {b: (lambda p=problems[b.replace("-", "_")]: p) for b in dev.CUDA_BACKENDS}


def test_cpu_asked_probes_nothing():
    def boom():
        raise AssertionError("probed")
    choice = choose_device("cpu", probes={b: boom for b in dev.CUDA_BACKENDS}, gpu_present=boom)
    assert choice.backend == CPU_BACKEND and choice.device == "cpu" and choice.line().endswith("as asked")


def test_backends_are_taken_in_order_and_each_one_passed_over_says_why():
    every = choose_device("auto", _probes(tensorrt=None, onnxruntime_cuda=None, torch_cuda=None), lambda: True)
    assert (every.backend, every.device, every.passed_over) == ("tensorrt", "cuda", ())
    both = choose_device("auto", _probes(tensorrt="no TensorRT", onnxruntime_cuda=None, torch_cuda=None), lambda: True)
    assert (both.backend, both.device, both.passed_over) == ("onnxruntime-cuda", "cuda", ("no TensorRT",))
    torch_only = choose_device("auto", _probes(tensorrt="no TensorRT", onnxruntime_cuda="no provider", torch_cuda=None),
                               lambda: True)
    assert torch_only.backend == "torch-cuda" and torch_only.passed_over == ("no TensorRT", "no provider")
    assert torch_only.line() == "device: cuda (torch-cuda); not no TensorRT; not no provider"
    neither = choose_device("cuda", _probes(tensorrt="no TensorRT", onnxruntime_cuda="no provider", torch_cuda="no GPU"),
                            lambda: True)
    assert neither.backend == CPU_BACKEND and neither.passed_over == ("no TensorRT", "no provider", "no GPU")
    assert len(neither.line().splitlines()) == 1 and "no provider" in neither.line() and "no GPU" in neither.line()


def test_without_an_nvidia_device_nothing_is_probed(tmp_path):
    def boom():
        raise AssertionError("probed")
    assert not dev.nvidia_device_present(tmp_path)
    (tmp_path / "nvidia0").touch()
    assert dev.nvidia_device_present(tmp_path)
    choice = choose_device("auto", probes={b: boom for b in dev.CUDA_BACKENDS}, gpu_present=lambda: False)
    assert choice.backend == CPU_BACKEND and "/dev/nvidia" in choice.line()
    with pytest.raises(ValueError, match="unknown device"):
        choose_device("gpu")


def test_this_machine_gets_a_backend_it_can_run():
    choice = choose_device("auto")
    if choice.backend == CPU_BACKEND:
        assert choice.passed_over, "a CPU choice under auto says why not the GPU"
    elif choice.backend == "tensorrt":
        assert dev.tensorrt_problem() is None
    elif choice.backend == "onnxruntime-cuda":
        assert dev.onnxruntime_cuda_problem() is None
    else:
        assert dev.torch_cuda_problem() is None


def test_coarse_runtime_on_each_backend():
    assert coarse_runtime_on(CPU_BACKEND, "onnx", False) == ("onnx", "cpu")
    assert coarse_runtime_on("tensorrt", "onnx", False) == ("onnx", "tensorrt")
    assert coarse_runtime_on("tensorrt", "onnx", True) == ("onnx", "tensorrt")        # a given .onnx: its engine
    assert coarse_runtime_on("tensorrt", "torch", True) == ("torch", "cpu")            # a .pt: torch on the CPU
    assert coarse_runtime_on("onnxruntime-cuda", "onnx", False) == ("onnx", "cuda")
    assert coarse_runtime_on("onnxruntime-cuda", "torch", True) == ("torch", "cpu")
    assert coarse_runtime_on("torch-cuda", "onnx", False) == ("torch", "cuda")         # the shipped .pt on CUDA
    assert coarse_runtime_on("torch-cuda", "onnx", True) == ("onnx", "cpu")            # a given .onnx: the CPU
    assert [dev.onnx_provider(b) for b in (*dev.CUDA_BACKENDS, CPU_BACKEND)] == ["tensorrt", "cuda", "cpu", "cpu"]


def _coarse_inputs(runtime, n=4, seed=0):
    rng = np.random.default_rng(seed)
    S = runtime.input_size
    crops = rng.integers(0, 256, (n, S, S, 3), dtype=np.uint8)
    lm = (S / 2 + rng.normal(0, S / 6, (n, runtime.n_landmarks, 2))).astype(np.float32)
    K = np.array([[S, 0, S / 2], [0, S, S / 2], [0, 0, 1]], np.float32)
    return crops, K, lm


def _agree(a: dict, b: dict, atol: float):
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=atol, err_msg=name)


@needs_ort_cuda
def test_coarsenet_on_onnxruntime_cuda_agrees_with_the_cpu():
    cpu, gpu = open_runtime("onnx"), open_runtime("onnx", provider="cuda")
    assert "CUDAExecutionProvider" in gpu.session.get_providers()
    x = _coarse_inputs(cpu)
    _agree(cpu.run(*x[:2], x[2]), gpu.run(*x[:2], x[2]), atol=2e-3)


@needs_torch_cuda
def test_coarsenet_on_torch_cuda_agrees_with_the_cpu():
    cpu, gpu = open_runtime("onnx"), open_runtime("torch", provider="cuda")
    assert gpu.device.type == "cuda"
    x = _coarse_inputs(cpu)
    _agree(cpu.run(*x[:2], x[2]), gpu.run(*x[:2], x[2]), atol=2e-3)


@needs_ort_cuda
def test_finenet_on_onnxruntime_cuda_agrees_with_the_cpu(model):
    from engine.fine_runtime import FineRuntime, IN_CHANNELS

    cpu, gpu = FineRuntime(model), FineRuntime(model, provider="cuda")
    x = np.random.default_rng(1).normal(0, 0.3, (1, IN_CHANNELS, cpu.map_px, cpu.map_px)).astype(np.float32)
    a, b = (r.session.run(None, {"maps": x})[0] for r in (cpu, gpu))
    np.testing.assert_allclose(a, b, atol=1e-3)
