"""Writing results: atomic JSON, Markdown, CSV and PNG files, metric tables and heatmap figures.

Every writer renders into a temporary file beside its target and moves it into place with
``os.replace``, so a reader (or a crash) never sees a half-written report.

Heatmaps: an anomaly map is shown with the "jet" colour map over a fixed value range
(``vmin``, ``vmax``) shared by all images of a category, so that colours compare across images;
overlays blend it with the image at ``alpha`` 0.5. Every figure explains itself: a title with the
image, its score, the threshold and the decision, and a colour bar saying what its scale is.
"""
from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

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


# ---- output folders ---------------------------------------------------------------------------

LOCK_FILE = ".memkd.lock"
_held_locks: dict[str, list] = {}  # folder -> [open lock file, depth] of the locks this process holds


class FolderBusyError(OSError):
    """Another process is writing into the same output folder."""


@contextmanager
def folder_lock(directory: PathLike, option: str = "--out") -> Iterator[Path]:
    """Hold ``directory``'s lock (``.memkd.lock``, created with the folder) while writing into it,
    so that two memkd processes never write one folder at the same time: the second fails at once,
    naming ``option``. Reentrant within a process (training, then evaluating into one run folder)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{option}: {directory} is a file, not a folder")
    directory.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(directory)
    if key in _held_locks:
        _held_locks[key][1] += 1
    else:
        handle = open(directory / LOCK_FILE, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise FolderBusyError(
                f"{option}: another memkd process is writing into {directory}; wait for it to finish or choose another folder"
            ) from None
        _held_locks[key] = [handle, 1]
    try:
        yield directory
    finally:
        _held_locks[key][1] -= 1
        if _held_locks[key][1] == 0:
            _held_locks.pop(key)[0].close()  # closing releases the lock


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

METRIC_DEFINITIONS = (
    "image AUROC and AP rank the test images by their score (the maximum of the anomaly map); pixel AUROC "
    "and AP rank all test pixels; AUPRO@0.3 is the area under the per-region-overlap curve up to a "
    "false-positive rate of 0.3, divided by 0.3"
)


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
