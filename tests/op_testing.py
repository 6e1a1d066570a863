"""Scaffolding shared by the op tests (test_ops_cpu.py, test_ops_cuda.py, test_triton_kernels.py and
the cases of op_cases.py): tolerances, shapes, input makers and the comparison with the reference.
pytest puts tests/ on sys.path, so test modules ``from op_testing import ...``.

Ground truth is memkd.ops.reference evaluated in float64 on the very same (already rounded) inputs,
with autograd through it for the gradients, so each tolerance measures only a kernel's arithmetic
error, relative to max(1, max |expected|).
"""
from __future__ import annotations

import torch

# The ops through memkd.ops, on every backend.
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}
# Backends whose arithmetic differs by design: Triton's fp32 dots default to "tf32x3" (about fp32
# accuracy, with a different rounding).
BACKEND_TOLERANCES = {"triton": {torch.float32: 1e-4}}
# The Triton launchers called directly with input_precision="ieee" (test_triton_kernels.py): exact
# fp32 dots, held tighter than the ops.
TRITON_KERNEL_TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

DTYPES = list(TOLERANCES)
# (B, C, H, W, L): odd C and H*W, L = 1, 17 and 50 (not multiples of 16), batch 1 to 3.
SHAPES = [(1, 37, 5, 7, 50), (2, 64, 9, 11, 1), (3, 19, 3, 5, 17), (2, 300, 13, 13, 50)]
# Layouts of a [B, C, H, W] input: NCHW, NHWC, every other column of a wider map (neither NCHW nor
# NHWC dense), a channel slice of a wider map (stride_b != C*H*W, H and W still collapse) and a crop
# of a wider map (H and W do not collapse into one pixel axis).
LAYOUTS = ["contiguous", "channels_last", "strided", "channel_slice", "cropped"]
# grad_out's layout for each input layout, so that mixed layouts are exercised too.
GRAD_LAYOUT = {"contiguous": "channels_last", "channels_last": "contiguous", "strided": "strided",
               "channel_slice": "contiguous", "cropped": "contiguous"}


def tolerance(dtype: torch.dtype, backend: str | None = None) -> float:
    return BACKEND_TOLERANCES.get(backend, {}).get(dtype, TOLERANCES[dtype])


def make_map(shape, dtype, layout, generator, device="cpu"):
    """A random [B, C, H, W] tensor in ``layout`` (see LAYOUTS), drawn in float64 on the CPU with
    ``generator``; the view is taken after the move to ``device`` and ``dtype`` (``.to`` of a view
    that is not dense would return a contiguous copy)."""
    b, c, h, w = shape
    drawn = {"strided": (b, c, h, 2 * w), "channel_slice": (b, c + 5, h, w), "cropped": (b, c, h, w + 3)}
    x = torch.randn(*drawn.get(layout, shape), generator=generator, dtype=torch.float64).to(device, dtype)
    if layout == "strided":
        x = x[..., ::2]
    elif layout == "channel_slice":
        x = x[:, 2:2 + c]
    elif layout == "cropped":
        x = x[..., 1:1 + w]
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout != "contiguous":
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    assert x.shape == shape
    if layout in ("strided", "cropped"):
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    return x


def randn(*shape, generator, dtype=torch.float64, device="cpu"):
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device, dtype)


def make_memory(items, channels, dtype, generator, device="cpu"):
    """Random keys and values [L, C]."""
    return (randn(items, channels, generator=generator, dtype=dtype, device=device),
            randn(items, channels, generator=generator, dtype=dtype, device=device))


def leaf(x):
    return x.detach().requires_grad_(True)


def as_float64(x):
    """A float64 CPU leaf with x's values: the reference's input."""
    return x.detach().double().cpu().requires_grad_(True)


def assert_close(actual, expected, dtype, what, tol=None, device=None):
    """``actual`` has ``dtype``, expected's shape, no non-finite value where expected is finite
    everywhere, and max |actual - expected| <= tol * max(1, max |expected|); ``tol`` defaults to
    TOLERANCES[dtype]; with ``device``, actual must be on that device type."""
    if device is not None:
        assert actual.device.type == device, f"{what}: expected a {device} result, got {actual.device}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if torch.isfinite(expected).all():
        assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    tol = (TOLERANCES[dtype] if tol is None else tol) * max(1.0, expected.abs().max().item())
    err = (actual.double().cpu() - expected.double().cpu()).abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g} ({dtype})"
