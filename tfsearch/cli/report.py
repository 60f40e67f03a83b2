"""`tfsearch report`: the supplement's tables and figures from run folders."""

from __future__ import annotations

import argparse
from pathlib import Path

from tfsearch.infra.tracking import WANDB_MODES
from tfsearch.report import write_report


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="the supplement's tables and figures from run folders, beside the published numbers"
    )
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="run folders of `tfsearch run`, or their --storage URIs",
    )
    parser.add_argument("--out", type=Path, help="output folder (default: FIRST_RUN_DIR/report)")
    parser.add_argument(
        "--compare-anyway",
        action="store_true",
        help="show Δ against the published numbers also for runs not trained or selected like the paper",
    )
    parser.add_argument(
        "--wandb", choices=WANDB_MODES, default="offline", help="W&B summary run (default: offline)"
    )
    parser.add_argument("--wandb-project", help="W&B project (needed with --wandb online)")
    parser.add_argument("--wandb-entity", help="W&B entity (team)")
    parser.add_argument("--quiet", action="store_true", help="no console output")
    parser.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    write_report(
        args.run_dirs,
        out=args.out,
        wandb=args.wandb,
        project=args.wandb_project,
        entity=args.wandb_entity,
        quiet=args.quiet,
        compare_anyway=args.compare_anyway,
    )
    return 0
