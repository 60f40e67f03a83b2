"""The paper's metrics on fused anomaly maps, exact and fast enough to score thousands of candidates.

A selection search scores many (epoch, λ, n) candidates of one category against the same ground truth, so:

- everything that depends only on the ground truth (8-connected regions, the 1/|region| weight of each defect
  pixel, the counts used for normalisation) is computed once, in `GroundTruth.from_masks`;
- the maps arrive fused (`tfsearch.maps.fusion`: each raw stack filtered once per n, blended per λ), float32;
- one value sort of all pixels serves every pixel metric (`_RankedCurve`).

The pixel metrics need no argsort of all pixels. They are all functions of the ROC / PRO / PR curves, and the
points of those curves between two consecutive distinct *defect-pixel* values move only along the FPR axis
(only normal pixels change there). So for each distinct defect value v it is enough to know how many pixels
score ≥ v and > v (two binary searches in the sorted values), plus the defect counts and region weights at
and above v, which come from sorting the few defect pixels. The results are the same numbers the reference
algorithms give (up to float rounding of sums, ~1e-15):

- image AUROC and pixel AUROC: sklearn `roc_auc_score` (ties count one half), computed as the exact
  Mann-Whitney statistic in integers;
- pixel AP: sklearn `average_precision_score`, Σ_k (R_k − R_{k−1})·P_k over the distinct thresholds;
- pixel F1-max: the largest F1 = 2·TP / (TP + FP + #defect pixels) over the thresholds of the PR curve;
- AUPRO up to an FPR limit (0.3): MVTec AD's `au_pro_util` exactly as method.md §8 describes
  (8-connected regions, global normalisation by #regions and #normal pixels, the last index of each tied run,
  curves clipped to 1 and padded with (0,0) and (1,1), trapezoid to the limit with linear interpolation at the
  limit, divided by the limit). Dropping the points inside a run of normal pixels changes nothing: PRO is
  constant along such a run, so its trapezoids and an interpolation at the limit inside it give the same area.

MVTec AD 2's metrics (docs/mvtec-ad2.md) come beside them (`evaluate(extended=True)`, the default):

- `aupro_05`: the AUPRO above integrated to FPR 0.05 instead of 0.3, normalised by 0.05;
- `seg_f1`: the segmentation F1 of the maps binarised at one threshold (a pixel is anomalous when its score
  is strictly above it): 2·TP / (2·TP + FP + FN), the pixels of every image of the set pooled. The threshold
  is chosen without test labels: `segmentation_threshold`, mean + k·std of every pixel of the normal images
  of the validation data, k = 3 by default (the baseline MVTec's submission check suggests) or searched.

A metric that is undefined for the ground truth (no defect image, no normal image, no normal pixel) is NaN;
`GroundTruth.undefined_reasons` says why, for reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from tfsearch.errors import InputError

METRIC_NAMES = ("image_auroc", "aupro", "pixel_auroc", "pixel_ap", "pixel_f1_max")
# MVTec AD 2's: AUPRO to FPR 0.05, SegF1 at a threshold chosen without test labels (`evaluate(extended=True)`)
EXTRA_METRIC_NAMES = ("aupro_05", "seg_f1")
EXTENDED_METRIC_NAMES = (*METRIC_NAMES, *EXTRA_METRIC_NAMES)
# what MVTec AD 2 reports (AU-PRO at 0.05 and 0.3, SegF1), with image AUROC beside them
MVTEC_AD2_METRIC_NAMES = ("image_auroc", "aupro_05", "aupro", "seg_f1")
PRO_LIMIT = 0.3
PRO_LIMIT_LOW = 0.05
# the SegF1 threshold's default k: mean + k x std of the normal validation pixels
SEG_THRESHOLD_SIGMAS = 3.0
# 8-connectivity for ground-truth regions, as MVTec's evaluation code labels them
_REGION_STRUCTURE = np.ones((3, 3), dtype=int)


# ------------------------------------------------------------------------------------ ground truth


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """What the metrics need from the binarised masks of one evaluation set, computed once per category."""

    shape: tuple[int, int, int]  # (N, H, W) of the masks, which every map stack must match
    # bool (N,): an image is anomalous iff its mask has a defect pixel (method.md §8)
    image_labels: np.ndarray
    defect_index: np.ndarray  # int64, ascending flat indices of the defect pixels into an (N, H, W) stack
    region_weight: np.ndarray  # float64, 1/|region| of each defect pixel, in `defect_index` order
    n_regions: int  # 8-connected defect regions over the whole set
    n_normal_pixels: int

    @classmethod
    def from_masks(cls, masks: np.ndarray) -> GroundTruth:
        """Label every image's defect regions (8-connected) and weight each defect pixel by 1/|region|."""
        masks = np.asarray(masks)
        if masks.ndim != 3 or masks.dtype != bool:
            raise InputError(
                f"masks must be a bool (N, H, W) array, got {masks.dtype} of shape {masks.shape}"
            )
        weights: list[np.ndarray] = []  # per anomalous image, its defect pixels' weights in row-major order
        n_regions = 0
        for mask in masks:
            if not mask.any():
                continue
            regions, count = ndimage.label(mask, structure=_REGION_STRUCTURE)
            defect_regions = regions[mask]
            weights.append(1.0 / np.bincount(defect_regions)[defect_regions])
            n_regions += count
        return cls(
            shape=tuple(masks.shape),
            image_labels=masks.any(axis=(1, 2)),
            defect_index=np.flatnonzero(masks),
            region_weight=np.concatenate(weights) if weights else np.zeros(0),
            n_regions=n_regions,
            n_normal_pixels=int(masks.size - np.count_nonzero(masks)),
        )

    @property
    def n_defect_pixels(self) -> int:
        return int(self.defect_index.size)

    def undefined_reasons(self, extended: bool = False) -> dict[str, str]:
        """Metric name -> why it is undefined (NaN) for this ground truth; empty when all are defined.
        `extended` adds MVTec AD 2's metrics (SegF1 is also undefined without a threshold, which the
        ground truth cannot tell)."""
        reasons: dict[str, str] = {}
        n_anomalous = int(self.image_labels.sum())
        if n_anomalous == 0:
            reasons = dict.fromkeys(EXTENDED_METRIC_NAMES if extended else METRIC_NAMES, "no anomalous image")
        elif n_anomalous == len(self.image_labels):
            reasons["image_auroc"] = "no normal image"
        if n_anomalous and self.n_normal_pixels == 0:
            reasons["aupro"] = reasons["pixel_auroc"] = "no normal pixel"
            if extended:
                reasons["aupro_05"] = "no normal pixel"
        return reasons


# ------------------------------------------------------------------------------------------ curves


@dataclass(frozen=True)
class _RankedCurve:
    """Counts at every distinct positive value v, descending: the corner points of the ROC / PR / PRO curves.

    `*_ge` count what scores ≥ v, `*_gt` what scores > v; `weight_*` sum the positives' weights.
    """

    n_positive: int
    n_negative: int
    positive_ge: np.ndarray  # int64
    positive_count: np.ndarray  # int64, positives scoring exactly v
    negative_ge: np.ndarray  # int64
    negative_gt: np.ndarray  # int64
    weight_ge: np.ndarray  # float64
    weight_gt: np.ndarray  # float64

    @classmethod
    def build(
        cls,
        sorted_scores: np.ndarray,
        positive_scores: np.ndarray,
        positive_weights: np.ndarray | None = None,
    ) -> _RankedCurve:
        """From all scores sorted ascending and the (unsorted) positives' scores and weights."""
        order = np.argsort(positive_scores)[::-1]
        descending = positive_scores[order]
        run_start = np.ones(descending.size, dtype=bool)
        run_start[1:] = descending[1:] != descending[:-1]
        starts = np.flatnonzero(run_start)
        values = descending[starts]
        positive_count = np.diff(np.append(starts, descending.size))
        positive_ge = np.cumsum(positive_count)
        n_scores = sorted_scores.size
        below = np.searchsorted(sorted_scores, values, side="left")  # how many score < v
        # how many score <= v: at least the positives at v; a negative tied with them is rare, so the
        # second binary search runs only where the next sorted score still equals v
        not_above = below + positive_count
        tied = not_above < n_scores
        tied[tied] = sorted_scores[not_above[tied]] == values[tied]
        not_above[tied] = np.searchsorted(sorted_scores, values[tied], side="right")
        positive_gt = positive_ge - positive_count
        weight_ge = np.zeros(0)
        if positive_weights is not None and starts.size:
            weight_ge = np.cumsum(np.add.reduceat(positive_weights[order], starts))
        return cls(
            n_positive=int(positive_scores.size),
            n_negative=int(n_scores - positive_scores.size),
            positive_ge=positive_ge,
            positive_count=positive_count,
            negative_ge=(n_scores - below) - positive_ge,
            negative_gt=(n_scores - not_above) - positive_gt,
            weight_ge=weight_ge,
            weight_gt=np.concatenate(([0.0], weight_ge))[:-1],
        )

    def auroc(self) -> float:
        """P(positive > negative) + ½·P(tie), the area under the ROC curve, from exact integer counts."""
        if self.n_positive == 0 or self.n_negative == 0:
            return math.nan
        negative_below = self.n_negative - self.negative_ge
        negative_tied = self.negative_ge - self.negative_gt
        twice_wins = int(np.dot(self.positive_count, 2 * negative_below + negative_tied))
        return twice_wins / (2 * self.n_positive * self.n_negative)

    def average_precision(self) -> float:
        """sklearn's AP: recall steps only at positive thresholds, each times the precision there."""
        if self.n_positive == 0:
            return math.nan
        precision = self.positive_ge / (self.positive_ge + self.negative_ge)
        return float(np.dot(self.positive_count, precision) / self.n_positive)

    def f1_max(self) -> float:
        """Max F1 over thresholds; between positive thresholds only FP grows, so those cannot be the max."""
        if self.n_positive == 0:
            return math.nan
        f1 = 2 * self.positive_ge / (self.positive_ge + self.negative_ge + self.n_positive)
        return float(f1.max())

    def aupro(self, n_regions: int, limit: float) -> float:
        """MVTec AD's AUPRO to FPR `limit`, normalised by `limit`."""
        if n_regions == 0 or self.n_negative == 0:
            return math.nan
        # each positive value contributes the point before its tie run (only normal pixels added since the
        # previous value) and the point after it
        fpr = np.empty(2 * self.negative_ge.size + 3)
        pro = np.empty_like(fpr)
        fpr[1:-2:2], fpr[2:-2:2] = self.negative_gt / self.n_negative, self.negative_ge / self.n_negative
        pro[1:-2:2], pro[2:-2:2] = self.weight_gt / n_regions, self.weight_ge / n_regions
        # the last real point has every pixel above threshold; then MVTec's padding (0,0) ... (1,1)
        fpr[-2], pro[-2] = 1.0, pro[-3]
        fpr[0] = pro[0] = 0.0
        fpr[-1] = pro[-1] = 1.0
        np.minimum(fpr, 1.0, out=fpr)
        np.minimum(pro, 1.0, out=pro)
        return _area_to_limit(fpr, pro, limit) / limit


def _area_to_limit(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Trapezoid area under (fpr, pro) for fpr ≤ limit, as MVTec's `trapezoid(x, y, x_max)` computes it."""
    kept = int(np.searchsorted(fpr, limit, side="right"))  # fpr is sorted: the points with fpr <= limit
    correction = 0.0
    if not np.any(fpr == limit):
        x0, x1, y0, y1 = fpr[kept - 1], fpr[kept], pro[kept - 1], pro[kept]
        pro_at_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        correction = 0.5 * (pro_at_limit + y0) * (limit - x0)
    x, y = fpr[:kept], pro[:kept]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


# ----------------------------------------------------------------------------------------- metrics


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Binary AUROC with sklearn `roc_auc_score` semantics; NaN when a class is missing."""
    labels = np.asarray(labels, dtype=bool)
    scores = _real_scores(scores, "scores")
    if labels.shape != scores.shape or scores.ndim != 1:
        raise InputError(f"labels {labels.shape} and scores {scores.shape} must be 1-D arrays of one length")
    if not np.isfinite(scores).all():
        raise InputError("scores contain NaN or inf: expected finite anomaly scores")
    return _RankedCurve.build(np.sort(scores), scores[labels]).auroc()


def image_scores(maps: np.ndarray) -> np.ndarray:
    """The image-level score of each fused map: its maximum (method.md §7.7)."""
    return np.asarray(maps).reshape(len(maps), -1).max(axis=1)


def image_auroc(gt: GroundTruth, maps: np.ndarray) -> float:
    maps, per_image = _checked_maps(gt, maps)
    return _RankedCurve.build(np.sort(per_image), per_image[gt.image_labels]).auroc()


def aupro(gt: GroundTruth, maps: np.ndarray, limit: float = PRO_LIMIT) -> float:
    _check_limit(limit)
    return _pixel_curve(gt, _checked_maps(gt, maps)[0]).aupro(gt.n_regions, limit)


def pixel_auroc(gt: GroundTruth, maps: np.ndarray) -> float:
    return _pixel_curve(gt, _checked_maps(gt, maps)[0]).auroc()


def pixel_ap(gt: GroundTruth, maps: np.ndarray) -> float:
    return _pixel_curve(gt, _checked_maps(gt, maps)[0]).average_precision()


def pixel_f1_max(gt: GroundTruth, maps: np.ndarray) -> float:
    return _pixel_curve(gt, _checked_maps(gt, maps)[0]).f1_max()


def evaluate(
    gt: GroundTruth,
    maps: np.ndarray,
    *,
    limit: float = PRO_LIMIT,
    extended: bool = True,
    seg_threshold: float | None = None,
) -> dict[str, float]:
    """All metrics of one fused map stack (N, H, W) against `gt`, keyed by `EXTENDED_METRIC_NAMES` (the
    paper's `METRIC_NAMES` alone with `extended=False`); undefined ones are NaN. SegF1 binarises at
    `seg_threshold`, by default `segmentation_threshold` of the stack's own normal images (right for
    validation data; on a test set pass the validation one, or NaN). One sort serves every pixel metric."""
    _check_limit(limit)
    maps, per_image = _checked_maps(gt, maps)
    pixels = _pixel_curve(gt, maps)
    values = {
        "image_auroc": _RankedCurve.build(np.sort(per_image), per_image[gt.image_labels]).auroc(),
        "aupro": pixels.aupro(gt.n_regions, limit),
        "pixel_auroc": pixels.auroc(),
        "pixel_ap": pixels.average_precision(),
        "pixel_f1_max": pixels.f1_max(),
    }
    if extended:
        values["aupro_05"] = pixels.aupro(gt.n_regions, PRO_LIMIT_LOW)
        if seg_threshold is None:
            seg_threshold = segmentation_threshold(maps, ~gt.image_labels)
        values["seg_f1"] = _seg_f1(gt, maps, seg_threshold)
    return values


def segmentation_threshold(
    maps: np.ndarray, normal: np.ndarray | None = None, sigmas: float = SEG_THRESHOLD_SIGMAS
) -> float:
    """The SegF1 threshold: mean + `sigmas`·std of `normal_pixel_stats` (MVTec's baseline k = 3)."""
    mean, std = normal_pixel_stats(maps, normal)
    return mean + sigmas * std


def normal_pixel_stats(maps: np.ndarray, normal: np.ndarray | None = None) -> tuple[float, float]:
    """Mean and std (population, in float64) of every pixel of the maps of the normal images (`normal`, bool
    per image; default all): SegF1's threshold for any k. NaN without a normal image."""
    maps = _real_scores(maps, "maps")
    chosen = [maps[i] for i in range(len(maps)) if normal is None or bool(normal[i])]
    if not chosen or sum(m.size for m in chosen) == 0:
        return math.nan, math.nan
    # per image its mean and sum of squared deviations, combined exactly (Chan et al.'s pairwise update)
    sizes = np.array([m.size for m in chosen], dtype=np.float64)
    means = np.array([m.mean(dtype=np.float64) for m in chosen])
    squares = np.array([m.var(dtype=np.float64) for m in chosen]) * sizes
    mean = float(np.dot(sizes, means) / sizes.sum())
    variance = float((squares.sum() + np.dot(sizes, (means - mean) ** 2)) / sizes.sum())
    if not (math.isfinite(mean) and math.isfinite(variance)):
        raise InputError("maps contain NaN or inf: expected finite anomaly scores")
    return mean, math.sqrt(variance)


def seg_f1(gt: GroundTruth, maps: np.ndarray, threshold: float) -> float:
    """MVTec AD 2's SegF1: F1 of the pixels scoring strictly above `threshold` against the defect pixels,
    every image's pixels pooled; NaN without a defect pixel or a (finite) threshold."""
    return _seg_f1(gt, _checked_maps(gt, maps)[0], threshold)


def _seg_f1(gt: GroundTruth, maps: np.ndarray, threshold: float) -> float:
    if gt.n_defect_pixels == 0 or not math.isfinite(threshold):
        return math.nan
    predicted = int(np.count_nonzero(maps > threshold))
    hits = int(np.count_nonzero(maps.ravel()[gt.defect_index] > threshold))
    return 2 * hits / (predicted + gt.n_defect_pixels)


def per_kind(masks: np.ndarray, maps: np.ndarray, kinds: Sequence[str]) -> dict[str, dict[str, float | int]]:
    """Image and pixel AUROC of each defect kind, for the kinds a mean hides (a model may find every stain and
    no scratch): the kind's anomalous images against every normal image (one without a defect pixel), and the
    pixels of those images. `kinds`: one name per image (`tfsearch.data.datasets.defect_kind`), keys sorted.
    Each value holds `anomalous` (the kind's anomalous images), `image_auroc` and `pixel_auroc`."""
    masks = np.asarray(masks)
    if len(kinds) != len(masks):
        raise InputError(f"{len(kinds)} defect kinds for {len(masks)} masks: expected one kind per image")
    kinds = np.asarray(kinds, dtype=object)
    normal = ~masks.reshape(len(masks), -1).any(axis=1)
    result = {}
    for kind in sorted(set(kinds[~normal])):
        chosen = normal | (kinds == kind)
        gt = GroundTruth.from_masks(masks[chosen])
        chosen_maps = np.asarray(maps)[chosen]
        result[kind] = {
            "anomalous": int(np.count_nonzero(chosen & ~normal)),
            "image_auroc": image_auroc(gt, chosen_maps),
            "pixel_auroc": pixel_auroc(gt, chosen_maps),
        }
    return result


def _pixel_curve(gt: GroundTruth, maps: np.ndarray) -> _RankedCurve:
    flat = maps.ravel()
    return _RankedCurve.build(np.sort(flat), flat[gt.defect_index], gt.region_weight)


def _checked_maps(gt: GroundTruth, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`maps` as a real array of the ground truth's shape, and each map's maximum; NaN or inf is an error."""
    maps = _real_scores(maps, "maps")
    if maps.shape != gt.shape:
        raise InputError(f"maps have shape {maps.shape} but the ground truth has {gt.shape}: expected equal")
    per_image = image_scores(maps)
    if not (np.isfinite(per_image).all() and np.isfinite(maps.min())):
        raise InputError("maps contain NaN or inf: expected finite anomaly scores")
    return maps, per_image


def _real_scores(scores: np.ndarray, name: str) -> np.ndarray:
    """Scores as a real array that sorts fast; float16 is widened to float32, which keeps every value."""
    scores = np.asarray(scores)
    if scores.dtype == np.float16:
        return scores.astype(np.float32)
    if scores.dtype.kind not in "fiu":
        raise InputError(f"{name} must hold real numbers, got dtype {scores.dtype}")
    return scores


def _check_limit(limit: float) -> None:
    if not 0.0 < limit <= 1.0:
        raise InputError(f"limit (the AUPRO FPR limit) must be in (0, 1], got {limit}")
