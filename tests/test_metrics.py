"""memkd.metrics: hand-computed cases, a brute-force AUPRO from the definition, scikit-learn as the
oracle for AUROC/AP, the limiting cases and input validation."""
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from memkd.metrics import (
    MetricUndefinedWarning,
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


def brute_force_aupro(maps, masks, fpr_limit=0.3):
    """AUPRO straight from the definition: a loop over the distinct scores, every region measured
    at every threshold, the polyline integrated segment by segment. Images may differ in size."""
    regions = []
    for index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(index, labelled == region) for region in range(1, count + 1)]
    normal_count = sum((mask == 0).sum() for mask in masks)
    points = [(0.0, 0.0)]
    for threshold in np.unique(np.concatenate([np.ravel(m) for m in maps]))[::-1]:
        predicted = [image_map >= threshold for image_map in maps]
        false_positives = sum((p & (mask == 0)).sum() for p, mask in zip(predicted, masks))
        pro = np.mean([predicted[index][region].mean() for index, region in regions])
        points.append((false_positives / normal_count, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_limit) / 2
    return area / fpr_limit


def random_category(seed, images=6, height=20, width=24, levels=None):
    """Masks with several blobs per image (image 0 is normal) and maps that partly follow them;
    ``levels`` quantises the maps into that many values, creating ties."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.random((images, height, width)), (0, 1.5, 1.5))
    masks = (noise > np.quantile(noise, 0.85)).astype(np.uint8)
    masks[0] = 0
    maps = 0.6 * rng.random((images, height, width)) + 0.5 * masks * rng.random((images, 1, 1))
    if levels is not None:
        maps = np.round(maps * levels) / levels
    return maps, masks


def region_count(masks):
    return sum(ndimage.label(mask, structure=np.ones((3, 3)))[1] for mask in masks)


def test_image_metrics_by_hand():
    scores, labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    # Pairs (positive > negative): (0.35 > 0.1), (0.8 > 0.1), (0.8 > 0.4) -> 3 of 4.
    assert image_auroc(scores, labels) == pytest.approx(0.75)
    # Ranked 0.8 (+), 0.4 (-), 0.35 (+): precision 1 at recall 1/2, 2/3 at recall 1.
    assert image_ap(scores, labels) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # F1 at >= 0.8: 2/3, >= 0.4: 1/2, >= 0.35: P 2/3 R 1 -> 0.8, >= 0.1: 2/3.
    threshold, f1 = image_f1_max(scores, labels)
    assert threshold == 0.35 and f1 == pytest.approx(0.8)


def test_image_metrics_with_ties_by_hand():
    scores, labels = [0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]
    # The tied pair (0.5, 0.5) counts half: (0.5 vs 0.2) 1, (0.9 vs 0.5) 1, (0.9 vs 0.2) 1 -> 3.5 / 4.
    assert image_auroc(scores, labels) == pytest.approx(0.875)
    # Threshold 0.9: P 1, R 1/2; threshold 0.5 takes both tied images at once: P 2/3, R 1.
    assert image_ap(scores, labels) == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_aupro_by_hand():
    masks = np.array([[[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]])  # regions A (area 2) and B (area 1)
    maps = np.full((1, 3, 4), 0.1)
    maps[0, 0, :3] = [0.9, 0.5, 0.8]  # A: 0.9 and 0.5, one normal pixel at 0.8
    maps[0, 2, 3] = 0.7  # B
    # Thresholds 0.9: (0, 1/4); 0.8: (1/9, 1/4); 0.7: (1/9, 3/4); 0.5: (1/9, 1); 0.1: (1, 1).
    fprs, pros, thresholds = pro_curve(maps, masks)
    np.testing.assert_allclose(fprs, [0, 0, 1 / 9, 1 / 9, 1 / 9, 1])
    np.testing.assert_allclose(pros, [0, 0.25, 0.25, 0.75, 1, 1])
    np.testing.assert_allclose(thresholds, [np.inf, 0.9, 0.8, 0.7, 0.5, 0.1])
    assert aupro(maps, masks) == pytest.approx((0.25 * (1 / 9) + 1.0 * (0.3 - 1 / 9)) / 0.3)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.25 / 9 + 8 / 9)


def test_aupro_interpolates_a_tie_across_the_limit():
    # The defect pixel ties with one of three normal pixels: the curve jumps from (0, 0) straight
    # to (1/3, 1), crossing FPR 0.3 at PRO 0.9: area 0.3 * 0.9 / 2, divided by 0.3.
    masks = np.array([[[1, 0, 0, 0]]])
    maps = np.array([[[0.5, 0.5, 0.1, 0.1]]])
    assert aupro(maps, masks) == pytest.approx(0.45)


def test_regions_are_eight_connected():
    # (0, 0), (0, 1) and the diagonal (1, 2) form one region of area 3 (two regions if 4-connected).
    masks = np.zeros((1, 3, 3), np.uint8)
    masks[0, 0, :2] = masks[0, 1, 2] = 1
    maps = np.zeros((1, 3, 3))
    maps[0, 1, 2] = 1.0
    _, pros, _ = pro_curve(maps, masks)
    assert pros[1] == pytest.approx(1 / 3)  # 4-connectivity would give mean(0, 1) = 0.5


def test_regions_do_not_connect_across_images():
    # The same pixel set in two images is two regions, each of area 1.
    masks = np.zeros((2, 2, 2), np.uint8)
    masks[:, 0, 0] = 1
    maps = np.zeros((2, 2, 2))
    maps[0, 0, 0] = 1.0
    _, pros, _ = pro_curve(maps, masks)
    assert pros[1] == pytest.approx(0.5)


@pytest.mark.parametrize("seed, levels", [(0, None), (1, None), (2, 8), (3, 20), (4, 3)])
def test_aupro_matches_brute_force(seed, levels):
    maps, masks = random_category(seed, levels=levels)
    assert region_count(masks) >= 8
    expected = brute_force_aupro(maps, masks)
    assert 0 < expected < 1
    assert aupro(maps, masks) == pytest.approx(expected, abs=1e-12)
    assert aupro(maps, masks, fpr_limit=0.05) == pytest.approx(brute_force_aupro(maps, masks, 0.05), abs=1e-12)


def test_aupro_pools_images_of_different_sizes():
    maps, masks = random_category(5)
    small_maps, small_masks = random_category(6, images=3, height=11, width=13)
    pooled_maps, pooled_masks = list(maps) + list(small_maps), list(masks) + list(small_masks)
    result = aupro(pooled_maps, pooled_masks)
    assert result == pytest.approx(brute_force_aupro(pooled_maps, pooled_masks), abs=1e-12)
    # Pooled, not averaged per group.
    assert result != pytest.approx(brute_force_aupro(maps, masks))
    assert result != pytest.approx(brute_force_aupro(small_maps, small_masks))


@pytest.mark.parametrize("seed, levels", [(0, None), (1, 5), (2, 2)])
def test_auroc_and_ap_match_scikit_learn_with_ties(seed, levels):
    maps, masks = random_category(seed, levels=levels)
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert pixel_ap(maps, masks) == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random(40), 1)  # 11 values for 40 images: many ties
    labels = (rng.random(40) < 0.4).astype(int)
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_ap(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_pixel_f1_max_against_a_threshold_sweep():
    maps, masks = random_category(7, levels=10)
    best = (None, -1.0)
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        true_positives = (predicted & (masks == 1)).sum()
        f1 = 2 * true_positives / (predicted.sum() + masks.sum())
        if f1 > best[1]:
            best = (threshold, f1)
    threshold, f1 = pixel_f1_max(maps, masks)
    assert threshold == best[0] and f1 == pytest.approx(best[1])


def test_perfect_and_inverted_predictions():
    _, masks = random_category(8)
    labels = masks.reshape(len(masks), -1).max(axis=1)
    perfect = compute_metrics(labels.astype(float), labels, masks.astype(float), masks)
    assert perfect == pytest.approx(dict.fromkeys(perfect, 1.0))
    inverted = compute_metrics(1.0 - labels, labels, 1.0 - masks, masks)
    assert inverted["image_auroc"] == 0 and inverted["pixel_auroc"] == 0 and inverted["aupro"] == 0
    assert inverted["image_ap"] < 1 and inverted["pixel_ap"] < 1


def test_aupro_never_exceeds_one():
    maps, masks = random_category(9, levels=4)
    for fpr_limit in (0.01, 0.1, 0.3, 0.7, 1.0):
        assert 0 <= aupro(maps, masks, fpr_limit) <= 1
    constant = aupro(np.zeros(maps.shape), masks)  # one threshold: the segment (0, 0) -> (1, 1)
    assert constant == pytest.approx(0.15)


def test_compute_metrics_agrees_with_the_single_metrics_and_takes_tensors():
    maps, masks = random_category(10, levels=50)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    labels = masks.reshape(len(masks), -1).max(axis=1)
    results = compute_metrics(torch.tensor(scores), torch.tensor(labels), torch.tensor(maps)[:, None], torch.tensor(masks)[:, None])
    assert results == pytest.approx(
        {
            "image_auroc": image_auroc(scores, labels),
            "image_ap": image_ap(scores, labels),
            "pixel_auroc": pixel_auroc(maps, masks),
            "pixel_ap": pixel_ap(maps, masks),
            "aupro": brute_force_aupro(maps, masks),
        }
    )
    half = compute_metrics(scores, labels, torch.tensor(maps, dtype=torch.float16), masks.astype(bool))
    assert half["aupro"] == pytest.approx(brute_force_aupro(maps.astype(np.float16), masks))
    image_only = compute_metrics(scores, labels)
    assert image_only["image_auroc"] == results["image_auroc"] and np.isnan(image_only["aupro"])


def test_maps_as_a_stack_with_masks_as_a_list_and_the_reverse():
    maps, masks = random_category(6, levels=30)
    expected = (pixel_auroc(maps, masks), pixel_ap(maps, masks), aupro(maps, masks))
    for m, k in ((maps, list(masks)), (list(maps), masks), (torch.tensor(maps), [torch.tensor(x) for x in masks])):
        assert (pixel_auroc(m, k), pixel_ap(m, k), aupro(m, k)) == pytest.approx(expected)


def test_category_without_anomalies_reads_nan_with_warnings():
    maps = np.random.default_rng(0).random((4, 8, 8))
    masks = np.zeros((4, 8, 8), np.uint8)
    with pytest.warns(MetricUndefinedWarning) as caught:
        results = compute_metrics(maps.max(axis=(1, 2)), np.zeros(4), maps, masks)
    assert all(np.isnan(value) for value in results.values())
    assert len(caught) == 5
    with pytest.warns(MetricUndefinedWarning, match="AUPRO is undefined"):
        assert np.isnan(aupro(maps, masks))
    with pytest.warns(MetricUndefinedWarning, match="image F1-max"):
        assert np.isnan(image_f1_max([0.1, 0.2], [0, 0])[0])
    with pytest.raises(ValueError, match="PRO curve needs"):
        pro_curve(maps, masks)


def test_all_anomalous_images_keep_ap_but_not_auroc():
    with pytest.warns(MetricUndefinedWarning, match="image AUROC"):
        assert np.isnan(image_auroc([0.3, 0.9], [1, 1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert image_ap([0.3, 0.9], [1, 1]) == 1.0
    with pytest.warns(MetricUndefinedWarning, match="AUPRO"):  # no anomaly-free pixel: no FPR
        assert np.isnan(aupro(np.ones((1, 2, 2)), np.ones((1, 2, 2))))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: image_auroc([0.1, 0.2, 0.3], [0, 1]), "3 entries but image_labels 2"),
        (lambda: image_auroc([0.1, 0.2], [0, 2]), "image_labels: expected binary"),
        (lambda: image_auroc([0.1, np.nan], [0, 1]), "image_scores: contains NaN"),
        (lambda: image_auroc([[0.1, 0.2]], [[0, 1]]), "expected 1-D"),
        (lambda: image_auroc([], []), "empty"),
        (lambda: pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5))), r"image 0: map is \(4, 4\) but mask is \(4, 5\)"),
        (lambda: pixel_auroc(np.zeros((2, 4, 4)), np.zeros((3, 4, 4))), "maps has 2 images but masks 3"),
        (lambda: pixel_auroc(np.zeros((4, 4)), np.zeros((4, 4))), r"maps: expected \[N, H, W\]"),
        (lambda: aupro(np.zeros((1, 2, 2)), np.full((1, 2, 2), 0.5)), "masks: expected binary"),
        (lambda: aupro(np.full((1, 2, 2), np.inf), np.zeros((1, 2, 2))), "maps: contains NaN or infinite"),
        (lambda: aupro(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), fpr_limit=0), "fpr_limit"),
        (lambda: compute_metrics([0.1, 0.2], [0, 1], np.zeros((3, 2, 2)), np.zeros((3, 2, 2))), "maps has 3 images but image_scores 2"),
        (lambda: compute_metrics([0.1, 0.2], [0, 1], np.zeros((2, 2, 2))), "give both or neither"),
    ],
)
def test_invalid_inputs_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_resize_maps_to_native_masks():
    maps = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    same_size = resize_maps_to_masks(maps, np.zeros((2, 1, 6, 10), np.uint8))
    assert isinstance(same_size, np.ndarray) and same_size.shape == (2, 6, 10)
    np.testing.assert_allclose(resize_maps(np.ones((1, 4, 4)), (7, 3)), np.ones((1, 7, 3)))
    mixed = resize_maps_to_masks(maps, [np.zeros((1, 6, 10)), np.zeros((5, 5))])
    assert [m.shape for m in mixed] == [(6, 10), (5, 5)]
    np.testing.assert_allclose(mixed[1], resize_maps(maps[1:], (5, 5))[0])
    # Bilinear, align_corners=False: doubling [0, 1] samples at -0.25, 0.25, 0.75 and 1.25 (clamped).
    np.testing.assert_allclose(resize_maps(np.array([[[0.0, 1.0]]]), (1, 4)), [[[0, 0.25, 0.75, 1]]])
    masks = [np.eye(6, 10, dtype=np.uint8), np.eye(5, dtype=np.uint8)]
    assert 0 <= compute_metrics([0.1, 0.2], [0, 1], mixed, masks)["aupro"] <= 1
