"""Anomaly maps and image scores in Triton (inference only; memkd.ops.reference.anomaly_map).

For K stages of (student, teacher) features and an output size (H, W):

1. ``_cosine_distance_fwd_kernel`` (kernels/cosine_distance_map.py), once per stage, writes the
   stage's distance map at its native resolution [B, h_k, w_k] in fp32 into one flat scratch buffer
   (these are small: the stages are downsampled feature maps).
2. ``_upsample_sum_kernel``: per block of output pixels, for up to ``STAGES_PER_LAUNCH`` stages,
   bilinear interpolation (align_corners=True) from the 4 source pixels of each stage's distance
   map, summed over the stages in registers — the upsampled per-stage maps are never written (more
   stages take further launches that add to the sum). Index math as ATen's upsample_bilinear2d:
   scale = (in - 1) / (out - 1) in fp32, src = scale * i, lo = min(floor(src), in - 1),
   hi = min(lo + 1, in - 1), frac = src - lo.
3. ``_blur_kernel`` twice (along W, then along H): the separable Gaussian of
   scipy.ndimage.gaussian_filter (truncate 4.0, radius int(4 sigma + 0.5), 16 for sigma 4) with
   scipy's 'reflect' borders (d c b a | a b c d | d c b a); the reflection is the general periodic
   formula, so maps smaller than the radius reflect several times, like scipy.

Every per-call parameter (stage pointers and sizes, bilinear scales, sigma, the taps' normaliser)
is a scalar kernel argument and the taps exp(-x^2 / (2 sigma^2)) / sum are evaluated in the blur
kernel, so a call makes no host-to-device copy (that would add a synchronous transfer per call and
break CUDA-graph capture); no device state is cached either.

The last pass writes the maps in the features' dtype and, per block, the block's maximum of the fp32
map, NaN if any of its pixels is NaN; the image score is torch's amax over those few block maxima (a
deterministic two-stage reduction, exact in any order, and no bf16 atomics). So NaN in a map gives a
NaN score, as in the reference. sigma = 0 skips the blur: then the upsample-and-sum pass is the last.
"""
from __future__ import annotations

import math
from itertools import accumulate
from typing import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from memkd.kernels._common import check_dtype, on_tensor_device, pixel_block
from memkd.kernels.cosine_distance_map import launch_distance
from memkd.ops.reference import GAUSSIAN_TRUNCATE

STAGES_PER_LAUNCH = 4  # stage slots of one upsample-and-sum launch (a backbone pyramid has 3)


@triton.jit
def _store_final(out_img, max_ptr, b, pid, n_blocks, offs, mask, acc):
    """Last pass: the map in the output dtype and this block's maximum of the fp32 values, NaN when
    any of them is NaN (tl.max alone would drop NaN)."""
    tl.store(out_img + offs, acc.to(out_img.dtype.element_ty), mask=mask)
    best = tl.max(tl.where(mask, acc, float("-inf")), axis=0)
    any_nan = tl.max(tl.where(mask & (acc != acc), 1, 0), axis=0) > 0
    tl.store(max_ptr + b * n_blocks + pid, tl.where(any_nan, float("nan"), best))


@triton.jit
def _bilinear(dist_ptr, h, w, scale_h, scale_w, b, yf, xf, mask):
    """Bilinear sample (align_corners=True) of image b of a [B, h, w] fp32 map at output (y, x)."""
    src_y = scale_h * yf
    src_x = scale_w * xf
    y0 = tl.minimum(tl.floor(src_y).to(tl.int64), h - 1)
    x0 = tl.minimum(tl.floor(src_x).to(tl.int64), w - 1)
    ly = src_y - y0.to(tl.float32)
    lx = src_x - x0.to(tl.float32)
    y1 = tl.minimum(y0 + 1, h - 1)
    x1 = tl.minimum(x0 + 1, w - 1)
    img = dist_ptr + b * h * w
    d00 = tl.load(img + y0 * w + x0, mask=mask, other=0.0)
    d01 = tl.load(img + y0 * w + x1, mask=mask, other=0.0)
    d10 = tl.load(img + y1 * w + x0, mask=mask, other=0.0)
    d11 = tl.load(img + y1 * w + x1, mask=mask, other=0.0)
    return (1.0 - ly) * ((1.0 - lx) * d00 + lx * d01) + ly * ((1.0 - lx) * d10 + lx * d11)


@triton.jit
def _upsample_sum_kernel(
    d0, h0, w0, sh0, sw0,
    d1, h1, w1, sh1, sw1,
    d2, h2, w2, sh2, sw2,
    d3, h3, w3, sh3, sw3,
    sum_ptr, out_ptr, max_ptr, H, W, n_blocks,
    NUM_STAGES: tl.constexpr, ACCUMULATE: tl.constexpr, FINAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[b, y, x] (+)= sum over the first NUM_STAGES stage slots of bilinear(dist_k[b], y, x); a slot
    is (fp32 [B, h, w] map, h, w, scale_h, scale_w). ACCUMULATE, for the stages beyond
    one launch's slots: adds the fp32 partial sum at sum_ptr."""
    pid = tl.program_id(0)
    b, offs, mask = pixel_block(H * W, BLOCK)
    yf = (offs // W).to(tl.float32)
    xf = (offs % W).to(tl.float32)
    out_img = out_ptr + b * H * W
    acc = _bilinear(d0, h0, w0, sh0, sw0, b, yf, xf, mask)
    if NUM_STAGES > 1:
        acc += _bilinear(d1, h1, w1, sh1, sw1, b, yf, xf, mask)
    if NUM_STAGES > 2:
        acc += _bilinear(d2, h2, w2, sh2, sw2, b, yf, xf, mask)
    if NUM_STAGES > 3:
        acc += _bilinear(d3, h3, w3, sh3, sw3, b, yf, xf, mask)
    if ACCUMULATE:
        acc += tl.load(sum_ptr + b * H * W + offs, mask=mask, other=0.0)
    if FINAL:
        _store_final(out_img, max_ptr, b, pid, n_blocks, offs, mask, acc)
    else:
        tl.store(out_img + offs, acc, mask=mask)


@triton.jit
def _blur_kernel(
    src_ptr, out_ptr, max_ptr,
    H, W, radius, sigma, inv_total, n_blocks,
    ALONG_W: tl.constexpr, FINAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """One pass of the separable Gaussian along W (ALONG_W) or H, 'reflect' borders; tap t of the
    2 radius + 1 is exp(-0.5 ((t - radius) / sigma)^2) * inv_total (inv_total: 1 / the taps' sum)."""
    pid = tl.program_id(0)
    b, offs, mask = pixel_block(H * W, BLOCK)
    y = offs // W
    x = offs % W
    if ALONG_W:
        n = W
        pos = x
    else:
        n = H
        pos = y
    period = 2 * n
    src_img = src_ptr + b * H * W
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for t in range(2 * radius + 1):
        u = (t - radius).to(tl.float32) / sigma
        tap = tl.exp(-0.5 * u * u) * inv_total
        i = (pos + t - radius) % period  # C remainder: negative for negative positions
        i = tl.where(i < 0, i + period, i)
        i = tl.where(i >= n, period - 1 - i, i)
        if ALONG_W:
            src = y * W + i
        else:
            src = i * W + x
        acc += tap * tl.load(src_img + src, mask=mask, other=0.0)
    out_img = out_ptr + b * H * W
    if FINAL:
        _store_final(out_img, max_ptr, b, pid, n_blocks, offs, mask, acc)
    else:
        tl.store(out_img + offs, acc, mask=mask)


def config(out_pixels: int) -> dict:
    """Elementwise-style passes over the output map: 1-D blocks of 1024 pixels (512 for maps up to
    64K pixels, so small maps still spread over the SMs), 4 warps; the gathers hit L1/L2 (the stage
    maps are small, the blur re-reads a row/column window)."""
    return dict(BLOCK=1024 if out_pixels > 65536 else 512, num_warps=4)


def gaussian_radius_and_normaliser(sigma: float) -> tuple[int, float]:
    """scipy.ndimage.gaussian_filter's radius int(truncate * sigma + 0.5) and 1 / sum of its
    unnormalised taps (in double on the host: plain Python floats, no tensor)."""
    radius = int(GAUSSIAN_TRUNCATE * sigma + 0.5)
    total = math.fsum(math.exp(-0.5 * (x / sigma) ** 2) for x in range(-radius, radius + 1))
    return radius, 1.0 / total


def align_corners_scale(size_in: int, size_out: int) -> float:
    """ATen's align_corners scale: float(in - 1) / (out - 1) in fp32, 0 for a 1-pixel output."""
    return float(np.float32(size_in - 1) / np.float32(size_out - 1)) if size_out > 1 else 0.0


@on_tensor_device
def anomaly_map_forward(
    student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    out_size: Sequence[int],
    sigma: float = 4.0,
    *,
    block: int | None = None,
    block_p: int | None = None,
    block_c: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly maps [B, H, W] and scores [B] in the features' dtype (see the module docstring).
    ``block`` overrides the map passes' block, ``block_p``/``block_c`` the distance kernel's tiles."""
    student_features, teacher_features = list(student_features), list(teacher_features)
    if not student_features or len(student_features) != len(teacher_features):
        raise ValueError("anomaly_map: expected the same non-zero number of student and teacher stages")
    first = student_features[0]
    check_dtype(first, "student_features[0]")
    dtype, device = first.dtype, first.device
    bsz = first.shape[0]
    out_h, out_w = (int(s) for s in out_size)
    sigma = float(sigma)

    # 1. Native-resolution distance maps of all stages, fp32, in one flat buffer.
    sizes = [(fs.shape[2], fs.shape[3]) for fs in student_features]
    offsets = list(accumulate((bsz * h * w for h, w in sizes), initial=0))
    dist = torch.empty(offsets[-1], dtype=torch.float32, device=device)
    stages = []
    for k, (fs, ft) in enumerate(zip(student_features, teacher_features)):
        if fs.dtype != dtype or ft.dtype != dtype or fs.shape[0] != bsz:
            raise ValueError(f"anomaly_map: stage {k} does not match stage 0's dtype and batch")
        h, w = sizes[k]
        stage_dist = dist[offsets[k]:offsets[k + 1]]
        launch_distance(fs, ft, stage_dist, (h * w, 1), block_p, block_c)
        stages.append((stage_dist, h, w, align_corners_scale(h, out_h), align_corners_scale(w, out_w)))

    cfg = config(out_h * out_w)
    if block is not None:
        cfg["BLOCK"] = int(block)
    n_blocks = triton.cdiv(out_h * out_w, cfg["BLOCK"])
    grid = (n_blocks, bsz)
    maps = torch.empty((bsz, out_h, out_w), dtype=dtype, device=device)
    block_max = torch.empty((bsz, n_blocks), dtype=torch.float32, device=device)

    # 2. Upsample and sum, STAGES_PER_LAUNCH stages at a time (the last pass when sigma == 0).
    if sigma > 0 or len(stages) > STAGES_PER_LAUNCH:
        total = torch.empty((bsz, out_h, out_w), dtype=torch.float32, device=device)
    else:
        total = maps
    for begin in range(0, len(stages), STAGES_PER_LAUNCH):
        group = stages[begin:begin + STAGES_PER_LAUNCH]
        last = begin + STAGES_PER_LAUNCH >= len(stages)
        final = last and sigma == 0
        slots = group + [group[0]] * (STAGES_PER_LAUNCH - len(group))  # unused slots are not read
        _upsample_sum_kernel[grid](
            *(arg for slot in slots for arg in slot),
            total, maps if final else total, block_max, out_h, out_w, n_blocks,
            NUM_STAGES=len(group), ACCUMULATE=begin > 0, FINAL=final, **cfg,
        )

    # 3. Separable Gaussian blur, along W then along H.
    if sigma > 0:
        radius, inv_total = gaussian_radius_and_normaliser(sigma)
        rows = torch.empty_like(total)
        _blur_kernel[grid](total, rows, block_max, out_h, out_w, radius, sigma, inv_total, n_blocks,
                           ALONG_W=True, FINAL=False, **cfg)
        _blur_kernel[grid](rows, maps, block_max, out_h, out_w, radius, sigma, inv_total, n_blocks,
                           ALONG_W=False, FINAL=True, **cfg)

    scores = block_max.amax(dim=1).to(dtype)
    return maps, scores
