"""`tfsearch run`, the table of contents of a run: train once per category (K times with `--seeds K`) with
Ray Tune, then select (epoch, λ, n) with Optuna on the cached maps, then the tables and the report.

    run_lock         tfsearch.store.lock: one driver per run folder
    check_start      tfsearch.run.start: the checks of a new run, or of --resume (nothing written yet)
    connect          tfsearch.infra.cluster: join the cluster, or start Ray here
    announce_price   tfsearch.run.estimate: the plan with its device time, wall time and storage, printed; a
                     plan over --budget stops here (`dry_run` stops here always)
    create_run       the run folder and its plan (config.json), once the cluster answered
    prepare_studies  the Optuna studies file in the form --studies chose (a resumed run keeps its own)
    run_training     tfsearch.run.training: a Tune trial per (category, training configuration, seed), each
                     writing checkpoints and maps at every milestone (trainable.py, on the workers)
    Selection        tfsearch.run.selection: per category (or dataset) an Optuna study on the cached maps,
                     each started as soon as its categories finished training
    write_trials,    tfsearch.run.results: trials.csv and selected.csv rebuilt from the milestone logs and
    write_selected   the studies
    log_selection    importance.csv, and each study in W&B
    write_report     tfsearch.report: the paper's tables and figures
    publish          everything copied to --storage when it is elsewhere

SIGINT (Ctrl-C) and SIGTERM stop a run within seconds at any stage (`tfsearch.infra.interrupts`): training
ends as Ray Tune ends it, nothing is selected or tabulated from unfinished training, and `--resume` continues.

`--storage STORAGE` moves the training runs and Tune's state to STORAGE/NAME, which every node of a cluster
must reach: a shared folder, used in place, or an object-store URI (s3://, gs://; `tfsearch.store.location`).
The run folder keeps the studies and the tables; at the end they, the report and the W&B offline runs are
copied to STORAGE/NAME too.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from tfsearch.errors import InputError
from tfsearch.infra.cluster import connect
from tfsearch.infra.interrupts import INTERRUPTIONS, during
from tfsearch.report import write_report
from tfsearch.run.cost import PlanCost, print_plan
from tfsearch.run.estimate import check_budget, estimate
from tfsearch.run.plan import RunPlan, TrialSettings
from tfsearch.run.results import failed_message, publish, write_selected, write_trials
from tfsearch.run.selection.log import log_selection
from tfsearch.run.selection.stage import Selection, run_studies
from tfsearch.run.start import check_start, create_run, prepare_studies
from tfsearch.run.training.stage import run_training
from tfsearch.run.training.trainable import train_category
from tfsearch.store.lock import run_lock
from tfsearch.store.run_folder import dashboard_command


def execute(
    plan: RunPlan,
    *,
    resume: bool = False,
    address: str | None = None,
    trainable: Callable[[dict, TrialSettings], None] = train_category,
) -> list[dict]:
    """The whole run: training, selection, tables, report, publishing. Returns the rows of `selected.csv`;
    raises InputError naming every category whose training failed for good (after the tables and the
    report, which show them as failed), and `Interrupted` on SIGINT or SIGTERM (after which nothing is
    selected or tabulated from what training had not finished)."""
    with INTERRUPTIONS.installed(), run_lock(plan.run_dir, f"tfsearch run --name {plan.name}"):
        check_start(plan, resume)
        with during("connecting to Ray"):
            connect(address, plan.quiet)
        INTERRUPTIONS.install()  # ray.init replaced the SIGTERM handler
        with during("estimating"):
            plan = dataclasses.replace(plan, estimate=announce_price(plan, address, show=not plan.quiet))
        if not resume:
            create_run(plan)
        studies = prepare_studies(plan)
        started = time.perf_counter()
        with during("training"):
            selection = Selection(plan)  # a category's study starts as soon as its training ends
            failed = run_training(plan, trainable, on_trained=selection.trained)
        trained = time.perf_counter()
        with during("selection"):
            selection.finish(failed)
        with during("tables and report"):
            finished = run_studies(plan)  # read once for trials.csv, importance.csv and W&B
            write_trials(plan, finished)
            selected = write_selected(plan, failed)
            log_selection(plan, finished)  # importance.csv, and each study in W&B
            write_report(
                [plan.run_dir],
                wandb=plan.wandb,
                project=plan.wandb_project,
                entity=plan.wandb_entity,
                quiet=plan.quiet,
            )
        with during("publishing"):
            publish(plan)
    if not plan.quiet:
        print(
            f"[done] training {trained - started:.1f} s, then selection and tables"
            f" {time.perf_counter() - trained:.1f} s; results in {plan.run_dir}\n"
            f"[done] report: {plan.run_dir / 'report' / 'report.md'}\n"
            f"[done] the Optuna studies open with: {dashboard_command(studies)}",
            flush=True,
        )
    if failed:
        raise InputError(failed_message(failed))
    return selected


def announce_price(plan: RunPlan, address: str | None, *, show: bool) -> PlanCost:
    """The plan's price (what remains of it on --resume), printed when `show`; InputError over --budget."""
    cost = estimate(plan, address=address)
    if show:
        print_plan(plan, cost)
    check_budget(plan, cost, plan.budget)
    return cost


def dry_run(plan: RunPlan, *, resume: bool = False, address: str | None = None) -> PlanCost:
    """`tfsearch run --dry-run`: the checks of the run and its price, printed; nothing trained or written
    but the calibration cache, and Ray joined only with `address` (whose worker is calibrated)."""
    check_start(plan, resume)
    if address:
        connect(address, quiet=True)
    return announce_price(plan, address, show=True)
