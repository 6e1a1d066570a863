"""Peak memory of one inference call or one training step, measured in a fresh process.

    python benchmarks/memory_probe.py '{"what": "inference", "method": "memkd", "backbone": "resnet18",
                                        "batch": 1, "exemplars": 1, "device": "cpu", "threads": 2}'

prints one JSON line. CPU: the process's resident set (Linux). Once the model is built and the
inputs exist, VmRSS is read (``loaded_MB``) and the peak-RSS mark is reset
(``/proc/self/clear_refs`` = 5); the call runs twice (the first pays one-time costs: oneDNN
primitive caches, Adam's state) and VmHWM is read: ``peak_MB`` is the whole process at its peak,
``delta_MB`` = peak - loaded, what the call needs on top of the loaded model (for training
including Adam's two moments, which a training run keeps). The peak is taken before the warm-up
on purpose: with the benchmark's malloc tunables (no trimming) memory freed by a first call stays
resident, so a "before the second call" baseline would hide it. Without clear_refs the peak is
``getrusage(RUSAGE_SELF).ru_maxrss`` over the whole process life (said in ``how``).
GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, taken the same way.
MB = 1e6 bytes.
"""
from __future__ import annotations

import json
import re
import resource
import sys
from pathlib import Path

import torch


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main(spec: dict) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchlib import build, images, training_step

    torch.set_num_threads(spec["threads"])
    device, size = spec["device"], spec.get("size", 256)
    model = build(spec["method"], spec["backbone"], size, device)
    if spec["what"] == "inference":
        x = images(spec["batch"], size, device)

        def call():
            model.predict(x)
    else:
        call = training_step(model, spec["batch"], spec["exemplars"], size, device)

    out = dict(spec)
    if device == "cuda":
        torch.cuda.synchronize()
        loaded = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        out.update(peak_MB=peak / 1e6, loaded_MB=loaded / 1e6, delta_MB=(peak - loaded) / 1e6,
                   how="torch.cuda.max_memory_allocated over 2 calls (tensors only, not the caching allocator's reserve)")
        return out
    if _reset_peak():
        loaded = _status_kb("VmRSS") * 1024
        call()
        call()
        peak = _status_kb("VmHWM") * 1024
        how = "fresh process: VmHWM over 2 calls (peak mark reset once the model was loaded) minus VmRSS then"
    else:
        call()
        call()
        loaded = None
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        how = "ru_maxrss of a fresh process over its whole life (peak could not be reset)"
    out.update(peak_MB=peak / 1e6, loaded_MB=loaded / 1e6 if loaded else None,
               delta_MB=(peak - loaded) / 1e6 if loaded else None, how=how)
    return out


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
