"""Z-buffer rasterizer: per pixel the visible triangle, its barycentrics and its depth.

Two kernels, one interface (`rasterize`): a numba kernel on the CPU (the
reference) and a CUDA kernel (cuda_ext/rasterize.cu, built with CMake into
build/cuda_ext/libcapture_cuda.so and called through ctypes). Both follow the
same rules and agree bit for bit:

- pixel centres sit at integer coordinates (OpenCV's convention), so a pinhole
  camera matrix K from OpenCV applies unchanged; a pixel is covered when its
  centre is inside or on an edge of the projected triangle, either winding;
- triangles with a corner nearer than near_cm draw nothing (no clipping);
- depth is the camera z (cm) of the surface point under the pixel centre; the
  z-test compares it rounded to float32, and equal depths go to the lower
  triangle id, whatever order the kernel visits triangles in;
- barycentrics are perspective-correct: they weight the triangle's corners in
  3D, so attributes interpolated with them are what a camera sees.

The rasterizer is not differentiable (ids are discrete); engine.shading
recomputes barycentrics from the vertices in torch for gradients.
"""
from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np

from engine.pose import project

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV_CUDA_LIB = "CAPTURE_CUDA_LIB"
DEFAULT_CUDA_LIB = REPO_ROOT / "build" / "cuda_ext" / "libcapture_cuda.so"
BACKENDS = ("auto", "cpu", "cuda")


class CudaBackendUnavailable(RuntimeError):
    """The CUDA rasterizer cannot run here (no GPU visible to torch, or the library is not built)."""


@dataclass
class Fragments:
    """Rasterizer output for an (H, W) image.

    triangle_id (H, W) int32, -1 where no triangle covers the pixel;
    barycentric (H, W, 3) float32, perspective-correct, zero off the mesh;
    depth_cm (H, W) float32 camera z of the surface, inf off the mesh.
    numpy arrays when the vertices came as numpy, torch tensors (on the
    vertices' device) when they came as a torch tensor.
    """

    triangle_id: Any
    barycentric: Any
    depth_cm: Any

    @property
    def mask(self):
        return self.triangle_id >= 0


def rasterize(points_cam, triangles, camera_matrix, width: int, height: int, near_cm: float = 1.0,
              backend: str = "auto") -> Fragments:
    """Rasterize a mesh given in camera coordinates (cm, z forward, y down).

    points_cam (V, 3), triangles (T, 3) int, camera_matrix (3, 3) pixels (fx, fy,
    cx, cy used; skew ignored, as in engine.pose.project): numpy arrays or torch
    tensors (any float dtype; both kernels compute in float64).
    Triangles with a corner nearer than near_cm are skipped.
    backend: "cpu" (numba), "cuda" (cuda_ext, raises CudaBackendUnavailable
    when it cannot run) or "auto" (CUDA when a GPU and the library are there).
    """
    as_torch = _is_tensor(points_cam)
    if _resolve_backend(backend) == "cuda":
        return _rasterize_cuda(points_cam, triangles, camera_matrix, width, height, near_cm, as_torch)
    pts = np.ascontiguousarray(_to_numpy(points_cam), dtype=np.float64)
    tri = np.ascontiguousarray(_to_numpy(triangles), dtype=np.int64).reshape(-1, 3)
    if tri.size:
        _check_indices(tri.min(), tri.max(), len(pts))
    K = np.asarray(_to_numpy(camera_matrix), dtype=np.float64)
    uv = project(pts, K)
    tri_id = np.full((height, width), -1, dtype=np.int32)
    bary = np.zeros((height, width, 3), dtype=np.float32)
    depth = np.full((height, width), np.inf, dtype=np.float32)
    _rasterize_kernel(np.ascontiguousarray(uv), pts[:, 2].copy(), tri, float(near_cm), tri_id, bary, depth)
    if as_torch:
        import torch
        dev = points_cam.device
        return Fragments(torch.from_numpy(tri_id).to(dev), torch.from_numpy(bary).to(dev),
                         torch.from_numpy(depth).to(dev))
    return Fragments(tri_id, bary, depth)


@numba.njit(cache=True, nogil=True)
def _rasterize_kernel(uv, z, tri, near, tri_id, bary, depth):
    # cuda_ext/rasterize.cu mirrors this operation for operation: change both together.
    height, width = tri_id.shape
    for t in range(tri.shape[0]):
        i0, i1, i2 = tri[t, 0], tri[t, 1], tri[t, 2]
        z0, z1, z2 = z[i0], z[i1], z[i2]
        if z0 < near or z1 < near or z2 < near:
            continue
        x0, y0 = uv[i0, 0], uv[i0, 1]
        x1, y1 = uv[i1, 0], uv[i1, 1]
        x2, y2 = uv[i2, 0], uv[i2, 1]
        area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
        if not abs(area) >= 1e-12:   # degenerate (or NaN)
            continue
        # clamp before converting to int, so that huge coordinates cannot overflow
        xmin = int(np.ceil(max(min(x0, x1, x2), 0.0)))
        xmax = int(np.floor(min(max(x0, x1, x2), width - 1.0)))
        ymin = int(np.ceil(max(min(y0, y1, y2), 0.0)))
        ymax = int(np.floor(min(max(y0, y1, y2), height - 1.0)))
        if xmin > xmax or ymin > ymax:
            continue
        inv_area = 1.0 / area
        for py in range(ymin, ymax + 1):
            for px in range(xmin, xmax + 1):
                # screen-space barycentrics from edge functions
                w0 = ((x1 - px) * (y2 - py) - (x2 - px) * (y1 - py)) * inv_area
                w1 = ((x2 - px) * (y0 - py) - (x0 - px) * (y2 - py)) * inv_area
                w2 = 1.0 - w0 - w1
                if w0 < 0.0 or w1 < 0.0 or w2 < 0.0:
                    continue
                # perspective correction: interpolate 1/z linearly in screen space
                q0, q1, q2 = w0 / z0, w1 / z1, w2 / z2
                inv_z = q0 + q1 + q2
                d = 1.0 / inv_z
                # z-test at the stored (float32) precision: a tie keeps the earlier, lower id,
                # which is what the CUDA kernel's atomicMin on (depth bits, id) gives
                if np.float32(d) < depth[py, px]:
                    depth[py, px] = d
                    tri_id[py, px] = t
                    bary[py, px, 0] = q0 * d
                    bary[py, px, 1] = q1 * d
                    bary[py, px, 2] = q2 * d


# ---------------------------------------------------------------- the CUDA backend


def cuda_library_path() -> Path:
    """Where the CUDA library is looked for: $CAPTURE_CUDA_LIB, else build/cuda_ext/libcapture_cuda.so."""
    return Path(os.environ.get(ENV_CUDA_LIB) or DEFAULT_CUDA_LIB)


_LIBRARIES: dict[Path, ctypes.CDLL] = {}


def load_cuda_library(path: str | os.PathLike | None = None) -> ctypes.CDLL:
    """The cuda_ext library with its entry points typed; CudaBackendUnavailable when it is missing.

    Loading needs no GPU (the CUDA runtime is linked in statically and starts on first use).
    """
    path = Path(path) if path is not None else cuda_library_path()
    if path in _LIBRARIES:
        return _LIBRARIES[path]
    if not path.is_file():
        raise CudaBackendUnavailable(
            f"CUDA rasterizer library not found at {path}: build it with "
            f"`cmake -S . -B build && cmake --build build` (needs nvcc) or set ${ENV_CUDA_LIB}")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise CudaBackendUnavailable(f"cannot load CUDA rasterizer library {path}: {e}") from None
    ptr, i32, f64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    common = [ptr, ptr, i32, f64, f64, f64, f64, f64, i32, i32, ptr, ptr, ptr, ptr]
    lib.capture_rasterize_cuda.argtypes = common + [ptr]
    lib.capture_rasterize_cuda.restype = i32
    lib.capture_rasterize_host.argtypes = common
    lib.capture_rasterize_host.restype = i32
    lib.capture_cuda_error_string.argtypes = [i32]
    lib.capture_cuda_error_string.restype = ctypes.c_char_p
    _LIBRARIES[path] = lib
    return lib


def cuda_backend_available() -> bool:
    """True when backend="auto" would rasterize on the GPU."""
    try:
        _resolve_backend("cuda")
    except CudaBackendUnavailable:
        return False
    return True


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"rasterizer backend must be one of {BACKENDS}, not {backend!r}")
    if backend == "cpu":
        return "cpu"
    if backend == "auto" and not cuda_library_path().is_file():
        return "cpu"   # decided without importing torch
    try:
        import torch
        if not torch.cuda.is_available():
            raise CudaBackendUnavailable("CUDA rasterizer needs a CUDA GPU, and torch sees none "
                                         "(torch.cuda.is_available() is False)")
        load_cuda_library()
    except CudaBackendUnavailable:
        if backend == "cuda":
            raise
        return "cpu"
    return "cuda"


def _camera_intrinsics(camera_matrix) -> tuple[float, float, float, float]:
    K = np.asarray(_to_numpy(camera_matrix), dtype=np.float64)
    return float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])


def _rasterize_cuda(points_cam, triangles, camera_matrix, width, height, near_cm, as_torch) -> Fragments:
    import torch
    lib = load_cuda_library()
    dev = points_cam.device if as_torch and points_cam.is_cuda else torch.device("cuda")
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream   # queued behind the caller's torch work
        err, frags = _call_kernel(lib.capture_rasterize_cuda, points_cam, triangles, camera_matrix, width, height,
                                  near_cm, dev, stream)
    if err:
        raise RuntimeError(f"CUDA rasterizer failed: {lib.capture_cuda_error_string(err).decode()}")
    if as_torch:
        out = points_cam.device
        return Fragments(frags.triangle_id.to(out), frags.barycentric.to(out), frags.depth_cm.to(out))
    return Fragments(*(x.cpu().numpy() for x in (frags.triangle_id, frags.barycentric, frags.depth_cm)))


def _call_kernel(entry, points_cam, triangles, camera_matrix, width, height, near_cm, device, *extra):
    """Allocate torch buffers on `device` and call a cuda_ext entry point on them; (error code, Fragments)."""
    import torch
    pts = torch.as_tensor(_detach(points_cam)).to(device, torch.float64).contiguous()
    tri = torch.as_tensor(_detach(triangles)).to(device, torch.int32).reshape(-1, 3).contiguous()
    if tri.numel():
        lo, hi = torch.aminmax(tri)   # one sync; a bad index would be an illegal memory access
        _check_indices(int(lo), int(hi), len(pts))
    zbuf = torch.empty(height * width, dtype=torch.int64, device=device)      # scratch for the kernel
    tri_id = torch.empty((height, width), dtype=torch.int32, device=device)
    bary = torch.empty((height, width, 3), dtype=torch.float32, device=device)
    depth = torch.empty((height, width), dtype=torch.float32, device=device)
    err = entry(pts.data_ptr(), tri.data_ptr(), len(tri), *_camera_intrinsics(camera_matrix), float(near_cm),
                int(width), int(height), zbuf.data_ptr(), tri_id.data_ptr(), bary.data_ptr(), depth.data_ptr(), *extra)
    return err, Fragments(tri_id, bary, depth)


def rasterize_cuda_code_on_host(points_cam, triangles, camera_matrix, width: int, height: int,
                                near_cm: float = 1.0, library: str | os.PathLike | None = None) -> Fragments:
    """Run the CUDA kernels' own code (compiled for the host) on the CPU; numpy in and out.

    For checking cuda_ext's arithmetic, and the Python glue the CUDA backend shares, against
    the numba kernel where no GPU is present; only the launches and atomics are left out.
    """
    lib = load_cuda_library(library)
    _, frags = _call_kernel(lib.capture_rasterize_host, points_cam, triangles, camera_matrix, width, height,
                            near_cm, "cpu")
    return Fragments(*(x.numpy() for x in (frags.triangle_id, frags.barycentric, frags.depth_cm)))


def _check_indices(lo, hi, n_vertices: int) -> None:
    """Smallest and largest triangle index (of a non-empty index array) against the vertex count."""
    if lo < 0 or hi >= n_vertices:
        raise ValueError(f"triangle indices must lie in [0, {n_vertices}), found [{lo}, {hi}]")


def _is_tensor(x) -> bool:
    torch = sys.modules.get("torch")   # a tensor implies torch is imported already
    return torch is not None and isinstance(x, torch.Tensor)


def _detach(x):
    return x.detach() if _is_tensor(x) else x


def _to_numpy(x):
    return x.detach().cpu().numpy() if _is_tensor(x) else np.asarray(x)


def interpolate(fragments: Fragments, attributes: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Per-vertex attributes (V, C) -> per-pixel (H, W, C), zero off the mesh."""
    tid = fragments.triangle_id
    out = np.zeros(tid.shape + (attributes.shape[1],), dtype=np.float32)
    m = tid >= 0
    corners = attributes[triangles[tid[m]]]  # (P, 3, C)
    out[m] = np.einsum("pic,pi->pc", corners, fragments.barycentric[m])
    return out


def vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """(V, 3) unit area-weighted vertex normals of a mesh."""
    v0, v1, v2 = (vertices[triangles[:, i]] for i in range(3))
    face_n = np.cross(v1 - v0, v2 - v0)
    corners = np.asarray(triangles).ravel()                 # each triangle's normal goes to its 3 corners
    n = np.stack([np.bincount(corners, weights=np.repeat(face_n[:, k], 3), minlength=len(vertices))
                  for k in range(3)], axis=1).astype(vertices.dtype, copy=False)   # (np.add.at is 10x slower)
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    return n / np.maximum(norm, 1e-12)
