"""The session's results: the collector the benchmarks fill, and the files made from it.

``Results`` gathers every timed case (pytest-benchmark's statistics), memory probes, facts and
notes; at session end conftest.py calls ``write`` for benchmarks/results/<tag>.json (atomically),
<tag>.md and <tag>-scaling.png. Ratios, target verdicts and straight-line fits are derived here,
from cases (and, for targets, interleaved pairs) measured in the same run only.

``python benchmarks/report.py benchmarks/results/<tag>.json`` regenerates the Markdown and the plot
from a JSON file.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCHEMA = 1

# The paper's Table 3 (MPDD; the paper does not say which GPU) and what the repo's spec adds.
PAPER = {
    "memkd_s_per_image": 0.33,
    "rd_s_per_image": 0.31,
    "memory_bank_mb": 0.3,
    "source": "MemKD (ICCV 2023) Table 3, MPDD; GPU not stated in the paper",
}


# ---- collecting ---------------------------------------------------------------------------------


@dataclass
class Target:
    """A goal checked against the round times of a subject and a baseline timed alternately in one
    test (Results.add_target); ``subject`` and ``baseline`` name the two separately measured cases
    of the tables.

    kind "speedup": ``time(baseline) / time(subject) >= threshold``;
    kind "slowdown": ``time(subject) / time(baseline) <= threshold``.
    ``condition``: None when the run measures what the target is about, else why it does not
    (the verdict is then "N/A").
    """

    name: str
    subject: str
    baseline: str
    kind: str
    threshold: float
    condition: Optional[str] = None


class Results:
    def __init__(self, settings):
        self.settings = settings
        self.cases: dict[str, dict] = {}
        self.targets: dict[str, Target] = {}
        self.memory: list[dict] = []
        self.facts: dict[str, object] = {}
        self.notes: list[str] = []
        self.pairs: dict[str, dict] = {}

    def add_case(self, key: str, impl: str, stats, *, role: str, plan, device: str, items: int = 1, **info):
        """One timed case. ``stats``: pytest-benchmark's Stats (seconds per call). ``role``
        "subject" (what is being evaluated) or "baseline" (what it is compared with) inside
        ``key``. ``items``: images (or batches) per call, for throughput."""
        from benchlib import case_id

        cid = case_id(key, impl)
        self.cases[cid] = {
            "id": cid,
            "key": key,
            "impl": impl,
            "role": role,
            "device": device,
            "items": items,
            "median_s": stats.median,
            "iqr_s": stats.iqr,
            "q1_s": stats.q1,
            "q3_s": stats.q3,
            "min_s": stats.min,
            "max_s": stats.max,
            "mean_s": stats.mean,
            "stddev_s": stats.stddev if stats.rounds > 1 else 0.0,
            "rounds": stats.rounds,
            "warmup_rounds": plan.warmup,
            "iterations": plan.iterations,
            "per_item_s": stats.median / items,
            "items_per_s": items / stats.median if stats.median > 0 else None,
            "data_s": list(stats.data),
            **info,
        }

    def add_target(self, target: Target, subject_s: list[float], baseline_s: list[float]) -> None:
        """A target with the round times of its subject and baseline, measured alternately in one
        test (conftest.judge_in_pairs); its verdict comes from these pairs."""
        self.targets[target.name] = target
        self.pairs[target.name] = {"subject_s": list(subject_s), "baseline_s": list(baseline_s)}

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    # ---- derived ----

    def ratios(self) -> list[dict]:
        """For every key: each subject against each baseline (speedup = t_baseline / t_subject)."""
        by_key = defaultdict(list)
        for case in self.cases.values():
            by_key[case["key"]].append(case)
        out = []
        for key, cases in by_key.items():
            for s in (c for c in cases if c["role"] == "subject"):
                for b in (c for c in cases if c["role"] == "baseline"):
                    out.append({
                        "key": key,
                        "subject": s["impl"],
                        "baseline": b["impl"],
                        "speedup_median": b["median_s"] / s["median_s"],
                        "speedup_min": b["min_s"] / s["min_s"],
                    })
        return out

    def target_verdicts(self) -> list[dict]:
        out = []
        for t in self.targets.values():
            row = {"name": t.name, "subject": t.subject, "baseline": t.baseline, "kind": t.kind, "threshold": t.threshold}
            out.append(row)
            # ratio(subject time, baseline time): what the target compares
            ratio = (lambda s, b: b / s) if t.kind == "speedup" else (lambda s, b: s / b)
            # the median of the per-pair ratios: a burst of load falls on both halves of a pair
            s_times, b_times = self.pairs[t.name]["subject_s"], self.pairs[t.name]["baseline_s"]
            value = statistics.median(ratio(s, b) for s, b in zip(s_times, b_times))
            row.update(method="pairs", pairs=len(s_times), value=value, value_min=ratio(min(s_times), min(b_times)))
            ok = row["value"] >= t.threshold if t.kind == "speedup" else row["value"] <= t.threshold
            if t.condition:
                row.update(status="N/A", why=t.condition)
            else:
                row.update(status="PASS" if ok else "FAIL")
        return out

    def fits(self) -> list[dict]:
        """Straight-line fits of every scaling series (cases with ``series`` and ``x``)."""
        from benchlib import linear_fit

        series = defaultdict(list)
        for case in self.cases.values():
            if "series" in case:
                series[case["series"]].append(case)
        out = []
        for name, cases in sorted(series.items()):
            cases.sort(key=lambda c: c["x"])
            xs, ys = [c["x"] for c in cases], [c["median_s"] for c in cases]
            row = {"series": name, "x_label": cases[0]["x_label"], "x": xs, "median_s": ys,
                   "items_per_s": [c["items_per_s"] for c in cases]}
            if row["x_label"] == "batch":  # throughput: the best batch of the sweep
                best = max(cases, key=lambda c: c["items_per_s"])
                row.update(best_batch=best["x"], best_items_per_s=best["items_per_s"])
            if len(cases) >= 3:
                row.update(linear_fit(xs, ys))
            else:
                row.update(note="fewer than 3 points, no fit")
            out.append(row)
        return out

    def bandwidth(self) -> list[dict]:
        """GPU cases that declared their bytes: achieved GB/s and the fraction of the copy roofline."""
        roof = self.facts.get("copy_bandwidth_GBps")
        out = []
        for c in self.cases.values():
            if c.get("bytes") and c["device"] == "cuda":
                gbps = c["bytes"] / c["median_s"] / 1e9
                out.append({"id": c["id"], "GBps": gbps, "roofline_GBps": roof,
                            "fraction_of_roofline": gbps / roof if roof else None})
        return out

    def paper_comparison(self) -> list[dict]:
        """Per-image inference of memkd and rd with the paper's teacher, beside the paper's numbers."""
        from benchlib import case_id, e2e_key

        rows = []
        device = self.settings.device
        for method, paper_s in (("memkd", PAPER["memkd_s_per_image"]), ("rd", PAPER["rd_s_per_image"])):
            for impl in ("kernels", "reference"):
                c = self.cases.get(case_id(e2e_key(method, "wide_resnet50_2", 1, 256, device), impl))
                if c:
                    rows.append({"method": method, "ops": impl, "s_per_image": c["median_s"],
                                 "paper_s_per_image": paper_s, "vs_paper": c["median_s"] / paper_s})
        return rows

    def payload(self, meta: dict) -> dict:
        return {
            "schema": SCHEMA,
            **meta,
            "facts": self.facts,
            "targets": self.target_verdicts(),
            "ratios": self.ratios(),
            "paper": {**PAPER, "rows": self.paper_comparison()},
            "scaling": self.fits(),
            "bandwidth": self.bandwidth(),
            "memory": self.memory,
            "notes": self.notes,
            "pairs": self.pairs,
            "cases": list(self.cases.values()),
        }


# ---- the machine ------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|cpu|processor|@.*$|\d+-core", "", text, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_tag(device: str) -> str:
    """The results' file name: cpu-<cpu model> or cuda-<GPU name>."""
    import torch

    if device == "cuda":
        return "cuda-" + _slug(torch.cuda.get_device_name())
    return "cpu-" + _slug(cpu_model())


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_meta(settings, load_start) -> dict:
    import torch

    import memkd
    import memkd.ops
    from memkd.ops import _library
    from benchlib import malloc_setting

    device = {"type": settings.device}
    if settings.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        device.update(name=props.name, memory_GiB=round(props.total_memory / 2**30, 1),
                      capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    else:
        device.update(name=cpu_model())
    # Earlier results in benchmarks/results are not code: they do not make the measured code a draft.
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)benchmarks/results")
    return {
        "machine": {
            "cpu": cpu_model(),
            "logical_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_start": load_start,
            "loadavg_end": list(os.getloadavg()),
            # threading knobs read at process start (OMP_WAIT_POLICY=PASSIVE helps on a shared machine)
            "thread_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")},
        },
        "device": device,
        "versions": {
            "torch": torch.__version__,
            "memkd": memkd.__version__,
            "memkd_commit": _git("rev-parse", "--short", "HEAD"),
            "memkd_tracked_changes": bool(status) if status is not None else None,
            "memkd_extension": _library.EXTENSION.build_info or _library.EXTENSION.reason,
            "triton": _version("triton"),
            "torchvision": _version("torchvision"),
            "numpy": _version("numpy"),
            "scipy": _version("scipy"),
            "pytest_benchmark": _version("pytest-benchmark"),
            "anomalib": _version("anomalib"),
        },
        "backends": memkd.ops.backends(),
        "malloc": malloc_setting(),
        "mode": settings.mode,
    }


# ---- writing ---------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; results are for everyone to read
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write(results: Results, meta: dict, stem: str) -> list[Path]:
    """benchmarks/results/<stem>.json, .md and -scaling.png; returns the paths written."""
    payload = results.payload(meta)
    json_path = RESULTS_DIR / f"{stem}.json"
    _atomic_write(json_path, (json.dumps(payload, indent=1, default=str) + "\n").encode())
    return [json_path, *render(payload, stem)]


def render(payload: dict, stem: str) -> list[Path]:
    paths = []
    png = plot_scaling(payload, RESULTS_DIR / f"{stem}-scaling.png")
    if png:
        paths.append(png)
    md_path = RESULTS_DIR / f"{stem}.md"
    _atomic_write(md_path, markdown(payload, png.name if png else None).encode())
    paths.insert(0, md_path)
    return paths


# ---- Markdown --------------------------------------------------------------------------------


def _ms(seconds) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _x(r) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown(p: dict, png_name: Optional[str]) -> str:
    m, v = p["machine"], p["versions"]
    out = [f"# memkd benchmarks: {p['tag']} ({p['mode']} mode)\n"]
    out.append(
        f"Run {p['created']} in {p['runtime_s']:.0f} s. Machine: {m['cpu']}, {m['logical_cores']} logical cores, "
        f"torch threads {m['torch_threads']}; device {p['device']['type']} ({p['device']['name']}). "
        f"torch {v['torch']}, memkd {v['memkd']} ({v['memkd_commit']}{', with uncommitted changes' if v['memkd_tracked_changes'] else ''}), "
        f"triton {v['triton']}, anomalib {v['anomalib'] or 'not installed'}. "
        f"malloc tunables {'set: ' + ', '.join(f'{k}={x}' for k, x in p['malloc']['env'].items()) if p['malloc']['set'] else 'NOT set (timings of large tensors may be bimodal)'}. "
        f"Load average (1/5/15 min) at start {_load(m['loadavg_start'])}, at end {_load(m['loadavg_end'])}.\n"
    )
    if max(m["loadavg_start"][0], m["loadavg_end"][0]) > m["logical_cores"]:
        out.append(
            "> **The machine was shared while this ran** (load average above the core count): absolute times "
            "are inflated and noisy, multi-threaded kernels suffer most. Ratios compare cases measured "
            "minutes apart in the same run; the `min` columns are the least-disturbed rounds.\n"
        )
    failed = p.get("pytest", {}).get("tests_failed")
    if failed:
        out.append(f"> **{failed} benchmark test(s) failed in this run**; their cases are missing below.\n")
    out.append("Times are per call, median of the rounds (IQR, min, max beside it). Speedup = baseline time / subject time.\n")

    out.append("## Targets\n")
    if any(t.get("method") == "pairs" for t in p["targets"]):
        out.append("A target measured in interleaved pairs times its subject and baseline alternately in one test "
                   "(subject first, then baseline first, and so on) and takes the median of the per-pair ratios, so "
                   "that a burst of load on a shared machine falls on both.\n")
    rows = []
    for t in p["targets"]:
        cmp = ">=" if t["kind"] == "speedup" else "<="
        what = "speedup" if t["kind"] == "speedup" else "time ratio"
        how = f"; {t['pairs']} interleaved pairs" if t.get("method") == "pairs" else ""
        measured = f"{what} {t['value']:.2f} (min-based {t['value_min']:.2f}{how})" if "value" in t else "-"
        rows.append([t["name"], measured, f"{cmp} {t['threshold']}", f"**{t['status']}**" + (f" ({t['why']})" if t.get("why") else "")])
    out.append(_table(["target", "measured", "goal", "verdict"], rows) if rows else "No target cases ran.\n")

    if p["paper"]["rows"]:
        out.append("## End-to-end inference vs the paper (WideResNet50 teacher, 256x256, batch 1)\n")
        out.append(
            f"Paper: {p['paper']['source']}: MemKD {PAPER['memkd_s_per_image']} s/image, RD {PAPER['rd_s_per_image']} "
            f"s/image, memory bank {PAPER['memory_bank_mb']} MB. Here: {p['device']['name']} ({p['device']['type']}), "
            f"{m['torch_threads']} threads, random weights, the full path image tensor -> blurred map + score "
            "(`model.predict`).\n"
        )
        rows = [[r["method"], r["ops"], f"{r['s_per_image']:.3f}", r["paper_s_per_image"], _x(r["vs_paper"])] for r in p["paper"]["rows"]]
        out.append(_table(["method", "ops", "s/image here", "paper s/image", "here / paper"], rows))
        bank = p["facts"].get("memory_bank_MB")
        if bank is not None:
            out.append(f"Memory bank (NR Memory keys + values, fp32): {bank:.3f} MB here vs {PAPER['memory_bank_mb']} MB in the paper.\n")

    e2e = [c for c in p["cases"] if c["key"].startswith(("inference/", "training/", "peers/", "optim/", "metrics/"))]
    if e2e:
        out.append("## End-to-end cases\n")
        rows = [[c["key"], c["impl"], _ms(c["median_s"]), _ms(c["iqr_s"]), _ms(c["min_s"]), _ms(c["max_s"]), c["rounds"],
                 f"{c['per_item_s'] * 1e3:.1f}", f"{c['items_per_s']:.2f}"] for c in e2e]
        out.append(_table(["case", "impl", "median ms", "IQR ms", "min ms", "max ms", "rounds", "ms/image", "images/s"], rows))

    ratios = p["ratios"]
    if ratios:
        out.append("## Ratios (same run)\n")
        rows = [[r["key"], r["subject"], r["baseline"], _x(r["speedup_median"]), _x(r["speedup_min"])] for r in ratios]
        out.append(_table(["case", "subject", "baseline", "speedup (medians)", "speedup (mins)"], rows))
    cross = p["facts"].get("cross_ratios") or []
    if cross:
        out.append("MemKD against RD (time ratio, lower is better):\n")
        out.append(_table(["what", "memkd / rd (medians)", "memkd / rd (mins)"], [[c["what"], f"{c['median']:.3f}", f"{c['min']:.3f}"] for c in cross]))

    ops = [c for c in p["cases"] if c["key"].startswith("ops/") and "series" not in c]
    if ops:
        out.append("## Ops\n")
        rows = [[c["key"], c["impl"], _ms(c["median_s"]), _ms(c["iqr_s"]), _ms(c["min_s"]), _ms(c["max_s"]), c["rounds"]] for c in ops]
        out.append(_table(["case", "impl", "median ms", "IQR ms", "min ms", "max ms", "rounds"], rows))
    if p["bandwidth"]:
        out.append("GPU bandwidth (bytes = inputs read + output written), roofline = this device's clone bandwidth:\n")
        out.append(_table(["case", "GB/s", "roofline GB/s", "fraction"], [
            [b["id"], f"{b['GBps']:.0f}", f"{b['roofline_GBps']:.0f}" if b["roofline_GBps"] else "-",
             f"{b['fraction_of_roofline']:.2f}" if b["fraction_of_roofline"] else "-"] for b in p["bandwidth"]]))

    if p["scaling"]:
        out.append("## Scaling\n")
        out.append("Straight-line fit of median time against x; 'linear' means R^2 >= 0.98.\n")
        rows = []
        for s in p["scaling"]:
            pts = ", ".join(f"{x:g}: {_ms(y)}" for x, y in zip(s["x"], s["median_s"]))
            if "slope" in s:
                rows.append([s["series"], s["x_label"], pts, f"{s['slope'] * 1e3:.4g} ms", f"{s['intercept'] * 1e3:.3g} ms",
                             f"{s['r2']:.4f}", "yes" if s["linear"] else "no"])
            else:
                rows.append([s["series"], s["x_label"], pts, "-", "-", "-", s["note"]])
        out.append(_table(["series", "x", "points (x: median ms)", "slope per unit x", "intercept", "R^2", "linear"], rows))
        best = [s for s in p["scaling"] if "best_batch" in s]
        if best:
            out.append("Best batch for throughput: " + "; ".join(
                f"{s['series'].split(': ', 1)[1]}: batch {s['best_batch']} ({s['best_items_per_s']:.2f} images/s)" for s in best) + "\n")
        if png_name:
            out.append(f"![scaling]({png_name})\n")

    if p["memory"]:
        out.append("## Memory\n")
        rows = [[r["what"], r["method"], r.get("backbone", "-"), r.get("batch", "-"), f"{r['peak_MB']:.0f}" if r.get("peak_MB") is not None else "-",
                 f"{r['delta_MB']:.0f}" if r.get("delta_MB") is not None else "-", r.get("how", "")] for r in p["memory"]]
        out.append(_table(["what", "method", "teacher", "batch", "peak MB", "above the loaded model MB", "how measured"], rows))
    bank = p["facts"].get("memory_bank_MB_by_model")
    if bank:
        ckpt = p["facts"].get("checkpoint_MB_by_model", {})
        params = p["facts"].get("parameters_by_model", {})
        rows = [[name, f"{mb:.3f}", f"{params.get(name, {}).get('student_params_millions', float('nan')):.1f}",
                 f"{ckpt[name]['student_only']:.1f}" if name in ckpt else "-",
                 f"{ckpt[name]['with_teacher']:.1f}" if name in ckpt else "-"] for name, mb in bank.items()]
        out.append("Sizes (fp32, MB = 1e6 bytes):\n")
        out.append(_table(["model", "memory bank MB", "student params (M)", "checkpoint MB (student only)", "checkpoint MB (with teacher)"], rows))

    if p["notes"]:
        out.append("## Notes\n")
        out.extend(f"- {n}\n" for n in p["notes"])
    return "\n".join(out)


def _load(values) -> str:
    return "/".join(f"{x:.1f}" for x in values)


# ---- plots ---------------------------------------------------------------------------------


def plot_scaling(payload: dict, path: Path) -> Optional[Path]:
    series = payload["scaling"]
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(series))
    rows = (len(series) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, s in zip(axes.flat, series):
        ax.plot(s["x"], [y * 1e3 for y in s["median_s"]], "o", label="median")
        if "slope" in s:
            xs = [min(s["x"]), max(s["x"])]
            ax.plot(xs, [(s["intercept"] + s["slope"] * x) * 1e3 for x in xs], "-",
                    label=f"fit R²={s['r2']:.3f}")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        ax.set_title(s["series"], fontsize=8)
        ax.set_xlabel(s["x_label"])
        ax.set_ylabel("ms per call")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.suptitle(f"memkd scaling: {payload['tag']} ({payload['mode']})", fontsize=10)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.fchmod(fd, 0o644)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


if __name__ == "__main__":  # regenerate the Markdown and plot from a JSON file
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/report.py benchmarks/results/<tag>.json")
    src = Path(sys.argv[1])
    for written in render(json.loads(src.read_text()), src.stem):
        print(written)
