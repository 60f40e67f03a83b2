"""Fusion of the two raw maps into the final one: the n×n mean filter, the λ blend, and the exact image
scores of every λ at once.

The mean filter is linear, so f_n(λ·A + (1−λ)·B) = λ·f_n(A) + (1−λ)·f_n(B) (method.md §7.6): `MapFuser`
filters each raw map stack once per kernel size and blends per λ. For a fixed (milestone, n) an image's score,
the maximum of its fused map, lies on the upper convex hull of its pixels' (M_disc, M_recon) points, so
`image_maxima` scores every λ exactly from a few hull candidates per image."""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from tfsearch.errors import InputError

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
