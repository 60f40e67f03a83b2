"""The report's tables as pandas frames, values in percentage points.

- Paper tables: supplementary Tables 1-2 (AUPRO of the single configuration) and 3-4 (image AUROC, tuned per
  class) in the supplement's shape: one metric, the categories as columns in the supplement's order, an
  Average column, our row with the published row beneath it and, where the comparison is like for like, Δ.
- Wide tables (extra outputs): per dataset the single configuration's four metrics, per searched run the
  selected configuration, each published source in its own column with its own Δ.
- The protocols table (default, validation-selected and oracle-selected test metrics side by side), each
  run's `importance.csv`, and the training milestones.

A Δ compares ours with one published source for the same metric, protocol and dataset, and only for a run
trained like the paper (`RunResults.differs_from_paper`); otherwise a note says why it is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from tfsearch.report.published import (
    PER_CLASS_EPOCHS,
    SINGLE_CONFIG,
    PublishedNumbers,
    normalise,
    published_mean,
    short_source,
)
from tfsearch.report.runs import PER_CLASS_EPOCHS_SPACE, RunResults

REPORT_METRICS = ("image_auroc", "aupro", "pixel_auroc", "pixel_ap")
METRIC_LABELS = {
    "image_auroc": "image AUROC",
    "aupro": "AUPRO",
    "pixel_auroc": "pixel AUROC",
    "pixel_ap": "pixel AP",
    "pixel_f1_max": "pixel F1-max",
}
PROTOCOL_LABELS = {"test": "test (oracle)", "val": "validation"}
AVERAGE = "Average"
DELTA = "Δ"
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


@dataclass
class Table:
    """A frame to render; `formats` maps a column to its format (columns without one are text)."""

    key: str
    title: str
    frame: pd.DataFrame
    formats: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # a paper table: rounded as shown also in its CSV, written as LaTeX too, the best of `best_rows` bold
    paper: bool = False
    best_rows: tuple[str, ...] = ()
    row_formats: dict = field(default_factory=dict)  # rows formatted otherwise than their columns (Δ)


@dataclass
class Comparability:
    """Whether a run's numbers may be set against a published protocol, and the note that says so."""

    delta: bool
    notes: list[str]


def comparability(run: RunResults, protocol: str | None, compare_anyway: bool) -> Comparability:
    reasons = []
    differences = run.differs_from_paper()
    if differences:
        reasons.append("its profile differs from the paper's: " + ", ".join(differences))
    if protocol == PER_CLASS_EPOCHS:
        if run.space != PER_CLASS_EPOCHS_SPACE:
            reasons.append(
                f"it searched space {run.space}, the supplement tuned the epochs only, per class, at the "
                f"default λ and n (space {PER_CLASS_EPOCHS_SPACE})"
            )
        if run.select_on != "test":
            reasons.append("it selected on the validation split, the supplement on the test set")
    if not reasons:
        return Comparability(True, [])
    text = "; ".join(reasons)
    if compare_anyway:
        return Comparability(
            True, [f"Δ shown (--compare-anyway) although run {run.name} is not like for like: {text}."]
        )
    return Comparability(False, [f"No Δ for run {run.name}: {text}. `--compare-anyway` shows it."])


def _points(values: pd.Series) -> pd.Series:
    return pd.to_numeric(values, errors="coerce") * 100.0


def _ordered(categories: list[str], published: PublishedNumbers, owner: str | None) -> list[str]:
    """Ours in the supplement's order, then any the supplement does not have, in our order."""
    rank = {normalise(c): i for i, c in enumerate(published.categories(owner) if owner else [])}
    return sorted(categories, key=lambda c: (rank.get(normalise(c), len(rank)), categories.index(c)))


# ------------------------------------------------------------------------------------------- paper tables
def paper_table(
    key: str,
    title: str,
    run: RunResults,
    column: str,
    protocol: str,
    published: PublishedNumbers,
    compare_anyway: bool,
    comparison: list[dict],
    notes: list[str],
) -> Table:
    """One metric (selected.csv's `column`, e.g. default_test_aupro) with the categories as columns in the
    supplement's order plus Average; our row, the supplement's row beneath it and Δ where like for like."""
    metric = column.split("_test_", 1)[1]
    ours = _points(run.selected.set_index("category")[column])
    owner = published.published_dataset(run.dataset, list(ours.index))
    columns = _ordered(list(ours.index), published, owner)
    ours_label = f"ours ({run.name})"
    rows = {ours_label: [*ours[columns], float(ours.mean())]}
    notes = [*notes, f"Average: the mean of our {len(columns)} categories."]
    source = published.supplement_table(owner, protocol, metric) if owner else None
    best_rows: tuple[str, ...] = ()
    if source:
        title += f" (as {source})"
        by_key = published.values(owner, protocol, metric, source)
        values = [by_key.get(normalise(c), math.nan) for c in columns]
        average, how = published_mean(published, owner, columns, protocol, metric, source)
        rows[source] = [*values, math.nan if average is None else average]
        best_rows = (ours_label, source)
        notes.append(
            {
                "printed": f"{source}: its printed Average.",
                "incomplete": f"{source}: no Average (it lacks some of our categories).",
            }.get(how, f"{source}: the Average is the {how}, over the same categories as ours.")
        )
        compare = comparability(run, protocol, compare_anyway)
        if compare.delta:
            rows[DELTA] = [a - b for a, b in zip(rows[ours_label], rows[source], strict=True)]
            labels = [*columns, f"mean ({len(columns)})"]
            pairs = {"ours": rows[ours_label], "published": rows[source], "delta": rows[DELTA]}
            comparison += _comparison_rows(key, run.dataset, protocol, metric, source, labels, pairs)
        notes += compare.notes
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=[*columns, AVERAGE])
    formats = dict.fromkeys(frame.columns, "{:.1f}")
    delta = {DELTA: "{:+.1f}"} if DELTA in frame.index else {}
    return Table(key, title, frame, formats, notes, paper=True, best_rows=best_rows, row_formats=delta)


def _comparison_rows(
    key: str, dataset: str, protocol: str, metric: str, source: str, labels: list[str], pairs: dict
) -> list[dict]:
    """The rows of published_comparison.csv: `pairs` holds the lists `ours`, `published` and `delta`."""
    common = {"table": key, "dataset": dataset, "protocol": protocol, "metric": metric, "source": source}
    return [
        {**common, "category": label, "ours": ours, "published": theirs, "delta": delta}
        for label, ours, theirs, delta in zip(labels, *pairs.values(), strict=True)
        if not math.isnan(theirs)
    ]


def _default_run(runs: list[RunResults], dataset: str) -> RunResults | None:
    """The run whose default configuration stands for the dataset: searched runs before sweeps."""
    candidates = [r for r in runs if r.dataset == dataset and len(r.selected)]
    return sorted(candidates, key=lambda r: r.is_sweep)[0] if candidates else None


def _default_note(run: RunResults) -> str:
    return f"The default configuration: final epoch, λ {run.default_lam:g}, n {run.default_kernel}."


def tuned_run(runs: list[RunResults], dataset: str) -> tuple[RunResults | None, list[str]]:
    """The run behind Table 3/4: a per_class_epochs run (what the supplement did) before any other run
    tuned per class; the note says which the paper's table corresponds to."""
    per_class = [r for r in runs if r.dataset == dataset and r.scope == "per_class" and r.searched]
    per_class = [r for r in per_class if len(r.selected)]
    if not per_class:
        return None, []
    epochs_only = [r for r in per_class if r.space == PER_CLASS_EPOCHS_SPACE]
    chosen = (epochs_only or per_class)[0]
    others = [r.name for r in per_class if r is not chosen]
    if chosen.space == PER_CLASS_EPOCHS_SPACE:
        note = (
            f"From run {chosen.name} (space {PER_CLASS_EPOCHS_SPACE}: the epochs tuned per class at the"
            " default λ and n), which is what the supplement's table corresponds to"
        )
        note += f"; run(s) {', '.join(others)} tune more and have their own wide tables." if others else "."
    else:
        note = (
            f"From run {chosen.name} (space {chosen.space}), which also tunes λ and n: the supplement's table"
            f" tuned the epochs only (space {PER_CLASS_EPOCHS_SPACE}); give such a run for a like-for-like"
            " table."
        )
    return chosen, [note]


def paper_tables(
    runs: list[RunResults], published: PublishedNumbers, comparison: list[dict], compare_anyway: bool
) -> list[Table]:
    """Per dataset: the AUPRO table of the single configuration and the image AUROC table tuned per class."""
    tables = []
    for dataset in dict.fromkeys(run.dataset for run in runs):
        default = _default_run(runs, dataset)
        tuned, tuned_notes = tuned_run(runs, dataset)
        specs = []
        if default is not None:
            title = f"{dataset}: AUPRO of the single configuration (test set)"
            specs.append(
                ("aupro", title, default, "default_test_aupro", SINGLE_CONFIG, [_default_note(default)])
            )
        if tuned is not None:
            on = PROTOCOL_LABELS.get(tuned.select_on, tuned.select_on)
            title = f"{dataset}: image AUROC tuned per class, selected on the {on} split"
            specs.append(
                ("image_auroc", title, tuned, "selected_test_image_auroc", PER_CLASS_EPOCHS, tuned_notes)
            )
        tables += [
            paper_table(f"paper_{metric}_{dataset}", title, run, column, protocol, published, compare_anyway,
                        comparison, notes)
            for metric, title, run, column, protocol, notes in specs
        ]  # fmt: skip
    return tables


# -------------------------------------------------------------------------------------------- wide tables
def wide_table(
    key: str,
    title: str,
    run: RunResults,
    lead: pd.DataFrame,
    ours: pd.DataFrame,
    protocol: str | None,
    published: PublishedNumbers,
    compare: Comparability,
    comparison: list[dict],
    notes: list[str],
) -> Table:
    """Categories as rows (ours in the supplement's order) and a mean row; per metric our column, then each
    published source and, where like for like, its Δ. `lead`: configuration columns; `ours`: points."""
    owner = published.published_dataset(run.dataset, list(ours.index))
    order = _ordered(list(ours.index), published, owner)
    mean_label = f"mean ({len(order)})"
    columns: dict[tuple[str, str], list] = {("", c): [*lead.loc[order, c], None] for c in lead.columns}
    formats: dict = {}
    used: list[str] = []
    for metric in ours.columns:
        group = METRIC_LABELS[metric]
        values = [*ours.loc[order, metric], float(ours.loc[order, metric].mean())]
        columns[(group, "ours")] = values
        formats[(group, "ours")] = "{:.2f}"
        sources = published.sources(owner, protocol, metric) if owner and protocol else []
        for source in sources:
            by_key = published.values(owner, protocol, metric, source)
            average, _ = published_mean(published, owner, order, protocol, metric, source)
            theirs = [by_key.get(normalise(c), math.nan) for c in order]
            theirs.append(math.nan if average is None else average)
            if all(math.isnan(v) for v in theirs):
                continue
            used.append(f"{short_source(source)} = {source}")
            columns[(group, short_source(source))] = theirs
            formats[(group, short_source(source))] = "{:.2f}"
            if compare.delta:
                delta = [a - b for a, b in zip(values, theirs, strict=True)]
                columns[(group, f"{DELTA} {short_source(source)}")] = delta
                formats[(group, f"{DELTA} {short_source(source)}")] = "{:+.2f}"
                pairs = {"ours": values, "published": theirs, "delta": delta}
                labels = [*order, mean_label]
                comparison += _comparison_rows(key, run.dataset, protocol, metric, source, labels, pairs)
    frame = pd.DataFrame(columns, index=pd.Index([*order, mean_label], name="category"))
    frame.columns = pd.MultiIndex.from_tuples(frame.columns)
    for column, kind in (("epoch", "{:.0f}"), ("n", "{:.0f}"), ("λ", "{:.3f}")):
        if ("", column) in frame.columns:
            formats[("", column)] = kind
    if used:
        notes = [*notes, "Published: " + "; ".join(dict.fromkeys(used)) + ".", *compare.notes]
        notes.append(
            f"{mean_label}: the mean of the {len(order)} rows; a source's mean is its printed one where we"
            " cover all its categories, else the mean of its values over the same rows (blank if it lacks"
            " one)."
        )
    return Table(key, title, frame, formats, notes)


def wide_tables(
    runs: list[RunResults], published: PublishedNumbers, comparison: list[dict], compare_anyway: bool
) -> list[Table]:
    tables = []
    for dataset in dict.fromkeys(run.dataset for run in runs):
        default = _default_run(runs, dataset)
        if default is None:
            continue
        frame = default.selected.set_index("category")
        ours = pd.DataFrame({m: _points(frame[f"default_test_{m}"]) for m in REPORT_METRICS})
        tables.append(
            wide_table(
                f"single_config_{dataset}",
                f"{dataset}: single configuration, test metrics (run {default.name})",
                default,
                pd.DataFrame(index=frame.index),
                ours,
                SINGLE_CONFIG,
                published,
                comparability(default, SINGLE_CONFIG, compare_anyway),
                comparison,
                [_default_note(default)],
            )
        )
    for run in (r for r in runs if r.searched and len(r.selected)):
        frame = run.selected.set_index("category")
        lead = pd.DataFrame(
            {
                "epoch": pd.to_numeric(frame["selected_epoch"]),
                "λ": pd.to_numeric(frame["selected_lam"]),
                "n": pd.to_numeric(frame["selected_kernel"]),
                "selected on": frame["protocol"].map(lambda p: PROTOCOL_LABELS.get(str(p), str(p))),
            }
        )
        if (frame["selected_model"] != "default").any():
            lead.insert(0, "model", frame["selected_model"])
        ours = pd.DataFrame({m: _points(frame[f"selected_test_{m}"]) for m in REPORT_METRICS})
        per_class = run.scope == "per_class"
        metric = run.config.get("selection", {}).get("metric", "image_auroc")
        on = "test set (oracle, as in the supplement)" if run.select_on == "test" else "validation split"
        how = "per category" if per_class else "one configuration for all categories"
        protocol = PER_CLASS_EPOCHS if per_class else None
        tables.append(
            wide_table(
                f"tuned_{run.name}",
                f"{run.dataset}: {'per-class' if per_class else 'globally'} tuned configuration ({run.name})",
                run,
                lead,
                ours,
                protocol,
                published,
                comparability(run, protocol, compare_anyway),
                comparison,
                [
                    f"Run {run.name} (space {run.space}): configuration selected {how} by"
                    f" {METRIC_LABELS.get(metric, metric)} on the {on}; test metrics at the selected"
                    " configuration."
                ],
            )
        )
    return tables


# -------------------------------------------------------------------------------------------- protocols
def protocol_tables(runs: list[RunResults]) -> list[Table]:
    """Per dataset with a run selected on val and one on test: default, val-selected and oracle-selected
    test metric per category, so that the oracle's optimism is a measured number."""
    tables = []
    for dataset in dict.fromkeys(run.dataset for run in runs):
        searched = [r for r in runs if r.dataset == dataset and r.searched and len(r.selected)]
        val = next((r for r in searched if r.select_on == "val"), None)
        tests = [r for r in searched if r.select_on == "test"]
        if val is None or not tests:
            continue
        test = next((r for r in tests if r.space == val.space), tests[0])  # the same space where given
        metric = val.config.get("selection", {}).get("metric", "image_auroc")
        by_val, by_test = val.selected.set_index("category"), test.selected.set_index("category")
        categories = [c for c in by_val.index if c in by_test.index]
        frame = pd.DataFrame(
            {
                "default": _points(by_test.loc[categories, f"default_test_{metric}"]),
                "val-selected": _points(by_val.loc[categories, f"selected_test_{metric}"]),
                "oracle-selected": _points(by_test.loc[categories, f"selected_test_{metric}"]),
            }
        )
        frame["oracle − val"] = frame["oracle-selected"] - frame["val-selected"]
        frame.loc[f"mean ({len(categories)})"] = frame.mean()
        frame.index.name = "category"
        tables.append(
            Table(
                f"protocols_{dataset}",
                f"{dataset}: test {METRIC_LABELS.get(metric, metric)} by selection protocol",
                frame,
                dict.fromkeys(frame.columns, "{:.2f}") | {"oracle − val": "{:+.2f}"},
                [
                    f"default: the default configuration of run {test.name}; val-selected: chosen on the"
                    f" validation split by run {val.name} (space {val.space}); oracle-selected: chosen on the"
                    f" test set by run {test.name} (space {test.space}). oracle − val measures the oracle"
                    " protocol's optimism"
                    + ("." if test.space == val.space else ", mixed with the difference of the two spaces.")
                ],
            )
        )
    return tables


def seed_tables(runs: list[RunResults]) -> list[Table]:
    """Per run trained with several seeds per category (`--seeds`): each category's default and selected
    test metrics as mean ± standard deviation over its seeds, from `selected.csv`."""
    tables = []
    for run in (r for r in runs if len(r.selected) and "seeds" in r.selected.columns):
        chosen = run.selected.set_index("category")
        seeds = sorted({int(k) for k in chosen["seeds"].dropna()})
        if not seeds or max(seeds) < 2:
            continue
        columns: dict[tuple[str, str], list[str]] = {}
        for prefix in ("default", "selected"):
            for metric in REPORT_METRICS:
                means = _points(chosen[f"{prefix}_test_{metric}"])
                spreads = _points(chosen[f"{prefix}_test_{metric}_std"])
                columns[(METRIC_LABELS[metric], prefix)] = [
                    "" if math.isnan(m) else f"{m:.2f} ± {s:.2f}" for m, s in zip(means, spreads, strict=True)
                ]
        frame = pd.DataFrame(columns, index=chosen.index)
        frame.columns = pd.MultiIndex.from_tuples(frame.columns)
        tables.append(
            Table(
                f"seeds_{run.name}",
                f"Test metrics over {'/'.join(map(str, seeds))} training seeds, mean ± std ({run.name})",
                frame,
                notes=[
                    "Each cell: the mean over the category's training seeds ± their sample standard deviation"
                    " (ddof 1), in points. The study ranked the candidates by the mean over seeds of the"
                    " selection metric; the other tables show the means."
                ],
            )
        )
    return tables


# ------------------------------------------------------------------------------------ importance, training
def importance_tables(runs: list[RunResults]) -> list[Table]:
    """Each run's importance.csv as it is (how much epoch, λ and n matter); nothing for a run without one."""
    tables = []
    for run in (r for r in runs if r.importance is not None and len(r.importance)):
        frame = run.importance.copy()
        frame["importance"] = pd.to_numeric(frame["importance"], errors="coerce")
        frame = frame.sort_values(["dataset", "scope", "importance"], ascending=[True, True, False])
        tables.append(
            Table(
                f"importance_{run.name}",
                f"Hyperparameter importance ({run.name})",
                frame.reset_index(drop=True),
                {"importance": "{:.3f}"},
                [f"From {run.path / 'importance.csv'}; `method` names how each importance was measured."],
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
                    "last epoch": int(last["epoch"]),
                    "split": last["split"],
                    **{
                        METRIC_LABELS[m]: float(last[m]) * 100.0
                        for m in ("image_auroc", "aupro")
                        if m in last
                    },
                    "images/s": float(last.get("images_per_second", np.nan)),
                    "loss": float(last.get("loss", np.nan)),
                }
            )
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    formats = {"image AUROC": "{:.2f}", "AUPRO": "{:.2f}", "images/s": "{:.4g}", "loss": "{:.4g}"}
    return Table(
        "training",
        "Training milestones (the last one of each training run, default λ and n)",
        frame,
        {k: v for k, v in formats.items() if k in frame.columns},
        ["Metrics on the selection split at the profile's default λ and n, as the trials reported them."],
    )


__all__ = ["COMPARISON_COLUMNS", "REPORT_METRICS", "Table", "paper_tables", "wide_tables"]
