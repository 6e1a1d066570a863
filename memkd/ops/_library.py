"""Loading of the compiled extension ``memkd._C`` (csrc/), which defines the ``memkd::`` schemas and
serves the fused CPU and CUDA kernels. When it is missing, disabled (``MEMKD_NO_EXTENSION=1``) or
was built against another torch, :data:`EXTENSION` says why, and memkd/ops/_registry.py defines the
schemas itself, served by the plain PyTorch reference.
"""
from __future__ import annotations

import importlib.util
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch


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


EXTENSION = _load_extension()


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``memkd::op`` has a kernel registered for ``dispatch_key`` (e.g. "CPU", "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"memkd::{op}", dispatch_key)
