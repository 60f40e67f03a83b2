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
PRO_LIMIT = 0.3
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

    def undefined_reasons(self) -> dict[str, str]:
        """Metric name -> why it is undefined (NaN) for this ground truth; empty when all are defined."""
        reasons: dict[str, str] = {}
        n_anomalous = int(self.image_labels.sum())
        if n_anomalous == 0:
            reasons = dict.fromkeys(METRIC_NAMES, "no anomalous image")
        elif n_anomalous == len(self.image_labels):
            reasons["image_auroc"] = "no normal image"
        if n_anomalous and self.n_normal_pixels == 0:
            reasons["aupro"] = reasons["pixel_auroc"] = "no normal pixel"
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


def evaluate(gt: GroundTruth, maps: np.ndarray, *, limit: float = PRO_LIMIT) -> dict[str, float]:
    """All metrics of one fused map stack (N, H, W) against `gt`, keyed by `METRIC_NAMES`; undefined ones
    are NaN. One value sort of all pixels (plus a sort of the defect pixels) serves every pixel metric."""
    _check_limit(limit)
    maps, per_image = _checked_maps(gt, maps)
    pixels = _pixel_curve(gt, maps)
    return {
        "image_auroc": _RankedCurve.build(np.sort(per_image), per_image[gt.image_labels]).auroc(),
        "aupro": pixels.aupro(gt.n_regions, limit),
        "pixel_auroc": pixels.auroc(),
        "pixel_ap": pixels.average_precision(),
        "pixel_f1_max": pixels.f1_max(),
    }


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
