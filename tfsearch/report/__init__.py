"""`tfsearch report`: the supplement's tables and figures from finished runs, beside the published numbers.

From one or more run folders (`tfsearch run` writes them) it builds, per dataset, with a row (or rows) for
every run of the dataset:

1. the paper tables: AUPRO of the single configuration (supplementary Tables 1-2) and image AUROC tuned per
   class (Tables 3-4; the `per_class_epochs` runs first), in the supplement's shape; for MVTec AD 2, whose
   TransFusion results are unpublished, a table per MVTec AD 2 metric instead (`ad2_tables`);
2. wide tables with every metric, one column per published source and its Δ (extra outputs);
3. default, validation-selected and oracle-selected test metrics side by side, when both protocols are given;
4. each run's `importance.csv`, and the last training milestone of every training run; for a run with
   several seeds per category, its default and selected test metrics as mean ± std over the seeds; the
   categories that stopped training early (`--patience`), with their epoch and the device-hours saved;
5. per run, each category's metrics per defect kind at its selected configuration, from its test maps;
6. the λ and n sensitivity figures (supplementary Figures 2-3), exact, from the runs' final-epoch test maps,
   a line per run.

Under each run it says where a paper-profile run departs from the paper's protocol
(`tfsearch.transfusion.protocol`).

It writes, under `--out` (default: FIRST_RUN_DIR/report):

    report.md, report.html     everything in one document (the HTML embeds its figures)
    tables/KEY.csv, KEY.md     each table; paper tables also as KEY.tex (booktabs at 8 pt, in panels on a
                               one-column page: `tfsearch.report.latex`)
    tables/published_comparison.csv   every (ours, published, Δ) pair with its source
    figures/NAME.png, NAME.svg, NAME.csv   each figure and its points
    wandb/                     the W&B summary run (offline by default; SYNC.txt says how to upload it)

The package imports neither torch nor Ray nor the search: it reads run folders through
`tfsearch.store.run_folder`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tfsearch.errors import InputError
from tfsearch.infra.tracking import check_mode
from tfsearch.report.ad2_tables import ad2_tables
from tfsearch.report.figures import AXES, Curve, caption, curves_frame, sensitivity_curves, sensitivity_figure
from tfsearch.report.kinds import per_kind_tables
from tfsearch.report.latex import table_latex
from tfsearch.report.paper_tables import paper_tables
from tfsearch.report.published import PublishedNumbers
from tfsearch.report.render import (
    comparison_csv,
    html_document,
    markdown_document,
    table_csv,
    table_markdown,
)
from tfsearch.report.run_tables import (
    early_stop_table,
    importance_tables,
    protocol_tables,
    seed_tables,
    training_table,
    wide_tables,
)
from tfsearch.report.runs import RunResults, distinct_names, load_run
from tfsearch.report.tables import COMPARISON_COLUMNS, PROTOCOL_LABELS, REPORT_METRICS, Table
from tfsearch.report.wandb_summary import log_to_wandb
from tfsearch.store.atomic import atomic_write, atomic_write_text
from tfsearch.store.location import local_run_dir
from tfsearch.store.run_folder import dashboard_of

TITLE = "TransFusion search report"


@dataclass
class Report:
    runs: list[RunResults]
    tables: list[Table]
    comparison: list[dict]
    curves: dict[str, list[Curve]]  # axis -> one curve per run with maps
    missing: list[str]


def build_report(
    runs: list[RunResults], published: PublishedNumbers | None = None, compare_anyway: bool = False
) -> Report:
    published = published or PublishedNumbers()
    distinct_names(runs)
    comparison: list[dict] = []
    tables = paper_tables(runs, published, comparison, compare_anyway)
    tables += ad2_tables(runs)
    tables += wide_tables(runs, published, comparison, compare_anyway)
    tables += seed_tables(runs) + protocol_tables(runs) + importance_tables(runs)
    training, stopped = training_table(runs), early_stop_table(runs)
    tables += [table for table in (training, stopped) if table]
    kinds, kind_notes = per_kind_tables(runs)
    tables += kinds
    curves, notes = sensitivity_curves(runs)
    missing = [note for run in runs for note in run.missing] + kind_notes + notes
    return Report(runs, tables, comparison, curves, missing)


def _run_lines(run: RunResults) -> list[str]:
    """The run's summary, and beneath it how it departs from the paper's protocol, if it does, and where
    its categories stopped training early (`--patience`)."""
    lines = [_run_summary(run), *([f"{run.name}: {run.paper_note}"] if run.paper_note else [])]
    return lines + ([run.early_stop_note] if run.early_stop_note else [])


def _run_summary(run: RunResults) -> str:
    profile = run.config["profile"]
    return (
        f"{run.name} — {run.path}: dataset {run.dataset} ({len(run.categories)} categories), space "
        f"{run.space} (scope {run.scope}), profile {profile.get('name', '?')}, {profile.get('epochs', '?')}"
        f" epochs, image size {profile.get('image_size', '?')}, milestones {run.config.get('milestones')},"
        f" selected on {PROTOCOL_LABELS.get(run.select_on, run.select_on)}"
    )


def _captions(report: Report) -> dict[str, str]:
    return {
        axis.figure: caption(axis, report.curves[key]) for key, axis in AXES.items() if report.curves[key]
    }


# ------------------------------------------------------------------------------------------------- write
def _remove_stale(folder: Path, keep: set[Path], suffixes: tuple[str, ...]) -> None:
    """Drop what an earlier report left in our own folders and this one did not write (a figure that no
    longer has data, a renamed run's table), so that the folder matches the report."""
    for path in folder.glob("*"):
        if path.suffix in suffixes and path not in keep:
            path.unlink()


def write_tables(report: Report, folder: Path) -> set[Path]:
    """Each table as CSV and Markdown (paper tables also as LaTeX), plus the (ours, published) list."""
    written = set()
    for table in report.tables:
        outputs = {".csv": table_csv(table), ".md": table_markdown(table)}
        outputs |= {".tex": table_latex(table)} if table.paper else {}
        for suffix, text in outputs.items():
            written.add(folder / f"{table.key}{suffix}")
            atomic_write_text(folder / f"{table.key}{suffix}", text)
    comparison = folder / "published_comparison.csv"
    atomic_write_text(comparison, comparison_csv(report.comparison, COMPARISON_COLUMNS))
    written.add(comparison)
    _remove_stale(folder, written, (".csv", ".tex", ".md"))
    return written


def write_figures(report: Report, folder: Path) -> dict[str, Path]:
    """Each sensitivity figure as PNG and SVG, its points as CSV; returns the PNG of each."""
    png = {}
    for key, axis in AXES.items():
        if not report.curves[key]:
            continue
        figure = sensitivity_figure(report.curves[key], axis)
        for fmt in ("png", "svg"):
            path = folder / f"{axis.figure}.{fmt}"
            atomic_write(path, lambda handle, f=figure, fmt=fmt: f.savefig(handle, format=fmt, dpi=150))
        atomic_write_text(folder / f"{axis.figure}.csv", curves_frame(report.curves[key]).to_csv(index=False))
        png[axis.figure] = folder / f"{axis.figure}.png"
    if folder.is_dir():
        keep = {path.with_suffix(suffix) for path in png.values() for suffix in (".png", ".svg", ".csv")}
        _remove_stale(folder, keep, (".png", ".svg", ".csv"))
    return png


def _distinct_folders(run_dirs: list[Path | str]) -> tuple[list[Path], list[str]]:
    """The local run folders to read, each once; and a line for each given again."""
    local, seen, again = [], set(), []
    for typed in run_dirs:
        folder = local_run_dir(str(typed))  # a run on an object store is fetched first
        if folder.resolve() in seen:
            again.append(f"{typed} was given more than once: reported once.")
            continue
        seen.add(folder.resolve())
        local.append(folder)
    return local, again


def _studies_lines(runs: list[RunResults]) -> list[str]:
    """Per run, the optuna-dashboard command that opens its studies, or why there is none here."""
    lines = []
    for run in runs:
        command = dashboard_of(run.path)
        lines.append(
            f"{run.name}: `{command}`"
            if command
            else f"{run.name}: no studies.db or studies.journal in {run.path} (selection has not started, or"
            " the folder is a copy of a run's tables, as of a run read from an object store)"
        )
    return lines


def write_report(
    run_dirs: list[Path | str],
    out: Path | None = None,
    wandb: str = "offline",
    project: str | None = None,
    entity: str | None = None,
    quiet: bool = False,
    compare_anyway: bool = False,
) -> Path:
    """Write every table, figure and document of the runs into `out` (default: FIRST_RUN_DIR/report);
    report.md and the console also say how to open each run's studies with optuna-dashboard."""
    if not run_dirs:
        raise InputError("tfsearch report: expected at least one RUN_DIR")
    check_mode(wandb, project)
    local, again = _distinct_folders(run_dirs)
    runs = [load_run(d) for d in local]
    out = Path(out) if out is not None else local[0] / "report"
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    say: Callable[[str], None] = (lambda _: None) if quiet else (lambda m: print(m, flush=True))
    report = build_report(runs, compare_anyway=compare_anyway)
    for note in again:
        say(f"[report] {note}")
    for note in report.missing:
        say(f"[report] missing: {note}")
    written = write_tables(report, out / "tables")
    figure_paths = write_figures(report, out / "figures")
    written |= {p.with_suffix(s) for p in figure_paths.values() for s in (".png", ".svg", ".csv")}
    wandb_note = log_to_wandb(
        report.tables,
        [r.name for r in runs],
        [r.path for r in runs],
        out,
        figure_paths,
        wandb,
        project,
        entity,
    )
    files = ["report.md", "report.html", *sorted(str(p.relative_to(out)) for p in written)]
    files += ["wandb/"] if wandb != "disabled" else []
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    studies = _studies_lines(runs)
    runs_lines = [f"Generated {generated} by `tfsearch report`.", *(x for r in runs for x in _run_lines(r))]
    before = [
        ("Runs", [*runs_lines, *again]),
        *([("Studies (optuna-dashboard)", studies)] if studies else []),
        *([("Missing", report.missing)] if report.missing else []),
    ]
    links = [f"[{name}]({name})" for name in files]
    after = [("Weights & Biases", [wandb_note]), ("Files", links)]
    captions = _captions(report)
    atomic_write_text(out / "report.md", markdown_document(TITLE, before, report.tables, captions, after))
    png = {name: path.read_bytes() for name, path in figure_paths.items()}
    page = html_document(TITLE, before, report.tables, captions, after, png)
    atomic_write_text(out / "report.html", page)
    say(f"[report] {len(report.tables)} tables, {len(figure_paths)} figures: {out / 'report.html'}")
    for line in studies:
        say(f"[report] studies of {line.replace('`', '')}")
    say(f"[report] {wandb_note}")
    return out


__all__ = [
    "REPORT_METRICS",
    "PublishedNumbers",
    "Report",
    "build_report",
    "load_run",
    "write_report",
]
