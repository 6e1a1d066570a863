// Fused CPU forward and backward of NR Memory recall.
//
// Per (image, pixel tile): load the query tile once into a cache-resident buffer, take its channel
// norms, form the [L, T] cosine scores with one BLAS product against the normalised keys, softmax
// over L on the tile, and produce the [C, T] output with a second product. The backward recomputes
// the scores the same way and accumulates the key and value gradients in a fixed number of
// partitions that are summed in order, so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <memory>
#include <vector>

#include "../ops/checks.h"
#include "feature_tiles.h"

namespace memkd::cpu {
namespace {

constexpr int64_t kMaxGradPartitions = 32;

// scores[l, t] *= inv_norm[t], then softmax over l for every column t, in place.
template <typename acc_t>
void scaled_softmax_columns(acc_t* scores, int64_t items, int64_t n, const acc_t* inv_norm,
                            acc_t* col_max, acc_t* col_sum) {
  std::fill(col_max, col_max + n, -std::numeric_limits<acc_t>::infinity());
  for (int64_t l = 0; l < items; ++l) {
    acc_t* row = scores + l * n;
    for (int64_t t = 0; t < n; ++t) {
      row[t] *= inv_norm[t];
      col_max[t] = std::max(col_max[t], row[t]);
    }
  }
  std::fill(col_sum, col_sum + n, acc_t(0));
  for (int64_t l = 0; l < items; ++l) {
    acc_t* row = scores + l * n;
    for (int64_t t = 0; t < n; ++t) {
      row[t] = vector_exp(row[t] - col_max[t]);
      col_sum[t] += row[t];
    }
  }
  for (int64_t t = 0; t < n; ++t) col_sum[t] = acc_t(1) / col_sum[t];
  for (int64_t l = 0; l < items; ++l) {
    acc_t* row = scores + l * n;
    for (int64_t t = 0; t < n; ++t) row[t] *= col_sum[t];
  }
}

// Backward of x / max(|x|, eps) per pixel: out = (d - xh (xh . d)) / |x|, with d = grad_x_hat a
// contiguous [C, n] buffer; the projection vanishes where the norm was clamped.
template <typename acc_t>
void normalisation_backward(const Tile<acc_t>& x, const acc_t* grad_x_hat, const acc_t* inv_norm,
                            const bool* unclamped, acc_t* coef, const Tile<acc_t>& out) {
  const int64_t n = x.n;
  std::fill(coef, coef + n, acc_t(0));
  if (x.stride_p == 1 && out.stride_p == 1) {  // NCHW: vectorise over pixels
    for (int64_t c = 0; c < x.channels; ++c) {
      const acc_t* xr = x.data + c * x.stride_c;
      const acc_t* dr = grad_x_hat + c * n;
      for (int64_t t = 0; t < n; ++t) coef[t] += xr[t] * dr[t];
    }
    for (int64_t t = 0; t < n; ++t) coef[t] = unclamped[t] ? coef[t] * inv_norm[t] * inv_norm[t] * inv_norm[t] : acc_t(0);
    for (int64_t c = 0; c < x.channels; ++c) {
      const acc_t* xr = x.data + c * x.stride_c;
      const acc_t* dr = grad_x_hat + c * n;
      acc_t* outr = out.data + c * out.stride_c;
      for (int64_t t = 0; t < n; ++t) outr[t] = dr[t] * inv_norm[t] - xr[t] * coef[t];
    }
  } else {
    for (int64_t t = 0; t < n; ++t) {
      acc_t dot = 0;
      for (int64_t c = 0; c < x.channels; ++c) dot += x(c, t) * grad_x_hat[c * n + t];
      coef[t] = unclamped[t] ? dot * inv_norm[t] * inv_norm[t] * inv_norm[t] : acc_t(0);
      for (int64_t c = 0; c < x.channels; ++c) out(c, t) = grad_x_hat[c * n + t] * inv_norm[t] - x(c, t) * coef[t];
    }
  }
}

at::Tensor normalised_rows(const at::Tensor& x) {
  return x / x.norm(2, 1, true).clamp_min(kEps);
}

at::Tensor nr_recall_cpu(const at::Tensor& query_arg, const at::Tensor& keys,
                         const at::Tensor& values) {
  check_nr_recall_args(query_arg, keys, values);
  const at::Tensor query = dense_feature_map(query_arg);
  at::Tensor out = at::empty_like(query);
  const int64_t batch = query.size(0), items = keys.size(0);
  const PixelLayout q_layout(query), out_layout(out);
  const int64_t channels = q_layout.channels, pixels = q_layout.pixels;
  const int64_t tile = pixel_tile(channels, pixels, batch);
  const int64_t tiles_per_image = (pixels + tile - 1) / tile;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "nr_recall_cpu", [&] {
    using acc_t = acc_type_for<scalar_t>;
    const at::Tensor keys_hat = normalised_rows(keys.to(acc_scalar_type<acc_t>())).contiguous();
    const at::Tensor values_t = values.to(acc_scalar_type<acc_t>()).contiguous().t();
    const scalar_t* q_data = query.const_data_ptr<scalar_t>();
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    constexpr bool needs_buffers = !std::is_same_v<scalar_t, acc_t>;  // fp16/bf16 tiles are converted

    parallel_for_with_blas(0, batch * tiles_per_image, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> q_buffer(needs_buffers ? channels * tile : 0), out_buffer(needs_buffers ? channels * tile : 0);
      std::vector<acc_t> scores(items * tile), inv_norm(tile), col_max(tile), col_sum(tile);
      std::unique_ptr<bool[]> unclamped(new bool[tile]);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / tiles_per_image, p0 = (i % tiles_per_image) * tile;
        const int64_t n = std::min(tile, pixels - p0);
        const Tile<acc_t> q = feature_tile(q_data, q_layout, b, p0, n, q_buffer.data());
        column_inverse_norms(q, inv_norm.data(), unclamped.get());
        at::Tensor score_mat = matrix(scores.data(), items, n);
        at::mm_out(score_mat, keys_hat, q.matrix());
        scaled_softmax_columns(scores.data(), items, n, inv_norm.data(), col_max.data(), col_sum.data());
        const Tile<acc_t> o = output_tile(out_data, out_layout, b, p0, n, out_buffer.data());
        at::Tensor out_mat = o.matrix();
        at::mm_out(out_mat, values_t, score_mat);
        finish_output_tile(o, out_layout, b, p0, out_data);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nr_recall_backward_cpu(
    const at::Tensor& grad_out_arg, const at::Tensor& query_arg, const at::Tensor& keys,
    const at::Tensor& values) {
  check_nr_recall_args(query_arg, keys, values);
  check_float_tensor(grad_out_arg, "grad_out");
  TORCH_CHECK(grad_out_arg.sizes() == query_arg.sizes(), "grad_out: expected the shape of query ",
              query_arg.sizes(), ", got ", grad_out_arg.sizes());
  check_same_device_dtype(query_arg, "query", grad_out_arg, "grad_out");
  const at::Tensor query = dense_feature_map(query_arg);
  const at::Tensor grad_out = dense_feature_map(grad_out_arg);
  at::Tensor grad_query = at::empty_like(query);
  const int64_t batch = query.size(0), items = keys.size(0);
  const PixelLayout q_layout(query), g_layout(grad_out), gq_layout(grad_query);
  const int64_t channels = q_layout.channels, pixels = q_layout.pixels;
  const int64_t tile = pixel_tile(channels, pixels, batch);
  const int64_t tiles_per_image = (pixels + tile - 1) / tile;
  const int64_t total_tiles = batch * tiles_per_image;
  const int64_t tiles_per_partition = (total_tiles + kMaxGradPartitions - 1) / kMaxGradPartitions;
  const int64_t partitions = (total_tiles + tiles_per_partition - 1) / tiles_per_partition;
  at::Tensor grad_keys, grad_values;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "nr_recall_backward_cpu", [&] {
    using acc_t = acc_type_for<scalar_t>;
    const auto acc_dtype = acc_scalar_type<acc_t>();
    const at::Tensor keys_acc = keys.to(acc_dtype);
    const at::Tensor key_norms = keys_acc.norm(2, 1, true);
    const at::Tensor keys_hat = (keys_acc / key_norms.clamp_min(kEps)).contiguous();
    const at::Tensor keys_hat_t = keys_hat.t();
    const at::Tensor values_acc = values.to(acc_dtype).contiguous();
    const at::Tensor values_t = values_acc.t();
    at::Tensor grad_keys_hat_parts = at::zeros({partitions, items, channels}, keys_acc.options());
    at::Tensor grad_values_parts = at::zeros({partitions, items, channels}, keys_acc.options());
    const scalar_t* q_data = query.const_data_ptr<scalar_t>();
    const scalar_t* g_data = grad_out.const_data_ptr<scalar_t>();
    scalar_t* gq_data = grad_query.mutable_data_ptr<scalar_t>();
    constexpr bool needs_buffers = !std::is_same_v<scalar_t, acc_t>;

    parallel_for_with_blas(0, partitions, 1, [&](int64_t part_begin, int64_t part_end) {
      const int64_t buffer_size = needs_buffers ? channels * tile : 0;
      std::vector<acc_t> q_buffer(buffer_size), g_buffer(buffer_size), gq_buffer(buffer_size);
      std::vector<acc_t> grad_q_hat(channels * tile), weights(items * tile), grad_scores(items * tile);
      std::vector<acc_t> inv_norm(tile), col_a(tile), col_b(tile);
      std::unique_ptr<bool[]> unclamped(new bool[tile]);
      for (int64_t part = part_begin; part < part_end; ++part) {
        at::Tensor grad_keys_hat_part = grad_keys_hat_parts[part];
        at::Tensor grad_values_part = grad_values_parts[part];
        const int64_t tile_end = std::min(total_tiles, (part + 1) * tiles_per_partition);
        for (int64_t i = part * tiles_per_partition; i < tile_end; ++i) {
          const int64_t b = i / tiles_per_image, p0 = (i % tiles_per_image) * tile;
          const int64_t n = std::min(tile, pixels - p0);
          const Tile<acc_t> q = feature_tile(q_data, q_layout, b, p0, n, q_buffer.data());
          const Tile<acc_t> g = feature_tile(g_data, g_layout, b, p0, n, g_buffer.data());
          column_inverse_norms(q, inv_norm.data(), unclamped.get());
          const at::Tensor q_mat = q.matrix(), g_mat = g.matrix();
          at::Tensor w_mat = matrix(weights.data(), items, n);
          at::Tensor gs_mat = matrix(grad_scores.data(), items, n);
          at::Tensor gqh_mat = matrix(grad_q_hat.data(), channels, n);
          at::mm_out(w_mat, keys_hat, q_mat);
          scaled_softmax_columns(weights.data(), items, n, inv_norm.data(), col_a.data(), col_b.data());
          // dV += W dO^T and dW = V dO.
          grad_values_part.addmm_(w_mat, g_mat.t());
          at::mm_out(gs_mat, values_acc, g_mat);
          // Softmax backward: dS = W * (dW - sum_l W * dW).
          std::fill(col_a.begin(), col_a.begin() + n, acc_t(0));
          for (int64_t l = 0; l < items; ++l)
            for (int64_t t = 0; t < n; ++t) col_a[t] += weights[l * n + t] * grad_scores[l * n + t];
          for (int64_t l = 0; l < items; ++l)
            for (int64_t t = 0; t < n; ++t)
              grad_scores[l * n + t] = weights[l * n + t] * (grad_scores[l * n + t] - col_a[t]);
          // d(q/|q|) = kh^T dS, then through the normalisation: (d - qh (qh . d)) / |q|.
          at::mm_out(gqh_mat, keys_hat_t, gs_mat);
          const Tile<acc_t> gq = output_tile(gq_data, gq_layout, b, p0, n, gq_buffer.data());
          normalisation_backward(q, grad_q_hat.data(), inv_norm.data(), unclamped.get(), col_a.data(), gq);
          finish_output_tile(gq, gq_layout, b, p0, gq_data);
          // d(k/|k|) += dS qh^T, with qh = q * inv_norm folded into dS.
          for (int64_t l = 0; l < items; ++l)
            for (int64_t t = 0; t < n; ++t) grad_scores[l * n + t] *= inv_norm[t];
          grad_keys_hat_part.addmm_(gs_mat, q_mat.t());
        }
      }
    });

    at::Tensor grad_keys_hat = grad_keys_hat_parts[0].clone();
    grad_values = grad_values_parts[0].clone();
    for (int64_t part = 1; part < partitions; ++part) {
      grad_keys_hat.add_(grad_keys_hat_parts[part]);
      grad_values.add_(grad_values_parts[part]);
    }
    const at::Tensor projection =
        (keys_hat * grad_keys_hat).sum(1, true) * key_norms.ge(kEps).to(acc_dtype);
    grad_keys = ((grad_keys_hat - keys_hat * projection) / key_norms.clamp_min(kEps)).to(keys.scalar_type());
    grad_values = grad_values.to(values.scalar_type());
  });
  return {grad_query, grad_keys, grad_values};
}

}  // namespace

TORCH_LIBRARY_IMPL(memkd, CPU, m) {
  m.impl("nr_recall", &nr_recall_cpu);
  m.impl("nr_recall_backward", &nr_recall_backward_cpu);
}

}  // namespace memkd::cpu
