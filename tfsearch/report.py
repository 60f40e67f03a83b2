"""`tfsearch report`: the paper's tables and figures from finished runs, beside the published numbers.

From one or more run folders (`tfsearch run` writes them; see `tfsearch.search`) it builds:

1. the single-configuration table per dataset (the default configuration's test metrics; the paper's main
   results and supplementary Tables 1-2);
2. the tuned table per run that searched (supplementary Tables 3-4 for per-class tuning): the selected
   configuration's test metrics, its epoch, λ and n, and the protocol that selected it;
3. the λ and n sensitivity figures (supplementary Figures 2-3), from lambda_sweep / kernel_sweep runs or,
   for a dataset without one, from the per-class candidates at the final epoch;
4. the published numbers (`reference/paper_results.csv`) next to ours, with Δ = ours − published in points;
5. a progress table of the training milestones, which also covers a run that has not finished.

It writes, under `--out` (default: FIRST_RUN_DIR/report):

    report.md, report.html     everything in one document (the HTML embeds its figures)
    tables/KEY.csv, KEY.tex    each table (values in %, Δ in points; LaTeX: booktabs, the better value bold)
    tables/published_comparison.csv   every (ours, published) pair with its source
    figures/NAME.png, NAME.svg
    wandb/                     the W&B summary run (offline by default; SYNC.txt says how to upload it)

A run that has not finished is reported as far as it got; what is missing is printed and stated in the report.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from tfsearch.atomic import atomic_write, atomic_write_text
from tfsearch.errors import InputError
from tfsearch.run_folder import CONFIG_FIELDS, MILESTONE_LOG
from tfsearch.storage import local_run_dir
from tfsearch.tracking import DEFAULT_PROJECT, WANDB_MODES, check_mode, sync_command, write_sync_note

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PUBLISHED_CSV = Path(__file__).resolve().parent / "reference" / "paper_results.csv"
REPORT_METRICS = ("image_auroc", "aupro", "pixel_auroc", "pixel_ap")
METRIC_LABELS = {
    "image_auroc": "image AUROC",
    "aupro": "AUPRO",
    "pixel_auroc": "pixel AUROC",
    "pixel_ap": "pixel AP",
    "pixel_f1_max": "pixel F1-max",
}
PROTOCOL_LABELS = {"test": "test (oracle)", "val": "validation"}
# the published protocol each of our tables compares with (paper_results.csv, column `protocol`)
SINGLE_CONFIG = "single_config"
PER_CLASS_TUNED = "per_class_epochs"
MEAN = "mean"
# λ of the per-class candidates is continuous: the figure averages them in bins of this width
LAMBDA_BIN = 0.05
TRIAL_NEEDS = ("category", "stage", "model", "epoch", "lam", "kernel", "split", "image_auroc")
SELECTED_NEEDS = (
    "dataset",
    "category",
    "protocol",
    *(f"{prefix}_{f}" for prefix in ("default", "selected") for f in CONFIG_FIELDS if f != "selection_value"),
)
TEXT_COLUMNS = dict.fromkeys(
    ("dataset", "category", "stage", "space", "protocol", "split", "model", "status"), str
)
COMPARISON_COLUMNS = (
    "table",
    "dataset",
    "protocol",
    "category",
    "metric",
    "ours",
    "published",
    "delta",
    "source",
)
CONFIG_NEEDS = {"dataset": str, "categories": list, "space": dict, "profile": dict}


# ------------------------------------------------------------------------------------------ run folders
@dataclass
class RunResults:
    """What one run folder holds; `missing` says, for the reader, what it does not hold yet."""

    path: Path
    config: dict
    trials: pd.DataFrame
    selected: pd.DataFrame
    missing: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.path.name)

    @property
    def dataset(self) -> str:
        return str(self.config["dataset"])

    @property
    def space(self) -> str:
        return str(self.config["space"].get("name", "?"))

    @property
    def scope(self) -> str:
        return str(self.config.get("scope", "per_class"))

    @property
    def is_sweep(self) -> bool:
        """A grid over (λ, n) shared by all categories: it feeds the sensitivity figures, not a table."""
        return self.scope == "global" and self.config.get("selection", {}).get("sampler") == "grid"

    @property
    def searched(self) -> bool:
        return self.scope != "single" and not self.is_sweep

    @property
    def profile_default(self) -> dict[str, float]:
        profile = self.config["profile"]
        return {"lam": float(profile.get("lam", 0.95)), "kernel": float(profile.get("kernel", 7))}

    def select_rows(self) -> pd.DataFrame:
        """Completed selection candidates (one row per candidate and category)."""
        rows = self.trials[self.trials["stage"] == "select"] if len(self.trials) else self.trials
        if "status" in rows.columns:
            rows = rows[rows["status"].isna() | (rows["status"] == "complete")]
        return rows


def _read_table(path: Path, needs: tuple[str, ...]) -> pd.DataFrame:
    # only empty cells are missing values: a category may be called "NA" or "null"
    try:
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype=TEXT_COLUMNS)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable CSV table ({exc})") from None
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: empty file, expected a header with {list(needs)}") from None
    absent = [c for c in needs if c not in frame.columns]
    if absent:
        raise InputError(f"{path}: columns {absent} are missing (expected the table `tfsearch run` writes)")
    return frame


def _milestone_rows(run_dir: Path, config: dict) -> pd.DataFrame:
    """Training milestones from the training folders' logs: what an interrupted run has before trials.csv."""
    roots = [run_dir] + ([Path(config["storage"])] if config.get("storage") else [])
    for root in roots:
        logs = sorted((root / "train").glob(f"*/*/{MILESTONE_LOG}"))
        if logs:
            rows = [
                {**record, "stage": "train", "dataset": config["dataset"]}
                for log in logs
                for record in json.loads(log.read_text())
            ]
            return pd.DataFrame(rows)
    return pd.DataFrame(columns=list(TRIAL_NEEDS))


def load_run(path: Path) -> RunResults:
    """Read a run folder; InputError when it is not one, a note per file a finished run would also hold."""
    path = Path(path)
    config_path = path / "config.json"
    if not path.is_dir():
        raise InputError(f"{path}: not a run folder (no such directory)")
    if not config_path.is_file():
        raise InputError(
            f"{path}: not a run folder: config.json is missing (expected a folder written by `tfsearch run`,"
            " e.g. runs/NAME)"
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{config_path}: not valid JSON ({exc})") from None
    absent = [k for k in CONFIG_NEEDS if not isinstance(config, dict) or k not in config]
    if absent:
        raise InputError(
            f"{config_path}: keys {absent} are missing (expected the plan `tfsearch run` writes)"
        )
    for key, kind in CONFIG_NEEDS.items():
        if not isinstance(config[key], kind):
            raise InputError(f"{config_path}: {key}: expected a {kind.__name__}, got {config[key]!r}")

    missing = []
    trials_path, selected_path = path / "trials.csv", path / "selected.csv"
    if trials_path.is_file():
        trials = _read_table(trials_path, TRIAL_NEEDS)
    else:
        trials = _milestone_rows(path, config)
        found = f"{len(trials)} training milestones read from the training logs" if len(trials) else "none"
        missing.append(
            f"{trials_path} is missing: the run has not finished (it is written after selection); "
            f"training progress: {found}; no sensitivity figure from its candidates"
        )
    if selected_path.is_file():
        selected = _read_table(selected_path, SELECTED_NEEDS)
        if "status" in selected.columns:
            failed = selected[selected["status"] == "failed"]
            selected = selected[selected["status"] != "failed"].reset_index(drop=True)
            missing += [
                f"{row['dataset']}/{row['category']}: failed ({row['error']}); nothing selected, no Δ, left "
                "out of every table and mean"
                for row in failed.to_dict("records")
            ]
    else:
        selected = pd.DataFrame(columns=list(SELECTED_NEEDS))
        missing.append(
            f"{selected_path} is missing: selection has not finished, so its single-configuration and "
            "tuned tables are left out"
        )
    return RunResults(path, config, trials, selected, missing)


# ------------------------------------------------------------------------------------ published numbers
@dataclass(frozen=True)
class Published:
    value: float
    source: str


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


class PublishedNumbers:
    """The paper's and the released checkpoints' numbers, looked up by our dataset and category names.

    Where both exist for one cell, the paper's own tables win over the released checkpoints' results.
    """

    def __init__(self, path: Path = PUBLISHED_CSV) -> None:
        frame = pd.read_csv(path, keep_default_na=False, dtype=str)
        self.values: dict[tuple[str, str, str, str], Published] = {}
        self.categories: dict[str, set[str]] = {}
        ranked = sorted(frame.to_dict("records"), key=lambda r: r["source"].startswith("released"))
        for row in ranked:
            key = (row["dataset"], _normalise(row["category"]), row["protocol"], row["metric"])
            self.values.setdefault(key, Published(float(row["value"]), row["source"]))
            if row["category"] != MEAN:
                self.categories.setdefault(row["dataset"], set()).add(_normalise(row["category"]))
        self.protocol_metrics = {(r["protocol"], r["metric"]) for r in frame.to_dict("records")}

    def dataset_of(self, dataset: str, category: str) -> str | None:
        """The published dataset a category of ours belongs to (a `folder` dataset matches by category)."""
        name = _normalise(dataset)
        if name in ("mvtec", "mvtecad"):
            return "mvtec"
        if name == "visa":
            return "visa"
        if name == "folder":
            matches = [d for d, cats in self.categories.items() if _normalise(category) in cats]
            return matches[0] if len(matches) == 1 else None
        return None

    def lookup(self, dataset: str, category: str, protocol: str, metric: str) -> Published | None:
        published_dataset = self.dataset_of(dataset, category)
        if published_dataset is None:
            return None
        return self.values.get((published_dataset, _normalise(category), protocol, metric))

    def lookup_mean(
        self, dataset: str, categories: list[str], protocol: str, metric: str
    ) -> Published | None:
        """The published mean, only where our categories cover all published ones (else unlike means)."""
        owners = {self.dataset_of(dataset, c) for c in categories}
        if len(owners) != 1 or None in owners:
            return None
        owner = owners.pop()
        if not self.categories[owner] <= {_normalise(c) for c in categories}:
            return None
        return self.values.get((owner, MEAN, protocol, metric))


# ------------------------------------------------------------------------------------------------ tables
@dataclass(frozen=True)
class Column:
    key: str
    label: str
    kind: str = "text"  # text | points | delta | lam | int
    group: str = ""  # a header spanning the columns of one metric

    @property
    def heading(self) -> str:
        return f"{self.group} {self.label}".strip()


@dataclass
class Table:
    key: str
    title: str
    columns: list[Column]
    rows: list[dict]
    notes: list[str] = field(default_factory=list)
    # (ours, published) column pairs: in each row the better of the two is set in bold
    compare: list[tuple[str, str]] = field(default_factory=list)
    paper: bool = True  # also written as LaTeX

    def bold(self, row: dict) -> set[str]:
        keys = set()
        for pair in self.compare:
            values = [row.get(k) for k in pair]
            if all(_finite(v) for v in values):
                best = max(values)
                keys.update(k for k, v in zip(pair, values, strict=True) if v == best)
        return keys


def _finite(value: object) -> bool:
    return isinstance(value, int | float | np.floating | np.integer) and math.isfinite(value)


def _points(value: object) -> float:
    return float(value) * 100.0 if _finite(value) else math.nan


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(np.mean(values)) if values and all(_finite(v) for v in values) else math.nan


def _metric_columns(metric: str, with_published: bool) -> list[Column]:
    group = METRIC_LABELS[metric]
    if not with_published:
        return [Column(metric, "", "points", group)]
    return [
        Column(metric, "ours", "points", group),
        Column(f"{metric}_published", "published", "points", group),
        Column(f"{metric}_delta", "Δ", "delta", group),
    ]


def _add_published(
    row: dict, published: Published | None, metric: str, used: dict[str, set[str]], comparison: list[dict]
) -> None:
    row[f"{metric}_published"] = published.value if published else math.nan
    row[f"{metric}_delta"] = row[metric] - published.value if published and _finite(row[metric]) else math.nan
    if published:
        used.setdefault(metric, set()).add(published.source)
        comparison.append(
            {
                "category": row["category"],
                "metric": metric,
                "ours": row[metric],
                "published": published.value,
                "delta": row[f"{metric}_delta"],
                "source": published.source,
            }
        )


def _source_note(used: dict[str, set[str]], metrics: Iterable[str]) -> str:
    parts = [f"{METRIC_LABELS[m]}: {'; '.join(sorted(used[m]))}" for m in metrics if m in used]
    if not parts:
        return "Published: nothing was published for these categories (the columns are blank)."
    return "Published (Δ = ours − published, in points): " + " | ".join(parts) + "."


def _category_order(runs: list[RunResults], dataset: str) -> list[str]:
    order: list[str] = []
    for run in runs:
        if run.dataset == dataset:
            order += [c for c in run.config["categories"] if c not in order]
    return order


def _config_text(rows: list[dict], prefix: str) -> str:
    configs = sorted(
        {
            (r[f"{prefix}_model"], int(r[f"{prefix}_epoch"]), r[f"{prefix}_lam"], int(r[f"{prefix}_kernel"]))
            for r in rows
        }
    )
    return "; ".join(
        f"epoch {e}, λ {lam:g}, n {k}" + ("" if model == "default" else f", model {model}")
        for model, e, lam, k in configs
    )


def _comparison_table(
    key: str,
    title: str,
    dataset: str,
    lead: list[Column],
    rows: list[dict],
    protocol: str | None,
    published: PublishedNumbers,
    comparison: list[dict],
    notes: list[str],
) -> Table:
    """A table of our metrics (`rows`: the `lead` columns and REPORT_METRICS in points) with the mean row and,
    for a published `protocol`, the published value and Δ of each metric the paper reports for it."""
    with_published = {
        m: protocol is not None and (protocol, m) in published.protocol_metrics for m in REPORT_METRICS
    }
    columns = list(lead)
    for metric in REPORT_METRICS:
        columns += _metric_columns(metric, with_published[metric])
    categories = [row["category"] for row in rows]
    mean = {"category": MEAN, **{m: _mean(row[m] for row in rows) for m in REPORT_METRICS}}
    used: dict[str, set[str]] = {}
    found: list[dict] = []
    for metric in (m for m in REPORT_METRICS if with_published[m]):
        for row in rows:
            _add_published(
                row, published.lookup(dataset, row["category"], protocol, metric), metric, used, found
            )
        _add_published(
            mean, published.lookup_mean(dataset, categories, protocol, metric), metric, used, found
        )
    comparison += [{"table": key, "dataset": dataset, "protocol": protocol, **entry} for entry in found]
    if protocol is not None:
        notes = [*notes, _source_note(used, REPORT_METRICS), *_coverage_note(published, dataset, categories)]
    return Table(
        key,
        title,
        columns,
        [*rows, mean],
        notes,
        compare=[(m, f"{m}_published") for m in REPORT_METRICS if with_published[m]],
    )


def single_config_tables(
    runs: list[RunResults], published: PublishedNumbers, comparison: list[dict]
) -> list[Table]:
    """Per dataset: the default configuration's test metrics (from the first run that has a category,
    searched runs before sweeps)."""
    by_category: dict[tuple[str, str], tuple[RunResults, dict]] = {}
    for run in sorted(runs, key=lambda r: r.is_sweep):
        for record in run.selected.to_dict("records"):
            by_category.setdefault((run.dataset, record["category"]), (run, record))
    tables = []
    for dataset in dict.fromkeys(run.dataset for run in runs):
        order = _category_order(runs, dataset)
        chosen = [by_category[(dataset, c)] for c in order if (dataset, c) in by_category]
        if not chosen:
            continue
        records = [record for _, record in chosen]
        rows = [
            {"category": r["category"], **{m: _points(r[f"default_test_{m}"]) for m in REPORT_METRICS}}
            for r in records
        ]
        run_names = ", ".join(dict.fromkeys(run.name for run, _ in chosen))
        note = f"Default configuration: {_config_text(records, 'default')}; run {run_names}."
        tables.append(
            _comparison_table(
                f"single_config_{dataset}",
                f"{dataset}: single configuration (test set)",
                dataset,
                [Column("category", "category")],
                rows,
                SINGLE_CONFIG,
                published,
                comparison,
                [note],
            )
        )
    return tables


def _coverage_note(published: PublishedNumbers, dataset: str, categories: list[str]) -> list[str]:
    owners = {published.dataset_of(dataset, c) for c in categories} - {None}
    if len(owners) != 1:
        return []
    owner = owners.pop()
    total = len(published.categories[owner])
    covered = len({_normalise(c) for c in categories} & published.categories[owner])
    if covered >= total:
        return []
    return [
        f"The mean covers {covered} of the {total} published categories: its published value is left blank."
    ]


def tuned_tables(runs: list[RunResults], published: PublishedNumbers, comparison: list[dict]) -> list[Table]:
    """Per searched run: the selected configuration's test metrics with its epoch, λ, n and protocol."""
    tables = []
    for run in runs:
        if not run.searched or not len(run.selected):
            continue
        per_class = run.scope == "per_class"
        records = run.selected.to_dict("records")
        show_model = any(r["selected_model"] != "default" for r in records)
        lead = [
            Column("category", "category"),
            *([Column("model", "model")] if show_model else []),
            Column("epoch", "epoch", "int"),
            Column("lam", "λ", "lam"),
            Column("kernel", "n", "int"),
            Column("protocol", "selected on"),
        ]
        rows = [
            {
                "category": r["category"],
                "model": r["selected_model"],
                "epoch": r["selected_epoch"],
                "lam": r["selected_lam"],
                "kernel": r["selected_kernel"],
                "protocol": PROTOCOL_LABELS.get(str(r["protocol"]), str(r["protocol"])),
                **{m: _points(r[f"selected_test_{m}"]) for m in REPORT_METRICS},
            }
            for r in records
        ]
        metric = run.config.get("selection", {}).get("metric", "image_auroc")
        how = "per category" if per_class else "one configuration for all categories"
        on = (
            "test set (oracle, as in the supplement)"
            if records[0]["protocol"] == "test"
            else "validation split"
        )
        notes = [
            f"Run {run.name} (space {run.space}): (epoch, λ, n) selected {how} by"
            f" {METRIC_LABELS.get(metric, metric)} on the {on}; test metrics at the selected configuration."
        ]
        if per_class:
            notes.append(
                "The supplement tunes the number of epochs only (Tables 3-4); this search also tunes λ and n."
            )
        kind = "per-class-tuned" if per_class else "globally tuned"
        tables.append(
            _comparison_table(
                f"tuned_{run.name}",
                f"{run.dataset}: {kind} configuration ({run.name})",
                run.dataset,
                lead,
                rows,
                PER_CLASS_TUNED if per_class else None,
                published,
                comparison,
                notes,
            )
        )
    return tables


def training_table(runs: list[RunResults]) -> Table | None:
    """The last milestone of every training run at the default (λ, n): progress, also of unfinished runs."""
    rows = []
    for run in runs:
        train = run.trials[run.trials["stage"] == "train"] if len(run.trials) else run.trials
        for (category, model), group in train.groupby(["category", "model"], sort=False):
            last = group.loc[group["epoch"].astype(float).idxmax()]
            rows.append(
                {
                    "run": run.name,
                    "dataset": run.dataset,
                    "category": category,
                    "model": model,
                    "milestones": len(group),
                    "epoch": last["epoch"],
                    "split": last["split"],
                    **{m: _points(last[m]) for m in ("image_auroc", "aupro") if m in last},
                    "images_per_second": last.get("images_per_second", math.nan),
                    "loss": last.get("loss", math.nan),
                }
            )
    if not rows:
        return None
    return Table(
        key="training",
        title="Training milestones (the last one of each training run, default λ and n)",
        columns=[
            Column("run", "run"),
            Column("dataset", "dataset"),
            Column("category", "category"),
            Column("model", "model"),
            Column("milestones", "milestones", "int"),
            Column("epoch", "last epoch", "int"),
            Column("split", "split"),
            Column("image_auroc", "image AUROC", "points"),
            Column("aupro", "AUPRO", "points"),
            Column("images_per_second", "images/s", "rate"),
            Column("loss", "loss", "rate"),
        ],
        rows=rows,
        notes=[
            "Metrics on the selection split at the profile's default λ and n, as the trials reported them."
        ],
        paper=False,
    )


# ----------------------------------------------------------------------------------------------- figures
@dataclass(frozen=True)
class Axis:
    """A sensitivity figure's x axis: a column of trials.csv and the sweep space that varies it."""

    column: str
    symbol: str
    meaning: str
    figure: str
    sweep_space: str

    @property
    def label(self) -> str:
        return f"{self.symbol} ({self.meaning})"


AXES = {
    "lam": Axis("lam", "λ", "weight of M_disc", "lambda_sensitivity", "lambda_sweep"),
    "kernel": Axis("kernel", "n", "mean-filter size", "kernel_sensitivity", "kernel_sweep"),
}


@dataclass
class Curve:
    dataset: str
    label: str
    x: list[float]
    y: list[float]
    default: float


def _sweep_curve(run: RunResults, axis: str) -> Curve | None:
    rows = run.select_rows()
    if not len(rows) or rows[axis].nunique() < 2:
        return None
    rows = rows[rows["epoch"] == rows["epoch"].max()]
    other = "kernel" if axis == "lam" else "lam"
    fixed = run.profile_default[other]
    if not (rows[other] == fixed).any():
        fixed = rows[other].mode().iloc[0]
    rows = rows[rows[other] == fixed]
    # each grid point is one trial with a row per category: the mean over its rows is the category mean
    curve = rows.groupby(axis)["image_auroc"].mean() * 100.0
    other_label = "n" if axis == "lam" else "λ"
    return Curve(
        run.dataset,
        f"{run.dataset}: {run.name} ({run.space}, epoch {int(rows['epoch'].max())}, {other_label} {fixed:g},"
        f" {rows['split'].iloc[0]} split)",
        [float(v) for v in curve.index],
        [float(v) for v in curve.values],
        run.profile_default[axis],
    )


def _candidate_curve(run: RunResults, axis: str) -> Curve | None:
    rows = run.select_rows()
    if not len(rows):
        return None
    last = rows.groupby("category")["epoch"].transform("max")
    rows = rows[rows["epoch"] == last].copy()
    if axis == "lam":
        rows["x"] = (rows["lam"] / LAMBDA_BIN).round() * LAMBDA_BIN
    else:
        rows["x"] = rows["kernel"]
    per_category = rows.groupby(["x", "category"])["image_auroc"].mean().unstack("category")
    # a bin counts only where every category has a candidate: a mean over fewer would mix categories
    curve = per_category.dropna().mean(axis=1) * 100.0
    if len(curve) < 2:
        return None
    binned = f" per λ bin of {LAMBDA_BIN:g}" if axis == "lam" else " per n"
    return Curve(
        run.dataset,
        f"{run.dataset}: per-class candidates of {run.name} (final epoch, {rows['split'].iloc[0]} split,"
        f" mean of the candidates{binned})",
        [float(v) for v in curve.index],
        [float(v) for v in curve.values],
        run.profile_default[axis],
    )


def sensitivity_curves(runs: list[RunResults], axis: str) -> list[Curve]:
    """One curve per dataset: from its sweep runs along `axis` if any, else from its searched runs."""
    curves = []
    for dataset in dict.fromkeys(run.dataset for run in runs):
        of_dataset = [r for r in runs if r.dataset == dataset]
        swept = [c for c in (_sweep_curve(r, axis) for r in of_dataset if r.is_sweep) if c]
        if swept:
            curves += swept
            continue
        curves += [c for c in (_candidate_curve(r, axis) for r in of_dataset if r.searched) if c][:1]
    return curves


def sensitivity_figure(curves: list[Curve], axis: str) -> Figure:
    """Mean image AUROC against λ or n, one line per dataset, each line's maximum marked with a dot.

    A bare `Figure` on an Agg canvas (no pyplot): no global state and no display, whatever MPLBACKEND says."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    label = AXES[axis].label
    figure = Figure(figsize=(7.0, 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for curve in curves:
        (line,) = ax.plot(curve.x, curve.y, marker=".", markersize=4, linewidth=1.6, label=curve.label)
        best = int(np.argmax(curve.y))
        ax.plot(curve.x[best], curve.y[best], "o", markersize=9, color=line.get_color())
        ax.annotate(
            f"{curve.y[best]:.1f}",
            (curve.x[best], curve.y[best]),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
            fontsize=8,
            color=line.get_color(),
        )
    for default in sorted({c.default for c in curves}):
        ax.axvline(default, color="0.6", linestyle=":", linewidth=1)
    if axis == "kernel":
        ax.set_xticks(sorted({x for c in curves for x in c.x}))
    ax.set_xlabel(label + ("  (dotted: the profile's default)" if curves else ""))
    ax.set_ylabel("mean image AUROC (%)")
    ax.set_title(f"Sensitivity to {AXES[axis].symbol} (dot: each line's maximum)", fontsize=11)
    ax.grid(alpha=0.3)
    ax.margins(x=0.04, y=0.15)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    return figure


# --------------------------------------------------------------------------------------------- rendering
def cell_text(column: Column, value: object) -> str:
    if (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or (isinstance(value, str) and not value)
    ):
        return ""
    if column.kind == "points":
        return f"{float(value):.2f}"
    if column.kind == "delta":
        return f"{float(value):+.2f}"
    if column.kind == "lam":
        return f"{float(value):.3f}"
    if column.kind == "int":
        return str(int(float(value)))
    if column.kind == "rate":
        return f"{float(value):.4g}"
    return str(value)


def _numeric(column: Column) -> bool:
    return column.kind != "text"


def table_markdown(table: Table) -> str:
    lines = [f"### {table.title}", ""]
    lines.append("| " + " | ".join(c.heading for c in table.columns) + " |")
    lines.append("|" + "|".join("---:" if _numeric(c) else ":---" for c in table.columns) + "|")
    for row in table.rows:
        bold = table.bold(row)
        cells = []
        for column in table.columns:
            text = cell_text(column, row.get(column.key))
            cells.append(f"**{text}**" if column.key in bold and text else text)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"{note}  " for note in table.notes]
    return "\n".join(lines) + "\n"


def _header_groups(columns: list[Column]) -> list[tuple[str, list[Column]]]:
    groups: list[tuple[str, list[Column]]] = []
    for column in columns:
        if column.group and groups and groups[-1][0] == column.group:
            groups[-1][1].append(column)
        else:
            groups.append((column.group, [column]))
    return groups


def table_html(table: Table) -> str:
    groups = _header_groups(table.columns)
    two_rows = any(group and len(cols) > 1 for group, cols in groups)
    first, second = [], []
    for group, cols in groups:
        if group and len(cols) > 1:
            first.append(f'<th colspan="{len(cols)}">{html.escape(group)}</th>')
            second += [f"<th>{html.escape(c.label)}</th>" for c in cols]
        else:
            span = ' rowspan="2"' if two_rows else ""
            first.append(f"<th{span}>{html.escape(cols[0].heading)}</th>")
    head = "<tr>" + "".join(first) + "</tr>" + ("<tr>" + "".join(second) + "</tr>" if two_rows else "")
    body = []
    for row in table.rows:
        bold = table.bold(row)
        cells = []
        for column in table.columns:
            text = html.escape(cell_text(column, row.get(column.key)))
            if column.key in bold and text:
                text = f"<b>{text}</b>"
            cells.append(f'<td class="{"num" if _numeric(column) else "txt"}">{text}</td>')
        css = ' class="mean"' if row.get("category") == MEAN else ""
        body.append(f"<tr{css}>" + "".join(cells) + "</tr>")
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in table.notes)
    return (
        f"<section><h3 id='{html.escape(table.key)}'>{html.escape(table.title)}</h3>"
        f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>{notes}</section>"
    )


_LATEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"} | {
    "~": r"\textasciitilde{}",
    "^": r"\^{}",
    "\\": r"\textbackslash{}",
}
_LATEX_SYMBOLS = {"λ": r"$\lambda$", "Δ": r"$\Delta$", "−": "--"}


def latex_escape(text: str) -> str:
    escaped = "".join(_LATEX_SPECIAL.get(c, c) for c in text)
    for symbol, command in _LATEX_SYMBOLS.items():
        escaped = escaped.replace(symbol, command)
    return escaped


def table_latex(table: Table) -> str:
    """A booktabs table for a paper (`\\usepackage{booktabs}`); in each row the better of ours and the
    published value is bold."""
    columns = table.columns
    spec = "".join("r" if _numeric(c) else "l" for c in columns)
    groups = _header_groups(columns)
    lines = [
        "% generated by `tfsearch report`; needs \\usepackage{booktabs}",
        "\\begin{table}[t]",
        "\\centering",
        "\\small",
        f"\\caption{{{latex_escape(table.title)}. {latex_escape(' '.join(table.notes))}}}",
        f"\\label{{tab:{re.sub(r'[^A-Za-z0-9:_-]', '-', table.key)}}}",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
    ]
    if any(group and len(cols) > 1 for group, cols in groups):
        spans, rules, start = [], [], 1
        for group, cols in groups:
            if group and len(cols) > 1:
                spans.append(f"\\multicolumn{{{len(cols)}}}{{c}}{{{latex_escape(group)}}}")
                rules.append(f"\\cmidrule(lr){{{start}-{start + len(cols) - 1}}}")
            else:
                spans += [""] * len(cols)
            start += len(cols)
        lines.append(" & ".join(spans) + " \\\\")
        lines.append(" ".join(rules))
        labels = [
            c.label if c.group and len(dict(groups).get(c.group, [])) > 1 else c.heading for c in columns
        ]
    else:
        labels = [c.heading for c in columns]
    lines.append(" & ".join(latex_escape(label) for label in labels) + " \\\\")
    lines.append("\\midrule")
    for row in table.rows:
        if row.get("category") == MEAN:
            lines.append("\\midrule")
        bold = table.bold(row)
        cells = []
        for column in columns:
            text = latex_escape(cell_text(column, row.get(column.key)))
            if column.kind == "delta" and text:
                text = f"${text}$"  # a real minus sign
            cells.append(f"\\textbf{{{text}}}" if column.key in bold and text else text)
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(lines)


def table_csv(table: Table) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([c.key for c in table.columns])
    for row in table.rows:
        writer.writerow([_csv_cell(row.get(c.key)) for c in table.columns])
    return out.getvalue()


def _csv_cell(value: object) -> object:
    if isinstance(value, float | np.floating):
        return "" if math.isnan(value) else repr(float(value))
    return "" if value is None else value


# ------------------------------------------------------------------------------------------------ report
@dataclass
class Report:
    runs: list[RunResults]
    tables: list[Table]
    comparison: list[dict]
    figures: dict[str, list[Curve]]  # figure name -> its curves
    missing: list[str]


def build_report(runs: list[RunResults], published: PublishedNumbers | None = None) -> Report:
    published = published or PublishedNumbers()
    comparison: list[dict] = []
    tables = single_config_tables(runs, published, comparison) + tuned_tables(runs, published, comparison)
    training = training_table(runs)
    if training:
        tables.append(training)
    figures = {axis.figure: sensitivity_curves(runs, axis.column) for axis in AXES.values()}
    missing = [note for run in runs for note in run.missing]
    missing += [
        f"No {axis.symbol} sensitivity figure: no {axis.sweep_space} run and no per-class candidates at the"
        " final epoch that vary it for every category."
        for axis in AXES.values()
        if not figures[axis.figure]
    ]
    return Report(runs, tables, comparison, {n: c for n, c in figures.items() if c}, missing)


def _run_summary(run: RunResults) -> str:
    config = run.config
    profile = config["profile"]
    milestones = config.get("milestones", [])
    return (
        f"{run.name} — {run.path}: dataset {run.dataset} ({len(config['categories'])} categories), space "
        f"{run.space} (scope {run.scope}), profile {profile.get('name', '?')}, {profile.get('epochs', '?')}"
        f" epochs, milestones {milestones}, selected on {PROTOCOL_LABELS.get(config.get('select_on'), '?')}"
    )


def _figure_captions(report: Report) -> dict[str, str]:
    return {
        axis.figure: f"Mean image AUROC against {axis.label}. Sources: "
        + "; ".join(c.label for c in report.figures[axis.figure])
        + "."
        for axis in AXES.values()
        if axis.figure in report.figures
    }


def report_markdown(report: Report, wandb_note: str, files: list[str]) -> str:
    parts = [
        "# TransFusion search report",
        "",
        f"Generated {_now()} by `tfsearch report`.",
        "",
        "## Runs",
        "",
    ]
    parts += [f"- {_run_summary(run)}" for run in report.runs]
    if report.missing:
        parts += ["", "## Missing", ""] + [f"- {m}" for m in report.missing]
    parts += ["", "## Tables", ""]
    parts += [table_markdown(t) for t in report.tables]
    parts += ["## Figures", ""]
    for name, caption in _figure_captions(report).items():
        parts += [f"![{name}](figures/{name}.png)", "", caption, ""]
    parts += ["## Weights & Biases", "", wandb_note, ""]
    parts += ["## Files", ""] + [f"- `{name}`" for name in files] + [""]
    return "\n".join(parts)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0;font-size:13px}
th,td{padding:3px 8px;border-bottom:1px solid #ddd}
thead th{border-bottom:2px solid #444;background:#f6f6f6}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.mean td{border-top:2px solid #444;font-weight:600}
.note{font-size:12px;color:#555;margin:.2em 0}
.missing{background:#fff4e5;border-left:4px solid #f0a020;padding:.5em 1em}
figure{margin:1em 0}
figure img{max-width:min(100%,860px);border:1px solid #eee}
figcaption{font-size:12px;color:#555}
"""


def report_html(report: Report, figure_png: dict[str, bytes], wandb_note: str, files: list[str]) -> str:
    runs = "".join(f"<li>{html.escape(_run_summary(run))}</li>" for run in report.runs)
    missing = ""
    if report.missing:
        items = "".join(f"<li>{html.escape(m)}</li>" for m in report.missing)
        missing = f"<section class='missing' id='missing'><h2>Missing</h2><ul>{items}</ul></section>"
    tables = "".join(table_html(t) for t in report.tables)
    figures = "".join(
        f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,"
        f"{base64.b64encode(figure_png[name]).decode('ascii')}'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for name, caption in _figure_captions(report).items()
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>TransFusion search report</title><style>{_CSS}</style></head><body>"
        "<h1>TransFusion search report</h1>"
        f"<p class='note'>Generated {_now()} by <code>tfsearch report</code>.</p>"
        f"<h2>Runs</h2><ul>{runs}</ul>{missing}<h2>Tables</h2>{tables}<h2>Figures</h2>"
        f"{figures or '<p>No figure (see Missing).</p>'}"
        f"<h2>Weights &amp; Biases</h2><p>{html.escape(wandb_note)}</p>"
        f"<h2>Files</h2><ul>{''.join(f'<li><code>{html.escape(f)}</code></li>' for f in files)}</ul>"
        "</body></html>\n"
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------- W&B summary
def _wandb_table(table: Table):
    import wandb

    def value(row: dict, column: Column) -> object:
        cell = row.get(column.key)
        return None if isinstance(cell, float) and math.isnan(cell) else cell

    data = [[value(row, c) for c in table.columns] for row in table.rows]
    return wandb.Table(columns=[c.heading for c in table.columns], data=data)


def log_to_wandb(
    report: Report,
    out: Path,
    figure_paths: dict[str, Path],
    mode: str,
    project: str | None,
    entity: str | None,
) -> str:
    """One W&B run holding every table and figure; returns what happened, for the console and the report."""
    check_mode(mode, project)
    if mode == "disabled":
        return "W&B: disabled (--wandb disabled)."
    import wandb

    project = project or DEFAULT_PROJECT
    names = [run.name for run in report.runs]
    with wandb.init(
        project=project,
        entity=entity,
        mode=mode,
        dir=str(out.resolve()),
        name="report-" + "+".join(names),
        job_type="report",
        config={"runs": names, "run_dirs": [str(run.path.resolve()) for run in report.runs]},
        settings=wandb.Settings(console="off", silent=True),
    ) as run:
        run.log(
            {f"tables/{t.key}": _wandb_table(t) for t in report.tables}
            | {f"figures/{name}": wandb.Image(str(path)) for name, path in figure_paths.items()}
        )
        for table in report.tables:
            for row in (r for r in table.rows if r.get("category") == MEAN):
                run.summary.update(
                    {f"{table.key}/mean_{m}": row[m] for m in REPORT_METRICS if _finite(row[m])}
                )
        run_url = run.url if mode == "online" else None
    if mode == "offline":
        write_sync_note(out, "The report's tables and figures")
        return (
            f"W&B: offline run written under {out.resolve() / 'wandb'}; upload it with"
            f" `{sync_command(out)}`. The W&B Report (wandb-workspaces) needs the network: skipped offline;"
            " rerun with --wandb online."
        )
    return f"W&B: run {run_url}. " + create_wandb_report(report, project, entity, names, list(figure_paths))


def create_wandb_report(
    report: Report, project: str, entity: str | None, names: list[str], figures: list[str]
) -> str:
    """Lay the tables and figures out in a W&B Report (needs the optional package wandb-workspaces)."""
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        return "W&B Report skipped: wandb-workspaces is not installed (pip install wandb-workspaces)."
    runset = wr.Runset(entity=entity or "", project=project, name="report", query="report-" + "+".join(names))
    blocks = [wr.H1(text="TransFusion search report"), wr.P(text="Runs: " + ", ".join(names))]
    for table in report.tables:
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


# ------------------------------------------------------------------------------------------------- write
def _write_figure(path_stem: Path, figure: Figure) -> dict[str, Path]:
    paths = {}
    for fmt in ("png", "svg"):
        path = path_stem.with_suffix(f".{fmt}")
        atomic_write(path, lambda handle, fmt=fmt: figure.savefig(handle, format=fmt, dpi=150))
        paths[fmt] = path
    return paths


def _remove_stale(folder: Path, keep: set[Path], suffixes: tuple[str, ...]) -> None:
    """Drop what an earlier report left in our own folders and this one did not write (a figure that no
    longer has data, a renamed run's table), so that the folder matches the report."""
    for path in folder.glob("*"):
        if path.suffix in suffixes and path not in keep:
            path.unlink()


def write_tables(report: Report, folder: Path) -> set[Path]:
    """Each table as CSV (and LaTeX where it belongs in a paper), plus the long (ours, published) list."""
    written = set()
    comparison = Table(
        "published_comparison", "", [Column(c, c) for c in COMPARISON_COLUMNS], report.comparison, paper=False
    )
    for table in [*report.tables, comparison]:
        outputs = {".csv": table_csv(table)} | ({".tex": table_latex(table)} if table.paper else {})
        for suffix, text in outputs.items():
            path = folder / f"{table.key}{suffix}"
            atomic_write_text(path, text)
            written.add(path)
    _remove_stale(folder, written, (".csv", ".tex"))
    return written


def write_figures(report: Report, folder: Path) -> dict[str, Path]:
    """Each sensitivity figure as PNG and SVG; returns the PNG of each."""
    png = {}
    for axis in AXES.values():
        if axis.figure in report.figures:
            figure = sensitivity_figure(report.figures[axis.figure], axis.column)
            png[axis.figure] = _write_figure(folder / axis.figure, figure)["png"]
    if folder.is_dir():
        keep = {path.with_suffix(suffix) for path in png.values() for suffix in (".png", ".svg")}
        _remove_stale(folder, keep, (".png", ".svg"))
    return png


def write_report(
    run_dirs: list[Path | str],
    out: Path | None = None,
    wandb: str = "offline",
    project: str | None = None,
    entity: str | None = None,
    quiet: bool = False,
) -> Path:
    """Write every table, figure and document of the runs into `out` (default: FIRST_RUN_DIR/report)."""
    if not run_dirs:
        raise InputError("tfsearch report: expected at least one RUN_DIR")
    check_mode(wandb, project)
    local = [local_run_dir(str(d)) for d in run_dirs]  # a run on an object store is fetched first
    runs = [load_run(d) for d in local]
    out = Path(out) if out is not None else local[0] / "report"
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    say: Callable[[str], None] = (lambda _: None) if quiet else (lambda m: print(m, flush=True))
    for note in (n for run in runs for n in run.missing):
        say(f"[report] missing: {note}")

    report = build_report(runs)
    written = write_tables(report, out / "tables")
    figure_paths = write_figures(report, out / "figures")
    written |= {path.with_suffix(suffix) for path in figure_paths.values() for suffix in (".png", ".svg")}
    wandb_note = log_to_wandb(report, out, figure_paths, wandb, project, entity)
    files = ["report.md", "report.html", *sorted(str(p.relative_to(out)) for p in written)]
    files += ["wandb/"] if wandb != "disabled" else []
    figure_png = {name: path.read_bytes() for name, path in figure_paths.items()}
    atomic_write_text(out / "report.md", report_markdown(report, wandb_note, files))
    atomic_write_text(out / "report.html", report_html(report, figure_png, wandb_note, files))
    say(f"[report] {len(report.tables)} tables, {len(figure_paths)} figures: {out / 'report.html'}")
    say(f"[report] {wandb_note}")
    return out


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="the paper's tables and figures from run folders, beside the published numbers"
    )
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="run folders of `tfsearch run`, or their --storage URIs",
    )
    parser.add_argument("--out", type=Path, help="output folder (default: FIRST_RUN_DIR/report)")
    parser.add_argument(
        "--wandb", choices=WANDB_MODES, default="offline", help="W&B summary run (default: offline)"
    )
    parser.add_argument("--wandb-project", help="W&B project (needed with --wandb online)")
    parser.add_argument("--wandb-entity", help="W&B entity (team)")
    parser.add_argument("--quiet", action="store_true", help="no console output")
    parser.set_defaults(func=run_report)


def run_report(args) -> int:
    write_report(
        args.run_dirs,
        out=args.out,
        wandb=args.wandb,
        project=args.wandb_project,
        entity=args.wandb_entity,
        quiet=args.quiet,
    )
    return 0
