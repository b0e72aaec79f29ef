"""TensorRT engines for the shipped networks (issue 12): built from their ONNX files, cached, and run
behind ONNX Runtime's session interface, so CoarseNet's and FineNet's runtimes use them unchanged.

An engine is specific to the GPU model, the TensorRT version and the weights, so the cache file's
name carries all three (`engine_key`): any change gives a new name, and the engine is built again
(`build_engine`, by `capture engine build` or on first use; about a minute), the stale ones of that
network and GPU removed. FP16 unless asked otherwise, with TensorRT 10's FP16 builder flag; TensorRT 11
has none (its networks are strongly typed, in the ONNX graph's own types), so there the shipped
float32 graphs build in FP32, and the cache name says so. One optimisation profile for batches 1 to
`max_batch` (the crops of `capture video --batch`), tuned for OPT_BATCH.

Device memory and the stream come from torch (a CUDA build on such a machine): TensorRT reads and
writes torch tensors by address, so nothing else (pycuda, cuda-python) is needed.

Written against TensorRT 10's Python API (named I/O tensors, execute_async_v3); every name used here
is among the strings of TensorRT 11.4's bindings library (its wheel cannot be imported without
TensorRT's own libraries, so that is a check of names, not of calls). The machines this project is
developed on have no TensorRT (and the GPU ones lent now and then cannot take its wheels), so these
engines have not run yet: tests/test_trt_engine.py compares them with ONNX Runtime on the CPU where
TensorRT and a GPU exist and skips with the reason elsewhere; the cache naming is tested everywhere.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: How far an FP16 engine may differ from ONNX Runtime on the CPU: CoarseNet's decoded outputs (max abs
#: difference; translation |dt| / |t|) and FineNet's map (mm). A stated budget, not yet measured: FP16 keeps
#: about 3 significant digits, and these are a few of its steps on each output's range.
TENSORRT_TOLERANCE = {"identity": 0.05, "sh": 0.05, "crop_xy": 0.05, "log_scale": 0.01, "expression": 0.02,
                      "albedo": 0.02, "rotation": 0.01, "translation": 0.01, "displacement_mm": 0.02}
#: Where engines are cached: $CAPTURE_ENGINE_CACHE, else ~/.cache/capture/engines.
ENGINE_CACHE_ENV = "CAPTURE_ENGINE_CACHE"
MAX_BATCH = 64
OPT_BATCH = 16  # capture video's default --batch
WORKSPACE_BYTES = 1 << 30


class TensorRTError(Exception):
    """An engine that cannot be built or loaded; the message is one line."""


def engine_cache_dir() -> Path:
    return Path(os.environ.get(ENGINE_CACHE_ENV) or Path.home() / ".cache" / "capture" / "engines")


def weights_hash(onnx_bytes: bytes) -> str:
    return hashlib.sha256(onnx_bytes).hexdigest()[:16]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_") or "gpu"


def engine_key(network: str, onnx_bytes: bytes, gpu_name: str, trt_version: str, fp16: bool = True,
               max_batch: int = MAX_BATCH) -> str:
    """The cache name of an engine: network (the ONNX file's stem), its weights' hash, the GPU model,
    the TensorRT version, the precision and the largest batch. Two engines share a name only when all
    of these agree."""
    return (f"{_slug(network)}-{weights_hash(onnx_bytes)}-{_slug(gpu_name)}-trt{_slug(trt_version)}"
            f"-{'fp16' if fp16 else 'fp32'}-b{int(max_batch)}")


def stale_engines(cache_dir: Path, key: str) -> list[Path]:
    """Cached engines of the same network and GPU as `key` under another name (other weights,
    TensorRT version, precision or batch): replaced by a new build."""
    network, _, rest = key.partition("-")
    gpu = rest.split("-")[1]
    return sorted(p for p in cache_dir.glob(f"{network}-*-{gpu}-trt*.engine") if p.stem != key)


def tensorrt_problem() -> str | None:
    """Why TensorRT engines cannot run here (None: they can)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt: TensorRT is not installed (pip install 'capture[gpu]')"
    try:
        import torch
    except ImportError:
        return "tensorrt: torch is not installed (its CUDA build holds the engines' buffers)"
    if not torch.cuda.is_available():
        return "tensorrt: torch sees no CUDA GPU (a CUDA build of torch holds the engines' buffers)"
    return None


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(torch.cuda.current_device())


def _logger():
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def build_engine(onnx_path: Path, cache_dir: Path | None = None, fp16: bool = True, max_batch: int = MAX_BATCH,
                 rebuild: bool = False, say=None) -> tuple[Path, bool]:
    """(the engine file for onnx_path on this GPU, whether it was built now): the cached one when its
    key matches, else built and cached (stale engines of the network removed). say(line) reports a build."""
    import tensorrt as trt

    onnx_path = Path(onnx_path)
    data = onnx_path.read_bytes()
    fp16 = fp16 and hasattr(trt.BuilderFlag, "FP16")  # TensorRT 11 builds every graph in its own types
    cache_dir = Path(cache_dir) if cache_dir is not None else engine_cache_dir()
    key = engine_key(onnx_path.stem, data, gpu_name(), trt.__version__, fp16, max_batch)
    path = cache_dir / f"{key}.engine"
    if path.is_file() and not rebuild:
        return path, False
    if say is not None:
        say(f"building the TensorRT engine for {onnx_path.name} ({'FP16' if fp16 else 'FP32'}, batch 1-{max_batch}; "
            f"once per GPU, TensorRT version and weights) -> {path}")
    logger = _logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch: the only kind in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(data):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no reason given"
        raise TensorRTError(f"TensorRT cannot read {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    dynamic = [network.get_input(i) for i in range(network.num_inputs) if tuple(network.get_input(i).shape)[0] == -1]
    for tensor in dynamic:  # the batch axis; the shipped nets have no other dynamic one
        rest = tuple(tensor.shape)[1:]
        profile.set_shape(tensor.name, (1, *rest), (min(OPT_BATCH, max_batch), *rest), (max_batch, *rest))
    if dynamic:
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTError(f"TensorRT could not build an engine for {onnx_path} (its log above says why)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_bytes(bytes(plan))
    partial.replace(path)  # a half-written engine is never taken for a whole one
    for old in stale_engines(cache_dir, key):
        old.unlink(missing_ok=True)
    return path, True


@dataclass(frozen=True)
class _Arg:
    """An input or output as ONNX Runtime's NodeArg shows it: name and shape (str for a named axis)."""

    name: str
    shape: list


@dataclass(frozen=True)
class _Meta:
    custom_metadata_map: dict


def _graph_args(values) -> list[_Arg]:
    return [_Arg(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]


class TensorRTSession:
    """A TensorRT engine with ONNX Runtime's InferenceSession interface (run, get_inputs, get_outputs,
    get_modelmeta, get_providers), made from the ONNX file (its engine built or taken from the cache)."""

    def __init__(self, onnx_path: str | Path, cache_dir: Path | None = None, fp16: bool = True,
                 max_batch: int = MAX_BATCH, say=None):
        import onnx
        import tensorrt as trt
        import torch

        proto = onnx.load(str(onnx_path))
        self._meta = _Meta({p.key: p.value for p in proto.metadata_props})
        self._inputs, self._outputs = _graph_args(proto.graph.input), _graph_args(proto.graph.output)
        self.engine_path, self.built = build_engine(Path(onnx_path), cache_dir, fp16, max_batch, say=say)
        self.max_batch = max_batch
        self._runtime = trt.Runtime(_logger())
        self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise TensorRTError(f"TensorRT cannot load the engine {self.engine_path} (delete it to build it again)")
        self.context = self.engine.create_execution_context()
        self._stream = torch.cuda.Stream()
        # each output's torch dtype, by way of numpy's (trt.nptype knows every version's types)
        self._out_dtypes = {o.name: torch.from_numpy(np.empty(0, trt.nptype(self.engine.get_tensor_dtype(o.name)))).dtype
                            for o in self._outputs}

    def get_inputs(self) -> list[_Arg]:
        return self._inputs

    def get_outputs(self) -> list[_Arg]:
        return self._outputs

    def get_modelmeta(self) -> _Meta:
        return self._meta

    def get_providers(self) -> list[str]:
        return ["TensorRT"]

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """As InferenceSession.run: numpy inputs by name -> the outputs asked for (None: all), numpy."""
        import torch

        names = list(output_names) if output_names else [o.name for o in self._outputs]
        batch = next(iter(feeds.values())).shape[0]
        if batch > self.max_batch:  # beyond the engine's profile: in pieces
            parts = [self.run(names, {k: v[i:i + self.max_batch] for k, v in feeds.items()})
                     for i in range(0, batch, self.max_batch)]
            return [np.concatenate(p) for p in zip(*parts)]
        with torch.cuda.stream(self._stream):
            held = []
            for name, array in feeds.items():
                t = torch.from_numpy(np.ascontiguousarray(array)).to("cuda", non_blocking=False)
                held.append(t)
                self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, t.data_ptr())
            outs = {}
            for o in self._outputs:
                t = torch.empty(tuple(self.context.get_tensor_shape(o.name)), dtype=self._out_dtypes[o.name],
                                device="cuda")
                outs[o.name] = t
                self.context.set_tensor_address(o.name, t.data_ptr())
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise TensorRTError(f"TensorRT failed to run {self.engine_path.name}")
            self._stream.synchronize()
        return [outs[n].float().cpu().numpy() if outs[n].dtype == torch.float16 else outs[n].cpu().numpy()
                for n in names]
