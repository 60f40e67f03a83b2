"""`tfsearch train`: one category trained to its last milestone, without Ray or Optuna."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from tfsearch.cli.common import (
    add_data_arguments,
    add_runtime_arguments,
    add_synthesis_arguments,
    writing_run_folder,
)
from tfsearch.data import datasets
from tfsearch.errors import InputError
from tfsearch.transfusion.job import VALIDATION_KINDS, TrainDir, TrainJob
from tfsearch.transfusion.profiles import PAPER_PROFILE, PROFILES, QUICK_PROFILE, get_profile
from tfsearch.transfusion.runtime import Runtime
from tfsearch.transfusion.trainer import train


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train one category, with checkpoints and maps at milestones"
    )
    add_data_arguments(parser, multiple=False)
    parser.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        help=f"training profile (default: {PAPER_PROFILE} on a CUDA device, else {QUICK_PROFILE};"
        " on --resume, the run's)",
    )
    parser.add_argument("--out", type=Path, required=True, help="run folder (created)")
    parser.add_argument(
        "--epochs", type=int, help="override the profile's epochs (the LR drop moves proportionally)"
    )
    parser.add_argument("--milestones", help="comma-separated milestone epochs (default: the profile's grid)")
    add_synthesis_arguments(parser)
    parser.add_argument(
        "--validation",
        choices=VALIDATION_KINDS,
        default="none",
        help="also write maps of selection data at milestones: held-out good images + synthetic anomalies "
        "(synthetic) or the test split of --val-root (folder)",
    )
    parser.add_argument("--val-root", type=Path, help="MVTec-layout folder of CATEGORY/test for validation")
    parser.add_argument("--resume", action="store_true", help="continue --out from its last checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_runtime_arguments(parser, training=True)
    parser.set_defaults(func=run_train)


def parse_milestones(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"--milestones expects comma-separated epochs like 10,20,40, got {text!r}") from None


def default_profile(device: torch.device) -> str:
    """The profile of `tfsearch train` without --profile: the paper's where it can train (a CUDA device),
    else the quick one, which trains in minutes on a CPU."""
    return PAPER_PROFILE if device.type == "cuda" else QUICK_PROFILE


def chosen_profile(args, device: torch.device) -> str:
    """--profile, else the profile of the run being resumed, else `default_profile`; says which it took."""
    if args.profile is not None:
        return args.profile
    stored = TrainDir(args.out)
    if args.resume and stored.job_file.is_file():
        name = stored.load_job().profile.name
        print(f"[train] profile {name!r}: the run's in {args.out} (no --profile)", flush=True)
        return name
    name = default_profile(device)
    quick = "" if device.type == "cuda" else ", not a CUDA device: the quick profile"
    print(f"[train] profile {name!r}: training on {device}{quick} (no --profile)", flush=True)
    return name


def run_train(args) -> int:
    if args.category is None:
        raise InputError("--category is required for tfsearch train")
    if args.epochs is not None and args.epochs < 1:
        raise InputError(f"--epochs must be a positive number of epochs, got {args.epochs}")
    runtime = Runtime(
        args.device, args.precision, args.loader_workers, not args.quiet, args.channels_last, args.compile
    )
    profile = get_profile(chosen_profile(args, runtime.torch_device()))
    if args.epochs:
        profile = profile.with_epochs(args.epochs)
    category = datasets.resolve_categories(args.dataset, args.data_root, args.category, None)[0]
    job = TrainJob(
        dataset=args.dataset,
        category=category,
        profile=profile,
        data_root=args.data_root,
        milestones=parse_milestones(args.milestones),
        texture_root=args.texture_root,
        fg_root=args.fg_root,
        restrict_to_foreground=not args.no_foreground,
        validation=args.validation,
        val_root=args.val_root,
    )
    started = time.perf_counter()
    with writing_run_folder(args.out, "tfsearch train"):
        trainer = train(job, args.out, runtime, resume=args.resume)
    data = trainer.data
    print(
        f"trained {job.dataset}/{category} to epoch {trainer.epoch} in {time.perf_counter() - started:.1f} s "
        f"on {trainer.device} ({platform.processor() or platform.machine()}); "
        f"foreground: {data.foreground_source if data else 'not loaded'}; run folder: {args.out}"
    )
    return 0
