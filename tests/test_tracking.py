"""Live tracking of a search: Ray dashboard metrics on the metrics port during a Tune run, and per-trial W&B
logging through Ray Tune's W&B integration."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import inspect_offline_run

from tfsearch.errors import InputError
from tfsearch.infra.tracking import SYNC_NOTE
from tfsearch.run.training.callbacks import tune_callbacks

SELECTION_VALUES = {"cat_a": 0.8, "cat_b": 0.6}
SPEEDS = {"cat_a": 12.5, "cat_b": 7.25}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def series(text: str, name: str, category: str) -> list[float]:
    pattern = rf'^{name}\{{[^}}]*category="{category}"[^}}]*\}} (\S+)$'
    return [float(v) for v in re.findall(pattern, text, flags=re.MULTILINE)]


def wait_for(port: int, name: str, category: str, timeout: float = 45.0) -> list[float]:
    """Ray exports a process's metrics every few seconds: poll until the series shows up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        values = series(scrape(port), name, category)
        if values:
            return values
        time.sleep(0.5)
    return []


@pytest.fixture(scope="module")
def tiny_run(ray_instance: int, tmp_path_factory: pytest.TempPathFactory, monkeypatch_module):
    """One small Tune experiment with the search's progress callback and offline W&B logging: two trials
    that each record their training speed and wait until the metrics port shows it."""
    from ray import cloudpickle, tune

    from tfsearch.run.training.callbacks import ProgressView

    # Ray workers cannot import this test module: send its functions by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    port = ray_instance
    run_dir = tmp_path_factory.mktemp("tiny-run")
    monkeypatch_module.setenv("WANDB_MODE", "disabled")  # tune_callbacks switches it; restored afterwards

    def trainable(config: dict) -> None:
        from tfsearch.infra import telemetry

        category = config["category"]
        telemetry.record_milestone(category, SPEEDS[category])
        seen = wait_for(port, "ray_tfsearch_train_images_per_second", category)
        tune.report({"epoch": 1, "selection_value": SELECTION_VALUES[category], "speed_seen": seen})

    view = ProgressView(
        SimpleNamespace(space=SimpleNamespace(metric="image_auroc"), estimate=None), quiet=True
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"category": tune.grid_search(sorted(SELECTION_VALUES))},
        run_config=tune.RunConfig(
            name="tiny",
            storage_path=str(run_dir / "tune"),
            callbacks=[view.callback(), *tune_callbacks(run_dir, "tiny", "offline", None, None)],
            verbose=0,
        ),
    )
    try:
        results = tuner.fit()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    return SimpleNamespace(
        port=port,
        run_dir=run_dir,
        results={r.config["category"]: r for r in results},
        finished=time.monotonic(),
    )


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_custom_metrics_appear_on_the_metrics_port_during_a_run(tiny_run):
    for category, result in tiny_run.results.items():
        assert result.error is None
        # seen by the trial itself, while it was still running
        assert result.metrics["speed_seen"] == [SPEEDS[category]]
    for category, value in SELECTION_VALUES.items():
        assert wait_for(tiny_run.port, "ray_tfsearch_best_selection_value", category) == [value]
        assert wait_for(tiny_run.port, "ray_tfsearch_trials_finished_total", category) == [1.0]


def test_the_best_values_stay_on_the_port_after_the_run(tiny_run):
    # Ray's agent drops a gauge series 2 export intervals (20 s) after it was last set: the driver's best
    # values, set once per result, must still be there well after that
    time.sleep(max(0.0, tiny_run.finished + 30.0 - time.monotonic()))
    text = scrape(tiny_run.port)
    assert {c: series(text, "ray_tfsearch_best_selection_value", c) for c in SELECTION_VALUES} == {
        c: [v] for c, v in SELECTION_VALUES.items()
    }


def test_refresh_sets_every_gauge_of_the_process_again(monkeypatch):
    from tfsearch.infra import telemetry

    calls = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def set(self, value, tags):
            calls.append((self.name, tags["category"], value))

    monkeypatch.setattr(telemetry, "_ray_running", lambda: True)
    monkeypatch.setattr(telemetry, "_metric", Recorder)
    monkeypatch.setattr(telemetry, "_gauges", {})
    monkeypatch.setattr(telemetry, "_refresher", threading.current_thread())  # no background thread here
    telemetry.record_best("a", 0.5)
    telemetry.record_best("a", 0.75)
    telemetry.record_milestone("b", 3)
    calls.clear()
    telemetry.refresh()
    assert sorted(calls) == [(telemetry.BEST_VALUE, "a", 0.75), (telemetry.IMAGES_PER_SECOND, "b", 3.0)]


def test_each_training_trial_is_a_wandb_run_offline(tiny_run):
    folders = sorted((tiny_run.run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    logged = {}
    for folder in folders:
        summary = inspect_offline_run(folder)
        assert summary["state"] == "finished" and summary["project"] == "tfsearch"
        logged[summary["config"]["category"]] = summary["summary"]["selection_value"]
    assert logged == SELECTION_VALUES
    assert "wandb sync" in (tiny_run.run_dir / "wandb" / SYNC_NOTE).read_text()


def test_tune_callbacks_follow_the_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tune_callbacks(tmp_path, "x", "disabled", None, None) == []
    assert not (tmp_path / "wandb").exists()
    with pytest.raises(InputError, match="--wandb online needs --wandb-project"):
        tune_callbacks(tmp_path, "x", "online", None, None)
    with pytest.raises(InputError, match="--wandb must be one of"):
        tune_callbacks(tmp_path, "x", "cloud", None, None)
    monkeypatch.chdir(tmp_path)
    (callback,) = tune_callbacks(Path("relative-run"), "x", "online", "proj", "team")
    # the mode reaches the logging actor through wandb.init, not only through this process's environment
    assert callback.kwargs["mode"] == "online" and Path(callback.kwargs["dir"]).is_absolute()
    # Ray passes the trial id as the run id and lets these keyword arguments override its resume=False
    assert callback.kwargs["resume"] == "allow"
    assert (callback.project, callback.kwargs["entity"], callback.group) == ("proj", "team", "x")
    assert not (tmp_path / "relative-run" / "wandb" / SYNC_NOTE).exists()  # online: nothing to sync by hand
    # the logging actors stage W&B's files in the run folder, and print no run summaries
    assert callback.env["WANDB_DATA_DIR"] == str(tmp_path / "relative-run" / "wandb" / "data")
    assert callback.env["WANDB_QUIET"] == "true" and callback.env["WANDB_MODE"] == "online"
    assert callback.settings == {}  # no config.json: only each trial's config
    # with the run's plan in config.json, every trial's run has the run's settings in its config
    planned = tmp_path / "planned"
    planned.mkdir()
    profile = {"name": "cpu", "epochs": 7, "lr": 0.5, "seed": 11, "batch_size": 4, "image_size": 64}
    plan = {
        "name": "x",
        "dataset": "demo",
        "space": {"name": "per_class"},
        "profile": profile,
        "precision": "bf16",
    }
    (planned / "config.json").write_text(json.dumps(plan))
    (callback,) = tune_callbacks(planned, "x", "offline", None, None)
    assert callback.settings == {
        "run": "x",
        "dataset": "demo",
        "space": "per_class",
        "profile": "cpu",
        "epochs": 7,
        "lr": 0.5,
        "batch_size": 4,
        "image_size": 64,
        "seed": 11,
        "precision": "bf16",
    }


def test_telemetry_is_a_no_op_without_ray():
    code = (
        "import sys; from tfsearch.infra import telemetry; telemetry.record_milestone('a', 1.0);"
        " telemetry.record_best('a', 0.5); telemetry.record_trial_finished('a');"
        " assert 'ray' not in sys.modules and not telemetry._metrics"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
