"""The training stage, on the driver: one Ray Tune trial per (category, training configuration, seed).

One experiment, `train`, holds the trials of every category, the largest categories' started first. Without
training hyperparameters it is a trial per category, or per category and seed with `--seeds K` (K trials per
category side by side: work for more GPUs than categories). With them, each category's `samples`
configurations are proposed by its own Optuna searcher and stopped early at milestones by its own ASHA
scheduler (epochs are the resource; `tfsearch.run.training.category_search`), so categories train side by side but never
compete with each other. A category's selection is told to start once all its trials completed. Tune
restores the experiment only when the run is resumed (`tfsearch.run.plan.start_run` refuses anything else), and
a category whose trial fails for good is returned as failed, never passed on as if it had finished.
"""

from __future__ import annotations

import math
import sys

from tfsearch.data.datasets import largest_first
from tfsearch.errors import InputError
from tfsearch.run.plan import RunPlan, model_id, seeded_model
from tfsearch.run.space import TRAINABLE
from tfsearch.run.training.trainable import train_category
from tfsearch.store.studies import open_studies, studies_file, study_name
from tfsearch.transfusion.protocol import paper_protocol_note


class ProgressView:
    """A live console view of the training stage: categories, trials done and running, best so far."""

    def __init__(self, plan: RunPlan, quiet: bool) -> None:
        self.plan, self.quiet = plan, quiet
        self.best: dict[str, float] = {}
        self.done: set[str] = set()
        self.running: set[str] = set()

    def callback(self):
        from ray import tune

        from tfsearch.infra import telemetry

        view = self

        class Callback(tune.Callback):
            def on_trial_start(self, iteration, trials, trial, **info):
                view.running.add(trial.trial_id)

            def on_trial_result(self, iteration, trials, trial, result, **info):
                category = trial.config["category"]
                value = result.get("selection_value", float("nan"))
                view.best[category] = max(view.best.get(category, -math.inf), value)
                telemetry.record_best(category, view.best[category])
                note = f" ({result['device_note']})" if result.get("device_note") else ""
                view.show(
                    f"{category} epoch {result.get('epoch')}: {view.plan.space.metric} {value:.4f}{note}"
                )

            def on_trial_complete(self, iteration, trials, trial, **info):
                view.running.discard(trial.trial_id)
                view.done.add(trial.trial_id)
                telemetry.record_trial_finished(trial.config["category"])

            def on_trial_error(self, iteration, trials, trial, **info):
                view.running.discard(trial.trial_id)
                view.show(f"{trial.config['category']}: trial {trial.trial_id} failed")

        return Callback()

    def warn_departures(self) -> None:
        """Once per run, on stderr and even with --quiet: the ways a paper-profile run departs from the
        paper's protocol (each trial's log says it again for its category)."""
        note = paper_protocol_note(self.plan.describe())
        if note:
            print(f"[run] warning: {note}", file=sys.stderr, flush=True)

    def show(self, event: str) -> None:
        if self.quiet:
            return
        best = ", ".join(f"{c} {v:.3f}" for c, v in sorted(self.best.items()))
        print(
            f"[train] {event} | trials done {len(self.done)}, running {len(self.running)} | best: {best}",
            flush=True,
        )


def retry_budget(max_failures: int):
    """A Tune callback that gives every trial of a restored experiment this command's `--max-failures`."""
    from ray import tune

    class RetryBudget(tune.Callback):
        def on_step_begin(self, iteration, trials, **info):
            for trial in trials:
                trial.max_failures = max_failures

    return RetryBudget()


def trial_name(trial) -> str:
    """Names shown by the Ray dashboard and Tune: stage, category, training configuration and seed."""
    params = {k: trial.config[k] for k in TRAINABLE if k in trial.config}
    return f"train-{trial.config['category']}-{seeded_model(model_id(params), trial.config.get('seed'))}"


def run_training(plan: RunPlan, trainable=train_category, selection=None) -> dict[str, str]:
    """One Tune experiment, a trial per (category, training configuration, seed); an experiment that exists
    is restored (the plan reached here only with `--resume`), with this command's retries, W&B mode and
    progress output.
    `selection` (a `tfsearch.run.selection.stage.Selection`) is told of each category whose training ended, so
    its study starts while other categories still train.

    Returns the categories whose training failed for good, each with its error.
    """
    from ray import tune

    from tfsearch.infra.tracking import tune_callbacks

    settings = plan.trial_settings()
    resources = {"cpu": plan.cpus_per_trial, "gpu": plan.gpus_per_trial}
    runnable = tune.with_resources(tune.with_parameters(trainable, settings=settings), resources)
    view = ProgressView(plan, plan.quiet)
    view.warn_departures()
    trained = selection.trained if selection is not None else (lambda category: None)
    search = plan.space.training
    callbacks = [
        view.callback(),
        category_trained(trained, plan.seeds if search is None else search.samples),
        *tune_callbacks(plan.run_dir, plan.name, plan.wandb, plan.wandb_project, plan.wandb_entity),
    ]
    failure_config = tune.FailureConfig(max_failures=plan.max_failures)
    tune_root = plan.location.child("tune")
    filesystem = tune_root.filesystem
    path = tune_root.child("train").path
    if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        tuner = tune.Tuner.restore(
            path, runnable, resume_unfinished=True, resume_errored=True, storage_filesystem=filesystem
        )
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
        run_config.callbacks = [*callbacks, retry_budget(plan.max_failures)]
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
    failed: dict[str, str] = {}
    for result in tuner.fit():
        if result.error is not None:
            category = result.config["category"]
            failed.setdefault(category, first_line(result.error))
            if not plan.quiet:
                print(f"[train] {category}: training failed for good: {failed[category]}", flush=True)
    return failed


def category_trained(trained, per_category: int):
    """A Tune callback that calls `trained(category)` when the last of a category's `per_category` trials
    (one per seed, or its training search's samples, whether ASHA stopped them or not) completes; a category
    with a trial that failed for good is never told."""
    from ray import tune

    completed: dict[str, set[str]] = {}

    class CategoryTrained(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            category = trial.config["category"]
            completed.setdefault(category, set()).add(trial.trial_id)
            if len(completed[category]) == per_category:
                trained(category)

    return CategoryTrained()


def first_line(error: BaseException) -> str:
    """An error as one line: Tune wraps a trial's exception, whose own message ends its text."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def tune_domain(param):
    """A space parameter as a Ray Tune domain (which OptunaSearch turns into an Optuna distribution)."""
    from ray import tune

    from tfsearch.run.space import Choices, FloatRange, Grid

    if isinstance(param, FloatRange):
        return tune.loguniform(param.low, param.high) if param.log else tune.uniform(param.low, param.high)
    if isinstance(param, Choices | Grid):
        return tune.choice(list(param.values))
    return param


def training_grid(plan: RunPlan, categories: list[str]) -> dict:
    """Tuner arguments of a run without training hyperparameters: a trial per category (and seed)."""
    from ray import tune

    # with several seeds, each (category, seed) is a trial of its own: more trials than categories; the grid's
    # first key varies fastest, so a category's seeds start one after another, largest first
    seeds = {"seed": tune.grid_search(plan.training_seeds)} if plan.seeds > 1 else {}
    return {"param_space": {**seeds, "category": tune.grid_search(categories)}}


def training_search(plan: RunPlan, categories: list[str]) -> dict:
    """Tuner arguments of every category's training-hyperparameter search in one experiment: per category
    its own Optuna study proposes and its own ASHA scheduler stops, the categories asked in turn."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from tfsearch.run.training.category_search import CategoryScheduler, CategorySearch

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
