// Fused CPU anomaly map: per image, every stage's cosine distances are upsampled (bilinear,
// align_corners=True) straight into one accumulator, which is blurred with scipy's Gaussian
// (truncate 4.0, 'reflect' borders) in two separable passes; the score is the blurred map's max.
// No per-stage upsampled map is ever materialised. A NaN map pixel makes the score NaN (as the reference).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <memory>
#include <vector>

#include "../ops/checks.h"
#include "feature_tiles.h"

namespace memkd::cpu {
namespace {

// Source taps of bilinear upsampling with align_corners=True, computed as ATen does.
template <typename acc_t>
struct LinearTaps {
  std::vector<int64_t> lo, hi;
  std::vector<acc_t> frac;

  LinearTaps(int64_t in, int64_t out) : lo(out), hi(out), frac(out) {
    const acc_t scale = out > 1 ? static_cast<acc_t>(in - 1) / static_cast<acc_t>(out - 1) : acc_t(0);
    for (int64_t i = 0; i < out; ++i) {
      const acc_t src = scale * static_cast<acc_t>(i);
      lo[i] = std::min(static_cast<int64_t>(src), in - 1);
      hi[i] = lo[i] + (lo[i] < in - 1 ? 1 : 0);
      frac[i] = src - static_cast<acc_t>(lo[i]);
    }
  }
};

// scipy.ndimage 'reflect' (d c b a | a b c d | d c b a) source index of padded position i - radius.
std::vector<int64_t> reflect_table(int64_t n, int64_t radius) {
  std::vector<int64_t> table(n + 2 * radius);
  for (int64_t i = 0; i < n + 2 * radius; ++i) {
    int64_t j = (i - radius) % (2 * n);
    if (j < 0) j += 2 * n;
    table[i] = j >= n ? 2 * n - 1 - j : j;
  }
  return table;
}

// scipy.ndimage.gaussian_filter's taps: radius int(4 sigma + 0.5), normalised in double.
std::vector<double> gaussian_taps(double sigma) {
  if (sigma <= 0) return {1.0};
  const int64_t radius = static_cast<int64_t>(4.0 * sigma + 0.5);
  std::vector<double> taps(2 * radius + 1);
  double total = 0;
  for (int64_t x = -radius; x <= radius; ++x) total += taps[x + radius] = std::exp(-0.5 * (x / sigma) * (x / sigma));
  for (double& t : taps) t /= total;
  return taps;
}

std::tuple<at::Tensor, at::Tensor> anomaly_map_cpu(at::TensorList student_arg, at::TensorList teacher_arg,
                                                   at::IntArrayRef out_size, double sigma) {
  check_anomaly_map_args(student_arg, teacher_arg, out_size, sigma);
  std::vector<at::Tensor> student, teacher;
  for (size_t s = 0; s < student_arg.size(); ++s) {
    student.push_back(dense_feature_map(student_arg[s]));
    teacher.push_back(dense_feature_map(teacher_arg[s]));
  }
  const int64_t batch = student[0].size(0), height = out_size[0], width = out_size[1];
  const auto dtype = student[0].scalar_type();
  at::Tensor maps = at::empty({batch, height, width}, student[0].options());
  at::Tensor scores = at::empty({batch}, student[0].options());
  const std::vector<double> taps64 = gaussian_taps(sigma);
  const int64_t radius = (static_cast<int64_t>(taps64.size()) - 1) / 2;
  const std::vector<int64_t> reflect_x = reflect_table(width, radius), reflect_y = reflect_table(height, radius);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "anomaly_map_cpu", [&] {
    using acc_t = acc_type_for<scalar_t>;
    const std::vector<acc_t> taps(taps64.begin(), taps64.end());
    std::vector<LinearTaps<acc_t>> rows, cols;
    int64_t max_stage_pixels = 0;
    for (const auto& f : student) {
      rows.emplace_back(f.size(2), height);
      cols.emplace_back(f.size(3), width);
      max_stage_pixels = std::max(max_stage_pixels, f.size(2) * f.size(3));
    }
    scalar_t* map_data = maps.mutable_data_ptr<scalar_t>();
    scalar_t* score_data = scores.mutable_data_ptr<scalar_t>();

    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> total(height * width), blurred_rows(height * width), padded(width + 2 * radius);
      std::vector<acc_t> dist(max_stage_pixels), scratch(2 * max_stage_pixels), out_row(width);
      std::unique_ptr<bool[]> flags(new bool[2 * max_stage_pixels]);
      for (int64_t img = begin; img < end; ++img) {
        std::fill(total.begin(), total.end(), acc_t(0));
        for (size_t s = 0; s < student.size(); ++s) {
          const PixelLayout la(student[s]), lb(teacher[s]);
          const int64_t in_w = student[s].size(3);
          pixel_cosine_distances(student[s].const_data_ptr<scalar_t>(), la, teacher[s].const_data_ptr<scalar_t>(), lb,
                                 img, 0, la.pixels, dist.data(), scratch.data(), flags.get());
          const auto& ry = rows[s];
          const auto& cx = cols[s];
          for (int64_t y = 0; y < height; ++y) {
            const acc_t* r0 = dist.data() + ry.lo[y] * in_w;
            const acc_t* r1 = dist.data() + ry.hi[y] * in_w;
            const acc_t wy = ry.frac[y];
            acc_t* dst = total.data() + y * width;
            for (int64_t x = 0; x < width; ++x) {
              const acc_t wx = cx.frac[x];
              const acc_t top = (acc_t(1) - wx) * r0[cx.lo[x]] + wx * r0[cx.hi[x]];
              const acc_t bottom = (acc_t(1) - wx) * r1[cx.lo[x]] + wx * r1[cx.hi[x]];
              dst[x] += (acc_t(1) - wy) * top + wy * bottom;
            }
          }
        }
        // Horizontal pass over reflect-padded rows, then vertical pass, vectorised along x.
        for (int64_t y = 0; y < height; ++y) {
          const acc_t* src = total.data() + y * width;
          for (int64_t i = 0; i < width + 2 * radius; ++i) padded[i] = src[reflect_x[i]];
          acc_t* dst = blurred_rows.data() + y * width;
          std::fill(dst, dst + width, acc_t(0));
          for (int64_t k = 0; k <= 2 * radius; ++k)
            for (int64_t x = 0; x < width; ++x) dst[x] += taps[k] * padded[x + k];
        }
        acc_t best = -std::numeric_limits<acc_t>::infinity();
        scalar_t* map_out = map_data + img * height * width;
        for (int64_t y = 0; y < height; ++y) {
          std::fill(out_row.begin(), out_row.end(), acc_t(0));
          for (int64_t k = 0; k <= 2 * radius; ++k) {
            const acc_t* src = blurred_rows.data() + reflect_y[y + k] * width;
            for (int64_t x = 0; x < width; ++x) out_row[x] += taps[k] * src[x];
          }
          for (int64_t x = 0; x < width; ++x) {
            map_out[y * width + x] = static_cast<scalar_t>(out_row[x]);
            // NaN propagates into the score, as torch.amax does (std::max would skip it).
            best = (std::isnan(best) || out_row[x] <= best) ? best : out_row[x];
          }
        }
        score_data[img] = static_cast<scalar_t>(best);
      }
    });
  });
  return {maps, scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(memkd, CPU, m) { m.impl("anomaly_map", &anomaly_map_cpu); }

}  // namespace memkd::cpu
