"""The public metric functions of one category, and resizing maps to native mask resolution.

Inputs may be numpy arrays or torch tensors. Image level: scores and 0/1 labels [N]. Pixel level:
maps and binary masks [N, H, W] or [N, 1, H, W], or sequences of per-image [H, W] arrays (sizes may
differ, e.g. native resolution), all pixels of the category pooled.
Undefined metrics read NaN with a MetricUndefinedWarning: AUROC without both classes, AP and F1-max
without a positive, AUPRO without a defect pixel or without an anomaly-free pixel.

Cost: one argsort of every pixel dominates, so time grows with the pixel count P as P log P and
memory linearly (int64 sort order and counts, float64 PRO sums per pixel): native 1024x1024
evaluation costs about 16x a 256x256 one. benchmarks/test_metrics.py measures an MVTec-sized
category.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from memkd.metrics.curves import (
    DEFAULT_FPR_LIMIT,
    aupro_of,
    auroc_of,
    average_precision_of,
    check_fpr_limit,
    f1_max_of,
    pixel_curves,
    pro_points,
    rank_curves,
)
from memkd.metrics.inputs import ArrayLike, image_inputs, per_image_arrays, pixel_inputs

METRIC_NAMES = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro")


def image_curves(image_scores: ArrayLike, image_labels: ArrayLike):
    return rank_curves(*image_inputs(image_scores, image_labels))


def image_auroc(image_scores: ArrayLike, image_labels: ArrayLike) -> float:
    return auroc_of(image_curves(image_scores, image_labels), "image AUROC")


def image_ap(image_scores: ArrayLike, image_labels: ArrayLike) -> float:
    return average_precision_of(image_curves(image_scores, image_labels), "image AP")


def image_f1_max(image_scores: ArrayLike, image_labels: ArrayLike) -> tuple[float, float]:
    """(threshold, F1): the image score threshold (anomalous when score >= threshold) of best F1."""
    return f1_max_of(image_curves(image_scores, image_labels), "image F1-max")


def pixel_auroc(maps: ArrayLike, masks: ArrayLike) -> float:
    return auroc_of(pixel_curves(pixel_inputs(maps, masks), with_pro=False), "pixel AUROC")


def pixel_ap(maps: ArrayLike, masks: ArrayLike) -> float:
    return average_precision_of(pixel_curves(pixel_inputs(maps, masks), with_pro=False), "pixel AP")


def pixel_f1_max(maps: ArrayLike, masks: ArrayLike) -> tuple[float, float]:
    """(threshold, F1): the pixel score threshold (anomalous when score >= threshold) of best F1."""
    return f1_max_of(pixel_curves(pixel_inputs(maps, masks), with_pro=False), "pixel F1-max")


def aupro(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = DEFAULT_FPR_LIMIT) -> float:
    """Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit`` (MVTec definition)."""
    check_fpr_limit(fpr_limit)
    return aupro_of(pixel_curves(pixel_inputs(maps, masks)), fpr_limit)


def pro_curve(maps: ArrayLike, masks: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The PRO curve as (fprs, pros, thresholds), one point per distinct score in decreasing order
    after a first point (0, 0) at threshold +inf. ValueError when there is no defect pixel or no
    anomaly-free pixel."""
    points = pro_points(pixel_curves(pixel_inputs(maps, masks)))
    if points is None:
        raise ValueError("the PRO curve needs at least one defect pixel and one anomaly-free pixel")
    return points


def compute_metrics(
    image_scores: ArrayLike,
    image_labels: ArrayLike,
    maps: Optional[ArrayLike] = None,
    masks: Optional[ArrayLike] = None,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
) -> dict[str, float]:
    """{image_auroc, image_ap, pixel_auroc, pixel_ap, aupro} of one category, each in [0, 1], the
    pixel metrics from a single sort. Without maps and masks (a dataset without ground truth) the
    pixel metrics read NaN without a warning."""
    check_fpr_limit(fpr_limit)
    scores, labels = image_inputs(image_scores, image_labels)
    image = rank_curves(scores, labels)
    results = {
        "image_auroc": auroc_of(image, "image AUROC"),
        "image_ap": average_precision_of(image, "image AP"),
        "pixel_auroc": float("nan"),
        "pixel_ap": float("nan"),
        "aupro": float("nan"),
    }
    if maps is None and masks is None:
        return results
    if maps is None or masks is None:
        raise ValueError("maps and masks: give both or neither")
    pixels = pixel_inputs(maps, masks)
    if len(pixels.shapes) != len(scores):
        raise ValueError(f"maps has {len(pixels.shapes)} images but image_scores {len(scores)}")
    pixel = pixel_curves(pixels)
    results["pixel_auroc"] = auroc_of(pixel, "pixel AUROC")
    results["pixel_ap"] = average_precision_of(pixel, "pixel AP")
    results["aupro"] = aupro_of(pixel, fpr_limit)
    return results


def resize_maps(maps: Union[np.ndarray, torch.Tensor], size: Sequence[int]) -> np.ndarray:
    """Maps [N, H, W] or [N, 1, H, W] resized to ``size`` (height, width) as float32 [N, h, w];
    bilinear with align_corners=False, the geometry of the image resize that produced them."""
    stack = per_image_arrays(maps, "maps")
    if isinstance(stack, list):
        raise ValueError("maps: expected one [N, H, W] stack (the model's output size)")
    stack = torch.as_tensor(stack, dtype=torch.float32)[:, None]
    resized = F.interpolate(stack, size=tuple(size), mode="bilinear", align_corners=False)
    return resized[:, 0].numpy()


def resize_maps_to_masks(maps: Union[np.ndarray, torch.Tensor], masks: ArrayLike):
    """Maps [N, H, W] resized to each mask's size (masks: an [N, h, w] stack or a per-image sequence,
    e.g. the ``mask_native`` of dataset items): a float32 [N, h, w] array when all masks share a size,
    else a list of [h_i, w_i] arrays; either goes to compute_metrics with those masks."""
    mask_images = per_image_arrays(masks, "masks")
    sizes = [tuple(mask.shape) for mask in mask_images]
    if len(maps) != len(sizes):
        raise ValueError(f"maps has {len(maps)} images but masks {len(sizes)}")
    if len(set(sizes)) == 1:
        return resize_maps(maps, sizes[0])
    return [resize_maps(image[None], size)[0] for image, size in zip(maps, sizes)]
