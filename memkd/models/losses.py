"""The MemKD loss terms (paper Eq. 1-2, 7, 8-10). All are computed in fp32 whatever the autocast
dtype of the features."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from memkd.ops import cosine_distance_map, nr_recall

KD_MODES = ("flat", "pixel")
NM_REDUCTIONS = ("sum", "mean")


def kd_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], mode: str = "flat") -> torch.Tensor:
    """L_KD (Eq. 1-2): the sum over stages of the batch mean of a cosine distance.

    ``mode="flat"`` (the paper and RD4AD): 1 - cos(flatten(F_S[b]), flatten(F_T[b])) over each whole
    C x H x W map. ``mode="pixel"``: 1 - cos over channels at every pixel, averaged over pixels too.
    """
    if mode not in KD_MODES:
        raise ValueError(f"kd_mode: expected one of {KD_MODES}, got {mode!r}")
    total = student[0].new_zeros((), dtype=torch.float32)
    for fs, ft in zip(student, teacher, strict=True):
        fs, ft = fs.float(), ft.float()
        if mode == "flat":
            distance = 1.0 - F.cosine_similarity(fs.flatten(1), ft.flatten(1), dim=1)
        else:
            distance = cosine_distance_map(fs, ft)
        total = total + distance.mean()
    return total


def normality_memorization_loss(features: torch.Tensor, values: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """L_NM of one memory (Eq. 8-10) for exemplar features [N, C, H, W] and values [L, C].

    Each exemplar feature is rebuilt from the values alone, rec[:, j] = sum_l softmax_l(cos(f[:, j],
    v_l)) v_l (Eq. 8-9: NR recall with keys := values), then
    ``reduction="sum"`` (default; Eq. 10 read literally): L_NM = (1/N) sum_n ||f_n - rec_n||_2^2,
    the squared L2 norm over the whole C x H x W map, averaged over the N exemplars;
    ``reduction="mean"``: the same divided by C*H*W (a per-element mean squared error).
    The teacher features are constants; the gradient reaches the values through both their
    addressing and their content.
    """
    if reduction not in NM_REDUCTIONS:
        raise ValueError(f"nm_reduction: expected one of {NM_REDUCTIONS}, got {reduction!r}")
    features, values = features.float(), values.float()
    squared_error = (features - nr_recall(features, values, values)).pow(2).flatten(1)
    per_exemplar = squared_error.sum(1) if reduction == "sum" else squared_error.mean(1)
    return per_exemplar.mean()


def orthogonal_loss(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """L_Orth (Eq. 7) = (1/L^2) sum_i sum_j cos(k_i, v_j): the mean cosine between every key and
    every value, signed as in the paper (its minimum, -1, is reached with keys opposite the values)."""
    return (F.normalize(keys.float(), dim=1) @ F.normalize(values.float(), dim=1).t()).mean()
