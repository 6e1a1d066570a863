"""``memkd demo``: the whole loop on real photographs, in minutes on a CPU (``memkd demo --help``).

1. Data: an MVTec-layout dataset under ``OUT/data`` with synthetic defects on scikit-image's
   texture photographs (``memkd.data.synthetic``: brick, grass, gravel; pasted patches, scratches,
   stains, with exact masks; no test pixel is seen in training).
2. Training: MemKD (the paper's method) and the RD4AD baseline (``rd``) per texture, with a small
   ResNet-18 teacher at 128x128, 32 training images, batch 4, 4 epochs (``memkd train`` with far
   fewer epochs and images).
3. Evaluation (``memkd test``): the metrics per texture and method, the decision threshold,
   heatmap figures; then ``OUT/report.md`` (tables for both methods, per texture and mean),
   ``OUT/report.json`` and ``OUT/heatmaps.png`` (image, ground truth, both methods' heatmaps).

The teacher uses ImageNet weights when torchvision has them cached or can download them (a short
attempt); otherwise it is randomly initialised, which the demo says, since random features
detect far less. Everything is seeded: the same command writes the same numbers on one machine.
The command line's side (options, printing the table) is ``memkd.cli.demo``.
"""
from __future__ import annotations

import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from memkd import figures, reports
from memkd.data import IMAGENET_MEAN, IMAGENET_STD

# The demo's dataset; its functions are also reached here (memkd.demo was their home).
from memkd.data.synthetic import (  # noqa: F401
    DEFECTS,
    TEXTURES,
    TRAIN_REGION,
    _rgb,
    add_patch,
    add_scratch,
    add_stain,
    available_textures,
    make_dataset,
)
from memkd.evaluation import build_test_dataset
from memkd.files import write_json, write_text
from memkd.metrics import METRIC_NAMES
from memkd.models import MemKDConfig
from memkd.pipeline import train_category
from memkd.train import TrainConfig

METHODS = ("memkd", "rd")
MARKER = ".memkd-demo"


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo; ``FULL`` is the default, ``QUICK`` the smoke version."""

    categories: tuple[str, ...] = TEXTURES
    image_size: int = 128
    crop: int = 128  # pixels of the 512x512 photograph per image, resized to image_size
    train_images: int = 32
    test_good: int = 10
    test_per_defect: int = 5
    epochs: int = 4
    batch_size: int = 4
    exemplars: int = 4
    memory_items: int = 50
    backbone: str = "resnet18"
    figures: int = 2


FULL = DemoSettings()
QUICK = DemoSettings(
    categories=("brick",), image_size=64, crop=128, train_images=8, test_good=4, test_per_defect=2, epochs=1, batch_size=8,
    exemplars=4, memory_items=10, figures=2,
)


# ---- teacher weights ----------------------------------------------------------------------------


def resolve_weights(choice: str, backbone: str, timeout: float = 20.0) -> tuple[Optional[str], str]:
    """(weights for MemKDConfig, a sentence saying what the teacher is). ``choice``: "auto" (ImageNet
    when cached or downloadable within ``timeout`` seconds, else random), "imagenet" (required),
    "none", or a weights file."""
    if choice == "none":
        return None, "randomly initialised teacher (--weights none)"
    if choice not in ("auto", "imagenet"):
        return choice, f"teacher weights from {choice}"
    import torch
    import torchvision

    weight_set = torchvision.models.get_model_weights(backbone).IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weight_set.url).name
    if cached.is_file():
        return "imagenet", f"ImageNet-pretrained {backbone} teacher (torchvision IMAGENET1K_V1, cached at {cached})"
    outcome: dict[str, Any] = {}

    def fetch() -> None:
        try:
            weight_set.get_state_dict(progress=False, check_hash=True)
            outcome["ok"] = True
        except Exception as exc:  # no network, proxy, disk: any failure means "not available"
            outcome["error"] = exc

    print(f"memkd demo: fetching ImageNet weights for {backbone} ({weight_set.url}, at most {timeout:.0f} s) ...", file=sys.stderr, flush=True)
    worker = threading.Thread(target=fetch, daemon=True)
    worker.start()
    worker.join(timeout)
    if outcome.get("ok") and cached.is_file():
        return "imagenet", f"ImageNet-pretrained {backbone} teacher (torchvision IMAGENET1K_V1, downloaded to {cached})"
    why = f"download failed: {' '.join(str(outcome['error']).split())}" if "error" in outcome else f"no answer within {timeout:.0f} s"
    if choice == "imagenet":
        raise RuntimeError(f"demo: ImageNet weights for {backbone} unavailable ({why}); put {cached.name} in {cached.parent} or use --weights auto")
    return None, f"randomly initialised teacher: ImageNet weights for {backbone} are not in torch's cache ({cached}) and the {why}"


RANDOM_TEACHER_WARNING = (
    "The teacher is randomly initialised because ImageNet weights are not available here. MemKD and RD detect "
    "anomalies as places where the student fails to reproduce the teacher's features; random convolutional "
    "features describe texture far less well than ImageNet features, so expect markedly lower numbers than with "
    "pretrained weights (on MVTec AD the paper reports ~98-99% image AUROC with an ImageNet WideResNet-50; a "
    "random teacher typically falls far short of that), and differences between the two methods are mostly "
    "noise. The numbers below are reported anyway. For the real thing, put {file} into {dir} (or run once "
    "where torchvision can download it) and rerun."
)


# ---- the run ------------------------------------------------------------------------------------


def prepare_out_dir(out: Path) -> None:
    """Use ``out`` if it is new, empty or an earlier demo (whose data and runs are replaced)."""
    import shutil

    if out.exists() and not out.is_dir():
        raise FileExistsError(f"demo: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise FileExistsError(f"demo: {out} is not empty and holds no earlier demo; choose a new or empty directory")
    for owned in ("data", "runs"):
        if (out / owned).is_dir():
            shutil.rmtree(out / owned)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `memkd demo`; its data/ and runs/ are replaced when the demo runs here again\n")


def _heatmap_rows(evaluations: dict[str, dict[str, Any]], settings: DemoSettings, seed: int) -> list[dict[str, Any]]:
    """Per texture: one test image of each defect type and one normal one, with both methods' maps."""
    rows = []
    for category in settings.categories:
        first = evaluations[METHODS[0]][category]
        predictions = first.predictions
        picks = reports.pick_samples(predictions.defects, len(DEFECTS) + 1, seed)
        for index in picks:
            item_image = first.test_set[index]["image"]
            rows.append(
                {
                    "group": f"{category}/",
                    "image": figures.denormalize(item_image, IMAGENET_MEAN, IMAGENET_STD),
                    "mask": predictions.masks[index],
                    "maps": {m: evaluations[m][category].predictions.maps[index] for m in METHODS},
                    "scores": {m: float(evaluations[m][category].predictions.scores[index]) for m in METHODS},
                    "label": f"{category}: {predictions.defects[index]}",
                    "anomalous": bool(predictions.labels[index]),
                }
            )
    return rows


@dataclass
class _Run:
    report: dict[str, Any]
    predictions: Any
    test_set: Any


def _results_table(results: dict[str, dict[str, dict[str, Any]]], categories: Sequence[str]) -> str:
    header = ["texture", "method", *(reports.METRIC_LABELS[n] for n in METRIC_NAMES), "image F1 @ threshold"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for category in categories:
        for method in METHODS:
            report = results[method][category]
            f1 = report["threshold"]["image_decisions"]["f1"] if report["threshold"] else None
            cells = [category, method, *(reports.format_percent(report["metrics"][n]) for n in METRIC_NAMES), reports.format_percent(f1)]
            lines.append("| " + " | ".join(cells) + " |")
    for method in METHODS:
        means = reports.mean_metrics([results[method][c]["metrics"] for c in categories], METRIC_NAMES)
        f1s = [results[method][c]["threshold"]["image_decisions"]["f1"] for c in categories if results[method][c]["threshold"]]
        cells = ["**mean**", f"**{method}**", *(f"**{reports.format_percent(means[n])}**" for n in METRIC_NAMES)]
        cells.append(f"**{reports.format_percent(float(np.mean(f1s)) if f1s else None)}**")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_demo(
    out: Path,
    quick: bool = False,
    seed: int = 0,
    weights: str = "auto",
    device: Optional[str] = None,
    workers: int = 0,
    progress: bool = True,
    settings: Optional[DemoSettings] = None,
    download_timeout: float = 20.0,
) -> dict[str, Any]:
    """Run the demo into ``out``; returns the summary written to ``out/report.json``."""
    import torch

    started = time.perf_counter()
    settings = settings or (QUICK if quick else FULL)
    out = Path(out)
    prepare_out_dir(out)
    say = lambda text: print(f"memkd demo: {text}", file=sys.stderr, flush=True)  # noqa: E731

    teacher_weights, teacher_text = resolve_weights(weights, settings.backbone, download_timeout)
    random_teacher = teacher_weights is None
    say(f"teacher: {teacher_text}")
    if random_teacher:
        import torchvision

        url = torchvision.models.get_model_weights(settings.backbone).IMAGENET1K_V1.url
        warning = RANDOM_TEACHER_WARNING.format(file=Path(url).name, dir=Path(torch.hub.get_dir()) / "checkpoints")
        say("WARNING: " + warning)

    data_root = out / "data"
    counts = make_dataset(data_root, settings, seed, progress)
    say(f"dataset: {data_root} ({', '.join(settings.categories)}; per texture {settings.train_images} training images, "
        f"{settings.test_good} normal and {settings.test_per_defect * len(DEFECTS)} defective test images)")

    results: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in METHODS}
    runs: dict[str, dict[str, _Run]] = {m: {} for m in METHODS}
    timings: dict[str, dict[str, float]] = {m: {} for m in METHODS}
    steps = len(settings.categories) * len(METHODS)
    for method in METHODS:
        model_config = MemKDConfig(
            method=method,
            backbone=settings.backbone,
            weights=teacher_weights,
            image_size=settings.image_size,
            exemplars=settings.exemplars,
            memory_items=settings.memory_items,
        )
        train_config = TrainConfig(
            epochs=settings.epochs, batch_size=settings.batch_size, seed=seed, save_every=settings.epochs,
            log_every=5, workers=workers, device=device, progress=progress,
        )
        for category in settings.categories:
            done = sum(len(r) for r in results.values())
            say(f"[{done + 1}/{steps}] training {method} on {category} ({settings.epochs} epochs)")
            run_dir = out / "runs" / method / category
            tick = time.perf_counter()
            evaluation = train_category(
                "mvtec", data_root, category, run_dir, model_config, train_config,
                figures=settings.figures, eval_batch_size=16, progress=progress,
            )
            test_set = build_test_dataset("mvtec", data_root, category, model_config)
            trained = tick + evaluation.report["train_seconds"]
            timings[method][category] = {"train_s": trained - tick, "test_s": time.perf_counter() - trained}
            results[method][category] = evaluation.report
            device_used = evaluation.report["inference"]["device"]
            runs[method][category] = _Run(evaluation.report, evaluation.predictions, test_set)
            m = evaluation.metrics
            say(f"{method} {category}: image AUROC {reports.format_percent(m['image_auroc'])}, pixel AUROC "
                f"{reports.format_percent(m['pixel_auroc'])}, AUPRO {reports.format_percent(m['aupro'])}")
        reports.write_summary(out / "runs" / method, results[method], f"memkd demo: {method}")

    rows = _heatmap_rows(runs, settings, seed)
    vranges = {f"{c}/{m}": tuple(results[m][c]["heatmap_range"]) for m in METHODS for c in settings.categories}
    thresholds = {f"{c}/{m}": (results[m][c]["threshold"] or {}).get("value") for m in METHODS for c in settings.categories}
    figure = figures.heatmap_grid(
        rows, list(METHODS), vranges, thresholds,
        title="memkd demo: test images, ground truth and anomaly maps (green: right decision, red: wrong)",
    )
    reports.save_figure(figure, out / "heatmaps.png", dpi=80)

    wall = time.perf_counter() - started
    summary = {
        "quick": quick,
        "seed": seed,
        "settings": asdict(settings),
        "teacher": teacher_text,
        "random_teacher": random_teacher,
        "device": device_used,
        "counts": counts,
        "results": {m: {c: r["metrics"] for c, r in results[m].items()} for m in METHODS},
        "mean": {m: reports.mean_metrics([r["metrics"] for r in results[m].values()], list(reports.METRIC_LABELS)) for m in METHODS},
        "thresholds": {m: {c: (r["threshold"] or {}).get("value") for c, r in results[m].items()} for m in METHODS},
        "timings": timings,
        "wall_seconds": wall,
    }
    summary["table"] = _results_table(results, settings.categories)
    write_json(out / "report.json", summary)
    write_text(out / "report.md", _report_markdown(summary, results, settings, out))
    say(f"done in {wall / 60:.1f} min")
    return summary


def _report_markdown(summary: dict[str, Any], results, settings: DemoSettings, out: Path) -> str:
    import torch

    table = _results_table(results, settings.categories)
    lines = [
        "# memkd demo report",
        "",
        f"MemKD (memory-guided knowledge distillation, ICCV 2023) and its baseline RD4AD (`rd`), trained and tested "
        f"per texture on photographs from scikit-image ({', '.join(settings.categories)}) with synthetic defects "
        f"({', '.join(DEFECTS)}).{' Quick (smoke-test) settings.' if summary['quick'] else ''}",
        "",
        f"**Teacher:** {summary['teacher']}.",
        "",
    ]
    if summary["random_teacher"]:
        lines += [f"> **Random teacher.** {RANDOM_TEACHER_WARNING.format(file='the ' + settings.backbone + ' ImageNet weights file', dir='torch hub cache (' + str(Path(torch.hub.get_dir()) / 'checkpoints') + ')')}", ""]
    lines += [
        "## Results",
        "",
        f"Metrics in percent on each texture's test set ({reports.METRIC_DEFINITIONS}), evaluated at the model's "
        "input size. The last "
        "column is the image-level F1 at the decision threshold stored in each checkpoint (F1-max on these test "
        "scores, so optimistic).",
        "",
        table,
        "![heatmaps](heatmaps.png)",
        "",
        "`heatmaps.png`: per texture one test image of each defect type and one normal image; ground truth; the "
        "anomaly maps of both methods, each with its colour bar (scale per texture and method, from the 1st "
        "percentile of its test maps to its highest score; white line and outline: the decision threshold) and its "
        "decision, `score > threshold: anomalous` or `score <= threshold: normal`, green when right and red when wrong.",
        "",
        "## Setup",
        "",
        f"- Data (`data/`, MVTec AD layout): per texture {settings.train_images} normal training crops from the left "
        f"{TRAIN_REGION} of 512 columns, {settings.test_good} normal and {settings.test_per_defect} per defect type "
        f"test crops from the rest, {settings.crop}x{settings.crop} pixels resized to {settings.image_size}x{settings.image_size}.",
        f"- Model: teacher {settings.backbone}, input {settings.image_size}x{settings.image_size}; MemKD with "
        f"{settings.memory_items} memory items per module and an exemplar set of {settings.exemplars}; "
        f"Adam lr 0.005, betas (0.5, 0.999), batch {settings.batch_size}, {settings.epochs} epochs (the paper: "
        "WideResNet-50, 256x256, 100 epochs).",
        f"- Seed {summary['seed']}; device {summary['device']}; torch {torch.__version__}; python {platform.python_version()}.",
        "- Runs (checkpoints with stored thresholds, metrics.json, metrics.md, figures): `runs/<method>/<texture>/`; "
        "per-method tables: `runs/<method>/results.md`. Try `memkd predict runs/memkd/brick data/brick/test --out predictions`.",
        "",
        "| method | texture | train s | test s |",
        "|---|---|---:|---:|",
    ]
    for method, per in summary["timings"].items():
        for category, t in per.items():
            lines.append(f"| {method} | {category} | {t['train_s']:.0f} | {t['test_s']:.0f} |")
    lines += ["", f"Wall time of the whole demo: {summary['wall_seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)
