"""Supplementary Figures 2 and 3 from a run's own maps: mean image AUROC against λ (at the default n) and
against n (at the default λ), over every category of a dataset, at the final epoch, on the test set.

Each point is exact: per category and n, `MapFuser` filters the raw maps once, then blends them per λ; the
image score is each fused map's maximum and the AUROC is `tfsearch.maps.metrics.auroc` (sklearn's, ties count
one half). The curves never come from selection candidates (those mix epochs and splits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from tfsearch.maps.cache import read_map_set
from tfsearch.maps.fusion import MapFuser
from tfsearch.maps.metrics import auroc, image_scores
from tfsearch.report.runs import RunResults

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LAMBDAS = tuple(round(0.05 * i, 2) for i in range(21))
KERNELS = tuple(range(1, 16, 2))


@dataclass(frozen=True)
class Axis:
    """A sensitivity figure's x axis."""

    key: str  # lam | kernel
    symbol: str
    meaning: str
    figure: str
    grid: tuple

    @property
    def label(self) -> str:
        return f"{self.symbol} ({self.meaning})"


AXES = {
    "lam": Axis("lam", "λ", "weight of M_disc", "lambda_sensitivity", LAMBDAS),
    "kernel": Axis("kernel", "n", "mean-filter size", "kernel_sensitivity", KERNELS),
}


@dataclass
class Curve:
    """Mean image AUROC (points) of `categories` along one axis; `missing`: categories without maps."""

    dataset: str
    run: str
    axis: str
    x: list[float] | list[int]  # λ, or n (an integer)
    y: list[float]
    fixed: float  # the other parameter's value
    default: float  # this parameter's default
    epoch: int
    categories: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        other = "n" if self.axis == "lam" else "λ"
        count = f"{len(self.categories)} categor{'y' if len(self.categories) == 1 else 'ies'}"
        return f"{self.dataset}: {self.run} (epoch {self.epoch}, {other} {self.fixed:g}, {count})"


def image_auroc_grid(
    m_disc: np.ndarray, m_recon: np.ndarray, labels: np.ndarray, lams: tuple, kernels: tuple
) -> np.ndarray:
    """Image AUROC of every (n, λ) as an array (len(kernels), len(lams)): one filtering per n."""
    fuser = MapFuser(m_disc, m_recon, cached_kernels=1)
    return np.array([[auroc(labels, image_scores(fuser.fuse(lam, n))) for lam in lams] for n in kernels])


def run_curves(run: RunResults) -> dict[str, Curve] | None:
    """Both curves of a run, from the final-epoch test maps of each of its categories that has them."""
    found = {c: run.test_maps(c) for c in run.categories}
    folders = {c: p for c, p in found.items() if p is not None}
    if not folders:
        return None
    lam0, n0 = run.default_lam, run.default_kernel
    per_axis: dict[str, list[np.ndarray]] = {"lam": [], "kernel": []}
    for folder in folders.values():
        maps = read_map_set(Path(folder))
        per_axis["lam"].append(image_auroc_grid(maps.m_disc, maps.m_recon, maps.labels, LAMBDAS, (n0,))[0])
        per_axis["kernel"].append(
            image_auroc_grid(maps.m_disc, maps.m_recon, maps.labels, (lam0,), KERNELS)[:, 0]
        )
    return {
        key: Curve(
            run.dataset,
            run.name,
            key,
            list(AXES[key].grid),
            [float(v) for v in np.mean(values, axis=0) * 100.0],
            n0 if key == "lam" else lam0,
            lam0 if key == "lam" else n0,
            int(run.final_epoch or 0),
            list(folders),
            [c for c in run.categories if c not in folders],
        )
        for key, values in per_axis.items()
    }


def sensitivity_curves(runs: list[RunResults]) -> tuple[dict[str, list[Curve]], list[str]]:
    """{axis: one curve per run with final-epoch test maps}, each labelled by its run; and a note for each
    run without any (one per dataset where no run has them)."""
    curves: dict[str, list[Curve]] = {key: [] for key in AXES}
    notes = []
    where = "(train/CATEGORY/MODEL/maps/test/; a run read from an object store brings only its tables)."
    for dataset in dict.fromkeys(run.dataset for run in runs):
        found = {run.name: run_curves(run) for run in runs if run.dataset == dataset}
        if not any(found.values()):
            notes.append(
                f"No sensitivity curve for {dataset}: no run has its final-epoch test maps here {where}"
            )
            continue
        for name, run_curve in found.items():
            if run_curve is None:
                notes.append(
                    f"No sensitivity curve for run {name} ({dataset}): no final-epoch test maps {where}"
                )
                continue
            for key, curve in run_curve.items():
                curves[key].append(curve)
    return curves, notes


def caption(axis: Axis, curves: list[Curve]) -> str:
    """Says what each line averages, over which categories, and which categories it lacks."""
    parts = []
    for curve in curves:
        text = f"{curve.label}: {', '.join(curve.categories)}"
        if curve.missing:
            text += f"; missing (no final-epoch test maps): {', '.join(curve.missing)}"
        parts.append(text)
    return (
        f"Mean image AUROC on the test set against {axis.label}, at the final epoch and the other parameter's"
        " default; the dot marks each line's maximum. " + " | ".join(parts) + "."
    )


def curves_frame(curves: list[Curve]) -> pd.DataFrame:
    """The points of a figure as a table (one row per curve and x; n as an integer)."""
    return pd.DataFrame(
        [
            {
                "dataset": c.dataset,
                "run": c.run,
                c.axis: x,
                "mean_image_auroc": y,
                "categories": len(c.categories),
            }
            for c in curves
            for x, y in zip(c.x, c.y, strict=True)
        ]
    )


def sensitivity_figure(curves: list[Curve], axis: Axis) -> Figure:
    """One line per run, each line's maximum marked with a dot, the defaults dotted.

    A bare `Figure` on an Agg canvas (no pyplot): no global state and no display, whatever MPLBACKEND says."""
    # matplotlib takes a second to import: only when a figure is drawn
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for index, curve in enumerate(curves):
        (line,) = ax.plot(curve.x, curve.y, marker=".", markersize=5, linewidth=1.6, label=curve.label)
        best = int(np.argmax(curve.y))
        ax.plot(curve.x[best], curve.y[best], "o", markersize=9, color=line.get_color())
        ax.annotate(
            f"{curve.y[best]:.1f}",
            (curve.x[best], curve.y[best]),
            textcoords="offset points",
            xytext=(0, 8 + 11 * index),  # stacked, so that coinciding maxima stay readable
            ha="center",
            fontsize=8,
            color=line.get_color(),
        )
        ax.axvline(curve.default, color=line.get_color(), linestyle=":", linewidth=1, alpha=0.7)
    if axis.key == "kernel":
        ax.set_xticks(list(KERNELS))
    ax.set_xlabel(axis.label + "  (dotted: each line's default)")
    ax.set_ylabel("mean image AUROC (%)")
    ax.set_title(f"Sensitivity to {axis.symbol} (dot: each line's maximum)", fontsize=11)
    ax.grid(alpha=0.3)
    ax.margins(x=0.04, y=0.15)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    return figure
