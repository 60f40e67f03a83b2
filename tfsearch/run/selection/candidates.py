"""Candidates of the selection search and the cached maps they are scored on.

A candidate (`Candidate`) is one evaluation-time configuration of a trained model: (model, epoch, λ, n) and k,
the number of standard deviations in SegF1's threshold. No candidate trains anything. A candidate is scored
on its selection metric only when that is image AUROC or SegF1; the pixel metrics are computed for the
default and the selected candidate (and for every candidate with `all_metrics: true`).
Image AUROC, the usual selection metric, is exact and cheap: each milestone's maps are filtered once for every
n of the space and reduced to the few points per image that can hold its maximum (`ImageMaxima`), after which
any λ costs microseconds. Pixel metrics go through `MapFuser`, whose filtered maps are cached per milestone.

With several training seeds per category (`--seeds K`) a candidate is scored on every seed's maps and its
metrics, hence the objective, are the mean over the seeds (`SeedMeans`).

Every full evaluation also gives MVTec AD 2's metrics (AUPRO to FPR 0.05 and SegF1). SegF1's threshold is
`segmentation_threshold` (mean + k std) of the normal images of the validation maps at the same
configuration whenever the training run wrote validation maps (`--select-on val`): the selection split's
own, and for the test split the `val` maps beside it, so no test label sets it. Only a run without
validation data (the oracle protocol) takes it from the test set's own normal images.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tfsearch.errors import InputError
from tfsearch.maps.cache import read_map_set
from tfsearch.maps.fusion import ImageMaxima, MapFuser, image_maxima, usable_cpus
from tfsearch.maps.metrics import (
    EXTENDED_METRIC_NAMES,
    SEG_THRESHOLD_SIGMAS,
    GroundTruth,
    auroc,
    evaluate,
    normal_pixel_stats,
    seg_f1,
)
from tfsearch.maps.segmentation import threshold_maps_dir

# pixels in one milestone's maps from which its image-score points are worth a worker process of their own
# (one starts in ~0.4 s; 200 maps of 256² take ~0.5 s on one core)
WORKER_MIN_PIXELS = 1 << 22


@dataclass(frozen=True)
class Candidate:
    """One evaluation-time configuration of a trained model."""

    model: str  # training configuration id ("default" unless training hyperparameters are searched)
    epoch: int
    lam: float
    kernel: int
    seg_sigmas: float = SEG_THRESHOLD_SIGMAS  # SegF1's threshold: mean + k std of normal validation pixels

    def as_params(self) -> dict:
        return {
            "model": self.model,
            "epoch": self.epoch,
            "lam": self.lam,
            "kernel": self.kernel,
            "seg_sigmas": self.seg_sigmas,
        }


class CategoryMaps:
    """Cached maps of one category on one split, for every (model, milestone) a training run reached."""

    def __init__(
        self,
        maps_dirs: dict[tuple[str, int], Path],
        kernels: tuple[int, ...] = (),
        cached_milestones: int = 4,
    ) -> None:
        if not maps_dirs:
            raise InputError("no cached maps to select from: no training milestone finished")
        self.maps_dirs = dict(maps_dirs)
        first = read_map_set(next(iter(self.maps_dirs.values())))
        self.ground_truth = GroundTruth.from_masks(np.asarray(first.masks))
        self.image_ids = list(first.image_ids)
        self.split = first.meta.get("split")
        self.kernels = tuple(sorted(set(kernels)))  # filtered together when a milestone is first scored
        self._fusers: OrderedDict[tuple[str, int], MapFuser] = OrderedDict()
        self._cached = cached_milestones
        self._maxima: dict[tuple[str, int], dict[int, ImageMaxima]] = {}
        # the validation maps of each milestone that sets SegF1's threshold: (fuser, normal images)
        self._threshold_maps: dict[tuple[str, int], tuple[MapFuser, np.ndarray] | None] = {}
        # the last configuration's fused maps and threshold statistics: the k values of one (model, epoch, λ,
        # n) fuse and reduce its maps once
        self._last: tuple[tuple, np.ndarray, tuple[float, float]] | None = None

    def _maps_dir(self, model: str, epoch: int) -> Path:
        if (model, epoch) not in self.maps_dirs:
            raise InputError(f"no cached maps for model {model!r} at epoch {epoch}")
        return self.maps_dirs[model, epoch]

    def _check_images(self, maps_dir: Path, image_ids: list[str]) -> None:
        if list(image_ids) != self.image_ids:
            raise InputError(f"{maps_dir}: its images differ from the other milestones'")

    def _maps(self, model: str, epoch: int):
        maps_dir = self._maps_dir(model, epoch)
        maps = read_map_set(maps_dir)
        self._check_images(maps_dir, maps.image_ids)
        return maps

    def fuser(self, model: str, epoch: int) -> MapFuser:
        key = (model, epoch)
        if key not in self._fusers:
            maps = self._maps(model, epoch)
            self._fusers[key] = MapFuser(maps.m_disc, maps.m_recon)
            while len(self._fusers) > self._cached:
                self._fusers.popitem(last=False)
        self._fusers.move_to_end(key)
        return self._fusers[key]

    def maxima(self, model: str, epoch: int, kernel: int) -> ImageMaxima:
        """Image-score points of one (milestone, n); a milestone's first use filters every n of the space."""
        tables = self._maxima.setdefault((model, epoch), {})
        if kernel not in tables:
            maps = self._maps(model, epoch)
            missing = tuple(sorted({kernel, *self.kernels} - set(tables)))
            tables.update(image_maxima(maps.m_disc, maps.m_recon, missing))
        return tables[kernel]

    def prepare_maxima(self, checkpoints: list[tuple[str, int]]) -> None:
        """The image-score points of every n of the space at each of `checkpoints`, ahead of their candidates.

        Where this process may use several CPUs and the maps are large, the milestones are reduced in
        parallel by worker processes, one thread each, that read their own maps and send back only the few
        points per image (threads over one milestone's images share the GIL between the whole-map passes).
        Otherwise `maxima` reduces each milestone on first use."""
        pending = [key for key in checkpoints if not set(self.kernels) <= set(self._maxima.get(key, {}))]
        workers = min(usable_cpus(), len(pending))
        if workers < 2 or math.prod(self.ground_truth.shape) < WORKER_MIN_PIXELS:
            return
        dirs = [self._maps_dir(*key) for key in pending]
        context = multiprocessing.get_context("spawn")  # forking a process that runs threads can deadlock
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_one_thread) as pool:
            reduced = pool.map(_milestone_maxima, dirs, [self.kernels] * len(dirs))
            for key, maps_dir, (image_ids, tables) in zip(pending, dirs, reduced, strict=True):
                self._check_images(maps_dir, image_ids)
                self._maxima.setdefault(key, {}).update(tables)

    def image_auroc(self, candidate: Candidate) -> float:
        scores = self.maxima(candidate.model, candidate.epoch, candidate.kernel).scores(candidate.lam)
        return auroc(self.ground_truth.image_labels, scores)

    def configuration(self, candidate: Candidate) -> tuple[np.ndarray, tuple[float, float]]:
        """A configuration's fused maps and the (mean, std) of the normal pixels its SegF1 threshold is made
        of: of the validation maps beside these maps when the run has them and these are not they
        (`threshold_maps_dir`), else of these maps' own normal images. The last configuration's are kept
        for the next k of the same (λ, n)."""
        key = (candidate.model, candidate.epoch, candidate.lam, candidate.kernel)
        if self._last is None or self._last[0] != key:
            fused = self.fuser(candidate.model, candidate.epoch).fuse(candidate.lam, candidate.kernel)
            source = self._threshold_source(candidate.model, candidate.epoch)
            if source is None:
                stats = normal_pixel_stats(fused, ~self.ground_truth.image_labels)
            else:
                fuser, normal = source
                stats = normal_pixel_stats(fuser.fuse(candidate.lam, candidate.kernel), normal)
            self._last = (key, fused, stats)
        return self._last[1], self._last[2]

    def _threshold_source(self, model: str, epoch: int) -> tuple[MapFuser, np.ndarray] | None:
        """The validation maps beside a milestone's maps (a fuser and their normal images), or None."""
        key = (model, epoch)
        if key not in self._threshold_maps:
            source = threshold_maps_dir(self._maps_dir(*key))
            if source is None:
                self._threshold_maps[key] = None
            else:
                maps = read_map_set(source)
                normal = ~maps.masks.any(axis=(1, 2))
                self._threshold_maps[key] = (MapFuser(maps.m_disc, maps.m_recon), normal)
        return self._threshold_maps[key]

    def evaluate(self, candidate: Candidate) -> dict[str, float]:
        """Every metric of a configuration (the pixel metrics need the full fused maps), MVTec AD 2's too."""
        fused, (mean, std) = self.configuration(candidate)
        return evaluate(self.ground_truth, fused, seg_threshold=mean + candidate.seg_sigmas * std)

    def candidate_metrics(
        self, candidate: Candidate, metric: str, all_metrics: bool = False
    ) -> dict[str, float]:
        """What a candidate records: image AUROC alone (exact, cheap) or SegF1 alone (one pass over the
        pixels) when it is the selection metric, else every metric (the pixel metrics share one sort)."""
        if metric == "image_auroc" and not all_metrics:
            return {"image_auroc": self.image_auroc(candidate)}
        if metric == "seg_f1" and not all_metrics:
            fused, (mean, std) = self.configuration(candidate)
            return {"seg_f1": seg_f1(self.ground_truth, fused, mean + candidate.seg_sigmas * std)}
        return self.evaluate(candidate)


def _one_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"  # `image_maxima` splits its images among this many threads


def _milestone_maxima(maps_dir: Path, kernels: tuple[int, ...]) -> tuple[list[str], dict[int, ImageMaxima]]:
    """In a worker process: one milestone's image ids and the image-score points of each n."""
    maps = read_map_set(maps_dir)
    return list(maps.image_ids), image_maxima(maps.m_disc, maps.m_recon, kernels)


def mean_metrics(per_category: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted mean over categories, as the paper averages (or over a category's seeds); undefined values
    are left out."""
    return _over_runs(per_category, np.mean, least=1)


def std_metrics(per_seed: dict[int, dict[str, float]]) -> dict[str, float]:
    """Sample standard deviation (ddof 1) over a category's seeds; undefined values are left out, and fewer
    than two defined values give NaN."""
    return _over_runs(per_seed, lambda values: np.std(values, ddof=1), least=2)


def _over_runs(runs: dict, reduce, least: int) -> dict[str, float]:
    """Each metric some run has, reduced over the runs that define it (NaN with fewer than `least`)."""
    reduced = {}
    for name in EXTENDED_METRIC_NAMES:
        if any(name in m for m in runs.values()):
            values = [m[name] for m in runs.values() if not math.isnan(m.get(name, math.nan))]
            reduced[name] = float(reduce(values)) if len(values) >= least else float("nan")
    return reduced


class SeedMeans:
    """A category trained with several seeds, each with its own cached maps (`CategoryMaps`): a candidate
    is scored on every seed's maps and records the mean, so a study ranks configurations by the mean over
    seeds. `per_seed` gives the values the tables take the mean and the spread of."""

    def __init__(self, seeds: dict[int, CategoryMaps]) -> None:
        self.seeds = dict(seeds)

    def per_seed(self, candidate: Candidate) -> dict[int, dict[str, float]]:
        """Every metric of a configuration on each seed's maps."""
        return {seed: candidates.evaluate(candidate) for seed, candidates in self.seeds.items()}

    def evaluate(self, candidate: Candidate) -> dict[str, float]:
        return mean_metrics(self.per_seed(candidate))

    def prepare_maxima(self, checkpoints: list[tuple[str, int]]) -> None:
        for candidates in self.seeds.values():
            candidates.prepare_maxima(checkpoints)

    def candidate_metrics(
        self, candidate: Candidate, metric: str, all_metrics: bool = False
    ) -> dict[str, float]:
        return mean_metrics(
            {
                seed: candidates.candidate_metrics(candidate, metric, all_metrics)
                for seed, candidates in self.seeds.items()
            }
        )
