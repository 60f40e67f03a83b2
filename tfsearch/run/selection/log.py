"""The selection made visible: how much epoch, λ, n (and k) move the selection metric, and each study in W&B.

`importance.csv` (columns `IMPORTANCE_COLUMNS`) has one row per (scope, parameter) of a run: scope is a
category (its own study), or `all`, the dataset (the global study, or the mean over the per-class studies).
Parameters fixed by the space have no row. Two methods:

- `grid_variance`, for exhaustive and grid studies, which hold every combination: the share of the objective's
  variance over the grid explained by the parameter's main effect, Σ_v n_v (mean_v − mean)² / Σ (y − mean)²
  (its marginal curve's spread, exact; the shares need not sum to 1, the rest being interactions). Undefined
  (an empty cell) when every candidate scored the same.
- `optuna_fanova`, for TPE and random studies: Optuna's fANOVA importances (normalised to sum to 1).

With `--wandb offline|online` each study also becomes a W&B run (job type `select`, grouped under the run's
name). Its summary, what W&B's run table and panels show, holds the table `candidates` (every candidate with
its parameters, selection value and metrics; `candidates_count` rows) and the choice: `selected_model`,
`selected_epoch`, `selected_lam`, `selected_kernel` (n), `selected_seg_sigmas` (k of SegF1's threshold),
`selected_is_default`, `selected_trial` (the candidate's number, none for the default), `selected_value`,
`best_value`, `tied_at_best`. The table's staged files stay in the run's own folder.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from tfsearch.infra.tracking import DEFAULT_PROJECT, check_mode, run_data, staged_in, write_sync_note
from tfsearch.run.plan import RunPlan
from tfsearch.run.selection.candidates import Candidate
from tfsearch.run.selection.stage import ALL, run_studies
from tfsearch.run.selection.study import CHOICE_ATTR, best_candidate, candidate_of
from tfsearch.store.run_folder import IMPORTANCE_COLUMNS, IMPORTANCE_FILE, write_csv
from tfsearch.store.studies import studies_file

PARAMETERS = ("model", "epoch", "lam", "kernel", "seg_sigmas")


def candidates_frame(study: optuna.Study) -> pd.DataFrame:
    """Every finished candidate of a study: number, parameters, objective value and recorded metrics."""
    rows = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if "metrics" not in trial.user_attrs:
            continue
        candidate = candidate_of(trial)
        row = {"trial": trial.number, **candidate.as_params(), "value": trial.value}
        for category, metrics in trial.user_attrs["metrics"].items():
            row.update({f"{category}/{name}": value for name, value in metrics.items()})
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else ["trial", *PARAMETERS, "value"])


def grid_importance(frame: pd.DataFrame) -> dict[str, float]:
    """Main-effect variance share of each parameter that varies over a complete grid."""
    varying = [p for p in PARAMETERS if p in frame and frame[p].nunique() > 1]
    total = float(((frame["value"] - frame["value"].mean()) ** 2).sum())
    shares = {}
    for parameter in varying:
        groups = frame.groupby(parameter)["value"].agg(["mean", "size"])
        between = float((groups["size"] * (groups["mean"] - frame["value"].mean()) ** 2).sum())
        shares[parameter] = between / total if total > 0 else math.nan
    return shares


def fanova_importance(study: optuna.Study) -> dict[str, float]:
    """Optuna's fANOVA importances, with the study's `checkpoint` parameter reported as `epoch` when one
    model was trained (it is then the milestone alone)."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if len({tuple(sorted(t.params.items())) for t in complete}) < 2:
        return {}
    models = {t.user_attrs.get("model") for t in complete}
    rename = {"checkpoint": "epoch" if len(models) == 1 else "checkpoint"}
    if len({t.value for t in complete}) < 2:  # every candidate scored the same: undefined
        importances = dict.fromkeys({name for t in complete for name in t.params}, math.nan)
    else:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    return {rename.get(name, name): float(value) for name, value in sorted(importances.items())}


def importance_rows(dataset: str, studies: dict[str, optuna.Study], enumerated: bool) -> list[dict]:
    """Rows of `importance.csv`: each study's, then for per-class studies their mean as scope `all`."""
    method = "grid_variance" if enumerated else "optuna_fanova"
    rows = []
    for scope, study in studies.items():
        shares = grid_importance(candidates_frame(study)) if enumerated else fanova_importance(study)
        rows += [
            {"dataset": dataset, "scope": scope, "parameter": p, "importance": v, "method": method}
            for p, v in shares.items()
        ]
    if ALL not in studies:
        frame = pd.DataFrame(rows)
        if not frame.empty:
            means = frame.groupby("parameter", sort=False)["importance"].mean()
            rows += [
                {"dataset": dataset, "scope": ALL, "parameter": p, "importance": float(v), "method": method}
                for p, v in means.items()
            ]
    return rows


def choice_summary(study: optuna.Study) -> dict:
    """A study's choice as its W&B summary keys: the chosen configuration, whether it is the default, and how
    the candidates ranked. Without a recorded choice, only what the candidates say."""
    choice = study.user_attrs.get(CHOICE_ATTR)
    if choice is None:
        return {}
    trial = choice.get("trial")
    default = Candidate(**choice["default"]) if "default" in choice else None
    chosen = default if trial is None else best_candidate(study, default)[0]
    summary = {
        "selected_trial": trial,
        "selected_value": choice.get("value"),
        "tied_at_best": choice.get("tied"),
    }
    if chosen is not None:
        summary.update({f"selected_{k}": v for k, v in chosen.as_params().items()})
        summary["selected_is_default"] = trial is None or chosen == default
    return summary


def log_studies_to_wandb(
    studies: dict[str, optuna.Study],
    run_dir: Path,
    group: str,
    mode: str,
    project: str | None,
    entity: str | None,
) -> None:
    """One W&B run per study: its candidates as a table, its choice in the summary."""
    check_mode(mode, project)
    if mode == "disabled":
        return
    import wandb  # seconds to import: not with --wandb disabled

    for scope, study in studies.items():
        frame = candidates_frame(study)
        with wandb.init(
            project=project or DEFAULT_PROJECT,
            entity=entity,
            mode=mode,
            dir=str(Path(run_dir).resolve()),
            group=group,
            name=f"select-{scope}",
            job_type="select",
            config={"study": study.study_name, "scope": scope},
            settings=wandb.Settings(console="off", silent=True),
        ) as run:
            table = frame.astype(object).where(frame.notna(), None)  # NaN cells as empty
            with staged_in(run_data(run)):
                run.log({"candidates": wandb.Table(dataframe=table)})  # the summary keeps the table
            summary = {"candidates_count": len(frame), **choice_summary(study)}
            if len(frame):
                summary["best_value"] = float(np.nanmax(frame["value"]))
            run.summary.update({k: v for k, v in summary.items() if v is not None})
    if mode == "offline":
        write_sync_note(Path(run_dir).resolve(), "The training trials and selection studies")


def log_selection(plan: RunPlan, studies: dict[str, optuna.Study] | None = None) -> dict[str, optuna.Study]:
    """Write `importance.csv` and log the run's studies to W&B (per the run's --wandb); `studies` by scope
    (`run_studies`, read here unless given)."""
    if not studies_file(plan.run_dir).is_file():
        return {}
    studies = run_studies(plan) if studies is None else studies
    rows = importance_rows(plan.dataset, studies, plan.space.enumerated)
    write_csv(plan.run_dir / IMPORTANCE_FILE, IMPORTANCE_COLUMNS, rows)
    log_studies_to_wandb(
        studies,
        plan.run_dir,
        plan.name,
        plan.wandb,
        plan.wandb_project,
        plan.wandb_entity,
    )
    if not plan.quiet:
        for row in rows:
            if row["scope"] == ALL:
                print(f"[select] importance of {row['parameter']}: {row['importance']:.3f} ({row['method']})")
        sys.stdout.flush()
    return studies
