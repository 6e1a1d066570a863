"""Memory modules placed in the student: the paper's NR Memory and a MemAE-style baseline.

Both return the query concatenated with what they recall (2C channels, paper Fig. 3), so the
student stage that follows takes twice the channels.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from memkd.ops import nr_recall


def _check_sizes(channels: int, items: int) -> None:
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels: expected an int >= 1, got {channels!r}")
    if not isinstance(items, int) or items < 1:
        raise ValueError(f"items: expected an int >= 1 (memory items per module), got {items!r}")


class ConcatMemory(nn.Module):
    """A memory whose output is ``cat([query, recall(query)], dim=1)``."""

    def recall(self, query: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        return torch.cat([query, self.recall(query)], dim=1)


class NRMemory(ConcatMemory):
    """Normality Recall Memory (paper Sec. 4.1): ``items`` key-value pairs k_l, v_l in R^channels.

    recall(q)[:, j] = sum_l softmax_l(cos(q[:, j], k_l)) v_l (Eq. 5-6), through the fused
    ``memkd.ops.nr_recall``. Keys and values are standard-normal parameters at initialisation (the
    paper: "randomly initialize"); NEL trains the values towards teacher features (Eq. 8-10).
    """

    def __init__(self, channels: int, items: int = 50):
        super().__init__()
        _check_sizes(channels, items)
        self.keys = nn.Parameter(torch.randn(items, channels))
        self.values = nn.Parameter(torch.randn(items, channels))

    def recall(self, query: torch.Tensor) -> torch.Tensor:
        # Under autocast the query is bf16/fp16; the op wants one dtype (it accumulates in fp32).
        return nr_recall(query, self.keys.to(query.dtype), self.values.to(query.dtype))

    def extra_repr(self) -> str:
        return f"channels={self.keys.shape[1]}, items={self.keys.shape[0]}"


class MemAEMemory(ConcatMemory):
    """MemAE's memory (Gong et al., ICCV 2019; paper Fig. 4b, Table 3): one matrix M of ``items``
    rows, no keys. Addressing: w = softmax_l(q . m_l) (dot product, as MemAE's code), hard
    shrinkage ``relu(w - t) * w / (|w - t| + 1e-12)`` with threshold t (default 1/items, the lower
    end of MemAE's advice [1/L, 3/L]), L1 re-normalisation; recall = sum_l w_l m_l. MemAE's
    entropy loss on w is not part of this baseline (the paper's comparison swaps the module only).
    """

    def __init__(self, channels: int, items: int = 50, shrink_threshold: Optional[float] = None):
        super().__init__()
        _check_sizes(channels, items)
        self.shrink_threshold = 1.0 / items if shrink_threshold is None else float(shrink_threshold)
        bound = 1.0 / math.sqrt(channels)  # MemAE's initialisation
        self.memory = nn.Parameter(torch.empty(items, channels).uniform_(-bound, bound))

    def recall(self, query: torch.Tensor) -> torch.Tensor:
        memory = self.memory.to(query.dtype)
        logits = torch.einsum("bchw,lc->blhw", query, memory).float()
        weights = torch.softmax(logits, dim=1)
        shifted = weights - self.shrink_threshold
        weights = F.relu(shifted) * weights / (shifted.abs() + 1e-12)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return torch.einsum("blhw,lc->bchw", weights.to(query.dtype), memory)

    def extra_repr(self) -> str:
        items, channels = self.memory.shape
        return f"channels={channels}, items={items}, shrink_threshold={self.shrink_threshold:g}"
