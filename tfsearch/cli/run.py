"""`tfsearch run`: train once per category, then select (epoch, λ, n) per category on cached maps."""

from __future__ import annotations

from pathlib import Path

from tfsearch.cli.common import add_compile_argument, add_data_arguments, add_synthesis_arguments
from tfsearch.infra.cluster import check_reachable
from tfsearch.run.pipeline import dry_run, execute
from tfsearch.run.plan import PROTOCOLS, make_plan
from tfsearch.store.studies import AUTO, STUDIES_FORMS
from tfsearch.transfusion.profiles import PROFILES
from tfsearch.transfusion.runtime import PRECISIONS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help="train once per category, then search (epoch, λ, n) per category"
    )
    parser.add_argument(
        "--space", default="per_class", help="a built-in space (`tfsearch spaces`) or a YAML path"
    )
    add_data_arguments(parser, multiple=True)
    parser.add_argument("--profile", choices=sorted(PROFILES), help="training profile (default: the space's)")
    parser.add_argument(
        "--epochs", type=int, help="override the profile's epochs (LR drop and grid scale along)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        help="train each category K times, seeds profile seed + 0..K-1, as K trials side by side (work for"
        " more GPUs than categories); selection ranks by the mean over seeds, the tables give mean and std"
        " (default: the space's seeds: key, else 1)",
    )
    parser.add_argument(
        "--patience",
        type=int,
        metavar="K",
        help="stop a category's training when its selection metric, at the best λ and n of each milestone,"
        " has not improved for K milestones (default: the space's patience: key, else 0: never)",
    )
    parser.add_argument("--name", help="run name (default: SPACE-DATASET)")
    parser.add_argument("--runs-root", default="runs", help="folder that holds the runs (default: runs)")
    parser.add_argument(
        "--storage",
        help="where training runs (checkpoints, maps) and Tune's state go, as STORAGE/NAME: a folder every"
        " node reaches, or an object store (s3://BUCKET/PREFIX, gs://BUCKET/PREFIX); default: the run",
    )
    parser.add_argument(
        "--select-on",
        default="test",
        choices=PROTOCOLS,
        help="test: the supplement's oracle protocol; val: held-out data, test reported after",
    )
    parser.add_argument("--val-root", type=Path, help="MVTec-layout validation data (CATEGORY/test) for val")
    add_synthesis_arguments(parser)
    parser.add_argument(
        "--gpus-per-trial",
        type=float,
        help="GPUs per training trial; 0 trains on CPUs (default: 1 for the paper profile, visible or not,"
        " so an autoscaler sees the demand; 0 for the quick profile)",
    )
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="let the paper profile train where a trial's node holds a GPU resource but has no CUDA",
    )
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per training trial")
    parser.add_argument("--max-failures", type=int, default=2, help="retries of a failing training trial")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="bf16 autocasts the network in the trials; auto (the default; on --resume, the run's): bf16"
        " where the profile asks for it and the device has it",
    )
    parser.add_argument("--channels-last", action="store_true", help="NHWC convolutions (faster with bf16)")
    add_compile_argument(parser)
    parser.add_argument(
        "--studies",
        choices=STUDIES_FORMS,
        default=AUTO,
        help="the form of the Optuna studies: sqlite (studies.db) or journal (studies.journal: network file"
        " systems, many writers); auto (the default): journal on a file system known to be shared, else"
        " sqlite; a resumed run keeps its own",
    )
    parser.add_argument("--address", help="join an existing Ray cluster (HOST:PORT or auto)")
    parser.add_argument("--resume", action="store_true", help="continue the run NAME after an interruption")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan with its price and train nothing (only the calibration cache is written)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        metavar="HOURS",
        help="refuse a plan (or what remains of it on --resume) whose estimated device-hours exceed HOURS,"
        " naming the categories and what to cut",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument(
        "--wandb",
        choices=("offline", "online", "disabled"),
        default="offline",
        help="Weights & Biases logging of trials and the report (default: offline)",
    )
    parser.add_argument("--wandb-project", help="W&B project (with --wandb online)")
    parser.add_argument("--wandb-entity", help="W&B entity (with --wandb online)")
    parser.set_defaults(func=run_search)


def run_search(args) -> int:
    if args.address:
        check_reachable(args.address)
    plan = make_plan(args)
    if args.dry_run:
        dry_run(plan, resume=args.resume, address=args.address)
        return 0
    execute(plan, resume=args.resume, address=args.address)
    return 0
