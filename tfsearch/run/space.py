"""Search spaces: what `tfsearch run` trains and which (epoch, λ, n) candidates it evaluates on cached maps.

A space is a YAML file (the built-in ones live in `search_spaces/`, installed as the package
`tfsearch.search_spaces`); `--space NAME` picks a built-in one and `--space PATH` a user's file. Every key
is validated here, and an error names the file and the key:

    name: per_class
    description: one line for `tfsearch spaces`
    scope: per_class          # single (no search) | per_class (one study per category) | global (one for all)
    profile: paper            # default training profile; --profile overrides it
    profile_overrides: {}     # Profile fields, e.g. {epochs: 1500, lr: 1.0e-5}
    milestones: {every: 50}   # or a list of epochs; default: the profile's grid; its last epoch is always one
    seeds: 1                  # training runs per category, seeds profile seed + 0..K-1; --seeds overrides it
    patience: 0               # stop a category's training after K milestones without improvement (0: never);
                              # --patience overrides it
    selection:
      metric: image_auroc     # image_auroc | aupro | pixel_auroc | pixel_ap | pixel_f1_max, or MVTec AD 2's
                              # aupro_05 (AUPRO to FPR 0.05) | seg_f1 (docs/mvtec-ad2.md)
      sampler: exhaustive     # (default) exhaustive | grid: every candidate; tpe | random: `trials` of them
      # trials: 64            # Optuna trials per study: required by tpe and random, refused by grid and
                              # exhaustive, whose count is milestones x λ values x n values (x models)
      lam_points: 21          # exhaustive: a λ or k range gives this many evenly spaced values, ends included
      all_metrics: false      # true: every candidate also gets the pixel metrics (slow); by default only
                              # the selected and the default configuration do
      seed: 0
    params:                   # a parameter left out is fixed at the profile's default
      epoch: milestones       # milestones | last | [epochs...]
      lam: {low: 0.5, high: 1.0}          # or {grid: [...]}, or a fixed number
      kernel: {choices: [1, 3, 5, 7, 9]}  # or {grid: [...]}, or a fixed odd number
      seg_sigmas: 3           # SegF1's threshold, mean + k std of the normal validation pixels: a fixed k, or
                              # searched ({grid: [...]}, ...) with metric seg_f1 alone (docs/mvtec-ad2.md)
    training:                 # optional: also search training hyperparameters (Ray Tune + Optuna + ASHA)
      samples: 4
      scheduler: {type: asha, grace_period: 2, reduction_factor: 2}   # grace period in milestones
      params:
        lr: {low: 1.0e-4, high: 3.0e-3, log: true}
        base_channels: {choices: [8, 16]}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tfsearch.errors import InputError
from tfsearch.maps.metrics import SEG_THRESHOLD_SIGMAS
from tfsearch.run.params import Choices, FloatRange, Grid, Param, fail, param_values, parse_param
from tfsearch.transfusion.profiles import PROFILES, Profile, get_profile

SCOPES = ("single", "per_class", "global")
SAMPLERS = ("exhaustive", "grid", "tpe", "random")
ENUMERATED = ("exhaustive", "grid")  # samplers that evaluate every candidate of the space
SELECTION_KEYS = {"metric", "sampler", "trials", "seed", "lam_points", "all_metrics"}
# the paper's metrics and MVTec AD 2's (AUPRO to FPR 0.05, SegF1: `tfsearch.maps.metrics`)
METRICS = ("image_auroc", "aupro", "pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro_05", "seg_f1")
TOP_KEYS = {
    "name",
    "description",
    "scope",
    "profile",
    "profile_overrides",
    "milestones",
    "selection",
    "params",
    "training",
    "seeds",
    "patience",
}
# what a selection candidate is made of; seg_sigmas: k of SegF1's threshold, mean + k std (docs/mvtec-ad2.md)
SELECTION_PARAMS = ("epoch", "lam", "kernel", "seg_sigmas")
TRAINABLE = {"lr": float, "base_channels": int, "steps": int, "batch_size": int, "weight_decay": float}


@dataclass(frozen=True)
class TrainingSearch:
    samples: int
    params: dict[str, Param]
    grace_period: int = 1
    reduction_factor: int = 2


@dataclass(frozen=True)
class Space:
    name: str
    description: str
    scope: str
    profile: str
    profile_overrides: dict[str, Any]
    milestones: dict[str, Any] | tuple[int, ...] | None
    metric: str = "image_auroc"
    sampler: str = "exhaustive"
    trials: int = 0  # tpe / random only
    seed: int = 0
    lam_points: int = 21
    all_metrics: bool = False
    params: dict[str, Param] = field(default_factory=dict)
    training: TrainingSearch | None = None
    source: str = ""
    seeds: int = 1  # training runs per category (and training configuration), each with its own seed
    patience: int = 0  # milestones without improvement after which a category stops training (0: never)

    @property
    def enumerated(self) -> bool:
        return self.sampler in ENUMERATED

    def values(self, name: str, default: float | int) -> tuple:
        """The values an exhaustive or grid study tries for `lam` or `kernel` (`default` when fixed)."""
        param = self.params.get(name, default)
        if isinstance(param, FloatRange):
            # rounded so that grid points read as written (0.85, not 0.8500000000000001) and match the default
            return tuple(round(float(v), 12) for v in np.linspace(param.low, param.high, self.lam_points))
        if isinstance(param, Choices | Grid):
            return tuple(param.values)
        return (param,)

    def resolve_profile(self, name: str | None = None) -> Profile:
        """The training profile: the space's (or `name`), with the space's overrides."""
        profile = get_profile(name or self.profile)
        overrides = dict(self.profile_overrides)
        if "epochs" in overrides:
            profile = profile.with_epochs(int(overrides.pop("epochs")))
        return profile.replace(**overrides) if overrides else profile

    def resolve_milestones(self, profile: Profile) -> tuple[int, ...]:
        if self.milestones is None:
            return profile.milestones()
        if isinstance(self.milestones, tuple):
            grid = tuple(sorted(set(self.milestones)))
            if grid[-1] > profile.epochs:
                raise InputError(
                    f"{self.source}: milestones: epoch {grid[-1]} lies beyond the profile's "
                    f"{profile.epochs} epochs"
                )
            return grid if grid[-1] == profile.epochs else (*grid, profile.epochs)
        every = self.milestones.get("every", profile.milestone_every)
        if every > profile.epochs:
            raise InputError(
                f"{self.source}: milestones.every = {every} lies beyond the profile's {profile.epochs} epochs"
            )
        return profile.milestones(every)

    def epoch_choices(self, milestones: tuple[int, ...]) -> tuple[int, ...]:
        spec = self.params.get("epoch", "last")
        if spec == "milestones":
            return milestones
        if spec == "last":
            return (milestones[-1],)
        values = spec.values if isinstance(spec, Choices | Grid) else (spec,)
        missing = sorted(set(values) - set(milestones))
        if missing:
            raise InputError(f"{self.source}: params.epoch: {missing} are not milestones {list(milestones)}")
        return tuple(values)


def _check_selection_params(params: dict[str, Param], metric: str, source: str) -> None:
    unknown = sorted(set(params) - set(SELECTION_PARAMS))
    if unknown:
        raise InputError(
            f"{source}: params: unknown parameter(s) {unknown}; known: {', '.join(SELECTION_PARAMS)}"
        )
    for value in param_values(params.get("lam", 0.95)):
        if not isinstance(value, int | float) or not 0 <= value <= 1:
            raise fail(source, "params.lam", "values in [0, 1]", value)
    if isinstance(params.get("kernel"), FloatRange):
        raise fail(source, "params.kernel", "a fixed odd size, {choices: [...]} or {grid: [...]}", "a range")
    for value in param_values(params.get("kernel", 7)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
            raise fail(source, "params.kernel", "odd positive integers", value)
    sigmas = params.get("seg_sigmas", SEG_THRESHOLD_SIGMAS)
    for value in param_values(sigmas):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
            raise fail(source, "params.seg_sigmas", "finite numbers >= 0 (k of mean + k std)", value)
    if isinstance(sigmas, FloatRange | Choices | Grid) and metric != "seg_f1":
        raise InputError(
            f"{source}: params.seg_sigmas: searched values change SegF1 alone, but selection.metric is"
            f" {metric}: select on seg_f1, or fix it (e.g. seg_sigmas: 3)"
        )
    epoch = params.get("epoch", "last")
    if isinstance(epoch, str) and epoch not in ("milestones", "last"):
        raise fail(source, "params.epoch", "'milestones', 'last', an epoch or a list of epochs", epoch)
    if isinstance(epoch, FloatRange):
        raise fail(source, "params.epoch", "'milestones', 'last', an epoch or {choices: [...]}", "a range")


def _training(value: object, source: str) -> TrainingSearch:
    if not isinstance(value, dict):
        raise fail(source, "training", "a mapping with samples, scheduler and params", value)
    unknown = sorted(set(value) - {"samples", "scheduler", "params"})
    if unknown:
        raise InputError(f"{source}: training: unknown key(s) {unknown}")
    samples = value.get("samples", 4)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise fail(source, "training.samples", "a positive integer", samples)
    scheduler = value.get("scheduler", {"type": "asha"})
    if not isinstance(scheduler, dict) or scheduler.get("type", "asha") != "asha":
        raise fail(source, "training.scheduler", "{type: asha, grace_period, reduction_factor}", scheduler)
    raw = value.get("params")
    if not isinstance(raw, dict) or not raw:
        raise fail(source, "training.params", "a non-empty mapping of training hyperparameters", raw)
    params = {}
    for key, spec in raw.items():
        if key not in TRAINABLE:
            raise InputError(
                f"{source}: training.params: unknown parameter {key!r}; known: {sorted(TRAINABLE)}"
            )
        params[key] = parse_param(spec, source, f"training.params.{key}")
    return TrainingSearch(
        samples=samples,
        params=params,
        grace_period=int(scheduler.get("grace_period", 1)),
        reduction_factor=int(scheduler.get("reduction_factor", 2)),
    )


def parse_space(payload: object, source: str) -> Space:
    """Validate a parsed YAML document; every error names `source` and the key."""
    if not isinstance(payload, dict):
        raise InputError(f"{source}: expected a mapping at the top level, got {type(payload).__name__}")
    unknown = sorted(set(payload) - TOP_KEYS)
    if unknown:
        raise InputError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(TOP_KEYS)}")
    scope = payload.get("scope", "per_class")
    if scope not in SCOPES:
        raise fail(source, "scope", f"one of {SCOPES}", scope)
    profile = payload.get("profile", "paper")
    if profile not in PROFILES:
        raise fail(source, "profile", f"one of {sorted(PROFILES)}", profile)
    overrides = payload.get("profile_overrides") or {}
    if not isinstance(overrides, dict):
        raise fail(source, "profile_overrides", "a mapping of profile fields", overrides)
    try:
        get_profile(profile).replace(**{k: v for k, v in overrides.items() if k != "epochs"})
    except ValueError as exc:
        raise InputError(f"{source}: profile_overrides: {exc}") from None

    milestones = payload.get("milestones")
    if milestones is None:
        pass
    elif isinstance(milestones, list):
        if not milestones or not all(
            isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in milestones
        ):
            raise fail(source, "milestones", "a list of positive epochs or {every: N}", milestones)
        milestones = tuple(milestones)
    elif isinstance(milestones, dict):
        if set(milestones) - {"every"}:
            raise fail(source, "milestones", "{every: N} or a list of epochs", milestones)
        every = milestones.get("every", 1)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise fail(source, "milestones.every", "a positive integer", every)
    else:
        raise fail(source, "milestones", "{every: N} or a list of epochs", milestones)

    selection = payload.get("selection") or {}
    if not isinstance(selection, dict) or set(selection) - SELECTION_KEYS:
        raise fail(source, "selection", f"a mapping with keys among {sorted(SELECTION_KEYS)}", selection)
    metric = selection.get("metric", "image_auroc")
    if metric not in METRICS:
        raise fail(source, "selection.metric", f"one of {METRICS}", metric)
    sampler = selection.get("sampler", "exhaustive")
    if sampler not in SAMPLERS:
        raise fail(source, "selection.sampler", f"one of {SAMPLERS}", sampler)

    raw_params = payload.get("params") or {}
    if not isinstance(raw_params, dict):
        raise fail(source, "params", "a mapping of epoch, lam, kernel", raw_params)
    params = {key: parse_param(value, source, f"params.{key}") for key, value in raw_params.items()}
    _check_selection_params(params, metric, source)
    if sampler == "grid" and any(isinstance(p, FloatRange) for p in params.values()):
        raise fail(source, "params", "{grid: [...]} or fixed values with sampler: grid", "a range")
    trials = _trials(selection, sampler, source)
    lam_points = selection.get("lam_points", 21)
    if isinstance(lam_points, bool) or not isinstance(lam_points, int) or lam_points < 2:
        raise fail(source, "selection.lam_points", "an integer of at least 2", lam_points)
    all_metrics = selection.get("all_metrics", False)
    if not isinstance(all_metrics, bool):
        raise fail(source, "selection.all_metrics", "true or false", all_metrics)
    if scope == "single" and any(isinstance(p, FloatRange | Choices | Grid) for p in params.values()):
        raise fail(source, "params", "fixed values with scope: single", raw_params)

    seeds = payload.get("seeds", 1)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise fail(source, "seeds", "a positive integer (training runs per category)", seeds)
    patience = payload.get("patience", 0)
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        raise fail(source, "patience", "0 (never stop early) or a positive number of milestones", patience)

    return Space(
        name=str(payload.get("name", Path(source).stem)),
        description=str(payload.get("description", "")),
        scope=scope,
        profile=profile,
        profile_overrides=dict(overrides),
        milestones=milestones,
        metric=metric,
        sampler=sampler,
        trials=trials,
        seed=int(selection.get("seed", 0)),
        lam_points=lam_points,
        all_metrics=all_metrics,
        params=params,
        training=_training(payload["training"], source) if payload.get("training") is not None else None,
        source=source,
        seeds=seeds,
        patience=patience,
    )


def _trials(selection: dict, sampler: str, source: str) -> int:
    """The trial budget: required for a sampler that draws, refused for one that enumerates the space."""
    if sampler in ENUMERATED:
        if "trials" in selection:
            raise InputError(
                f"{source}: selection.trials: not allowed with sampler: {sampler}, which evaluates every"
                " candidate (milestones x λ values x n values); remove the key"
            )
        return 0
    trials = selection.get("trials")
    if trials is None:
        raise InputError(
            f"{source}: selection.trials: sampler: {sampler} needs the number of trials per study (e.g."
            " trials: 64), or use sampler: exhaustive to evaluate every candidate"
        )
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise fail(source, "selection.trials", "a positive integer", trials)
    return trials


def builtin_spaces() -> dict[str, Path]:
    """The built-in spaces by name: the package `tfsearch.search_spaces` (the repository's search_spaces/)."""
    folder = Path(str(resources.files("tfsearch.search_spaces")))
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def load_space(name_or_path: str) -> Space:
    """A built-in space by name, or a user's YAML file by path."""
    builtins = builtin_spaces()
    path = builtins.get(name_or_path) or Path(name_or_path)
    if not path.is_file():
        raise InputError(
            f"--space {name_or_path}: no such built-in space or file; built-in spaces: {sorted(builtins)}"
        )
    try:
        payload = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML: {exc}") from None
    return parse_space(payload, str(path))
