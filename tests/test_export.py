"""`tfsearch export`, `tfsearch predict`, `tfsearch.Detector`: a run's selected models, used on new images."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tfsearch.cli import main
from tfsearch.deploy.detector import Detector, resized
from tfsearch.deploy.export import choose_threshold
from tfsearch.deploy.manifest import read_export
from tfsearch.errors import InputError
from tfsearch.maps.cache import read_map_set
from tfsearch.maps.fusion import fuse
from tfsearch.maps.metrics import auroc, image_scores
from tfsearch.maps.score import read_map
from tfsearch.transfusion.job import TrainDir
from tfsearch.transfusion.profiles import Profile
from tfsearch.transfusion.unet import TransFusionUNet


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the maps of the driver and of Ray workers (which get one) are then bit-identical,
    and a shared machine is not oversubscribed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, shared_run):
    """The shared tiny per-class run (2 epochs at 32 px) and the export of its stripes model."""
    out = tmp_path_factory.mktemp("export") / "export"
    assert main(["export", str(shared_run.run_dir), "--out", str(out), "--categories", "stripes"]) == 0
    return shared_run.run_dir, out / "stripes"


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def selected_row(run_dir: Path) -> dict:
    (row,) = [r for r in read_rows(run_dir / "selected.csv") if r["category"] == "stripes"]
    return row


def training_runs(run_dir: Path) -> Path:
    """The folder that holds a run's training runs (its storage's `train`)."""
    return Path(json.loads((run_dir / "config.json").read_text())["storage"]) / "train"


def cached_fused_maps(run_dir: Path, row: dict):
    """The run's own test maps at the selected configuration, fused as the selection fused them."""
    cache = read_map_set(TrainDir(training_runs(run_dir) / "stripes" / row["selected_model"]).maps(
        int(row["selected_epoch"]), "test"))  # fmt: skip
    fused = fuse(cache.m_disc, cache.m_recon, float(row["selected_lam"]), int(row["selected_kernel"]))
    return cache, fused


# ------------------------------------------------------------------------------------------ threshold
def test_threshold_maximises_f1_and_sits_between_scores():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    labels = np.array([0, 0, 1, 0, 1, 1, 0, 1])
    chosen = choose_threshold(scores, labels)
    # brute force over every cut: F1 of "score >= cut"
    f1 = [2 * ((scores >= c) & (labels == 1)).sum() / ((scores >= c).sum() + labels.sum()) for c in scores]
    assert chosen["f1"] == pytest.approx(max(f1))
    assert chosen["value"] == pytest.approx(0.25)  # halfway between 0.2 and the lowest score it admits, 0.3
    assert chosen["method"] == "f1_max" and chosen["recall"] == 1.0 and chosen["fpr"] == 0.5

    at_fpr = choose_threshold(scores, labels, at_fpr=0.25)
    assert at_fpr["fpr"] <= 0.25 and at_fpr["value"] == pytest.approx(0.45)
    assert at_fpr["recall"] == 0.75  # the most recall any threshold with FPR <= 0.25 reaches
    with pytest.raises(InputError, match="no anomalous image"):
        choose_threshold(scores, np.zeros(8))
    with pytest.raises(InputError, match="--threshold-at-fpr 0.0: no threshold keeps the FPR"):
        choose_threshold(np.array([0.1, 0.9]), np.array([1, 0]), at_fpr=0.0)


# ------------------------------------------------------------------------------------------ export -> predict
def test_export_then_predict_reproduces_the_runs_test_metrics(exported, demo_dataset_root, tmp_path, capsys):
    run_dir, export = exported
    row = selected_row(run_dir)
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["model"]["epoch"] == int(row["selected_epoch"])
    assert manifest["model"]["lam"] == float(row["selected_lam"])
    assert manifest["model"]["kernel"] == int(row["selected_kernel"])
    assert manifest["selection"]["protocol"] == "test" and manifest["selection"]["metric"] == "image_auroc"
    assert manifest["selection"]["test_metrics"]["image_auroc"] == float(row["selected_test_image_auroc"])
    assert manifest["source"]["run"] == str(run_dir.resolve())
    assert {"tfsearch", "torch", "numpy"} <= set(manifest["versions"])
    # weights only: exactly the model's state dict, no optimiser, schedule or RNG state
    state = torch.load(export / "weights.pt", weights_only=True)
    profile = Profile.from_dict(manifest["model"]["profile"])
    assert set(state) == set(TransFusionUNet(profile).state_dict())

    out = tmp_path / "pred"
    test_dir = demo_dataset_root / "stripes" / "test"
    assert main(["predict", str(export), str(test_dir), "--out", str(out), "--quiet"]) == 0
    rows = read_rows(out / "scores.csv")
    cache, fused = cached_fused_maps(run_dir, row)
    names = [Path(r["image"]).relative_to(test_dir.parent).with_suffix("").as_posix() for r in rows]
    assert names == list(cache.image_ids)

    # the same maps (the cache keeps float16 raw maps), written at the images' own 128 px
    for name, fused_map in zip(names, fused, strict=True):
        written = read_map(out / "maps" / "stripes" / f"{name}.tiff")
        assert written.shape == (128, 128) and written.dtype == np.float32
        np.testing.assert_allclose(written, resized(fused_map, (128, 128)), atol=2e-3)
    assert (out / "overlays" / "stripes" / f"{names[0]}.png").is_file()

    # the same image AUROC as the run reported at the selected configuration
    scores = np.array([float(r["score"]) for r in rows])
    np.testing.assert_allclose(scores, image_scores(fused), atol=2e-3)
    assert auroc(cache.labels, scores) == pytest.approx(float(row["selected_test_image_auroc"]), abs=1e-12)

    # labels: the threshold chosen on the selection data (here the test split, oracle protocol)
    threshold = manifest["threshold"]
    reference = choose_threshold(image_scores(fused), cache.labels)
    assert threshold["value"] == pytest.approx(reference["value"]) and threshold["split"] == "test"
    labels = np.array([int(r["label"]) for r in rows])
    assert labels.tolist() == (scores >= threshold["value"]).astype(int).tolist()
    assert labels.tolist() == (image_scores(fused) >= threshold["value"]).astype(int).tolist()
    assert 2 * (labels & cache.labels).sum() / (labels.sum() + cache.labels.sum()) == pytest.approx(
        threshold["f1"]
    )

    # the maps folder is in the layout `tfsearch score` reads
    capsys.readouterr()
    score_args = ["score", "--dataset-root", str(demo_dataset_root), "--maps", str(out / "maps")]
    assert main([*score_args, "--dataset", "folder", "--category", "stripes", "--json", "--size", "32"]) == 0
    scored = json.loads(capsys.readouterr().out)["categories"]["stripes"]
    assert scored["images"] == len(rows) and scored["anomalous"] == int(cache.labels.sum())
    assert scored["image_auroc"] == pytest.approx(float(row["selected_test_image_auroc"]), abs=0.05)


def test_threshold_at_fpr_and_category_errors(exported, tmp_path, capsys):
    run_dir, _ = exported
    out = tmp_path / "fpr"
    assert main(["export", str(run_dir), "--out", str(out), "--threshold-at-fpr", "0.5"]) == 0
    threshold = json.loads((out / "stripes" / "manifest.json").read_text())["threshold"]
    assert threshold["method"] == "fpr" and threshold["target_fpr"] == 0.5 and threshold["fpr"] <= 0.5
    # a second export to the same place refuses rather than overwrite
    assert main(["export", str(run_dir), "--out", str(out)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--out", str(tmp_path / "x"), "--categories", "weave"]) == 2
    assert "--categories weave: not in" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "y")]) == 2
    assert "config.json is missing" in capsys.readouterr().err

    # a category whose training failed for good has nothing to export: named, never skipped silently
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial)
    with (partial / "selected.csv").open("a", newline="") as handle:
        columns = list(read_rows(run_dir / "selected.csv")[0])
        csv.DictWriter(handle, columns).writerow(
            {**dict.fromkeys(columns, ""), "dataset": "demo", "category": "weave", "status": "failed",
             "error": "RuntimeError: out of memory"}
        )  # fmt: skip
    assert main(["export", str(partial), "--out", str(tmp_path / "z")]) == 2
    assert "training failed for good in weave (weave: RuntimeError: out of memory)" in capsys.readouterr().err
    assert main(["export", str(partial), "--out", str(tmp_path / "z"), "--categories", "stripes"]) == 0


def test_a_corrupted_or_mismatched_export_is_refused(exported, tmp_path, capsys):
    _, export = exported

    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(export, target)
        return target

    corrupted = copy("corrupted")
    weights = bytearray((corrupted / "weights.pt").read_bytes())
    weights[len(weights) // 2] ^= 0xFF
    (corrupted / "weights.pt").write_bytes(bytes(weights))
    image = tmp_path / "one.png"
    Image.new("RGB", (20, 20)).save(image)
    assert main(["predict", str(corrupted), str(image), "--out", str(tmp_path / "p")]) == 2
    error = capsys.readouterr().err
    assert f"{corrupted / 'weights.pt'} does not match {corrupted / 'manifest.json'}" in error
    assert not (tmp_path / "p" / "scores.csv").exists()

    def edited(name: str, change) -> Path:
        folder = copy(name)
        manifest = json.loads((folder / "manifest.json").read_text())
        change(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return folder

    wider = edited("wider", lambda m: m["model"]["profile"].update(base_channels=16))
    with pytest.raises(InputError, match=r"wider/weights.pt \(described by .*\) does not fit the model"):
        Detector.load(wider)
    newer = edited("newer", lambda m: m.update(format_version=2))
    with pytest.raises(InputError, match=r"newer/manifest.json has export format version 2 .* version 1"):
        read_export(newer)
    partial = edited("partial", lambda m: m["model"].pop("lam"))
    with pytest.raises(InputError, match=r"partial/manifest.json lacks model.lam"):
        read_export(partial)
    with pytest.raises(InputError, match=r"manifest.json is missing"):
        read_export(tmp_path)


# ------------------------------------------------------------------------------------------ images
def test_predict_writes_maps_at_each_images_own_size_and_refuses_bad_images(exported, tmp_path, capsys):
    _, export = exported
    rng = np.random.default_rng(0)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(inputs / "wide.png")
    Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8)).save(inputs / "grey.png")
    out = tmp_path / "pred"
    assert main(["predict", str(export), str(inputs / "wide.png"), str(inputs / "grey.png"), "--out",
                 str(out), "--quiet", "--batch", "1"]) == 0  # fmt: skip
    assert read_map(out / "maps" / "stripes" / "wide.tiff").shape == (50, 70)
    assert read_map(out / "maps" / "stripes" / "grey.tiff").shape == (40, 30)
    with Image.open(out / "overlays" / "stripes" / "wide.png") as overlay:
        assert overlay.size == (70, 50) and overlay.mode == "RGB"
    rows = read_rows(out / "scores.csv")
    assert [Path(r["image"]).name for r in rows] == ["wide.png", "grey.png"]

    # the Python API gives the same maps and scores (in one batch of two here: float rounding differs)
    detector = Detector.load(export, device="cpu")
    wide = np.asarray(Image.open(inputs / "wide.png"))
    maps, scores = detector.predict([wide, inputs / "grey.png"])
    np.testing.assert_allclose(maps[0], read_map(out / "maps" / "stripes" / "wide.tiff"), atol=1e-6)
    assert scores.tolist() == pytest.approx([float(r["score"]) for r in rows], abs=1e-6)
    with pytest.raises(InputError, match=r"image 0 has shape \(8, 8, 4\): expected"):
        detector.predict([np.zeros((8, 8, 4), np.uint8)])

    # bad inputs stop the command before any inference, naming every file
    Image.new("RGBA", (20, 20)).save(inputs / "alpha.png")
    (inputs / "broken.png").write_bytes(b"not an image")
    assert main(["predict", str(export), str(inputs), "--out", str(tmp_path / "bad")]) == 2
    error = capsys.readouterr().err
    assert "2 of 4 inputs cannot be scored" in error
    assert f"{inputs / 'alpha.png'}: 4 channels (mode RGBA)" in error
    assert f"{inputs / 'broken.png'}: cannot read it" in error
    assert not (tmp_path / "bad").exists()
    assert main(["predict", str(export), str(tmp_path / "missing.png"), "--out", str(tmp_path / "m")]) == 2
    assert "missing.png: no such image or folder" in capsys.readouterr().err


def test_predict_on_ray_equals_the_single_machine_output(exported, demo_dataset_root, tmp_path):
    import ray

    _, export = exported
    images = demo_dataset_root / "stripes" / "test" / "good"
    common = ["predict", str(export), str(images), "--quiet", "--batch", "4"]
    assert main([*common, "--out", str(tmp_path / "local")]) == 0
    address = ray.get_runtime_context().gcs_address
    assert main([*common, "--out", str(tmp_path / "ray"), "--address", address, "--workers", "2"]) == 0
    local = (tmp_path / "local" / "scores.csv").read_text()
    assert (tmp_path / "ray" / "scores.csv").read_text() == local
    assert len(local.splitlines()) == 1 + len(list(images.glob("*.png")))
    for tiff in (tmp_path / "local" / "maps").rglob("*.tiff"):
        twin = tmp_path / "ray" / tiff.relative_to(tmp_path / "local")
        np.testing.assert_array_equal(read_map(twin), read_map(tiff))


def test_the_package_and_the_report_stay_free_of_torch():
    code = "import sys, tfsearch, tfsearch.report; assert 'torch' not in sys.modules; tfsearch.Detector"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_export_reads_checkpoints_and_maps_from_an_object_store(exported, tmp_path, s3_endpoint):
    """A run whose training runs live in s3:// (a moto server on 127.0.0.1) exports the same model."""
    from conftest import BUCKET, s3_uri

    from tfsearch.store.location import Location

    run_dir, export = exported
    uri = s3_uri(s3_endpoint, f"{BUCKET}/pc")
    Location.parse(uri).upload(training_runs(run_dir) / "stripes", "train/stripes")
    remote_run = tmp_path / "pc"  # the tables only, as on a machine that did not train
    remote_run.mkdir()
    shutil.copy(run_dir / "selected.csv", remote_run)
    config = json.loads((run_dir / "config.json").read_text())
    (remote_run / "config.json").write_text(json.dumps({**config, "storage": uri}))
    assert main(["export", str(remote_run), "--out", str(tmp_path / "out"), "--categories", "stripes"]) == 0

    manifest = json.loads((tmp_path / "out" / "stripes" / "manifest.json").read_text())
    local = json.loads((export / "manifest.json").read_text())
    assert manifest["source"]["training_run"].startswith(f"s3://{BUCKET}/pc/train/stripes/default")
    assert manifest["threshold"] == local["threshold"] and manifest["model"] == local["model"]
    remote_state = torch.load(tmp_path / "out" / "stripes" / "weights.pt", weights_only=True)
    local_state = torch.load(export / "weights.pt", weights_only=True)
    assert remote_state.keys() == local_state.keys()
    assert all(torch.equal(remote_state[k], local_state[k]) for k in local_state)
