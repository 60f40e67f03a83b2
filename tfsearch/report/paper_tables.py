"""The supplement's tables from our runs: Tables 1-2 (AUPRO of the single configuration) and 3-4 (image
AUROC, tuned per class) in the supplement's shape: one metric, the categories as columns in the supplement's
order, an Average column, our row with the published row beneath it and, where the comparison is like for
like, Δ."""

from __future__ import annotations

import math

import pandas as pd

from tfsearch.report.published import (
    PER_CLASS_EPOCHS,
    SINGLE_CONFIG,
    PublishedNumbers,
    normalise,
    published_mean,
)
from tfsearch.report.runs import PER_CLASS_EPOCHS_SPACE, RunResults
from tfsearch.report.tables import (
    AVERAGE,
    DELTA,
    PROTOCOL_LABELS,
    Table,
    comparability,
    comparison_rows,
    default_note,
    default_run,
    ordered,
    points,
)


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
    ours = points(run.selected.set_index("category")[column])
    owner = published.published_dataset(run.dataset, list(ours.index))
    columns = ordered(list(ours.index), published, owner)
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
            comparison += comparison_rows(key, run.dataset, protocol, metric, source, labels, pairs)
        notes += compare.notes
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=[*columns, AVERAGE])
    formats = dict.fromkeys(frame.columns, "{:.1f}")
    delta = {DELTA: "{:+.1f}"} if DELTA in frame.index else {}
    return Table(key, title, frame, formats, notes, paper=True, best_rows=best_rows, row_formats=delta)


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
        default = default_run(runs, dataset)
        tuned, tuned_notes = tuned_run(runs, dataset)
        specs = []
        if default is not None:
            title = f"{dataset}: AUPRO of the single configuration (test set)"
            specs.append(
                ("aupro", title, default, "default_test_aupro", SINGLE_CONFIG, [default_note(default)])
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
