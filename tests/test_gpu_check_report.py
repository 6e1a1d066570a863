"""The GPU check's verdict and archive (benchmarks/gpu_check_report.py) on made-up work folders:
the verdict is true only when a GPU was visible, the modules had CUDA kernels, and every collected
CUDA test ran and passed (the two-GPU test may skip on one GPU)."""
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check_report.py"
H200 = {"name": "NVIDIA H200", "capability": "9.0", "memory_gib": 139.8}


def junit(passed: int, failed: int = 0, skipped: int = 0, skip_reason: str = "needs two CUDA devices") -> str:
    cases = [f'<testcase classname="tests.test_ops_cuda" name="t{i}"/>' for i in range(passed)]
    cases += [f'<testcase classname="tests.test_ops_cuda" name="f{i}"><failure message="boom {i}"/></testcase>'
              for i in range(failed)]
    cases += [f'<testcase classname="tests.test_ops_cuda" name="s{i}"><skipped message="{skip_reason}"/></testcase>'
              for i in range(skipped)]
    total = passed + failed + skipped
    return (f'<testsuites><testsuite name="pytest" tests="{total}" failures="{failed}" errors="0" '
            f'skipped="{skipped}">{"".join(cases)}</testsuite></testsuites>')


def make_work(tmp_path: Path, *, gpus=(H200,), cuda_kernels=True, collected=250, xml=None, bench=True) -> Path:
    work = tmp_path / "work"
    (work / "logs").mkdir(parents=True)
    (work / "bench").mkdir()
    env = {"python": "3.12.3", "torch": "2.11.0+cu130", "cuda_available": bool(gpus), "gpus": list(gpus),
           "memkd": {"loaded": True, "cuda_kernels": cuda_kernels, "reason": "compiled kernels", "cpu_variant": "custom"}}
    (work / "env.json").write_text(json.dumps(env))
    steps = ["build\t0\t100\t", "collect\t0\t10\t", "tests\t0\t120\t", "bench\t0\t90\t"]
    (work / "logs" / "steps.tsv").write_text("\n".join(steps) + "\n")
    (work / "logs" / "collect.log").write_text(f"...\n{collected}/700 tests collected (450 deselected) in 9.1s\n")
    (work / "logs" / "tests.xml").write_text(xml if xml is not None else junit(collected - 2, skipped=2))
    if bench:
        (work / "bench" / "bench.json").write_text("{}")
        (work / "bench" / "bench.md").write_text("# memkd GPU benchmarks\n\nnr_recall: 91% of copy bandwidth\n")
    return work


def report(tmp_path: Path, work: Path, rehearsal: int = 0) -> dict:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    subprocess.run([sys.executable, str(REPORT), "--work", str(work), "--out", str(out), "--rehearsal", str(rehearsal),
                    "--seconds", "300", "--budget", "420", "--min-cuda-tests", "200"], check=True, timeout=60)
    assert sorted(p.name for p in out.iterdir()) == ["gpu-results.tar.gz", "summary.json", "summary.md"]
    return json.loads((out / "summary.json").read_text())


def test_every_cuda_test_passed_on_a_visible_gpu_is_a_pass(tmp_path):
    summary = report(tmp_path, make_work(tmp_path))
    assert summary["verdict"] and summary["exit_ok"], summary["checks"]
    assert summary["cuda_tests"]["expected_to_pass"] == 248
    with tarfile.open(tmp_path / "out" / "gpu-results.tar.gz") as tar:
        names = tar.getnames()
    prefix = "benchmarks/results/gpu-nvidia-h200"
    assert {f"{prefix}/summary.md", f"{prefix}/logs/tests.xml", f"{prefix}/bench/bench.json", f"{prefix}/env.json"} <= set(names)
    assert "91% of copy bandwidth" in (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.parametrize(
    ("change", "failed_check"),
    [
        ({"gpus": ()}, "gpu_visible_to_torch"),
        ({"cuda_kernels": False}, "extension_loaded_with_cuda_kernels"),
        ({"xml": junit(247, failed=1, skipped=2)}, "cuda_tests_all_ran_and_passed"),
        ({"xml": junit(240, skipped=10, skip_reason="Triton unavailable")}, "cuda_tests_all_ran_and_passed"),
        ({"xml": junit(200)}, "cuda_tests_all_ran_and_passed"),  # fewer ran than were collected
        ({"collected": 150, "xml": junit(148, skipped=2)}, "cuda_tests_collected"),  # under the floor
        ({"xml": ""}, "cuda_tests_all_ran_and_passed"),  # no test results at all
    ],
)
def test_the_verdict_fails_unless_everything_ran(tmp_path, change, failed_check):
    xml = change.pop("xml", None)
    work = make_work(tmp_path, **change, xml=xml)
    if xml == "":
        (work / "logs" / "tests.xml").unlink()
    summary = report(tmp_path, work)
    assert not summary["verdict"] and not summary["exit_ok"]
    assert summary["checks"][failed_check] is False


def test_two_gpu_skips_are_not_allowed_on_a_two_gpu_machine(tmp_path):
    summary = report(tmp_path, make_work(tmp_path, gpus=(H200, H200)))
    assert not summary["verdict"] and summary["checks"]["cuda_tests_all_ran_and_passed"] is False


def test_a_rehearsal_passes_when_every_step_worked_and_no_gpu_ran(tmp_path):
    work = make_work(tmp_path, gpus=(), cuda_kernels=False, xml=junit(0, skipped=250, skip_reason="needs a CUDA device"))
    summary = report(tmp_path, work, rehearsal=1)
    assert summary["exit_ok"] and not summary["verdict"], summary["rehearsal_checks"]
    (work / "bench" / "bench.json").unlink()
    summary = report(tmp_path, work, rehearsal=1)
    assert not summary["exit_ok"] and summary["rehearsal_checks"]["benchmark_code_path_ran"] is False
