// Argument checks shared by every backend's entry points: each names the argument and what was
// expected, so bad input fails here rather than deep inside a kernel.
#pragma once
#include <cmath>
#include <ATen/ATen.h>

namespace memkd {

inline void check_float_tensor(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.defined(), name, ": expected a tensor, got undefined");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, name,
              ": expected a floating dtype (float32, float64, float16 or bfloat16), got ", t);
}

inline void check_feature_map(const at::Tensor& x, const char* name) {
  check_float_tensor(x, name);
  TORCH_CHECK(x.dim() == 4, name, ": expected a 4-D [B, C, H, W] tensor, got shape ", x.sizes());
  TORCH_CHECK(x.size(0) > 0, name, ": expected a non-empty batch, got shape ", x.sizes());
  TORCH_CHECK(x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0, name,
              ": expected non-zero C, H and W, got shape ", x.sizes());
}

inline void check_same_device_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                                    const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), b_name, ": expected a tensor on ", a.device(), " like ",
              a_name, ", got ", b.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), b_name, ": expected dtype ", a.scalar_type(),
              " like ", a_name, ", got ", b.scalar_type());
}

inline void check_nr_recall_args(const at::Tensor& query, const at::Tensor& keys,
                                 const at::Tensor& values) {
  check_feature_map(query, "query");
  check_float_tensor(keys, "keys");
  check_float_tensor(values, "values");
  TORCH_CHECK(keys.dim() == 2, "keys: expected a 2-D [L, C] tensor, got shape ", keys.sizes());
  TORCH_CHECK(keys.size(0) > 0, "keys: expected at least one memory item (L >= 1), got L = 0");
  TORCH_CHECK(keys.size(1) == query.size(1), "keys: expected C = ", query.size(1),
              " channels to match query, got shape ", keys.sizes());
  TORCH_CHECK(values.sizes() == keys.sizes(), "values: expected the shape of keys ", keys.sizes(),
              ", got ", values.sizes());
  check_same_device_dtype(query, "query", keys, "keys");
  check_same_device_dtype(query, "query", values, "values");
}

inline void check_pair_of_maps(const at::Tensor& fs, const char* fs_name, const at::Tensor& ft,
                               const char* ft_name) {
  check_feature_map(fs, fs_name);
  check_feature_map(ft, ft_name);
  TORCH_CHECK(fs.sizes() == ft.sizes(), ft_name, ": expected the shape of ", fs_name, " ",
              fs.sizes(), ", got ", ft.sizes());
  check_same_device_dtype(fs, fs_name, ft, ft_name);
}

// memkd::nr_recall_backward: the forward's arguments and grad_out shaped like query.
inline void check_nr_recall_backward_args(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& keys,
                                          const at::Tensor& values) {
  check_nr_recall_args(query, keys, values);
  check_float_tensor(grad_out, "grad_out");
  TORCH_CHECK(grad_out.sizes() == query.sizes(), "grad_out: expected the shape of query ", query.sizes(), ", got ",
              grad_out.sizes());
  check_same_device_dtype(query, "query", grad_out, "grad_out");
}

// memkd::cosine_distance_map_backward: the forward's arguments and grad_out [B, H, W] like the output.
inline void check_cosine_distance_map_backward_args(const at::Tensor& grad_out, const at::Tensor& fs,
                                                    const at::Tensor& ft) {
  check_pair_of_maps(fs, "fs", ft, "ft");
  check_float_tensor(grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == fs.size(0) && grad_out.size(1) == fs.size(2) &&
                  grad_out.size(2) == fs.size(3),
              "grad_out: expected shape [B, H, W] = [", fs.size(0), ", ", fs.size(2), ", ", fs.size(3), "], got ",
              grad_out.sizes());
  check_same_device_dtype(fs, "fs", grad_out, "grad_out");
}

inline void check_anomaly_map_args(at::TensorList student, at::TensorList teacher,
                                   at::IntArrayRef out_size, double sigma) {
  TORCH_CHECK(!student.empty(), "student_features: expected at least one stage, got none");
  TORCH_CHECK(student.size() == teacher.size(), "teacher_features: expected ", student.size(),
              " stages like student_features, got ", teacher.size());
  TORCH_CHECK(out_size.size() == 2 && out_size[0] > 0 && out_size[1] > 0,
              "out_size: expected two positive integers (H, W), got ", out_size);
  TORCH_CHECK(std::isfinite(sigma) && sigma >= 0, "sigma: expected a finite value >= 0, got ", sigma);
  for (size_t i = 0; i < student.size(); ++i) {
    check_pair_of_maps(student[i], "student_features", teacher[i], "teacher_features");
    check_same_device_dtype(student[0], "student_features[0]", student[i], "student_features");
    TORCH_CHECK(student[i].size(0) == student[0].size(0), "student_features: expected batch ",
                student[0].size(0), " at every stage, got ", student[i].size(0), " at stage ", i);
  }
}

}  // namespace memkd
