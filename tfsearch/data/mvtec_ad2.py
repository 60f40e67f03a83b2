"""MVTec AD 2 (Heckler-Kram, Neudeck, Scheler, König, Steger: "The MVTec AD 2 Dataset: Advanced Scenarios
for Unsupervised Anomaly Detection", arXiv:2503.21622, 2025) as MVTec distributes it, per category:

    CATEGORY/train/good/*.png                              normal training images
    CATEGORY/validation/good/*.png                         held-out normal images, for validation
    CATEGORY/test_public/good/*.png                        public test set, normal
    CATEGORY/test_public/bad/*.png                         public test set, anomalous, each with its mask
    CATEGORY/test_public/ground_truth/bad/<name>_mask.png  (255 anomalous, 0 normal)
    CATEGORY/test_private/NNN_regular.png                  private test sets: no ground truth, scored on
    CATEGORY/test_private_mixed/NNN_mixed.png              MVTec's server from a submission

The layout is the one of MVTec's dataset class (`mvtec_ad_2_public_offline.py`, shipped with the dataset's
public code) and of anomalib's `MVTecAD2Dataset`. Image ids are `train/good/<stem>`,
`validation/good/<stem>`, `test_public/good/<stem>` and `test_public/bad/<stem>`, so the defect kind of a
public test image is "good" or "bad".

The private test sets hold the same number of images each; `PRIVATE_IMAGE_COUNTS` are the counts MVTec's
submission check (`check_and_prepare_data_for_upload.py` and its `utils.py`) requires per category.
"""

from __future__ import annotations

from pathlib import Path

from tfsearch.data.layout import Sample, extensions_text, image_files, sorted_by_id, subfolders
from tfsearch.errors import InputError

MVTEC_AD2_CATEGORIES: tuple[str, ...] = (
    "can",
    "fabric",
    "fruit_jelly",
    "rice",
    "sheet_metal",
    "vial",
    "wallplugs",
    "walnuts",
)
PUBLIC_TEST = "test_public"
VALIDATION = "validation"
PRIVATE_SPLITS: tuple[str, ...] = ("test_private", "test_private_mixed")
# the name suffix of each private split's images: NNN_regular.png, NNN_mixed.png
PRIVATE_SUFFIX = {"test_private": "regular", "test_private_mixed": "mixed"}
# images per private split and category, as MVTec's submission check requires them (OBJECT_FILE_COUNTER)
PRIVATE_IMAGE_COUNTS: dict[str, int] = {
    "can": 321,
    "fabric": 314,
    "fruit_jelly": 255,
    "rice": 277,
    "sheet_metal": 142,
    "vial": 276,
    "wallplugs": 232,
    "walnuts": 228,
}
# categories whose anomalies may lie anywhere in the frame (a surface, or bulk goods filling it); the others
# are objects, whose synthetic anomalies stay on the estimated foreground (tfsearch's choice, not MVTec's)
WHOLE_IMAGE_CATEGORIES: frozenset[str] = frozenset({"fabric", "rice", "walnuts"})
LAYOUT = (
    "CATEGORY/train/good/, CATEGORY/validation/good/, CATEGORY/test_public/{good,bad}/ with masks "
    "CATEGORY/test_public/ground_truth/bad/<name>_mask.png, and CATEGORY/test_private/, "
    "CATEGORY/test_private_mixed/ (images only)"
)
_REQUIRED = (
    ("train", "good"),
    (VALIDATION, "good"),
    (PUBLIC_TEST, "good"),
    (PUBLIC_TEST, "bad"),
    (PUBLIC_TEST, "ground_truth", "bad"),
)


def missing_folder(path: Path) -> InputError:
    """The error for a folder of the layout that is not there, naming it, what its nearest existing parent
    holds instead, and the expected layout."""
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    held = ", ".join(folder.name for folder in subfolders(parent)) or "no folder"
    where = f" ({parent} holds: {held})"
    return InputError(f"MVTec AD 2: {path} is missing{where}; expected the layout {LAYOUT}")


def _images(folder: Path, split: str, defect: str, required: bool = True) -> list[Sample]:
    if not folder.is_dir():
        raise missing_folder(folder)
    found = [Sample(path, None, 0, defect, f"{split}/{defect}/{path.stem}") for path in image_files(folder)]
    if required and not found:
        raise InputError(f"MVTec AD 2: no images in {folder}: expected {extensions_text()} files")
    return found


def mvtec_ad2_samples(
    category_root: Path,
) -> tuple[tuple[Sample, ...], tuple[Sample, ...], tuple[Sample, ...]]:
    """The training, validation and public test samples of one category, each sorted by image id.

    Every folder of the public layout must exist (an error names the first missing one and what its parent
    holds instead); every image of `test_public/bad` needs its `<name>_mask.png`. The private test sets are
    not read here (`private_images`)."""
    for parts in _REQUIRED:
        if not category_root.joinpath(*parts).is_dir():
            raise missing_folder(category_root.joinpath(*parts))
    train = _images(category_root / "train" / "good", "train", "good")
    validation = _images(category_root / VALIDATION / "good", VALIDATION, "good")
    test = _images(category_root / PUBLIC_TEST / "good", PUBLIC_TEST, "good", required=False)
    mask_dir = category_root / PUBLIC_TEST / "ground_truth" / "bad"
    masks = {path.stem: path for path in image_files(mask_dir)}
    for path in image_files(category_root / PUBLIC_TEST / "bad"):
        mask = masks.get(f"{path.stem}_mask")
        if mask is None:
            raise InputError(
                f"MVTec AD 2: anomalous image {path} has no mask: expected {mask_dir / path.stem}_mask.png"
            )
        test.append(Sample(path, mask, 1, "bad", f"{PUBLIC_TEST}/bad/{path.stem}"))
    if not test:
        raise InputError(f"MVTec AD 2: no images in {category_root / PUBLIC_TEST}/good or /bad")
    return (
        sorted_by_id(train, category_root / "train"),
        sorted_by_id(validation, category_root / VALIDATION),
        sorted_by_id(test, category_root / PUBLIC_TEST),
    )


def private_images(category_root: Path, split: str) -> list[Path]:
    """The images of one private test set (`test_private` or `test_private_mixed`), sorted by name; they lie
    directly in the split's folder and have no ground truth."""
    if split not in PRIVATE_SPLITS:
        raise InputError(f"unknown MVTec AD 2 private test set {split!r}: expected one of {PRIVATE_SPLITS}")
    folder = category_root / split
    if not folder.is_dir():
        raise missing_folder(folder)
    inner = subfolders(folder)
    if inner:
        raise InputError(
            f"MVTec AD 2: {folder} holds the folder {inner[0].name}: expected its images directly in it "
            f"(the layout {LAYOUT})"
        )
    found = image_files(folder)
    if not found:
        raise InputError(f"MVTec AD 2: no images in {folder}: expected {extensions_text()} files")
    stems = [path.stem for path in found]
    if len(set(stems)) != len(stems):
        raise InputError(f"MVTec AD 2: {folder} holds two images of one name: names must be unique")
    return found


def official_private_names(category: str, split: str) -> list[str]:
    """The image names (without extension) MVTec's submission check expects for a private test set:
    `000_regular` ... or `000_mixed` ..., as many as `PRIVATE_IMAGE_COUNTS` says."""
    count = PRIVATE_IMAGE_COUNTS[category]
    return [f"{index:03d}_{PRIVATE_SUFFIX[split]}" for index in range(count)]
