"""Checks the CUDA kernels of csrc/cuda without a GPU: compiles them with the host compiler against
emulation.h (every block of a launch runs on CPU threads that meet at a barrier for __syncthreads,
shared memory poisoned with NaN before each block) and compares the ops with memkd.ops.reference in
float64 over odd shapes, every layout and dtype, the three pixel tiles, multi-tile backward slots,
L > 64, zero vectors, the ATen fallbacks, and bitwise determinism.

    python csrc/cuda/emulation_check.py [cos] [amap] [nr] [extra]    # default: all groups
    python csrc/cuda/emulation_check.py --tsan                       # ThreadSanitizer race check

Needs g++ (C++20) and the installed torch's headers; builds under $MEMKD_EMU_BUILD (default
/tmp/memkd-emulation). Tile choices follow the emulated device: MEMKD_EMU_SMS (multiprocessors,
default 4: 1 selects 64-pixel tiles, 100 selects 16), MEMKD_EMU_SMEM (shared memory per block,
bytes; small values force the ATen fallbacks). Not a pytest module: the emulation is slow (minutes)
and proves the kernels' logic, not their behaviour on a real GPU (warp scheduling, memory model).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BUILD = Path(os.environ.get("MEMKD_EMU_BUILD", "/tmp/memkd-emulation"))
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def build(tsan: bool) -> Path:
    BUILD.mkdir(parents=True, exist_ok=True)
    out = BUILD / ("emulation_ops_tsan.so" if tsan else "emulation_ops.so")
    sources = [HERE / "emulation_ops.cc", *HERE.glob("*.cuh"), HERE / "emulation.h", ROOT / "csrc/ops/checks.h"]
    if out.exists() and out.stat().st_mtime > max(s.stat().st_mtime for s in sources):
        return out
    tdir = Path(torch.__file__).parent
    cmd = [
        "g++", "-std=c++20", "-O1" if tsan else "-O2", "-g", "-fPIC", "-shared", "-Wall", "-Wno-unused-function",
        "-Wno-unknown-pragmas", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{tdir / 'include'}", f"-I{tdir / 'include/torch/csrc/api/include'}", str(HERE / "emulation_ops.cc"),
        "-o", str(out), f"-L{tdir / 'lib'}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{tdir / 'lib'}",
    ] + (["-fsanitize=thread"] if tsan else [])
    print("building:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


class Checker:
    def __init__(self, lib: Path):
        torch.ops.load_library(str(lib))
        sys.path.insert(0, str(ROOT))
        from memkd.ops import reference

        self.ref = reference
        self.ops = torch.ops.memkd_emu
        self.gen = torch.Generator().manual_seed(0)
        self.failures = 0

    def close(self, got, want, dtype, what):
        tol = TOL[dtype] * max(1.0, want.abs().max().item())
        err = (got.double() - want.double()).abs().max().item()
        ok = err <= tol and bool(torch.isfinite(got).all())
        self.failures += not ok
        print("ok  " if ok else "FAIL", what, f"err={err:.3g} tol={tol:.3g}", flush=True)

    def make(self, shape, dtype, layout):
        b, c, h, w = shape
        if layout == "strided":
            return torch.randn(b, c, h, 2 * w, generator=self.gen, dtype=torch.float64).to(dtype)[..., ::2]
        x = torch.randn(b, c, h, w, generator=self.gen, dtype=torch.float64).to(dtype)
        return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x

    def nr(self, shape, dtype, layout, glayout):
        b, c, h, w, items = shape
        q = self.make((b, c, h, w), dtype, layout)
        k = torch.randn(items, c, generator=self.gen, dtype=torch.float64).to(dtype)
        v = torch.randn(items, c, generator=self.gen, dtype=torch.float64).to(dtype)
        go = self.make((b, c, h, w), dtype, glayout)
        t = time.time()
        out = self.ops.nr_recall(q, k, v)
        grads = self.ops.nr_recall_backward(go, q, k, v)
        tag = f"nr {shape} {dtype} {layout}/{glayout} ({time.time() - t:.1f}s)"
        qd, kd, vd = [x.double().requires_grad_() for x in (q, k, v)]
        exp = self.ref.nr_recall(qd, kd, vd)
        exp_grads = torch.autograd.grad(exp, (qd, kd, vd), go.double())
        assert out.dtype == dtype and all(g.dtype == dtype for g in grads), tag
        if layout == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last), tag
        self.close(out, exp, dtype, tag + " out")
        for name, got, want in zip("qkv", grads, exp_grads):
            self.close(got, want, dtype, f"{tag} d{name}")

    def cos(self, shape, dtype, la, lb):
        a, b = self.make(shape, dtype, la), self.make(shape, dtype, lb)
        go = torch.randn(shape[0], shape[2], shape[3], generator=self.gen, dtype=torch.float64).to(dtype)
        out = self.ops.cosine_distance_map(a, b)
        grads = self.ops.cosine_distance_map_backward(go, a, b)
        ad, bd = a.double().requires_grad_(), b.double().requires_grad_()
        exp = self.ref.cosine_distance_map(ad, bd)
        exp_grads = torch.autograd.grad(exp, (ad, bd), go.double())
        tag = f"cos {shape} {dtype} {la}/{lb}"
        self.close(out, exp, dtype, tag + " out")
        for name, got, want in zip(("fs", "ft"), grads, exp_grads):
            self.close(got, want, dtype, f"{tag} d{name}")

    def amap(self, stage_shapes, dtype, layout, out_size, sigma):
        s = [self.make(x, dtype, layout) for x in stage_shapes]
        t = [self.make(x, dtype, "contiguous") for x in stage_shapes]
        maps, scores = self.ops.anomaly_map(s, t, list(out_size), sigma)
        exp_maps, exp_scores = self.ref.anomaly_map([x.double() for x in s], [x.double() for x in t], out_size, sigma)
        tag = f"amap {len(stage_shapes)} stages {out_size} sigma={sigma} {dtype} {layout}"
        assert maps.shape == (stage_shapes[0][0], *out_size) and maps.dtype == dtype, tag
        self.close(maps, exp_maps, dtype, tag + " maps")
        self.close(scores, exp_scores, dtype, tag + " scores")

    def run(self, groups):
        dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
        if "cos" in groups:
            for shape in [(1, 37, 5, 7), (2, 64, 9, 11), (3, 19, 3, 5), (2, 130, 1, 1)]:
                for la, lb in [("contiguous", "contiguous"), ("channels_last", "contiguous"), ("strided", "channels_last")]:
                    for dtype in dtypes:
                        self.cos(shape, dtype, la, lb)
        if "amap" in groups:
            stages = [(2, 13, 16, 16), (2, 26, 8, 8), (2, 51, 4, 4)]
            for dtype in [torch.float32, torch.float64, torch.bfloat16]:
                for layout in ["contiguous", "channels_last"]:
                    for out_size, sigma in [((64, 64), 4.0), ((37, 50), 2.5), ((9, 11), 4.0), ((20, 20), 0.0), ((1, 5), 1.0)]:
                        self.amap(stages, dtype, layout, out_size, sigma)
        if "nr" in groups:
            for shape in [(1, 37, 5, 7, 50), (2, 64, 9, 11, 1), (3, 19, 3, 5, 17), (2, 300, 13, 13, 50)]:
                for layout, glayout in [("contiguous", "contiguous"), ("channels_last", "contiguous"), ("strided", "channels_last")]:
                    for dtype in dtypes:
                        self.nr(shape, dtype, layout, glayout)
        if "extra" in groups:
            self.extra()
        print("FAILURES:", self.failures, flush=True)
        return self.failures

    def extra(self):
        # L > 64 (several row passes), L = 1, C not a multiple of the chunk, batch 1
        for shape in [(2, 70, 6, 7, 150), (1, 130, 4, 17, 65), (3, 5, 2, 3, 1)]:
            for dtype in [torch.float32, torch.float64]:
                self.nr(shape, dtype, "channels_last", "contiguous")
                self.nr(shape, dtype, "contiguous", "channels_last")
        # zero query pixels and a zero key: finite, and like the reference
        q = torch.randn(2, 12, 3, 5, dtype=torch.float64)
        q[0, :, 1, 2] = 0
        q[1] = 0
        k, v = torch.randn(7, 12, dtype=torch.float64), torch.randn(7, 12, dtype=torch.float64)
        k[3] = 0
        for dtype in [torch.float32, torch.float64]:
            out = self.ops.nr_recall(q.to(dtype), k.to(dtype), v.to(dtype))
            grads = self.ops.nr_recall_backward(torch.ones_like(q).to(dtype), q.to(dtype), k.to(dtype), v.to(dtype))
            qd, kd, vd = [x.clone().requires_grad_() for x in (q, k, v)]
            exp = self.ref.nr_recall(qd, kd, vd)
            exp_grads = torch.autograd.grad(exp, (qd, kd, vd), torch.ones_like(q))
            self.close(out, exp, dtype, f"zero vectors {dtype} out")
            for name, got, want in zip("qkv", grads, exp_grads):
                scale = max(1.0, want.abs().max().item())  # 1 / EPS at the zero vectors
                self.close(got / scale, want / scale, dtype, f"zero vectors {dtype} d{name} (relative)")
        self.close(self.ops.cosine_distance_map(torch.zeros(1, 4, 2, 2), torch.randn(1, 4, 2, 2)),
                   torch.ones(1, 2, 2, dtype=torch.float64), torch.float32, "cosine of a zero vector")
        grads = self.ops.cosine_distance_map_backward(torch.ones(1, 2, 2), torch.zeros(1, 4, 2, 2), torch.randn(1, 4, 2, 2))
        assert all(torch.isfinite(g).all() for g in grads)
        maps, scores = self.ops.anomaly_map([torch.zeros(1, 4, 2, 2)], [torch.zeros(1, 4, 2, 2)], [4, 4], 4.0)
        assert torch.isfinite(maps).all() and torch.isfinite(scores).all()
        # more than 16 stages and blur radii beyond the fused kernel (ATen fallbacks)
        self.amap([(2, 5, 4 + i % 3, 5) for i in range(18)], torch.float64, "contiguous", (12, 13), 1.0)
        self.amap([(2, 6, 8, 8)], torch.float64, "contiguous", (30, 30), 30.0)
        self.amap([(2, 6, 8, 8)], torch.float32, "channels_last", (70, 33), 20.0)
        # bitwise determinism of the backward
        q = torch.randn(2, 40, 9, 9, generator=self.gen)
        k, v = torch.randn(50, 40, generator=self.gen), torch.randn(50, 40, generator=self.gen)
        a, b = self.ops.nr_recall_backward(q, q, k, v), self.ops.nr_recall_backward(q, q, k, v)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), "backward not deterministic"
        print("ok   determinism", flush=True)


def race_workload(lib: Path) -> None:
    """A small run of every kernel (several tiles, chunks and row passes), for ThreadSanitizer."""
    torch.ops.load_library(str(lib))
    ops = torch.ops.memkd_emu
    gen = torch.Generator().manual_seed(0)
    for dtype in [torch.float32, torch.float64]:
        for b, c, h, w, items in [(2, 70, 6, 7, 70), (1, 40, 3, 9, 5)]:
            q = torch.randn(b, c, h, w, generator=gen).to(dtype)
            k, v = torch.randn(items, c, generator=gen).to(dtype), torch.randn(items, c, generator=gen).to(dtype)
            ops.nr_recall(q, k, v)
            ops.nr_recall_backward(q.contiguous(memory_format=torch.channels_last), q, k, v)
        a = torch.randn(2, 70, 5, 9, generator=gen).to(dtype)
        ops.cosine_distance_map(a, a.contiguous(memory_format=torch.channels_last))
        ops.cosine_distance_map_backward(torch.randn(2, 5, 9).to(dtype), a, a)
        ops.anomaly_map([a, a[:, :, :3]], [a, a[:, :, :3]], [40, 35], 4.0)
    print("race workload finished", flush=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--race-workload"]:  # the child of --tsan, with libtsan preloaded
        race_workload(Path(argv[1]))
        return 0
    if "--tsan" in argv:
        lib = build(tsan=True)
        libtsan = subprocess.run(["g++", "-print-file-name=libtsan.so"], capture_output=True, text=True).stdout.strip()
        env = {**os.environ, "LD_PRELOAD": libtsan, "TSAN_OPTIONS": "report_signal_unsafe=0 ignore_noninstrumented_modules=1"}
        status = 0
        for sms in ("4", "1"):  # 32- and 64-pixel tiles, one and several tiles per backward slot
            run = subprocess.run([sys.executable, __file__, "--race-workload", str(lib)], env={**env, "MEMKD_EMU_SMS": sms},
                                 capture_output=True, text=True)
            races = run.stderr.count("WARNING: ThreadSanitizer")
            print(f"MEMKD_EMU_SMS={sms}: exit {run.returncode}, {races} ThreadSanitizer reports", flush=True)
            if races or run.returncode:
                print(run.stderr[-20000:])
                status = 1
        return status
    groups = [a for a in argv if not a.startswith("-")] or ["cos", "amap", "nr", "extra"]
    return int(Checker(build(tsan=False)).run(groups) > 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
