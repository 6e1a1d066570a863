"""Choosing the torch device of a command: "auto", "cpu", "cuda" or "cuda:N", checked against
this machine before any work starts."""
from __future__ import annotations

from memkd.errors import CommandError


def resolve_device(name: str) -> str:
    """"auto" -> "cuda" when available else "cpu"; other names are checked."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CommandError(f"device: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(f"device {name}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CommandError(f"device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu":
        raise CommandError(f"device {name}: expected auto, cpu, cuda or cuda:N")
    return name
