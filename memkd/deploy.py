"""Running an exported memkd model (``memkd export``) with only numpy, Pillow and its runtime.

    from memkd.deploy import Inferencer
    inferencer = Inferencer("export_dir")           # onnxruntime, OpenVINO or AOTI, from the metadata
    result = inferencer.predict_files(["a.png"])    # maps [B, H, W], scores [B], anomalous [B] or None
    result = inferencer.predict(pixels)             # uint8 [B, H, W, 3] ("raw" exports) or
                                                    # normalised float32 [B, 3, H, W] ("normalized")

ONNX and OpenVINO exports run without torch (this module imports none); an AOTI package needs
torch and memkd's ops. Files are read and resized exactly as ``memkd.data`` does (``memkd.images``).
``anomalous`` is ``score > threshold`` with the threshold stored at export; it is None when the
checkpoint had none (scores only).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from memkd.images import normalized_pixels, read_rgb, resized_pixels

FORMAT = "memkd-export"
FORMAT_VERSION = 1
FORMATS = ("onnx", "openvino", "aoti")
INPUT_KINDS = ("raw", "normalized")
METADATA_FILE = "memkd_export.json"
RUNTIME_MODULES = {"onnx": "onnxruntime", "openvino": "openvino", "aoti": "torch"}

PathLike = Union[str, os.PathLike]


class DeployError(ValueError):
    """An export directory or an input cannot be used; the message names the path or argument."""


def input_description(input_kind: str, height: int, width: int) -> dict[str, Any]:
    """What the exported model's ``images`` input is (stored in the metadata)."""
    if input_kind == "raw":
        return {"name": "images", "kind": "raw", "dtype": "uint8", "shape": ["batch", height, width, 3], "layout": "NHWC",
                "description": "RGB pixels 0-255 resized to the input size (PIL bilinear); normalisation is in the model"}
    return {"name": "images", "kind": "normalized", "dtype": "float32", "shape": ["batch", 3, height, width], "layout": "NCHW",
            "description": "RGB scaled to [0, 1], then (x - mean) / std per channel, as memkd.data does"}


def is_export_dir(path: PathLike) -> bool:
    return (Path(path) / METADATA_FILE).is_file()


def read_metadata(export_dir: PathLike) -> dict[str, Any]:
    """The metadata of an export directory, checked to be of a format version this memkd reads."""
    directory = Path(export_dir)
    path = directory / METADATA_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"export_dir: no such directory: {directory}")
    if not path.is_file():
        raise DeployError(f"export_dir: {directory} is not a memkd export (no {METADATA_FILE}); create one with `memkd export`")
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DeployError(f"export_dir: cannot read {path}: {error}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise DeployError(f"export_dir: {path} is not memkd export metadata")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise DeployError(
            f"export_dir: {path} has export format version {metadata.get('format_version')!r}, this memkd reads version "
            f"{FORMAT_VERSION}; export the checkpoint again with this memkd"
        )
    if metadata.get("model_format") not in FORMATS:
        raise DeployError(f"export_dir: {path} names an unknown model format {metadata.get('model_format')!r}")
    return metadata


@dataclass
class Prediction:
    """Anomaly maps [B, H, W] float32, image scores [B] float32, and the decisions [B] bool (None
    when the export has no threshold)."""

    maps: np.ndarray
    scores: np.ndarray
    anomalous: Optional[np.ndarray]


class _OnnxRuntime:
    def __init__(self, path: Path, threads: Optional[int]):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, images: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {"images": images})


class _OpenVinoRuntime:
    def __init__(self, path: Path, threads: Optional[int]):
        import openvino

        # fp32 explicitly: on CPUs with bf16 support OpenVINO otherwise infers in bf16
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.model = openvino.Core().compile_model(str(path), "CPU", config)

    def __call__(self, images: np.ndarray) -> list[np.ndarray]:
        result = self.model(images)
        return [np.asarray(result[output]) for output in self.model.outputs]


class _AotiRuntime:
    def __init__(self, path: Path, threads: Optional[int]):
        import torch

        import memkd.ops  # noqa: F401  registers the memkd ops the package calls

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = torch._inductor.aoti_load_package(str(path))

    def __call__(self, images: np.ndarray) -> list[np.ndarray]:
        with self.torch.inference_mode():
            return [t.numpy() for t in self.model(self.torch.from_numpy(images))]


RUNTIMES = {"onnx": _OnnxRuntime, "openvino": _OpenVinoRuntime, "aoti": _AotiRuntime}


class Inferencer:
    """Loads an export directory and scores images with its runtime (see the module doc).

    threads: the runtime's intra-op threads (None: its default).
    """

    def __init__(self, export_dir: PathLike, threads: Optional[int] = None):
        self.directory = Path(export_dir)
        self.metadata = read_metadata(self.directory)
        fmt = self.metadata["model_format"]
        model_path = self.directory / self.metadata["model_file"]
        if not model_path.is_file():
            raise DeployError(f"export_dir: {model_path} is missing; the export is incomplete")
        try:
            self._run = RUNTIMES[fmt](model_path, threads)
        except ImportError as error:
            raise DeployError(
                f"export_dir: a {fmt} export needs the {RUNTIME_MODULES[fmt]!r} runtime, which is missing ({error}); "
                'install it, e.g. pip install "memkd[export]"'
            ) from None
        self.input_kind = self.metadata["input"]["kind"]
        self.image_size = tuple(self.metadata["image_size"])
        self.threshold: Optional[float] = self.metadata["threshold"]["value"]

    def pixels(self, path: PathLike) -> np.ndarray:
        """The file at ``path`` as the uint8 [H, W, 3] pixels at the model's input size (memkd.data's resizing)."""
        return resized_pixels(read_rgb(path), self.image_size)

    def model_input(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] pixels at the input size as this export's input (see ``input_description``)."""
        if self.input_kind == "raw":
            return np.ascontiguousarray(pixels, dtype=np.uint8)
        normalized = normalized_pixels(pixels, self.metadata["mean"], self.metadata["std"])
        return np.ascontiguousarray(normalized.transpose(0, 3, 1, 2))

    def predict(self, images: np.ndarray) -> Prediction:
        """Score a batch in this export's input format (``metadata["input"]``); one image without
        the batch dimension is accepted too."""
        images = self._check_input(np.asarray(images))
        outputs = self._run(images)
        maps, scores = outputs[0], outputs[1]
        anomalous = outputs[2].astype(bool) if self.threshold is not None else None
        return Prediction(maps, scores, anomalous)

    def predict_files(self, paths: Sequence[PathLike]) -> Prediction:
        """Read, resize and score image files in one batch (``ImageReadError`` names a bad file)."""
        if not paths:
            raise DeployError("paths: expected at least one image file")
        return self.predict(self.model_input(np.stack([self.pixels(p) for p in paths])))

    def _check_input(self, images: np.ndarray) -> np.ndarray:
        height, width = self.image_size
        if self.input_kind == "raw":
            dtype, shape, layout = np.uint8, (height, width, 3), "[B, H, W, 3] uint8 RGB"
        else:
            dtype, shape, layout = np.float32, (3, height, width), "[B, 3, H, W] float32 normalised"
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or tuple(images.shape[1:]) != shape or images.shape[0] == 0:
            raise DeployError(
                f"images: this export takes {layout} at its input size {height}x{width} (got shape {tuple(images.shape)}); "
                "resize the images first (Inferencer.pixels does)"
            )
        if images.dtype != dtype:
            if self.input_kind == "raw":
                raise DeployError(f"images: this export takes uint8 pixels 0-255, got {images.dtype}")
            images = images.astype(np.float32)
        return np.ascontiguousarray(images)
