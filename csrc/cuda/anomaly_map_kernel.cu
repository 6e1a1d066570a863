// CUDA kernel of memkd::anomaly_map and image scores (paper Eq. 3-4; inference only): kernels,
// launchers and entry point.
//
// 1. One launch computes every stage's cosine distances at its own resolution into small fp32
//    (fp64) maps [B, H_k * W_k] (cosine_distances.cuh; the channel reduction is done once
//    per feature pixel, never per output pixel).
// 2. One fused kernel per 32 x 32 output tile: evaluates the stage sum of bilinear upsamplings
//    (align_corners=True, ATen's arithmetic) on the tile and its reflect-padded halo straight into
//    shared memory, blurs it horizontally and then vertically with scipy.ndimage.gaussian_filter's
//    taps (truncate 4.0, 'reflect' borders; sigma 0 is a single unit tap), stores the map in the
//    features' dtype and the tile's max (NaN if any of its pixels is NaN: nan_max, torch.amax's
//    rule). No upsampled or per-stage full-size map is materialised.
// 3. A last kernel takes each image's max over its tiles in tile order (deterministic; NaN propagates).
// More than 16 stages, or a blur radius whose halo does not fit in shared memory, falls back to the
// distances of step 1 followed by ATen ops.
//
// The entry point checks its arguments (csrc/ops/checks.h), requires CUDA tensors on one device,
// and runs on that device's current stream.
#include <torch/library.h>

#include "common.cuh"
#include "cosine_distances.cuh"

namespace memkd::cuda {
namespace {

constexpr int kBlurTile = 32;  // output tile: kBlurTile x kBlurTile pixels
constexpr int kMaxRadius = 96;
constexpr int kMaxTaps = 2 * kMaxRadius + 1;

template <typename acc_t>
struct UpsampleStage {
  const acc_t* dist;  // [B, height * width]
  int64_t height, width;
  acc_t scale_y, scale_x;  // (in - 1) / (out - 1), or 0 for an output of size 1
};

template <typename acc_t>
struct BlurParams {
  UpsampleStage<acc_t> stage[kMaxStages];
  int count;
  int radius;
  acc_t taps[kMaxTaps];
};

// scipy.ndimage 'reflect' (d c b a | a b c d | d c b a): the source of position i of a line of n.
MEMKD_DEVICE int64_t reflect_index(int64_t i, int64_t n) {
  const int64_t period = 2 * n;
  int64_t j = i % period;
  if (j < 0) j += period;
  return j >= n ? period - 1 - j : j;
}

// sum over stages of the bilinear (align_corners=True) upsampling of the stage distances at (y, x).
template <typename acc_t>
MEMKD_DEVICE acc_t upsampled_sum(const BlurParams<acc_t>& prm, int64_t b, int64_t y, int64_t x) {
  acc_t total = acc_t(0);
  for (int k = 0; k < prm.count; ++k) {
    const UpsampleStage<acc_t>& st = prm.stage[k];
    const int64_t h = st.height, w = st.width;
    const acc_t sy = st.scale_y * static_cast<acc_t>(y), sx = st.scale_x * static_cast<acc_t>(x);
    int64_t y0 = static_cast<int64_t>(sy), x0 = static_cast<int64_t>(sx);
    y0 = y0 < h - 1 ? y0 : h - 1;
    x0 = x0 < w - 1 ? x0 : w - 1;
    const int64_t y1 = y0 + (y0 < h - 1 ? 1 : 0), x1 = x0 + (x0 < w - 1 ? 1 : 0);
    const acc_t ly = sy - static_cast<acc_t>(y0), lx = sx - static_cast<acc_t>(x0);
    const acc_t* d = st.dist + b * h * w;
    const acc_t top = (acc_t(1) - lx) * d[y0 * w + x0] + lx * d[y0 * w + x1];
    const acc_t bottom = (acc_t(1) - lx) * d[y1 * w + x0] + lx * d[y1 * w + x1];
    total += (acc_t(1) - ly) * top + ly * bottom;
  }
  return total;
}

// Shared memory of the blur kernel, in acc_t elements: the upsampled tile with its halo
// [T + 2r][T + 2r], the horizontally blurred rows [T + 2r][T], a reduction buffer.
inline int64_t blur_smem_elems(int radius) {
  const int64_t side = kBlurTile + 2 * radius;
  return (side * side + 3) / 4 * 4 + (side * kBlurTile + 3) / 4 * 4 + kThreads;
}

// Grid: x = tile of the output (tiles_x per row of tiles), y = image.
template <typename scalar_t, typename acc_t>
MEMKD_GLOBAL void anomaly_blur_kernel(const MEMKD_GRID_CONSTANT BlurParams<acc_t> prm, int64_t height, int64_t width,
                                      int64_t tiles_x, scalar_t* __restrict__ maps, acc_t* __restrict__ tile_max) {
  constexpr int T = kBlurTile;
  MEMKD_SHARED_MEMORY(smem_raw);
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const int r = prm.radius, taps = 2 * prm.radius + 1, side = T + 2 * r;
  acc_t* s_total = smem;                                    // [side][side]
  acc_t* s_rows = smem + (side * side + 3) / 4 * 4;         // [side][T]
  acc_t* s_red = s_rows + (side * T + 3) / 4 * 4;           // [kThreads]
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.y;
  const int64_t y0 = (blockIdx.x / tiles_x) * T, x0 = (blockIdx.x % tiles_x) * T;

  // Stage sum on the tile and its halo: padded position (y0 - r + i, x0 - r + j).
  for (int i = tid; i < side * side; i += kThreads) {
    const int iy = i / side, ix = i % side;
    const int64_t y = reflect_index(y0 - r + iy, height), x = reflect_index(x0 - r + ix, width);
    s_total[i] = upsampled_sum(prm, b, y, x);
  }
  __syncthreads();
  // Horizontal pass: s_rows[i][j] = sum_t taps[t] total(row i, x0 + j - r + t).
  for (int i = tid; i < side * T; i += kThreads) {
    const int iy = i / T, jx = i % T;
    const acc_t* src = s_total + iy * side + jx;
    acc_t h = acc_t(0);
    for (int t = 0; t < taps; ++t) h += prm.taps[t] * src[t];
    s_rows[i] = h;
  }
  __syncthreads();
  // Vertical pass, store and the tile's max.
  acc_t best = neg_infinity<acc_t>();
  for (int i = tid; i < T * T; i += kThreads) {
    const int ty = i / T, tx = i % T;
    const int64_t y = y0 + ty, x = x0 + tx;
    if (y < height && x < width) {
      const acc_t* src = s_rows + ty * T + tx;
      acc_t v = acc_t(0);
      for (int t = 0; t < taps; ++t) v += prm.taps[t] * src[t * T];
      maps[(b * height + y) * width + x] = static_cast<scalar_t>(v);
      best = nan_max(best, v);
    }
  }
  s_red[tid] = best;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s /= 2) {
    if (tid < s) s_red[tid] = nan_max(s_red[tid], s_red[tid + s]);
    __syncthreads();
  }
  if (tid == 0) tile_max[b * gridDim.x + blockIdx.x] = s_red[0];
}

// scores[b] = max over the tiles of image b, in tile order.
template <typename scalar_t, typename acc_t>
MEMKD_GLOBAL void image_max_kernel(const acc_t* __restrict__ tile_max, int64_t batch, int64_t tiles,
                                   scalar_t* __restrict__ scores) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= batch) return;
  acc_t best = tile_max[b * tiles];
  for (int64_t t = 1; t < tiles; ++t) best = nan_max(best, tile_max[b * tiles + t]);
  scores[b] = static_cast<scalar_t>(best);
}

// ---- host side -----------------------------------------------------------------------------

// scipy.ndimage.gaussian_filter's taps: radius int(4 sigma + 0.5), normalised in double; {1} for sigma 0.
inline std::vector<double> gaussian_taps(double sigma) {
  if (sigma <= 0) return {1.0};
  const int64_t radius = static_cast<int64_t>(4.0 * sigma + 0.5);
  std::vector<double> taps(2 * radius + 1);
  double total = 0;
  for (int64_t x = -radius; x <= radius; ++x)
    total += taps[x + radius] = std::exp(-0.5 * (x / sigma) * (x / sigma));
  for (double& t : taps) t /= total;
  return taps;
}

inline at::Tensor reflect_index_tensor(int64_t n, int64_t radius, const at::Device& device) {
  const at::Tensor i = at::remainder(at::arange(-radius, n + radius, at::TensorOptions().dtype(at::kLong).device(device)), 2 * n);
  return at::where(i >= n, -i + (2 * n - 1), i);
}

// Separable blur of [B, H, W] maps with ATen ops ('reflect' borders), for radii the kernel does not take.
inline at::Tensor blur_composite(const at::Tensor& maps, const at::Tensor& taps, int64_t radius) {
  const int64_t k = taps.numel();
  at::Tensor x = maps.index_select(2, reflect_index_tensor(maps.size(2), radius, maps.device()));
  x = at::matmul(x.unfold(2, k, 1), taps);
  x = x.index_select(1, reflect_index_tensor(maps.size(1), radius, maps.device()));
  return at::matmul(x.unfold(1, k, 1), taps);
}

// Arguments are checked by the caller; all features are on one device.
inline std::tuple<at::Tensor, at::Tensor> anomaly_map_impl(at::TensorList student_arg, at::TensorList teacher_arg,
                                                           at::IntArrayRef out_size, double sigma) {
  std::vector<at::Tensor> student, teacher;
  for (size_t s = 0; s < student_arg.size(); ++s) {
    student.push_back(dense_feature_map(student_arg[s]));
    teacher.push_back(dense_feature_map(teacher_arg[s]));
  }
  const size_t stages = student.size();
  const int64_t batch = student[0].size(0), height = out_size[0], width = out_size[1];
  at::Tensor maps = at::empty({batch, height, width}, student[0].options());
  at::Tensor scores = at::empty({batch}, student[0].options());
  const std::vector<double> taps64 = gaussian_taps(sigma);
  const int radius = static_cast<int>((taps64.size() - 1) / 2);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student[0].scalar_type(), "anomaly_map_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto acc_opts = student[0].options().dtype(acc_scalar_type<acc_t>());
    std::vector<at::Tensor> dist;
    std::vector<acc_t*> dist_ptr;
    for (size_t s = 0; s < stages; ++s) {
      dist.push_back(at::empty({batch, student[s].size(2) * student[s].size(3)}, acc_opts));
      dist_ptr.push_back(dist.back().mutable_data_ptr<acc_t>());
    }
    for (size_t begin = 0; begin < stages; begin += kMaxStages)
      launch_cosine_distances<scalar_t, acc_t, acc_t>(student, teacher, dist_ptr, begin,
                                                      std::min(stages, begin + kMaxStages), "anomaly_map");

    const DeviceInfo dev = device_info();
    const int64_t smem = radius <= kMaxRadius ? blur_smem_elems(radius) * static_cast<int64_t>(sizeof(acc_t)) : 0;
    const int64_t tiles_x = ceil_div(width, kBlurTile), tiles = tiles_x * ceil_div(height, kBlurTile);
    if (stages <= static_cast<size_t>(kMaxStages) && radius <= kMaxRadius && smem <= dev.smem_optin &&
        batch <= 65535 && tiles < (int64_t(1) << 31)) {
      BlurParams<acc_t> prm{};
      for (size_t s = 0; s < stages; ++s) {
        const int64_t h = student[s].size(2), w = student[s].size(3);
        // ATen's align_corners scale, in the accumulation type: (in - 1) / (out - 1).
        prm.stage[s] = {dist_ptr[s], h, w,
                        height > 1 ? static_cast<acc_t>(h - 1) / static_cast<acc_t>(height - 1) : acc_t(0),
                        width > 1 ? static_cast<acc_t>(w - 1) / static_cast<acc_t>(width - 1) : acc_t(0)};
      }
      prm.count = static_cast<int>(stages);
      prm.radius = radius;
      for (size_t t = 0; t < taps64.size(); ++t) prm.taps[t] = static_cast<acc_t>(taps64[t]);
      at::Tensor tile_max = at::empty({batch, tiles}, acc_opts);
      launch_kernel(anomaly_blur_kernel<scalar_t, acc_t>, dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(batch)),
                    smem, prm, height, width, tiles_x, maps.mutable_data_ptr<scalar_t>(),
                    tile_max.mutable_data_ptr<acc_t>());
      launch_kernel(image_max_kernel<scalar_t, acc_t>, dim3(static_cast<unsigned>(ceil_div(batch, kThreads))), 0,
                    tile_max.const_data_ptr<acc_t>(), batch, tiles, scores.mutable_data_ptr<scalar_t>());
    } else {
      at::Tensor total = at::zeros({batch, 1, height, width}, acc_opts);
      for (size_t s = 0; s < stages; ++s) {
        const at::Tensor d = dist[s].view({batch, 1, student[s].size(2), student[s].size(3)});
        total.add_(at::upsample_bilinear2d(d, {height, width}, true));
      }
      total = total.view({batch, height, width});
      if (sigma > 0) {
        const at::Tensor taps = at::tensor(taps64, at::TensorOptions().dtype(at::kDouble)).to(acc_opts);
        total = blur_composite(total, taps, radius);
      }
      maps.copy_(total);
      scores.copy_(total.flatten(1).amax(1));
    }
  });
  return {maps, scores};
}

// ---- entry points ------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> anomaly_map_cuda(at::TensorList student_features, at::TensorList teacher_features,
                                                    at::IntArrayRef out_size, double sigma) {
  check_anomaly_map_args(student_features, teacher_features, out_size, sigma);  // also: one device
  check_cuda_tensor(student_features[0], "student_features");
  const c10::cuda::CUDAGuard guard(student_features[0].device());
  return anomaly_map_impl(student_features, teacher_features, out_size, sigma);
}

}  // namespace

TORCH_LIBRARY_IMPL(memkd, CUDA, m) { m.impl("anomaly_map", &anomaly_map_cuda); }

}  // namespace memkd::cuda
