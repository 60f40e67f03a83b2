"""`tfsearch score` end to end on a tiny MVTec-layout dataset with .tiff / .npy / .png maps."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from tfsearch.cli import main
from tfsearch.data.datasets import load_category, load_masks
from tfsearch.maps.metrics import GroundTruth, evaluate

SIDE = 16  # images, masks and maps are SIDE×SIDE unless a test says otherwise
DEFECTS = {"000": (2, 9, 3, 8), "001": (10, 14, 1, 4), "002": (5, 7, 5, 7)}  # crack masks: y0, y1, x0, x1


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_dataset(root: Path) -> Path:
    """bottle: 2 good and 3 crack test images; cable: good test images only (its metrics are undefined)."""
    rng = np.random.default_rng(0)
    for category in ("bottle", "cable"):
        for split, defect, stem in [
            ("train", "good", "000"),
            ("test", "good", "000"),
            ("test", "good", "001"),
        ]:
            image = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
            write_png(root / category / split / defect / f"{stem}.png", image)
    for stem, (y0, y1, x0, x1) in DEFECTS.items():
        write_png(
            root / "bottle" / "test" / "crack" / f"{stem}.png",
            rng.integers(0, 256, (SIDE, SIDE, 3), np.uint8),
        )
        mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
        mask[y0:y1, x0:x1] = 255
        write_png(root / "bottle" / "ground_truth" / "crack" / f"{stem}_mask.png", mask)
    return root


def write_map(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, array)
    else:  # .tiff keeps float32; .png gets 8-bit values
        Image.fromarray(array).save(path)


def write_maps(maps_root: Path, dataset_root: Path) -> dict[str, np.ndarray]:
    """Noisy maps that are higher on the defects, in every supported format; returns them as written."""
    rng = np.random.default_rng(1)
    written = {}
    extensions = {
        "test/good/000": ".tiff",
        "test/good/001": ".npy",
        "test/crack/000": ".png",
        "test/crack/001": ".tiff",
        "test/crack/002": ".npy",
    }
    for category in ("bottle", "cable"):
        for sample in load_category("mvtec", dataset_root, category).test:
            mask = load_masks([sample], SIDE)[0]
            values = (rng.random((SIDE, SIDE)) + 0.7 * mask).astype(np.float32)
            extension = extensions[sample.image_id]
            if extension == ".png":
                values = np.round(values * 100).astype(np.uint8)
            write_map(maps_root / category / f"{sample.image_id}{extension}", values)
            written[f"{category}/{sample.image_id}"] = values.astype(np.float32)
    return written


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    dataset_root = write_dataset(tmp_path / "mvtec")
    maps_root = tmp_path / "maps"
    return dataset_root, maps_root, write_maps(maps_root, dataset_root)


def score(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["score", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_scores_every_category_with_maps(layout, capsys: pytest.CaptureFixture[str]) -> None:
    dataset_root, maps_root, written = layout
    code, out, _ = score(
        capsys, "--dataset-root", str(dataset_root), "--maps", str(maps_root), "--size", "16", "--json"
    )
    assert code == 0
    report = json.loads(out)
    samples = load_category("mvtec", dataset_root, "bottle").test
    maps = np.stack([written[f"bottle/{s.image_id}"] for s in samples])
    masks = load_masks(samples, SIDE)
    bottle = report["categories"]["bottle"]
    assert bottle["image_auroc"] == pytest.approx(
        roc_auc_score(masks.any(axis=(1, 2)), maps.max(axis=(1, 2)))
    )
    assert bottle["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert bottle["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()))
    assert bottle["aupro"] == pytest.approx(evaluate(GroundTruth.from_masks(masks), maps)["aupro"])
    assert 0.5 < bottle["pixel_f1_max"] <= 1.0
    assert (bottle["images"], bottle["anomalous"], bottle["undefined"]) == (5, 3, {})
    cable = report["categories"]["cable"]
    assert all(cable[name] is None for name in ("image_auroc", "aupro", "pixel_auroc", "pixel_ap"))
    assert cable["undefined"]["aupro"] == "no anomalous image"
    # the mean skips undefined categories
    assert report["mean"] == {name: bottle[name] for name in report["mean"]}


def test_table_says_undefined_and_why(layout, capsys: pytest.CaptureFixture[str]) -> None:
    dataset_root, maps_root, _ = layout
    code, out, _ = score(
        capsys, "--dataset-root", str(dataset_root), "--maps", str(maps_root), "--size", "16"
    )
    assert code == 0
    assert "undefined" in out
    assert (
        "cable: image_auroc, aupro, pixel_auroc, pixel_ap, pixel_f1_max undefined: no anomalous image" in out
    )
    assert out.splitlines()[2].startswith("bottle")


def test_maps_of_another_size_are_resized(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset_root = write_dataset(tmp_path / "mvtec")
    scores = {"test/good/000": 0.2, "test/good/001": 0.5, "test/crack/000": 0.4, "test/crack/001": 0.9}
    scores["test/crack/002"] = 0.7
    for image_id, value in scores.items():  # constant maps stay constant under any bilinear resize
        write_map(
            tmp_path / "maps" / "bottle" / f"{image_id}.tiff", np.full((40, 24), value, dtype=np.float32)
        )
    args = ["--dataset-root", str(dataset_root), "--maps", str(tmp_path / "maps"), "--category", "bottle"]
    code, out, _ = score(capsys, *args, "--size", "8", "--json")
    assert code == 0
    assert json.loads(out)["categories"]["bottle"]["image_auroc"] == pytest.approx(5 / 6)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda maps: (maps / "bottle/test/crack/001.tiff").unlink(), "001.png has no anomaly map"),
        (lambda maps: np.save(maps / "bottle/test/good/001.npy", np.full((16, 16), np.nan)), "NaN or inf"),
        (lambda maps: np.save(maps / "bottle/test/crack/002.npy", np.zeros((2, 16, 16))), "expected one 2-D"),
        (
            lambda maps: write_png(maps / "bottle/test/crack/000.png", np.zeros((16, 16, 3), dtype=np.uint8)),
            r"000\.png has shape \(16, 16, 3\)",
        ),
        (
            lambda maps: np.save(maps / "bottle/test/crack/999.npy", np.zeros((16, 16))),
            "999.npy matches no test",
        ),
        (lambda maps: np.save(maps / "bottle/test/good/000.npy", np.zeros((16, 16))), "several anomaly maps"),
        (lambda maps: (maps / "bottle/test/good/001.npy").write_bytes(b"garbage"), "cannot read anomaly map"),
        (lambda maps: (maps / "carpet").mkdir(), "maps folder .*carpet matches no mvtec category"),
    ],
)
def test_bad_maps_are_input_errors(layout, capsys: pytest.CaptureFixture[str], damage, message: str) -> None:
    dataset_root, maps_root, _ = layout
    damage(maps_root)
    code, out, err = score(
        capsys, "--dataset-root", str(dataset_root), "--maps", str(maps_root), "--size", "16"
    )
    assert code == 2
    assert out == ""
    assert err.startswith("tfsearch score: error: ")
    assert re.search(message, err), err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--limit", "0"], "--limit 0.0"),
        (["--size", "0"], "--size 0"),
        (["--category", "zipper"], "unknown --category 'zipper'"),
    ],
)
def test_bad_flags_are_input_errors(
    layout, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    dataset_root, maps_root, _ = layout
    code, _, err = score(capsys, "--dataset-root", str(dataset_root), "--maps", str(maps_root), *extra)
    assert code == 2
    assert message in err


def test_errors_about_the_dataset_name_its_flag_dataset_root(layout, tmp_path, capsys) -> None:
    """`tfsearch score` takes --dataset-root (other commands --data-root): its errors name its own flag."""
    dataset_root, maps_root, _ = layout
    (tmp_path / "empty").mkdir()
    cases = [
        (tmp_path / "nowhere", [], "does not exist"),
        (tmp_path / "empty", [], "no mvtec categories in --dataset-root"),
        (dataset_root, ["--category", "zipper"], f"in --dataset-root {dataset_root}"),
    ]
    for root, extra, message in cases:
        code, _, err = score(capsys, "--dataset-root", str(root), "--maps", str(maps_root), *extra)
        assert code == 2 and message in err and "--dataset-root" in err, err
        assert "--data-root" not in err


def test_missing_maps_folder_is_an_input_error(layout, capsys: pytest.CaptureFixture[str]) -> None:
    dataset_root, maps_root, _ = layout
    code, _, err = score(capsys, "--dataset-root", str(dataset_root), "--maps", str(maps_root / "none"))
    assert code == 2 and "does not exist" in err
    (maps_root / "empty").mkdir()
    code, _, err = score(capsys, "--dataset-root", str(dataset_root), "--maps", str(maps_root / "empty"))
    assert code == 2 and "has no category folder" in err


# ------------------------------------------------------------------------------ native resolution (MVTec)
HEIGHT, WIDTH = 10, 14  # non-square, as VisA's images are


def mvtec_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """MVTec AD's AUPRO from its definition, threshold by threshold: at every distinct score t, the FPR over
    normal pixels and the mean over all defect regions (8-connected, per image) of the fraction ≥ t; the PRO
    curve from (0, 0) integrated with the trapezoid rule to FPR `limit` (interpolated there), over `limit`."""
    from scipy import ndimage

    regions = []
    for image_map, mask in zip(maps, masks, strict=True):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [image_map[labels == k] for k in range(1, count + 1)]
    normal = maps[~masks]
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        points.append(((normal >= t).mean(), np.mean([(r >= t).mean() for r in regions])))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += 0.5 * (y0 + y1) * (x1 - x0)
    return area / limit


def write_non_square(root: Path, rng: np.random.Generator) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """bottle with HEIGHT×WIDTH images: 3 good, 4 cracked (two blobs in one); returns (id, map, mask)."""
    written = []
    write_png(root / "bottle" / "train" / "good" / "000.png", np.zeros((HEIGHT, WIDTH, 3), np.uint8))
    for index in range(7):
        defect = "good" if index < 3 else "crack"
        stem = f"{index:03d}"
        write_png(root / "bottle" / "test" / defect / f"{stem}.png", np.zeros((HEIGHT, WIDTH, 3), np.uint8))
        mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
        if defect == "crack":
            y, x = rng.integers(0, HEIGHT - 3), rng.integers(0, WIDTH - 4)
            mask[y : y + 3, x : x + 4] = True
            if index == 6:
                mask[0, WIDTH - 1] = True  # a one-pixel region
            write_png(
                root / "bottle" / "ground_truth" / defect / f"{stem}_mask.png", mask.astype(np.uint8) * 255
            )
        values = (rng.random((HEIGHT, WIDTH)) + 0.6 * mask).astype(np.float32)
        written.append((f"test/{defect}/{stem}", values, mask))
    return written


def test_native_size_on_non_square_maps_equals_mvtec_aupro(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(7)
    dataset_root = tmp_path / "mvtec"
    written = write_non_square(dataset_root, rng)
    for image_id, values, _ in written:
        write_map(tmp_path / "maps" / "bottle" / f"{image_id}.tiff", values)
    code, out, err = score(
        capsys, "--dataset-root", str(dataset_root), "--maps", str(tmp_path / "maps"), "--json"
    )
    assert code == 0 and err == ""  # nothing resized, no 8-bit map
    bottle = json.loads(out)["categories"]["bottle"]
    maps = np.stack([values for _, values, _ in written])
    masks = np.stack([mask for _, _, mask in written])
    assert bottle["shape"] == [HEIGHT, WIDTH] and bottle["resized"] == 0
    assert bottle["aupro"] == pytest.approx(mvtec_aupro(maps, masks), abs=1e-12)
    assert bottle["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert bottle["image_auroc"] == pytest.approx(
        roc_auc_score(masks.any(axis=(1, 2)), maps.max(axis=(1, 2)))
    )
    # --size 256 keeps TransFusion's protocol: maps and masks resized to 256×256
    code, out, _ = score(
        capsys,
        "--dataset-root",
        str(dataset_root),
        "--maps",
        str(tmp_path / "maps"),
        "--size",
        "256",
        "--json",
    )
    samples = load_category("mvtec", dataset_root, "bottle").test
    by_id = {image_id: values for image_id, values, _ in written}
    resized = np.stack(
        [
            np.asarray(Image.fromarray(by_id[s.image_id]).resize((256, 256), Image.Resampling.BILINEAR))
            for s in samples
        ]
    )
    expected = evaluate(GroundTruth.from_masks(load_masks(samples, 256)), resized)["aupro"]
    assert json.loads(out)["categories"]["bottle"]["aupro"] == pytest.approx(expected, abs=1e-12)
    assert expected != pytest.approx(bottle["aupro"], abs=1e-6)


def test_maps_at_another_shape_are_resized_to_the_masks_and_said(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(8)
    dataset_root = tmp_path / "mvtec"
    written = write_non_square(dataset_root, rng)
    levels = {image_id: 0.1 * index for index, (image_id, _, _) in enumerate(written)}
    for image_id, value in levels.items():  # constant maps stay constant under any bilinear resize
        write_map(tmp_path / "maps" / "bottle" / f"{image_id}.tiff", np.full((20, 28), value, np.float32))
    code, out, err = score(
        capsys, "--dataset-root", str(dataset_root), "--maps", str(tmp_path / "maps"), "--json"
    )
    assert code == 0
    assert f"bottle: 7 of 7 maps resized (bilinear) to their masks' size {HEIGHT}x{WIDTH}" in err
    assert json.loads(out)["categories"]["bottle"]["image_auroc"] == 1.0  # the cracked images score highest


def test_eight_bit_png_maps_give_a_warning(layout, capsys) -> None:
    dataset_root, maps_root, _ = layout
    code, out, err = score(capsys, "--dataset-root", str(dataset_root), "--maps", str(maps_root))
    assert code == 0 and "scored at each mask's own size" in out
    assert "warning: bottle: 1 maps are 8-bit images (256 levels): many pixels tie" in err


def test_a_category_of_mixed_image_sizes_needs_size(tmp_path: Path, capsys) -> None:
    dataset_root = write_dataset(tmp_path / "mvtec")
    write_png(dataset_root / "bottle" / "test" / "good" / "001.png", np.zeros((8, 8, 3), np.uint8))
    write_maps(tmp_path / "maps", dataset_root)
    args = ["--dataset-root", str(dataset_root), "--maps", str(tmp_path / "maps"), "--category", "bottle"]
    code, _, err = score(capsys, *args)
    assert code == 2 and "test images have different sizes" in err and "--size N" in err
    assert score(capsys, *args, "--size", "16")[0] == 0
