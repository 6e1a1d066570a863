"""Shared pieces of the memkd benchmark suite: settings, case naming, the plain-PyTorch baselines,
the reference-ops swap and model helpers. The pytest wiring (options, the ``measure`` fixture, the
session collector) lives in conftest.py; turning results into files lives in report.py.
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import memkd.ops
from memkd.ops import reference
from memkd.train import ExemplarFeatureCache

EPS = reference.EPS
MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
MALLOC_RECOMMENDED = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "17179869184",
    "MALLOC_TOP_PAD_": "1073741824",
}

# WideResNet50 feature shapes (C, H, W) at a 256x256 input: teacher layer1..3, then the bottleneck.
STAGE_SHAPES = ((256, 64, 64), (512, 32, 32), (1024, 16, 16))
BOTTLENECK_SHAPE = (2048, 8, 8)
MEMORY_ITEMS = 50  # L, the paper's memory size

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


# ---- settings ---------------------------------------------------------------------------------

STATE = pytest.StashKey[dict]()  # the session's settings and results, in config.stash (conftest.py)


def settings_of(config) -> "Settings":
    """The run's settings, for ``pytest_generate_tests`` hooks that size their cases by mode."""
    return config.stash[STATE]["settings"]



@dataclass(frozen=True)
class Plan:
    """How a case is timed: ``rounds`` timed rounds after ``warmup`` untimed ones, each round
    calling the target ``iterations`` times (the reported time is per call)."""

    rounds: int
    warmup: int
    iterations: int = 1


# Rounds per kind of case. Quick keeps the whole suite to minutes on a 2-core CPU; full is for a
# quiet machine. "heavy" cases take about a second or more per call on that CPU.
PLANS = {
    "quick": {
        "op": Plan(7, 1), "op_heavy": Plan(5, 1),
        "e2e": Plan(5, 1), "train": Plan(3, 1), "scaling": Plan(3, 1),
    },
    "full": {
        "op": Plan(30, 3), "op_heavy": Plan(10, 2),
        "e2e": Plan(10, 2), "train": Plan(7, 2), "scaling": Plan(7, 1),
    },
}
# GPU calls take micro- to milliseconds: loop each round and warm up longer (Triton JIT, autotune).
GPU_PLANS = {
    "quick": {"op": Plan(10, 3, 20), "op_heavy": Plan(10, 3, 5), "e2e": Plan(10, 3), "train": Plan(5, 2), "scaling": Plan(5, 2)},
    "full": {"op": Plan(50, 5, 50), "op_heavy": Plan(30, 5, 10), "e2e": Plan(50, 5), "train": Plan(20, 3), "scaling": Plan(20, 3)},
}


# Pairs per target (benchmarks/conftest.py::judge_in_pairs), by the kind of its calls: odd, so that
# the median is one pair's ratio.
PAIR_ROUNDS = {
    "quick": {"op": 21, "op_heavy": 15, "e2e": 11, "train": 5},
    "full": {"op": 61, "op_heavy": 31, "e2e": 31, "train": 11},
}


@dataclass(frozen=True)
class Settings:
    full: bool
    threads: int
    device: str  # where the end-to-end model runs: "cuda" when a GPU is visible, else "cpu"

    @property
    def mode(self) -> str:
        return "full" if self.full else "quick"

    @property
    def op_devices(self) -> tuple[str, ...]:
        """Ops run on the CPU always, and on the GPU too when there is one."""
        return ("cpu", "cuda") if self.device == "cuda" else ("cpu",)

    def plan(self, kind: str, device: str = "cpu") -> Plan:
        table = GPU_PLANS if device == "cuda" else PLANS
        return table[self.mode][kind]

    def pick(self, quick, full):
        """``quick`` in quick mode, ``full`` in full mode: how the suite's sizes are written."""
        return full if self.full else quick


def malloc_setting() -> dict:
    """The glibc malloc tunables this process started with (they cannot change after start)."""
    values = {name: os.environ.get(name) for name in MALLOC_ENV}
    return {
        "env": values,
        "set": all(v is not None for v in values.values()),
        "recommended": values == MALLOC_RECOMMENDED,
    }


# ---- case naming ------------------------------------------------------------------------------


def case_id(key: str, impl: str) -> str:
    """A measurement's id: the thing measured (``key``) and how (``impl``)."""
    return f"{key}@{impl}"


def op_key(op: str, pass_: str, batch: int, shape: Sequence[int], dtype: torch.dtype, device: str) -> str:
    c, h, w = shape
    return f"ops/{op}/{pass_}/B{batch}-C{c}-{h}x{w}/{DTYPE_NAMES[dtype]}/{device}"


def anomaly_map_key(batch: int, dtype: torch.dtype, device: str, out: int = 256) -> str:
    return f"ops/anomaly_map/fwd/B{batch}-3stages-{out}x{out}/{DTYPE_NAMES[dtype]}/{device}"


def e2e_key(method: str, backbone: str, batch: int, size: int, device: str) -> str:
    return f"inference/{method}/{backbone}/B{batch}/{size}x{size}/{device}"


def train_key(method: str, backbone: str, batch: int, exemplars: int, device: str) -> str:
    return f"training/{method}/{backbone}/B{batch}-N{exemplars}/{device}"


def shape_str(shape: Sequence[int]) -> str:
    c, h, w = shape
    return f"C{c}-{h}x{w}"


# ---- timing helpers ---------------------------------------------------------------------------


def alternating_rounds(subject: Callable, baseline: Callable, rounds: int, warmup: int) -> tuple[list[float], list[float]]:
    """Round times of two calls run alternately, subject first in even rounds and baseline first in
    odd ones, so that neither always follows the other."""
    for _ in range(warmup):
        subject()
        baseline()
    times: dict[Callable, list[float]] = {subject: [], baseline: []}
    for r in range(rounds):
        for fn in ((subject, baseline) if r % 2 == 0 else (baseline, subject)):
            start = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - start)
    return times[subject], times[baseline]


def synchronized(fn: Callable, device: str, every: int = 1) -> Callable:
    """``fn`` followed by a device sync on every ``every``-th call, so a timer around a round of
    ``every`` calls sees the GPU work finish without paying a sync per call."""
    if device != "cuda":
        return fn
    calls = 0

    def run(*args, **kwargs):
        nonlocal calls
        out = fn(*args, **kwargs)
        calls += 1
        if calls % every == 0:
            torch.cuda.synchronize()
        return out

    return run


@contextlib.contextmanager
def cuda_backend(backend: Optional[str]) -> Iterator[None]:
    """Serve the memkd ops on CUDA with ``backend`` ("cuda", "triton") inside the block."""
    if backend is None:
        yield
        return
    memkd.ops.set_backend("cuda", backend)
    try:
        yield
    finally:
        memkd.ops.set_backend("cuda", "default")


@functools.lru_cache(maxsize=None)
def available_cuda_backends() -> tuple[str, ...]:
    """The GPU backends that can serve all ops here (both, normally)."""
    found = []
    for backend in ("cuda", "triton"):
        try:
            memkd.ops.set_backend("cuda", backend)
            found.append(backend)
        except RuntimeError:
            pass
        finally:
            memkd.ops.set_backend("cuda", "default")
    return tuple(found)


# ---- the plain-PyTorch baselines ------------------------------------------------------------


def nr_recall_composite(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The best plain-PyTorch NR recall we know: normalise the keys, one matmul against the NCHW
    query viewed as [B, C, HW], scale by the inverse query norms, softmax over L, one matmul with
    the values. No [B, HW, L, C] broadcast, no transposes of the query; autograd does backward."""
    b, c, h, w = query.shape
    q = query.reshape(b, c, h * w)
    k = keys / keys.norm(dim=1, keepdim=True).clamp_min(EPS)
    inv_qnorm = q.norm(dim=1, keepdim=True).clamp_min(EPS).reciprocal()  # [B, 1, HW]
    weights = torch.softmax(torch.matmul(k, q) * inv_qnorm, dim=1)  # [B, L, HW]
    return torch.matmul(values.t(), weights).reshape(b, c, h, w)


def anomaly_map_scipy(
    student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    out_size: Sequence[int],
    sigma: float = 4.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RD4AD's way: 1 - cosine per stage, bilinear upsampling (align_corners=True), sum, then
    ``scipy.ndimage.gaussian_filter`` on each image (on the host), score = max."""
    from scipy.ndimage import gaussian_filter

    total = None
    for fs, ft in zip(student_features, teacher_features):
        d = 1.0 - F.cosine_similarity(fs, ft, dim=1)
        d = F.interpolate(d.unsqueeze(1), size=tuple(out_size), mode="bilinear", align_corners=True).squeeze(1)
        total = d if total is None else total + d
    maps = total.cpu().numpy()
    maps = torch.from_numpy(np.stack([gaussian_filter(m, sigma=sigma) for m in maps]))
    return maps, maps.flatten(1).amax(dim=1)


# ---- the reference ops, end to end ----------------------------------------------------------------


@contextlib.contextmanager
def reference_ops() -> Iterator[None]:
    """Inside the block the reference kernels (memkd.ops.reference) serve every memkd op on CPU and
    CUDA tensors, through ``memkd.ops.set_backend(device, "reference")``: the same dispatcher path,
    argument checks and autograd formulas (the backward ops' closed forms) as the fused kernels;
    only the kernels differ. ``test_inference.test_reference_swap_reaches_every_op`` checks with the
    profiler that the reference's ATen ops run inside the memkd:: ops in the block, and not outside.
    """
    for device in ("cpu", "cuda"):
        memkd.ops.set_backend(device, "reference")
    try:
        yield
    finally:
        for device in ("cpu", "cuda"):
            memkd.ops.set_backend(device, "default")


# ---- models -------------------------------------------------------------------------------------


def build(method: str, backbone: str, size: int = 256, device: str = "cpu", **config):
    """A randomly initialised model (weights do not change speed) in eval mode on ``device``."""
    from memkd.models import MemKDConfig, build_model

    torch.manual_seed(0)
    model = build_model(MemKDConfig(method=method, backbone=backbone, weights=None, image_size=size, **config))
    return model.to(device).eval()


def images(batch: int, size: int = 256, device: str = "cpu", seed: int = 0) -> torch.Tensor:
    """A batch of already-normalised images (standard normal, like ImageNet-normalised pixels)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g).to(device)


def train_batch(settings, backbone: str) -> int:
    """Batch (and exemplar count) of the training-step cases: the paper's 16 where it fits the time,
    else 2 for WideResNet50 and 4 for smaller teachers (quick mode on a CPU)."""
    if settings.full or settings.device == "cuda":
        return 16
    return 2 if backbone == "wide_resnet50_2" else 4


def training_step(model, batch: int, exemplars: int, size: int = 256, device: str = "cpu", cached_exemplars: bool = False):
    """One optimisation step as memkd.train.Trainer runs it (the loss with a set of ``exemplars``
    images when the method learns from one, backward, Adam), as a callable on ready tensors;
    ``model`` is put in train mode. ``cached_exemplars``: the exemplar set's teacher features are
    already in the trainer's cache (every image's second and later draws), so the step skips the
    exemplars' teacher pass."""
    model.train()
    x = images(batch, size, device)
    exemplar_set = images(exemplars, size, device, seed=1) if model.config.method_spec.nel else None
    features = None
    if cached_exemplars and exemplar_set is not None:
        features, exemplar_set = ExemplarFeatureCache(model).features(list(range(exemplars)), exemplar_set), None
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=0.005, betas=(0.5, 0.999))

    def step():
        terms = model.loss(x, exemplar_set, features)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()

    return step


def memory_bank_bytes(model) -> int:
    """Bytes of all NR Memory keys and values (the paper's Table 3 "memory size")."""
    from memkd.models import NRMemory

    return sum(
        t.numel() * t.element_size()
        for m in model.modules() if isinstance(m, NRMemory)
        for t in (m.keys, m.values)
    )


GRAD_MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "plain": contextlib.nullcontext}


SETTLE_CALLS = 3


def first_call_seconds(call) -> float:
    """Seconds of ``call()``'s first run (a compile, if any), then a few untimed calls: right after a
    compile, or as the first case of a file, the first calls measured here were up to 1.4x slower."""
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    for _ in range(SETTLE_CALLS):
        call()
    return seconds


def detect(model, images: torch.Tensor, grad_mode: str = "inference_mode", teacher_depth: int = 3, sigma: float = 4.0):
    """``model.predict`` spelled out (eval mode assumed), with its knobs exposed: the autograd mode
    (``plain`` records the student's graph; the teacher runs under no_grad whatever) and how
    deep the teacher runs (3 = layer1..3, what predict does; 4 also computes the unused layer4)."""
    with GRAD_MODES[grad_mode]():
        teacher = model.teacher(images, depth=teacher_depth)[:3]
        student = model.student(images, teacher)
        return memkd.ops.anomaly_map([f.float() for f in student], [f.float() for f in teacher], images.shape[-2:], sigma)


# ---- fits -------------------------------------------------------------------------------------


LINEAR_R2 = 0.98  # a series whose straight-line fit explains at least this much variance is "linear"


def linear_fit(x: Sequence[float], y: Sequence[float]) -> dict:
    """Least-squares line y = intercept + slope * x, with R^2."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - (residual**2).sum() / total if total > 0 else 1.0
    return {"slope": float(slope), "intercept": float(intercept), "r2": float(r2), "linear": bool(r2 >= LINEAR_R2)}
