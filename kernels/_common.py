"""Settings, tensor-layout helpers and a grid helper shared by the Triton kernels and launchers.

Settings (module level, changed with the setters below or per call by the launchers' keyword arguments):

* ``input_precision`` — how ``tl.dot`` treats **fp32** operands: ``"ieee"`` (exact fp32 FMA, slowest),
  ``"tf32x3"`` (three TF32 products, ~fp32 accuracy on tensor cores; the default) or ``"tf32"``
  (one TF32 product, ~1e-3 relative error, fastest). fp16/bf16 operands always use the tensor cores
  with fp32 accumulation and ignore this setting. Triton's interpreter (CPU) computes every dot in
  exact fp32, whatever the setting.
* ``deterministic`` — the NR-recall backward reduces dK and dV over the pixels either through
  per-program fp32 partial sums summed by torch in a fixed order (``True``, the default:
  bitwise-reproducible gradients) or with fp32 atomics (``False``: slightly faster, result depends
  on the order the atomics land in). ``torch.use_deterministic_algorithms(True)`` forces ``True``.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

EPS = 1e-8  # the memkd epsilon convention: x / max(|x|, EPS), see memkd.ops.reference

INPUT_PRECISIONS = ("ieee", "tf32x3", "tf32")
_settings = {"input_precision": "tf32x3", "deterministic": True}

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
SUPPORTED_DTYPES = tuple(_TL_DTYPES)


def set_input_precision(precision: str) -> None:
    """Default ``tl.dot`` precision for fp32 inputs: "ieee", "tf32x3" (default) or "tf32"."""
    _settings["input_precision"] = check_precision(precision)


def get_input_precision() -> str:
    return _settings["input_precision"]


def set_deterministic(flag: bool) -> None:
    """Default reduction mode of the NR-recall backward (True: no atomics, bitwise reproducible)."""
    _settings["deterministic"] = bool(flag)


def get_deterministic() -> bool:
    return _settings["deterministic"]


def check_precision(precision: str) -> str:
    if precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision: expected one of {INPUT_PRECISIONS}, got {precision!r}")
    return precision


def resolve_precision(precision: str | None, dtype: torch.dtype) -> str:
    """The ``input_precision`` constexpr for a dot on ``dtype`` operands (only fp32 cares)."""
    precision = check_precision(get_input_precision() if precision is None else precision)
    return precision if dtype == torch.float32 else "tf32"


def resolve_deterministic(flag: bool | None) -> bool:
    flag = get_deterministic() if flag is None else bool(flag)
    return flag or torch.are_deterministic_algorithms_enabled()


def interpreting() -> bool:
    """Whether kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_dtype(x: torch.Tensor, name: str) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: the Triton kernels take float32, float16 or bfloat16, got {x.dtype}")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{name}: the Triton kernels take CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
            f"got a tensor on {x.device}"
        )


def on_tensor_device(launcher):
    """Runs ``launcher`` with the current CUDA device set to its first tensor argument's device
    (Triton launches on the current device; this matters with several GPUs)."""

    @functools.wraps(launcher)
    def wrapper(*args, **kwargs):
        first = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]
        if isinstance(first, torch.Tensor) and first.device.type == "cuda":
            with torch.cuda.device(first.device):
                return launcher(*args, **kwargs)
        return launcher(*args, **kwargs)

    return wrapper


def dot_dtype(dtype: torch.dtype, device: torch.device):
    """Operand dtype of ``tl.dot``: the input dtype, except bf16 off-GPU, where the interpreter's dot
    is wrong (it multiplies the raw bf16 bit patterns) and operands are upcast to fp32."""
    if dtype == torch.bfloat16 and (interpreting() or device.type != "cuda"):
        return tl.float32
    return _TL_DTYPES[dtype]


def is_half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def next_pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(int(n)))


def map_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format a [B, C, H, W] result should take after ``x``: channels_last when ``x`` has
    its channels innermost (stride 1), else contiguous."""
    if x.shape[1] > 1 and x.stride(1) == 1 and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def pixel_strides(x: torch.Tensor) -> tuple[int, int, int] | None:
    """(stride_b, stride_c, stride_p) of a [B, C, H, W] tensor whose H and W collapse into one pixel
    axis p = h * W + w (NCHW, channels_last, channel slices, broadcast grads), else None."""
    _, _, h, w = x.shape
    sb, sc, sh, sw = x.stride()
    if h == 1:
        return sb, sc, sw
    if w == 1 or sh == w * sw:
        return sb, sc, sh if w == 1 else sw
    return None


def as_pixel_major(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``x`` (copied only when H and W do not collapse) and its (stride_b, stride_c, stride_p)."""
    strides = pixel_strides(x)
    if strides is None:
        x = x.contiguous(memory_format=map_format(x))
        strides = pixel_strides(x)
    return x, strides


def empty_map(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised [B, C, H, W] tensor in ``like``'s memory format (see :func:`map_format`)."""
    return torch.empty(
        tuple(shape), dtype=dtype or like.dtype, device=like.device, memory_format=map_format(like)
    )


def image_strides(x: torch.Tensor) -> tuple[int, int] | None:
    """(stride_b, stride_p) of a [B, H, W] tensor whose H and W collapse, else None."""
    _, h, w = x.shape
    sb, sh, sw = x.stride()
    if h == 1:
        return sb, sw
    if w == 1 or sh == w * sw:
        return sb, sh if w == 1 else sw
    return None


@triton.jit
def pixel_block(HW, BLOCK_P: tl.constexpr):
    """On a (pixel blocks, images) grid: this program's image (int64, so that image offsets do not
    overflow), its BLOCK_P pixel indices and their mask (< HW)."""
    b = tl.program_id(1).to(tl.int64)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    return b, offs_p, offs_p < HW


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1
