"""`tfsearch predict`: maps, overlays and scores of new images with an exported model."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import tfsearch.deploy.detector
from tfsearch.deploy.detector import SCORES_FILE, run_prediction
from tfsearch.deploy.submission import write_submission
from tfsearch.errors import InputError
from tfsearch.transfusion.runtime import PRECISIONS, Runtime


# ------------------------------------------------------------------------------------------ CLI
def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="anomaly maps, overlays and scores of new images with an exported model",
        description=tfsearch.deploy.detector.__doc__.split("\n\n")[0],
    )
    parser.add_argument("export", type=Path, metavar="EXPORT", help="an export folder (EXPORT_DIR/CATEGORY)")
    parser.add_argument("inputs", type=Path, nargs="*", metavar="IMAGE|DIR", help="images or folders")
    parser.add_argument("--out", type=Path, metavar="DIR", help="writes maps/, overlays/ and scores.csv")
    parser.add_argument(
        "--mvtec-ad2-submission",
        type=Path,
        metavar="DIR",
        help="instead: score MVTec AD 2's private test sets of --data-root with every category of EXPORT_DIR"
        " and write DIR in the evaluation server's submission layout, checked (docs/mvtec-ad2.md)",
    )
    parser.add_argument("--data-root", type=Path, metavar="ROOT", help="the MVTec AD 2 root, for the above")
    parser.add_argument("--categories", metavar="A,B", help="with the above: only these categories")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=int, help="images per batch (default: the profile's inference batch)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="bf16 autocasts the network; auto: bf16 where the model's profile asks for it and the device"
        " has it",
    )
    parser.add_argument("--address", help="fan the batches out to a Ray cluster (HOST:PORT or auto)")
    parser.add_argument(
        "--workers", type=int, help="with --address: models to load (default: one per GPU, else per node)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers {args.workers}: expected a positive number of models")
    runtime = Runtime(device=args.device, precision=args.precision, progress=not args.quiet)
    if args.mvtec_ad2_submission is not None:
        return run_submission(args, runtime)
    if not args.inputs or args.out is None:
        raise InputError("predict needs IMAGE|DIR arguments and --out (or --mvtec-ad2-submission DIR)")
    if args.data_root is not None or args.categories is not None:
        raise InputError("--data-root and --categories go with --mvtec-ad2-submission")
    started = time.perf_counter()
    rows = run_prediction(
        args.export,
        args.inputs,
        args.out,
        runtime=runtime,
        batch_size=args.batch,
        address=args.address,
        workers=args.workers,
    )
    seconds = time.perf_counter() - started
    anomalous = sum(row["label"] for row in rows)
    print(
        f"{len(rows)} images, {anomalous} anomalous, in {seconds:.1f} s "
        f"({len(rows) / seconds:.2f} images/s); maps, overlays and {SCORES_FILE} in {args.out}"
    )
    return 0


def run_submission(args: argparse.Namespace, runtime: Runtime) -> int:
    if args.inputs or args.out is not None or args.address is not None:
        raise InputError(
            "--mvtec-ad2-submission takes no IMAGE|DIR, --out or --address: it scores --data-root"
        )
    if args.data_root is None:
        raise InputError(
            "--mvtec-ad2-submission needs --data-root, the MVTec AD 2 root with the private test sets"
        )
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    result = write_submission(
        args.export, args.data_root, args.mvtec_ad2_submission, runtime=runtime, batch_size=args.batch,
        categories=categories,
    )  # fmt: skip
    print(
        f"{result.images} private test images of {', '.join(result.categories)} written to {result.folder}"
        " and checked (layout, names, sizes, float16 anomaly images, 0/255 masks); mask thresholds "
        + ", ".join(f"{c} {t:.4g}" for c, t in result.thresholds.items())
    )
    if result.not_uploadable:
        print(f"warning: not the submission the server takes as is: {'; '.join(result.not_uploadable)}")
    else:
        print(
            f"to upload: `python check_and_prepare_data_for_upload.py {result.folder}` (MVTec's own check, in"
            " MVTecAD2_public_code_utils) writes the archive the server takes"
        )
    return 0
