"""`tfsearch run`: spaces, training paid once, selection on cached maps, resume, retries, protocols."""

import csv
import json
import shutil
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml

from tfsearch.cli import main
from tfsearch.errors import InputError
from tfsearch.run.pipeline import execute
from tfsearch.run.plan import RunPlan, make_plan
from tfsearch.run.selection.stage import Selection
from tfsearch.run.space import builtin_spaces, load_space
from tfsearch.run.start import start_run
from tfsearch.run.training.stage import run_training
from tfsearch.run.training.trainable import train_category
from tfsearch.transfusion.job import TrainDir

TINY = {
    "name": "tiny",
    "description": "a tiny per-class space for tests",
    "scope": "per_class",
    "profile": "cpu",
    "profile_overrides": {
        "epochs": 2,
        "image_size": 32,
        "base_channels": 8,
        "norm_groups": 4,
        "head_norm_groups": 4,
        "time_dim": 32,
        "batch_size": 16,
        "milestone_every": 1,
        "steps": 4,  # the reverse process writes every milestone's maps: 4 steps instead of 20
    },
    "selection": {"metric": "image_auroc", "sampler": "tpe", "trials": 6, "seed": 0},
    "params": {"epoch": "milestones", "lam": {"low": 0.5, "high": 1.0}, "kernel": {"choices": [1, 3]}},
}


def write_space(folder: Path, **changes) -> Path:
    payload = {**TINY, **changes}
    path = folder / f"{payload['name']}.yaml"
    path.write_text(yaml.safe_dump(payload, allow_unicode=True))
    return path


def run_args(space: Path, root: Path, data_root: Path, name: str, *extra: str) -> list[str]:
    return [
        "run", "--space", str(space), "--dataset", "demo", "--data-root", str(data_root),
        "--runs-root", str(root), "--name", name, "--quiet", "--wandb", "disabled", *extra,
    ]  # fmt: skip


def plan_for(tmp_path, demo_dataset_root, name="r", categories="stripes", *extra) -> RunPlan:
    from tfsearch.cli import build_parser

    space = write_space(tmp_path)
    args = build_parser().parse_args(
        run_args(space, tmp_path / "runs", demo_dataset_root, name, "--categories", categories, *extra)
    )
    return make_plan(args)


def read_rows(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------ spaces
def test_builtin_spaces_parse_and_are_listed(capsys):
    names = set(builtin_spaces())
    assert {"single", "per_class", "global", "lambda_sweep", "kernel_sweep", "train_asha"} <= names
    for name in names:
        assert load_space(name).description
    assert main(["spaces"]) == 0
    listing = capsys.readouterr().out
    assert all(line.split()[0] in names for line in listing.strip().splitlines())
    assert load_space("single").scope == "single"
    assert len(load_space("lambda_sweep").values("lam", 0.95)) == 13  # the grid, every value evaluated
    segf1 = load_space("per_class_segf1")  # MVTec AD 2: SegF1 with its threshold's k searched
    assert segf1.metric == "seg_f1" and segf1.values("seg_sigmas", 3.0) == (1, 2, 3, 4, 5, 6)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"params": {"lam": {"low": 0.5, "high": 1.5}}}, "params.lam: expected values in [0, 1], got 1.5"),
        ({"params": {"lam": -0.1}}, "params.lam"),
        ({"params": {"kernel": {"choices": [3, 4]}}}, "params.kernel: expected odd positive integers, got 4"),
        ({"params": {"kernel": 0}}, "params.kernel"),
        ({"params": {"gamma": 1}}, "unknown parameter(s) ['gamma']"),
        ({"scope": "everything"}, "scope: expected one of"),
        ({"selection": {"sampler": "cma"}}, "selection.sampler"),
        ({"selection": {"metric": "accuracy"}}, "selection.metric"),
        ({"selection": {"trials": -1}}, "selection.trials"),
        ({"milestones": {"every": 0}}, "milestones.every"),
        ({"colour": "red"}, "unknown key(s) ['colour']"),
        ({"profile": "huge"}, "profile: expected one of"),
        ({"profile_overrides": {"wings": 2}}, "profile_overrides: unknown profile field(s) ['wings']"),
        ({"profile_overrides": {"lr": "fast"}}, "profile_overrides: profile field lr='fast': expected float"),
        ({"profile_overrides": {"bf16": "yes"}}, "profile field bf16='yes': expected bool"),
        ({"profile_overrides": {"grad_clip": -1.0}}, "grad_clip=-1.0: expected 0 (no clipping) or more"),
        ({"profile_overrides": {"subtle_share": 2.0}}, "subtle_share=2.0: expected a share from 0 to 1"),
        ({"training": {"params": {"momentum": {"low": 0.1, "high": 0.9}}}}, "training.params: unknown"),
    ],
)
def test_space_errors_name_the_file_and_key(tmp_path, changes, message):
    path = write_space(tmp_path, **changes)
    with pytest.raises(InputError) as error:
        load_space(str(path))
    assert str(path) in str(error.value)
    assert message in str(error.value)


def test_malformed_yaml_and_unknown_space(tmp_path, capsys, demo_dataset_root):
    broken = tmp_path / "broken.yaml"
    broken.write_text("scope: [per_class\n")
    with pytest.raises(InputError, match="broken.yaml: not valid YAML"):
        load_space(str(broken))
    assert main(run_args(Path("no_such_space"), tmp_path, demo_dataset_root, "x")) == 2
    assert "--space no_such_space: no such built-in space or file" in capsys.readouterr().err


def test_milestone_beyond_the_profile_is_an_error(tmp_path, demo_dataset_root, capsys):
    space = write_space(tmp_path, milestones=[1, 5])
    assert main(run_args(space, tmp_path / "runs", demo_dataset_root, "x")) == 2
    assert "milestones: epoch 5 lies beyond the profile's 2 epochs" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "x").exists()


def test_unreachable_address_fails_fast(tmp_path, demo_dataset_root, capsys):
    started = time.perf_counter()
    code = main(run_args(write_space(tmp_path), tmp_path, demo_dataset_root, "x", "--address", "127.0.0.1:9"))
    assert code == 2 and time.perf_counter() - started < 10
    assert "--address 127.0.0.1:9: no Ray cluster reachable" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- runs
def test_per_class_run_end_to_end(shared_run):
    plan, selected = shared_run.plan, shared_run.selected
    run_dir = plan.run_dir
    assert [r["category"] for r in selected] == ["disk", "stripes"]
    for row in selected:
        assert row["selected_selection_value"] >= row["default_selection_value"]
        assert row["default_epoch"] == 2 and row["default_lam"] == 0.95 and row["default_kernel"] == 3
        # with the oracle protocol the selection value is the test metric itself
        assert row["selected_selection_value"] == row["selected_test_image_auroc"]

    rows = read_rows(run_dir / "trials.csv")
    train_rows = [r for r in rows if r["stage"] == "train"]
    assert sorted((r["category"], r["epoch"]) for r in train_rows) == [
        ("disk", "1"), ("disk", "2"), ("stripes", "1"), ("stripes", "2")
    ]  # fmt: skip
    assert all(r["node_id"] and r["protocol"] == "test" for r in train_rows)
    select_rows = [r for r in rows if r["stage"] == "select"]
    assert len(select_rows) == 2 * 6
    # disk's selection started before stripes finished training
    started = min(datetime.fromisoformat(r["started_at"]) for r in select_rows if r["category"] == "disk")
    trained = max(datetime.fromisoformat(r["finished_at"]) for r in train_rows if r["category"] == "stripes")
    assert started.tzinfo is not None and started < trained
    # training ran to the last milestone exactly once per category, whatever the trial budget
    for category in ("disk", "stripes"):
        history = read_rows(plan.train_dir(category, "default") / "history.csv")
        assert [int(r["epoch"]) for r in history] == [1, 2]

    storage = f"sqlite:///{run_dir / 'studies.db'}"
    study = optuna.load_study(study_name="tiny/demo/disk", storage=storage)
    assert len(study.trials) == 6
    assert study.trials[0].params == {"checkpoint": "default@2", "lam": 0.95, "kernel": 3}

    # a second run under the same name refuses rather than overwrite
    with pytest.raises(InputError, match="already exists; pass --resume"):
        execute(plan)


def test_select_on_val_never_reads_test_labels(tmp_path, demo_dataset_root, ray_instance):
    plan = plan_for(tmp_path, demo_dataset_root, "val", "stripes", "--select-on", "val")
    start_run(plan, resume=False)
    run_training(plan)
    train_dir = TrainDir(plan.train_dir("stripes", "default"))
    assert train_dir.map_epochs("val") == [1, 2]
    # hide every test map (and with it the test labels) while the selection runs
    hidden = tmp_path / "hidden"
    shutil.move(train_dir.root / "maps" / "test", hidden)
    Selection(plan).finish(failed={})
    shutil.move(hidden, train_dir.root / "maps" / "test")

    from tfsearch.run.results import write_selected, write_trials

    write_trials(plan)
    (row,) = write_selected(plan, failed={})
    assert row["protocol"] == "val"
    assert row["selected_selection_value"] >= row["default_selection_value"]
    assert 0 <= row["selected_test_image_auroc"] <= 1
    rows = read_rows(plan.run_dir / "trials.csv")
    assert {r["split"] for r in rows} == {"val"} and {r["protocol"] for r in rows} == {"val"}
    # the validation anomalies are unlike training's: the candidates are not all tied
    assert len({r["image_auroc"] for r in rows if r["stage"] == "select"}) > 1
    assert row["tie_break_metric"] in ("", "pixel_ap") and row["tied_at_best"] >= 1


def comparable(rows: list[dict]) -> list[dict]:
    volatile = {"node_id", "started_at", "finished_at", "images_per_second"}
    return [{k: v for k, v in r.items() if k not in volatile} for r in rows]


def test_training_hyperparameters_are_searched_with_asha(
    tmp_path, demo_dataset_root, ray_instance, monkeypatch
):
    training = {
        "samples": 2,
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "params": {"lr": {"low": 3.0e-4, "high": 3.0e-3, "log": True}, "base_channels": {"choices": [4, 8]}},
    }
    space = write_space(tmp_path, training=training)
    from tfsearch.cli import build_parser

    argv = run_args(space, tmp_path / "runs", demo_dataset_root, "asha", "--categories", "disk,stripes")
    plan = make_plan(build_parser().parse_args(argv))
    told, start_selection = [], Selection.trained

    def trained(selection: Selection, category: str) -> None:
        told.append(category)  # the category's training search ended: its selection starts now
        start_selection(selection, category)

    monkeypatch.setattr(Selection, "trained", trained)
    started = tmp_path / "started"
    started.mkdir()

    def side_by_side(config: dict, settings: dict) -> None:
        """A trial trains once a trial of the other category started too: never, if the categories' training
        searches ran one after another (tiny trials end before another trial's worker has started)."""
        (started / config["category"]).touch()
        deadline = time.monotonic() + 120
        while len(list(started.iterdir())) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("no trial of the other category started meanwhile")
            time.sleep(0.2)
        train_category(config, settings)

    rows = execute(plan, trainable=side_by_side)
    assert sorted(told) == ["disk", "stripes"] == [row["category"] for row in rows]
    for row in rows:
        category = row["category"]
        models = sorted(p.name for p in (plan.training_root / category).iterdir())
        assert len(models) == 2 and all(m.startswith("base_channels=") and "-lr=" in m for m in models)
        # ASHA lets at least one trial reach the last milestone; selection picks among the trained models
        finished = [m for m in models if TrainDir(plan.train_dir(category, m)).map_epochs() == [1, 2]]
        assert finished and row["default_model"] in finished and row["selected_model"] in models
        assert row["selected_selection_value"] >= row["default_selection_value"]
        study = optuna.load_study(
            study_name=f"tiny/demo/{category}/training", storage=f"sqlite:///{plan.run_dir}/studies.db"
        )
        assert len(study.trials) == 2
    # one experiment: the categories' trials ran side by side (a trial's span: its start to its last
    # milestone, in whole seconds)
    spans = {}
    for r in read_rows(plan.run_dir / "trials.csv"):
        if r["stage"] == "train":
            span = spans.setdefault((r["category"], r["model"]), [datetime.fromisoformat(r["started_at"])])
            span.append(datetime.fromisoformat(r["finished_at"]))
    assert any(
        min(a) <= max(b) and min(b) <= max(a)
        for (ca, _), a in spans.items()
        for (cb, _), b in spans.items()
        if ca == "disk" and cb == "stripes"
    )


def test_resume_refuses_the_per_category_training_experiments_of_an_earlier_version(
    tmp_path, demo_dataset_root
):
    plan = plan_for(tmp_path, demo_dataset_root, "old", "stripes")
    start_run(plan, resume=False)
    start_run(plan, resume=True)  # a run of this version resumes
    (plan.run_dir / "tune" / "train-stripes").mkdir(parents=True)
    config = (plan.run_dir / "config.json").read_bytes()
    with pytest.raises(
        InputError, match=r"--resume: .*/tune/train-stripes is a training experiment of an earlier"
    ):
        start_run(plan, resume=True)
    assert (plan.run_dir / "config.json").read_bytes() == config


def test_resume_continues_a_run_of_the_previous_version_with_its_own_precision(tmp_path, demo_dataset_root):
    plan = plan_for(tmp_path, demo_dataset_root, "before", "stripes")
    assert plan.precision == "auto"  # a new run: bf16 where the profile asks for it and the device has it
    start_run(plan, resume=False)
    # the previous version stored neither the profile fields added since nor `auto`: it trained in fp32
    config = json.loads((plan.run_dir / "config.json").read_text())
    for field in ("grad_clip", "bf16"):
        del config["profile"][field]
    (plan.run_dir / "config.json").write_text(json.dumps({**config, "precision": "fp32"}))
    resumed = plan_for(tmp_path, demo_dataset_root, "before", "stripes", "--resume")
    assert resumed.precision == "fp32"
    start_run(resumed, resume=True)
    other = plan_for(tmp_path, demo_dataset_root, "before", "stripes", "--resume", "--precision", "bf16")
    with pytest.raises(InputError, match=r"differs from .*config.json in \['precision'\]"):
        start_run(other, resume=True)


def test_each_category_has_its_own_searcher_and_asha_rungs(tmp_path):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    from tfsearch.run.training.category_search import CategoryScheduler, CategorySearch
    from tfsearch.store.studies import open_studies

    storage = open_studies(tmp_path / "studies.db")

    def search() -> CategorySearch:
        searchers = {
            c: OptunaSearch(metric="v", mode="max", study_name=c, storage=storage, seed=0)
            for c in ("disk", "stripes")
        }
        return CategorySearch(searchers, 2, metric="v", mode="max")

    first = search()
    assert first.set_search_properties(None, None, {"lr": tune.uniform(0.1, 0.2)})
    assert [first.suggest(t)["category"] for t in "abc"] == ["disk", "stripes", "disk"]
    first.on_trial_complete("a", {"v": 0.5})
    first.save(str(tmp_path / "searcher.pkl"))
    # as Tune restores an experiment: the searcher it pickled at the start, then the state it saved last
    restored = search()
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.suggest("d")["category"] == "stripes" and restored.suggest("e") == Searcher.FINISHED
    restored.on_trial_complete("b", {"v": 0.4})
    restored.on_trial_complete("c", error=True)
    states = {
        c: [t.state.name for t in optuna.load_study(study_name=c, storage=storage).trials]
        for c in ("disk", "stripes")
    }
    assert states == {"disk": ["COMPLETE", "FAIL"], "stripes": ["COMPLETE", "RUNNING"]}

    def asha() -> ASHAScheduler:
        return ASHAScheduler(
            time_attr="epoch", metric="v", mode="max", max_t=2, grace_period=1, reduction_factor=2
        )

    scheduler = CategoryScheduler({"disk": asha(), "stripes": asha()})
    decisions = []
    for trial_id, (category, value) in enumerate([("disk", 0.9), ("stripes", 0.1), ("stripes", 0.05)]):
        trial = SimpleNamespace(trial_id=str(trial_id), config={"category": category})
        scheduler.on_trial_add(None, trial)
        decisions.append(scheduler.on_trial_result(None, trial, {"epoch": 1, "v": value}))
    # stripes' first trial is compared with stripes' trials only: disk's better one does not stop it
    assert decisions == [TrialScheduler.CONTINUE, TrialScheduler.CONTINUE, TrialScheduler.STOP]
