"""Evaluating a model on a test set: batched prediction, the metrics and the decision threshold.

``evaluate_model(model, test_set, out_dir)`` predicts the test images in batches, computes the
metrics (image AUROC/AP, pixel AUROC/AP, AUPRO@0.3; ``memkd.metrics``), chooses the
decision threshold and writes the report (``memkd.reports``: ``metrics.json``, ``metrics.md``,
``figures/*.png``).

Evaluation size (``eval_size``): "input" (default) compares the maps at the model's input size
(256x256 with the paper's settings) with the masks resized to it, as RD4AD and the paper do;
"native" resizes the maps to each mask's own resolution; an int N compares both at NxN.

Tiled models (``MemKDConfig.tile_stride``, ``memkd.tiling``) read the test images at full
resolution and score them one at a time with ``tiled_predict`` (the tiles batched inside), so their
maps are at each image's own resolution: "input" and "native" are then the same, the native masks
(the default), and an int N resizes maps and masks to NxN; the metrics are the same definitions.

Decision threshold: an image is anomalous when its score (the maximum of its map) is **strictly
greater** than the threshold. ``threshold_mode="image"`` (default) takes the threshold of maximal
image-level F1 over the test images' scores; ``"pixel"`` the threshold of maximal pixel-level F1
over all test pixels (an image is then anomalous when any of its pixels is). Both F1-max
thresholds come from ``memkd.metrics`` (anomalous when ``>= t``) and are moved down to the midpoint
between ``t`` and the next lower observed value, so that ``score > threshold`` makes exactly the
same test decisions. The threshold is picked on the test set (there is no validation split in
these benchmarks), so the test F1 it reaches is optimistic.

Training then evaluating one category, storing the threshold in a checkpoint, and predicting new
image files are ``memkd.pipeline``'s.
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
from torch.utils.data import Dataset
from tqdm import tqdm

from memkd import reports
from memkd.data import build_dataset, make_loader
from memkd.data.transforms import mask_to_tensor
from memkd.figures import heatmap_range
from memkd.files import folder_lock, write_json, write_text
from memkd.metrics import (
    MetricUndefinedWarning,
    compute_metrics,
    image_auroc,
    image_f1_max,
    pixel_f1_max,
    resize_maps,
    resize_maps_to_masks,
)
from memkd.models import CompiledPredictor, MemKD, MemKDConfig
from memkd.tiling import predict_full_resolution

PathLike = Union[str, Path]
# images [B, 3, H, W] -> (maps [B, H, W], scores [B]), as MemKD.predict
Predictor = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
EvalSize = Union[str, int]
THRESHOLD_MODES = ("image", "pixel")
DECISION_RULE = "anomalous if score > threshold"


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


def needs_native_masks(config: MemKDConfig, eval_size: EvalSize) -> bool:
    if config.tiled:  # the masks are native already
        return False
    return eval_size == "native" or (isinstance(eval_size, int) and (eval_size, eval_size) != config.image_size)


def build_test_dataset(dataset: str, data_root: PathLike, category: Optional[str], config: MemKDConfig, eval_size: EvalSize = "input"):
    """The test split at the model's input size (with native masks when ``eval_size`` needs them),
    or at full resolution for a tiled model."""
    return build_dataset(
        dataset, data_root, category, "test", image_size=config.image_size,
        native_masks=needs_native_masks(config, eval_size), full_resolution=config.tiled,
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
    tiled = model.config.tiled
    loader = make_loader(dataset, batch_size=1 if tiled else batch_size, shuffle=False, workers=workers)
    scores, labels, maps, masks, paths, defects, native = [], [], [], [], [], [], []
    started = time.perf_counter()
    for batch in _progress(loader, len(loader), desc, progress):
        if tiled:  # one full-resolution image, its tiles batch_size at a time
            image_map, score = predict_full_resolution(
                model, batch["image"][0], predictor=predict, tile_batch=batch_size, name=batch["path"][0]
            )
            batch_maps, batch_scores = image_map[None], score[None]
        else:
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
        maps=_stack(maps),
        masks=_stack([m.astype(np.uint8) for m in masks]),
        paths=paths,
        defects=defects,
        native_masks=native or None,
        seconds=seconds,
    )


def _stack(batches: list[np.ndarray]):
    """Batches [b, H, W] as one [N, H, W] array, or a list of [H_i, W_i] arrays when the sizes
    differ (a tiled model's native-resolution maps and masks)."""
    if len({b.shape[1:] for b in batches}) <= 1:
        return np.concatenate(batches)
    return [image for b in batches for image in b]


def inference_path(compile: bool, predictor: Optional[Predictor]) -> str:
    """Which inference path produced a run's numbers (metrics.json "inference.path")."""
    if predictor is not None:
        return getattr(predictor, "description", type(predictor).__name__)
    return "torch.compile (CompiledPredictor)" if compile else "eager (MemKD.predict)"


def evaluation_maps(predictions: Predictions, config: MemKDConfig, eval_size: EvalSize):
    """(maps, masks) compared by the pixel metrics at ``eval_size`` (see the module doc)."""
    if config.tiled:  # maps and masks at each image's own resolution
        if not isinstance(eval_size, int):
            return predictions.maps, predictions.masks
        size = (eval_size, eval_size)
        masks = np.stack([mask_to_tensor(np.asarray(m).astype(bool), size)[0].numpy() for m in predictions.masks])
        return np.concatenate([resize_maps(np.asarray(m)[None], size) for m in predictions.maps]), masks
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
    if tuple(test_set.image_size) != config.image_size:
        raise ValueError(f"test set: images are {test_set.image_size}, the model takes {config.image_size}")
    if bool(getattr(test_set, "full_resolution", False)) != config.tiled:
        raise ValueError("test set: a tiled model takes full-resolution images and an untiled one resized images; "
                         "build it with build_test_dataset")
    if config.tiled and eval_size == "input":
        eval_size = "native"  # a tiled model's input is the full-resolution image
    with folder_lock(out_dir):
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
    maps_for_range = predictions.maps
    if isinstance(maps_for_range, list):  # native sizes: the pixels of every map, subsampled
        maps_for_range = np.concatenate([m.ravel()[:: max(1, m.size // 65536)] for m in maps_for_range])[None]
    vrange = heatmap_range(maps_for_range, predictions.scores)
    samples = reports.pick_samples(predictions.defects, figures, seed)
    figure_paths = reports.write_figures(
        test_set, predictions, samples, out_dir, vrange, threshold and threshold["value"], has_masks, progress
    )
    n = len(predictions.scores)
    report = {
        "dataset": dataset,
        "category": category,
        "method": config.method,
        "backbone": config.backbone,
        "weights": config.weights,
        "image_size": list(config.image_size),
        **({"tiling": {"tile": list(config.image_size), "stride": list(config.tile_stride), "blend": config.tile_blend}}
           if config.tiled else {}),
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
    write_json(out_dir / reports.METRICS_JSON, report)
    write_text(out_dir / reports.METRICS_MD, reports.metrics_markdown(report))
    return Evaluation(report, predictions)
