"""`tfsearch predict EXPORT --mvtec-ad2-submission DIR --data-root ROOT`: MVTec AD 2's private test sets
scored with the exported models and written as the evaluation server's submission folder
(`tfsearch.maps.submission`): per category and private test set, a float16 anomaly image at each test image's
own size (the fused map, resized back bilinearly, as `tfsearch predict` writes it) and the mask of the pixels
scoring above the export's `segmentation_threshold`.

EXPORT is the folder `tfsearch export --out` wrote, one sub-folder per category (or one category's folder).
The submission is filled in a temporary folder beside DIR and checked as MVTec's submission check would,
and also for each file's size and each mask against its anomaly image; only a folder that passes is renamed
to DIR. A subset of the categories gives a valid folder for those categories that the server would not take
as it is: `SubmissionResult.not_uploadable` says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from tfsearch.data.mvtec_ad2 import MVTEC_AD2_CATEGORIES, PRIVATE_SPLITS, private_images
from tfsearch.deploy.detector import Detector
from tfsearch.deploy.manifest import MANIFEST_FILE, Export, read_export
from tfsearch.errors import InputError
from tfsearch.maps.submission import (
    check_submission,
    expected_images,
    finite_threshold,
    official_problems,
    summary,
    write_prediction,
)
from tfsearch.store.atomic import atomic_folder
from tfsearch.transfusion.runtime import Runtime


@dataclass
class SubmissionResult:
    folder: Path
    categories: list[str]
    images: int  # test images scored (each written twice: anomaly image and mask)
    thresholds: dict[str, float]  # per category, the segmentation threshold of its export
    not_uploadable: list[str] = field(default_factory=list)  # empty: the folder the server expects


def category_exports(export_root: Path, categories: list[str] | None = None) -> dict[str, Export]:
    """The MVTec AD 2 exports under `export_root` (one category's folder, or the folder of several), each
    checked to be an MVTec AD 2 model with a segmentation threshold."""
    export_root = Path(export_root)
    if (export_root / MANIFEST_FILE).is_file():
        folders = [export_root]
    else:
        folders = (
            sorted(p for p in export_root.iterdir() if (p / MANIFEST_FILE).is_file())
            if export_root.is_dir()
            else []
        )
    if not folders:
        raise InputError(
            f"EXPORT {export_root}: no export found (expected the folder of `tfsearch export --out`, holding "
            "one folder per category, or one category's folder)"
        )
    exports = {}
    for folder in folders:
        export = read_export(folder)
        manifest = export.manifest
        if manifest.get("dataset") != "mvtec_ad2" or export.category not in MVTEC_AD2_CATEGORIES:
            raise InputError(
                f"{folder / MANIFEST_FILE}: a model of {manifest.get('dataset')}/{export.category}, not of "
                f"an MVTec AD 2 category ({', '.join(MVTEC_AD2_CATEGORIES)})"
            )
        if not isinstance(manifest.get("segmentation_threshold"), dict):
            raise InputError(
                f"{folder / MANIFEST_FILE} has no segmentation_threshold (an export of an earlier tfsearch): "
                "export the run again to binarise the submission's masks"
            )
        exports[export.category] = export
    if categories:
        unknown = [c for c in categories if c not in exports]
        if unknown:
            raise InputError(
                f"--categories {','.join(unknown)}: not in EXPORT {export_root} ({', '.join(exports)})"
            )
        exports = {c: exports[c] for c in categories}
    return exports


def write_submission(
    export_root: Path,
    data_root: Path,
    out: Path,
    *,
    runtime: Runtime | None = None,
    batch_size: int | None = None,
    categories: list[str] | None = None,
) -> SubmissionResult:
    """Score both private test sets of every exported category and write the checked submission to `out`."""
    runtime = runtime or Runtime(progress=False)
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise InputError(
            f"--mvtec-ad2-submission {out} already exists and is not empty: choose another folder"
        )
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch {batch_size}: expected a positive number of images")
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise InputError(f"--data-root {data_root} does not exist or is not a folder")
    exports = category_exports(export_root, categories)
    expected = expected_images(data_root, list(exports))
    thresholds = {
        c: finite_threshold(e.manifest["segmentation_threshold"].get("value"), f"{e.manifest_file}")
        for c, e in exports.items()
    }
    total = sum(len(sizes) for splits in expected.values() for sizes in splits.values())
    bar = tqdm(total=total, unit="img", desc="mvtec_ad2 submission", disable=not runtime.progress)
    with atomic_folder(out) as folder:
        for category, export in exports.items():
            detector = Detector(export, runtime)
            batch = batch_size or detector.batch_size
            for split in PRIVATE_SPLITS:
                paths = private_images(data_root / category, split)
                for start in range(0, len(paths), batch):
                    chunk = paths[start : start + batch]
                    maps, _ = detector.predict(chunk, batch_size=batch)
                    for path, anomaly_map in zip(chunk, maps, strict=True):
                        write_prediction(
                            folder, category, split, path.stem, anomaly_map, thresholds[category]
                        )
                    bar.update(len(chunk))
        bar.close()
        problems = check_submission(folder, expected, thresholds)
        if problems:
            raise InputError(
                f"the submission failed its check ({len(problems)} problems): {summary(problems)}"
            )
    return SubmissionResult(out, list(exports), total, thresholds, official_problems(expected))
