// CUDA forward and backward of the per-pixel cosine distance 1 - cos(fs, ft) over channels, see
// cosine_distance_map_kernel.cu. Also the per-stage distance kernel of the fused anomaly map.
//
// One block of 256 threads per (image, tile of 32 pixels). Channel chunks of both maps are staged
// channel-major in shared memory (loaded in each map's own coalesced order, so the two maps may
// have different layouts); thread (g, p) accumulates fs . ft, |fs|^2 and |ft|^2 over channels
// g, g + 8, ... of pixel p, and the 8 partial sums per pixel are combined in a fixed order. The
// backward recomputes these terms, then streams the chunks again and writes both gradients, each
// in its map's coalesced order.
#pragma once

#include "common.cuh"

namespace memkd::cuda {
namespace {

constexpr int kCosTile = 32;   // pixels per block
constexpr int kCosChunk = 64;  // channels per chunk
constexpr int kMaxStages = 16;

// Shared memory of the cosine kernels, in acc_t elements.
constexpr int kCosLd = kCosTile + 1;
constexpr int kCosTileElems = (kCosChunk * kCosLd + 3) / 4 * 4;
constexpr int kCosA = 0;
constexpr int kCosB = kCosA + kCosTileElems;
constexpr int kCosRed = kCosB + kCosTileElems;
constexpr int kCosTerms = kCosRed + 3 * kThreads;   // dot, |fs|, |ft| per pixel
constexpr int kCosCoef = kCosTerms + 3 * kCosTile;  // backward: cross, self_a, self_b per pixel
constexpr int kCosTotal = kCosCoef + 3 * kCosTile;

// s_terms[p] = fs . ft, s_terms[TP + p] = |fs|, s_terms[2 TP + p] = |ft| for pixel p0 + p of image b
// (zero past P). Ends with a barrier.
template <typename scalar_t, typename acc_t>
MEMKD_DEVICE void cosine_terms(const scalar_t* __restrict__ fs, const Layout& la, const scalar_t* __restrict__ ft,
                               const Layout& lb, int64_t b, int64_t p0, int64_t P, int64_t C, acc_t* smem) {
  constexpr int TP = kCosTile, CC = kCosChunk, G = kThreads / TP;
  acc_t *s_a = smem + kCosA, *s_b = smem + kCosB, *s_red = smem + kCosRed, *s_terms = smem + kCosTerms;
  const int tid = threadIdx.x, p = tid % TP, g = tid / TP;
  acc_t dot = acc_t(0), saa = acc_t(0), sbb = acc_t(0);
  for (int64_t c0 = 0; c0 < C; c0 += CC) {
    __syncthreads();
    load_tile<TP, CC, false>(fs, la, b, p0, P, c0, C, s_a, kCosLd);
    load_tile<TP, CC, false>(ft, lb, b, p0, P, c0, C, s_b, kCosLd);
    __syncthreads();
#pragma unroll 4
    for (int c = g; c < CC; c += G) {
      const acc_t x = s_a[c * kCosLd + p], y = s_b[c * kCosLd + p];
      dot += x * y;
      saa += x * x;
      sbb += y * y;
    }
  }
  s_red[g * TP + p] = dot;
  s_red[kThreads + g * TP + p] = saa;
  s_red[2 * kThreads + g * TP + p] = sbb;
  __syncthreads();
  if (g == 0) {
#pragma unroll
    for (int k = 1; k < G; ++k) {
      dot += s_red[k * TP + p];
      saa += s_red[kThreads + k * TP + p];
      sbb += s_red[2 * kThreads + k * TP + p];
    }
    s_terms[p] = dot;
    s_terms[TP + p] = dev_sqrt(saa);
    s_terms[2 * TP + p] = dev_sqrt(sbb);
  }
  __syncthreads();
}

// One stage of cosine distances: dist[b * P + p] = 1 - cos over the tiles_per_image * B blocks
// starting at block first_block.
template <typename scalar_t, typename out_t>
struct DistanceStage {
  const scalar_t* fs;
  const scalar_t* ft;
  Layout la, lb;
  int64_t channels, pixels, tiles_per_image, first_block;
  out_t* dist;
};

template <typename scalar_t, typename out_t>
struct DistanceStages {
  DistanceStage<scalar_t, out_t> stage[kMaxStages];
  int count;
};

template <typename scalar_t, typename acc_t, typename out_t>
MEMKD_GLOBAL void cosine_distance_kernel(const MEMKD_GRID_CONSTANT DistanceStages<scalar_t, out_t> stages) {
  MEMKD_SHARED_MEMORY(smem_raw);
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  int k = 0;
  while (k + 1 < stages.count && static_cast<int64_t>(blockIdx.x) >= stages.stage[k + 1].first_block) ++k;
  const DistanceStage<scalar_t, out_t>& st = stages.stage[k];
  const int64_t tile = blockIdx.x - st.first_block;
  const int64_t b = tile / st.tiles_per_image, p0 = (tile % st.tiles_per_image) * kCosTile;
  cosine_terms<scalar_t, acc_t>(st.fs, st.la, st.ft, st.lb, b, p0, st.pixels, st.channels, smem);
  const int tid = threadIdx.x;
  if (tid < kCosTile && p0 + tid < st.pixels) {
    const acc_t* s_terms = smem + kCosTerms;
    const acc_t inv_a = acc_t(1) / dev_max(s_terms[kCosTile + tid], acc_t(kEps));
    const acc_t inv_b = acc_t(1) / dev_max(s_terms[2 * kCosTile + tid], acc_t(kEps));
    st.dist[b * st.pixels + p0 + tid] = static_cast<out_t>(acc_t(1) - s_terms[tid] * inv_a * inv_b);
  }
}

// d(1 - ah . bh)/da = -(bh - ah cos) / |a|: grad_fs = cross ft + self_a fs, grad_ft = cross fs + self_b ft
// with cross = -g / (|a| |b|), self_a = g cos / |a|^2 (0 where |a| < EPS), likewise self_b.
template <typename scalar_t, typename acc_t>
MEMKD_GLOBAL void cosine_distance_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ fs,
                                                  Layout la, const scalar_t* __restrict__ ft, Layout lb,
                                                  scalar_t* __restrict__ grad_fs, Layout lga,
                                                  scalar_t* __restrict__ grad_ft, Layout lgb, int64_t C, int64_t P,
                                                  int64_t tiles_per_image) {
  constexpr int TP = kCosTile, CC = kCosChunk;
  MEMKD_SHARED_MEMORY(smem_raw);
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  acc_t *s_a = smem + kCosA, *s_b = smem + kCosB, *s_terms = smem + kCosTerms, *s_coef = smem + kCosCoef;
  const int64_t b = blockIdx.x / tiles_per_image, p0 = (blockIdx.x % tiles_per_image) * TP;
  cosine_terms<scalar_t, acc_t>(fs, la, ft, lb, b, p0, P, C, smem);
  const int tid = threadIdx.x;
  if (tid < TP) {
    const acc_t go = p0 + tid < P ? static_cast<acc_t>(grad[b * P + p0 + tid]) : acc_t(0);
    const acc_t na = s_terms[TP + tid], nb = s_terms[2 * TP + tid];
    const acc_t inv_a = acc_t(1) / dev_max(na, acc_t(kEps)), inv_b = acc_t(1) / dev_max(nb, acc_t(kEps));
    const acc_t cos = s_terms[tid] * inv_a * inv_b;
    s_coef[tid] = -go * inv_a * inv_b;
    s_coef[TP + tid] = na >= acc_t(kEps) ? go * cos * inv_a * inv_a : acc_t(0);
    s_coef[2 * TP + tid] = nb >= acc_t(kEps) ? go * cos * inv_b * inv_b : acc_t(0);
  }
  for (int64_t c0 = 0; c0 < C; c0 += CC) {
    __syncthreads();  // s_coef is published / the previous chunk is stored
    load_tile<TP, CC, false>(fs, la, b, p0, P, c0, C, s_a, kCosLd);
    load_tile<TP, CC, false>(ft, lb, b, p0, P, c0, C, s_b, kCosLd);
    __syncthreads();
    store_tile<TP, CC>(grad_fs, lga, b, p0, P, c0, C, [&](int c, int p) {
      return s_coef[p] * s_b[c * kCosLd + p] + s_coef[TP + p] * s_a[c * kCosLd + p];
    });
    store_tile<TP, CC>(grad_ft, lgb, b, p0, P, c0, C, [&](int c, int p) {
      return s_coef[p] * s_a[c * kCosLd + p] + s_coef[2 * TP + p] * s_b[c * kCosLd + p];
    });
  }
}

// ---- host side -----------------------------------------------------------------------------

template <typename acc_t>
constexpr int64_t cosine_smem_bytes() {
  return static_cast<int64_t>(kCosTotal) * static_cast<int64_t>(sizeof(acc_t));
}

// Launches the distance kernel over up to kMaxStages (fs, ft, dist) triples in one grid.
template <typename scalar_t, typename acc_t, typename out_t>
void launch_cosine_distances(const std::vector<at::Tensor>& fs, const std::vector<at::Tensor>& ft,
                             const std::vector<out_t*>& dist, size_t begin, size_t end, const char* op) {
  DistanceStages<scalar_t, out_t> stages{};
  int64_t blocks = 0;
  for (size_t s = begin; s < end; ++s) {
    const at::Tensor& a = fs[s];
    const int64_t channels = a.size(1), pixels = a.size(2) * a.size(3);
    const int64_t tiles_per_image = ceil_div(pixels, kCosTile);
    stages.stage[s - begin] = {a.const_data_ptr<scalar_t>(), ft[s].const_data_ptr<scalar_t>(), layout_of(a),
                               layout_of(ft[s]), channels, pixels, tiles_per_image, blocks, dist[s]};
    blocks += a.size(0) * tiles_per_image;
    check_kernel_limits(channels, pixels, blocks, op);
  }
  stages.count = static_cast<int>(end - begin);
  launch_kernel(cosine_distance_kernel<scalar_t, acc_t, out_t>, dim3(static_cast<unsigned>(blocks)),
                cosine_smem_bytes<acc_t>(), stages);
}

// Arguments are checked by the caller; fs and ft are on one device.
inline at::Tensor cosine_distance_map_forward_impl(const at::Tensor& fs_arg, const at::Tensor& ft_arg) {
  const at::Tensor fs = dense_feature_map(fs_arg), ft = dense_feature_map(ft_arg);
  at::Tensor out = at::empty({fs.size(0), fs.size(2), fs.size(3)}, fs.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fs.scalar_type(), "cosine_distance_map_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    launch_cosine_distances<scalar_t, acc_t, scalar_t>({fs}, {ft}, {out.mutable_data_ptr<scalar_t>()}, 0, 1,
                                                       "cosine_distance_map");
  });
  return out;
}

inline std::tuple<at::Tensor, at::Tensor> cosine_distance_map_backward_impl(const at::Tensor& grad_out_arg,
                                                                            const at::Tensor& fs_arg,
                                                                            const at::Tensor& ft_arg) {
  const at::Tensor fs = dense_feature_map(fs_arg), ft = dense_feature_map(ft_arg);
  const at::Tensor grad_out = grad_out_arg.contiguous();
  at::Tensor grad_fs = at::empty_like(fs), grad_ft = at::empty_like(ft);
  const int64_t batch = fs.size(0), channels = fs.size(1), pixels = fs.size(2) * fs.size(3);
  const int64_t tiles_per_image = ceil_div(pixels, kCosTile);
  check_kernel_limits(channels, pixels, batch * tiles_per_image, "cosine_distance_map_backward");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fs.scalar_type(), "cosine_distance_map_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    launch_kernel(cosine_distance_backward_kernel<scalar_t, acc_t>, dim3(static_cast<unsigned>(batch * tiles_per_image)),
                  cosine_smem_bytes<acc_t>(), grad_out.const_data_ptr<scalar_t>(), fs.const_data_ptr<scalar_t>(),
                  layout_of(fs), ft.const_data_ptr<scalar_t>(), layout_of(ft), grad_fs.mutable_data_ptr<scalar_t>(),
                  layout_of(grad_fs), grad_ft.mutable_data_ptr<scalar_t>(), layout_of(grad_ft), channels, pixels,
                  tiles_per_image);
  });
  return {grad_fs, grad_ft};
}

}  // namespace
}  // namespace memkd::cuda
