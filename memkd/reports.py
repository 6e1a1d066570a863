"""Writing results: metric tables and Markdown reports, summaries over categories, the predictions
CSV, and the heatmap figures (drawn by ``memkd.figures``) of a test set or a predicted image.

What one evaluation writes in its folder: ``metrics.json``, ``metrics.md`` and ``figures/*.png``
(image, ground truth and heatmap overlay side by side for a sample of test images); several
categories add ``results.md`` and ``results.json``; ``memkd predict`` writes ``predictions.csv`` and
``<name>_heatmap.png`` per image. Every file is written atomically (``memkd.files``).
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
from tqdm import tqdm

from memkd.data import IMAGENET_MEAN, IMAGENET_STD
from memkd.figures import denormalize, prediction_figure, sample_figure
from memkd.files import PathLike, atomic_write, write_json, write_text
from memkd.metrics import METRIC_NAMES

METRICS_JSON = "metrics.json"
METRICS_MD = "metrics.md"
FIGURES_DIR = "figures"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"

# Column labels of the metric tables, in the order of memkd.metrics.METRIC_NAMES.
METRIC_LABELS = {
    "image_auroc": "I-AUROC",
    "image_ap": "I-AP",
    "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP",
    "aupro": "AUPRO@0.3",
}


# ---- file formats -------------------------------------------------------------------------------


def write_csv(path: PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


def write_png(path: PathLike, rgb: np.ndarray) -> Path:
    """A uint8 [H, W, 3] (or [H, W]) array as a PNG."""
    from PIL import Image

    def write(tmp: Path) -> None:
        Image.fromarray(np.ascontiguousarray(rgb)).save(tmp, format="PNG")

    return atomic_write(path, write)


def save_figure(figure, path: PathLike, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG and close it."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    finally:
        plt.close(figure)


# ---- tables -----------------------------------------------------------------------------------

METRIC_DEFINITIONS = (
    "image AUROC and AP rank the test images by their score (the maximum of the anomaly map); pixel AUROC "
    "and AP rank all test pixels; AUPRO@0.3 is the area under the per-region-overlap curve up to a "
    "false-positive rate of 0.3, divided by 0.3"
)


def format_percent(value: Optional[float]) -> str:
    """A metric in [0, 1] as a percentage with one decimal; "n/a" when undefined."""
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    return f"{100.0 * float(value):.1f}"


def mean_metrics(rows: Sequence[Mapping[str, Optional[float]]], names: Sequence[str]) -> dict[str, Optional[float]]:
    """The mean of each metric over the rows where it is defined (None when it is nowhere)."""
    means = {}
    for name in names:
        values = [float(r[name]) for r in rows if r.get(name) is not None and math.isfinite(float(r[name]))]
        means[name] = float(np.mean(values)) if values else None
    return means


def metrics_table(
    rows: Sequence[tuple[str, Mapping[str, Optional[float]]]],
    names: Sequence[str] = tuple(METRIC_LABELS),
    first_column: str = "category",
    with_mean: bool = True,
    extra_columns: Sequence[tuple[str, Callable[[str, Mapping[str, Any]], str]]] = (),
) -> str:
    """A Markdown table, one row per (label, metrics) in percent, plus a bold mean row.

    ``extra_columns``: (header, function(label, metrics) -> cell) appended after the metrics; the
    mean row leaves them empty.
    """
    header = [first_column, *(METRIC_LABELS.get(n, n) for n in names), *(h for h, _ in extra_columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for label, metrics in rows:
        cells = [label, *(format_percent(metrics.get(n)) for n in names), *(f(label, metrics) for _, f in extra_columns)]
        lines.append("| " + " | ".join(cells) + " |")
    if with_mean and rows:
        means = mean_metrics([m for _, m in rows], names)
        cells = ["**mean**", *(f"**{format_percent(means[n])}**" for n in names), *("" for _ in extra_columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- one evaluation -----------------------------------------------------------------------------


def metrics_markdown(report: dict[str, Any]) -> str:
    """The Markdown report of one category: the metric table (with the mean row), per-defect image
    AUROC, the threshold and the figures."""
    title = f"{report.get('dataset') or 'test'} / {report.get('category') or '-'}"
    lines = [
        f"# memkd test: {title}",
        "",
        f"Method `{report['method']}`, teacher `{report['backbone']}` (weights: {report['weights'] or 'random init'}), "
        f"input {report['image_size'][0]}x{report['image_size'][1]}, evaluated at {report['eval_size']}; "
        f"{report['images']} test images, {report['anomalous']} anomalous. Metrics in percent.",
        "",
        metrics_table([(report.get("category") or "test", report["metrics"])]),
    ]
    if report["per_defect"]:
        lines += ["| defect | images | I-AUROC vs good |", "|---|---:|---:|"]
        lines += [f"| {d} | {v['images']} | {format_percent(v['image_auroc'])} |" for d, v in report["per_defect"].items()]
        lines.append("")
    threshold = report["threshold"]
    if threshold is not None:
        stats = threshold["image_decisions"]
        lines.append(
            f"Decision threshold {threshold['value']:.6g} ({threshold['mode']}-level F1-max on the test set; "
            f"{threshold['rule']}): image F1 {format_percent(stats['f1'])}, precision "
            f"{format_percent(stats['precision'])}, recall {format_percent(stats['recall'])} "
            f"(TP {stats['tp']}, FP {stats['fp']}, TN {stats['tn']}, FN {stats['fn']})."
        )
    for note in report.get("notes", []):
        lines.append(f"\nNote: {note}")
    if report["figures"]:
        lines += ["", "## Heatmaps", ""] + [f"![{Path(p).stem}]({p})" for p in report["figures"]]
    return "\n".join(lines) + "\n"


def pick_samples(defects: Sequence[str], count: int, seed: int = 0) -> list[int]:
    """Up to ``count`` indices, taken round-robin over the defect types (normal images last) in a
    seeded random order: every defect type is shown before any is shown twice."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for index, defect in enumerate(defects):
        groups.setdefault(defect, []).append(index)
    order = sorted(groups, key=lambda d: (d == "good", d))
    queues = {d: list(rng.permutation(groups[d])) for d in order}
    chosen: list[int] = []
    while len(chosen) < count and any(queues.values()):
        for defect in order:
            if queues[defect] and len(chosen) < count:
                chosen.append(int(queues[defect].pop(0)))
    return chosen


def write_figures(
    dataset,
    predictions,
    indices: Sequence[int],
    out_dir: Path,
    vrange: tuple[float, float],
    threshold: Optional[float],
    has_masks: bool = True,
    progress: bool = True,
) -> list[str]:
    """One PNG per chosen test image (image | ground truth | heatmap overlay); relative paths."""
    written = []
    for rank, index in enumerate(tqdm(indices, desc="figures", unit="image", disable=not progress, leave=False)):
        item = dataset[index]
        image = denormalize(item["image"], IMAGENET_MEAN, IMAGENET_STD)
        score = float(predictions.scores[index])
        stem = Path(predictions.paths[index]).stem
        defect = predictions.defects[index]
        decision = "" if threshold is None else f", {'anomalous' if score > threshold else 'normal'} at threshold {threshold:.4g}"
        title = f"{defect}/{stem}: score {score:.4g}{decision}"
        figure = sample_figure(
            image, predictions.masks[index] if has_masks else None, predictions.maps[index], vrange, title, threshold
        )
        name = f"{FIGURES_DIR}/{rank:02d}_{defect}_{stem}.png"
        save_figure(figure, out_dir / name)
        written.append(name)
    return written


# ---- several categories -------------------------------------------------------------------------


def write_summary(out_dir: PathLike, results: dict[str, dict[str, Any]], title: str) -> tuple[Path, Path]:
    """results.md and results.json: one row per category (its metrics.json report) and the mean."""
    out_dir = Path(out_dir)
    rows = [(category, report["metrics"]) for category, report in results.items()]
    thresholds = {c: r["threshold"]["value"] if r.get("threshold") else None for c, r in results.items()}
    table = metrics_table(
        rows, extra_columns=[("threshold", lambda c, _: "n/a" if thresholds[c] is None else f"{thresholds[c]:.4g}")]
    )
    text = f"# {title}\n\nMetrics in percent ({METRIC_DEFINITIONS}); the mean is over categories.\n\n{table}"
    summary = {
        "title": title,
        "categories": {c: r["metrics"] for c, r in results.items()},
        "mean": mean_metrics([m for _, m in rows], METRIC_NAMES),
        "thresholds": thresholds,
    }
    return write_text(out_dir / RESULTS_MD, text), write_json(out_dir / RESULTS_JSON, summary)


# ---- predicted images ---------------------------------------------------------------------------


def write_prediction_figure(
    path: Path, image: np.ndarray, amap: np.ndarray, score: float, threshold: float, name: str,
    heatmap_range: Optional[Sequence[float]],
) -> Path:
    """The PNG of one predicted image (``memkd.figures.prediction_figure``): colours over the model's
    ``heatmap_range`` (stored with the threshold by ``memkd test``), else over the map's own range,
    which the figure then says."""
    if heatmap_range:
        vrange = (float(heatmap_range[0]), float(heatmap_range[1]))
        note = (f"Colour scale {vrange[0]:.4g} to {vrange[1]:.4g}, fixed for this model (chosen by memkd test with "
                "its threshold): colours compare across images; values outside it take its end colours.")
    else:
        vrange = (float(amap.min()), float(amap.max()) + 1e-6)
        note = (f"Colour scale {vrange[0]:.4g} to {vrange[1]:.4g}: this image's own range, as the checkpoint stores "
                "none (run memkd test to store one): colours do not compare across images.")
    figure = prediction_figure(np.asarray(image), amap, vrange, threshold, name, score, note)
    return save_figure(figure, path)


PREDICTIONS_CSV_HEADER = ("path", "score", "decision", "threshold", "heatmap", "error")


def prediction_row(path: PathLike, score: Optional[float], threshold: float, heatmap: str, error: str) -> dict[str, Any]:
    """One row of predictions.csv: decision "anomalous" when score > threshold, "error" without a score."""
    if score is None:
        return {"path": str(path), "score": "", "decision": "error", "threshold": threshold, "heatmap": "", "error": error}
    decision = "anomalous" if score > threshold else "normal"
    return {"path": str(path), "score": score, "decision": decision, "threshold": threshold, "heatmap": heatmap, "error": ""}


def write_predictions_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """predictions.csv (``PREDICTIONS_CSV_HEADER``; scores to 8 significant digits), written atomically."""
    header = PREDICTIONS_CSV_HEADER
    return write_csv(path, header, ([r[k] if k != "score" or r[k] == "" else f"{r[k]:.8g}" for k in header] for r in rows))
