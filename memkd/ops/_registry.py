"""The one registry of the memkd ops and the backend switch.

Each op has one Python home, ``memkd/ops/<op>.py``: its public function and argument checks, its
schemas (the op and its backward op, if any), its fake kernel, its autograd formula and its
backends. The module describes itself with an :class:`Op` and calls :func:`register`, which
defines the schemas when the compiled extension did not (then the reference serves every device)
and adds the op to :data:`OPS`. Everything else — ``backends()``, ``set_backend``, the tests that
compare the compiled schemas with these strings — reads :data:`OPS`.

Backends per device type:

* ``"cpu"``: ``"cpp"`` (the fused C++ kernels of memkd._C) or ``"reference"`` (memkd.ops.reference);
* ``"cuda"``: ``"cuda"`` (the CUDA C++ kernels of memkd._C), ``"triton"`` (kernels/) or
  ``"reference"``;

and ``"default"``, the automatic choice. A choice covers an op's whole family (its backward follows
its forward) and is made by registering the chosen kernels over the compiled ones for that dispatch
key; going back to the compiled kernels drops that registration.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from memkd.ops import _library

BACKENDS = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


@dataclass(frozen=True)
class Op:
    """One public op: ``schemas`` maps the op and its backward op (the family that switches backends
    together) to their schema strings, ``reference`` the same names to memkd.ops.reference
    functions, and ``triton`` returns the Triton kernels by the same names (raises ImportError where
    triton is unavailable)."""

    name: str
    schemas: Mapping[str, str]
    reference: Mapping[str, Callable]
    triton: Callable[[], Mapping[str, Callable]]


OPS: dict[str, Op] = {}
_fallback_lib: torch.library.Library | None = None
_overrides: dict[tuple[str, str], torch.library.Library] = {}  # (device, op) -> chosen kernels
_choice: dict[tuple[str, str], str] = {}  # (device, op) -> backend chosen with set_backend


def _op_is_defined(name: str) -> bool:
    try:
        getattr(torch.ops.memkd, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def register(op: Op) -> Op:
    """Adds ``op`` to OPS; without the compiled extension, defines its schemas and serves them with
    the reference on every device."""
    global _fallback_lib
    if not _library.EXTENSION.loaded:
        if _fallback_lib is None:
            warnings.warn(
                f"memkd: fused C++/CUDA kernels unavailable ({_library.EXTENSION.reason}); "
                "using the PyTorch reference ops (correct, slower)",
                RuntimeWarning,
                stacklevel=3,
            )
            _fallback_lib = torch.library.Library("memkd", "FRAGMENT")  # noqa: TOR901
        # memkd._C may have loaded, defining the schemas (and CUDA kernels), though no CPU build could.
        for name, schema in op.schemas.items():
            if not _op_is_defined(name):
                _fallback_lib.define(schema)
            for key in _DISPATCH_KEYS.values():
                if not _library.has_kernel(name, key):
                    _fallback_lib.impl(name, op.reference[name], key)
    OPS[op.name] = op
    return op


def schemas() -> dict[str, str]:
    """Every memkd:: schema string by op name (public ops and their backward ops)."""
    return {name: schema for op in OPS.values() for name, schema in op.schemas.items()}


def _triton_kernels(op: Op):
    """The op's Triton kernels, or None and the reason they are unavailable."""
    try:
        return op.triton(), "Triton kernels"
    except ImportError as exc:
        return None, f"Triton unavailable: {exc}"
    except Exception as exc:  # a broken triton install must not break backend selection
        return None, f"the Triton kernels failed to load: {type(exc).__name__}: {exc}"


def _default(device: str, op: Op) -> tuple[str, str]:
    ext = _library.EXTENSION
    if device == "cpu":
        return ("cpp", ext.reason) if ext.loaded else ("reference", ext.reason)
    if ext.cuda_kernels:
        return "cuda", "CUDA C++ kernels compiled into memkd._C"
    kernels, why = _triton_kernels(op)
    if kernels is not None:
        return "triton", f"{why}; memkd._C has no CUDA kernels"
    return "reference", f"PyTorch reference; {why}; {ext.reason}"


def _check_device(device: str) -> None:
    if device not in BACKENDS:
        raise ValueError(f"device: expected one of {list(BACKENDS)}, got {device!r}")


def backend(device: str, op: str) -> str:
    """The backend serving ``op`` on ``device`` tensors ("cpu" or "cuda"), e.g. "cpp" or "triton"."""
    _check_device(device)
    if op not in OPS:
        raise ValueError(f"op: expected one of {list(OPS)}, got {op!r}")
    return _choice.get((device, op)) or _default(device, OPS[op])[0]


def set_backend(device: str, name: str, ops: Sequence[str] | None = None) -> None:
    """Serve ``ops`` (default: all) on ``device`` tensors with backend ``name``: on "cpu" "cpp" or
    "reference", on "cuda" "cuda", "triton" or "reference"; "default" restores the automatic choice.
    Gradients follow the forward."""
    _check_device(device)
    ops = list(OPS) if ops is None else list(ops)
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"ops: unknown op(s) {unknown}; expected some of {list(OPS)}")
    if name != "default" and name not in BACKENDS[device]:
        raise ValueError(f"name: expected 'default' or one of {list(BACKENDS[device])} for {device}, got {name!r}")
    key = _DISPATCH_KEYS[device]
    for op_name in ops:
        op = OPS[op_name]
        target = _default(device, op)[0] if name == "default" else name
        if target in ("cpp", "cuda"):
            ext = _library.EXTENSION
            if not (ext.cuda_kernels if target == "cuda" else ext.loaded):
                raise RuntimeError(f"name: memkd._C has no {target} kernels ({ext.reason})")
            kernels = None  # the compiled kernels serve once the override is dropped
        elif target == "triton":
            kernels, why = _triton_kernels(op)
            if kernels is None:
                raise RuntimeError(f"name: {why}")
        else:
            kernels = op.reference
        previous = _overrides.pop((device, op_name), None)
        if previous is not None:
            previous._destroy()
        if kernels is not None:
            lib = torch.library.Library("memkd", "IMPL")  # noqa: TOR901
            for name_in_family in op.schemas:
                lib.impl(name_in_family, kernels[name_in_family], key, allow_override=True)
            _overrides[(device, op_name)] = lib
        _choice[(device, op_name)] = target


def backends() -> dict[str, dict[str, str]]:
    """For each op, the backend serving it on each device type and why, e.g.
    ``{"nr_recall": {"cpu": "cpp (...)", "cuda": "triton (...)"}}``."""
    cuda_seen = torch.cuda.is_available()
    report = {}
    for op_name, op in OPS.items():
        report[op_name] = {}
        for device in BACKENDS:
            name, why = _default(device, op)
            chosen = _choice.get((device, op_name))
            if chosen is not None and chosen != name:
                name, why = chosen, "selected with set_backend"
            seen = "" if device == "cpu" or cuda_seen else "; no CUDA device visible"
            report[op_name][device] = f"{name} ({why}){seen}"
    return report
