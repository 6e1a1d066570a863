"""Drawing anomaly maps: colours, overlays and the matplotlib figures memkd writes.

Heatmaps: an anomaly map is shown with the "jet" colour map over a fixed value range
(``vmin``, ``vmax``) shared by all images of a category, so that colours compare across images;
overlays blend it with the image at ``alpha`` 0.5. Every figure explains itself: a title with the
image, its score, the threshold and the decision, and a colour bar saying what its scale is.
Saving the figures is ``memkd.reports``' job.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np


def denormalize(image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised [3, H, W] tensor or array back to uint8 [H, W, 3]."""
    pixels = np.asarray(image, dtype=np.float32).transpose(1, 2, 0)
    pixels = pixels * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return (np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def heatmap_range(maps: np.ndarray, scores: Optional[np.ndarray] = None) -> tuple[float, float]:
    """A shared colour range for the maps of a category: from their 1st percentile to the highest
    image score (the maximum of the maps)."""
    maps = np.asarray(maps, dtype=np.float32)
    low = float(np.percentile(maps[:: max(1, len(maps) // 64)], 1.0)) if maps.size else 0.0
    high = float(np.max(scores)) if scores is not None and len(scores) else float(maps.max(initial=low))
    if not high > low:
        high = low + 1e-6
    return low, high


def colorize(amap: np.ndarray, vmin: float, vmax: float, cmap: str = "jet") -> np.ndarray:
    """An [H, W] map as uint8 [H, W, 3] colours of ``cmap`` over [vmin, vmax]."""
    import matplotlib

    scaled = np.clip((np.asarray(amap, np.float32) - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    rgba = matplotlib.colormaps[cmap](scaled, bytes=True)
    return rgba[..., :3]


def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An [h, w] float map resized bilinearly to (height, width)."""
    from PIL import Image

    amap = np.asarray(amap, np.float32)
    if amap.shape == tuple(size):
        return amap
    return np.asarray(Image.fromarray(amap, mode="F").resize((size[1], size[0]), Image.BILINEAR), dtype=np.float32)


def overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """The map's colours blended over a uint8 [H, W, 3] image (the map is resized to the image)."""
    amap = resize_map(amap, image.shape[:2])
    colours = colorize(amap, vmin, vmax).astype(np.float32)
    return (alpha * colours + (1.0 - alpha) * image.astype(np.float32) + 0.5).astype(np.uint8)


MIN_PICTURE_SIDE = 256  # pixels: smaller images are enlarged for figures
THRESHOLD_COLOUR = "white"


def enlarge(image: np.ndarray, min_side: int = MIN_PICTURE_SIDE) -> np.ndarray:
    """A uint8 [H, W, 3] image enlarged by a whole factor (nearest neighbour, pixels stay visible)
    until its shorter side is at least ``min_side``; larger images as they are."""
    from PIL import Image

    height, width = image.shape[:2]
    factor = math.ceil(min_side / min(height, width))
    if factor <= 1:
        return image
    return np.asarray(Image.fromarray(image).resize((width * factor, height * factor), Image.NEAREST))


def decision_text(score: float, threshold: float) -> str:
    """The decision with its rule spelt out: ``anomalous, score 1.2 > threshold 0.8`` (or ``normal``
    with ``<=``)."""
    if score > threshold:
        return f"anomalous, score {score:.4g} > threshold {threshold:.4g}"
    return f"normal, score {score:.4g} <= threshold {threshold:.4g}"


def add_colour_bar(figure, axis, vrange: tuple[float, float], threshold: Optional[float], label: str, fontsize: int = 8):
    """A colour bar beside ``axis`` for the heatmap colours over ``vrange``, with the threshold
    marked (a white line, when it lies inside the range)."""
    import matplotlib

    norm = matplotlib.colors.Normalize(vmin=vrange[0], vmax=vrange[1])
    bar = figure.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap="jet"), ax=axis, fraction=0.046, pad=0.03)
    bar.ax.tick_params(labelsize=fontsize - 1)
    if threshold is not None and vrange[0] < threshold < vrange[1]:
        bar.ax.axhline(threshold, color=THRESHOLD_COLOUR, linewidth=2)
        label += "; white line: threshold"
    bar.set_label(label, fontsize=fontsize)
    return bar


def _outline(axis, amap: np.ndarray, threshold: Optional[float]) -> None:
    """Outline where the map exceeds the threshold."""
    if threshold is not None and amap.max() > threshold > amap.min():
        axis.contour(amap, levels=[threshold], colors=THRESHOLD_COLOUR, linewidths=0.8)


def _bare(axis) -> None:
    axis.set_xticks([])
    axis.set_yticks([])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def prediction_figure(
    image: np.ndarray, amap: np.ndarray, vrange: tuple[float, float], threshold: float, name: str, score: float,
    scale_note: str,
):
    """What ``memkd predict`` draws for one image: the image and its heatmap overlay (where the map
    exceeds the threshold outlined), enlarged to at least ``MIN_PICTURE_SIDE`` pixels, titled with
    the name, score, threshold and decision, with a colour bar over ``vrange``; ``scale_note`` says
    where the scale comes from."""
    plt = _pyplot()
    image = enlarge(image)
    amap = resize_map(amap, image.shape[:2])
    figure, axes = plt.subplots(1, 2, figsize=(9.0, 4.6), layout="constrained")
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(overlay(image, amap, *vrange))
    _outline(axes[1], amap, threshold)
    axes[1].set_title("anomaly map over the image (outline: above the threshold)", fontsize=9)
    for axis in axes:
        _bare(axis)
    add_colour_bar(figure, axes[1], vrange, threshold, "anomaly map value (score = its maximum)")
    figure.suptitle(f"{name}: {decision_text(score, threshold)}", fontsize=11, weight="bold")
    figure.get_layout_engine().set(h_pad=0.1)
    figure.supxlabel(scale_note, fontsize=8)
    return figure


def mask_image(mask: Optional[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """A binary mask as a white-on-black uint8 [H, W, 3] image (all black without a mask)."""
    if mask is None:
        return np.zeros((*shape, 3), np.uint8)
    gray = (np.asarray(mask).reshape(shape) > 0).astype(np.uint8) * 255
    return np.repeat(gray[..., None], 3, axis=2)


def sample_figure(
    image: np.ndarray,
    mask: Optional[np.ndarray],
    amap: np.ndarray,
    vrange: tuple[float, float],
    title: str,
    threshold: Optional[float] = None,
):
    """Image, ground truth and heatmap overlay side by side (a matplotlib figure), with a colour bar
    over ``vrange``. With a ``threshold`` the overlay outlines where the map exceeds it."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(10.4, 3.8), layout="constrained")
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(mask_image(mask, image.shape[:2]))
    axes[1].set_title("ground truth" if mask is not None else "ground truth (none)")
    amap = resize_map(amap, image.shape[:2])
    axes[2].imshow(overlay(image, amap, *vrange))
    _outline(axes[2], amap, threshold)
    axes[2].set_title("anomaly map")
    for axis in axes:
        _bare(axis)
    add_colour_bar(figure, axes[2], vrange, threshold, "map value (scale fixed per model)")
    figure.suptitle(title, fontsize=10)
    return figure


def heatmap_grid(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    vranges: Mapping[str, tuple[float, float]],
    thresholds: Mapping[str, Optional[float]],
    title: str = "",
):
    """A grid figure: one row per sample with its image, ground truth and one heatmap overlay per
    name in ``columns``, each with its colour bar and its decision. Each row is {"image": uint8
    [H, W, 3], "mask": [H, W] or None, "maps": {name: [H, W]}, "label": str, "anomalous": bool
    (the truth), "scores": {name: float}}; the colour range and threshold of a (group, name) pair
    are ``vranges[row.get("group", "") + name]`` and ``thresholds[...]`` of the same key, falling
    back to the key ``name``. A decision is green when it matches the truth, red when not."""
    plt = _pyplot()
    ncols = 2 + len(columns)
    figure, axes = plt.subplots(
        len(rows), ncols, figsize=(2.9 * ncols, 2.5 * len(rows) + 0.6), squeeze=False, layout="constrained"
    )
    for r, row in enumerate(rows):
        image = enlarge(row["image"])
        axes[r, 0].imshow(image)
        axes[r, 0].set_title(row.get("label", ""), fontsize=8)
        axes[r, 1].imshow(mask_image(row.get("mask"), row["image"].shape[:2]))
        axes[r, 1].set_title("ground truth", fontsize=8)
        for c, name in enumerate(columns, start=2):
            key = f"{row.get('group', '')}{name}"
            vrange = vranges.get(key, vranges.get(name, (0.0, 1.0)))
            threshold = thresholds.get(key, thresholds.get(name))
            amap = resize_map(row["maps"][name], image.shape[:2])
            axes[r, c].imshow(overlay(image, amap, *vrange))
            _outline(axes[r, c], amap, threshold)
            score = row.get("scores", {}).get(name)
            if score is None or threshold is None:
                caption, colour = name if score is None else f"{name}: score {score:.4g}", "black"
            else:
                decision, rule = decision_text(score, threshold).split(", ", 1)
                caption = f"{name}: {decision}\n{rule}"
                colour = "green" if (score > threshold) == bool(row.get("anomalous")) else "red"
            axes[r, c].set_title(caption, fontsize=8, color=colour)
            add_colour_bar(figure, axes[r, c], vrange, threshold, "map value", fontsize=7)
        for axis in axes[r]:
            _bare(axis)
    if title:
        figure.suptitle(title, fontsize=11)
    return figure
