"""`tfsearch score`: the metrics of any method's maps stored in MVTec AD's evaluation layout."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import tfsearch.maps.score
from tfsearch.errors import InputError
from tfsearch.maps.metrics import METRIC_NAMES, PRO_LIMIT
from tfsearch.maps.score import (
    SCORE_DATASETS,
    TRANSFUSION_SIZE,
    categories_with_maps,
    category_mean,
    score_category,
    score_notes,
    scores_json,
    scores_table,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score",
        help="score anomaly maps stored in MVTec AD's evaluation layout",
        description=tfsearch.maps.score.__doc__.split("\n\n")[0],
    )
    parser.add_argument("--dataset-root", type=Path, required=True, metavar="DIR", help="the dataset's root")
    parser.add_argument(
        "--maps",
        type=Path,
        required=True,
        metavar="DIR",
        help="maps as DIR/<category>/test/<defect>/<name>.tiff",
    )
    parser.add_argument(
        "--category", default=None, help="one category (default: every one with a maps folder)"
    )
    parser.add_argument(
        "--dataset", choices=SCORE_DATASETS, default="mvtec", help="dataset layout (default: mvtec)"
    )
    parser.add_argument("--limit", type=float, default=PRO_LIMIT, help="AUPRO FPR limit (default: 0.3)")
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help=f"score at N×N ({TRANSFUSION_SIZE}: TransFusion's protocol); default: each mask's own size, as "
        "MVTec AD's evaluation script",
    )
    parser.add_argument(
        "--json", action="store_true", help="print JSON (metrics in [0, 1]) instead of a table"
    )
    parser.set_defaults(func=run_score)


def run_score(args: argparse.Namespace) -> int:
    try:
        return _score(args)
    except InputError as exc:
        # the dataset readers name `--data-root`, the flag of the other commands; here it is --dataset-root
        raise InputError(str(exc).replace("--data-root", "--dataset-root")) from None


def _score(args: argparse.Namespace) -> int:
    if not 0.0 < args.limit <= 1.0:
        raise InputError(f"--limit {args.limit}: expected an FPR limit in (0, 1]")
    if args.size is not None and args.size < 1:
        raise InputError(f"--size {args.size}: expected a positive image side")
    names = categories_with_maps(args.dataset, args.dataset_root, args.maps, args.category)
    scores = {
        name: score_category(args.dataset, args.dataset_root, args.maps, name, args.size, args.limit)
        for name in names
    }
    mean = {metric: category_mean([s.metrics[metric] for s in scores.values()]) for metric in METRIC_NAMES}
    for note in score_notes(scores):
        print(f"tfsearch score: {note}", file=sys.stderr)
    where = {"dataset": args.dataset, "maps": args.maps, "limit": args.limit, "size": args.size}
    if args.json:
        print(json.dumps(scores_json(scores, mean, dataset_root=args.dataset_root, **where), indent=2))
    else:
        print(scores_table(scores, mean, **where))
    return 0
