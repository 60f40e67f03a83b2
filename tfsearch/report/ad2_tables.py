"""MVTec AD 2's tables from runs of `--dataset mvtec_ad2`, in the supplement's shape (`paper_tables`): one
metric per table (image AUROC, AU-PRO to FPR 0.3 and to 0.05, SegF1), the categories as columns in MVTec's
order and an Average column; per run a row of its default configuration's and, for a run that searched, one
of its selected configuration's test metrics on `test_public`. No TransFusion result on MVTec AD 2 is
published: there is no published row and no Δ. Each table's notes name the run's selection protocol,
SegF1's threshold rule and the resolution the metrics are at (the training size: the official numbers come
from `tfsearch predict` then `tfsearch score --dataset mvtec_ad2`). These tables take the place of the
generic paper tables for MVTec AD 2 (`paper_tables` leaves the dataset out)."""

from __future__ import annotations

import math

import pandas as pd

from tfsearch.data.mvtec_ad2 import MVTEC_AD2_CATEGORIES
from tfsearch.maps.metrics import SEG_THRESHOLD_SIGMAS
from tfsearch.report.runs import RunResults
from tfsearch.report.tables import AVERAGE, PROTOCOL_LABELS, Table, dataset_runs, default_note, points

AD2_DATASET = "mvtec_ad2"
AD2_METRIC_LABELS = {
    "image_auroc": "image AUROC",
    "aupro": "AU-PRO (FPR 0.3)",
    "aupro_05": "AU-PRO (FPR 0.05)",
    "seg_f1": "SegF1",
}
NOT_PUBLISHED = "No TransFusion result on MVTec AD 2 is published: no published row and no Δ."


def seg_f1_rule(runs: list[RunResults]) -> str:
    """SegF1's threshold rule, with each run's k where its space searched it (`selected_seg_sigmas`)."""
    searched = []
    for run in runs:
        if "selected_seg_sigmas" in run.selected.columns:
            ks = run.selected.set_index("category")["selected_seg_sigmas"].dropna()
            if set(ks) - {SEG_THRESHOLD_SIGMAS}:
                ordered = sorted(ks.items(), key=lambda item: _rank(item[0]))
                searched.append(f"run {run.name}: " + ", ".join(f"{c} {k:g}" for c, k in ordered))
    k = f"k = {SEG_THRESHOLD_SIGMAS:g}" + (
        f" (k as selected where the space searched it: {'; '.join(searched)})" if searched else ""
    )
    return (
        "SegF1: the pixels of each category's test maps, pooled, binarised strictly above one threshold per"
        f" category, mean + k·std of every pixel of the normal validation images (validation/good) at the"
        f" same configuration, {k}; a run without validation maps (the oracle protocol) sets it on"
        " test_public's normal images."
    )


def protocol_line(run: RunResults) -> str:
    """How run `run` selected its configuration, in MVTec AD 2's terms."""
    if run.select_on == "val":
        return (
            f"Run {run.name}: selected on the validation split (validation/good and the same images with"
            " synthetic anomalies); test_public was read only for these tables."
        )
    if run.select_on == "test":
        return f"Run {run.name}: selected on test_public itself, {PROTOCOL_LABELS['test']}."
    return f"Run {run.name}: selected on {run.select_on}."


def resolution_line(runs: list[RunResults]) -> str:
    """The size the metrics were computed at, and how to get the official ones."""
    sizes = {run.name: run.config["profile"].get("image_size", "?") for run in runs}
    if len(set(sizes.values())) == 1:
        at = f"{next(iter(sizes.values()))} px"
    else:
        at = ", ".join(f"run {name} {size} px" for name, size in sizes.items())
    return (
        f"Metrics at the training size ({at}, square), as the paper's protocol computes them, not at each"
        " image's own size: the official numbers come from `tfsearch predict` then `tfsearch score"
        " --dataset mvtec_ad2`."
    )


def _rows(runs: list[RunResults], metric: str) -> tuple[dict[str, pd.Series], list[str]]:
    """Per run its default row and, where it searched, its selected row (in points, by category); a note
    for each run whose selected.csv lacks the metric (written before MVTec AD 2's metrics were tabulated)."""
    rows, notes = {}, []
    for run in runs:
        prefixes = ("default", "selected") if run.searched else ("default",)
        absent = [p for p in prefixes if f"{p}_test_{metric}" not in run.selected.columns]
        if absent:
            notes.append(f"Run {run.name}: its selected.csv has no {metric} (an earlier version wrote it).")
        for prefix in prefixes:
            if prefix not in absent:
                column = run.selected.set_index("category")[f"{prefix}_test_{metric}"]
                rows[f"{prefix} ({run.name})"] = points(column)
    return rows, notes


def ad2_table(runs: list[RunResults], metric: str) -> Table | None:
    """The table of one metric, or None when no run has it."""
    label = AD2_METRIC_LABELS[metric]
    ours, notes = _rows(runs, metric)
    if not ours:
        return None
    found = list(dict.fromkeys(c for values in ours.values() for c in values.index))
    columns = sorted(found, key=lambda c: (_rank(c), found.index(c)))
    frame = pd.DataFrame.from_dict(
        {
            name: [*(float(values.get(c, math.nan)) for c in columns), float(values.mean(skipna=False))]
            for name, values in ours.items()
        },
        orient="index",
        columns=[*columns, AVERAGE],
    )
    counts = {len(values) for values in ours.values()}
    if counts == {len(columns)}:
        notes.append(
            f"Average: the mean of the row's {len(columns)} categories; blank where one is undefined."
        )
    else:
        notes.append("Average: the mean of each row's own categories; blank where one is undefined.")
    on = ", ".join(dict.fromkeys(PROTOCOL_LABELS.get(r.select_on, r.select_on) for r in runs))
    title = f"{AD2_DATASET}: {label} on test_public, default and selected configuration (selected on {on})"
    notes = [
        NOT_PUBLISHED,
        *(protocol_line(run) for run in runs),
        default_note(runs),
        *([seg_f1_rule(runs)] if metric == "seg_f1" else []),
        resolution_line(runs),
        *notes,
    ]
    # the best of each column bold, where every row has the same categories (an Average is like for like)
    best_rows = tuple(frame.index) if len(frame) > 1 and len(counts) == 1 else ()
    return Table(
        f"{AD2_DATASET}_{metric}",
        title,
        frame,
        dict.fromkeys(frame.columns, "{:.1f}"),
        notes,
        paper=True,
        best_rows=best_rows,
    )


def _rank(category: str) -> int:
    """A category's place in MVTec's order (unknown names after the eight)."""
    order = MVTEC_AD2_CATEGORIES
    return order.index(category) if category in order else len(order)


def ad2_tables(runs: list[RunResults]) -> list[Table]:
    """The MVTec AD 2 tables of the runs of `--dataset mvtec_ad2` that selected something, one per metric
    of `AD2_METRIC_LABELS` (MVTec AD 2's `MVTEC_AD2_METRIC_NAMES`); none without such a run."""
    chosen = dataset_runs(runs, AD2_DATASET)
    if not chosen:
        return []
    tables = [ad2_table(chosen, metric) for metric in AD2_METRIC_LABELS]
    return [table for table in tables if table is not None]
