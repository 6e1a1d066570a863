// Fused CPU forward and backward of NR Memory recall.
//
// Per (image, pixel tile): form the [L, T] scores against the normalised keys with the query's
// channel norms in the same pass, softmax over L on the tile, and write the [C, T] output straight
// into the map with a second register-blocked product (tile_products.h). The backward recomputes
// the scores the same way and folds the query-normalisation backward into the start of the
// query-gradient product: x . d(x/|x|) is a sum over L of scores times score gradients, so it needs
// no pass over [C, T]. The key and value gradients, reductions over pixels, accumulate in a fixed
// number of partitions that are summed in order, so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "../ops/checks.h"
#include "feature_tiles.h"
#include "tile_products.h"

namespace memkd::cpu {
namespace {

constexpr int64_t kMaxGradPartitions = 32;

// weights[l, t] = softmax over l of scores[l, t] * inv_norm[t], for every column t < n, both with
// row stride ld; weights may be scores.
template <typename acc_t>
void scaled_softmax_columns(const acc_t* scores, acc_t* weights, int64_t items, int64_t n, int64_t ld,
                            const acc_t* inv_norm, acc_t* col_max, acc_t* col_sum) {
  std::fill(col_max, col_max + n, -std::numeric_limits<acc_t>::infinity());
  for (int64_t l = 0; l < items; ++l) {
    const acc_t* row = scores + l * ld;
    for (int64_t t = 0; t < n; ++t) col_max[t] = std::max(col_max[t], row[t] * inv_norm[t]);
  }
  std::fill(col_sum, col_sum + n, acc_t(0));
  for (int64_t l = 0; l < items; ++l) {
    const acc_t* row = scores + l * ld;
    acc_t* out = weights + l * ld;
    for (int64_t t = 0; t < n; ++t) {
      out[t] = vector_exp(row[t] * inv_norm[t] - col_max[t]);
      col_sum[t] += out[t];
    }
  }
  for (int64_t t = 0; t < n; ++t) col_sum[t] = acc_t(1) / col_sum[t];
  for (int64_t l = 0; l < items; ++l) {
    acc_t* out = weights + l * ld;
    for (int64_t t = 0; t < n; ++t) out[t] *= col_sum[t];
  }
}

// Row stride of the [L, n] score buffers: a tile plus one vector, so that the rows, which the
// products stream through together, do not all fall into the same few cache sets.
template <typename acc_t>
int64_t score_row_stride(int64_t tile) {
  return tile + kLanes<acc_t>;
}

// The sum over dim 0 of parts [P, ...], adding the partitions in order for every element, so that it
// does not depend on the thread count either.
template <typename acc_t>
at::Tensor sum_partitions(const at::Tensor& parts) {
  const int64_t count = parts.size(0), size = parts.numel() / count;
  at::Tensor sum = at::empty(parts.sizes().slice(1), parts.options());
  const acc_t* in = parts.const_data_ptr<acc_t>();
  acc_t* out = sum.mutable_data_ptr<acc_t>();
  constexpr int64_t kChunk = 2048;  // elements of the sum kept in L1 while the partitions stream past
  at::parallel_for(0, (size + kChunk - 1) / kChunk, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t begin = chunk * kChunk, end = std::min(size, begin + kChunk);
      std::copy(in + begin, in + end, out + begin);
      for (int64_t p = 1; p < count; ++p)
        for (int64_t i = begin; i < end; ++i) out[i] += in[p * size + i];
    }
  });
  return sum;
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
    // [C, L]: the output product reads one channel's L weights at a time.
    const at::Tensor values_t = values.to(acc_scalar_type<acc_t>()).t().contiguous();
    const acc_t* kh = keys_hat.const_data_ptr<acc_t>();
    const acc_t* v_t = values_t.const_data_ptr<acc_t>();
    const scalar_t* q_data = query.const_data_ptr<scalar_t>();
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();

    const int64_t total_tiles = batch * tiles_per_image;
    parallel_claim(total_tiles, [&](const auto& claim) {
      std::vector<acc_t> q_buffer = tile_buffer<scalar_t, acc_t>(q_layout, tile);
      std::vector<acc_t> out_buffer = tile_buffer<scalar_t, acc_t>(out_layout, tile);
      const int64_t ld = score_row_stride<acc_t>(tile);
      std::vector<acc_t> scores(items * ld), inv_norm(tile), col_max(tile), col_sum(tile);
      std::vector<acc_t> packed(packed_block_size<acc_t>(channels));
      std::unique_ptr<bool[]> unclamped(new bool[tile]);
      for (int64_t i = claim(); i < total_tiles; i = claim()) {
        const int64_t b = i / tiles_per_image, p0 = (i % tiles_per_image) * tile;
        const int64_t n = std::min(tile, pixels - p0);
        const Tile<acc_t> q = feature_tile(q_data, q_layout, b, p0, n, q_buffer.data());
        rows_by_tile(kh, channels, items, q.data, q.ld, channels, n, scores.data(), ld, col_sum.data(), packed.data());
        inverse_norms(col_sum.data(), n, inv_norm.data(), unclamped.get());
        scaled_softmax_columns(scores.data(), scores.data(), items, n, ld, inv_norm.data(), col_max.data(), col_sum.data());
        const Tile<acc_t> o = output_tile(out_data, out_layout, b, p0, n, out_buffer.data());
        cols_by_rows(v_t, items, items, scores.data(), ld, channels, n, o.data, o.ld, static_cast<const acc_t*>(nullptr),
                     0, static_cast<const acc_t*>(nullptr));
        finish_output_tile(o, out_layout, b, p0, out_data);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nr_recall_backward_cpu(
    const at::Tensor& grad_out_arg, const at::Tensor& query_arg, const at::Tensor& keys,
    const at::Tensor& values) {
  check_nr_recall_backward_args(grad_out_arg, query_arg, keys, values);
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
    const at::Tensor values_acc = values.to(acc_dtype).contiguous();
    // Each partition zeroes its own slices, in the thread that then accumulates into them.
    at::Tensor grad_keys_hat_parts = at::empty({partitions, items, channels}, keys_acc.options());
    at::Tensor grad_values_parts = at::empty({partitions, items, channels}, keys_acc.options());
    const at::Tensor keys_hat_t = keys_hat.t().contiguous();
    const acc_t* kh = keys_hat.const_data_ptr<acc_t>();
    const acc_t* kh_t = keys_hat_t.const_data_ptr<acc_t>();
    const acc_t* v = values_acc.const_data_ptr<acc_t>();
    const scalar_t* q_data = query.const_data_ptr<scalar_t>();
    const scalar_t* g_data = grad_out.const_data_ptr<scalar_t>();
    scalar_t* gq_data = grad_query.mutable_data_ptr<scalar_t>();
    acc_t* grad_keys_hat_parts_data = grad_keys_hat_parts.mutable_data_ptr<acc_t>();
    acc_t* grad_values_parts_data = grad_values_parts.mutable_data_ptr<acc_t>();

    parallel_claim(partitions, [&](const auto& claim) {
      std::vector<acc_t> q_buffer = tile_buffer<scalar_t, acc_t>(q_layout, tile);
      std::vector<acc_t> g_buffer = tile_buffer<scalar_t, acc_t>(g_layout, tile);
      std::vector<acc_t> gq_buffer = tile_buffer<scalar_t, acc_t>(gq_layout, tile);
      const int64_t ld = score_row_stride<acc_t>(tile);
      std::vector<acc_t> scores(items * ld), weights(items * ld), grad_scores(items * ld);
      std::vector<acc_t> inv_norm(tile), col_a(tile), col_b(tile), packed(packed_block_size<acc_t>(channels));
      std::vector<acc_t> transposed(transposed_block_size<acc_t>(tile));
      std::unique_ptr<bool[]> unclamped(new bool[tile]);
      for (int64_t part = claim(); part < partitions; part = claim()) {
        acc_t* grad_keys_hat_part = grad_keys_hat_parts_data + part * items * channels;
        acc_t* grad_values_part = grad_values_parts_data + part * items * channels;
        std::fill(grad_keys_hat_part, grad_keys_hat_part + items * channels, acc_t(0));
        std::fill(grad_values_part, grad_values_part + items * channels, acc_t(0));
        const int64_t tile_end = std::min(total_tiles, (part + 1) * tiles_per_partition);
        for (int64_t i = part * tiles_per_partition; i < tile_end; ++i) {
          const int64_t b = i / tiles_per_image, p0 = (i % tiles_per_image) * tile;
          const int64_t n = std::min(tile, pixels - p0);
          const Tile<acc_t> q = feature_tile(q_data, q_layout, b, p0, n, q_buffer.data());
          const Tile<acc_t> g = feature_tile(g_data, g_layout, b, p0, n, g_buffer.data());
          // Raw scores S = kh q (the cosines are S / |q|) and the weights W = softmax(S / |q|).
          rows_by_tile(kh, channels, items, q.data, q.ld, channels, n, scores.data(), ld, col_a.data(), packed.data());
          inverse_norms(col_a.data(), n, inv_norm.data(), unclamped.get());
          scaled_softmax_columns(scores.data(), weights.data(), items, n, ld, inv_norm.data(), col_a.data(), col_b.data());
          // dW = V dO and dV += W dO^T, in this order: the first product prefetches as it reads dO.
          rows_by_tile(v, channels, items, g.data, g.ld, channels, n, grad_scores.data(), ld,
                       static_cast<acc_t*>(nullptr), packed.data());
          add_rows_by_tile_t(weights.data(), ld, items, g.data, g.ld, channels, n, grad_values_part, channels,
                             transposed.data());
          // Softmax backward dS = W * (dW - sum_l W * dW), kept as dS / |q|: the gradient of the raw
          // scores. coef = (q/|q| . d(q/|q|)) / |q|^2 = sum_l (dS / |q|) S / |q|^2, zero where |q| was clamped.
          std::fill(col_a.begin(), col_a.begin() + n, acc_t(0));
          for (int64_t l = 0; l < items; ++l)
            for (int64_t t = 0; t < n; ++t) col_a[t] += weights[l * ld + t] * grad_scores[l * ld + t];
          std::fill(col_b.begin(), col_b.begin() + n, acc_t(0));
          for (int64_t l = 0; l < items; ++l)
            for (int64_t t = 0; t < n; ++t) {
              const acc_t ds = weights[l * ld + t] * (grad_scores[l * ld + t] - col_a[t]) * inv_norm[t];
              grad_scores[l * ld + t] = ds;
              col_b[t] += ds * scores[l * ld + t];
            }
          for (int64_t t = 0; t < n; ++t) col_b[t] = unclamped[t] ? col_b[t] * inv_norm[t] * inv_norm[t] : acc_t(0);
          // dq = kh^T (dS / |q|) - q coef: one product with the normalisation backward as its epilogue.
          const Tile<acc_t> gq = output_tile(gq_data, gq_layout, b, p0, n, gq_buffer.data());
          cols_by_rows(kh_t, items, items, grad_scores.data(), ld, channels, n, gq.data, gq.ld,
                       static_cast<const acc_t*>(q.data), q.ld, static_cast<const acc_t*>(col_b.data()));
          finish_output_tile(gq, gq_layout, b, p0, gq_data);
          // d(k/|k|) += (dS / |q|) q^T.
          add_rows_by_tile_t(grad_scores.data(), ld, items, q.data, q.ld, channels, n, grad_keys_hat_part, channels,
                             transposed.data());
        }
      }
    });

    const at::Tensor grad_keys_hat = sum_partitions<acc_t>(grad_keys_hat_parts);
    grad_values = sum_partitions<acc_t>(grad_values_parts);
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
