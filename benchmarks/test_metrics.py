"""Metrics of one category: the five metrics (image AUROC/AP, pixel AUROC/AP, AUPRO to FPR 0.3) of
an MVTec-sized test split, 150 images at 256x256 (9.8 million pixels), half of them anomalous with
several defect regions each, timed end to end with `memkd.metrics.compute_metrics`. The peak of the
Python-side allocations (numpy and scipy report theirs to tracemalloc) is measured in one more,
untimed call and written to the notes.
"""
from __future__ import annotations

import tracemalloc

import numpy as np

from memkd.metrics import compute_metrics

IMAGES, SIZE = 150, 256


def _category(seed: int = 0):
    rng = np.random.default_rng(seed)
    maps = rng.random((IMAGES, SIZE, SIZE), dtype=np.float32)
    masks = np.zeros((IMAGES, SIZE, SIZE), dtype=bool)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in range(IMAGES // 2):
        for _ in range(rng.integers(1, 4)):  # 1-3 elliptical defects
            cy, cx = rng.integers(20, SIZE - 20, size=2)
            ry, rx = rng.integers(3, 30, size=2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        maps[i][masks[i]] += 0.5  # anomalies score higher, with overlap
    scores = maps.reshape(IMAGES, -1).max(axis=1)
    labels = masks.reshape(IMAGES, -1).any(axis=1)
    return scores, labels, maps, masks


def test_metrics_of_a_category(measure, results, settings):
    scores, labels, maps, masks = _category()
    key = f"metrics/five-metrics/{IMAGES}x{SIZE}x{SIZE}/cpu"
    measure(lambda: compute_metrics(scores, labels, maps, masks), key=key, impl="memkd", kind="e2e",
            role="subject", device="cpu", items=IMAGES)
    tracemalloc.start()
    try:
        values = compute_metrics(scores, labels, maps, masks)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(0.0 <= v <= 1.0 for v in values.values()), values
    inputs_mb = (maps.nbytes + masks.nbytes) / 1e6
    results.facts["metrics_peak_MB"] = peak / 1e6
    results.note(f"Metrics of a {IMAGES}-image {SIZE}x{SIZE} category ({maps.size / 1e6:.1f} M pixels): peak "
                 f"{peak / 1e6:.0f} MB allocated on top of the {inputs_mb:.0f} MB of maps and masks (tracemalloc).")
