"""`tfsearch run`: train once per category with Ray Tune, then select (epoch, λ, n) with Optuna on cached
maps.

Stage 1 (training) runs one Ray Tune trial per (category, training configuration). Each trains to the last
milestone and, at every milestone, saves a checkpoint, writes the maps of the evaluation sets and reports the
default (λ, n) metrics. Retries (`FailureConfig`), placement and experiment restore are Ray Tune's.
Stage 2 (selection) runs one Optuna study per category (one for the dataset with `scope: global`) as Ray
tasks, each candidate a blend of cached maps and the metrics. Nothing in stage 2 trains.

A run folder (`--runs-root`/NAME) holds:

    config.json     the resolved plan (space, dataset, categories, profile, milestones, protocol, ...)
    studies.db      the Optuna studies (SQLite; `optuna-dashboard sqlite:///.../studies.db` opens it)
    trials.csv      one row per training milestone and per selection candidate (rebuilt from the above)
    selected.csv    per category: the default configuration's and the selected configuration's metrics
    train/CATEGORY/MODEL/   training runs (checkpoints, maps, milestones.json; see tfsearch.train)
    tune/           Ray Tune's experiment state, which `--resume` restores

`--storage STORAGE` moves train/ and tune/ to STORAGE/NAME, which every node of a cluster must reach: a
shared folder, used in place, or an object-store URI (s3://, gs://; tfsearch.storage). With a URI, a training
trial works in a node-local scratch folder: it first downloads what the storage holds of its training run
(so a trial continued on another node never retrains a milestone) and uploads each milestone (maps,
checkpoint, history, then milestones.json) before reporting it. The selection downloads the logs and maps it
needs to the run folder's cache/; studies.db stays in the run folder (SQLite needs a local disk), and the
tables (config.json, trials.csv, selected.csv, a copy of studies.db) are uploaded to STORAGE/NAME at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tfsearch import data as datasets
from tfsearch.atomic import atomic_write_json, atomic_write_text
from tfsearch.config import PROFILES, Profile
from tfsearch.errors import InputError
from tfsearch.metrics import METRIC_NAMES
from tfsearch.spaces import TRAINABLE, Space, load_space
from tfsearch.run_folder import (
    CONFIG_FIELDS,
    MILESTONE_LOG,
    RUN_TABLES,
    SELECTED_COLUMNS,
    TRIAL_COLUMNS,
    now,
    read_milestone_log,
    write_csv,
)
from tfsearch.storage import Location, run_location
from tfsearch.train import PRECISIONS, TrainDir, TrainJob

PROTOCOLS = ("test", "val")
# what settles a tie at the best selection value with --select-on val: a continuous metric on the val masks
VALIDATION_TIE_BREAK = "pixel_ap"
# the run's tables copied to an object-store --storage at the end
STORED_TABLES = (*RUN_TABLES, "studies.db")
# where training trials keep their scratch copy with an object-store --storage (default: the system temp)
SCRATCH_ENV = "TFSEARCH_SCRATCH"


# --------------------------------------------------------------------------------------------- the plan
@dataclass
class RunPlan:
    """Everything a run does, resolved from the command line and the space; stored as `config.json`."""

    name: str
    run_dir: Path
    # STORAGE/NAME (the run folder itself without --storage): training runs and Tune's experiment state
    location: Location
    space: Space
    dataset: str
    data_root: Path | None
    categories: list[str]
    profile: Profile
    milestones: tuple[int, ...]
    select_on: str = "test"
    val_root: Path | None = None
    texture_root: Path | None = None
    fg_root: Path | None = None
    restrict_to_foreground: bool = True
    gpus_per_trial: float = 0.0
    cpus_per_trial: float = 1.0
    max_failures: int = 2
    precision: str = "fp32"  # fp32 | bf16 autocast in the training trials
    channels_last: bool = False
    # Weights & Biases: offline | online | disabled; not part of the plan's identity
    wandb: str = "offline"
    wandb_project: str | None = None
    wandb_entity: str | None = None

    @property
    def storage(self) -> Path:
        """Where this machine reads the training runs: the storage folder, or the run's cache of an object
        store (filled by `fetch_training_results`)."""
        return self.location.local_path if self.location.is_local else self.run_dir / "cache"

    @property
    def validation(self) -> str:
        if self.select_on == "test":
            return "none"
        return "folder" if self.val_root else "synthetic"

    @property
    def selection_split(self) -> str:
        return "val" if self.select_on == "val" else "test"

    def job(self, category: str) -> TrainJob:
        """The training job of a category with the profile's own training hyperparameters."""
        return TrainJob(
            dataset=self.dataset,
            category=category,
            profile=self.profile,
            data_root=self.data_root,
            milestones=self.milestones,
            texture_root=self.texture_root,
            fg_root=self.fg_root,
            restrict_to_foreground=self.restrict_to_foreground,
            validation=self.validation,
            val_root=self.val_root,
        )

    def train_dir(self, category: str, model: str) -> Path:
        return self.storage / "train" / category / model

    def describe(self) -> dict:
        """The plan as JSON; two plans that describe the same are the same run."""
        return {
            "name": self.name,
            "storage": self.location.uri,
            "space": {"name": self.space.name, "source": self.space.source},
            "scope": self.space.scope,
            "dataset": self.dataset,
            "data_root": str(self.data_root) if self.data_root else None,
            "categories": self.categories,
            "profile": self.profile.to_dict(),
            "milestones": list(self.milestones),
            "select_on": self.select_on,
            "val_root": str(self.val_root) if self.val_root else None,
            "texture_root": str(self.texture_root) if self.texture_root else None,
            "fg_root": str(self.fg_root) if self.fg_root else None,
            "restrict_to_foreground": self.restrict_to_foreground,
            "precision": self.precision,
            "channels_last": self.channels_last,
            "selection": {
                "metric": self.space.metric,
                "sampler": self.space.sampler,
                "trials": self.space.trials,
            },
        }

    def trial_settings(self) -> dict:
        """What every training trial needs besides its own config (category, training hyperparameters)."""
        return {
            "job": self.job("").to_dict(),
            "storage": self.location.uri,
            "split": self.selection_split,
            "metric": self.space.metric,
            "lam": self.profile.lam,
            "kernel": self.profile.kernel,
            "protocol": self.select_on,
            "cpus": self.cpus_per_trial,
            "precision": self.precision,
            "channels_last": self.channels_last,
        }


def model_id(train_params: dict) -> str:
    """A readable, filesystem-safe name for a training configuration."""
    if not train_params:
        return "default"
    return "-".join(f"{k}={train_params[k]:.4g}" for k in sorted(train_params)).replace("/", "_")


def job_from_settings(settings: dict, category: str, train_params: dict) -> TrainJob:
    """A category's training job, from the plan's job template and a trial's training hyperparameters."""
    job = TrainJob.from_dict({**settings["job"], "category": category})
    return dataclasses.replace(job, profile=job.profile.replace(**train_params)) if train_params else job


# ------------------------------------------------------------------------------------ training trials
class TrainingFolder:
    """The folder a training trial trains in.

    In a storage folder (local or shared) it is the training run itself. With an object store it is a
    node-local scratch copy: entering fetches what the store holds of the run (job, history, milestone log,
    the last checkpoint and every milestone not yet logged, with their maps), `publish` uploads a milestone,
    and the copy is deleted when the trial ends, since all of it was uploaded.
    """

    def __init__(self, storage: str, category: str, model: str) -> None:
        location = Location.parse(storage).child("train", category, model)
        self.remote = None if location.is_local else location
        if self.remote is None:
            self.path = location.local_path
        else:
            scratch = os.environ.get(SCRATCH_ENV)
            if scratch:
                Path(scratch).mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f"tfsearch-{category}-{model}-", dir=scratch))

    def __enter__(self) -> TrainingFolder:
        if self.remote is not None:
            self.pull()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.remote is not None:
            shutil.rmtree(self.path, ignore_errors=True)

    def relative(self, path: Path) -> str:
        return path.relative_to(self.path).as_posix()

    def pull(self) -> None:
        from tfsearch.train import CHECKPOINT_FILE

        folder = TrainDir(self.path)
        for path in (folder.job_file, folder.history_file, self.path / MILESTONE_LOG):
            self.remote.download(self.relative(path), path)
        stored = self.remote.files("checkpoints")  # "epoch-0040/trainer.pt", ...
        epochs = sorted(int(f.split("/")[0].split("-")[1]) for f in stored if f.endswith(CHECKPOINT_FILE))
        if not epochs:
            return
        logged = {r["epoch"] for r in read_milestone_log(self.path)}
        for epoch in sorted({epochs[-1], *(set(epochs) - logged)}):
            self.remote.download(self.relative(folder.checkpoint(epoch)), folder.checkpoint(epoch))
            for split in self.remote.folders("maps"):
                self.remote.download(self.relative(folder.maps(epoch, split)), folder.maps(epoch, split))

    def publish(self, epoch: int) -> None:
        """Upload milestone `epoch`: maps first, then the checkpoint, history and (last) the milestone log,
        so that whatever the store holds of a milestone is complete once the log lists it."""
        if self.remote is None:
            return
        folder = TrainDir(self.path)
        parts = [folder.maps(epoch, split) for split in ("test", "val")]
        parts += [folder.checkpoint(epoch), folder.job_file, folder.history_file, self.path / MILESTONE_LOG]
        for part in parts:
            if part.exists():
                self.remote.upload(part, self.relative(part))


def train_category(config: dict, settings: dict) -> None:
    """Ray Tune trainable: train one category (one training configuration) to its last milestone.

    At each milestone it scores the default (λ, n) on the selection split, logs the milestone in the training
    folder (uploaded to an object-store storage) and reports to Tune with the checkpoint folder, which Tune
    persists and hands back on a retry.
    """
    category = config["category"]
    train_params = {k: config[k] for k in TRAINABLE if k in config}
    model = model_id(train_params)
    with TrainingFolder(settings["storage"], category, model) as folder:
        train_in_folder(folder, category, train_params, settings)


def train_in_folder(folder: TrainingFolder, category: str, train_params: dict, settings: dict) -> None:
    """The body of `train_category`, once the trial's folder is in place (resumed if it holds a run)."""
    import ray
    import torch
    from ray import tune

    from tfsearch import telemetry
    from tfsearch.map_cache import read_map_set
    from tfsearch.metrics import GroundTruth, evaluate, fuse
    from tfsearch.train import CHECKPOINT_FILE, Runtime, Trainer

    model = model_id(train_params)
    job = job_from_settings(settings, category, train_params)
    train_dir = folder.path
    torch.set_num_threads(max(1, int(settings["cpus"])))

    runtime = Runtime("auto", settings["precision"], progress=False, channels_last=settings["channels_last"])
    trainer = Trainer(job, train_dir, runtime)
    trainer.start(resume=True)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as saved:
            state = torch.load(Path(saved) / CHECKPOINT_FILE, map_location=trainer.device, weights_only=True)
        if state["epoch"] > trainer.epoch:
            trainer.load_state(state)
    node_id = ray.get_runtime_context().get_node_id()
    started = now()

    def log_milestone(epoch: int, images_per_second: float, loss: float) -> dict[str, float]:
        """Score the default (λ, n) on the selection split and record the milestone (keyed by epoch)."""
        maps = read_map_set(TrainDir(train_dir).maps(epoch, settings["split"]))
        fused = fuse(maps.m_disc, maps.m_recon, settings["lam"], settings["kernel"])
        metrics = evaluate(GroundTruth.from_masks(np.asarray(maps.masks)), fused)
        row = {
            "category": category,
            "model": model,
            "epoch": epoch,
            "lam": settings["lam"],
            "kernel": settings["kernel"],
            "split": settings["split"],
            **metrics,
            "node_id": node_id,
            "started_at": started,
            "finished_at": now(),
            "images_per_second": images_per_second,
            "loss": loss,
        }
        log = [r for r in read_milestone_log(train_dir) if r["epoch"] != epoch] + [row]
        atomic_write_json(train_dir / MILESTONE_LOG, sorted(log, key=lambda r: r["epoch"]))
        folder.publish(epoch)
        return metrics

    # milestones that a killed attempt checkpointed but did not get to log
    logged = {r["epoch"] for r in read_milestone_log(train_dir)}
    for row in trainer.history:
        if row["epoch"] in trainer.milestones and row["epoch"] not in logged:
            log_milestone(row["epoch"], row["images_per_second"], row["loss_total"])

    def report(milestone) -> None:
        metrics = log_milestone(milestone.epoch, milestone.images_per_second, milestone.loss)
        value = metrics[settings["metric"]]
        telemetry.record_milestone(category, milestone.images_per_second)
        tune.report(
            {
                "epoch": milestone.epoch,
                "selection_value": 0.0 if math.isnan(value) else value,
                **{k: (None if math.isnan(v) else v) for k, v in metrics.items()},
            },
            checkpoint=tune.Checkpoint.from_directory(str(milestone.checkpoint)),
        )

    trainer.fit(on_milestone=report)


class ProgressView:
    """A live console view of the training stage: categories, trials done and running, best so far."""

    def __init__(self, plan: RunPlan, quiet: bool) -> None:
        self.plan, self.quiet = plan, quiet
        self.best: dict[str, float] = {}
        self.done: set[str] = set()
        self.running: set[str] = set()

    def callback(self):
        from ray import tune

        from tfsearch import telemetry

        view = self

        class Callback(tune.Callback):
            def on_trial_start(self, iteration, trials, trial, **info):
                view.running.add(trial.trial_id)

            def on_trial_result(self, iteration, trials, trial, result, **info):
                category = trial.config["category"]
                value = result.get("selection_value", float("nan"))
                view.best[category] = max(view.best.get(category, -math.inf), value)
                telemetry.record_best(category, view.best[category])
                view.show(f"{category} epoch {result.get('epoch')}: {view.plan.space.metric} {value:.4f}")

            def on_trial_complete(self, iteration, trials, trial, **info):
                view.running.discard(trial.trial_id)
                view.done.add(trial.trial_id)
                telemetry.record_trial_finished(trial.config["category"])

            def on_trial_error(self, iteration, trials, trial, **info):
                view.running.discard(trial.trial_id)
                view.show(f"{trial.config['category']}: trial {trial.trial_id} failed")

        return Callback()

    def show(self, event: str) -> None:
        if self.quiet:
            return
        best = ", ".join(f"{c} {v:.3f}" for c, v in sorted(self.best.items()))
        print(
            f"[train] {event} | trials done {len(self.done)}, running {len(self.running)} | best: {best}",
            flush=True,
        )


def trial_name(trial) -> str:
    """Names shown by the Ray dashboard and Tune: stage, category and training configuration."""
    params = {k: trial.config[k] for k in TRAINABLE if k in trial.config}
    return f"train-{trial.config['category']}-{model_id(params)}"


def run_training(plan: RunPlan, quiet: bool, trainable=train_category) -> None:
    """Stage 1: one Tune trial per (category, training configuration), restored if the run was interrupted.

    Without training hyperparameters one experiment holds a trial per category. With them, each category
    gets its own experiment, whose Optuna searcher proposes configurations and whose ASHA scheduler stops
    poor ones at milestones (epochs are the resource), so categories never compete with each other.
    """
    from ray import tune

    from tfsearch.tracking import tune_callbacks

    settings = plan.trial_settings()
    resources = {"cpu": plan.cpus_per_trial, "gpu": plan.gpus_per_trial}
    runnable = tune.with_resources(tune.with_parameters(trainable, settings=settings), resources)
    view = ProgressView(plan, quiet)
    callbacks = [
        view.callback(),
        *tune_callbacks(plan.run_dir, plan.name, plan.wandb, plan.wandb_project, plan.wandb_entity),
    ]
    if plan.space.training is None:
        experiments = {"train": lambda: {"param_space": {"category": tune.grid_search(plan.categories)}}}
    else:
        experiments = {f"train-{c}": (lambda c=c: training_search(plan, c)) for c in plan.categories}
    tune_root = plan.location.child("tune")
    filesystem = tune_root.filesystem
    for name, make in experiments.items():
        path = tune_root.child(name).path
        if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
            tuner = tune.Tuner.restore(
                path, runnable, resume_unfinished=True, resume_errored=True, storage_filesystem=filesystem
            )
        else:
            experiment = make()
            tune_config = tune.TuneConfig(
                trial_name_creator=trial_name, trial_dirname_creator=trial_name, **experiment.get("tune", {})
            )
            run_config = tune.RunConfig(
                name=name,
                storage_path=tune_root.path,
                storage_filesystem=filesystem,
                failure_config=tune.FailureConfig(max_failures=plan.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=callbacks,
                verbose=0,
            )
            tuner = tune.Tuner(
                runnable,
                param_space=experiment["param_space"],
                tune_config=tune_config,
                run_config=run_config,
            )
        for result in tuner.fit():
            if result.error is not None and not quiet:
                print(f"[train] a training trial failed for good: {result.error}", file=sys.stderr)


def tune_domain(param):
    """A space parameter as a Ray Tune domain (which OptunaSearch turns into an Optuna distribution)."""
    from ray import tune

    from tfsearch.spaces import Choices, FloatRange, Grid

    if isinstance(param, FloatRange):
        return tune.loguniform(param.low, param.high) if param.log else tune.uniform(param.low, param.high)
    if isinstance(param, Choices | Grid):
        return tune.choice(list(param.values))
    return param


def training_search(plan: RunPlan, category: str) -> dict:
    """Tuner arguments of one category's training-hyperparameter search (Optuna proposes, ASHA stops)."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    search = plan.space.training
    searcher = OptunaSearch(
        metric="selection_value",
        mode="max",
        study_name=f"{study_name(plan, category)}/training",
        storage=open_storage(storage_url(plan)),
        seed=plan.space.seed,
    )
    grace = plan.milestones[min(search.grace_period, len(plan.milestones)) - 1]
    scheduler = ASHAScheduler(
        time_attr="epoch",
        metric="selection_value",
        mode="max",
        max_t=plan.milestones[-1],
        grace_period=grace,
        reduction_factor=search.reduction_factor,
    )
    return {
        "param_space": {"category": category, **{k: tune_domain(v) for k, v in search.params.items()}},
        "tune": {"search_alg": searcher, "scheduler": scheduler, "num_samples": search.samples},
    }


# ---------------------------------------------------------------------------------------- selection
def storage_url(plan: RunPlan) -> str:
    return f"sqlite:///{(plan.run_dir / 'studies.db').resolve()}"


def open_storage(url: str):
    import optuna

    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})


def trained_models(plan: RunPlan, category: str) -> dict[str, list[int]]:
    """Training configurations of a category and the milestone epochs whose maps they finished."""
    models = {}
    folder = plan.storage / "train" / category
    for model_dir in sorted(p for p in folder.glob("*") if p.is_dir()):
        epochs = [e for e in TrainDir(model_dir).map_epochs(plan.selection_split) if e in plan.milestones]
        if epochs:
            models[model_dir.name] = epochs
    return models


def study_name(plan: RunPlan, category: str | None) -> str:
    return f"{plan.space.name}/{plan.dataset}/{category or 'all'}"


def fetch_training_results(plan: RunPlan) -> None:
    """From an object-store storage, download what the selection and the tables read into the run's cache:
    each training run's job, history and milestone log, and the maps of every logged milestone not cached yet.
    """
    from tfsearch.map_cache import map_set_exists

    if plan.location.is_local:
        return
    train = plan.location.child("train")
    splits = sorted({plan.selection_split, "test"})  # test maps: the tables report test metrics
    for category in plan.categories:
        for model in train.folders(category):
            remote, local = train.child(category, model), TrainDir(plan.train_dir(category, model))
            for path in (local.job_file, local.history_file, local.root / MILESTONE_LOG):
                remote.download(path.name, path)
            for record in read_milestone_log(local.root):
                for split in splits:
                    target = local.maps(record["epoch"], split)
                    if not map_set_exists(target):
                        remote.download(target.relative_to(local.root).as_posix(), target)


def on_driver_node() -> dict:
    """Ray task options that keep a task on the driver's node, whose disk holds studies.db and the maps; a
    node without CPUs (a head kept free of work) runs the tasks without reserving any."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node), 0)
    strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
    return {"num_cpus": 1 if cpus >= 1 else 0, "scheduling_strategy": strategy}


def select(plan: RunPlan, quiet: bool) -> None:
    """Stage 2: the studies, as Ray tasks (one per category, or one for the dataset with scope global) on
    the driver's node, after the training results were fetched from an object-store storage."""
    import ray

    fetch_training_results(plan)
    url = storage_url(plan)
    open_storage(url)  # creates the schema once, before tasks open it concurrently
    groups = [[c] for c in plan.categories] if plan.space.scope != "global" else [plan.categories]
    options = on_driver_node()
    pending = []
    for group in groups:
        study_plan = selection_plan(plan, group)
        if study_plan is None:
            if not quiet:
                print(f"[select] {', '.join(group)}: no finished milestone to select from", file=sys.stderr)
            continue
        task = ray.remote(**options)(run_study_task).options(name=f"select-{study_plan.name}")
        pending.append(task.remote(url, study_plan))
    ray.get(pending)


def selection_plan(plan: RunPlan, categories: list[str], split: str | None = None):
    """Candidates of a group of categories on `split` (default: the selection split), or None when some
    category has no finished milestone yet."""
    from tfsearch.selection import CandidateSet, Config, StudyPlan

    split = split or plan.selection_split
    allowed = set(plan.space.epoch_choices(plan.milestones))
    reached = []
    for category in categories:
        models = trained_models(plan, category)
        reached.append({(m, e) for m, epochs in models.items() for e in epochs if e in allowed})
    checkpoints = sorted(set.intersection(*reached)) if reached else []
    if not checkpoints:
        return None
    kernels = plan.space.values("kernel", plan.profile.kernel)
    candidates = {
        c: CandidateSet(
            {(m, e): TrainDir(plan.train_dir(c, m)).maps(e, split) for m, e in checkpoints}, kernels
        )
        for c in categories
    }
    model = default_model(plan, categories, {m for m, _ in checkpoints})
    last = max(e for m, e in checkpoints if m == model)
    default = Config(model, last, plan.profile.lam, plan.profile.kernel)
    name = study_name(plan, categories[0] if plan.space.scope != "global" else None)
    tie_break = VALIDATION_TIE_BREAK if plan.select_on == "val" else None
    return StudyPlan(name, plan.space, candidates, checkpoints, default, tie_break)


def default_model(plan: RunPlan, categories: list[str], models: set[str]) -> str:
    """The profile's own training configuration; when training hyperparameters were searched, the model that
    scored best at its last milestone with the default (λ, n), as Ray Tune reported it."""
    if "default" in models or len(models) == 1:
        return "default" if "default" in models else next(iter(models))

    def score(model: str) -> tuple[int, float]:
        values = []
        for category in categories:
            log = read_milestone_log(plan.train_dir(category, model))
            if log:
                value = log[-1][plan.space.metric]
                values.append(0.0 if value is None or math.isnan(value) else value)
        last_epoch = min(
            (read_milestone_log(plan.train_dir(c, model)) or [{"epoch": 0}])[-1]["epoch"] for c in categories
        )
        return last_epoch, float(np.mean(values)) if values else 0.0

    return max(sorted(models), key=score)


def run_study_task(url: str, study_plan) -> None:
    from tfsearch.selection import run_study

    run_study(open_storage(url), study_plan)


# ------------------------------------------------------------------------------------------ results
def training_rows(plan: RunPlan) -> list[dict]:
    rows = []
    for category in plan.categories:
        for model_dir in sorted((plan.storage / "train" / category).glob("*")):
            for record in read_milestone_log(model_dir):
                rows.append({**record, "stage": "train", "status": "ok", "objective": ""})
    return rows


def selection_rows(plan: RunPlan) -> list[dict]:
    import optuna

    storage = open_storage(storage_url(plan))
    names = {s.study_name for s in storage.get_all_studies()}
    scopes = [None] if plan.space.scope == "global" else plan.categories
    rows = []
    for group in scopes:
        name = study_name(plan, group)
        if name not in names:
            continue
        study = optuna.load_study(study_name=name, storage=storage)
        for trial in study.get_trials(deepcopy=False):
            if "metrics" not in trial.user_attrs:
                continue
            attrs = trial.user_attrs
            for category, metrics in attrs["metrics"].items():
                rows.append(
                    {
                        "category": category,
                        "stage": "select",
                        "split": plan.selection_split,
                        **{k: attrs[k] for k in ("model", "epoch", "lam", "kernel")},
                        **metrics,
                        "objective": trial.value,
                        "study": name,
                        "trial": trial.number,
                        "status": trial.state.name.lower(),
                        "started_at": trial.datetime_start.isoformat(timespec="seconds")
                        if trial.datetime_start
                        else "",
                        "finished_at": trial.datetime_complete.isoformat(timespec="seconds")
                        if trial.datetime_complete
                        else "",
                    }
                )
    return rows


def write_trials(plan: RunPlan) -> list[dict]:
    """Rebuild `trials.csv` from the durable sources: the milestone logs and the studies."""
    common = {"dataset": plan.dataset, "space": plan.space.name, "protocol": plan.select_on}
    rows = [{**common, **r} for r in training_rows(plan) + selection_rows(plan)]
    stage_order = {"train": 0, "select": 1}
    rows.sort(
        key=lambda r: (
            stage_order[r["stage"]],
            r["category"],
            r.get("study", ""),
            r.get("trial", -1),
            r["model"],
            r["epoch"],
        )
    )
    write_csv(plan.run_dir / "trials.csv", TRIAL_COLUMNS, rows)
    return rows


def write_selected(plan: RunPlan, quiet: bool) -> list[dict]:
    """Per category: the default and the selected configuration, each with its selection value and its test
    metrics (for `--select-on val`, test maps are read only here, after every study has finished)."""
    import optuna

    from tfsearch.selection import best_config, choice_columns

    storage = open_storage(storage_url(plan))
    groups = [[c] for c in plan.categories] if plan.space.scope != "global" else [plan.categories]
    rows = []
    for group in groups:
        selection = selection_plan(plan, group)
        if selection is None:
            continue
        default = selection.default
        try:
            study = optuna.load_study(study_name=selection.name, storage=storage)
        except KeyError:
            continue
        chosen, choice = best_config(study, default)
        if plan.select_on == "val":
            test = selection_plan(plan, group, split="test").candidates
        else:
            test = selection.candidates
        for category in group:
            row = {
                "dataset": plan.dataset,
                "category": category,
                "space": plan.space.name,
                "protocol": plan.select_on,
                "selection_metric": plan.space.metric,
                **choice_columns(choice),
            }
            for prefix, config in (("default", default), ("selected", chosen)):
                own = selection.candidates[category].evaluate(config)
                tested = own if test is selection.candidates else test[category].evaluate(config)
                row.update({f"{prefix}_{k}": v for k, v in config.as_params().items()})
                row[f"{prefix}_selection_value"] = own[plan.space.metric]
                row.update({f"{prefix}_test_{k}": v for k, v in tested.items()})
            rows.append(row)
            if not quiet:
                print(
                    f"[select] {category}: default {plan.space.metric} {row['default_selection_value']:.4f}"
                    f" -> selected {row['selected_selection_value']:.4f} (epoch {chosen.epoch},"
                    f" λ {chosen.lam:.3f}, n {chosen.kernel}); test image AUROC"
                    f" {row['selected_test_image_auroc']:.4f}"
                )
    write_csv(plan.run_dir / "selected.csv", SELECTED_COLUMNS, rows)
    return rows


# -------------------------------------------------------------------------------------------- Ray
def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail within seconds, naming the address, when nothing listens there (ray.init would wait long)."""
    if address == "auto":
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--address {address}: expected HOST:PORT (or ray://HOST:PORT)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise InputError(f"--address {address}: no Ray cluster reachable there ({exc})") from None


def connect(address: str | None, quiet: bool) -> None:
    """Join a cluster, or start Ray on this machine with the dashboard on 127.0.0.1."""
    import ray

    # Tune warns on every checkpoint of short milestones; the console view reports progress instead
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0, no Tune tables on the console
    if ray.is_initialized():
        return
    env = {"env_vars": {k: os.environ[k] for k in ("WANDB_MODE",) if k in os.environ}}
    if address:
        check_reachable(address)
        context = ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        context = ray.init(
            include_dashboard=True, dashboard_host="127.0.0.1", runtime_env=env, log_to_driver=False
        )
    url = getattr(context, "dashboard_url", None)
    if url and not quiet:
        print(f"Ray dashboard: http://{url}", flush=True)


# -------------------------------------------------------------------------------------------- run
def make_plan(args) -> RunPlan:
    space = load_space(args.space)
    if args.select_on not in PROTOCOLS:
        raise InputError(f"--select-on must be one of {PROTOCOLS}, got {args.select_on!r}")
    if args.val_root is not None and args.select_on != "val":
        raise InputError("--val-root only applies with --select-on val")
    profile = space.resolve_profile(args.profile)
    if args.epochs:
        profile = profile.with_epochs(args.epochs)
    categories = datasets.resolve_categories(args.dataset, args.data_root, args.category, args.categories)
    name = args.name or f"{space.name}-{args.dataset}"
    run_dir = Path(args.runs_root) / name
    # trials run in other working directories (and on other nodes): the location is absolute
    location = run_location(args.storage, name) if args.storage else Location.local(run_dir)
    return RunPlan(
        name=name,
        run_dir=run_dir,
        location=location,
        space=space,
        dataset=args.dataset,
        data_root=args.data_root,
        categories=categories,
        profile=profile,
        milestones=space.resolve_milestones(profile),
        select_on=args.select_on,
        val_root=args.val_root,
        texture_root=args.texture_root,
        fg_root=args.fg_root,
        restrict_to_foreground=not args.no_foreground,
        gpus_per_trial=args.gpus_per_trial if args.gpus_per_trial is not None else 0.0,
        cpus_per_trial=args.cpus_per_trial,
        max_failures=args.max_failures,
        precision=args.precision,
        channels_last=args.channels_last,
        wandb=args.wandb,
        wandb_project=args.wandb_project,
        wandb_entity=args.wandb_entity,
    )


def start_run(plan: RunPlan, resume: bool) -> None:
    """Create the run folder, or check that `--resume` continues the same plan."""
    config = plan.run_dir / "config.json"
    if config.exists():
        if not resume:
            raise InputError(
                f"{plan.run_dir} already exists; pass --resume to continue it or choose another --name"
            )
        stored = json.loads(config.read_text())
        current = json.loads(json.dumps(plan.describe()))  # tuples become lists, as stored
        changed = sorted(k for k, v in current.items() if stored.get(k) != v)
        if changed:
            raise InputError(f"--resume: this command differs from {config} in {changed}")
    elif resume:
        raise InputError(f"--resume: {plan.run_dir} holds no run to resume")
    else:
        atomic_write_json(config, plan.describe())
        publish_tables(plan)


def publish_tables(plan: RunPlan) -> None:
    """Copy the run's tables to an object-store storage, where `tfsearch report` can read them (a storage
    folder needs no copy: the run folder is read directly)."""
    if plan.location.is_local:
        return
    for name in STORED_TABLES:
        if (plan.run_dir / name).is_file():
            plan.location.upload(plan.run_dir / name, name)


def execute(
    plan: RunPlan,
    *,
    resume: bool = False,
    quiet: bool = False,
    address: str | None = None,
    trainable=train_category,
) -> list[dict]:
    """The whole run: training, selection, tables. Returns the rows of `selected.csv`."""
    import ray

    start_run(plan, resume)
    connect(address, quiet)
    if plan.gpus_per_trial == 0 and ray.cluster_resources().get("GPU", 0) > 0:
        plan.gpus_per_trial = 1.0
    started = time.perf_counter()
    run_training(plan, quiet, trainable)
    trained = time.perf_counter()
    select(plan, quiet)
    write_trials(plan)
    selected = write_selected(plan, quiet)
    from tfsearch.selection_log import log_selection  # issue 11: importance.csv and the studies in W&B

    log_selection(plan, quiet)
    publish_tables(plan)
    from tfsearch.report import write_report

    write_report(
        [plan.run_dir], wandb=plan.wandb, project=plan.wandb_project, entity=plan.wandb_entity, quiet=quiet
    )
    if not quiet:
        print(
            f"[done] training {trained - started:.1f} s, selection and tables"
            f" {time.perf_counter() - trained:.1f} s; results in {plan.run_dir}"
        )
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
    parser.add_argument("--gpus-per-trial", type=float, help="GPUs per training trial (default: 1 if any)")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per training trial")
    parser.add_argument("--max-failures", type=int, default=2, help="retries of a failing training trial")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16 autocasts the network")
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
    execute(plan, resume=args.resume, quiet=args.quiet, address=args.address)
    return 0
