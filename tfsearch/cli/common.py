"""Flags that several commands share: the data a command reads, how anomalies are synthesised, and the
device it runs on."""

from __future__ import annotations

import argparse
import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tfsearch.data.datasets import DATASETS
from tfsearch.errors import InputError
from tfsearch.infra.interrupts import INTERRUPTIONS, during
from tfsearch.store.lock import run_lock
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


def add_runtime_arguments(parser, *, training: bool = False) -> None:
    """The device flags; `training` adds --compile."""
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="bf16 autocasts the network; auto: bf16 where the profile asks for it and the device has it",
    )
    parser.add_argument("--loader-workers", type=int, default=0, help="threads decoding the images at start")
    parser.add_argument("--channels-last", action="store_true", help="NHWC convolutions (faster with bf16)")
    if training:
        add_compile_argument(parser)


def add_compile_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compile",
        action="store_true",
        help="train a torch.compile'd network (needs a C++ compiler on a CPU; the same losses within float"
        " rounding; docs/commands.md says where it pays)",
    )


def add_synthesis_arguments(parser: argparse.ArgumentParser) -> None:
    """Where anomaly synthesis takes its textures and foreground masks from (`tfsearch train` and `run`)."""
    parser.add_argument(
        "--texture-root", type=Path, help="DTD-layout texture images for anomaly synthesis (ROOT/CLASS/*.jpg)"
    )
    parser.add_argument("--fg-root", type=Path, help="foreground masks: ROOT/CATEGORY/train/good/<name>.png")
    parser.add_argument(
        "--no-foreground", action="store_true", help="place anomalies anywhere, also on object categories"
    )


@contextmanager
def writing_run_folder(folder: Path, command: str) -> Iterator[None]:
    """Around a command that writes a run folder outside `tfsearch run` (which has its own): one command
    per folder (`run_lock`), SIGINT or SIGTERM stop it as an interruption, and a full disk (or quota) is
    exit 2 saying so. Every file is written atomically, so what was finished before is intact and the
    command continues with --resume."""
    with INTERRUPTIONS.installed(), during("training"), run_lock(folder, command):
        try:
            yield
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise InputError(
                f"{folder}: no space left on the device ({exc.filename or exc.strerror}); what was finished"
                " before is intact: free some space, then continue with --resume"
            ) from None
