"""Selection: Optuna studies over (model, epoch, λ, n) candidates evaluated on cached maps.

No candidate trains anything. A candidate is scored on its selection metric only; the pixel metrics are
computed for the default and the selected configuration (and for every candidate with `all_metrics: true`).
Image AUROC, the usual selection metric, is exact and cheap: each milestone's maps are filtered once for every
n of the space and reduced to the few points per image that can hold its maximum (`ImageMaxima`), after which
any λ costs microseconds. So `exhaustive` and `grid` spaces evaluate every candidate and add them to the study
in bulk; `tpe` and `random` draw `trials` of them. Pixel metrics go through `MapFuser`, whose filtered maps
are cached per milestone.

With several training seeds per category (`--seeds K`) a candidate is scored on every seed's maps and its
metrics, hence the objective, are the mean over the seeds (`SeedMeans`).

A study lives in the run's Optuna storage; every candidate keeps its metrics in `user_attrs`, which is where
`trials.csv` is rebuilt from, so a resumed run neither loses nor duplicates rows. When the run ends the study
also records its choice (`CHOICE_ATTR`): the best candidate or the default, how many candidates tied at the
best value, and, where a tie-break metric is set (`--select-on val`), the candidate that metric preferred.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import warnings
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from tfsearch.errors import InputError
from tfsearch.maps.cache import read_map_set
from tfsearch.maps.metrics import (
    METRIC_NAMES,
    GroundTruth,
    ImageMaxima,
    MapFuser,
    auroc,
    evaluate,
    image_maxima,
    usable_cpus,
)
from tfsearch.run.space import Choices, FloatRange, Grid, Space
from tfsearch.store.studies import add_finished_trials

optuna.logging.set_verbosity(optuna.logging.WARNING)

# pixels in one milestone's maps from which its image-score points are worth a worker process of their own
# (one starts in ~0.4 s; 200 maps of 256² take ~0.5 s on one core)
WORKER_MIN_PIXELS = 1 << 22


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

    def image_auroc(self, config: Config) -> float:
        scores = self.maxima(config.model, config.epoch, config.kernel).scores(config.lam)
        return auroc(self.ground_truth.image_labels, scores)

    def evaluate(self, config: Config) -> dict[str, float]:
        """Every metric of a configuration (the pixel metrics need the full fused maps)."""
        fused = self.fuser(config.model, config.epoch).fuse(config.lam, config.kernel)
        return evaluate(self.ground_truth, fused)

    def candidate_metrics(self, config: Config, metric: str, all_metrics: bool = False) -> dict[str, float]:
        """What a candidate records: image AUROC alone (exact, cheap) when it is the selection metric, else
        every metric (the pixel metrics share one sort)."""
        if metric == "image_auroc" and not all_metrics:
            return {"image_auroc": self.image_auroc(config)}
        return self.evaluate(config)


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
    for name in METRIC_NAMES:
        if any(name in m for m in runs.values()):
            values = [m[name] for m in runs.values() if not math.isnan(m.get(name, math.nan))]
            reduced[name] = float(reduce(values)) if len(values) >= least else float("nan")
    return reduced


class SeedMeans:
    """A category trained with several seeds, each with its own cached maps (`CandidateSet`): a candidate
    is scored on every seed's maps and records the mean, so a study ranks configurations by the mean over
    seeds. `per_seed` gives the values the tables take the mean and the spread of."""

    def __init__(self, seeds: dict[int, CandidateSet]) -> None:
        self.seeds = dict(seeds)

    def per_seed(self, config: Config) -> dict[int, dict[str, float]]:
        """Every metric of a configuration on each seed's maps."""
        return {seed: candidates.evaluate(config) for seed, candidates in self.seeds.items()}

    def evaluate(self, config: Config) -> dict[str, float]:
        return mean_metrics(self.per_seed(config))

    def prepare_maxima(self, checkpoints: list[tuple[str, int]]) -> None:
        for candidates in self.seeds.values():
            candidates.prepare_maxima(checkpoints)

    def candidate_metrics(self, config: Config, metric: str, all_metrics: bool = False) -> dict[str, float]:
        return mean_metrics(
            {
                seed: candidates.candidate_metrics(config, metric, all_metrics)
                for seed, candidates in self.seeds.items()
            }
        )


def make_sampler(
    space: Space, checkpoints: list[tuple[str, int]], default: Config, resumed_at: int = 0
) -> optuna.samplers.BaseSampler:
    """The study's sampler. A study continued after `resumed_at` trials draws from a seed moved on by that
    many, so that it never replays the candidates of its first attempt."""
    seed = space.seed + resumed_at
    if space.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if space.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    grid = {name: list(d.choices) for name, d in grid_distributions(space, checkpoints, default).items()}
    return optuna.samplers.GridSampler(grid, seed=space.seed)


def grid_distributions(
    space: Space, checkpoints: list[tuple[str, int]], default: Config
) -> dict[str, optuna.distributions.CategoricalDistribution]:
    """The Optuna parameters of an enumerated study: those that take more than one value."""
    values = {
        "checkpoint": checkpoint_names(checkpoints),
        "lam": space.values("lam", default.lam),
        "kernel": space.values("kernel", default.kernel),
    }
    return {k: optuna.distributions.CategoricalDistribution(v) for k, v in values.items() if len(v) > 1}


def grid_candidates(space: Space, checkpoints: list[tuple[str, int]], default: Config) -> list[Config]:
    """Every candidate of an exhaustive or grid space: milestones x λ values x n values (x models)."""
    return [
        Config(model, epoch, float(lam), int(kernel))
        for model, epoch in checkpoints
        for kernel in space.values("kernel", default.kernel)
        for lam in space.values("lam", default.lam)
    ]


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


def open_study(storage: optuna.storages.BaseStorage, name: str, sampler, retry_failed: bool) -> optuna.Study:
    """Create or continue a study, queueing again every sampled candidate an earlier attempt did not finish.

    A study runs in one task at a time, so a trial RUNNING when it opens was cut off (a killed driver or
    node): it is marked FAIL. With `retry_failed` (sampled studies) each failed trial not retried yet goes
    to Optuna's retry callback, which queues its parameters again, so every candidate is evaluated once.
    Enumerated studies need no queue: they add whichever candidates the study lacks.
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
        if retry_failed and trial.number not in retried:
            retry(study, storage.get_trial(trial._trial_id))
    return study


@dataclass
class StudyPlan:
    """What one study searches: its candidate sets (one per category it averages over) and its budget."""

    name: str
    space: Space
    # category -> its candidates on the selection split (the mean over its seeds with several)
    candidates: dict[str, CandidateSet | SeedMeans]
    checkpoints: list[tuple[str, int]]  # (model, milestone epoch) pairs every category has maps of
    default: Config
    # metric that settles a tie at the best selection value (None: the default, then the first candidate)
    tie_break: str | None = None

    def metrics(self, config: Config) -> dict[str, dict[str, float]]:
        """Category -> what a candidate records."""
        return {
            name: candidates.candidate_metrics(config, self.space.metric, self.space.all_metrics)
            for name, candidates in self.candidates.items()
        }

    def objective(self, per_category: dict[str, dict[str, float]]) -> float:
        return mean_metrics(per_category)[self.space.metric]

    def prepare(self, checkpoints: list[tuple[str, int]]) -> None:
        """Reduce the maps of `checkpoints` ahead of their candidates, when those score image AUROC alone."""
        if self.space.metric == "image_auroc" and not self.space.all_metrics:
            for candidates in self.candidates.values():
                candidates.prepare_maxima(checkpoints)


CHOICE_ATTR = "choice"
# candidates added to a study per storage write: a killed run recomputes at most this many
BULK = 1000


def run_study(storage: optuna.storages.BaseStorage, plan: StudyPlan) -> optuna.Study:
    """Evaluate the study's remaining candidates, then record its choice. The objective is the selection
    metric, averaged over the categories of the study (one for per-class studies)."""
    study = open_study(storage, plan.name, None, retry_failed=not plan.space.enumerated)
    resumed_at = len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(plan.space, plan.checkpoints, plan.default, resumed_at=resumed_at)
    if plan.space.enumerated:
        finished = add_grid_trials(storage, study, plan)
    else:
        optimize(study, plan)
        finished = _finished(study)
    study.set_user_attr(CHOICE_ATTR, choose(finished, plan))
    return study


def candidate_attrs(config: Config, per_category: dict[str, dict[str, float]]) -> dict:
    """A candidate's `user_attrs`, which `trials.csv` is rebuilt from."""
    return {**config.as_params(), "metrics": per_category}


def add_grid_trials(
    storage: optuna.storages.BaseStorage, study: optuna.Study, plan: StudyPlan
) -> list[optuna.trial.FrozenTrial]:
    """Every candidate not in the study yet, evaluated and added as finished trials, `BULK` per write
    (`add_finished_trials`); returns the study's completed candidates, those it had and those added, without
    reading the study back (Optuna's RDB storage reads a few thousand trials in tens of seconds)."""
    had = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
    had = [t for t in had if "metrics" in t.user_attrs]
    done = {config_of(t) for t in had}
    finished = [t for t in had if t.state == TrialState.COMPLETE]
    distributions = grid_distributions(plan.space, plan.checkpoints, plan.default)
    pending: list[optuna.trial.FrozenTrial] = []

    def write() -> None:
        for trial, number in zip(pending, add_finished_trials(storage, study, pending), strict=True):
            trial.number = number
        finished.extend(t for t in pending if t.state == TrialState.COMPLETE)
        pending.clear()

    todo = [c for c in grid_candidates(plan.space, plan.checkpoints, plan.default) if c not in done]
    plan.prepare(list(dict.fromkeys((config.model, config.epoch) for config in todo)))
    for config in todo:
        per_category = plan.metrics(config)
        value = plan.objective(per_category)
        params = {"checkpoint": f"{config.model}@{config.epoch}", "lam": config.lam, "kernel": config.kernel}
        pending.append(
            optuna.trial.create_trial(
                params={k: v for k, v in params.items() if k in distributions},
                distributions=distributions,
                value=None if math.isnan(value) else value,  # undefined metric: a failed trial, as with TPE
                state=TrialState.FAIL if math.isnan(value) else TrialState.COMPLETE,
                user_attrs=candidate_attrs(config, per_category),
            )
        )
        if len(pending) == BULK:
            write()
    write()
    return finished


def optimize(study: optuna.Study, plan: StudyPlan) -> None:
    """The remaining `trials` drawn by the sampler; the default goes first when the space contains it."""
    space = plan.space
    if not study.trials:
        params = default_in_space(space, plan.default)
        if params is not None:
            if len(plan.checkpoints) > 1:
                params["checkpoint"] = f"{plan.default.model}@{plan.default.epoch}"
            study.enqueue_trial(params, skip_if_exists=True)

    def objective(trial: optuna.Trial) -> float:
        config = suggest(trial, space, plan.checkpoints, plan.default)
        per_category = plan.metrics(config)
        for key, value in candidate_attrs(config, per_category).items():
            trial.set_user_attr(key, value)
        return plan.objective(per_category)

    complete = (optuna.trial.TrialState.COMPLETE,)
    if len(study.get_trials(deepcopy=False, states=complete)) < space.trials:
        study.optimize(objective, callbacks=[optuna.study.MaxTrialsCallback(space.trials, states=complete)])


def choose(finished: list[optuna.trial.FrozenTrial], plan: StudyPlan) -> dict:
    """The study's choice among its completed candidates `finished`: the best, or the default when none
    beats it. A tie at the best value is settled by `plan.tie_break` (computed for the tied configurations
    only) when set; otherwise, and when that metric ties too, the default wins, then the earliest candidate
    (`undecided` then says so). Also says how many configurations tied at the best value."""
    default_value = plan.objective({c: {plan.space.metric: m} for c, m in _default_values(plan).items()})
    scored = [t for t in finished if t.value is not None]
    values = [t.value for t in scored] + ([] if math.isnan(default_value) else [default_value])
    if not values:
        return {"trial": None, "value": default_value, "tied": 0, "tie_break": None, "undecided": False}
    best = max(values)
    tied = [t for t in scored if t.value == best]
    contenders: list[tuple[int | None, Config]] = [(None, plan.default)] if default_value == best else []
    contenders += [(t.number, config_of(t)) for t in sorted(tied, key=lambda t: t.number)]
    choice = {"trial": contenders[0][0], "value": best, "tied": len(contenders), "tie_break": None}
    choice["undecided"] = len(contenders) > 1
    if plan.tie_break and len(contenders) > 1:
        breaks = [
            mean_metrics({c: s.evaluate(config) for c, s in plan.candidates.items()})[plan.tie_break]
            for _, config in contenders
        ]
        breaks = [-math.inf if math.isnan(v) else v for v in breaks]
        winner = max(range(len(contenders)), key=lambda i: (breaks[i], -i))  # first of the equal wins
        choice.update(trial=contenders[winner][0], tie_break=plan.tie_break, tie_break_value=breaks[winner])
        choice["undecided"] = breaks.count(breaks[winner]) > 1
    return choice


def choice_columns(choice: dict) -> dict:
    """The columns of `selected.csv` that say how well the selection data ranked the candidates."""
    return {
        "tied_at_best": choice["tied"],
        "tie_break_metric": choice["tie_break"] or "",
        "cannot_rank": choice["undecided"],
    }


def _default_values(plan: StudyPlan) -> dict[str, float]:
    return {
        name: candidates.candidate_metrics(plan.default, plan.space.metric)[plan.space.metric]
        for name, candidates in plan.candidates.items()
    }


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if "metrics" in t.user_attrs
    ]


def config_of(trial: optuna.trial.FrozenTrial) -> Config:
    attrs = trial.user_attrs
    return Config(attrs["model"], int(attrs["epoch"]), float(attrs["lam"]), int(attrs["kernel"]))


def best_config(study: optuna.Study, default: Config) -> tuple[Config, dict]:
    """The configuration a finished study chose (see `choose`), and the choice as recorded."""
    choice = study.user_attrs.get(CHOICE_ATTR)
    if choice is None:
        raise InputError(f"study {study.study_name} has not finished: no choice recorded")
    if choice["trial"] is None:
        return default, choice
    return config_of(study.trials[choice["trial"]]), choice
