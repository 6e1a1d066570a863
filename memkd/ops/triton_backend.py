"""The Triton kernels (kernels/, installed as memkd.kernels) as memkd op implementations.

``KERNELS`` maps each op name to a function with exactly the reference's signature and return
convention (memkd.ops.reference); memkd.ops registers them as the ops' CUDA kernels when the Triton
backend is selected (``memkd.ops.set_cuda_backend("triton")``). They use the module-level settings
of memkd.kernels (``set_input_precision``, default "tf32x3"; ``set_deterministic``, default True).
float64 inputs, which the Triton kernels do not take, are served by the reference.

Importing this module raises ImportError when triton (or the kernels package) is unavailable.
"""
from __future__ import annotations

from typing import Sequence

import torch

try:
    import triton  # noqa: F401

    from memkd import kernels as _kernels
except ImportError:
    raise
except Exception as exc:  # a broken triton install must not crash `import memkd.ops`
    raise ImportError(f"the Triton kernels failed to load: {type(exc).__name__}: {exc}") from exc

from memkd.ops import reference

__all__ = ["KERNELS"]


def nr_recall(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    if query.dtype == torch.float64:
        return reference.nr_recall(query, keys, values)
    return _kernels.nr_recall_forward(query, keys, values)


def nr_recall_backward(
    grad_out: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if query.dtype == torch.float64:
        return reference.nr_recall_backward(grad_out, query, keys, values)
    return _kernels.nr_recall_backward(grad_out, query, keys, values)


def cosine_distance_map(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    if fs.dtype == torch.float64:
        return reference.cosine_distance_map(fs, ft)
    return _kernels.cosine_distance_map_forward(fs, ft)


def cosine_distance_map_backward(
    grad_out: torch.Tensor, fs: torch.Tensor, ft: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if fs.dtype == torch.float64:
        return reference.cosine_distance_map_backward(grad_out, fs, ft)
    return _kernels.cosine_distance_map_backward(grad_out, fs, ft)


def anomaly_map(
    student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    out_size: Sequence[int],
    sigma: float = 4.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    if student_features[0].dtype == torch.float64:
        return reference.anomaly_map(student_features, teacher_features, out_size, sigma)
    return _kernels.anomaly_map_forward(student_features, teacher_features, out_size, sigma)


KERNELS = {
    "nr_recall": nr_recall,
    "nr_recall_backward": nr_recall_backward,
    "cosine_distance_map": cosine_distance_map,
    "cosine_distance_map_backward": cosine_distance_map_backward,
    "anomaly_map": anomaly_map,
}
