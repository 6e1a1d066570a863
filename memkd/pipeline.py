"""What the commands run, top to bottom: train then evaluate a category, store a test's decision
threshold in its checkpoint, and predict image files.

``train_category`` is ``memkd train`` for one category: train (``memkd.train``), checkpoint,
evaluate on the test split (``memkd.evaluation``, which writes the report) and store the
threshold in the checkpoint. ``store_tested_threshold`` is the policy of ``memkd test``: a
threshold is stored only in a checkpoint trained on the tested data. ``predict_images`` is
``memkd predict`` with a checkpoint: image files in, ``<name>_heatmap.png`` figures and
``predictions.csv`` out (``memkd.reports``).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from memkd import reports
from memkd.data import build_dataset
from memkd.data.layouts import IMAGE_EXTENSIONS
from memkd.data.tiles import TileCrops
from memkd.data.transforms import full_resolution_tensor, image_to_tensor, read_image
from memkd.evaluation import (
    DECISION_RULE,
    EvalSize,
    Evaluation,
    PathLike,
    Predictor,
    build_test_dataset,
    evaluate_model,
    parse_eval_size,
)
from memkd.files import folder_lock
from memkd.models import CompiledPredictor, MemKD, MemKDConfig
from memkd.tiling import predict_full_resolution
from memkd.train import Trainer, read_header, update_checkpoint_extra

# ---- thresholds in checkpoints ------------------------------------------------------------------


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
    return update_checkpoint_extra(checkpoint_dir, threshold_extra(report))


def store_tested_threshold(checkpoint_dir: Path, extra: dict[str, Any], dataset: str, category: Optional[str],
                           report: dict[str, Any]) -> Optional[str]:
    """``memkd test``'s policy: store the tested threshold in the checkpoint (whose ``extra`` is
    given) when the checkpoint was trained on the tested dataset and category, or does not say what
    it was trained on. Returns what was done, as a sentence for the user (None: there is no
    threshold to store)."""
    trained_on = (extra.get("dataset"), extra.get("category"))
    if trained_on == (None, None) or trained_on == (dataset, category):
        if report["threshold"] is None:
            return None
        store_threshold(checkpoint_dir, report)
        return f"stored the threshold in {checkpoint_dir / 'config.json'}"
    return (
        f"not storing the threshold: the checkpoint was trained on {trained_on[0]}/{trained_on[1]}, "
        f"tested on {dataset}/{category}"
    )


# ---- training a category ------------------------------------------------------------------------


def build_train_dataset(dataset: str, data_root: PathLike, category: Optional[str], config: MemKDConfig, seed: int = 0):
    """The training split as the model takes it: resized to ``config.image_size``, or for a tiled
    model one seeded random tile of each full-resolution image per epoch (``TileCrops``)."""
    train_set = build_dataset(dataset, data_root, category, "train", image_size=config.image_size)
    return TileCrops.of(train_set, seed) if config.tiled else train_set


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
    config = model_config
    if config is None:
        config = MemKDConfig.from_dict(read_header(run_dir)["config"])
    train_set = build_train_dataset(dataset, data_root, category, config, train_config.seed)
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


# ---- predicting image files ---------------------------------------------------------------------


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
        self.size = config.image_size
        self.full_resolution = config.tiled  # a tiled model's input: the image as it is

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image = read_image(self.paths[index])
        except ValueError as error:  # DatasetError
            return {"image": torch.zeros(3, *self.size), "original": None, "error": str(error)}
        tensor = full_resolution_tensor(image) if self.full_resolution else image_to_tensor(image, self.size)
        return {"image": tensor, "original": np.asarray(image), "error": ""}


def _collate_files(items: list[dict[str, Any]]) -> dict[str, Any]:
    images = [item["image"] for item in items]
    return {
        "image": torch.stack(images) if len({i.shape for i in images}) == 1 else images,
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
    (``reports.write_prediction_figure``) and a CSV (path, score, decision, threshold, heatmap). Unreadable
    files get decision "error". The output folder is locked meanwhile (``memkd.files.folder_lock``).
    ``compile``: predict through a ``CompiledPredictor``; ``predictor``: through this instead."""
    files = collect_images(inputs)
    with folder_lock(out_dir):
        return _predict_files(model, files, Path(out_dir), threshold, heatmap_range, batch_size, workers, progress, csv_name, compile, predictor)


def _predict_tiled(model, predict, batch, tile_batch: int, path) -> tuple[list, list]:
    """([map], [score]) of a batch of one full-resolution image (``memkd.tiling``); an image smaller
    than the tile becomes an "error" row, as an unreadable one does."""
    if batch["error"][0]:
        return [None], [float("nan")]
    try:
        amap, score = predict_full_resolution(model, batch["image"][0], predictor=predict, tile_batch=tile_batch, name=str(path))
    except ValueError as error:
        if "smaller than the model's tile" not in str(error):
            raise
        batch["error"][0] = str(error)
        return [None], [float("nan")]
    return [amap.float().cpu().numpy()], [float(score)]


def _predict_files(
    model, files, out_dir, threshold, heatmap_range, batch_size, workers, progress, csv_name, compile, predictor
) -> tuple[Path, list[dict[str, Any]]]:
    predict = predictor or (CompiledPredictor(model) if compile else model.predict)
    dataset = ImageFiles([path for path, _ in files], model.config)
    tiled = model.config.tiled  # one full-resolution image at a time, its tiles batch_size at a time
    loader = DataLoader(dataset, batch_size=1 if tiled else batch_size, shuffle=False, num_workers=workers or 0,
                        collate_fn=_collate_files)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(files), desc="predict", unit="image", disable=not progress)
    for batch in loader:
        if tiled:
            maps, scores = _predict_tiled(model, predict, batch, batch_size, files[len(rows)][0])
        else:
            maps, scores = predict(batch["image"])
            maps, scores = maps.float().cpu().numpy(), scores.float().cpu().numpy()
        for amap, score, original, error in zip(maps, scores, batch["original"], batch["error"]):
            path, name = files[len(rows)]
            if error:
                rows.append(reports.prediction_row(path, None, threshold, "", error))
                continue
            heatmap = f"{name}_heatmap.png"
            reports.write_prediction_figure(out_dir / heatmap, original, amap, float(score), threshold, Path(path).name, heatmap_range)
            rows.append(reports.prediction_row(path, float(score), threshold, heatmap, ""))
        bar.update(len(maps))
    bar.close()
    return reports.write_predictions_csv(out_dir / csv_name, rows), rows
