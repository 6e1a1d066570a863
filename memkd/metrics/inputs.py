"""Validation of metric inputs: every check raises a ValueError naming the argument."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]


class MetricUndefinedWarning(UserWarning):
    """A metric is undefined for the data given (e.g. no anomalous image) and reads NaN."""


def undefined(metric: str, reason: str) -> float:
    warnings.warn(f"{metric} is undefined ({reason}); returning NaN", MetricUndefinedWarning, stacklevel=3)
    return float("nan")


def to_numpy(values, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.dtype in (torch.float16, torch.bfloat16):
            values = values.float()
        return values.numpy()
    try:
        return np.asarray(values)
    except ValueError as error:  # ragged nested sequences
        raise ValueError(f"{name}: cannot be read as an array: {error}") from error


def check_scores(values: np.ndarray, name: str) -> np.ndarray:
    """Finite float scores; float32 and float64 are kept as they are (no rounding into new ties)."""
    if values.dtype.kind not in "fiub":
        raise ValueError(f"{name}: expected numbers, got dtype {values.dtype}")
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return values


def check_binary(values: np.ndarray, name: str) -> np.ndarray:
    """Binary values (bool, or numbers that are all 0 or 1) as bool."""
    if values.dtype == bool:
        return values
    if values.dtype.kind not in "fiu" or not ((values == 0) | (values == 1)).all():
        raise ValueError(f"{name}: expected binary values (0/1 or bool), got values {np.unique(values)[:5]}...")
    return values.astype(bool)


def image_inputs(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """1-D scores and bool labels of the same non-zero length."""
    scores = check_scores(to_numpy(scores, "image_scores"), "image_scores")
    labels = to_numpy(labels, "image_labels")
    if scores.ndim != 1 or labels.ndim != 1:
        raise ValueError(f"image_scores, image_labels: expected 1-D, got shapes {scores.shape} and {labels.shape}")
    if len(scores) != len(labels):
        raise ValueError(f"image_scores has {len(scores)} entries but image_labels {len(labels)}")
    if len(scores) == 0:
        raise ValueError("image_scores: empty")
    return scores, check_binary(labels, "image_labels")


@dataclass
class PixelData:
    """All test pixels of a category, flattened image after image."""

    scores: np.ndarray  # float32 or float64 [P]
    masks: np.ndarray  # bool [P]
    shapes: list[tuple[int, int]]  # (H, W) of each image, in order


def per_image_arrays(values: ArrayLike, name: str):
    """A stack [N, H, W] / [N, 1, H, W] as one 3-D array, or a sequence of [H, W] / [1, H, W] images
    (sizes may differ) as a list of 2-D arrays."""
    if isinstance(values, (list, tuple)):
        images = [to_numpy(image, f"{name}[{i}]") for i, image in enumerate(values)]
        images = [image[0] if image.ndim == 3 and image.shape[0] == 1 else image for image in images]
        if not images or any(image.ndim != 2 for image in images):
            raise ValueError(f"{name}: expected a non-empty sequence of [H, W] or [1, H, W] images")
        return images
    stack = to_numpy(values, name)
    if stack.ndim == 4 and stack.shape[1] == 1:
        stack = stack[:, 0]
    if stack.ndim != 3 or stack.shape[0] == 0:
        raise ValueError(f"{name}: expected [N, H, W] or [N, 1, H, W] with N > 0, got shape {stack.shape}")
    return stack


def pixel_inputs(maps: ArrayLike, masks: ArrayLike) -> PixelData:
    """Anomaly maps and ground-truth masks of the same images and the same sizes."""
    maps = per_image_arrays(maps, "maps")
    masks = per_image_arrays(masks, "masks")
    if len(maps) != len(masks):
        raise ValueError(f"maps has {len(maps)} images but masks {len(masks)}")
    shapes = [tuple(image.shape) for image in maps]
    mask_shapes = [tuple(image.shape) for image in masks]
    if shapes != mask_shapes:
        index = next(i for i, (a, b) in enumerate(zip(shapes, mask_shapes)) if a != b)
        raise ValueError(
            f"image {index}: map is {shapes[index]} but mask is {mask_shapes[index]} "
            "(resize the maps to the masks first, see resize_maps_to_masks)"
        )
    if isinstance(maps, np.ndarray) and isinstance(masks, np.ndarray):
        flat_scores, flat_masks = maps.reshape(-1), masks.reshape(-1)
    else:  # a sequence of images on either side, or both
        flat_scores = np.concatenate([image.ravel() for image in maps])
        flat_masks = np.concatenate([image.ravel() for image in masks])
    return PixelData(check_scores(flat_scores, "maps"), check_binary(flat_masks, "masks"), shapes)
