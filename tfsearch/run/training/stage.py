"""The training stage, on the driver: one Ray Tune trial per (category, training configuration, seed).

One experiment, `train`, holds the trials of every category, the largest categories' started first. Without
training hyperparameters it is a trial per category, or per category and seed with `--seeds K` (K trials per
category side by side: work for more GPUs than categories). With them, each category's `samples`
configurations are proposed by its own Optuna searcher and stopped early at milestones by its own ASHA
scheduler (epochs are the resource; `tfsearch.run.training.category_search`), so categories train side by side
but never compete with each other. A category's selection is told to start once all its trials completed. Tune
restores the experiment only when the run is resumed (`tfsearch.run.plan.start_run` refuses anything else),
and a category whose trial fails for good is returned as failed, never passed on as if it had finished.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from tfsearch import __version__
from tfsearch.data.datasets import largest_first
from tfsearch.errors import InputError
from tfsearch.infra.interrupts import INTERRUPTIONS
from tfsearch.run.params import Choices, FloatRange, Grid
from tfsearch.run.plan import RunPlan, TrialSettings, model_id, seeded_model
from tfsearch.run.space import TRAINABLE
from tfsearch.run.start import started_by
from tfsearch.run.training.callbacks import CategoryTrained, ProgressView, RetryBudget, tune_callbacks
from tfsearch.run.training.category_search import CategoryScheduler, CategorySearch
from tfsearch.run.training.trainable import train_category
from tfsearch.store.studies import open_studies, studies_file, study_name


def trial_name(trial) -> str:
    """Names shown by the Ray dashboard and Tune: stage, category, training configuration and seed."""
    params = {k: trial.config[k] for k in TRAINABLE if k in trial.config}
    return f"train-{trial.config['category']}-{seeded_model(model_id(params), trial.config.get('seed'))}"


def run_training(
    plan: RunPlan,
    trainable: Callable[[dict, TrialSettings], None] = train_category,
    on_trained: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """One Tune experiment, a trial per (category, training configuration, seed); an experiment that exists
    is restored (the plan reached here only with `--resume`), with this command's retries, W&B mode and
    progress output.
    `on_trained(category)` is called as each category's training ends (the run starts its selection study
    then, while other categories still train).

    Returns the categories whose training failed for good, each with its error.
    """
    settings = plan.trial_settings()
    resources = {"cpu": plan.cpus_per_trial, "gpu": plan.gpus_per_trial}
    runnable = tune.with_resources(tune.with_parameters(trainable, settings=settings), resources)
    view = ProgressView(plan, plan.quiet)
    view.warn_departures()
    search = plan.space.training
    callbacks = [
        view.callback(),
        CategoryTrained(
            on_trained or (lambda category: None), plan.seeds if search is None else search.samples
        ),
        *tune_callbacks(plan.run_dir, plan.name, plan.wandb, plan.wandb_project, plan.wandb_entity),
    ]
    failure_config = tune.FailureConfig(max_failures=plan.max_failures)
    tune_root = plan.location.child("tune")
    filesystem = tune_root.filesystem
    path = tune_root.child("train").path
    if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        try:
            tuner = tune.Tuner.restore(
                path, runnable, resume_unfinished=True, resume_errored=True, storage_filesystem=filesystem
            )
        except ModuleNotFoundError as exc:  # Ray pickled the module paths of the version that started it
            if not (exc.name or "").startswith("tfsearch"):
                raise
            raise InputError(
                f"--resume: {tune_root.child('train').uri} was started by {started_by(plan.run_dir)}, whose"
                f" modules ({exc.name}) tfsearch {__version__} no longer has, so Ray cannot restore its"
                " training: finish it with that version, or start it again under another --name (a finished"
                " run still reports and exports with this version)"
            ) from None
        # Ray restores the RunConfig it pickled at the start, and each trial keeps the retry budget it was
        # created with; neither has a public setter: set what may differ on --resume
        internal = tuner._local_tuner  # None through Ray Client (ray://), whose tuner runs remotely
        if internal is None:
            raise InputError(
                "--resume through Ray Client (ray://) cannot apply this command's --max-failures, --wandb"
                " and --quiet: resume with the cluster's GCS address (HOST:6379) or from the head node"
            )
        run_config = internal.get_run_config()
        run_config.failure_config = failure_config
        run_config.callbacks = [*callbacks, RetryBudget(plan.max_failures)]
    else:
        # Tune starts trials in the order they are made: the largest categories first
        categories = largest_first(plan.dataset, plan.data_root, plan.categories)
        experiment = training_grid(plan, categories) if search is None else training_search(plan, categories)
        tune_config = tune.TuneConfig(
            trial_name_creator=trial_name, trial_dirname_creator=trial_name, **experiment.get("tune", {})
        )
        run_config = tune.RunConfig(
            name="train",
            storage_path=tune_root.path,
            storage_filesystem=filesystem,
            failure_config=failure_config,
            callbacks=callbacks,
            verbose=0,
        )
        tuner = tune.Tuner(
            runnable, param_space=experiment["param_space"], tune_config=tune_config, run_config=run_config
        )
    with INTERRUPTIONS.gracefully(stop_tune):
        results = tuner.fit()
    INTERRUPTIONS.check("training")
    if results.num_terminated + results.num_errors < len(results):
        raise InputError(
            f"training stopped with {len(results) - results.num_terminated - results.num_errors} of"
            f" {len(results)} trials unfinished: nothing was selected; continue the run with --resume"
        )
    failed: dict[str, str] = {}
    for result in results:
        if result.error is not None:
            category = result.config["category"]
            failed.setdefault(category, first_line(result.error))
            if not plan.quiet:
                print(f"[train] {category}: training failed for good: {failed[category]}", flush=True)
    return failed


def stop_tune() -> None:
    """End Tune's run as Tune ends it on a signal of its own (SIGUSR1, which `Tuner.fit` handles: the
    experiment state saved, the trials stopped); before `fit` installed that handler, stop at once."""
    if not callable(signal.getsignal(signal.SIGUSR1)):
        INTERRUPTIONS.check("training")
    os.kill(os.getpid(), signal.SIGUSR1)


def first_line(error: BaseException) -> str:
    """An error as one line: Tune wraps a trial's exception, whose own message ends its text."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def tune_domain(param):
    """A space parameter as a Ray Tune domain (which OptunaSearch turns into an Optuna distribution)."""
    if isinstance(param, FloatRange):
        return tune.loguniform(param.low, param.high) if param.log else tune.uniform(param.low, param.high)
    if isinstance(param, Choices | Grid):
        return tune.choice(list(param.values))
    return param


def training_grid(plan: RunPlan, categories: list[str]) -> dict:
    """Tuner arguments of a run without training hyperparameters: a trial per category (and seed)."""
    # with several seeds, each (category, seed) is a trial of its own: more trials than categories; the grid's
    # first key varies fastest, so a category's seeds start one after another, largest first
    seeds = {"seed": tune.grid_search(plan.training_seeds)} if plan.seeds > 1 else {}
    return {"param_space": {**seeds, "category": tune.grid_search(categories)}}


def training_search(plan: RunPlan, categories: list[str]) -> dict:
    """Tuner arguments of every category's training-hyperparameter search in one experiment: per category
    its own Optuna study proposes and its own ASHA scheduler stops, the categories asked in turn."""
    search = plan.space.training
    storage = open_studies(studies_file(plan.run_dir))
    searchers = {
        c: OptunaSearch(
            metric="selection_value",
            mode="max",
            study_name=f"{study_name(plan.space.name, plan.dataset, c)}/training",
            storage=storage,
            seed=plan.space.seed,
        )
        for c in categories
    }
    grace = plan.milestones[min(search.grace_period, len(plan.milestones)) - 1]
    schedulers = {
        c: ASHAScheduler(
            time_attr="epoch",
            metric="selection_value",
            mode="max",
            max_t=plan.milestones[-1],
            grace_period=grace,
            reduction_factor=search.reduction_factor,
        )
        for c in categories
    }
    return {
        # each category's searcher proposes these; the category comes from the searcher that was asked
        "param_space": {k: tune_domain(v) for k, v in search.params.items()},
        "tune": {
            "search_alg": CategorySearch(searchers, search.samples, metric="selection_value", mode="max"),
            "scheduler": CategoryScheduler(schedulers),
            "num_samples": search.samples * len(categories),
            # no cap, but it lets every trial wait for resources at once (Tune lets a custom searcher's
            # experiment have one waiting trial): an autoscaler sees the whole demand and starts nodes for it
            "max_concurrent_trials": search.samples * len(categories),
        },
    }
