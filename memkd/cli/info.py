"""``memkd info``: versions, devices and the kernel backend of each op."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from memkd.cli.common import say


def info_lines() -> list[str]:
    import platform

    import numpy
    import torch
    import torchvision

    import memkd
    from memkd.ops import backends

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [
        f"memkd        {memkd.__version__} ({Path(memkd.__file__).parent})",
        f"python       {platform.python_version()}",
        f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none'} build)",
        f"torchvision  {torchvision.__version__}",
        f"triton       {triton_version}",
        f"numpy        {numpy.__version__}",
        "devices:",
        f"  cpu: {os.cpu_count()} core(s), torch uses {torch.get_num_threads()} thread(s)",
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(
                f"  cuda:{index}: {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.1f} GiB)"
            )
    else:
        lines.append("  cuda: not available")
    lines.append("kernel backends (memkd.ops.backends()):")
    for op, per_device in backends().items():
        lines.append(f"  {op}:")
        for device, why in per_device.items():
            lines.append(f"    {device + ':':6s}{why}")
    return lines


def cmd_info(args: argparse.Namespace) -> int:
    say("\n".join(info_lines()))
    return 0

