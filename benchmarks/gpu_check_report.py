"""The reports of benchmarks/gpu_check.sh: the environment (env.json) and, after every step, the
verdict, summary.md, summary.json and gpu-results.tar.gz (the work directory's files in the layout
of benchmarks/results/). Standard library only, except that --environment imports torch and memkd.

    gpu_check_report.py --environment WORK/env.json
    gpu_check_report.py --work WORK --out OUT --rehearsal 0|1 --seconds S --budget B --min-cuda-tests N
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

FILE_LIMIT = 16 * 2**20  # what one returned file may hold
LOG_LIMIT = 2 * 2**20  # longer logs keep their first and last megabyte in the archive
BUILD_ONLY = ("cmake", "cmake-cpu", "stand-in")  # work directories that are not results
MULTI_GPU_SKIP = "needs two CUDA devices"  # the skip reason of tests/test_ops_cuda.py's two-GPU test


def environment(path: Path) -> None:
    env: dict = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform()}
    try:
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,compute_cap,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        ).stdout
        env["nvidia_smi"] = [dict(zip(("name", "driver", "compute_cap", "memory"), (f.strip() for f in line.split(","))))
                             for line in query.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError) as exc:
        env["nvidia_smi"] = f"unavailable: {exc}"
    for module in ("numpy", "triton", "torchvision"):
        try:
            env[module] = __import__(module).__version__
        except Exception as exc:  # noqa: BLE001 (a broken install is a finding, not a crash)
            env[module] = f"unavailable: {type(exc).__name__}: {exc}"
    import torch

    env["torch"], env["torch_cuda"] = torch.__version__, torch.version.cuda
    env["cuda_available"] = torch.cuda.is_available()
    env["gpus"] = [{"name": torch.cuda.get_device_name(i),
                    "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                    "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                   for i in range(torch.cuda.device_count())] if env["cuda_available"] else []
    try:
        import memkd
        import memkd.ops as ops
        from memkd.ops import _library

        ext = _library.EXTENSION
        env["memkd"] = {"file": memkd.__file__, "loaded": ext.loaded, "reason": ext.reason,
                        "cuda_kernels": ext.cuda_kernels, "cpu_variant": ext.cpu_variant,
                        "build_info": ext.build_info, "backends": ops.backends()}
    except Exception as exc:  # noqa: BLE001
        env["memkd"] = {"loaded": False, "reason": f"import failed: {type(exc).__name__}: {exc}"}
    path.write_text(json.dumps(env, indent=2))
    print(json.dumps(env, indent=2))


def read_steps(path: Path) -> list[dict]:
    steps = []
    if path.exists():
        for line in path.read_text().splitlines():
            name, rc, secs, note = (line.split("\t") + [""] * 4)[:4]
            steps.append({"step": name, "exit_code": int(rc), "seconds": int(secs), "note": note})
    return steps


def collected_tests(log: Path) -> tuple[int | None, str]:
    """The number of CUDA tests pytest collected, and its closing line."""
    if not log.exists():
        return None, ""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    match = re.search(r"(\d+)(?:/\d+)? tests? collected", log.read_text(errors="replace"))
    return (int(match.group(1)) if match else None), last


def test_results(xml: Path) -> dict:
    if not xml.exists():
        return {}
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    totals["passed"] = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
    problems, skips = [], {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for kind in ("failure", "error"):
            for element in case.findall(kind):
                message = (element.get("message") or "").strip().splitlines()
                problems.append(f"{kind}: {name}: {message[0][:200] if message else ''}")
        for element in case.findall("skipped"):
            reason = (element.get("message") or "").strip()[:160]
            skips[reason] = skips.get(reason, 0) + 1
    totals["problems"] = problems[:50]
    totals["skip_reasons"] = dict(sorted(skips.items(), key=lambda item: -item[1])[:10])
    return totals


def slug(env: dict, rehearsal: bool) -> str:
    if rehearsal:
        return "rehearsal-cpu"
    names = [g["name"] for g in env.get("gpus", [])] or [g.get("name", "") for g in env.get("nvidia_smi", []) if isinstance(g, dict)]
    name = names[0] if names else "unknown-gpu"
    return "gpu-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def archive(work: Path, prefix: str, extra: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(f"{prefix}/{name}")
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
            tar.addfile(info, io.BytesIO(data))

        for path in sorted(p for p in work.rglob("*") if p.is_file() and p.relative_to(work).parts[0] not in BUILD_ONLY):
            data = path.read_bytes()
            if len(data) > LOG_LIMIT:
                data = data[: LOG_LIMIT // 2] + b"\n[... cut ...]\n" + data[-LOG_LIMIT // 2:]
            add(str(path.relative_to(work)), data)
        for name, data in extra.items():
            add(name, data)
    return buffer.getvalue()


def summarise(args: argparse.Namespace) -> None:
    work, out, rehearsal = Path(args.work), Path(args.out), bool(args.rehearsal)
    env = json.loads((work / "env.json").read_text()) if (work / "env.json").exists() else {}
    steps = read_steps(work / "logs" / "steps.tsv")
    step_rc = {s["step"]: s["exit_code"] for s in steps}
    collected, collect_line = collected_tests(work / "logs" / "collect.log")
    tests = test_results(work / "logs" / "tests.xml")
    bench_json = work / "bench" / "bench.json"
    bench = json.loads(bench_json.read_text()) if bench_json.exists() else None
    memkd = env.get("memkd", {})
    # Tests of a second GPU skip on a machine with one; every other skip fails the verdict.
    allowed_skips = 0
    if tests and len(env.get("gpus") or []) < 2:
        allowed_skips = sum(n for reason, n in tests["skip_reasons"].items() if MULTI_GPU_SKIP in reason)
    expected = None if collected is None else collected - allowed_skips
    checks = {
        "gpu_visible_to_torch": bool(env.get("cuda_available")) and bool(env.get("gpus")),
        "extension_loaded_with_cuda_kernels": bool(memkd.get("loaded")) and bool(memkd.get("cuda_kernels")),
        "cuda_tests_collected": collected is not None and collected >= args.min_cuda_tests and "error" not in collect_line,
        "cuda_tests_all_ran_and_passed": bool(tests) and tests["failures"] == 0 and tests["errors"] == 0
        and tests["skipped"] == allowed_skips and tests["passed"] >= args.min_cuda_tests and tests["passed"] == expected,
    }
    verdict = all(checks.values())
    rehearsal_checks = {
        "built": step_rc.get("build") == 0,
        "every_cuda_test_collected_without_errors": checks["cuda_tests_collected"] and step_rc.get("collect") == 0,
        "tests_step_ran": step_rc.get("tests") == 0 and bool(tests),
        "benchmark_code_path_ran": step_rc.get("bench") == 0 and bench is not None,
        "verdict_false_without_gpu": not verdict,
    }
    summary = {
        "verdict": verdict, "checks": checks, "rehearsal": rehearsal,
        "exit_ok": all(rehearsal_checks.values()) if rehearsal else verdict,
        "rehearsal_checks": rehearsal_checks if rehearsal else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "seconds": args.seconds, "budget_seconds": args.budget, "steps": steps,
        "environment": {k: env.get(k) for k in ("python", "torch", "torch_cuda", "triton", "numpy", "torchvision", "gpus", "nvidia_smi")},
        "memkd": {k: memkd.get(k) for k in ("loaded", "reason", "cuda_kernels", "cpu_variant", "build_info")},
        "cuda_tests": {"collected": collected, "collect_line": collect_line, "expected_to_pass": expected,
                       "allowed_skips": allowed_skips,
                       **{k: v for k, v in tests.items()}},
        "benchmarks": "bench/bench.json in the archive" if bench is not None else "not run",
    }
    prefix = f"benchmarks/results/{slug(env, rehearsal)}"
    md = markdown(summary, work)
    summary_json = json.dumps(summary, indent=2).encode()
    tarball = archive(work, prefix, {"summary.md": md.encode(), "summary.json": summary_json})
    if len(tarball) > FILE_LIMIT:
        summary["archive_note"] = f"archive of {len(tarball)} bytes is over {FILE_LIMIT}: logs only"
        tarball = archive(work / "logs", prefix + "/logs", {"summary.json": summary_json})
    summary["archive"] = {"path": "gpu-results.tar.gz", "bytes": len(tarball), "prefix": prefix}
    summary_json = json.dumps(summary, indent=2).encode()
    write_atomically(out / "gpu-results.tar.gz", tarball)
    write_atomically(out / "summary.json", summary_json)
    write_atomically(out / "summary.md", markdown(summary, work).encode())


def markdown(summary: dict, work: Path) -> str:
    env, tests = summary["environment"], summary["cuda_tests"]
    gpus = ", ".join(f"{g['name']} (sm_{g['capability'].replace('.', '')}, {g['memory_gib']} GiB)" for g in env.get("gpus") or []) or "none visible to torch"
    lines = [
        f"# memkd GPU check{' (rehearsal on a CPU-only machine)' if summary['rehearsal'] else ''}",
        "",
        f"**Verdict: {'PASS' if summary['verdict'] else 'FAIL'}** ({summary['date']}, {summary['seconds']} s of a {summary['budget_seconds']} s budget)",
        "",
        *(f"- {name.replace('_', ' ')}: {'yes' if ok else 'NO'}" for name, ok in summary["checks"].items()),
        *(["", "Rehearsal: " + ", ".join(f"{k.replace('_', ' ')} {'yes' if v else 'NO'}" for k, v in summary["rehearsal_checks"].items())]
          if summary["rehearsal"] else []),
        "",
        f"GPU: {gpus}. Python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
        f"triton {env.get('triton')}, numpy {env.get('numpy')}, torchvision {env.get('torchvision')}.",
        f"memkd modules: {summary['memkd'].get('reason')}; CUDA kernels: {summary['memkd'].get('cuda_kernels')}.",
        "",
        "| step | exit | seconds | note |", "|---|---:|---:|---|",
        *(f"| {s['step']} | {s['exit_code']} | {s['seconds']} | {s['note']} |" for s in summary["steps"]),
        "",
        f"CUDA tests: {tests.get('collected')} collected, {tests.get('expected_to_pass')} expected to pass here; "
        f"passed {tests.get('passed')}, failed {tests.get('failures')}, errors {tests.get('errors')}, "
        f"skipped {tests.get('skipped')} ({tests.get('allowed_skips')} of them need a second GPU).",
    ]
    for reason, count in (tests.get("skip_reasons") or {}).items():
        lines.append(f"- skipped {count}x: {reason}")
    for problem in tests.get("problems") or []:
        lines.append(f"- {problem}")
    bench_md = work / "bench" / "bench.md"
    lines += ["", bench_md.read_text() if bench_md.exists() else "No benchmark results."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--environment", type=Path)
    parser.add_argument("--work")
    parser.add_argument("--out")
    parser.add_argument("--rehearsal", type=int, default=0)
    parser.add_argument("--seconds", type=int, default=0)
    parser.add_argument("--budget", type=int, default=0)
    parser.add_argument("--min-cuda-tests", type=int, default=200)
    args = parser.parse_args()
    if args.environment:
        environment(args.environment)
    else:
        summarise(args)


if __name__ == "__main__":
    main()
