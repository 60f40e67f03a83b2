"""The plan's price before it is paid: `tfsearch run --dry-run`, `--budget`, the calibration and its cache."""

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from tfsearch.cli import build_parser, main
from tfsearch.run import cost, pipeline
from tfsearch.run.cost import Slots, price
from tfsearch.run.estimate import check_budget, with_epochs
from tfsearch.run.plan import make_plan
from tfsearch.store.atomic import atomic_write_json
from tfsearch.store.run_folder import MILESTONE_LOG
from tfsearch.transfusion import calibration
from tfsearch.transfusion.calibration import Calibration, calibrate
from tfsearch.transfusion.profiles import PROFILES
from tfsearch.transfusion.runtime import Runtime
from tfsearch.transfusion.unet import TransFusionUNet

FIXED = Calibration("cpu: test", "cpu", "fp32", train_seconds_per_image=0.01, infer_seconds_per_image=0.1)
# the cpu profile at 4 epochs, a milestone every 2: milestones (2, 4)
SPACE = {
    "name": "priced",
    "description": "the cpu profile, briefly, for the plan's price",
    "scope": "per_class",
    "profile": "cpu",
    "profile_overrides": {"epochs": 4, "milestone_every": 2},
    "selection": {"metric": "image_auroc", "sampler": "tpe", "trials": 6, "seed": 0},
    "params": {"epoch": "milestones", "lam": {"low": 0.5, "high": 1.0}, "kernel": {"choices": [1, 3]}},
}


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """Every measurement returns FIXED (for the profile and device asked) and is counted; the calibration
    cache is this test's own."""
    monkeypatch.setenv("TFSEARCH_CACHE", str(tmp_path / "cache"))
    calls = []

    def fixed(profile, runtime, threads):
        calls.append((profile.name, runtime.precision, threads))
        device = calibration.device_name(runtime.torch_device(), threads)
        precision = runtime.network_precision(profile, runtime.torch_device())
        return Calibration(device, profile.name, precision, FIXED.train_seconds_per_image, 0.1)

    monkeypatch.setattr(calibration, "measure", fixed)
    return calls


def space_file(folder: Path, **changes) -> Path:
    path = folder / "priced.yaml"
    path.write_text(yaml.safe_dump({**SPACE, **changes}))
    return path


def run_argv(tmp_path: Path, data_root: Path, *extra: str, space: Path | None = None) -> list[str]:
    return [
        "run", "--space", str(space or space_file(tmp_path)), "--dataset", "demo",
        "--data-root", str(data_root),
        "--runs-root", str(tmp_path / "runs"), "--name", "priced", "--categories", "disk,stripes",
        "--wandb", "disabled", *extra,
    ]  # fmt: skip


def counted(root: Path, category: str) -> tuple[int, int]:
    """Training and test images of a demo category, counted from its folders."""
    return len(list((root / category / "train" / "good").glob("*.png"))), len(
        list((root / category / "test").glob("*/*.png"))
    )


def run_storage(eval_images: int, milestones: int) -> int:
    """A finished training run of the cpu profile: model.pt per milestone, trainer.pt (weights and AdamW's
    two moments), and per milestone M_disc and M_recon float32, the masks bit-packed, an int8 label each."""
    profile = PROFILES["cpu"]
    weights = sum(p.numel() for p in TransFusionUNet(profile).state_dict().values()) * 4
    side = profile.image_size
    maps = eval_images * (2 * side * side * 4 + side * (side // 8) + 1)
    return milestones * weights + 3 * weights + milestones * maps


def table_rows(output: str) -> dict[str, list[str]]:
    rows = {}
    for line in output.splitlines():
        cells = line.removeprefix("[plan] ").split()
        if line.startswith("[plan] ") and cells and cells[0] in {"disk", "stripes", "total"}:
            rows[cells[0]] = cells
    return rows


# ------------------------------------------------------------------------------------------ --dry-run
def test_a_dry_run_prices_every_category_and_trains_nothing(
    tmp_path, demo_dataset_root, measured, monkeypatch, capsys
):
    def no_ray(*args, **kwargs):
        raise AssertionError("a dry run without --address joined or started Ray")

    monkeypatch.setattr(pipeline, "connect", no_ray)
    assert main(run_argv(tmp_path, demo_dataset_root, "--dry-run")) == 0
    output = capsys.readouterr().out

    run_dir = tmp_path / "runs" / "priced"
    assert not run_dir.exists()  # no config.json, no training folder, no studies
    assert (tmp_path / "cache" / calibration.CACHE_FILE).is_file()  # only the calibration cache
    assert "calibration (measured now): cpu: " in output and "profile cpu, fp32" in output
    rows = table_rows(output)
    for category in ("disk", "stripes"):
        train, test = counted(demo_dataset_root, category)
        seconds = 4 * train * 0.01 + 2 * test * 0.1
        storage = run_storage(test, 2)
        assert rows[category][1:6] == [str(train), str(test), "1", "4", "2"]
        assert rows[category][6:] == cost.duration(seconds).split() + cost.size(storage).split()
    total_seconds = sum(
        4 * t * 0.01 + 2 * e * 0.1 for t, e in (counted(demo_dataset_root, c) for c in ("disk", "stripes"))
    )
    assert f"device time {total_seconds / 3600:.3g} h" in output
    assert "selection: 2 studies of 6 candidates (tpe)" in output

    # a second dry run reads the calibration from the cache
    assert main(run_argv(tmp_path, demo_dataset_root, "--dry-run")) == 0
    assert "calibration (cached)" in capsys.readouterr().out
    assert len(measured) == 1


def test_budget_refuses_a_plan_over_it_naming_categories_and_cuts(
    tmp_path, demo_dataset_root, measured, capsys
):
    plan = make_plan(build_parser().parse_args(run_argv(tmp_path, demo_dataset_root)))
    full = price(plan, FIXED, from_cache=True, slots=Slots(1, "test"))
    budget = full.device_hours * 0.6
    argv = run_argv(tmp_path, demo_dataset_root, "--dry-run", "--budget", f"{budget:.6f}")
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert (
        f"--budget {float(f'{budget:.6f}'):g}: the plan needs {full.device_hours:.3g} device-hours" in error
    )
    hours = {c.category: c.device_hours for c in full.categories}
    named = re.search(r"\((disk|stripes) ([0-9.e-]+) h, (disk|stripes) ([0-9.e-]+) h\)", error)
    assert named and {named[1], named[3]} == {"disk", "stripes"}
    assert float(named[2]) >= float(named[4])  # the most expensive first
    assert float(named[2]) == pytest.approx(max(hours.values()), rel=1e-2)
    # the largest --epochs that fits, and one more that does not
    epochs = int(re.search(r"--epochs (\d+) \(of 4\)", error)[1])
    assert price(with_epochs(plan, epochs), FIXED, from_cache=True, slots=Slots(1, "")).device_hours <= budget
    assert (
        price(with_epochs(plan, epochs + 1), FIXED, from_cache=True, slots=Slots(1, "")).device_hours > budget
    )
    assert "fewer categories: without" in error and "--patience K" in error
    assert not (tmp_path / "runs" / "priced").exists()

    check_budget(plan, full, full.device_hours * 1.01)  # within budget: nothing raised


# ------------------------------------------------------------------------------------------ the arithmetic
def test_the_price_of_a_plan_by_hand(tmp_path, demo_dataset_root, measured):
    plan = make_plan(build_parser().parse_args(run_argv(tmp_path, demo_dataset_root, "--seeds", "2")))
    train, test = counted(demo_dataset_root, "stripes")
    priced = price(plan, FIXED, from_cache=True, slots=Slots(3, "three slots"))
    stripes = priced.categories[1]
    per_trial = 4 * train * 0.01 + 2 * test * 0.1  # epochs x images x s/img + milestones x maps x s/img
    assert (stripes.category, stripes.trials, stripes.milestones, stripes.milestones_done) == (
        "stripes",
        2,
        2,
        0,
    )
    assert stripes.trial_seconds == pytest.approx((per_trial, per_trial))
    assert stripes.device_seconds == pytest.approx(2 * per_trial)
    assert stripes.storage_bytes == 2 * run_storage(test, 2)
    # four trials of equal length on three slots: two rounds
    assert priced.wall_seconds == pytest.approx(2 * per_trial)
    assert priced.device_hours == pytest.approx(sum(c.device_seconds for c in priced.categories) / 3600)

    # --resume: a training run that logged milestone 2 has 2 epochs and one milestone left
    run = plan.train_dir("stripes", "default-seed=3")
    run.mkdir(parents=True)
    atomic_write_json(run / MILESTONE_LOG, [{"epoch": 2}])
    resumed = price(plan, FIXED, from_cache=True, slots=Slots(3, "")).categories[1]
    assert resumed.milestones_done == 1
    assert resumed.device_seconds == pytest.approx(per_trial + 2 * train * 0.01 + test * 0.1)

    # --select-on val: held-out training images (10 %, at least 2) are mapped beside the test split
    val_plan = make_plan(
        build_parser().parse_args(run_argv(tmp_path, demo_dataset_root, "--select-on", "val"))
    )
    held = max(2, round(train * 0.1))
    val = price(val_plan, FIXED, from_cache=True, slots=Slots(1, "")).categories[1]
    assert (val.train_images, val.eval_images, val.selection_images) == (
        train - held,
        test + 2 * held,
        2 * held,
    )


def test_the_selection_cost_counts_candidates_per_study(tmp_path, demo_dataset_root, measured):
    space = space_file(tmp_path, selection={"metric": "image_auroc", "sampler": "exhaustive"})
    plan = make_plan(build_parser().parse_args(run_argv(tmp_path, demo_dataset_root, space=space)))
    selection = price(plan, FIXED, from_cache=True, slots=Slots(1, "")).selection
    assert (selection.studies, selection.candidates) == (2, 2 * 21 * 2)  # milestones x λ values x n values
    assert selection.seconds > 0
    # SegF1 with its k searched: x k values, each candidate priced on its pixels; any other pixel metric sorts
    # every pixel per candidate, the dearest
    seconds = {}
    for metric, sigmas in (
        ("image_auroc", 3),
        ("seg_f1", 3),
        ("seg_f1", {"grid": [1, 2, 3]}),
        ("aupro_05", 3),
    ):
        params = {**SPACE["params"], "seg_sigmas": sigmas}
        space = space_file(tmp_path, selection={"metric": metric, "sampler": "exhaustive"}, params=params)
        plan = make_plan(build_parser().parse_args(run_argv(tmp_path, demo_dataset_root, space=space)))
        priced = price(plan, FIXED, from_cache=True, slots=Slots(1, ""))
        seconds[metric, str(sigmas)] = priced.selection.seconds
        assert priced.selection.candidates == 2 * 21 * 2 * (3 if isinstance(sigmas, dict) else 1)
    pixels = sum(c.selection_images for c in priced.categories) * plan.profile.image_size**2
    k_fixed = seconds["seg_f1", "3"] - seconds["image_auroc", "3"]
    per_pixel = cost.SEG_F1_FUSE_SECONDS_PER_PIXEL + cost.SEG_F1_COUNT_SECONDS_PER_PIXEL
    assert k_fixed == pytest.approx(84 * pixels * per_pixel, rel=1e-9)
    assert seconds["seg_f1", "{'grid': [1, 2, 3]}"] - seconds["image_auroc", "3"] > k_fixed
    assert seconds["aupro_05", "3"] > seconds["seg_f1", "{'grid': [1, 2, 3]}"]


# ------------------------------------------------------------------------------------------ the calibration
def test_the_calibration_cache_is_keyed_by_device_profile_and_precision(tmp_path, measured, monkeypatch):
    cache = tmp_path / "calibration.json"
    cpu = Runtime("cpu", "fp32", progress=False)
    first = calibrate(PROFILES["cpu"], cpu, threads=1, cache=cache)
    assert calibrate(PROFILES["cpu"], cpu, threads=1, cache=cache) == first
    assert len(measured) == 1  # the second read the cache
    assert json.loads(cache.read_text())["version"] == calibration.CACHE_VERSION

    calibrate(PROFILES["small"], cpu, threads=1, cache=cache)  # another profile
    calibrate(PROFILES["cpu"], Runtime("cpu", "bf16", progress=False), threads=1, cache=cache)
    calibrate(PROFILES["cpu"], cpu, threads=2, cache=cache)  # another thread count
    assert len(measured) == 4
    monkeypatch.setattr(calibration, "device_name", lambda device, threads: "cpu: another machine")
    calibrate(PROFILES["cpu"], cpu, threads=1, cache=cache)  # another device
    assert len(measured) == 5
    # every one of them is cached now, and --epochs does not change what an image costs
    calibrate(PROFILES["cpu"].with_epochs(7), cpu, threads=1, cache=cache)
    assert len(measured) == 5
    calibrate(PROFILES["cpu"], cpu, threads=1, cache=None)  # no cache: measured, nothing stored
    assert len(measured) == 6


def test_a_real_calibration_of_a_tiny_profile(tmp_path):
    tiny = PROFILES["cpu"].replace(
        image_size=32, base_channels=8, norm_groups=4, head_norm_groups=4, time_dim=32, steps=4
    )
    figures = calibrate(tiny, Runtime("cpu", "auto", progress=False), threads=1, cache=tmp_path / "c.json")
    assert figures.profile == "cpu" and figures.precision == "fp32"
    assert figures.device.startswith("cpu: ") and "1 threads" in figures.device
    assert math.isfinite(figures.train_seconds_per_image) and figures.train_seconds_per_image > 0
    assert math.isfinite(figures.infer_seconds_per_image) and figures.infer_seconds_per_image > 0
    assert calibration.read_entries(tmp_path / "c.json")  # stored


def test_with_address_the_calibration_runs_in_a_ray_task_holding_a_trial(
    tmp_path, demo_dataset_root, ray_instance, monkeypatch, capsys
):
    import ray

    monkeypatch.setenv("TFSEARCH_CACHE", str(tmp_path / "cache"))
    tasks = []
    real_remote = ray.remote

    def recording_remote(**options):
        tasks.append(options)
        return real_remote(**options)

    monkeypatch.setattr(ray, "remote", recording_remote)
    overrides = {"epochs": 2, "milestone_every": 1, "image_size": 32, "base_channels": 8, "norm_groups": 4,
                 "head_norm_groups": 4, "time_dim": 32, "steps": 4}  # fmt: skip
    space = space_file(tmp_path, profile_overrides=overrides)
    argv = run_argv(tmp_path, demo_dataset_root, "--dry-run", space=space)
    plan = make_plan(build_parser().parse_args(argv))
    address = ray.get_runtime_context().gcs_address
    priced = pipeline.dry_run(plan, address=address)
    assert tasks == [{"num_cpus": 1.0, "num_gpus": 0.0}]  # a trial's resources
    assert "the cluster now (it may grow)" in capsys.readouterr().out
    assert priced.calibration.profile == "cpu" and priced.calibration.train_seconds_per_image > 0
    # cached on the driver too
    assert (
        calibration.cached(plan.profile, Runtime("cpu", plan.precision, progress=False), threads=1)
        == priced.calibration
    )


def test_the_progress_counts_the_estimate_down_corrected_by_measured_epochs(
    tmp_path, demo_dataset_root, measured
):
    import dataclasses

    from tfsearch.run.training.callbacks import ProgressView

    plan = make_plan(build_parser().parse_args(run_argv(tmp_path, demo_dataset_root)))
    estimate = price(plan, FIXED, from_cache=True, slots=Slots(1, "one slot"))
    view = ProgressView(dataclasses.replace(plan, estimate=estimate), quiet=False)
    full = cost.duration(estimate.wall_seconds)
    assert view.time_left() == f" | left about {full} of the estimated {full} (no epoch measured yet)"

    # stripes reached milestone 2 training at half the calibrated speed: its training steps, and those of
    # disk still waiting, take twice as long; the maps keep their calibrated cost
    view.record("t1", "stripes", 2, images_per_second=1 / (2 * FIXED.train_seconds_per_image))
    train, test = counted(demo_dataset_root, "stripes")
    stripes_left = 2 * train * 0.01 * 2 + 1 * test * 0.1
    disk = estimate.categories[0]
    disk_left = disk.device_seconds + disk.train_seconds
    expected = cost.duration(stripes_left + disk_left)
    assert view.time_left() == (
        f" | left about {expected} of the estimated {full} (training steps x2.00 as measured so far)"
    )
    view.done.add("t1")
    assert f"left about {cost.duration(disk_left)} " in view.time_left()
