"""The fused ops against plain PyTorch, at the shapes the model runs them at.

nr_recall and cosine_distance_map: forward and forward+backward; anomaly_map: inference only.
Shapes: the WideResNet50 stages at a 256x256 input (256x64x64, 512x32x32, 1024x16x16) and, for
nr_recall, the bottleneck (2048x8x8); L = 50; batch 1 and 16.

Implementations ("impl"): ``fused`` (memkd.ops; on a GPU the CUDA C++ backend) and ``triton``
(GPU only) are the subjects; the baselines are ``reference`` (memkd.ops.reference, plain PyTorch;
under autograd it runs as a composite), ``composite`` (nr_recall: the best plain-PyTorch
composite we know, benchlib.nr_recall_composite) and ``scipy`` (anomaly_map: RD4AD's way, with
scipy.ndimage.gaussian_filter per image, benchlib.anomaly_map_scipy).

Quick mode on a CPU keeps every fp32 target case (B=16 at every shape) and B=1, drops the
reference (the same composite under autograd) at B=16 forward+backward, and runs bf16/fp16 for
one shape only (forward, B=16, 512x32x32, against the reference); on a GPU quick mode runs bf16/fp16
forward at B=16 for every shape.

Targets (CPU, 2 threads, B=16, L=50, fp32, the three stage shapes; the 2048x8x8 bottleneck shape
is measured without a target): nr_recall forward >= 2x faster than the composite, forward+backward
>= 4x; anomaly_map (three stages) >= 5x faster than the scipy composite. ``test_target`` times each
target's fused op and baseline in alternating rounds and judges the median per-pair ratio.
"""
from __future__ import annotations

import pytest
import torch

import memkd.ops
from benchlib import (
    BOTTLENECK_SHAPE,
    DTYPE_NAMES,
    MEMORY_ITEMS,
    STAGE_SHAPES,
    anomaly_map_key,
    anomaly_map_scipy,
    available_cuda_backends,
    case_id,
    cuda_backend,
    nr_recall_composite,
    op_key,
    settings_of,
)
from memkd.ops import reference
from report import Target

FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16
SUBJECTS = ("fused", "triton")
# The GPU backend behind each subject impl (None on the CPU: the compiled C++ kernels serve).
BACKEND = {"fused": "cuda", "triton": "triton"}
NR_RECALL_TARGETS = {"fwd": 2.0, "fwdbwd": 4.0}
ANOMALY_MAP_TARGET = 5.0


# ---- which cases run ------------------------------------------------------------------------


def _impls(device: str, baselines: tuple[str, ...]) -> tuple[str, ...]:
    if device == "cpu":
        return ("fused",) + baselines
    # the GPU backends this build can serve: "cuda" (compiled kernels) -> impl "fused", "triton"
    return tuple({"cuda": "fused", "triton": "triton"}[b] for b in available_cuda_backends()) + baselines


def _dtype_cases(settings, device, shapes, passes):
    """(shape, batch, pass, dtype) to run: fp32 everywhere; bf16/fp16 everywhere in full mode, in
    quick mode only forward at B=16 (on the CPU only the 512x32x32 stage)."""
    for dtype in (FP32, BF16, FP16):
        for shape in shapes:
            for batch in (1, 16):
                for pass_ in passes:
                    if dtype != FP32 and not settings.full:
                        if batch != 16 or pass_ != "fwd" or (device == "cpu" and shape != (512, 32, 32)):
                            continue
                    yield shape, batch, pass_, dtype


def pytest_generate_tests(metafunc):
    settings = settings_of(metafunc.config)
    cases = []
    if metafunc.function.__name__ == "test_nr_recall":
        for device in settings.op_devices:
            for shape, batch, pass_, dtype in _dtype_cases(settings, device, STAGE_SHAPES + (BOTTLENECK_SHAPE,), ("fwd", "fwdbwd")):
                if dtype != FP32 and device == "cpu" and not settings.full:
                    baselines = ("reference",)
                elif batch == 16 and pass_ == "fwdbwd" and device == "cpu" and not settings.full:
                    baselines = ("composite",)  # quick: under autograd the reference is the same composite
                else:
                    baselines = ("reference", "composite")
                cases += [(device, shape, batch, pass_, dtype, impl) for impl in _impls(device, baselines)]
    elif metafunc.function.__name__ == "test_cosine_distance_map":
        for device in settings.op_devices:
            for shape, batch, pass_, dtype in _dtype_cases(settings, device, STAGE_SHAPES, ("fwd", "fwdbwd")):
                cases += [(device, shape, batch, pass_, dtype, impl) for impl in _impls(device, ("reference",))]
    elif metafunc.function.__name__ == "test_anomaly_map":
        for device in settings.op_devices:
            dtypes = (FP32, BF16, FP16) if device == "cuda" else (FP32,)
            for dtype in dtypes:
                for batch in (1, 16):
                    baselines = ("reference", "scipy") if device == "cpu" else ("reference",)
                    cases += [(device, batch, dtype, impl) for impl in _impls(device, baselines)]
    else:
        return
    names = "device,batch,dtype,impl" if metafunc.function.__name__ == "test_anomaly_map" else "device,shape,batch,pass_,dtype,impl"
    metafunc.parametrize(names, cases, ids=[_case_name(metafunc.function.__name__, c) for c in cases])


def _case_name(test: str, case) -> str:
    if test == "test_anomaly_map":
        device, batch, dtype, impl = case
        return f"{device}-B{batch}-{DTYPE_NAMES[dtype]}-{impl}"
    device, (c, h, w), batch, pass_, dtype, impl = case
    return f"{device}-{pass_}-B{batch}-C{c}x{h}x{w}-{DTYPE_NAMES[dtype]}-{impl}"


def _kind(batch: int, pass_: str) -> str:
    return "op_heavy" if batch == 16 and pass_ == "fwdbwd" else "op"


def _target_condition(settings) -> str | None:
    return None if settings.threads == 2 else f"measured with {settings.threads} threads; the targets are set for 2"


def _timed_call(fn, inputs, pass_):
    """The function to time: forward under no_grad, or forward+backward (torch.autograd.grad, so
    nothing accumulates in .grad between rounds)."""
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return fn(*inputs)
        return run
    for x in inputs:
        x.requires_grad_(True)
    with torch.no_grad():
        grad_out = torch.randn_like(fn(*inputs))

    def run():
        return torch.autograd.grad(fn(*inputs), inputs, grad_out)

    return run


# ---- nr_recall --------------------------------------------------------------------------------


NR_RECALL = {"fused": memkd.ops.nr_recall, "triton": memkd.ops.nr_recall,
             "reference": reference.nr_recall, "composite": nr_recall_composite}


def test_nr_recall(device, shape, batch, pass_, dtype, impl, measure, settings):
    torch.manual_seed(0)
    c, h, w = shape
    query = torch.randn(batch, c, h, w, device=device, dtype=dtype)
    keys = torch.randn(MEMORY_ITEMS, c, device=device, dtype=dtype)
    values = torch.randn(MEMORY_ITEMS, c, device=device, dtype=dtype)
    key = op_key("nr_recall", pass_, batch, shape, dtype, device)
    with cuda_backend(BACKEND[impl] if device == "cuda" and impl in SUBJECTS else None):
        run = _timed_call(NR_RECALL[impl], (query, keys, values), pass_)
        measure(run, key=key, impl=impl, kind=_kind(batch, pass_), role="subject" if impl in SUBJECTS else "baseline",
                device=device, items=batch,
                # what the kernel must move at least: read the query, write the output
                bytes=2 * query.numel() * query.element_size() if pass_ == "fwd" else None)


# ---- cosine_distance_map -----------------------------------------------------------------------


COSINE = {"fused": memkd.ops.cosine_distance_map, "triton": memkd.ops.cosine_distance_map,
          "reference": reference.cosine_distance_map}


def test_cosine_distance_map(device, shape, batch, pass_, dtype, impl, measure, settings):
    torch.manual_seed(0)
    fs = torch.randn(batch, *shape, device=device, dtype=dtype)
    ft = torch.randn(batch, *shape, device=device, dtype=dtype)
    with cuda_backend(BACKEND[impl] if device == "cuda" and impl in SUBJECTS else None):
        run = _timed_call(COSINE[impl], (fs, ft), pass_)
        measure(run, key=op_key("cosine_distance_map", pass_, batch, shape, dtype, device), impl=impl,
                kind=_kind(batch, pass_), role="subject" if impl in SUBJECTS else "baseline", device=device, items=batch,
                bytes=(2 * fs.numel() + batch * shape[1] * shape[2]) * fs.element_size() if pass_ == "fwd" else None)


# ---- anomaly_map -------------------------------------------------------------------------------


ANOMALY_MAP = {"fused": memkd.ops.anomaly_map, "triton": memkd.ops.anomaly_map,
               "reference": reference.anomaly_map, "scipy": anomaly_map_scipy}


def test_anomaly_map(device, batch, dtype, impl, measure, settings):
    torch.manual_seed(0)
    student = [torch.randn(batch, *s, device=device, dtype=dtype) for s in STAGE_SHAPES]
    teacher = [torch.randn(batch, *s, device=device, dtype=dtype) for s in STAGE_SHAPES]
    key = anomaly_map_key(batch, dtype, device)
    fn = ANOMALY_MAP[impl]
    feature_bytes = sum(2 * f.numel() * f.element_size() for f in student)
    with cuda_backend(BACKEND[impl] if device == "cuda" and impl in SUBJECTS else None), torch.no_grad():
        measure(lambda: fn(student, teacher, (256, 256), 4.0), key=key, impl=impl, kind="op",
                role="subject" if impl in SUBJECTS else "baseline", device=device, items=batch,
                bytes=feature_bytes + batch * 256 * 256 * 4)


# ---- the targets, in interleaved pairs ---------------------------------------------------------


TARGET_CASES = [("nr_recall", shape, pass_) for shape in STAGE_SHAPES for pass_ in ("fwd", "fwdbwd")] + [("anomaly_map", None, "fwd")]


@pytest.mark.parametrize("op,shape,pass_", TARGET_CASES,
                         ids=[f"{op}-{pass_}" + (f"-C{s[0]}x{s[1]}x{s[2]}" if s else "") for op, s, pass_ in TARGET_CASES])
def test_target(op, shape, pass_, judge_in_pairs, settings):
    """The CPU targets (2 threads, B=16, fp32), judged in pairs (conftest.judge_in_pairs)."""
    torch.manual_seed(0)
    if op == "nr_recall":
        c, h, w = shape
        inputs = (torch.randn(16, c, h, w), torch.randn(MEMORY_ITEMS, c), torch.randn(MEMORY_ITEMS, c))
        key = op_key("nr_recall", pass_, 16, shape, FP32, "cpu")
        name = f"nr_recall {'forward' if pass_ == 'fwd' else 'forward+backward'} {c}x{h}x{w} B=16: fused vs composite"
        baseline_impl, threshold = "composite", NR_RECALL_TARGETS[pass_]
        subject = _timed_call(memkd.ops.nr_recall, inputs, pass_)
        baseline = _timed_call(nr_recall_composite, inputs, pass_)
    else:
        student = [torch.randn(16, *s) for s in STAGE_SHAPES]
        teacher = [torch.randn(16, *s) for s in STAGE_SHAPES]
        key = anomaly_map_key(16, FP32, "cpu")
        name, baseline_impl, threshold = "anomaly_map 3 stages -> 256x256 B=16: fused vs scipy composite", "scipy", ANOMALY_MAP_TARGET
        subject = _timed_call(memkd.ops.anomaly_map, (student, teacher, (256, 256), 4.0), "fwd")
        baseline = _timed_call(anomaly_map_scipy, (student, teacher, (256, 256), 4.0), "fwd")
    judge_in_pairs(Target(name, case_id(key, "fused"), case_id(key, baseline_impl), "speedup", threshold, _target_condition(settings)),
                   subject, baseline, kind=_kind(16, pass_))


# ---- context ---------------------------------------------------------------------------------


def test_baselines_compute_the_same(settings):
    """The baselines compute what the fused ops compute (else their timings mean nothing)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 64, 8, 8), torch.randn(MEMORY_ITEMS, 64), torch.randn(MEMORY_ITEMS, 64)
    torch.testing.assert_close(nr_recall_composite(q, k, v), memkd.ops.nr_recall(q, k, v), rtol=1e-4, atol=1e-5)
    student = [torch.randn(2, *s) for s in ((64, 16, 16), (128, 8, 8))]
    teacher = [torch.randn(2, *s) for s in ((64, 16, 16), (128, 8, 8))]
    maps, scores = memkd.ops.anomaly_map(student, teacher, (64, 64), 4.0)
    smaps, sscores = anomaly_map_scipy(student, teacher, (64, 64), 4.0)
    torch.testing.assert_close(smaps, maps, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sscores, scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["fused", "composite"])
def test_nr_recall_single_thread(impl, measure, settings):
    """Context for the 2-thread numbers: nr_recall forward, 512x32x32, B=16, on one thread. On a
    shared machine every 2-thread parallel region waits until both threads get a core."""
    if settings.threads == 1:
        pytest.skip("the run already uses 1 thread")
    shape = (512, 32, 32)
    torch.manual_seed(0)
    q, k, v = torch.randn(16, *shape), torch.randn(MEMORY_ITEMS, 512), torch.randn(MEMORY_ITEMS, 512)
    fn = memkd.ops.nr_recall if impl == "fused" else nr_recall_composite
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            measure(lambda: fn(q, k, v), key=op_key("nr_recall", "fwd", 16, shape, FP32, "cpu") + "/1-thread",
                    impl=impl, kind="op", role="subject" if impl == "fused" else "baseline", items=16, threads=1)
    finally:
        torch.set_num_threads(settings.threads)


def test_copy_bandwidth(measure, results, settings):
    """The GPU's achievable memory bandwidth: clone a 1 GiB tensor (read + write), the roofline
    for the bandwidth fractions of the ops."""
    if settings.device != "cuda":
        pytest.skip("GPU only")
    x = torch.empty(2**28, dtype=torch.float32, device="cuda")
    stats = measure(lambda: x.clone(), key="ops/copy_bandwidth/1GiB/cuda", impl="clone", kind="op",
                    role="baseline", device="cuda", bytes=2 * x.numel() * 4)
    if stats is not None:
        results.facts["copy_bandwidth_GBps"] = 2 * x.numel() * 4 / stats.median / 1e9
