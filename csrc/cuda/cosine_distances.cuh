// The per-pixel cosine terms and the distance kernel 1 - cos(fs, ft) over channels, shared by
// memkd::cosine_distance_map (cosine_distance_map_kernel.cu) and memkd::anomaly_map, which computes
// every stage's distances with it (anomaly_map_kernel.cu).
//
// One block of 256 threads per (image, tile of 32 pixels). Channel chunks of both maps are staged
// channel-major in shared memory (loaded in each map's own coalesced order, so the two maps may
// have different layouts); thread (g, p) accumulates fs . ft, |fs|^2 and |ft|^2 over channels
// g, g + 8, ... of pixel p, and the 8 partial sums per pixel are combined in a fixed order.
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

}  // namespace
}  // namespace memkd::cuda
