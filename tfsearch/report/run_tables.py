"""Tables of our runs beyond the supplement's shape: per dataset the single configuration's four metrics
and per searched run the selected configuration (each published source in its own column with its own Δ);
the protocols side by side (default, validation-selected and oracle-selected test metrics); the spread over
seeds; each run's `importance.csv`; the training milestones; the categories that stopped training early."""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    dataset_runs,
    default_note,
    ordered,
    points,
    runs_phrase,
)


# -------------------------------------------------------------------------------------------- wide tables
@dataclass
class Block:
    """One run's rows of a wide table: `lead` its configuration columns, `ours` its metrics in points
    (categories as rows), `compare` whether its Δ may be shown."""

    run: RunResults
    lead: pd.DataFrame
    ours: pd.DataFrame
    compare: Comparability


def block_columns(
    key: str, block: Block, protocol: str | None, published: PublishedNumbers, comparison: list[dict]
) -> tuple[list[str], dict[tuple[str, str], list], dict, list[str]]:
    """A block's rows (its categories in the supplement's order, then its mean), its columns, their formats
    and the published sources it used."""
    run, lead, ours = block.run, block.lead, block.ours
    owner = published.published_dataset(run.dataset, list(ours.index))
    order = ordered(list(ours.index), published, owner)
    labels = [*order, f"mean ({len(order)})"]
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
            if block.compare.delta:
                delta = [a - b for a, b in zip(values, theirs, strict=True)]
                columns[(group, f"{DELTA} {short_source(source)}")] = delta
                formats[(group, f"{DELTA} {short_source(source)}")] = "{:+.2f}"
                pairs = {"ours": values, "published": theirs, "delta": delta}
                comparison += comparison_rows(key, run, protocol, metric, source, labels, pairs)
    return labels, columns, formats, used


def wide_table(
    key: str,
    title: str,
    blocks: list[Block],
    protocol: str | None,
    published: PublishedNumbers,
    comparison: list[dict],
    notes: list[str],
) -> Table:
    """Categories as rows (ours in the supplement's order) and a mean row; per metric our column, then each
    published source and, where like for like, its Δ. With several runs (`blocks`), each run's rows one
    after the other, a `run` column first: every run is in the table."""
    parts, formats, used = [], {}, []
    advice: list[str] = []
    for block in blocks:
        labels, columns, block_formats, block_used = block_columns(
            key, block, protocol, published, comparison
        )
        parts.append((block.run, labels, columns))
        formats |= block_formats
        used += block_used
        notes = [*notes, *(n for n in block.compare.notes if n not in notes)] if block_used else notes
        advice += [a for a in block.compare.advice if a not in advice] if block_used else []
    groups = ["", *(METRIC_LABELS[m] for m in blocks[0].ours.columns)]
    keys = sorted(
        dict.fromkeys(k for _, _, columns in parts for k in columns), key=lambda k: groups.index(k[0])
    )
    if len(parts) == 1:
        _, labels, columns = parts[0]
        frame = pd.DataFrame({k: columns[k] for k in keys}, index=pd.Index(labels, name="category"))
    else:
        rows = [
            {("", "run"): run.name, ("", "category"): label, **{k: columns.get(k, [None] * len(labels))[i]
                                                               for k in keys}}
            for run, labels, columns in parts
            for i, label in enumerate(labels)
        ]  # fmt: skip
        frame = pd.DataFrame(rows, columns=[("", "run"), ("", "category"), *keys])
    frame.columns = pd.MultiIndex.from_tuples(frame.columns)
    for column, kind in (("epoch", "{:.0f}"), ("n", "{:.0f}"), ("λ", "{:.3f}")):
        if ("", column) in frame.columns:
            formats[("", column)] = kind
    formats = {k: v for k, v in formats.items() if k in frame.columns}
    if used:
        notes = [*notes, "Published: " + "; ".join(dict.fromkeys(used)) + "."]
        notes.append(
            "mean (N): the mean of the run's N rows; a source's mean is its printed one where we cover all"
            " its categories, else the mean of its values over the same rows (blank if it lacks one)."
        )
    return Table(key, title, frame, formats, notes, advice)


def wide_tables(
    runs: list[RunResults], published: PublishedNumbers, comparison: list[dict], compare_anyway: bool
) -> list[Table]:
    tables = []
    for dataset in dict.fromkeys(run.dataset for run in runs):
        defaults = dataset_runs(runs, dataset)
        if not defaults:
            continue
        blocks = []
        for run in defaults:
            frame = run.selected.set_index("category")
            ours = pd.DataFrame({m: points(frame[f"default_test_{m}"]) for m in REPORT_METRICS})
            compare = comparability(run, SINGLE_CONFIG, compare_anyway)
            blocks.append(Block(run, pd.DataFrame(index=frame.index), ours, compare))
        tables.append(
            wide_table(
                f"single_config_{dataset}",
                f"{dataset}: single configuration, test metrics ({runs_phrase(defaults)})",
                blocks,
                SINGLE_CONFIG,
                published,
                comparison,
                [default_note(defaults)],
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
                [Block(run, lead, ours, comparability(run, protocol, compare_anyway))],
                protocol,
                published,
                comparison,
                [
                    f"Run {run.name} (space {run.space}): configuration selected {how} by"
                    f" {METRIC_LABELS.get(metric, metric)} on the {on}; test metrics at the selected"
                    " configuration.",
                    *([run.early_stop_note] if run.early_stop_note else []),
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
        notes = [
            f"default: the default configuration of run {test.name}; val-selected: chosen on the validation"
            f" split by run {val.name} (space {val.space}); oracle-selected: chosen on the test set by run"
            f" {test.name} (space {test.space}). oracle − val measures the oracle protocol's optimism"
            + ("." if test.space == val.space else ", mixed with the difference of the two spaces.")
        ]
        others = [r for r in searched if r is not val and r is not test]
        if others:
            notes.append(
                "This table pairs one run selected on each split; the other searched runs of"
                f" {dataset} have their own tuned tables: {', '.join(r.name for r in others)}."
            )
        formats = dict.fromkeys(frame.columns, "{:.2f}") | {"oracle − val": "{:+.2f}"}
        title = f"{dataset}: test {METRIC_LABELS.get(metric, metric)} by selection protocol"
        tables.append(Table(f"protocols_{dataset}", title, frame, formats, notes))
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


def early_stop_table(runs: list[RunResults]) -> Table | None:
    """Every category whose training stopped early (`--patience`): where, and the device-hours it saved;
    None when no run stopped one."""
    rows = [
        {
            "run": run.name,
            "dataset": run.dataset,
            "category": row["category"],
            "patience": run.patience,
            "stopped at epoch": str(row["stopped_at_epoch"]),
            "last milestone": run.final_epoch,
            "epochs not trained": int(row["epochs_not_trained"]),
            "device-hours saved": float(row["device_hours_saved"]),
        }
        for run in runs
        for _, row in run.early_stops().iterrows()
    ]
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    return Table(
        "early_stop",
        "Categories that stopped training early",
        frame,
        {"device-hours saved": "{:.3g}"},
        [
            "Training stopped once the selection metric, at the best λ and n of each milestone, had not"
            " improved for `patience` milestones; selection chose among the milestones reached. Device-hours"
            " saved: the epochs not trained x the measured seconds per epoch x the trial's GPUs (its CPUs"
            " without GPUs); the maps of the milestones not reached are saved too and not counted."
        ],
    )
