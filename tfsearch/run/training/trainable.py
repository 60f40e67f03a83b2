"""The worker side of a run: the Ray Tune trainable that trains one category to its last milestone.

It is a plain function of its config (category, training hyperparameters) and the plan's settings; retries,
placement and restore are Ray Tune's. At each milestone it scores the default (λ, n) on the selection split,
logs the milestone in the training folder and reports to Tune. With `--patience K` it also logs the
milestone's best value over the space's (λ, n) and ends training once K milestones in a row did not improve
on it (`tfsearch.run.training.early_stop`), recording the decision in `early_stop.json`; the decision is
recomputed from the milestone log when a trial starts, so a resumed or retried trial of a category that
stopped trains nothing more, and one cut off before its decision reaches the same one.

The training folder in the storage is the one copy of a run's checkpoints: a retried or resumed trial
continues from its latest milestone there, so Tune is handed no checkpoint of its own to copy (which would
store every milestone twice).

With an object-store `--storage` a trial works in a node-local scratch folder (`TrainingFolder`): it first
downloads what the storage holds of its training run (so a trial continued on another node never retrains a
milestone) and uploads each milestone once (maps, weights, training state, history, then the milestone log)
before reporting it; the scratch folder goes when the trial ends.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray
import torch
from ray import tune

from tfsearch.errors import InputError
from tfsearch.infra import telemetry
from tfsearch.maps.cache import META_FILE, read_map_set
from tfsearch.maps.fusion import fuse
from tfsearch.maps.metrics import GroundTruth, evaluate
from tfsearch.run.plan import TrialSettings, model_id, seeded_model
from tfsearch.run.space import TRAINABLE
from tfsearch.run.training.early_stop import StopDecision, milestone_best, stop_decision
from tfsearch.store.atomic import atomic_write_json
from tfsearch.store.location import Location
from tfsearch.store.run_folder import EARLY_STOP_FILE, MILESTONE_LOG, now, read_milestone_log
from tfsearch.transfusion.job import CHECKPOINT_FILE, MODEL_FILE, TrainDir, TrainJob
from tfsearch.transfusion.profiles import GPU_PROFILES
from tfsearch.transfusion.runtime import Runtime
from tfsearch.transfusion.trainer import Trainer

# where training trials keep their scratch copy with an object-store --storage (default: the system temp)
SCRATCH_ENV = "TFSEARCH_SCRATCH"


def category_job(template: TrainJob, category: str, train_params: dict, seed: int | None = None) -> TrainJob:
    """A category's training job, from the plan's job template, a trial's training hyperparameters and its
    seed (None: the profile's own)."""
    job = dataclasses.replace(template, category=category)
    changes = {**train_params, **({} if seed is None else {"seed": seed})}
    return dataclasses.replace(job, profile=job.profile.replace(**changes)) if changes else job


class TrainingFolder:
    """The folder a training trial trains in.

    In a storage folder (local or shared) it is the training run itself. With an object store it is a
    node-local scratch copy: entering fetches what the store holds of the run (job, history, milestone log,
    the latest training state and every milestone not yet logged, with their maps), `publish` uploads a
    milestone, and the copy is deleted when the trial ends, since all of it was uploaded.
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
        """Fetch the job, history and milestone log, the latest whole training state, and the weights and
        maps of every milestone the log does not list yet (a killed attempt saved them but did not log)."""
        folder = TrainDir(self.path)
        for path in (
            folder.job_file,
            folder.history_file,
            self.path / MILESTONE_LOG,
            self.path / EARLY_STOP_FILE,
        ):
            self.remote.download(self.relative(path), path)
        stored = self.remote.files("checkpoints")  # "epoch-0040/model.pt", "epoch-0040/trainer.pt", ...

        def epochs(name: str) -> set[int]:
            return {int(f.split("/")[0].split("-")[1]) for f in stored if f.endswith("/" + name)}

        with_state = epochs(CHECKPOINT_FILE)
        logged = {r["epoch"] for r in read_milestone_log(self.path)}
        wanted = (epochs(MODEL_FILE) | with_state) - logged | ({max(with_state)} if with_state else set())
        for epoch in sorted(wanted):
            self.remote.download(self.relative(folder.checkpoint(epoch)), folder.checkpoint(epoch))
            for split in self.remote.folders("maps"):
                maps = self.relative(folder.maps(epoch, split))
                # its commit file goes up last: without it the upload was cut off, and the trainer recomputes
                # the maps from the weights
                if META_FILE in self.remote.files(maps):
                    self.remote.download(maps, folder.maps(epoch, split))

    def publish_stop(self) -> None:
        """Upload the record of an early stop, when training stopped early (`--patience`)."""
        if self.remote is not None and (self.path / EARLY_STOP_FILE).is_file():
            self.remote.upload(self.path / EARLY_STOP_FILE, EARLY_STOP_FILE)

    def publish(self, epoch: int) -> None:
        """Upload milestone `epoch` once, its parts in parallel: maps, weights and training state, job and
        history; then the milestone log, so whatever the store holds of a milestone is complete once the log
        lists it; then the training state of earlier milestones goes from the store, as it did here."""
        if self.remote is None:
            return
        folder = TrainDir(self.path)
        parts = [folder.maps(epoch, split) for split in ("test", "val")]
        parts += [folder.checkpoint(epoch), folder.job_file, folder.history_file]
        parts = [part for part in parts if part.exists()]
        with ThreadPoolExecutor(max_workers=len(parts)) as pool:
            list(pool.map(lambda part: self.remote.upload(part, self.relative(part)), parts))
        self.remote.upload(self.path / MILESTONE_LOG, MILESTONE_LOG)
        for name in self.remote.files("checkpoints"):
            older = name.endswith("/" + CHECKPOINT_FILE) and int(name.split("/")[0].split("-")[1]) < epoch
            if older:
                self.remote.delete(f"checkpoints/{name}")


def train_category(config: dict, settings: TrialSettings) -> None:
    """Ray Tune trainable: train one category (one training configuration) to its last milestone, or to
    where `--patience` stops it.

    At each milestone it scores the default (λ, n) on the selection split, logs the milestone in the training
    folder (uploaded to an object-store storage) and reports to Tune.
    """
    category = config["category"]
    train_params = {k: config[k] for k in TRAINABLE if k in config}
    seed = config.get("seed")  # set only with several seeds per category (`RunPlan.training_seeds`)
    with TrainingFolder(settings.storage_uri, category, seeded_model(model_id(train_params), seed)) as folder:
        train_in_folder(folder, category, train_params, settings, seed)


def train_in_folder(
    folder: TrainingFolder,
    category: str,
    train_params: dict,
    settings: TrialSettings,
    seed: int | None = None,
) -> None:
    """The body of `train_category`, once the trial's folder is in place (resumed if it holds a run)."""
    model = seeded_model(model_id(train_params), seed)
    job = category_job(settings.job, category, train_params, seed)
    train_dir = folder.path
    torch.set_num_threads(max(1, int(settings.cpus)))
    device_note = check_device(job, settings.allow_cpu)

    runtime = Runtime(
        "auto",
        settings.precision,
        progress=False,
        channels_last=settings.channels_last,
        compile=settings.compile,
    )
    trainer = Trainer(job, train_dir, runtime)
    trainer.start(resume=True)  # a retried or resumed trial continues from its folder's latest milestone
    node_id = ray.get_runtime_context().get_node_id()
    started = now()

    def log_milestone(epoch: int, images_per_second: float, loss: float) -> dict[str, float]:
        """Score the default (λ, n) on the selection split, and with `--patience` the best (λ, n) too, and
        record the milestone (keyed by epoch)."""
        maps = read_map_set(TrainDir(train_dir).maps(epoch, settings.split))
        fused = fuse(maps.m_disc, maps.m_recon, settings.lam, settings.kernel)
        metrics = evaluate(GroundTruth.from_masks(np.asarray(maps.masks)), fused)
        best = {}
        if settings.patience:
            maps_dir = TrainDir(train_dir).maps(epoch, settings.split)
            value, lam, kernel, sigmas = milestone_best(
                maps_dir, settings.metric, settings.lam_values, settings.kernel_values, settings.sigma_values
            )
            best = {"best_value": value, "best_lam": lam, "best_kernel": kernel, "best_seg_sigmas": sigmas}
        row = {
            "category": category,
            "model": model,
            "epoch": epoch,
            "lam": settings.lam,
            "kernel": settings.kernel,
            "split": settings.split,
            **metrics,
            "node_id": node_id,
            "started_at": started,
            "finished_at": now(),
            "images_per_second": images_per_second,
            "loss": loss,
            **best,
            **({} if seed is None else {"seed": seed}),
        }
        log = [r for r in read_milestone_log(train_dir) if r["epoch"] != epoch] + [row]
        atomic_write_json(train_dir / MILESTONE_LOG, sorted(log, key=lambda r: r["epoch"]))
        folder.publish(epoch)
        return metrics

    def decide() -> bool:
        """Whether training stops at the logged milestones: `stop_decision` on the log, so a trial cut off
        between its log and its decision decides the same; the stop is recorded (and published) once."""
        if settings.patience == 0:
            return False
        log = read_milestone_log(train_dir)
        values = [(r["epoch"], float(r["best_value"])) for r in log]
        decision = stop_decision(values, settings.patience, trainer.milestones[-1])
        if decision is not None and not (train_dir / EARLY_STOP_FILE).is_file():
            record_stop(decision)
        return decision is not None

    def record_stop(decision: StopDecision) -> None:
        atomic_write_json(
            train_dir / EARLY_STOP_FILE,
            {"category": category, "model": model, "metric": settings.metric, **decision.as_dict()},
        )
        folder.publish_stop()
        print(
            f"[train] {category}{'' if model == 'default' else ' ' + model} stopped early at epoch"
            f" {decision.epoch}: {settings.metric} has not improved for {decision.patience} milestones"
            f" (best {decision.best_value:.4f} at epoch {decision.best_epoch});"
            f" {decision.epochs_not_trained} epochs not trained",
            flush=True,
        )

    # milestones that a killed attempt checkpointed but did not get to log
    logged = {r["epoch"] for r in read_milestone_log(train_dir)}
    for row in trainer.history:
        if row["epoch"] in trainer.milestones and row["epoch"] not in logged:
            log_milestone(row["epoch"], row["images_per_second"], row["loss_total"])
    if decide():
        return  # this category stopped early: a resumed or retried trial trains nothing more

    def report(milestone) -> bool:
        metrics = log_milestone(milestone.epoch, milestone.images_per_second, milestone.loss)
        value = metrics[settings.metric]
        telemetry.record_milestone(category, milestone.images_per_second)
        print(
            f"[train] {category} {model} epoch {milestone.epoch}/{job.profile.epochs}:"
            f" loss {milestone.loss:.4f}, {milestone.images_per_second:.1f} img/s,"
            f" {settings.metric} {value:.4f}{device_note}",
            flush=True,
        )
        tune.report(
            {
                "device_note": device_note.strip(" ()"),
                "epoch": milestone.epoch,
                "loss": milestone.loss,
                "images_per_second": milestone.images_per_second,
                "selection_value": 0.0 if math.isnan(value) else value,
                **{k: (None if math.isnan(v) else v) for k, v in metrics.items()},
            },
        )
        return decide()

    trainer.fit(on_milestone=report)


def check_device(job: TrainJob, allow_cpu: bool) -> str:
    """A trial that holds a GPU where torch sees no CUDA (a node without drivers, or logical GPUs) trains on
    the CPU: said in its log and progress lines, and refused for a GPU profile unless `--allow-cpu`.
    Returns the note its progress lines carry ("" when the trial runs where it was placed)."""
    held = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    if not held or torch.cuda.is_available():
        return ""
    message = f"this trial holds GPU {', '.join(map(str, held))} but torch sees no CUDA on its node"
    if job.profile.name in GPU_PROFILES and not allow_cpu:
        raise InputError(
            f"{message}: refusing to train the {job.profile.name!r} profile on the CPU (--allow-cpu)"
        )
    print(f"[train] warning: {message}; training on the CPU", flush=True)
    return " (on the CPU: GPU held without CUDA)"
