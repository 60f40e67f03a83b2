"""Selection: exact image scores, exhaustive and grid studies, choices and tie-breaks, importance, W&B."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from conftest import inspect_offline_run

from tfsearch.errors import InputError
from tfsearch.maps.cache import MapSet, write_map_set
from tfsearch.maps.fusion import fuse, image_maxima
from tfsearch.maps.metrics import GroundTruth, auroc, image_auroc, image_scores
from tfsearch.run.selection import candidates as selection
from tfsearch.run.selection import study as study_module
from tfsearch.run.selection.candidates import Candidate, CategoryMaps
from tfsearch.run.selection.log import (
    candidates_frame,
    grid_importance,
    importance_rows,
    log_studies_to_wandb,
)
from tfsearch.run.selection.study import StudySpec, best_candidate, choice_columns, run_study
from tfsearch.run.space import load_space, parse_space
from tfsearch.store.studies import add_finished_trials, open_studies
from tfsearch.transfusion.perlin import perlin_masks, perlin_noise
from tfsearch.transfusion.synthesis import VALIDATION_OPACITY, validation_anomalies

KERNELS = (1, 3, 5, 7)
LAMS = (0.0, 1e-9, 0.25, 0.5, 0.95, 1.0 - 1e-9, 1.0)


def assert_exact(m_disc: np.ndarray, m_recon: np.ndarray, labels: np.ndarray) -> None:
    """Every (n, λ): the kept points give the very image scores and AUROC of `fuse` then max."""
    maxima = image_maxima(m_disc, m_recon, KERNELS)
    masks = np.zeros(m_disc.shape, dtype=bool)
    masks[labels, 0, 0] = True
    truth = GroundTruth.from_masks(masks)
    for kernel in KERNELS:
        for lam in LAMS:
            fused = fuse(m_disc, m_recon, lam, kernel)
            scores = maxima[kernel].scores(lam)
            np.testing.assert_array_equal(scores, image_scores(fused))
            expected = image_auroc(truth, fused)
            assert auroc(labels, scores) == expected or (
                math.isnan(expected) and math.isnan(auroc(labels, scores))
            )


def labels_for(n: int) -> np.ndarray:
    return np.arange(n) % 2 == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_image_scores_equal_brute_force_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    m_disc = rng.random((12, 19, 23)).astype(np.float16)
    m_recon = rng.random((12, 19, 23)).astype(np.float16)
    assert_exact(m_disc, m_recon, labels_for(12))


def test_exact_image_scores_with_ties_constants_and_collinear_points():
    rng = np.random.default_rng(7)
    shape = (10, 16, 16)
    quantised = (rng.integers(0, 3, shape) / 2).astype(np.float16)  # three levels: ties everywhere
    duplicated = np.repeat(rng.random((5, 16, 16)), 2, axis=0).astype(np.float16)  # images tied in pairs
    constant = np.full(shape, 0.25, dtype=np.float16)
    anti = rng.random(shape).astype(np.float32)  # a + b constant: every point on one line
    assert_exact(quantised, quantised[::-1].copy(), labels_for(10))
    assert_exact(duplicated, duplicated[:, ::-1].copy(), labels_for(10))
    assert_exact(constant, constant, labels_for(10))
    assert_exact(constant, quantised, labels_for(10))
    assert_exact(anti, 1.0 - anti, labels_for(10))
    assert_exact(anti - 0.5, (rng.random(shape) - 0.5).astype(np.float32), labels_for(10))  # negative values


def test_exact_image_scores_keep_few_points_and_refuse_nan():
    rng = np.random.default_rng(3)
    m_disc, m_recon = rng.random((2, 6, 64, 64)).astype(np.float16)
    maxima = image_maxima(m_disc, m_recon, (3,))[3]
    assert maxima.points < 6 * 64 * 64 / 50  # a handful per image, not every pixel
    m_disc[2, 5, 5] = np.nan
    with pytest.raises(InputError, match="NaN or inf"):
        image_maxima(m_disc, m_recon, (3,))


# ------------------------------------------------------------------------------------------ spaces
def space_file(tmp_path: Path, **selection) -> Path:
    payload = {
        "name": "s",
        "scope": "per_class",
        "profile": "cpu",
        "selection": {"metric": "image_auroc", **selection},
        "params": {"epoch": "milestones", "lam": {"low": 0.5, "high": 1.0}, "kernel": {"choices": [1, 3]}},
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(payload))
    return path


def test_tpe_without_trials_and_grid_with_trials_are_refused(tmp_path):
    with pytest.raises(InputError) as error:
        load_space(str(space_file(tmp_path, sampler="tpe")))
    assert "s.yaml: selection.trials: sampler: tpe needs the number of trials" in str(error.value)
    with pytest.raises(InputError, match="selection.trials: not allowed with sampler: exhaustive"):
        load_space(str(space_file(tmp_path, sampler="exhaustive", trials=10)))
    with pytest.raises(InputError, match="selection.lam_points"):
        load_space(str(space_file(tmp_path, sampler="exhaustive", lam_points=1)))


def test_builtin_epochs_only_space_varies_the_epoch_alone():
    space = load_space("per_class_epochs")
    assert (space.sampler, space.scope, space.metric) == ("exhaustive", "per_class", "image_auroc")
    assert space.values("lam", 0.95) == (0.95,) and space.values("kernel", 7) == (7,)
    assert space.epoch_choices((10, 20, 30)) == (10, 20, 30)
    lams = load_space("per_class").values("lam", 0.95)
    assert len(lams) == 51 and lams[0] == 0.5 and 0.85 in lams and 0.95 in lams and lams[-1] == 1.0


# ------------------------------------------------------------------------------------------ studies
EPOCHS = (10, 20, 30)
EPOCHS_ONLY = {"epoch": "milestones", "lam": 0.95, "kernel": 3}
# 3 milestones x 3 λ x 2 n
SMALL_GRID = {
    "selection": {"sampler": "exhaustive", "lam_points": 3},
    "params": {"epoch": "milestones", "lam": {"low": 0.5, "high": 1.0}, "kernel": {"choices": [1, 3]}},
}


def write_milestones(root: Path, signal: dict[int, float], n: int = 8, size: int = 12) -> dict:
    """Map sets of one category at each epoch; anomalous images carry a blob of strength signal[epoch]."""
    rng = np.random.default_rng(0)
    masks = np.zeros((n, size, size), dtype=bool)
    masks[1::2, 3:6, 4:8] = True
    dirs = {}
    for epoch, strength in signal.items():
        noise = rng.random((2, n, size, size)) * 0.5
        m_disc = noise[0] + strength * masks
        m_recon = noise[1] + 0.5 * strength * masks
        maps = MapSet(
            m_disc, m_recon, masks, masks.any((1, 2)).astype(np.int8), [f"im{i}" for i in range(n)],
            {"dataset": "t", "category": "c", "epoch": epoch, "split": "test", "image_size": size,
             "data_root": None, "mask_paths": [None] * n},
        )  # fmt: skip
        write_map_set(root / f"epoch-{epoch}", maps)
        dirs["default", epoch] = root / f"epoch-{epoch}"
    return dirs


def study_plan(tmp_path, payload: dict, signal: dict[int, float], tie_break: str | None = None) -> StudySpec:
    space = parse_space({"name": "t", "profile": "cpu", **payload}, "t.yaml")
    dirs = write_milestones(tmp_path / "maps", signal)
    checkpoints = sorted(dirs)
    candidates = {"c": CategoryMaps(dirs, space.values("kernel", 3))}
    default = Candidate("default", max(signal), 0.95, 3)
    return StudySpec("t/c", space, candidates, checkpoints, default, tie_break)


def test_exhaustive_study_evaluates_every_candidate_once(tmp_path):
    plan = study_plan(tmp_path, SMALL_GRID, {10: 0.1, 20: 0.3, 30: 0.2})
    storage = optuna.storages.InMemoryStorage()
    study = run_study(storage, plan)
    frame = candidates_frame(study)
    assert len(frame) == 3 * 3 * 2
    assert sorted(set(frame["lam"])) == [0.5, 0.75, 1.0] and sorted(set(frame["epoch"])) == list(EPOCHS)
    assert {tuple(r) for r in frame[["epoch", "lam", "kernel"]].to_numpy()} == {
        (e, lam, k) for e in EPOCHS for lam in (0.5, 0.75, 1.0) for k in (1, 3)
    }
    # candidates record the selection metric only; their value is the exact image AUROC of fuse then max
    trial = study.trials[5]
    assert set(trial.user_attrs["metrics"]["c"]) == {"image_auroc"}
    config = Candidate(
        "default", trial.user_attrs["epoch"], trial.user_attrs["lam"], trial.user_attrs["kernel"]
    )
    assert trial.value == plan.maps["c"].evaluate(config)["image_auroc"]
    assert study.trials[0].params == {"checkpoint": "default@10", "lam": 0.5, "kernel": 1}
    assert run_study(storage, plan).trials == study.trials  # resumed: nothing added twice


def test_worker_processes_reduce_the_milestones_as_this_process_does(tmp_path, monkeypatch):
    plan = study_plan(tmp_path, SMALL_GRID, {10: 0.1, 20: 0.3, 30: 0.2})
    candidates, checkpoints = plan.maps["c"], plan.checkpoints
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # two CPUs, however many this machine has
    candidates.prepare_maxima(checkpoints)  # maps this small stay in this process
    assert not candidates._maxima
    monkeypatch.setattr(selection, "WORKER_MIN_PIXELS", 0)
    candidates.prepare_maxima(checkpoints)
    assert sorted(candidates._maxima) == checkpoints
    in_process = CategoryMaps(candidates.maps_dirs, candidates.kernels)
    for model, epoch in checkpoints:
        for kernel in (1, 3):
            for lam in (0.0, 0.5, 0.95, 1.0):
                expected = in_process.maxima(model, epoch, kernel).scores(lam)
                assert np.array_equal(candidates.maxima(model, epoch, kernel).scores(lam), expected)
    # a milestone of other images is refused, naming its folder
    dirs = dict(candidates.maps_dirs)
    dirs["default", 40] = write_milestones(tmp_path / "other", {40: 0.1}, n=6)["default", 40]
    with pytest.raises(InputError, match="other/epoch-40: its images differ"):
        CategoryMaps(dirs, (1, 3)).prepare_maxima(sorted(dirs))


def test_bulk_trials_in_sqlite_are_the_records_add_trials_makes(tmp_path):
    choices = optuna.distributions.CategoricalDistribution(["a@1", "a@2"])
    trials = [
        optuna.trial.create_trial(
            params={"checkpoint": name}, distributions={"checkpoint": choices}, value=value,
            state=optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.FAIL,
            user_attrs={"metrics": {"c": {"image_auroc": value}}, "lam": 0.5}, system_attrs={"s": [1, 2]},
            intermediate_values={0: 0.25},
        )
        for name, value in (("a@1", 0.5), ("a@2", None), ("a@1", -math.inf))
    ]  # fmt: skip
    storage = open_studies(tmp_path / "studies.db")
    one_by_one = optuna.create_study(study_name="one", storage=storage, direction="maximize")
    bulk = optuna.create_study(study_name="bulk", storage=storage, direction="maximize")
    one_by_one.add_trials(trials + trials)
    assert add_finished_trials(storage, bulk, trials) == range(3)
    assert add_finished_trials(storage, bulk, trials) == range(3, 6)  # numbered after the study's trials

    def record(trial):
        return {k: v for k, v in vars(trial).items() if k != "_trial_id"}

    reopened = open_studies(tmp_path / "studies.db")
    written = [optuna.load_study(study_name=n, storage=reopened).trials for n in ("one", "bulk")]
    assert [record(t) for t in written[1]] == [record(t) for t in written[0]]
    other = optuna.trial.create_trial(
        params={"checkpoint": "a@3"},
        distributions={"checkpoint": optuna.distributions.CategoricalDistribution(["a@3"])},
        value=1.0,
    )
    with pytest.raises(ValueError, match="does not support dynamic value space"):
        add_finished_trials(storage, bulk, [other])  # as add_trials refuses a changed distribution
    assert len(bulk.trials) == 6


def test_exhaustive_study_in_sqlite_resumes_after_a_kill_without_loss_or_duplicates(tmp_path, monkeypatch):
    plan = study_plan(tmp_path, SMALL_GRID, {10: 0.1, 20: 0.3, 30: 0.2})
    expected = run_study(optuna.storages.InMemoryStorage(), plan)
    monkeypatch.setattr(study_module, "BULK", 4)
    writes = []

    def killed_at_the_third_write(storage, study, trials):
        if len(writes) == 2:
            raise KeyboardInterrupt
        writes.append(len(trials))
        return add_finished_trials(storage, study, trials)

    monkeypatch.setattr(study_module, "add_finished_trials", killed_at_the_third_write)
    with pytest.raises(KeyboardInterrupt):
        run_study(open_studies(tmp_path / "studies.db"), plan)
    monkeypatch.setattr(study_module, "add_finished_trials", add_finished_trials)
    assert len(optuna.load_study(study_name="t/c", storage=open_studies(tmp_path / "studies.db")).trials) == 8
    study = run_study(open_studies(tmp_path / "studies.db"), plan)
    trials = optuna.load_study(study_name="t/c", storage=open_studies(tmp_path / "studies.db")).trials
    assert [t.number for t in trials] == list(range(18))

    def record(trial):
        return trial.params, trial.value, trial.state, trial.user_attrs

    assert [record(t) for t in trials] == [record(t) for t in expected.trials]
    assert study.user_attrs["choice"] == expected.user_attrs["choice"]


def test_epochs_only_study_picks_the_brute_force_best_milestone(tmp_path):
    payload = {
        "selection": {"sampler": "exhaustive"},
        "params": {"epoch": "milestones", "lam": 0.95, "kernel": 3},
    }
    plan = study_plan(tmp_path, payload, {10: 0.05, 20: 0.4, 30: 0.1})
    study = run_study(optuna.storages.InMemoryStorage(), plan)
    assert [t.params for t in study.trials] == [{"checkpoint": f"default@{e}"} for e in EPOCHS]
    candidates = plan.maps["c"]
    brute = {e: candidates.evaluate(Candidate("default", e, 0.95, 3))["image_auroc"] for e in EPOCHS}
    chosen, choice = best_candidate(study, plan.default)
    assert brute[chosen.epoch] == max(brute.values())
    assert brute[20] > brute[30]  # the data make a milestone other than the default's the best
    assert chosen.epoch == 20 and choice["tied"] == 1 and not choice["undecided"]


def test_ties_are_broken_by_pixel_ap_only_when_asked(tmp_path):
    payload = {
        "selection": {"sampler": "exhaustive"},
        "params": {"epoch": "milestones", "lam": 0.95, "kernel": 3},
    }
    signal = {10: 0.6, 20: 0.9, 30: 0.7}  # every milestone separates the images perfectly: AUROC 1.0
    plan = study_plan(tmp_path / "a", payload, signal)
    chosen, choice = best_candidate(run_study(optuna.storages.InMemoryStorage(), plan), plan.default)
    # 3 candidates at 1.0, the default (epoch 30) among them: counted once
    assert chosen == plan.default and choice["tied"] == 3
    assert choice_columns(choice) == {"tied_at_best": 3, "tie_break_metric": "", "cannot_rank": True}

    plan = study_plan(tmp_path / "b", payload, signal, tie_break="pixel_ap")
    chosen, choice = best_candidate(run_study(optuna.storages.InMemoryStorage(), plan), plan.default)
    pixel_ap = {e: plan.maps["c"].evaluate(Candidate("default", e, 0.95, 3))["pixel_ap"] for e in EPOCHS}
    assert chosen.epoch == max(pixel_ap, key=pixel_ap.get) == 20
    assert choice_columns(choice) == {"tied_at_best": 3, "tie_break_metric": "pixel_ap", "cannot_rank": False}


def test_tpe_study_runs_its_trials_and_records_only_the_objective(tmp_path):
    payload = {
        "selection": {"sampler": "tpe", "trials": 5, "seed": 0},
        "params": {"epoch": "milestones", "lam": {"low": 0.5, "high": 1.0}, "kernel": {"choices": [1, 3]}},
    }
    plan = study_plan(tmp_path, payload, {10: 0.1, 20: 0.3, 30: 0.2})
    study = run_study(optuna.storages.InMemoryStorage(), plan)
    assert len(study.trials) == 5
    assert study.trials[0].params == {"checkpoint": "default@30", "lam": 0.95, "kernel": 3}  # the default
    assert all(set(t.user_attrs["metrics"]["c"]) == {"image_auroc"} for t in study.trials)
    rows = importance_rows("t", {"c": study}, enumerated=False)
    assert {r["method"] for r in rows} == {"optuna_fanova"}
    parameters = {r["parameter"] for r in rows if r["scope"] == "c"}
    assert "epoch" in parameters and parameters <= {"epoch", "lam", "kernel"}


# ------------------------------------------------------------------------------------ importance, W&B
def test_grid_importance_is_the_main_effect_share_of_the_variance():
    import pandas as pd

    grid = [(e, lam, k) for e in (1, 2, 3) for lam in (0.5, 1.0) for k in (1, 3)]
    frame = pd.DataFrame(grid, columns=["epoch", "lam", "kernel"]).assign(model="default")
    frame["value"] = frame["epoch"] * 0.1 + (frame["kernel"] == 3) * 0.05
    shares = grid_importance(frame)
    assert set(shares) == {"epoch", "lam", "kernel"} and shares["lam"] == pytest.approx(0, abs=1e-12)
    # no interaction: the main effects explain everything; epoch's variance 0.02/3, kernel's 0.025²
    assert shares["epoch"] + shares["kernel"] == pytest.approx(1.0)
    assert shares["epoch"] == pytest.approx((0.02 / 3) / (0.02 / 3 + 0.025**2))
    assert math.isnan(grid_importance(frame.assign(value=0.5))["epoch"])  # nothing varies: undefined


def test_importance_rows_and_wandb_table_of_a_study(tmp_path, monkeypatch):
    payload = {
        "selection": {"sampler": "exhaustive", "lam_points": 2},
        "params": {"epoch": "milestones", "lam": {"low": 0.5, "high": 1.0}, "kernel": {"choices": [1, 3]}},
    }
    plan = study_plan(tmp_path, payload, {10: 0.1, 20: 0.3, 30: 0.2})
    study = run_study(optuna.storages.InMemoryStorage(), plan)
    rows = importance_rows("t", {"c": study}, enumerated=True)
    assert {(r["scope"], r["parameter"]) for r in rows} == {
        (s, p) for s in ("c", "all") for p in ("epoch", "lam", "kernel")
    }
    assert {r["method"] for r in rows} == {"grid_variance"}
    monkeypatch.setenv("WANDB_MODE", "offline")
    log_studies_to_wandb({"c": study}, tmp_path / "run", "grp", "offline", None, None)
    (folder,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    summary = inspect_offline_run(folder)
    assert summary["config"]["study"] == "t/c"
    assert summary["summary"]["candidates_count"] == 12 and summary["summary"]["tied_at_best"] >= 1


# ------------------------------------------------------------------------------------------ validation
def test_validation_anomalies_are_smaller_and_fainter_than_training_ones():
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(16, 3, 32, 32, generator=generator) * 2 - 1
    foreground = torch.ones(16, 1, 32, 32)
    defective, mask = validation_anomalies(x0, foreground, torch.Generator().manual_seed(1))
    training_area = perlin_masks(
        perlin_noise(16, 32, device="cpu", generator=torch.Generator().manual_seed(1))
    )
    assert mask.mean() < training_area.mean()
    assert torch.equal(defective[(mask == 0).expand_as(x0)], x0[(mask == 0).expand_as(x0)])
    # inside the mask each image moved at most the largest opacity of the way to its source (|x| <= 1)
    assert (defective - x0).abs().max() <= VALIDATION_OPACITY[1] * 2 + 1e-6
    again, _ = validation_anomalies(x0, foreground, torch.Generator().manual_seed(1))
    assert torch.equal(again, defective)


def test_select_on_val_candidates_of_a_demo_run_are_not_all_tied(demo_dataset_root, tmp_path):
    """A tiny training run on the demo with validation maps, then the per_class space's candidates on them."""
    from tfsearch.transfusion.job import TrainDir, TrainJob
    from tfsearch.transfusion.profiles import get_profile
    from tfsearch.transfusion.runtime import Runtime
    from tfsearch.transfusion.trainer import train

    profile = get_profile("cpu").replace(
        image_size=32, base_channels=8, norm_groups=4, head_norm_groups=4, time_dim=32, epochs=1,
        batch_size=16, lr_step_epochs=1, milestone_every=1, inference_batch=16,
    )  # fmt: skip
    job = TrainJob(
        dataset="demo", category="stripes", profile=profile, data_root=demo_dataset_root,
        validation="synthetic",
    )  # fmt: skip
    run = TrainDir(tmp_path / "run")
    train(job, run.root, Runtime(device="cpu", progress=False))
    space = load_space("per_class")
    candidates = CategoryMaps({("default", 1): run.maps(1, "val")}, space.values("kernel", 3))
    assert candidates.ground_truth.image_labels.any() and not candidates.ground_truth.image_labels.all()
    values = {
        candidates.image_auroc(Candidate("default", 1, lam, kernel))
        for kernel in space.values("kernel", 3)
        for lam in space.values("lam", 0.95)
    }
    assert len(values) > 1
