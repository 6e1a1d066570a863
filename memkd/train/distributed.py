"""Distributed data parallel plumbing: the process group from torchrun's environment, and
BatchNorm statistics over the global batch on every backend."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank among ``world_size`` and the device it trains on."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 logs and writes checkpoints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: Optional[Union[str, torch.device]] = None) -> DistributedContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): NCCL on GPUs, Gloo on CPUs. A single process (no WORLD_SIZE, or 1) needs no group.
    A group the caller already initialised is used as it is.

    ``device``: None picks ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        device_id = device if device.type == "cuda" else None
        dist.init_process_group(backend, rank=rank, world_size=world_size, device_id=device_id)
    return DistributedContext(rank, local_rank, world_size, device)


def _group_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over all processes (the tensor itself in a single process)."""
    world_size = _group_size()
    if world_size == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor / world_size


class DistributedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch on any backend, Gloo on CPUs
    included (torch's SyncBatchNorm is GPU-only). Same state as BatchNorm2d; outside training or
    distributed runs it is BatchNorm2d.

    The global mean and then the global sum of squared deviations from it are all-reduced with
    autograd (the two-pass variance, accurate for post-ReLU features), so gradients flow through
    the global statistics as in one process.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _group_size() == 1:
            return super().forward(x)
        channels = x.shape[1]
        xf = x.float()
        sums = dist_nn.all_reduce(torch.cat([xf.sum((0, 2, 3)), xf.new_full((1,), xf.numel() // channels)]))
        n = sums[-1]
        mean = sums[:channels] / n
        centred = xf - mean.view(1, -1, 1, 1)
        var = dist_nn.all_reduce(centred.pow(2).sum((0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), momentum)
        y = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y.to(x.dtype)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm2d computing global-batch statistics in training: torch's
    SyncBatchNorm on CUDA (fused kernels), DistributedBatchNorm2d elsewhere. Parameters and buffers
    stay the same objects, so optimisers and checkpoints are unaffected."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = DistributedBatchNorm2d  # a subclass with no state of its own
    return module
