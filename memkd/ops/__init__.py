"""The fused memkd ops: NR Memory recall, the per-pixel cosine distance map and the anomaly map.

``from memkd.ops import nr_recall`` is the public API. Each call validates its arguments, then goes
through the PyTorch dispatcher (``torch.ops.memkd.*``), which picks the kernel for the tensors'
device: fused C++ on the CPU, CUDA C++ or Triton on GPUs, the plain PyTorch reference as fallback.
``backends()`` says which one serves each op and why; ``set_cuda_backend`` switches GPU backends.
"""
from __future__ import annotations

from typing import Sequence

import torch

from memkd.ops import _library, reference
from memkd.ops.validation import (
    check_anomaly_map_args,
    check_cosine_distance_map_args,
    check_nr_recall_args,
)

__all__ = [
    "nr_recall",
    "cosine_distance_map",
    "anomaly_map",
    "backends",
    "set_cuda_backend",
    "cuda_backend",
    "reference",
]

# Each public op and the ops whose kernels move with it when its GPU backend is switched.
_OP_FAMILIES = {
    "nr_recall": ("nr_recall", "nr_recall_backward"),
    "cosine_distance_map": ("cosine_distance_map", "cosine_distance_map_backward"),
    "anomaly_map": ("anomaly_map",),
}


def nr_recall(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """NR Memory recall (paper Eq. 5-6; with keys := values also Eq. 8-9).

    For every pixel j: ``w = softmax_l(cos(query[:, j], keys[l]))``, ``out[:, j] = sum_l w_l values[l]``.
    query [B, C, H, W] (any layout, channels_last kept), keys and values [L, C], same dtype and
    device. Returns [B, C, H, W] in query's dtype; differentiable in all three inputs.
    """
    check_nr_recall_args(query, keys, values)
    return torch.ops.memkd.nr_recall(query, keys, values)


def cosine_distance_map(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Per-pixel ``1 - cos(fs[:, :, h, w], ft[:, :, h, w])`` (paper Eq. 3): two [B, C, H, W] -> [B, H, W]."""
    check_cosine_distance_map_args(fs, ft)
    return torch.ops.memkd.cosine_distance_map(fs, ft)


def anomaly_map(
    student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    out_size: Sequence[int],
    sigma: float = 4.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly maps [B, H, W] and image scores [B] from K stages of features (paper Eq. 3-4).

    Per stage cosine distance, bilinear upsampling (align_corners=True) to ``out_size``, sum over
    stages, Gaussian blur with scipy's semantics (truncate 4.0, 'reflect' borders; ``sigma=0``
    skips it), score = per-image max. Inference only.
    """
    student_features, teacher_features = list(student_features), list(teacher_features)
    out_size = [int(s) for s in out_size]
    check_anomaly_map_args(student_features, teacher_features, out_size, sigma)
    return torch.ops.memkd.anomaly_map(student_features, teacher_features, out_size, float(sigma))


# ---- backends ---------------------------------------------------------------------------------

_cuda_overrides: dict[str, torch.library.Library] = {}
_cuda_choice: dict[str, str] = {}


def _triton_kernels():
    """The Triton kernels by op name, or None and the reason they are unavailable."""
    try:
        from memkd.ops import triton_backend
    except ImportError as exc:  # no triton, or no kernels package
        return None, f"Triton unavailable: {exc}"
    return triton_backend.KERNELS, "Triton kernels"


def _default_cuda_backend(op: str) -> tuple[str, str]:
    if _library.EXTENSION.cuda_kernels:
        return "cuda", "CUDA C++ kernels compiled into memkd._C"
    kernels, why = _triton_kernels()
    if kernels is not None and all(name in kernels for name in _OP_FAMILIES[op]):
        return "triton", f"{why}; memkd._C has no CUDA kernels"
    return "reference", f"PyTorch reference; {why}; {_library.EXTENSION.reason}"


def cuda_backend(op: str) -> str:
    """The backend serving ``op`` on CUDA tensors: "cuda", "triton" or "reference"."""
    return _cuda_choice.get(op) or _default_cuda_backend(op)[0]


def set_cuda_backend(backend: str, ops: Sequence[str] = tuple(_OP_FAMILIES)) -> None:
    """Serve ``ops`` on CUDA tensors with ``backend``: "cuda" (compiled CUDA C++), "triton",
    "reference", or "default" (the automatic choice). Gradients follow the forward."""
    unknown = [op for op in ops if op not in _OP_FAMILIES]
    if unknown:
        raise ValueError(f"ops: unknown op(s) {unknown}; expected some of {list(_OP_FAMILIES)}")
    if backend not in ("default", "cuda", "triton", "reference"):
        raise ValueError(f"backend: expected 'default', 'cuda', 'triton' or 'reference', got {backend!r}")
    for op in ops:
        target = _default_cuda_backend(op)[0] if backend == "default" else backend
        if target == "cuda":
            if not _library.EXTENSION.cuda_kernels:
                raise RuntimeError(f"backend: memkd._C has no CUDA kernels ({_library.EXTENSION.reason})")
            kernels = None
        elif target == "triton":
            kernels, why = _triton_kernels()
            if kernels is None:
                raise RuntimeError(f"backend: {why}")
        else:
            kernels = _library.REFERENCE_KERNELS
        previous = _cuda_overrides.pop(op, None)
        if previous is not None:  # dropping our override lets the compiled CUDA kernel serve again
            previous._destroy()
        if kernels is not None:
            lib = torch.library.Library("memkd", "IMPL")  # noqa: TOR901
            for name in _OP_FAMILIES[op]:
                lib.impl(name, kernels[name], "CUDA", allow_override=True)
            _cuda_overrides[op] = lib
        _cuda_choice[op] = target


def backends() -> dict[str, dict[str, str]]:
    """For each op, the backend serving it on each device type and why, e.g.
    ``{"nr_recall": {"cpu": "cpp (...)", "cuda": "triton (...)"}}``."""
    ext = _library.EXTENSION
    cpu = f"cpp ({ext.reason})" if ext.loaded else f"reference ({ext.reason})"
    cuda_seen = torch.cuda.is_available()
    report = {}
    for op in _OP_FAMILIES:
        name, why = _default_cuda_backend(op)
        if op in _cuda_choice and _cuda_choice[op] != name:
            name, why = _cuda_choice[op], "selected with set_cuda_backend"
        report[op] = {"cpu": cpu, "cuda": f"{name} ({why})" + ("" if cuda_seen else "; no CUDA device visible")}
    return report


if torch.cuda.is_available():
    set_cuda_backend("default")
