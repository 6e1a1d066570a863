"""pytest wiring of the memkd benchmarks: options, the session's settings and results collector,
the ``measure`` fixture (pytest-benchmark's ``pedantic`` with explicit rounds), the
``judge_in_pairs`` fixture (a target's subject and baseline in alternating rounds) and writing the
result files at session end.

    pytest benchmarks/                     quick mode (default): minutes on a 2-core CPU
    pytest benchmarks/ --full              every size, more rounds
    pytest benchmarks/ --threads 1         torch intra-op threads (default 2, the targets' setting)

Set the malloc tunables in the environment before pytest starts (see README.md); the results
record whether they were.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

import report
from benchlib import PAIR_ROUNDS, STATE as _STATE, Settings, alternating_rounds, malloc_setting, synchronized

AREA_FILES = ("test_ops.py", "test_inference.py", "test_training.py", "test_memory.py", "test_scaling.py", "test_peers.py",
              "test_metrics.py", "test_export.py")


def pytest_addoption(parser):
    group = parser.getgroup("memkd benchmarks")
    group.addoption("--full", action="store_true", default=os.environ.get("MEMKD_BENCH_FULL", "") not in ("", "0"),
                    help="every size and more rounds (default: quick mode; env MEMKD_BENCH_FULL=1)")
    group.addoption("--threads", type=int, default=int(os.environ.get("MEMKD_BENCH_THREADS", "2")),
                    help="torch.set_num_threads for the whole run (default 2; env MEMKD_BENCH_THREADS)")


def pytest_configure(config):
    threads = config.getoption("--threads")
    torch.set_num_threads(threads)
    settings = Settings(
        full=config.getoption("--full"),
        threads=threads,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    config.stash[_STATE] = {
        "settings": settings,
        "results": report.Results(settings),
        "start": time.time(),
        "created": report.now_iso(),
        "load_start": list(os.getloadavg()),
        "deselected": 0,
    }


def pytest_deselected(items):
    if items:
        items[0].config.stash[_STATE]["deselected"] += len(items)


@pytest.fixture(scope="session")
def settings(request) -> Settings:
    return request.config.stash[_STATE]["settings"]


@pytest.fixture(scope="session")
def results(request) -> report.Results:
    return request.config.stash[_STATE]["results"]


@pytest.fixture(scope="session")
def model_cache(settings):
    """Models built once per session, keyed by (method, backbone, image size), in eval mode on
    the run's device. Building a WideResNet50 model takes seconds; inference does not change it."""
    from benchlib import build

    cache = {}

    def get(method: str, backbone: str, size: int = 256):
        key = (method, backbone, size)
        if key not in cache:
            cache[key] = build(method, backbone, size, settings.device)
        return cache[key]

    yield get
    cache.clear()


@pytest.fixture
def measure(benchmark, results, settings):
    """Time ``fn`` with ``benchmark.pedantic`` and record it in the session's results.

    ``key`` names what is measured, ``impl`` how; cases sharing a key are compared
    (subjects against baselines). ``kind`` picks the rounds (benchlib.PLANS); ``items`` is the
    images per call, for throughput. Extra keyword arguments are stored with the case.
    """

    def run(fn, *, key: str, impl: str, kind: str, role: str = "subject", device: str = "cpu", items: int = 1, **info):
        plan = settings.plan(kind, device)
        benchmark.group = key
        benchmark.extra_info.update(impl=impl, role=role, items=items, **{k: v for k, v in info.items() if _plain(v)})
        # a round is `iterations` calls, timed as one span: one GPU sync at its end
        target = synchronized(fn, device, every=plan.iterations)
        if device == "cuda":
            torch.cuda.synchronize()
        benchmark.pedantic(target, rounds=plan.rounds, warmup_rounds=plan.warmup, iterations=plan.iterations)
        if benchmark.stats is None:  # --benchmark-disable: the target ran once, untimed
            results.note("pytest-benchmark was disabled: nothing timed")
            return None
        results.add_case(key, impl, benchmark.stats.stats, role=role, plan=plan, device=device, items=items, **info)
        return benchmark.stats.stats

    return run


@pytest.fixture
def judge_in_pairs(results, settings):
    """Register ``target`` and time its ``subject`` and ``baseline`` calls in alternating rounds
    (benchlib.PAIR_ROUNDS by ``kind``); the verdict is the median of the per-pair ratios. The two
    cases ``target`` names are measured separately for the tables."""

    def run(target: report.Target, subject, baseline, *, kind: str, device: str = "cpu") -> None:
        plan = settings.plan(kind, device)
        if device == "cuda":
            torch.cuda.synchronize()
        times = alternating_rounds(synchronized(subject, device), synchronized(baseline, device),
                                   PAIR_ROUNDS[settings.mode][kind], plan.warmup)
        results.add_target(target, *times)

    return run


def _plain(value) -> bool:
    return isinstance(value, (str, int, float, bool, type(None)))


def pytest_sessionfinish(session, exitstatus):
    state = session.config.stash.get(_STATE, None)
    if state is None:
        return
    results: report.Results = state["results"]
    if not results.cases and not results.memory and not results.targets:
        return
    settings = state["settings"]
    files = {Path(str(item.fspath)).name for item in session.items}
    complete = all(f in files for f in AREA_FILES) and not state["deselected"]
    tag = report.device_tag(settings.device)
    meta = {
        "tag": tag,
        "created": state["created"],
        "runtime_s": time.time() - state["start"],
        "complete": complete,
        "pytest": {"args": list(session.config.invocation_params.args), "tests_failed": session.testsfailed,
                   "tests_collected": session.testscollected},
        **report.machine_meta(settings, state["load_start"]),
    }
    _cross_ratios(results)
    # A partial run (one file, -k) never overwrites the committed results of a whole run.
    stem = tag if complete else f"{tag}.partial"
    state["written"] = report.write(results, meta, stem)
    state["verdicts"] = results.target_verdicts()


def _cross_ratios(results: report.Results) -> None:
    """MemKD against RD with the same teacher, batch and ops: inference per image and a training step."""
    rows = []
    for c in results.cases.values():
        if c["key"].startswith(("inference/memkd/", "training/memkd/")):
            rd = results.cases.get(c["id"].replace("/memkd/", "/rd/", 1))
            if rd:
                rows.append({"what": f"{c['id']} vs rd", "median": c["median_s"] / rd["median_s"], "min": c["min_s"] / rd["min_s"]})
    results.facts["cross_ratios"] = rows


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    state = config.stash.get(_STATE, None)
    if not state or "written" not in state:
        return
    tr = terminalreporter
    tr.section("memkd benchmark targets")
    for v in state["verdicts"]:
        value = f"{v['value']:.2f}" if "value" in v else "-"
        tr.write_line(f"{v['status']:7s} {v['name']}: {value} (goal {'>=' if v['kind'] == 'speedup' else '<='} {v['threshold']})"
                      + (f" [{v['why']}]" if v.get("why") else ""))
    malloc = malloc_setting()
    if not malloc["set"]:
        tr.write_line("note: the malloc tunables were not set; see benchmarks/README.md", yellow=True)
    tr.write_line("results: " + ", ".join(str(p) for p in state["written"]))
