"""Evaluating a model on a test set, choosing its decision threshold, and predicting new images.

``evaluate_model(model, test_set, out_dir)`` predicts the test images in batches, computes the
metrics (image AUROC/AP, pixel AUROC/AP, AUPRO@0.3; ``memkd.metrics``), chooses the
decision threshold and writes ``metrics.json``, ``metrics.md`` and ``figures/*.png`` (image,
ground truth and heatmap overlay side by side for a sample of test images).

Evaluation size (``eval_size``): "input" (default) compares the maps at the model's input size
(256x256 with the paper's settings) with the masks resized to it, as RD4AD and the paper do;
"native" resizes the maps to each mask's own resolution; an int N compares both at NxN.

Decision threshold: an image is anomalous when its score (the maximum of its map) is **strictly
greater** than the threshold. ``threshold_mode="image"`` (default) takes the threshold of maximal
image-level F1 over the test images' scores; ``"pixel"`` the threshold of maximal pixel-level F1
over all test pixels (an image is then anomalous when any of its pixels is). Both F1-max
thresholds come from ``memkd.metrics`` (anomalous when ``>= t``) and are moved down to the midpoint
between ``t`` and the next lower observed value, so that ``score > threshold`` makes exactly the
same test decisions. The threshold is picked on the test set (there is no validation split in
these benchmarks), so the test F1 it reaches is optimistic.

``train_category`` is the pipeline of ``memkd train`` for one category (train, checkpoint,
evaluate, store the threshold in the checkpoint); ``predict_images`` is ``memkd predict``.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from memkd import reports
from memkd.data import IMAGENET_MEAN, IMAGENET_STD, build_dataset, make_loader
from memkd.data.layouts import IMAGE_EXTENSIONS
from memkd.data.transforms import image_to_tensor, mask_to_tensor, read_image
from memkd.metrics import (
    METRIC_NAMES,
    MetricUndefinedWarning,
    compute_metrics,
    image_auroc,
    image_f1_max,
    pixel_f1_max,
    resize_maps,
    resize_maps_to_masks,
)
from memkd.models import CompiledPredictor, MemKD, MemKDConfig

PathLike = Union[str, Path]
# images [B, 3, H, W] -> (maps [B, H, W], scores [B]), as MemKD.predict
Predictor = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
EvalSize = Union[str, int]
THRESHOLD_MODES = ("image", "pixel")
DECISION_RULE = "anomalous if score > threshold"
METRICS_JSON = "metrics.json"
METRICS_MD = "metrics.md"
FIGURES_DIR = "figures"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def parse_eval_size(value: Any) -> EvalSize:
    """"input", "native" or a positive int (a numeric string is read as an int)."""
    if isinstance(value, str) and value in ("input", "native"):
        return value
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if isinstance(value, bool) or size <= 0 or (isinstance(value, float) and value != size):
        raise ValueError(f"eval_size: expected 'input', 'native' or a positive int, got {value!r}")
    return size


def model_size(config: MemKDConfig) -> tuple[int, int]:
    return tuple(config.image_size)


def needs_native_masks(config: MemKDConfig, eval_size: EvalSize) -> bool:
    return eval_size == "native" or (isinstance(eval_size, int) and (eval_size, eval_size) != model_size(config))


def build_test_dataset(dataset: str, data_root: PathLike, category: Optional[str], config: MemKDConfig, eval_size: EvalSize = "input"):
    """The test split at the model's input size (with native masks when ``eval_size`` needs them)."""
    return build_dataset(
        dataset, data_root, category, "test", image_size=model_size(config), native_masks=needs_native_masks(config, eval_size)
    )


def check_normalisation(config: MemKDConfig) -> None:
    """memkd.data normalises with the ImageNet statistics; the model must expect the same."""
    if not (np.allclose(config.mean, IMAGENET_MEAN) and np.allclose(config.std, IMAGENET_STD)):
        raise ValueError(
            f"config: the model expects inputs normalised with mean {config.mean} and std {config.std}, "
            "but memkd.data normalises with the ImageNet statistics"
        )


# ---- batched prediction -------------------------------------------------------------------------


@dataclass
class Predictions:
    """Model outputs over a test set, in dataset order. ``maps`` [N, H, W] float32 at the model's
    input size; ``masks`` [N, H, W] uint8 at the same size; ``native_masks`` per image at the
    mask file's resolution when the dataset provides them."""

    scores: np.ndarray
    labels: np.ndarray
    maps: np.ndarray
    masks: np.ndarray
    paths: list[str]
    defects: list[str]
    native_masks: Optional[list[np.ndarray]] = None
    seconds: float = 0.0


def _progress(iterable, total: Optional[int], desc: str, progress: bool):
    return tqdm(iterable, total=total, desc=desc, unit="batch", disable=not progress, leave=False)


def predict_dataset(
    model: MemKD,
    dataset: Dataset,
    batch_size: int = 16,
    workers: Optional[int] = 0,
    progress: bool = True,
    desc: str = "predict",
    compile: bool = False,
    predictor: Optional[Predictor] = None,
) -> Predictions:
    """Maps and scores of every item of a memkd.data dataset, one batch at a time; ``compile``:
    through a ``CompiledPredictor`` (its one-off compile time is included in ``seconds``);
    ``predictor``: through this instead of ``model.predict`` (e.g. ``memkd.compiled_cache``)."""
    predict = predictor or (CompiledPredictor(model) if compile else model.predict)
    loader = make_loader(dataset, batch_size=batch_size, shuffle=False, workers=workers)
    scores, labels, maps, masks, paths, defects, native = [], [], [], [], [], [], []
    started = time.perf_counter()
    for batch in _progress(loader, len(loader), desc, progress):
        batch_maps, batch_scores = predict(batch["image"])
        maps.append(batch_maps.float().cpu().numpy())
        scores.append(batch_scores.float().cpu().numpy())
        labels.append(np.asarray(batch["label"]))
        masks.append(np.asarray(batch["mask"])[:, 0])
        paths += list(batch["path"])
        defects += list(batch["defect"])
        if "mask_native" in batch:
            native += [np.asarray(m)[0] for m in batch["mask_native"]]
    seconds = time.perf_counter() - started
    return Predictions(
        scores=np.concatenate(scores),
        labels=np.concatenate(labels).astype(np.int64),
        maps=np.concatenate(maps),
        masks=np.concatenate(masks).astype(np.uint8),
        paths=paths,
        defects=defects,
        native_masks=native or None,
        seconds=seconds,
    )


def inference_path(compile: bool, predictor: Optional[Predictor]) -> str:
    """Which inference path produced a run's numbers (metrics.json "inference.path")."""
    if predictor is not None:
        return getattr(predictor, "description", type(predictor).__name__)
    return "torch.compile (CompiledPredictor)" if compile else "eager (MemKD.predict)"


def evaluation_maps(predictions: Predictions, config: MemKDConfig, eval_size: EvalSize):
    """(maps, masks) compared by the pixel metrics at ``eval_size`` (see the module doc)."""
    if not needs_native_masks(config, eval_size):
        return predictions.maps, predictions.masks
    if predictions.native_masks is None:
        raise ValueError(f"eval_size {eval_size!r}: the dataset was built without native masks")
    if eval_size == "native":
        return resize_maps_to_masks(predictions.maps, predictions.native_masks), predictions.native_masks
    size = (eval_size, eval_size)
    masks = np.stack([mask_to_tensor(m.astype(bool), size)[0].numpy() for m in predictions.native_masks])
    return resize_maps(predictions.maps, size), masks


# ---- thresholds ---------------------------------------------------------------------------------


def _strictly_below(threshold: float, values: Sequence[np.ndarray]) -> float:
    """A threshold t' with ``v > t'`` exactly where ``v >= threshold`` over ``values``."""
    below = [v[v < threshold] for v in values]
    below = [b.max() for b in below if b.size]
    if below:
        return float((threshold + float(max(below))) / 2.0)
    return float(threshold - max(abs(threshold) * 1e-6, 1e-12))


def decision_stats(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    """Confusion counts, precision, recall, F1 and accuracy of ``score > threshold``."""
    predicted = np.asarray(scores, np.float64) > threshold
    labels = np.asarray(labels).astype(bool)
    tp, fp = int((predicted & labels).sum()), int((predicted & ~labels).sum())
    fn, tn = int((~predicted & labels).sum()), int((~predicted & ~labels).sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "precision": precision, "recall": recall, "f1": f1, "accuracy": (tp + tn) / max(len(labels), 1)}


def choose_threshold(
    scores: np.ndarray,
    labels: np.ndarray,
    maps=None,
    masks=None,
    mode: str = "image",
) -> Optional[dict[str, Any]]:
    """The decision threshold of ``mode`` ("image" or "pixel" F1-max, see the module doc) with its
    test statistics, or None when it is undefined (no anomalous image, or no defect pixel)."""
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"threshold_mode: expected one of {THRESHOLD_MODES}, got {mode!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricUndefinedWarning)
        if mode == "image":
            at_least, f1 = image_f1_max(scores, labels)
            pooled = [np.asarray(scores, np.float64)]
        else:
            if maps is None or masks is None:
                return None
            at_least, f1 = pixel_f1_max(maps, masks)
            pooled = [np.asarray(m, np.float32) for m in (maps if isinstance(maps, list) else [maps])]
    if not math.isfinite(at_least):
        return None
    threshold = _strictly_below(at_least, pooled)
    result = {"value": threshold, "mode": mode, "rule": DECISION_RULE, f"{mode}_f1_max": f1}
    result["image_decisions"] = decision_stats(scores, labels, threshold)
    return result


# ---- figures ------------------------------------------------------------------------------------


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
    dataset: Dataset,
    predictions: Predictions,
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
        image = reports.denormalize(item["image"], IMAGENET_MEAN, IMAGENET_STD)
        score = float(predictions.scores[index])
        stem = Path(predictions.paths[index]).stem
        defect = predictions.defects[index]
        decision = "" if threshold is None else f", {'anomalous' if score > threshold else 'normal'} at threshold {threshold:.4g}"
        title = f"{defect}/{stem}: score {score:.4g}{decision}"
        figure = reports.sample_figure(
            image, predictions.masks[index] if has_masks else None, predictions.maps[index], vrange, title, threshold
        )
        name = f"{FIGURES_DIR}/{rank:02d}_{defect}_{stem}.png"
        reports.save_figure(figure, out_dir / name)
        written.append(name)
    return written


# ---- evaluation ---------------------------------------------------------------------------------


def per_defect_auroc(scores: np.ndarray, defects: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Image AUROC of each defect type against the normal test images."""
    defects = np.asarray(defects)
    good = defects == "good"
    result = {}
    for defect in sorted(set(defects.tolist()) - {"good"}):
        chosen = good | (defects == defect)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MetricUndefinedWarning)
            auroc = image_auroc(scores[chosen], (defects[chosen] == defect).astype(np.int64))
        result[defect] = {"images": int((defects == defect).sum()), "image_auroc": auroc}
    return result


@dataclass
class Evaluation:
    """What ``evaluate_model`` returns: the report written to metrics.json, and the predictions."""

    report: dict[str, Any]
    predictions: Predictions = field(repr=False)

    @property
    def metrics(self) -> dict[str, float]:
        return self.report["metrics"]

    @property
    def threshold(self) -> Optional[float]:
        return None if self.report["threshold"] is None else self.report["threshold"]["value"]


def evaluate_model(
    model: MemKD,
    test_set,
    out_dir: PathLike,
    *,
    dataset: str = "",
    category: str = "",
    eval_size: EvalSize = "input",
    threshold_mode: str = "image",
    figures: int = 8,
    batch_size: int = 16,
    workers: Optional[int] = 0,
    progress: bool = True,
    seed: int = 0,
    info: Optional[dict[str, Any]] = None,
    compile: bool = False,
    predictor: Optional[Predictor] = None,
) -> Evaluation:
    """Predict ``test_set`` (from ``build_test_dataset``), compute the metrics and the threshold,
    and write metrics.json, metrics.md and ``figures`` heatmap figures under ``out_dir``.
    ``compile``: predict through a ``CompiledPredictor``; ``predictor``: through this instead."""
    config = model.config
    eval_size = parse_eval_size(eval_size)
    if threshold_mode not in THRESHOLD_MODES:
        raise ValueError(f"threshold_mode: expected one of {THRESHOLD_MODES}, got {threshold_mode!r}")
    check_normalisation(config)
    if tuple(test_set.image_size) != model_size(config):
        raise ValueError(f"test set: images are {test_set.image_size}, the model takes {model_size(config)}")
    with reports.folder_lock(out_dir):
        return _evaluate(
            model, test_set, Path(out_dir), dataset, category, eval_size, threshold_mode, figures, batch_size, workers,
            progress, seed, info, compile, predictor,
        )


def _evaluate(
    model, test_set, out_dir, dataset, category, eval_size, threshold_mode, figures, batch_size, workers, progress,
    seed, info, compile, predictor,
) -> Evaluation:
    config = model.config
    label = f"{dataset}/{category}" if dataset or category else "test"
    predictions = predict_dataset(
        model, test_set, batch_size, workers, progress, desc=f"test {label}", compile=compile, predictor=predictor
    )
    has_masks = getattr(test_set, "has_masks", True)
    maps, masks = evaluation_maps(predictions, config, eval_size) if has_masks else (None, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetricUndefinedWarning)
        metrics = compute_metrics(predictions.scores, predictions.labels, maps, masks)
    notes = sorted({str(w.message) for w in caught if issubclass(w.category, MetricUndefinedWarning)})
    threshold = choose_threshold(predictions.scores, predictions.labels, maps, masks, threshold_mode)
    if threshold is None:
        notes.append(f"no decision threshold: {threshold_mode} F1-max is undefined on this test set")
    vrange = reports.heatmap_range(predictions.maps, predictions.scores)
    samples = pick_samples(predictions.defects, figures, seed)
    figure_paths = write_figures(
        test_set, predictions, samples, out_dir, vrange, threshold and threshold["value"], has_masks, progress
    )
    n = len(predictions.scores)
    report = {
        "dataset": dataset,
        "category": category,
        "method": config.method,
        "backbone": config.backbone,
        "weights": config.weights,
        "image_size": list(model_size(config)),
        "eval_size": eval_size,
        "images": n,
        "anomalous": int(predictions.labels.sum()),
        "metrics": metrics,
        "per_defect": per_defect_auroc(predictions.scores, predictions.defects),
        "threshold": threshold,
        "heatmap_range": list(vrange),
        "inference": {
            "device": str(model.device),
            "path": inference_path(compile, predictor),
            "seconds": predictions.seconds,
            "images_per_second": n / max(predictions.seconds, 1e-9),
        },
        "figures": figure_paths,
        "notes": notes,
        **(info or {}),
    }
    reports.write_json(out_dir / METRICS_JSON, report)
    reports.write_text(out_dir / METRICS_MD, metrics_markdown(report))
    return Evaluation(report, predictions)


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
        reports.metrics_table([(report.get("category") or "test", report["metrics"])]),
    ]
    if report["per_defect"]:
        lines += ["| defect | images | I-AUROC vs good |", "|---|---:|---:|"]
        lines += [f"| {d} | {v['images']} | {reports.format_percent(v['image_auroc'])} |" for d, v in report["per_defect"].items()]
        lines.append("")
    threshold = report["threshold"]
    if threshold is not None:
        stats = threshold["image_decisions"]
        lines.append(
            f"Decision threshold {threshold['value']:.6g} ({threshold['mode']}-level F1-max on the test set; "
            f"{threshold['rule']}): image F1 {reports.format_percent(stats['f1'])}, precision "
            f"{reports.format_percent(stats['precision'])}, recall {reports.format_percent(stats['recall'])} "
            f"(TP {stats['tp']}, FP {stats['fp']}, TN {stats['tn']}, FN {stats['fn']})."
        )
    for note in report.get("notes", []):
        lines.append(f"\nNote: {note}")
    if report["figures"]:
        lines += ["", "## Heatmaps", ""] + [f"![{Path(p).stem}]({p})" for p in report["figures"]]
    return "\n".join(lines) + "\n"


def threshold_extra(report: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint ``extra`` entries that ``memkd predict`` reads: threshold and colour range."""
    threshold = report["threshold"]
    return {
        "threshold": None if threshold is None else threshold["value"],
        "threshold_mode": None if threshold is None else threshold["mode"],
        "threshold_rule": DECISION_RULE,
        "threshold_source": {"dataset": report["dataset"], "category": report["category"], "eval_size": report["eval_size"]},
        "heatmap_range": report["heatmap_range"],
    }


def store_threshold(checkpoint_dir: PathLike, report: dict[str, Any]) -> dict[str, Any]:
    """Write the threshold of ``report`` into the checkpoint's extra (config.json, atomically)."""
    from memkd.train import update_checkpoint_extra

    return update_checkpoint_extra(checkpoint_dir, threshold_extra(report))


# ---- several categories -------------------------------------------------------------------------


def write_summary(out_dir: PathLike, results: dict[str, dict[str, Any]], title: str) -> tuple[Path, Path]:
    """results.md and results.json: one row per category (its metrics.json report) and the mean."""
    out_dir = Path(out_dir)
    rows = [(category, report["metrics"]) for category, report in results.items()]
    thresholds = {c: r["threshold"]["value"] if r.get("threshold") else None for c, r in results.items()}
    table = reports.metrics_table(
        rows, extra_columns=[("threshold", lambda c, _: "n/a" if thresholds[c] is None else f"{thresholds[c]:.4g}")]
    )
    text = f"# {title}\n\nMetrics in percent ({reports.METRIC_DEFINITIONS}); the mean is over categories.\n\n{table}"
    summary = {
        "title": title,
        "categories": {c: r["metrics"] for c, r in results.items()},
        "mean": reports.mean_metrics([m for _, m in rows], METRIC_NAMES),
        "thresholds": thresholds,
    }
    return reports.write_text(out_dir / RESULTS_MD, text), reports.write_json(out_dir / RESULTS_JSON, summary)


# ---- the train pipeline -------------------------------------------------------------------------


def train_category(
    dataset: str,
    data_root: PathLike,
    category: Optional[str],
    run_dir: PathLike,
    model_config: Optional[MemKDConfig],
    train_config,
    *,
    resume: bool = False,
    eval_size: EvalSize = "input",
    threshold_mode: str = "image",
    figures: int = 8,
    eval_batch_size: Optional[int] = None,
    progress: bool = True,
) -> Optional[Evaluation]:
    """Train one category into ``run_dir`` (the checkpoint directory), evaluate it on the test
    split (metrics.json, metrics.md, figures/ there) and store the threshold in the checkpoint.
    Returns None on the non-main processes of a distributed run. ``resume`` continues the checkpoint in ``run_dir`` (``model_config`` None: the stored one)."""
    from memkd.train import Trainer, update_checkpoint_extra

    config = model_config
    if config is None:
        from memkd.train import read_header

        config = MemKDConfig.from_dict(read_header(run_dir)["config"])
    check_normalisation(config)
    train_set = build_dataset(dataset, data_root, category, "train", image_size=model_size(config))
    test_set = build_test_dataset(dataset, data_root, category, config, parse_eval_size(eval_size))
    provenance = {"dataset": dataset, "category": category, "data_root": str(Path(data_root).resolve())}
    started = time.perf_counter()
    model = Trainer(train_set, run_dir, model_config, train_config, resume, extra=provenance).fit()
    train_seconds = time.perf_counter() - started
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None  # rank 0 evaluates and writes
    update_checkpoint_extra(run_dir, provenance)  # a resumed run that had nothing left to train saved nothing
    evaluation = evaluate_model(
        model,
        test_set,
        run_dir,
        dataset=dataset,
        category=category or "",
        eval_size=eval_size,
        threshold_mode=threshold_mode,
        figures=figures,
        batch_size=eval_batch_size or train_config.batch_size,
        workers=train_config.workers,
        progress=progress,
        seed=train_config.seed,
        info={"train_seconds": train_seconds, "train_images": len(train_set), "epochs": train_config.epochs},
        compile=train_config.compile,
    )
    store_threshold(run_dir, evaluation.report)
    return evaluation


# ---- predicting new images ----------------------------------------------------------------------


def collect_images(inputs: Sequence[PathLike]) -> list[tuple[Path, str]]:
    """(path, output name) of every image: files as given, folders searched recursively (sorted).
    Output names are unique, derived from the path relative to the folder given."""
    found: list[tuple[Path, str]] = []
    for entry in map(Path, inputs):
        if entry.is_file():
            found.append((entry, entry.stem))
        elif entry.is_dir():
            images = sorted(p for p in entry.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
            if not images:
                raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {entry}")
            found += [(p, "__".join(p.relative_to(entry).with_suffix("").parts)) for p in images]
        else:
            raise FileNotFoundError(f"no such file or directory: {entry}")
    names: dict[str, int] = {}
    unique = []
    for path, name in found:
        count = names.get(name, 0)
        names[name] = count + 1
        unique.append((path, name if count == 0 else f"{name}-{count}"))
    return unique


class ImageFiles(Dataset):
    """Image files for prediction: the normalised model input, the original RGB pixels, and an
    error message instead of raising for an unreadable file."""

    def __init__(self, paths: Sequence[Path], config: MemKDConfig):
        self.paths = list(paths)
        self.size = model_size(config)
        self.mean, self.std = np.asarray(config.mean, np.float32), np.asarray(config.std, np.float32)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image = read_image(self.paths[index])
        except ValueError as error:  # DatasetError
            return {"image": torch.zeros(3, *self.size), "original": None, "error": str(error)}
        tensor = image_to_tensor(image, self.size)  # ImageNet-normalised; redo with the model's statistics
        pixels = tensor.permute(1, 2, 0).numpy() * np.asarray(IMAGENET_STD, np.float32) + np.asarray(IMAGENET_MEAN, np.float32)
        tensor = torch.from_numpy(((pixels - self.mean) / self.std).transpose(2, 0, 1).copy())
        return {"image": tensor, "original": np.asarray(image), "error": ""}


def _collate_files(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([item["image"] for item in items]),
        "original": [item["original"] for item in items],
        "error": [item["error"] for item in items],
    }


def predict_images(
    model: MemKD,
    inputs: Sequence[PathLike],
    out_dir: PathLike,
    threshold: float,
    heatmap_range: Optional[Sequence[float]] = None,
    batch_size: int = 16,
    workers: Optional[int] = 0,
    progress: bool = True,
    csv_name: str = "predictions.csv",
    compile: bool = False,
    predictor: Optional[Predictor] = None,
) -> tuple[Path, list[dict[str, Any]]]:
    """Score every image under ``inputs`` in batches, write a ``<name>_heatmap.png`` figure per image
    (``write_prediction_figure``) and a CSV (path, score, decision, threshold, heatmap). Unreadable
    files get decision "error". The output folder is locked meanwhile (``reports.folder_lock``).
    ``compile``: predict through a ``CompiledPredictor``; ``predictor``: through this instead."""
    files = collect_images(inputs)
    with reports.folder_lock(out_dir):
        return _predict_files(model, files, Path(out_dir), threshold, heatmap_range, batch_size, workers, progress, csv_name, compile, predictor)


def _predict_files(
    model, files, out_dir, threshold, heatmap_range, batch_size, workers, progress, csv_name, compile, predictor
) -> tuple[Path, list[dict[str, Any]]]:
    predict = predictor or (CompiledPredictor(model) if compile else model.predict)
    dataset = ImageFiles([path for path, _ in files], model.config)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers or 0, collate_fn=_collate_files)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(files), desc="predict", unit="image", disable=not progress)
    for batch in loader:
        maps, scores = predict(batch["image"])
        maps, scores = maps.float().cpu().numpy(), scores.float().cpu().numpy()
        for amap, score, original, error in zip(maps, scores, batch["original"], batch["error"]):
            path, name = files[len(rows)]
            if error:
                rows.append(prediction_row(path, None, threshold, "", error))
                continue
            heatmap = f"{name}_heatmap.png"
            write_prediction_figure(out_dir / heatmap, original, amap, float(score), threshold, Path(path).name, heatmap_range)
            rows.append(prediction_row(path, float(score), threshold, heatmap, ""))
        bar.update(len(maps))
    bar.close()
    return write_predictions_csv(out_dir / csv_name, rows), rows


def write_prediction_figure(
    path: Path, image: np.ndarray, amap: np.ndarray, score: float, threshold: float, name: str,
    heatmap_range: Optional[Sequence[float]],
) -> Path:
    """The PNG of one predicted image (``reports.prediction_figure``): colours over the model's
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
    figure = reports.prediction_figure(np.asarray(image), amap, vrange, threshold, name, score, note)
    return reports.save_figure(figure, path)


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
    return reports.write_csv(path, header, ([r[k] if k != "score" or r[k] == "" else f"{r[k]:.8g}" for k in header] for r in rows))
