// Schema of the fused multi-stage anomaly map and image score (paper Eq. 3-4); inference only.
// The same strings as SCHEMAS in memkd/ops/anomaly_map.py (tests/test_ops_cpu.py compares them).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(memkd, m) {
  m.def(
      "anomaly_map(Tensor[] student_features, Tensor[] teacher_features, int[2] out_size, "
      "float sigma=4.0) -> (Tensor, Tensor)");
}
