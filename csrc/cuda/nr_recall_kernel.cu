// CUDA kernels of memkd::nr_recall and memkd::nr_recall_backward; the design is described in
// nr_recall_kernel.cuh. Entry points check their arguments (csrc/ops/checks.h), require CUDA tensors
// on one device, and run on that device's current stream.
#include <torch/library.h>

#include "nr_recall_kernel.cuh"

namespace memkd::cuda {
namespace {

at::Tensor nr_recall_cuda(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values) {
  check_nr_recall_args(query, keys, values);  // also: keys and values on query's device
  check_cuda_tensor(query, "query");
  const c10::cuda::CUDAGuard guard(query.device());
  return nr_recall_forward_impl(query, keys, values);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nr_recall_backward_cuda(const at::Tensor& grad_out,
                                                                       const at::Tensor& query,
                                                                       const at::Tensor& keys,
                                                                       const at::Tensor& values) {
  check_nr_recall_args(query, keys, values);
  check_float_tensor(grad_out, "grad_out");
  TORCH_CHECK(grad_out.sizes() == query.sizes(), "grad_out: expected the shape of query ", query.sizes(),
              ", got ", grad_out.sizes());
  check_same_device_dtype(query, "query", grad_out, "grad_out");
  check_cuda_tensor(query, "query");
  const c10::cuda::CUDAGuard guard(query.device());
  return nr_recall_backward_impl(grad_out, query, keys, values);
}

}  // namespace

TORCH_LIBRARY_IMPL(memkd, CUDA, m) {
  m.impl("nr_recall", &nr_recall_cuda);
  m.impl("nr_recall_backward", &nr_recall_backward_cuda);
}

}  // namespace memkd::cuda
