"""Plain PyTorch versions of the memkd ops: the ground truth in tests and the fallback backend.

Every backend follows one epsilon convention: a vector is normalised as ``x / max(||x||_2, EPS)``
with ``EPS = 1e-8``, so a zero vector has cosine 0 with anything, never NaN (the same convention as
``torch.nn.functional.cosine_similarity``). Reductions run in fp32 (fp64 for fp64 inputs) and
results come back in the input dtype.

These are written to be fast as composites (two GEMMs per batch, no [B, HW, L, C] broadcasts),
because the benchmarks compare the fused kernels against them.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F

EPS = 1e-8
GAUSSIAN_TRUNCATE = 4.0


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _normalize(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x / x.norm(dim=dim, keepdim=True).clamp_min(EPS)


def nr_recall(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """NR Memory recall (paper Eq. 5-6): out[:, j] = sum_l softmax_l(cos(query[:, j], keys[l])) values[l].

    query [B, C, H, W], keys [L, C], values [L, C] -> [B, C, H, W] in query's dtype.
    """
    b, c, h, w = query.shape
    acc = _acc_dtype(query.dtype)
    q = query.to(acc).reshape(b, c, h * w)
    k = _normalize(keys.to(acc), dim=1)
    inv_qnorm = q.norm(dim=1, keepdim=True).clamp_min(EPS).reciprocal()  # [B, 1, HW]
    scores = torch.matmul(k, q) * inv_qnorm  # [B, L, HW]
    weights = torch.softmax(scores, dim=1)
    out = torch.matmul(values.to(acc).t(), weights)  # [B, C, HW]
    return out.reshape(b, c, h, w).to(query.dtype)


def nr_recall_backward(
    grad_out: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed-form gradients of :func:`nr_recall` for query, keys and values (the fused kernels' recipe).

    With qh = q/|q|, kh = k/|k|, S = kh qh, W = softmax_L(S):
    dV = W dO^T, dS = W * (V dO - sum_l W * V dO), dqh = kh^T dS, dkh = dS qh^T, and the
    normalisation's Jacobian (x - xh (xh . dx)) / |x|, whose projection vanishes where |x| < EPS.
    """
    b, c, h, w = query.shape
    acc = _acc_dtype(query.dtype)
    q = query.to(acc).reshape(b, c, h * w)
    g = grad_out.to(acc).reshape(b, c, h * w)
    k, v = keys.to(acc), values.to(acc)
    knorm = k.norm(dim=1, keepdim=True)
    kh = k / knorm.clamp_min(EPS)
    qnorm = q.norm(dim=1, keepdim=True)
    qh = q / qnorm.clamp_min(EPS)
    weights = torch.softmax(torch.matmul(kh, qh), dim=1)  # [B, L, HW]
    grad_values = torch.matmul(weights, g.transpose(1, 2)).sum(0)  # [L, C]
    grad_weights = torch.matmul(v, g)  # [B, L, HW]
    grad_scores = weights * (grad_weights - (weights * grad_weights).sum(1, keepdim=True))
    grad_qh = torch.matmul(kh.t(), grad_scores)  # [B, C, HW]
    proj_q = (qh * grad_qh).sum(1, keepdim=True) * (qnorm >= EPS)
    grad_query = (grad_qh - qh * proj_q) / qnorm.clamp_min(EPS)
    grad_kh = torch.matmul(grad_scores, qh.transpose(1, 2)).sum(0)  # [L, C]
    proj_k = (kh * grad_kh).sum(1, keepdim=True) * (knorm >= EPS)
    grad_keys = (grad_kh - kh * proj_k) / knorm.clamp_min(EPS)
    return (
        grad_query.reshape(b, c, h, w).to(query.dtype),
        grad_keys.to(keys.dtype),
        grad_values.to(values.dtype),
    )


def cosine_distance_map(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """1 - cos(fs[:, :, h, w], ft[:, :, h, w]) per pixel (paper Eq. 3): [B, C, H, W] x 2 -> [B, H, W]."""
    acc = _acc_dtype(fs.dtype)
    a, b = fs.to(acc), ft.to(acc)
    dot = (a * b).sum(dim=1)
    na = a.norm(dim=1).clamp_min(EPS)
    nb = b.norm(dim=1).clamp_min(EPS)
    return (1.0 - dot / (na * nb)).to(fs.dtype)


def cosine_distance_map_backward(
    grad_out: torch.Tensor, fs: torch.Tensor, ft: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form gradients of :func:`cosine_distance_map`: d(1 - ah.bh)/da = -(bh - ah cos) / |a|."""
    acc = _acc_dtype(fs.dtype)
    a, b = fs.to(acc), ft.to(acc)
    g = grad_out.to(acc).unsqueeze(1)
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    ah, bh = a / na.clamp_min(EPS), b / nb.clamp_min(EPS)
    cos = (ah * bh).sum(1, keepdim=True)
    grad_fs = -g * (bh - ah * cos * (na >= EPS)) / na.clamp_min(EPS)
    grad_ft = -g * (ah - bh * cos * (nb >= EPS)) / nb.clamp_min(EPS)
    return grad_fs.to(fs.dtype), grad_ft.to(ft.dtype)


@lru_cache(maxsize=None)
def gaussian_taps(sigma: float, truncate: float = GAUSSIAN_TRUNCATE) -> tuple[float, ...]:
    """scipy.ndimage.gaussian_filter's 1-D kernel: radius int(truncate * sigma + 0.5), normalised."""
    radius = int(truncate * sigma + 0.5)
    phi = [math.exp(-0.5 * (x / sigma) ** 2) for x in range(-radius, radius + 1)]
    total = math.fsum(phi)
    return tuple(p / total for p in phi)


def reflect_indices(n: int, radius: int, device=None) -> torch.Tensor:
    """Source index for each padded position under scipy's 'reflect' (d c b a | a b c d | d c b a)."""
    i = torch.arange(-radius, n + radius, device=device)
    period = 2 * n
    i = torch.remainder(i, period)
    return torch.where(i >= n, period - 1 - i, i)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, H, W] maps with scipy.ndimage.gaussian_filter's semantics."""
    taps = torch.tensor(gaussian_taps(float(sigma)), dtype=maps.dtype, device=maps.device)
    radius = (taps.numel() - 1) // 2
    b, h, w = maps.shape
    x = maps.index_select(2, reflect_indices(w, radius, maps.device))
    x = F.conv1d(x.reshape(b * h, 1, -1), taps.view(1, 1, -1)).reshape(b, h, w)
    x = x.transpose(1, 2).index_select(2, reflect_indices(h, radius, maps.device))
    x = F.conv1d(x.reshape(b * w, 1, -1), taps.view(1, 1, -1)).reshape(b, w, h)
    return x.transpose(1, 2).contiguous()


def anomaly_map(
    student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    out_size: Sequence[int],
    sigma: float = 4.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly maps and image scores (paper Eq. 3-4).

    Per stage 1 - cos over channels, bilinear upsampling (align_corners=True) to ``out_size``, sum
    over stages, Gaussian blur (sigma, truncate 4.0, 'reflect' borders), score = per-image max.
    Returns maps [B, H, W] and scores [B] in the features' dtype.
    """
    dtype = student_features[0].dtype
    acc = _acc_dtype(dtype)
    total = None
    for fs, ft in zip(student_features, teacher_features):
        d = cosine_distance_map(fs.to(acc), ft.to(acc)).unsqueeze(1)
        d = F.interpolate(d, size=tuple(out_size), mode="bilinear", align_corners=True).squeeze(1)
        total = d if total is None else total + d
    maps = gaussian_blur(total, sigma) if sigma > 0 else total
    scores = maps.flatten(1).amax(dim=1)
    return maps.to(dtype), scores.to(dtype)
