// Schema of the per-pixel teacher-student cosine distance (paper Eq. 3) and of its backward.
// The same strings as SCHEMAS in memkd/ops/cosine_distance_map.py (tests/test_ops_cpu.py compares them).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(memkd, m) {
  m.def("cosine_distance_map(Tensor fs, Tensor ft) -> Tensor");
  m.def("cosine_distance_map_backward(Tensor grad_out, Tensor fs, Tensor ft) -> (Tensor, Tensor)");
}
