"""Interrupted, damaged or contended runs never pass for results: SIGINT and SIGTERM at any stage, damaged
state files, one driver per run folder, a full disk, refused cluster connections."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from test_search import TINY, comparable, read_rows, run_args
from test_train import QUIET, tiny_job

from tfsearch.cli import interruption_note, main
from tfsearch.errors import InputError, Interrupted
from tfsearch.infra.interrupts import Interruptions
from tfsearch.store.lock import run_lock
from tfsearch.transfusion.job import TrainDir
from tfsearch.transfusion.trainer import Trainer, train

EPOCHS = 4


def tiny_sampled(folder: Path) -> Path:
    """A per-class TPE space (64 candidates over epoch, λ and n) on the tests' tiny network: a sampled study
    cut short is drawn again from the start on --resume, which these tests check."""
    payload = {
        "name": "sampled",
        "scope": "per_class",
        "profile": TINY["profile"],
        "profile_overrides": {**TINY["profile_overrides"], "epochs": EPOCHS},
        # every metric per candidate: slower candidates, time to stop the selection
        "selection": {
            "metric": "image_auroc",
            "sampler": "tpe",
            "trials": 64,
            "seed": 0,
            "all_metrics": True,
        },
        "params": {
            "epoch": "milestones",
            "lam": {"low": 0.5, "high": 1.0},
            "kernel": {"choices": [1, 3, 5, 7, 9, 11, 15]},
        },
    }
    path = folder / "sampled.yaml"
    path.write_text(yaml.safe_dump(payload))
    return path


def arguments(root: Path, data_root: Path, name: str) -> list[str]:
    return run_args(tiny_sampled(root), root / "runs", data_root, name, "--categories", "stripes")


def results(run: Path) -> tuple[list[dict], list[dict]]:
    return read_rows(run / "selected.csv"), comparable(read_rows(run / "trials.csv"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_dataset_root, ray_instance) -> tuple[list[dict], list[dict]]:
    """The tables of the same run, never interrupted."""
    root = tmp_path_factory.mktemp("reference")
    assert main(arguments(root, demo_dataset_root, "run")) == 0
    return results(root / "runs" / "run")


def logged_epochs(run: Path) -> list[int]:
    log = run / "train" / "stripes" / "default" / "milestones.json"
    return [row["epoch"] for row in json.loads(log.read_text())] if log.is_file() else []


def selection_started(run: Path) -> bool:
    """The stripes study holds a candidate but no choice yet."""
    if not (run / "studies.db").is_file() or logged_epochs(run)[-1:] != [EPOCHS]:
        return False
    try:
        study = optuna.load_study(
            study_name="sampled/demo/stripes", storage=f"sqlite:///{run / 'studies.db'}"
        )
    except KeyError:
        return False
    return len(study.trials) > 0 and "choice" not in study.user_attrs


@pytest.mark.parametrize(
    ("signum", "stage"),
    [
        (signal.SIGINT, "training"),
        (signal.SIGTERM, "training"),
        (signal.SIGINT, "selection"),
        (signal.SIGTERM, "selection"),
    ],
    ids=lambda value: value.name if isinstance(value, signal.Signals) else value,
)
def test_a_signal_stops_the_run_and_resume_gives_the_uninterrupted_results(
    tmp_path, demo_dataset_root, ray_instance, reference, signum, stage
):
    import ray

    args = arguments(tmp_path, demo_dataset_root, "run")
    run = tmp_path / "runs" / "run"
    address = ["--address", ray.get_runtime_context().gcs_address]  # joins this session's Ray: no start-up
    driver = subprocess.Popen(
        [sys.executable, "-m", "tfsearch.cli", *args, *address],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stderr=subprocess.PIPE,
        text=True,
    )
    reached = (lambda: logged_epochs(run) == [1]) if stage == "training" else (lambda: selection_started(run))
    deadline = time.time() + 300
    while not reached() and driver.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert driver.poll() is None, f"the run ended before its {stage}: {driver.stderr.read()[-3000:]}"
    driver.send_signal(signum)
    sent = time.time()
    stderr = driver.communicate(timeout=120)[1]
    assert driver.returncode == 128 + signum, stderr[-3000:]
    assert time.time() - sent < 60
    name = signal.Signals(signum).name
    assert f"tfsearch run: interrupted by {name} during {stage}" in stderr
    assert "--resume" in stderr.splitlines()[-1]
    # nothing selected or tabulated from what had not finished
    assert not (run / "selected.csv").exists() and not (run / "trials.csv").exists()
    if stage == "training":
        assert logged_epochs(run)[-1] < EPOCHS

    assert main([*args, "--resume"]) == 0
    assert results(run) == reference
    assert logged_epochs(run) == list(range(1, EPOCHS + 1))  # each milestone trained once


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, demo_dataset_root, ray_instance) -> tuple[list[str], Path]:
    root = tmp_path_factory.mktemp("finished")
    args = arguments(root, demo_dataset_root, "run")
    assert main(args) == 0
    return args, root / "runs" / "run"


def resume_fails(args: list[str], run: Path, capsys) -> str:
    """--resume of the finished run exits 2 and changes none of its tables; returns its message."""
    tables = {name: (run / name).read_bytes() for name in ("selected.csv", "trials.csv")}
    assert main([*args, "--resume"]) == 2
    assert {name: (run / name).read_bytes() for name in tables} == tables
    return capsys.readouterr().err


def test_a_damaged_milestone_is_named_not_skipped(finished_run, capsys):
    args, run = finished_run
    meta = run / "train" / "stripes" / "default" / "maps" / "test" / f"epoch-{EPOCHS:04d}" / "meta.json"
    saved = meta.read_bytes()
    os.truncate(meta, 100)
    try:
        error = resume_fails(args, run, capsys)
    finally:
        meta.write_bytes(saved)
    assert f"milestone {EPOCHS} of" in error and str(meta) in error and "damaged" in error
    assert "tfsearch evaluate" in error  # how to recompute it from the weights
    assert main([*args, "--resume"]) == 0  # mended, the run resumes


@pytest.mark.parametrize(
    ("relative", "named"),
    [
        ("config.json", "the run's plan"),
        ("train/stripes/default/milestones.json", "milestone log"),
        ("studies.db", "Optuna studies"),
    ],
)
def test_a_damaged_state_file_is_exit_2_naming_it(finished_run, capsys, relative, named):
    args, run = finished_run
    path = run / relative
    saved = path.read_bytes()
    os.truncate(path, len(saved) // 2)
    try:
        error = resume_fails(args, run, capsys)
    finally:
        path.write_bytes(saved)
    assert str(path) in error and named in error and "damaged" in error


def test_a_damaged_training_state_is_named(tmp_path, demo_dataset_root):
    job = tiny_job(demo_dataset_root)
    train(job, tmp_path / "run", QUIET)
    state = TrainDir(tmp_path / "run").checkpoint(4) / "trainer.pt"
    os.truncate(state, 1000)
    with pytest.raises(InputError, match=rf"{state}: cannot be loaded .* may be damaged"):
        Trainer(job, tmp_path / "run", QUIET).start(resume=True)


def test_a_second_driver_on_the_same_run_is_refused_naming_the_holder(finished_run, capsys):
    args, run = finished_run
    with run_lock(run, "tfsearch run --name run (the other one)"):
        error = resume_fails(args, run, capsys)
    assert f"{run} is in use by tfsearch run --name run (the other one) (pid {os.getpid()}" in error
    assert main([*args, "--resume"]) == 0  # released, it runs


def test_a_lock_leaves_no_folder_it_made_for_nothing(tmp_path):
    with pytest.raises(RuntimeError), run_lock(tmp_path / "new", "test"):
        raise RuntimeError
    assert not (tmp_path / "new").exists()


def test_a_refused_address_leaves_the_corrected_command_free(tmp_path, demo_dataset_root, capsys):
    import socket

    with socket.socket() as listener:  # a port nothing listens on
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
    args = arguments(tmp_path, demo_dataset_root, "run")
    assert main([*args, "--address", f"127.0.0.1:{port}"]) == 2
    assert f"--address 127.0.0.1:{port}: no Ray cluster reachable there" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "run").exists()


def test_the_interruption_note_says_how_to_continue():
    from types import SimpleNamespace

    exc = Interrupted(signal.SIGTERM, "selection")
    argv = ["run", "--space", "per_class", "--name", "a b"]
    note = interruption_note(exc, argv, SimpleNamespace(resume=False))
    assert note == (
        "interrupted by SIGTERM during selection; nothing unfinished was published."
        " Continue with: tfsearch run --space per_class --name 'a b' --resume"
    )
    assert exc.exit_code == 143 and Interrupted(signal.SIGINT).exit_code == 130
    assert interruption_note(Interrupted(signal.SIGINT), ["report", "r"], SimpleNamespace()) == (
        "interrupted by SIGINT; nothing unfinished was published"
    )


def test_interruptions_raise_or_stop_gracefully_and_restore_the_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    interruptions = Interruptions()
    with interruptions.installed(), pytest.raises(Interrupted) as raised:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    assert raised.value.signum == signal.SIGTERM
    stops = []
    with interruptions.installed():
        with interruptions.gracefully(lambda: stops.append(True)):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
        assert stops == [True]
        with pytest.raises(Interrupted, match="training"):
            interruptions.check("training")
    assert {s: signal.getsignal(s) for s in before} == before
    assert "TUNE_DISABLE_SIGINT_HANDLER" not in os.environ


# ------------------------------------------------------------------------------------ tfsearch train
def train_args(data_root: Path, out: Path) -> list[str]:
    return [
        "train", "--dataset", "demo", "--data-root", str(data_root), "--category", "stripes",
        "--profile", "cpu", "--epochs", "2", "--milestones", "1,2", "--out", str(out), "--quiet",
    ]  # fmt: skip


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_tfsearch_train_which_resumes(tmp_path, demo_dataset_root, signum):
    out = tmp_path / "run"
    driver = subprocess.Popen(
        [sys.executable, "-m", "tfsearch.cli", *train_args(demo_dataset_root, out)],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not TrainDir(out).weight_epochs() and driver.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    driver.send_signal(signum)
    stderr = driver.communicate(timeout=120)[1]
    assert driver.returncode == 128 + signum, stderr[-3000:]
    assert f"interrupted by {signal.Signals(signum).name} during training" in stderr
    assert stderr.splitlines()[-1].endswith("--resume")
    assert main([*train_args(demo_dataset_root, out), "--resume"]) == 0
    assert TrainDir(out).weight_epochs() == [1, 2]


def test_a_full_disk_under_tfsearch_train_is_exit_2_and_resumes_equal(
    tmp_path, demo_dataset_root, monkeypatch, capsys
):
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert main(train_args(demo_dataset_root, reference)) == 0
    real_save = np.save

    def full_at_the_second_milestone(file, array, *args, **kwargs):
        if "epoch-0002" in str(getattr(file, "name", file)):
            raise OSError(28, "No space left on device", str(file))
        return real_save(file, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", full_at_the_second_milestone)
    assert main(train_args(demo_dataset_root, out)) == 2
    error = capsys.readouterr().err
    assert f"{out}: no space left on the device" in error and "--resume" in error
    assert TrainDir(out).map_epochs() == [1]  # the milestone before is intact
    monkeypatch.undo()
    assert main([*train_args(demo_dataset_root, out), "--resume"]) == 0
    for name in ("m_disc", "m_recon"):
        a = np.load(TrainDir(reference).maps(2) / f"{name}.npy")
        assert np.array_equal(a, np.load(TrainDir(out).maps(2) / f"{name}.npy"))
    weights = [torch.load(TrainDir(d).weights(2), weights_only=True)["model"] for d in (reference, out)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
