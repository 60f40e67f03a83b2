"""`tfsearch run`: train once per category (K times with `--seeds K`) with Ray Tune, then select (epoch, λ,
n) with Optuna on cached maps, then the tables and the report.

How a run flows, module by module (imports point down this list only):

    tfsearch.store.run_folder       the run folder's files and columns, the milestone log, the CSV writer
    tfsearch.run.plan             RunPlan: paths resolved on the driver, resources, start or --resume checks
    tfsearch.run.training.trainable        the worker side: one category trained to its last milestone (a Tune trial)
    tfsearch.run.training.stage   the driver side of training: the Tune experiment, restore, failed categories
    tfsearch.run.training.category_search  training searches side by side: per category an Optuna study and ASHA rungs
    tfsearch.store.studies          where the Optuna studies live (SQLite, or a journal on shared storage)
    tfsearch.run.selection.stage  per category (or dataset) an Optuna study on the cached maps, as Ray tasks
    tfsearch.run.results           trials.csv and selected.csv rebuilt from durable state; publishing
    tfsearch.report           the paper's tables and figures (reads run folders only; no torch)

`--storage STORAGE` moves the training runs and Tune's state to STORAGE/NAME, which every node of a cluster
must reach: a shared folder, used in place, or an object-store URI (s3://, gs://; tfsearch.store.location). The run
folder keeps the studies and the tables; at the end they, the report and the W&B offline runs are copied to
STORAGE/NAME too.
"""

from __future__ import annotations

import time
from pathlib import Path

from tfsearch.data import datasets
from tfsearch.errors import InputError
from tfsearch.infra.cluster import check_reachable, connect
from tfsearch.run.plan import PROTOCOLS, RunPlan, make_plan, start_run
from tfsearch.run.results import failed_message, publish, write_selected, write_trials
from tfsearch.run.selection.log import log_selection
from tfsearch.run.selection.stage import Selection
from tfsearch.run.training.stage import run_training
from tfsearch.run.training.trainable import train_category
from tfsearch.transfusion.profiles import PROFILES
from tfsearch.transfusion.trainer import PRECISIONS


# -------------------------------------------------------------------------------------------- run
def execute(
    plan: RunPlan, *, resume: bool = False, address: str | None = None, trainable=train_category
) -> list[dict]:
    """The whole run: training, selection, tables, report, publishing. Returns the rows of `selected.csv`;
    raises InputError naming every category whose training failed for good (after the tables and the
    report, which show them as failed)."""
    start_run(plan, resume)
    connect(address, plan.quiet)
    started = time.perf_counter()
    selection = Selection(plan)  # a category's study starts as soon as its training ends
    failed = run_training(plan, trainable, selection)
    trained = time.perf_counter()
    selection.finish(failed)
    write_trials(plan)
    selected = write_selected(plan, failed)
    log_selection(plan)  # importance.csv, and each study in W&B
    from tfsearch.report import write_report

    write_report(
        [plan.run_dir],
        wandb=plan.wandb,
        project=plan.wandb_project,
        entity=plan.wandb_entity,
        quiet=plan.quiet,
    )
    publish(plan)
    if not plan.quiet:
        print(
            f"[done] training {trained - started:.1f} s, then selection and tables"
            f" {time.perf_counter() - trained:.1f} s; results in {plan.run_dir}"
        )
    if failed:
        raise InputError(failed_message(failed))
    return selected


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help="train once per category, then search (epoch, λ, n) per category"
    )
    parser.add_argument(
        "--space", default="per_class", help="a built-in space (`tfsearch spaces`) or a YAML path"
    )
    datasets.add_data_arguments(parser, multiple=True)
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
    parser.add_argument("--texture-root", type=Path, help="DTD-layout texture images for anomaly synthesis")
    parser.add_argument("--fg-root", type=Path, help="foreground masks: ROOT/CATEGORY/train/good/<name>.png")
    parser.add_argument(
        "--no-foreground", action="store_true", help="anomalies anywhere on object categories"
    )
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
    parser.add_argument("--address", help="join an existing Ray cluster (HOST:PORT or auto)")
    parser.add_argument("--resume", action="store_true", help="continue the run NAME after an interruption")
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
    execute(plan, resume=args.resume, address=args.address)
    return 0
