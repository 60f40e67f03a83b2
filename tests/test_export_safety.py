"""An export folder and a finished run are data, never code or paths: hostile or damaged ones are refused with
an InputError (exit 2) naming the file and key, before anything is opened, allocated or written elsewhere."""

import errno
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import tfsearch.deploy.detector
import tfsearch.deploy.export
from tfsearch.cli import main
from tfsearch.deploy.detector import Detector, collect_images, output_path
from tfsearch.deploy.manifest import EXPORT_FORMAT, EXPORT_VERSION, read_export
from tfsearch.errors import InputError
from tfsearch.transfusion.profiles import Profile
from tfsearch.transfusion.unet import TransFusionUNet

# a network of a few thousand parameters at 16 px: an export of it is written and scored in milliseconds
TINY_PROFILE = Profile.from_dict(
    {
        "name": "cpu",
        "image_size": 16,
        "base_channels": 8,
        "channel_mults": [1, 2],
        "attention": [False, True],
        "norm_groups": 4,
        "head_norm_groups": 4,
        "time_dim": 32,
        "steps": 4,
        "inference_batch": 4,
    }
)


def tree(root: Path) -> dict[str, bytes | str]:
    """Everything under `root`: file bytes, link targets, folders, by relative path."""
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[key] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            found[key] = "dir"
        else:
            found[key] = path.read_bytes()
    return found


def write_export(folder: Path, profile: Profile = TINY_PROFILE, category: str = "widget") -> Path:
    """A valid export folder of a freshly initialised tiny network, as `tfsearch export` lays it out."""
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save(TransFusionUNet(profile).state_dict(), buffer)
    weights = buffer.getvalue()
    folder.mkdir(parents=True)
    (folder / "weights.pt").write_bytes(weights)
    manifest = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "dataset": "demo",
        "category": category,
        "model": {
            "epoch": 1,
            "lam": 0.9,
            "kernel": 3,
            "image_size": profile.image_size,
            "profile": profile.to_dict(),
        },
        "threshold": {"value": 0.5},
        "weights": {
            "file": "weights.pt",
            "sha256": hashlib.sha256(weights).hexdigest(),
            "bytes": len(weights),
        },
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def edit(folder: Path, change) -> Path:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture
def place(tmp_path: Path) -> Path:
    """tmp/place/{export, image.png}, with --out tmp/place/a/b/out: a traversal has folders to climb."""
    root = tmp_path / "place"
    write_export(root / "export")
    Image.new("RGB", (20, 12), (90, 120, 30)).save(root / "image.png")
    (root / "a" / "b").mkdir(parents=True)
    return root


def predict(root: Path, export: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["predict", str(export), str(root / "image.png"), "--out", str(root / "a/b/out"), "--quiet"])
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------ manifests
def test_an_untouched_export_predicts_only_under_out(place, capsys):
    """The control: the tiny export as written scores the image, writing maps, overlays and scores.csv only
    under --out."""
    before = tree(place)
    code, error = predict(place, place / "export", capsys)
    assert code == 0, error
    after = tree(place)
    assert {k: v for k, v in after.items() if not k.startswith("a/b/out")} == before
    assert sorted(k for k in after if k.startswith("a/b/out/") and after[k] != "dir") == [
        "a/b/out/maps/widget/image.tiff",
        "a/b/out/overlays/widget/image.png",
        "a/b/out/scores.csv",
    ]


@pytest.mark.parametrize(
    "category", ["../../../../escaped", "../escaped", "a/b", "..", ".", "", "/abs/x", "back\\slash", 7]
)
def test_a_category_that_is_a_path_is_refused_and_nothing_is_written(place, category, capsys):
    export = edit(place / "export", lambda m: m.update(category=category))
    before = tree(place.parent)
    code, error = predict(place, export, capsys)
    assert code == 2
    assert f"{export / 'manifest.json'} category is {category!r}: expected a plain name" in error
    assert tree(place.parent) == before  # nothing written anywhere, --out included
    with pytest.raises(InputError, match="category is"):
        Detector.load(export)


@pytest.mark.parametrize("kind", ["parent", "absolute", "nested"])
def test_weights_named_outside_the_export_are_refused(place, kind, capsys):
    """weights.file naming a file outside the folder (with its right SHA-256, so that only the name is
    wrong) is refused as a name."""
    outside = place / "outside.pt"
    shutil.copy(place / "export" / "weights.pt", outside)
    name = {"parent": "../outside.pt", "absolute": str(outside), "nested": "sub/weights.pt"}[kind]
    if kind == "nested":
        (place / "export" / "sub").mkdir()
        shutil.copy(outside, place / "export" / "sub" / "weights.pt")
    export = edit(place / "export", lambda m: m["weights"].update(file=name))
    before = tree(place.parent)
    code, error = predict(place, export, capsys)
    assert code == 2
    assert f"{export / 'manifest.json'} weights.file is {name!r}: expected a plain name" in error
    assert tree(place.parent) == before


def test_symlinked_weights_are_refused(place, capsys):
    """weights.pt as a symbolic link to a file outside the folder (the right weights, the right SHA-256) is
    refused: the link is never followed."""
    outside = place / "outside.pt"
    export = place / "export"
    (export / "weights.pt").rename(outside)
    (export / "weights.pt").symlink_to(outside)
    before = tree(place.parent)
    code, error = predict(place, export, capsys)
    assert code == 2
    assert (
        f"{export / 'weights.pt'} is a symbolic link (named by {export / 'manifest.json'} weights.file)"
        in error
    )
    assert tree(place.parent) == before
    # a link to a file inside the folder is no better: the weights are the folder's own regular file
    (export / "weights.pt").unlink()
    outside.rename(export / "real.pt")
    (export / "weights.pt").symlink_to("real.pt")
    with pytest.raises(InputError, match="weights.pt is a symbolic link"):
        read_export(export)
    (export / "weights.pt").unlink()
    (export / "weights.pt").mkdir()
    with pytest.raises(InputError, match="weights.pt is not a regular file"):
        read_export(export)


def test_a_profile_the_weights_do_not_fit_is_refused_before_any_allocation(place, monkeypatch, capsys):
    """base_channels 4096 with the real 8-channel weights: refused on the shapes, from the meta device,
    without the network being built for real (a spy fails the test if it is)."""
    built = []

    class Spy(TransFusionUNet):
        def __init__(self, profile):
            if torch.empty(0).device.type != "meta":
                built.append(profile.base_channels)
                assert profile.base_channels != 4096, "the 4096-channel network was allocated"
            super().__init__(profile)

    monkeypatch.setattr(tfsearch.deploy.detector, "TransFusionUNet", Spy)
    monkeypatch.setattr(tfsearch.deploy.export, "TransFusionUNet", Spy)
    export = edit(place / "export", lambda m: m["model"]["profile"].update(base_channels=4096))
    before = tree(place.parent)
    code, error = predict(place, export, capsys)
    assert code == 2
    assert (
        f"{export / 'weights.pt'} (described by {export / 'manifest.json'}) does not fit the model" in error
    )
    assert "stem.weight is (8, 5, 3, 3) in the weights, (4096, 5, 3, 3) by the profile" in error
    assert built == [] and tree(place.parent) == before


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            ("profile", "base_channels"),
            10**9,
            "model.profile.base_channels is 1000000000: expected an integer",
        ),
        (("profile", "image_size"), 10**6, "model.profile.image_size is 1000000: expected an integer from 8"),
        (("profile", "inference_batch"), 0, "model.profile.inference_batch is 0: expected an integer from 1"),
        (
            ("profile", "channel_mults"),
            [1, 1000],
            "model.profile.channel_mults is [1, 1000]: expected 1 to 8",
        ),
        (
            ("profile", "channel_mults"),
            [1, 2, 2, 2, 2, 2, 2, 2, 2],
            "channel_mults is [1, 2, 2, 2, 2, 2, 2, 2, 2]",
        ),
        (("profile", "image_size"), 17, "model.profile.image_size is 17: expected a multiple of 2"),
        (
            ("profile", "base_channels"),
            "8",
            "invalid model profile (model.profile): profile field base_channels",
        ),
        (("kernel",), 10**7, "model.kernel is 10000000: expected an odd integer from 1 to 33"),
        (("lam",), "high", "model.lam is 'high': expected a number from 0 to 1"),
        (("profile",), [], "model.profile is []: expected the profile's fields"),
    ],
)
def test_absurd_manifest_values_are_refused_naming_the_key(place, path, value, message, capsys):
    def change(manifest):
        section = manifest["model"]
        for key in path[:-1]:
            section = section[key]
        section[path[-1]] = value

    export = edit(place / "export", change)
    before = tree(place.parent)
    code, error = predict(place, export, capsys)
    assert code == 2 and f"{export / 'manifest.json'}" in error and message in error, error
    assert tree(place.parent) == before


# ------------------------------------------------------------------------------------------ outputs
def test_output_paths_stay_under_out(tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert (
        output_path(out, "maps", "widget", "test/bad/001", ".tiff") == out / "maps/widget/test/bad/001.tiff"
    )
    for category, name in [("..", "x"), ("widget", "../../x"), ("widget", "a/../../x"), ("a/b", "x")]:
        with pytest.raises(InputError, match="expected a plain name"):
            output_path(out, "maps", category, name, ".tiff")
    # a folder given as `..` keeps its own name, not a `..` that would climb out of the category's folder
    images = tmp_path / "images" / "inner"
    images.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(images / "one.png")
    monkeypatch.chdir(images)
    found, _ = collect_images([Path(".."), Path(".")])
    assert [image.name for image in found] == ["images/inner/one", "inner/one"]


# ------------------------------------------------------------------------------------------ damaged runs
@pytest.fixture(scope="module")
def run_copy(tmp_path_factory, shared_run) -> Path:
    """A copy of the shared finished run with its training runs in its own `train/`, to damage."""
    run = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(shared_run.run_dir, run)
    storage = Path(json.loads((run / "config.json").read_text())["storage"])
    shutil.copytree(storage / "train", run / "train")
    return run


def selected_checkpoint(run: Path, category: str) -> Path:
    import csv

    with (run / "selected.csv").open(newline="") as handle:
        (row,) = [r for r in csv.DictReader(handle) if r["category"] == category]
    return (
        run
        / "train"
        / category
        / row["selected_model"]
        / "checkpoints"
        / f"epoch-{int(row['selected_epoch']):04d}"
    )


@pytest.mark.parametrize("damage", ["truncated model.pt", "truncated trainer.pt", "garbage job.json"])
def test_a_damaged_training_run_gives_exit_2_naming_the_file_and_no_export_folder(
    run_copy, tmp_path, damage, capsys
):
    run = tmp_path / "run"
    shutil.copytree(run_copy, run)
    out = tmp_path / "out"
    assert main(["export", str(run), "--out", str(out), "--categories", "disk"]) == 0
    earlier = tree(out)

    checkpoint = selected_checkpoint(run, "stripes")
    model = checkpoint / "model.pt"
    if damage == "truncated model.pt":
        damaged = model
        damaged.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    elif damage == "truncated trainer.pt":  # a run written before model.pt: the weights are in trainer.pt
        damaged = checkpoint / "trainer.pt"
        damaged.write_bytes(model.read_bytes()[:1000])
        model.unlink()
    else:
        damaged = checkpoint.parent.parent / "job.json"
        damaged.write_text('{"profile": ')
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(out), "--categories", "stripes"]) == 2
    error = capsys.readouterr().err
    assert str(damaged) in error and "damaged" in error, error
    assert "Traceback" not in error
    assert tree(out) == earlier  # no stripes folder, no temporary folder left, disk's export untouched


def test_an_export_that_fails_while_writing_leaves_no_partial_folder(run_copy, tmp_path, monkeypatch, capsys):
    """The disk fills up after the weights are written: neither they nor a temporary folder stay, and an
    earlier export in the same --out is untouched; the next export then succeeds."""
    out = tmp_path / "out"
    assert main(["export", str(run_copy), "--out", str(out), "--categories", "disk"]) == 0
    earlier = tree(out)

    def full_disk(path, payload):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with monkeypatch.context() as patch:
        patch.setattr(tfsearch.deploy.export, "atomic_write_json", full_disk)
        with pytest.raises(OSError, match="No space left"):
            main(["export", str(run_copy), "--out", str(out), "--categories", "stripes"])
    assert tree(out) == earlier
    assert main(["export", str(run_copy), "--out", str(out), "--categories", "stripes"]) == 0
    assert sorted(p.name for p in (out / "stripes").iterdir()) == ["manifest.json", "weights.pt"]
    assert sorted(p.name for p in out.iterdir()) == ["disk", "stripes"]


def test_a_selected_category_or_model_that_is_a_path_is_refused(run_copy, tmp_path, capsys):
    """selected.csv names folders: a category or model id that is a path is refused before anything is read
    or written through it."""
    import csv

    for column, value in [("category", "../../escaped"), ("selected_model", "../../../escaped")]:
        run = tmp_path / f"run-{column}"
        shutil.copytree(run_copy, run, ignore=shutil.ignore_patterns("train"))
        with (run / "selected.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        for row in rows:
            if row["category"] == "stripes":
                row[column] = value
        with (run / "selected.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        before = tree(tmp_path)
        capsys.readouterr()
        assert main(["export", str(run), "--out", str(tmp_path / "x" / "out")]) == 2
        error = capsys.readouterr().err
        assert (
            f"{run / 'selected.csv'} {column if column == 'category' else 'selected_model of stripes'} is"
            in error
        )
        assert f"{value!r}: expected a plain name" in error
        assert tree(tmp_path) == before
