"""memkd::cosine_distance_map, the per-pixel cosine distance (paper Eq. 3): the public function, its
argument checks, its schemas, fake kernels, autograd formula and backends."""
from __future__ import annotations

import torch

from memkd.ops import _registry, reference
from memkd.ops.validation import check_feature_map, check_same_device_dtype

SCHEMAS = {
    "cosine_distance_map": "cosine_distance_map(Tensor fs, Tensor ft) -> Tensor",
    "cosine_distance_map_backward": (
        "cosine_distance_map_backward(Tensor grad_out, Tensor fs, Tensor ft) -> (Tensor, Tensor)"
    ),
}


def check_cosine_distance_map_args(fs, ft, fs_name: str = "fs", ft_name: str = "ft") -> None:
    """Mirrored by check_pair_of_maps in csrc/ops/checks.h (the compiled kernels' own checks)."""
    check_feature_map(fs, fs_name)
    check_feature_map(ft, ft_name)
    if fs.shape != ft.shape:
        raise ValueError(f"{ft_name}: expected the shape of {fs_name} {tuple(fs.shape)}, got {tuple(ft.shape)}")
    check_same_device_dtype(fs, fs_name, ft, ft_name)


def cosine_distance_map(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Per-pixel ``1 - cos(fs[:, :, h, w], ft[:, :, h, w])`` (paper Eq. 3): two [B, C, H, W] -> [B, H, W]."""
    check_cosine_distance_map_args(fs, ft)
    return torch.ops.memkd.cosine_distance_map(fs, ft)


def _triton_kernels():
    """The Triton kernels with the reference's signatures; float64, which they do not take, goes to
    the reference. Raises ImportError without triton."""
    from memkd import kernels as K

    def forward(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        if fs.dtype == torch.float64:
            return reference.cosine_distance_map(fs, ft)
        return K.cosine_distance_map_forward(fs, ft)

    def backward(
        grad_out: torch.Tensor, fs: torch.Tensor, ft: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if fs.dtype == torch.float64:
            return reference.cosine_distance_map_backward(grad_out, fs, ft)
        return K.cosine_distance_map_backward(grad_out, fs, ft)

    return {"cosine_distance_map": forward, "cosine_distance_map_backward": backward}


OP = _registry.register(
    _registry.Op(
        name="cosine_distance_map",
        schemas=SCHEMAS,
        reference={
            "cosine_distance_map": reference.cosine_distance_map,
            "cosine_distance_map_backward": reference.cosine_distance_map_backward,
        },
        triton=_triton_kernels,
    )
)


@torch.library.register_fake("memkd::cosine_distance_map")
def _cosine_distance_map_fake(fs, ft):
    check_cosine_distance_map_args(fs, ft)
    b, _, h, w = fs.shape
    return fs.new_empty((b, h, w))


@torch.library.register_fake("memkd::cosine_distance_map_backward")
def _cosine_distance_map_backward_fake(grad_out, fs, ft):
    check_cosine_distance_map_args(fs, ft)
    return torch.empty_like(fs), torch.empty_like(ft)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    fs, ft = ctx.saved_tensors
    return torch.ops.memkd.cosine_distance_map_backward(grad_out, fs, ft)


# The backward op is a kernel of its own on every backend.
torch.library.register_autograd("memkd::cosine_distance_map", _backward, setup_context=_setup_context)
