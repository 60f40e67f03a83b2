"""No silent departures from the paper: `paper_protocol_note` decides them, `tfsearch train` (and so every
training trial, which starts through `Trainer.start`), the run's driver and the report say them; and
`tfsearch train` without --profile picks the paper's profile on a CUDA device and says which it chose."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_report import make_run
from test_search import run_args, write_space
from test_train import tiny_profile

from tfsearch import report
from tfsearch.cli import build_parser, main
from tfsearch.cli.train import chosen_profile, default_profile
from tfsearch.run.plan import RunPlan, make_plan
from tfsearch.run.training.callbacks import ProgressView
from tfsearch.transfusion.profiles import PROFILES
from tfsearch.transfusion.protocol import paper_protocol_note

TEXTURES = "procedural anomaly textures instead of DTD (--texture-root DTD/images)"


def foreground(categories: str) -> str:
    plural = "ies" if "," in categories else "y"
    return (
        f"foreground of the object categor{plural} {categories} estimated from the image border instead of"
        " the released foreground masks (--fg-root)"
    )


def recorded(profile="paper", dataset="mvtec", categories=("bottle",), **roots) -> dict:
    """A run's config.json as far as the note reads it."""
    return {"profile": {"name": profile}, "dataset": dataset, "categories": list(categories), **roots}


@pytest.mark.parametrize(
    "plan, note",
    [
        (recorded(categories=["bottle", "carpet"]), f"{TEXTURES}; {foreground('bottle')}"),
        (recorded(categories=["carpet", "zipper"], texture_root="/dtd"), None),  # MVTec's textures
        (
            recorded(dataset="visa", categories=["candle", "pcb1"], texture_root="/dtd"),
            foreground("candle, pcb1"),
        ),
        (recorded(dataset="demo", categories=["disk", "stripes"], fg_root="/fg"), TEXTURES),
        (recorded(texture_root="/dtd", fg_root="/fg"), None),
        (
            recorded(texture_root="/dtd", fg_root="/fg", restrict_to_foreground=False),
            "anomalies anywhere on the object category bottle instead of on the foreground (--no-foreground)",
        ),
        (recorded(profile="cpu"), None),  # the quick profile departs by design
        (
            {
                **recorded(texture_root="/dtd", fg_root="/fg"),
                "profile": {"name": "paper", "subtle_share": 0.5},
            },
            "subtle anomaly appearances for a share 0.5 of anomalies (subtle_share)",
        ),
        ({**recorded(texture_root="/dtd", fg_root="/fg"), "profile": PROFILES["paper"].to_dict()}, None),
        (
            {"profile": {"name": "paper"}, "dataset": "folder", "category": "mine"},
            f"{TEXTURES}; {foreground('mine')}",
        ),
    ],
)
def test_the_note_names_each_departure_of_a_paper_profile_job(plan, note):
    expected = None if note is None else f"not the paper's protocol: {note}"
    assert paper_protocol_note(plan) == expected


@pytest.fixture
def tiny_paper(monkeypatch):
    """The paper profile at toy size (same name, so that the train command treats it as the paper's)."""
    paper = tiny_profile(epochs=1, milestone_every=1, lr_step_epochs=1).replace(name="paper")
    monkeypatch.setitem(PROFILES, "paper", paper)


@pytest.fixture
def objects(tmp_path) -> Path:
    """A `folder` dataset of one object category ("cat"): 4 training and 2 test images of 32 px, a disk on
    a grey ground, so that one epoch is one step and inference is quick."""
    rng = np.random.default_rng(0)
    root = tmp_path / "objects"
    yy, xx = np.mgrid[:32, :32]
    images = [("train/good", str(i)) for i in range(4)] + [("test/good", "0"), ("test/crack", "0")]
    for split, name in images:
        image = np.full((32, 32, 3), 128, dtype=np.uint8)
        image[(yy - 16) ** 2 + (xx - 16) ** 2 < 81] = rng.integers(0, 256, 3, dtype=np.uint8)
        (root / "cat" / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "cat" / split / f"{name}.png")
    (root / "cat" / "ground_truth" / "crack").mkdir(parents=True)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[14:18, 12:20] = 255
    Image.fromarray(mask).save(root / "cat" / "ground_truth" / "crack" / "0_mask.png")
    return root


def train_args(root, out, *extra: str) -> list[str]:
    return ["train", "--dataset", "folder", "--data-root", str(root), "--category", "cat", "--out", str(out),
            "--quiet", *extra]  # fmt: skip


def test_train_warns_of_each_departure_and_resumes_with_its_profile(tiny_paper, objects, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(objects, out, "--profile", "paper")) == 0
    warning = f"[train] folder/cat warning: not the paper's protocol: {TEXTURES}; {foreground('cat')}"
    assert warning in capsys.readouterr().err.splitlines()
    # resumed without --profile: the run's profile, not this machine's default, and the warning again
    assert main(train_args(objects, out, "--resume")) == 0
    captured = capsys.readouterr()
    assert f"[train] profile 'paper': the run's in {out} (no --profile)" in captured.out
    assert warning in captured.err.splitlines()


def test_train_with_textures_and_foreground_masks_is_silent(tiny_paper, objects, tmp_path, capsys):
    rng = np.random.default_rng(0)
    textures, masks = tmp_path / "dtd" / "banded", tmp_path / "fg" / "cat" / "train" / "good"
    textures.mkdir(parents=True)
    masks.mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(textures / f"{name}.jpg")
    for image in sorted((objects / "cat" / "train" / "good").glob("*.png")):
        Image.fromarray(np.full((8, 8), 255, dtype=np.uint8)).save(masks / image.name)
    roots = ["--texture-root", str(tmp_path / "dtd"), "--fg-root", str(tmp_path / "fg")]
    assert main(train_args(objects, tmp_path / "run", "--profile", "paper", *roots)) == 0
    captured = capsys.readouterr()
    assert "foreground: folder" in captured.out
    assert "not the paper's protocol" not in captured.err + captured.out


def test_train_without_a_profile_picks_by_device_and_says_so(tmp_path, capsys):
    assert default_profile(torch.device("cuda", 0)) == "paper"
    assert default_profile(torch.device("cpu")) == "small"
    fresh = argparse.Namespace(profile=None, resume=False, out=tmp_path / "new")
    assert chosen_profile(fresh, torch.device("cuda", 0)) == "paper"
    assert capsys.readouterr().out == "[train] profile 'paper': training on cuda:0 (no --profile)\n"
    assert chosen_profile(fresh, torch.device("cpu")) == "small"
    assert capsys.readouterr().out == (
        "[train] profile 'small': training on cpu, not a CUDA device: the quick profile (no --profile)\n"
    )
    given = argparse.Namespace(profile="cpu", resume=False, out=tmp_path / "new")
    assert chosen_profile(given, torch.device("cuda", 0)) == "cpu"
    assert capsys.readouterr().out == ""


def paper_plan(tmp_path, data_root, name: str, *extra: str) -> RunPlan:
    """A run of the tiny test space with the paper profile's name (on CPUs), on a disk and a texture."""
    space = write_space(tmp_path, profile="paper")
    args = run_args(space, tmp_path / "runs", data_root, name, "--categories", "disk,stripes", *extra)
    return make_plan(build_parser().parse_args([*args, "--profile", "paper", "--gpus-per-trial", "0"]))


def test_the_run_driver_warns_once_unless_the_run_follows_the_paper(tmp_path, demo_dataset_root, capsys):
    plan = paper_plan(tmp_path, demo_dataset_root, "p")
    ProgressView(plan, quiet=True).warn_departures()
    assert capsys.readouterr().err == (
        f"[run] warning: not the paper's protocol: {TEXTURES}; {foreground('disk')}\n"
    )
    folders = tmp_path / "dtd", tmp_path / "fg"
    for folder in folders:
        folder.mkdir()
    roots = ["--texture-root", str(folders[0]), "--fg-root", str(folders[1])]
    faithful = paper_plan(tmp_path, demo_dataset_root, "f", *roots)
    ProgressView(faithful, quiet=True).warn_departures()
    assert capsys.readouterr().err == ""


def test_the_report_lists_the_departures_under_the_run(tmp_path):
    departing = make_run(tmp_path, "departing", "mvtec", ["bottle", "carpet"])
    faithful = make_run(tmp_path, "faithful", "mvtec", ["bottle", "carpet"])
    config = json.loads((faithful / "config.json").read_text())
    (faithful / "config.json").write_text(json.dumps({**config, "texture_root": "/dtd", "fg_root": "/fg"}))
    quick = make_run(tmp_path, "quick", "mvtec", ["bottle"], profile="cpu")
    out = report.write_report([departing, faithful, quick], wandb="disabled", quiet=True)
    lines = (out / "report.md").read_text().splitlines()
    summary = next(i for i, line in enumerate(lines) if line.startswith("- departing — "))
    assert lines[summary + 1] == f"- departing: not the paper's protocol: {TEXTURES}; {foreground('bottle')}"
    assert sum("not the paper's protocol" in line for line in lines) == 1
    assert "departing: not the paper&#x27;s protocol" in (out / "report.html").read_text()
