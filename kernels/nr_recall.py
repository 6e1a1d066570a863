"""NR Memory recall in Triton: forward kernel, backward kernel and their launchers.

    out[b, :, p] = sum_l softmax_l(S[l, p]) values[l],   S[l, p] = cos(keys[l], query[b, :, p])

query [B, C, H, W] (pixel p = h * W + w), keys and values [L, C]; see memkd.ops.reference.nr_recall.
L (memory items, ~50) fits one key block padded to a power of two >= 16; C (256..2048) does not fit
one tile, so every kernel loops over C in BLOCK_C chunks. Key blocks stop at ``MAX_BLOCK_L`` (128),
the largest the launch tiles were compiled and sized for: a larger memory (L > 128; at L = 2500 one
key block alone would need 262 KB of shared memory in fp16, beyond any GPU's 227 KB) is served by
the PyTorch reference (two GEMMs per image around a softmax), as the CUDA C++ kernels fall back to
ATen ops. Both kernels address pixel p of channel c
of image b as ``base + b * stride_b + c * stride_c + p * stride_p``: NCHW (stride_p = 1),
channels_last (stride_c = 1) and channel slices run without a copy; a layout whose H and W do not
collapse into one pixel axis is copied first. Results keep the query's memory format.

Normalisation is folded into the scores: S = (k . q) / (max(|k|, EPS) max(|q|, EPS)), with the raw
dot products on the tensor cores (input dtype, fp32 accumulation) and the squared norms accumulated
in fp32 in the same C loop. The softmax runs in fp32 registers; for fp16/bf16 inputs the weights
(and in the backward dS) are rounded to the input dtype as the operand of the second loop's dots, as
flash attention does. fp32 dots follow ``input_precision`` ("ieee", "tf32x3", "tf32").

Backward, with W = softmax(S), dW = V dO, dS = W * (dW - sum_l W dW):

* dQ = (kh^T dS - qh * proj) / |q|, proj = qh . (kh^T dS) = sum_l dS * S (so no extra C loop),
  zero where |q| < EPS — one program writes dQ for its pixels in a second C loop;
* dkh = dS qh^T and dV = W dO^T are reduced over all pixels of all images in fp32, either into a
  per-program [num_programs, L, C] partial buffer summed by torch in a fixed order (deterministic)
  or with fp32 atomics into one [L, C] buffer; the key normalisation's Jacobian
  dK = (dkh - kh (kh . dkh)) / |k| is applied after the reduction, in torch (L x C, tiny).

The backward grid is persistent: at most a few programs per SM, each looping over pixel tiles, so
the deterministic partial buffers stay bounded whatever B * H * W is.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from memkd.kernels._common import (
    EPS,
    as_pixel_major,
    check_dtype,
    dot_dtype,
    empty_map,
    is_half,
    map_format,
    next_pow2,
    num_sms,
    on_tensor_device,
    pixel_block,
    resolve_deterministic,
    resolve_precision,
)
from memkd.ops import reference


@triton.jit
def _weights(raw, qsq, ksq, mask_l, EPS: tl.constexpr):
    """Scores S = raw / (|k| |q|) and softmax weights over the (masked) key axis 0."""
    inv_q = 1.0 / tl.maximum(tl.sqrt(qsq), EPS)
    inv_k = 1.0 / tl.maximum(tl.sqrt(ksq), EPS)
    s = raw * inv_k[:, None] * inv_q[None, :]
    s = tl.where(mask_l[:, None], s, float("-inf"))
    e = tl.exp(s - tl.max(s, axis=0)[None, :])
    w = e / tl.sum(e, axis=0)[None, :]
    s = tl.where(mask_l[:, None], s, 0.0)
    return s, w, inv_q, inv_k


@triton.jit
def _nr_recall_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    C, HW, L,
    stride_qb, stride_qc, stride_qp,
    stride_kl, stride_kc,
    stride_vl, stride_vc,
    stride_ob, stride_oc, stride_op,
    EPS: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    b, offs_p, mask_p = pixel_block(HW, BLOCK_P)
    offs_l = tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    q_img = q_ptr + b * stride_qb

    # Pass 1 over C: raw scores k . q and the squared norms of the query pixels and keys.
    raw = tl.zeros((BLOCK_L, BLOCK_P), dtype=tl.float32)
    qsq = tl.zeros((BLOCK_P,), dtype=tl.float32)
    ksq = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        q = tl.load(q_img + offs_c[:, None] * stride_qc + offs_p[None, :] * stride_qp,
                    mask=mask_c[:, None] & mask_p[None, :], other=0.0)  # [C, P]
        k = tl.load(k_ptr + offs_l[:, None] * stride_kl + offs_c[None, :] * stride_kc,
                    mask=mask_l[:, None] & mask_c[None, :], other=0.0)  # [L, C]
        qf = q.to(tl.float32)
        kf = k.to(tl.float32)
        qsq += tl.sum(qf * qf, axis=0)
        ksq += tl.sum(kf * kf, axis=1)
        raw = tl.dot(k.to(DOT_DTYPE), q.to(DOT_DTYPE), raw, input_precision=PRECISION)

    _, w, _, _ = _weights(raw, qsq, ksq, mask_l, EPS)
    w = w.to(DOT_DTYPE)

    # Pass 2 over C: out[C chunk, P] = V[:, C chunk]^T W.
    o_img = o_ptr + b * stride_ob
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        vt = tl.load(v_ptr + offs_c[:, None] * stride_vc + offs_l[None, :] * stride_vl,
                     mask=mask_c[:, None] & mask_l[None, :], other=0.0)  # [C, L]
        out = tl.dot(vt.to(DOT_DTYPE), w, input_precision=PRECISION)  # [C, P] fp32
        tl.store(o_img + offs_c[:, None] * stride_oc + offs_p[None, :] * stride_op,
                 out.to(o_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


@triton.jit
def _load_query_and_grad_chunk(q_img, do_img, c0, C, offs_p, mask_p, stride_qc, stride_qp, stride_doc, stride_dop,
                               BLOCK_C: tl.constexpr):
    """Channels c0 .. c0 + BLOCK_C of the tile's query and output-gradient pixels as [BLOCK_C, BLOCK_P]
    (0 outside the mask), with their channel indices, channel mask and [BLOCK_C, BLOCK_P] mask."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask_cp = mask_c[:, None] & mask_p[None, :]
    q = tl.load(q_img + offs_c[:, None] * stride_qc + offs_p[None, :] * stride_qp, mask=mask_cp, other=0.0)
    do = tl.load(do_img + offs_c[:, None] * stride_doc + offs_p[None, :] * stride_dop, mask=mask_cp, other=0.0)
    return offs_c, mask_c, mask_cp, q, do


@triton.jit
def _nr_recall_bwd_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, dkh_ptr, dv_ptr,
    C, HW, L, num_tiles, tiles_per_image,
    stride_qb, stride_qc, stride_qp,
    stride_kl, stride_kc,
    stride_vl, stride_vc,
    stride_dob, stride_doc, stride_dop,
    stride_dqb, stride_dqc, stride_dqp,
    stride_acc,  # elements between two programs' [L, C] partial sums (0: one shared atomic buffer)
    EPS: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, DETERMINISTIC: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_l = tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    acc_off = pid.to(tl.int64) * stride_acc

    for tile in range(pid, num_tiles, tl.num_programs(0)):
        if DETERMINISTIC:
            # The previous tile's partial-sum stores may come from other threads of this program
            # than the next loads (the tiles' register layouts differ): order them with a barrier.
            tl.debug_barrier()
        b = (tile // tiles_per_image).to(tl.int64)
        offs_p = (tile % tiles_per_image) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < HW
        q_img = q_ptr + b * stride_qb
        do_img = do_ptr + b * stride_dob

        # Pass 1 over C: raw scores, squared norms and dW = V dO.
        raw = tl.zeros((BLOCK_L, BLOCK_P), dtype=tl.float32)
        dw = tl.zeros((BLOCK_L, BLOCK_P), dtype=tl.float32)
        qsq = tl.zeros((BLOCK_P,), dtype=tl.float32)
        ksq = tl.zeros((BLOCK_L,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c, mask_c, _, q, do = _load_query_and_grad_chunk(
                q_img, do_img, c0, C, offs_p, mask_p, stride_qc, stride_qp, stride_doc, stride_dop, BLOCK_C)
            mask_lc = mask_l[:, None] & mask_c[None, :]
            k = tl.load(k_ptr + offs_l[:, None] * stride_kl + offs_c[None, :] * stride_kc,
                        mask=mask_lc, other=0.0)
            v = tl.load(v_ptr + offs_l[:, None] * stride_vl + offs_c[None, :] * stride_vc,
                        mask=mask_lc, other=0.0)
            qf = q.to(tl.float32)
            kf = k.to(tl.float32)
            qsq += tl.sum(qf * qf, axis=0)
            ksq += tl.sum(kf * kf, axis=1)
            raw = tl.dot(k.to(DOT_DTYPE), q.to(DOT_DTYPE), raw, input_precision=PRECISION)
            dw = tl.dot(v.to(DOT_DTYPE), do.to(DOT_DTYPE), dw, input_precision=PRECISION)

        # Softmax backward in registers.
        s, w, inv_q, inv_k = _weights(raw, qsq, ksq, mask_l, EPS)
        ds = w * (dw - tl.sum(w * dw, axis=0)[None, :])
        proj = tl.sum(ds * s, axis=0)  # qh . dqh, without another pass over C
        proj = tl.where(tl.sqrt(qsq) >= EPS, proj, 0.0)
        ds_op = ds.to(DOT_DTYPE)
        w_op = w.to(DOT_DTYPE)

        # Pass 2 over C: dQ chunk by chunk; dkh = dS qh^T and dV = W dO^T into the reduction.
        dq_img = dq_ptr + b * stride_dqb
        for c0 in range(0, C, BLOCK_C):
            offs_c, mask_c, mask_cp, q, do = _load_query_and_grad_chunk(
                q_img, do_img, c0, C, offs_p, mask_p, stride_qc, stride_qp, stride_doc, stride_dop, BLOCK_C)
            mask_lc = mask_l[:, None] & mask_c[None, :]
            kt = tl.load(k_ptr + offs_c[:, None] * stride_kc + offs_l[None, :] * stride_kl,
                         mask=mask_c[:, None] & mask_l[None, :], other=0.0)  # [C, L]
            # kh^T dS with the keys normalised in fp32 before the cast to the dot dtype: |kh| <= 1,
            # whereas dS / |k| (up to 1 / EPS for a zero key) overflows fp16 and makes dQ NaN.
            kht = (kt.to(tl.float32) * inv_k[None, :]).to(DOT_DTYPE)
            qh = q.to(tl.float32) * inv_q[None, :]
            dqh = tl.dot(kht, ds_op, input_precision=PRECISION)  # [C, P]
            dq = (dqh - qh * proj[None, :]) * inv_q[None, :]
            tl.store(dq_img + offs_c[:, None] * stride_dqc + offs_p[None, :] * stride_dqp,
                     dq.to(dq_ptr.dtype.element_ty), mask=mask_cp)

            dkh = tl.dot(ds_op, tl.trans(qh.to(DOT_DTYPE)), input_precision=PRECISION)  # [L, C]
            dv = tl.dot(w_op, tl.trans(do.to(DOT_DTYPE)), input_precision=PRECISION)  # [L, C]
            acc_idx = acc_off + offs_l[:, None] * C + offs_c[None, :]
            if DETERMINISTIC:  # this program's own partial sums: plain read-modify-write
                tl.store(dkh_ptr + acc_idx, tl.load(dkh_ptr + acc_idx, mask=mask_lc, other=0.0) + dkh,
                         mask=mask_lc)
                tl.store(dv_ptr + acc_idx, tl.load(dv_ptr + acc_idx, mask=mask_lc, other=0.0) + dv,
                         mask=mask_lc)
            else:
                tl.atomic_add(dkh_ptr + acc_idx, dkh, mask=mask_lc)
                tl.atomic_add(dv_ptr + acc_idx, dv, mask=mask_lc)


# ---- launch parameters ---------------------------------------------------------------------------


# Hand-picked tiles (no autotuning), (BLOCK_P, BLOCK_C, num_warps) by (16-bit dtype?, BLOCK_L), checked
# by compiling for sm_80 and sm_90 (Triton 3.8, ptxas -v): every choice compiles without register
# spills except the fp32 backward at BLOCK_L 64 (a few dozen bytes: tf32x3 splits every operand into
# two TF32 halves), and all fit the 99 KB of shared memory of consumer Ampere as well. Their speed
# is what benchmarks/gpu_bench.py measures on a GPU.
#
# Forward: the [BLOCK_L, BLOCK_P] fp32 score tile stays in registers across both C loops, so
# BLOCK_L * BLOCK_P stays at 2-4K elements; BLOCK_C makes one chunk row 128 bytes (64 half / 32 fp32
# channels: a full coalesced line for channels_last; for NCHW the rows run along the pixels); 8 warps
# keep registers per thread at 120-200 (sm_90), 3 pipeline stages for 16-bit inputs, 2 for fp32.
_FWD_TILES = {
    (True, 16): (128, 64, 8), (True, 32): (128, 64, 8), (True, 64): (64, 64, 8), (True, 128): (32, 64, 8),
    (False, 16): (128, 32, 8), (False, 32): (128, 32, 8), (False, 64): (64, 32, 8), (False, 128): (32, 32, 8),
}
# Backward: scores, dW and the softmax temporaries are live at once and the second C loop holds three
# [BLOCK_L, BLOCK_P] dot operands, so BLOCK_C drops to 16 where needed to avoid spills; BLOCK_P stays
# as large as registers allow (64 for 16-bit inputs up to L = 64) because every tile adds its L x C
# contribution to the dK/dV reduction, traffic that shrinks relative to the query reads as BLOCK_P grows.
_BWD_TILES = {
    (True, 16): (64, 32, 4), (True, 32): (64, 32, 8), (True, 64): (64, 16, 8), (True, 128): (32, 16, 8),
    (False, 16): (64, 16, 8), (False, 32): (32, 16, 8), (False, 64): (32, 16, 8), (False, 128): (16, 16, 8),
}


MAX_BLOCK_L = max(block_l for _, block_l in _FWD_TILES)


def fused(l: int) -> bool:
    """Whether the Triton kernels serve a memory of ``l`` items (one key block of at most
    MAX_BLOCK_L); larger memories go to the reference."""
    return next_pow2(l, 16) <= MAX_BLOCK_L


def _tiles(table: dict, c: int, l: int, dtype: torch.dtype) -> dict:
    if not fused(l):
        raise ValueError(f"keys: the Triton kernels take at most {MAX_BLOCK_L} memory items, got L = {l}")
    block_l = next_pow2(l, 16)
    block_p, block_c, num_warps = table[(is_half(dtype), block_l)]
    return dict(BLOCK_L=block_l, BLOCK_P=block_p, BLOCK_C=min(block_c, next_pow2(c, 16)),
                num_warps=num_warps)


def forward_config(c: int, l: int, dtype: torch.dtype) -> dict:
    """Launch parameters of the forward kernel for C channels, L keys and the input dtype."""
    return dict(_tiles(_FWD_TILES, c, l, dtype), num_stages=3 if is_half(dtype) else 2)


def backward_config(c: int, l: int, dtype: torch.dtype) -> dict:
    """Launch parameters of the backward kernel for C channels, L keys and the input dtype."""
    return dict(_tiles(_BWD_TILES, c, l, dtype), num_stages=2)


def _apply_overrides(cfg: dict, block_p, block_c, num_warps) -> dict:
    for key, value in (("BLOCK_P", block_p), ("BLOCK_C", block_c), ("num_warps", num_warps)):
        if value is not None:
            if key != "num_warps" and (value < 16 or value & (value - 1)):
                raise ValueError(f"{key.lower()}: expected a power of two >= 16, got {value}")
            cfg[key] = int(value)
    return cfg


def _check(query, keys, values):
    check_dtype(query, "query")
    if query.dim() != 4 or keys.dim() != 2 or values.shape != keys.shape or keys.shape[1] != query.shape[1]:
        raise ValueError(
            f"nr_recall: expected query [B, C, H, W] and keys, values [L, C]; got {tuple(query.shape)}, "
            f"{tuple(keys.shape)}, {tuple(values.shape)}"
        )
    if keys.dtype != query.dtype or values.dtype != query.dtype:
        raise TypeError("nr_recall: query, keys and values must share one dtype")


# ---- launchers -----------------------------------------------------------------------------------


@on_tensor_device
def nr_recall_forward(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    input_precision: str | None = None,
    block_p: int | None = None,
    block_c: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """NR recall forward: [B, C, H, W] in query's dtype and memory format (channels_last stays)."""
    _check(query, keys, values)
    if not fused(keys.shape[0]):
        return reference.nr_recall(query, keys, values).contiguous(memory_format=map_format(query))
    b, c, h, w = query.shape
    l, hw = keys.shape[0], h * w
    q, (sqb, sqc, sqp) = as_pixel_major(query)
    out = empty_map(query.shape, query)
    _, (sob, soc, sop) = as_pixel_major(out)
    cfg = _apply_overrides(forward_config(c, l, query.dtype), block_p, block_c, num_warps)
    grid = (triton.cdiv(hw, cfg["BLOCK_P"]), b)
    _nr_recall_fwd_kernel[grid](
        q, keys, values, out,
        c, hw, l,
        sqb, sqc, sqp,
        keys.stride(0), keys.stride(1),
        values.stride(0), values.stride(1),
        sob, soc, sop,
        EPS=EPS,
        DOT_DTYPE=dot_dtype(query.dtype, query.device),
        PRECISION=resolve_precision(input_precision, query.dtype),
        **cfg,
    )
    return out


def _num_programs(num_tiles: int, l: int, c: int, device: torch.device, deterministic: bool,
                  max_programs: int | None) -> int:
    """Persistent backward grid: 2 programs per SM (the backward's ~250 registers x 4-8 warps leave
    room for one or two resident programs per SM, more would only queue), in deterministic mode no
    more than the two [G, L, C] fp32 partial buffers' 128 MiB budget allows but at least one per SM
    (L = 50, C = 2048 on 132 SMs: G = 163, 130 MB); on the interpreter one program per pixel tile."""
    if max_programs is not None:
        cap = int(max_programs)
    elif device.type == "cuda":
        sms = num_sms(device)
        cap = 2 * sms
        if deterministic:
            cap = min(cap, max(sms, (128 << 20) // (2 * 4 * l * c)))
    else:
        cap = num_tiles
    return max(1, min(num_tiles, cap))


@on_tensor_device
def nr_recall_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    input_precision: str | None = None,
    deterministic: bool | None = None,
    max_programs: int | None = None,
    block_p: int | None = None,
    block_c: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dQuery, dKeys, dValues) of :func:`nr_recall_forward`, each in its input's dtype.

    ``deterministic`` (default: the module setting, True) reduces dK/dV through per-program partial
    sums instead of atomics; ``max_programs`` caps the persistent grid (tests use it to make
    programs loop over several pixel tiles).
    """
    _check(query, keys, values)
    if grad_out.shape != query.shape:
        raise ValueError(f"grad_out: expected shape {tuple(query.shape)}, got {tuple(grad_out.shape)}")
    if not fused(keys.shape[0]):
        dq, dk, dv = reference.nr_recall_backward(grad_out, query, keys, values)
        return dq.contiguous(memory_format=map_format(query)), dk, dv
    deterministic = resolve_deterministic(deterministic)
    b, c, h, w = query.shape
    l, hw = keys.shape[0], h * w
    q, (sqb, sqc, sqp) = as_pixel_major(query)
    g, (sgb, sgc, sgp) = as_pixel_major(grad_out.to(query.dtype))
    dq = empty_map(query.shape, query)
    _, (sdb, sdc, sdp) = as_pixel_major(dq)
    cfg = _apply_overrides(backward_config(c, l, query.dtype), block_p, block_c, num_warps)

    tiles_per_image = triton.cdiv(hw, cfg["BLOCK_P"])
    num_tiles = b * tiles_per_image
    programs = _num_programs(num_tiles, l, c, query.device, deterministic, max_programs)
    rows = programs if deterministic else 1
    dkh = torch.zeros((rows, l, c), dtype=torch.float32, device=query.device)
    dv = torch.zeros((rows, l, c), dtype=torch.float32, device=query.device)
    _nr_recall_bwd_kernel[(programs,)](
        q, keys, values, g, dq, dkh, dv,
        c, hw, l, num_tiles, tiles_per_image,
        sqb, sqc, sqp,
        keys.stride(0), keys.stride(1),
        values.stride(0), values.stride(1),
        sgb, sgc, sgp,
        sdb, sdc, sdp,
        l * c if deterministic else 0,
        EPS=EPS,
        DOT_DTYPE=dot_dtype(query.dtype, query.device),
        PRECISION=resolve_precision(input_precision, query.dtype),
        DETERMINISTIC=deterministic,
        **cfg,
    )
    if deterministic:  # fixed-order reduction of the partial sums
        dkh, dv = dkh.sum(0), dv.sum(0)
    else:
        dkh, dv = dkh[0], dv[0]

    # Key normalisation Jacobian on the reduced dkh: (dkh - kh (kh . dkh)) / |k|.
    kf = keys.float()
    knorm = kf.norm(dim=1, keepdim=True)
    kh = kf / knorm.clamp_min(EPS)
    proj = (kh * dkh).sum(1, keepdim=True) * (knorm >= EPS)
    dk = (dkh - kh * proj) / knorm.clamp_min(EPS)
    return dq, dk.to(keys.dtype), dv.to(values.dtype)
