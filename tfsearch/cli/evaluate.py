"""`tfsearch evaluate`: the metrics of a training run at one milestone, λ and n: the paper's five and MVTec AD
2's AU-PRO to FPR 0.05 and SegF1 (`EXTENDED_METRIC_NAMES`), with where SegF1's threshold came from."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tfsearch.cli.common import add_runtime_arguments
from tfsearch.maps.metrics import EXTENDED_METRIC_NAMES
from tfsearch.transfusion.evaluation import evaluate_run
from tfsearch.transfusion.runtime import Runtime


def format_value(value: float) -> str:
    return "undefined" if math.isnan(value) else f"{100 * value:.2f}"


def json_ready(value: object) -> object:
    """`value` with every NaN, however deeply nested, as None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="metrics of a trained run at one milestone, λ and n")
    parser.add_argument("run_dir", type=Path, help="a folder written by `tfsearch train`")
    parser.add_argument("--epoch", type=int, help="milestone epoch (default: the last one)")
    parser.add_argument(
        "--lam", type=float, help="weight of M_disc in the fused map (default: the profile's)"
    )
    parser.add_argument("--kernel", type=int, help="odd mean-filter size n (default: the profile's)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_runtime_arguments(parser)
    parser.set_defaults(func=run_evaluate)


def run_evaluate(args) -> int:
    runtime = Runtime(args.device, args.precision, args.loader_workers, False, args.channels_last)
    result = evaluate_run(args.run_dir, args.epoch, args.lam, args.kernel, runtime)
    if args.json:
        print(json.dumps(json_ready(result)))
        return 0
    print(
        f"{result['dataset']}/{result['category']}  epoch {result['epoch']}  "
        f"λ {result['lam']}  n {result['kernel']}"
        f"  ({result['images']} test images, {result['anomalous']} anomalous)"
    )
    for name in EXTENDED_METRIC_NAMES:
        print(f"  {name:<13} {format_value(result[name])}")
    threshold = result["seg_threshold"]
    print(
        f"  seg_f1 threshold {threshold['value']:.6g}: {threshold['rule']} of split {threshold['split']}"
        f" ({threshold['normal_images']} normal images)"
    )
    normal = result["images"] - result["anomalous"]
    print(f"  per defect kind (its anomalous images against all {normal} normal ones):")
    for kind, values in result["per_kind"].items():
        image, pixel = format_value(values["image_auroc"]), format_value(values["pixel_auroc"])
        print(f"    {kind:<16} {values['anomalous']:>4} images  image_auroc {image}  pixel_auroc {pixel}")
    return 0
