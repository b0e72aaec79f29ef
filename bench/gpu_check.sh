#!/usr/bin/env bash
# The GPU checks in one go, for a machine with an NVIDIA GPU, nvcc and cmake (run from the repository root):
# builds cuda_ext, runs the CUDA tests, the CUDA runtimes' and the networks' training's (tests/test_device.py,
# tests/test_trt_engine.py, tests/test_train_fine.py, tests/test_train_coarse.py), times the rasterizer (numba vs CUDA) and the networks per backend
# (bench/bench_device.py) and batched 720p video (bench/bench_batch.py). REPORT (default gpu_check.txt) gets
# everything printed. PYTHON picks the interpreter (default python3); CAPTURE_FACE_MODEL points at the face
# model where ../shared is not beside the project.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
REPORT=${1:-gpu_check.txt}
{
  echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
  echo "== build cuda_ext"
  cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build build -j 8 2>&1 | tail -3
  echo "== CUDA tests"
  $PY -m pytest -q -p no:cacheprovider tests/test_rasterizer.py -k "cuda" -rs 2>&1 | tail -15
  echo "== device choice and CUDA runtimes against the CPU"
  $PY -c "from engine.device import choose_device; print(choose_device('auto').line())"
  $PY -m pytest -q -p no:cacheprovider tests/test_device.py tests/test_trt_engine.py tests/test_train_fine.py \
    tests/test_train_coarse.py \
    -k "cuda or device or engine" -rs 2>&1 \
    | tail -15
  echo "== CoarseNet and FineNet per backend (batch 1, batched)"
  $PY bench/bench_device.py 2>&1 | tail -8
  echo "== recorded 720p video, --batch 16 against 1, on the GPU"
  $PY bench/bench_batch.py --height 720 --cores 1,4 --repeat 3 --device cuda 2>&1 | tail -14
  echo "== rasterizer speed"
  CAPTURE_CUDA_LIB=build/cuda_ext/libcapture_cuda.so $PY bench/bench_rasterizer.py 2>&1 | tail -6
} 2>&1 | tee "$REPORT"
