"""Distributed training on the CPU: two Gloo processes with the global batch split between them
reach the weights of one process trained on the whole batch."""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from torch import nn

from memkd.models import MemKDConfig, build_model
from memkd.train import TrainConfig, init_distributed, train
from memkd.train.distributed import DistributedBatchNorm2d, sync_batchnorm

WORLD_SIZE = 2
SIZE = 32


def images(count: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, SIZE, SIZE, generator=g) for _ in range(count)]


MODEL_CONFIG = dict(method="memkd", backbone="resnet18", weights=None, image_size=SIZE, exemplars=4, memory_items=6)
LR = 0.005
TRAIN_CONFIG = dict(epochs=1, batch_size=8, lr=LR, workers=0, log_every=1, progress=False, seed=1, device="cpu")


def batchnorm_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=g) * 3 + 1
    upstream = torch.randn(4, 3, 5, 5, generator=g)
    weight, bias = torch.randn(3, generator=g), torch.randn(3, generator=g)
    return x, upstream, weight, bias


def make_batchnorm(weight, bias):
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
        bn.running_mean.fill_(0.5)  # the shift of the distributed sums: any common value
    return bn


def worker(rank: int, port: int, run_dir: str, results: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    context = init_distributed("cpu")
    try:
        assert (context.rank, context.world_size, dist.get_backend()) == (rank, WORLD_SIZE, "gloo")
        # BatchNorm over the global batch: each rank holds half of it.
        x, upstream, weight, bias = batchnorm_inputs()
        bn = sync_batchnorm(make_batchnorm(weight, bias), context.device)
        assert type(bn) is DistributedBatchNorm2d
        half = slice(rank * 2, rank * 2 + 2)
        local = x[half].clone().requires_grad_(True)
        out = bn(local)
        (out * upstream[half]).sum().backward()
        gathered = [torch.empty_like(out) for _ in range(WORLD_SIZE)]
        dist.all_gather(gathered, out.detach())
        grads = [torch.empty_like(local) for _ in range(WORLD_SIZE)]
        dist.all_gather(grads, local.grad)
        weight_grad = torch.stack([bn.weight.grad, bn.bias.grad])
        dist.all_reduce(weight_grad)
        if rank == 0:
            torch.save(
                {"out": torch.cat(gathered), "grad": torch.cat(grads), "param_grad": weight_grad,
                 "running": torch.stack([bn.running_mean, bn.running_var])},
                results,
            )
        train(images(), run_dir, MemKDConfig(**MODEL_CONFIG), TrainConfig(**TRAIN_CONFIG))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mp.spawn(worker, args=(free_port(), str(base / "ddp"), str(base / "bn.pt")), nprocs=WORLD_SIZE, join=True)
        train(images(), base / "single", MemKDConfig(**MODEL_CONFIG), TrainConfig(**TRAIN_CONFIG))
    finally:
        torch.set_num_threads(threads)
    return base


def tensors_of(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_distributed_batchnorm_matches_one_process(runs):
    got = torch.load(runs / "bn.pt")
    x, upstream, weight, bias = batchnorm_inputs()
    bn = make_batchnorm(weight, bias)
    local = x.clone().requires_grad_(True)
    out = bn(local)
    (out * upstream).sum().backward()
    torch.testing.assert_close(got["out"], out.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["grad"], local.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["param_grad"], torch.stack([bn.weight.grad, bn.bias.grad]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["running"], torch.stack([bn.running_mean, bn.running_var]), rtol=1e-5, atol=1e-6)


def test_two_processes_train_like_one_with_the_same_global_batch(runs):
    single, ddp = tensors_of(runs / "single" / "model.safetensors"), tensors_of(runs / "ddp" / "model.safetensors")
    assert single.keys() == ddp.keys()
    for name in single:
        if name.startswith("teacher.") or not single[name].is_floating_point():
            assert torch.equal(ddp[name], single[name]), name  # the frozen teacher, BatchNorm's step counts
    # Adam's first steps are lr * sign(g) for most weights, so the float noise of gradients that are
    # zero in theory (BatchNorm's invariances) turns into differences of up to lr in a few weights,
    # which the next step propagates. Two single-process runs differing only in the thread count
    # leave ~0.05% of the weights more than lr/5 apart; without global BatchNorm statistics ~30%.
    weights = [name for name in single if name.startswith("student.") and single[name].is_floating_point()]
    apart = sum(((ddp[k] - single[k]).abs() > LR / 5).sum().item() for k in weights)
    assert apart / sum(single[k].numel() for k in weights) < 0.005

    # Training moved the weights (two Adam steps of lr 0.005), so the comparison is not vacuous.
    torch.manual_seed(TRAIN_CONFIG["seed"])
    start = build_model(MemKDConfig(**MODEL_CONFIG)).student.state_dict()
    floating = [k for k, v in start.items() if v.is_floating_point()]
    moved = [k for k in floating if (single[f"student.{k}"] - start[k]).abs().max() > 1e-3]
    assert len(moved) > 0.9 * len(floating)

    logs = [
        [json.loads(line) for line in (runs / run / "log.jsonl").read_text().splitlines()] for run in ("single", "ddp")
    ]
    assert [r["step"] for r in logs[1]] == [1, 2]  # rank 0 alone writes the log
    for a, b in zip(*logs):
        for term in ("kd", "nm", "orth", "total"):
            assert b[term] == pytest.approx(a[term], rel=1e-5), term
