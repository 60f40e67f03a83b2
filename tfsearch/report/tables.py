"""What every table of the report shares: `Table` (a pandas frame, values in percentage points, with its
title and notes), the metric and protocol labels, and when a Δ against the published numbers is fair.

The tables themselves: `paper_tables` (the supplement's Tables 1-4 beside the published rows) and
`run_tables` (the wide single-configuration tables, protocols, seeds, importance, training milestones).
A Δ compares ours with one published source for the same metric, protocol and dataset, and only for a run
trained like the paper (`RunResults.differs_from_paper`); otherwise a note says why it is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from tfsearch.report.published import (
    PER_CLASS_EPOCHS,
    PublishedNumbers,
    normalise,
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
    "run",
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
    # what to do about a note (a flag, another run to give): in report.md and report.html, not in a caption
    advice: list[str] = field(default_factory=list)
    # a paper table: rounded as shown also in its CSV, written as LaTeX too, the best of `best_rows` bold
    paper: bool = False
    best_rows: tuple[str, ...] = ()
    row_formats: dict = field(default_factory=dict)  # rows formatted otherwise than their columns (Δ)


@dataclass
class Comparability:
    """Whether a run's numbers may be set against a published protocol, the note that says so and what
    the user may do about it."""

    delta: bool
    notes: list[str]
    advice: list[str] = field(default_factory=list)


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
            True,
            [f"Δ shown although run {run.name} is not like for like: {text}."],
            ["The Δ of such a run is shown because of `--compare-anyway`."],
        )
    return Comparability(
        False, [f"No Δ for run {run.name}: {text}."], ["`tfsearch report --compare-anyway` shows such a Δ."]
    )


def points(values: pd.Series) -> pd.Series:
    return pd.to_numeric(values, errors="coerce") * 100.0


def ordered(categories: list[str], published: PublishedNumbers, owner: str | None) -> list[str]:
    """Ours in the supplement's order, then any the supplement does not have, in our order."""
    rank = {normalise(c): i for i, c in enumerate(published.categories(owner) if owner else [])}
    return sorted(categories, key=lambda c: (rank.get(normalise(c), len(rank)), categories.index(c)))


def comparison_rows(
    key: str, run: RunResults, protocol: str, metric: str, source: str, labels: list[str], pairs: dict
) -> list[dict]:
    """The rows of published_comparison.csv: `pairs` holds the lists `ours`, `published` and `delta`; a
    category without both values has none."""
    common = {"table": key, "run": run.name, "dataset": run.dataset, "protocol": protocol, "metric": metric}
    return [
        {**common, "category": label, "ours": ours, "published": theirs, "delta": delta, "source": source}
        for label, ours, theirs, delta in zip(labels, *pairs.values(), strict=True)
        if not (math.isnan(theirs) or math.isnan(ours))
    ]


def dataset_runs(runs: list[RunResults], dataset: str) -> list[RunResults]:
    """The runs of `dataset` that selected something, in the order given: each has a default configuration
    and its own row in the single-configuration tables."""
    return [r for r in runs if r.dataset == dataset and len(r.selected)]


def default_note(runs: list[RunResults]) -> str:
    """The default configuration (final epoch, λ, n) of the runs: once where they share it."""
    settings = {r.name: f"final epoch, λ {r.default_lam:g}, n {r.default_kernel}" for r in runs}
    if len(set(settings.values())) == 1:
        return f"The default configuration: {next(iter(settings.values()))}."
    return "The default configuration: " + "; ".join(f"run {k}: {v}" for k, v in settings.items()) + "."


def runs_phrase(runs: list[RunResults]) -> str:
    """`run A` or `runs A, B`."""
    return ("run " if len(runs) == 1 else "runs ") + ", ".join(r.name for r in runs)
