"""The realistic demo dataset (`--dataset demo_real`): layout, defects, determinism, the cache and the CLI."""

import argparse
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tfsearch.cli import build_parser
from tfsearch.cli import demo as demo_command
from tfsearch.data import demo, demo_real
from tfsearch.data.datasets import is_texture_category, list_categories, load_category, load_masks
from tfsearch.data.demo import Counts, realistic_demo_root, write_realistic_demo
from tfsearch.data.demo_real import REALISTIC_CATEGORIES, REALISTIC_KINDS
from tfsearch.run.plan import make_plan

# one image per folder: every category, every kind, in a couple of seconds
TINY = Counts(train=2, good_test=1, per_kind=1)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()
    }


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_realistic_demo(tmp_path_factory.mktemp("demo_real") / "data", seed=0, counts=TINY)


def test_categories_and_kinds():
    assert list(REALISTIC_CATEGORIES) == sorted(REALISTIC_CATEGORIES) and len(REALISTIC_CATEGORIES) == 3
    assert set(REALISTIC_KINDS) == {"discolour", "patch", "scratch", "stain"}
    assert all(is_texture_category("demo_real", name) for name in REALISTIC_CATEGORIES)
    assert not is_texture_category("demo", "cork")


@pytest.mark.parametrize("name", REALISTIC_CATEGORIES)
def test_each_category_has_the_mvtec_layout(tiny_root, name):
    folder = tiny_root / name
    assert sorted(os.listdir(folder)) == ["ground_truth", "test", "train"]
    assert sorted(os.listdir(folder / "test")) == sorted([*REALISTIC_KINDS, "good"])
    assert sorted(os.listdir(folder / "ground_truth")) == sorted(REALISTIC_KINDS)
    assert sorted(os.listdir(folder / "train" / "good")) == ["000.png", "001.png"]
    for kind in REALISTIC_KINDS:
        assert os.listdir(folder / "test" / kind) == ["000.png"]
        assert os.listdir(folder / "ground_truth" / kind) == ["000_mask.png"]
    category = load_category("demo_real", tiny_root, name)
    assert category.is_texture and category.root == tiny_root.absolute() / name
    assert [sample.defect for sample in category.test] == sorted([*REALISTIC_KINDS, "good"])
    for sample in category.test:
        with Image.open(sample.image) as image:
            assert image.mode == "RGB" and image.size == (128, 128)
        if sample.mask is None:
            continue
        with Image.open(sample.mask) as mask:
            assert mask.mode == "L" and mask.size == (128, 128)
            assert set(np.unique(np.asarray(mask))) == {0, 255}


@pytest.mark.parametrize("name", REALISTIC_CATEGORIES)
def test_masks_survive_the_quick_profiles_64_px(tiny_root, name):
    defective = [sample for sample in load_category("demo_real", tiny_root, name).test if sample.label]
    areas = dict(zip([s.defect for s in defective], load_masks(defective, 64).sum(axis=(1, 2)), strict=True))
    # a 1-2 px scratch keeps at least a thin line; blobs stay tens of pixels
    assert areas["scratch"] >= 15
    assert min(areas[kind] for kind in ("discolour", "patch", "stain")) >= 40


@pytest.mark.parametrize("name", REALISTIC_CATEGORIES)
@pytest.mark.parametrize("kind", REALISTIC_KINDS)
def test_a_defect_changes_only_its_mask_and_scratches_are_thin(name, kind):
    rng = np.random.default_rng(3)
    make_material, _ = demo_real._MATERIALS[name]
    material = make_material(rng)
    sample = demo_real._Sample(demo_real._view(material, 0.1, 1.1), material, 0.1, 1.1)
    clean = sample.image.copy()
    region = demo_real._DEFECTS[kind](sample, rng)
    changed = np.abs(sample.image - clean).max(axis=2) > 1e-9
    assert region.sum() >= 30
    assert not (changed & ~region).any()
    assert changed[region].mean() > 0.9
    if kind == "scratch":  # 1-2 px across: few pixels per unit of length
        assert region.sum() <= 2.5 * demo_real._SCRATCH_LENGTH[1]
    if kind == "discolour":  # faint: the tint moves no channel by more than 0.07 on a 0-1 scale
        assert np.abs(sample.image - clean).max() <= 0.07


def test_good_images_differ_in_rotation_and_the_patch_kind_reuses_the_material():
    """A material viewed turned by 90 degrees about the centre is the same picture rotated."""
    material = demo_real._MATERIALS["fibre"][0](np.random.default_rng(0))
    straight = demo_real._view(material, 0.0, 1.0)
    turned = demo_real._view(material, math.pi / 2, 1.0)
    np.testing.assert_allclose(np.rot90(turned, k=1), straight, atol=1e-9)
    assert np.abs(turned - straight).mean() > 0.02


def test_same_seed_is_byte_identical_and_another_seed_differs(tiny_root, tmp_path):
    again = write_realistic_demo(tmp_path / "again", seed=0, counts=TINY)
    assert _files(again) == _files(tiny_root)
    first = demo_real.render("marble", "scratch", np.random.default_rng([1, 0, 2, 0]))
    second = demo_real.render("marble", "scratch", np.random.default_rng([2, 0, 2, 0]))
    assert not np.array_equal(first[0], second[0]) and not np.array_equal(first[1], second[1])


def test_cli_writes_the_realistic_demo_with_the_flag(tmp_path, monkeypatch, capsys):
    parser = argparse.ArgumentParser()
    demo_command.register(parser.add_subparsers(dest="command"))
    calls = []
    monkeypatch.setattr(
        demo_command, "write_realistic_demo", lambda out, seed: calls.append((out, seed)) or out
    )
    args = parser.parse_args(["data", "demo", "--realistic", "--out", str(tmp_path / "d"), "--seed", "4"])
    assert args.func(args) == 0
    assert calls == [(tmp_path / "d", 4)]
    printed = capsys.readouterr().out
    assert f"wrote the realistic demo dataset (seed 4) to {tmp_path / 'd'}" in printed
    assert "categories: cork, fibre, marble" in printed and "discolour, patch, scratch, stain" in printed


def test_cached_copy_is_generated_once_and_read_by_dataset_demo_real(tiny_root, tmp_path, monkeypatch):
    monkeypatch.setenv("TFSEARCH_CACHE", str(tmp_path))
    assert list_categories("demo_real", None) == list(REALISTIC_CATEGORIES)
    assert not any(tmp_path.iterdir())  # listing generates nothing
    writes = []

    def copy_tiny(out: Path, seed: int = 0) -> Path:
        writes.append(seed)
        shutil.copytree(tiny_root, out, dirs_exist_ok=True)
        return out

    monkeypatch.setattr(demo, "write_realistic_demo", copy_tiny)
    category = load_category("demo_real", None, "cork")
    root = tmp_path / f"demo_real-v{demo.REALISTIC_FORMAT_VERSION}-seed0"
    assert category.root == root / "cork" and category.is_texture
    assert realistic_demo_root() == root and writes == [0]
    assert os.listdir(tmp_path) == [root.name]
    assert _files(root) == _files(tiny_root)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_a_bare_run_on_demo_real_without_gpu_takes_the_quick_profile(tiny_root, tmp_path, capsys):
    argv = ["run", "--dataset", "demo_real", "--data-root", str(tiny_root), "--runs-root", str(tmp_path)]
    plan = make_plan(build_parser().parse_args(argv))
    assert (plan.profile.name, plan.gpus_per_trial) == ("small", 0.0)
    assert plan.categories == list(REALISTIC_CATEGORIES)
    assert "no GPU on this machine: the demo runs the quick profile 'small'" in capsys.readouterr().out
