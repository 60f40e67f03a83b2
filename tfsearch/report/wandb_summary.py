"""The report's W&B run: every table and figure in one run (offline by default), and a W&B Report laid out
from them when the optional package `wandb-workspaces` is installed and the run is online."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tfsearch.infra.tracking import (
    DEFAULT_PROJECT,
    check_mode,
    drop_other_runs,
    new_run_id,
    run_data,
    run_folder,
    run_folders,
    run_id_of,
    staged_in,
    sync_command,
    write_sync_note,
)
from tfsearch.report.render import flat_columns
from tfsearch.report.tables import Table


def _wandb_table(table: Table):
    import wandb  # seconds to import: only when the report logs to W&B

    frame = table.frame.reset_index() if table.paper or table.frame.index.name else table.frame.copy()
    frame.columns = flat_columns(frame.columns)
    frame = frame.astype(object).where(pd.notna(frame), None)
    return wandb.Table(columns=[str(c) for c in frame.columns], data=frame.values.tolist())


def log_to_wandb(
    tables: list[Table],
    run_names: list[str],
    run_dirs: list[Path],
    out: Path,
    figure_paths: dict[str, Path],
    mode: str,
    project: str | None,
    entity: str | None,
) -> str:
    """One W&B run holding every table and figure; returns what happened, for the console and the report.

    The run is the report folder's: made again, the report logs into the run id it had (`resume="allow"`)
    and the offline run folder it replaces is deleted, so `wandb sync` finds one run to upload, the one
    `wandb/SYNC.txt` names. Offline, the files W&B stages for its tables stay inside the run's folder."""
    check_mode(mode, project)
    if mode == "disabled":
        return "W&B: disabled (--wandb disabled)."
    import wandb  # seconds to import: not with --wandb disabled

    project = project or DEFAULT_PROJECT
    out = out.resolve()
    known = [run_id for run_id in map(run_id_of, run_folders(out)) if run_id]
    with wandb.init(
        project=project,
        entity=entity,
        mode=mode,
        dir=str(out),
        id=known[-1] if known else new_run_id(),
        resume="allow",
        name="report-" + "+".join(run_names),
        job_type="report",
        config={"runs": run_names, "run_dirs": [str(d.resolve()) for d in run_dirs]},
        settings=wandb.Settings(console="off", silent=True),
    ) as run:
        with staged_in(run_data(run)):
            run.log(
                {f"tables/{t.key}": _wandb_table(t) for t in tables}
                | {f"figures/{name}": wandb.Image(str(path)) for name, path in figure_paths.items()}
            )
        for table in (t for t in tables if t.paper):
            run.summary[f"{table.key}/average"] = float(table.frame.iloc[0]["Average"])
        run_url = run.url if mode == "online" else None
        folder = run_folder(run)
    drop_other_runs(out, keep=folder)
    if mode == "offline":
        write_sync_note(out, "The report's tables and figures", runs=[folder])
        return (
            f"W&B: offline run written to {folder}; upload it with `{sync_command(out, [folder])}`. The W&B"
            " Report (wandb-workspaces) needs the network: skipped offline; rerun with --wandb online."
        )
    return f"W&B: run {run_url}. " + create_wandb_report(
        tables, project, entity, run_names, list(figure_paths)
    )


def create_wandb_report(
    tables: list[Table], project: str, entity: str | None, names: list[str], figures: list[str]
) -> str:
    """Lay the tables and figures out in a W&B Report (needs the optional package wandb-workspaces)."""
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        return "W&B Report skipped: wandb-workspaces is not installed (pip install wandb-workspaces)."
    runset = wr.Runset(entity=entity or "", project=project, name="report", query="report-" + "+".join(names))
    blocks = [wr.H1(text="TransFusion search report"), wr.P(text="Runs: " + ", ".join(names))]
    for table in tables:
        blocks += [
            wr.H2(text=table.title),
            wr.PanelGrid(
                runsets=[runset], panels=[wr.WeavePanelSummaryTable(table_name=f"tables/{table.key}")]
            ),
            wr.P(text=" ".join(table.notes)),
        ]
    if figures:
        blocks += [
            wr.H2(text="Sensitivity"),
            wr.PanelGrid(
                runsets=[runset], panels=[wr.MediaBrowser(media_keys=[f"figures/{n}" for n in figures])]
            ),
        ]
    try:
        saved = wr.Report(
            project=project,
            entity=entity or "",
            title="TransFusion search report: " + ", ".join(names),
            blocks=blocks,
        ).save()
    except Exception as exc:  # network, login or API errors: the run itself is already logged
        return f"W&B Report not created: {type(exc).__name__}: {exc}"
    return f"W&B Report: {getattr(saved, 'url', 'saved')}"
