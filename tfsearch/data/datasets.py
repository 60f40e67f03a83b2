"""Datasets: which images and masks make up a category (reading one file: `tfsearch.data.images`).

Six sources share one in-memory form, a `Category` of `Sample`s (`tfsearch.data.layout`): MVTec AD, MVTec AD 2
(`tfsearch.data.mvtec_ad2`), VisA (the prepared "1cls" layout or the raw download read through its split
CSV), `folder` (a user's own categories in the MVTec layout), the synthetic `demo` and the realistic
synthetic `demo_real`. Masks are found by their path relative to the
category root, never by editing the path string: the original's string replace breaks on a data root whose
path contains "test" (method.md §11.12).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from tfsearch.data.demo import DEMO_CATEGORIES, DEMO_TEXTURES, demo_root, realistic_demo_root
from tfsearch.data.demo_real import REALISTIC_CATEGORIES
from tfsearch.data.images import load_image, load_mask
from tfsearch.data.layout import Category, Sample, extensions_text
from tfsearch.data.layout import check_mask_sizes as _check_mask_sizes
from tfsearch.data.layout import image_files as _image_files
from tfsearch.data.layout import sorted_by_id as _sorted_by_id
from tfsearch.data.layout import subfolders as _subfolders
from tfsearch.data.mvtec_ad2 import LAYOUT as MVTEC_AD2_LAYOUT
from tfsearch.data.mvtec_ad2 import MVTEC_AD2_CATEGORIES, WHOLE_IMAGE_CATEGORIES, mvtec_ad2_samples
from tfsearch.errors import InputError

DATASETS = ("mvtec", "visa", "folder", "demo", "demo_real", "mvtec_ad2")
MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)
VISA_CATEGORIES: tuple[str, ...] = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)
# the original code's fg-mask exemption list: MVTec's five textures plus zipper (method.md §11.5)
TEXTURE_CATEGORIES: frozenset[str] = frozenset({"carpet", "grid", "leather", "tile", "wood", "zipper"})
# the split file of the raw VisA download, relative to its root, and the columns read from it
VISA_SPLIT_CSV = Path("split_csv") / "1cls.csv"
VISA_CSV_COLUMNS = ("object", "split", "label", "image", "mask")
# categories a dataset can hold; None means any sub-folder with train/good (`folder`) or the CSV's (raw VisA)
_KNOWN_CATEGORIES: dict[str, tuple[str, ...]] = {
    "mvtec": MVTEC_CATEGORIES,
    "mvtec_ad2": MVTEC_AD2_CATEGORIES,
    "visa": VISA_CATEGORIES,
    "demo": DEMO_CATEGORIES,
    "demo_real": REALISTIC_CATEGORIES,
}
# generated datasets: their cached copy (made on first use) is the root when no --data-root is given
_GENERATED_ROOTS: dict[str, Callable[[], Path]] = {"demo": demo_root, "demo_real": realistic_demo_root}
GENERATED_DATASETS: tuple[str, ...] = tuple(_GENERATED_ROOTS)
# texture categories of the generated datasets; every realistic demo category is a texture
_GENERATED_TEXTURES: dict[str, frozenset[str]] = {
    "demo": DEMO_TEXTURES,
    "demo_real": frozenset(REALISTIC_CATEGORIES),
}


# ------------------------------------------------------------------------------------------ discovery


def list_categories(dataset: str, data_root: Path | None) -> list[str]:
    """The categories available for `dataset` under `data_root`, sorted.

    For MVTec AD and prepared VisA these are the dataset's known categories present on disk, so a partial
    download works; `folder` takes every sub-folder with `train/good`; raw VisA takes its split CSV's objects.
    A cached generated dataset is not generated just to list its categories.
    """
    if dataset in _GENERATED_ROOTS and data_root is None:
        return list(_KNOWN_CATEGORIES[dataset])
    root = _data_root(dataset, data_root)
    if dataset == "visa" and _is_raw_visa(root):
        return sorted({row["object"] for row in _read_visa_csv(root)})
    known = _KNOWN_CATEGORIES.get(dataset)
    # an MVTec AD 2 category is its folder, so that one whose layout is broken gets an error naming the path
    present = [
        folder.name
        for folder in _subfolders(root)
        if ((folder / "train" / "good").is_dir() or dataset == "mvtec_ad2")
        and (known is None or folder.name in known)
    ]
    if not present:
        expected = f"{root}/<category>/train/good/"
        if known is not None:
            expected += f" with <category> one of {', '.join(known)}"
        if dataset == "mvtec_ad2":
            expected += f", each in the layout {MVTEC_AD2_LAYOUT}"
            if (root / "train" / "good").is_dir():
                expected += f" ({root} itself looks like one category: give the folder that holds them)"
        raise InputError(f"no {dataset} categories in --data-root {root}: expected {expected}")
    return present


def resolve_categories(
    dataset: str, data_root: Path | None, category: str | None, categories: str | None
) -> list[str]:
    """The categories a command should process, from its --category / --categories flags.

    Both None means every category of the dataset. The result is in the dataset's sorted order, because
    categories are trained in sorted order (method.md §6.3).
    """
    if category is not None and categories is not None:
        raise InputError("give either --category or --categories, not both")
    available = list_categories(dataset, data_root)
    if category is None and categories is None:
        return available
    if category is not None:
        flag, requested = "--category", [category]
    else:
        flag, requested = "--categories", [name.strip() for name in categories.split(",") if name.strip()]
        if not requested:
            raise InputError(
                f"--categories {categories!r} names no category: expected a comma-separated list"
            )
    for name in requested:
        _check_category(dataset, data_root, name, available, flag)
    return [name for name in available if name in requested]


def load_category(dataset: str, data_root: Path | None, category: str) -> Category:
    """Find every image and mask of one category and check that they pair up.

    Only file headers are read (to compare mask and image sizes), so this is cheap even for VisA.
    `data_root` None is allowed only for the generated datasets, whose cached copy is made on first use.
    """
    _check_category(dataset, data_root, category, list_categories(dataset, data_root), "--category")
    if dataset in _GENERATED_ROOTS and data_root is None:
        root = _GENERATED_ROOTS[dataset]()
    else:
        root = _data_root(dataset, data_root)
    validation: tuple[Sample, ...] = ()
    if dataset == "mvtec_ad2":
        train, validation, test = mvtec_ad2_samples(root / category)
    elif dataset == "visa" and _is_raw_visa(root):
        train, test = _raw_visa_samples(root, category)
    else:
        train, test = _layout_samples(root / category, mask_suffix="" if dataset == "visa" else "_mask")
    _check_mask_sizes(test)
    texture = is_texture_category(dataset, category)
    return Category(dataset, category, root / category, train, test, texture, validation)


def largest_first(dataset: str, data_root: Path | None, categories: Sequence[str]) -> list[str]:
    """Categories by number of training images, most first (then by name): a run ends when its slowest
    category does, so the longest trainings should not wait for a free slot behind short ones."""
    sizes = {c: len(load_category(dataset, data_root, c).train) for c in categories}
    return sorted(categories, key=lambda c: (-sizes[c], c))


def is_texture_category(dataset: str, category: str) -> bool:
    """Whether anomalies may cover the whole image (a texture) rather than an object's foreground: MVTec's
    textures (and zipper, as the original code has it) and the generated datasets' (every `demo_real`
    category), and MVTec AD 2's surface and bulk categories (fabric, rice, walnuts); VisA and `folder` hold
    objects."""
    if dataset == "mvtec":
        return category in TEXTURE_CATEGORIES
    if dataset == "mvtec_ad2":
        return category in WHOLE_IMAGE_CATEGORIES
    return category in _GENERATED_TEXTURES.get(dataset, frozenset())


def defect_kind(image_id: str) -> str:
    """The defect kind of an image, from its id `split/defect/stem`: the test folder it lies in ("good" for
    normal images; MVTec's "scratch", "crack", ...; VisA's "bad")."""
    parts = image_id.split("/")
    if len(parts) < 3 or not parts[1]:
        raise InputError(f"image id {image_id!r}: expected split/defect/name, as tfsearch writes image ids")
    return parts[1]


def _data_root(dataset: str, data_root: Path | None) -> Path:
    if dataset not in DATASETS:
        raise InputError(f"unknown --dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    if data_root is None:
        raise InputError(f"--data-root is required for --dataset {dataset}")
    root = Path(data_root).expanduser().absolute()
    if not root.is_dir():
        raise InputError(f"--data-root {root} does not exist or is not a folder")
    return root


def _check_category(
    dataset: str, data_root: Path | None, name: str, available: Sequence[str], flag: str
) -> None:
    if name in available:
        return
    where = f" in --data-root {data_root}" if data_root is not None else ""
    hint = ""
    known = ("mvtec", "mvtec_ad2", "visa")
    if dataset in known and data_root is not None and (Path(data_root) / name / "train").is_dir():
        hint = f" (use --dataset folder for categories outside {dataset})"
    raise InputError(
        f"unknown {flag} {name!r} for --dataset {dataset}{where}; "
        f"valid categories: {', '.join(available)}{hint}"
    )


# ------------------------------------------------------------------------------------------ layouts


def _layout_samples(category_root: Path, mask_suffix: str) -> tuple[tuple[Sample, ...], tuple[Sample, ...]]:
    """Samples of the MVTec layout: `train/good`, `test/<defect>`, `ground_truth/<defect>/<stem><suffix>.*`.

    Prepared VisA is the same layout with defect "bad" and no mask suffix.
    """
    train_dir = category_root / "train" / "good"
    train = [Sample(path, None, 0, "good", f"train/good/{path.stem}") for path in _image_files(train_dir)]
    if not train:
        raise InputError(f"no training images in {train_dir}: expected {extensions_text()} files")
    test = []
    for defect_dir in _subfolders(category_root / "test"):
        defect = defect_dir.name
        if defect == "good":
            test += [
                Sample(path, None, 0, "good", f"test/good/{path.stem}") for path in _image_files(defect_dir)
            ]
            continue
        mask_dir = category_root / "ground_truth" / defect
        masks = {path.stem: path for path in _image_files(mask_dir)}
        for path in _image_files(defect_dir):
            mask = masks.get(path.stem + mask_suffix)
            if mask is None:
                raise InputError(
                    f"defect image {path} has no mask: expected {mask_dir / (path.stem + mask_suffix)}.png"
                )
            test.append(Sample(path, mask, 1, defect, f"test/{defect}/{path.stem}"))
    return _sorted_by_id(train, train_dir), _sorted_by_id(test, category_root / "test")


def _is_raw_visa(root: Path) -> bool:
    """Whether `root` is the raw VisA download (read via its CSV) rather than the prepared 1cls layout."""
    if (root / VISA_SPLIT_CSV).is_file():
        return True
    if any((folder / "Data" / "Images").is_dir() for folder in _subfolders(root)):
        raise InputError(
            f"--data-root {root} looks like the raw VisA download but its split file {root / VISA_SPLIT_CSV} "
            "is missing"
        )
    return False


def _read_visa_csv(root: Path) -> list[dict[str, str]]:
    path = root / VISA_SPLIT_CSV
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in VISA_CSV_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise InputError(
                f"VisA split file {path} lacks column(s) {', '.join(missing)}: "
                f"expected the header {','.join(VISA_CSV_COLUMNS)}"
            )
        return [{key: (row[key] or "").strip() for key in VISA_CSV_COLUMNS} for row in reader]


def _raw_visa_samples(root: Path, category: str) -> tuple[tuple[Sample, ...], tuple[Sample, ...]]:
    """Samples of the raw VisA download, row by row from `split_csv/1cls.csv` (paths relative to root)."""
    csv_path = root / VISA_SPLIT_CSV
    splits: dict[str, list[Sample]] = {"train": [], "test": []}
    for line, row in enumerate(_read_visa_csv(root), start=2):
        if row["object"] != category:
            continue
        where = f"{csv_path} line {line}"
        if row["split"] not in splits:
            raise InputError(f"{where}: split {row['split']!r} is not train or test")
        if row["label"] not in ("normal", "anomaly"):
            raise InputError(f"{where}: label {row['label']!r} is not normal or anomaly")
        if row["split"] == "train" and row["label"] != "normal":
            raise InputError(f"{where}: training images must be normal, got label {row['label']!r}")
        image = root / row["image"]
        if not image.is_file():
            raise InputError(f"{where}: image {image} does not exist")
        mask = None
        if row["label"] == "anomaly":
            if not row["mask"]:
                raise InputError(f"defect image {image} has no mask: column 'mask' is empty at {where}")
            mask = root / row["mask"]
            if not mask.is_file():
                raise InputError(
                    f"defect image {image} has no mask: {mask} (named at {where}) does not exist"
                )
        defect = "bad" if mask is not None else "good"
        image_id = f"{row['split']}/{defect}/{image.stem}"
        splits[row["split"]].append(Sample(image, mask, int(mask is not None), defect, image_id))
    if not splits["train"]:
        raise InputError(
            f"no training images for {category!r} in {csv_path}: expected rows with split 'train'"
        )
    return _sorted_by_id(splits["train"], csv_path), _sorted_by_id(splits["test"], csv_path)


# ------------------------------------------------------------------------------------------ decoding


def load_images(samples: Sequence[Sample], size: int, workers: int = 0) -> np.ndarray:
    """uint8 (N, size, size, 3); `workers` > 0 decodes in that many threads (PIL releases the GIL)."""
    images = np.empty((len(samples), size, size, 3), dtype=np.uint8)

    def decode(index: int) -> None:
        images[index] = load_image(samples[index].image, size)

    if workers > 0:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(decode, range(len(samples))))
    else:
        for index in range(len(samples)):
            decode(index)
    return images


def load_masks(samples: Sequence[Sample], size: int) -> np.ndarray:
    """bool (N, size, size); normal samples give all-False masks."""
    masks = np.zeros((len(samples), size, size), dtype=bool)
    for index, sample in enumerate(samples):
        masks[index] = load_mask(sample.mask, size)
    return masks


__all__ = [
    "DATASETS",
    "GENERATED_DATASETS",
    "MVTEC_AD2_CATEGORIES",
    "MVTEC_CATEGORIES",
    "TEXTURE_CATEGORIES",
    "VISA_CATEGORIES",
    "Category",
    "Sample",
    "defect_kind",
    "is_texture_category",
    "list_categories",
    "load_category",
    "load_images",
    "load_masks",
    "resolve_categories",
]
