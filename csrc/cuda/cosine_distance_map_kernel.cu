// CUDA kernels of memkd::cosine_distance_map and memkd::cosine_distance_map_backward: the backward
// kernel, the launchers and the entry points (the forward kernel is in cosine_distances.cuh, shared
// with the anomaly map). The backward recomputes the forward's terms, then streams the channel
// chunks again and writes both gradients, each in its map's coalesced order. Entry points check
// their arguments (csrc/ops/checks.h), require CUDA tensors on one device, and run on that
// device's current stream.
#include <torch/library.h>

#include "cosine_distances.cuh"

namespace memkd::cuda {
namespace {

// d(1 - ah . bh)/da = -(bh - ah cos) / |a|: grad_fs = cross ft + self_a fs, grad_ft = cross fs + self_b ft
// with cross = -g / (|a| |b|), self_a = g cos / |a|^2 (0 where |a| < EPS), likewise self_b.
template <typename scalar_t, typename acc_t>
MEMKD_GLOBAL void cosine_distance_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ fs,
                                                  Layout la, const scalar_t* __restrict__ ft, Layout lb,
                                                  scalar_t* __restrict__ grad_fs, Layout lga,
                                                  scalar_t* __restrict__ grad_ft, Layout lgb, int64_t C, int64_t P,
                                                  int64_t tiles_per_image) {
  constexpr int TP = kCosTile, CC = kCosChunk;
  MEMKD_SHARED_MEMORY(smem_raw);
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  acc_t *s_a = smem + kCosA, *s_b = smem + kCosB, *s_terms = smem + kCosTerms, *s_coef = smem + kCosCoef;
  const int64_t b = blockIdx.x / tiles_per_image, p0 = (blockIdx.x % tiles_per_image) * TP;
  cosine_terms<scalar_t, acc_t>(fs, la, ft, lb, b, p0, P, C, smem);
  const int tid = threadIdx.x;
  if (tid < TP) {
    const acc_t go = p0 + tid < P ? static_cast<acc_t>(grad[b * P + p0 + tid]) : acc_t(0);
    const acc_t na = s_terms[TP + tid], nb = s_terms[2 * TP + tid];
    const acc_t inv_a = acc_t(1) / dev_max(na, acc_t(kEps)), inv_b = acc_t(1) / dev_max(nb, acc_t(kEps));
    const acc_t cos = s_terms[tid] * inv_a * inv_b;
    s_coef[tid] = -go * inv_a * inv_b;
    s_coef[TP + tid] = na >= acc_t(kEps) ? go * cos * inv_a * inv_a : acc_t(0);
    s_coef[2 * TP + tid] = nb >= acc_t(kEps) ? go * cos * inv_b * inv_b : acc_t(0);
  }
  for (int64_t c0 = 0; c0 < C; c0 += CC) {
    __syncthreads();  // s_coef is published / the previous chunk is stored
    load_tile<TP, CC, false>(fs, la, b, p0, P, c0, C, s_a, kCosLd);
    load_tile<TP, CC, false>(ft, lb, b, p0, P, c0, C, s_b, kCosLd);
    __syncthreads();
    store_tile<TP, CC>(grad_fs, lga, b, p0, P, c0, C, [&](int c, int p) {
      return s_coef[p] * s_b[c * kCosLd + p] + s_coef[TP + p] * s_a[c * kCosLd + p];
    });
    store_tile<TP, CC>(grad_ft, lgb, b, p0, P, c0, C, [&](int c, int p) {
      return s_coef[p] * s_a[c * kCosLd + p] + s_coef[2 * TP + p] * s_b[c * kCosLd + p];
    });
  }
}

// Arguments are checked by the caller; fs and ft are on one device.
inline at::Tensor cosine_distance_map_forward_impl(const at::Tensor& fs_arg, const at::Tensor& ft_arg) {
  const at::Tensor fs = dense_feature_map(fs_arg), ft = dense_feature_map(ft_arg);
  at::Tensor out = at::empty({fs.size(0), fs.size(2), fs.size(3)}, fs.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fs.scalar_type(), "cosine_distance_map_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    launch_cosine_distances<scalar_t, acc_t, scalar_t>({fs}, {ft}, {out.mutable_data_ptr<scalar_t>()}, 0, 1,
                                                       "cosine_distance_map");
  });
  return out;
}

inline std::tuple<at::Tensor, at::Tensor> cosine_distance_map_backward_impl(const at::Tensor& grad_out_arg,
                                                                            const at::Tensor& fs_arg,
                                                                            const at::Tensor& ft_arg) {
  const at::Tensor fs = dense_feature_map(fs_arg), ft = dense_feature_map(ft_arg);
  const at::Tensor grad_out = grad_out_arg.contiguous();
  at::Tensor grad_fs = at::empty_like(fs), grad_ft = at::empty_like(ft);
  const int64_t batch = fs.size(0), channels = fs.size(1), pixels = fs.size(2) * fs.size(3);
  const int64_t tiles_per_image = ceil_div(pixels, kCosTile);
  check_kernel_limits(channels, pixels, batch * tiles_per_image, "cosine_distance_map_backward");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fs.scalar_type(), "cosine_distance_map_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    launch_kernel(cosine_distance_backward_kernel<scalar_t, acc_t>, dim3(static_cast<unsigned>(batch * tiles_per_image)),
                  cosine_smem_bytes<acc_t>(), grad_out.const_data_ptr<scalar_t>(), fs.const_data_ptr<scalar_t>(),
                  layout_of(fs), ft.const_data_ptr<scalar_t>(), layout_of(ft), grad_fs.mutable_data_ptr<scalar_t>(),
                  layout_of(grad_fs), grad_ft.mutable_data_ptr<scalar_t>(), layout_of(grad_ft), channels, pixels,
                  tiles_per_image);
  });
  return {grad_fs, grad_ft};
}

at::Tensor cosine_distance_map_cuda(const at::Tensor& fs, const at::Tensor& ft) {
  check_pair_of_maps(fs, "fs", ft, "ft");  // also: ft on fs's device
  check_cuda_tensor(fs, "fs");
  const c10::cuda::CUDAGuard guard(fs.device());
  return cosine_distance_map_forward_impl(fs, ft);
}

std::tuple<at::Tensor, at::Tensor> cosine_distance_map_backward_cuda(const at::Tensor& grad_out,
                                                                     const at::Tensor& fs,
                                                                     const at::Tensor& ft) {
  check_cosine_distance_map_backward_args(grad_out, fs, ft);
  check_cuda_tensor(fs, "fs");
  const c10::cuda::CUDAGuard guard(fs.device());
  return cosine_distance_map_backward_impl(grad_out, fs, ft);
}

}  // namespace

TORCH_LIBRARY_IMPL(memkd, CUDA, m) {
  m.impl("cosine_distance_map", &cosine_distance_map_cuda);
  m.impl("cosine_distance_map_backward", &cosine_distance_map_backward_cuda);
}

}  // namespace memkd::cuda
