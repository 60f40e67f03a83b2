"""The run's result tables, rebuilt from durable state: `trials.csv` from the milestone logs and the studies,
`selected.csv` from the studies and the cached maps; then everything the run wrote is published to its
storage. Each study's spec is worked out again from the run folder (`study_spec`), not handed over by the
selection stage, whose tasks ran elsewhere and may belong to an earlier, interrupted driver.

A category whose training failed for good gets a `failed` row in `selected.csv` with its error and nothing
selected; it is never tabulated as if it had finished. One whose training stopped early (`--patience`) has
finished: its row is selected from the milestones it reached and says where it stopped and what that saved.
"""

from __future__ import annotations

import csv
from datetime import timezone
from pathlib import Path

import optuna

from tfsearch.maps.metrics import SEG_THRESHOLD_SIGMAS
from tfsearch.run.plan import RunPlan
from tfsearch.run.selection.candidates import Candidate, mean_metrics, std_metrics
from tfsearch.run.selection.stage import run_studies, study_spec
from tfsearch.run.selection.study import best_candidate, choice_columns
from tfsearch.store.run_folder import (
    RUN_TABLES,
    SELECTED_FILE,
    TRIALS_FILE,
    read_early_stop,
    read_milestone_log,
    selected_columns,
    trial_columns,
    write_csv,
)
from tfsearch.store.studies import open_studies, studies_file
from tfsearch.transfusion.job import TrainDir


def training_rows(plan: RunPlan) -> list[dict]:
    """One row per logged milestone. The logs, not Tune's results, are the source: a retried trial reports
    a milestone again, and the log keeps exactly one row per epoch."""
    rows = []
    for category in plan.categories:
        for model_dir in sorted((plan.training_root / category).glob("*")):
            for record in read_milestone_log(model_dir):
                rows.append({**record, "stage": "train", "status": "ok", "objective": ""})
    return rows


def selection_rows(plan: RunPlan, studies: dict[str, optuna.Study]) -> list[dict]:
    """One row per completed candidate and category of every study of the run (`run_studies`)."""
    return [row for study in studies.values() for row in candidate_rows(study, plan.selection_split)]


def utc_text(moment) -> str:
    """A pandas timestamp of Optuna's (naive local time) as ISO text in UTC, as `run_folder.now` writes."""
    return moment.to_pydatetime().astimezone(timezone.utc).isoformat(timespec="seconds")


def candidate_rows(study, split: str) -> list[dict]:
    """A study's completed candidates, one row per category, from Optuna's own trials table; failed and
    unfinished trials are left out (a failed candidate is queued again and its retry has the row)."""
    attrs = ("number", "value", "state", "datetime_start", "datetime_complete", "user_attrs")
    trials = study.trials_dataframe(attrs=attrs)
    if trials.empty or "user_attrs_metrics" not in trials:
        return []
    rows = []
    for trial in trials[trials["state"] == "COMPLETE"].to_dict("records"):
        for category, metrics in trial["user_attrs_metrics"].items():
            rows.append(
                {
                    "category": category,
                    "stage": "select",
                    "split": split,
                    **{k: trial[f"user_attrs_{k}"] for k in ("model", "epoch", "lam", "kernel")},
                    # absent from the studies of earlier versions, which thresholded at the default k
                    "seg_sigmas": trial.get("user_attrs_seg_sigmas", SEG_THRESHOLD_SIGMAS),
                    **metrics,
                    "objective": trial["value"],
                    "study": study.study_name,
                    "trial": trial["number"],
                    "status": "complete",
                    # Optuna's times are naive local time: in UTC, as the training rows' are
                    "started_at": utc_text(trial["datetime_start"]),
                    "finished_at": utc_text(trial["datetime_complete"]),
                }
            )
    return rows


def write_trials(plan: RunPlan, studies: dict[str, optuna.Study] | None = None) -> list[dict]:
    """Rebuild `trials.csv` from the durable sources: the milestone logs and the studies (`run_studies`,
    read here unless given)."""
    common = {"dataset": plan.dataset, "space": plan.space.name, "protocol": plan.select_on}
    studies = run_studies(plan) if studies is None else studies
    rows = [{**common, **r} for r in training_rows(plan) + selection_rows(plan, studies)]
    stage_order = {"train": 0, "select": 1}
    rows.sort(
        key=lambda r: (
            stage_order[r["stage"]],
            r["category"],
            r.get("study", ""),
            r.get("trial", -1),
            r["model"],
            r["epoch"],
        )
    )
    write_csv(plan.run_dir / TRIALS_FILE, trial_columns(plan.seeds), rows)
    return rows


def write_selected(plan: RunPlan, failed: dict[str, str]) -> list[dict]:
    """Per category: the default and the selected configuration, each with its selection value and its test
    metrics (for `--select-on val`, test maps are read only here, after every study has finished), or a
    `failed` row naming the error of a category whose training failed for good."""
    storage = open_studies(studies_file(plan.run_dir))
    common = {
        "dataset": plan.dataset,
        "space": plan.space.name,
        "protocol": plan.select_on,
        "selection_metric": plan.space.metric,
    }
    rows = []
    for group in plan.groups:
        broken = [c for c in group if c in failed]
        if broken:
            for category in group:
                error = failed.get(category) or f"not selected: {', '.join(broken)} of its study failed"
                rows.append({**common, "category": category, "status": "failed", "error": error})
            continue
        spec = study_spec(plan, group)
        if spec is None:
            continue
        default = spec.default
        try:
            study = optuna.load_study(study_name=spec.name, storage=storage)
        except KeyError:
            continue
        chosen, choice = best_candidate(study, default)
        # test metrics: for --select-on val from the test maps, read only here, after every study finished
        test = study_spec(plan, group, split="test").maps if plan.select_on == "val" else spec.maps
        for category in group:
            row = {**common, "category": category, **choice_columns(choice), "status": "ok", "error": ""}
            row.update(early_stop_columns(plan, category))
            for prefix, candidate in (("default", default), ("selected", chosen)):
                row.update({f"{prefix}_{k}": v for k, v in candidate.as_params().items()})
                if plan.seeds == 1:
                    own = spec.maps[category].evaluate(candidate)
                    tested = own if test is spec.maps else test[category].evaluate(candidate)
                    row[f"{prefix}_selection_value"] = own[plan.space.metric]
                    row.update({f"{prefix}_test_{k}": v for k, v in tested.items()})
                    continue
                # the mean over seeds (what the study ranked) and its sample standard deviation
                own = spec.maps[category].per_seed(candidate)
                tested = own if test is spec.maps else test[category].per_seed(candidate)
                for suffix, reduce in (("", mean_metrics), ("_std", std_metrics)):
                    row[f"{prefix}_selection_value{suffix}"] = reduce(own)[plan.space.metric]
                    row.update({f"{prefix}_test_{k}{suffix}": v for k, v in reduce(tested).items()})
                row["seeds"] = plan.seeds
            rows.append(row)
            if not plan.quiet:
                print(
                    f"[select] {category}: default {plan.space.metric} {row['default_selection_value']:.4f}"
                    f" -> selected {row['selected_selection_value']:.4f} (epoch {chosen.epoch},"
                    f" λ {chosen.lam:.3f}, n {chosen.kernel}{threshold_k(plan, chosen)}); test image AUROC"
                    f" {row['selected_test_image_auroc']:.4f}"
                )
    write_csv(plan.run_dir / SELECTED_FILE, selected_columns(plan.seeds), rows)
    return rows


def threshold_k(plan: RunPlan, chosen: Candidate) -> str:
    """ ", k K" (SegF1's threshold) where the space searched or fixed k, for the selection's closing line."""
    if plan.space.values("seg_sigmas", SEG_THRESHOLD_SIGMAS) == (SEG_THRESHOLD_SIGMAS,):
        return ""
    return f", k {chosen.seg_sigmas:g}"


def early_stop_columns(plan: RunPlan, category: str) -> dict:
    """selected.csv's `EARLY_STOP_COLUMNS` of a category over its training runs (seeds, configurations): how
    many stopped early, at which epochs, the epochs they did not train, and the device-hours that saved: the
    epochs not trained x the run's measured seconds per epoch (its history) x the trial's GPUs, or its CPUs
    in a run without GPUs. Maps of the milestones not reached are saved too and not counted."""
    devices = plan.gpus_per_trial or plan.cpus_per_trial
    stops = []
    for train_dir in sorted(p for p in (plan.training_root / category).glob("*") if p.is_dir()):
        stop = read_early_stop(train_dir)
        if stop is not None:
            stops.append((stop, seconds_per_epoch(TrainDir(train_dir).history_file)))
    return {
        "stopped_early": len(stops),
        "stopped_at_epoch": ";".join(str(stop["epoch"]) for stop, _ in stops),
        "epochs_not_trained": sum(int(stop["epochs_not_trained"]) for stop, _ in stops),
        "device_hours_saved": sum(stop["epochs_not_trained"] * s for stop, s in stops) * devices / 3600.0,
    }


def seconds_per_epoch(history: Path) -> float:
    """The mean training seconds of an epoch in a training run's history (0 without one)."""
    if not history.is_file():
        return 0.0
    seconds = [float(row["seconds"]) for row in csv.DictReader(history.read_text().splitlines())]
    return sum(seconds) / len(seconds) if seconds else 0.0


def publish(plan: RunPlan) -> None:
    """Copy what the run folder holds of the results (tables, studies, report, W&B offline runs) to the
    run's storage, where `tfsearch report` reads them and where they outlive the cluster. Without
    `--storage` the run folder is the storage and nothing moves."""
    if not plan.storage_is_elsewhere:
        return
    studies = studies_file(plan.run_dir)
    for name in (*RUN_TABLES, studies.name):
        if (plan.run_dir / name).is_file():
            plan.location.upload(plan.run_dir / name, name)
    for folder in ("report", "wandb"):
        if (plan.run_dir / folder).is_dir():
            plan.location.upload_folder(plan.run_dir / folder, folder)


def failed_message(failed: dict[str, str]) -> str:
    """The run's closing error: each failed category and its error."""
    lines = [f"  {category}: {error}" for category, error in sorted(failed.items())]
    return f"training failed for good in {len(failed)} categor{'y' if len(failed) == 1 else 'ies'}" + (
        " (`--resume` retries exactly these):\n" + "\n".join(lines)
    )
