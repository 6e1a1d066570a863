// CUDA kernel of memkd::anomaly_map (inference only); the design is described in
// anomaly_map_kernel.cuh. The entry point checks its arguments (csrc/ops/checks.h), requires CUDA
// tensors on one device, and runs on that device's current stream.
#include <torch/library.h>

#include "anomaly_map_kernel.cuh"

namespace memkd::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> anomaly_map_cuda(at::TensorList student_features, at::TensorList teacher_features,
                                                    at::IntArrayRef out_size, double sigma) {
  check_anomaly_map_args(student_features, teacher_features, out_size, sigma);  // also: one device
  check_cuda_tensor(student_features[0], "student_features");
  const c10::cuda::CUDAGuard guard(student_features[0].device());
  return anomaly_map_impl(student_features, teacher_features, out_size, sigma);
}

}  // namespace

TORCH_LIBRARY_IMPL(memkd, CUDA, m) { m.impl("anomaly_map", &anomaly_map_cuda); }

}  // namespace memkd::cuda
