// Fused CPU forward and backward of the per-pixel cosine distance 1 - cos(fs, ft) over channels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <memory>
#include <vector>

#include "../ops/checks.h"
#include "feature_tiles.h"

namespace memkd::cpu {
namespace {

constexpr int64_t kPixelsPerTask = 1024;

at::Tensor cosine_distance_map_cpu(const at::Tensor& fs_arg, const at::Tensor& ft_arg) {
  check_pair_of_maps(fs_arg, "fs", ft_arg, "ft");
  const at::Tensor fs = dense_feature_map(fs_arg), ft = dense_feature_map(ft_arg);
  const PixelLayout la(fs), lb(ft);
  const int64_t batch = fs.size(0), pixels = la.pixels;
  const int64_t tiles_per_image = (pixels + kPixelsPerTask - 1) / kPixelsPerTask;
  at::Tensor out = at::empty({batch, fs.size(2), fs.size(3)}, fs.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fs.scalar_type(), "cosine_distance_map_cpu", [&] {
    using acc_t = acc_type_for<scalar_t>;
    const scalar_t* a = fs.const_data_ptr<scalar_t>();
    const scalar_t* b = ft.const_data_ptr<scalar_t>();
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch * tiles_per_image, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> dist(kPixelsPerTask), scratch(2 * kPixelsPerTask);
      std::unique_ptr<bool[]> flags(new bool[2 * kPixelsPerTask]);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t img = i / tiles_per_image, p0 = (i % tiles_per_image) * kPixelsPerTask;
        const int64_t n = std::min(kPixelsPerTask, pixels - p0);
        pixel_cosine_distances(a, la, b, lb, img, p0, n, dist.data(), scratch.data(), flags.get());
        scalar_t* dst = out_data + img * pixels + p0;
        for (int64_t t = 0; t < n; ++t) dst[t] = static_cast<scalar_t>(dist[t]);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> cosine_distance_map_backward_cpu(const at::Tensor& grad_out_arg,
                                                                    const at::Tensor& fs_arg,
                                                                    const at::Tensor& ft_arg) {
  check_cosine_distance_map_backward_args(grad_out_arg, fs_arg, ft_arg);
  const at::Tensor fs = dense_feature_map(fs_arg), ft = dense_feature_map(ft_arg);
  const at::Tensor grad_out = grad_out_arg.contiguous();
  at::Tensor grad_fs = at::empty_like(fs), grad_ft = at::empty_like(ft);
  const PixelLayout la(fs), lb(ft), lga(grad_fs), lgb(grad_ft);
  const int64_t batch = fs.size(0), pixels = la.pixels, channels = la.channels;
  const int64_t tiles_per_image = (pixels + kPixelsPerTask - 1) / kPixelsPerTask;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fs.scalar_type(), "cosine_distance_map_backward_cpu", [&] {
    using acc_t = acc_type_for<scalar_t>;
    const scalar_t* a = fs.const_data_ptr<scalar_t>();
    const scalar_t* b = ft.const_data_ptr<scalar_t>();
    const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
    scalar_t* ga = grad_fs.mutable_data_ptr<scalar_t>();
    scalar_t* gb = grad_ft.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch * tiles_per_image, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> dot(kPixelsPerTask), inv_a(kPixelsPerTask), inv_b(kPixelsPerTask);
      std::vector<acc_t> cross(kPixelsPerTask), self_a(kPixelsPerTask), self_b(kPixelsPerTask);
      std::unique_ptr<bool[]> ok_a(new bool[kPixelsPerTask]), ok_b(new bool[kPixelsPerTask]);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t img = i / tiles_per_image, p0 = (i % tiles_per_image) * kPixelsPerTask;
        const int64_t n = std::min(kPixelsPerTask, pixels - p0);
        pixel_cosine_terms(a, la, b, lb, img, p0, n, dot.data(), inv_a.data(), inv_b.data(), ok_a.get(), ok_b.get());
        // d(1 - cos)/da = -(b/|b| - a/|a| cos) / |a|: grad_fs = cross * ft + self_a * fs.
        for (int64_t t = 0; t < n; ++t) {
          const acc_t go = static_cast<acc_t>(g[img * pixels + p0 + t]);
          const acc_t cos = dot[t] * inv_a[t] * inv_b[t];
          cross[t] = -go * inv_a[t] * inv_b[t];
          self_a[t] = ok_a[t] ? go * cos * inv_a[t] * inv_a[t] : acc_t(0);
          self_b[t] = ok_b[t] ? go * cos * inv_b[t] * inv_b[t] : acc_t(0);
        }
        for (int64_t t = 0; t < n; ++t) {
          const int64_t p = p0 + t;
          const scalar_t* pa = a + img * la.stride_b + p * la.stride_p;
          const scalar_t* pb = b + img * lb.stride_b + p * lb.stride_p;
          scalar_t* qa = ga + img * lga.stride_b + p * lga.stride_p;
          scalar_t* qb = gb + img * lgb.stride_b + p * lgb.stride_p;
          for (int64_t c = 0; c < channels; ++c) {
            const acc_t x = static_cast<acc_t>(pa[c * la.stride_c]), y = static_cast<acc_t>(pb[c * lb.stride_c]);
            qa[c * lga.stride_c] = static_cast<scalar_t>(cross[t] * y + self_a[t] * x);
            qb[c * lgb.stride_c] = static_cast<scalar_t>(cross[t] * x + self_b[t] * y);
          }
        }
      }
    });
  });
  return {grad_fs, grad_ft};
}

}  // namespace

TORCH_LIBRARY_IMPL(memkd, CPU, m) {
  m.impl("cosine_distance_map", &cosine_distance_map_cpu);
  m.impl("cosine_distance_map_backward", &cosine_distance_map_backward_cpu);
}

}  // namespace memkd::cpu
