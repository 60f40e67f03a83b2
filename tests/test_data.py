"""The dataset layer: layouts (MVTec AD, VisA prepared and raw, folder), decoding, flags and bad input."""

import argparse
import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tfsearch.cli.common import add_data_arguments
from tfsearch.data.datasets import (
    DATASETS,
    MVTEC_CATEGORIES,
    TEXTURE_CATEGORIES,
    VISA_CATEGORIES,
    largest_first,
    list_categories,
    load_category,
    load_images,
    load_masks,
    resolve_categories,
)
from tfsearch.data.images import load_image, load_mask
from tfsearch.errors import InputError


def _image(path: Path, size: int = 12, seed: int = 0, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


def _mask(
    path: Path, size: int = 12, value: int = 255, box: tuple[int, int, int, int] = (2, 2, 6, 6)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size, size), dtype=np.uint8)
    top, left, bottom, right = box
    pixels[top:bottom, left:right] = value
    Image.fromarray(pixels).save(path)
    return path


def _mvtec_category(root: Path, name: str) -> Path:
    """A tiny MVTec AD category: 3 train, 2 good test, 2 defect types with `_mask.png` masks."""
    category = root / name
    for index, stem in enumerate(["002", "000", "001"]):
        _image(category / "train" / "good" / f"{stem}.png", seed=index)
    _image(category / "test" / "good" / "000.png", seed=10)
    _image(category / "test" / "good" / "001.png", seed=11)
    for defect in ("crack", "hole"):
        for stem in ("000", "001"):
            _image(category / "test" / defect / f"{stem}.png", seed=12)
            _mask(category / "ground_truth" / defect / f"{stem}_mask.png")
    return category


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    # a root whose path contains "test" twice: the original's string replace would look in the wrong place
    root = tmp_path / "test_data" / "mvtec_test"
    _mvtec_category(root, "bottle")
    _mvtec_category(root, "carpet")
    _image(root / "mything" / "train" / "good" / "000.png")  # not an MVTec category
    (root / "license.txt").write_text("not a category")
    return root


def _ids(samples) -> list[str]:
    return [sample.image_id for sample in samples]


# ------------------------------------------------------------------------------------------ layouts


def test_known_category_lists():
    assert list(MVTEC_CATEGORIES) == sorted(MVTEC_CATEGORIES) and len(MVTEC_CATEGORIES) == 15
    assert list(VISA_CATEGORIES) == sorted(VISA_CATEGORIES) and len(VISA_CATEGORIES) == 12
    assert sorted(TEXTURE_CATEGORIES) == ["carpet", "grid", "leather", "tile", "wood", "zipper"]
    assert DATASETS == ("mvtec", "visa", "folder", "demo", "demo_real", "mvtec_ad2")


def test_mvtec_layout_under_a_root_containing_test(mvtec_root):
    assert list_categories("mvtec", mvtec_root) == ["bottle", "carpet"]
    bottle = load_category("mvtec", mvtec_root, "bottle")
    assert (bottle.dataset, bottle.name, bottle.root) == ("mvtec", "bottle", mvtec_root / "bottle")
    assert not bottle.is_texture and load_category("mvtec", mvtec_root, "carpet").is_texture
    assert _ids(bottle.train) == ["train/good/000", "train/good/001", "train/good/002"]
    assert all(s.label == 0 and s.mask is None and s.defect == "good" for s in bottle.train)
    assert _ids(bottle.test) == [
        "test/crack/000",
        "test/crack/001",
        "test/good/000",
        "test/good/001",
        "test/hole/000",
        "test/hole/001",
    ]
    crack = bottle.test[0]
    assert crack.image == mvtec_root / "bottle" / "test" / "crack" / "000.png"
    assert crack.mask == mvtec_root / "bottle" / "ground_truth" / "crack" / "000_mask.png"
    assert (crack.label, crack.defect) == (1, "crack")
    assert [s.label for s in bottle.test] == [1, 1, 0, 0, 1, 1]
    assert all(s.mask is None for s in bottle.test if s.defect == "good")


def test_relative_data_root_becomes_absolute(mvtec_root, monkeypatch):
    monkeypatch.chdir(mvtec_root.parent)
    bottle = load_category("mvtec", Path(mvtec_root.name), "bottle")
    assert bottle.train[0].image.is_absolute()
    assert bottle.train[0].image == mvtec_root / "bottle" / "train" / "good" / "000.png"


def test_extensions_hidden_and_other_files(tmp_path):
    root = tmp_path / "data"
    good = root / "parts" / "train" / "good"
    for stem, extension in [("a", ".PNG"), ("b", ".jpg"), ("c", ".JPEG"), ("d", ".bmp"), ("e", ".tif")]:
        _image(good / f"{stem}{extension}")
    _image(good / "f.TIFF")
    _image(good / "._a.png")  # a macOS sidecar file
    (good / "notes.txt").write_text("skip me")
    _image(root / "parts" / "test" / "scratch" / "x.JPG")
    _mask(root / "parts" / "ground_truth" / "scratch" / "x_mask.PNG")
    parts = load_category("folder", root, "parts")
    assert _ids(parts.train) == [f"train/good/{stem}" for stem in "abcdef"]
    assert parts.test[0].mask == root / "parts" / "ground_truth" / "scratch" / "x_mask.PNG"
    assert not parts.is_texture


def test_missing_test_folder_gives_no_test_images(tmp_path):
    _image(tmp_path / "parts" / "train" / "good" / "0.png")
    assert load_category("folder", tmp_path, "parts").test == ()


def test_largest_categories_come_first(tmp_path):
    for name in ("widget", "bottle", "gear"):
        _mvtec_category(tmp_path, name)
    _image(tmp_path / "gear" / "train" / "good" / "003.png")  # 4 training images, the others 3
    assert largest_first("folder", tmp_path, ["widget", "bottle", "gear"]) == ["gear", "bottle", "widget"]


def test_folder_categories_are_subfolders_with_train_good(tmp_path):
    _mvtec_category(tmp_path, "widget")
    _mvtec_category(tmp_path, "bottle")
    (tmp_path / "empty_dir").mkdir()
    _image(tmp_path / "no_train_good" / "test" / "good" / "0.png")
    assert list_categories("folder", tmp_path) == ["bottle", "widget"]
    widget = load_category("folder", tmp_path, "widget")
    assert widget.dataset == "folder" and not widget.is_texture
    assert len(widget.train) == 3 and len(widget.test) == 6


def test_visa_prepared_1cls_layout(tmp_path):
    category = tmp_path / "candle"
    for stem in ("001", "000"):
        _image(category / "train" / "good" / f"{stem}.JPG")
    _image(category / "test" / "good" / "010.JPG")
    _image(category / "test" / "bad" / "020.JPG")
    _mask(category / "ground_truth" / "bad" / "020.png")
    _image(tmp_path / "not_visa" / "train" / "good" / "0.JPG")
    assert list_categories("visa", tmp_path) == ["candle"]
    candle = load_category("visa", tmp_path, "candle")
    assert _ids(candle.train) == ["train/good/000", "train/good/001"]
    assert _ids(candle.test) == ["test/bad/020", "test/good/010"]
    bad = candle.test[0]
    assert (bad.label, bad.defect, bad.mask) == (1, "bad", category / "ground_truth" / "bad" / "020.png")
    assert not candle.is_texture


def _raw_visa(root: Path, rows: list[list[str]] | None = None, header: str = "object,split,label,image,mask"):
    """A raw VisA download: two categories, masks with small integer labels, and the 1cls split CSV."""
    if rows is None:
        rows = []
        for name in ("candle", "pcb1"):
            for stem, split in (("0000", "train"), ("0001", "train"), ("0002", "test")):
                image = f"{name}/Data/Images/Normal/{stem}.JPG"
                _image(root / image, seed=int(stem))
                rows.append([name, split, "normal", image, ""])
            for stem, value in (("000", 1), ("001", 2)):
                image, mask = (
                    f"{name}/Data/Images/Anomaly/{stem}.JPG",
                    f"{name}/Data/Masks/Anomaly/{stem}.png",
                )
                _image(root / image)
                _mask(root / mask, value=value)
                rows.append([name, "test", "anomaly", image, mask])
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header.split(","))
        writer.writerows(rows)
    return root


def test_visa_raw_download_read_through_the_csv(tmp_path):
    root = _raw_visa(tmp_path / "VisA_20220922")
    assert list_categories("visa", root) == ["candle", "pcb1"]
    candle = load_category("visa", root, "candle")
    assert candle.root == root / "candle" and not candle.is_texture
    assert _ids(candle.train) == ["train/good/0000", "train/good/0001"]
    assert _ids(candle.test) == ["test/bad/000", "test/bad/001", "test/good/0002"]
    bad = candle.test[1]
    assert bad.image == root / "candle" / "Data" / "Images" / "Anomaly" / "001.JPG"
    assert bad.mask == root / "candle" / "Data" / "Masks" / "Anomaly" / "001.png"
    assert (bad.label, bad.defect) == (1, "bad")
    # mask values 1 and 2 mark defects: the 4x4 box at (2, 2) comes back whole at native size
    expected = np.zeros((12, 12), dtype=bool)
    expected[2:6, 2:6] = True
    for sample in candle.test[:2]:
        assert (load_mask(sample.mask, 12) == expected).all()


# ------------------------------------------------------------------------------------------ decoding


def test_image_modes_convert_to_rgb_uint8(tmp_path):
    gray = Image.fromarray(np.full((8, 8), 100, dtype=np.uint8))
    gray.save(tmp_path / "gray.png")
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    Image.fromarray(np.full((8, 8), 257 * 200, dtype=np.uint16)).save(tmp_path / "sixteen.png")
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 50, 150, 250] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    expected = {
        "gray": (100, 100, 100),
        "rgba": (10, 20, 30),
        "sixteen": (200, 200, 200),
        "palette": (50, 150, 250),
    }
    for stem, colour in expected.items():
        image = load_image(tmp_path / f"{stem}.png", 8)
        assert image.dtype == np.uint8 and image.shape == (8, 8, 3), stem
        assert (image == np.array(colour, dtype=np.uint8)).all(), stem
    assert Image.open(tmp_path / "sixteen.png").mode == "I;16"


def test_resize_is_pil_bilinear_antialiased(tmp_path):
    path = _image(tmp_path / "x.png", size=16, seed=3)
    small = load_image(path, 4)
    expected = np.asarray(Image.open(path).convert("RGB").resize((4, 4), Image.Resampling.BILINEAR))
    assert (small == expected).all()
    # antialiased: every output pixel averages a neighbourhood, so the random image's contrast drops
    assert small.std() < np.asarray(Image.open(path)).std() / 2
    assert load_image(path, 16).tolist() == np.asarray(Image.open(path)).tolist()


def test_mask_binarisation_keeps_any_nonzero_value(tmp_path):
    one = np.zeros((16, 16), dtype=np.uint8)
    one[7, 7] = 1
    Image.fromarray(one).save(tmp_path / "one.png")
    Image.fromarray(one * 255).save(tmp_path / "full.png")
    Image.fromarray(one.astype(np.uint16) * 3).save(tmp_path / "sixteen.png")
    Image.fromarray(np.stack([np.zeros_like(one), one, np.zeros_like(one)], axis=-1)).save(
        tmp_path / "rgb.png"
    )
    # a single defect pixel survives 4x downscaling (bilinear, then > 0.5 on the 0-255 scale)
    small = load_mask(tmp_path / "full.png", 4)
    assert small.dtype == bool and small.shape == (4, 4)
    assert small[1, 1] and small.sum() >= 1
    for stem in ("one", "sixteen", "rgb"):
        assert (load_mask(tmp_path / f"{stem}.png", 4) == small).all(), stem
    native = load_mask(tmp_path / "one.png", 16)
    assert native.sum() == 1 and native[7, 7]
    assert not load_mask(None, 5).any() and load_mask(None, 5).shape == (5, 5)
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "empty.png")
    assert not load_mask(tmp_path / "empty.png", 4).any()


def test_mask_upscaling_dilates_slightly(tmp_path):
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[1, 1] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    big = load_mask(tmp_path / "m.png", 16)
    assert big[4:8, 4:8].all()  # the pixel's own area
    assert big.sum() > 16 and not big[12:, 12:].any()  # a rim of interpolated pixels, nothing far away


def test_load_images_threads_match_serial(mvtec_root):
    bottle = load_category("mvtec", mvtec_root, "bottle")
    serial = load_images(bottle.test, 8)
    threaded = load_images(bottle.test, 8, workers=3)
    assert serial.shape == (6, 8, 8, 3) and serial.dtype == np.uint8
    assert (serial == threaded).all()
    assert (serial[0] == load_image(bottle.test[0].image, 8)).all()
    assert load_images([], 8).shape == (0, 8, 8, 3)
    masks = load_masks(bottle.test, 12)
    assert masks.shape == (6, 12, 12) and masks.dtype == bool
    assert [int(m.sum()) for m in masks] == [16, 16, 0, 0, 16, 16]


# ------------------------------------------------------------------------------------------ flags


def test_add_data_arguments_defaults_and_choices():
    single = argparse.ArgumentParser()
    add_data_arguments(single, multiple=False)
    args = single.parse_args([])
    assert (args.dataset, args.data_root, args.category) == ("demo", None, None)
    assert not hasattr(args, "categories")
    multi = argparse.ArgumentParser()
    add_data_arguments(multi, multiple=True)
    args = multi.parse_args(["--dataset", "mvtec", "--data-root", "/d", "--categories", "a,b"])
    assert (args.dataset, args.data_root, args.categories) == ("mvtec", Path("/d"), "a,b")
    with pytest.raises(SystemExit):
        multi.parse_args(["--dataset", "kitti"])


def test_resolve_categories(mvtec_root):
    assert resolve_categories("mvtec", mvtec_root, None, None) == ["bottle", "carpet"]
    assert resolve_categories("mvtec", mvtec_root, "carpet", None) == ["carpet"]
    assert resolve_categories("mvtec", mvtec_root, None, " carpet, bottle,carpet ") == ["bottle", "carpet"]
    with pytest.raises(InputError, match="either --category or --categories, not both"):
        resolve_categories("mvtec", mvtec_root, "bottle", "carpet")
    with pytest.raises(InputError, match=r"unknown --categories 'screw' for --dataset mvtec"):
        resolve_categories("mvtec", mvtec_root, None, "bottle,screw")
    with pytest.raises(InputError, match="--categories ' , ' names no category"):
        resolve_categories("mvtec", mvtec_root, None, " , ")


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("dataset", ["mvtec", "visa", "folder"])
def test_data_root_is_required_except_for_the_demo(dataset):
    with pytest.raises(InputError, match=f"--data-root is required for --dataset {dataset}"):
        load_category(dataset, None, "bottle")
    with pytest.raises(InputError, match=f"--data-root is required for --dataset {dataset}"):
        list_categories(dataset, None)


def test_missing_data_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(InputError, match=f"--data-root {missing} does not exist"):
        load_category("mvtec", missing, "bottle")


def test_unknown_dataset_lists_the_valid_ones(tmp_path):
    with pytest.raises(
        InputError, match="unknown --dataset 'kitti': expected one of mvtec, visa, folder, demo, demo_real"
    ):
        list_categories("kitti", tmp_path)


def test_unknown_category_lists_the_valid_ones(mvtec_root):
    with pytest.raises(InputError, match="unknown --category 'screw' .* valid categories: bottle, carpet$"):
        load_category("mvtec", mvtec_root, "screw")
    with pytest.raises(InputError, match="valid categories: bottle, carpet .use --dataset folder"):
        load_category("mvtec", mvtec_root, "mything")
    with pytest.raises(InputError, match="valid categories: bottle, carpet, mything"):
        load_category("folder", mvtec_root, "nothing")


def test_root_without_categories(tmp_path):
    with pytest.raises(
        InputError, match=f"no mvtec categories in --data-root {tmp_path}: expected .*train/good"
    ):
        list_categories("mvtec", tmp_path)


def test_empty_train_good(tmp_path):
    (tmp_path / "bottle" / "train" / "good").mkdir(parents=True)
    (tmp_path / "bottle" / "train" / "good" / "readme.txt").write_text("no images")
    with pytest.raises(InputError, match=f"no training images in {tmp_path / 'bottle' / 'train' / 'good'}"):
        load_category("mvtec", tmp_path, "bottle")


def test_corrupt_image_names_the_file(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(InputError, match=f"cannot read image {broken}"):
        load_image(broken, 8)
    with pytest.raises(InputError, match=f"cannot read image {tmp_path / 'absent.png'}"):
        load_image(tmp_path / "absent.png", 8)


def test_defect_image_without_mask(mvtec_root):
    (mvtec_root / "bottle" / "ground_truth" / "hole" / "001_mask.png").unlink()
    expected = mvtec_root / "bottle" / "ground_truth" / "hole" / "001_mask.png"
    with pytest.raises(InputError, match=f"defect image .*hole/001.png has no mask: expected {expected}"):
        load_category("mvtec", mvtec_root, "bottle")


def test_mask_size_must_match_its_image(mvtec_root):
    mask = _mask(mvtec_root / "bottle" / "ground_truth" / "crack" / "001_mask.png", size=10)
    with pytest.raises(InputError, match=f"mask {mask} is 10x10 but its image .*crack/001.png is 12x12"):
        load_category("mvtec", mvtec_root, "bottle")


def test_duplicate_stems_are_rejected(tmp_path):
    _image(tmp_path / "parts" / "train" / "good" / "000.png")
    _image(tmp_path / "parts" / "train" / "good" / "000.jpg")
    with pytest.raises(InputError, match="share the image id 'train/good/000'"):
        load_category("folder", tmp_path, "parts")


def test_visa_raw_without_csv(tmp_path):
    _image(tmp_path / "candle" / "Data" / "Images" / "Normal" / "0000.JPG")
    expected = tmp_path / "split_csv" / "1cls.csv"
    with pytest.raises(InputError, match=f"raw VisA download but its split file {expected} is missing"):
        list_categories("visa", tmp_path)


def test_visa_raw_csv_with_missing_columns(tmp_path):
    _raw_visa(tmp_path, rows=[["candle", "train", "x.JPG"]], header="object,split,image")
    with pytest.raises(InputError, match="1cls.csv lacks column.s. label, mask"):
        load_category("visa", tmp_path, "candle")


def test_visa_raw_anomaly_without_mask(tmp_path):
    _image(tmp_path / "candle" / "a.JPG")
    rows = [
        ["candle", "train", "normal", "candle/a.JPG", ""],
        ["candle", "test", "anomaly", "candle/a.JPG", ""],
    ]
    _raw_visa(tmp_path, rows=rows)
    with pytest.raises(
        InputError, match="defect image .*a.JPG has no mask: column 'mask' is empty at .* line 3"
    ):
        load_category("visa", tmp_path, "candle")
    rows[1][4] = "candle/missing.png"
    _raw_visa(tmp_path, rows=rows)
    with pytest.raises(
        InputError, match="has no mask: .*candle/missing.png .named at .*line 3. does not exist"
    ):
        load_category("visa", tmp_path, "candle")


def test_visa_raw_bad_rows(tmp_path):
    _image(tmp_path / "candle" / "a.JPG")
    _raw_visa(tmp_path, rows=[["candle", "val", "normal", "candle/a.JPG", ""]])
    with pytest.raises(InputError, match="line 2: split 'val' is not train or test"):
        load_category("visa", tmp_path, "candle")
    _raw_visa(tmp_path, rows=[["candle", "train", "normal", "candle/b.JPG", ""]])
    with pytest.raises(InputError, match="line 2: image .*candle/b.JPG does not exist"):
        load_category("visa", tmp_path, "candle")
