"""`tfsearch export`: each category's selected model as a self-contained folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import tfsearch.deploy.export
from tfsearch.deploy.export import export_run
from tfsearch.deploy.manifest import MANIFEST_FILE
from tfsearch.errors import InputError


# ------------------------------------------------------------------------------------------ CLI
def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export each category's selected model (weights, λ, n, threshold, manifest)",
        description=tfsearch.deploy.export.__doc__.split("\n\n")[0],
    )
    parser.add_argument("run", type=Path, metavar="RUN", help="a run folder written by `tfsearch run`")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="writes DIR/CATEGORY/")
    parser.add_argument("--categories", help="comma-separated categories (default: all of selected.csv)")
    parser.add_argument(
        "--threshold-at-fpr",
        type=float,
        metavar="F",
        help="threshold at false-positive rate ≤ F on the selection data (default: the F1-max threshold)",
    )
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    at_fpr = args.threshold_at_fpr
    if at_fpr is not None and not 0.0 <= at_fpr < 1.0:
        raise InputError(f"--threshold-at-fpr {at_fpr}: expected a false-positive rate in [0, 1)")
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    for folder in export_run(args.run, args.out, categories, at_fpr):
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        model, threshold = manifest["model"], manifest["threshold"]
        print(
            f"{manifest['dataset']}/{manifest['category']}: epoch {model['epoch']}, λ {model['lam']:.3f}, "
            f"n {model['kernel']}, threshold {threshold['value']:.4g} ({threshold['method']} on "
            f"{threshold['split']}: F1 {threshold['f1']:.3f}){mask_threshold(manifest)} -> {folder}"
        )
    return 0


def mask_threshold(manifest: dict) -> str:
    """The pixel threshold of an MVTec AD 2 export, which binarises its submission masks, and its rule."""
    segmentation = manifest.get("segmentation_threshold")
    if manifest["dataset"] != "mvtec_ad2" or not isinstance(segmentation, dict):
        return ""
    return f", mask threshold {segmentation['value']:.4g} ({segmentation['rule']} of {segmentation['split']})"
