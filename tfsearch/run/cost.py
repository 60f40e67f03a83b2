"""The price of a run plan before it is paid: device time, wall time, storage, and the selection's cost.

Per category: its training images and evaluation images (files counted, none decoded), its trials (seeds x
training configurations), epochs and milestones. A trial costs

    epochs x training images x train s/image  +  milestones x evaluation images x infer s/image

with the seconds per image of a `Calibration` (`tfsearch.transfusion.calibration`) measured on the device and
in the precision a trial uses: on this machine, or with `--address` in a Ray task that holds a trial's
resources on a worker. The evaluation images are the test split, plus the selection data with `--select-on
val`: both are mapped at every milestone. On `--resume` the milestones already logged are done.

Storage per training run: model.pt at every milestone and one trainer.pt (the model and AdamW's two moments)
from the network's size (built on torch's meta device), and the map cache of every milestone
(`tfsearch.maps.cache`: M_disc and M_recon float32, the masks bit-packed, a label per image).

The figures are upper bounds where training may stop early (ASHA over training configurations, `--patience`).
The selection's time is rough: its rates come from bench/results/selection.md and seg-threshold.md, not
from a calibration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tfsearch.data import datasets
from tfsearch.maps.metrics import SEG_THRESHOLD_SIGMAS
from tfsearch.run.plan import RunPlan
from tfsearch.store.run_folder import read_milestone_log
from tfsearch.transfusion.calibration import Calibration
from tfsearch.transfusion.profiles import Profile
from tfsearch.transfusion.unet import TransFusionUNet

FLOAT32_BYTES = 4
# model.pt holds the weights; trainer.pt the weights and AdamW's two moments (exp_avg, exp_avg_sq)
TRAINER_COPIES = 3
# selection rates on 2 cores of an AMD EPYC (bench/results/selection.md, its second run): each map pixel is
# box-filtered once per (milestone, n), and each candidate costs its scoring and storage write
FILTER_SECONDS_PER_PIXEL = 13.7 / (30 * 8 * 200 * 256 * 256)
GRID_SECONDS_PER_CANDIDATE = 1.2 / 5040
SAMPLED_SECONDS_PER_CANDIDATE = 3.6 / 64  # tpe / random: the sampler's own work per candidate
# a candidate scored on its pixels, per pixel of the category's maps (bench/results/seg-threshold.md, same
# CPU): SegF1 alone fuses and reduces the maps once per (λ, n) and counts them once per k; any other pixel
# metric (or `all_metrics`) sorts every pixel
SEG_F1_FUSE_SECONDS_PER_PIXEL = 5.3e-3 / 1e6
SEG_F1_COUNT_SECONDS_PER_PIXEL = 0.38e-3 / 1e6
EVALUATE_SECONDS_PER_PIXEL = 52.2e-3 / 1e6


@dataclass(frozen=True)
class CategoryCost:
    """One category's share of the plan; device time and milestones count what remains to train."""

    category: str
    train_images: int
    eval_images: int  # mapped at every milestone: the test split, plus the selection data with val
    selection_images: int  # the maps of the selection split, which the study filters
    trials: int
    epochs: int  # per trial
    milestones: int  # per trial
    milestones_done: int  # over all trials, logged before this command (--resume)
    train_seconds: float  # remaining, all trials: the training steps
    device_seconds: float  # remaining, all trials: training steps and every milestone's maps
    trial_seconds: tuple[float, ...]  # remaining per trial
    storage_bytes: int  # all trials, once trained

    @property
    def device_hours(self) -> float:
        return self.device_seconds / 3600


@dataclass(frozen=True)
class SelectionCost:
    studies: int
    candidates: int  # per study
    seconds: float  # all studies, one after another


@dataclass(frozen=True)
class Slots:
    """Trials that run at once, and where that count comes from."""

    count: int
    source: str


@dataclass(frozen=True)
class PlanCost:
    categories: tuple[CategoryCost, ...]
    calibration: Calibration
    from_cache: bool  # the calibration was read from a cache, not measured now
    slots: Slots
    selection: SelectionCost
    run_bytes: int  # per training run: model.pt per milestone + trainer.pt + maps per milestone (largest)

    @property
    def device_seconds(self) -> float:
        return sum(c.device_seconds for c in self.categories)

    @property
    def device_hours(self) -> float:
        return self.device_seconds / 3600

    @property
    def storage_bytes(self) -> int:
        return sum(c.storage_bytes for c in self.categories)

    @property
    def wall_seconds(self) -> float:
        """Training's wall time: the trials, longest first, each on the first free slot (as Tune starts
        the largest categories first)."""
        return makespan([s for c in self.categories for s in c.trial_seconds], self.slots.count)


def makespan(durations: list[float], slots: int) -> float:
    finish = [0.0] * max(1, slots)
    for duration in sorted(durations, reverse=True):
        index = finish.index(min(finish))
        finish[index] += duration
    return max(finish)


# ------------------------------------------------------------------------------------------ sizes


def parameter_bytes(profile: Profile) -> int:
    """Bytes of the network's state dict in float32, from a network built on the meta device (no memory)."""
    with torch.device("meta"):
        model = TransFusionUNet(profile)
    return sum(t.numel() for t in model.state_dict().values()) * FLOAT32_BYTES


def map_bytes(images: int, size: int) -> int:
    """One milestone's map cache of `images` maps of size x size: M_disc and M_recon float32, the masks
    bit-packed along the width, an int8 label each (the small JSON files aside)."""
    return images * (2 * size * size * FLOAT32_BYTES + size * math.ceil(size / 8) + 1)


def run_bytes(profile: Profile, milestones: int, eval_images: int) -> int:
    """A training run once finished: model.pt at every milestone, one trainer.pt, maps at every milestone."""
    weights = parameter_bytes(profile)
    return (
        milestones * weights
        + TRAINER_COPIES * weights
        + milestones * map_bytes(eval_images, profile.image_size)
    )


def image_counts(plan: RunPlan, category: str) -> tuple[int, int, int]:
    """(training images, evaluation images, selection images) of a category, from its file lists."""
    found = datasets.load_category(plan.dataset, plan.data_root, category)
    train, test = len(found.train), len(found.test)
    if plan.validation == "none":
        return train, test, test
    if plan.validation == "folder":
        val = len(datasets.load_category("folder", plan.val_root, category).test)
    elif found.validation:
        val = 2 * len(found.validation)
    else:
        kept_out = max(2, round(train * plan.job(category).val_fraction))  # as `held_out` keeps them out
        train, val = train - kept_out, 2 * kept_out
    return train, test + val, val


# ------------------------------------------------------------------------------------------ the price


def trial_count(plan: RunPlan) -> int:
    return plan.seeds * (plan.space.training.samples if plan.space.training else 1)


def progress(plan: RunPlan, category: str) -> list[int]:
    """The last logged milestone epoch of each training run of a category that started (--resume)."""
    folder = plan.training_root / category
    if not folder.is_dir():
        return []
    logs = [read_milestone_log(run) for run in sorted(folder.iterdir()) if run.is_dir()]
    return [max(row["epoch"] for row in log) for log in logs if log]


def price(plan: RunPlan, calibration: Calibration, *, from_cache: bool, slots: Slots) -> PlanCost:
    """The plan's cost with the figures of `calibration`; what the training runs logged already is done."""
    train_s, infer_s = calibration.train_seconds_per_image, calibration.infer_seconds_per_image
    epochs, milestones = plan.profile.epochs, plan.milestones
    trials = trial_count(plan)
    costs = []
    largest = 0
    for category in plan.categories:
        train_images, eval_images, selection_images = image_counts(plan, category)
        started = progress(plan, category)[:trials]
        reached = started + [0] * (trials - len(started))
        left = [(max(0, epochs - done), sum(1 for m in milestones if m > done)) for done in reached]
        trial_train = [e * train_images * train_s for e, _ in left]
        trial_seconds = tuple(
            t + m * eval_images * infer_s for t, (_, m) in zip(trial_train, left, strict=True)
        )
        per_run = run_bytes(plan.profile, len(milestones), eval_images)
        largest = max(largest, per_run)
        costs.append(
            CategoryCost(
                category=category,
                train_images=train_images,
                eval_images=eval_images,
                selection_images=selection_images,
                trials=trials,
                epochs=epochs,
                milestones=len(milestones),
                milestones_done=sum(len(milestones) - m for _, m in left),
                train_seconds=sum(trial_train),
                device_seconds=sum(trial_seconds),
                trial_seconds=trial_seconds,
                storage_bytes=trials * per_run,
            )
        )
    return PlanCost(tuple(costs), calibration, from_cache, slots, selection_cost(plan, costs), largest)


def selection_cost(plan: RunPlan, costs: list[CategoryCost]) -> SelectionCost:
    """Candidates per study, and a rough time for all studies: every map filtered once per (milestone, n)
    that the study touches, plus each candidate's own cost, on its pixels for a pixel metric."""
    space = plan.space
    epochs = space.epoch_choices(plan.milestones)
    lams = space.values("lam", plan.profile.lam)
    kernels = space.values("kernel", plan.profile.kernel)
    sigmas = space.values("seg_sigmas", SEG_THRESHOLD_SIGMAS)
    models = plan.space.training.samples if plan.space.training else 1
    checkpoints = len(epochs) * models
    if space.enumerated:
        candidates, per_candidate, touched = (
            checkpoints * len(lams) * len(kernels) * len(sigmas),
            GRID_SECONDS_PER_CANDIDATE,
            checkpoints,
        )
    else:
        candidates, per_candidate, touched = (
            space.trials,
            SAMPLED_SECONDS_PER_CANDIDATE,
            min(checkpoints, space.trials),
        )
    pixels = sum(c.selection_images for c in costs) * plan.profile.image_size**2 * plan.seeds
    studies = len(plan.groups)
    seconds = (
        touched * len(kernels) * pixels * FILTER_SECONDS_PER_PIXEL
        + studies * candidates * per_candidate
        # an enumerated study scores the k values of a (λ, n) one after another, on one fusion of its maps
        + candidates
        * pixels
        * pixel_seconds(space.metric, space.all_metrics, len(sigmas) if space.enumerated else 1)
    )
    return SelectionCost(studies, candidates, seconds)


def pixel_seconds(metric: str, all_metrics: bool, sigmas: int) -> float:
    """Seconds per candidate and pixel of the maps it is scored on: none for image AUROC alone (its maps are
    reduced beforehand), SegF1's fusion shared by its `sigmas` k values, or every pixel metric's sort."""
    if metric == "image_auroc" and not all_metrics:
        return 0.0
    if metric == "seg_f1" and not all_metrics:
        return SEG_F1_FUSE_SECONDS_PER_PIXEL / sigmas + SEG_F1_COUNT_SECONDS_PER_PIXEL
    return EVALUATE_SECONDS_PER_PIXEL


# ------------------------------------------------------------------------------------------ the table


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def plan_lines(plan: RunPlan, cost: PlanCost) -> list[str]:
    """The plan with its price: a line naming the calibration, a row per category, the totals."""
    calibration = cost.calibration
    lines = [
        f"[plan] calibration ({'cached' if cost.from_cache else 'measured now'}): {calibration.device},"
        f" profile {calibration.profile}, {calibration.precision}:"
        f" train {calibration.train_seconds_per_image:.3g} s/img,"
        f" infer {calibration.infer_seconds_per_image:.3g} s/img"
    ]
    header = ("category", "train img", "eval img", "trials", "epochs", "milestones", "device time", "storage")
    rows = [header]
    for c in cost.categories:
        milestones = f"{c.milestones}" + (f" ({c.milestones_done} done)" if c.milestones_done else "")
        rows.append(
            (
                c.category,
                str(c.train_images),
                str(c.eval_images),
                str(c.trials),
                str(c.epochs),
                milestones,
                duration(c.device_seconds),
                size(c.storage_bytes),
            )
        )
    rows.append(
        (
            "total",
            str(sum(c.train_images for c in cost.categories)),
            str(sum(c.eval_images for c in cost.categories)),
            str(sum(c.trials for c in cost.categories)),
            "",
            "",
            duration(cost.device_seconds),
            size(cost.storage_bytes),
        )
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("[plan] " + "  ".join(cells).rstrip())
    upper = " (at most: --patience may stop earlier)" if plan.patience else ""
    if plan.space.training:
        upper = " (at most: ASHA stops some trials early)"
    lines.append(
        f"[plan] device time {cost.device_hours:.3g} h{upper}; wall time about {duration(cost.wall_seconds)}"
        f" on {cost.slots.count} slot(s) ({cost.slots.source}); storage {size(cost.storage_bytes)}"
        f" ({size(cost.run_bytes)} per training run at most)"
    )
    selection = cost.selection
    lines.append(
        f"[plan] selection: {selection.studies} stud{'y' if selection.studies == 1 else 'ies'} of"
        f" {selection.candidates} candidates ({plan.space.sampler}), about {duration(selection.seconds)}"
        " (rough: the rates of bench/results/selection.md and seg-threshold.md)"
    )
    return lines


def print_plan(plan: RunPlan, cost: PlanCost) -> None:
    print("\n".join(plan_lines(plan, cost)), flush=True)
