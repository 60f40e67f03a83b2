"""`tfsearch score`: score any method's anomaly maps, stored the way MVTec AD's evaluation script expects.

Layout: `MAPS/<category>/test/<defect>/<image name>.tiff`, one single-channel float map per test image, named
after the test image (`Sample.image_id` plus an extension). `.tif`, `.npy` and `.png` maps are read too.

Resolution: by default, as MVTec AD's evaluation script, each image is scored at its ground truth's own size
(the mask's, or for a normal image the image's, so non-square datasets such as VisA work); a map of another
shape is resized bilinearly to it and the command says how many were. `--size N` instead scores everything at
N×N, maps resized bilinearly and masks read as method.md §8 prescribes (bilinear resize, `> 0.5` on the 0-255
scale): `--size 256` is TransFusion's protocol.

Maps should hold real-valued scores: `.tiff` (float32) or `.npy`. An 8-bit `.png` map has 256 levels, so
many pixels tie and the curves are coarser; the command warns about it.

The metrics are `tfsearch.maps.metrics.evaluate` (image AUROC from each map's maximum, AUPRO to `--limit`,
pixel AUROC, AP and F1-max). A category without an anomalous test image is reported with "undefined" metrics
and the reason, and the other categories are still scored.

MVTec AD 2 (`--dataset mvtec_ad2`): the maps of the public test set lie at `MAPS/<category>/test_public/
{good,bad}/<name>.tiff` (float16 TIFFs, as a submission stores them, are read too), and MVTec AD 2's metrics
come beside the others: AUPRO to FPR 0.05 and SegF1. SegF1's threshold is set on maps of the validation
images, `MAPS/<category>/validation/good/<name>.tiff` (mean + 3·std of their pixels,
`tfsearch.maps.metrics.segmentation_threshold`), never on the test set: without them SegF1 is undefined.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from tfsearch.data.datasets import Sample, list_categories, load_category, load_masks, resolve_categories
from tfsearch.data.images import header_size, load_mask
from tfsearch.errors import InputError
from tfsearch.maps.metrics import (
    EXTRA_METRIC_NAMES,
    METRIC_NAMES,
    PRO_LIMIT,
    GroundTruth,
    evaluate,
    segmentation_threshold,
)

SCORE_DATASETS = ("mvtec", "visa", "folder", "mvtec_ad2")
# datasets scored with MVTec AD 2's metrics too, SegF1's threshold set on the maps of their validation images
EXTENDED_DATASETS = ("mvtec_ad2",)
MAP_EXTENSIONS = (".tiff", ".tif", ".npy", ".png")
TRANSFUSION_SIZE = 256


@dataclass(frozen=True)
class CategoryScore:
    metrics: dict[str, float]  # METRIC_NAMES -> value, NaN when undefined
    undefined: dict[str, str]  # metric -> reason it is undefined
    images: int
    anomalous: int
    shape: tuple[int, int] | None  # (height, width) the category was scored at
    resized: int  # maps whose shape differed from it
    eight_bit: int  # 8-bit maps (ties)


def score_category(
    dataset: str,
    dataset_root: Path,
    maps_root: Path,
    category: str,
    size: int | None = None,
    limit: float = PRO_LIMIT,
) -> CategoryScore:
    """Metrics of the maps in `maps_root/category` against the category's test ground truth, at each
    mask's own size (`size` None) or at size×size."""
    loaded = load_category(dataset, dataset_root, category)
    samples = loaded.test
    map_folder = maps_root / category
    if not samples:
        raise InputError(f"category {category!r} in {dataset_root} has no test images to score")
    extended = dataset in EXTENDED_DATASETS
    known = {sample.image_id for sample in (*samples, *(loaded.validation if extended else ()))}
    _check_no_extra_maps(map_folder, known, category, dataset_root)
    shape = (size, size) if size is not None else _native_shape(samples, category)
    maps = np.empty((len(samples), *shape), dtype=np.float32)
    resized = eight_bit = 0
    for index, sample in enumerate(samples):
        raw = read_map(_map_path(map_folder, sample.image_id, sample.image))
        resized += raw.shape != shape
        eight_bit += raw.dtype == np.uint8
        maps[index] = _resized(raw.astype(np.float32), shape)
    if size is None:
        masks = np.stack([load_mask(sample.mask, shape) for sample in samples])
    else:
        masks = load_masks(samples, size)
    gt = GroundTruth.from_masks(masks)
    undefined = gt.undefined_reasons(extended)
    threshold = math.nan  # SegF1 only from validation maps, never on the test set's own normal images
    if extended:
        threshold = _validation_threshold(map_folder, loaded.validation, size)
        if math.isnan(threshold):
            undefined.setdefault(
                "seg_f1", f"no validation maps ({map_folder}/validation/good/<name>.tiff) set its threshold"
            )
    return CategoryScore(
        metrics=evaluate(gt, maps, limit=limit, extended=extended, seg_threshold=threshold),
        undefined=undefined,
        images=len(samples),
        anomalous=int(gt.image_labels.sum()),
        shape=shape,
        resized=resized if size is None else 0,
        eight_bit=eight_bit,
    )


def _validation_threshold(map_folder: Path, validation: Sequence[Sample], size: int | None) -> float:
    """SegF1's threshold from the maps of every validation image (each at its image's own size, or size×size),
    or NaN when there are none; some but not all of them is an error."""
    if not validation:
        return math.nan
    paths = [_find_map(map_folder, sample.image_id) for sample in validation]
    if not any(paths):
        return math.nan
    if not all(paths):
        missing = next(s for s, p in zip(validation, paths, strict=True) if p is None)
        raise InputError(
            f"validation image {missing.image} has no anomaly map ({map_folder / missing.image_id}.tiff), "
            "but others have: give a map for every validation image (they set SegF1's threshold) or for none"
        )
    maps = []
    for sample, path in zip(validation, paths, strict=True):
        width, height = header_size(sample.image)
        maps.append(_resized(read_map(path).astype(np.float32), (size, size) if size else (height, width)))
    return segmentation_threshold(np.stack(maps) if size else _ragged(maps))


def _ragged(maps: list[np.ndarray]) -> np.ndarray:
    """Maps of different sizes as one (1, total, 1) stack: the threshold pools their pixels either way."""
    return np.concatenate([m.ravel() for m in maps])[None, :, None]


def _native_shape(samples: Sequence[Sample], category: str) -> tuple[int, int]:
    """The (height, width) of the category's ground truth: each mask's own, or a normal image's; one stack
    of maps needs one shape, so a category whose images differ in size is scored with --size."""
    shapes = {}
    for sample in samples:
        path = sample.mask or sample.image
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {path}: {exc}") from exc
        shapes.setdefault((height, width), path)
    if len(shapes) > 1:
        listed = ", ".join(f"{h}x{w} ({path.name})" for (h, w), path in list(shapes.items())[:3])
        raise InputError(
            f"category {category!r}: test images have different sizes ({listed}): score them at one size "
            "with --size N"
        )
    return next(iter(shapes))


def read_map(path: Path) -> np.ndarray:
    """One anomaly map (H, W) in its stored dtype; a non-2-D map, a non-numeric one or NaN / inf is an
    InputError."""
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
        elif path.suffix.lower() in (".tif", ".tiff"):
            array = tifffile.imread(path)  # float16 too (a submission's), which PIL cannot read
        else:
            with Image.open(path) as image:
                array = np.array(image)
    except (OSError, ValueError, Image.DecompressionBombError, tifffile.TiffFileError) as exc:
        raise InputError(f"cannot read anomaly map {path}: {exc}") from exc
    if array.ndim != 2:
        raise InputError(f"anomaly map {path} has shape {array.shape}: expected one 2-D map (height, width)")
    if array.dtype.kind not in "fiu":
        raise InputError(f"anomaly map {path} holds {array.dtype} values: expected real numbers")
    if not np.isfinite(array).all():
        raise InputError(f"anomaly map {path} contains NaN or inf: expected finite scores")
    return array


def _resized(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if array.shape == shape:
        return array
    return np.asarray(Image.fromarray(array).resize(shape[::-1], Image.Resampling.BILINEAR))


def _find_map(map_folder: Path, image_id: str) -> Path | None:
    found = [path for path in (map_folder / f"{image_id}{ext}" for ext in MAP_EXTENSIONS) if path.is_file()]
    if len(found) > 1:
        listed = ", ".join(map(str, found))
        raise InputError(f"image {image_id} has several anomaly maps ({listed}): keep one")
    return found[0] if found else None


def _map_path(map_folder: Path, image_id: str, image: Path) -> Path:
    found = [path for path in (map_folder / f"{image_id}{ext}" for ext in MAP_EXTENSIONS) if path.is_file()]
    if not found:
        raise InputError(
            f"test image {image} has no anomaly map: expected {map_folder / image_id}.tiff "
            f"(or {', '.join(MAP_EXTENSIONS[1:])})"
        )
    if len(found) > 1:
        raise InputError(
            f"test image {image} has several anomaly maps ({', '.join(map(str, found))}): keep one"
        )
    return found[0]


def _check_no_extra_maps(map_folder: Path, image_ids: set[str], category: str, dataset_root: Path) -> None:
    """Maps matching no test image usually mean a wrong folder or dataset: refuse rather than ignore them."""
    for path in sorted(map_folder.rglob("*")):
        if path.suffix.lower() not in MAP_EXTENSIONS or path.name.startswith(".") or not path.is_file():
            continue
        image_id = path.relative_to(map_folder).with_suffix("").as_posix()
        if image_id not in image_ids:
            raise InputError(
                f"anomaly map {path} matches no test image of {category!r} in {dataset_root}: expected maps "
                f"named after the test images, as {map_folder}/test/<defect>/<image name>.tiff"
            )


def categories_with_maps(
    dataset: str, dataset_root: Path, maps_root: Path, category: str | None
) -> list[str]:
    """The categories to score: `category`, or every category of the dataset with a folder in `maps_root`."""
    if not maps_root.is_dir():
        raise InputError(f"--maps {maps_root} does not exist or is not a folder")
    if category is not None:
        (name,) = resolve_categories(dataset, dataset_root, category, None)
        if not (maps_root / name).is_dir():
            raise InputError(f"--category {name}: no maps folder {maps_root / name}")
        return [name]
    available = list_categories(dataset, dataset_root)
    folders = sorted(p.name for p in maps_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [name for name in folders if name not in available]
    if unknown:
        raise InputError(
            f"maps folder {maps_root / unknown[0]} matches no {dataset} category in {dataset_root}; "
            f"categories: {', '.join(available)}"
        )
    if not folders:
        raise InputError(
            f"--maps {maps_root} has no category folder: expected {maps_root}/<category>/test/..."
        )
    return folders


def score_notes(scores: dict[str, CategoryScore]) -> list[str]:
    """What the numbers depend on besides the maps: resized maps, 8-bit maps."""
    notes = []
    for name, s in scores.items():
        if s.resized:
            notes.append(
                f"{name}: {s.resized} of {s.images} maps resized (bilinear) to their masks' size "
                f"{s.shape[0]}x{s.shape[1]}"
            )
        if s.eight_bit:
            notes.append(
                f"warning: {name}: {s.eight_bit} maps are 8-bit images (256 levels): many pixels tie, which "
                "changes AUROC, AP and AUPRO; store float maps as .tiff or .npy"
            )
    return notes


def category_mean(values: list[float]) -> float:
    """Unweighted mean over the categories where the metric is defined (NaN if none)."""
    defined = [value for value in values if not math.isnan(value)]
    return sum(defined) / len(defined) if defined else math.nan


def scores_json(
    scores: dict[str, CategoryScore],
    mean: dict[str, float],
    *,
    dataset: str,
    dataset_root: Path,
    maps: Path,
    limit: float,
    size: int | None,
) -> dict:
    """What `tfsearch score --json` prints: the metrics in [0, 1] (null where undefined) and the inputs."""
    names, mean = _with_extras(scores, mean)

    def values(metrics: dict[str, float]) -> dict[str, float | None]:
        return {name: None if math.isnan(metrics[name]) else metrics[name] for name in names}

    return {
        "dataset": dataset,
        "dataset_root": str(dataset_root),
        "maps": str(maps),
        "limit": limit,
        "size": size,  # null: each mask's own size
        "categories": {
            name: {
                **values(s.metrics),
                "undefined": s.undefined,
                "images": s.images,
                "anomalous": s.anomalous,
                "shape": list(s.shape),
                "resized": s.resized,
                "eight_bit_maps": s.eight_bit,
            }
            for name, s in scores.items()
        },
        "mean": values(mean),
    }


def scores_table(
    scores: dict[str, CategoryScore],
    mean: dict[str, float],
    *,
    dataset: str,
    maps: Path,
    limit: float,
    size: int | None,
) -> str:
    """What `tfsearch score` prints: one row per category in %, the mean, and why a metric is undefined."""
    names, mean = _with_extras(scores, mean)
    columns = {metric: max(len(metric), len("undefined")) + 2 for metric in names}

    def cells(metrics: dict[str, float]) -> str:
        return "".join(
            f"{'undefined' if math.isnan(metrics[m]) else f'{100 * metrics[m]:.2f}':>{columns[m]}}"
            for m in names
        )

    width = max(len("category"), *(len(name) for name in scores))
    lines = [
        f"{dataset} maps in {maps}: metrics in %, AUPRO to FPR {limit}, "
        + (f"scored at {size}x{size}" if size else "scored at each mask's own size"),
        f"{'category':<{width}}  images  anomalous" + "".join(f"{m:>{columns[m]}}" for m in names),
    ]
    lines += [
        f"{name:<{width}}  {s.images:>6}  {s.anomalous:>9}{cells(s.metrics)}" for name, s in scores.items()
    ]
    lines.append(f"{'mean':<{width}}  {'':>6}  {'':>9}{cells(mean)}")
    for name, s in scores.items():
        for reason in sorted(set(s.undefined.values())):
            metrics = ", ".join(m for m in names if s.undefined.get(m) == reason)
            lines.append(f"{name}: {metrics} undefined: {reason}")
    return "\n".join(lines)


def _with_extras(
    scores: dict[str, CategoryScore], mean: dict[str, float]
) -> tuple[tuple[str, ...], dict[str, float]]:
    """The metrics to show (MVTec AD 2's after the paper's, where some category has them) and their means
    (a mean the caller did not compute is the unweighted mean over the categories that define it)."""
    extras = tuple(m for m in EXTRA_METRIC_NAMES if any(m in s.metrics for s in scores.values()))
    filled = dict(mean)
    for name in extras:
        if name not in filled:
            filled[name] = category_mean([s.metrics.get(name, math.nan) for s in scores.values()])
    for s in scores.values():
        for name in extras:
            s.metrics.setdefault(name, math.nan)
    return (*METRIC_NAMES, *extras), filled
