// Register-blocked products between the small [L, C] memory matrices (keys, values) and [C, n]
// pixel tiles whose pixels are contiguous (row c of a tile starts at data + c * ld), written for
// NR recall's shapes (L = 50, C = 256..2048, n = 256..512) instead of calling BLAS per tile:
// - rows_by_tile ([L, C] x [C, n] -> [L, n], the scores): each 64-pixel block of the tile is copied
//   once into a contiguous buffer and reused for every block of memory rows; the query's sums of
//   squares come out of that copy, so the norms take no pass of their own.
// - cols_by_rows ([C, L] x [L, n] -> [C, n], the output and the query gradient): written straight
//   into the map with streaming stores, optionally starting from the normalisation-backward term.
// - add_rows_by_tile_t ([L, n] x [n, C] accumulated into [L, C], the key and value gradients):
//   both operands are read along their contiguous pixels, so nothing is transposed.
// BLAS spent a quarter of the forward packing the tiles and zeroing the output, and copied the
// tile again for every gradient product (perf, 1024 x 16 x 16).
//
// One source serves AVX-512 (32 registers: 5 x 4 accumulators of 16 floats), AVX2 (16 registers:
// 4 x 3 accumulators of 8 floats) and narrower targets, through GCC/Clang vector extensions.
#pragma once
#include <algorithm>
#include <bit>
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
constexpr int kPixelVectors = 4;  // pixel vectors per register block
#else
constexpr int kVectorBytes = 32;
constexpr int kRowBlock = 4;
constexpr int kPixelVectors = 3;
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

// The value, pinned to a register: GCC otherwise folds a load into every product that uses it, and
// a block that reuses each loaded vector several times then waits on loads instead of arithmetic.
template <typename V>
inline V in_register(V v) {
#if defined(__AVX__)  // where one register holds kVectorBytes
  asm("" : "+v"(v));
#endif
  return v;
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
// kPixelVectors vectors, the last one shorter; returns where the pixels that fill no vector start.
template <typename T, typename F>
inline int64_t for_each_pixel_block(int64_t n, const F& block) {
  constexpr int64_t W = kLanes<T>;
  int64_t t0 = 0;
  for (; t0 + kPixelVectors * W <= n; t0 += kPixelVectors * W) block(t0, std::integral_constant<int, kPixelVectors>{});
  if (const int64_t vectors = (n - t0) / W; vectors > 0) {
    with_block_size<kPixelVectors>(static_cast<int>(vectors), [&](auto nv) { block(t0, nv); });
    t0 += vectors * W;
  }
  return t0;
}

// acc[i][j] += a[i * lda + k] * (the vector at v + k * ldv + j * lanes) for k < depth: the inner
// loop of both tile-producing products, R broadcasts times NV vectors per step.
template <typename T, int R, int NV>
inline void add_outer_products(vec_t<T> (&acc)[R][NV], const T* a, int64_t lda, const T* v, int64_t ldv,
                               int64_t depth) {
  using V = vec_t<T>;
  constexpr int64_t W = kLanes<T>;
  for (int64_t k = 0; k < depth; ++k) {
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

// out[m, t] = sum_c a[m * lda + c] * x[c * NV * lanes + t] for m < MB, t < NV * lanes (x packed).
template <typename T, int MB, int NV>
inline void rows_by_packed_block(const T* a, int64_t lda, const T* x, int64_t channels, T* out, int64_t ldo) {
  using V = vec_t<T>;
  constexpr int64_t W = kLanes<T>;
  V acc[MB][NV] = {};
  add_outer_products<T, MB, NV>(acc, a, lda, x, NV * W, channels);
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
  return channels * kPixelVectors * kLanes<T>;
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
      with_block_size<kRowBlock>(static_cast<int>(std::min<int64_t>(kRowBlock, rows - m0)), [&](auto mb) {
        rows_by_packed_block<T, decltype(mb)::value, NV>(a + m0 * lda, lda, packed, channels, out + m0 * ldo + t0, ldo);
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

// One level of a transposing sum: lane i of the result adds the two halves of block i / (2 H) of
// a (lanes whose position in their 2 H block is < H) or of b (the others).
template <typename T, int H, int... I>
inline vec_t<T> fold_pair(const vec_t<T>& a, const vec_t<T>& b, std::integer_sequence<int, I...>) {
  constexpr int N = sizeof...(I);
  constexpr auto low = [](int i) { const int base = i / (2 * H) * 2 * H, w = i % (2 * H); return w < H ? base + w : N + base + w - H; };
#if defined(__clang__)
  return __builtin_shufflevector(a, b, low(I)...) + __builtin_shufflevector(a, b, (low(I) + H)...);
#else  // GCC before 12 lacks __builtin_shufflevector
  using Mask = typename VectorOf<T>::index_type;
  return __builtin_shuffle(a, b, Mask{low(I)...}) + __builtin_shuffle(a, b, Mask{(low(I) + H)...});
#endif
}

template <typename T, int H>
inline void fold_level(vec_t<T>* v) {
  constexpr int N = kLanes<T>;
#pragma GCC unroll 16
  for (int k = 0; k < H; ++k) v[k] = fold_pair<T, H>(v[2 * k], v[2 * k + 1], std::make_integer_sequence<int, N>{});
  if constexpr (H > 1) fold_level<T, H / 2>(v);
}

constexpr int bit_reverse(int i, int bits) {
  int r = 0;
  for (int b = 0; b < bits; ++b) r |= ((i >> b) & 1) << (bits - 1 - b);
  return r;
}

// Lane k of the result is the sum of the lanes of v[k]: log2(lanes) levels of shuffles and adds
// instead of one horizontal reduction per vector. The levels leave the sums in bit-reversed order,
// so the inputs go in bit-reversed order too.
template <typename T>
inline vec_t<T> transposing_sum(const vec_t<T>* v) {
  constexpr int N = kLanes<T>, bits = std::countr_zero(static_cast<unsigned>(N));
  vec_t<T> u[N];
#pragma GCC unroll 16
  for (int k = 0; k < N; ++k) u[bit_reverse(k, bits)] = v[k];
  fold_level<T, N / 2>(u);
  return u[0];
}

// Channels per block of add_rows_by_tile_t; its rows per block make up one vector of results.
constexpr int kReducedChannels = 4;

template <typename T>
struct RowOf;
template <>
struct RowOf<float> {
  typedef float type __attribute__((vector_size(kReducedChannels * sizeof(float))));
};
template <>
struct RowOf<double> {
  typedef double type __attribute__((vector_size(kReducedChannels * sizeof(double))));
};

// out[i * ldo + j] += sums[i * kReducedChannels + j] for every row i of the block, a short vector each.
template <typename T, int... I>
inline void add_block_rows(const vec_t<T>& sums, T* out, int64_t ldo, std::integer_sequence<int, I...>) {
  using Row = typename RowOf<T>::type;
  const auto add_row = [&](T* dst, Row r) {
    Row current;
    std::memcpy(&current, dst, sizeof(Row));
    current += r;
    std::memcpy(dst, &current, sizeof(Row));
  };
  const auto row_of_sums = [&](int i) {
    Row r;
    std::memcpy(&r, reinterpret_cast<const T*>(&sums) + i * kReducedChannels, sizeof(Row));
    return r;
  };
  (add_row(out + I * ldo, row_of_sums(I)), ...);
}

template <typename T, int MB, int CB>
inline void add_rows_by_tile_t_block(const T* w, int64_t ldw, const T* x, int64_t ldx, int64_t vectors,
                                     T* out, int64_t ldo) {
  using V = vec_t<T>;
  constexpr int64_t W = kLanes<T>;
  constexpr int full_rows = W / kReducedChannels;
  V acc[full_rows * kReducedChannels] = {};
  for (int64_t k = 0; k < vectors; ++k) {
    V wv[MB], xv[CB];
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) wv[i] = in_register(load_vec(w + i * ldw + k * W));
#pragma GCC unroll 8
    for (int j = 0; j < CB; ++j) xv[j] = in_register(load_vec(x + j * ldx + k * W));
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < CB; ++j) acc[i * kReducedChannels + j] += wv[i] * xv[j];
  }
  const V sums = transposing_sum<T>(acc);
  if constexpr (CB == kReducedChannels) {
    add_block_rows<T>(sums, out, ldo, std::make_integer_sequence<int, MB>{});
  } else {
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < CB; ++j) out[i * ldo + j] += sums[i * kReducedChannels + j];
  }
}

// out[m, c] += sum_t w[m, t] x[c, t] for m < rows, c < channels, t < n (w: [rows, n] with row stride
// ldw; x: a [C, n] tile with row stride ldx; out: [rows, C] with row stride ldo): the key and value
// gradients, reductions over the pixels of a tile. Both operands are read along their contiguous
// pixels, so nothing is transposed or packed; each block ends in one transposing sum.
template <typename T>
void add_rows_by_tile_t(const T* w, int64_t ldw, int64_t rows, const T* x, int64_t ldx, int64_t channels,
                        int64_t n, T* out, int64_t ldo) {
  constexpr int64_t W = kLanes<T>;
  constexpr int full_rows = W / kReducedChannels;
  const int64_t vectors = n / W;
  if (vectors > 0) {
    for (int64_t c0 = 0; c0 < channels; c0 += kReducedChannels) {
      const int cb = static_cast<int>(std::min<int64_t>(kReducedChannels, channels - c0));
      for (int64_t m0 = 0; m0 < rows; m0 += full_rows) {
        const int mb = static_cast<int>(std::min<int64_t>(full_rows, rows - m0));
        with_block_size<full_rows>(mb, [&](auto mbc) {
          with_block_size<kReducedChannels>(cb, [&](auto cbc) {
            add_rows_by_tile_t_block<T, decltype(mbc)::value, decltype(cbc)::value>(
                w + m0 * ldw, ldw, x + c0 * ldx, ldx, vectors, out + m0 * ldo + c0, ldo);
          });
        });
      }
    }
  }
  for (int64_t m = 0; m < rows; ++m)  // the last n % lanes pixels
    for (int64_t c = 0; c < channels; ++c) {
      T s = 0;
      for (int64_t t = vectors * W; t < n; ++t) s += w[m * ldw + t] * x[c * ldx + t];
      out[m * ldo + c] += s;
    }
}

}  // namespace memkd::cpu
