// CUDA z-buffer rasterizer: the GPU twin of the numba kernel in engine/rasterizer.py.
//
// The numba kernel is the reference; this file keeps its semantics exactly:
//   * Camera space is OpenCV's (x right, y down, z forward, cm). A vertex projects to
//     u = fx * x / z + cx, v = fy * y / z + cy (skew ignored, as engine.pose.project does).
//   * Pixel centres sit at integer coordinates. A pixel is covered when its centre lies inside
//     or on an edge of the projected triangle, whichever the winding.
//   * A triangle with a corner nearer than near_cm, or with a projected area under 1e-12 px^2,
//     draws nothing (no clipping).
//   * Depth is the camera z of the surface point seen through the pixel centre. The z-test
//     compares that depth rounded to float32 (the stored precision); on equal depths the lower
//     triangle id wins.
//   * Barycentrics are perspective-correct (they weight the corners in 3D).
//   * Background: triangle id -1, barycentrics 0, depth +inf.
//
// All geometry is done in double precision, with the same operations in the same order as the
// numba kernel and with no fused multiply-adds (see mul() below), so both backends agree bit for
// bit, not just within a tolerance. Vertex arrays are tiny, so double costs nothing that matters
// even on GPUs with slow FP64: the per-pixel work is a few dozen flops.
//
// Two passes on the caller's stream:
//   1. raster: one thread per triangle walks the pixels of its clipped bounding box and
//      atomicMin's a packed 64-bit key (float32 depth bits << 32 | triangle id) into a per-pixel
//      z-buffer. Depths are positive, and positive IEEE floats order like their bit patterns as
//      unsigned integers, so the smallest key is the nearest depth, then the lowest id: exactly
//      the numba kernel's "strictly nearer replaces" rule run over triangles in index order.
//   2. resolve: one thread per pixel reads the winning id and recomputes that triangle's
//      barycentrics and depth at the pixel (cheaper than carrying them through the atomics).
// One thread per triangle suits meshes of many small triangles (a face at webcam resolution
// covers a few pixels per triangle); a triangle covering much of the image serialises on its
// thread and would want a tiled rasterizer instead.
//
// The same per-triangle and per-pixel functions are compiled for the host too
// (capture_rasterize_host), so the arithmetic can be checked against the numba kernel on a
// machine without a GPU; only the kernel launches and atomics are GPU-only.

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

// Every z-buffer slot starts as all ones: larger than any key a triangle can write
// (finite float depth bits < 0x7f800000).
constexpr unsigned long long kEmptyKey = 0xFFFFFFFFFFFFFFFFull;
constexpr int kThreads = 256;

struct Camera {
  double fx, fy, cx, cy;  // pixels
};

// a * b rounded on its own. nvcc would otherwise contract patterns such as a*b - c*d or
// 1 - a*b into one fused multiply-add with a single rounding, which changes the last bit of
// edge functions and so flips coverage of pixel centres lying on an edge relative to the CPU.
// (The build also passes --fmad=false; this keeps the code right without relying on a flag.)
__host__ __device__ inline double mul(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

__host__ __device__ inline unsigned int float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  unsigned int u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

__host__ __device__ inline float bits_float(unsigned int u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

__host__ __device__ inline unsigned long long pack_key(float depth, int triangle) {
  return (static_cast<unsigned long long>(float_bits(depth)) << 32) | static_cast<unsigned int>(triangle);
}

// Keep the smaller key. On the GPU a plain read first skips the atomic when the slot already
// holds a nearer surface; the read may be stale, but slots only ever decrease, so a stale value
// is never smaller than the true one and the skip is always safe.
__host__ __device__ inline void keep_min(unsigned long long* slot, unsigned long long key) {
#ifdef __CUDA_ARCH__
  if (key < *slot) atomicMin(slot, key);
#else
  if (key < *slot) *slot = key;
#endif
}

// One triangle projected to the image, with its pixel bounding box clipped to the image.
struct ScreenTriangle {
  double x[3], y[3];  // projected corners, pixels
  double z[3];        // camera z of the corners, cm
  double inv_area;    // 1 / twice the signed area in pixels (sign = winding)
  int xmin, xmax, ymin, ymax;
};

// Projects triangle t; false when it draws nothing (near plane, degenerate, off-screen).
__host__ __device__ inline bool setup_triangle(const double* vertices, const int* triangles, int t,
                                               Camera cam, double near_cm, int width, int height,
                                               ScreenTriangle& s) {
  for (int k = 0; k < 3; ++k) {
    const double* p = vertices + 3 * static_cast<long long>(triangles[3 * t + k]);
    s.z[k] = p[2];
  }
  if (s.z[0] < near_cm || s.z[1] < near_cm || s.z[2] < near_cm) return false;
  for (int k = 0; k < 3; ++k) {
    const double* p = vertices + 3 * static_cast<long long>(triangles[3 * t + k]);
    // (fx * x) / z + cx: numpy's order in engine.pose.project
    s.x[k] = mul(cam.fx, p[0]) / s.z[k] + cam.cx;
    s.y[k] = mul(cam.fy, p[1]) / s.z[k] + cam.cy;
  }
  const double area = mul(s.x[1] - s.x[0], s.y[2] - s.y[0]) - mul(s.x[2] - s.x[0], s.y[1] - s.y[0]);
  if (!(fabs(area) >= 1e-12)) return false;  // also rejects NaN
  // Clamp in floating point before converting, so huge coordinates cannot overflow an int.
  const double lo_x = fmin(fmin(s.x[0], s.x[1]), s.x[2]), hi_x = fmax(fmax(s.x[0], s.x[1]), s.x[2]);
  const double lo_y = fmin(fmin(s.y[0], s.y[1]), s.y[2]), hi_y = fmax(fmax(s.y[0], s.y[1]), s.y[2]);
  s.xmin = static_cast<int>(ceil(fmax(lo_x, 0.0)));
  s.xmax = static_cast<int>(floor(fmin(hi_x, width - 1.0)));
  s.ymin = static_cast<int>(ceil(fmax(lo_y, 0.0)));
  s.ymax = static_cast<int>(floor(fmin(hi_y, height - 1.0)));
  if (s.xmin > s.xmax || s.ymin > s.ymax) return false;
  s.inv_area = 1.0 / area;
  return true;
}

// Coverage of the pixel centre (px, py). When covered, q[k] = w_k / z_k (screen-space weight over
// corner depth) and depth = 1 / sum(q): 1/z is what varies linearly across the screen.
__host__ __device__ inline bool pixel_weights(const ScreenTriangle& s, int px, int py, double q[3], double& depth) {
  const double x = px, y = py;
  const double w0 = mul(mul(s.x[1] - x, s.y[2] - y) - mul(s.x[2] - x, s.y[1] - y), s.inv_area);
  const double w1 = mul(mul(s.x[2] - x, s.y[0] - y) - mul(s.x[0] - x, s.y[2] - y), s.inv_area);
  const double w2 = 1.0 - w0 - w1;
  if (w0 < 0.0 || w1 < 0.0 || w2 < 0.0) return false;
  q[0] = w0 / s.z[0];
  q[1] = w1 / s.z[1];
  q[2] = w2 / s.z[2];
  depth = 1.0 / (q[0] + q[1] + q[2]);
  return true;
}

__host__ __device__ inline void raster_triangle(const double* vertices, const int* triangles, int t, Camera cam,
                                                double near_cm, int width, int height, unsigned long long* zbuffer) {
  ScreenTriangle s;
  if (!setup_triangle(vertices, triangles, t, cam, near_cm, width, height, s)) return;
  for (int py = s.ymin; py <= s.ymax; ++py) {
    for (int px = s.xmin; px <= s.xmax; ++px) {
      double q[3], depth;
      if (!pixel_weights(s, px, py, q, depth)) continue;
      keep_min(zbuffer + static_cast<long long>(py) * width + px, pack_key(static_cast<float>(depth), t));
    }
  }
}

__host__ __device__ inline void resolve_pixel(const double* vertices, const int* triangles, Camera cam,
                                              double near_cm, int width, int height, long long pixel,
                                              const unsigned long long* zbuffer, int* triangle_id,
                                              float* barycentric, float* depth_cm) {
  const unsigned long long key = zbuffer[pixel];
  float* b = barycentric + 3 * pixel;
  if (key == kEmptyKey) {
    triangle_id[pixel] = -1;
    b[0] = b[1] = b[2] = 0.0f;
    depth_cm[pixel] = INFINITY;
    return;
  }
  const int t = static_cast<int>(key & 0xFFFFFFFFull);
  const int px = static_cast<int>(pixel % width), py = static_cast<int>(pixel / width);
  // The winner passed both tests in the raster pass, and the arithmetic is deterministic,
  // so it passes them again here with the same numbers.
  ScreenTriangle s;
  double q[3], depth;
  setup_triangle(vertices, triangles, t, cam, near_cm, width, height, s);
  pixel_weights(s, px, py, q, depth);
  triangle_id[pixel] = t;
  b[0] = static_cast<float>(mul(q[0], depth));
  b[1] = static_cast<float>(mul(q[1], depth));
  b[2] = static_cast<float>(mul(q[2], depth));
  depth_cm[pixel] = bits_float(static_cast<unsigned int>(key >> 32));
}

__global__ void raster_kernel(const double* vertices, const int* triangles, int n_triangles, Camera cam,
                              double near_cm, int width, int height, unsigned long long* zbuffer) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t < n_triangles) raster_triangle(vertices, triangles, t, cam, near_cm, width, height, zbuffer);
}

__global__ void resolve_kernel(const double* vertices, const int* triangles, Camera cam, double near_cm,
                               int width, int height, const unsigned long long* zbuffer, int* triangle_id,
                               float* barycentric, float* depth_cm) {
  const long long pixel = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pixel < static_cast<long long>(width) * height)
    resolve_pixel(vertices, triangles, cam, near_cm, width, height, pixel, zbuffer, triangle_id, barycentric,
                  depth_cm);
}

}  // namespace

extern "C" {

// Rasterizes on the GPU. All pointers are device memory (e.g. torch CUDA tensors' data_ptr()):
//   vertices_cam  (V, 3) float64, camera space, cm
//   triangles     (T, 3) int32, indices into vertices (not checked here: the caller validates)
//   zbuffer       (H * W) uint64 scratch
//   triangle_id   (H, W) int32, barycentric (H, W, 3) float32, depth_cm (H, W) float32: outputs
// fx, fy, cx, cy: pinhole intrinsics in pixels. stream: a cudaStream_t (0 = legacy default).
// Work is queued on the stream and not waited for. Returns a cudaError_t (0 = launched).
int capture_rasterize_cuda(const double* vertices_cam, const int* triangles, int n_triangles, double fx, double fy,
                           double cx, double cy, double near_cm, int width, int height,
                           unsigned long long* zbuffer, int* triangle_id, float* barycentric, float* depth_cm,
                           void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const long long n_pixels = static_cast<long long>(width) * height;
  if (n_pixels <= 0) return cudaSuccess;
  const Camera cam{fx, fy, cx, cy};
  cudaError_t err = cudaMemsetAsync(zbuffer, 0xFF, n_pixels * sizeof(unsigned long long), s);  // kEmptyKey
  if (err != cudaSuccess) return err;
  if (n_triangles > 0) {
    raster_kernel<<<(n_triangles + kThreads - 1) / kThreads, kThreads, 0, s>>>(
        vertices_cam, triangles, n_triangles, cam, near_cm, width, height, zbuffer);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const unsigned int blocks = static_cast<unsigned int>((n_pixels + kThreads - 1) / kThreads);
  resolve_kernel<<<blocks, kThreads, 0, s>>>(vertices_cam, triangles, cam, near_cm, width, height, zbuffer,
                                             triangle_id, barycentric, depth_cm);
  return cudaGetLastError();
}

// The same kernels' code run on the CPU over host memory (same arguments, no stream): lets a
// machine without a GPU check this file's arithmetic against the numba kernel. Always returns 0.
int capture_rasterize_host(const double* vertices_cam, const int* triangles, int n_triangles, double fx, double fy,
                           double cx, double cy, double near_cm, int width, int height,
                           unsigned long long* zbuffer, int* triangle_id, float* barycentric, float* depth_cm) {
  const Camera cam{fx, fy, cx, cy};
  const long long n_pixels = static_cast<long long>(width) * height;
  for (long long p = 0; p < n_pixels; ++p) zbuffer[p] = kEmptyKey;
  for (int t = 0; t < n_triangles; ++t) raster_triangle(vertices_cam, triangles, t, cam, near_cm, width, height, zbuffer);
  for (long long p = 0; p < n_pixels; ++p)
    resolve_pixel(vertices_cam, triangles, cam, near_cm, width, height, p, zbuffer, triangle_id, barycentric,
                  depth_cm);
  return 0;
}

// A readable message for an error code returned above.
const char* capture_cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // extern "C"
