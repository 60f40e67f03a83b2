"""What every dataset layout shares: the in-memory form of a category (`Category` of `Sample`s) and the small
helpers that list folders and image files and check that images and masks pair up. The layouts themselves
are in `tfsearch.data.datasets` (MVTec AD, VisA, folder, the demos) and `tfsearch.data.mvtec_ad2`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from tfsearch.data.images import IMAGE_EXTENSIONS, header_size
from tfsearch.errors import InputError


@dataclass(frozen=True)
class Sample:
    image: Path  # absolute path of the image file
    mask: Path | None  # ground-truth mask file; None for normal images
    label: int  # 0 normal, 1 anomalous
    defect: str  # "good" for normal images, else the defect folder name ("bad" for VisA and MVTec AD 2)
    image_id: str  # f"{split}/{defect}/{stem}": unique within a category and stable across runs


@dataclass(frozen=True)
class Category:
    dataset: str
    name: str
    root: Path  # category root folder
    train: tuple[Sample, ...]  # sorted by image_id, all normal
    test: tuple[Sample, ...]  # sorted by image_id
    is_texture: bool
    # held-out normal images the dataset ships for validation (MVTec AD 2's validation/good), sorted by
    # image_id; empty for datasets without such a split
    validation: tuple[Sample, ...] = ()


def subfolders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(entry for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def image_files(folder: Path) -> list[Path]:
    """Image files of a folder, sorted; hidden files (e.g. macOS `._x.png` sidecars) are skipped."""
    if not folder.is_dir():
        return []
    return sorted(
        entry
        for entry in folder.iterdir()
        if entry.suffix.lower() in IMAGE_EXTENSIONS and not entry.name.startswith(".") and entry.is_file()
    )


def extensions_text() -> str:
    return "/".join(sorted(ext.lstrip(".") for ext in IMAGE_EXTENSIONS))


def sorted_by_id(samples: list[Sample], source: Path) -> tuple[Sample, ...]:
    ordered = sorted(samples, key=lambda sample: sample.image_id)
    for before, after in pairwise(ordered):
        if before.image_id == after.image_id:
            raise InputError(
                f"{before.image} and {after.image} (from {source}) share the image id {before.image_id!r}: "
                "file names must be unique without their extension"
            )
    return tuple(ordered)


def check_mask_sizes(samples: Sequence[Sample]) -> None:
    for sample in samples:
        if sample.mask is None:
            continue
        image_size, mask_size = header_size(sample.image), header_size(sample.mask)
        if image_size != mask_size:
            raise InputError(
                f"mask {sample.mask} is {mask_size[0]}x{mask_size[1]} but its image {sample.image} is "
                f"{image_size[0]}x{image_size[1]}: expected equal sizes"
            )
