"""Flags that several commands share: the data a command reads, how anomalies are synthesised, and the
device it runs on."""

from __future__ import annotations

import argparse
from pathlib import Path

from tfsearch.data.datasets import DATASETS
from tfsearch.transfusion.runtime import PRECISIONS


def add_data_arguments(parser: argparse.ArgumentParser, *, multiple: bool) -> None:
    """The data flags every command shares; `multiple` adds --categories for commands that loop over them."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        choices=DATASETS,
        default="demo",
        help="dataset kind (default: demo; demo and demo_real are generated on first use)",
    )
    group.add_argument(
        "--data-root",
        type=Path,
        default=None,
        metavar="DIR",
        help="dataset root folder; required unless --dataset demo or demo_real (then a cached copy under "
        "$TFSEARCH_CACHE)",
    )
    group.add_argument(
        "--category", default=None, help="one category" + (" (default: all)" if multiple else "")
    )
    if multiple:
        group.add_argument("--categories", default=None, metavar="A,B", help="comma-separated categories")


def add_runtime_arguments(parser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="bf16 autocasts the network; auto: bf16 where the profile asks for it and the device has it",
    )
    parser.add_argument("--loader-workers", type=int, default=0, help="threads decoding the images at start")
    parser.add_argument("--channels-last", action="store_true", help="NHWC convolutions (faster with bf16)")


def add_synthesis_arguments(parser: argparse.ArgumentParser) -> None:
    """Where anomaly synthesis takes its textures and foreground masks from (`tfsearch train` and `run`)."""
    parser.add_argument(
        "--texture-root", type=Path, help="DTD-layout texture images for anomaly synthesis (ROOT/CLASS/*.jpg)"
    )
    parser.add_argument("--fg-root", type=Path, help="foreground masks: ROOT/CATEGORY/train/good/<name>.png")
    parser.add_argument(
        "--no-foreground", action="store_true", help="place anomalies anywhere, also on object categories"
    )
