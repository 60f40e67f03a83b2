"""Metrics against slow, independent references: MVTec's AUPRO written with loops, sklearn, brute force."""

from __future__ import annotations

import bisect
import itertools
import math

import numpy as np
import pytest
from scipy.signal import convolve2d
from sklearn.metrics import average_precision_score, roc_auc_score

from tfsearch.errors import InputError
from tfsearch.maps.fusion import MapFuser, fuse, mean_filter
from tfsearch.maps.metrics import (
    METRIC_NAMES,
    GroundTruth,
    aupro,
    auroc,
    evaluate,
    image_auroc,
    pixel_ap,
    pixel_auroc,
    pixel_f1_max,
)

# ------------------------------------------------------------------------------------ references


def regions_8_connected(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Flood fill over the 8 neighbours of each pixel."""
    height, width = mask.shape
    labels = np.zeros(mask.shape, dtype=int)
    count = 0
    for y in range(height):
        for x in range(width):
            if not mask[y, x] or labels[y, x]:
                continue
            count += 1
            labels[y, x] = count
            stack = [(y, x)]
            while stack:
                cy, cx = stack.pop()
                for ny in range(cy - 1, cy + 2):
                    for nx in range(cx - 1, cx + 2):
                        if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                            labels[ny, nx] = count
                            stack.append((ny, nx))
    return labels, count


def reference_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """MVTec AD's algorithm step by step (method.md §8), with Python loops."""
    scores, fp_changes, pro_changes = [], [], []
    n_normal = n_regions = 0
    for image_map, mask in zip(maps, masks, strict=True):
        labels, count = regions_8_connected(mask)
        n_regions += count
        sizes = {k: int((labels == k).sum()) for k in range(1, count + 1)}
        for value, label in zip(image_map.ravel().tolist(), labels.ravel().tolist(), strict=True):
            scores.append(float(value))
            fp_changes.append(1 if label == 0 else 0)
            pro_changes.append(0.0 if label == 0 else 1.0 / sizes[label])
            n_normal += label == 0
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    fpr, pro = [0.0], [0.0]
    fp = weight = 0.0
    for position, i in enumerate(order):
        fp += fp_changes[i]
        weight += pro_changes[i]
        last_of_tie_run = position == len(order) - 1 or scores[order[position + 1]] != scores[i]
        if last_of_tie_run:
            fpr.append(min(fp / n_normal, 1.0))
            pro.append(min(weight / n_regions, 1.0))
    fpr.append(1.0)
    pro.append(1.0)
    area = 0.0
    if limit not in fpr:
        after = bisect.bisect(fpr, limit)
        at_limit = pro[after - 1] + (pro[after] - pro[after - 1]) * (limit - fpr[after - 1]) / (
            fpr[after] - fpr[after - 1]
        )
        area += 0.5 * (at_limit + pro[after - 1]) * (limit - fpr[after - 1])
    kept = [(x, y) for x, y in zip(fpr, pro, strict=True) if x <= limit]
    for (x0, y0), (x1, y1) in itertools.pairwise(kept):
        area += 0.5 * (y0 + y1) * (x1 - x0)
    return area / limit


def brute_force_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    best = 0.0
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        tp = np.sum(predicted & labels)
        fp = np.sum(predicted & ~labels)
        fn = np.sum(~predicted & labels)
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def check_against_references(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> dict[str, float]:
    gt = GroundTruth.from_masks(masks)
    result = evaluate(gt, maps, limit=limit)
    labels, scores = masks.ravel(), maps.ravel().astype(np.float64)
    image_labels = masks.any(axis=(1, 2))
    assert result["aupro"] == pytest.approx(reference_aupro(maps, masks, limit), abs=1e-6)
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert result["pixel_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    assert result["pixel_f1_max"] == pytest.approx(brute_force_f1_max(labels, scores), abs=1e-9)
    expected_image = roc_auc_score(image_labels, maps.reshape(len(maps), -1).max(axis=1).astype(np.float64))
    assert result["image_auroc"] == pytest.approx(expected_image, abs=1e-9)
    return result


def blob_masks(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    """Masks with a few rectangles on the first half of the images; the rest are normal."""
    masks = np.zeros((n, height, width), dtype=bool)
    for image in range(n // 2):
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, height - 2), rng.integers(0, width - 2)
            masks[image, y : y + rng.integers(1, 5), x : x + rng.integers(1, 5)] = True
    return masks


def noisy_maps(rng: np.random.Generator, masks: np.ndarray, signal: float = 0.6) -> np.ndarray:
    return rng.random(masks.shape) + signal * masks


# ---------------------------------------------------------------------------- agreement with references


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_random_maps_match_references(seed: int, limit: float) -> None:
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng, 6, 12, 10)
    check_against_references(noisy_maps(rng, masks), masks, limit)


@pytest.mark.parametrize("levels", [2, 3, 5])
def test_quantised_maps_with_many_ties_match_references(levels: int) -> None:
    rng = np.random.default_rng(levels)
    masks = blob_masks(rng, 6, 10, 10)
    maps = np.round(noisy_maps(rng, masks, signal=0.3) * levels) / levels
    check_against_references(maps, masks)


def test_constant_maps_score_chance() -> None:
    masks = blob_masks(np.random.default_rng(3), 4, 8, 8)
    result = check_against_references(np.full(masks.shape, 0.25), masks)
    assert result["pixel_auroc"] == 0.5
    assert result["image_auroc"] == 0.5
    # the PRO curve is the diagonal from (0,0) to (1,1): its mean height up to 0.3 is 0.15
    assert result["aupro"] == pytest.approx(0.15)


def test_perfect_maps_score_one() -> None:
    masks = blob_masks(np.random.default_rng(4), 6, 9, 9)
    result = check_against_references(masks.astype(np.float32), masks)
    assert all(result[name] == pytest.approx(1.0) for name in METRIC_NAMES)


def test_one_pixel_regions_weigh_like_large_regions() -> None:
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 1, 1] = True  # a one-pixel region found by the map
    masks[0, 4:8, 4:8] = True  # a 16-pixel region the map misses
    maps = np.where(masks, 0.0, 0.5)  # the missed region scores below every normal pixel
    maps[0, 1, 1] = 1.0
    gt = GroundTruth.from_masks(masks)
    assert gt.n_regions == 2
    result = check_against_references(maps, masks)
    # half of the regions is fully found at FPR 0: PRO is 0.5 on [0, 0.3]
    assert result["aupro"] == pytest.approx(0.5)


def test_diagonal_neighbours_form_one_region() -> None:
    masks = np.zeros((2, 6, 6), dtype=bool)
    masks[0, [0, 1, 2, 3], [0, 1, 2, 3]] = True  # a diagonal line touching only at corners
    masks[0, 5, 0] = True
    assert GroundTruth.from_masks(masks).n_regions == 2
    maps = np.where(masks, 0.0, 0.5)
    maps[0, 0, 0] = maps[0, 1, 1] = 1.0  # half of the diagonal region, none of the single pixel
    result = check_against_references(maps, masks)
    # one region of two is half covered at FPR 0: PRO 0.25 (with 4-connectivity it would differ)
    assert result["aupro"] == pytest.approx(0.25)


def test_negative_values_match_references() -> None:
    rng = np.random.default_rng(5)
    masks = blob_masks(rng, 6, 10, 10)
    maps = noisy_maps(rng, masks) - 0.8
    maps[maps > -0.3] *= -1.0  # scores on both sides of zero, some exactly -0.0
    maps[0, 0, :3] = -0.0
    maps[1, 0, :3] = 0.0
    check_against_references(maps, masks)


def test_float16_maps_match_references() -> None:
    rng = np.random.default_rng(6)
    masks = blob_masks(rng, 6, 12, 12)
    maps = (noisy_maps(rng, masks, signal=0.2) * 1e-3).astype(np.float16)  # few float16 steps: many ties
    check_against_references(maps, masks)


def test_limit_on_a_curve_point_takes_no_interpolation() -> None:
    # 20 normal pixels and one 2x2 region; 6 normal pixels score above the region: FPR reaches exactly 0.3
    masks = np.zeros((2, 3, 4), dtype=bool)
    masks[0, :2, :2] = True
    maps = np.full(masks.shape, 0.1)
    maps[0, :2, :2] = [[0.5, 0.4], [0.45, 0.42]]
    maps[0, 0, 2:], maps[0, 1, 2], maps[1, 0, 0], maps[1, 2, :2] = [0.9, 0.8], 0.7, 0.7, 0.6
    result = check_against_references(maps, masks)
    assert result["aupro"] == 0.0
    result = check_against_references(maps, masks, limit=0.4)
    # PRO jumps to 1 at FPR 0.3, so on [0, 0.4] the area is 0.1 and its mean 0.25
    assert result["aupro"] == pytest.approx(0.25)


def test_auroc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(7)
    labels = rng.random(200) < 0.3
    scores = np.round(rng.random(200) + 0.3 * labels, 1)
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_single_metric_functions_equal_evaluate() -> None:
    rng = np.random.default_rng(8)
    masks = blob_masks(rng, 6, 10, 10)
    maps = noisy_maps(rng, masks)
    gt = GroundTruth.from_masks(masks)
    result = evaluate(gt, maps, limit=0.2)
    assert image_auroc(gt, maps) == result["image_auroc"]
    assert aupro(gt, maps, limit=0.2) == result["aupro"]
    assert pixel_auroc(gt, maps) == result["pixel_auroc"]
    assert pixel_ap(gt, maps) == result["pixel_ap"]
    assert pixel_f1_max(gt, maps) == result["pixel_f1_max"]


# ------------------------------------------------------------------------------- undefined metrics


def test_no_anomalous_image_makes_every_metric_undefined() -> None:
    masks = np.zeros((3, 5, 5), dtype=bool)
    gt = GroundTruth.from_masks(masks)
    result = evaluate(gt, np.random.default_rng(9).random(masks.shape))
    assert all(math.isnan(result[name]) for name in METRIC_NAMES)
    assert gt.undefined_reasons() == dict.fromkeys(METRIC_NAMES, "no anomalous image")


def test_no_normal_image_leaves_pixel_metrics_defined() -> None:
    rng = np.random.default_rng(10)
    masks = np.zeros((3, 6, 6), dtype=bool)
    masks[:, 2:4, 2:4] = True
    maps = noisy_maps(rng, masks)
    gt = GroundTruth.from_masks(masks)
    result = evaluate(gt, maps)
    assert math.isnan(result["image_auroc"])
    assert gt.undefined_reasons() == {"image_auroc": "no normal image"}
    assert result["aupro"] == pytest.approx(reference_aupro(maps, masks), abs=1e-6)


def test_no_normal_pixel_makes_pro_and_pixel_auroc_undefined() -> None:
    masks = np.ones((2, 3, 3), dtype=bool)
    gt = GroundTruth.from_masks(masks)
    result = evaluate(gt, np.random.default_rng(11).random(masks.shape))
    assert math.isnan(result["aupro"]) and math.isnan(result["pixel_auroc"])
    assert result["pixel_ap"] == 1.0 and result["pixel_f1_max"] == 1.0
    assert gt.undefined_reasons()["aupro"] == "no normal pixel"


# ----------------------------------------------------------------------------------- bad input


def test_bad_maps_are_input_errors() -> None:
    masks = blob_masks(np.random.default_rng(12), 4, 6, 6)
    gt = GroundTruth.from_masks(masks)
    maps = np.zeros(masks.shape)
    with pytest.raises(InputError, match="shape"):
        evaluate(gt, maps[:, :5])
    for bad in (np.nan, np.inf, -np.inf):
        broken = maps.copy()
        broken[1, 2, 3] = bad
        with pytest.raises(InputError, match="NaN or inf"):
            evaluate(gt, broken)
    with pytest.raises(InputError, match="limit"):
        evaluate(gt, maps, limit=0.0)
    with pytest.raises(InputError, match="bool"):
        GroundTruth.from_masks(masks.astype(np.uint8))


# ------------------------------------------------------------------------------------- fusion


@pytest.mark.parametrize("kernel", [1, 3, 5, 7, 9])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_mean_filter_equals_convolve2d(kernel: int, dtype: type) -> None:
    maps = np.random.default_rng(kernel).random((3, 6, 11)).astype(dtype)  # non-square, smaller than n = 9
    expected = np.stack(
        [convolve2d(m.astype(np.float64), np.ones((kernel, kernel)) / kernel**2, mode="same") for m in maps]
    )
    filtered = mean_filter(maps, kernel)
    assert filtered.dtype == (np.float64 if dtype == np.float64 else np.float32)
    np.testing.assert_allclose(filtered, expected, rtol=0, atol=1e-6)


def test_fuse_is_the_blend_of_filtered_maps_and_the_filter_of_the_blend() -> None:
    rng = np.random.default_rng(13)
    m_disc, m_recon = rng.random((2, 3, 9, 8)).astype(np.float16)
    fused = fuse(m_disc, m_recon, 0.95, 5)
    by_definition = 0.95 * mean_filter(m_disc, 5) + 0.05 * mean_filter(m_recon, 5)
    filter_of_blend = mean_filter(0.95 * m_disc.astype(np.float64) + 0.05 * m_recon.astype(np.float64), 5)
    np.testing.assert_allclose(fused, by_definition, rtol=0, atol=1e-6)
    np.testing.assert_allclose(fused, filter_of_blend, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(fuse(m_disc, m_recon, 1.0, 5), mean_filter(m_disc, 5))


def test_map_fuser_equals_fuse_bit_for_bit() -> None:
    rng = np.random.default_rng(14)
    m_disc, m_recon = rng.random((2, 2, 7, 7)).astype(np.float16)
    fuser = MapFuser(m_disc, m_recon, cached_kernels=1)
    for lam, kernel in [(0.95, 7), (0.5, 3), (0.95, 7), (0.0, 1)]:
        np.testing.assert_array_equal(fuser.fuse(lam, kernel), fuse(m_disc, m_recon, lam, kernel))
    assert fuser.filtered(3) is fuser.filtered(3)  # cached


@pytest.mark.parametrize("lam", [-0.1, 1.5, math.nan])
def test_lam_outside_unit_interval_is_rejected(lam: float) -> None:
    maps = np.zeros((1, 3, 3))
    with pytest.raises(InputError, match="lam"):
        fuse(maps, maps, lam, 3)
    with pytest.raises(InputError, match="lam"):
        MapFuser(maps, maps).fuse(lam, 3)


@pytest.mark.parametrize("kernel", [0, 2, -3, 3.0, True])
def test_kernel_must_be_odd_and_positive(kernel: object) -> None:
    maps = np.zeros((1, 3, 3))
    with pytest.raises(InputError, match="kernel"):
        fuse(maps, maps, 0.5, kernel)


def test_map_stacks_must_match() -> None:
    with pytest.raises(InputError, match="m_disc and m_recon"):
        fuse(np.zeros((1, 3, 3)), np.zeros((1, 3, 4)), 0.5, 3)
