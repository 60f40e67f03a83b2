"""Benchmark: the cost of one selection candidate (mean filter + blend + all metrics) on realistic maps.

Side by side, in one run and on the same maps:
- tfsearch, uncached: a fresh `MapFuser` (both stacks filtered) + `evaluate` (exact);
- tfsearch, cached: another λ with the filtered stacks reused, as a search does between λ values;
- the straightforward path: per-image `scipy.signal.convolve2d` in float64, MVTec AD's sort-based AUPRO
  (argsort of every pixel, cumulative sums), sklearn for image / pixel AUROC, AP and the PR curve (F1-max);
- ADEval (`pip install adeval opencv-python-headless`), if importable: binned metrics (1000 strips) on the
  fused maps; its F1-max is not computed.

The ground truth's preparation (`GroundTruth.from_masks`, once per category) is timed apart. Each tfsearch
figure is the median of --repeats runs; the slower paths run once. "max |Δ|" is the largest difference of the
five metrics from tfsearch's exact values; "exactness" recomputes the straightforward metrics on tfsearch's
own fused maps, so only the metric code differs.

Run from the repository root: `python -m bench.metrics [--maps 200 500] [--size 256]`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
from scipy import ndimage
from scipy.signal import convolve2d
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from tfsearch.maps.fusion import MapFuser
from tfsearch.maps.metrics import METRIC_NAMES, GroundTruth, evaluate

try:  # optional: imported up front so that its import time is not timed
    import adeval

    if not hasattr(np, "trapz"):  # ADEval 1.1 calls np.trapz, which NumPy 2 removed
        np.trapz = np.trapezoid
except ImportError:
    adeval = None

LAM, KERNEL, LIMIT = 0.95, 7, 0.3


def synthetic_maps(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(m_disc, m_recon, masks) like a trained model's: smooth backgrounds, the first half of the images with
    1-3 elliptic defects that both maps see imperfectly, and some false-positive blobs on normal images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), dtype=bool)
    for image in range(n // 2):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(size / 60, size / 8, 2)
            masks[image] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    smooth_noise = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), (0, 4, 4))
    smooth_noise /= smooth_noise.std()
    blobs = ndimage.gaussian_filter(masks.astype(np.float64), (0, 2, 2))
    false_alarms = ndimage.gaussian_filter((rng.random((n, size, size)) < 2e-4).astype(np.float64), (0, 3, 3))
    strength = rng.uniform(0.2, 1.0, (n, 1, 1))
    m_disc = np.clip(0.04 + 0.03 * smooth_noise + strength * blobs + 20 * false_alarms, 0, 1)
    m_recon = np.clip(
        0.02 * np.abs(smooth_noise) + 0.1 * strength * blobs + rng.random((n, size, size)) * 0.01, 0, 1
    )
    return m_disc.astype(np.float16), m_recon.astype(np.float16), masks


# ------------------------------------------------------------------------------------ straightforward


def straightforward_fuse(m_disc: np.ndarray, m_recon: np.ndarray) -> np.ndarray:
    """The original code's order: each map filtered by convolve2d in float64, then blended."""
    kernel = np.ones((KERNEL, KERNEL)) / KERNEL**2
    fused = np.empty(m_disc.shape, dtype=np.float64)
    for index, (disc, recon) in enumerate(zip(m_disc, m_recon, strict=True)):
        filtered_disc = convolve2d(disc.astype(np.float64), kernel, mode="same")
        filtered_recon = convolve2d(recon.astype(np.float64), kernel, mode="same")
        fused[index] = LAM * filtered_disc + (1 - LAM) * filtered_recon
    return fused


def mvtec_aupro(maps: np.ndarray, masks: np.ndarray) -> float:
    """MVTec AD's sort-based algorithm: per-pixel FP / PRO changes, an argsort of all pixels, cumsums."""
    fp_changes = np.zeros(maps.shape, dtype=np.uint32)
    pro_changes = np.zeros(maps.shape, dtype=np.float64)
    n_normal = n_regions = 0
    for index, mask in enumerate(masks):
        regions, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        n_regions += count
        normal = regions == 0
        n_normal += int(normal.sum())
        fp_changes[index, normal] = 1
        for region in range(1, count + 1):
            inside = regions == region
            pro_changes[index, inside] = 1.0 / inside.sum()
    scores = maps.ravel()
    order = np.argsort(scores)[::-1]
    sorted_scores = scores[order]
    fpr = np.cumsum(fp_changes.ravel()[order]) / n_normal
    pro = np.cumsum(pro_changes.ravel()[order]) / n_regions
    keep = np.append(np.diff(sorted_scores) != 0, True)
    fpr = np.concatenate(([0.0], np.minimum(fpr[keep], 1.0), [1.0]))
    pro = np.concatenate(([0.0], np.minimum(pro[keep], 1.0), [1.0]))
    kept = int(np.searchsorted(fpr, LIMIT, side="right"))
    area = float(np.trapezoid(pro[:kept], fpr[:kept]))
    if fpr[kept - 1] != LIMIT:
        at_limit = np.interp(LIMIT, fpr[kept - 1 : kept + 1], pro[kept - 1 : kept + 1])
        area += 0.5 * (at_limit + pro[kept - 1]) * (LIMIT - fpr[kept - 1])
    return area / LIMIT


def straightforward_metrics(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    labels, scores = masks.ravel(), maps.ravel()
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros_like(precision), where=precision > 0
    )
    return {
        "image_auroc": roc_auc_score(masks.any(axis=(1, 2)), maps.reshape(len(maps), -1).max(axis=1)),
        "aupro": mvtec_aupro(maps, masks),
        "pixel_auroc": roc_auc_score(labels, scores),
        "pixel_ap": average_precision_score(labels, scores),
        "pixel_f1_max": float(f1.max()),
    }


# ------------------------------------------------------------------------------------------- ADEval


def adeval_metrics(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    pixel_auroc, pixel_ap, aupro = adeval.auroc_aupr_aupro(maps, masks.astype(np.uint8))
    image_auroc = adeval.auroc(maps.reshape(len(maps), -1).max(axis=1), masks.any(axis=(1, 2)))
    return {"image_auroc": image_auroc, "aupro": aupro, "pixel_auroc": pixel_auroc, "pixel_ap": pixel_ap}


# ------------------------------------------------------------------------------------------- report


def timed(run: Callable[[], dict[str, float]], repeats: int) -> tuple[float, dict[str, float]]:
    seconds, result = [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def max_difference(result: dict[str, float], exact: dict[str, float]) -> float:
    return max(abs(result[name] - exact[name]) for name in result)


def bench(n: int, size: int, repeats: int) -> None:
    m_disc, m_recon, masks = synthetic_maps(n, size)
    start = time.perf_counter()
    gt = GroundTruth.from_masks(masks)
    prepare = time.perf_counter() - start
    print(
        f"\n{n} maps of {size}x{size}: {gt.n_regions} defect regions, {100 * masks.mean():.2f}% defect pixels"
    )
    print(f"  ground-truth preparation, once per category: {prepare:.3f} s")

    def full_candidate() -> dict[str, float]:
        return evaluate(gt, MapFuser(m_disc, m_recon).fuse(LAM, KERNEL), limit=LIMIT)

    fuser = MapFuser(m_disc, m_recon)
    fuser.filtered(KERNEL)
    fused = fuser.fuse(LAM, KERNEL)
    ours, exact = timed(full_candidate, repeats)
    cached, _ = timed(lambda: evaluate(gt, fuser.fuse(0.9, KERNEL), limit=LIMIT), repeats)
    plain, plain_result = timed(
        lambda: straightforward_metrics(straightforward_fuse(m_disc, m_recon), masks), 1
    )
    exactness = max_difference(straightforward_metrics(fused.astype(np.float64), masks), exact)

    rows = [
        ("tfsearch, full candidate (filter + blend + metrics)", ours, 0.0),
        ("tfsearch, cached filter (blend + metrics)", cached, None),
        ("straightforward (convolve2d, MVTec AUPRO, sklearn)", plain, max_difference(plain_result, exact)),
    ]
    if adeval is not None:
        seconds, result = timed(lambda: adeval_metrics(MapFuser(m_disc, m_recon).fuse(LAM, KERNEL), masks), 1)
        rows.append(
            ("ADEval, 1000 strips, no F1 (+ tfsearch filter, blend)", seconds, max_difference(result, exact))
        )
    print(f"  {'path':<54}{'seconds':>9}{'vs full':>9}{'max |Δ|':>10}")
    for name, seconds, difference in rows:
        delta = "" if difference is None else f"{difference:.1e}"
        print(f"  {name:<54}{seconds:>9.3f}{seconds / ours:>8.1f}x{delta:>10}")
    print(f"  exactness: straightforward metrics on tfsearch's fused maps differ by at most {exactness:.1e}")
    print("  exact values: " + ", ".join(f"{name} {exact[name]:.6f}" for name in METRIC_NAMES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--maps", type=int, nargs="+", default=[200, 500], help="stack sizes (default: 200 500)"
    )
    parser.add_argument("--size", type=int, default=256, help="map side (default: 256)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per tfsearch timing (default: 5)")
    args = parser.parse_args()
    print(f"λ {LAM}, n {KERNEL}, AUPRO limit {LIMIT}; times in seconds")
    for n in args.maps:
        bench(n, args.size, args.repeats)


if __name__ == "__main__":
    main()
