"""Synthetic defects on real photographs: the dataset of ``memkd demo``.

An MVTec-layout dataset built from the texture photographs that ship with scikit-image
(``skimage.data``: brick, grass, gravel; 512x512 grayscale, made RGB). Normal images are random
crops (``crop`` pixels, resized to ``image_size``); the left part of each photograph (x < 320 of
512, ``TRAIN_REGION``) feeds the training crops and the right part the test crops, so no test pixel
was seen in training. Defective test crops get one synthetic defect with an exact mask
(``ground_truth/<defect>/<name>_mask.png``):

- ``patch``: a piece of another texture pasted in a random rotated rectangle or ellipse;
- ``scratch``: a thin bright or dark polyline (the mask is the drawn line);
- ``stain``: a blurred dark brown blob (the mask is where its opacity reaches half its peak).

Everything is seeded: the same settings and seed write the same images.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

TEXTURES = ("brick", "grass", "gravel")
DEFECTS = ("patch", "scratch", "stain")
TRAIN_REGION = 320  # of 512 columns: training crops come from x < 320, test crops from x >= 320


class DatasetSettings(Protocol):
    """The sizes ``make_dataset`` reads (``memkd.demo.DemoSettings`` has them)."""

    categories: tuple[str, ...]  # textures, one dataset category each
    image_size: int
    crop: int  # pixels of the 512x512 photograph per image, resized to image_size
    train_images: int
    test_good: int
    test_per_defect: int


def available_textures() -> dict[str, np.ndarray]:
    """The texture photographs of skimage.data present in this version, as uint8 [512, 512]."""
    import skimage.data

    found = {}
    for name in TEXTURES:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            continue
        try:
            pixels = np.asarray(loader())
        except Exception:  # a data file missing from this installation
            continue
        if pixels.ndim == 3:
            pixels = pixels[..., :3].mean(axis=2)
        found[name] = pixels.astype(np.uint8)
    return found


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _crop(texture: np.ndarray, crop: int, size: int, rng: np.random.Generator, train: bool) -> np.ndarray:
    """A random crop x crop window from the training (left) or test (right) part of the texture,
    resized to size x size (PIL bilinear, antialiased)."""
    height, width = texture.shape[:2]
    x_low, x_high = (0, TRAIN_REGION - crop) if train else (TRAIN_REGION, width - crop)
    x = int(rng.integers(x_low, x_high + 1))
    y = int(rng.integers(0, height - crop + 1))
    window = texture[y : y + crop, x : x + crop]
    if crop == size:
        return window
    return np.asarray(Image.fromarray(window).resize((size, size), Image.BILINEAR))


def _shape_mask(size: int, rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    """A random rotated rectangle or ellipse (side lengths low..high of ``size``) as bool [size, size]."""
    canvas = Image.new("L", (size * 2, size * 2), 0)
    draw = ImageDraw.Draw(canvas)
    w, h = (rng.uniform(low, high, 2) * size * 2).tolist()
    cx, cy = size, size
    box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=255)
    canvas = canvas.rotate(float(rng.uniform(0, 180)), resample=Image.NEAREST)
    shape = np.asarray(canvas.resize((size, size), Image.NEAREST)) > 0
    ys, xs = np.nonzero(shape)
    shape = shape[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    out = np.zeros((size, size), bool)
    oy = int(rng.integers(0, size - shape.shape[0] + 1))
    ox = int(rng.integers(0, size - shape.shape[1] + 1))
    out[oy : oy + shape.shape[0], ox : ox + shape.shape[1]] = shape
    return out


def add_patch(image: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paste a piece of another texture (crop ``other``, same size) in a random shape."""
    size = image.shape[0]
    mask = _shape_mask(size, rng, 0.15, 0.3)
    out = image.copy()
    out[mask] = other[mask]
    return out, mask


def add_scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin bright or dark polyline of 2-3 segments; the mask is exactly the drawn pixels."""
    size = image.shape[0]
    margin = size * 0.15
    points = [tuple(rng.uniform(margin, size - margin, 2).tolist())]
    for _ in range(int(rng.integers(2, 4))):
        angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.15, 0.35) * size
        x, y = points[-1]
        points.append((float(np.clip(x + length * math.cos(angle), 0, size - 1)), float(np.clip(y + length * math.sin(angle), 0, size - 1))))
    width = max(1, int(round(size / 64 * rng.uniform(1.5, 2.5))))
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).line(points, fill=255, width=width, joint="curve")
    mask = np.asarray(canvas) > 0
    value = rng.uniform(225, 255) if rng.random() < 0.5 else rng.uniform(0, 30)
    out = image.astype(np.float32)
    out[mask] = value
    return out.round().astype(np.uint8), mask


def add_stain(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A blurred dark brown blob (2-4 overlapping ellipses); the mask is opacity >= half its peak."""
    size = image.shape[0]
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = rng.uniform(0.3, 0.7, 2) * size
    for _ in range(int(rng.integers(2, 5))):
        rx, ry = rng.uniform(0.05, 0.12, 2) * size
        dx, dy = rng.normal(0, 0.06, 2) * size
        draw.ellipse([cx + dx - rx, cy + dy - ry, cx + dx + rx, cy + dy + ry], fill=255)
    blurred = np.asarray(canvas.filter(ImageFilter.GaussianBlur(radius=size / 40)), np.float32) / 255.0
    peak = float(rng.uniform(0.55, 0.8))
    alpha = blurred * peak
    colour = np.asarray([70.0, 45.0, 25.0], np.float32) * float(rng.uniform(0.6, 1.0))
    out = image.astype(np.float32) * (1 - alpha[..., None]) + colour * alpha[..., None]
    return out.round().astype(np.uint8), blurred >= 0.5


def make_dataset(root: Path, settings: DatasetSettings, seed: int = 0, progress: bool = True) -> dict[str, dict[str, int]]:
    """Write the MVTec-layout demo dataset under ``root`` (one folder per texture); returns counts."""
    textures = available_textures()
    missing = [c for c in settings.categories if c not in textures]
    if missing:
        raise RuntimeError(f"demo: scikit-image lacks the texture(s) {missing}; available: {sorted(textures)}")
    if len(textures) < 2:
        raise RuntimeError("demo: needs at least two skimage.data textures (patches come from another texture)")
    size = settings.image_size
    total = len(settings.categories) * (settings.train_images + settings.test_good + settings.test_per_defect * len(DEFECTS))
    bar = tqdm(total=total, desc="demo data", unit="image", disable=not progress, leave=False)
    counts = {}
    for index, category in enumerate(settings.categories):
        rng = np.random.default_rng([seed, index])
        texture = textures[category]
        others = [t for name, t in sorted(textures.items()) if name != category]
        base = root / category

        def save(rel: str, pixels: np.ndarray) -> None:
            path = base / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
            bar.update(1 if not rel.startswith("ground_truth") else 0)

        for i in range(settings.train_images):
            save(f"train/good/{i:03d}.png", _rgb(_crop(texture, settings.crop, size, rng, train=True)))
        for i in range(settings.test_good):
            save(f"test/good/{i:03d}.png", _rgb(_crop(texture, settings.crop, size, rng, train=False)))
        for defect in DEFECTS:
            for i in range(settings.test_per_defect):
                image = _rgb(_crop(texture, settings.crop, size, rng, train=False))
                if defect == "patch":
                    other = others[int(rng.integers(len(others)))]
                    image, mask = add_patch(image, _rgb(_crop(other, settings.crop, size, rng, train=False)), rng)
                elif defect == "scratch":
                    image, mask = add_scratch(image, rng)
                else:
                    image, mask = add_stain(image, rng)
                save(f"test/{defect}/{i:03d}.png", image)
                save(f"ground_truth/{defect}/{i:03d}_mask.png", mask.astype(np.uint8) * 255)
        counts[category] = {
            "train": settings.train_images,
            "test_good": settings.test_good,
            "test_defective": settings.test_per_defect * len(DEFECTS),
        }
    bar.close()
    return counts
