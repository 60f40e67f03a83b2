"""Selection: Optuna studies over (model, epoch, λ, n) candidates evaluated on cached maps.

No candidate trains anything. A category's candidates share one `GroundTruth` (regions, weights) and each
milestone's raw maps are filtered once per n (`MapFuser`), so a candidate costs one blend and the metrics.
A study lives in the run's Optuna storage; every candidate keeps all its metrics in `user_attrs`, which is
where `trials.csv` is rebuilt from, so a resumed run neither loses nor duplicates rows.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna

from tfsearch.errors import InputError
from tfsearch.map_cache import read_map_set
from tfsearch.metrics import METRIC_NAMES, GroundTruth, MapFuser, evaluate
from tfsearch.spaces import Choices, FloatRange, Grid, Space

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass(frozen=True)
class Config:
    """One evaluation-time configuration of a trained model."""

    model: str  # training configuration id ("default" unless training hyperparameters are searched)
    epoch: int
    lam: float
    kernel: int

    def as_params(self) -> dict:
        return {"model": self.model, "epoch": self.epoch, "lam": self.lam, "kernel": self.kernel}


class CandidateSet:
    """Cached maps of one category on one split, for every (model, milestone) a training run reached."""

    def __init__(self, maps_dirs: dict[tuple[str, int], Path], cached_milestones: int = 4) -> None:
        if not maps_dirs:
            raise InputError("no cached maps to select from: no training milestone finished")
        self.maps_dirs = dict(maps_dirs)
        first = read_map_set(next(iter(self.maps_dirs.values())))
        self.ground_truth = GroundTruth.from_masks(np.asarray(first.masks))
        self.image_ids = list(first.image_ids)
        self.split = first.meta.get("split")
        self._fusers: OrderedDict[tuple[str, int], MapFuser] = OrderedDict()
        self._cached = cached_milestones

    def fuser(self, model: str, epoch: int) -> MapFuser:
        key = (model, epoch)
        if key not in self._fusers:
            if key not in self.maps_dirs:
                raise InputError(f"no cached maps for model {model!r} at epoch {epoch}")
            maps = read_map_set(self.maps_dirs[key])
            if list(maps.image_ids) != self.image_ids:
                raise InputError(f"{self.maps_dirs[key]}: its images differ from the other milestones'")
            self._fusers[key] = MapFuser(maps.m_disc, maps.m_recon)
            while len(self._fusers) > self._cached:
                self._fusers.popitem(last=False)
        self._fusers.move_to_end(key)
        return self._fusers[key]

    def evaluate(self, config: Config) -> dict[str, float]:
        fused = self.fuser(config.model, config.epoch).fuse(config.lam, config.kernel)
        return evaluate(self.ground_truth, fused)


def mean_metrics(per_category: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted mean over categories, as the paper averages; undefined values are left out."""
    means = {}
    for name in METRIC_NAMES:
        values = [m[name] for m in per_category.values() if not math.isnan(m[name])]
        means[name] = float(np.mean(values)) if values else float("nan")
    return means


def make_sampler(space: Space, checkpoints: list[tuple[str, int]]) -> optuna.samplers.BaseSampler:
    if space.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=space.seed)
    if space.sampler == "random":
        return optuna.samplers.RandomSampler(seed=space.seed)
    grid = {name: list(p.values) for name, p in space.params.items() if isinstance(p, Grid | Choices)}
    grid.pop("epoch", None)
    if len(checkpoints) > 1:
        grid["checkpoint"] = checkpoint_names(checkpoints)
    return optuna.samplers.GridSampler(grid, seed=space.seed)


def checkpoint_names(checkpoints: list[tuple[str, int]]) -> list[str]:
    return [f"{model}@{epoch}" for model, epoch in checkpoints]


def suggest(trial: optuna.Trial, space: Space, checkpoints: list[tuple[str, int]], default: Config) -> Config:
    """Draw one candidate; the trained model and its milestone are one categorical choice."""
    if len(checkpoints) > 1:
        model, epoch = trial.suggest_categorical("checkpoint", checkpoint_names(checkpoints)).rsplit("@", 1)
        epoch = int(epoch)
    else:
        model, epoch = checkpoints[0]

    def value(name: str, fallback: float | int):
        param = space.params.get(name, fallback)
        if isinstance(param, FloatRange):
            return trial.suggest_float(name, param.low, param.high, log=param.log)
        if isinstance(param, Choices | Grid):
            return trial.suggest_categorical(name, list(param.values))
        return param

    return Config(model, epoch, float(value("lam", default.lam)), int(value("kernel", default.kernel)))


def default_in_space(space: Space, default: Config) -> dict | None:
    """The default as Optuna parameters, when the space contains it (then it is enqueued first)."""
    params = {}
    for name, value in (("lam", default.lam), ("kernel", default.kernel)):
        param = space.params.get(name, value)
        if isinstance(param, FloatRange):
            if not param.low <= value <= param.high:
                return None
            params[name] = value
        elif isinstance(param, Choices | Grid):
            if value not in param.values:
                return None
            params[name] = value
        elif param != value:
            return None
    return params


def open_study(storage: optuna.storages.BaseStorage, name: str, sampler) -> optuna.Study:
    """Create or continue a study, queueing again every candidate an earlier attempt did not finish.

    A study runs in one task at a time, so a trial RUNNING when it opens was cut off (a killed driver or
    node): it is marked FAIL. Each failed trial not retried yet goes to Optuna's retry callback, which queues
    its parameters again (a grid point keeps its grid id), so every candidate is evaluated exactly once.
    """
    study = optuna.create_study(
        study_name=name, storage=storage, sampler=sampler, direction="maximize", load_if_exists=True
    )
    trials = study.get_trials(deepcopy=False)
    retried = {number for t in trials for number in t.system_attrs.get("retry_history", [])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback()
    for trial in trials:
        if trial.state == optuna.trial.TrialState.RUNNING:
            storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        elif trial.state != optuna.trial.TrialState.FAIL:
            continue
        if trial.number not in retried:
            retry(study, storage.get_trial(trial._trial_id))
    return study


@dataclass
class StudyPlan:
    """What one study searches: its candidate sets (one per category it averages over) and its budget."""

    name: str
    space: Space
    candidates: dict[str, CandidateSet]  # category -> its candidates on the selection split
    checkpoints: list[tuple[str, int]]  # (model, milestone epoch) pairs every category has maps of
    default: Config


def run_study(storage: optuna.storages.BaseStorage, plan: StudyPlan) -> optuna.Study:
    """Run the remaining trials of a study. The objective is the selection metric, averaged over the
    categories of the study (one for per-class studies); every metric of every category is kept."""
    space = plan.space
    sampler = make_sampler(space, plan.checkpoints)
    study = open_study(storage, plan.name, sampler)
    if not study.trials and space.sampler != "grid":
        params = default_in_space(space, plan.default)
        if params is not None:
            if len(plan.checkpoints) > 1:
                params["checkpoint"] = f"{plan.default.model}@{plan.default.epoch}"
            study.enqueue_trial(params, skip_if_exists=True)

    def objective(trial: optuna.Trial) -> float:
        config = suggest(trial, space, plan.checkpoints, plan.default)
        per_category = {name: candidates.evaluate(config) for name, candidates in plan.candidates.items()}
        for key, value in config.as_params().items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("metrics", per_category)
        return mean_metrics(per_category)[space.metric]

    budget = max(space.trials, 1)
    complete = (optuna.trial.TrialState.COMPLETE,)
    if len(study.get_trials(deepcopy=False, states=complete)) < budget:
        study.optimize(objective, callbacks=[optuna.study.MaxTrialsCallback(budget, states=complete)])
    return study


def best_config(study: optuna.Study, default: Config, default_value: float) -> tuple[Config, float]:
    """The best candidate of a study, or the default when no candidate beats it (ties go to the default)."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    complete = [t for t in complete if t.value is not None and not math.isnan(t.value)]
    if not complete:
        return default, default_value
    best = max(complete, key=lambda t: (t.value, -t.number))
    if math.isnan(default_value) or best.value > default_value:
        attrs = best.user_attrs
        return Config(
            attrs["model"], int(attrs["epoch"]), float(attrs["lam"]), int(attrs["kernel"])
        ), best.value
    return default, default_value
