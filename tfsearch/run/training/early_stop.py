"""Early stopping of a category's training (`--patience K`): the rule, and the value it is applied to.

At each milestone a training trial scores the maps of the selection split at the best (λ, n) of the space's
own values, and k where SegF1's threshold is searched (`milestone_best`: a range as the `lam_points` evenly
spaced values the exhaustive sampler tries), so the value is what the selection could choose at that
milestone. Training stops at the milestone that makes K in a row without a strict improvement on the best
value so far (`stop_decision`). The rule is a pure function of the sequence of those values, which the
milestone log keeps: a resumed or retried trial recomputes the same decision from its log, and a run truncated
at a patience-K stop equals the patience-K run.

A value that is NaN (the metric undefined on the split) never improves; milestones before the first defined
value are not counted, so a category whose metric is undefined throughout trains to its last milestone.
Torch-free: it scores cached maps with the selection's own machinery (`CategoryMaps`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tfsearch.maps.metrics import SEG_THRESHOLD_SIGMAS
from tfsearch.run.selection.candidates import Candidate, CategoryMaps


@dataclass(frozen=True)
class StopDecision:
    """Where a category's training stopped early, and why (the training folder's `early_stop.json`)."""

    epoch: int  # the milestone after which nothing more is trained
    best_epoch: int  # the milestone of the best value, `patience` milestones before
    best_value: float
    patience: int
    last_epoch: int  # the last milestone of the plan, which training would have reached

    @property
    def epochs_not_trained(self) -> int:
        return self.last_epoch - self.epoch

    def as_dict(self) -> dict:
        return {**asdict(self), "epochs_not_trained": self.epochs_not_trained}


def stop_decision(values: Sequence[tuple[int, float]], patience: int, last_epoch: int) -> StopDecision | None:
    """The first milestone after which `patience` milestones in a row did not strictly improve on the best
    value so far, given (epoch, value) per milestone in order; None while training goes on: with patience 0,
    before such a milestone, or when it is the last milestone anyway (nothing is left to save)."""
    if patience <= 0:
        return None
    best_epoch, best, since = None, math.nan, 0
    for epoch, value in values:
        if not math.isnan(value) and (best_epoch is None or value > best):
            best_epoch, best, since = epoch, value, 0
        elif best_epoch is not None:
            since += 1
            if since >= patience:
                if epoch >= last_epoch:
                    return None
                return StopDecision(epoch, best_epoch, best, patience, last_epoch)
    return None


def milestone_best(
    maps_dir: Path,
    metric: str,
    lam_values: Sequence[float],
    kernel_values: Sequence[int],
    sigma_values: Sequence[float] = (SEG_THRESHOLD_SIGMAS,),
) -> tuple[float, float, int, float]:
    """(value, λ, n, k): the best `metric` of one milestone's maps over every (λ, n, k) of the space, exact;
    the first of equal values in the exhaustive study's order (n, then λ, then k). NaN, with the first
    (λ, n, k), when the metric is undefined at all of them."""
    epoch = 0  # a key of the one milestone in `CategoryMaps`; the maps' own epoch plays no part
    maps = CategoryMaps({("milestone", epoch): Path(maps_dir)}, tuple(kernel_values))
    best = (math.nan, float(lam_values[0]), int(kernel_values[0]), float(sigma_values[0]))
    for kernel in kernel_values:
        for lam in lam_values:
            for sigmas in sigma_values:
                candidate = Candidate("milestone", epoch, float(lam), int(kernel), float(sigmas))
                value = maps.candidate_metrics(candidate, metric)[metric]
                if not math.isnan(value) and (math.isnan(best[0]) or value > best[0]):
                    best = (value, float(lam), int(kernel), float(sigmas))
    return best
