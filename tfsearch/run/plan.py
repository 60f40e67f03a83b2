"""The plan of a run: everything `tfsearch run` does, resolved on the driver before any trial starts.

Trials run in their own working folders, often on other nodes, so every path a user typed is made absolute
here, once, and checked; an error names the flag and the path as typed. Whether the run starts or continues
is `tfsearch.run.start`'s to decide: it continues only with `--resume`, and only the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tfsearch.data import datasets
from tfsearch.errors import InputError
from tfsearch.maps.metrics import SEG_THRESHOLD_SIGMAS
from tfsearch.run.first_run import FIRST_RUN_DATASET, first_run_profile
from tfsearch.run.space import Space, load_space
from tfsearch.store.location import Location, run_location
from tfsearch.store.run_folder import CONFIG_FILE, read_config
from tfsearch.transfusion.job import TrainJob
from tfsearch.transfusion.profiles import GPU_PROFILES, QUICK_PROFILE, Profile
from tfsearch.transfusion.runtime import Runtime

if TYPE_CHECKING:
    from tfsearch.run.cost import PlanCost

PROTOCOLS = ("test", "val")
# the flags naming input folders; each is resolved on the driver (trials run in other working folders)
INPUT_FOLDER_FLAGS = {
    "data_root": "--data-root",
    "texture_root": "--texture-root",
    "fg_root": "--fg-root",
    "val_root": "--val-root",
}


@dataclass
class RunPlan:
    """Everything a run does, resolved from the command line and the space; stored as `config.json`."""

    name: str
    run_dir: Path  # absolute
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
    allow_cpu: bool = False  # a GPU profile may train where a trial's node has no CUDA
    seeds: int = 1  # training runs per category (and training configuration), seeds `training_seeds`
    # milestones without improvement of the selection metric (at its best λ and n) after which a category's
    # training stops; 0 trains every category to its last milestone (the paper)
    patience: int = 0
    # not part of the plan's identity: may change on --resume
    max_failures: int = 2
    quiet: bool = False
    precision: str = "auto"  # auto | fp32 | bf16 autocast in the training trials (`Runtime.precision`)
    channels_last: bool = False
    compile: bool = False  # torch.compile the network in the trials
    # --studies: auto | sqlite | journal, the form of the studies (`tfsearch.store.studies.studies_file`);
    # not part of the plan's identity: the run folder's studies file records it, and --resume keeps it
    studies: str = "auto"
    # Weights & Biases: offline | online | disabled; not part of the plan's identity
    wandb: str = "offline"
    wandb_project: str | None = None
    wandb_entity: str | None = None
    # --budget: the device-hours a run may cost (tfsearch.run.estimate.check_budget); not part of the identity
    budget: float | None = None
    # the plan's price printed at its start, which the training progress counts down; set by `execute`
    estimate: PlanCost | None = None

    @property
    def training_root(self) -> Path:
        """The folder where this machine reads the training runs (CATEGORY/MODEL): `train/` in the storage
        folder, or in the run's cache of an object store (filled by the selection stage's
        `fetch_training_results`)."""
        return (self.location.local_path if self.location.is_local else self.run_dir / "cache") / "train"

    @property
    def storage_is_elsewhere(self) -> bool:
        """Whether the storage is apart from the run folder, so that results must be copied there."""
        return not (self.location.is_local and self.location.local_path == self.run_dir)

    @property
    def validation(self) -> str:
        if self.select_on == "test":
            return "none"
        return "folder" if self.val_root else "synthetic"

    @property
    def selection_split(self) -> str:
        return "val" if self.select_on == "val" else "test"

    @property
    def groups(self) -> list[list[str]]:
        """The categories each study selects for: one each, or all together with scope global."""
        return [self.categories] if self.space.scope == "global" else [[c] for c in self.categories]

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
        return self.training_root / category / model

    @property
    def training_seeds(self) -> list[int | None]:
        """The seed of each training run of a category: None (the profile's own seed, in the folder of the
        model alone) with one seed, else the profile's seed + 0 .. K-1, each in a folder of its own."""
        if self.seeds == 1:
            return [None]
        return [self.profile.seed + index for index in range(self.seeds)]

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
            # one seed writes no key, so a one-seed plan equals one stored by versions without --seeds
            **({"seeds": self.seeds} if self.seeds > 1 else {}),
            # no patience writes no key, so a plan without early stopping equals one stored before it existed
            **({"patience": self.patience} if self.patience else {}),
            "selection": {
                "metric": self.space.metric,
                "sampler": self.space.sampler,
                "trials": self.space.trials,
            },
        }

    def trial_settings(self) -> TrialSettings:
        """What every training trial needs besides its own config (category, training hyperparameters)."""
        return TrialSettings(
            job=self.job(""),
            storage_uri=self.location.uri,
            split=self.selection_split,
            metric=self.space.metric,
            lam=self.profile.lam,
            kernel=self.profile.kernel,
            protocol=self.select_on,
            cpus=self.cpus_per_trial,
            allow_cpu=self.allow_cpu,
            precision=self.precision,
            channels_last=self.channels_last,
            compile=self.compile,
            patience=self.patience,
            lam_values=self.space.values("lam", self.profile.lam),
            kernel_values=self.space.values("kernel", self.profile.kernel),
            sigma_values=self.space.values("seg_sigmas", SEG_THRESHOLD_SIGMAS),
        )


@dataclass(frozen=True)
class TrialSettings:
    """The part of the plan every training trial reads on its worker (Ray passes it with the trainable)."""

    job: TrainJob  # the job of every category, its category left blank
    storage_uri: str  # STORAGE/NAME: a folder every node reaches, or an object-store URI
    split: str  # the selection split whose maps score each milestone: "test" or "val"
    metric: str  # the selection metric reported at each milestone
    lam: float  # the profile's λ and n, at which each milestone is scored
    kernel: int
    protocol: str  # --select-on
    cpus: float  # CPUs of a trial: its torch threads
    allow_cpu: bool  # a GPU profile may train where the trial's node has no CUDA
    precision: str  # auto | fp32 | bf16
    channels_last: bool
    compile: bool = False  # torch.compile the network
    patience: int = 0  # milestones without improvement after which training stops (0: never)
    # the space's λ, n and k values: each milestone's best over them is what `patience` watches
    lam_values: tuple[float, ...] = ()
    kernel_values: tuple[int, ...] = ()
    sigma_values: tuple[float, ...] = (SEG_THRESHOLD_SIGMAS,)


def model_id(train_params: dict) -> str:
    """A readable, filesystem-safe name for a training configuration."""
    if not train_params:
        return "default"
    return "-".join(f"{k}={train_params[k]:.4g}" for k in sorted(train_params)).replace("/", "_")


SEED_MARK = "-seed="


def seeded_model(model: str, seed: int | None) -> str:
    """The folder of one training run: the model's id, and with several seeds the seed after it
    (`default-seed=4`); `split_seed` reads it back."""
    return model if seed is None else f"{model}{SEED_MARK}{seed}"


def split_seed(folder: str) -> tuple[str, int | None]:
    """A training run's folder name as (model id, seed or None); the inverse of `seeded_model`."""
    model, mark, seed = folder.rpartition(SEED_MARK)
    return (model, int(seed)) if mark and seed.isdigit() else (folder, None)


def resolve_seeds(typed: int | None, space: Space) -> int:
    """`--seeds`, else the space's `seeds:` key; a count below 1 is an error naming the flag."""
    seeds = space.seeds if typed is None else typed
    if seeds < 1:
        raise InputError(f"--seeds {typed}: expected a positive number of training runs per category")
    if seeds > 1 and space.training is not None:
        raise InputError(
            f"--seeds {seeds} (or the space's seeds: key) with the training: parameters of {space.source}:"
            " several seeds per training configuration are not supported yet; use one seed there"
        )
    return seeds


def resolve_patience(typed: int | None, space: Space) -> int:
    """`--patience`, else the space's `patience:` key; a negative count is an error naming the flag."""
    patience = space.patience if typed is None else typed
    if patience < 0:
        raise InputError(f"--patience {typed}: expected 0 (never stop early) or a number of milestones")
    if patience and space.params.get("epoch", "last") != "milestones":
        # a category stopped early must still have a candidate epoch: only every milestone guarantees one
        raise InputError(
            f"--patience {patience} (or the space's patience: key) with {space.source}: early stopping needs"
            " params.epoch: milestones, so that a category stopped early is selected among the milestones it"
            " reached"
        )
    return patience


def input_folder(flag: str, typed: Path | str | None) -> Path | None:
    """An input folder as an absolute path, checked here on the driver; the error names the flag and the
    path as the user typed it."""
    if typed is None:
        return None
    folder = Path(typed).expanduser().resolve()
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise InputError(f"{flag} {typed}: {what} (resolved to {folder})")
    return folder


def make_plan(args) -> RunPlan:
    space = load_space(args.space)
    if args.select_on not in PROTOCOLS:
        raise InputError(f"--select-on must be one of {PROTOCOLS}, got {args.select_on!r}")
    if args.val_root is not None and args.select_on != "val":
        raise InputError("--val-root only applies with --select-on val")
    folders = {key: input_folder(flag, getattr(args, key)) for key, flag in INPUT_FOLDER_FLAGS.items()}
    local_cuda = None if args.address else torch.cuda.is_available()  # a cluster may add GPUs later
    name = args.name or f"{space.name}-{args.dataset}"
    run_dir = Path(args.runs_root).expanduser().resolve() / name
    profile_name = args.profile
    quick = (
        profile_name is None
        and args.dataset in datasets.GENERATED_DATASETS
        and local_cuda is False
        and space.profile in GPU_PROFILES
    )
    if quick and args.dataset == FIRST_RUN_DATASET:
        profile = first_run_profile(args, space, run_dir, folders["data_root"])
    else:
        if quick:
            profile_name = QUICK_PROFILE
            if not args.quiet:
                print(
                    f"[run] no GPU on this machine: the demo runs the quick profile {QUICK_PROFILE!r} instead"
                    f" of the space's {space.profile!r} (--profile {space.profile} to insist)",
                    flush=True,
                )
        profile = space.resolve_profile(profile_name)
    if args.epochs:
        profile = profile.with_epochs(args.epochs)
    categories = datasets.resolve_categories(
        args.dataset, folders["data_root"], args.category, args.categories
    )
    gpus_per_trial = args.gpus_per_trial
    if gpus_per_trial is None:
        gpus_per_trial = 1.0 if profile.name in GPU_PROFILES else 0.0
    if gpus_per_trial < 0:
        raise InputError(
            f"--gpus-per-trial {gpus_per_trial}: expected 0 (CPU), a fraction or a count of GPUs"
        )
    if gpus_per_trial > 0 and local_cuda is False:
        raise InputError(
            f"the {profile.name!r} profile asks each trial for {gpus_per_trial:g} GPU and this machine has"
            f" none (no --address): use the quick profile (--profile {QUICK_PROFILE}), or --gpus-per-trial 0"
            " to train on the CPU (the paper profile takes days per category there), or --address to join"
            " a cluster with GPUs"
        )
    if getattr(args, "compile", False) and local_cuda is not None:
        # the trials train on this machine: a missing compiler is named now, not inside every trial
        Runtime(compile=True).compile_check(torch.device("cuda" if gpus_per_trial > 0 else "cpu"))
    seeds = resolve_seeds(getattr(args, "seeds", None), space)
    location = run_location(args.storage, name) if args.storage else Location.local(run_dir)
    return RunPlan(
        name=name,
        run_dir=run_dir,
        location=location,
        space=space,
        dataset=args.dataset,
        categories=categories,
        profile=profile,
        milestones=space.resolve_milestones(profile),
        select_on=args.select_on,
        restrict_to_foreground=not args.no_foreground,
        gpus_per_trial=gpus_per_trial,
        allow_cpu=args.allow_cpu,
        seeds=seeds,
        patience=resolve_patience(getattr(args, "patience", None), space),
        cpus_per_trial=args.cpus_per_trial,
        max_failures=args.max_failures,
        quiet=args.quiet,
        precision=args.precision or stored_precision(run_dir),
        channels_last=args.channels_last,
        compile=getattr(args, "compile", False),
        studies=getattr(args, "studies", None) or "auto",
        wandb=args.wandb,
        wandb_project=args.wandb_project,
        wandb_entity=args.wandb_entity,
        budget=getattr(args, "budget", None),
        **folders,
    )


def stored_precision(run_dir: Path) -> str:
    """Without `--precision`: the precision the run in `run_dir` was started with, which `--resume` keeps
    (runs started before `auto` existed trained in fp32 by default), else `auto`."""
    return read_config(run_dir).get("precision", "fp32") if (run_dir / CONFIG_FILE).is_file() else "auto"
