"""`--patience K`: a category's training stops once its selection metric, at the best λ and n of each
milestone, has not improved for K milestones; everything after treats it as finished."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from test_search import TINY

from tfsearch.cli import build_parser, main
from tfsearch.errors import InputError
from tfsearch.maps.cache import MapSet, write_map_set
from tfsearch.maps.fusion import fuse
from tfsearch.maps.metrics import GroundTruth, evaluate, seg_f1, segmentation_threshold
from tfsearch.run.pipeline import execute
from tfsearch.run.plan import make_plan
from tfsearch.run.selection.stage import study_spec
from tfsearch.run.selection.study import run_study
from tfsearch.run.space import load_space
from tfsearch.run.start import start_run
from tfsearch.run.training.early_stop import StopDecision, milestone_best, stop_decision

NAN = math.nan


def series(*values: float) -> list[tuple[int, float]]:
    """(epoch, value) per milestone, a milestone every epoch."""
    return list(enumerate(values, start=1))


# ------------------------------------------------------------------------------------------ the rule
def test_the_rule_stops_exactly_after_k_milestones_without_improvement():
    for k in (1, 2, 3):
        flat = series(0.5, 0.9, *[0.8] * k, 0.95)
        assert stop_decision(flat, k, last_epoch=20) == StopDecision(2 + k, 2, 0.9, k, 20)
        assert stop_decision(flat[: 1 + k], k, last_epoch=20) is None  # one milestone short of K
    assert stop_decision(series(0.5, 0.4, 0.3), 2, last_epoch=10).epochs_not_trained == 7


def test_an_improvement_resets_the_count_and_a_tie_does_not_improve():
    resets = series(0.5, 0.6, 0.6, 0.7, 0.7, 0.8, 0.8)
    assert stop_decision(resets, 2, last_epoch=10) is None
    ties = series(0.5, 0.5, 0.5)
    assert stop_decision(ties, 2, last_epoch=10) == StopDecision(3, 1, 0.5, 2, 10)
    # only strictly greater improves: a value a hair above the best does
    assert stop_decision(series(0.5, 0.5, 0.5 + 1e-12, 0.5), 2, last_epoch=10) is None


def test_nan_never_improves_and_milestones_before_the_first_value_do_not_count():
    assert stop_decision(series(NAN, NAN, NAN, NAN), 1, last_epoch=10) is None
    assert stop_decision(series(NAN, NAN, 0.5, NAN, 0.4), 2, last_epoch=10) == StopDecision(5, 3, 0.5, 2, 10)
    assert stop_decision(series(0.5, NAN), 1, last_epoch=10) == StopDecision(2, 1, 0.5, 1, 10)


def test_patience_zero_never_stops_nor_does_a_stop_at_the_last_milestone():
    assert stop_decision(series(0.9, 0.1, 0.1, 0.1), 0, last_epoch=10) is None
    assert stop_decision(series(0.9, 0.1, 0.1), 2, last_epoch=3) is None  # nothing left to save
    assert stop_decision(series(0.9, 0.1, 0.1), 2, last_epoch=4).epoch == 3


def test_a_milestones_best_is_the_exact_best_over_the_spaces_lambda_and_n(tmp_path):
    rng = np.random.default_rng(0)
    masks = np.zeros((12, 16, 16), bool)
    masks[6:, 4:9, 5:10] = True
    m_disc = rng.random((12, 16, 16), dtype=np.float32) + masks * rng.random((12, 1, 1), dtype=np.float32)
    m_recon = rng.random((12, 16, 16), dtype=np.float32) + masks * 0.3
    labels = masks.any(axis=(1, 2)).astype(np.int8)
    ids = [f"{i:03d}" for i in range(12)]
    meta = {"dataset": "demo", "category": "c", "epoch": 1, "split": "test", "image_size": 16}
    meta |= {"data_root": None, "mask_paths": [None] * 12}
    write_map_set(tmp_path / "maps", MapSet(m_disc, m_recon, masks, labels, ids, meta))
    lams, kernels = (0.0, 0.25, 0.5, 0.75, 1.0), (1, 3, 5)
    truth = GroundTruth.from_masks(masks)
    for metric in ("image_auroc", "pixel_ap"):
        every = {
            (lam, n): evaluate(truth, fuse(m_disc, m_recon, lam, n))[metric] for n in kernels for lam in lams
        }
        value, lam, kernel, sigmas = milestone_best(tmp_path / "maps", metric, lams, kernels)
        assert value == pytest.approx(max(every.values()), abs=1e-12)
        assert every[lam, kernel] == pytest.approx(value, abs=1e-12) and sigmas == 3.0
    # SegF1 with its threshold's k searched too (these maps have no validation maps: their own normal images)
    normal = ~masks.any(axis=(1, 2))
    every = {}
    for n in kernels:
        for lam in lams:
            fused = fuse(m_disc, m_recon, lam, n)
            for k in (1.0, 2.0, 3.0):
                every[lam, n, k] = seg_f1(truth, fused, segmentation_threshold(fused, normal, k))
    value, lam, kernel, sigmas = milestone_best(tmp_path / "maps", "seg_f1", lams, kernels, (1.0, 2.0, 3.0))
    assert value == pytest.approx(max(every.values()), abs=1e-12)
    assert every[lam, kernel, sigmas] == pytest.approx(value, abs=1e-12)
    assert (
        len({k for k in (1.0, 2.0, 3.0) if max(v for key, v in every.items() if key[2] == k) == value}) == 1
    )


# ------------------------------------------------------------------------------------------ bad input
def test_a_bad_patience_key_or_flag_is_an_error_naming_it(tmp_path, capsys):
    for bad in (-1, "two", True):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**space_payload(), "patience": bad}))
        with pytest.raises(InputError, match=rf"{path}.*patience"):
            load_space(path)
    argv = ["run", "--space", str(path), "--dataset", "demo", "--wandb", "disabled", "--quiet"]
    assert main([*argv, "--runs-root", str(tmp_path / "runs")]) == 2
    assert "patience" in capsys.readouterr().err
    good = write_space(tmp_path)
    argv = ["run", "--space", str(good), "--dataset", "demo", "--runs-root", str(tmp_path / "runs")]
    assert main([*argv, "--patience", "-1", "--wandb", "disabled", "--quiet"]) == 2
    assert "--patience -1" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    # a stopped category must keep a candidate epoch: only `epoch: milestones` guarantees one
    assert (
        main(
            [
                "run",
                "--space",
                "single",
                "--dataset",
                "demo",
                "--patience",
                "2",
                "--profile",
                "cpu",
                "--runs-root",
                str(tmp_path / "runs"),
                "--wandb",
                "disabled",
                "--quiet",
            ]
        )
        == 2
    )
    assert "params.epoch: milestones" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------ a run
def space_payload(**changes) -> dict:
    payload = {
        **TINY,
        "name": "patient",
        "description": "a tiny per-class space with early stopping",
        "profile_overrides": {**TINY["profile_overrides"], "epochs": 6},
        "patience": 2,
        "selection": {"metric": "image_auroc", "sampler": "exhaustive", "lam_points": 3, "seed": 0},
        "params": {"epoch": "milestones", "lam": {"low": 0.5, "high": 1.0}, "kernel": {"choices": [1, 3]}},
    }
    return {**payload, **changes}


def write_space(folder: Path, **changes) -> Path:
    path = folder / "patient.yaml"
    path.write_text(yaml.safe_dump(space_payload(**changes), allow_unicode=True))
    return path


# the scripted best value of each milestone: disk has not improved for 2 milestones at epoch 4 (a tie at 3,
# a drop at 4); stripes improves every other milestone and trains to epoch 6
SCRIPT = {"disk": [0.5, 0.7, 0.7, 0.6, 0.9, 0.9], "stripes": [0.5, 0.6, 0.6, 0.7, 0.7, 0.8]}


def scripted_trainable(script: dict[str, list[float]]):
    """The real trainable with each milestone's best value scripted per category, patched on the Ray
    worker for the trial's duration (a closure: Ray ships it by value, the test module is not importable
    there)."""

    def scripted(config: dict, settings) -> None:
        from tfsearch.run.training import trainable

        values = script[config["category"]]

        def best(maps_dir, metric, lam_values, kernel_values, sigma_values):
            value = values[int(Path(maps_dir).name.split("-")[1]) - 1]
            return value, lam_values[0], kernel_values[0], sigma_values[0]

        real = trainable.milestone_best
        trainable.milestone_best = best
        try:
            trainable.train_category(config, settings)
        finally:
            trainable.milestone_best = real

    return scripted


def read_rows(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def files(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_a_category_stops_early_and_everything_after_treats_it_as_finished(
    tmp_path, demo_dataset_root, ray_instance, capsys
):
    space = write_space(tmp_path)
    argv = ["run", "--space", str(space), "--dataset", "demo", "--data-root", str(demo_dataset_root)]
    argv += ["--runs-root", str(tmp_path / "runs"), "--name", "p", "--categories", "disk,stripes"]
    argv += ["--wandb", "disabled", "--quiet"]
    plan = make_plan(build_parser().parse_args(argv))
    assert plan.patience == 2 and plan.describe()["patience"] == 2
    assert plan.trial_settings().lam_values == (0.5, 0.75, 1.0)
    assert plan.trial_settings().kernel_values == (1, 3)
    rows = {r["category"]: r for r in execute(plan, trainable=scripted_trainable(SCRIPT))}

    disk, stripes = plan.train_dir("disk", "default"), plan.train_dir("stripes", "default")
    stop = json.loads((disk / "early_stop.json").read_text())
    assert {k: stop[k] for k in ("epoch", "best_epoch", "best_value", "patience", "epochs_not_trained")} == {
        "epoch": 4,
        "best_epoch": 2,
        "best_value": 0.7,
        "patience": 2,
        "epochs_not_trained": 2,
    }
    assert not (stripes / "early_stop.json").exists()
    assert [r["epoch"] for r in json.loads((disk / "milestones.json").read_text())] == [1, 2, 3, 4]
    assert [int(r["epoch"]) for r in read_rows(disk / "history.csv")] == [1, 2, 3, 4]
    assert [int(r["epoch"]) for r in read_rows(stripes / "history.csv")] == [1, 2, 3, 4, 5, 6]

    # selection offered the milestones each category reached: every (epoch, λ, n) of the exhaustive grid
    chosen = read_rows(plan.run_dir / "trials.csv")
    offered = {
        c: {int(r["epoch"]) for r in chosen if r["stage"] == "select" and r["category"] == c} for c in SCRIPT
    }
    assert offered == {"disk": {1, 2, 3, 4}, "stripes": {1, 2, 3, 4, 5, 6}}
    assert len([r for r in chosen if r["stage"] == "select" and r["category"] == "disk"]) == 4 * 3 * 2
    assert rows["disk"]["default_epoch"] == 4 and rows["disk"]["selected_epoch"] <= 4
    # ... and so does TPE's categorical over milestones
    spec = study_spec(plan, ["disk"])
    (tmp_path / "tpe").mkdir()
    tpe = write_space(tmp_path / "tpe", selection={"sampler": "tpe", "trials": 3, "seed": 0})
    spec.space = load_space(tpe)
    study = run_study(optuna.storages.InMemoryStorage(), spec)
    assert study.trials[0].distributions["checkpoint"].choices == tuple(f"default@{e}" for e in (1, 2, 3, 4))

    # selected.csv says which category stopped, where, and what it saved
    table = {r["category"]: r for r in read_rows(plan.run_dir / "selected.csv")}
    assert {k: table["disk"][k] for k in ("stopped_early", "stopped_at_epoch", "epochs_not_trained")} == {
        "stopped_early": "1",
        "stopped_at_epoch": "4",
        "epochs_not_trained": "2",
    }
    seconds = [float(r["seconds"]) for r in read_rows(disk / "history.csv")]
    saved = 2 * sum(seconds) / len(seconds) * plan.cpus_per_trial / 3600
    assert float(table["disk"]["device_hours_saved"]) == pytest.approx(saved, rel=1e-9)
    assert {k: table["stripes"][k] for k in ("stopped_early", "stopped_at_epoch", "epochs_not_trained")} == {
        "stopped_early": "0",
        "stopped_at_epoch": "",
        "epochs_not_trained": "0",
    }
    assert float(table["stripes"]["device_hours_saved"]) == 0.0
    assert table["disk"]["status"] == table["stripes"]["status"] == "ok"

    # the report names it, and Tables 3/4 (and 1/2) say they come from a run with early stopping
    report = (plan.run_dir / "report" / "report.md").read_text()
    note = "Run p trained with early stopping (patience 2): disk at epoch 4 stopped before epoch 6"
    assert note in report
    tables = plan.run_dir / "report" / "tables"
    for key in ("paper_image_auroc_demo", "paper_aupro_demo"):
        assert "early stopping (patience 2)" in (tables / f"{key}.tex").read_text()
        assert note in (tables / f"{key}.md").read_text()
    early = read_rows(tables / "early_stop.csv")
    assert [(r["category"], r["stopped at epoch"], r["epochs not trained"]) for r in early] == [
        ("disk", "4", "2")
    ]

    # --resume with another --patience is refused, naming both values, and changes nothing
    before = {**files(disk), **files(stripes)}
    other = make_plan(build_parser().parse_args([*argv, "--resume", "--patience", "3"]))
    with pytest.raises(InputError, match=r"in \['patience'\]; patience: the run has 2, this command 3\."):
        start_run(other, resume=True)
    assert {**files(disk), **files(stripes)} == before

    # --resume of the stopped run trains nothing more
    resumed = make_plan(build_parser().parse_args([*argv, "--resume"]))
    again = {r["category"]: r for r in execute(resumed, resume=True, trainable=scripted_trainable(SCRIPT))}
    assert {**files(disk), **files(stripes)} == before
    assert (
        again["disk"]["stopped_at_epoch"] == "4"
        and again["disk"]["selected_epoch"] == rows["disk"]["selected_epoch"]
    )

    # a trial cut off between the log of its last milestone and its decision decides the same, and says so
    from tfsearch.run.training.trainable import TrainingFolder, train_in_folder

    (disk / "early_stop.json").unlink()
    capsys.readouterr()
    with TrainingFolder(plan.location.uri, "disk", "default") as folder:
        train_in_folder(folder, "disk", {}, plan.trial_settings())
    assert json.loads((disk / "early_stop.json").read_text()) == stop
    assert [int(r["epoch"]) for r in read_rows(disk / "history.csv")] == [1, 2, 3, 4]
    assert (
        "[train] disk stopped early at epoch 4: image_auroc has not improved for 2 milestones"
        " (best 0.7000 at epoch 2); 2 epochs not trained"
    ) in capsys.readouterr().out
