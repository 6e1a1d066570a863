"""Anomaly detection metrics of one category: image AUROC/AP, pixel AUROC/AP and AUPRO to FPR 0.3
(the MVTec definition), plus F1-max thresholds. Inputs may be numpy arrays or torch tensors."""
from memkd.metrics.curves import DEFAULT_FPR_LIMIT
from memkd.metrics.evaluate import (
    METRIC_NAMES,
    aupro,
    compute_metrics,
    image_ap,
    image_auroc,
    image_f1_max,
    pixel_ap,
    pixel_auroc,
    pixel_f1_max,
    pro_curve,
    resize_maps,
    resize_maps_to_masks,
)
from memkd.metrics.inputs import MetricUndefinedWarning

__all__ = [
    "DEFAULT_FPR_LIMIT",
    "METRIC_NAMES",
    "MetricUndefinedWarning",
    "aupro",
    "compute_metrics",
    "image_ap",
    "image_auroc",
    "image_f1_max",
    "pixel_ap",
    "pixel_auroc",
    "pixel_f1_max",
    "pro_curve",
    "resize_maps",
    "resize_maps_to_masks",
]
