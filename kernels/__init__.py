"""Triton kernels of the memkd ops (installed as ``memkd.kernels``; needs ``triton``).

One file per op, each with its forward kernel, backward kernel (where the op has one) and launchers:

* :mod:`memkd.kernels.nr_recall` — ``nr_recall_forward``, ``nr_recall_backward``
* :mod:`memkd.kernels.cosine_distance_map` — ``cosine_distance_map_forward``,
  ``cosine_distance_map_backward``
* :mod:`memkd.kernels.anomaly_map` — ``anomaly_map_forward`` (inference only)

Autograd is not here: memkd.ops registers the ops' backward formulas with the dispatcher once for
every backend, and serves these launchers on CUDA tensors after
``memkd.ops.set_backend("cuda", "triton")`` (memkd/ops/<op>.py).

Settings (see :mod:`memkd.kernels._common`): ``set_input_precision("ieee" | "tf32x3" | "tf32")`` for
fp32 dots (default "tf32x3"), ``set_deterministic(True | False)`` for the NR-recall backward's dK/dV
reduction (default True: no atomics, bitwise-reproducible). Both can also be given per call.
Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set before import).
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
from memkd.kernels.cosine_distance_map import cosine_distance_map_backward, cosine_distance_map_forward
from memkd.kernels.nr_recall import nr_recall_backward, nr_recall_forward

__all__ = [
    "EPS",
    "INPUT_PRECISIONS",
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
