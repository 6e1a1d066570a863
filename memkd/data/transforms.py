"""Reading images and masks, and turning them into model inputs.

As in RD4AD (the reference for what the MemKD paper leaves out): images are resized to
``image_size`` with PIL bilinear (antialiased when shrinking), scaled to [0, 1] and normalised with
the ImageNet mean and std; no augmentation. Masks are binarised at native resolution (any non-zero
pixel is anomalous: MVTec stores 255, VisA stores defect indices 1, 2, ...), resized with PIL bilinear
and thresholded at 0.5 (RD4AD's ``gt > 0.5``), giving uint8 {0, 1}.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

from memkd.data.errors import DatasetError
from memkd.images import ImageReadError, normalized_pixels, read_rgb, resized_pixels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageSize = Union[int, Sequence[int]]


def as_size(image_size: ImageSize) -> tuple[int, int]:
    """``image_size`` as (height, width): an int means a square."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"image_size: expected a positive int or (height, width), got {image_size!r}")
    return size


def read_image(path: Path) -> Image.Image:
    """The image at ``path`` as an RGB PIL image (grayscale is replicated to three channels)."""
    try:
        return read_rgb(path)
    except ImageReadError as error:
        raise DatasetError(str(error)) from error


def read_mask(path: Path) -> np.ndarray:
    """The mask at ``path`` as a bool [H, W] array: True where any (colour) channel is non-zero."""
    try:
        with Image.open(path) as mask:
            values = np.asarray(mask)
    except (OSError, ValueError) as error:
        raise DatasetError(f"cannot read mask {path}: {error}") from error
    if values.ndim == 3:
        values = values[..., :3].max(axis=-1)  # an alpha channel is not a defect
    return values > 0


def _normalized_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 RGB pixels [H, W, 3] as a normalised float32 [3, H, W] tensor."""
    normalized = normalized_pixels(pixels, IMAGENET_MEAN, IMAGENET_STD)
    return torch.from_numpy(np.ascontiguousarray(normalized.transpose(2, 0, 1)))


def image_to_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """An RGB PIL image as a normalised float32 [3, H, W] tensor of the given (height, width)."""
    return _normalized_tensor(resized_pixels(image, size))


def full_resolution_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image at its own resolution as a normalised float32 [3, H, W] tensor (no resize:
    the input of tiled models, ``memkd.tiling``)."""
    return _normalized_tensor(np.asarray(image, dtype=np.uint8))


def mask_to_tensor(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """A bool [h, w] mask as a uint8 {0, 1} [1, H, W] tensor: bilinear resize, then > 0.5."""
    height, width = size
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.BILINEAR)
    # uint8 > 127 is exactly RD4AD's value / 255 > 0.5.
    return torch.from_numpy((np.asarray(resized) > 127).astype(np.uint8))[None]
