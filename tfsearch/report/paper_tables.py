"""The supplement's tables from our runs: Tables 1-2 (AUPRO of the single configuration) and 3-4 (image
AUROC, tuned per class) in the supplement's shape: one metric, the categories as columns in the supplement's
order, an Average column, a row per run of the dataset (`ours (RUN)`) with the published row beneath them
and, for each run whose comparison is like for like, its Δ. Several runs of one dataset each get their row:
none is dropped."""

from __future__ import annotations

import math

import pandas as pd

from tfsearch.report.ad2_tables import AD2_DATASET
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
    dataset_runs,
    default_note,
    ordered,
    points,
    runs_phrase,
)


# ------------------------------------------------------------------------------------------- paper tables
def paper_table(
    key: str,
    title: str,
    runs: list[RunResults],
    column: str,
    protocol: str,
    published: PublishedNumbers,
    compare_anyway: bool,
    comparison: list[dict],
    notes: list[str],
    advice: list[str],
) -> Table:
    """One metric (selected.csv's `column`, e.g. default_test_aupro) with the categories as columns in the
    supplement's order plus Average; a row per run, the supplement's row beneath them and a Δ per run
    where like for like (`Δ`, or `Δ (RUN)` with several runs)."""
    metric = column.split("_test_", 1)[1]
    ours = {run.name: points(run.selected.set_index("category")[column]) for run in runs}
    categories = list(dict.fromkeys(c for values in ours.values() for c in values.index))
    owner = published.published_dataset(runs[0].dataset, categories)
    columns = ordered(categories, published, owner)
    labels = {run.name: f"ours ({run.name})" for run in runs}
    rows = {
        labels[name]: [*(float(values.get(c, math.nan)) for c in columns), float(values.mean())]
        for name, values in ours.items()
    }
    counts = {name: len(values) for name, values in ours.items()}
    if set(counts.values()) == {len(columns)}:
        of = "our" if len(runs) == 1 else "each run's"
        notes = [*notes, f"Average: the mean of {of} {len(columns)} categories."]
    else:
        each = ", ".join(f"{name} {count}" for name, count in counts.items())
        notes = [*notes, f"Average: the mean of each run's own categories ({each})."]
    advice = list(advice)
    source = published.supplement_table(owner, protocol, metric) if owner else None
    best_rows: tuple[str, ...] = tuple(labels.values())
    deltas: dict[str, list[float]] = {}
    if source:
        title += f" (as {source})"
        by_key = published.values(owner, protocol, metric, source)
        theirs = [by_key.get(normalise(c), math.nan) for c in columns]
        average, how = published_mean(published, owner, columns, protocol, metric, source)
        rows[source] = [*theirs, math.nan if average is None else average]
        best_rows += (source,)
        notes.append(
            {
                "printed": f"{source}: its printed Average.",
                "incomplete": f"{source}: no Average (it lacks some of our categories).",
            }.get(how, f"{source}: the Average is the {how}, over the same categories as ours.")
        )
        for run in runs:
            compare = comparability(run, protocol, compare_anyway)
            notes += compare.notes
            advice += [a for a in compare.advice if a not in advice]
            if not compare.delta:
                continue
            own = ordered(list(ours[run.name].index), published, owner)
            mean, _ = published_mean(published, owner, own, protocol, metric, source)
            mine = rows[labels[run.name]]
            delta = [a - b for a, b in zip(mine[:-1], theirs, strict=True)]
            delta.append(math.nan if mean is None else mine[-1] - mean)
            deltas[DELTA if len(runs) == 1 else f"{DELTA} ({run.name})"] = delta
            pairs = {
                "ours": mine,
                "published": [*theirs, math.nan if mean is None else mean],
                "delta": delta,
            }
            names = [*columns, f"mean ({len(own)})"]
            comparison += comparison_rows(key, run, protocol, metric, source, names, pairs)
        if deltas and len(set(counts.values())) > 1:
            notes.append("Each Δ of the Average: against the published mean over the run's own categories.")
    frame = pd.DataFrame.from_dict(rows | deltas, orient="index", columns=[*columns, AVERAGE])
    formats = dict.fromkeys(frame.columns, "{:.1f}")
    row_formats = dict.fromkeys(deltas, "{:+.1f}")
    best_rows = best_rows if len(best_rows) > 1 else ()  # a row alone is nothing to compare
    return Table(
        key, title, frame, formats, notes, advice, paper=True, best_rows=best_rows, row_formats=row_formats
    )


def tuned_runs(runs: list[RunResults], dataset: str) -> tuple[list[RunResults], list[str], list[str]]:
    """The runs behind Table 3/4: every run of the dataset tuned per class, the `per_class_epochs` ones
    (what the supplement did) first; the note says which the paper's table corresponds to, the advice what
    would make it like for like."""
    per_class = [r for r in dataset_runs(runs, dataset) if r.scope == "per_class" and r.searched]
    if not per_class:
        return [], [], []
    epochs_only = [r for r in per_class if r.space == PER_CLASS_EPOCHS_SPACE]
    others = [r for r in per_class if r.space != PER_CLASS_EPOCHS_SPACE]
    spaces = ", ".join(dict.fromkeys(r.space for r in others))
    if epochs_only:
        note = (
            f"From {runs_phrase(epochs_only)} (space {PER_CLASS_EPOCHS_SPACE}: the epochs tuned per class at"
            " the default λ and n), which is what the supplement's table corresponds to"
        )
        note += f"; {runs_phrase(others)} (space {spaces}) also tune λ and n." if others else "."
        return [*epochs_only, *others], [note], []
    note = (
        f"From {runs_phrase(others)} (space {spaces}), which also tune λ and n: the supplement's table tuned"
        f" the epochs only (space {PER_CLASS_EPOCHS_SPACE})."
    )
    advice = f"A run of space {PER_CLASS_EPOCHS_SPACE} gives Table 3/4 like for like."
    return others, [note], [advice]


def early_stop_notes(runs: list[RunResults]) -> list[str]:
    """A note per run trained with early stopping (`--patience`): which categories stopped, where."""
    return [run.early_stop_note for run in runs if run.early_stop_note]


def paper_tables(
    runs: list[RunResults], published: PublishedNumbers, comparison: list[dict], compare_anyway: bool
) -> list[Table]:
    """Per dataset: the AUPRO table of the single configuration and the image AUROC table tuned per class,
    each with a row per run of the dataset; MVTec AD 2 has its own tables (`ad2_tables`)."""
    tables = []
    for dataset in dict.fromkeys(run.dataset for run in runs):
        if dataset == AD2_DATASET:  # unpublished: its own tables (`tfsearch.report.ad2_tables`)
            continue
        defaults = dataset_runs(runs, dataset)
        tuned, tuned_notes, tuned_advice = tuned_runs(runs, dataset)
        specs = []
        if defaults:
            title = f"{dataset}: AUPRO of the single configuration (test set)"
            notes = [default_note(defaults), *early_stop_notes(defaults)]
            specs.append(("aupro", title, defaults, "default_test_aupro", SINGLE_CONFIG, notes, []))
        if tuned:
            on = ", ".join(dict.fromkeys(PROTOCOL_LABELS.get(r.select_on, r.select_on) for r in tuned))
            title = f"{dataset}: image AUROC tuned per class, selected on the {on} split"
            column = "selected_test_image_auroc"
            notes = [*tuned_notes, *early_stop_notes(tuned)]
            specs.append(("image_auroc", title, tuned, column, PER_CLASS_EPOCHS, notes, tuned_advice))
        tables += [
            paper_table(f"paper_{metric}_{dataset}", title, chosen, column, protocol, published,
                        compare_anyway, comparison, notes, advice)
            for metric, title, chosen, column, protocol, notes, advice in specs
        ]  # fmt: skip
    return tables
