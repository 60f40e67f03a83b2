"""`--seeds K`: K training runs per category as separate trials, selection by the mean over seeds, the tables
and the report with mean ± std."""

import csv
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch
from test_search import plan_for, run_args, write_space

from tfsearch.cli import build_parser, main
from tfsearch.errors import InputError
from tfsearch.maps.cache import read_map_set
from tfsearch.maps.fusion import fuse
from tfsearch.maps.metrics import METRIC_NAMES, GroundTruth, evaluate
from tfsearch.run.pipeline import execute
from tfsearch.run.plan import make_plan, seeded_model, split_seed
from tfsearch.run.selection.candidates import Candidate
from tfsearch.run.space import load_space
from tfsearch.run.start import start_run
from tfsearch.run.training.callbacks import CategoryTrained
from tfsearch.store.run_folder import SELECTED_COLUMNS, TRIAL_COLUMNS, selected_columns, trial_columns
from tfsearch.transfusion.job import MODEL_FILE, TrainDir


def read_rows(path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------ fast checks
@pytest.mark.parametrize("seeds", [0, -2, "two", True, 1.5])
def test_space_seeds_key_is_validated(tmp_path, seeds):
    path = write_space(tmp_path, seeds=seeds)
    with pytest.raises(InputError, match=rf"{path}: seeds: expected a positive integer"):
        load_space(str(path))


def test_seeds_from_the_space_or_the_flag(tmp_path, demo_dataset_root):
    space = write_space(tmp_path, name="three", seeds=3)
    args = run_args(space, tmp_path / "runs", demo_dataset_root, "from-space", "--categories", "stripes")
    plan = make_plan(build_parser().parse_args(args))
    base = plan.profile.seed
    assert plan.seeds == 3 and plan.training_seeds == [base, base + 1, base + 2]
    assert plan.describe()["seeds"] == 3
    # --seeds overrides the key; one seed keeps the profile's own seed, its folder and its plan as before
    plan = plan_for(tmp_path, demo_dataset_root, "flag", "stripes", "--seeds", "1")
    assert plan.seeds == 1 and plan.training_seeds == [None] and "seeds" not in plan.describe()
    assert trial_columns(1) == TRIAL_COLUMNS and selected_columns(1) == SELECTED_COLUMNS
    assert trial_columns(2)[-1] == "seed"
    assert {"seeds", "selected_test_image_auroc_std", "default_selection_value_std"} <= set(
        selected_columns(2)
    )


def test_seeds_flag_errors_name_the_flag(tmp_path, demo_dataset_root, capsys):
    space = write_space(tmp_path)
    args = run_args(space, tmp_path / "runs", demo_dataset_root, "bad", "--categories", "stripes")
    assert main([*args, "--seeds", "0"]) == 2
    assert "--seeds 0: expected a positive number" in capsys.readouterr().err
    training = write_space(
        tmp_path, name="trained", training={"samples": 2, "params": {"lr": {"choices": [0.001, 0.002]}}}
    )
    args = run_args(training, tmp_path / "runs", demo_dataset_root, "bad", "--categories", "stripes")
    assert main([*args, "--seeds", "2"]) == 2
    assert "--seeds 2" in capsys.readouterr().err


def test_seeded_folder_names_read_back():
    assert seeded_model("default", None) == "default"
    assert seeded_model("default", 4) == "default-seed=4"
    for model, seed in (("default", 4), ("lr=1e-05-base_channels=8", 12), ("default", None)):
        assert split_seed(seeded_model(model, seed)) == (model, seed)


def test_a_category_is_trained_once_all_its_seeds_completed():
    told = []
    callback = CategoryTrained(told.append, per_category=2)
    trial = lambda category, trial_id: SimpleNamespace(config={"category": category}, trial_id=trial_id)  # noqa: E731
    callback.on_trial_complete(0, [], trial("disk", "a"))
    callback.on_trial_complete(0, [], trial("stripes", "b"))
    assert told == []
    callback.on_trial_complete(0, [], trial("disk", "a"))  # the same trial again counts once
    assert told == []
    callback.on_trial_complete(0, [], trial("disk", "c"))
    assert told == ["disk"]


def test_export_refuses_a_run_of_several_seeds(tmp_path):
    from tfsearch.deploy.selected import read_selected
    from tfsearch.store.run_folder import write_csv

    row = {"dataset": "demo", "category": "stripes", "status": "ok", "seeds": 2, "selected_model": "default"}
    write_csv(tmp_path / "selected.csv", selected_columns(2), [row])
    with pytest.raises(InputError, match=r"several seeds per category \(--seeds\).*not supported yet"):
        read_selected(tmp_path)


# ------------------------------------------------------------------------------------------ a real run
def brute_force(plan, seed, config: Candidate) -> dict[str, float]:
    """Every metric of `config` on one seed's cached test maps, recomputed from the maps."""
    folder = TrainDir(plan.train_dir("stripes", seeded_model(config.model, seed))).maps(config.epoch, "test")
    maps = read_map_set(folder)
    fused = fuse(maps.m_disc, maps.m_recon, config.lam, config.kernel)
    return evaluate(GroundTruth.from_masks(np.asarray(maps.masks)), fused)


def test_two_seeds_select_by_the_mean_and_report_mean_and_std(tmp_path, demo_dataset_root, ray_instance):
    plan = plan_for(tmp_path, demo_dataset_root, "seeds", "stripes", "--seeds", "2")
    (row,) = execute(plan)
    seeds = plan.training_seeds
    assert seeds == [plan.profile.seed, plan.profile.seed + 1]

    # one training run per seed, in folders of their own, trained with their own seed: different weights
    weights = []
    for seed in seeds:
        folder = TrainDir(plan.train_dir("stripes", f"default-seed={seed}"))
        assert folder.load_job().profile.seed == seed
        assert folder.map_epochs("test") == [1, 2]
        weights.append(torch.load(folder.checkpoint(2) / MODEL_FILE, weights_only=True)["model"])
    assert not plan.train_dir("stripes", "default").exists()
    assert weights[0].keys() == weights[1].keys()
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    # trials.csv: a training row per seed and milestone, carrying its seed
    rows = read_rows(plan.run_dir / "trials.csv")
    train = [r for r in rows if r["stage"] == "train"]
    assert sorted((r["seed"], r["model"], r["epoch"]) for r in train) == [
        (str(s), f"default-seed={s}", str(e)) for s in seeds for e in (1, 2)
    ]

    # the study's objective is the mean over the seeds, recomputed by brute force from the cached maps
    study = optuna.load_study(
        study_name="tiny/demo/stripes", storage=f"sqlite:///{plan.run_dir / 'studies.db'}"
    )
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 6
    for trial in complete:
        config = Candidate(**{k: trial.user_attrs[k] for k in ("model", "epoch", "lam", "kernel")})
        assert config.model == "default"
        per_seed = [brute_force(plan, seed, config)["image_auroc"] for seed in seeds]
        assert trial.value == pytest.approx(np.mean(per_seed), abs=1e-12)

    # selected.csv: the mean and the sample standard deviation over the seeds of each configuration
    assert row["seeds"] == 2 and row["status"] == "ok"
    for prefix in ("default", "selected"):
        config = Candidate(*(row[f"{prefix}_{k}"] for k in ("model", "epoch", "lam", "kernel")))
        per_seed = [brute_force(plan, seed, config) for seed in seeds]
        for metric in METRIC_NAMES:
            values = [m[metric] for m in per_seed]
            assert row[f"{prefix}_test_{metric}"] == pytest.approx(np.mean(values), abs=1e-12)
            assert row[f"{prefix}_test_{metric}_std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        assert row[f"{prefix}_selection_value"] == row[f"{prefix}_test_image_auroc"]  # the oracle protocol
    written = read_rows(plan.run_dir / "selected.csv")[0]
    assert float(written["selected_test_image_auroc_std"]) == row["selected_test_image_auroc_std"]
    assert written["seeds"] == "2"

    # the report shows mean ± std
    table = (plan.run_dir / "report" / "tables" / "seeds_seeds.md").read_text()
    mean, std = row["selected_test_image_auroc"] * 100, row["selected_test_image_auroc_std"] * 100
    assert f"{mean:.2f} ± {std:.2f}" in table
    assert f"{mean:.2f} ± {std:.2f}" in (plan.run_dir / "report" / "report.md").read_text()

    # resuming with another number of seeds is refused, naming the flag
    other = plan_for(tmp_path, demo_dataset_root, "seeds", "stripes", "--seeds", "3")
    with pytest.raises(InputError, match=r"seeds: the run has 2, this command 3"):
        start_run(other, resume=True)
