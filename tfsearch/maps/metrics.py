"""The paper's metrics on fused anomaly maps, exact and fast enough to score thousands of candidates.

A selection search scores many (epoch, λ, n) candidates of one category against the same ground truth, so:

- everything that depends only on the ground truth (8-connected regions, the 1/|region| weight of each defect
  pixel, the counts used for normalisation) is computed once, in `GroundTruth.from_masks`;
- `MapFuser` filters each raw map stack once per kernel size and blends per λ; the mean filter is linear, so
  f_n(λ·A + (1−λ)·B) = λ·f_n(A) + (1−λ)·f_n(B) (method.md §7.6). Fused maps are float32;
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
import os
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
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
    """Image and pixel AUROC of each defect kind, for the kinds a mean hides (a model may find every stain
    and no scratch): the kind's anomalous images against every normal image (one without a defect pixel),
    and the pixels of those images. `kinds`: one name per image (`tfsearch.data.datasets.defect_kind`), keys sorted.
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


# ------------------------------------------------------------------------------------------ fusion


# images per block of the integral-image filter: a block's float64 integral images stay in the CPU's cache
FILTER_BLOCK = 8


def mean_filter(maps: np.ndarray, kernel: int) -> np.ndarray:
    """n×n zero-padded mean of every map of a stack (N, H, W): `convolve2d(m, ones((n, n)) / n², "same")`.

    From each map's integral image in float64 (`_box_sums`), so the cost does not grow with n and every box
    sum of float16 maps is exact (their values are multiples of 2^-24 and 2^17 of them fit in 53 bits); the
    mean is then rounded once to float32. float16/float32 maps give float32, float64 maps give float64.
    """
    _check_kernel(kernel)
    maps = _check_stack(maps)
    out = np.empty(maps.shape, dtype=np.result_type(maps.dtype, np.float32))
    box = _BoxSums(maps.shape[1:], kernel // 2, min(FILTER_BLOCK, len(maps)))
    for start in range(0, len(maps), FILTER_BLOCK):
        integral = box.integral(maps[start : start + FILTER_BLOCK])
        sums = _box_sums(integral, kernel, box.pad, box.bands[: len(integral)], box.sums[: len(integral)])
        out[start : start + len(integral)] = _means(sums, kernel, out.dtype)
    return out


class _BoxSums:
    """Buffers of the integral-image filter for blocks of maps (B, H, W) and any n up to 2·pad + 1, reused by
    every block (fresh large arrays cost page faults on every block)."""

    def __init__(self, shape: tuple[int, int], pad: int, block: int) -> None:
        height, width = shape
        self.pad = pad
        # integral image with a zero first row and column, edge-padded by `pad`: a window reaching past the
        # map sums only what lies inside it (zero padding)
        self._integral = np.zeros((block, height + 1 + 2 * pad, width + 1 + 2 * pad))
        self.bands = np.empty((block, height + 1 + 2 * pad, width))
        self.sums = np.empty((block, height, width))

    def integral(self, maps: np.ndarray) -> np.ndarray:
        """The padded integral images of a block of maps (a view of the buffer, valid until the next call)."""
        count, height, width = maps.shape
        pad = self.pad
        padded = self._integral[:count]
        inside = padded[:, pad + 1 : pad + 1 + height, pad + 1 : pad + 1 + width]
        _integral_image(maps, inside)
        padded[:, pad + 1 + height :] = padded[:, pad + height : pad + height + 1]
        padded[:, :, pad + 1 + width :] = padded[:, :, pad + width : pad + width + 1]
        return padded


def _box_sums(integral: np.ndarray, kernel: int, pad: int, bands: np.ndarray, out: np.ndarray) -> np.ndarray:
    """n×n box sums (..., H, W) from padded integral images (..., H+1+2·pad, W+1+2·pad) into `out`: first the
    column differences (each row's running sum of its n-wide band of columns, into `bands`), then their row
    differences. Each sum is the same float64 operations wherever it is computed, one map or a block, so
    `mean_filter` and `image_maxima` agree bit for bit."""
    height, width = out.shape[-2:]
    low, high = pad - kernel // 2, pad + kernel // 2 + 1
    rows = slice(low, high + height)
    bands = bands[..., : height + kernel, :]
    np.subtract(integral[..., rows, high : high + width], integral[..., rows, low : low + width], out=bands)
    return np.subtract(bands[..., kernel:, :], bands[..., :height, :], out=out)


def _means(sums: np.ndarray, kernel: int, dtype: np.dtype) -> np.ndarray:
    """Box sums to means, rounded to `dtype`: elementwise, so a subset of the sums gives the same values."""
    return np.multiply(sums, 1.0 / (kernel * kernel), dtype=dtype)


def _integral_image(maps: np.ndarray, out: np.ndarray) -> None:
    """Cumulative sums over rows and columns of maps (B, H, W) into float64 `out`: running sums of whole rows
    (a row add costs ~1 ns a value, numpy's cumsum down the rows ~10), then numpy's cumsum along each row, in
    place (as fast as a row add, and the same additions in the same order as a loop over columns)."""
    out[:, 0] = maps[:, 0]
    for row in range(1, maps.shape[1]):
        np.add(out[:, row - 1], maps[:, row], out=out[:, row])
    np.cumsum(out, axis=2, out=out)


def _check_stack(maps: np.ndarray) -> np.ndarray:
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise InputError(f"maps must be a stack (N, H, W), got shape {maps.shape}")
    return maps


def fuse(m_disc: np.ndarray, m_recon: np.ndarray, lam: float, kernel: int) -> np.ndarray:
    """The final map of Eq. 10: λ·f_n(M_disc) + (1−λ)·f_n(M_recon) (method.md §7.6)."""
    _check_lam(lam)
    _check_pair(m_disc, m_recon)
    return _blend(mean_filter(m_disc, kernel), mean_filter(m_recon, kernel), lam)


class MapFuser:
    """Fused maps of one map stack pair for many (λ, n): each raw stack is filtered once per n.

    The filtered stacks of the `cached_kernels` most recently used sizes are kept (two float32 stacks each);
    the numbers equal `fuse` bit for bit.
    """

    def __init__(self, m_disc: np.ndarray, m_recon: np.ndarray, *, cached_kernels: int = 3) -> None:
        _check_pair(m_disc, m_recon)
        self.m_disc, self.m_recon = m_disc, m_recon
        self._cached_kernels = max(1, cached_kernels)
        self._filtered: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def filtered(self, kernel: int) -> tuple[np.ndarray, np.ndarray]:
        """(f_n(M_disc), f_n(M_recon)), computed on first use."""
        if kernel in self._filtered:
            self._filtered.move_to_end(kernel)
            return self._filtered[kernel]
        pair = mean_filter(self.m_disc, kernel), mean_filter(self.m_recon, kernel)
        self._filtered[kernel] = pair
        while len(self._filtered) > self._cached_kernels:
            self._filtered.popitem(last=False)
        return pair

    def fuse(self, lam: float, kernel: int) -> np.ndarray:
        _check_lam(lam)
        return _blend(*self.filtered(kernel), lam)


# ------------------------------------------------------------------------------- exact image scores
# float32 rounding of a blend λ·a + (1−λ)·b, relative to the image's largest |value|: `_blend` rounds λ, 1−λ,
# both products and their sum (≤ 4 units of 2^-24); candidates are kept within twice that plus a margin
_BLEND_TOLERANCE = 32 * 2.0**-24
# what the chord test (≤ 4 units of 2^-24) and the rounding of a box sum to its mean (≤ 3) can move a
# value, relative to the image's largest |value|, with room for the float64 rounding of the prefilter bound
_PREFILTER_MARGIN = 32 * 2.0**-24


@dataclass(frozen=True)
class ImageMaxima:
    """Per image of one (milestone, n), the few filtered (a, b) = (f_n(M_disc), f_n(M_recon)) points that can
    hold the image score max over pixels of λ·a + (1−λ)·b for some λ in [0, 1]; any λ then costs a blend of
    those points instead of a pass over every pixel, with the very numbers `fuse` then max gives."""

    disc: np.ndarray  # filtered M_disc of the kept points, image after image
    recon: np.ndarray  # filtered M_recon of the same points
    starts: np.ndarray  # int64 (N,): each image's first kept point

    def scores(self, lam: float) -> np.ndarray:
        """Image scores at λ, bit for bit `image_scores(fuse(m_disc, m_recon, λ, n))`."""
        _check_lam(lam)
        return np.maximum.reduceat(_blend(self.disc, self.recon, lam), self.starts)

    @property
    def points(self) -> int:
        return int(self.disc.size)


def image_maxima(m_disc: np.ndarray, m_recon: np.ndarray, kernels: tuple[int, ...]) -> dict[int, ImageMaxima]:
    """`ImageMaxima` of every kernel size, from one integral image per map.

    The maximum over pixels of λ·a + (1−λ)·b lies on the upper-right convex hull of the image's (a, b) points.
    Of each image this keeps the largest-a point P1, the largest-b point P2 and the points on or above the
    chord P1–P2 within the rounding tolerance: a point below it by more that P1 and P2 do not dominate scores
    below one of them at every λ, and a dominated point (a and b no larger than another's) never scores
    above its dominator, rounding included, as rounding is monotone. Of those it keeps the non-dominated
    frontier: the hull plus the points a rounding could lift to the maximum, a handful per image.

    The images are split among the threads the process may use (`OMP_NUM_THREADS`, as in a Ray task, else
    every CPU it may run on); numpy releases the GIL in the whole-map operations.
    """
    _check_pair(m_disc, m_recon)
    for kernel in kernels:
        _check_kernel(kernel)
    count = len(m_disc)
    threads = max(1, min(usable_cpus(), count))
    bounds = np.linspace(0, count, threads + 1).astype(int)
    with ThreadPoolExecutor(threads) as pool:
        shares = list(
            pool.map(
                lambda first, last: _share_maxima(m_disc[first:last], m_recon[first:last], kernels),
                bounds[:-1],
                bounds[1:],
            )
        )
    maxima = {}
    for kernel in kernels:
        parts = [part for share in shares for part in share[kernel]]
        disc, recon, counts = (np.concatenate(column) for column in zip(*parts, strict=True))
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        maxima[kernel] = ImageMaxima(disc, recon, starts)
    return maxima


def usable_cpus() -> int:
    """CPUs this process may use: `OMP_NUM_THREADS` where set (Ray sets it to a task's CPUs), else the
    CPUs it may run on."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _share_maxima(m_disc: np.ndarray, m_recon: np.ndarray, kernels: tuple[int, ...]) -> dict[int, list]:
    """Per kernel, one (a, b, [count]) triple per image of a share of the images, block by block."""
    parts: dict[int, list] = {kernel: [] for kernel in kernels}
    if not len(m_disc):
        return parts
    pad = max(kernels) // 2
    shape, block = m_disc.shape[1:], min(FILTER_BLOCK, len(m_disc))
    boxes = _BoxSums(shape, pad, block), _BoxSums(shape, pad, block)
    dtypes = np.result_type(m_disc.dtype, np.float32), np.result_type(m_recon.dtype, np.float32)
    for start in range(0, len(m_disc), FILTER_BLOCK):
        disc, recon = m_disc[start : start + FILTER_BLOCK], m_recon[start : start + FILTER_BLOCK]
        # a zero-padded mean is no larger in magnitude than the map's largest |value|: the rounding scale
        scale = np.maximum(_largest_magnitude(disc), _largest_magnitude(recon))
        integrals = boxes[0].integral(disc), boxes[1].integral(recon)
        for image in range(len(disc)):
            for kernel in kernels:
                sums = [
                    _box_sums(integral[image], kernel, pad, box.bands[0], box.sums[0]).ravel()
                    for integral, box in zip(integrals, boxes, strict=True)
                ]
                parts[kernel].append(_hull_candidates(sums, kernel, dtypes, scale[image]))
    return parts


def _largest_magnitude(maps: np.ndarray) -> np.ndarray:
    """float64 (B,): each map's largest |value|; NaN or inf is an error."""
    flat = np.asarray(maps, dtype=np.result_type(maps.dtype, np.float32)).reshape(len(maps), -1)
    scale = np.maximum(flat.max(axis=1), -flat.min(axis=1)).astype(np.float64)
    if not np.isfinite(scale).all():
        raise InputError("maps contain NaN or inf: expected finite anomaly scores")
    return scale


def _hull_candidates(
    sums: list[np.ndarray], kernel: int, dtypes: tuple[np.dtype, np.dtype], scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, [count]) of the points of one image that can hold its maximum, from the flat box sums of its
    two maps; `scale` bounds the image's |a| and |b|.

    Means are computed only for the pixels a prefilter lets through. Rounding a sum to its mean is monotone,
    so the largest sums hold the largest a and b (P1, P2). A point that passes the chord test,
    w·a + (1−w)·b ≥ level, has b ≤ b2, so w·a ≥ level − (1−w)·b2 up to the rounding of the test and of its
    mean (`_PREFILTER_MARGIN`); with w ≥ ½ that bounds its sum of M_disc from below, else (symmetrically,
    a ≤ a1) its sum of M_recon. The prefilter drops only points the chord test drops.
    """
    (disc_dtype, recon_dtype), (disc_sums, recon_sums) = dtypes, sums
    # P1 and P2: the largest a, the largest b (an argmax of the sums is one of the mean)
    p1, p2 = int(disc_sums.argmax()), int(recon_sums.argmax())
    a1, a2 = _means(disc_sums[[p1, p2]], kernel, disc_dtype).astype(np.float64)
    b1, b2 = _means(recon_sums[[p1, p2]], kernel, recon_dtype).astype(np.float64)
    rise, run = b2 - b1, a1 - a2  # a2 <= a1, b1 <= b2
    # λ* where P1 and P2 blend equal (0.5 when they coincide: then nothing passes the dominance test)
    weight = rise / (rise + run) if rise + run > 0 else 0.5
    level = weight * a1 + (1.0 - weight) * b1 - _BLEND_TOLERANCE * scale
    margin, area = _PREFILTER_MARGIN * scale, kernel * kernel
    if weight >= 0.5:
        passed = disc_sums >= area * (level - (1.0 - weight) * b2 - margin) / weight
    else:
        passed = recon_sums >= area * (level - weight * a1 - margin) / (1.0 - weight)
    passed[[p1, p2]] = True
    pixel = np.flatnonzero(passed)
    a = _means(disc_sums[pixel], kernel, disc_dtype)
    b = _means(recon_sums[pixel], kernel, recon_dtype)
    chord = b * recon_dtype.type(1.0 - weight)
    chord += a * disc_dtype.type(weight)
    keep = chord >= level
    keep[np.searchsorted(pixel, [p1, p2])] = True
    a, b = a[keep], b[keep]
    # non-dominated frontier: a descending (b descending among equal a), a point stays when its b exceeds
    # every b before it (equal points: the first stays)
    order = np.lexsort((-b, -a))
    ordered = b[order]
    best_before = np.maximum.accumulate(np.concatenate(([-np.inf], ordered[:-1])))
    frontier = np.sort(order[ordered > best_before])  # pixel order
    return a[frontier], b[frontier], np.array([frontier.size])


def _blend(filtered_disc: np.ndarray, filtered_recon: np.ndarray, lam: float) -> np.ndarray:
    fused = np.multiply(filtered_disc, lam, dtype=filtered_disc.dtype)
    fused += np.multiply(filtered_recon, 1.0 - lam, dtype=filtered_recon.dtype)
    return fused


def _check_lam(lam: float) -> None:
    if not 0.0 <= lam <= 1.0:
        raise InputError(f"lam (the weight of M_disc) must be in [0, 1], got {lam}")


def _check_kernel(kernel: int) -> None:
    if isinstance(kernel, bool) or not isinstance(kernel, (int, np.integer)) or kernel < 1 or kernel % 2 == 0:
        raise InputError(f"kernel (the mean-filter size n) must be an odd positive integer, got {kernel!r}")


def _check_pair(m_disc: np.ndarray, m_recon: np.ndarray) -> None:
    if np.ndim(m_disc) != 3 or np.shape(m_disc) != np.shape(m_recon):
        raise InputError(
            f"m_disc and m_recon must be map stacks (N, H, W) of one shape, got {np.shape(m_disc)} and "
            f"{np.shape(m_recon)}"
        )
