"""`tfsearch data demo`: write a generated demo dataset in the MVTec AD layout."""

from __future__ import annotations

import argparse
from pathlib import Path

from tfsearch.data.demo import DEMO_CATEGORIES, DEMO_TEXTURES, write_demo, write_realistic_demo
from tfsearch.data.demo_real import REALISTIC_CATEGORIES, REALISTIC_KINDS


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `tfsearch data demo --out DIR [--seed S] [--realistic]`."""
    data = subparsers.add_parser("data", help="dataset utilities", description="Dataset utilities.")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    demo = commands.add_parser(
        "demo",
        help="write a synthetic demo dataset",
        description=f"Write the synthetic demo dataset ({', '.join(DEMO_CATEGORIES)}) in the MVTec AD "
        f"layout, or with --realistic the realistic one ({', '.join(REALISTIC_CATEGORIES)}: irregular "
        f"photograph-like textures, defect kinds {', '.join(REALISTIC_KINDS)}), which --dataset demo_real "
        "reads from the cache. Existing category folders of the same names in --out are replaced.",
    )
    demo.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write into")
    demo.add_argument(
        "--seed", type=int, default=0, help="generator seed; the same seed gives identical files"
    )
    demo.add_argument(
        "--realistic",
        action="store_true",
        help="write the realistic demo (--dataset demo_real) instead of the regular one",
    )
    demo.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    if args.realistic:
        out = write_realistic_demo(args.out, args.seed)
        print(f"wrote the realistic demo dataset (seed {args.seed}) to {out.absolute()}")
        print(f"categories: {', '.join(REALISTIC_CATEGORIES)} (all textures)")
        print(f"defect kinds: {', '.join(REALISTIC_KINDS)}")
        return 0
    out = write_demo(args.out, args.seed)
    textures = ", ".join(sorted(DEMO_TEXTURES))
    print(f"wrote the demo dataset (seed {args.seed}) to {out.absolute()}")
    print(f"categories: {', '.join(DEMO_CATEGORIES)} (textures: {textures})")
    return 0
