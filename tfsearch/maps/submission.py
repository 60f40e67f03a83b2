"""MVTec AD 2 submissions: the folder MVTec's evaluation server takes, written and checked the way MVTec's
submission check (`check_and_prepare_data_for_upload.py` with its `utils.py`, shipped with the
dataset's public code) checks it, before anything is uploaded:

    SUBMISSION/anomaly_images/CATEGORY/test_private/NNN_regular.tiff             float16, single channel
    SUBMISSION/anomaly_images/CATEGORY/test_private_mixed/NNN_mixed.tiff
    SUBMISSION/anomaly_images_thresholded/CATEGORY/test_private/NNN_regular.png  uint8, 0 or 255
    SUBMISSION/anomaly_images_thresholded/CATEGORY/test_private_mixed/NNN_mixed.png

Each file is named after its test image and has that image's own size. MVTec's script requires exactly these
folders (no other folder or file at any level), every one of the eight categories, `PRIVATE_IMAGE_COUNTS`
files per private test set named 000_regular ... (000_mixed ...), TIFFs that are 2-D float16 and PNGs that
are 2-D with values in {0, 255}. `check_submission` checks all of that against the images of the dataset on
disk, and also each file's size and that no value is NaN or inf; `official_problems` says what keeps a
complete, valid folder from being the one the server expects (missing categories, other image counts or
names), e.g. for a subset of the categories.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from tfsearch.data.images import header_size
from tfsearch.data.mvtec_ad2 import (
    MVTEC_AD2_CATEGORIES,
    PRIVATE_SPLITS,
    official_private_names,
    private_images,
)
from tfsearch.errors import InputError

ANOMALY_IMAGES = "anomaly_images"
THRESHOLDED = "anomaly_images_thresholded"
KINDS = {ANOMALY_IMAGES: ".tiff", THRESHOLDED: ".png"}
ANOMALOUS, NORMAL = 255, 0
_FLOAT16_MAX = float(np.finfo(np.float16).max)
# problems listed before the rest are only counted
_SHOWN = 8

# what the expected images are: category -> private split -> image name (no extension) -> (height, width)
Expected = dict[str, dict[str, dict[str, tuple[int, int]]]]


def expected_images(data_root: Path, categories: list[str]) -> Expected:
    """The private test images of `categories` in an MVTec AD 2 root, with their sizes (headers only)."""
    expected: Expected = {}
    for category in categories:
        expected[category] = {}
        for split in PRIVATE_SPLITS:
            sizes = {}
            for path in private_images(Path(data_root) / category, split):
                width, height = header_size(path)
                sizes[path.stem] = (height, width)
            expected[category][split] = sizes
    return expected


def as_float16(anomaly_map: np.ndarray) -> np.ndarray:
    """The map as the float16 values a submission stores (clipped to float16's finite range)."""
    values = np.asarray(anomaly_map, dtype=np.float32)
    if not np.isfinite(values).all():
        raise InputError("anomaly map contains NaN or inf: expected finite scores")
    return np.clip(values, -_FLOAT16_MAX, _FLOAT16_MAX).astype(np.float16)


def binarised(values: np.ndarray, threshold: float) -> np.ndarray:
    """uint8: 255 where a score lies strictly above `threshold`, else 0 (the thresholded anomaly image)."""
    return np.where(np.asarray(values, dtype=np.float64) > threshold, ANOMALOUS, NORMAL).astype(np.uint8)


def write_prediction(
    root: Path, category: str, split: str, name: str, anomaly_map: np.ndarray, threshold: float
) -> None:
    """Write one image's float16 anomaly image and its mask binarised at `threshold` (the mask is of the
    stored float16 values, so it equals `tiff > threshold` exactly)."""
    values = as_float16(anomaly_map)
    tiff = root / ANOMALY_IMAGES / category / split / f"{name}.tiff"
    png = root / THRESHOLDED / category / split / f"{name}.png"
    tiff.parent.mkdir(parents=True, exist_ok=True)
    png.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(tiff, values)
    Image.fromarray(binarised(values, threshold)).save(png)  # 2-D uint8: mode L


def _entries(folder: Path) -> tuple[set[str], set[str]]:
    files = {p.name for p in folder.iterdir() if p.is_file()}
    return files, {p.name for p in folder.iterdir() if not p.is_file()}


def _compare(folder: Path, dirs: set[str], files: set[str], problems: list[str]) -> bool:
    """Exactly these folders and files in `folder`, as MVTec's `compare_found_vs_required`; False when not."""
    found_files, found_dirs = _entries(folder)
    before = len(problems)
    for what, found, wanted in (("folder", found_dirs, dirs), ("file", found_files, files)):
        if found - wanted:
            problems.append(f"{folder}: superfluous {what}(s) {_listed(found - wanted)}")
        if wanted - found:
            problems.append(f"{folder}: missing {what}(s) {_listed(wanted - found)}")
    return len(problems) == before


def _listed(names: set[str]) -> str:
    ordered = sorted(names)
    shown = ", ".join(ordered[:4])
    return f"[{shown}]" + (f" and {len(ordered) - 4} more" if len(ordered) > 4 else "")


def check_submission(
    folder: Path, expected: Expected, thresholds: dict[str, float] | None = None
) -> list[str]:
    """Everything wrong with a submission folder against the expected private test images; empty when it
    passes. Layout, names and counts as MVTec's check; per file also its size, dtype, finiteness, and, with
    `thresholds` (per category), that each mask equals its anomaly image binarised at the threshold."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    problems: list[str] = []
    if not _compare(folder, set(KINDS), set(), problems):
        return problems
    for kind, suffix in KINDS.items():
        if not _compare(folder / kind, set(expected), set(), problems):
            continue
        for category, splits in expected.items():
            if not _compare(folder / kind / category, set(splits), set(), problems):
                continue
            for split, sizes in splits.items():
                split_dir = folder / kind / category / split
                if _compare(split_dir, set(), {f"{name}{suffix}" for name in sizes}, problems):
                    for name, shape in sizes.items():
                        problem = _check_file(split_dir / f"{name}{suffix}", kind, shape)
                        if problem:
                            problems.append(problem)
    if not problems and thresholds:
        problems += _check_masks(folder, expected, thresholds)
    return problems


def _check_file(path: Path, kind: str, shape: tuple[int, int]) -> str | None:
    try:
        if kind == ANOMALY_IMAGES:
            values = tifffile.imread(path)
        else:
            with Image.open(path) as image:
                values = np.asarray(image)
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        return f"{path}: cannot be read ({exc})"
    if values.ndim != 2:
        return f"{path}: shape {values.shape}, expected a single-channel image"
    if values.shape != shape:
        return f"{path}: {values.shape[1]}x{values.shape[0]}, expected its image's {shape[1]}x{shape[0]}"
    if kind == ANOMALY_IMAGES:
        if values.dtype != np.float16:
            return f"{path}: dtype {values.dtype}, expected float16"
        if not np.isfinite(values).all():
            return f"{path}: NaN or inf values, expected finite scores"
    elif values.dtype != np.uint8 or not np.isin(np.unique(values), (NORMAL, ANOMALOUS)).all():
        return f"{path}: values {np.unique(values)[:4].tolist()} of {values.dtype}, expected only 0 and 255"
    return None


def _check_masks(folder: Path, expected: Expected, thresholds: dict[str, float]) -> list[str]:
    problems = []
    for category, splits in expected.items():
        threshold = thresholds[category]
        for split, sizes in splits.items():
            for name in sizes:
                values = tifffile.imread(folder / ANOMALY_IMAGES / category / split / f"{name}.tiff")
                with Image.open(folder / THRESHOLDED / category / split / f"{name}.png") as image:
                    mask = np.asarray(image)
                if not np.array_equal(mask, binarised(values, threshold)):
                    problems.append(f"{folder / THRESHOLDED / category / split / name}.png: not its anomaly "
                                    f"image binarised at {threshold:.6g}")  # fmt: skip
    return problems


def official_problems(expected: Expected) -> list[str]:
    """What keeps a submission of `expected` from being the one MVTec's server takes: every category, with
    `PRIVATE_IMAGE_COUNTS` images per private test set named as the check requires."""
    problems = []
    missing = [c for c in MVTEC_AD2_CATEGORIES if c not in expected]
    if missing:
        problems.append(f"categories {', '.join(missing)} are missing (the server expects all eight)")
    for category, splits in expected.items():
        for split, sizes in splits.items():
            wanted = official_private_names(category, split) if category in MVTEC_AD2_CATEGORIES else []
            if sorted(sizes) != wanted:
                problems.append(
                    f"{category}/{split}: {len(sizes)} images, the server expects {len(wanted)} named "
                    f"{wanted[0] if wanted else '?'} ... {wanted[-1] if wanted else '?'}"
                )
    return problems


def summary(problems: list[str]) -> str:
    shown = "; ".join(problems[:_SHOWN])
    more = len(problems) - _SHOWN
    return shown + (f"; and {more} more" if more > 0 else "")


def finite_threshold(value: object, where: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise InputError(f"{where}: the segmentation threshold is {value!r}, expected a finite number")
    return float(value)
