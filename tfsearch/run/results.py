"""The run's result tables, rebuilt from durable state: `trials.csv` from the milestone logs and the studies,
`selected.csv` from the studies and the cached maps; then everything the run wrote is published to its
storage.

A category whose training failed for good gets a `failed` row in `selected.csv` with its error and nothing
selected; it is never tabulated as if it had finished.
"""

from __future__ import annotations

from datetime import timezone

from tfsearch.run.plan import RunPlan
from tfsearch.run.selection.stage import selection_plan, selection_study_names
from tfsearch.store.run_folder import (
    RUN_TABLES,
    SELECTED_FILE,
    TRIALS_FILE,
    read_milestone_log,
    selected_columns,
    trial_columns,
    write_csv,
)
from tfsearch.store.studies import open_studies, studies_file


def training_rows(plan: RunPlan) -> list[dict]:
    """One row per logged milestone. The logs, not Tune's results, are the source: a retried trial reports
    a milestone again, and the log keeps exactly one row per epoch."""
    rows = []
    for category in plan.categories:
        for model_dir in sorted((plan.storage / "train" / category).glob("*")):
            for record in read_milestone_log(model_dir):
                rows.append({**record, "stage": "train", "status": "ok", "objective": ""})
    return rows


def selection_rows(plan: RunPlan) -> list[dict]:
    """One row per completed candidate and category of every study of the run."""
    import optuna

    path = studies_file(plan.run_dir)
    if not path.is_file():
        return []
    storage = open_studies(path)
    names = {s.study_name for s in storage.get_all_studies()}
    rows = []
    for name in selection_study_names(plan):
        if name in names:
            rows += candidate_rows(optuna.load_study(study_name=name, storage=storage), plan.selection_split)
    return rows


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


def write_trials(plan: RunPlan) -> list[dict]:
    """Rebuild `trials.csv` from the durable sources: the milestone logs and the studies."""
    common = {"dataset": plan.dataset, "space": plan.space.name, "protocol": plan.select_on}
    rows = [{**common, **r} for r in training_rows(plan) + selection_rows(plan)]
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
    import optuna

    from tfsearch.run.selection.candidates import best_config, choice_columns, mean_metrics, std_metrics

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
        selection = selection_plan(plan, group)
        if selection is None:
            continue
        default = selection.default
        try:
            study = optuna.load_study(study_name=selection.name, storage=storage)
        except KeyError:
            continue
        chosen, choice = best_config(study, default)
        if plan.select_on == "val":
            test = selection_plan(plan, group, split="test").candidates
        else:
            test = selection.candidates
        for category in group:
            row = {**common, "category": category, **choice_columns(choice), "status": "ok", "error": ""}
            for prefix, config in (("default", default), ("selected", chosen)):
                row.update({f"{prefix}_{k}": v for k, v in config.as_params().items()})
                if plan.seeds == 1:
                    own = selection.candidates[category].evaluate(config)
                    tested = own if test is selection.candidates else test[category].evaluate(config)
                    row[f"{prefix}_selection_value"] = own[plan.space.metric]
                    row.update({f"{prefix}_test_{k}": v for k, v in tested.items()})
                    continue
                # the mean over seeds (what the study ranked) and its sample standard deviation
                own = selection.candidates[category].per_seed(config)
                tested = own if test is selection.candidates else test[category].per_seed(config)
                for suffix, reduce in (("", mean_metrics), ("_std", std_metrics)):
                    row[f"{prefix}_selection_value{suffix}"] = reduce(own)[plan.space.metric]
                    row.update({f"{prefix}_test_{k}{suffix}": v for k, v in reduce(tested).items()})
                row["seeds"] = plan.seeds
            rows.append(row)
            if not plan.quiet:
                print(
                    f"[select] {category}: default {plan.space.metric} {row['default_selection_value']:.4f}"
                    f" -> selected {row['selected_selection_value']:.4f} (epoch {chosen.epoch},"
                    f" λ {chosen.lam:.3f}, n {chosen.kernel}); test image AUROC"
                    f" {row['selected_test_image_auroc']:.4f}"
                )
    write_csv(plan.run_dir / SELECTED_FILE, selected_columns(plan.seeds), rows)
    return rows


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
