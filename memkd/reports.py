"""Writing results: atomic JSON, Markdown, CSV and PNG files, metric tables and heatmap figures.

Every writer renders into a temporary file beside its target and moves it into place with
``os.replace``, so a reader (or a crash) never sees a half-written report.

Heatmaps: an anomaly map is shown with the "jet" colour map over a fixed value range
(``vmin``, ``vmax``) shared by all images of a category, so that colours compare across images;
overlays blend it with the image at ``alpha`` 0.5.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

PathLike = Union[str, os.PathLike]

# Column labels of the metric tables, in the order of memkd.metrics.METRIC_NAMES.
METRIC_LABELS = {
    "image_auroc": "I-AUROC",
    "image_ap": "I-AP",
    "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP",
    "aupro": "AUPRO@0.3",
}


# ---- atomic writers ---------------------------------------------------------------------------


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` for a temporary file beside ``path``, then move it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes(path: PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def jsonable(value: Any) -> Any:
    """``value`` with NaN/inf floats as None, numpy scalars and arrays as Python types, paths as str."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return str(value)
    return value


def write_json(path: PathLike, data: Any) -> Path:
    """Strict JSON (NaN written as null), indented."""
    return write_text(path, json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n")


def write_csv(path: PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


def write_png(path: PathLike, rgb: np.ndarray) -> Path:
    """A uint8 [H, W, 3] (or [H, W]) array as a PNG."""
    from PIL import Image

    def write(tmp: Path) -> None:
        Image.fromarray(np.ascontiguousarray(rgb)).save(tmp, format="PNG")

    return atomic_write(path, write)


def save_figure(figure, path: PathLike, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG and close it."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    finally:
        plt.close(figure)


# ---- tables -----------------------------------------------------------------------------------


def format_percent(value: Optional[float]) -> str:
    """A metric in [0, 1] as a percentage with one decimal; "n/a" when undefined."""
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    return f"{100.0 * float(value):.1f}"


def mean_metrics(rows: Sequence[Mapping[str, Optional[float]]], names: Sequence[str]) -> dict[str, Optional[float]]:
    """The mean of each metric over the rows where it is defined (None when it is nowhere)."""
    means = {}
    for name in names:
        values = [float(r[name]) for r in rows if r.get(name) is not None and math.isfinite(float(r[name]))]
        means[name] = float(np.mean(values)) if values else None
    return means


def metrics_table(
    rows: Sequence[tuple[str, Mapping[str, Optional[float]]]],
    names: Sequence[str] = tuple(METRIC_LABELS),
    first_column: str = "category",
    with_mean: bool = True,
    extra_columns: Sequence[tuple[str, Callable[[str, Mapping[str, Any]], str]]] = (),
) -> str:
    """A Markdown table, one row per (label, metrics) in percent, plus a bold mean row.

    ``extra_columns``: (header, function(label, metrics) -> cell) appended after the metrics; the
    mean row leaves them empty.
    """
    header = [first_column, *(METRIC_LABELS.get(n, n) for n in names), *(h for h, _ in extra_columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for label, metrics in rows:
        cells = [label, *(format_percent(metrics.get(n)) for n in names), *(f(label, metrics) for _, f in extra_columns)]
        lines.append("| " + " | ".join(cells) + " |")
    if with_mean and rows:
        means = mean_metrics([m for _, m in rows], names)
        cells = ["**mean**", *(f"**{format_percent(means[n])}**" for n in names), *("" for _ in extra_columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- images and heatmaps ------------------------------------------------------------------------


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
    """Image, ground truth and heatmap overlay side by side (a matplotlib figure). With a
    ``threshold`` the overlay outlines where the map exceeds it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(9.6, 3.6))
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(mask_image(mask, image.shape[:2]))
    axes[1].set_title("ground truth" if mask is not None else "ground truth (none)")
    amap = resize_map(amap, image.shape[:2])
    axes[2].imshow(overlay(image, amap, *vrange))
    if threshold is not None and amap.max() > threshold > amap.min():
        axes[2].contour(amap, levels=[threshold], colors="white", linewidths=0.8)
    axes[2].set_title("anomaly map")
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def heatmap_grid(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    vranges: Mapping[str, tuple[float, float]],
    title: str = "",
):
    """A grid figure: one row per sample with its image, ground truth and one heatmap overlay per
    name in ``columns``. Each row is {"image": uint8 [H, W, 3], "mask": [H, W] or None,
    "maps": {name: [H, W]}, "label": str, "scores": {name: float}}; ``vranges[name]`` is the colour
    range of a (category, name) pair given as ``vranges[row.get("group", "") + name]`` when present."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ncols = 2 + len(columns)
    figure, axes = plt.subplots(len(rows), ncols, figsize=(2.2 * ncols, 2.2 * len(rows) + 0.4), squeeze=False, layout="constrained")
    for r, row in enumerate(rows):
        image = row["image"]
        panels = [(image, row.get("label", "")), (mask_image(row.get("mask"), image.shape[:2]), "ground truth")]
        for name in columns:
            vrange = vranges.get(f"{row.get('group', '')}{name}", vranges.get(name, (0.0, 1.0)))
            score = row.get("scores", {}).get(name)
            caption = name if score is None else f"{name} ({score:.3f})"
            panels.append((overlay(image, row["maps"][name], *vrange), caption))
        for c, (picture, caption) in enumerate(panels):
            axes[r, c].imshow(picture)
            axes[r, c].set_title(caption, fontsize=8)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
    if title:
        figure.suptitle(title, fontsize=11)
    return figure
