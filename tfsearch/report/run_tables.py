"""Tables of our runs beyond the supplement's shape: per dataset the single configuration's four metrics
and per searched run the selected configuration (each published source in its own column with its own Δ);
the protocols side by side (default, validation-selected and oracle-selected test metrics); the spread over
seeds; each run's `importance.csv`; the training milestones."""

from __future__ import annotations

import math

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
from tfsearch.report.runs import RunResults
from tfsearch.report.tables import (
    DELTA,
    METRIC_LABELS,
    PROTOCOL_LABELS,
    REPORT_METRICS,
    Comparability,
    Table,
    comparability,
    comparison_rows,
    default_note,
    default_run,
    ordered,
    points,
)


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
    order = ordered(list(ours.index), published, owner)
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
                comparison += comparison_rows(key, run.dataset, protocol, metric, source, labels, pairs)
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
        default = default_run(runs, dataset)
        if default is None:
            continue
        frame = default.selected.set_index("category")
        ours = pd.DataFrame({m: points(frame[f"default_test_{m}"]) for m in REPORT_METRICS})
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
                [default_note(default)],
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
        ours = pd.DataFrame({m: points(frame[f"selected_test_{m}"]) for m in REPORT_METRICS})
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
                "default": points(by_test.loc[categories, f"default_test_{metric}"]),
                "val-selected": points(by_val.loc[categories, f"selected_test_{metric}"]),
                "oracle-selected": points(by_test.loc[categories, f"selected_test_{metric}"]),
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
                means = points(chosen[f"{prefix}_test_{metric}"])
                spreads = points(chosen[f"{prefix}_test_{metric}_std"])
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
