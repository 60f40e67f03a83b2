"""The Ray Tune callbacks of the training stage, on the driver: the console view, the retry budget of a
restored experiment, the start of a category's selection once its training ended, and W&B logging.

Tune pickles its callbacks into the experiment state that `--resume` restores, so every class here is defined
at module level and stays importable under its name.

W&B: each training trial becomes one W&B run (grouped under the run's name) that logs the metrics the trial
reports at every milestone. Ray Tune logs from a helper actor, which reads its mode from its own environment:
`WANDB_MODE` set only in the driver is lost on a cluster started separately, and the actor then fails without
telling Tune (stack-notes). So the mode goes to `wandb.init` explicitly, and the driver's environment says the
same, which Ray's callback checks for an API key before it starts.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ray import tune
from ray.air.integrations.wandb import WandbLoggerCallback

from tfsearch.infra import telemetry
from tfsearch.infra.tracking import DEFAULT_PROJECT, check_mode, write_sync_note
from tfsearch.run.plan import RunPlan
from tfsearch.transfusion.protocol import paper_protocol_note


class ProgressView:
    """A live console view of the training stage: categories, trials done and running, best so far."""

    def __init__(self, plan: RunPlan, quiet: bool) -> None:
        self.plan, self.quiet = plan, quiet
        self.best: dict[str, float] = {}
        self.done: set[str] = set()
        self.running: set[str] = set()

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
            f"[train] {event} | trials done {len(self.done)}, running {len(self.running)} | best: {best}",
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


def tune_callbacks(run_dir: Path, name: str, mode: str, project: str | None, entity: str | None) -> list:
    """Ray Tune callbacks that log every training trial to W&B; [] when `mode` is disabled."""
    check_mode(mode, project)
    if mode == "disabled":
        return []
    os.environ["WANDB_MODE"] = mode
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if mode == "offline":
        write_sync_note(run_dir, f"The training trials of run {name!r}")
    return [
        WandbLoggerCallback(
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
        )
    ]
