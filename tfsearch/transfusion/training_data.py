"""A job's data, decoded once at the start of training and kept on the training device: the training images
and their foreground masks, the texture bank, and the evaluation sets (test, and the selection data).

Synthetic validation (`--select-on val`, `--validation synthetic`) takes its normal images from the dataset's
own validation split where it ships one (MVTec AD 2's `validation/good`: every image of it, and no training
image is held out), else from a held-out share of the training images; either way the same images are
repeated with validation anomalies (`synthetic_validation`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import torch

from tfsearch.data import datasets
from tfsearch.errors import InputError
from tfsearch.transfusion.foreground import foreground_masks
from tfsearch.transfusion.inference import to_signed
from tfsearch.transfusion.job import VALIDATION_KINDS, TrainJob
from tfsearch.transfusion.synthesis import load_texture_bank, validation_anomalies


@dataclass
class EvalSet:
    """Images whose maps are written at every milestone, with their ground truth."""

    images: torch.Tensor  # uint8 (N,3,H,W) on the CPU
    masks: np.ndarray  # bool (N,H,W)
    labels: np.ndarray  # int8 (N,)
    image_ids: list[str]
    mask_paths: list[str | None]

    @classmethod
    def from_samples(cls, samples: tuple[datasets.Sample, ...], size: int, workers: int) -> EvalSet:
        images = datasets.load_images(samples, size, workers=workers)
        return cls(
            images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
            masks=datasets.load_masks(samples, size),
            labels=np.array([s.label for s in samples], dtype=np.int8),
            image_ids=[s.image_id for s in samples],
            mask_paths=[str(s.mask) if s.mask else None for s in samples],
        )


@dataclass
class PreparedData:
    category: datasets.Category
    train_images: torch.Tensor  # uint8 (N,3,H,W) on the training device
    foreground: torch.Tensor  # float {0,1} (N,1,H,W) on the training device
    foreground_source: str
    eval_sets: dict[str, EvalSet]  # "test", and "val" when the job has selection data
    texture_bank: torch.Tensor | None = None


def held_out(count: int, fraction: float, seed: int) -> torch.Tensor:
    """Indices of the good training images kept out of training for synthetic validation."""
    keep = max(2, round(count * fraction))
    if keep >= count:
        raise InputError(f"only {count} training images: too few to hold out {keep} for --select-on val")
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed + 1))[:keep].sort().values


def synthetic_validation(
    images: torch.Tensor, foreground: torch.Tensor, ids: list[str], seed: int
) -> EvalSet:
    """Held-out good images plus the same images with a validation anomaly and its mask: smaller, fainter
    and from other sources than the training generator's (`validation_anomalies`), so that candidates differ.

    Drawn on the CPU from a fixed generator, so the set is the same on every device and at every milestone."""
    generator = torch.Generator().manual_seed(seed + 2)
    defective, mask = validation_anomalies(to_signed(images), foreground, generator)
    as_uint8 = ((defective + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    masks = mask[:, 0].bool().numpy()
    count = images.shape[0]
    return EvalSet(
        images=torch.cat([images, as_uint8]),
        masks=np.concatenate([np.zeros_like(masks), masks]),
        labels=np.concatenate([np.zeros(count, np.int8), masks.reshape(count, -1).any(1).astype(np.int8)]),
        image_ids=[f"val/good/{PurePosixPath(i).name}" for i in ids]
        + [f"val/synthetic/{PurePosixPath(i).name}" for i in ids],
        mask_paths=[None] * (2 * count),
    )


def prepare_data(job: TrainJob, device: torch.device, workers: int = 0) -> PreparedData:
    """Decode the category once and keep it in memory (train set on the device): no per-epoch loader."""
    if job.validation not in VALIDATION_KINDS:
        raise InputError(f"validation must be one of {VALIDATION_KINDS}, got {job.validation!r}")
    size = job.profile.image_size
    category = datasets.load_category(job.dataset, job.data_root, job.category)
    train = datasets.load_images(category.train, size, workers=workers)
    ids = [s.image_id for s in category.train]
    if job.restrict_to_foreground:
        fg, fg_source = foreground_masks(
            train, is_texture=category.is_texture, fg_root=job.fg_root, category=category.name, image_ids=ids
        )
    else:
        fg, fg_source = np.ones(train.shape[:3], dtype=bool), "whole image (--no-foreground)"
    train_images = torch.from_numpy(train).permute(0, 3, 1, 2).contiguous()
    foreground = torch.from_numpy(fg).float()[:, None]
    eval_sets = {"test": EvalSet.from_samples(category.test, size, workers)}
    bank = load_texture_bank(job.texture_root, size) if job.texture_root else None
    if job.validation == "synthetic" and category.validation:
        eval_sets["val"] = _shipped_validation(job, category, size, workers)
    elif job.validation == "synthetic":
        val = held_out(len(ids), job.val_fraction, job.profile.seed)
        kept = torch.ones(len(ids), dtype=torch.bool)
        kept[val] = False
        eval_sets["val"] = synthetic_validation(
            train_images[val], foreground[val], [ids[i] for i in val.tolist()], job.profile.seed
        )
        train_images, foreground = train_images[kept], foreground[kept]
    elif job.validation == "folder":
        if job.val_root is None:
            raise InputError("--val-root is required for validation from a folder")
        val_category = datasets.load_category("folder", job.val_root, job.category)
        eval_sets["val"] = EvalSet.from_samples(val_category.test, size, workers)
    return PreparedData(
        category=category,
        train_images=train_images.to(device),
        foreground=foreground.to(device),
        foreground_source=fg_source,
        eval_sets=eval_sets,
        texture_bank=bank.to(device) if bank is not None else None,
    )


def _shipped_validation(job: TrainJob, category: datasets.Category, size: int, workers: int) -> EvalSet:
    """Synthetic validation on the dataset's own held-out normal images (MVTec AD 2's validation/good).
    Released foreground masks cover training images only, so an object category's validation anomalies stay
    on the estimated foreground (or anywhere, with --no-foreground)."""
    images = datasets.load_images(category.validation, size, workers=workers)
    ids = [s.image_id for s in category.validation]
    if job.restrict_to_foreground:
        fg, _ = foreground_masks(
            images, is_texture=category.is_texture, fg_root=None, category=category.name, image_ids=ids
        )
    else:
        fg = np.ones(images.shape[:3], dtype=bool)
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return synthetic_validation(tensor, torch.from_numpy(fg).float()[:, None], ids, job.profile.seed)
