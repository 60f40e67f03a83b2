"""The selection stage, on the driver: per category (or per dataset with scope global), an Optuna study
over (model, epoch, λ, n) evaluated on the maps the training stage cached.

The studies run as Ray tasks on the driver's node, whose disk holds the studies file and the maps (with an
object-store storage each task first fetches its categories' maps into the run's cache/). Nothing here trains.
A group of categories is selected as soon as every category in it finished training (with `--seeds K`, every
seed of it), while the other categories still train (`Selection`). With several seeds a category's candidates
are scored on each seed's maps and ranked by the mean (`tfsearch.run.selection.candidates.SeedMeans`).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import optuna
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tfsearch.errors import InputError
from tfsearch.infra.interrupts import INTERRUPTIONS
from tfsearch.maps.cache import map_set_exists, map_set_problem
from tfsearch.run.plan import RunPlan, seeded_model, split_seed
from tfsearch.run.selection.candidates import Candidate, CategoryMaps, SeedMeans
from tfsearch.run.selection.study import StudySpec, run_study
from tfsearch.store.run_folder import EARLY_STOP_FILE, MILESTONE_LOG, read_milestone_log
from tfsearch.store.studies import open_studies, studies_file, study_name
from tfsearch.transfusion.job import TrainDir

# what settles a tie at the best selection value with --select-on val: a continuous metric on the val masks
VALIDATION_TIE_BREAK = "pixel_ap"
# the scope of a global study (one for every category), where a per-class study's is its category
ALL = "all"


def trained_models(plan: RunPlan, category: str) -> dict[str, list[int]]:
    """Training configurations of a category and the milestone epochs whose maps they finished; with
    several seeds, the epochs that every seed of the configuration finished."""
    reached: dict[str, dict[int | None, set[int]]] = {}
    folder = plan.training_root / category
    for model_dir in sorted(p for p in folder.glob("*") if p.is_dir()):
        model, seed = split_seed(model_dir.name) if plan.seeds > 1 else (model_dir.name, None)
        check_logged_maps(TrainDir(model_dir), plan.selection_split)
        epochs = {e for e in TrainDir(model_dir).map_epochs(plan.selection_split) if e in plan.milestones}
        if seed in plan.training_seeds and epochs:
            reached.setdefault(model, {})[seed] = epochs
    models = {}
    for model, by_seed in reached.items():
        epochs = set.intersection(*by_seed.values()) if len(by_seed) == plan.seeds else set()
        if epochs:
            models[model] = sorted(epochs)
    return models


def check_logged_maps(train_dir: TrainDir, split: str) -> None:
    """Every milestone the training run logged has its maps: one without (damaged or deleted since) is
    named, never silently left out of the selection."""
    for record in read_milestone_log(train_dir.root):
        problem = map_set_problem(train_dir.maps(record["epoch"], split))
        if problem is not None:
            raise InputError(
                f"milestone {record['epoch']} of {train_dir.root}: {problem}. Recompute its maps from the"
                f" milestone's weights with `tfsearch evaluate {train_dir.root} --epoch {record['epoch']}`,"
                " then run again with --resume"
            )


def fetch_training_results(plan: RunPlan, categories: list[str]) -> None:
    """From an object-store storage, download what the selection and the tables read of `categories` into
    the run's cache: each training run's job, history, milestone log and early stop (`--patience`), and the
    maps of every logged milestone not cached yet."""
    if plan.location.is_local:
        return
    train = plan.location.child("train")
    splits = sorted({plan.selection_split, "test"})  # test maps: the tables report test metrics
    for category in categories:
        for model in train.folders(category):
            remote, local = train.child(category, model), TrainDir(plan.train_dir(category, model))
            for path in (
                local.job_file,
                local.history_file,
                local.root / MILESTONE_LOG,
                local.root / EARLY_STOP_FILE,
            ):
                remote.download(path.name, path)
            for record in read_milestone_log(local.root):
                for split in splits:
                    target = local.maps(record["epoch"], split)
                    if not map_set_exists(target):
                        remote.download(target.relative_to(local.root).as_posix(), target)


def on_driver_node() -> dict:
    """Ray task options that keep a task on the driver's node, whose disk holds studies.db and the maps; a
    node without CPUs (a head kept free of work) runs the tasks without reserving any."""
    node = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node), 0)
    strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
    return {"num_cpus": 1 if cpus >= 1 else 0, "scheduling_strategy": strategy}


class Selection:
    """The studies of a run, each started as a Ray task on the driver's node as soon as every category of
    its group finished training: `trained` is told of each category the training stage finished (from
    Tune's callbacks, while other categories still train), `finish` starts what is left and waits."""

    def __init__(self, plan: RunPlan) -> None:
        self.plan = plan
        self.path = studies_file(plan.run_dir)
        open_studies(self.path)  # creates the schema once, before tasks open it concurrently
        self.trained_categories: set[str] = set()
        self.started: dict[tuple[str, ...], object] = {}  # group -> the task's ObjectRef

    def trained(self, category: str) -> None:
        self.trained_categories.add(category)
        for group in self.plan.groups:
            if tuple(group) not in self.started and set(group) <= self.trained_categories:
                self.start(group)

    def start(self, group: list[str]) -> None:

        task = ray.remote(**on_driver_node())(run_study_task)
        task = task.options(name=f"select-{group_study_name(self.plan, group)}")
        self.started[tuple(group)] = task.remote(str(self.path), self.plan, group)

    def finish(self, failed: dict[str, str]) -> None:
        """Start the study of every group whose categories all trained (`failed` maps the others to their
        error) and wait for all of them."""
        for group in self.plan.groups:
            if tuple(group) not in self.started and not any(c in failed for c in group):
                self.start(group)
        pending = list(self.started.values())
        # a signal is noted, not raised inside Ray's wait (whose C++ loop turns it into a SystemError)
        with INTERRUPTIONS.gracefully():
            while pending:
                _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.2)
                if INTERRUPTIONS.signum is not None:
                    self.cancel()
                    INTERRUPTIONS.check("selection")
        messages = ray.get(list(self.started.values()))
        for group, message in zip(self.started, messages, strict=True):
            if message and not self.plan.quiet:
                print(f"[select] {', '.join(group)}: {message}", file=sys.stderr)

    def cancel(self) -> None:
        """Stop every study still running; a sampled study cut short is redone on --resume (`run_study`)."""
        for task in self.started.values():
            ray.cancel(task, force=True)


def group_study_name(plan: RunPlan, group: list[str]) -> str:
    """The study of one group of `plan.groups`."""
    return study_name(plan.space.name, plan.dataset, group[0] if plan.space.scope != "global" else None)


def selection_study_names(plan: RunPlan) -> list[str]:
    """The studies of the run, one per group of `plan.groups`."""
    return [group_study_name(plan, group) for group in plan.groups]


def run_studies(plan: RunPlan) -> dict[str, optuna.Study]:
    """The run's studies by scope (a category, or `ALL` for the global study), read through one storage: the
    tables that read a study's trials after it (trials.csv, importance.csv, W&B) then read them once, the
    later ones from Optuna's cache of finished trials."""
    path = studies_file(plan.run_dir)
    if not path.is_file():
        return {}
    storage = open_studies(path)
    names = {s.study_name for s in storage.get_all_studies()}
    studies = {}
    for group in plan.groups:
        name = group_study_name(plan, group)
        if name in names:
            scope = group[0] if plan.space.scope != "global" else ALL
            studies[scope] = optuna.load_study(study_name=name, storage=storage)
    return studies


def study_spec(plan: RunPlan, categories: list[str], split: str | None = None) -> StudySpec | None:
    """Candidates of a group of categories on `split` (default: the selection split), or None when some
    category has no finished milestone yet."""
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

    def category_maps(category: str, seed: int | None) -> CategoryMaps:
        return CategoryMaps(
            {
                (m, e): TrainDir(plan.train_dir(category, seeded_model(m, seed))).maps(e, split)
                for m, e in checkpoints
            },
            kernels,
        )

    maps = {
        c: category_maps(c, None)
        if plan.seeds == 1
        else SeedMeans({seed: category_maps(c, seed) for seed in plan.training_seeds})
        for c in categories
    }
    model = default_model(plan, categories, {m for m, _ in checkpoints})
    last = max(e for m, e in checkpoints if m == model)
    default = Candidate(model, last, plan.profile.lam, plan.profile.kernel)
    name = group_study_name(plan, categories)
    tie_break = VALIDATION_TIE_BREAK if plan.select_on == "val" else None
    return StudySpec(name, plan.space, maps, checkpoints, default, tie_break)


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


def run_study_task(studies: str, plan: RunPlan, group: list[str]) -> str | None:
    """One group's study (a Ray task): its training results fetched, its candidates evaluated, its choice
    recorded. Returns why nothing was selected, or None."""
    fetch_training_results(plan, group)
    spec = study_spec(plan, group)
    if spec is None:
        return "no finished milestone to select from"
    run_study(open_studies(studies), spec)
    return None
