"""Triton kernels of the memkd ops (installed as ``memkd.kernels``; needs ``triton``).

One file per op, each with its forward kernel, backward kernel (where the op has one), launchers and
an autograd wrapper (Liger-Kernel style):

* :mod:`memkd.kernels.nr_recall` — ``nr_recall_forward``, ``nr_recall_backward``,
  ``NRRecallFunction`` (and ``nr_recall``, its ``apply``)
* :mod:`memkd.kernels.cosine_distance_map` — ``cosine_distance_map_forward``,
  ``cosine_distance_map_backward``, ``CosineDistanceMapFunction`` (and ``cosine_distance_map``)
* :mod:`memkd.kernels.anomaly_map` — ``anomaly_map_forward`` (inference only)

The package re-exports the launchers and autograd Functions, but not the module-named functions, so
``memkd.kernels.nr_recall`` etc. stay the modules.

Settings (see :mod:`memkd.kernels._common`): ``set_input_precision("ieee" | "tf32x3" | "tf32")`` for
fp32 dots (default "tf32x3"), ``set_deterministic(True | False)`` for the NR-recall backward's dK/dV
reduction (default True: no atomics, bitwise-reproducible). Both can also be given per call.
Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set before import).
memkd.ops serves these kernels on CUDA tensors after ``memkd.ops.set_cuda_backend("triton")``.
"""
from memkd.kernels._common import (
    EPS,
    INPUT_PRECISIONS,
    get_deterministic,
    get_input_precision,
    set_deterministic,
    set_input_precision,
)
from memkd.kernels.anomaly_map import anomaly_map_forward
from memkd.kernels.cosine_distance_map import (
    CosineDistanceMapFunction,
    cosine_distance_map_backward,
    cosine_distance_map_forward,
)
from memkd.kernels.nr_recall import NRRecallFunction, nr_recall_backward, nr_recall_forward

__all__ = [
    "EPS",
    "INPUT_PRECISIONS",
    "CosineDistanceMapFunction",
    "NRRecallFunction",
    "anomaly_map_forward",
    "cosine_distance_map_backward",
    "cosine_distance_map_forward",
    "get_deterministic",
    "get_input_precision",
    "nr_recall_backward",
    "nr_recall_forward",
    "set_deterministic",
    "set_input_precision",
]
