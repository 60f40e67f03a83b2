"""A tiny MVTec AD 2 dataset in the exact on-disk layout, generated at test time (the real one cannot be
downloaded here): non-square images of a different size per category, train/good, validation/good,
test_public/{good,bad} with `test_public/ground_truth/bad/<name>_mask.png`, and the private test sets
`test_private/NNN_regular.png` and `test_private_mixed/NNN_mixed.png` without ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# (width, height) per category: non-square, and not the same for every category
SIZES = {"can": (48, 32), "fabric": (36, 52), "rice": (40, 40)}


def _surface(rng: np.random.Generator, width: int, height: int, tint: tuple[int, int, int]) -> np.ndarray:
    """A smooth, slightly noisy surface: a gradient plus low-frequency ripples."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    ripple = 12 * np.sin(x / 5.0 + rng.uniform(0, 6)) * np.cos(y / 7.0 + rng.uniform(0, 6))
    base = np.stack([np.full((height, width), c, np.float32) for c in tint], axis=-1)
    image = base + ripple[..., None] + rng.normal(0, 3, size=(height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_category(
    root: Path,
    category: str,
    *,
    train: int = 10,
    validation: int = 4,
    good: int = 3,
    bad: int = 3,
    private: int = 3,
    seed: int = 0,
) -> Path:
    """One category of the layout under `root/category`; returns the category's folder."""
    rng = np.random.default_rng(seed)
    width, height = SIZES.get(category, (44, 28))
    tint = tuple(int(v) for v in rng.integers(60, 180, size=3))
    folder = root / category
    for index in range(train):
        _save(folder / "train" / "good" / f"{index:03d}_regular.png", _surface(rng, width, height, tint))
    for index in range(validation):
        _save(folder / "validation" / "good" / f"{index:03d}_regular.png", _surface(rng, width, height, tint))
    for index in range(good):
        _save(
            folder / "test_public" / "good" / f"{index:03d}_regular.png", _surface(rng, width, height, tint)
        )
    for index in range(bad):
        image = _surface(rng, width, height, tint)
        mask = np.zeros((height, width), np.uint8)
        top, left = int(rng.integers(2, height - 10)), int(rng.integers(2, width - 10))
        side = int(rng.integers(4, 8))
        mask[top : top + side, left : left + side] = 255
        image[mask > 0] = (250, 250, 250) if index % 2 else (10, 10, 10)
        name = f"{index:03d}_overexposed" if index == 1 else f"{index:03d}_regular"
        _save(folder / "test_public" / "bad" / f"{name}.png", image)
        _save(folder / "test_public" / "ground_truth" / "bad" / f"{name}_mask.png", mask)
    for split, suffix in (("test_private", "regular"), ("test_private_mixed", "mixed")):
        for index in range(private):
            _save(folder / split / f"{index:03d}_{suffix}.png", _surface(rng, width, height, tint))
    return folder


def write_mvtec_ad2(root: Path, categories: tuple[str, ...] = ("can",), **counts) -> Path:
    for offset, category in enumerate(categories):
        write_category(root, category, seed=offset, **counts)
    return root
