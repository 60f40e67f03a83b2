"""One selection study: Optuna's over the candidates of a category (or of a dataset, for the single
configuration), in the run's Optuna storage.

`exhaustive` and `grid` spaces evaluate every candidate and add them to the study in bulk; `tpe` and `random`
draw `trials` of them. Every candidate keeps its metrics in `user_attrs`, which is where `trials.csv` is
rebuilt from, so a resumed run neither loses nor duplicates rows. When the run ends the study also records
its choice (`CHOICE_ATTR`): the best candidate or the default, how many candidates tied at the best value,
and, where a tie-break metric is set (`--select-on val`), the candidate that metric preferred."""

from __future__ import annotations

import math
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from tfsearch.errors import InputError
from tfsearch.maps.metrics import SEG_THRESHOLD_SIGMAS
from tfsearch.run.params import Choices, FloatRange, Grid
from tfsearch.run.selection.candidates import Candidate, CategoryMaps, SeedMeans, mean_metrics
from tfsearch.run.space import Space
from tfsearch.store.studies import add_finished_trials

optuna.logging.set_verbosity(optuna.logging.WARNING)

# a finished study records its choice, and the milestones its candidates were drawn from
CHOICE_ATTR = "choice"
CHECKPOINTS_ATTR = "checkpoints"
# candidates added to a study per storage write: a killed run recomputes at most this many
BULK = 1000


def make_sampler(
    space: Space, checkpoints: list[tuple[str, int]], default: Candidate
) -> optuna.samplers.BaseSampler:
    """The study's sampler, seeded by the space: a study drawn again draws the same candidates."""
    if space.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=space.seed)
    if space.sampler == "random":
        return optuna.samplers.RandomSampler(seed=space.seed)
    grid = {name: list(d.choices) for name, d in grid_distributions(space, checkpoints, default).items()}
    return optuna.samplers.GridSampler(grid, seed=space.seed)


def grid_distributions(
    space: Space, checkpoints: list[tuple[str, int]], default: Candidate
) -> dict[str, optuna.distributions.CategoricalDistribution]:
    """The Optuna parameters of an enumerated study: those that take more than one value."""
    values = {
        "checkpoint": checkpoint_names(checkpoints),
        "lam": space.values("lam", default.lam),
        "kernel": space.values("kernel", default.kernel),
        "seg_sigmas": space.values("seg_sigmas", default.seg_sigmas),
    }
    return {k: optuna.distributions.CategoricalDistribution(v) for k, v in values.items() if len(v) > 1}


def grid_candidates(space: Space, checkpoints: list[tuple[str, int]], default: Candidate) -> list[Candidate]:
    """Every candidate of an exhaustive or grid space: milestones x λ values x n values (x models) (x k)."""
    return [
        Candidate(model, epoch, float(lam), int(kernel), float(sigmas))
        for model, epoch in checkpoints
        for kernel in space.values("kernel", default.kernel)
        for lam in space.values("lam", default.lam)
        for sigmas in space.values("seg_sigmas", default.seg_sigmas)
    ]


def checkpoint_names(checkpoints: list[tuple[str, int]]) -> list[str]:
    return [f"{model}@{epoch}" for model, epoch in checkpoints]


def suggest(
    trial: optuna.Trial, space: Space, checkpoints: list[tuple[str, int]], default: Candidate
) -> Candidate:
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

    lam, kernel = float(value("lam", default.lam)), int(value("kernel", default.kernel))
    return Candidate(model, epoch, lam, kernel, float(value("seg_sigmas", default.seg_sigmas)))


def default_in_space(space: Space, default: Candidate) -> dict | None:
    """The default as Optuna parameters, when the space contains it (then it is enqueued first)."""
    params = {}
    for name, value in (("lam", default.lam), ("kernel", default.kernel), ("seg_sigmas", default.seg_sigmas)):
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


@dataclass
class StudySpec:
    """What one study searches: its candidate sets (one per category it averages over) and its budget."""

    name: str
    space: Space
    # category -> its maps on the selection split (the mean over its seeds with several)
    maps: dict[str, CategoryMaps | SeedMeans]
    checkpoints: list[tuple[str, int]]  # (model, milestone epoch) pairs every category has maps of
    default: Candidate
    # metric that settles a tie at the best selection value (None: the default, then the first candidate)
    tie_break: str | None = None

    def metrics(self, candidate: Candidate) -> dict[str, dict[str, float]]:
        """Category -> what a candidate records."""
        return {
            name: maps.candidate_metrics(candidate, self.space.metric, self.space.all_metrics)
            for name, maps in self.maps.items()
        }

    def objective(self, per_category: dict[str, dict[str, float]]) -> float:
        return mean_metrics(per_category)[self.space.metric]

    def prepare(self, checkpoints: list[tuple[str, int]]) -> None:
        """Reduce the maps of `checkpoints` ahead of their candidates, when those score image AUROC alone."""
        if self.space.metric == "image_auroc" and not self.space.all_metrics:
            for maps in self.maps.values():
                maps.prepare_maxima(checkpoints)


def discard_unfinished(storage: optuna.storages.BaseStorage, spec: StudySpec) -> None:
    """Delete a sampled study that did not finish on `spec`'s milestones: one cut short (an interrupted
    selection) or drawn from milestones that have changed since. It is then drawn again from the start with
    the space's seed, so a resumed run selects exactly what an uninterrupted one does; a sampled study costs
    seconds on cached maps. Enumerated studies are kept: they add whichever candidates they lack."""
    try:
        study = optuna.load_study(study_name=spec.name, storage=storage)
    except KeyError:
        return
    attrs = study.user_attrs
    if CHOICE_ATTR not in attrs or attrs.get(CHECKPOINTS_ATTR) != checkpoint_names(spec.checkpoints):
        optuna.delete_study(study_name=spec.name, storage=storage)


def run_study(storage: optuna.storages.BaseStorage, spec: StudySpec) -> optuna.Study:
    """Evaluate the study's remaining candidates, then record its choice. The objective is the selection
    metric, averaged over the categories of the study (one for per-class studies)."""
    if not spec.space.enumerated:
        discard_unfinished(storage, spec)
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        sampler=make_sampler(spec.space, spec.checkpoints, spec.default),
        direction="maximize",
        load_if_exists=True,
    )
    if spec.space.enumerated:
        finished = add_grid_trials(storage, study, spec)
    else:
        optimize(study, spec)
        finished = _finished(study)
    study.set_user_attr(CHECKPOINTS_ATTR, checkpoint_names(spec.checkpoints))
    # the default goes with the choice: what `trial: None` means, for readers without the spec
    study.set_user_attr(CHOICE_ATTR, {**choose(finished, spec), "default": spec.default.as_params()})
    return study


def candidate_attrs(candidate: Candidate, per_category: dict[str, dict[str, float]]) -> dict:
    """A candidate's `user_attrs`, which `trials.csv` is rebuilt from."""
    return {**candidate.as_params(), "metrics": per_category}


def add_grid_trials(
    storage: optuna.storages.BaseStorage, study: optuna.Study, spec: StudySpec
) -> list[optuna.trial.FrozenTrial]:
    """Every candidate not in the study yet, evaluated and added as finished trials, `BULK` per write
    (`add_finished_trials`); returns the study's completed candidates, those it had and those added, without
    reading the study back (Optuna's RDB storage reads a few thousand trials in tens of seconds)."""
    had = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
    had = [t for t in had if "metrics" in t.user_attrs]
    done = {candidate_of(t) for t in had}
    finished = [t for t in had if t.state == TrialState.COMPLETE]
    distributions = grid_distributions(spec.space, spec.checkpoints, spec.default)
    pending: list[optuna.trial.FrozenTrial] = []

    def write() -> None:
        for trial, number in zip(pending, add_finished_trials(storage, study, pending), strict=True):
            trial.number = number
        finished.extend(t for t in pending if t.state == TrialState.COMPLETE)
        pending.clear()

    todo = [c for c in grid_candidates(spec.space, spec.checkpoints, spec.default) if c not in done]
    spec.prepare(list(dict.fromkeys((candidate.model, candidate.epoch) for candidate in todo)))
    for candidate in todo:
        per_category = spec.metrics(candidate)
        value = spec.objective(per_category)
        checkpoint = f"{candidate.model}@{candidate.epoch}"
        params = {"checkpoint": checkpoint, **candidate.as_params()}
        pending.append(
            optuna.trial.create_trial(
                params={k: v for k, v in params.items() if k in distributions},
                distributions=distributions,
                value=None if math.isnan(value) else value,  # undefined metric: a failed trial, as with TPE
                state=TrialState.FAIL if math.isnan(value) else TrialState.COMPLETE,
                user_attrs=candidate_attrs(candidate, per_category),
            )
        )
        if len(pending) == BULK:
            write()
    write()
    return finished


def optimize(study: optuna.Study, spec: StudySpec) -> None:
    """The remaining `trials` drawn by the sampler; the default goes first when the space contains it."""
    space = spec.space
    if not study.trials:
        params = default_in_space(space, spec.default)
        if params is not None:
            if len(spec.checkpoints) > 1:
                params["checkpoint"] = f"{spec.default.model}@{spec.default.epoch}"
            study.enqueue_trial(params, skip_if_exists=True)

    def objective(trial: optuna.Trial) -> float:
        candidate = suggest(trial, space, spec.checkpoints, spec.default)
        per_category = spec.metrics(candidate)
        for key, value in candidate_attrs(candidate, per_category).items():
            trial.set_user_attr(key, value)
        return spec.objective(per_category)

    complete = (optuna.trial.TrialState.COMPLETE,)
    if len(study.get_trials(deepcopy=False, states=complete)) < space.trials:
        study.optimize(objective, callbacks=[optuna.study.MaxTrialsCallback(space.trials, states=complete)])


def choose(finished: list[optuna.trial.FrozenTrial], spec: StudySpec) -> dict:
    """The study's choice among its completed candidates `finished`: the best, or the default when none
    beats it. A tie at the best value is settled by `spec.tie_break` (computed for the tied configurations
    only) when set; otherwise, and when that metric ties too, the default wins, then the earliest candidate
    (`undecided` then says so). Also says how many configurations tied at the best value."""
    default_value = spec.objective({c: {spec.space.metric: m} for c, m in _default_values(spec).items()})
    scored = [t for t in finished if t.value is not None]
    values = [t.value for t in scored] + ([] if math.isnan(default_value) else [default_value])
    if not values:
        return {"trial": None, "value": default_value, "tied": 0, "tie_break": None, "undecided": False}
    best = max(values)
    tied = [t for t in scored if t.value == best]
    default_tied = default_value == best
    contenders: list[tuple[int | None, Candidate]] = [(None, spec.default)] if default_tied else []
    # the default counts once, also where the space holds it as a candidate of its own
    tied_candidates = [(t.number, candidate_of(t)) for t in sorted(tied, key=lambda t: t.number)]
    contenders += [(n, c) for n, c in tied_candidates if not (default_tied and c == spec.default)]
    choice = {"trial": contenders[0][0], "value": best, "tied": len(contenders), "tie_break": None}
    choice["undecided"] = len(contenders) > 1
    winner = 0
    if spec.tie_break and len(contenders) > 1:
        breaks = [
            mean_metrics({c: s.evaluate(candidate) for c, s in spec.maps.items()})[spec.tie_break]
            for _, candidate in contenders
        ]
        breaks = [-math.inf if math.isnan(v) else v for v in breaks]
        winner = max(range(len(contenders)), key=lambda i: (breaks[i], -i))  # first of the equal wins
        choice.update(trial=contenders[winner][0], tie_break=spec.tie_break, tie_break_value=breaks[winner])
        choice["undecided"] = breaks.count(breaks[winner]) > 1
    # the chosen configuration itself: readers need not read the study's trials back to find it
    choice["selected"] = contenders[winner][1].as_params()
    return choice


def choice_columns(choice: dict) -> dict:
    """The columns of `selected.csv` that say how well the selection data ranked the candidates."""
    return {
        "tied_at_best": choice["tied"],
        "tie_break_metric": choice["tie_break"] or "",
        "cannot_rank": choice["undecided"],
    }


def _default_values(spec: StudySpec) -> dict[str, float]:
    return {
        name: maps.candidate_metrics(spec.default, spec.space.metric)[spec.space.metric]
        for name, maps in spec.maps.items()
    }


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if "metrics" in t.user_attrs
    ]


def candidate_of(trial: optuna.trial.FrozenTrial) -> Candidate:
    attrs = trial.user_attrs
    sigmas = float(attrs.get("seg_sigmas", SEG_THRESHOLD_SIGMAS))  # absent from studies of earlier versions
    return Candidate(attrs["model"], int(attrs["epoch"]), float(attrs["lam"]), int(attrs["kernel"]), sigmas)


def best_candidate(study: optuna.Study, default: Candidate) -> tuple[Candidate, dict]:
    """The configuration a finished study chose (see `choose`), and the choice as recorded. The choice holds
    the configuration; where it names only its trial (studies of older run folders), the trials are read
    back, which takes seconds for an exhaustive study of thousands of candidates."""
    choice = study.user_attrs.get(CHOICE_ATTR)
    if choice is None:
        raise InputError(f"study {study.study_name} has not finished: no choice recorded")
    if choice["trial"] is None:
        return default, choice
    if "selected" in choice:
        return Candidate(**choice["selected"]), choice
    return candidate_of(study.get_trials(deepcopy=False)[choice["trial"]]), choice
