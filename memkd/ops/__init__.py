"""The fused memkd ops: NR Memory recall, the per-pixel cosine distance map and the anomaly map.

``from memkd.ops import nr_recall`` is the public API. Each call validates its arguments, then goes
through the PyTorch dispatcher (``torch.ops.memkd.*``), which picks the kernel for the tensors'
device: fused C++ on the CPU, CUDA C++ or Triton on GPUs, the plain PyTorch reference as fallback.
``backends()`` says which one serves each op and why; ``set_backend(device, name)`` switches
(``set_backend("cpu", "reference")``, ``set_backend("cuda", "triton")``, ...).

Each op lives in ``memkd/ops/<op>.py`` (see memkd/ops/_registry.py and CONTRIBUTING.md); the
package exports the functions, so ``memkd.ops.nr_recall`` is the function, not the module.
"""
from __future__ import annotations

import torch

from memkd.ops import reference
from memkd.ops._registry import backend, backends, set_backend
from memkd.ops.nr_recall import nr_recall
from memkd.ops.cosine_distance_map import cosine_distance_map
from memkd.ops.anomaly_map import anomaly_map

__all__ = [
    "nr_recall",
    "cosine_distance_map",
    "anomaly_map",
    "backends",
    "backend",
    "set_backend",
    "reference",
]

if torch.cuda.is_available():  # the compiled CUDA kernels, or else the Triton or reference ones
    set_backend("cuda", "default")
