"""A run off the happy path: relative paths, categories that fail for good, restore only on `--resume`,
changed options on resume, interrupted studies, studies on shared storage, and the module layout."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from test_search import TINY, read_rows, run_args, write_space

from tfsearch.cli import build_parser, main
from tfsearch.errors import InputError
from tfsearch.run.pipeline import execute
from tfsearch.run.plan import make_plan
from tfsearch.run.results import candidate_rows
from tfsearch.run.selection.candidates import Candidate
from tfsearch.run.selection.study import StudySpec, run_study
from tfsearch.run.space import parse_space
from tfsearch.run.training.trainable import train_category
from tfsearch.store.run_folder import STUDIES_DB, STUDIES_JOURNAL
from tfsearch.store.studies import filesystem_type, open_studies, studies_file


def plan_from(*argv: str):
    return make_plan(build_parser().parse_args(list(argv)))


# ------------------------------------------------------------------------------------------ paths
def test_relative_paths_are_resolved_on_the_driver(shared_run, demo_dataset_root, monkeypatch):
    # the shared run was typed with --data-root mv --runs-root runs --storage store, from its root folder
    root = shared_run.root
    config = json.loads((root / "runs" / "shared" / "config.json").read_text())
    assert config["data_root"] == str(demo_dataset_root.resolve())
    assert config["storage"] == str(root / "store" / "shared")
    rows = read_rows(root / "runs" / "shared" / "selected.csv")
    assert [(r["category"], r["status"]) for r in rows] == [("disk", "ok"), ("stripes", "ok")]
    assert all(float(r["selected_test_image_auroc"]) > 0 for r in rows)
    # every result reached the storage folder, the report and the studies too
    for name in ("config.json", "trials.csv", "selected.csv", STUDIES_DB, "report/report.md"):
        assert (root / "store" / "shared" / name).is_file(), name
    assert (root / "store" / "shared" / "train" / "stripes" / "default" / "milestones.json").is_file()

    # a run of the same name from another run folder finds the experiment at the storage and refuses
    monkeypatch.chdir(root)
    other = [a if a != "runs" else "elsewhere" for a in shared_run.argv]
    refused = re.escape(str(root / "store" / "shared")) + "/(tune|train) already holds a run"
    with pytest.raises(InputError, match=refused):
        execute(make_plan(build_parser().parse_args(other)))
    assert not (root / "elsewhere" / "shared").exists()


@pytest.mark.parametrize("flag", ["--data-root", "--texture-root", "--fg-root"])
def test_a_missing_relative_folder_names_the_flag_and_the_typed_path(tmp_path, monkeypatch, capsys, flag):
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--dataset", "demo", "--space", str(write_space(tmp_path)), flag, "nowhere/x"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{flag} nowhere/x: does not exist (resolved to {tmp_path / 'nowhere' / 'x'})" in err


# ----------------------------------------------------------------------------------- failures
def stripes_fails(attempts: Path):
    """A trainable whose stripes trials fail twice: the first attempt before it trains anything, the second
    right after it reported its first milestone; the third trains. Each attempt leaves a line in `attempts`:
    the third writes down when its first milestone's weights were last written, as it found them."""

    def trainable(config, settings):
        from ray import tune

        if config["category"] != "stripes":
            return train_category(config, settings)
        lines = attempts.read_text().splitlines() if attempts.exists() else []
        first = Path(settings.storage_uri) / "train" / "stripes" / "default" / "checkpoints" / "epoch-0001"
        stamp = str((first / "model.pt").stat().st_mtime_ns) if first.exists() else "none"
        attempts.write_text("\n".join([*lines, stamp]) + "\n")
        if len(lines) == 0:
            raise RuntimeError("stripes is broken (attempt 1)")
        original = tune.report

        def report_then_fail(metrics, checkpoint=None):
            original(metrics, checkpoint=checkpoint)
            if len(lines) == 1:
                raise RuntimeError("injected failure after the first milestone (attempt 2)")

        tune.report = report_then_fail
        try:
            train_category(config, settings)
        finally:
            tune.report = original

    return trainable


def test_a_failed_category_fails_the_run_and_resume_retries_only_it(
    tmp_path, demo_dataset_root, monkeypatch, ray_instance
):
    """On a shared file system (its studies in a journal): stripes fails for good, the run says so; resumed,
    it fails once more after its first milestone and is retried from that checkpoint; disk is never
    trained again."""
    monkeypatch.setattr("tfsearch.store.studies.filesystem_type", lambda path: "lustre")
    attempts = tmp_path / "attempts"
    trainable = stripes_fails(attempts)
    space = write_space(tmp_path)
    argv = run_args(space, tmp_path / "runs", demo_dataset_root, "f", "--categories", "disk,stripes")
    plan = plan_from(*argv, "--max-failures", "0")
    with pytest.raises(InputError, match=r"1 category .*\n  stripes: .*stripes is broken \(attempt 1\)"):
        execute(plan, trainable=trainable)
    assert attempts.read_text().splitlines() == ["none"]  # --max-failures 0: no retry
    rows = {r["category"]: r for r in read_rows(plan.run_dir / "selected.csv")}
    assert rows["stripes"]["status"] == "failed" and "stripes is broken" in rows["stripes"]["error"]
    assert rows["stripes"]["selected_epoch"] == "" and rows["stripes"]["default_epoch"] == ""
    assert rows["disk"]["status"] == "ok" and rows["disk"]["selected_epoch"] != ""
    assert "stripes" not in {
        r["category"] for r in read_rows(plan.run_dir / "trials.csv") if r["stage"] == "select"
    }
    assert "demo/stripes: failed (" in (plan.run_dir / "report" / "report.md").read_text()
    disk_checkpoint = plan.train_dir("disk", "default") / "checkpoints" / "epoch-0002" / "model.pt"
    stamp = disk_checkpoint.stat().st_mtime_ns

    # resumed with retries (the first command's 0 would stop it): stripes fails once more after its first
    # milestone, and the retry continues from that milestone; disk is not trained again
    resumed = plan_from(*argv, "--max-failures", "5", "--resume")
    selected = execute(resumed, resume=True, trainable=trainable)
    first, second, third = attempts.read_text().splitlines()
    stripes_first = plan.train_dir("stripes", "default") / "checkpoints" / "epoch-0001" / "model.pt"
    assert second == "none" and third == str(stripes_first.stat().st_mtime_ns)  # not trained again
    assert {r["category"]: r["status"] for r in selected} == {"disk": "ok", "stripes": "ok"}
    assert disk_checkpoint.stat().st_mtime_ns == stamp
    for category in ("disk", "stripes"):
        history = read_rows(plan.train_dir(category, "default") / "history.csv")
        assert [int(r["epoch"]) for r in history] == [1, 2]
    train_rows = [r for r in read_rows(plan.run_dir / "trials.csv") if r["stage"] == "train"]
    assert sorted((r["category"], r["epoch"]) for r in train_rows) == [
        (c, e) for c in ("disk", "stripes") for e in ("1", "2")
    ]

    # the studies of both categories are in the journal, each with its whole budget
    assert not (plan.run_dir / STUDIES_DB).exists()
    storage = open_studies(plan.run_dir / STUDIES_JOURNAL)
    for row in selected:
        study = optuna.load_study(study_name=f"tiny/demo/{row['category']}", storage=storage)
        complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        assert len(complete) == TINY["selection"]["trials"]
        best = study.best_value
        assert row["selected_selection_value"] == best or row["selected_epoch"] == row["default_epoch"]


# ------------------------------------------------------------------------------------ studies
class ScoredCandidates:
    """Stands in for a category's cached maps: a candidate's metric is a fixed function of λ and n; the
    evaluation given by `interrupt_at` raises KeyboardInterrupt, as a Ctrl-C of the driver would."""

    def __init__(self, interrupt_at: int | None = None) -> None:
        self.calls, self.interrupt_at = 0, interrupt_at

    def candidate_metrics(
        self, config: Candidate, metric: str, all_metrics: bool = False
    ) -> dict[str, float]:
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        return {metric: config.lam / 2 + config.kernel / 10}


def sampled_study_plan(candidates) -> StudySpec:
    payload = {
        **TINY,
        "selection": {"metric": "image_auroc", "sampler": "random", "trials": 8, "seed": 0},
        "params": {"epoch": "last", "lam": {"low": 0.5, "high": 1.0}, "kernel": {"choices": [1, 3, 5]}},
    }
    space = parse_space(payload, "sampled.yaml")
    default = Candidate("default", 2, 0.95, 3)
    return StudySpec("sampled/demo/stripes", space, {"stripes": candidates}, [("default", 2)], default)


@pytest.mark.parametrize("studies", [STUDIES_DB, STUDIES_JOURNAL])
def test_an_interrupted_sampled_study_is_drawn_again_as_an_uninterrupted_one(tmp_path, studies):
    """A sampled study cut short (Ctrl-C during selection) is discarded and drawn again from the space's
    seed, so the resumed run selects exactly what a run that never stopped selects."""
    complete = (optuna.trial.TrialState.COMPLETE,)
    reference = run_study(
        open_studies(tmp_path / "reference" / studies), sampled_study_plan(ScoredCandidates())
    )
    storage = open_studies(tmp_path / studies)
    with pytest.raises(KeyboardInterrupt):  # 3 candidates complete, the 4th is cut off
        run_study(storage, sampled_study_plan(ScoredCandidates(interrupt_at=4)))
    study = run_study(open_studies(tmp_path / studies), sampled_study_plan(ScoredCandidates()))

    def drawn(study):
        return [(t.params["lam"], t.params["kernel"], t.value) for t in study.get_trials(states=complete)]

    assert len(drawn(study)) == 8 and drawn(study) == drawn(reference)
    assert study.user_attrs["choice"] == reference.user_attrs["choice"]
    assert {t.state for t in study.trials} == set(complete)  # nothing of the first attempt is left
    rows = candidate_rows(study, "test")  # the trials table: the completed candidates, one row each
    assert sorted((r["lam"], r["kernel"]) for r in rows) == sorted((lam, n) for lam, n, _ in drawn(study))
    # a finished study is kept as it is
    again = run_study(open_studies(tmp_path / studies), sampled_study_plan(ScoredCandidates()))
    assert [t.number for t in again.trials] == [t.number for t in study.trials]


def test_studies_use_a_journal_on_a_network_file_system(tmp_path, monkeypatch):
    mounts = "\n".join(
        [
            "/dev/root / ext4 rw 0 0",
            "server:/export /shared nfs4 rw,relatime 0 0",
            "lustre@tcp:/fs /shared/lustre lustre rw 0 0",
            "/dev/sdb /shared/my\\040disk ext4 rw 0 0",
        ]
    )
    assert filesystem_type(Path("/shared/runs/new-run"), mounts) == "nfs4"
    assert filesystem_type(Path("/shared/lustre/runs"), mounts) == "lustre"
    assert filesystem_type(Path("/shared/my disk/runs"), mounts) == "ext4"
    assert filesystem_type(Path("/home/me"), mounts) == "ext4"

    assert studies_file(tmp_path) == tmp_path / STUDIES_DB  # a local disk here
    monkeypatch.setattr("tfsearch.store.studies.filesystem_type", lambda path: "nfs4")
    assert studies_file(tmp_path) == tmp_path / STUDIES_JOURNAL
    # a run keeps the form its studies were created in
    (tmp_path / STUDIES_DB).write_bytes(b"")
    assert studies_file(tmp_path) == tmp_path / STUDIES_DB


# ------------------------------------------------------------------------------------- layout
def test_the_report_imports_neither_torch_nor_the_search():
    code = (
        "import sys, tfsearch.report\n"
        "loaded = [m for m in ('torch', 'ray', 'tfsearch.run.pipeline', 'tfsearch.transfusion.trainer')"
        " if m in sys.modules]\n"
        "print(loaded)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------- resources
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")


def test_a_paper_plan_asks_for_a_gpu_that_is_not_visible_yet(demo_dataset_root):
    # with --address the cluster may add GPU workers later: the demand must reach its autoscaler
    common = ("run", "--dataset", "demo", "--data-root", str(demo_dataset_root), "--address", "10.0.0.1:6379")
    plan = plan_from(*common, "--profile", "paper")
    assert (plan.profile.name, plan.gpus_per_trial) == ("paper", 1.0)
    assert plan_from(*common, "--profile", "cpu").gpus_per_trial == 0.0
    assert plan_from(*common, "--profile", "paper", "--gpus-per-trial", "0.25").gpus_per_trial == 0.25
    assert plan_from(*common, "--profile", "paper", "--gpus-per-trial", "0").gpus_per_trial == 0.0


@no_cuda
def test_on_a_machine_without_gpu_a_paper_run_stops(demo_dataset_root, tmp_path, capsys):
    """(What a bare run trains there instead: tests/test_first_run.py.)"""
    base = ["run", "--dataset", "demo", "--data-root", str(demo_dataset_root), "--runs-root", str(tmp_path)]
    assert main([*base, "--profile", "paper"]) == 2
    err = capsys.readouterr().err
    assert "the 'paper' profile asks each trial for 1 GPU and this machine has none" in err
    assert "--profile small" in err and "--gpus-per-trial 0" in err
    assert not any(tmp_path.iterdir())  # stopped before anything was written

    assert plan_from(*base, "--profile", "paper", "--gpus-per-trial", "0").profile.name == "paper"


def test_a_trial_holding_a_gpu_without_cuda_says_so_and_refuses_the_paper_profile(monkeypatch):
    import ray

    from tfsearch.run.training.trainable import check_device
    from tfsearch.transfusion.profiles import PROFILES

    context = SimpleNamespace(get_accelerator_ids=lambda: {"GPU": ["0"]})
    monkeypatch.setattr(ray, "get_runtime_context", lambda: context)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    paper, quick = SimpleNamespace(profile=PROFILES["paper"]), SimpleNamespace(profile=PROFILES["cpu"])
    with pytest.raises(
        InputError, match="holds GPU 0 but torch sees no CUDA.*refusing.*'paper'.*--allow-cpu"
    ):
        check_device(paper, allow_cpu=False)
    assert check_device(paper, allow_cpu=True) == " (on the CPU: GPU held without CUDA)"
    assert check_device(quick, allow_cpu=False) == " (on the CPU: GPU held without CUDA)"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert check_device(paper, allow_cpu=False) == ""
