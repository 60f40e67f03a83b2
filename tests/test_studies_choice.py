"""The studies a user can open and choose: `tfsearch run --studies sqlite|journal`, kept on --resume, and
the optuna-dashboard command at the end of a run and in its report."""

import json
import shlex

import optuna
import pytest
from test_run_lifecycle import ScoredCandidates, sampled_study_plan
from test_search import plan_for

import tfsearch.run.pipeline as pipeline
from tfsearch.cli import main
from tfsearch.errors import InputError
from tfsearch.run.selection.study import run_study
from tfsearch.run.start import start_run
from tfsearch.store.run_folder import STUDIES_DB, STUDIES_JOURNAL, dashboard_command
from tfsearch.store.studies import open_studies, studies_file


def dashboard_storage(command: str):
    """The storage optuna-dashboard opens for `command` (`optuna-dashboard TARGET`): its own loader where it
    is installed, else Optuna's storage of the same file."""
    program, target = shlex.split(command)
    assert program == "optuna-dashboard"
    try:
        from optuna_dashboard._storage_url import get_storage
    except ImportError:
        if target.startswith("sqlite:///"):
            return optuna.storages.RDBStorage(target)
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(target))
    return get_storage(target)


def test_studies_journal_makes_a_journal_the_dashboard_opens(tmp_path, demo_dataset_root):
    plan = plan_for(tmp_path, demo_dataset_root, "j", "stripes", "--studies", "journal")
    assert plan.studies == "journal"
    start_run(plan, resume=False)  # on a local disk, where auto would choose SQLite
    assert (plan.run_dir / STUDIES_JOURNAL).is_file() and not (plan.run_dir / STUDIES_DB).exists()
    # the stages find the journal without being told, and a study written there opens in the dashboard
    path = studies_file(plan.run_dir)
    assert path == plan.run_dir / STUDIES_JOURNAL
    study = run_study(open_studies(path), sampled_study_plan(ScoredCandidates()))
    command = dashboard_command(studies_file(plan.run_dir))
    assert command == f"optuna-dashboard {plan.run_dir / STUDIES_JOURNAL}"
    storage = dashboard_storage(command)
    (summary,) = storage.get_all_studies()
    assert summary.study_name == study.study_name
    assert len(storage.get_all_trials(summary._study_id)) == len(study.trials) == 8
    # the choice is not part of the plan: the config.json a run without --studies writes is the same
    config = json.loads((plan.run_dir / "config.json").read_text())
    assert "studies" not in config and "studies" not in plan.describe()


def test_studies_sqlite_and_the_default(tmp_path, demo_dataset_root, monkeypatch):
    plan = plan_for(tmp_path, demo_dataset_root, "s", "stripes", "--studies", "sqlite")
    monkeypatch.setattr("tfsearch.store.studies.filesystem_type", lambda path: "nfs4")
    start_run(plan, resume=False)  # asked for, SQLite even where auto would choose the journal
    assert (plan.run_dir / STUDIES_DB).is_file() and not (plan.run_dir / STUDIES_JOURNAL).exists()
    auto = plan_for(tmp_path, demo_dataset_root, "a", "stripes")
    assert auto.studies == "auto"
    start_run(auto, resume=False)
    assert (auto.run_dir / STUDIES_JOURNAL).is_file()  # detected: a network file system
    with pytest.raises(SystemExit) as exit_:  # argparse names the choices
        main(["run", "--studies", "postgres"])
    assert exit_.value.code == 2


def test_a_resumed_run_keeps_its_form_and_refuses_a_contradicting_studies(tmp_path, demo_dataset_root):
    plan = plan_for(tmp_path, demo_dataset_root, "r", "stripes")
    start_run(plan, resume=False)
    assert (plan.run_dir / STUDIES_DB).is_file()
    config = (plan.run_dir / "config.json").read_bytes()
    # a config.json without any word of the studies (as every run before --studies) resumes, as it is
    start_run(plan_for(tmp_path, demo_dataset_root, "r", "stripes", "--resume"), resume=True)
    start_run(plan_for(tmp_path, demo_dataset_root, "r", "stripes", "--resume", "--studies", "sqlite"), True)
    journal = plan_for(tmp_path, demo_dataset_root, "r", "stripes", "--resume", "--studies", "journal")
    refused = rf"--studies journal: {plan.run_dir / STUDIES_DB} already holds this run's studies as SQLite"
    with pytest.raises(InputError, match=refused):
        start_run(journal, resume=True)
    assert not (plan.run_dir / STUDIES_JOURNAL).exists()
    assert (plan.run_dir / "config.json").read_bytes() == config


def test_the_run_prints_the_dashboard_command_last_and_the_report_holds_it(
    tmp_path, demo_dataset_root, monkeypatch, capsys
):
    """The run's wiring, its stages stood in for (a real run takes a minute of Ray): the studies are created
    in the chosen form before training, the report says how to open them, and so do the last lines."""
    plan = plan_for(tmp_path, demo_dataset_root, "p", "stripes", "--studies", "journal")
    plan.quiet = False
    seen = {}

    class Selection:
        def __init__(self, plan) -> None:
            seen["studies"] = studies_file(plan.run_dir)

        def trained(self, category: str) -> None: ...

        def finish(self, failed: dict) -> None: ...

    monkeypatch.setattr(pipeline, "connect", lambda address, quiet: None)
    monkeypatch.setattr(pipeline, "Selection", Selection)
    monkeypatch.setattr(pipeline, "run_training", lambda plan, trainable, on_trained: {})
    read = {}
    for stage in ("write_trials", "log_selection"):  # both get the studies read once for the tables
        monkeypatch.setattr(
            pipeline, stage, lambda plan, studies, stage=stage: read.setdefault(stage, studies)
        )
    monkeypatch.setattr(pipeline, "publish", lambda plan: None)
    monkeypatch.setattr(pipeline, "write_selected", lambda plan, failed: [])
    pipeline.execute(plan)
    assert read["write_trials"] is read["log_selection"]
    journal = plan.run_dir / STUDIES_JOURNAL
    assert seen["studies"] == journal
    command = dashboard_command(journal)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"[done] the Optuna studies open with: {command}"
    markdown = (plan.run_dir / "report" / "report.md").read_text()
    assert f"## Studies (optuna-dashboard)\n\n- p: `{command}`" in markdown


def test_the_shared_runs_report_says_how_to_open_its_studies(shared_run, tmp_path, capsys):
    command = dashboard_command(shared_run.run_dir / STUDIES_DB)
    assert command == f"optuna-dashboard sqlite:///{shared_run.run_dir / STUDIES_DB}"
    assert f"- shared: `{command}`" in (shared_run.run_dir / "report" / "report.md").read_text()
    names = {s.study_name for s in dashboard_storage(command).get_all_studies()}
    assert names == {"tiny/demo/disk", "tiny/demo/stripes"}
    # `tfsearch report` prints it too, and a copy of the run's tables without studies says why there is none
    assert main(["report", str(shared_run.run_dir), "--out", str(tmp_path / "r"), "--wandb", "disabled"]) == 0
    assert f"[report] studies of shared: {command}" in capsys.readouterr().out
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "trials.csv", "selected.csv"):
        (copy / name).write_bytes((shared_run.run_dir / name).read_bytes())
    assert main(["report", str(copy), "--wandb", "disabled"]) == 0
    assert (
        f"shared: no studies.db or studies.journal in {copy}" in (copy / "report" / "report.md").read_text()
    )


def test_dashboard_command_quotes_a_path_with_spaces(tmp_path):
    folder = tmp_path / "my runs"
    folder.mkdir()
    open_studies(folder / STUDIES_JOURNAL)
    command = dashboard_command(folder / STUDIES_JOURNAL)
    assert shlex.split(command) == ["optuna-dashboard", str(folder / STUDIES_JOURNAL)]
    assert dashboard_storage(command).get_all_studies() == []
    assert shlex.split(dashboard_command(folder / STUDIES_DB))[1] == f"sqlite:///{folder / STUDIES_DB}"
