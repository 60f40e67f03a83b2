"""The Ray Tune callbacks of the training stage, on the driver: the console view, the retry budget of a
restored experiment, the start of a category's selection once its training ended, and W&B logging.

Tune pickles its callbacks into the experiment state that `--resume` restores, so every class here is defined
at module level and stays importable under its name.

W&B: each training trial becomes one W&B run (grouped under the run's name) that logs what the trial reports
at every milestone, and whose config holds the trial's config (category, seed, training hyperparameters) on
top of the run's settings (profile, epochs, lr, seed, precision, ...; `wandb_config`). Ray Tune logs from a
helper actor on the driver's node, which reads its mode from its own environment: `WANDB_MODE` set only in the
driver is lost on a cluster started separately, and the actor then fails without telling Tune (stack-notes).
So the mode goes to `wandb.init` explicitly, and the driver's environment says the same, which Ray's callback
checks for an API key before it starts; the actor's own environment keeps what W&B stages in the run folder
and its run summaries off the console (`TrialRuns`).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import ray
from ray import tune
from ray.air.integrations.wandb import WANDB_ENV_VAR, WandbLoggerCallback
from ray.air.util.node import _force_on_current_node

from tfsearch.infra import telemetry
from tfsearch.infra.tracking import DATA_FOLDER, DEFAULT_PROJECT, check_mode, wandb_env, write_sync_note
from tfsearch.run.cost import duration, makespan
from tfsearch.run.plan import RunPlan
from tfsearch.store.run_folder import CONFIG_FILE, read_config
from tfsearch.transfusion.protocol import paper_protocol_note

# seconds the end of training waits for each trial's W&B run to finish: offline it only writes local files;
# online it may still be uploading its last history
FINISH_TIMEOUT_S = {"offline": 30, "online": 300}


class ProgressView:
    """A live console view of the training stage: categories, trials done and running, best so far, and
    the time left: the plan's estimate (`plan.estimate`), its training steps corrected by the epochs measured
    so far (the trials report their images per second at every milestone)."""

    def __init__(self, plan: RunPlan, quiet: bool) -> None:
        self.plan, self.quiet = plan, quiet
        self.best: dict[str, float] = {}
        self.done: set[str] = set()
        self.running: set[str] = set()
        self.reached: dict[str, tuple[str, int]] = {}  # trial id -> (category, its latest milestone epoch)
        self.speeds: list[float] = []  # measured seconds per training image over the calibrated ones

    def record(
        self, trial_id: str, category: str, epoch: int | None, images_per_second: float | None
    ) -> None:
        """A trial's milestone: how far it got, and how fast its last epoch trained."""
        if epoch is not None:
            self.reached[trial_id] = (category, int(epoch))
        estimate = self.plan.estimate
        if estimate is not None and images_per_second:
            self.speeds.append(1 / images_per_second / estimate.calibration.train_seconds_per_image)

    def time_left(self) -> str:
        """The estimated wall time left, from the estimate corrected by the measured epochs; "" without an
        estimate."""
        estimate = self.plan.estimate
        if estimate is None:
            return ""
        factor = sum(self.speeds) / len(self.speeds) if self.speeds else 1.0
        calibration = estimate.calibration
        milestones = self.plan.milestones
        left = []
        for cost in estimate.categories:
            started = [
                epoch
                for trial, (category, epoch) in self.reached.items()
                if category == cost.category and trial not in self.done
            ]
            finished = sum(1 for trial in self.done if self.reached.get(trial, ("",))[0] == cost.category)
            waiting = sorted(cost.trial_seconds)[: max(0, cost.trials - len(started) - finished)]
            share = cost.train_seconds / cost.device_seconds if cost.device_seconds else 0.0
            left += [seconds * (1 + share * (factor - 1)) for seconds in waiting]
            left += [
                (cost.epochs - epoch) * cost.train_images * calibration.train_seconds_per_image * factor
                + sum(1 for m in milestones if m > epoch)
                * cost.eval_images
                * calibration.infer_seconds_per_image
                for epoch in started
            ]
        wall = makespan(left, estimate.slots.count) if left else 0.0
        source = (
            f"training steps x{factor:.2f} as measured so far" if self.speeds else "no epoch measured yet"
        )
        return f" | left about {duration(wall)} of the estimated {duration(estimate.wall_seconds)} ({source})"

    def callback(self) -> ProgressCallback:
        return ProgressCallback(self)

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
            f"[train] {event} | trials done {len(self.done)}, running {len(self.running)} | best: {best}"
            f"{self.time_left()}",
            flush=True,
        )


class ProgressCallback(tune.Callback):
    """Feeds a `ProgressView` (and the Ray dashboard's gauges) from Tune's trial events."""

    def __init__(self, view: ProgressView) -> None:
        self.view = view

    def on_trial_start(self, iteration, trials, trial, **info):
        self.view.running.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        view = self.view
        category = trial.config["category"]
        value = result.get("selection_value", float("nan"))
        view.best[category] = max(view.best.get(category, -math.inf), value)
        view.record(trial.trial_id, category, result.get("epoch"), result.get("images_per_second"))
        telemetry.record_best(category, view.best[category])
        note = f" ({result['device_note']})" if result.get("device_note") else ""
        view.show(f"{category} epoch {result.get('epoch')}: {view.plan.space.metric} {value:.4f}{note}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.view.running.discard(trial.trial_id)
        self.view.done.add(trial.trial_id)
        telemetry.record_trial_finished(trial.config["category"])

    def on_trial_error(self, iteration, trials, trial, **info):
        self.view.running.discard(trial.trial_id)
        self.view.show(f"{trial.config['category']}: trial {trial.trial_id} failed")


class RetryBudget(tune.Callback):
    """Gives every trial of a restored experiment this command's `--max-failures`."""

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures

    def on_step_begin(self, iteration, trials, **info):
        for trial in trials:
            trial.max_failures = self.max_failures


class CategoryTrained(tune.Callback):
    """Calls `trained(category)` when the last of a category's `per_category` trials (one per seed, or its
    training search's samples, whether ASHA stopped them or not) completes; a category with a trial that
    failed for good is never told."""

    def __init__(self, trained: Callable[[str], None], per_category: int) -> None:
        self.trained, self.per_category = trained, per_category
        self.completed: dict[str, set[str]] = {}

    def on_trial_complete(self, iteration, trials, trial, **info):
        category = trial.config["category"]
        self.completed.setdefault(category, set()).add(trial.trial_id)
        if len(self.completed[category]) == self.per_category:
            self.trained(category)


class TrialRuns(WandbLoggerCallback):
    """Ray Tune's W&B callback (a W&B run per trial, logged by an actor on the driver's node) with

    - `settings` (the run's, `wandb_config`) in every run's config beneath the trial's own config;
    - `env` in the logging actor's environment (`tracking.wandb_env`: staging in the run folder, quiet);
    - the logging actor not restarted by Ray: Ray restarts it by default, and for such an actor, which gets
      the handle of its queue, the driver's core worker logs an error-level line (ray-project/ray#53727) on
      every run. An actor that dies ends that trial's W&B run, not its training; Ray reports the error.

    All three happen where Ray 2.60 starts the actor (`_start_logging_actor`, which creates the actor class
    once as `_remote_logger_class`); tests/test_wandb_runs.py checks the runs and the console it makes."""

    def __init__(self, settings: dict, env: dict[str, str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.settings, self.env = dict(settings), dict(env)

    def _start_logging_actor(self, trial, exclude_results, **wandb_init_kwargs):
        if not self._remote_logger_class:
            env = {**self.env, **{k: os.environ[k] for k in (WANDB_ENV_VAR,) if k in os.environ}}
            self._remote_logger_class = ray.remote(
                num_cpus=0, **_force_on_current_node(), runtime_env={"env_vars": env}, max_restarts=0
            )(self._logger_actor_cls)
        wandb_init_kwargs["config"] = {**self.settings, **wandb_init_kwargs.get("config", {})}
        super()._start_logging_actor(trial, exclude_results, **wandb_init_kwargs)


def wandb_config(described: dict) -> dict:
    """The settings every training run of a run shares, for its W&B config: from the run's plan as
    `RunPlan.describe` (config.json) has it. A trial's own config (seed, lr searched, ...) comes first."""
    profile = described.get("profile") or {}
    space = described.get("space") or {}
    config = {
        "run": described.get("name"),
        "dataset": described.get("dataset"),
        "space": space.get("name") if isinstance(space, dict) else space,
        "profile": profile.get("name"),
        "epochs": profile.get("epochs"),
        "lr": profile.get("lr"),
        "batch_size": profile.get("batch_size"),
        "image_size": profile.get("image_size"),
        "seed": profile.get("seed"),
        "precision": described.get("precision"),
    }
    return {k: v for k, v in config.items() if v is not None}


def tune_callbacks(
    run_dir: Path,
    name: str,
    mode: str,
    project: str | None,
    entity: str | None,
    described: dict | None = None,
) -> list:
    """Ray Tune callbacks that log every training trial to W&B; [] when `mode` is disabled. `described`: the
    run's plan (`RunPlan.describe()`), whose settings each run's config holds; by default the run folder's
    config.json, when it has one."""
    check_mode(mode, project)
    if mode == "disabled":
        return []
    os.environ["WANDB_MODE"] = mode
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if described is None and (run_dir / CONFIG_FILE).is_file():
        described = read_config(run_dir)
    if mode == "offline":
        write_sync_note(run_dir, f"The training trials of run {name!r}")
    return [
        TrialRuns(
            settings=wandb_config(described or {}),
            # WANDB_SERVICE empty: each actor starts its own W&B service, with this environment, rather than
            # join one that the environment Ray was started from named
            env={**wandb_env(run_dir / "wandb" / DATA_FOLDER), "WANDB_MODE": mode, "WANDB_SERVICE": ""},
            project=project or DEFAULT_PROJECT,
            group=name,
            entity=entity,
            mode=mode,
            dir=str(run_dir),  # wandb.init writes into DIR/wandb/
            job_type="train",
            tags=[name],
            # Ray names each W&B run by its trial id: a trial retried or continued on --resume logs on into
            # its run instead of restarting it (Ray's default is resume=False)
            resume="allow",
            reinit="finish_previous",  # what Ray's reinit=True meant, which wandb 0.31 warns is deprecated
            # how long the end of training (or a Ctrl-C) waits for the runs' `wandb.finish`: Ray's default,
            # 30 minutes, kept an interrupted driver waiting on actors whose trials had been stopped
            upload_timeout=FINISH_TIMEOUT_S[mode],
        )
    ]
