"""Exporting a trained model for deployment: ONNX, OpenVINO IR or an AOTInductor package.

An export is a directory holding the model file and ``memkd_export.json`` (``METADATA_FILE``). The
exported graph is the whole inference path of ``MemKD.predict``: input normalisation (``raw``
inputs), teacher, student with its memories, the anomaly map (per-stage cosine distance, bilinear
upsampling with align_corners=True, sum, the Gaussian blur with scipy's 'reflect' borders) and the
image score, plus the decision ``score > threshold`` when the checkpoint stores a threshold.

Inputs (``INPUT_KINDS``), both with a dynamic batch dimension and the model's fixed image size:

``raw``         uint8 RGB pixels [B, H, W, 3] (what Pillow and numpy give), already resized to the
                model's input size; the graph scales them to [0, 1] and normalises them with the
                model's mean and std.
``normalized``  float32 [B, 3, H, W], normalised as ``memkd.data`` does (what ``MemKD.predict`` takes).

Outputs: ``maps`` float32 [B, H, W], ``scores`` float32 [B] and, with a threshold, ``anomalous``
bool [B].

ONNX and OpenVINO files hold standard operators only: ``nr_recall`` and ``cosine_distance_map`` are
decomposed into ATen ops by their ``memkd.ops.reference`` implementations (``ONNX_DECOMPOSITIONS``),
and the anomaly map is traced from ``reference.anomaly_map``. The AOTI package keeps the memkd ops as
calls into the fused kernels (``memkd._C``), so loading it needs memkd's ops registered (``import
memkd.ops`` in Python; in C++ load ``memkd/_C*.so`` before the package).

The deployment side, which needs only numpy, Pillow and the chosen runtime, is ``memkd.deploy``.
"""
from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
from torch import nn

import memkd
from memkd import deploy
from memkd.models import MemKD, MemKDConfig
from memkd.ops import reference

PathLike = Union[str, os.PathLike]
FORMATS = deploy.FORMATS
INPUT_KINDS = deploy.INPUT_KINDS
METADATA_FILE = deploy.METADATA_FILE
FORMAT_VERSION = deploy.FORMAT_VERSION
SIGMA = 4.0  # MemKD.predict's default blur
EXTRA_INSTALL = 'pip install "memkd[export]"'
# Python modules each format needs at export time (the runtimes are checked by memkd.deploy).
EXPORT_MODULES = {"onnx": ("onnx", "onnxscript"), "openvino": ("onnx", "onnxscript", "openvino"), "aoti": ()}
ONNX_DECOMPOSITIONS = {
    torch.ops.memkd.nr_recall.default: reference.nr_recall,
    torch.ops.memkd.cosine_distance_map.default: reference.cosine_distance_map,
}
# The batch size the graphs are traced with; the exports take any batch size (dynamic dimension).
TRACE_BATCH = 2


class ExportError(ValueError):
    """An export cannot be made from what was given (the message names the argument or path)."""


class DeploymentModule(nn.Module):
    """``MemKD.predict`` as one traceable module: images -> (maps, scores[, anomalous]).

    input_kind: ``INPUT_KINDS`` (see the module doc). threshold: None for no decision output.
    fused_anomaly_map: call the ``memkd::anomaly_map`` op (AOTI keeps the fused kernel) or trace its
    reference implementation into standard ops (ONNX, OpenVINO).
    """

    def __init__(self, model: MemKD, input_kind: str = "raw", threshold: Optional[float] = None,
                 sigma: float = SIGMA, fused_anomaly_map: bool = True):
        super().__init__()
        if input_kind not in INPUT_KINDS:
            raise ExportError(f"input: expected one of {INPUT_KINDS}, got {input_kind!r}")
        self.model = model
        self.input_kind = input_kind
        self.threshold = None if threshold is None else fp32_threshold(threshold)
        self.sigma = float(sigma)
        self.fused_anomaly_map = fused_anomaly_map
        config = model.config
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor):
        if self.input_kind == "raw":
            # the order of memkd.data.transforms.image_to_tensor: scale to [0, 1], then normalise
            images = (images.permute(0, 3, 1, 2).to(torch.float32) / 255.0 - self.mean) / self.std
        student, teacher = self.model(images)
        student, teacher = [f.float() for f in student], [f.float() for f in teacher]
        size = list(images.shape[-2:])
        if self.fused_anomaly_map:
            maps, scores = torch.ops.memkd.anomaly_map(student, teacher, size, self.sigma)
        else:
            maps, scores = reference.anomaly_map(student, teacher, size, self.sigma)
        if self.threshold is None:
            return maps, scores
        return maps, scores, scores > self.threshold


def fp32_threshold(threshold: float) -> float:
    """The largest float32 value <= ``threshold``: for float32 scores, ``score > it`` in float32 is
    exactly ``score > threshold`` in float64, the comparison ``memkd predict`` makes (rounding to
    the nearest float32 could move the threshold onto a score)."""
    value = np.float32(threshold)
    if float(value) > threshold:
        value = np.nextafter(value, np.float32(-np.inf))
    return float(value)


def example_input(model: MemKD, input_kind: str, batch: int = TRACE_BATCH) -> torch.Tensor:
    """A random input of ``input_kind`` for ``model`` (see the module doc)."""
    height, width = model.config.image_size
    generator = torch.Generator().manual_seed(0)
    if input_kind == "raw":
        return torch.randint(0, 256, (batch, height, width, 3), dtype=torch.uint8, generator=generator)
    return torch.randn(batch, 3, height, width, generator=generator)


def export_program(model: MemKD, input_kind: str = "raw", threshold: Optional[float] = None, *,
                   fused_anomaly_map: bool = True, batch_size: Optional[int] = None) -> torch.export.ExportedProgram:
    """``torch.export`` of ``DeploymentModule`` on the CPU in eval mode; batch_size None: dynamic batch."""
    module = DeploymentModule(_frozen_cpu_copy(model), input_kind, threshold, fused_anomaly_map=fused_anomaly_map).eval()
    example = example_input(model, input_kind, batch_size or TRACE_BATCH)
    dynamic = None if batch_size else ({0: torch.export.Dim("batch", min=1)},)
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=dynamic)


def _frozen_cpu_copy(model: MemKD) -> MemKD:
    if not isinstance(model, MemKD):
        raise ExportError(f"model: expected a MemKD, got {type(model).__name__}")
    return copy.deepcopy(model).cpu().float().eval().requires_grad_(False)


def output_names(threshold: Optional[float]) -> list[str]:
    return ["maps", "scores"] + ([] if threshold is None else ["anomalous"])


def require_modules(fmt: str) -> None:
    """A one-line error naming the extra to install when a module ``fmt`` needs is missing."""
    if fmt not in FORMATS:
        raise ExportError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    for name in EXPORT_MODULES[fmt]:
        try:
            importlib.import_module(name)
        except ImportError:
            raise ExportError(f"format {fmt}: the Python package {name!r} is missing; install the export extra: {EXTRA_INSTALL}") from None


def write_onnx(model: MemKD, path: Path, input_kind: str, threshold: Optional[float]) -> dict[str, Any]:
    """The ONNX file of ``model`` (standard operators only, dynamic batch); returns facts for the metadata."""
    program = export_program(model, input_kind, threshold, fused_anomaly_map=False).run_decompositions(ONNX_DECOMPOSITIONS)
    leftover = sorted({str(n.target) for n in program.graph.nodes if str(n.target).startswith("memkd.")})
    if leftover:
        raise ExportError(f"model: memkd ops without an ONNX decomposition remain in the graph: {leftover}")
    onnx_program = torch.onnx.export(
        program, (example_input(model, input_kind),), dynamo=True, input_names=["images"],
        output_names=output_names(threshold), verbose=False,
    )
    onnx_program.save(str(path))
    opset = {entry.domain or "ai.onnx": entry.version for entry in onnx_program.model_proto.opset_import}
    return {"onnx_opset": opset.get("ai.onnx"), "onnx_version": importlib.import_module("onnx").__version__}


def write_openvino(model: MemKD, path: Path, input_kind: str, threshold: Optional[float]) -> dict[str, Any]:
    """OpenVINO IR (``path`` .xml with its .bin) converted from the ONNX export, weights kept in fp32."""
    import openvino

    onnx_path = path.with_suffix(".onnx")
    facts = write_onnx(model, onnx_path, input_kind, threshold)
    converted = openvino.convert_model(str(onnx_path))
    # save_model compresses weights to fp16 by default, which would change the scores
    openvino.save_model(converted, str(path), compress_to_fp16=False)
    onnx_path.unlink()
    return {**facts, "openvino_version": openvino.__version__}


def write_aoti(model: MemKD, path: Path, input_kind: str, threshold: Optional[float],
               batch_size: Optional[int] = None) -> dict[str, Any]:
    """An AOTInductor package of ``model`` with frozen weights, calling memkd's fused CPU kernels."""
    program = export_program(model, input_kind, threshold, fused_anomaly_map=True, batch_size=batch_size)
    # inductor freezes (folds BatchNorm, prepacks oneDNN convolution weights) only with grad disabled
    with torch.no_grad():
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs={"freezing": True})
    return {"needs": "memkd's ops registered before loading (import memkd.ops; in C++ load memkd/_C*.so)"}


WRITERS = {"onnx": (write_onnx, "model.onnx"), "openvino": (write_openvino, "model.xml"), "aoti": (write_aoti, "model.pt2")}


def threshold_metadata(extra: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """The decision threshold and how it was chosen, from a checkpoint's ``extra``."""
    extra = extra or {}
    value = extra.get("threshold")
    if value is None:
        return {"value": None, "note": "the checkpoint stores no decision threshold (run `memkd test`); the export gives scores only"}
    return {
        "value": float(value),
        "mode": extra.get("threshold_mode"),
        "rule": extra.get("threshold_rule", "anomalous if score > threshold"),
        "source": extra.get("threshold_source"),
    }


def refuse_tiled(config: MemKDConfig, where: Optional[PathLike] = None) -> None:
    """Tiled models (``MemKDConfig.tile_stride``) cannot be exported yet: an export takes one
    image_size input, while a tiled model stitches many tiles of an image of any size."""
    if config.tiled:
        source = f"{where} holds a tiled model" if where is not None else "the model is tiled"
        raise ExportError(
            f"run_dir: {source} (tile_stride {list(config.tile_stride)}); tiled models cannot be exported yet, "
            "score with `memkd predict CHECKPOINT` instead"
        )


def export_model(model: MemKD, out: PathLike, fmt: str, *, input_kind: str = "raw",
                 extra: Optional[Mapping[str, Any]] = None, checkpoint: Optional[Mapping[str, Any]] = None) -> Path:
    """Export ``model`` to the directory ``out`` in format ``fmt`` (``FORMATS``) and return it.

    extra: the checkpoint's ``extra`` (threshold, threshold mode and source, heatmap range).
    The export is written to a temporary directory beside ``out`` and moved into place; an
    existing export at ``out`` is replaced, any other existing non-empty ``out`` is refused.
    """
    refuse_tiled(model.config)
    require_modules(fmt)
    if input_kind not in INPUT_KINDS:
        raise ExportError(f"input: expected one of {', '.join(INPUT_KINDS)}, got {input_kind!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / METADATA_FILE).is_file())):
        raise ExportError(f"out: {out} exists and is not a memkd export directory; choose a new or empty folder")
    threshold = threshold_metadata(extra)
    writer, model_file = WRITERS[fmt]
    config = model.config
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        started = time.perf_counter()
        facts = writer(model, staging / model_file, input_kind, threshold["value"])
        height, width = config.image_size
        metadata = {
            "format": deploy.FORMAT,
            "format_version": FORMAT_VERSION,
            "model_format": fmt,
            "model_file": model_file,
            "method": config.method,
            "backbone": config.backbone,
            "weights": config.weights,
            "input": deploy.input_description(input_kind, height, width),
            "image_size": [height, width],
            "mean": list(config.mean),
            "std": list(config.std),
            "dynamic_batch": True,
            "outputs": output_names(threshold["value"]),
            "anomaly_map": {"sigma": SIGMA, "truncate": reference.GAUSSIAN_TRUNCATE, "blur_borders": "reflect (scipy)",
                            "upsampling": "bilinear, align_corners=True", "score": "max of the map"},
            "threshold": threshold,
            "heatmap_range": (extra or {}).get("heatmap_range"),
            "checkpoint": dict(checkpoint or {}),
            "memkd_version": memkd.__version__,
            "torch_version": torch.__version__,
            "export_seconds": round(time.perf_counter() - started, 3),
            **facts,
        }
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished ``staging`` onto ``out``; an old export there is moved aside first and
    deleted only once the new one is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_run(run_dir: PathLike, fmt: str, out: PathLike, *, input_kind: str = "raw") -> Path:
    """``memkd export``: export the checkpoint in ``run_dir`` (a directory or a file in it) with its
    stored threshold; returns the export directory."""
    from memkd.train import load_checkpoint, read_header
    from memkd.train.checkpoint import CONFIG_FILE, checkpoint_directory

    directory = checkpoint_directory(run_dir)
    if not directory.exists():
        raise FileNotFoundError(f"run_dir: no such file or directory: {directory}")
    if not (directory / CONFIG_FILE).is_file():
        raise ExportError(f"run_dir: {directory} holds no memkd checkpoint (no {CONFIG_FILE}); pass the directory `memkd train --out` wrote")
    refuse_tiled(MemKDConfig.from_dict(read_header(directory)["config"]), directory)
    require_modules(fmt)
    checkpoint = load_checkpoint(directory, device="cpu")
    facts = {"directory": str(directory.resolve()), "epoch": checkpoint.epoch, "step": checkpoint.step,
             "memkd_version": checkpoint.memkd_version}
    return export_model(checkpoint.model, out, fmt, input_kind=input_kind, extra=checkpoint.extra, checkpoint=facts)


def predict_with_export(export_dir: PathLike, inputs, out_dir: PathLike, threshold: Optional[float] = None, *,
                        batch_size: int = 16, progress: bool = True, csv_name: str = "predictions.csv"):
    """``memkd predict EXPORT_DIR``: score image files with an export (``memkd.deploy.Inferencer``) and
    write the same ``<name>_heatmap.png`` figures and CSV as ``pipeline.predict_images`` does with
    a checkpoint (the output folder locked meanwhile). threshold: None takes the export's.
    Returns (csv path, rows, threshold used)."""
    from memkd.files import folder_lock
    from memkd.pipeline import collect_images

    inferencer = deploy.Inferencer(export_dir)
    files = collect_images(inputs)  # before anything is written: a missing path fails here
    threshold = inferencer.threshold if threshold is None else float(threshold)
    if threshold is None:
        raise ExportError(f"{export_dir}: the export has no decision threshold (its checkpoint had none); pass --threshold")
    with folder_lock(out_dir):
        csv_path, rows = _predict_files_with_export(inferencer, files, Path(out_dir), threshold, batch_size, progress, csv_name)
    return csv_path, rows, threshold


def _predict_files_with_export(inferencer, files, out_dir: Path, threshold: float, batch_size: int, progress: bool,
                               csv_name: str):
    from tqdm import tqdm

    from memkd.images import ImageReadError, read_rgb, resized_pixels
    from memkd.reports import prediction_row, write_prediction_figure, write_predictions_csv

    heatmap_range = inferencer.metadata.get("heatmap_range")
    rows: list[dict[str, Any]] = []
    for start in tqdm(range(0, len(files), batch_size), desc="predict", unit="batch", disable=not progress):
        chunk = files[start:start + batch_size]
        originals, errors = [], {}
        for index, (path, _) in enumerate(chunk):
            try:
                originals.append(read_rgb(path))
            except ImageReadError as error:
                originals.append(None)
                errors[index] = str(error)
        readable = [image for image in originals if image is not None]
        result = None
        if readable:
            pixels = np.stack([resized_pixels(image, inferencer.image_size) for image in readable])
            result = inferencer.predict(inferencer.model_input(pixels))
        position = 0
        for index, ((path, name), original) in enumerate(zip(chunk, originals)):
            if original is None:
                rows.append(prediction_row(path, None, threshold, "", errors[index]))
                continue
            amap, score = result.maps[position], float(result.scores[position])
            position += 1
            heatmap = f"{name}_heatmap.png"
            write_prediction_figure(out_dir / heatmap, np.asarray(original), amap, score, threshold, Path(path).name, heatmap_range)
            rows.append(prediction_row(path, score, threshold, heatmap, ""))
    return write_predictions_csv(out_dir / csv_name, rows), rows
