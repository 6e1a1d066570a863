// Pieces shared by the CUDA kernels of the memkd ops: accumulation types, the feature-map layout
// (NCHW- or channels_last-dense, read in place), cooperative tile loads/stores through shared
// memory, the device facts used to pick tile sizes, and the launch helper.
//
// Every kernel runs 256 threads per block (kThreads) and takes all of its shared memory
// dynamically.
//
// File convention of csrc/cuda: <op>_kernel.cu holds everything of one op — its kernels, their
// launchers and the entry points registered with TORCH_LIBRARY_IMPL(memkd, CUDA) — and headers
// (.cuh) hold only what several ops share: this file (device helpers, layouts, launch helpers) and
// cosine_distances.cuh (the distance kernel of cosine_distance_map and anomaly_map). Argument
// checks shared with the CPU kernels are in csrc/ops/checks.h, the schemas in csrc/ops/<op>.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

#include "../ops/checks.h"

#define MEMKD_HOST_DEVICE __host__ __device__ __forceinline__
#define MEMKD_DEVICE __device__ __forceinline__
#define MEMKD_GLOBAL __global__ __launch_bounds__(256)
#define MEMKD_GRID_CONSTANT __grid_constant__
#define MEMKD_SHARED_MEMORY(name) extern __shared__ __align__(16) unsigned char name[]

namespace memkd::cuda {

constexpr int kThreads = 256;   // threads per block of every kernel
constexpr double kEps = 1e-8;   // memkd.ops.reference.EPS: x / max(|x|, EPS)

// Reductions run in fp32 for fp32/fp16/bf16 inputs and in fp64 for fp64 inputs.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename acc_t>
inline at::ScalarType acc_scalar_type() {
  return std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
}

MEMKD_HOST_DEVICE float dev_sqrt(float x) { return sqrtf(x); }
MEMKD_HOST_DEVICE double dev_sqrt(double x) { return sqrt(x); }
MEMKD_HOST_DEVICE float dev_exp(float x) { return expf(x); }
MEMKD_HOST_DEVICE double dev_exp(double x) { return exp(x); }
template <typename T>
MEMKD_HOST_DEVICE T dev_max(T a, T b) {
  return a < b ? b : a;
}
// max that propagates NaN like torch.amax (and keeps the first of equal values).
template <typename T>
MEMKD_HOST_DEVICE T nan_max(T a, T b) {
  return (b > a || b != b) ? b : a;
}
template <typename T>
MEMKD_HOST_DEVICE T neg_infinity() {
  return -std::numeric_limits<T>::infinity();
}
// Elements, rounded up to a multiple of 4 so every shared buffer starts 16-byte aligned.
MEMKD_HOST_DEVICE int round4(int n) { return (n + 3) / 4 * 4; }

// v[0..3] = p[0..3] with vector loads; p must be 16-byte aligned (shared buffers built with round4).
MEMKD_DEVICE void load4(const float* p, float (&v)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x;
  v[1] = t.y;
  v[2] = t.z;
  v[3] = t.w;
}
MEMKD_DEVICE void load4(const double* p, double (&v)[4]) {
  const double2 a = reinterpret_cast<const double2*>(p)[0];
  const double2 b = reinterpret_cast<const double2*>(p)[1];
  v[0] = a.x;
  v[1] = a.y;
  v[2] = b.x;
  v[3] = b.y;
}

// Element (b, c, p) of a dense [B, C, H, W] map, p = h * W + w, lives at
// data[b * sb + c * sc + p * sp]. channels_fastest picks the coalesced order for loads/stores.
struct Layout {
  int64_t sb, sc, sp;
  bool channels_fastest;
};

inline Layout layout_of(const at::Tensor& x) {
  // Size-1 dims may carry any stride, so take the pixel step from a dim that really moves.
  const int64_t sp = x.size(3) > 1 ? x.stride(3) : x.stride(2);
  return {x.stride(0), x.stride(1), sp, x.size(1) > 1 && x.stride(1) == 1};
}

// NCHW-dense and channels_last-dense maps are read in place; any other layout is copied once.
inline at::Tensor dense_feature_map(const at::Tensor& x) {
  if (x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast)) return x;
  return x.contiguous();
}

// Cooperative load of a CC x TP tile of x(b, c0 + c, p0 + p) into shared memory as acc_t, zero
// outside [0, C) x [0, P): pixel-major s[p * ld + c] or channel-major s[c * ld + p]. Consecutive
// threads walk the tensor's fastest dimension, so the global reads coalesce for either layout.
template <int TP, int CC, bool PIXEL_MAJOR, typename scalar_t, typename acc_t>
MEMKD_DEVICE void load_tile(const scalar_t* __restrict__ x, const Layout& l, int64_t b, int64_t p0,
                            int64_t P, int64_t c0, int64_t C, acc_t* s, int ld) {
  const scalar_t* base = x + b * l.sb;
  for (int i = threadIdx.x; i < TP * CC; i += kThreads) {
    const int c = l.channels_fastest ? i % CC : i / TP;
    const int p = l.channels_fastest ? i / CC : i % TP;
    const int64_t gc = c0 + c, gp = p0 + p;
    acc_t v = acc_t(0);
    if (gc < C && gp < P) v = static_cast<acc_t>(base[gc * l.sc + gp * l.sp]);
    s[PIXEL_MAJOR ? p * ld + c : c * ld + p] = v;
  }
}

// Cooperative store y(b, c0 + c, p0 + p) = value(c, p) for the in-range part of a CC x TP tile, in
// the coalesced order of y's layout.
template <int TP, int CC, typename scalar_t, typename F>
MEMKD_DEVICE void store_tile(scalar_t* __restrict__ y, const Layout& l, int64_t b, int64_t p0,
                             int64_t P, int64_t c0, int64_t C, F value) {
  scalar_t* base = y + b * l.sb;
  for (int i = threadIdx.x; i < TP * CC; i += kThreads) {
    const int c = l.channels_fastest ? i % CC : i / TP;
    const int p = l.channels_fastest ? i / CC : i % TP;
    const int64_t gc = c0 + c, gp = p0 + p;
    if (gc < C && gp < P) base[gc * l.sc + gp * l.sp] = static_cast<scalar_t>(value(c, p));
  }
}

// s[l * ld + c] = m[l, c0 + c] for l < L, c < CC (zero past C), from a contiguous [L, C] matrix.
template <int CC, typename acc_t>
MEMKD_DEVICE void load_rows(const acc_t* __restrict__ m, int L, int64_t C, int64_t c0, acc_t* s, int ld) {
  for (int i = threadIdx.x; i < L * CC; i += kThreads) {
    const int l = i / CC, c = i % CC;
    s[l * ld + c] = c0 + c < C ? m[l * C + c0 + c] : acc_t(0);
  }
}

// ---- host side -----------------------------------------------------------------------------

inline void check_cuda_tensor(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), name, ": expected a CUDA tensor, got a tensor on ", x.device());
}

struct DeviceInfo {
  int sm_count;
  int64_t smem_optin;   // the most dynamic shared memory one block may use
  int64_t smem_per_sm;  // shared memory of one multiprocessor
};

// Facts of the current device, queried once per device.
inline DeviceInfo device_info() {
  static std::mutex mutex;
  static std::vector<std::pair<int, DeviceInfo>> cache;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& entry : cache)
    if (entry.first == device) return entry.second;
  int sms = 0, optin = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  const DeviceInfo info{sms, optin, per_sm};
  cache.emplace_back(device, info);
  return info;
}

// kernel<<<grid, kThreads, smem_bytes, current stream>>>(args...), opting into more than 48 KiB
// of dynamic shared memory where needed, and checking the launch.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, size_t smem_bytes, Args&&... args) {
  if (smem_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_bytes)));
  }
  kernel<<<grid, dim3(kThreads), smem_bytes, c10::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Resident blocks of `smem_bytes` shared memory on one multiprocessor (at most 8 of 256 threads).
inline int blocks_per_sm(const DeviceInfo& dev, int64_t smem_bytes) {
  const int64_t per_block = std::max<int64_t>(smem_bytes + 1024, 1);  // 1 KiB reserved per block
  return static_cast<int>(std::clamp<int64_t>(dev.smem_per_sm / per_block, 1, 8));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The kernels index pixels and channels of one image with int, and grids with 31-bit x.
inline void check_kernel_limits(int64_t channels, int64_t pixels, int64_t blocks, const char* op) {
  TORCH_CHECK(channels < (int64_t(1) << 31) && pixels < (int64_t(1) << 31) && blocks < (int64_t(1) << 31),
              op, ": tensor too large for the CUDA kernels (C = ", channels, ", H*W = ", pixels, ")");
}

}  // namespace memkd::cuda
