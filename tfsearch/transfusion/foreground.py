"""Foreground masks that keep synthetic anomalies on the object (method.md §5.4): read from a mask folder
(the released SAM masks), or estimated from the image with the median border colour as background."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
from scipy import ndimage

from tfsearch.data.images import load_image
from tfsearch.errors import InputError

log = logging.getLogger(__name__)

FG_DILATION = np.ones((1, 5, 5), dtype=bool)  # one 5x5 dilation of every foreground mask (per image)


# foreground estimation: colour distance (0-255 RGB, Euclidean) above which a pixel is not background
FG_MIN_DISTANCE = 30.0


FG_BORDER_MARGIN = 1.5  # ... and at least this times the 90th percentile of the border pixels' distances


FG_PLAUSIBLE = (0.05, 0.98)  # an estimate covering less / more of the image falls back to the whole image


def foreground_masks(
    images: np.ndarray,
    *,
    is_texture: bool,
    fg_root: Path | None,
    category: str,
    image_ids: Sequence[str],
) -> tuple[np.ndarray, str]:
    """bool (N,H,W) foreground of the training images (uint8 (N,H,W,3)) and where it came from:
    "whole image" for texture categories, "folder" for mask files under `fg_root`, else "estimated"."""
    if images.ndim != 4 or images.shape[-1] != 3 or len(image_ids) != len(images):
        raise ValueError(
            f"expected images (N,H,W,3) with one id each, got {images.shape} and {len(image_ids)} ids"
        )
    if is_texture:
        return np.ones(images.shape[:3], dtype=bool), "whole image"
    if fg_root is not None:
        size = images.shape[1]
        masks = np.stack(
            [_read_foreground(Path(fg_root), category, image_id, size) for image_id in image_ids]
        )
        return ndimage.binary_dilation(masks, structure=FG_DILATION), "folder"
    return estimate_foreground(images), "estimated"


def _read_foreground(fg_root: Path, category: str, image_id: str, size: int) -> np.ndarray:
    """The mask file of one training image, matched by stem: grayscale/255 > 0.5 after a bilinear resize."""
    folder = fg_root / category / "train" / "good"
    stem = PurePosixPath(image_id).name
    candidates = (folder / f"{stem}.png", folder / f"{stem}.JPG")  # the original falls back to .JPG
    path = next((candidate for candidate in candidates if candidate.is_file()), None)
    if path is None:
        raise InputError(
            f"foreground mask {candidates[0]} not found (needed for training image {image_id}; "
            f"--fg-root expects ROOT/<category>/train/good/<image stem>.png)"
        )
    gray = load_image(path, size).astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return gray > 127.5


def estimate_foreground(images: np.ndarray) -> np.ndarray:
    """bool (N,H,W) foreground estimate for object images on a plain background.

    The background colour is the median of a border frame (1/32 of the size wide). A pixel is foreground
    when its RGB distance to that colour exceeds max(30, 1.5 x the 90th percentile of the frame's distances);
    the result is opened (3x3), hole-filled and dilated 5x5 like a mask file. An image whose estimate covers
    under 5% or over 98% of it (textured or cluttered background) gets the whole image instead.
    """
    count, height, width = images.shape[:3]
    frame_width = max(1, min(height, width) // 32)
    frame = np.ones((height, width), dtype=bool)
    frame[frame_width:-frame_width, frame_width:-frame_width] = False
    pixels = images.astype(np.float32)
    background = np.median(pixels[:, frame], axis=1)  # (N,3)
    distance = np.linalg.norm(pixels - background[:, None, None, :], axis=-1)
    noise_level = np.quantile(distance[:, frame], 0.9, axis=1)
    threshold = np.maximum(FG_MIN_DISTANCE, FG_BORDER_MARGIN * noise_level)
    in_plane = np.ones((1, 3, 3), dtype=bool)  # structures with no extent along N: each image on its own
    found = ndimage.binary_opening(distance > threshold[:, None, None], structure=in_plane)
    found = ndimage.binary_fill_holes(found, structure=ndimage.generate_binary_structure(2, 1)[None])
    found = ndimage.binary_dilation(found, structure=FG_DILATION)
    share = found.mean(axis=(1, 2))
    implausible = (share < FG_PLAUSIBLE[0]) | (share > FG_PLAUSIBLE[1])
    if implausible.any():
        log.warning(
            "foreground estimate implausible for %d of %d images: using the whole image",
            implausible.sum(),
            count,
        )
        found[implausible] = True
    return found
