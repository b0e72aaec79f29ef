"""engine.trt_engine: TensorRT engines of the shipped networks (issue 12). The cache's naming and the
refusals are tested everywhere; the engines themselves against ONNX Runtime on the CPU where TensorRT and
an NVIDIA GPU exist (bench/gpu_check.sh), and skipped with the reason elsewhere."""
import sys

import numpy as np
import pytest

from capture import cli
from engine import device as dev
from engine import trt_engine as trt
from engine.coarse_fitting import DEFAULT_WEIGHTS, open_runtime
from engine.runtime import onnx_session

PROBLEM = dev.backend_problem("tensorrt")
needs_tensorrt = pytest.mark.skipif(PROBLEM is not None, reason=f"no TensorRT engine can run here: {PROBLEM}")
ONNX = DEFAULT_WEIGHTS["onnx"]


def test_an_engine_key_changes_with_the_gpu_tensorrt_weights_precision_and_batch():
    base = dict(network="coarsenet", onnx_bytes=b"weights", gpu_name="NVIDIA H100 80GB HBM3", trt_version="10.3.0")
    key = trt.engine_key(**base)
    assert key == trt.engine_key(**base)  # the same engine is found again
    assert all(c.isalnum() or c in "._-" for c in key)  # a plain file name, whatever the GPU's name holds
    others = [trt.engine_key(**{**base, "onnx_bytes": b"weights2"}),
              trt.engine_key(**{**base, "gpu_name": "NVIDIA H200"}),
              trt.engine_key(**{**base, "trt_version": "10.4.0"}),
              trt.engine_key(**base, fp16=False), trt.engine_key(**base, max_batch=32)]
    assert len({key, *others}) == 6


def test_a_new_build_finds_the_stale_engines_of_its_network_and_gpu_only(tmp_path):
    def key(network, weights, gpu, version="10.3.0"):
        k = trt.engine_key(network, weights, gpu, version)
        (tmp_path / f"{k}.engine").touch()
        return k

    new = key("coarsenet", b"new", "NVIDIA H100")
    old_weights, old_trt = key("coarsenet", b"old", "NVIDIA H100"), key("coarsenet", b"new", "NVIDIA H100", "10.2.0")
    key("coarsenet", b"old", "NVIDIA H200")   # another GPU's: kept
    key("finenet", b"old", "NVIDIA H100")     # another network's: kept
    assert [p.stem for p in trt.stale_engines(tmp_path, new)] == sorted([old_weights, old_trt])


def test_without_tensorrt_the_reason_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt fails, as on a machine without it
    assert trt.tensorrt_problem() == "tensorrt: TensorRT is not installed (pip install 'capture[gpu]')"
    assert dev.tensorrt_problem() == trt.tensorrt_problem()


def test_providers_are_checked():
    with pytest.raises(ValueError, match="unknown provider"):
        onnx_session(ONNX, provider="tpu")
    with pytest.raises(ValueError, match="from an ONNX file"):
        onnx_session(ONNX.read_bytes(), provider="tensorrt")


def _one_error_line(argv, capsys) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("capture: error: "), err
    return err[0]


def test_engine_build_refusals_are_one_line(capsys, monkeypatch, tmp_path):
    if PROBLEM is not None:  # this machine's own reason
        line = _one_error_line(["engine", "build", "--cache", str(tmp_path)], capsys)
        assert line == f"capture: error: engine build: {PROBLEM}"
    monkeypatch.setattr(dev, "nvidia_device_present", lambda dev_dir=None: True)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert "pip install 'capture[gpu]'" in _one_error_line(["engine", "build", "--cache", str(tmp_path)], capsys)
    assert "not found" in _one_error_line(["engine", "build", "--coarse-weights", str(tmp_path / "x.onnx")], capsys)
    assert not any(tmp_path.iterdir())  # nothing built, nothing written


@needs_tensorrt
def test_coarsenet_engine_agrees_with_the_cpu_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(trt.ENGINE_CACHE_ENV, str(tmp_path))
    cpu, gpu = open_runtime("onnx"), open_runtime("onnx", provider="tensorrt")
    assert gpu.session.built and gpu.session.engine_path.parent == tmp_path
    rng = np.random.default_rng(0)
    S, n = cpu.input_size, 20
    crops = rng.integers(0, 256, (n, S, S, 3), dtype=np.uint8)
    K = np.tile(np.array([[S, 0, S / 2], [0, S, S / 2], [0, 0, 1]], np.float32), (n, 1, 1))
    lm = (S / 2 + rng.normal(0, S / 6, (n, cpu.n_landmarks, 2))).astype(np.float32)
    a, b = cpu.run(crops, K, lm), gpu.run(crops, K, lm)
    for name, tol in trt.TENSORRT_TOLERANCE.items():
        if name == "translation":
            err = np.linalg.norm(a[name] - b[name], axis=1) / np.linalg.norm(a[name], axis=1)
            assert err.max() <= tol, (name, err.max())
        elif name in a:
            np.testing.assert_allclose(b[name], a[name], atol=tol, err_msg=name)
    again = open_runtime("onnx", provider="tensorrt")  # the cache's engine, not a second build
    assert not again.session.built and again.session.engine_path == gpu.session.engine_path


@needs_tensorrt
def test_finenet_engine_agrees_with_the_cpu(model, tmp_path, monkeypatch):
    from engine.fine_runtime import IN_CHANNELS, FineRuntime

    monkeypatch.setenv(trt.ENGINE_CACHE_ENV, str(tmp_path))
    cpu, gpu = FineRuntime(model), FineRuntime(model, provider="tensorrt")
    x = np.random.default_rng(1).normal(0, 0.3, (2, IN_CHANNELS, cpu.map_px, cpu.map_px)).astype(np.float32)
    a, b = (r.session.run(None, {"maps": x})[0] for r in (cpu, gpu))
    np.testing.assert_allclose(b, a, atol=trt.TENSORRT_TOLERANCE["displacement_mm"])
