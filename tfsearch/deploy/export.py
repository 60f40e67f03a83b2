"""`tfsearch export RUN --out DIR`: take each category's selected model out of a finished run.

A run's `selected.csv` names, per category, the training configuration, milestone epoch, λ and n that the
selection chose. The export writes one self-describing folder per category,

    DIR/CATEGORY/weights.pt      the model's state dict at the selected epoch, nothing else (no optimiser)
    DIR/CATEGORY/manifest.json   what the weights are and how to use them (written last)

so that `tfsearch predict` and `tfsearch.Detector` can score new images without the run, the dataset or the
search. The manifest holds the export format, the dataset and category, the protocol and split the
configuration was selected on with its metrics, the training profile, λ, n, an image-level threshold, the
weights' SHA-256, the run it came from and the library versions.

Each category's folder is written under a temporary name beside DIR/CATEGORY and renamed into place when it
is complete: an export that fails (a damaged checkpoint, a full disk) leaves no partial folder, and the other
categories' folders as they were. The files take the permissions the umask gives new files.

An export is read back as data, never as code or paths to follow (`tfsearch.deploy.manifest`).

The threshold is chosen on the selection data (the selection split's cached maps at the selected
configuration): by default the one that maximises the image-level F1 score, or with `--threshold-at-fpr F`
the lowest one whose false-positive rate stays at most F. It is placed halfway between the lowest score it
labels anomalous and the highest score below that, so that the labels of the selection data do not hinge on
the float rounding of a recomputed map. An image is anomalous when its score is at or above the threshold.

The manifest also holds a pixel threshold, `segmentation_threshold`, that binarises the maps (a pixel is
anomalous when its score is strictly above it; MVTec AD 2's thresholded submission masks and its SegF1): mean
+ k·std of the normal images' pixels of the validation maps at the selected configuration, k as selected
(`selected_seg_sigmas`, 3 unless the space searched it; `tfsearch.maps.segmentation`), or, for a run without
validation data (the oracle protocol), of the test set's normal images; its `split` says which.
"""

from __future__ import annotations

import errno
import hashlib
import io
import math
import platform
from pathlib import Path

import numpy as np
import PIL
import torch
from sklearn.metrics import precision_recall_curve, roc_curve

from tfsearch import __version__
from tfsearch.deploy.manifest import (
    EXPORT_FORMAT,
    EXPORT_VERSION,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    check_weights,
)
from tfsearch.deploy.selected import Selected, TrainingRun, plain_name, read_config, read_selected
from tfsearch.errors import InputError
from tfsearch.maps.cache import read_map_set
from tfsearch.maps.fusion import fuse
from tfsearch.maps.metrics import image_scores
from tfsearch.maps.segmentation import milestone_seg_threshold
from tfsearch.store.atomic import atomic_folder, atomic_write, atomic_write_json
from tfsearch.store.run_folder import SELECTED_FILE, now
from tfsearch.transfusion.unet import TransFusionUNet, count_parameters


# ------------------------------------------------------------------------------------------ threshold
def choose_threshold(scores: np.ndarray, labels: np.ndarray, at_fpr: float | None = None) -> dict:
    """The image-level threshold on the selection data and what it achieves there.

    F1-max by default (sklearn's precision-recall curve); with `at_fpr`, the lowest threshold of sklearn's
    ROC curve whose false-positive rate is at most `at_fpr`.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if not labels.any():
        raise InputError("the selection data has no anomalous image: no threshold can be chosen on it")
    if at_fpr is None:
        precision, recall, thresholds = precision_recall_curve(labels, scores)
        total = precision + recall
        f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)[:-1]
        chosen = float(thresholds[int(np.argmax(f1))])
    else:
        if labels.all():
            raise InputError("--threshold-at-fpr: the selection data has no normal image to measure FPR on")
        fpr, _, thresholds = roc_curve(labels, scores, drop_intermediate=False)
        allowed = np.flatnonzero((fpr <= at_fpr) & np.isfinite(thresholds))
        if allowed.size == 0:
            raise InputError(
                f"--threshold-at-fpr {at_fpr}: no threshold keeps the FPR at or below it on the selection "
                f"data ({int((~labels).sum())} normal images; the lowest reachable FPR is {fpr[1]:.4f})"
            )
        chosen = float(thresholds[allowed[-1]])
    below = scores[scores < chosen]
    value = (chosen + float(below.max())) / 2 if below.size else chosen
    predicted = scores >= value
    tp, fp = int((predicted & labels).sum()), int((predicted & ~labels).sum())
    fn, negatives = int((~predicted & labels).sum()), int((~labels).sum())
    return {
        "value": value,
        "method": "f1_max" if at_fpr is None else "fpr",
        "target_fpr": at_fpr,
        "images": int(labels.size),
        "anomalous": int(labels.sum()),
        "f1": 2 * tp / (2 * tp + fp + fn),
        "precision": tp / (tp + fp) if tp + fp else math.nan,
        "recall": tp / (tp + fn),
        "fpr": fp / negatives if negatives else math.nan,
    }


# ------------------------------------------------------------------------------------------ export
def library_versions() -> dict[str, str]:

    return {
        "tfsearch": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "python": platform.python_version(),
    }


def export_category(
    run: Path, config: dict, selected: Selected, out: Path, at_fpr: float | None = None
) -> Path:
    """Write `out/CATEGORY` (weights, then the manifest) for one row of `selected.csv`.

    The folder is filled under a temporary name beside it and renamed to CATEGORY when complete: on any
    error nothing is left at `out/CATEGORY`."""
    target = out / plain_name(selected.category, f"{run / SELECTED_FILE} category")
    if target.is_symlink() or (target.exists() and not (target.is_dir() and not any(target.iterdir()))):
        raise InputError(
            f"--out: {target} already exists and is not empty (or is not a folder); choose another --out"
        )
    source = TrainingRun(run, config, selected.category, selected.model)
    job = source.load_job()
    split = "val" if selected.protocol == "val" else "test"
    maps_dir = source.maps(selected.epoch, split)
    maps = read_map_set(maps_dir)
    fused = fuse(maps.m_disc, maps.m_recon, selected.lam, selected.kernel)
    threshold = {**choose_threshold(image_scores(fused), maps.labels, at_fpr), "split": split}
    segmentation = milestone_seg_threshold(maps_dir, selected.lam, selected.kernel, selected.seg_sigmas)

    state, weights_source = source.model_state(selected.epoch)
    model = TransFusionUNet(job.profile)
    check_weights(model, state, f"the checkpoint of epoch {selected.epoch} in {source.dir.root}")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    weights = buffer.getvalue()
    manifest = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "dataset": selected.dataset,
        "category": selected.category,
        "selection": {
            "protocol": selected.protocol,
            "split": split,
            "space": selected.space,
            "metric": selected.selection_metric,
            "value": _json_number(selected.selection_value),
            "test_metrics": {k: _json_number(v) for k, v in selected.test_metrics.items()},
        },
        "model": {
            "id": selected.model,
            "epoch": selected.epoch,
            "lam": selected.lam,
            "kernel": selected.kernel,
            "image_size": job.profile.image_size,
            "parameters": count_parameters(model),
            "profile": job.profile.to_dict(),
        },
        "threshold": {k: _json_number(v) for k, v in threshold.items()},
        "segmentation_threshold": {k: _json_number(v) for k, v in segmentation.items()},
        "weights": {
            "file": WEIGHTS_FILE,
            "sha256": hashlib.sha256(weights).hexdigest(),
            "bytes": len(weights),
        },
        "source": {
            "run": str(run.resolve()),
            "run_name": config.get("name"),
            "training_run": source.remote.uri if source.remote else str(source.dir.root.resolve()),
            "checkpoint": weights_source,
        },
        "versions": library_versions(),
        "exported_at": now(),
    }
    try:
        with atomic_folder(target) as folder:
            atomic_write(folder / WEIGHTS_FILE, lambda handle: handle.write(weights))
            atomic_write_json(folder / MANIFEST_FILE, manifest)
    except OSError as exc:
        if isinstance(exc, FileExistsError) or exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise InputError(
                f"--out: {target} appeared while exporting and is not empty; choose another --out"
            ) from None
        raise
    return target


def _json_number(value: object) -> object:
    return None if isinstance(value, float) and math.isnan(value) else value


def export_run(
    run: Path, out: Path, categories: list[str] | None = None, at_fpr: float | None = None
) -> list[Path]:
    """Export the selected model of every category of `run` (or of `categories`)."""
    config = read_config(run)
    rows, failed = read_selected(run)
    broken = [c for c in (categories or failed) if c in failed]
    if broken:
        errors = "; ".join(f"{c}: {failed[c]}" for c in broken)
        raise InputError(
            f"{run / SELECTED_FILE}: training failed for good in {', '.join(broken)} ({errors}); nothing was"
            " selected there: `tfsearch run --resume` retries them, or --categories leaves them out"
        )
    available = [row.category for row in rows]
    if categories:
        unknown = [c for c in categories if c not in available]
        if unknown:
            raise InputError(
                f"--categories {','.join(unknown)}: not in {run / SELECTED_FILE}, which selects "
                f"{', '.join(available)}"
            )
        rows = [row for row in rows if row.category in categories]
    if not rows:
        raise InputError(f"{run / SELECTED_FILE} selects no category: nothing to export")
    return [export_category(run, config, row, out, at_fpr) for row in rows]
