"""A bare `tfsearch run` on the demo without a GPU: the quick profile `first`, its epochs fitted to this
machine's calibration (a fixed one here), and what wins over them."""

import pytest
import torch

from tfsearch.cli import build_parser
from tfsearch.run import first_run
from tfsearch.run.first_run import MOST_EPOCHS_FACTOR, choose, training_budget
from tfsearch.run.plan import make_plan
from tfsearch.run.start import check_start, create_run
from tfsearch.transfusion.calibration import Calibration
from tfsearch.transfusion.profiles import FIRST_RUN_PROFILE, PROFILES
from tfsearch.transfusion.runtime import native_bf16

FIRST = PROFILES[FIRST_RUN_PROFILE]
DEVICE = "cpu: test CPU, 1 threads"


def calibration(train: float, infer: float) -> Calibration:
    return Calibration(DEVICE, FIRST_RUN_PROFILE, "fp32", train, infer)


# 0.05 s per training image: 2.4 s an epoch of 48 images, between the floor and the most epochs
QUICK = calibration(0.05, 0.3)
# 1 s per training image: the floor alone takes two rounds of 60 × 48 s
SLOW = calibration(1.0, 3.0)


def test_the_chosen_epochs_are_the_most_that_fit_the_budget_and_meet_the_floor():
    chosen = choose(FIRST, QUICK, train_images=48, test_images=30, rounds=2)
    assert FIRST.epochs < chosen.profile.epochs < FIRST.epochs * MOST_EPOCHS_FACTOR
    assert chosen.fits and chosen.training_s <= training_budget()
    every = FIRST.milestone_every
    longer = FIRST.with_epochs(chosen.profile.epochs + every).replace(milestone_every=every)
    assert first_run.FirstRun(longer, QUICK, 48, 30, 2).training_s > training_budget()  # the most that fit
    # the milestones keep their interval: selection still sees the early epochs where nut scores best
    assert chosen.profile.milestones() == tuple(range(every, chosen.profile.epochs + 1, every))
    assert chosen.profile.image_size == FIRST.image_size and chosen.profile.name == FIRST_RUN_PROFILE
    line = chosen.describe()
    assert f"for {chosen.profile.epochs} epochs at 64 px, chosen to fit 15 minutes on this machine" in line
    assert f"calibration: 2.4 s an epoch, {DEVICE}, fp32, 2 round(s) of categories side by side" in line


def test_a_slow_machine_trains_the_floor_and_says_how_long_it_takes():
    chosen = choose(FIRST, SLOW, train_images=48, test_images=30, rounds=2)
    assert chosen.profile == FIRST and not chosen.fits
    minutes = round((chosen.training_s + first_run.RESERVE_S) / 60)
    assert minutes > 15
    assert (
        f"for {FIRST.epochs} epochs at 64 px, the fewest that find the demo's defects; on this machine they"
        f" take about {minutes} minutes, more than the 15 a first run aims at" in chosen.describe()
    )


def test_a_fast_machine_stops_at_the_most_epochs():
    chosen = choose(FIRST, calibration(1e-5, 1e-4), train_images=48, test_images=30, rounds=1)
    assert chosen.profile.epochs == FIRST.epochs * MOST_EPOCHS_FACTOR and chosen.fits


@pytest.fixture
def machine(monkeypatch):
    """No GPU, two CPUs, and a calibration that returns `figures[0]` (counted in `calls`)."""
    calls: list[object] = []
    figures = [QUICK]

    def fake_calibrate(profile, runtime, *, threads=None, cache="default"):
        calls.append((profile.name, runtime.device, threads))
        return figures[0]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(first_run, "calibrate", fake_calibrate)
    monkeypatch.setattr(first_run, "cached", lambda *args, **kwargs: figures[0])
    monkeypatch.setattr(first_run, "usable_cpus", lambda: 2)
    return figures, calls


def plan_from(*argv: str):
    return make_plan(build_parser().parse_args(["run", *argv]))


def bare(demo_dataset_root, tmp_path) -> list[str]:
    return ["--dataset", "demo", "--data-root", str(demo_dataset_root), "--runs-root", str(tmp_path)]


def test_a_bare_demo_run_trains_first_for_the_calibrated_epochs(machine, demo_dataset_root, tmp_path, capsys):
    figures, calls = machine
    plan = plan_from(*bare(demo_dataset_root, tmp_path))
    # 4 categories on 2 slots of 1 CPU: 2 rounds, calibrated with a trial's 1 thread
    expected = choose(FIRST, QUICK, train_images=48, test_images=30, rounds=2)
    assert plan.profile == expected.profile and plan.gpus_per_trial == 0.0
    assert plan.milestones == expected.profile.milestones()
    assert calls == [(FIRST_RUN_PROFILE, "cpu", 1)]
    out = capsys.readouterr().out
    assert f"[run] no GPU on this machine: {expected.describe()} (--profile paper to insist)" in out
    # the calibration cache answers the second run: the same choice
    assert plan_from(*bare(demo_dataset_root, tmp_path / "again")).profile == plan.profile


def test_profile_and_epochs_win_over_the_calibration(machine, demo_dataset_root, tmp_path, capsys):
    figures, calls = machine
    assert plan_from(*bare(demo_dataset_root, tmp_path), "--profile", "cpu").profile == PROFILES["cpu"]
    plan = plan_from(*bare(demo_dataset_root, tmp_path), "--epochs", "7")
    assert plan.profile == FIRST.with_epochs(7) and calls == []
    assert "the quick profile 'first' for --epochs 7" in capsys.readouterr().out


def test_resume_keeps_the_stored_profile_when_the_calibration_changed(
    machine, demo_dataset_root, tmp_path, capsys
):
    figures, calls = machine
    started = plan_from(*bare(demo_dataset_root, tmp_path))
    create_run(started)
    figures[0] = SLOW  # the machine got slower (or busier): a fresh run would choose the floor
    assert plan_from(*bare(demo_dataset_root, tmp_path / "fresh")).profile == FIRST
    resumed = plan_from(*bare(demo_dataset_root, tmp_path), "--resume")
    assert resumed.profile == started.profile != FIRST and len(calls) == 2
    check_start(resumed, resume=True)  # the same plan: it may continue
    assert f"continues the quick profile 'first' as the run started it: {started.profile.epochs} epochs" in (
        capsys.readouterr().out
    )


def test_the_realistic_demo_keeps_small(machine, tmp_path, capsys):
    root = tmp_path / "data"
    (root / "cork" / "train" / "good").mkdir(parents=True)
    argv = [
        "--dataset",
        "demo_real",
        "--data-root",
        str(root),
        "--category",
        "cork",
        "--runs-root",
        str(tmp_path),
    ]
    assert plan_from(*argv).profile == PROFILES["small"] and machine[1] == []
    assert "the demo runs the quick profile 'small' instead of the space's 'paper'" in capsys.readouterr().out


def test_native_bf16_honours_onednn_max_cpu_isa(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    cpu = torch.device("cpu")
    assert native_bf16(cpu)
    for limit in ("AVX2", "avx2", "AVX512_CORE_VNNI"):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", limit)
        assert not native_bf16(cpu)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert native_bf16(cpu)
