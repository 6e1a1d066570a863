"""memkd::nr_recall, NR Memory recall (paper Eq. 5-6; with keys := values also Eq. 8-9): the public
function, its argument checks, its schemas, fake kernels, autograd formula and backends."""
from __future__ import annotations

import torch

from memkd.ops import _registry, reference
from memkd.ops.validation import check_feature_map, check_float_tensor, check_same_device_dtype

SCHEMAS = {
    "nr_recall": "nr_recall(Tensor query, Tensor keys, Tensor values) -> Tensor",
    "nr_recall_backward": (
        "nr_recall_backward(Tensor grad_out, Tensor query, Tensor keys, Tensor values) -> "
        "(Tensor, Tensor, Tensor)"
    ),
}


def check_nr_recall_args(query, keys, values) -> None:
    """Mirrored by check_nr_recall_args in csrc/ops/checks.h (the compiled kernels' own checks)."""
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


def nr_recall(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """NR Memory recall (paper Eq. 5-6; with keys := values also Eq. 8-9).

    For every pixel j: ``w = softmax_l(cos(query[:, j], keys[l]))``, ``out[:, j] = sum_l w_l values[l]``.
    query [B, C, H, W] (any layout, channels_last kept), keys and values [L, C], same dtype and
    device. Returns [B, C, H, W] in query's dtype; differentiable in all three inputs.
    """
    check_nr_recall_args(query, keys, values)
    return torch.ops.memkd.nr_recall(query, keys, values)


def _triton_kernels():
    """The Triton kernels with the reference's signatures; float64, which they do not take, goes to
    the reference. Raises ImportError without triton."""
    from memkd import kernels as K

    def forward(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        if query.dtype == torch.float64:
            return reference.nr_recall(query, keys, values)
        return K.nr_recall_forward(query, keys, values)

    def backward(
        grad_out: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if query.dtype == torch.float64:
            return reference.nr_recall_backward(grad_out, query, keys, values)
        return K.nr_recall_backward(grad_out, query, keys, values)

    return {"nr_recall": forward, "nr_recall_backward": backward}


OP = _registry.register(
    _registry.Op(
        name="nr_recall",
        schemas=SCHEMAS,
        reference={"nr_recall": reference.nr_recall, "nr_recall_backward": reference.nr_recall_backward},
        triton=_triton_kernels,
    )
)


@torch.library.register_fake("memkd::nr_recall")
def _nr_recall_fake(query, keys, values):
    check_nr_recall_args(query, keys, values)
    return torch.empty_like(query)


@torch.library.register_fake("memkd::nr_recall_backward")
def _nr_recall_backward_fake(grad_out, query, keys, values):
    check_nr_recall_args(query, keys, values)
    return torch.empty_like(query), torch.empty_like(keys), torch.empty_like(values)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    query, keys, values = ctx.saved_tensors
    return torch.ops.memkd.nr_recall_backward(grad_out, query, keys, values)


# The backward op is a kernel of its own on every backend.
torch.library.register_autograd("memkd::nr_recall", _backward, setup_context=_setup_context)
