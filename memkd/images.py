"""Reading image files into RGB pixels at a model's input size, with Pillow and numpy only.

``memkd.data`` (training and testing) and ``memkd.deploy`` (exported models, no torch) share these,
so that an exported model sees exactly the pixels the trained one saw: PIL bilinear resizing
(antialiased when shrinking) of the 8-bit RGB image, as in RD4AD.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

# PIL modes that convert("RGB") maps faithfully; 16-bit grayscale is rescaled by hand.
RGB_CONVERTIBLE_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L"}


class ImageReadError(ValueError):
    """An image file cannot be read or has an unsupported mode; the message names the path."""


def read_rgb(path: Union[str, Path]) -> Image.Image:
    """The image at ``path`` as an RGB PIL image (grayscale is replicated to three channels)."""
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, ValueError) as error:
        raise ImageReadError(f"cannot read image {path}: {error}") from error
    if image.mode in SIXTEEN_BIT_MODES:
        eight_bit = (np.asarray(image, dtype=np.float32) * (255.0 / 65535.0)).round().astype(np.uint8)
        image = Image.fromarray(eight_bit)
    elif image.mode not in RGB_CONVERTIBLE_MODES:
        raise ImageReadError(f"unsupported image mode {image.mode!r} in {path}")
    return image.convert("RGB")


def resized_pixels(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """An RGB PIL image resized to (height, width) with PIL bilinear: uint8 [H, W, 3]."""
    height, width = size
    return np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.uint8)


def normalized_pixels(pixels: np.ndarray, mean, std) -> np.ndarray:
    """uint8 [..., H, W, 3] pixels scaled to [0, 1] and normalised per channel: float32 [..., H, W, 3]."""
    scaled = np.asarray(pixels, dtype=np.float32) / 255.0
    return (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
