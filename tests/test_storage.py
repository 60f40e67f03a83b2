"""Run storage (tfsearch.store.location): folders and object-store URIs, checked before any training, and a
whole `tfsearch run --storage s3://...` against a local S3-compatible server (moto on 127.0.0.1), its driver
killed and the run resumed, compared with a run whose storage is a folder."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import BUCKET, s3_uri
from test_search import comparable, read_rows, run_args, write_space

from tfsearch.cli import main
from tfsearch.errors import InputError
from tfsearch.maps.cache import MapSet, read_map_set, write_map_set
from tfsearch.store.location import Location, local_run_dir
from tfsearch.store.run_folder import MILESTONE_LOG

pytest.importorskip("moto.server", reason="moto[server] (the dev extra) runs the S3 tests")


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------ locations
def test_a_folder_is_absolute_and_used_in_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    location = Location.parse("shared")
    assert location.is_local and location.local_path == tmp_path / "shared"
    run = location.child("run-1")
    assert run.uri == str(tmp_path / "shared" / "run-1") and run.local_path == tmp_path / "shared" / "run-1"
    run.check()
    assert run.local_path.is_dir()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(InputError, match=r"--storage .*a-file/runs: cannot create the folder"):
        Location.parse("a-file/runs").check()


def test_a_uri_child_keeps_its_endpoint():
    location = Location.parse(s3_uri("127.0.0.1:9", "bucket/runs"))
    run = location.child("per_class-demo", "train")
    assert not run.is_local
    assert run.uri == "s3://bucket/runs/per_class-demo/train?endpoint_override=127.0.0.1:9&scheme=http"
    assert run.path == "bucket/runs/per_class-demo/train"


@pytest.mark.parametrize(
    "storage, message",
    [
        (lambda endpoint: "ftp://host/runs", "unknown scheme 'ftp'"),
        (lambda endpoint: s3_uri(f"127.0.0.1:{closed_port()}", f"{BUCKET}/runs"), "storage not reachable"),
        (
            lambda endpoint: s3_uri(endpoint, "no-such-bucket/runs"),
            "the bucket 'no-such-bucket' does not exist",
        ),
    ],
    ids=["unknown-scheme", "connection-refused", "missing-bucket"],
)
def test_bad_storage_fails_within_seconds_before_any_run(
    tmp_path, demo_dataset_root, capsys, s3_endpoint, storage, message
):
    uri = storage(s3_endpoint)
    started = time.perf_counter()
    args = run_args(write_space(tmp_path), tmp_path / "runs", demo_dataset_root, "bad", "--storage", uri)
    code = main(args)
    assert code == 2 and time.perf_counter() - started < 15
    error = capsys.readouterr().err
    assert f"--storage {uri}: {message}" in error
    assert not (tmp_path / "runs" / "bad").exists()


def test_folders_round_trip_with_meta_json_last(tmp_path, s3_endpoint):
    rng = np.random.default_rng(0)
    maps = MapSet(
        m_disc=rng.random((3, 8, 8)).astype(np.float16),
        m_recon=rng.random((3, 8, 8)).astype(np.float16),
        masks=rng.random((3, 8, 8)) > 0.7,
        labels=np.array([0, 1, 1], dtype=np.int8),
        image_ids=["a", "b", "c"],
        meta={"dataset": "demo", "category": "disk", "epoch": 1, "split": "test", "image_size": 8,
              "data_root": None, "mask_paths": [None, "b.png", "c.png"]},
    )  # fmt: skip
    write_map_set(tmp_path / "up" / "epoch-0001", maps)
    store = Location.parse(s3_uri(s3_endpoint, f"{BUCKET}/round-trip"))
    store.upload(tmp_path / "up", "maps")
    stored = store.files("maps")
    assert stored[-1] == "epoch-0001/meta.json" and len(stored) == 6  # the commit file goes up last
    assert store.folders("maps") == ["epoch-0001"]

    assert store.download("maps/epoch-0001", tmp_path / "down")
    back = read_map_set(tmp_path / "down")
    assert np.array_equal(back.m_disc, maps.m_disc) and np.array_equal(back.masks, maps.masks)
    assert back.image_ids == maps.image_ids
    assert not store.download("maps/epoch-0002", tmp_path / "absent") and not (tmp_path / "absent").exists()
    assert store.read_text("maps/none.json") is None
    with pytest.raises(InputError, match="RUN_DIR .*: not a run: config.json is missing"):
        local_run_dir(store.uri)


# --------------------------------------------------------------------------------------------- a run
def test_s3_run_killed_then_resumed_matches_the_folder_run(tmp_path, s3_endpoint, shared_run, monkeypatch):
    """The shared run's stripes again, with an object store as storage, its driver killed once the first
    milestone was logged and the run resumed: no milestone is trained twice, and the rows are the ones of
    the shared run, which nothing interrupted."""
    import ray

    space = write_space(tmp_path)
    root = tmp_path / "runs"
    storage = s3_uri(s3_endpoint, f"{BUCKET}/runs")
    address = ray.get_runtime_context().gcs_address
    args = [
        *run_args(space, root, shared_run.plan.data_root, "s3", "--categories", "stripes"),
        *("--storage", storage, "--address", address),
    ]
    store = Location.parse(storage).child("s3")
    first = store.child("train", "stripes", "default", "checkpoints", "epoch-0001", "model.pt")

    def logged() -> list[dict]:
        return json.loads(store.read_text(f"train/stripes/default/{MILESTONE_LOG}") or "[]")

    driver = subprocess.Popen([sys.executable, "-m", "tfsearch.cli", *args], env=os.environ.copy())
    deadline = time.time() + 240
    while not logged() and time.time() < deadline and driver.poll() is None:
        time.sleep(0.5)
    assert logged(), "the driver never logged its first milestone"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not (root / "s3" / "selected.csv").exists()
    stamp = first.filesystem.get_file_info(first.path).mtime

    assert main([*args, "--resume"]) == 0
    assert first.filesystem.get_file_info(first.path).mtime == stamp  # the logged milestone was not retrained

    def stripes(rows: list[dict]) -> list[dict]:
        return [r for r in rows if r["category"] == "stripes"]

    s3_run, folder_run = root / "s3", shared_run.run_dir
    assert read_rows(s3_run / "selected.csv") == stripes(read_rows(folder_run / "selected.csv"))
    s3_rows = comparable(read_rows(s3_run / "trials.csv"))
    assert s3_rows == stripes(comparable(read_rows(folder_run / "trials.csv")))
    assert len([r for r in s3_rows if r["stage"] == "train"]) == 2

    # the object store holds the training run, Tune's experiment and the tables; the run folder only a cache
    training = store.files("train/stripes/default")
    for epoch in ("0001", "0002"):
        assert f"checkpoints/epoch-{epoch}/model.pt" in training
        assert f"maps/test/epoch-{epoch}/meta.json" in training
    # the optimiser state only at the latest milestone, and no second copy of any checkpoint in Tune's folder
    assert [f for f in training if f.endswith("trainer.pt")] == ["checkpoints/epoch-0002/trainer.pt"]
    assert not [f for f in store.files("tune") if "checkpoint" in f]
    assert {"job.json", "history.csv", "milestones.json"} <= set(training)
    assert store.folders("tune") == ["train"]
    # and the results the run folder wrote last: the studies and the report
    assert {"studies.db", "report/report.md", "report/report.html"} <= set(store.files())
    assert not (root / "s3" / "train").exists() and (root / "s3" / "cache" / "train" / "stripes").is_dir()

    # `tfsearch report` reads a run from its URI through a local copy of the tables
    local = local_run_dir(store.uri, cache=tmp_path / "report-cache")
    for table in ("config.json", "trials.csv", "selected.csv"):
        assert (local / table).read_bytes() == (root / "s3" / table).read_bytes()
    from tfsearch.report import load_run

    assert list(load_run(local).selected["category"]) == ["stripes"]

    # a trial that starts anywhere continues from what the store holds: nothing is trained again
    from tfsearch.run.training.trainable import TrainingFolder, category_job
    from tfsearch.transfusion.job import TrainJob
    from tfsearch.transfusion.runtime import Runtime
    from tfsearch.transfusion.trainer import Trainer

    monkeypatch.setenv("TFSEARCH_SCRATCH", str(tmp_path))
    template = TrainJob.from_dict(json.loads(store.read_text("train/stripes/default/job.json")))
    # even after an attempt killed while it published milestone 2: the log lacks it, and the upload of its
    # maps stopped before their commit file (the trainer recomputes them from the weights)
    log = json.loads(store.read_text("train/stripes/default/milestones.json"))
    (tmp_path / "log.json").write_text(json.dumps([r for r in log if r["epoch"] != 2]))
    store.upload(tmp_path / "log.json", "train/stripes/default/milestones.json")
    store.delete("train/stripes/default/maps/test/epoch-0002/meta.json")
    with TrainingFolder(store.uri, "stripes", "default") as folder:
        assert folder.path.parent == tmp_path
        assert not (folder.path / "maps" / "test" / "epoch-0002").exists()
        trainer = Trainer(category_job(template, "stripes", {}), folder.path, Runtime(progress=False))
        trainer.start(resume=True)
        assert trainer.has_maps(2) and trainer.epoch == 2 and trainer.fit() == []
    assert not folder.path.exists()  # the scratch copy is gone, everything in it was uploaded
