"""Reading one image or one ground-truth mask from disk, whatever its mode (8- or 16-bit, palette, RGBA):
images become RGB uint8 and masks booleans, exactly as method.md §8 prescribes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tfsearch.errors import InputError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})


# integer modes whose values span 0..65535: PIL's convert("RGB") would clip them instead of scaling
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


def header_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from exc


def load_image(path: Path, size: int) -> np.ndarray:
    """uint8 (size, size, 3) RGB, resized with PIL bilinear (antialiased) as the original's Resize does."""
    try:
        with Image.open(path) as image:
            image.load()
            rgb = to_rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from exc
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(rgb, dtype=np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as training sees it: 16-bit grey scaled to 8 bits (not clipped), every other mode converted."""
    if image.mode in _SIXTEEN_BIT_MODES:
        gray = np.clip(np.round(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return image.convert("RGB")


def load_mask(path: Path | None, size: int | tuple[int, int]) -> np.ndarray:
    """bool (size, size), or (height, width) for a pair. Non-zero pixels are defects (raw VisA uses 1, 2,
    ...): they are set to 255, resized bilinearly, then `> 0.5` on the 0-255 scale (method.md §8), so any
    interpolated non-zero value counts. A mask already at the asked shape is not resampled.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if path is None:
        return np.zeros((height, width), dtype=bool)
    try:
        with Image.open(path) as image:
            image.load()
            defect = _defect_pixels(image)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read mask {path}: {exc}") from exc
    mask = Image.fromarray(defect.astype(np.uint8) * 255)
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(mask) > 0.5


def _defect_pixels(image: Image.Image) -> np.ndarray:
    """Native-size bool array of the non-zero pixels; palette masks are read by index (0 = background)."""
    if image.mode == "P" or image.mode in _SIXTEEN_BIT_MODES or image.mode in ("1", "L", "F"):
        return np.asarray(image) != 0
    return np.asarray(image.convert("RGB")).max(axis=2) != 0
