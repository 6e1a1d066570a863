// Register-blocked products between the small [L, C] memory matrices (keys, values) and [C, n]
// pixel tiles whose pixels are contiguous (row c of a tile starts at data + c * ld), written for
// NR recall's shapes (L = 50, C = 256..2048, n = 256..512) instead of calling BLAS per tile:
// - rows_by_tile ([L, C] x [C, n] -> [L, n], the scores): each 64-pixel block of the tile is copied
//   once into a contiguous buffer and reused for every block of memory rows; the query's sums of
//   squares come out of that copy, so the norms take no pass of their own.
// - cols_by_rows ([C, L] x [L, n] -> [C, n], the output and the query gradient): written straight
//   into the map with streaming stores, optionally starting from the normalisation-backward term.
// - add_rows_by_tile_t ([L, n] x [n, C] accumulated into [L, C], the key and value gradients):
//   each block of tile channels is transposed once by register shuffles and reused for every block
//   of memory rows.
// BLAS spent a quarter of the forward packing the tiles and zeroing the output, and copied the
// tile again for every gradient product (perf, 1024 x 16 x 16).
//
// One source serves AVX-512 (32 registers: 5 x 4 accumulators of 16 floats), AVX2 (16 registers:
// 4 x 3 accumulators of 8 floats) and narrower targets, through GCC/Clang vector extensions.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace memkd::cpu {

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
constexpr int kRowBlock = 5;      // memory rows (or tile channels) per register block
constexpr int kBlockVectors = 4;  // vectors per register block (of pixels; of channels in add_rows_by_tile_t)
#else
constexpr int kVectorBytes = 32;
constexpr int kRowBlock = 4;
constexpr int kBlockVectors = 3;
#endif

template <typename T>
struct VectorOf;
template <>
struct VectorOf<float> {
  typedef float type __attribute__((vector_size(kVectorBytes)));
  typedef int32_t index_type __attribute__((vector_size(kVectorBytes)));  // a shuffle mask
};
template <>
struct VectorOf<double> {
  typedef double type __attribute__((vector_size(kVectorBytes)));
  typedef int64_t index_type __attribute__((vector_size(kVectorBytes)));
};
template <typename T>
using vec_t = typename VectorOf<T>::type;

template <typename T>
constexpr int64_t kLanes = kVectorBytes / sizeof(T);

template <typename T>
inline vec_t<T> load_vec(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));  // an unaligned vector load
  return v;
}

template <typename T>
inline void store_vec(T* p, const vec_t<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// A store that skips the cache where the target is vector-aligned: each output line is written once,
// and reading it in first (write-allocate) cost more than the arithmetic that fills it (B = 16
// forward about 15% faster at each WideResNet50 stage shape).
template <typename T>
inline void stream_vec(T* p, const vec_t<T>& v) {
#if defined(__AVX512F__)
  if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) {
    if constexpr (std::is_same_v<T, float>) return _mm512_stream_ps(p, reinterpret_cast<__m512>(v));
    else return _mm512_stream_pd(p, reinterpret_cast<__m512d>(v));
  }
#endif
  store_vec(p, v);
}

template <typename T>
inline vec_t<T> broadcast(T x) {
  return x - vec_t<T>{};  // x - (+0) is x for every x, so this folds to a plain broadcast
}

// Calls f(std::integral_constant<int, k>) for a runtime k in [1, Max].
template <int Max, typename F>
inline void with_block_size(int k, F&& f) {
  if constexpr (Max >= 1) {
    if (k == Max) return f(std::integral_constant<int, Max>{});
    with_block_size<Max - 1>(k, std::forward<F>(f));
  }
}

// Calls block(t0, std::integral_constant<int, NV>) over the pixels [0, n) in blocks of
// kBlockVectors vectors, the last one shorter; returns where the pixels that fill no vector start.
template <typename T, typename F>
inline int64_t for_each_pixel_block(int64_t n, const F& block) {
  constexpr int64_t W = kLanes<T>;
  int64_t t0 = 0;
  for (; t0 + kBlockVectors * W <= n; t0 += kBlockVectors * W) block(t0, std::integral_constant<int, kBlockVectors>{});
  if (const int64_t vectors = (n - t0) / W; vectors > 0) {
    with_block_size<kBlockVectors>(static_cast<int>(vectors), [&](auto nv) { block(t0, nv); });
    t0 += vectors * W;
  }
  return t0;
}

// acc[i][j] += a[i * lda + k] * (the vector at v + k * ldv + j * lanes) for k < depth: the inner
// loop of every product, R broadcasts times NV vectors per step. When prefetch is not null, each step
// also prefetches the line at prefetch + k * prefetch_ld into L2 (prefetcht1: one core, tile from
// memory, the scores ran at 91-101 GFLOP/s with it, 80-91 with prefetcht0, 64-81 without).
template <typename T, int R, int NV>
inline void add_outer_products(vec_t<T> (&acc)[R][NV], const T* a, int64_t lda, const T* v, int64_t ldv,
                               int64_t depth, const T* prefetch = nullptr, int64_t prefetch_ld = 0) {
  using V = vec_t<T>;
  constexpr int64_t W = kLanes<T>;
  for (int64_t k = 0; k < depth; ++k) {
    if (prefetch != nullptr) __builtin_prefetch(prefetch + k * prefetch_ld, 0, 2);
    V vk[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) vk[j] = load_vec(v + k * ldv + j * W);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const V ai = broadcast(a[i * lda + k]);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] += ai * vk[j];
    }
  }
}

// out[m, t] = sum_c a[m * lda + c] * x[c * NV * lanes + t] for m < MB, t < NV * lanes (x packed),
// prefetching the line at prefetch + c * prefetch_ld per channel c when prefetch is not null.
template <typename T, int MB, int NV>
inline void rows_by_packed_block(const T* a, int64_t lda, const T* x, int64_t channels, T* out, int64_t ldo,
                                 const T* prefetch, int64_t prefetch_ld) {
  using V = vec_t<T>;
  constexpr int64_t W = kLanes<T>;
  V acc[MB][NV] = {};
  add_outer_products<T, MB, NV>(acc, a, lda, x, NV * W, channels, prefetch, prefetch_ld);
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) store_vec(out + i * ldo + j * W, acc[i][j]);
}

// Copies the [C, NV * lanes] block at x (row stride ldx) into packed, contiguous, and when sumsq is
// not null sets sumsq[t] = sum_c x[c, t]^2. Rows of a feature map lie H * W floats apart, a stride
// that maps them all onto a few cache sets; the block is reread once per block of memory rows.
template <typename T, int NV>
inline void pack_pixel_block(const T* x, int64_t ldx, int64_t channels, T* packed, T* sumsq) {
  using V = vec_t<T>;
  constexpr int64_t W = kLanes<T>;
  V sq[NV] = {};
  for (int64_t c = 0; c < channels; ++c) {
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      const V v = load_vec(x + c * ldx + j * W);
      store_vec(packed + (c * NV + j) * W, v);
      sq[j] += v * v;
    }
  }
  if (sumsq != nullptr) {
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) store_vec(sumsq + j * W, sq[j]);
  }
}

// Scratch that rows_by_tile needs for a tile of the given channel count.
template <typename T>
constexpr int64_t packed_block_size(int64_t channels) {
  return channels * kBlockVectors * kLanes<T>;
}

// out[m, t] = sum_c a[m, c] x[c, t] for m < rows, t < n (a: [rows, C] with row stride lda; x: a
// [C, n] tile with row stride ldx; out: [rows, n] with row stride ldo), and, when sumsq is not
// null, sumsq[t] = sum_c x[c, t]^2. packed: packed_block_size<T>(channels) values of scratch.
template <typename T>
void rows_by_tile(const T* a, int64_t lda, int64_t rows, const T* x, int64_t ldx, int64_t channels,
                  int64_t n, T* out, int64_t ldo, T* sumsq, T* packed) {
  constexpr int64_t W = kLanes<T>;
  const auto pixel_block = [&](int64_t t0, auto nv) {
    constexpr int NV = decltype(nv)::value;
    pack_pixel_block<T, NV>(x + t0, ldx, channels, packed, sumsq != nullptr ? sumsq + t0 : nullptr);
    for (int64_t m0 = 0; m0 < rows; m0 += kRowBlock) {
      // The first NV row blocks fetch one vector each of every channel of the next pixel block (in
      // memory, also the start of the next tile), a line per step: the hardware prefetchers do not
      // follow rows H * W floats apart, and prefetching a block's lines in bursts between the row
      // blocks did not help (measured).
      const int64_t row_block = m0 / kRowBlock;
      const T* next = row_block < NV ? x + t0 + (NV + row_block) * W : nullptr;
      with_block_size<kRowBlock>(static_cast<int>(std::min<int64_t>(kRowBlock, rows - m0)), [&](auto mb) {
        rows_by_packed_block<T, decltype(mb)::value, NV>(a + m0 * lda, lda, packed, channels, out + m0 * ldo + t0, ldo,
                                                         next, ldx);
      });
    }
  };
  const int64_t t0 = for_each_pixel_block<T>(n, pixel_block);
  // The last n % lanes pixels, one at a time: reading a full vector there could leave the tensor.
  for (int64_t t = t0; t < n; ++t) {
    if (sumsq != nullptr) {
      T s = 0;
      for (int64_t c = 0; c < channels; ++c) s += x[c * ldx + t] * x[c * ldx + t];
      sumsq[t] = s;
    }
    for (int64_t m = 0; m < rows; ++m) {
      T s = 0;
      for (int64_t c = 0; c < channels; ++c) s += a[m * lda + c] * x[c * ldx + t];
      out[m * ldo + t] = s;
    }
  }
}

// out[c, t] = sum_m a[c * lda + m] * w[m * ldw + t] for c < CB, t < NV * lanes; with Project,
// minus x[c * ldx + t] * coef[t] (the radial part of a normalisation backward).
template <typename T, int CB, int NV, bool Project>
inline void cols_by_rows_block(const T* a, int64_t lda, int64_t rows, const T* w, int64_t ldw, T* out,
                               int64_t ldo, const T* x, int64_t ldx, const T* coef) {
  using V = vec_t<T>;
  constexpr int64_t W = kLanes<T>;
  V acc[CB][NV] = {};
  if constexpr (Project) {
#pragma GCC unroll 8
    for (int i = 0; i < CB; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] = -load_vec(x + i * ldx + j * W) * load_vec(coef + j * W);
    // The next block's tile rows have usually left the cache by now (measured: 10% off this product).
#pragma GCC unroll 8
    for (int i = 0; i < CB; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) __builtin_prefetch(x + (CB + i) * ldx + j * W);
  }
  add_outer_products<T, CB, NV>(acc, a, lda, w, ldw, rows);
#pragma GCC unroll 8
  for (int i = 0; i < CB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) stream_vec(out + i * ldo + j * W, acc[i][j]);
}

// out[c, t] = sum_m a[c, m] w[m, t] for c < channels, t < n (a: [C, rows] with row stride lda; w:
// [rows, n] with row stride ldw; out: a [C, n] tile with row stride ldo), minus x[c, t] * coef[t]
// when coef is not null (x: a [C, n] tile with row stride ldx).
template <typename T>
void cols_by_rows(const T* a, int64_t lda, int64_t rows, const T* w, int64_t ldw, int64_t channels,
                  int64_t n, T* out, int64_t ldo, const T* x, int64_t ldx, const T* coef) {
  const auto pixel_block = [&](int64_t t0, auto nv) {
    for (int64_t c0 = 0; c0 < channels; c0 += kRowBlock) {
      with_block_size<kRowBlock>(static_cast<int>(std::min<int64_t>(kRowBlock, channels - c0)), [&](auto cb) {
        if (coef != nullptr)
          cols_by_rows_block<T, decltype(cb)::value, decltype(nv)::value, true>(a + c0 * lda, lda, rows, w + t0, ldw, out + c0 * ldo + t0, ldo,
                                                  x + c0 * ldx + t0, ldx, coef + t0);
        else
          cols_by_rows_block<T, decltype(cb)::value, decltype(nv)::value, false>(a + c0 * lda, lda, rows, w + t0, ldw, out + c0 * ldo + t0, ldo,
                                                   nullptr, 0, nullptr);
      });
    }
  };
  const int64_t t0 = for_each_pixel_block<T>(n, pixel_block);
  for (int64_t t = t0; t < n; ++t)
    for (int64_t c = 0; c < channels; ++c) {
      T s = 0;
      for (int64_t m = 0; m < rows; ++m) s += a[c * lda + m] * w[m * ldw + t];
      out[c * ldo + t] = coef != nullptr ? s - x[c * ldx + t] * coef[t] : s;
    }
#if defined(__AVX512F__)
  _mm_sfence();  // order the streamed stores before whatever reads the tile next
#endif
}

// One level of a block transpose: with H lanes per sub-block, a keeps its even sub-blocks and
// takes b's even ones in place of its odd ones; b gets a's odd sub-blocks in place of its even ones.
template <typename T, int H, int... I>
inline void swap_sub_blocks(vec_t<T>& a, vec_t<T>& b, std::integer_sequence<int, I...>) {
  constexpr int N = sizeof...(I);
  constexpr auto low = [](int p) { return (p & H) == 0 ? p : N + p - H; };
  constexpr auto high = [](int p) { return (p & H) == 0 ? p + H : N + p; };
#if defined(__clang__)
  const vec_t<T> a_new = __builtin_shufflevector(a, b, low(I)...);
  b = __builtin_shufflevector(a, b, high(I)...);
#else  // GCC before 12 lacks __builtin_shufflevector
  using Mask = typename VectorOf<T>::index_type;
  const vec_t<T> a_new = __builtin_shuffle(a, b, Mask{low(I)...});
  b = __builtin_shuffle(a, b, Mask{high(I)...});
#endif
  a = a_new;
}

// Transposes the lanes x lanes block whose rows are v[0..lanes) in log2(lanes) levels of shuffles.
template <typename T, int H = kLanes<T> / 2>
inline void transpose_block(vec_t<T>* v) {
  constexpr int N = kLanes<T>;
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i)
    if ((i & H) == 0) swap_sub_blocks<T, H>(v[i], v[i + H], std::make_integer_sequence<int, N>{});
  if constexpr (H > 1) transpose_block<T, H / 2>(v);
}

// packed[t * NV * lanes + c] = x[c * ldx + t] for t < n and c < NV * lanes, zero for c >= channels:
// a [channels, n] block of a tile turned pixel-major, whole vectors by register transposes.
template <typename T, int NV>
inline void pack_transposed(const T* x, int64_t ldx, int channels, int64_t n, T* packed) {
  using V = vec_t<T>;
  constexpr int W = static_cast<int>(kLanes<T>);
  constexpr int64_t width = NV * W;
  const int full_vectors = channels / W;
  const int64_t full_pixels = n / W * W;
  for (int j = 0; j < full_vectors; ++j) {
    for (int64_t t0 = 0; t0 < full_pixels; t0 += W) {
      V v[W];
#pragma GCC unroll 16
      for (int r = 0; r < W; ++r) v[r] = load_vec(x + (j * W + r) * ldx + t0);
      transpose_block<T>(v);
#pragma GCC unroll 16
      for (int r = 0; r < W; ++r) store_vec(packed + (t0 + r) * width + j * W, v[r]);
    }
  }
  for (int64_t t = 0; t < n; ++t) {  // the channels of a partial last vector, and the last n % lanes pixels
    for (int c = t < full_pixels ? full_vectors * W : 0; c < width; ++c)
      packed[t * width + c] = c < channels ? x[c * ldx + t] : T(0);
  }
}

// Scratch that add_rows_by_tile_t needs for tiles of up to n pixels.
template <typename T>
constexpr int64_t transposed_block_size(int64_t n) {
  return n * kBlockVectors * kLanes<T>;
}

// out[m, c] += sum_t w[m, t] x[c, t] for m < rows, c < channels, t < n (w: [rows, n] with row stride
// ldw; x: a [C, n] tile with row stride ldx; out: [rows, C] with row stride ldo): the key and value
// gradients, reductions over the pixels of a tile. Each block of channels is transposed once into
// packed (transposed_block_size<T>(n) values), and the register blocks then run over the pixels
// with channels along the vectors, like the other products. Reducing along the pixels instead (one
// transposing sum per block of outputs) cost as much at 512-pixel tiles and more on shorter ones:
// 1024 x 16 x 16 backward about 12% and 2048 x 8 x 8 about 35% slower (B = 16, 2 threads).
template <typename T>
void add_rows_by_tile_t(const T* w, int64_t ldw, int64_t rows, const T* x, int64_t ldx, int64_t channels,
                        int64_t n, T* out, int64_t ldo, T* packed) {
  constexpr int64_t W = kLanes<T>;
  for (int64_t c0 = 0; c0 < channels; c0 += kBlockVectors * W) {
    const int cb = static_cast<int>(std::min<int64_t>(kBlockVectors * W, channels - c0));
    with_block_size<kBlockVectors>(static_cast<int>((cb + W - 1) / W), [&](auto nv) {
      constexpr int NV = decltype(nv)::value;
      pack_transposed<T, NV>(x + c0 * ldx, ldx, cb, n, packed);
      for (int64_t m0 = 0; m0 < rows; m0 += kRowBlock) {
        with_block_size<kRowBlock>(static_cast<int>(std::min<int64_t>(kRowBlock, rows - m0)), [&](auto mb) {
          constexpr int MB = decltype(mb)::value;
          vec_t<T> acc[MB][NV] = {};
          add_outer_products<T, MB, NV>(acc, w + m0 * ldw, ldw, packed, NV * W, n);
#pragma GCC unroll 8
          for (int i = 0; i < MB; ++i) {
            T* o = out + (m0 + i) * ldo + c0;
            if (cb == NV * W) {
#pragma GCC unroll 8
              for (int j = 0; j < NV; ++j) store_vec(o + j * W, load_vec(o + j * W) + acc[i][j]);
            } else {
              for (int c = 0; c < cb; ++c) o[c] += acc[i][c / W][c % W];
            }
          }
        });
      }
    });
  }
}

}  // namespace memkd::cpu
