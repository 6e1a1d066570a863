"""Registration of the ``memkd::`` ops with the PyTorch dispatcher.

The schemas and the CPU/CUDA kernels come from the compiled extension ``memkd._C`` (csrc/). When
it is missing, disabled (``MEMKD_NO_EXTENSION=1``) or was built against another torch, the same
schemas are defined here and served by the plain PyTorch reference, with one warning. On CUDA the
Triton kernels (kernels/) are an alternative backend that a user can select per op.

Autograd formulas and fake (meta) kernels are registered here for every backend, so the ops work
under ``torch.compile(fullgraph=True)`` and pass ``torch.library.opcheck``.
"""
from __future__ import annotations

import importlib.util
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memkd.ops import reference
from memkd.ops.validation import (
    check_anomaly_map_args,
    check_cosine_distance_map_args,
    check_nr_recall_args,
)

# Kept identical to csrc/ops/*.cpp; tests/test_ops_registration.py compares them.
SCHEMAS = {
    "nr_recall": "nr_recall(Tensor query, Tensor keys, Tensor values) -> Tensor",
    "nr_recall_backward": (
        "nr_recall_backward(Tensor grad_out, Tensor query, Tensor keys, Tensor values) -> "
        "(Tensor, Tensor, Tensor)"
    ),
    "cosine_distance_map": "cosine_distance_map(Tensor fs, Tensor ft) -> Tensor",
    "cosine_distance_map_backward": (
        "cosine_distance_map_backward(Tensor grad_out, Tensor fs, Tensor ft) -> (Tensor, Tensor)"
    ),
    "anomaly_map": (
        "anomaly_map(Tensor[] student_features, Tensor[] teacher_features, int[2] out_size, "
        "float sigma=4.0) -> (Tensor, Tensor)"
    ),
}
PUBLIC_OPS = ("nr_recall", "cosine_distance_map", "anomaly_map")

REFERENCE_KERNELS = {
    "nr_recall": reference.nr_recall,
    "nr_recall_backward": reference.nr_recall_backward,
    "cosine_distance_map": reference.cosine_distance_map,
    "cosine_distance_map_backward": reference.cosine_distance_map_backward,
    "anomaly_map": reference.anomaly_map,
}


@dataclass
class ExtensionStatus:
    loaded: bool
    reason: str
    cuda_kernels: bool = False
    build_info: dict = field(default_factory=dict)
    cpu_variant: str = ""  # which build of the CPU kernels serves (memkd._cpu_<variant>)


# The CPU kernel builds (see CMakeLists.txt) and the instructions each one is compiled for.
CPU_VARIANTS = {
    "avx512": "AVX-512 (x86-64-v4)",
    "avx2": "AVX2 + FMA (x86-64-v3)",
    "baseline": "baseline instructions",
    "custom": "MEMKD_CPU_ARCH_FLAGS of the build",
}


def read_build_info(path: Path) -> dict[str, str]:
    """The build facts stamped into memkd's modules (see csrc/module.cpp), read without loading."""
    match = re.search(rb"MEMKD_BUILD_INFO\{([^}]*)\}", path.read_bytes())
    if match is None:
        return {}
    return dict(item.split("=", 1) for item in match.group(1).decode().split(",") if "=" in item)


def rebuild_command() -> str:
    """What to run to rebuild memkd's modules for the torch now installed (never replacing it)."""
    source = Path(__file__).resolve().parents[2]
    if (source / "setup.py").is_file() and (source / "csrc").is_dir():  # an editable install
        return f"python3 -m pip install --no-deps --force-reinstall -e {source}"
    return "python3 -m pip install --no-deps --force-reinstall <memkd source directory>"


def choose_cpu_variant(built: list[str], runnable: tuple[str, ...]) -> tuple[str | None, str]:
    """The CPU kernel build to load, and why: MEMKD_CPU_VARIANT if set and runnable, else the best
    one this processor runs. A build with MEMKD_CPU_ARCH_FLAGS ("custom") is the only one made and
    is loaded as it is."""
    if built == ["custom"]:
        return "custom", "built with MEMKD_CPU_ARCH_FLAGS"
    usable = [v for v in runnable if v in built]
    requested = os.environ.get("MEMKD_CPU_VARIANT", "")
    if requested:
        if requested in usable:
            return requested, "chosen with MEMKD_CPU_VARIANT"
        warnings.warn(
            f"memkd: MEMKD_CPU_VARIANT={requested!r} ignored: expected one of {usable} "
            f"(built: {built}; this processor runs: {list(runnable)})",
            RuntimeWarning,
            stacklevel=3,
        )
    if not usable:
        return None, f"no CPU kernel build runs on this processor (built: {built}; runnable: {list(runnable)})"
    return usable[0], "the best build this processor runs"


def _load_extension() -> ExtensionStatus:
    if os.environ.get("MEMKD_NO_EXTENSION", "") not in ("", "0"):
        return ExtensionStatus(False, "disabled by MEMKD_NO_EXTENSION")
    spec = importlib.util.find_spec("memkd._C")
    if spec is None:
        return ExtensionStatus(False, "memkd._C is not built (install memkd from source with `pip install .`)")
    try:
        info = read_build_info(Path(spec.origin))
    except OSError as exc:
        return ExtensionStatus(False, f"cannot read {spec.origin}: {exc}")
    if info.get("torch") != torch.__version__:
        return ExtensionStatus(
            False,
            f"memkd._C was built against torch {info.get('torch', '(unknown)')} but torch "
            f"{torch.__version__} is installed; rebuild it for this torch with `{rebuild_command()}`",
        )
    try:
        module = importlib.import_module("memkd._C")
        variant, why = choose_cpu_variant(info.get("cpu", "").split("+"), module.runnable_cpu_variants())
        if variant is None:
            return ExtensionStatus(False, why, build_info=info)
        importlib.import_module(f"memkd._cpu_{variant}")
    except (ImportError, OSError) as exc:
        return ExtensionStatus(False, f"memkd's compiled modules failed to load: {exc}", build_info=info)
    return ExtensionStatus(
        True, f"compiled kernels, CPU build {variant}: {CPU_VARIANTS[variant]}, {why}", info.get("cuda") == "1", info,
        variant,
    )


def _op_is_defined(name: str) -> bool:
    try:
        getattr(torch.ops.memkd, name)
    except (AttributeError, RuntimeError):
        return False
    return True


EXTENSION = _load_extension()
_fallback_lib: torch.library.Library | None = None

if not EXTENSION.loaded:
    warnings.warn(
        f"memkd: fused C++/CUDA kernels unavailable ({EXTENSION.reason}); "
        "using the PyTorch reference ops (correct, slower)",
        RuntimeWarning,
        stacklevel=2,
    )
    # memkd._C may have loaded, defining the schemas (and CUDA kernels), though no CPU build could.
    _fallback_lib = torch.library.Library("memkd", "FRAGMENT")  # noqa: TOR901
    for _name, _schema in SCHEMAS.items():
        if not _op_is_defined(_name):
            _fallback_lib.define(_schema)
        for _key in ("CPU", "CUDA"):
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"memkd::{_name}", _key):
                _fallback_lib.impl(_name, REFERENCE_KERNELS[_name], _key)


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``memkd::op`` has a kernel registered for ``dispatch_key`` (e.g. "CPU", "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"memkd::{op}", dispatch_key)


# ---- fake kernels: shapes and dtypes only, with the same argument checks as the real kernels.


@torch.library.register_fake("memkd::nr_recall")
def _nr_recall_fake(query, keys, values):
    check_nr_recall_args(query, keys, values)
    return torch.empty_like(query)


@torch.library.register_fake("memkd::nr_recall_backward")
def _nr_recall_backward_fake(grad_out, query, keys, values):
    check_nr_recall_args(query, keys, values)
    return torch.empty_like(query), torch.empty_like(keys), torch.empty_like(values)


@torch.library.register_fake("memkd::cosine_distance_map")
def _cosine_distance_map_fake(fs, ft):
    check_cosine_distance_map_args(fs, ft)
    b, _, h, w = fs.shape
    return fs.new_empty((b, h, w))


@torch.library.register_fake("memkd::cosine_distance_map_backward")
def _cosine_distance_map_backward_fake(grad_out, fs, ft):
    check_cosine_distance_map_args(fs, ft)
    return torch.empty_like(fs), torch.empty_like(ft)


@torch.library.register_fake("memkd::anomaly_map")
def _anomaly_map_fake(student_features, teacher_features, out_size, sigma=4.0):
    check_anomaly_map_args(student_features, teacher_features, out_size, sigma)
    first = student_features[0]
    b = first.shape[0]
    return first.new_empty((b, out_size[0], out_size[1])), first.new_empty((b,))


# ---- autograd: the backward ops are kernels of their own on every backend.


def _nr_recall_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _nr_recall_backward(ctx, grad_out):
    query, keys, values = ctx.saved_tensors
    return torch.ops.memkd.nr_recall_backward(grad_out, query, keys, values)


def _cosine_distance_map_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _cosine_distance_map_backward(ctx, grad_out):
    fs, ft = ctx.saved_tensors
    return torch.ops.memkd.cosine_distance_map_backward(grad_out, fs, ft)


torch.library.register_autograd(
    "memkd::nr_recall", _nr_recall_backward, setup_context=_nr_recall_setup_context
)
torch.library.register_autograd(
    "memkd::cosine_distance_map",
    _cosine_distance_map_backward,
    setup_context=_cosine_distance_map_setup_context,
)
