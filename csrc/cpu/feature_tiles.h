// Pixel-tile access to [B, C, H, W] feature maps stored NCHW- or NHWC-dense, shared by the CPU
// kernels. Tiles of other dtypes or layouts are converted to the accumulation type with contiguous
// pixels in small thread-local buffers, so that the products run on cache-resident data without
// full-size temporaries.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace memkd::cpu {

constexpr double kEps = 1e-8;  // the same normalisation epsilon as memkd.ops.reference.EPS

// Reductions run in fp32 for fp32/fp16/bf16 inputs and in fp64 for fp64 inputs.
template <typename scalar_t>
using acc_type_for = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename acc_t>
constexpr at::ScalarType acc_scalar_type() {
  return c10::CppTypeToScalarType<acc_t>::value;
}

// NCHW-dense and channels_last-dense tensors are read in place; any other layout is copied once.
inline at::Tensor dense_feature_map(const at::Tensor& x) {
  if (x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast)) return x;
  return x.contiguous();
}

// Element (b, c, p) of a dense feature map, p = h * W + w, lives at
// data[b * stride_b + c * stride_c + p * stride_p].
struct PixelLayout {
  int64_t stride_b, stride_c, stride_p, channels, pixels;

  explicit PixelLayout(const at::Tensor& x)
      : stride_b(x.stride(0)),
        stride_c(x.stride(1)),
        // Size-1 dims may carry any stride, so take the pixel step from a dim that really moves.
        stride_p(x.size(3) > 1 ? x.stride(3) : x.stride(2)),
        channels(x.size(1)),
        pixels(x.size(2) * x.size(3)) {}
};

// exp for the softmax, written so that loops calling it auto-vectorise (std::exp does not; the
// build adds -fno-trapping-math so the clamps if-convert): n = round(x log2 e) with the 1.5 * 2^23
// shifter, Cody-Waite reduction to |r| <= ln2/2, degree-6 Taylor polynomial, 2^n from the bits;
// max relative error 2.3e-7 on [-87, 88], where fp32 exp is finite and normal.
inline float vector_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  const float p =
      1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
  const int32_t n_bits = std::bit_cast<int32_t>(shifted) - 0x4B400000;  // the integer n
  return p * std::bit_cast<float>((n_bits + 127) << 23);
}
inline double vector_exp(double x) { return std::exp(x); }

// Pixel tile size: about 1 MiB of fp32 per [C, T] buffer, a multiple of 16, at most 512 pixels and
// the image, and at least two tiles in all so that a single image still splits across threads. It
// does not depend on the thread count, which keeps the gradient reductions the same for any count.
// Splitting a lone image lets every thread work at batch 1.
// With the register-blocked products (B=16, 2 threads, calls alternating in one process), tiles of
// 128 KiB, 256 KiB, 512 KiB or 2 MiB were no faster at 512x32x32 and 1024x16x16.
inline int64_t pixel_tile(int64_t channels, int64_t pixels, int64_t batch) {
  const int64_t t = std::clamp<int64_t>((262144 / std::max<int64_t>(channels, 1)) / 16 * 16, 16, 512);
  const int64_t split = batch == 1 ? ((pixels + 1) / 2 + 15) / 16 * 16 : pixels;
  return std::min({t, split, pixels});
}

// Runs worker(claim) once on each intra-op thread; claim() hands out the items 0, 1, ..., count - 1,
// each to one caller, and then returns count. On a shared machine one core is often slower for a
// while, and a static split of the items then waits for it.
template <typename Worker>
void parallel_claim(int64_t count, const Worker& worker) {
  std::atomic<int64_t> next{0};
  const auto claim = [&] { return std::min(count, next.fetch_add(1, std::memory_order_relaxed)); };
  at::parallel_for(0, std::min<int64_t>(count, at::get_num_threads()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) worker(claim);
  });
}

// dst[c * n + t] = src(b, c, p0 + t) for t < n.
template <typename scalar_t, typename acc_t>
void load_tile(const scalar_t* src, const PixelLayout& l, int64_t b, int64_t p0, int64_t n,
               acc_t* dst) {
  const scalar_t* base = src + b * l.stride_b + p0 * l.stride_p;
  if (l.stride_p == 1) {
    for (int64_t c = 0; c < l.channels; ++c) {
      const scalar_t* row = base + c * l.stride_c;
      acc_t* out = dst + c * n;
      for (int64_t t = 0; t < n; ++t) out[t] = static_cast<acc_t>(row[t]);
    }
  } else {
    for (int64_t t = 0; t < n; ++t) {
      const scalar_t* pix = base + t * l.stride_p;
      for (int64_t c = 0; c < l.channels; ++c) dst[c * n + t] = static_cast<acc_t>(pix[c * l.stride_c]);
    }
  }
}

// dst(b, c, p0 + t) = src[c * n + t] for t < n.
template <typename scalar_t, typename acc_t>
void store_tile(const acc_t* src, const PixelLayout& l, int64_t b, int64_t p0, int64_t n,
                scalar_t* dst) {
  scalar_t* base = dst + b * l.stride_b + p0 * l.stride_p;
  if (l.stride_p == 1) {
    for (int64_t c = 0; c < l.channels; ++c) {
      scalar_t* row = base + c * l.stride_c;
      const acc_t* in = src + c * n;
      for (int64_t t = 0; t < n; ++t) row[t] = static_cast<scalar_t>(in[t]);
    }
  } else {
    for (int64_t t = 0; t < n; ++t) {
      scalar_t* pix = base + t * l.stride_p;
      for (int64_t c = 0; c < l.channels; ++c) pix[c * l.stride_c] = static_cast<scalar_t>(src[c * n + t]);
    }
  }
}

// A [C, n] pixel tile in the accumulation type with contiguous pixels: element (c, t) at
// data[c * ld + t]. It points either straight into an NCHW fp32/fp64 feature map or into a copy.
template <typename acc_t>
struct Tile {
  acc_t* data;
  int64_t ld, channels, n;
};

// Whether tiles of this map are used where they lie: it already has the accumulation type and its
// pixels are contiguous (NCHW). Others (fp16/bf16, channels_last) go through a C * n buffer.
template <typename scalar_t, typename acc_t>
bool tiles_in_place(const PixelLayout& l) {
  return std::is_same_v<scalar_t, acc_t> && l.stride_p == 1;
}

// A thread's conversion buffer for tiles of `tile` pixels of this map: empty when tiles are used in place.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> tile_buffer(const PixelLayout& l, int64_t tile) {
  return std::vector<acc_t>(tiles_in_place<scalar_t, acc_t>(l) ? 0 : l.channels * tile);
}

// The tile of pixels [p0, p0 + n) of image b to read: in place where possible, else converted
// into buffer.
template <typename scalar_t, typename acc_t>
Tile<acc_t> feature_tile(const scalar_t* data, const PixelLayout& l, int64_t b, int64_t p0, int64_t n,
                         acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {  // a read-only view of the caller's map
    if (l.stride_p == 1) return {const_cast<acc_t*>(data) + b * l.stride_b + p0, l.stride_c, l.channels, n};
  }
  load_tile(data, l, b, p0, n, buffer);
  return {buffer, n, l.channels, n};
}

// Where to produce output pixels [p0, p0 + n) of image b: in place where possible, else in buffer,
// which finish_output_tile then converts into the map.
template <typename scalar_t, typename acc_t>
Tile<acc_t> output_tile(scalar_t* data, const PixelLayout& l, int64_t b, int64_t p0, int64_t n, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (l.stride_p == 1) return {data + b * l.stride_b + p0, l.stride_c, l.channels, n};
  }
  return {buffer, n, l.channels, n};
}

template <typename scalar_t, typename acc_t>
void finish_output_tile(const Tile<acc_t>& tile, const PixelLayout& l, int64_t b, int64_t p0, scalar_t* data) {
  if (!tiles_in_place<scalar_t, acc_t>(l)) store_tile(tile.data, l, b, p0, tile.n, data);
}

// inv_norm[t] = 1 / max(sqrt(sum_squares[t]), eps) and whether the norm was left unclamped;
// inv_norm may be sum_squares.
template <typename acc_t>
void inverse_norms(const acc_t* sum_squares, int64_t n, acc_t* inv_norm, bool* unclamped) {
  for (int64_t t = 0; t < n; ++t) {
    const acc_t norm = std::sqrt(sum_squares[t]);
    unclamped[t] = norm >= acc_t(kEps);
    inv_norm[t] = acc_t(1) / std::max(norm, acc_t(kEps));
  }
}

// Per pixel t < n of image b: dot[t] = fs . ft, inv_a[t] = 1 / max(|fs|, eps), inv_b likewise, and
// whether each norm was left unclamped (the projection term of the gradient vanishes otherwise).
template <typename scalar_t, typename acc_t>
void pixel_cosine_terms(const scalar_t* fs, const PixelLayout& la, const scalar_t* ft,
                        const PixelLayout& lb, int64_t b, int64_t p0, int64_t n, acc_t* dot,
                        acc_t* inv_a, acc_t* inv_b, bool* ok_a, bool* ok_b) {
  std::fill(dot, dot + n, acc_t(0));
  std::fill(inv_a, inv_a + n, acc_t(0));
  std::fill(inv_b, inv_b + n, acc_t(0));
  const scalar_t* a0 = fs + b * la.stride_b + p0 * la.stride_p;
  const scalar_t* b0 = ft + b * lb.stride_b + p0 * lb.stride_p;
  if (la.stride_p == 1 && lb.stride_p == 1) {  // NCHW: vectorise over the contiguous pixels
    for (int64_t c = 0; c < la.channels; ++c) {
      const scalar_t* ra = a0 + c * la.stride_c;
      const scalar_t* rb = b0 + c * lb.stride_c;
      for (int64_t t = 0; t < n; ++t) {
        const acc_t x = static_cast<acc_t>(ra[t]), y = static_cast<acc_t>(rb[t]);
        dot[t] += x * y;
        inv_a[t] += x * x;
        inv_b[t] += y * y;
      }
    }
  } else {  // channels_last (or mixed): reduce over channels pixel by pixel
    for (int64_t t = 0; t < n; ++t) {
      const scalar_t* pa = a0 + t * la.stride_p;
      const scalar_t* pb = b0 + t * lb.stride_p;
      acc_t d = 0, sa = 0, sb = 0;
      for (int64_t c = 0; c < la.channels; ++c) {
        const acc_t x = static_cast<acc_t>(pa[c * la.stride_c]), y = static_cast<acc_t>(pb[c * lb.stride_c]);
        d += x * y;
        sa += x * x;
        sb += y * y;
      }
      dot[t] = d;
      inv_a[t] = sa;
      inv_b[t] = sb;
    }
  }
  inverse_norms(inv_a, n, inv_a, ok_a);  // in place: each t reads its sum before writing
  inverse_norms(inv_b, n, inv_b, ok_b);
}

// dist[t] = 1 - cos(fs(b, :, p0 + t), ft(b, :, p0 + t)) for t < n; scratch holds 2 * n values, flags 2 * n.
template <typename scalar_t, typename acc_t>
void pixel_cosine_distances(const scalar_t* fs, const PixelLayout& la, const scalar_t* ft,
                            const PixelLayout& lb, int64_t b, int64_t p0, int64_t n, acc_t* dist,
                            acc_t* scratch, bool* flags) {
  acc_t *inv_a = scratch, *inv_b = scratch + n;
  pixel_cosine_terms(fs, la, ft, lb, b, p0, n, dist, inv_a, inv_b, flags, flags + n);
  for (int64_t t = 0; t < n; ++t) dist[t] = acc_t(1) - dist[t] * inv_a[t] * inv_b[t];
}

}  // namespace memkd::cpu
