// Test harness, not part of the extension (CMake compiles csrc/cuda/*.cu and *.cpp only): the CUDA
// kernels run on CPU threads by emulation.h, registered as memkd_emu::* CPU ops with the schemas of
// memkd::*. Built and exercised by emulation_check.py.
#define MEMKD_CUDA_EMULATION
#include <torch/library.h>

#include "anomaly_map_kernel.cuh"
#include "cosine_distance_map_kernel.cuh"
#include "nr_recall_kernel.cuh"

namespace {
at::Tensor nr(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  memkd::check_nr_recall_args(q, k, v);
  return memkd::cuda::nr_recall_forward_impl(q, k, v);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> nr_bwd(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v) {
  memkd::check_nr_recall_args(q, k, v);
  return memkd::cuda::nr_recall_backward_impl(g, q, k, v);
}
at::Tensor emu_cos(const at::Tensor& a, const at::Tensor& b) {
  memkd::check_pair_of_maps(a, "fs", b, "ft");
  return memkd::cuda::cosine_distance_map_forward_impl(a, b);
}
std::tuple<at::Tensor, at::Tensor> cos_bwd(const at::Tensor& g, const at::Tensor& a, const at::Tensor& b) {
  return memkd::cuda::cosine_distance_map_backward_impl(g, a, b);
}
std::tuple<at::Tensor, at::Tensor> amap(at::TensorList s, at::TensorList t, at::IntArrayRef size, double sigma) {
  memkd::check_anomaly_map_args(s, t, size, sigma);
  return memkd::cuda::anomaly_map_impl(s, t, size, sigma);
}
}  // namespace

TORCH_LIBRARY(memkd_emu, m) {
  m.def("nr_recall(Tensor query, Tensor keys, Tensor values) -> Tensor");
  m.def("nr_recall_backward(Tensor grad_out, Tensor query, Tensor keys, Tensor values) -> (Tensor, Tensor, Tensor)");
  m.def("cosine_distance_map(Tensor fs, Tensor ft) -> Tensor");
  m.def("cosine_distance_map_backward(Tensor grad_out, Tensor fs, Tensor ft) -> (Tensor, Tensor)");
  m.def("anomaly_map(Tensor[] student_features, Tensor[] teacher_features, int[2] out_size, float sigma=4.0) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(memkd_emu, CPU, m) {
  m.impl("nr_recall", &nr);
  m.impl("nr_recall_backward", &nr_bwd);
  m.impl("cosine_distance_map", &emu_cos);
  m.impl("cosine_distance_map_backward", &cos_bwd);
  m.impl("anomaly_map", &amap);
}
