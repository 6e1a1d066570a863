"""Argument checks shared by the memkd ops (each op's own checks live in memkd/ops/<op>.py), mirrored
in csrc/ops/checks.h: each error names the argument and what was expected, so bad input never
reaches a kernel."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_float_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating dtype (float32, float64, float16 or bfloat16), got {x.dtype}"
        )


def check_feature_map(x, name: str) -> None:
    check_float_tensor(x, name)
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D [B, C, H, W] tensor, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty batch, got shape {tuple(x.shape)}")
    if min(x.shape[1:]) == 0:
        raise ValueError(f"{name}: expected non-zero C, H and W, got shape {tuple(x.shape)}")


def check_same_device_dtype(ref, ref_name: str, x, name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} like {ref_name}, got {x.device}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} like {ref_name}, got {x.dtype}")
