// CUDA kernels of memkd::nr_recall and memkd::nr_recall_backward: kernels, launchers and entry points.
//
// Forward, one block of 256 threads per (image, tile of TP pixels):
//   pass 1 over C in chunks of CC channels: the query tile and the normalised keys chunk are staged
//     in shared memory (acc type), the [L, TP] scores kh . q and the query norms accumulate in
//     shared memory / registers;
//   softmax over L of scores / max(|q|, EPS), per pixel, in shared memory;
//   pass 2 over C: values chunk in shared memory, out[c, p] = sum_l V[l, c] W[l, p] staged in
//     shared memory and stored in the query's layout.
// Backward, persistent blocks each owning a fixed list of tiles and one fp32/fp64 partial slot:
//   recompute the scores (pass over q) and dW = V dO (pass over dO); softmax; dS = W (dW - sum W dW);
//   projection qh . dqh = sum_l dS S, so that a single further pass over C gives
//   dq = kh^T dS / max(|q|, EPS) - q (qh . dqh) / max(|q|, EPS)^2 (masked where |q| < EPS) and the
//   slot's dK-hat += dS qh^T and dV += W dO^T; a second kernel sums the slots in slot order
//   (bitwise reproducible), and the keys' normalisation Jacobian is applied on the [L, C] result.
// Inner products read shared memory with 16-byte vector loads along C (tiles are stored
// pixel-major with a padded row of CC + 4), and [L, TP] matrices use a row of TP + 1 to avoid bank
// conflicts. L too large for shared memory falls back to a composite of ATen ops.
//
// Entry points check their arguments (csrc/ops/checks.h), require CUDA tensors on one device, and
// run on that device's current stream.
#include <torch/library.h>

#include "common.cuh"

namespace memkd::cuda {
namespace {

// Shared-memory plan of the recall kernels, in acc_t elements; the same on host and device.
struct RecallSmem {
  int x = 0, g = 0, o = 0, rows = 0, s = 0, w = 0, ds = 0, red = 0, norm = 0, coef = 0, total = 0;

  MEMKD_HOST_DEVICE RecallSmem(int tp, int cc, int items, bool backward) {
    int at = 0;
    x = at, at += round4(tp * (cc + 4));  // pixel-major query tile (forward: also the output staging)
    if (backward) {
      g = at, at += round4(tp * (cc + 4));  // pixel-major grad_out tile
      o = at, at += round4(cc * (tp + 1));  // channel-major grad_query staging
    }
    rows = at, at += round4(items * (cc + 4));  // keys-hat or values chunk, [L][CC + 4]
    if (backward) s = at, at += round4(items * (tp + 1));  // scaled scores kh . qh
    w = at, at += round4(items * (tp + 1));                  // scores, then weights
    if (backward) ds = at, at += round4(items * (tp + 1));   // dW, then dS / max(|q|, EPS)
    red = at, at += round4(2 * kThreads);                    // column reductions
    norm = at, at += round4(tp);                             // |q| per pixel
    if (backward) coef = at, at += round4(tp);               // (qh . dqh) / max(|q|, EPS)^2
    total = at;
  }
};

// Channels per chunk for a pixel tile (the product kernels need CC / 4 to be a multiple of
// kThreads / min(TP, 32)).
constexpr int forward_chunk(int) { return 64; }
constexpr int backward_chunk(int tp) { return tp >= 32 ? 32 : 64; }

// s_acc[l][p] = sum_c rows[l, c] x(b, c, p0 + p) over all C (row stride TP + 1), streaming x and
// rows through shared memory in chunks of CC channels. With NORMS also s_norm[p] = |x(b, :, p0 + p)|.
// Ends with a barrier. Pixels and channels out of range count as zeros.
template <int TP, int CC, bool NORMS, typename scalar_t, typename acc_t>
MEMKD_DEVICE void project_onto_rows(const scalar_t* __restrict__ x, const Layout& xl, int64_t b, int64_t p0,
                                    int64_t P, int64_t C, const acc_t* __restrict__ rows, int L, acc_t* s_x,
                                    acc_t* s_rows, acc_t* s_acc, acc_t* s_norm) {
  constexpr int PL = TP < 32 ? TP : 32, PPT = TP / PL, RL = kThreads / PL, RMAX = 8;
  constexpr int LDX = CC + 4, LDA = TP + 1;
  static_assert(TP % PL == 0 && CC % 4 == 0, "tile shape");
  const int tid = threadIdx.x, pl = tid % PL, rl = tid / PL;
  acc_t sumsq[PPT];
#pragma unroll
  for (int j = 0; j < PPT; ++j) sumsq[j] = acc_t(0);

  for (int64_t c0 = 0; c0 < C; c0 += CC) {
    __syncthreads();  // the previous chunk is consumed
    load_tile<TP, CC, true>(x, xl, b, p0, P, c0, C, s_x, LDX);
    load_rows<CC>(rows, L, C, c0, s_rows, LDX);
    __syncthreads();
    // Thread (pl, rl) owns pixels pl + PL * j and rows l0 + rl + RL * r of the [L, TP] result.
    for (int l0 = 0; l0 < L; l0 += RL * RMAX) {
      acc_t a[RMAX][PPT];
#pragma unroll
      for (int r = 0; r < RMAX; ++r) {
        const int l = l0 + rl + RL * r;
#pragma unroll
        for (int j = 0; j < PPT; ++j) a[r][j] = (c0 > 0 && l < L) ? s_acc[l * LDA + pl + PL * j] : acc_t(0);
      }
#pragma unroll 2
      for (int c = 0; c < CC; c += 4) {
        acc_t xv[PPT][4];
#pragma unroll
        for (int j = 0; j < PPT; ++j) load4(s_x + (pl + PL * j) * LDX + c, xv[j]);
        if (NORMS && rl == 0 && l0 == 0) {
#pragma unroll
          for (int j = 0; j < PPT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) sumsq[j] += xv[j][e] * xv[j][e];
        }
#pragma unroll
        for (int r = 0; r < RMAX; ++r) {
          const int l = l0 + rl + RL * r;
          if (l < L) {
            acc_t kv[4];
            load4(s_rows + l * LDX + c, kv);
#pragma unroll
            for (int e = 0; e < 4; ++e)
#pragma unroll
              for (int j = 0; j < PPT; ++j) a[r][j] += kv[e] * xv[j][e];
          }
        }
      }
#pragma unroll
      for (int r = 0; r < RMAX; ++r) {
        const int l = l0 + rl + RL * r;
        if (l < L) {
#pragma unroll
          for (int j = 0; j < PPT; ++j) s_acc[l * LDA + pl + PL * j] = a[r][j];
        }
      }
    }
  }
  if (NORMS && rl == 0) {
#pragma unroll
    for (int j = 0; j < PPT; ++j) s_norm[pl + PL * j] = dev_sqrt(sumsq[j]);
  }
  __syncthreads();
}

// Per pixel p: s_scores[l][p] *= 1 / max(s_norm[p], EPS) (kept) and s_weights[l][p] = softmax over
// l of the scaled scores (s_weights may alias s_scores). Thread (g, p) handles rows g, g + G, ...;
// the column max and sum are combined over the G groups in a fixed order. Ends with a barrier.
template <int TP, typename acc_t>
MEMKD_DEVICE void column_softmax(acc_t* s_scores, acc_t* s_weights, const acc_t* s_norm, int L, acc_t* s_red) {
  constexpr int G = kThreads / TP, LDA = TP + 1;
  const int tid = threadIdx.x, p = tid % TP, g = tid / TP;
  const acc_t inv = acc_t(1) / dev_max(s_norm[p], acc_t(kEps));
  acc_t m = neg_infinity<acc_t>();
  for (int l = g; l < L; l += G) {
    const acc_t s = s_scores[l * LDA + p] * inv;
    s_scores[l * LDA + p] = s;
    m = dev_max(m, s);
  }
  s_red[g * TP + p] = m;
  __syncthreads();
  m = s_red[p];
#pragma unroll
  for (int k = 1; k < G; ++k) m = dev_max(m, s_red[k * TP + p]);
  acc_t sum = acc_t(0);
  for (int l = g; l < L; l += G) {
    const acc_t e = dev_exp(s_scores[l * LDA + p] - m);
    s_weights[l * LDA + p] = e;
    sum += e;
  }
  s_red[kThreads + g * TP + p] = sum;
  __syncthreads();
  sum = s_red[kThreads + p];
#pragma unroll
  for (int k = 1; k < G; ++k) sum += s_red[kThreads + k * TP + p];
  const acc_t r = acc_t(1) / sum;
  for (int l = g; l < L; l += G) s_weights[l * LDA + p] *= r;
  __syncthreads();
}

// s_o[c][p] (row stride TP + 1) = fix(c, p, sum_l s_rows[l][c] * s_m[l][p]) for the CC x TP tile.
// Thread (pl, cl) owns pixels pl + PL * j and the channel quads cl + CLN * i.
template <int TP, int CC, typename acc_t, typename Fix>
MEMKD_DEVICE void rows_times_matrix(const acc_t* s_rows, const acc_t* s_m, int L, acc_t* s_o, Fix fix) {
  constexpr int PL = TP < 32 ? TP : 32, PPT = TP / PL, CLN = kThreads / PL, NG = CC / 4 / CLN;
  static_assert(NG >= 1 && (CC / 4) % CLN == 0, "channel chunk too small for the pixel tile");
  constexpr int LDR = CC + 4, LDA = TP + 1;
  const int tid = threadIdx.x, pl = tid % PL, cl = tid / PL;
  acc_t o[NG][4][PPT];
#pragma unroll
  for (int i = 0; i < NG; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e)
#pragma unroll
      for (int j = 0; j < PPT; ++j) o[i][e][j] = acc_t(0);
  for (int l = 0; l < L; ++l) {
    acc_t w[PPT];
#pragma unroll
    for (int j = 0; j < PPT; ++j) w[j] = s_m[l * LDA + pl + PL * j];
#pragma unroll
    for (int i = 0; i < NG; ++i) {
      acc_t v[4];
      load4(s_rows + l * LDR + 4 * (cl + CLN * i), v);
#pragma unroll
      for (int e = 0; e < 4; ++e)
#pragma unroll
        for (int j = 0; j < PPT; ++j) o[i][e][j] += v[e] * w[j];
    }
  }
#pragma unroll
  for (int i = 0; i < NG; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e)
#pragma unroll
      for (int j = 0; j < PPT; ++j) {
        const int c = 4 * (cl + CLN * i) + e, p = pl + PL * j;
        s_o[c * LDA + p] = fix(c, p, o[i][e][j]);
      }
}

// The slot's dK-hat and dV for channels c0 .. c0 + CC of this tile:
//   part_k[l, c0 + c] (+)= sum_p s_ds[l][p] s_x[p][c],  part_v[l, c0 + c] (+)= sum_p s_w[l][p] s_g[p][c]
// written (first tile of the slot) or accumulated. Thread (cg, rl) owns channels 4 cg .. 4 cg + 3 and
// rows l0 + rl + RLN * r, always the same for a given thread, so the read-modify-write is race free.
template <int TP, int CC, typename acc_t>
MEMKD_DEVICE void accumulate_item_grads(const acc_t* s_ds, const acc_t* s_w, const acc_t* s_x, const acc_t* s_g,
                                        int L, int64_t C, int64_t c0, acc_t* __restrict__ part_k,
                                        acc_t* __restrict__ part_v, bool first) {
  constexpr int CG = CC / 4, RLN = kThreads / CG, RB = RLN >= 64 ? 1 : 64 / RLN;
  constexpr int LDX = CC + 4, LDA = TP + 1;
  const int tid = threadIdx.x, cg = tid % CG, rl = tid / CG;
  for (int l0 = 0; l0 < L; l0 += RLN * RB) {
    acc_t ak[RB][4], av[RB][4];
#pragma unroll
    for (int r = 0; r < RB; ++r)
#pragma unroll
      for (int e = 0; e < 4; ++e) ak[r][e] = av[r][e] = acc_t(0);
    for (int p = 0; p < TP; ++p) {
      acc_t xv[4], gv[4];
      load4(s_x + p * LDX + 4 * cg, xv);
      load4(s_g + p * LDX + 4 * cg, gv);
#pragma unroll
      for (int r = 0; r < RB; ++r) {
        const int l = l0 + rl + RLN * r;
        if (l < L) {
          const acc_t ds = s_ds[l * LDA + p], w = s_w[l * LDA + p];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            ak[r][e] += ds * xv[e];
            av[r][e] += w * gv[e];
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < RB; ++r) {
      const int l = l0 + rl + RLN * r;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t c = c0 + 4 * cg + e;
        if (l < L && c < C) {
          const int64_t at = l * C + c;
          part_k[at] = first ? ak[r][e] : part_k[at] + ak[r][e];
          part_v[at] = first ? av[r][e] : part_v[at] + av[r][e];
        }
      }
    }
  }
}

template <int TP, int CC, typename scalar_t, typename acc_t>
MEMKD_GLOBAL void nr_recall_forward_kernel(const scalar_t* __restrict__ query, Layout ql, scalar_t* __restrict__ out,
                                           Layout ol, const acc_t* __restrict__ keys_hat,
                                           const acc_t* __restrict__ values, int L, int64_t C, int64_t P,
                                           int64_t tiles_per_image) {
  MEMKD_SHARED_MEMORY(smem_raw);
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const RecallSmem plan(TP, CC, L, false);
  static_assert(TP * (CC + 4) >= CC * (TP + 1), "the output staging must fit the query tile");
  acc_t *s_x = smem + plan.x, *s_rows = smem + plan.rows, *s_w = smem + plan.w;
  acc_t *s_red = smem + plan.red, *s_norm = smem + plan.norm;
  const int64_t b = blockIdx.x / tiles_per_image, p0 = (blockIdx.x % tiles_per_image) * TP;

  project_onto_rows<TP, CC, true>(query, ql, b, p0, P, C, keys_hat, L, s_x, s_rows, s_w, s_norm);
  column_softmax<TP>(s_w, s_w, s_norm, L, s_red);
  acc_t* s_o = s_x;  // the query tile is dead from here on
  for (int64_t c0 = 0; c0 < C; c0 += CC) {
    __syncthreads();  // the previous output chunk is stored
    load_rows<CC>(values, L, C, c0, s_rows, CC + 4);
    __syncthreads();
    rows_times_matrix<TP, CC>(s_rows, s_w, L, s_o, [](int, int, acc_t v) { return v; });
    __syncthreads();
    store_tile<TP, CC>(out, ol, b, p0, P, c0, C, [&](int c, int p) { return s_o[c * (TP + 1) + p]; });
  }
}

template <int TP, int CC, typename scalar_t, typename acc_t>
MEMKD_GLOBAL void nr_recall_backward_kernel(const scalar_t* __restrict__ grad_out, Layout gl,
                                            const scalar_t* __restrict__ query, Layout ql,
                                            scalar_t* __restrict__ grad_query, Layout dql,
                                            const acc_t* __restrict__ keys_hat, const acc_t* __restrict__ values,
                                            int L, int64_t C, int64_t P, int64_t tiles_per_image, int64_t tiles,
                                            acc_t* __restrict__ part_keys, acc_t* __restrict__ part_values) {
  constexpr int G = kThreads / TP, LDA = TP + 1, LDX = CC + 4;
  MEMKD_SHARED_MEMORY(smem_raw);
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const RecallSmem plan(TP, CC, L, true);
  acc_t *s_x = smem + plan.x, *s_g = smem + plan.g, *s_o = smem + plan.o, *s_rows = smem + plan.rows;
  acc_t *s_s = smem + plan.s, *s_w = smem + plan.w, *s_ds = smem + plan.ds, *s_red = smem + plan.red;
  acc_t *s_norm = smem + plan.norm, *s_coef = smem + plan.coef;
  acc_t* part_k = part_keys + static_cast<int64_t>(blockIdx.x) * L * C;
  acc_t* part_v = part_values + static_cast<int64_t>(blockIdx.x) * L * C;
  const int tid = threadIdx.x, p = tid % TP, g = tid / TP;

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const bool first = tile == blockIdx.x;
    const int64_t b = tile / tiles_per_image, p0 = (tile % tiles_per_image) * TP;
    // Scores kh . q with |q|, and dW = V dO, both [L, TP].
    project_onto_rows<TP, CC, true>(query, ql, b, p0, P, C, keys_hat, L, s_x, s_rows, s_s, s_norm);
    project_onto_rows<TP, CC, false>(grad_out, gl, b, p0, P, C, values, L, s_g, s_rows, s_ds, s_norm);
    column_softmax<TP>(s_s, s_w, s_norm, L, s_red);
    // dS = W (dW - sum_l W dW); qh . dqh = sum_l dS S; keep dS / max(|q|, EPS).
    const acc_t norm = s_norm[p];
    const acc_t inv = acc_t(1) / dev_max(norm, acc_t(kEps));
    acc_t part = acc_t(0);
    for (int l = g; l < L; l += G) part += s_w[l * LDA + p] * s_ds[l * LDA + p];
    s_red[g * TP + p] = part;
    __syncthreads();
    acc_t mean = s_red[p];
#pragma unroll
    for (int k = 1; k < G; ++k) mean += s_red[k * TP + p];
    part = acc_t(0);
    for (int l = g; l < L; l += G) {
      const acc_t ds = s_w[l * LDA + p] * (s_ds[l * LDA + p] - mean);
      part += ds * s_s[l * LDA + p];
      s_ds[l * LDA + p] = ds * inv;
    }
    s_red[kThreads + g * TP + p] = part;
    __syncthreads();
    if (g == 0) {
      acc_t proj = s_red[kThreads + p];
#pragma unroll
      for (int k = 1; k < G; ++k) proj += s_red[kThreads + k * TP + p];
      s_coef[p] = norm >= acc_t(kEps) ? proj * inv * inv : acc_t(0);
    }
    // (the first barrier of the chunk loop publishes s_coef and s_ds)
    for (int64_t c0 = 0; c0 < C; c0 += CC) {
      __syncthreads();  // the previous chunk is consumed and its grad_query stored
      load_tile<TP, CC, true>(query, ql, b, p0, P, c0, C, s_x, LDX);
      load_tile<TP, CC, true>(grad_out, gl, b, p0, P, c0, C, s_g, LDX);
      load_rows<CC>(keys_hat, L, C, c0, s_rows, LDX);
      __syncthreads();
      accumulate_item_grads<TP, CC>(s_ds, s_w, s_x, s_g, L, C, c0, part_k, part_v, first);
      // dq = kh^T dS / max(|q|, EPS) - q (qh . dqh) / max(|q|, EPS)^2
      rows_times_matrix<TP, CC>(s_rows, s_ds, L, s_o,
                                [&](int c, int px, acc_t v) { return v - s_x[px * LDX + c] * s_coef[px]; });
      __syncthreads();
      store_tile<TP, CC>(grad_query, dql, b, p0, P, c0, C, [&](int c, int px) { return s_o[c * LDA + px]; });
    }
  }
}

// out_k[i] = sum over slots s (in order) of part_k[s, i]; likewise out_v.
template <typename acc_t>
MEMKD_GLOBAL void sum_slots_kernel(const acc_t* __restrict__ part_k, const acc_t* __restrict__ part_v,
                                   int64_t slots, int64_t n, acc_t* __restrict__ out_k, acc_t* __restrict__ out_v) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n) return;
  acc_t sk = acc_t(0), sv = acc_t(0);
  for (int64_t s = 0; s < slots; ++s) {
    sk += part_k[s * n + i];
    sv += part_v[s * n + i];
  }
  out_k[i] = sk;
  out_v[i] = sv;
}

// ---- host side -----------------------------------------------------------------------------

constexpr int64_t kMaxKernelItems = 1 << 16;          // larger L always takes the composite path
constexpr int64_t kPartialBudgetBytes = 256 << 20;   // cap on the backward's partial slots

template <typename acc_t>
int64_t recall_smem_bytes(int tp, int items, bool backward) {
  const int cc = backward ? backward_chunk(tp) : forward_chunk(tp);
  return static_cast<int64_t>(RecallSmem(tp, cc, items, backward).total) * static_cast<int64_t>(sizeof(acc_t));
}

// The widest pixel tile (64, 32, 16) whose shared memory fits and that still gives 2 blocks per
// multiprocessor; else the narrowest that fits; 0 when none does (L too large).
template <typename acc_t>
int choose_pixel_tile(const DeviceInfo& dev, int64_t batch, int64_t pixels, int64_t items, bool backward) {
  if (items > kMaxKernelItems) return 0;
  int narrowest = 0;
  for (int tp : {64, 32, 16}) {
    if (recall_smem_bytes<acc_t>(tp, static_cast<int>(items), backward) > dev.smem_optin) continue;
    narrowest = tp;
    if (batch * ceil_div(pixels, tp) >= 2 * static_cast<int64_t>(dev.sm_count)) return tp;
  }
  return narrowest;
}

// softmax_L(kh q / max(|q|, EPS)) and V^T W with ATen ops, in acc type: [B, C, H, W].
inline at::Tensor recall_forward_composite(const at::Tensor& query, const at::Tensor& keys_hat,
                                           const at::Tensor& values_acc) {
  const int64_t b = query.size(0), c = query.size(1), h = query.size(2), w = query.size(3);
  const at::Tensor q = query.to(keys_hat.scalar_type()).reshape({b, c, h * w});
  const at::Tensor inv = q.norm(2, {1}, true).clamp_min(kEps).reciprocal();
  const at::Tensor weights = at::softmax(at::matmul(keys_hat, q) * inv, 1);
  return at::matmul(values_acc.t(), weights).reshape({b, c, h, w});
}

// memkd.ops.reference.nr_recall_backward's closed form with ATen ops: grad_query [B, C, H, W] and
// the un-normalised [L, C] sums dK-hat and dV, in acc type.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> recall_backward_composite(const at::Tensor& grad_out,
                                                                                const at::Tensor& query,
                                                                                const at::Tensor& keys_hat,
                                                                                const at::Tensor& values_acc) {
  const int64_t b = query.size(0), c = query.size(1), h = query.size(2), w = query.size(3);
  const auto acc = keys_hat.scalar_type();
  const at::Tensor q = query.to(acc).reshape({b, c, h * w});
  const at::Tensor g = grad_out.to(acc).reshape({b, c, h * w});
  const at::Tensor qnorm = q.norm(2, {1}, true);
  const at::Tensor qh = q / qnorm.clamp_min(kEps);
  const at::Tensor weights = at::softmax(at::matmul(keys_hat, qh), 1);
  const at::Tensor grad_values = at::matmul(weights, g.transpose(1, 2)).sum(0);
  const at::Tensor grad_weights = at::matmul(values_acc, g);
  const at::Tensor grad_scores = weights * (grad_weights - (weights * grad_weights).sum(1, true));
  const at::Tensor grad_qh = at::matmul(keys_hat.t(), grad_scores);
  const at::Tensor proj = (qh * grad_qh).sum(1, true) * qnorm.ge(kEps).to(acc);
  const at::Tensor grad_query = (grad_qh - qh * proj) / qnorm.clamp_min(kEps);
  const at::Tensor grad_keys_hat = at::matmul(grad_scores, qh.transpose(1, 2)).sum(0);
  return {grad_query.reshape({b, c, h, w}), grad_keys_hat, grad_values};
}

template <int TP, typename scalar_t, typename acc_t>
void launch_recall_forward(const at::Tensor& query, at::Tensor& out, const at::Tensor& keys_hat,
                           const at::Tensor& values_acc) {
  constexpr int CC = forward_chunk(TP);
  const int64_t batch = query.size(0), channels = query.size(1), pixels = query.size(2) * query.size(3);
  const int items = static_cast<int>(keys_hat.size(0));
  const int64_t tiles_per_image = ceil_div(pixels, TP);
  check_kernel_limits(channels, pixels, batch * tiles_per_image, "nr_recall");
  launch_kernel(nr_recall_forward_kernel<TP, CC, scalar_t, acc_t>, dim3(static_cast<unsigned>(batch * tiles_per_image)),
                recall_smem_bytes<acc_t>(TP, items, false), query.const_data_ptr<scalar_t>(), layout_of(query),
                out.mutable_data_ptr<scalar_t>(), layout_of(out), keys_hat.const_data_ptr<acc_t>(),
                values_acc.const_data_ptr<acc_t>(), items, channels, pixels, tiles_per_image);
}

template <int TP, typename scalar_t, typename acc_t>
void launch_recall_backward(const DeviceInfo& dev, const at::Tensor& grad_out, const at::Tensor& query,
                            at::Tensor& grad_query, const at::Tensor& keys_hat, const at::Tensor& values_acc,
                            at::Tensor& grad_keys_hat, at::Tensor& grad_values) {
  constexpr int CC = backward_chunk(TP);
  const int64_t batch = query.size(0), channels = query.size(1), pixels = query.size(2) * query.size(3);
  const int items = static_cast<int>(keys_hat.size(0));
  const int64_t tiles_per_image = ceil_div(pixels, TP), tiles = batch * tiles_per_image;
  check_kernel_limits(channels, pixels, tiles, "nr_recall_backward");
  const int64_t smem = recall_smem_bytes<acc_t>(TP, items, true);
  // One wave of persistent blocks, each with its own partial slot, within the memory budget.
  const int64_t slot_bytes = 2 * items * channels * static_cast<int64_t>(sizeof(acc_t));
  const int64_t wave = static_cast<int64_t>(dev.sm_count) * blocks_per_sm(dev, smem);
  const int64_t slots = std::min(tiles, std::max<int64_t>(dev.sm_count, std::min(wave, kPartialBudgetBytes / slot_bytes)));
  const auto opts = keys_hat.options();
  at::Tensor part_k = at::empty({slots, items, channels}, opts);
  at::Tensor part_v = at::empty({slots, items, channels}, opts);
  launch_kernel(nr_recall_backward_kernel<TP, CC, scalar_t, acc_t>, dim3(static_cast<unsigned>(slots)), smem,
                grad_out.const_data_ptr<scalar_t>(), layout_of(grad_out), query.const_data_ptr<scalar_t>(),
                layout_of(query), grad_query.mutable_data_ptr<scalar_t>(), layout_of(grad_query),
                keys_hat.const_data_ptr<acc_t>(), values_acc.const_data_ptr<acc_t>(), items, channels, pixels,
                tiles_per_image, tiles, part_k.mutable_data_ptr<acc_t>(), part_v.mutable_data_ptr<acc_t>());
  grad_keys_hat = at::empty({items, channels}, opts);
  grad_values = at::empty({items, channels}, opts);
  const int64_t n = items * channels;
  launch_kernel(sum_slots_kernel<acc_t>, dim3(static_cast<unsigned>(ceil_div(n, kThreads))), 0,
                part_k.const_data_ptr<acc_t>(), part_v.const_data_ptr<acc_t>(), slots, n,
                grad_keys_hat.mutable_data_ptr<acc_t>(), grad_values.mutable_data_ptr<acc_t>());
}

// Arguments are checked by the caller; query, keys and values are on one device.
inline at::Tensor nr_recall_forward_impl(const at::Tensor& query_arg, const at::Tensor& keys,
                                         const at::Tensor& values) {
  const at::Tensor query = dense_feature_map(query_arg);
  at::Tensor out = at::empty_like(query);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "nr_recall_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto acc = acc_scalar_type<acc_t>();
    const at::Tensor keys_acc = keys.to(acc);
    const at::Tensor keys_hat = (keys_acc / keys_acc.norm(2, {1}, true).clamp_min(kEps)).contiguous();
    const at::Tensor values_acc = values.to(acc).contiguous();
    const DeviceInfo dev = device_info();
    const int64_t pixels = query.size(2) * query.size(3);
    switch (choose_pixel_tile<acc_t>(dev, query.size(0), pixels, keys.size(0), false)) {
      case 64: launch_recall_forward<64, scalar_t, acc_t>(query, out, keys_hat, values_acc); break;
      case 32: launch_recall_forward<32, scalar_t, acc_t>(query, out, keys_hat, values_acc); break;
      case 16: launch_recall_forward<16, scalar_t, acc_t>(query, out, keys_hat, values_acc); break;
      default: out.copy_(recall_forward_composite(query, keys_hat, values_acc));
    }
  });
  return out;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> nr_recall_backward_impl(const at::Tensor& grad_out_arg,
                                                                              const at::Tensor& query_arg,
                                                                              const at::Tensor& keys,
                                                                              const at::Tensor& values) {
  const at::Tensor query = dense_feature_map(query_arg);
  const at::Tensor grad_out = dense_feature_map(grad_out_arg);
  at::Tensor grad_query = at::empty_like(query);
  at::Tensor grad_keys, grad_values;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "nr_recall_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto acc = acc_scalar_type<acc_t>();
    const at::Tensor keys_acc = keys.to(acc);
    const at::Tensor key_norms = keys_acc.norm(2, {1}, true);
    const at::Tensor keys_hat = (keys_acc / key_norms.clamp_min(kEps)).contiguous();
    const at::Tensor values_acc = values.to(acc).contiguous();
    const DeviceInfo dev = device_info();
    const int64_t pixels = query.size(2) * query.size(3);
    at::Tensor grad_keys_hat, grad_values_acc;
    switch (choose_pixel_tile<acc_t>(dev, query.size(0), pixels, keys.size(0), true)) {
      case 64:
        launch_recall_backward<64, scalar_t, acc_t>(dev, grad_out, query, grad_query, keys_hat, values_acc,
                                                    grad_keys_hat, grad_values_acc);
        break;
      case 32:
        launch_recall_backward<32, scalar_t, acc_t>(dev, grad_out, query, grad_query, keys_hat, values_acc,
                                                    grad_keys_hat, grad_values_acc);
        break;
      case 16:
        launch_recall_backward<16, scalar_t, acc_t>(dev, grad_out, query, grad_query, keys_hat, values_acc,
                                                    grad_keys_hat, grad_values_acc);
        break;
      default: {
        auto [gq, gk, gv] = recall_backward_composite(grad_out, query, keys_hat, values_acc);
        grad_query.copy_(gq);
        grad_keys_hat = gk;
        grad_values_acc = gv;
      }
    }
    // The keys' normalisation Jacobian (kh - kh (kh . dkh)) / max(|k|, EPS), projection masked where
    // |k| < EPS, exactly as memkd.ops.reference.nr_recall_backward.
    const at::Tensor proj = (keys_hat * grad_keys_hat).sum(1, true) * key_norms.ge(kEps).to(acc);
    grad_keys = ((grad_keys_hat - keys_hat * proj) / key_norms.clamp_min(kEps)).to(keys.scalar_type());
    grad_values = grad_values_acc.to(values.scalar_type());
  });
  return {grad_query, grad_keys, grad_values};
}

// ---- entry points ------------------------------------------------------------------------

at::Tensor nr_recall_cuda(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values) {
  check_nr_recall_args(query, keys, values);  // also: keys and values on query's device
  check_cuda_tensor(query, "query");
  const c10::cuda::CUDAGuard guard(query.device());
  return nr_recall_forward_impl(query, keys, values);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nr_recall_backward_cuda(const at::Tensor& grad_out,
                                                                       const at::Tensor& query,
                                                                       const at::Tensor& keys,
                                                                       const at::Tensor& values) {
  check_nr_recall_backward_args(grad_out, query, keys, values);
  check_cuda_tensor(query, "query");
  const c10::cuda::CUDAGuard guard(query.device());
  return nr_recall_backward_impl(grad_out, query, keys, values);
}

}  // namespace

TORCH_LIBRARY_IMPL(memkd, CUDA, m) {
  m.impl("nr_recall", &nr_recall_cuda);
  m.impl("nr_recall_backward", &nr_recall_backward_cuda);
}

}  // namespace memkd::cuda
