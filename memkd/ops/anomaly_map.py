"""memkd::anomaly_map, anomaly maps and image scores (paper Eq. 3-4; inference only): the public
function, its argument checks, its schema, fake kernel and backends."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from memkd.ops import _registry, reference
from memkd.ops.cosine_distance_map import check_cosine_distance_map_args
from memkd.ops.validation import check_same_device_dtype

SCHEMAS = {
    "anomaly_map": (
        "anomaly_map(Tensor[] student_features, Tensor[] teacher_features, int[2] out_size, "
        "float sigma=4.0) -> (Tensor, Tensor)"
    ),
}


def check_anomaly_map_args(
    student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    out_size: Sequence[int],
    sigma: float,
) -> None:
    """Mirrored by check_anomaly_map_args in csrc/ops/checks.h (the compiled kernels' own checks)."""
    if len(student_features) == 0:
        raise ValueError("student_features: expected at least one stage, got none")
    if len(student_features) != len(teacher_features):
        raise ValueError(
            f"teacher_features: expected {len(student_features)} stages like student_features, "
            f"got {len(teacher_features)}"
        )
    if len(out_size) != 2 or any(int(s) <= 0 for s in out_size):
        raise ValueError(f"out_size: expected two positive integers (H, W), got {tuple(out_size)}")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma: expected a finite value >= 0, got {sigma}")
    first = student_features[0]
    for i, (fs, ft) in enumerate(zip(student_features, teacher_features)):
        check_cosine_distance_map_args(fs, ft, f"student_features[{i}]", f"teacher_features[{i}]")
        check_same_device_dtype(first, "student_features[0]", fs, f"student_features[{i}]")
        if fs.shape[0] != first.shape[0]:
            raise ValueError(
                f"student_features[{i}]: expected batch {first.shape[0]} like stage 0, got {fs.shape[0]}"
            )


def anomaly_map(
    student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    out_size: Sequence[int],
    sigma: float = 4.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly maps [B, H, W] and image scores [B] from K stages of features (paper Eq. 3-4).

    Per stage cosine distance, bilinear upsampling (align_corners=True) to ``out_size``, sum over
    stages, Gaussian blur with scipy's semantics (truncate 4.0, 'reflect' borders; ``sigma=0``
    skips it), score = per-image max. NaN rule, the same on every backend: a NaN feature gives NaN
    map pixels (as far as the upsampling and blur spread it) and an image with any NaN map pixel
    gets a NaN score (torch.amax's rule), never a finite score or -inf. Inference only.
    """
    student_features, teacher_features = list(student_features), list(teacher_features)
    out_size = [int(s) for s in out_size]
    check_anomaly_map_args(student_features, teacher_features, out_size, sigma)
    return torch.ops.memkd.anomaly_map(student_features, teacher_features, out_size, float(sigma))


def _triton_kernels():
    """The Triton kernel with the reference's signature; float64, which it does not take, goes to
    the reference. Raises ImportError without triton."""
    from memkd import kernels as K

    def forward(
        student_features: Sequence[torch.Tensor],
        teacher_features: Sequence[torch.Tensor],
        out_size: Sequence[int],
        sigma: float = 4.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if student_features[0].dtype == torch.float64:
            return reference.anomaly_map(student_features, teacher_features, out_size, sigma)
        return K.anomaly_map_forward(student_features, teacher_features, out_size, sigma)

    return {"anomaly_map": forward}


OP = _registry.register(
    _registry.Op(
        name="anomaly_map",
        schemas=SCHEMAS,
        reference={"anomaly_map": reference.anomaly_map},
        triton=_triton_kernels,
    )
)


@torch.library.register_fake("memkd::anomaly_map")
def _anomaly_map_fake(student_features, teacher_features, out_size, sigma=4.0):
    check_anomaly_map_args(student_features, teacher_features, out_size, sigma)
    first = student_features[0]
    b = first.shape[0]
    return first.new_empty((b, out_size[0], out_size[1])), first.new_empty((b,))
