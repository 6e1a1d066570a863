// CUDA kernels of memkd::cosine_distance_map and its backward; the design is described in
// cosine_distance_map_kernel.cuh. Entry points check their arguments (csrc/ops/checks.h), require
// CUDA tensors on one device, and run on that device's current stream.
#include <torch/library.h>

#include "cosine_distance_map_kernel.cuh"

namespace memkd::cuda {
namespace {

at::Tensor cosine_distance_map_cuda(const at::Tensor& fs, const at::Tensor& ft) {
  check_pair_of_maps(fs, "fs", ft, "ft");  // also: ft on fs's device
  check_cuda_tensor(fs, "fs");
  const c10::cuda::CUDAGuard guard(fs.device());
  return cosine_distance_map_forward_impl(fs, ft);
}

std::tuple<at::Tensor, at::Tensor> cosine_distance_map_backward_cuda(const at::Tensor& grad_out,
                                                                     const at::Tensor& fs,
                                                                     const at::Tensor& ft) {
  check_pair_of_maps(fs, "fs", ft, "ft");
  check_float_tensor(grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == fs.size(0) && grad_out.size(1) == fs.size(2) &&
                  grad_out.size(2) == fs.size(3),
              "grad_out: expected shape [B, H, W] = [", fs.size(0), ", ", fs.size(2), ", ", fs.size(3), "], got ",
              grad_out.sizes());
  check_same_device_dtype(fs, "fs", grad_out, "grad_out");
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
