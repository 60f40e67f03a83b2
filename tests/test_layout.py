"""The package's layout holds: import contracts, torch-free stages, module sizes, the library internals that
tfsearch reaches into, and run folders written before the layout."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tfsearch.cli import main

PACKAGE = Path(__file__).resolve().parent.parent / "tfsearch"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_import_contracts_are_kept():
    """pyproject.toml's [tool.importlinter] contracts: layers, nothing imports cli, torch-free maps/report."""
    lint = shutil.which("lint-imports")
    assert lint, "lint-imports (import-linter, a dev dependency) is not installed"
    result = subprocess.run([lint], capture_output=True, text=True, cwd=PACKAGE.parent, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("package", ["tfsearch.maps", "tfsearch.report", "tfsearch.store", "tfsearch.data"])
def test_stages_below_the_model_leave_torch_unimported(package):
    modules = sorted(
        f"{package}.{path.stem}"
        for path in (PACKAGE / package.split(".")[1]).glob("*.py")
        if path.stem != "__init__"
    )
    code = f"import sys\nfor m in {modules!r}: __import__(m)\n"
    code += "print([m for m in ('torch', 'ray') if m in sys.modules])"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert result.stdout.strip() == "[]", (package, result.stdout)


def test_modules_stay_small():
    """No module over 400 lines; each command's module in cli/ under 120."""
    sizes = {
        path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines())
        for path in PACKAGE.rglob("*.py")
    }
    assert {name: n for name, n in sizes.items() if n > 400} == {}
    assert {name: n for name, n in sizes.items() if name.startswith("cli/") and n > 120} == {}


def test_tune_internals_that_resume_relies_on():
    """On --resume the training stage sets this command's failure config and callbacks on the RunConfig Ray
    restored (no public setter): through `Tuner._local_tuner.get_run_config()`, which must return the very
    object the tuner runs with."""
    from ray import tune

    run_config = tune.RunConfig(name="t", failure_config=tune.FailureConfig(max_failures=3))
    internal = tune.Tuner(lambda config: None, run_config=run_config)._local_tuner
    assert internal is not None
    restored = internal.get_run_config()
    assert restored is internal.get_run_config()
    assert restored.failure_config.max_failures == 3


# ------------------------------------------------------------------- run folders of tfsearch 0.1.0
def test_a_finished_run_of_the_previous_layout_reports_and_exports(tmp_path, capsys):
    """tests/fixtures/run-0.1.0 was written by tfsearch 0.1.0 (the flat layout): a one-category tiny run,
    its report folder left out. Its tables and export come out as 0.1.0 made them (published_comparison.csv
    has had a `run` column since: the report compares several runs of a dataset)."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run-0.1.0", run)
    expected = FIXTURES / "run-0.1.0-expected"
    assert (
        main(["report", str(run), "--out", str(tmp_path / "report"), "--wandb", "disabled", "--quiet"]) == 0
    )
    for table in sorted((expected / "tables").glob("*.csv")):
        assert (tmp_path / "report" / "tables" / table.name).read_text() == table.read_text(), table.name
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    manifest = json.loads((tmp_path / "export" / "disk" / "manifest.json").read_text())
    old = json.loads((expected / "manifest.json").read_text())
    for key in (
        "category",
        "dataset",
        "format",
        "format_version",
        "model",
        "selection",
        "threshold",
        "weights",
    ):
        assert manifest[key] == old[key], key
    assert manifest["versions"]["tfsearch"] != old["versions"]["tfsearch"] == "0.1.0"


def test_resuming_a_run_of_the_previous_layout_is_refused_naming_its_version(
    tmp_path, monkeypatch, capsys, demo_dataset_root, ray_instance
):
    """Ray pickled 0.1.0's module paths into the run's experiment state: --resume says which version started
    it and leaves the run as it was."""
    run = tmp_path / "runs" / "old"
    shutil.copytree(FIXTURES / "run-0.1.0", run)
    config = json.loads((run / "config.json").read_text())
    config.update(data_root=str(demo_dataset_root), storage=str(run))  # where the copy lives now
    (run / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(FIXTURES / "run-0.1.0-space.yaml", tmp_path / "tiny.yaml")

    def files() -> dict:  # all but the lock of the command that ran there
        return {path: path.read_bytes() for path in run.rglob("*") if path.is_file() and path.name != ".lock"}

    before = files()
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--space", "tiny.yaml", "--dataset", "demo", "--data-root", str(demo_dataset_root)]
    argv += ["--runs-root", "runs", "--name", "old", "--categories", "disk", "--resume", "--quiet"]
    assert main([*argv, "--wandb", "disabled"]) == 2
    error = capsys.readouterr().err
    assert "was started by tfsearch 0.1 (which recorded no version)" in error
    assert "(tfsearch.training_stage)" in error and "start it again under another --name" in error
    assert files() == before
