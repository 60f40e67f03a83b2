"""The synthetic demo dataset: layout, defects, determinism, the cached copy and the CLI."""

import argparse
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tfsearch.cli import demo as demo_command
from tfsearch.data import demo
from tfsearch.data.datasets import list_categories, load_category, load_masks
from tfsearch.data.demo import DEMO_CATEGORIES, DEMO_TEXTURES, demo_root, write_demo
from tfsearch.data.images import load_image
from tfsearch.errors import InputError


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()
    }


def test_categories_are_textures_and_objects():
    assert list(DEMO_CATEGORIES) == sorted(DEMO_CATEGORIES)
    assert set(DEMO_CATEGORIES) >= DEMO_TEXTURES
    assert len(DEMO_TEXTURES) >= 2
    assert len(set(DEMO_CATEGORIES) - DEMO_TEXTURES) >= 2


@pytest.mark.parametrize("name", DEMO_CATEGORIES)
def test_each_category_has_the_mvtec_layout_and_sizes(demo_dataset_root, name):
    category = load_category("demo", demo_dataset_root, name)
    assert category.is_texture == (name in DEMO_TEXTURES)
    assert category.root == demo_dataset_root.absolute() / name
    assert 40 <= len(category.train) <= 60
    assert all(sample.label == 0 and sample.mask is None for sample in category.train)
    good = [sample for sample in category.test if sample.label == 0]
    defective = [sample for sample in category.test if sample.label == 1]
    assert 10 <= len(good) <= 14 and all(sample.mask is None for sample in good)
    assert 15 <= len(defective) <= 21
    assert 2 <= len({sample.defect for sample in defective}) <= 3
    first = category.test[0]
    assert load_image(first.image, 128).shape == (128, 128, 3)


@pytest.mark.parametrize("name", DEMO_CATEGORIES)
def test_defect_masks_are_non_empty_and_survive_downscaling(demo_dataset_root, name):
    category = load_category("demo", demo_dataset_root, name)
    defective = [sample for sample in category.test if sample.label == 1]
    full = load_masks(defective, 128)
    small = load_masks(defective, 64)
    # at least a 6x10 px patch at 128 px, so still several pixels at the CPU profile's 64 px
    assert full.reshape(len(defective), -1).sum(axis=1).min() >= 60
    assert small.reshape(len(defective), -1).sum(axis=1).min() >= 15
    for sample, loaded in zip(defective, full, strict=True):
        with Image.open(sample.mask) as mask:
            assert mask.mode == "L" and mask.size == (128, 128)
            values = np.asarray(mask)
        assert set(np.unique(values)) == {0, 255}
        assert (loaded == (values == 255)).all()


@pytest.mark.parametrize("name", DEMO_CATEGORIES)
def test_masks_are_exactly_the_pixels_a_defect_changes(name):
    """Each defect changes every pixel of its mask clearly and nothing outside it."""
    renderer, defects = demo._CATEGORY_SPECS[name]
    for defect_name, defect in defects.items():
        for seed in range(3):
            rng = np.random.default_rng(seed)
            scene = renderer(rng)
            clean = scene.image.copy()
            region = defect(scene, rng)
            changed = np.abs(scene.image - clean).max(axis=2)
            assert region.sum() > 0, defect_name
            assert ((changed > 0) == region).all(), defect_name
            assert changed[region].mean() > 0.15, defect_name


def test_same_seed_is_byte_identical_and_another_seed_differs(demo_dataset_root, tmp_path):
    parser = argparse.ArgumentParser()
    demo_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "demo", "--out", str(tmp_path / "again"), "--seed", "0"])
    assert args.func(args) == 0
    assert _files(tmp_path / "again") == _files(demo_dataset_root)
    other = write_demo(tmp_path / "other", seed=1)
    reference, changed = _files(demo_dataset_root), _files(other)
    assert reference.keys() == changed.keys()
    assert sum(reference[key] != changed[key] for key in reference) > 0.9 * len(reference)


def test_cli_prints_where_it_wrote_and_the_categories(demo_dataset_root, tmp_path, monkeypatch, capsys):
    parser = argparse.ArgumentParser()
    demo_command.register(parser.add_subparsers(dest="command"))
    calls = []
    monkeypatch.setattr(demo_command, "write_demo", lambda out, seed: calls.append((out, seed)) or out)
    args = parser.parse_args(["data", "demo", "--out", str(tmp_path / "d"), "--seed", "7"])
    assert args.func(args) == 0
    assert calls == [(tmp_path / "d", 7)]
    printed = capsys.readouterr().out
    assert str(tmp_path / "d") in printed and "seed 7" in printed
    assert all(name in printed for name in DEMO_CATEGORIES)
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "demo"])  # --out is required


def test_negative_seed_is_rejected(tmp_path):
    with pytest.raises(InputError, match="--seed must be a non-negative integer, got -1"):
        write_demo(tmp_path, seed=-1)


def test_out_that_is_a_file_is_rejected(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=f"--out {tmp_path / 'file'} exists and is not a folder"):
        write_demo(tmp_path / "file")


def test_rewriting_replaces_categories_and_leaves_no_staging(demo_dataset_root, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(demo_dataset_root, out)
    (out / "disk" / "train" / "good" / "stale.png").write_bytes(b"old")
    write_demo(out, seed=0)
    assert _files(out) == _files(demo_dataset_root)
    assert sorted(os.listdir(out)) == sorted(DEMO_CATEGORIES)


def _copy_demo(source: Path):
    def fake_write_demo(out: Path, seed: int = 0) -> Path:
        shutil.copytree(source, out, dirs_exist_ok=True)
        return out

    return fake_write_demo


def test_demo_root_generates_once_under_the_cache(demo_dataset_root, tmp_path, monkeypatch):
    monkeypatch.setenv("TFSEARCH_CACHE", str(tmp_path / "cache"))
    # listing the demo's categories must not generate anything
    assert list_categories("demo", None) == list(DEMO_CATEGORIES)
    assert not (tmp_path / "cache").exists()
    monkeypatch.setattr(demo, "write_demo", _copy_demo(demo_dataset_root))
    root = demo_root()
    assert root == tmp_path / "cache" / f"demo-v{demo.DEMO_FORMAT_VERSION}-seed0"
    assert os.listdir(tmp_path / "cache") == [root.name]  # no staging folder left behind
    assert _files(root) == _files(demo_dataset_root)

    def must_not_run(out: Path, seed: int = 0) -> Path:
        raise AssertionError("the cached demo was generated twice")

    monkeypatch.setattr(demo, "write_demo", must_not_run)
    assert demo_root() == root
    category = load_category("demo", None, "stripes")
    assert category.root == root / "stripes" and category.is_texture


def test_demo_root_keeps_the_copy_of_a_concurrent_generator(demo_dataset_root, tmp_path, monkeypatch):
    monkeypatch.setenv("TFSEARCH_CACHE", str(tmp_path))
    final = tmp_path / f"demo-v{demo.DEMO_FORMAT_VERSION}-seed3"

    def racing_write_demo(out: Path, seed: int = 0) -> Path:
        # another process finishes first while this one is still writing
        shutil.copytree(demo_dataset_root, final)
        (out / "partial").mkdir()
        return out

    monkeypatch.setattr(demo, "write_demo", racing_write_demo)
    assert demo_root(3) == final
    assert os.listdir(tmp_path) == [final.name]
    assert _files(final) == _files(demo_dataset_root)
