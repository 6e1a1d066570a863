"""Argument checks of the memkd ops, mirrored in csrc/ops/checks.h: each error names the argument
and what was expected, so bad input never reaches a kernel."""
from __future__ import annotations

from typing import Sequence

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


def check_nr_recall_args(query, keys, values) -> None:
    check_feature_map(query, "query")
    check_float_tensor(keys, "keys")
    check_float_tensor(values, "values")
    if keys.dim() != 2:
        raise ValueError(f"keys: expected a 2-D [L, C] tensor, got shape {tuple(keys.shape)}")
    if keys.shape[0] == 0:
        raise ValueError("keys: expected at least one memory item (L >= 1), got L = 0")
    if keys.shape[1] != query.shape[1]:
        raise ValueError(
            f"keys: expected C = {query.shape[1]} channels to match query, got shape {tuple(keys.shape)}"
        )
    if values.shape != keys.shape:
        raise ValueError(
            f"values: expected the shape of keys {tuple(keys.shape)}, got {tuple(values.shape)}"
        )
    check_same_device_dtype(query, "query", keys, "keys")
    check_same_device_dtype(query, "query", values, "values")


def check_cosine_distance_map_args(fs, ft, fs_name: str = "fs", ft_name: str = "ft") -> None:
    check_feature_map(fs, fs_name)
    check_feature_map(ft, ft_name)
    if fs.shape != ft.shape:
        raise ValueError(f"{ft_name}: expected the shape of {fs_name} {tuple(fs.shape)}, got {tuple(ft.shape)}")
    check_same_device_dtype(fs, fs_name, ft, ft_name)


def check_anomaly_map_args(
    student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    out_size: Sequence[int],
    sigma: float,
) -> None:
    if len(student_features) == 0:
        raise ValueError("student_features: expected at least one stage, got none")
    if len(student_features) != len(teacher_features):
        raise ValueError(
            f"teacher_features: expected {len(student_features)} stages like student_features, "
            f"got {len(teacher_features)}"
        )
    if len(out_size) != 2 or any(int(s) <= 0 for s in out_size):
        raise ValueError(f"out_size: expected two positive integers (H, W), got {tuple(out_size)}")
    if not sigma >= 0:
        raise ValueError(f"sigma: expected a value >= 0, got {sigma}")
    first = student_features[0]
    for i, (fs, ft) in enumerate(zip(student_features, teacher_features)):
        check_cosine_distance_map_args(fs, ft, f"student_features[{i}]", f"teacher_features[{i}]")
        check_same_device_dtype(first, "student_features[0]", fs, f"student_features[{i}]")
        if fs.shape[0] != first.shape[0]:
            raise ValueError(
                f"student_features[{i}]: expected batch {first.shape[0]} like stage 0, got {fs.shape[0]}"
            )
