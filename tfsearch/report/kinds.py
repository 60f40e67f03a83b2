"""Per defect kind: what a category's mean hides (a model may find every stain and miss every scratch).

For each run, each category's test maps at its selected configuration (`selected.csv`: model, epoch, λ, n) are
read from the map cache and scored per kind with `tfsearch.maps.metrics.per_kind`: the kind's anomalous images
against every normal test image, image and pixel AUROC. The kinds are the test folders (MVTec's `crack`,
`scratch`, ...; VisA's single `bad`), read from each map's image id. The paper tables are left as they are.
"""

from __future__ import annotations

import pandas as pd

from tfsearch.data.datasets import defect_kind
from tfsearch.maps.cache import read_map_set
from tfsearch.maps.fusion import fuse
from tfsearch.maps.metrics import per_kind
from tfsearch.report.runs import RunResults
from tfsearch.report.tables import METRIC_LABELS, Table

KIND_METRICS = ("image_auroc", "pixel_auroc")


def run_kinds(run: RunResults) -> tuple[pd.DataFrame, list[str]]:
    """One row per (category, defect kind) at the category's selected configuration, metrics in points; and
    the categories whose test maps at that configuration are not here."""
    rows, absent = [], []
    for choice in run.selected.to_dict("records"):
        category, epoch = choice["category"], int(choice["selected_epoch"])
        lam, kernel = float(choice["selected_lam"]), int(choice["selected_kernel"])
        folder = run.maps_of(category, str(choice["selected_model"]), epoch)
        if folder is None:
            absent.append(category)
            continue
        maps = read_map_set(folder)
        fused = fuse(maps.m_disc, maps.m_recon, lam, kernel)
        for kind, values in per_kind(maps.masks, fused, [defect_kind(i) for i in maps.image_ids]).items():
            rows.append(
                {
                    "category": category,
                    "kind": kind,
                    "epoch": epoch,
                    "λ": lam,
                    "n": kernel,
                    "anomalous images": values["anomalous"],
                    **{METRIC_LABELS[m]: 100.0 * values[m] for m in KIND_METRICS},
                }
            )
    return pd.DataFrame(rows), absent


def per_kind_tables(runs: list[RunResults]) -> tuple[list[Table], list[str]]:
    """A `per_kind_RUN` table for each run with test maps of its selected configurations; and a note for
    each run without any."""
    tables, notes = [], []
    for run in (r for r in runs if len(r.selected)):
        frame, absent = run_kinds(run)
        if frame.empty:
            notes.append(
                f"No per-kind table for run {run.name}: no category has the test maps of its selected"
                " configuration here (train/CATEGORY/MODEL/maps/test/; a run read from an object store brings"
                " only its tables)."
            )
            continue
        table_notes = [
            "Each kind's anomalous test images against all normal test images of the category (image AUROC),"
            " and the pixels of those images (pixel AUROC), at the category's selected configuration."
        ]
        if absent:
            table_notes.append(f"Without test maps of the selected configuration here: {', '.join(absent)}.")
        formats = {"epoch": "{:.0f}", "λ": "{:.3f}", "n": "{:.0f}", "anomalous images": "{:.0f}"}
        formats |= {METRIC_LABELS[m]: "{:.2f}" for m in KIND_METRICS}
        tables.append(
            Table(
                f"per_kind_{run.name}",
                f"{run.dataset}: test metrics per defect kind ({run.name})",
                frame,
                formats,
                table_notes,
            )
        )
    return tables, notes


__all__ = ["per_kind_tables", "run_kinds"]
