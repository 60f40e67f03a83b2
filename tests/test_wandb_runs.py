"""The W&B runs as their users read them, offline, through W&B's own reader (`wandb leet inspect`, `wandb sync
--dry-run`): each selection study's summary holds its candidates table and its choice; each training run holds
the trial's loss and speed in its history and the run's settings in its config; the report's run is replaced,
not added to, when the report is made again; staged files stay in the run folders; and a training run's
console carries no W&B or Ray noise."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from conftest import inspect_offline_run
from test_report import make_run
from test_search import plan_for
from test_selection import EPOCHS_ONLY, SMALL_GRID, study_plan

from tfsearch import report
from tfsearch.infra.tracking import SYNC_NOTE
from tfsearch.run.selection.candidates import Candidate
from tfsearch.run.selection.log import candidates_frame, log_studies_to_wandb
from tfsearch.run.selection.study import best_candidate, run_study


def records(folder: Path) -> list[dict]:
    """Every record of an offline run's transaction log, as `wandb leet inspect --json` prints them."""
    result = subprocess.run(
        ["wandb", "leet", "inspect", "--json", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def history(folder: Path) -> list[dict]:
    return [r["history"]["item"] for r in records(folder) if r["type"] == "history"]


def staged_files(folder: Path) -> list[Path]:
    """The files the run's artifacts (its tables) were staged as, which `wandb sync` uploads from there."""
    return [
        Path(entry["local_path"])
        for r in records(folder)
        if r["type"] == "artifact"
        for entry in r["artifact"]["manifest"]["contents"]
    ]


def dry_run_of_sync_note(wandb_root: Path) -> str:
    """What the command SYNC.txt gives would upload: run as `wandb sync --dry-run`, by the shell."""
    note = (wandb_root / "wandb" / SYNC_NOTE).read_text()
    (command,) = [line.strip() for line in note.splitlines() if line.strip().startswith("wandb sync ")]
    dry = command.replace("wandb sync ", "wandb sync --dry-run ", 1)
    result = subprocess.run(dry, shell=True, capture_output=True, text=True, timeout=60, check=True)
    return result.stdout + result.stderr


# ----------------------------------------------------------------------------------- selection studies
def test_each_study_run_holds_its_candidates_table_and_its_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    # c: the best candidate is at epoch 20, not the default's (epoch 30, λ 0.95, n 3); d: only the epoch
    # varies and the signal grows with it, so the default ties with the best and is kept
    growing = {"selection": {"sampler": "exhaustive"}, "params": EPOCHS_ONLY}
    plans = {
        "c": study_plan(tmp_path / "c", SMALL_GRID, {10: 0.02, 20: 0.1, 30: 0.03}),
        "d": study_plan(tmp_path / "d", growing, {10: 0.05, 20: 0.1, 30: 0.4}),
    }
    studies = {scope: run_study(optuna.storages.InMemoryStorage(), spec) for scope, spec in plans.items()}
    defaults = {scope: Candidate(**study.user_attrs["choice"]["default"]) for scope, study in studies.items()}
    assert {s: d.as_params() for s, d in defaults.items()} == {
        s: {"model": "default", "epoch": 30, "lam": 0.95, "kernel": 3, "seg_sigmas": 3.0} for s in ("c", "d")
    }
    run_dir = tmp_path / "run"
    log_studies_to_wandb(studies, run_dir, "grp", "offline", None, None)

    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    seen = {}
    for folder in folders:
        run = inspect_offline_run(folder)
        scope, summary = run["config"]["scope"], run["summary"]
        study = studies[scope]
        # the table itself, what W&B's run table and table panels show, and its size beside it
        table = summary["candidates"]
        assert isinstance(table, dict) and table["_type"] == "table-file"
        assert table["nrows"] == summary["candidates_count"] == len(candidates_frame(study)) > 0
        content = json.loads((folder / "files" / table["path"]).read_text())
        assert len(content["data"]) == table["nrows"] and {"epoch", "lam", "kernel"} <= set(
            content["columns"]
        )
        chosen, choice = best_candidate(study, defaults[scope])
        assert {
            k: summary[f"selected_{k}"] for k in ("model", "epoch", "lam", "kernel", "seg_sigmas")
        } == chosen.as_params()
        assert summary["selected_is_default"] is (choice["trial"] is None)
        assert summary["tied_at_best"] == choice["tied"] and summary["selected_value"] == choice["value"]
        # the table's files were staged inside the run's own folder, not in ~/.local/share/wandb
        staged = staged_files(folder)
        assert staged and all(p.is_file() and p.is_relative_to(folder) for p in staged), staged
        seen[scope] = (summary["selected_epoch"], summary["selected_is_default"])
    assert seen == {"c": (20, False), "d": (30, True)}
    assert "Would sync 2 run(s)" in dry_run_of_sync_note(run_dir)


# ---------------------------------------------------------------------------------------------- report
def test_making_the_report_again_replaces_its_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = make_run(tmp_path, "mv", "mvtec", ["bottle"], profile="cpu")
    out = tmp_path / "out"
    report.write_report([run], out=out, wandb="offline", quiet=True)
    (first,) = (out / "wandb").glob("offline-run-*")
    first_id = inspect_offline_run(first)["run_id"]
    report.write_report([run], out=out, wandb="offline", quiet=True)
    (second,) = (out / "wandb").glob("offline-run-*")  # one run left to upload: the new one
    assert second != first  # a new folder (W&B adds `-1` to its name when made within the same second)
    assert inspect_offline_run(second)["run_id"] == first_id  # the same run, replaced
    note = (out / "wandb" / SYNC_NOTE).read_text()
    assert f"wandb sync {second.resolve()}\n" in note and "*" not in note.split("Check one")[0]
    assert "Would sync 1 run(s)" in dry_run_of_sync_note(out)
    summary = inspect_offline_run(second)
    assert summary["state"] == "finished" and summary["summary"]["tables/tuned_mv"]["_type"] == "table-file"
    staged = staged_files(second)
    assert staged and all(p.is_file() and p.is_relative_to(second) for p in staged), staged
    assert str(second.resolve()) in (out / "report.md").read_text()


# ------------------------------------------------------------------------------------- training runs
TRAINING = """
    import json, sys, time
    from pathlib import Path
    from types import SimpleNamespace

    import ray.tune.utils.util
    from ray import tune

    from tfsearch.infra.cluster import connect
    from tfsearch.run.training.callbacks import ProgressView, tune_callbacks

    # Tune stays silent about slow steps for a minute after it is imported: not in this short run
    ray.tune.utils.util.START_OF_TIME = 0
    run_dir = Path(sys.argv[1])
    connect(None, quiet=False)  # what the workers print reaches this console too


    def trainable(config):
        for epoch in (1, 2):
            time.sleep(1)
            tune.report({"epoch": epoch, "selection_value": 0.5 + epoch / 10, "loss": 1.0 / epoch,
                         "images_per_second": 3.0 * epoch})


    plan = SimpleNamespace(space=SimpleNamespace(metric="image_auroc"), estimate=None)
    view = ProgressView(plan, quiet=True)
    callbacks = [view.callback(), *tune_callbacks(run_dir, "tiny", "offline", None, None)]
    tuner = tune.Tuner(
        trainable,
        param_space={"category": tune.grid_search(["a", "b"])},
        run_config=tune.RunConfig(
            name="tiny", storage_path=str(run_dir / "tune"), callbacks=callbacks, verbose=0
        ),
    )
    assert not any(r.error for r in tuner.fit())
    time.sleep(3)  # Ray forwards the workers' last lines
"""


@pytest.fixture(scope="module")
def training_run(tmp_path_factory: pytest.TempPathFactory, demo_dataset_root: Path):
    """Two tiny trials with offline W&B, in a process and a Ray instance of their own (as `tfsearch run`
    starts Ray: `connect`), in a run folder whose config.json is a real plan's; its console captured."""
    root = tmp_path_factory.mktemp("wandb-training")
    plan = plan_for(root, demo_dataset_root, "tiny", "stripes", "--precision", "fp32")
    run_dir = root / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(plan.describe()))
    script = root / "train.py"
    script.write_text(textwrap.dedent(TRAINING))
    env = {k: v for k, v in os.environ.items() if k not in ("TUNE_WARN_THRESHOLD_S", "RAY_ADDRESS")}
    env["RAY_ADDRESS"] = "local"  # a Ray instance of its own, never another on this machine
    result = subprocess.run(
        [sys.executable, str(script), str(run_dir)], capture_output=True, text=True, timeout=400, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return SimpleNamespace(run_dir=run_dir, plan=plan, console=result.stdout + result.stderr)


def test_training_runs_hold_the_loss_and_speed_and_the_runs_settings(training_run):
    folders = sorted((training_run.run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    profile = training_run.plan.profile
    categories = set()
    for folder in folders:
        run = inspect_offline_run(folder)
        config = run["config"]
        assert run["state"] == "finished"
        categories.add(config["category"])
        assert (config["profile"], config["epochs"], config["lr"], config["seed"], config["precision"]) == (
            profile.name,
            profile.epochs,
            profile.lr,
            profile.seed,
            "fp32",
        )
        assert config["run"] == "tiny" and config["dataset"] == "demo"
        rows = history(folder)
        assert [(r["epoch"], r["loss"], r["images_per_second"]) for r in rows] == [(1, 1.0, 3), (2, 0.5, 6)]
    assert categories == {"a", "b"}
    # the logging actors kept W&B's files in the run folder: their environment reached them
    assert any((training_run.run_dir / "wandb" / "data" / "cache").rglob("*.log"))
    assert "Would sync 2 run(s)" in dry_run_of_sync_note(training_run.run_dir)


def test_a_training_run_prints_no_wandb_or_ray_noise(training_run):
    console = training_run.console
    assert "_WandbLoggingActor' and ID" not in console  # Ray's core worker, on actors it restarts
    assert not re.search(r"operation took [\d.]+ s", console), console[-3000:]  # Tune's slow steps
    assert "Run summary" not in console and "Run history" not in console  # each W&B run at its end
    assert "reinit" not in console


def test_connect_passes_the_wandb_settings_and_quiets_slow_step_warnings(monkeypatch):
    import ray
    from ray.tune.utils import util

    from tfsearch.infra import cluster

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(util.warn_if_slow, "DEFAULT_THRESHOLD", 0.5)
    monkeypatch.delenv("TUNE_WARN_THRESHOLD_S", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", "/somewhere")
    cluster.connect(None, quiet=True)
    (kwargs,) = calls
    forwarded = kwargs["runtime_env"]["env_vars"]
    assert forwarded["WANDB_MODE"] == "offline" and forwarded["WANDB_DATA_DIR"] == "/somewhere"
    assert util.warn_if_slow("x").threshold == 60.0 and forwarded["TUNE_WARN_THRESHOLD_S"] == "60"
    # a threshold the user set is kept
    monkeypatch.setenv("TUNE_WARN_THRESHOLD_S", "5")
    cluster.connect(None, quiet=True)
    assert util.warn_if_slow("x").threshold == 5.0
