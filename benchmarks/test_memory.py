"""How much memory: peak memory of inference and of a training step (each in a fresh process, see
memory_probe.py for the method), the size of the memory bank (NR Memory keys + values) and of the
checkpoint files. Nothing here is timed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import settings_of, train_batch

PROBE = Path(__file__).resolve().parent / "memory_probe.py"


def pytest_generate_tests(metafunc):
    if metafunc.function.__name__ != "test_peak_memory":
        return
    settings = settings_of(metafunc.config)
    backbones = ("wide_resnet50_2", "resnet18") if settings.full else ("wide_resnet50_2",)
    cases = []
    for backbone in backbones:
        for what in ("inference", "training"):
            for method in ("memkd", "rd"):
                batch = 1 if what == "inference" else train_batch(settings, backbone)
                cases.append((what, method, backbone, batch))
    metafunc.parametrize("what,method,backbone,batch", cases, ids=["-".join(map(str, c)) for c in cases])


def test_peak_memory(what, method, backbone, batch, results, settings):
    spec = {"what": what, "method": method, "backbone": backbone, "batch": batch, "exemplars": batch,
            "size": 256, "device": settings.device, "threads": settings.threads}
    proc = subprocess.run([sys.executable, str(PROBE), json.dumps(spec)], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    results.memory.append(record)


def test_sizes(results, settings):
    """Memory bank and checkpoint sizes of memkd and rd with each teacher (MB = 1e6 bytes)."""
    from benchlib import build, memory_bank_bytes
    from memkd.models import size_report

    try:
        from memkd.train import save_checkpoint
    except ImportError:
        save_checkpoint = None
        results.note("memkd.train.save_checkpoint unavailable: checkpoint sizes not measured")
    bank, checkpoints, params = {}, {}, {}
    for backbone in ("wide_resnet50_2", "resnet18"):
        for method in ("memkd", "rd"):
            model = build(method, backbone)
            name = f"{method}/{backbone}"
            bank[name] = memory_bank_bytes(model) / 1e6
            params[name] = {k: round(v, 3) for k, v in size_report(model).items()}
            if save_checkpoint is not None:
                with tempfile.TemporaryDirectory() as tmp:
                    sizes = {}
                    for teacher in (False, True):
                        d = Path(tmp) / str(teacher)
                        save_checkpoint(model, d, include_teacher=teacher)
                        # The files of the checkpoint version in use (the run directory links to it).
                        files = (d / "checkpoint").resolve().iterdir()
                        sizes["with_teacher" if teacher else "student_only"] = sum(f.stat().st_size for f in files) / 1e6
                    checkpoints[name] = sizes
            del model
    results.facts["memory_bank_MB"] = bank["memkd/wide_resnet50_2"]
    results.facts["memory_bank_MB_by_model"] = bank
    if checkpoints:
        results.facts["checkpoint_MB_by_model"] = checkpoints
        results.note(
            "Checkpoint = memkd.train.save_checkpoint directory (model.safetensors + config.json). "
            "student_only is what a model with torchvision's named ImageNet teacher stores (the teacher is fetched "
            "again on load); with_teacher also stores the teacher (random-init or local-file teachers)."
        )
    results.facts["parameters_by_model"] = params
