"""Per-pixel cosine distance map in Triton: forward kernel, backward kernel and their launchers.

    d[b, p] = 1 - (a . t) / (max(|a|, EPS) max(|t|, EPS)),   a = fs[b, :, p], t = ft[b, :, p]

(memkd.ops.reference.cosine_distance_map). A program owns BLOCK_P pixels of one image and loops over
C in BLOCK_C chunks, accumulating a.t, |a|^2 and |t|^2 in fp32. The backward recomputes them, then
a second C loop writes

    dfs = -g (th - ah cos [|a| >= EPS]) / max(|a|, EPS),   dft = -g (ah - th cos [|t| >= EPS]) / max(|t|, EPS).

Inputs are addressed as base + b * stride_b + c * stride_c + p * stride_p (NCHW and channels_last
without copies); gradients come back in the inputs' memory format.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from memkd.kernels._common import (
    EPS,
    as_pixel_major,
    check_dtype,
    empty_map,
    image_strides,
    is_half,
    next_pow2,
    on_tensor_device,
    pixel_block,
)


@triton.jit
def _load_chunk(a_img, t_img, c0, C, offs_p, mask_p, stride_ac, stride_ap, stride_tc, stride_tp,
                BLOCK_C: tl.constexpr):
    """Channels c0 .. c0 + BLOCK_C of the block's pixels of both images as [BLOCK_C, BLOCK_P] fp32
    (0 outside the mask), their channel indices and the mask."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    mask = (offs_c < C)[:, None] & mask_p[None, :]
    a = tl.load(a_img + offs_c[:, None] * stride_ac + offs_p[None, :] * stride_ap,
                mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_img + offs_c[:, None] * stride_tc + offs_p[None, :] * stride_tp,
                mask=mask, other=0.0).to(tl.float32)
    return offs_c, mask, a, t


@triton.jit
def _dot_and_squared_norms(a_img, t_img, C, offs_p, mask_p, stride_ac, stride_ap, stride_tc, stride_tp,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per pixel of the block: a.t, |a|^2 and |t|^2 in fp32, over C in BLOCK_C chunks."""
    dot = tl.zeros((BLOCK_P,), dtype=tl.float32)
    aa = tl.zeros((BLOCK_P,), dtype=tl.float32)
    tt = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        _, _, a, t = _load_chunk(a_img, t_img, c0, C, offs_p, mask_p,
                                 stride_ac, stride_ap, stride_tc, stride_tp, BLOCK_C)
        dot += tl.sum(a * t, axis=0)
        aa += tl.sum(a * a, axis=0)
        tt += tl.sum(t * t, axis=0)
    return dot, aa, tt


@triton.jit
def _cosine_distance_fwd_kernel(
    a_ptr, t_ptr, out_ptr,
    C, HW,
    stride_ab, stride_ac, stride_ap,
    stride_tb, stride_tc, stride_tp,
    stride_ob, stride_op,
    EPS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Writes d[b, p] to out_ptr + b * stride_ob + p * stride_op in out_ptr's dtype (fp32 scratch
    maps in the anomaly map, the input dtype in the op)."""
    b, offs_p, mask_p = pixel_block(HW, BLOCK_P)
    dot, aa, tt = _dot_and_squared_norms(a_ptr + b * stride_ab, t_ptr + b * stride_tb, C, offs_p, mask_p,
                                         stride_ac, stride_ap, stride_tc, stride_tp, BLOCK_P, BLOCK_C)
    na = tl.maximum(tl.sqrt(aa), EPS)
    nt = tl.maximum(tl.sqrt(tt), EPS)
    d = 1.0 - dot / (na * nt)
    tl.store(out_ptr + b * stride_ob + offs_p * stride_op, d.to(out_ptr.dtype.element_ty), mask=mask_p)


@triton.jit
def _cosine_distance_bwd_kernel(
    a_ptr, t_ptr, g_ptr, da_ptr, dt_ptr,
    C, HW,
    stride_ab, stride_ac, stride_ap,
    stride_tb, stride_tc, stride_tp,
    stride_gb, stride_gp,
    stride_dab, stride_dac, stride_dap,
    stride_dtb, stride_dtc, stride_dtp,
    EPS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b, offs_p, mask_p = pixel_block(HW, BLOCK_P)
    a_img = a_ptr + b * stride_ab
    t_img = t_ptr + b * stride_tb

    # Pass 1: the dot product and the two norms.
    dot, aa, tt = _dot_and_squared_norms(a_img, t_img, C, offs_p, mask_p,
                                         stride_ac, stride_ap, stride_tc, stride_tp, BLOCK_P, BLOCK_C)
    na = tl.sqrt(aa)
    nt = tl.sqrt(tt)
    inv_a = 1.0 / tl.maximum(na, EPS)
    inv_t = 1.0 / tl.maximum(nt, EPS)
    cos = dot * inv_a * inv_t
    g = tl.load(g_ptr + b * stride_gb + offs_p * stride_gp, mask=mask_p, other=0.0).to(tl.float32)
    # per-pixel coefficients: da = ca * a + cat * t, dt = ct * t + cta * a
    ca = tl.where(na >= EPS, g * cos * inv_a * inv_a, 0.0)
    cat = -g * inv_t * inv_a
    ct = tl.where(nt >= EPS, g * cos * inv_t * inv_t, 0.0)

    # Pass 2: write both gradients chunk by chunk.
    for c0 in range(0, C, BLOCK_C):
        offs_c, mask, a, t = _load_chunk(a_img, t_img, c0, C, offs_p, mask_p,
                                         stride_ac, stride_ap, stride_tc, stride_tp, BLOCK_C)
        da = ca[None, :] * a + cat[None, :] * t
        dt = ct[None, :] * t + cat[None, :] * a
        tl.store(da_ptr + b * stride_dab + offs_c[:, None] * stride_dac + offs_p[None, :] * stride_dap,
                 da.to(da_ptr.dtype.element_ty), mask=mask)
        tl.store(dt_ptr + b * stride_dtb + offs_c[:, None] * stride_dtc + offs_p[None, :] * stride_dtp,
                 dt.to(dt_ptr.dtype.element_ty), mask=mask)


def config(c: int, dtype: torch.dtype, backward: bool = False) -> dict:
    """Hand-picked tiles: a pure bandwidth kernel, so 128-byte rows in both layouts (BLOCK_P = 64
    pixels for NCHW, BLOCK_C = 32 fp32 / 64 half channels for channels_last); 4 warps for fp32 and 8
    for the larger 16-bit tiles keep it at 64-95 registers per thread (ptxas, sm_80/sm_90), 3-stage
    pipelining of the chunk loads in the forward, 2 in the backward (it streams twice as much)."""
    half = is_half(dtype)
    return dict(BLOCK_P=64, BLOCK_C=min(64 if half else 32, next_pow2(c, 16)), num_warps=8 if half else 4,
                num_stages=2 if backward else 3)


def _overrides(cfg, block_p, block_c):
    if block_p is not None:
        cfg["BLOCK_P"] = int(block_p)
    if block_c is not None:
        cfg["BLOCK_C"] = int(block_c)
    return cfg


def _check(fs, ft):
    check_dtype(fs, "fs")
    if fs.dim() != 4 or fs.shape != ft.shape or fs.dtype != ft.dtype:
        raise ValueError(
            f"cosine_distance_map: expected two [B, C, H, W] tensors of one shape and dtype, got "
            f"{tuple(fs.shape)} {fs.dtype} and {tuple(ft.shape)} {ft.dtype}"
        )


def launch_distance(fs: torch.Tensor, ft: torch.Tensor, out: torch.Tensor, out_strides: tuple[int, int],
                    block_p: int | None = None, block_c: int | None = None) -> None:
    """Writes the distance map of fs, ft (any layout) into ``out`` (addressed by (stride_b, stride_p))."""
    b, c, h, w = fs.shape
    a, (sab, sac, sap) = as_pixel_major(fs)
    t, (stb, stc, stp) = as_pixel_major(ft)
    cfg = _overrides(config(c, fs.dtype), block_p, block_c)
    grid = (triton.cdiv(h * w, cfg["BLOCK_P"]), b)
    _cosine_distance_fwd_kernel[grid](
        a, t, out, c, h * w,
        sab, sac, sap, stb, stc, stp,
        out_strides[0], out_strides[1],
        EPS=EPS, **cfg,
    )


@on_tensor_device
def cosine_distance_map_forward(fs: torch.Tensor, ft: torch.Tensor, *, block_p: int | None = None,
                                block_c: int | None = None) -> torch.Tensor:
    """[B, C, H, W] x 2 -> [B, H, W] in fs's dtype."""
    _check(fs, ft)
    b, _, h, w = fs.shape
    out = torch.empty((b, h, w), dtype=fs.dtype, device=fs.device)
    launch_distance(fs, ft, out, (h * w, 1), block_p, block_c)
    return out


@on_tensor_device
def cosine_distance_map_backward(grad_out: torch.Tensor, fs: torch.Tensor, ft: torch.Tensor, *,
                                 block_p: int | None = None, block_c: int | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dfs, dft) in the inputs' dtype and memory format."""
    _check(fs, ft)
    b, c, h, w = fs.shape
    if tuple(grad_out.shape) != (b, h, w):
        raise ValueError(f"grad_out: expected shape {(b, h, w)}, got {tuple(grad_out.shape)}")
    a, (sab, sac, sap) = as_pixel_major(fs)
    t, (stb, stc, stp) = as_pixel_major(ft)
    g_strides = image_strides(grad_out)
    if g_strides is None:
        grad_out = grad_out.contiguous()
        g_strides = image_strides(grad_out)
    da = empty_map(fs.shape, fs)
    dt = empty_map(ft.shape, ft)
    _, (sdab, sdac, sdap) = as_pixel_major(da)
    _, (sdtb, sdtc, sdtp) = as_pixel_major(dt)
    cfg = _overrides(config(c, fs.dtype, backward=True), block_p, block_c)
    grid = (triton.cdiv(h * w, cfg["BLOCK_P"]), b)
    _cosine_distance_bwd_kernel[grid](
        a, t, grad_out, da, dt, c, h * w,
        sab, sac, sap, stb, stc, stp,
        g_strides[0], g_strides[1],
        sdab, sdac, sdap, sdtb, sdtc, sdtp,
        EPS=EPS, **cfg,
    )
    return da, dt
