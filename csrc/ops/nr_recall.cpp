// Schema of NR Memory recall (paper Eq. 5-6) and of its backward.
// The same strings as SCHEMAS in memkd/ops/nr_recall.py (tests/test_ops_cpu.py compares them).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(memkd, m) {
  m.def("nr_recall(Tensor query, Tensor keys, Tensor values) -> Tensor");
  m.def(
      "nr_recall_backward(Tensor grad_out, Tensor query, Tensor keys, Tensor values) -> "
      "(Tensor, Tensor, Tensor)");
}
