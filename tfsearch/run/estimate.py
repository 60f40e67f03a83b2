"""Where a plan's calibration is measured, the price that follows, and `--budget`.

The calibration runs on the device a trial would use: here, or with `--address` in a short Ray task that
holds a trial's resources on a worker (so a CPU head measures its GPU workers); its result is cached on the
driver too. `--budget HOURS` refuses a plan above it, naming the categories by their hours and what to cut.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from tfsearch.errors import InputError
from tfsearch.run.cost import PlanCost, Slots, price
from tfsearch.run.plan import RunPlan
from tfsearch.transfusion.calibration import (
    Calibration,
    cache_key,
    cache_path,
    cached,
    calibrate,
    device_name,
    read_entries,
    remember,
    torch_threads,
)
from tfsearch.transfusion.profiles import Profile
from tfsearch.transfusion.runtime import Runtime

# ------------------------------------------------------------------------------------------ where it runs


def trial_runtime(plan: RunPlan, device: str) -> Runtime:
    return Runtime(
        device, plan.precision, progress=False, channels_last=plan.channels_last, compile=plan.compile
    )


def trial_threads(plan: RunPlan) -> int:
    """A trial's torch threads, as `train_category` sets them."""
    return max(1, int(plan.cpus_per_trial))


def local_slots(plan: RunPlan) -> Slots:
    cpus = os.cpu_count() or 1
    count = int(cpus // plan.cpus_per_trial)
    source = f"this machine: {cpus} CPUs / {plan.cpus_per_trial:g} per trial"
    if plan.gpus_per_trial > 0:
        gpus = torch.cuda.device_count()
        count = min(count, int(gpus // plan.gpus_per_trial))
        source += f", {gpus} GPUs / {plan.gpus_per_trial:g} per trial"
    return Slots(max(1, count), source)


def cluster_slots(plan: RunPlan) -> Slots:
    """Trials the cluster holds at once, at its current size (an autoscaling cluster may grow)."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    count = int(cpus // plan.cpus_per_trial)
    source = f"the cluster now (it may grow): {cpus:g} CPUs / {plan.cpus_per_trial:g} per trial"
    if plan.gpus_per_trial > 0:
        count = min(count, int(gpus // plan.gpus_per_trial))
        source += f", {gpus:g} GPUs / {plan.gpus_per_trial:g} per trial"
    return Slots(max(1, count), source)


def calibrate_here(plan: RunPlan) -> tuple[Calibration, bool]:
    """The calibration on this machine, on the device a trial would use here; and whether it was cached."""
    device = "cuda" if plan.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu"
    runtime, threads = trial_runtime(plan, device), trial_threads(plan)
    found = cached(plan.profile, runtime, threads=threads)
    return (found, True) if found is not None else (calibrate(plan.profile, runtime, threads=threads), False)


def calibrate_on_worker(
    profile: Profile, runtime: Runtime, threads: int, known: dict[str, dict]
) -> tuple[Calibration, bool]:
    """On a worker holding a trial's resources: the entry the driver knows for this worker's device (its
    `known` cache entries), else the worker's own cache, else measured there."""
    device = runtime.torch_device()
    precision = runtime.network_precision(profile, device)
    with torch_threads(threads) as used:
        entry = known.get(cache_key(device_name(device, used), profile, precision, runtime, used))
    if entry is not None:
        return Calibration(**entry), True
    found = cached(profile, runtime, threads=threads)
    return (found, True) if found is not None else (calibrate(profile, runtime, threads=threads), False)


def calibrate_in_cluster(plan: RunPlan) -> tuple[Calibration, bool]:
    """The calibration in a short Ray task that holds a trial's resources (so a CPU head measures its GPU
    workers); the result is cached on the driver too."""
    import ray

    runtime, threads = trial_runtime(plan, "auto"), trial_threads(plan)
    task = ray.remote(num_cpus=plan.cpus_per_trial, num_gpus=plan.gpus_per_trial)(calibrate_on_worker)
    calibration, was_cached = ray.get(
        task.remote(plan.profile, runtime, threads, read_entries(cache_path("default")))
    )
    remember(calibration, plan.profile, runtime, threads=threads)
    return calibration, was_cached


def estimate(plan: RunPlan, *, address: str | None = None) -> PlanCost:
    """The plan's price: calibrated here, or with `address` (Ray joined already) on a cluster worker."""
    if address:
        calibration, was_cached = calibrate_in_cluster(plan)
        slots = cluster_slots(plan)
    else:
        calibration, was_cached = calibrate_here(plan)
        slots = local_slots(plan)
    return price(plan, calibration, from_cache=was_cached, slots=slots)


# ------------------------------------------------------------------------------------------ the budget


def with_epochs(plan: RunPlan, epochs: int) -> RunPlan:
    profile = plan.profile.with_epochs(epochs)
    return dataclasses.replace(plan, profile=profile, milestones=plan.space.resolve_milestones(profile))


def epochs_that_fit(plan: RunPlan, cost: PlanCost, hours: float) -> int | None:
    """The most epochs (below the plan's) whose plan fits `hours`, or None when one epoch does not."""

    def fits(epochs: int) -> bool:
        try:
            shorter = with_epochs(plan, epochs)
        except InputError:  # the space's milestones lie beyond so few epochs
            return False
        return (
            price(shorter, cost.calibration, from_cache=cost.from_cache, slots=cost.slots).device_hours
            <= hours
        )

    low, high = 0, plan.profile.epochs - 1
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low or None


def check_budget(plan: RunPlan, cost: PlanCost, hours: float | None) -> None:
    """InputError naming the categories by their hours, most expensive first, and what would fit, when the
    plan's device-hours exceed `--budget`."""
    if hours is None:
        return
    if hours <= 0:
        raise InputError(f"--budget {hours:g}: expected a positive number of device-hours")
    if cost.device_hours <= hours:
        return
    ranked = sorted(cost.categories, key=lambda c: -c.device_seconds)
    named = ", ".join(f"{c.category} {c.device_hours:.3g} h" for c in ranked)
    cuts = []
    resumed = any(c.milestones_done for c in cost.categories)  # a resumed run keeps its epochs
    epochs = None if resumed else epochs_that_fit(plan, cost, hours)
    if epochs is not None:
        cuts.append(f"--epochs {epochs} (of {plan.profile.epochs})")
    kept, dropped = list(ranked), []
    while kept and sum(c.device_hours for c in kept) > hours:
        dropped.append(kept.pop(0).category)
    if kept:
        cuts.append(
            f"fewer categories: without {', '.join(dropped)} the plan needs"
            f" {sum(c.device_hours for c in kept):.3g} h"
            f" (--categories {','.join(sorted(c.category for c in kept))})"
        )
    cuts.append("--patience K, which stops a category after K milestones without improvement (not estimated)")
    raise InputError(
        f"--budget {hours:g}: the plan needs {cost.device_hours:.3g} device-hours on"
        f" {cost.calibration.device} ({named}); to fit, cut: {'; or '.join(cuts)}"
    )
