"""MVTec AD 2: its layout (generated at test time, `mvtec_ad2_data`), selection on its validation split, its
metrics against straightforward reference implementations, `tfsearch score`, and the submission folder."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from bisect import bisect
from pathlib import Path

import numpy as np
import optuna
import pytest
import tifffile
import torch
from mvtec_ad2_data import SIZES, write_category, write_mvtec_ad2
from PIL import Image
from scipy.ndimage import label
from sklearn.metrics import f1_score, roc_auc_score

from tfsearch.cli import build_parser, main
from tfsearch.data.datasets import is_texture_category, list_categories, load_category, resolve_categories
from tfsearch.data.mvtec_ad2 import MVTEC_AD2_CATEGORIES, PRIVATE_IMAGE_COUNTS, private_images
from tfsearch.errors import InputError
from tfsearch.maps.cache import MapSet, read_map_set, write_map_set
from tfsearch.maps.fusion import fuse
from tfsearch.maps.metrics import GroundTruth, evaluate, seg_f1, segmentation_threshold
from tfsearch.maps.segmentation import milestone_seg_threshold
from tfsearch.maps.submission import (
    check_submission,
    expected_images,
    official_problems,
    write_prediction,
)
from tfsearch.run.selection.candidates import Candidate, CategoryMaps
from tfsearch.run.space import METRICS

# ------------------------------------------------------------------------------------------ references


def reference_aupro(masks: np.ndarray, maps: np.ndarray, limit: float) -> float:
    """AU-PRO as MVTec's evaluation code computes it (`compute_pro` and `trapezoid` of MVTec AD's
    `au_pro_util.py`), written out plainly: 8-connected regions, one pixel at a time in descending score
    order, the last point of each run of tied scores, curves clipped to 1 and padded with (0, 0) and (1, 1),
    the trapezoid rule to `limit` with linear interpolation at it, divided by `limit`."""
    fp_change = np.zeros(maps.shape, np.float64)
    pro_change = np.zeros(maps.shape, np.float64)
    ok_pixels = regions = 0
    for index, mask in enumerate(masks):
        labelled, count = label(mask, structure=np.ones((3, 3), int))
        regions += count
        ok_pixels += int(np.sum(labelled == 0))
        fp_change[index][labelled == 0] = 1
        for region in range(1, count + 1):
            pro_change[index][labelled == region] = 1.0 / np.sum(labelled == region)
    order = np.argsort(maps.ravel(), kind="stable")[::-1]
    scores = maps.ravel()[order]
    fprs = np.cumsum(fp_change.ravel()[order]) / ok_pixels
    pros = np.cumsum(pro_change.ravel()[order]) / regions
    keep = np.append(np.diff(scores) != 0, True)
    fprs = np.concatenate(([0.0], np.minimum(fprs[keep], 1.0), [1.0]))
    pros = np.concatenate(([0.0], np.minimum(pros[keep], 1.0), [1.0]))
    correction = 0.0
    if limit not in fprs:
        at = bisect(list(fprs), limit)
        y_at = pros[at - 1] + (pros[at] - pros[at - 1]) * (limit - fprs[at - 1]) / (fprs[at] - fprs[at - 1])
        correction = 0.5 * (y_at + pros[at - 1]) * (limit - fprs[at - 1])
    kept = fprs <= limit
    x, y = fprs[kept], pros[kept]
    return (float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1]))) + correction) / limit


def reference_threshold(maps: np.ndarray, normal: np.ndarray, k: float = 3.0) -> float:
    """mean + k std of the normal images' pixels (k = 3: MVTec's suggested baseline), plainly."""
    pixels = np.concatenate([m.astype(np.float64).ravel() for m, ok in zip(maps, normal, strict=True) if ok])
    return float(np.mean(pixels) + k * np.std(pixels))


def reference_seg_f1(masks: np.ndarray, maps: np.ndarray, threshold: float) -> float:
    """Pixel F1 of `maps > threshold`, every image's pixels pooled (sklearn)."""
    return float(f1_score(masks.ravel(), maps.ravel() > threshold))


def _masks(rng: np.random.Generator, count: int, height: int, width: int) -> np.ndarray:
    masks = np.zeros((count, height, width), bool)
    for index in range(count // 2, count):  # the first half normal, the rest with one to three defects
        for _ in range(1 + index % 3):
            top, left = rng.integers(0, height - 3), rng.integers(0, width - 3)
            masks[index, top : top + rng.integers(1, 4), left : left + rng.integers(1, 5)] = True
    return masks


def _cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(5)
    masks = _masks(rng, 8, 12, 15)
    noise = rng.random(masks.shape).astype(np.float32)
    informative = (noise + 0.8 * masks).astype(np.float32)
    return {
        "random": (masks, noise),
        "informative": (masks, informative),
        "ties across classes": (masks, np.round(informative * 3) / 3),  # four levels: huge tied runs
        "constant": (masks, np.full(masks.shape, 0.25, np.float32)),
        "defects tied with normal pixels": (masks, np.where(masks, 0.5, rng.choice([0.5, 0.1], masks.shape))),
        "float16 maps": (masks, informative.astype(np.float16)),
    }


# ------------------------------------------------------------------------------------------ the layout


def test_the_layout_is_read_with_its_validation_split(tmp_path):
    root = write_mvtec_ad2(tmp_path / "ad2", ("can", "fabric"))
    assert list_categories("mvtec_ad2", root) == ["can", "fabric"]
    assert resolve_categories("mvtec_ad2", root, None, "fabric") == ["fabric"]
    category = load_category("mvtec_ad2", root, "can")
    assert [s.image_id for s in category.train][:2] == ["train/good/000_regular", "train/good/001_regular"]
    assert [s.image_id for s in category.validation] == [f"validation/good/{i:03d}_regular" for i in range(4)]
    assert {s.image_id.rsplit("/", 1)[0] for s in category.test} == {"test_public/good", "test_public/bad"}
    bad = [s for s in category.test if s.label]
    assert [s.mask.name for s in bad] == [
        "000_regular_mask.png",
        "001_overexposed_mask.png",
        "002_regular_mask.png",
    ]
    assert all(s.mask.parent == root / "can" / "test_public" / "ground_truth" / "bad" for s in bad)
    with Image.open(category.test[0].image) as image:
        assert image.size == SIZES["can"] and image.size[0] != image.size[1]  # non-square
    assert [p.name for p in private_images(root / "can", "test_private_mixed")][0] == "000_mixed.png"
    assert is_texture_category("mvtec_ad2", "fabric") and not is_texture_category("mvtec_ad2", "can")
    assert len(MVTEC_AD2_CATEGORIES) == 8 and sorted(PRIVATE_IMAGE_COUNTS) == list(MVTEC_AD2_CATEGORIES)
    for command in (["train", "--out", "x"], ["run"]):
        assert build_parser().parse_args([*command, "--dataset", "mvtec_ad2"]).dataset == "mvtec_ad2"


@pytest.mark.parametrize(
    "break_it, path, message",
    [
        (lambda c: shutil.rmtree(c / "validation"), "can/validation/good", "holds: test_private"),
        (
            lambda c: (c / "test_public").rename(c / "test"),
            "can/test_public/good",
            "holds: test, test_private",
        ),
        (lambda c: shutil.rmtree(c / "train" / "good"), "can/train/good", "expected the layout"),
        (
            lambda c: (c / "test_public/ground_truth/bad/001_overexposed_mask.png").unlink(),
            "can/test_public/ground_truth/bad/001_overexposed_mask.png",
            "has no mask",
        ),
        (lambda c: (c / "validation" / "good").rename(c / "validation" / "ok"), "can/validation/good", "ok"),
    ],
)
def test_a_malformed_layout_is_an_error_naming_the_path(tmp_path, break_it, path, message, capsys):
    root = write_mvtec_ad2(tmp_path / "ad2", ("can", "rice"))
    break_it(root / "can")
    with pytest.raises(InputError) as error:
        load_category("mvtec_ad2", root, "can")
    assert str(root / path) in str(error.value) and message in str(error.value), error.value
    # the command line says the same, exit status 2
    code = main(["train", "--dataset", "mvtec_ad2", "--data-root", str(root), "--category", "can",
                 "--out", str(tmp_path / "run"), "--profile", "cpu"])  # fmt: skip
    assert code == 2 and str(root / path) in capsys.readouterr().err


def test_a_category_given_as_root_or_private_sets_out_of_layout_are_named(tmp_path):
    root = write_mvtec_ad2(tmp_path / "ad2", ("can",))
    with pytest.raises(InputError, match="itself looks like one category"):
        list_categories("mvtec_ad2", root / "can")
    (root / "can" / "test_private" / "extra").mkdir()
    with pytest.raises(InputError, match="holds the folder extra: expected its images directly"):
        private_images(root / "can", "test_private")
    shutil.rmtree(root / "can" / "test_private_mixed")
    with pytest.raises(InputError, match=f"{root / 'can' / 'test_private_mixed'} is missing"):
        private_images(root / "can", "test_private_mixed")


# ------------------------------------------------------------------------------------------ metrics


@pytest.mark.parametrize("case", list(_cases()))
@pytest.mark.parametrize("limit", [0.05, 0.3, 0.0537, 0.21, 1.0])
def test_metrics_equal_the_reference_implementations(case, limit):
    masks, maps = _cases()[case]
    gt = GroundTruth.from_masks(masks)
    result = evaluate(gt, maps, limit=limit)
    wide = maps.astype(np.float64)
    assert result["aupro"] == pytest.approx(reference_aupro(masks, wide, limit), abs=1e-9)
    assert result["aupro_05"] == pytest.approx(reference_aupro(masks, wide, 0.05), abs=1e-9)
    labels = masks.any(axis=(1, 2))
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, wide.max(axis=(1, 2))), abs=1e-12)
    threshold = reference_threshold(wide, ~labels)
    assert segmentation_threshold(maps, ~labels) == pytest.approx(threshold, rel=1e-12, abs=1e-12)
    assert result["seg_f1"] == pytest.approx(reference_seg_f1(masks, wide, threshold), abs=1e-12)
    for other in (0.0, 0.3, 0.5, 0.99, float(np.median(wide))):  # thresholds at and between scores
        assert seg_f1(gt, maps, other) == pytest.approx(reference_seg_f1(masks, wide, other), abs=1e-12)


def test_aupro_where_the_limit_is_a_curve_point_and_where_it_falls_between():
    """100 normal pixels with distinct scores: the FPR steps by 0.01, so 0.05 is a point of the curve (no
    interpolation) while 0.0537 and 0.055 fall between two points (interpolated)."""
    masks = np.zeros((1, 10, 12), bool)
    masks[0, :2, :10] = True  # 20 defect pixels in one region, 100 normal pixels
    rng = np.random.default_rng(2)
    maps = rng.permutation(masks.size).reshape(masks.shape).astype(np.float64) / masks.size
    maps[masks] += 0.3
    gt = GroundTruth.from_masks(masks)
    assert gt.n_normal_pixels == 100
    for limit in (0.05, 0.0537, 0.055, 0.3):
        assert evaluate(gt, maps, limit=limit)["aupro"] == pytest.approx(
            reference_aupro(masks, maps, limit), abs=1e-12
        )


def test_seg_f1_binarises_strictly_above_the_threshold_and_is_undefined_without_defects():
    masks = np.zeros((3, 4, 4), bool)
    masks[2, 1:3, 1:3] = True
    maps = np.full(masks.shape, 0.5, np.float32)  # normal images constant: threshold 0.5 + 3 * 0 = 0.5
    maps[2][masks[2]] = 0.5  # defects tied with the threshold: not above it, so not found
    maps[2, 0, 0] = 0.75  # one false positive above it
    gt = GroundTruth.from_masks(masks)
    normal = ~masks.any(axis=(1, 2))
    assert segmentation_threshold(maps, normal) == 0.5
    assert evaluate(gt, maps)["seg_f1"] == 0.0 == reference_seg_f1(masks, maps, 0.5)
    maps[2][masks[2]] = 0.5001
    assert evaluate(gt, maps)["seg_f1"] == pytest.approx(2 * 4 / (5 + 4))
    assert math.isnan(evaluate(GroundTruth.from_masks(np.zeros_like(masks)), maps)["seg_f1"])
    assert math.isnan(segmentation_threshold(maps, np.zeros(3, bool)))
    assert {"aupro_05", "seg_f1"} <= set(METRICS)


# ------------------------------------------------------------------------------------------ thresholds


def _map_set(rng, masks: np.ndarray, split: str) -> MapSet:
    raw = rng.random(masks.shape).astype(np.float32) + 0.5 * masks
    return MapSet(
        m_disc=raw,
        m_recon=rng.random(masks.shape).astype(np.float32),
        masks=masks,
        labels=masks.any(axis=(1, 2)).astype(np.int8),
        image_ids=[f"{split}/x/{i}" for i in range(len(masks))],
        meta={"dataset": "mvtec_ad2", "category": "can", "epoch": 1, "split": split, "image_size": 16,
              "data_root": None, "mask_paths": [None] * len(masks)},
    )  # fmt: skip


def test_seg_f1_on_the_test_set_takes_its_threshold_from_the_validation_maps(tmp_path):
    """With validation maps beside the test maps (a run with --select-on val) SegF1's threshold comes from
    their normal images, whatever the test set holds; only without them (the oracle protocol) from the test
    set's own normal images. The export records the same threshold and where it came from."""
    rng = np.random.default_rng(3)
    test_masks, val_masks = _masks(rng, 6, 16, 16), _masks(rng, 8, 16, 16)
    test_dir, val_dir = tmp_path / "maps" / "test" / "epoch-0001", tmp_path / "maps" / "val" / "epoch-0001"
    write_map_set(test_dir, _map_set(rng, test_masks, "test"))
    write_map_set(val_dir, _map_set(rng, val_masks, "val"))
    candidate = Candidate("default", 1, 0.7, 3)
    val, test = read_map_set(val_dir), read_map_set(test_dir)
    val_fused = fuse(val.m_disc, val.m_recon, 0.7, 3)
    test_fused = fuse(test.m_disc, test.m_recon, 0.7, 3)
    threshold = reference_threshold(val_fused, ~val_masks.any(axis=(1, 2)))
    metrics = CategoryMaps({("default", 1): test_dir}).evaluate(candidate)
    assert metrics["seg_f1"] == pytest.approx(reference_seg_f1(test_masks, test_fused, threshold), abs=1e-12)
    assert milestone_seg_threshold(test_dir, 0.7, 3)["split"] == "val"
    assert milestone_seg_threshold(test_dir, 0.7, 3)["value"] == pytest.approx(threshold, rel=1e-12)
    # the validation maps themselves: their own normal images
    own = CategoryMaps({("default", 1): val_dir}).evaluate(candidate)
    assert own["seg_f1"] == pytest.approx(reference_seg_f1(val_masks, val_fused, threshold), abs=1e-12)
    # without validation maps (the oracle protocol): the test set's own normal images
    shutil.rmtree(tmp_path / "maps" / "val")
    oracle = reference_threshold(test_fused, ~test_masks.any(axis=(1, 2)))
    metrics = CategoryMaps({("default", 1): test_dir}).evaluate(candidate)
    assert metrics["seg_f1"] == pytest.approx(reference_seg_f1(test_masks, test_fused, oracle), abs=1e-12)
    assert milestone_seg_threshold(test_dir, 0.7, 3)["split"] == "test"


def test_a_searched_threshold_k_is_chosen_with_the_configuration_on_validation_data_only(tmp_path):
    """`params.seg_sigmas` searched with `selection.metric: seg_f1`: the study picks (epoch, λ, n, k) with the
    best validation SegF1, equal to a brute force over every combination with the reference implementations;
    the test maps are not there while it runs. The chosen k also sets the test SegF1 and the export's rule."""
    from tfsearch.run.selection.study import StudySpec, best_candidate, run_study
    from tfsearch.run.space import parse_space
    from tfsearch.store.run_folder import TRIAL_COLUMNS

    rng = np.random.default_rng(11)
    dirs = {}
    for epoch in (1, 2):
        for split, count in (("test", 6), ("val", 8)):
            masks = _masks(rng, count, 16, 16)
            write_map_set(tmp_path / "maps" / split / f"epoch-{epoch:04d}", _map_set(rng, masks, split))
        dirs["default", epoch] = tmp_path / "maps" / "val" / f"epoch-{epoch:04d}"
    ks = [0.5, 1.0, 2.0, 3.0]
    payload = {"name": "t", "profile": "cpu", "selection": {"metric": "seg_f1", "sampler": "exhaustive"},
               "params": {"epoch": "milestones", "lam": {"grid": [0.3, 0.7]}, "kernel": {"grid": [1, 3]},
                          "seg_sigmas": {"grid": ks}}}  # fmt: skip
    space = parse_space(payload, "t.yaml")
    shutil.move(tmp_path / "maps" / "test", tmp_path / "hidden")  # no test label can be read
    default = Candidate("default", 2, 0.95, 3)
    spec = StudySpec("t/can", space, {"can": CategoryMaps(dirs, (1, 3))}, sorted(dirs), default)
    chosen, choice = best_candidate(run_study(optuna.storages.InMemoryStorage(), spec), default)

    brute = {}
    for (_, epoch), folder in dirs.items():
        maps = read_map_set(folder)
        masks, normal = np.asarray(maps.masks), ~np.asarray(maps.masks).any(axis=(1, 2))
        for lam in (0.3, 0.7):
            for n in (1, 3):
                fused = fuse(maps.m_disc, maps.m_recon, lam, n)
                for k in ks:
                    brute[epoch, lam, n, k] = reference_seg_f1(
                        masks, fused, reference_threshold(fused, normal, k)
                    )
    best = max(brute.values())
    assert choice["value"] == pytest.approx(best, abs=1e-12) and choice["trial"] is not None
    assert brute[chosen.epoch, chosen.lam, chosen.kernel, chosen.seg_sigmas] == pytest.approx(best, abs=1e-12)
    assert len({round(v, 12) for v in brute.values()}) > len(brute) // 4  # k moves SegF1: a real choice
    assert "seg_sigmas" in TRIAL_COLUMNS and {"aupro_05", "seg_f1"} <= set(TRIAL_COLUMNS)

    # the test SegF1 of the choice binarises the test maps at the validation threshold of the chosen k
    shutil.move(tmp_path / "hidden", tmp_path / "maps" / "test")
    test_dir, val_dir = (tmp_path / "maps" / s / f"epoch-{chosen.epoch:04d}" for s in ("test", "val"))
    val, test = read_map_set(val_dir), read_map_set(test_dir)
    normal = ~np.asarray(val.masks).any(axis=(1, 2))
    threshold = reference_threshold(
        fuse(val.m_disc, val.m_recon, chosen.lam, chosen.kernel), normal, chosen.seg_sigmas
    )
    tested = CategoryMaps({("default", chosen.epoch): test_dir}).evaluate(chosen)
    test_fused = fuse(test.m_disc, test.m_recon, chosen.lam, chosen.kernel)
    assert tested["seg_f1"] == pytest.approx(reference_seg_f1(np.asarray(test.masks), test_fused, threshold))
    recorded = milestone_seg_threshold(test_dir, chosen.lam, chosen.kernel, chosen.seg_sigmas)
    assert recorded["value"] == pytest.approx(threshold, rel=1e-12)
    assert recorded["rule"] == f"mean + {chosen.seg_sigmas:g} std of the normal images' pixels"


@pytest.mark.parametrize(
    ("params", "metric", "message"),
    [
        ({"seg_sigmas": {"grid": [1, 3]}}, "image_auroc", "searched values change SegF1 alone.*image_auroc"),
        ({"seg_sigmas": -1}, "seg_f1", "params.seg_sigmas: expected finite numbers >= 0"),
        ({"seg_sigmas": {"choices": [2, math.inf]}}, "seg_f1", "params.seg_sigmas: expected finite numbers"),
        ({"seg_sigma": 2}, "seg_f1", r"unknown parameter\(s\) \['seg_sigma'\]; known: epoch, lam, kernel"),
    ],
)
def test_a_bad_seg_sigmas_is_an_error_naming_the_key(params, metric, message):
    from tfsearch.run.space import parse_space

    payload = {"name": "t", "selection": {"metric": metric, "sampler": "tpe", "trials": 4}, "params": params}
    with pytest.raises(InputError, match=message):
        parse_space(payload, "t.yaml")
    fixed = parse_space({**payload, "params": {"seg_sigmas": 2}}, "t.yaml")  # a fixed k: any metric
    assert fixed.values("seg_sigmas", 3.0) == (2,)


def test_synthetic_validation_uses_the_validation_split_and_holds_out_no_training_image(tmp_path):
    from tfsearch.transfusion.job import TrainJob
    from tfsearch.transfusion.profiles import get_profile
    from tfsearch.transfusion.training_data import prepare_data

    root = write_mvtec_ad2(tmp_path / "ad2", ("can",))
    profile = get_profile("cpu").replace(image_size=32)
    job = TrainJob("mvtec_ad2", "can", profile, data_root=root, validation="synthetic")
    data = prepare_data(job, torch.device("cpu"))
    assert data.train_images.shape[0] == 10  # every training image trains
    val = data.eval_sets["val"]
    stems = [f"{i:03d}_regular" for i in range(4)]
    assert val.image_ids == [f"val/good/{s}" for s in stems] + [f"val/synthetic/{s}" for s in stems]
    assert val.labels[:4].tolist() == [0] * 4 and not val.masks[:4].any() and val.masks[4:].any()
    assert data.eval_sets["test"].image_ids[0] == "test_public/bad/000_regular"


# ------------------------------------------------------------------------------------------ score


def test_score_gives_mvtec_ad2_metrics_at_native_size_with_the_threshold_from_validation_maps(
    tmp_path, capsys
):
    root = write_mvtec_ad2(tmp_path / "ad2", ("can",))
    category = load_category("mvtec_ad2", root, "can")
    rng = np.random.default_rng(4)
    width, height = SIZES["can"]
    maps_root = tmp_path / "maps"
    masks, maps = [], []
    for sample in category.test:
        mask = np.zeros((height, width), bool)
        if sample.mask is not None:
            mask = np.asarray(Image.open(sample.mask)) > 0
        score = (rng.random((height, width)) + 0.7 * mask).astype(np.float16)  # a submission's dtype
        (maps_root / "can" / sample.image_id).parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(maps_root / "can" / f"{sample.image_id}.tiff", score)
        masks.append(mask)
        maps.append(score.astype(np.float64))
    masks, maps = np.stack(masks), np.stack(maps)
    args = [
        "score",
        "--dataset",
        "mvtec_ad2",
        "--dataset-root",
        str(root),
        "--maps",
        str(maps_root),
        "--json",
    ]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)["categories"]["can"]
    assert result["aupro_05"] == pytest.approx(reference_aupro(masks, maps, 0.05), abs=1e-9)
    assert result["aupro"] == pytest.approx(reference_aupro(masks, maps, 0.3), abs=1e-9)
    assert result["seg_f1"] is None and "no validation maps" in result["undefined"]["seg_f1"]
    validation = []
    for sample in category.validation:
        score = rng.random((height, width)).astype(np.float16)
        (maps_root / "can" / sample.image_id).parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(maps_root / "can" / f"{sample.image_id}.tiff", score)
        validation.append(score.astype(np.float64))
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)["categories"]["can"]
    threshold = reference_threshold(np.stack(validation), np.ones(len(validation), bool))
    assert result["seg_f1"] == pytest.approx(reference_seg_f1(masks, maps, threshold), abs=1e-12)
    assert main(args[:-1]) == 0 and "seg_f1" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ submission


def independent_check(folder: Path, data_root: Path, categories: list[str]) -> None:
    """What MVTec's check requires, written out plainly against the dataset on disk: exactly the two folders,
    the categories, the two private sets, one file per test image named after it, 2-D float16 TIFFs and
    {0, 255} PNGs, each at its test image's size."""
    assert sorted(p.name for p in folder.iterdir()) == ["anomaly_images", "anomaly_images_thresholded"]
    for kind, suffix in (("anomaly_images", ".tiff"), ("anomaly_images_thresholded", ".png")):
        assert sorted(p.name for p in (folder / kind).iterdir()) == sorted(categories)
        for category in categories:
            assert sorted(p.name for p in (folder / kind / category).iterdir()) == [
                "test_private",
                "test_private_mixed",
            ]
            for split in ("test_private", "test_private_mixed"):
                images = sorted((data_root / category / split).glob("*.png"))
                files = sorted((folder / kind / category / split).iterdir())
                assert [f.name for f in files] == [i.stem + suffix for i in images]
                for image, file in zip(images, files, strict=True):
                    values = tifffile.imread(file) if suffix == ".tiff" else np.asarray(Image.open(file))
                    assert values.shape == Image.open(image).size[::-1]
                    if suffix == ".tiff":
                        assert values.dtype == np.float16
                    else:
                        assert values.dtype == np.uint8 and set(np.unique(values)) <= {0, 255}


def test_the_submission_check_finds_what_mvtecs_check_would(tmp_path):
    root = write_mvtec_ad2(tmp_path / "ad2", ("can", "fabric"), private=2)
    expected = expected_images(root, ["can", "fabric"])
    folder = tmp_path / "submission"
    rng = np.random.default_rng(0)
    for category, splits in expected.items():
        for split, sizes in splits.items():
            for name, shape in sizes.items():
                write_prediction(folder, category, split, name, rng.random(shape), 0.5)
    assert check_submission(folder, expected, {"can": 0.5, "fabric": 0.5}) == []
    independent_check(folder, root, ["can", "fabric"])
    problems = official_problems(expected)
    assert "categories fruit_jelly, rice, sheet_metal, vial, wallplugs, walnuts are missing" in problems[0]
    assert "can/test_private: 2 images, the server expects 321 named 000_regular ... 320_regular" in problems
    assert official_problems(
        {c: {s: {f"{i:03d}_{'regular' if s == 'test_private' else 'mixed'}": (1, 1)
                 for i in range(n)} for s in ("test_private", "test_private_mixed")}
         for c, n in PRIVATE_IMAGE_COUNTS.items()}
    ) == []  # fmt: skip
    tiff = Path("anomaly_images/can/test_private/000_regular.tiff")
    png = Path("anomaly_images_thresholded/fabric/test_private_mixed/001_mixed.png")
    breakages = [
        (lambda f: tifffile.imwrite(f / tiff, np.zeros((32, 48), np.float32)), "float32, expected float16"),
        (lambda f: tifffile.imwrite(f / tiff, np.zeros((30, 48), np.float16)), "48x30, expected its image's"),
        (lambda f: Image.fromarray(np.full((52, 36), 7, np.uint8)).save(f / png), "expected only 0 and 255"),
        (lambda f: (f / "notes.txt").write_text("x"), "superfluous file(s) [notes.txt]"),
        (lambda f: (f / tiff).unlink(), "missing file(s) [000_regular.tiff]"),
        (lambda f: (f / "anomaly_images/can/test").mkdir(), "superfluous folder(s) [test]"),
        (lambda f: shutil.rmtree(f / "anomaly_images_thresholded/can"), "missing folder(s) [can]"),
    ]
    for index, (break_it, message) in enumerate(breakages):
        broken = tmp_path / f"broken-{index}"
        shutil.copytree(folder, broken)
        break_it(broken)
        problems = check_submission(broken, expected)
        assert any(message in p for p in problems), (message, problems)
    # a mask that is not its anomaly image binarised at the threshold
    Image.fromarray(np.zeros((52, 36), np.uint8)).save(folder / png)
    tifffile.imwrite(
        folder / "anomaly_images/fabric/test_private_mixed/001_mixed.tiff", np.ones((52, 36), np.float16)
    )
    problems = check_submission(folder, expected, {"can": 0.5, "fabric": 0.5})
    assert any("not its anomaly image binarised at 0.5" in p for p in problems), problems


def test_run_on_validation_then_export_and_submit(tmp_path, ray_instance, capsys):
    """train -> run --select-on val (selection metric SegF1) -> export -> predict --mvtec-ad2-submission.
    The test maps (and with them the test masks) are moved away while the candidates are selected and while
    the export chooses its thresholds: neither reads them. The submission passes the layout check."""
    from test_search import TINY, write_space

    from tfsearch.deploy.export import export_run
    from tfsearch.run.plan import make_plan
    from tfsearch.run.results import write_selected, write_trials
    from tfsearch.run.selection.stage import Selection
    from tfsearch.run.start import start_run
    from tfsearch.run.training.stage import run_training
    from tfsearch.transfusion.job import TrainDir

    root = write_mvtec_ad2(tmp_path / "ad2", ("can",))
    params = {**TINY["params"], "seg_sigmas": {"choices": [1, 2, 3]}}  # SegF1's threshold k searched too
    selection = {"metric": "seg_f1", "sampler": "tpe", "trials": 4, "seed": 0}
    space = write_space(tmp_path, selection=selection, params=params)
    argv = ["run", "--space", str(space), "--dataset", "mvtec_ad2", "--data-root", str(root), "--quiet",
            "--runs-root", str(tmp_path / "runs"), "--name", "ad2", "--wandb", "disabled",
            "--select-on", "val"]  # fmt: skip
    plan = make_plan(build_parser().parse_args(argv))
    assert plan.categories == ["can"]
    start_run(plan, resume=False)
    run_training(plan)
    train_dir = TrainDir(plan.train_dir("can", "default"))
    val = read_map_set(train_dir.maps(2, "val"))
    assert {i.split("/")[1] for i in val.image_ids} == {"good", "synthetic"}
    assert sorted({i.split("/")[2] for i in val.image_ids}) == [f"{i:03d}_regular" for i in range(4)]

    hidden = tmp_path / "hidden"
    shutil.move(train_dir.root / "maps" / "test", hidden)
    Selection(plan).finish(failed={})
    write_trials(plan)
    shutil.move(hidden, train_dir.root / "maps" / "test")
    (row,) = write_selected(plan, failed={})  # the test metrics of what was chosen: test maps read only here
    assert row["protocol"] == "val" and row["selection_metric"] == "seg_f1"
    shutil.move(train_dir.root / "maps" / "test", hidden)
    exported = export_run(plan.run_dir, tmp_path / "models")
    shutil.move(hidden, train_dir.root / "maps" / "test")

    # the export's mask threshold: mean + k std of the validation maps' normal images at the chosen candidate
    segmentation = json.loads((exported[0] / "manifest.json").read_text())["segmentation_threshold"]
    chosen = Candidate(*(row[f"selected_{k}"] for k in ("model", "epoch", "lam", "kernel", "seg_sigmas")))
    assert chosen.seg_sigmas in (1, 2, 3) and segmentation["rule"].startswith(
        f"mean + {chosen.seg_sigmas:g} std"
    )
    with (plan.run_dir / "trials.csv").open(newline="") as handle:
        selects = [r for r in csv.DictReader(handle) if r["stage"] == "select"]
    assert len(selects) == 4 and all(r["seg_f1"] != "" and r["seg_sigmas"] != "" for r in selects)
    val = read_map_set(train_dir.maps(chosen.epoch, "val"))
    normal = ~np.asarray(val.masks).any(axis=(1, 2))  # validation/good (and a synthetic one left unchanged)
    assert normal[:4].all() and segmentation["split"] == "val"
    assert segmentation["normal_images"] == normal.sum()
    val_fused = fuse(val.m_disc, val.m_recon, chosen.lam, chosen.kernel)
    threshold = reference_threshold(val_fused, normal, chosen.seg_sigmas)
    assert segmentation["value"] == pytest.approx(threshold, rel=1e-9)
    # the test SegF1 of the chosen candidate binarises the test maps at that validation threshold
    test_dir = train_dir.maps(chosen.epoch, "test")
    test = read_map_set(test_dir)
    test_fused = fuse(test.m_disc, test.m_recon, chosen.lam, chosen.kernel)
    tested = CategoryMaps({(chosen.model, chosen.epoch): test_dir}).evaluate(chosen)
    assert tested["seg_f1"] == pytest.approx(reference_seg_f1(np.asarray(test.masks), test_fused, threshold))
    # selected.csv holds MVTec AD 2's test metrics of the default and the selected candidate
    with (plan.run_dir / "selected.csv").open(newline="") as handle:
        (written,) = list(csv.DictReader(handle))
    assert float(written["selected_test_seg_f1"]) == pytest.approx(tested["seg_f1"], rel=1e-12)
    assert float(written["selected_test_aupro_05"]) == pytest.approx(tested["aupro_05"], rel=1e-12)
    assert written["default_test_aupro_05"] != "" and "default_test_seg_f1" in written

    out = tmp_path / "submission"
    capsys.readouterr()
    argv = ["predict", str(tmp_path / "models"), "--mvtec-ad2-submission", str(out), "--data-root", str(root)]
    assert main([*argv, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "6 private test images of can" in printed and "not the submission the server takes" in printed
    independent_check(out, root, ["can"])
    assert check_submission(out, expected_images(root, ["can"]), {"can": segmentation["value"]}) == []
    # a second submission into a non-empty folder is refused, and nothing of it is left
    assert main([*argv, "--quiet"]) == 2 and "already exists" in capsys.readouterr().err
    write_category(tmp_path / "other", "can", private=2)
    assert main([*argv[:3], str(tmp_path / "s2"), "--data-root", str(tmp_path / "other"), "--quiet"]) == 0
    independent_check(tmp_path / "s2", tmp_path / "other", ["can"])


def test_predict_flags_of_the_submission(tmp_path, capsys):
    root = write_mvtec_ad2(tmp_path / "ad2", ("can",))
    cases = [
        (["predict", str(tmp_path)], "predict needs IMAGE|DIR arguments and --out"),
        (["predict", str(tmp_path), "--mvtec-ad2-submission", str(tmp_path / "s")], "needs --data-root"),
        (["predict", str(tmp_path), "x.png", "--mvtec-ad2-submission", "s", "--data-root", "r"], "takes no"),
        (["predict", str(tmp_path), "x.png", "--out", "o", "--data-root", str(root)], "go with --mvtec-ad2"),
        (["predict", str(tmp_path), "--mvtec-ad2-submission", str(tmp_path / "s"), "--data-root", str(root)],
         "no export found"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2
        assert message in capsys.readouterr().err, message
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------ evaluate


def test_evaluate_shows_mvtec_ad2_metrics_with_segf1_thresholded_on_the_validation_maps(tmp_path, capsys):
    """`tfsearch evaluate` of a training run: the paper's five metrics and AU-PRO to 0.05 and SegF1, whose
    threshold comes from the validation maps when the run has them (never from test labels then), from the
    test set's own normal images only without them; the table and --json say which."""
    from tfsearch.maps.metrics import EXTENDED_METRIC_NAMES
    from tfsearch.transfusion.evaluation import evaluate_run
    from tfsearch.transfusion.job import TrainDir, TrainJob
    from tfsearch.transfusion.profiles import get_profile

    rng = np.random.default_rng(11)
    run = tmp_path / "train"
    job = TrainJob(
        "mvtec_ad2", "can", get_profile("cpu").replace(epochs=1), milestones=(1,), validation="synthetic"
    )
    run.mkdir()
    (run / "job.json").write_text(json.dumps(job.to_dict()))
    train_dir = TrainDir(run)
    test_masks, val_masks = _masks(rng, 6, 16, 16), _masks(rng, 8, 16, 16)
    write_map_set(train_dir.maps(1, "test"), _map_set(rng, test_masks, "test"))
    write_map_set(train_dir.maps(1, "val"), _map_set(rng, val_masks, "val"))
    test, val = read_map_set(train_dir.maps(1, "test")), read_map_set(train_dir.maps(1, "val"))
    test_fused = fuse(test.m_disc, test.m_recon, 0.7, 3)
    threshold = reference_threshold(fuse(val.m_disc, val.m_recon, 0.7, 3), ~val_masks.any(axis=(1, 2)))
    oracle = reference_threshold(test_fused, ~test_masks.any(axis=(1, 2)))
    assert threshold != pytest.approx(oracle)

    result = evaluate_run(run, 1, 0.7, 3)
    assert set(EXTENDED_METRIC_NAMES) <= set(result) and {"aupro_05", "seg_f1"} <= set(EXTENDED_METRIC_NAMES)
    assert result["seg_f1"] == pytest.approx(reference_seg_f1(test_masks, test_fused, threshold), abs=1e-12)
    assert result["aupro_05"] == pytest.approx(reference_aupro(test_masks, test_fused, 0.05), abs=1e-9)
    assert result["seg_threshold"]["split"] == "val" and result["seg_threshold"]["normal_images"] == 4
    assert result["seg_threshold"]["value"] == pytest.approx(threshold, rel=1e-12)

    argv = ["evaluate", str(run), "--epoch", "1", "--lam", "0.7", "--kernel", "3"]
    assert main([*argv, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(printed)[7:14] == list(EXTENDED_METRIC_NAMES)
    assert printed["seg_f1"] == pytest.approx(result["seg_f1"]) and printed["seg_threshold"]["split"] == "val"
    assert main(argv) == 0
    table = capsys.readouterr().out
    for name in EXTENDED_METRIC_NAMES:
        assert re.search(rf"^  {name} +\d+\.\d\d$", table, re.M), name
    assert f"{100 * result['seg_f1']:.2f}" in table and "of split val (4 normal images)" in table

    # without validation maps (the oracle protocol): the test set's own normal images
    shutil.rmtree(run / "maps" / "val")
    result = evaluate_run(run, 1, 0.7, 3)
    assert result["seg_threshold"]["split"] == "test"
    assert result["seg_f1"] == pytest.approx(reference_seg_f1(test_masks, test_fused, oracle), abs=1e-12)


# ------------------------------------------------------------------------------------------ the report


def _ad2_run(
    root: Path, name: str, select_on: str, categories: list[str], extended: bool = True, ks: tuple = ()
) -> Path:
    """A finished run folder of `--dataset mvtec_ad2` (no training), its selected.csv with MVTec AD 2's
    metrics (`extended`; with `ks` the k of SegF1's threshold each category selected) or as a version before
    them wrote it."""
    from test_report import make_run
    from test_report import read_csv as read_rows
    from test_report import write_csv as write_rows

    from tfsearch.store.run_folder import SELECTED_COLUMNS

    run = make_run(root, name, "mvtec_ad2", categories, select_on=select_on, seed=len(name))
    rng = np.random.default_rng(len(name))
    rows = read_rows(run / "selected.csv")
    columns = SELECTED_COLUMNS
    if extended:
        for row in rows:
            for prefix in ("default", "selected"):
                row[f"{prefix}_test_aupro_05"], row[f"{prefix}_test_seg_f1"] = rng.uniform(0.1, 0.9, 2)
        for row, k in zip(rows, ks or [3.0] * len(rows), strict=True):
            row["default_seg_sigmas"], row["selected_seg_sigmas"] = 3.0, k
    else:
        columns = tuple(
            c for c in SELECTED_COLUMNS if not c.endswith(("_aupro_05", "_seg_f1", "_seg_sigmas"))
        )
    write_rows(run / "selected.csv", columns, rows)
    return run


def test_the_report_has_mvtec_ad2_tables_in_the_supplements_shape_without_a_published_row(tmp_path):
    from test_report import paper_rows, read_csv

    from tfsearch import report

    shuffled = ["walnuts", "can", "vial", "fabric"]  # shown in MVTec's order
    val = _ad2_run(tmp_path, "val", "val", shuffled, ks=(4.5, 2.0, 3.0, 3.0))  # SegF1's k searched
    oracle = _ad2_run(tmp_path, "oracle", "test", shuffled[:3])
    out = report.write_report([val, oracle], out=tmp_path / "out", wandb="disabled", quiet=True)
    tables = out / "tables"
    for metric in ("image_auroc", "aupro", "aupro_05", "seg_f1"):
        columns, rows = paper_rows(tables / f"mvtec_ad2_{metric}.csv")
        assert columns == ["can", "fabric", "vial", "walnuts", "Average"]
        assert list(rows) == ["default (val)", "selected (val)", "default (oracle)", "selected (oracle)"]
        for name, run in (("val", val), ("oracle", oracle)):
            written = {r["category"]: r for r in read_csv(run / "selected.csv")}
            for prefix in ("default", "selected"):
                values = [100 * float(written[c][f"{prefix}_test_{metric}"]) for c in written]
                row = rows[f"{prefix} ({name})"]
                for category in written:
                    expected = round(100 * float(written[category][f"{prefix}_test_{metric}"]), 1)
                    assert float(row[category]) == expected
                assert float(row["Average"]) == pytest.approx(np.mean(values), abs=0.051)
        assert rows["default (oracle)"]["fabric"] == ""  # a category the run lacks is blank
        assert (tables / f"mvtec_ad2_{metric}.tex").is_file()
    assert not list(tables.glob("paper_*mvtec_ad2*"))  # no generic paper table beside them
    assert not [r for r in read_csv(tables / "published_comparison.csv") if r["dataset"] == "mvtec_ad2"]
    text = (out / "report.md").read_text()
    assert "No TransFusion result on MVTec AD 2 is published" in text
    assert (
        "Run val: selected on the validation split (validation/good and the same images with synthetic"
        in text
    )
    assert "Run oracle: selected on test_public itself, test (oracle)" in text
    assert "mean + k·std of every pixel of the normal validation images (validation/good)" in text
    assert (
        "k = 3 (k as selected where the space searched it: run val: can 2, fabric 3, vial 3, walnuts 4.5)"
        in text
    )
    assert "not at each image's own size" in text and "tfsearch score --dataset mvtec_ad2" in text
    assert "AU-PRO (FPR 0.05)" in text and "SegF1" in (tables / "mvtec_ad2_seg_f1.tex").read_text()


def test_an_mvtec_ad2_run_without_the_new_columns_reports_the_metrics_it_has(tmp_path):
    from test_report import paper_rows

    from tfsearch import report

    old = _ad2_run(tmp_path, "old", "val", ["can", "rice"], extended=False)
    out = report.write_report([old], out=tmp_path / "out", wandb="disabled", quiet=True)
    assert {p.stem for p in (out / "tables").glob("mvtec_ad2_*.csv")} == {
        "mvtec_ad2_image_auroc",
        "mvtec_ad2_aupro",
    }
    _, rows = paper_rows(out / "tables" / "mvtec_ad2_aupro.csv")
    assert list(rows) == ["default (old)", "selected (old)"]
