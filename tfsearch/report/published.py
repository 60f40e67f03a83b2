"""The published numbers (`tfsearch/reference/paper_results.csv`): one value per dataset, category, protocol,
metric and source, where a source is a supplementary table, the paper's abstract or the released checkpoints.

Sources are never merged: a table shows each one in its own column and compares ours with each separately,
so a Δ always pairs the same metric, protocol and dataset. The category order of each dataset is the order of
the supplement's tables, which is the order of the CSV's supplementary rows.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

PUBLISHED_CSV = Path(__file__).resolve().parent.parent / "reference" / "paper_results.csv"
MEAN = "mean"
SUPPLEMENT = "supplementary Table"
# the protocols of paper_results.csv: the paper's single configuration, and the epochs tuned per class
SINGLE_CONFIG = "single_config"
PER_CLASS_EPOCHS = "per_class_epochs"
SHORT_SOURCES = {"released": "released", "paper abstract": "abstract", SUPPLEMENT: "supp. Table"}


def normalise(name: str) -> str:
    """A category name as both spellings agree on: `Metal nut`, `metal_nut` and `metal-nut` are one."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def short_source(source: str) -> str:
    """A column heading for a source: `supp. Table 2`, `released`, `abstract`."""
    for prefix, short in SHORT_SOURCES.items():
        if source.startswith(prefix):
            return source.replace(SUPPLEMENT, short) if prefix == SUPPLEMENT else short
    return source


class PublishedNumbers:
    """The published values, looked up by our dataset and category names."""

    def __init__(self, path: Path = PUBLISHED_CSV) -> None:
        frame = pd.read_csv(path, keep_default_na=False, dtype=str)
        frame["value"] = frame["value"].astype(float)
        frame["key"] = frame["category"].map(normalise)
        self.frame = frame
        supplement = frame[frame["source"].str.startswith(SUPPLEMENT) & (frame["category"] != MEAN)]
        self.order = {
            dataset: list(dict.fromkeys(rows["category"])) for dataset, rows in supplement.groupby("dataset")
        }

    def categories(self, dataset: str) -> list[str]:
        """The published dataset's categories in the supplement's order (empty for an unpublished one)."""
        return self.order.get(dataset, [])

    def dataset_of(self, dataset: str, category: str) -> str | None:
        """The published dataset a category of ours belongs to (a `folder` dataset matches by category)."""
        name = normalise(dataset)
        if name in ("mvtec", "mvtecad"):
            return "mvtec"
        if name == "visa":
            return "visa"
        if name == "folder":
            matches = [d for d, cats in self.order.items() if normalise(category) in map(normalise, cats)]
            return matches[0] if len(matches) == 1 else None
        return None

    def published_dataset(self, dataset: str, categories: list[str]) -> str | None:
        """The one published dataset all of `categories` belong to, or None."""
        owners = {self.dataset_of(dataset, c) for c in categories}
        return owners.pop() if len(owners) == 1 else None

    def sources(self, dataset: str, protocol: str, metric: str) -> list[str]:
        """Every source that publishes `metric` under `protocol` for the published `dataset`."""
        rows = self._rows(dataset, protocol, metric)
        return list(dict.fromkeys(rows["source"]))

    def values(self, dataset: str, protocol: str, metric: str, source: str) -> dict[str, float]:
        """{normalised category or `mean`: value} of one source."""
        rows = self._rows(dataset, protocol, metric)
        rows = rows[rows["source"] == source]
        return dict(zip(rows["key"], rows["value"], strict=True))

    def supplement_table(self, dataset: str, protocol: str, metric: str) -> str | None:
        """The supplementary table that publishes this metric per category, e.g. `supplementary Table 2`."""
        tables = [s for s in self.sources(dataset, protocol, metric) if s.startswith(SUPPLEMENT)]
        return tables[0] if tables else None

    def lookup(self, dataset: str, category: str, protocol: str, metric: str, source: str) -> float | None:
        owner = self.dataset_of(dataset, category)
        if owner is None:
            return None
        return self.values(owner, protocol, metric, source).get(normalise(category))

    def _rows(self, dataset: str, protocol: str, metric: str) -> pd.DataFrame:
        frame = self.frame
        return frame[
            (frame["dataset"] == dataset) & (frame["protocol"] == protocol) & (frame["metric"] == metric)
        ]


def published_mean(
    published: PublishedNumbers, owner: str, categories: list[str], protocol: str, metric: str, source: str
) -> tuple[float | None, str]:
    """The value of `source` to set beside our mean over `categories`, and how it was obtained.

    All published categories: the source's own printed mean where it prints one (else the mean of its
    values). Fewer: the mean of its values over the same categories, so that both means cover the same rows.
    A source without a value for one of our categories gets none (unlike means are not compared).
    """
    values = published.values(owner, protocol, metric, source)
    keys = [normalise(c) for c in categories]
    if set(keys) >= set(map(normalise, published.categories(owner))) and MEAN in values:
        return values[MEAN], "printed"
    if not keys or any(k not in values for k in keys):
        return None, "incomplete"
    return sum(values[k] for k in keys) / len(keys), f"mean of its {len(keys)} values"
