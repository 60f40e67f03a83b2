"""A first run in minutes: the epochs of the demo's quick profile, sized to this machine.

A bare `tfsearch run` on the demo, on a machine without a GPU, trains the quick profile `first`. How many
epochs fit a first run depends on the machine a hundredfold (bf16 or not, cores, their speed), so they come
from `calibrate` (seconds per training image and per evaluated image, measured on this machine in the
precision a trial would use and cached, so a second run chooses the same), never from the CPU's name:

- the run's categories train side by side, one per `--cpus-per-trial` CPUs of this machine, in `rounds`;
- each round may take the training budget, `FIRST_RUN_S` less `RESERVE_S` (Ray's start, the trials' start,
  the demo generated on first use, selection and the report), divided by the rounds; `SIDE_BY_SIDE` of it
  is planned, as trials side by side share the memory bandwidth a calibration alone had to itself;
- a category's cost is its epochs of training images plus the anomaly maps of its test images at every
  milestone; the milestones stay every `milestone_every` epochs of the profile, whatever the epochs, since
  `nut` scores best early (around epoch 20) and selection needs that milestone;
- never fewer epochs than the profile's own, below which it does not find the demo's object defects
  (bench/results/first-run.md): a machine too slow for them trains them anyway and says how long it takes;
- never more than `MOST_EPOCHS_FACTOR` times them: a fast machine keeps a first run short.

`--profile` and `--epochs` win over the calibration, and `--resume` keeps the profile the run was started
with (its `config.json`), however the calibration changed since.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

from tfsearch.data import datasets
from tfsearch.run.space import Space
from tfsearch.store.run_folder import CONFIG_FILE, read_config
from tfsearch.transfusion.calibration import Calibration, cached, calibrate
from tfsearch.transfusion.profiles import FIRST_RUN_PROFILE, Profile
from tfsearch.transfusion.runtime import Runtime

FIRST_RUN_DATASET = "demo"  # the dataset of a bare run; the realistic demo keeps the quick profile `small`
FIRST_RUN_S = 15 * 60.0  # the goal: a bare `tfsearch run` on the demo, from start to report
RESERVE_S = 180.0  # of it: Ray's start, the trials' start, the demo generated, selection and the report
SIDE_BY_SIDE = 0.8  # the share of a round's budget planned for training
MOST_EPOCHS_FACTOR = 3  # the most epochs, as a multiple of the profile's own


@dataclass(frozen=True)
class FirstRun:
    """The profile a first run trains, and why: the calibration and the work it plans."""

    profile: Profile
    calibration: Calibration
    train_images: int  # per category
    test_images: int  # per category, mapped at every milestone
    rounds: int  # categories trained one after another in each slot

    @property
    def training_s(self) -> float:
        """The training stage's seconds: each round trains one category per slot, every epoch and the maps
        of every milestone."""
        calibration = self.calibration
        train = self.profile.epochs * self.train_images * calibration.train_seconds_per_image
        maps = len(self.profile.milestones()) * self.test_images * calibration.infer_seconds_per_image
        return self.rounds * (train + maps)

    @property
    def fits(self) -> bool:
        return self.training_s <= training_budget()

    def describe(self) -> str:
        """What a run trains and why, and the calibration behind it."""
        profile, calibration = self.profile, self.calibration
        per_epoch = calibration.train_seconds_per_image * self.train_images
        if self.fits:
            why = f"chosen to fit {FIRST_RUN_S / 60:.0f} minutes on this machine"
        else:
            why = (
                "the fewest that find the demo's defects; on this machine they take about"
                f" {(self.training_s + RESERVE_S) / 60:.0f} minutes, more than the {FIRST_RUN_S / 60:.0f} a"
                " first run aims at (--profile cpu takes a few)"
            )
        return (
            f"the demo trains the quick profile {profile.name!r} for {profile.epochs} epochs at"
            f" {profile.image_size} px, {why}; calibration: {per_epoch:.2g} s an epoch, {calibration.device},"
            f" {calibration.precision}, {self.rounds} round(s) of categories side by side"
        )


def training_budget() -> float:
    """Seconds the training stage of a first run may take on this machine."""
    return (FIRST_RUN_S - RESERVE_S) * SIDE_BY_SIDE


def choose(
    base: Profile, calibration: Calibration, train_images: int, test_images: int, rounds: int
) -> FirstRun:
    """`base` with as many epochs as fit the training budget in `rounds` (a multiple of its milestone
    interval, which it keeps), from its own epochs (the floor) to `MOST_EPOCHS_FACTOR` times them."""
    every = base.milestone_every
    per_epoch = (
        train_images * calibration.train_seconds_per_image
        + test_images * calibration.infer_seconds_per_image / every
    )
    fitting = int(training_budget() / rounds / per_epoch)
    epochs = min(max(fitting - fitting % every, base.epochs), base.epochs * MOST_EPOCHS_FACTOR)
    profile = base if epochs == base.epochs else base.with_epochs(epochs).replace(milestone_every=every)
    return FirstRun(profile, calibration, train_images, test_images, rounds)


def first_run_profile(
    args: argparse.Namespace, space: Space, run_dir: Path, data_root: Path | None
) -> Profile:
    """The profile of a bare run on the demo without a GPU: the stored one on `--resume`, `first` as is
    with `--epochs` (which the plan applies), else `first` with the epochs `choose` finds for this
    machine. Prints what it chose unless `--quiet`."""
    if args.resume and (run_dir / CONFIG_FILE).is_file():
        stored = read_config(run_dir).get("profile")
        if isinstance(stored, dict) and stored.get("name") == FIRST_RUN_PROFILE:
            profile = Profile.from_dict(stored)
            say(
                args,
                space,
                f"the demo continues the quick profile {profile.name!r} as the run started it:"
                f" {profile.epochs} epochs at {profile.image_size} px",
            )
            return profile
    base = space.resolve_profile(FIRST_RUN_PROFILE)
    if args.epochs:
        say(args, space, f"the demo trains the quick profile {base.name!r} for --epochs {args.epochs}")
        return base
    categories = datasets.resolve_categories(args.dataset, data_root, args.category, args.categories)
    sizes = [datasets.load_category(args.dataset, data_root, name) for name in categories]
    slots = max(1, int(usable_cpus() // args.cpus_per_trial)) if args.cpus_per_trial > 0 else 1
    seeds = getattr(args, "seeds", None) or space.seeds
    rounds = math.ceil(len(categories) * seeds / slots)
    threads = max(1, int(args.cpus_per_trial))
    runtime = Runtime(
        "cpu",
        args.precision or "auto",
        progress=False,
        channels_last=args.channels_last,
        compile=getattr(args, "compile", False),
    )
    if cached(base, runtime, threads=threads) is None:
        say(args, space, f"calibrating this machine for the quick profile {base.name!r}, once")
    calibration = calibrate(base, runtime, threads=threads)
    chosen = choose(
        base,
        calibration,
        train_images=max(len(category.train) for category in sizes),
        test_images=max(len(category.test) for category in sizes),
        rounds=rounds,
    )
    say(args, space, chosen.describe())
    return chosen.profile


def usable_cpus() -> int:
    """The CPUs this process may run on: the slots a local Ray instance offers trials."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def say(args: argparse.Namespace, space: Space, line: str) -> None:
    if not args.quiet:
        print(f"[run] no GPU on this machine: {line} (--profile {space.profile} to insist)", flush=True)
