"""GPU benchmarks of memkd for the one-shot GPU check (benchmarks/gpu_check.sh; issue #13 item 2 c-e).

    python benchmarks/gpu_bench.py --out DIR [--deadline UNIX_SECONDS] [--device cuda|cpu] [--tiny]
                                   [--only ops,predict,train]

Steps, in order of value:
  ops      the copy bandwidth (device-to-device copy of a tensor well beyond the L2 cache), then
           nr_recall forward and forward+backward at the four WideResNet50 stage shapes (256x64x64,
           512x32x32, 1024x16x16, 2048x8x8), B=16, L=50, fp32 and bf16; anomaly_map (the first three
           stages to 256x256, sigma 4, forward); cosine_distance_map like nr_recall. Each for the GPU
           backends ("cuda": CUDA C++ in memkd._C, "triton") and the composite, timed in interleaved
           rounds (A, B, C, A, B, C, ...). The composites are the CPU suite's baselines
           (benchmarks/test_ops.py), under autograd for the backward: ``COMPOSITES``;
  predict  model.predict for memkd and rd, WideResNet50 at 256x256 (random weights): batch-1
           latency eager and replayed from a CUDA graph (fp32 and bf16 autocast), throughput at
           batch 16 and 64 under bf16 autocast;
  train    one training step as memkd.train.Trainer runs it (benchlib.training_step: loss, backward,
           Adam), memkd vs rd, B=16.

DIR/bench.json (machine-readable) and DIR/bench.md (tables) are rewritten atomically after every
measurement, so a killed run leaves everything measured before. ``--deadline``: a step is started
only if its estimated duration fits before it; the others are listed as skipped, out of time.
Exit code 0 when every step ran or was skipped with a recorded reason, 1 when a measurement or
the program failed (the traceback is in the JSON), 143 on SIGTERM.

``--tiny --device cpu`` is the rehearsal on a machine without a GPU: the same code paths at tiny
sizes (B=2, C <= 32, H = W <= 8, resnet18 at 64x64, 1-2 timed rounds) with the CPU backends (the fused C++
kernels and the composite); its numbers mean nothing, and no target is judged.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

import memkd.ops
from benchlib import (
    BOTTLENECK_SHAPE,
    DTYPE_NAMES,
    MEMORY_ITEMS,
    STAGE_SHAPES,
    build,
    images,
    nr_recall_composite,
    training_step,
)
from memkd.ops import _library, reference

GROUPS = ("ops", "predict", "train")
COMPOSITES = {
    "nr_recall": "benchlib.nr_recall_composite (the best plain-PyTorch composite we know)",
    "cosine_distance_map": "memkd.ops.reference.cosine_distance_map",
    "anomaly_map": "memkd.ops.reference.anomaly_map",
}
H200_L2_BYTES = 50 * 2**20  # used when the device does not report its L2 size
SIGMA = 4.0
TERMINATED_EXIT = 128 + signal.SIGTERM

# ---- sizes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    batch: int
    op_shapes: tuple[tuple[int, int, int], ...]  # (C, H, W); anomaly_map takes the first three
    anomaly_out: int
    memory_items: int
    backbone: str
    image: int
    throughput_batches: tuple[int, ...]
    train_batch: int
    copy_bytes: int
    warmup: int  # untimed calls per implementation before the rounds
    rounds: int  # timed rounds per implementation (ops, predict)
    train_rounds: int
    op_round_s: float  # an op round loops its call until it takes about this long
    max_iterations: int


FULL = Sizes(
    batch=16, op_shapes=STAGE_SHAPES + (BOTTLENECK_SHAPE,), anomaly_out=256, memory_items=MEMORY_ITEMS,
    backbone="wide_resnet50_2", image=256, throughput_batches=(16, 64), train_batch=16,
    copy_bytes=2**30, warmup=3, rounds=15, train_rounds=7, op_round_s=2e-3, max_iterations=200,
)
TINY = Sizes(
    batch=2, op_shapes=((8, 8, 8), (16, 4, 4), (32, 2, 2), (32, 1, 1)), anomaly_out=32, memory_items=MEMORY_ITEMS,
    backbone="resnet18", image=64, throughput_batches=(2, 4), train_batch=2,
    copy_bytes=2**25, warmup=1, rounds=2, train_rounds=1, op_round_s=0.0, max_iterations=1,
)

# Seconds a step is expected to take on the GPU before one of its kind has run (then the median of
# those that ran is used). Triton compiles each kernel on its first call of a dtype and shape.
ESTIMATE_S = {"copy": 3.0, "op": 5.0, "anomaly_map": 6.0, "model_build": 8.0, "predict": 10.0,
              "predict_graph": 15.0, "throughput": 12.0, "train": 25.0}
TINY_ESTIMATE_S = 1.0

# ---- minimum traffic: bytes every implementation must read and write at least ------------------
# n = B*C*H*W elements of one feature map, m = L*C of one memory matrix, p = B*H*W pixels, s = the
# element size. Forward+backward counts the forward's output and the backward's reads and writes.

BYTES_FORMULAS = {
    ("nr_recall", "fwd"): "(2*B*C*H*W + 2*L*C) * s   (read query, keys, values; write out)",
    ("nr_recall", "fwdbwd"): "(5*B*C*H*W + 6*L*C) * s   (forward; backward reads dout, query, keys, values, writes dquery, dkeys, dvalues)",
    ("cosine_distance_map", "fwd"): "(2*B*C*H*W + B*H*W) * s   (read fs, ft; write the map)",
    ("cosine_distance_map", "fwdbwd"): "(6*B*C*H*W + 2*B*H*W) * s   (forward; backward reads dmap, fs, ft, writes dfs, dft)",
    ("anomaly_map", "fwd"): "sum_k 2*B*C_k*H_k*W_k * s + (B*Ho*Wo + B) * s_out   (read both stages' features; write maps, scores)",
}


def min_bytes(op: str, pass_: str, batch: int, shape: Sequence[int], items: int, itemsize: int) -> int:
    """BYTES_FORMULAS[(op, pass_)] for nr_recall and cosine_distance_map at one shape."""
    c, h, w = shape
    n, m, p = batch * c * h * w, items * c, batch * h * w
    counts = {
        ("nr_recall", "fwd"): 2 * n + 2 * m,
        ("nr_recall", "fwdbwd"): 5 * n + 6 * m,
        ("cosine_distance_map", "fwd"): 2 * n + p,
        ("cosine_distance_map", "fwdbwd"): 6 * n + 2 * p,
    }
    return counts[(op, pass_)] * itemsize


def anomaly_map_min_bytes(batch: int, shapes: Sequence[Sequence[int]], out: int, itemsize: int, out_itemsize: int) -> int:
    """BYTES_FORMULAS[("anomaly_map", "fwd")]."""
    features = sum(2 * batch * c * h * w for c, h, w in shapes) * itemsize
    return features + (batch * out * out + batch) * out_itemsize


# ---- targets ------------------------------------------------------------------------------------

NR_RECALL_COPY_FRACTION = 0.85
NR_RECALL_FWDBWD_SPEEDUP = 3.0
ANOMALY_MAP_ROOFLINE_RATIO = 1.5
THROUGHPUT_IMAGES_S = 3000.0
GRAPH_LATENCY_S = 3e-3
MEMKD_VS_RD = 1.1
COMPARE = {">=": lambda v, t: v >= t, "<=": lambda v, t: v <= t, "<": lambda v, t: v < t}


def target(name: str, value: Optional[float], relation: str, threshold: float, judged: Optional[str]) -> dict:
    """A target with its verdict: "pass"/"fail" when ``judged`` is None, else "not judged: <why>"
    (a rehearsal, or a value that could not be measured)."""
    if value is None or not math.isfinite(value):
        verdict = "not judged: no value"
    elif judged is not None:
        verdict = f"not judged: {judged}"
    else:
        verdict = "pass" if COMPARE[relation](value, threshold) else "fail"
    return {"name": name, "value": value, "relation": relation, "threshold": threshold, "verdict": verdict}


def op_targets(op: str, pass_: str, leaves_l2: bool, impls: dict, subjects: Sequence[str], judged: Optional[str]) -> list[dict]:
    """The targets of one op measurement for each memkd implementation under test (``subjects``)
    measured in ``impls``; the bandwidth target only where the traffic ``leaves_l2``."""
    found = []
    for name in subjects:
        result = impls.get(name)
        if result is None or "median_s" not in result:
            continue
        if op == "nr_recall" and pass_ == "fwd" and leaves_l2:
            found.append(target(f"nr_recall forward @{name}: fraction of copy bandwidth", result.get("copy_fraction"),
                                ">=", NR_RECALL_COPY_FRACTION, judged))
        if op == "nr_recall" and pass_ == "fwdbwd":
            found.append(target(f"nr_recall forward+backward @{name}: speedup over the composite",
                                result.get("speedup_vs_composite"), ">=", NR_RECALL_FWDBWD_SPEEDUP, judged))
        if op == "anomaly_map":
            found.append(target(f"anomaly_map @{name}: time / roofline time", result.get("roofline_ratio"),
                                "<=", ANOMALY_MAP_ROOFLINE_RATIO, judged))
    return found


# ---- timing -------------------------------------------------------------------------------------


class Clock:
    """Seconds per call of a round of back-to-back calls: CUDA events on the GPU (the round starts
    on an idle device and ends when its last kernel does), perf_counter on the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def round(self, fn: Callable[[], object], iterations: int) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iterations):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / iterations
        start_s = time.perf_counter()
        for _ in range(iterations):
            fn()
        return (time.perf_counter() - start_s) / iterations


def _no_selection() -> None:
    return None


@dataclass
class Impl:
    """One implementation in an interleaved comparison: ``select`` runs before each of its rounds
    (it picks the GPU backend), outside the timed region."""

    name: str
    fn: Callable[[], object]
    select: Callable[[], None] = _no_selection


def stats(times: Sequence[float]) -> dict:
    t = np.asarray(times, dtype=float)
    return {"median_s": float(np.median(t)), "p10_s": float(np.percentile(t, 10)), "p90_s": float(np.percentile(t, 90)),
            "rounds": int(t.size), "round_times_s": [float(x) for x in t]}


def error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def free_memory(collect: bool = True) -> None:
    """Return cached GPU memory; ``collect`` first frees what only reference cycles hold (a
    traceback's frames, models), at a quarter of a second per call."""
    if collect:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def interleaved(impls: Sequence[Impl], clock: Clock, warmup: int, rounds: int, round_s: float, max_iterations: int) -> dict:
    """Time ``impls`` in interleaved rounds (A, B, C, A, B, C, ...) after ``warmup`` calls each.
    Each impl's round loops its call ``iterations`` times, chosen from one call so that a round takes
    about ``round_s`` (1 when ``round_s`` is 0). An impl that raises is dropped with its traceback in
    the result ("error"); the others go on. Returns {name: stats + iterations, or {"error": text}}."""
    results: dict[str, dict] = {}
    iterations: dict[str, int] = {}
    times: dict[str, list[float]] = {}

    def fail(impl: Impl, exc: BaseException) -> None:
        results[impl.name] = {"error": error_text(exc), "out_of_memory": isinstance(exc, torch.cuda.OutOfMemoryError)}
        times.pop(impl.name, None)
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            free_memory()

    for impl in impls:
        try:
            impl.select()
            for _ in range(warmup):
                impl.fn()
            clock.sync()
            once = clock.round(impl.fn, 1) if round_s > 0 else 0.0
            iterations[impl.name] = max(1, min(max_iterations, math.ceil(round_s / once))) if once > 0 else 1
            times[impl.name] = []
        except Exception as exc:  # noqa: BLE001 - recorded per implementation
            fail(impl, exc)
    live = [impl for impl in impls if impl.name in times]
    for _ in range(rounds):
        for impl in list(live):
            try:
                impl.select()
                times[impl.name].append(clock.round(impl.fn, iterations[impl.name]))
            except Exception as exc:  # noqa: BLE001
                fail(impl, exc)
                live.remove(impl)
    for name, round_times in times.items():
        results[name] = {**stats(round_times), "iterations": iterations[name]}
    return results


def per_round_ratio(results: dict, numerator: str, denominator: str) -> Optional[float]:
    """Median over rounds of numerator time / denominator time (rounds side by side)."""
    a, b = results.get(numerator, {}).get("round_times_s"), results.get(denominator, {}).get("round_times_s")
    if not a or not b or len(a) != len(b):
        return None
    return float(np.median(np.asarray(a) / np.asarray(b)))


# ---- the GPU backend switch ---------------------------------------------------------------------


def select_gpu_backend(name: str) -> None:
    """Serve every memkd op on CUDA tensors with backend ``name`` ("cuda", "triton", "default")."""
    memkd.ops.set_backend("cuda", name)


def gpu_backends() -> tuple[list[str], dict[str, str]]:
    """The GPU backends that can serve the ops here, and why each other one cannot."""
    available, unavailable = [], {}
    for name in ("cuda", "triton"):
        try:
            select_gpu_backend(name)
            available.append(name)
        except RuntimeError as exc:
            unavailable[name] = str(exc)
        finally:
            select_gpu_backend("default")
    return available, unavailable


# ---- the program --------------------------------------------------------------------------------


class Terminated(BaseException):
    """SIGTERM (the check script's timeout): stop, and say so in the report."""


INTERRUPTS = (Terminated, KeyboardInterrupt)


@dataclass
class Step:
    id: str
    group: str
    kind: str  # for the time estimate
    params: dict
    run: Callable[[], dict]
    needs_models: bool = False


@dataclass
class Bench:
    out: Path
    device: str
    tiny: bool
    deadline: Optional[float]
    only: tuple[str, ...]
    sizes: Sizes = field(init=False)
    report: dict = field(init=False)
    clock: Clock = field(init=False)
    models: dict = field(default_factory=dict)
    durations: dict = field(default_factory=dict)
    subjects: list = field(default_factory=list)  # the memkd implementations under test: GPU backends, or the CPU kernel
    failed: bool = False

    def __post_init__(self):
        self.sizes = TINY if self.tiny else FULL
        self.clock = Clock(self.device)
        self.report = {
            "program": "benchmarks/gpu_bench.py",
            "mode": "tiny" if self.tiny else "full",
            "device": self.device,
            "started_unix": time.time(),
            "deadline_unix": self.deadline,
            "only": list(self.only),
            "status": "running",
            "environment": {},
            "sizes": dataclasses.asdict(self.sizes),
            "bytes_formulas": {f"{op}/{pass_}": text for (op, pass_), text in BYTES_FORMULAS.items()},
            "composites": COMPOSITES,
            "copy_bandwidth_GBps": None,
            "l2_bytes": None,
            "measurements": [],
            "skipped": [],
            "errors": [],
        }

    # ---- bookkeeping

    @property
    def judged(self) -> Optional[str]:
        """None when targets get a verdict; else why not."""
        if self.device != "cuda" or self.tiny:
            return f"rehearsal ({self.report['mode']} sizes on {self.device}); the targets are for the full sizes on a GPU"
        return None

    def best_throughput_target(self) -> list[dict]:
        """memkd's bf16 images/s at its best batch among the throughput measurements so far."""
        rates = {m["params"]["batch"]: m["impls"]["memkd"]["images_per_s"] for m in self.report["measurements"]
                 if m["group"] == "predict" and m["params"]["batch"] > 1 and m["params"]["precision"] == "bf16"
                 and "images_per_s" in m.get("impls", {}).get("memkd", {})}
        if not rates:
            return []
        best = max(rates, key=rates.get)
        return [{"measurement": f"predict B={best} (best of B={sorted(rates)})",
                 **target("memkd bf16 images/s at the best batch", rates[best], ">=", THROUGHPUT_IMAGES_S, self.judged)}]

    def write(self) -> None:
        self.report["updated_unix"] = time.time()
        self.report["targets"] = [{"measurement": m["id"], **t} for m in self.report["measurements"]
                                  for t in m.get("targets", [])] + self.best_throughput_target()
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in (("bench.json", json.dumps(self.report, indent=1, default=str)), ("bench.md", markdown(self.report))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)

    def skip(self, what: str, reason: str) -> None:
        self.report["skipped"].append({"id": what, "reason": reason})

    def estimate(self, step: Step) -> float:
        seen = self.durations.get(step.kind)
        base = float(np.median(seen)) if seen else (TINY_ESTIMATE_S if self.tiny else ESTIMATE_S[step.kind])
        if step.needs_models and not self.models:
            base += 2 * (TINY_ESTIMATE_S if self.tiny else ESTIMATE_S["model_build"])
        return base

    def run_steps(self, steps: Sequence[Step]) -> None:
        for index, step in enumerate(steps):
            left = None if self.deadline is None else self.deadline - time.time()
            needed = self.estimate(step)
            if left is not None and needed > left:
                self.skip(step.id, f"out of time: needs about {needed:.1f} s, {max(left, 0):.1f} s left")
                self.write()
                continue
            entry = {"id": step.id, "group": step.group, "params": step.params, "status": "running"}
            self.report["measurements"].append(entry)
            self.write()
            start = time.time()
            try:
                entry.update(step.run())
                errors = [name for name, r in entry.get("impls", {}).items() if "error" in r]
                entry["status"] = "partial" if errors else "ok"
                if errors:
                    self.failed = True
                    self.report["errors"].append({"id": step.id, "error": f"implementation(s) failed: {errors}"})
            except INTERRUPTS:
                entry["status"] = "interrupted"
                for later in steps[index + 1:]:
                    self.skip(later.id, "interrupted (SIGTERM or Ctrl-C)")
                raise
            except Exception as exc:  # noqa: BLE001 - one measurement never stops the others
                self.failed = True
                entry["status"] = "error"
                entry["error"] = error_text(exc)
                entry["out_of_memory"] = isinstance(exc, torch.cuda.OutOfMemoryError)
                self.report["errors"].append({"id": step.id, "error": entry["error"]})
            finally:
                entry["seconds"] = time.time() - start
                self.durations.setdefault(step.kind, []).append(entry["seconds"])
                with contextlib.suppress(Exception):
                    select_gpu_backend("default")
                free_memory(collect=step.needs_models or entry["status"] != "ok")
                self.write()

    # ---- environment

    def environment(self) -> dict:
        import torchvision

        ext = _library.EXTENSION
        env = {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "torchvision": torchvision.__version__,
            "numpy": np.__version__,
            "torch_threads": torch.get_num_threads(),
            "memkd_extension": dataclasses.asdict(ext),
            "memkd_backends": memkd.ops.backends(),
        }
        try:
            import triton

            env["triton"] = triton.__version__
            if self.device == "cuda":
                from memkd import kernels

                env["triton_kernel_settings"] = {"input_precision (fp32 dots)": kernels.get_input_precision(),
                                                 "deterministic": kernels.get_deterministic()}
        except Exception as exc:  # noqa: BLE001 - recorded, not needed on the CPU
            env["triton"] = f"unavailable: {type(exc).__name__}: {exc}"
        if self.device == "cuda":
            props = torch.cuda.get_device_properties(0)
            l2 = getattr(props, "L2_cache_size", 0) or H200_L2_BYTES
            env["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                          "memory_bytes": props.total_memory, "multiprocessors": props.multi_processor_count,
                          "l2_bytes": l2}
            available, unavailable = gpu_backends()
            env["gpu_backends"] = {"available": available, "unavailable": unavailable}
            self.report["l2_bytes"] = l2
            self.subjects = available
            for name, why in unavailable.items():
                self.skip(f"ops@{name}", f"backend unavailable: {why}")
        else:
            # no GPU L2 here, so no shape counts as leaving it (l2_bytes stays None)
            self.subjects = ["cpp" if ext.loaded else "reference-fallback"]
        env["settings"] = {
            "cudnn_benchmark": self.device == "cuda",
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "bf16": "torch.autocast(dtype=torch.bfloat16) around model.predict (what MemKD.predict supports)",
        }
        return env

    # ---- ops

    def subject_impls(self, fn: Callable[[], object]) -> list[Impl]:
        """The memkd op behind each backend under test: on the GPU each backend selected before its
        rounds; on the CPU the dispatcher's CPU kernel."""
        if self.device == "cuda":
            return [Impl(name, fn, lambda name=name: select_gpu_backend(name)) for name in self.subjects]
        return [Impl(self.subjects[0], fn)]

    def time_impls(self, impls: Sequence[Impl], rounds: Optional[int] = None, round_s: Optional[float] = None) -> dict:
        s = self.sizes
        return interleaved(impls, self.clock, s.warmup, s.rounds if rounds is None else rounds,
                           s.op_round_s if round_s is None else round_s, s.max_iterations)

    def copy_bandwidth(self) -> dict:
        """Device-to-device copy of ``copy_bytes`` (read + write): the achievable bandwidth."""
        n = self.sizes.copy_bytes // 4
        src = torch.empty(n, dtype=torch.float32, device=self.device).fill_(1.0)
        dst = torch.empty_like(src)
        impls = self.time_impls([Impl("copy", lambda: dst.copy_(src))])
        result = impls["copy"]
        if "median_s" in result:
            result["GBps"] = 2 * src.numel() * 4 / result["median_s"] / 1e9
            self.report["copy_bandwidth_GBps"] = result["GBps"]
        return {"bytes_formula": "2 * tensor bytes / time", "bytes": 2 * src.numel() * 4, "impls": impls}

    def add_bandwidth(self, impls: dict, nbytes: int) -> None:
        copy = self.report["copy_bandwidth_GBps"]
        for name, result in impls.items():
            if "median_s" not in result:
                continue
            result["GBps"] = nbytes / result["median_s"] / 1e9
            result["copy_fraction"] = result["GBps"] / copy if copy else None
            if name != "composite":
                result["speedup_vs_composite"] = per_round_ratio(impls, "composite", name)

    def fits_l2(self, nbytes: int) -> Optional[bool]:
        l2 = self.report["l2_bytes"]
        return None if l2 is None else nbytes <= l2

    def op_case(self, op: str, pass_: str, shape: Sequence[int], dtype: torch.dtype) -> dict:
        s = self.sizes
        torch.manual_seed(0)
        c, h, w = shape
        if op == "nr_recall":
            inputs = (torch.randn(s.batch, c, h, w, device=self.device, dtype=dtype),
                      torch.randn(s.memory_items, c, device=self.device, dtype=dtype),
                      torch.randn(s.memory_items, c, device=self.device, dtype=dtype))
            subject, composite = memkd.ops.nr_recall, nr_recall_composite
            grad_out = torch.randn_like(inputs[0])
        else:
            inputs = tuple(torch.randn(s.batch, c, h, w, device=self.device, dtype=dtype) for _ in range(2))
            subject, composite = memkd.ops.cosine_distance_map, reference.cosine_distance_map
            grad_out = torch.randn(s.batch, h, w, device=self.device, dtype=dtype)
        subject_call, composite_call = (timed_call(fn, inputs, pass_, grad_out) for fn in (subject, composite))
        impls = self.time_impls(self.subject_impls(subject_call) + [Impl("composite", composite_call)])
        nbytes = min_bytes(op, pass_, s.batch, shape, s.memory_items, inputs[0].element_size())
        self.add_bandwidth(impls, nbytes)
        fits = self.fits_l2(nbytes)
        return {"min_bytes": nbytes, "bytes_formula": BYTES_FORMULAS[(op, pass_)], "fits_l2": fits, "impls": impls,
                "targets": op_targets(op, pass_, fits is False, impls, self.subjects, self.judged)}

    def anomaly_map_case(self, dtype: torch.dtype) -> dict:
        s = self.sizes
        torch.manual_seed(0)
        shapes = s.op_shapes[:3]
        student = [torch.randn(s.batch, *shape, device=self.device, dtype=dtype) for shape in shapes]
        teacher = [torch.randn(s.batch, *shape, device=self.device, dtype=dtype) for shape in shapes]
        size = (s.anomaly_out, s.anomaly_out)

        def call(fn):
            def run():
                with torch.no_grad():
                    return fn(student, teacher, size, SIGMA)
            return run

        out_itemsize = call(memkd.ops.anomaly_map)()[0].element_size()
        impls = self.time_impls(self.subject_impls(call(memkd.ops.anomaly_map)) + [Impl("composite", call(reference.anomaly_map))])
        nbytes = anomaly_map_min_bytes(s.batch, shapes, s.anomaly_out, student[0].element_size(), out_itemsize)
        self.add_bandwidth(impls, nbytes)
        copy = self.report["copy_bandwidth_GBps"]
        roofline_s = nbytes / (copy * 1e9) if copy else None
        for result in impls.values():
            if "median_s" in result:
                result["roofline_ratio"] = result["median_s"] / roofline_s if roofline_s else None
        return {"min_bytes": nbytes, "bytes_formula": BYTES_FORMULAS[("anomaly_map", "fwd")],
                "fits_l2": self.fits_l2(nbytes), "roofline_s": roofline_s, "impls": impls,
                "targets": op_targets("anomaly_map", "fwd", self.fits_l2(nbytes) is False, impls, self.subjects, self.judged)}

    def op_steps(self) -> list[Step]:
        s = self.sizes
        steps = [Step("ops/copy_bandwidth", "ops", "copy", {"bytes": s.copy_bytes}, self.copy_bandwidth)]

        def op_cases(op: str) -> list[Step]:
            cases = []
            for dtype in (torch.float32, torch.bfloat16):
                for shape in s.op_shapes:
                    for pass_ in ("fwd", "fwdbwd"):
                        c, h, w = shape
                        params = {"op": op, "pass": pass_, "batch": s.batch, "C": c, "H": h, "W": w,
                                  "dtype": DTYPE_NAMES[dtype]}
                        if op == "nr_recall":
                            params["L"] = s.memory_items
                        cases.append(Step(f"ops/{op}/{pass_}/B{s.batch}-C{c}-{h}x{w}/{DTYPE_NAMES[dtype]}", "ops", "op",
                                          params, lambda a=(op, pass_, shape, dtype): self.op_case(*a)))
            return cases

        steps += op_cases("nr_recall")
        for dtype in (torch.float32, torch.bfloat16):
            params = {"op": "anomaly_map", "pass": "fwd", "batch": s.batch, "stages": [list(x) for x in s.op_shapes[:3]],
                      "out": s.anomaly_out, "sigma": SIGMA, "dtype": DTYPE_NAMES[dtype]}
            steps.append(Step(f"ops/anomaly_map/fwd/B{s.batch}-3stages-{s.anomaly_out}x{s.anomaly_out}/{DTYPE_NAMES[dtype]}",
                              "ops", "anomaly_map", params, lambda d=dtype: self.anomaly_map_case(d)))
        # cosine_distance_map has no target of its own: last among the ops
        return steps + op_cases("cosine_distance_map")

    # ---- predict and train

    def model(self, method: str):
        if method not in self.models:
            self.models[method] = build(method, self.sizes.backbone, self.sizes.image, self.device)
        return self.models[method]

    def predict_case(self, batch: int, bf16: bool, graphs: bool) -> dict:
        x = images(batch, self.sizes.image, self.device)
        impls, unsupported = [], {}
        for method in ("memkd", "rd"):
            call = predict_call(self.model(method), x, bf16, graphs)
            if graphs:
                try:
                    call = cuda_graph(call, x)
                except Exception as exc:  # noqa: BLE001 - capture can fail; recorded, not fatal
                    unsupported[method] = f"CUDA graph capture failed: {type(exc).__name__}: {exc}"
                    with contextlib.suppress(Exception):
                        torch.cuda.synchronize()
                    free_memory()
                    continue
            impls.append(Impl(method, call))
        # batch 1 is a latency: one call per round; larger batches take long enough per call
        results = self.time_impls(impls, round_s=0.0)
        for method, why in unsupported.items():
            results[method] = {"unsupported": why}
            self.skip(f"predict/B{batch}/{'bf16' if bf16 else 'fp32'}/cuda_graph@{method}", why)
        for result in results.values():
            if "median_s" in result:
                result["images_per_s"] = batch / result["median_s"]
        ratio = per_round_ratio(results, "memkd", "rd")
        targets = [target("memkd/rd time ratio", ratio, "<=", MEMKD_VS_RD, self.judged)]
        memkd_result = results.get("memkd", {})
        if graphs and batch == 1:
            targets.append(target("memkd batch-1 latency with CUDA graphs (s)", memkd_result.get("median_s"),
                                  "<", GRAPH_LATENCY_S, self.judged))
        return {"impls": results, "memkd_over_rd": ratio, "targets": targets}

    def train_case(self) -> dict:
        s = self.sizes
        b = s.train_batch
        steps = [
            Impl("memkd", training_step(self.model("memkd"), b, b, s.image, self.device, cached_exemplars=True)),
            Impl("memkd-uncached", training_step(self.model("memkd"), b, b, s.image, self.device, cached_exemplars=False)),
            Impl("rd", training_step(self.model("rd"), b, b, s.image, self.device)),
        ]
        results = self.time_impls(steps, rounds=s.train_rounds, round_s=0.0)
        ratio = per_round_ratio(results, "memkd", "rd")
        return {"impls": results, "memkd_over_rd": ratio,
                "targets": [target("memkd/rd training step time ratio", ratio, "<=", MEMKD_VS_RD, self.judged)]}

    def predict_steps(self) -> list[Step]:
        s = self.sizes
        steps = []
        # (batch, bf16, CUDA graph), most telling first: the memkd/rd ratio, the latency target, the
        # throughput target (the largest batch first), then the rest
        cases = [(1, False, False), (1, True, True)]
        cases += [(batch, True, False) for batch in sorted(s.throughput_batches, reverse=True)]
        cases += [(1, False, True), (1, True, False)]
        for batch, bf16, graphs in cases:
            precision = "bf16" if bf16 else "fp32"
            params = {"backbone": s.backbone, "image": s.image, "batch": batch, "precision": precision,
                      "cuda_graph": graphs, "methods": ["memkd", "rd"]}
            step_id = f"predict/{s.backbone}/B{batch}/{s.image}x{s.image}/{precision}/{'cuda_graph' if graphs else 'eager'}"
            if graphs and self.device != "cuda":
                self.skip(step_id, "CUDA graphs need a CUDA device")
                continue
            kind = "predict_graph" if graphs else ("predict" if batch == 1 else "throughput")
            steps.append(Step(step_id, "predict", kind, params, lambda a=(batch, bf16, graphs): self.predict_case(*a), True))
        return steps

    def train_steps(self) -> list[Step]:
        s = self.sizes
        params = {"backbone": s.backbone, "image": s.image, "batch": s.train_batch, "exemplars": s.train_batch,
                  "precision": "fp32 (TrainConfig.amp=False, the default)", "optimizer": "Adam (the trainer's)",
                  "impls": {"memkd": "exemplar features from the trainer's cache (its default)",
                            "memkd-uncached": "exemplar set through the teacher every step", "rd": "RD4AD baseline"}}
        return [Step(f"train/{s.backbone}/B{s.train_batch}/{s.image}x{s.image}", "train", "train", params, self.train_case, True)]

    def main(self) -> int:
        self.report["environment"] = self.environment()
        self.write()
        if self.device == "cuda":
            torch.backends.cudnn.benchmark = True  # static shapes: let cuDNN pick its fastest convolutions
        steps = []
        for group, make in (("ops", self.op_steps), ("predict", self.predict_steps), ("train", self.train_steps)):
            if group in self.only:
                steps += make()
            else:
                self.skip(group, "not selected with --only")
        self.run_steps(steps)
        return 1 if self.failed else 0


def timed_call(fn: Callable, inputs: tuple, pass_: str, grad_out: torch.Tensor) -> Callable[[], object]:
    """The call to time: forward under no_grad, or forward+backward with torch.autograd.grad of
    ``grad_out`` into all inputs (so nothing accumulates in .grad between rounds)."""
    if pass_ == "fwd":
        def forward():
            with torch.no_grad():
                return fn(*inputs)
        return forward
    inputs = tuple(x.detach().requires_grad_(True) for x in inputs)

    def forward_backward():
        return torch.autograd.grad(fn(*inputs), inputs, grad_out)

    return forward_backward


def predict_call(model, x: torch.Tensor, bf16: bool, graphs: bool) -> Callable[[], object]:
    """``model.predict(x)``, under bf16 autocast when ``bf16``. Under capture the autocast cache is
    off, so that the weight casts are part of the graph rather than tensors freed after capture."""
    def predict():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=not graphs):
            return model.predict(x)
    return predict


def cuda_graph(call: Callable[[], object], x: torch.Tensor) -> Callable[[], object]:
    """``call`` (which reads ``x``) captured once as a CUDA graph; each replay first copies a fresh
    input into ``x``, as a user of a captured predictor would."""
    fresh = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # allocator, cuDNN and Triton warm-up outside the capture
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()

    def replay():
        x.copy_(fresh)
        graph.replay()
        return out

    return replay


# ---- Markdown -----------------------------------------------------------------------------------


def _us(seconds: Optional[float]) -> str:
    return "" if seconds is None else f"{seconds * 1e6:.1f}"


def _ms(seconds: Optional[float]) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.3f}"


def _num(value: Optional[float], fmt: str = ".2f") -> str:
    return "" if value is None else format(value, fmt)


def _impl_failure(result: dict) -> str:
    if "unsupported" in result:
        return result["unsupported"]
    lines = result.get("error", "").strip().splitlines()
    return ("OOM: " if result.get("out_of_memory") else "error: ") + (lines[-1] if lines else "?")


def markdown(report: dict) -> str:
    env = report["environment"]
    gpu = env.get("gpu", {})
    ext = env.get("memkd_extension", {})
    lines = [
        "# memkd GPU benchmarks",
        "",
        f"Status: **{report['status']}**. Mode: {report['mode']}, device: {report['device']}"
        + (f" ({gpu.get('name')}, sm_{gpu.get('capability', '').replace('.', '')})" if gpu else "")
        + f". Started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(report['started_unix']))}"
        + (f", deadline {time.strftime('%H:%M:%S UTC', time.gmtime(report['deadline_unix']))}" if report["deadline_unix"] else "")
        + ".",
        "",
        f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}), triton {env.get('triton')}, "
        f"python {env.get('python')}; memkd._C: loaded={ext.get('loaded')}, CUDA kernels={ext.get('cuda_kernels')}, "
        f"build {ext.get('build_info')}.",
        "",
    ]
    statuses = [m["status"] for m in report["measurements"]]
    lines += [f"{len(statuses)} measurements ({statuses.count('ok')} ok, {len(statuses) - statuses.count('ok')} not), "
              f"{len(report['skipped'])} skipped, {len(report['errors'])} errors.", ""]
    if "gpu_backends" in env:
        lines += [f"GPU backends: available {env['gpu_backends']['available']}; unavailable {env['gpu_backends']['unavailable'] or 'none'}.", ""]
    if report["mode"] == "tiny":
        lines += ["**Rehearsal at tiny sizes: the numbers mean nothing and no target is judged.**", ""]

    measurements = report["measurements"]
    lines += ["## Targets", ""]
    if report.get("targets"):
        lines += ["| measurement | target | value | needed | verdict |", "|---|---|---|---|---|"]
        for t in report["targets"]:
            lines.append(f"| {t['measurement']} | {t['name']} | {_num(t['value'], '.4g')} | {t['relation']} {t['threshold']:g} | {t['verdict']} |")
    else:
        lines.append("None measured yet.")
    lines.append("")

    copy = report["copy_bandwidth_GBps"]
    l2 = report["l2_bytes"]
    ops = [m for m in measurements if m["group"] == "ops" and m["id"] != "ops/copy_bandwidth"]
    lines += [
        "## Ops",
        "",
        f"Copy bandwidth (device-to-device copy of {report['sizes']['copy_bytes'] / 2**20:.0f} MiB, 2 * bytes / time): "
        + (f"**{copy:.0f} GB/s**." if copy else "not measured."),
        "",
        "Minimum traffic (s = element size; GB/s = these bytes / median time; % copy = that over the copy bandwidth):",
        "",
    ]
    lines += [f"- {key}: `{text}`" for key, text in report["bytes_formulas"].items()]
    lines += ["", "The composite (plain PyTorch; autograd differentiates it for forward+backward):", ""]
    lines += [f"- {op}: {text}" for op, text in report["composites"].items()]
    lines += [
        "",
        (f"L2 cache: {l2 / 2**20:.0f} MiB. A shape whose minimum traffic is at most that fits in L2 (in L2 = yes): "
         "between back-to-back calls its data may stay in the cache, so its GB/s can exceed the copy bandwidth. "
         "The bandwidth targets apply to shapes leaving L2 only." if l2 else
         "No GPU L2 here: the bandwidth targets are not evaluated."),
        "Times are per call, median over interleaved rounds (p10/p90 beside); speedup = composite time / time, median over rounds. "
        "Calls shorter than the host's launch overhead (some microseconds) measure the launch, not the kernel.",
        "",
        "| op | pass | B | C x H x W | dtype | MB moved | in L2 | impl | median us | p10 | p90 | GB/s | % copy | speedup vs composite |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in ops:
        p = m["params"]
        shape = f"{p['C']}x{p['H']}x{p['W']}" if "C" in p else "3 stages -> " + f"{p['out']}x{p['out']}"
        head = f"| {p['op']} | {p['pass']} | {p['batch']} | {shape} | {p['dtype']} | "
        if m["status"] in ("error", "running", "interrupted"):
            err = m.get("error", "").strip().splitlines()
            lines.append(head + f" |  | {m['status']}: {err[-1] if err else ''} | | | | | | |")
            continue
        fits = {True: "yes", False: "no", None: "?"}[m.get("fits_l2")]
        for name, r in m["impls"].items():
            if "median_s" not in r:
                lines.append(head + f"{m['min_bytes'] / 1e6:.4g} | {fits} | {name} | {_impl_failure(r)} | | | | | |")
                continue
            frac = r.get("copy_fraction")
            lines.append(head + f"{m['min_bytes'] / 1e6:.4g} | {fits} | {name} | {_us(r['median_s'])} | {_us(r['p10_s'])} | "
                         f"{_us(r['p90_s'])} | {_num(r.get('GBps'), '.4g')} | {'' if frac is None else f'{100 * frac:.3g}'} | "
                         f"{_num(r.get('speedup_vs_composite'))} |")
    amaps = [m for m in ops if m["params"]["op"] == "anomaly_map" and "impls" in m]
    if amaps:
        lines += ["", "anomaly_map against its roofline (minimum bytes / copy bandwidth):", "",
                  "| dtype | impl | median us | roofline us | time / roofline |", "|---|---|---|---|---|"]
        for m in amaps:
            for name, r in m["impls"].items():
                if "median_s" in r:
                    lines.append(f"| {m['params']['dtype']} | {name} | {_us(r['median_s'])} | {_us(m.get('roofline_s'))} | "
                                 f"{_num(r.get('roofline_ratio'))} |")
    lines.append("")

    for group, title in (("predict", "Predict (model.predict, random weights)"), ("train", "Training step")):
        rows = [m for m in measurements if m["group"] == group]
        lines += [f"## {title}", ""]
        if group == "predict":
            lines += [f"bf16 = {env.get('settings', {}).get('bf16')}. Batch 1: one call per round (latency); CUDA graph: "
                      "model.predict captured once with torch.cuda.CUDAGraph, each replay after copying the input in.", ""]
        if not rows:
            lines += ["Not run.", ""]
            continue
        lines += ["| measurement | impl | median ms | p10 | p90 | images/s | memkd/rd |", "|---|---|---|---|---|---|---|"]
        for m in rows:
            if "impls" not in m:
                err = m.get("error", "").strip().splitlines()
                lines.append(f"| {m['id']} | {m['status']}: {err[-1] if err else ''} | | | | | |")
                continue
            for name, r in m["impls"].items():
                ratio = _num(m.get("memkd_over_rd"), ".3f") if name == "memkd" else ""
                if "median_s" not in r:
                    lines.append(f"| {m['id']} | {name} | {_impl_failure(r)} | | | | {ratio} |")
                    continue
                per_s = m["params"]["batch"] / r["median_s"]
                lines.append(f"| {m['id']} | {name} | {_ms(r['median_s'])} | {_ms(r['p10_s'])} | {_ms(r['p90_s'])} | "
                             f"{per_s:.1f} | {ratio} |")
        lines.append("")

    lines += ["## Skipped", ""]
    lines += [f"- {s['id']}: {s['reason']}" for s in report["skipped"]] or ["Nothing."]
    lines += ["", "## Errors", ""]
    if report["errors"]:
        for e in report["errors"]:
            last = e["error"].strip().splitlines()
            lines.append(f"- {e['id']}: {last[-1] if last else ''} (traceback in bench.json)")
    else:
        lines.append("None.")
    lines.append("")
    return "\n".join(lines)


# ---- entry point --------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for bench.json and bench.md")
    parser.add_argument("--deadline", type=float, default=None, help="UNIX time by which the last step must end")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU rehearsal)")
    parser.add_argument("--only", default=",".join(GROUPS), help="comma-separated steps among ops,predict,train")
    args = parser.parse_args(argv)
    only = tuple(g.strip() for g in args.only.split(",") if g.strip())
    unknown = [g for g in only if g not in GROUPS]
    if unknown or not only:
        parser.error(f"--only: expected a comma-separated subset of {','.join(GROUPS)}, got {args.only!r}")
    args.only = only
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device: cuda was asked for but torch sees no CUDA device; use --device cpu --tiny for the rehearsal")
    if args.device == "cpu" and not args.tiny:
        parser.error("--device: cpu runs only with --tiny (the full sizes take hours on a CPU)")
    return args


def _terminate(signum, frame):
    raise Terminated()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        # The rehearsal's numbers do not matter, its time does: on a shared 2-core machine two
        # oversubscribed OpenMP threads ran the tiny models up to 16x slower than one.
        torch.set_num_threads(1)
    bench = Bench(args.out, args.device, args.tiny, args.deadline, args.only)
    previous = signal.signal(signal.SIGTERM, _terminate)
    code = 0
    try:
        code = bench.main()
        bench.report["status"] = "done"
    except INTERRUPTS as exc:
        bench.report["status"] = f"interrupted ({'SIGTERM' if isinstance(exc, Terminated) else 'Ctrl-C'})"
        code = TERMINATED_EXIT
    except Exception as exc:  # noqa: BLE001 - still write what was done
        bench.report["status"] = "failed"
        bench.report["errors"].append({"id": "program", "error": error_text(exc)})
        code = 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    bench.report["exit_code"] = code
    bench.write()
    return code


if __name__ == "__main__":
    sys.exit(main())
