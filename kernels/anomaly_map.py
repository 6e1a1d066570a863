"""Anomaly maps and image scores in Triton (inference only; memkd.ops.reference.anomaly_map).

For K stages of (student, teacher) features and an output size (H, W):

1. ``_cosine_distance_fwd_kernel`` (kernels/cosine_distance_map.py), once per stage, writes the
   stage's distance map at its native resolution [B, h_k, w_k] in fp32 into one flat scratch buffer
   (these are small: the stages are downsampled feature maps).
2. ``_upsample_sum_kernel``: per block of output pixels, for every stage, bilinear interpolation
   (align_corners=True) from the 4 source pixels of the stage's distance map, summed over the stages
   in registers — the upsampled per-stage maps are never written. Index math as ATen's
   upsample_bilinear2d: scale = (in - 1) / (out - 1) in fp32, src = scale * i, lo = min(floor(src),
   in - 1), hi = min(lo + 1, in - 1), frac = src - lo.
3. ``_blur_kernel`` twice (along W, then along H): the separable Gaussian of
   scipy.ndimage.gaussian_filter (taps from reference.gaussian_taps, truncate 4.0, radius up to 16
   for sigma 4) with scipy's 'reflect' borders (d c b a | a b c d | d c b a); the reflection is the
   general periodic formula, so maps smaller than the radius reflect several times, like scipy.

The last pass writes the maps in the features' dtype and, per block, the block's maximum of the fp32
map; the image score is torch's amax over those few block maxima (a deterministic two-stage
reduction, exact in any order, and no bf16 atomics). sigma = 0 skips the blur: then the
upsample-and-sum pass is the last one.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from memkd.kernels._common import check_dtype, on_tensor_device, pixel_block
from memkd.kernels.cosine_distance_map import launch_distance
from memkd.ops.reference import gaussian_taps


@triton.jit
def _store_final(out_img, max_ptr, b, pid, n_blocks, offs, mask, acc):
    """Last pass: the map in the output dtype and this block's maximum (of the fp32 values)."""
    tl.store(out_img + offs, acc.to(out_img.dtype.element_ty), mask=mask)
    tl.store(max_ptr + b * n_blocks + pid, tl.max(tl.where(mask, acc, float("-inf")), axis=0))


@triton.jit
def _upsample_sum_kernel(
    dist_ptr, meta_ptr, scale_ptr, out_ptr, max_ptr,
    num_stages, H, W, n_blocks,
    FINAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[b, y, x] = sum_k bilinear(dist_k[b], y, x). meta_ptr holds (offset, h, w) per stage (int64),
    scale_ptr (scale_h, scale_w) per stage (fp32)."""
    pid = tl.program_id(0)
    b, offs, mask = pixel_block(H * W, BLOCK)
    y = offs // W
    x = offs % W
    yf = y.to(tl.float32)
    xf = x.to(tl.float32)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(num_stages):
        base = tl.load(meta_ptr + 3 * k)
        h = tl.load(meta_ptr + 3 * k + 1)
        w = tl.load(meta_ptr + 3 * k + 2)
        scale_h = tl.load(scale_ptr + 2 * k)
        scale_w = tl.load(scale_ptr + 2 * k + 1)
        src_y = scale_h * yf
        src_x = scale_w * xf
        y0 = tl.minimum(tl.floor(src_y).to(tl.int64), h - 1)
        x0 = tl.minimum(tl.floor(src_x).to(tl.int64), w - 1)
        ly = src_y - y0.to(tl.float32)
        lx = src_x - x0.to(tl.float32)
        y1 = tl.minimum(y0 + 1, h - 1)
        x1 = tl.minimum(x0 + 1, w - 1)
        img = dist_ptr + base + b * h * w
        d00 = tl.load(img + y0 * w + x0, mask=mask, other=0.0)
        d01 = tl.load(img + y0 * w + x1, mask=mask, other=0.0)
        d10 = tl.load(img + y1 * w + x0, mask=mask, other=0.0)
        d11 = tl.load(img + y1 * w + x1, mask=mask, other=0.0)
        acc += (1.0 - ly) * ((1.0 - lx) * d00 + lx * d01) + ly * ((1.0 - lx) * d10 + lx * d11)
    out_img = out_ptr + b * H * W
    if FINAL:
        _store_final(out_img, max_ptr, b, pid, n_blocks, offs, mask, acc)
    else:
        tl.store(out_img + offs, acc, mask=mask)


@triton.jit
def _blur_kernel(
    src_ptr, taps_ptr, out_ptr, max_ptr,
    H, W, n_taps, radius, n_blocks,
    ALONG_W: tl.constexpr, FINAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """One pass of the separable Gaussian along W (ALONG_W) or H, 'reflect' borders."""
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
    for t in range(n_taps):
        tap = tl.load(taps_ptr + t)
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
    offsets = np.cumsum([0] + [bsz * h * w for h, w in sizes])
    dist = torch.empty(int(offsets[-1]), dtype=torch.float32, device=device)
    for k, (fs, ft) in enumerate(zip(student_features, teacher_features)):
        if fs.dtype != dtype or ft.dtype != dtype or fs.shape[0] != bsz:
            raise ValueError(f"anomaly_map: stage {k} does not match stage 0's dtype and batch")
        h, w = sizes[k]
        launch_distance(fs, ft, dist[int(offsets[k]):], (h * w, 1), block_p, block_c)

    meta = torch.tensor([[int(offsets[k]), h, w] for k, (h, w) in enumerate(sizes)], dtype=torch.int64)
    # ATen's align_corners scale: float(in - 1) / (out - 1) in fp32, 0 for a 1-pixel output.
    scales = np.array(
        [[np.float32(h - 1) / np.float32(out_h - 1) if out_h > 1 else 0.0,
          np.float32(w - 1) / np.float32(out_w - 1) if out_w > 1 else 0.0] for h, w in sizes],
        dtype=np.float32,
    )
    meta = meta.to(device)
    scales = torch.from_numpy(scales).to(device)

    cfg = config(out_h * out_w)
    if block is not None:
        cfg["BLOCK"] = int(block)
    n_blocks = triton.cdiv(out_h * out_w, cfg["BLOCK"])
    grid = (n_blocks, bsz)
    maps = torch.empty((bsz, out_h, out_w), dtype=dtype, device=device)
    block_max = torch.empty((bsz, n_blocks), dtype=torch.float32, device=device)

    # 2. Upsample and sum (the last pass when sigma == 0).
    if sigma > 0:
        total = torch.empty((bsz, out_h, out_w), dtype=torch.float32, device=device)
    else:
        total = maps
    _upsample_sum_kernel[grid](
        dist, meta, scales, total, block_max, len(sizes), out_h, out_w, n_blocks,
        FINAL=sigma == 0, **cfg,
    )

    # 3. Separable Gaussian blur, along W then along H.
    if sigma > 0:
        taps = torch.tensor(gaussian_taps(sigma), dtype=torch.float32).to(device)
        n_taps = taps.numel()
        radius = (n_taps - 1) // 2
        rows = torch.empty_like(total)
        _blur_kernel[grid](total, taps, rows, block_max, out_h, out_w, n_taps, radius, n_blocks,
                           ALONG_W=True, FINAL=False, **cfg)
        _blur_kernel[grid](rows, taps, maps, block_max, out_h, out_w, n_taps, radius, n_blocks,
                           ALONG_W=False, FINAL=True, **cfg)

    scores = block_max.amax(dim=1).to(dtype)
    return maps, scores
