"""Time one training step (forward + backward of ``model.loss``) and report model sizes.

    python -m memkd.train.profiling --methods rd memkd --device cuda --amp

Defaults: wide_resnet50_2 with random init (no download), batch 16, 256x256, N=16 exemplars.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Optional, Sequence

import torch

from memkd.models import MemKDConfig, build_model, size_report


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_training_step(
    method: str = "memkd",
    backbone: str = "wide_resnet50_2",
    batch_size: int = 16,
    image_size: int = 256,
    device: str = "cpu",
    repeats: int = 3,
    warmup: int = 1,
    amp: bool = False,
    channels_last: bool = False,
) -> dict:
    """Median seconds of forward + backward over ``repeats`` steps after ``warmup`` steps (no
    optimizer step): wall clock and, on the CPU, process CPU time (all threads; unlike wall clock
    it hardly changes when other work shares the cores); images/s and ``size_report`` of the
    model. Random inputs and teacher."""
    device = torch.device(device)
    torch.manual_seed(0)
    config = MemKDConfig(method=method, backbone=backbone, weights=None, image_size=image_size)
    model = build_model(config).to(device).train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    images, exemplars = (
        torch.randn(count, 3, image_size, image_size, device=device).contiguous(memory_format=memory_format)
        for count in (batch_size, config.exemplars)
    )
    times, cpu_times = [], []
    for i in range(warmup + repeats):
        model.zero_grad(set_to_none=True)
        _synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model.loss(images, exemplars)["total"]
        loss.backward()
        _synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return {
        "method": method,
        "backbone": backbone,
        "batch_size": batch_size,
        "image_size": image_size,
        "device": str(device),
        "amp": amp,
        "step_seconds": seconds,
        "step_cpu_seconds": statistics.median(cpu_times) if device.type == "cpu" else None,
        "threads": torch.get_num_threads(),
        "images_per_s": batch_size / seconds,
        "peak_gpu_gb": peak,
        **size_report(model),
    }


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["rd", "memkd"])
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for method in args.methods:
        result = measure_training_step(
            method, args.backbone, args.batch_size, args.image_size, args.device,
            args.repeats, args.warmup, args.amp, args.channels_last,
        )
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
