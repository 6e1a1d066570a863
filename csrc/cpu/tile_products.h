// Register-blocked products between the small [M, C] memory matrices (keys, values) and [C, n]
// pixel tiles whose pixels are contiguous (row c of a tile starts at data + c * ld). They read the
// tiles where they lie and write the results where they belong: no packing copies and no zeroing
// pass over the output, which together took a quarter of the BLAS-based forward (perf, 1024 x 256
// px tiles). The per-pixel sums of squares for the query norms ride along with the first block of
// the score product instead of taking a pass of their own.
//
// Written with GCC/Clang vector extensions so that one source serves AVX-512 (32 registers: 5 x 4
// accumulators of 16 floats) and AVX2 or narrower (16 registers: 4 x 3 accumulators).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <type_traits>
#include <utility>

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
};
template <>
struct VectorOf<double> {
  typedef double type __attribute__((vector_size(kVectorBytes)));
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

// A store that skips the cache where the target is vector-aligned: the output tiles are written
// once, and reading their lines in first (write-allocate) cost more than the stores themselves.
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

// out[m, t] = sum_c a[m * lda + c] * x[c * NV * lanes + t] for m < MB, t < NV * lanes (x packed).
template <typename T, int MB, int NV>
inline void rows_by_packed_block(const T* a, int64_t lda, const T* x, int64_t channels, T* out, int64_t ldo) {
  using V = vec_t<T>;
  constexpr int64_t W = kLanes<T>;
  V acc[MB][NV] = {};
  for (int64_t c = 0; c < channels; ++c) {
    V xv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) xv[j] = load_vec(x + (c * NV + j) * W);
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const V ai = broadcast(a[i * lda + c]);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] += ai * xv[j];
    }
  }
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
  int64_t t0 = 0;
  for (; t0 + kPixelVectors * W <= n; t0 += kPixelVectors * W)
    pixel_block(t0, std::integral_constant<int, kPixelVectors>{});
  if (const int64_t vectors = (n - t0) / W; vectors > 0) {
    with_block_size<kPixelVectors>(static_cast<int>(vectors), [&](auto nv) { pixel_block(t0, nv); });
    t0 += vectors * W;
  }
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
    // Start from the radial term rather than subtracting it at the end: there its loads would sit
    // among this block's stores to the same offsets of another [C, n] tile, which 4 KiB aliasing
    // turns into stalls.
#pragma GCC unroll 8
    for (int i = 0; i < CB; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] = -load_vec(x + i * ldx + j * W) * load_vec(coef + j * W);
  }
  for (int64_t m = 0; m < rows; ++m) {
    V wv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) wv[j] = load_vec(w + m * ldw + j * W);
#pragma GCC unroll 8
    for (int i = 0; i < CB; ++i) {
      const V ai = broadcast(a[i * lda + m]);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] += ai * wv[j];
    }
  }
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
  constexpr int64_t W = kLanes<T>;
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
  int64_t t0 = 0;
  for (; t0 + kPixelVectors * W <= n; t0 += kPixelVectors * W)
    pixel_block(t0, std::integral_constant<int, kPixelVectors>{});
  if (const int64_t vectors = (n - t0) / W; vectors > 0) {
    with_block_size<kPixelVectors>(static_cast<int>(vectors), [&](auto nv) { pixel_block(t0, nv); });
    t0 += vectors * W;
  }
  for (int64_t t = t0; t < n; ++t)
    for (int64_t c = 0; c < channels; ++c) {
      T s = 0;
      for (int64_t m = 0; m < rows; ++m) s += a[c * lda + m] * w[m * ldw + t];
      out[c * ldo + t] = coef != nullptr ? s - x[c * ldx + t] * coef[t] : s;
    }
  _mm_sfence();  // order the streamed stores before whatever reads the tile next
}

}  // namespace memkd::cpu
