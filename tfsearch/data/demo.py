"""A synthetic dataset in the MVTec AD layout, so the whole pipeline runs with no download.

Two textures (stripes, weave) and two objects (a disk, a hexagonal nut) with small position, phase and colour
jitter, and defects drawn on them with exact masks. Defects are at least 6 px wide at 128 px so that they stay
visible at the CPU profile's 64 px and a tiny model trained for minutes can find them. Every image has its own
random stream derived from (seed, category, split, index): the same seed gives byte-identical PNGs.

The realistic demo (`--dataset demo_real`, images drawn by `tfsearch.data.demo_real`) is written and cached
the same way: irregular photograph-like textures with subtle defects, which a model must learn to find.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tfsearch.data import demo_real
from tfsearch.data.demo_real import REALISTIC_CATEGORIES, REALISTIC_KINDS
from tfsearch.errors import InputError

# bump when the generator's output changes, so cached copies of an older version are not reused
DEMO_FORMAT_VERSION = 1
REALISTIC_FORMAT_VERSION = 1
DEMO_IMAGE_SIZE = 128
DEMO_TEXTURES: frozenset[str] = frozenset({"stripes", "weave"})
DEMO_CATEGORIES: tuple[str, ...] = ("disk", "nut", "stripes", "weave")
TRAIN_IMAGES = 48
GOOD_TEST_IMAGES = 12
DEFECTIVE_TEST_IMAGES_PER_TYPE = 6
CACHE_ENV = "TFSEARCH_CACHE"
# pixel noise added to every image after any defect, so defects carry the same grain as their surroundings
_NOISE_STD = 0.012
# a defect must cover at least this many pixels at 128 px (about a 6x10 px patch)
_MIN_DEFECT_PIXELS = 60

_ROWS, _COLS = np.mgrid[0:DEMO_IMAGE_SIZE, 0:DEMO_IMAGE_SIZE].astype(np.float64)


@dataclass
class Scene:
    """A defect-free rendering: the image, where the part is (`fg`) and what lies behind it."""

    image: np.ndarray  # float (H, W, 3) in [0, 1]
    fg: np.ndarray  # bool (H, W): where defects may appear
    background: np.ndarray  # float (H, W, 3): what a missing piece reveals


# ------------------------------------------------------------------------------------------ normal parts


def _jittered(rng: np.random.Generator, colour: tuple[float, float, float], spread: float) -> np.ndarray:
    return np.clip(np.asarray(colour) + rng.uniform(-spread, spread, size=3), 0.0, 1.0)


def _plain_background(rng: np.random.Generator) -> np.ndarray:
    return np.broadcast_to(_jittered(rng, (0.20, 0.22, 0.26), 0.02), (*_ROWS.shape, 3)).copy()


def _stripes(rng: np.random.Generator) -> Scene:
    """Diagonal sinusoidal stripes: random phase, slight angle, period and colour jitter."""
    angle = math.radians(35.0 + rng.uniform(-3.0, 3.0))
    period = 16.0 + rng.uniform(-0.5, 0.5)
    phase = rng.uniform(0.0, 2.0 * math.pi)
    wave = 0.5 + 0.5 * np.sin(
        2.0 * math.pi * (_COLS * math.cos(angle) + _ROWS * math.sin(angle)) / period + phase
    )
    dark, light = _jittered(rng, (0.25, 0.40, 0.65), 0.04), _jittered(rng, (0.85, 0.80, 0.55), 0.04)
    image = dark + (light - dark) * wave[..., None]
    return Scene(image, np.ones(_ROWS.shape, dtype=bool), np.zeros_like(image))


def _weave(rng: np.random.Generator) -> Scene:
    """Basket weave: 24 px blocks alternating three horizontal and three vertical threads, random offset."""
    block = 24.0
    u, v = (_COLS + rng.uniform(0.0, block)) / block, (_ROWS + rng.uniform(0.0, block)) / block
    horizontal = (np.floor(u) + np.floor(v)) % 2 == 0
    across = np.where(horizontal, v % 1.0, u % 1.0)  # position across the threads of each block
    shading = 0.65 + 0.35 * np.abs(np.sin(3.0 * math.pi * across))
    warp, weft = _jittered(rng, (0.60, 0.40, 0.28), 0.03), _jittered(rng, (0.80, 0.70, 0.50), 0.03)
    image = np.where(horizontal[..., None], warp, weft) * shading[..., None]
    return Scene(image, np.ones(_ROWS.shape, dtype=bool), np.zeros_like(image))


def _disk(rng: np.random.Generator) -> Scene:
    """A shaded orange disk with a groove, centred within a few pixels, on a plain background."""
    centre_row, centre_col = 64.0 + rng.uniform(-3.0, 3.0, size=2)
    radius = 38.0 + rng.uniform(-1.0, 1.0)
    distance = np.hypot(_ROWS - centre_row, _COLS - centre_col) / radius
    fg = distance <= 1.0
    groove = np.abs(distance - 0.6) < 0.04
    shade = (1.0 - 0.3 * distance**2) * np.where(groove, 0.7, 1.0)
    background = _plain_background(rng)
    image = np.where(fg[..., None], _jittered(rng, (0.85, 0.55, 0.20), 0.03) * shade[..., None], background)
    return Scene(image, fg, background)


def _nut(rng: np.random.Generator) -> Scene:
    """A grey hexagonal nut with a round hole, small shift and rotation, lit from the left."""
    centre_row, centre_col = 64.0 + rng.uniform(-3.0, 3.0, size=2)
    circumradius, hole_radius = 42.0, 16.0
    rotation = math.radians(rng.uniform(-4.0, 4.0))
    rows, cols = _ROWS - centre_row, _COLS - centre_col
    apothem = circumradius * math.cos(math.pi / 6.0)
    inside = np.ones(_ROWS.shape, dtype=bool)
    for side in range(6):
        normal = rotation + math.pi / 6.0 + side * math.pi / 3.0
        inside &= cols * math.cos(normal) + rows * math.sin(normal) <= apothem
    fg = inside & (np.hypot(rows, cols) > hole_radius)
    shade = 0.85 - 0.2 * cols / circumradius
    background = _plain_background(rng)
    image = np.where(fg[..., None], _jittered(rng, (0.70, 0.72, 0.76), 0.03) * shade[..., None], background)
    return Scene(image, fg, background)


# ------------------------------------------------------------------------------------------ defects
# Each draws a region from the scene's foreground, changes the image there in place and returns the region.


def _random_fg_point(scene: Scene, rng: np.random.Generator, margin: int = 16) -> tuple[float, float]:
    rows, cols = np.nonzero(scene.fg[margin:-margin, margin:-margin])
    pick = rng.integers(len(rows))
    return float(rows[pick] + margin), float(cols[pick] + margin)


def _contrasting(colour: np.ndarray) -> np.ndarray:
    """Near-white on dark surfaces, near-black on bright ones."""
    return np.array([0.95, 0.95, 0.92]) if colour.mean() < 0.5 else np.array([0.06, 0.06, 0.08])


def _scratch(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A straight scratch 6-9 px wide and 30-60 px long, in a colour that contrasts with the surface."""
    centre_row, centre_col = _random_fg_point(scene, rng)
    angle = rng.uniform(0.0, math.pi)
    half_length, half_width = rng.uniform(15.0, 30.0), rng.uniform(3.0, 4.5)
    along = (_COLS - centre_col) * math.cos(angle) + (_ROWS - centre_row) * math.sin(angle)
    across = -(_COLS - centre_col) * math.sin(angle) + (_ROWS - centre_row) * math.cos(angle)
    region = (np.abs(along) <= half_length) & (np.abs(across) <= half_width) & scene.fg
    scene.image[region] = _contrasting(scene.image[region].mean(axis=0))
    return region


def _blob(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Union of three overlapping discs of radius 6-11 px: an irregular spot."""
    centre_row, centre_col = _random_fg_point(scene, rng)
    region = np.zeros(_ROWS.shape, dtype=bool)
    for _ in range(3):
        row, col = centre_row + rng.uniform(-7.0, 7.0), centre_col + rng.uniform(-7.0, 7.0)
        region |= np.hypot(_ROWS - row, _COLS - col) <= rng.uniform(6.0, 11.0)
    return region & scene.fg


_TINTS = np.array([[0.85, 0.12, 0.10], [0.10, 0.65, 0.15], [0.10, 0.20, 0.85]])


def _furthest_tint(surface: np.ndarray) -> np.ndarray:
    """Whichever of red, green or blue differs most from the surface colour."""
    return _TINTS[np.argmax(np.abs(_TINTS - surface).sum(axis=1))]


def _stain(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A flat spot tinted strongly towards a colour far from the surface's."""
    region = _blob(scene, rng)
    tint = _furthest_tint(scene.image[region].mean(axis=0))
    scene.image[region] = 0.25 * scene.image[region] + 0.75 * tint
    return region


def _colour(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A discoloured patch: the pattern's brightness survives, its colour becomes a distant tint."""
    region = _blob(scene, rng)
    brightness = scene.image[region].mean(axis=1, keepdims=True)
    scene.image[region] = np.clip(
        2.0 * brightness * _furthest_tint(scene.image[region].mean(axis=0)), 0.0, 1.0
    )
    return region


def _hole(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A torn hole through the fabric, showing the dark backing."""
    region = _blob(scene, rng)
    scene.image[region] = 0.04
    return region


def _missing(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A bite out of the part's edge, radius 10-14 px, revealing the background."""
    fg = scene.fg
    interior = fg & np.roll(fg, 1, 0) & np.roll(fg, -1, 0) & np.roll(fg, 1, 1) & np.roll(fg, -1, 1)
    rows, cols = np.nonzero(fg & ~interior)
    pick = rng.integers(len(rows))
    region = np.hypot(_ROWS - rows[pick], _COLS - cols[pick]) <= rng.uniform(10.0, 14.0)
    region &= fg
    scene.image[region] = scene.background[region]
    return region


Renderer = Callable[[np.random.Generator], Scene]
Defect = Callable[[Scene, np.random.Generator], np.ndarray]

# category -> (normal renderer, defect types in file order)
_CATEGORY_SPECS: dict[str, tuple[Renderer, dict[str, Defect]]] = {
    "disk": (_disk, {"colour": _colour, "missing": _missing, "scratch": _scratch}),
    "nut": (_nut, {"missing": _missing, "scratch": _scratch, "stain": _stain}),
    "stripes": (_stripes, {"colour": _colour, "scratch": _scratch, "stain": _stain}),
    "weave": (_weave, {"hole": _hole, "scratch": _scratch, "stain": _stain}),
}


# ------------------------------------------------------------------------------------------ writing


def _image_stream(
    seed: int, categories: tuple[str, ...], category: str, split: int, index: int
) -> np.random.Generator:
    """The random stream of one image, independent of generation order."""
    return np.random.default_rng([seed, categories.index(category), split, index])


def _render(category: str, rng: np.random.Generator, defect: Defect | None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 image and bool defect mask of one sample; retries defect placement until it is large enough."""
    renderer = _CATEGORY_SPECS[category][0]
    scene = renderer(rng)
    region = np.zeros(_ROWS.shape, dtype=bool)
    if defect is not None:
        clean = scene.image.copy()
        while True:
            region = defect(scene, rng)
            if region.sum() >= _MIN_DEFECT_PIXELS:
                break
            scene.image[...] = clean
    noisy = scene.image + rng.normal(0.0, _NOISE_STD, size=scene.image.shape)
    return np.round(np.clip(noisy, 0.0, 1.0) * 255.0).astype(np.uint8), region


@dataclass(frozen=True)
class Counts:
    """How many images a generated category holds: training images, good test images, test images per kind."""

    train: int
    good_test: int
    per_kind: int


DEMO_COUNTS = Counts(TRAIN_IMAGES, GOOD_TEST_IMAGES, DEFECTIVE_TEST_IMAGES_PER_TYPE)
REALISTIC_COUNTS = Counts(48, 12, 6)

# (split, index, defect kind or None for a good image) -> uint8 image, bool mask
SampleRenderer = Callable[[int, int, str | None], tuple[np.ndarray, np.ndarray]]


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _write_category(folder: Path, render: SampleRenderer, kinds: Sequence[str], counts: Counts) -> None:
    """One category in the MVTec layout; split 0 is train, 1 the good test images, 2... each kind in order."""
    for index in range(counts.train):
        _save_png(render(0, index, None)[0], folder / "train" / "good" / f"{index:03d}.png")
    for index in range(counts.good_test):
        _save_png(render(1, index, None)[0], folder / "test" / "good" / f"{index:03d}.png")
    for split, kind in enumerate(kinds, start=2):
        for index in range(counts.per_kind):
            image, region = render(split, index, kind)
            _save_png(image, folder / "test" / kind / f"{index:03d}.png")
            _save_png(region.astype(np.uint8) * 255, folder / "ground_truth" / kind / f"{index:03d}_mask.png")


def _write_dataset(
    out: Path, seed: int, categories: tuple[str, ...], write: Callable[[Path, str], None]
) -> Path:
    """Write `categories` into `out` with `write(folder, category)`, each through a hidden staging folder
    moved into place, replacing an older copy, so an interrupted run never leaves a half-written category."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"--seed must be a non-negative integer, got {seed!r}")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-staging-", dir=out))
    try:
        for category in categories:
            write(staging / category, category)
        for category in categories:
            if (out / category).exists():
                shutil.rmtree(out / category)
            os.replace(staging / category, out / category)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def write_demo(out: Path, seed: int = 0) -> Path:
    """Write the demo's categories into `out` (MVTec layout) and return `out`."""

    def write(folder: Path, category: str) -> None:
        renderer, defects = _CATEGORY_SPECS[category]

        def render(split: int, index: int, kind: str | None) -> tuple[np.ndarray, np.ndarray]:
            rng = _image_stream(seed, DEMO_CATEGORIES, category, split, index)
            return _render(category, rng, None if kind is None else defects[kind])

        _write_category(folder, render, list(defects), DEMO_COUNTS)

    return _write_dataset(out, seed, DEMO_CATEGORIES, write)


def write_realistic_demo(out: Path, seed: int = 0, counts: Counts = REALISTIC_COUNTS) -> Path:
    """Write the realistic demo (`tfsearch.data.demo_real`) into `out` (MVTec layout) and return `out`."""

    def write(folder: Path, category: str) -> None:
        def render(split: int, index: int, kind: str | None) -> tuple[np.ndarray, np.ndarray]:
            rng = _image_stream(seed, REALISTIC_CATEGORIES, category, split, index)
            return demo_real.render(category, kind, rng)

        _write_category(folder, render, REALISTIC_KINDS, counts)

    return _write_dataset(out, seed, REALISTIC_CATEGORIES, write)


def cache_dir() -> Path:
    """Where generated data is cached: `$TFSEARCH_CACHE`, else `~/.cache/tfsearch`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tfsearch").expanduser()


def _cached(name: str, write: Callable[[Path], Path]) -> Path:
    """The cached dataset folder `name`, written by `write(folder)` on first use.

    It is written into a temporary folder beside its final name and renamed into place, which is atomic: a
    reader never sees a partial copy, and when two processes race, the loser discards its own copy.
    """
    final = cache_dir() / name
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        write(staging)
        try:
            os.rename(staging, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def demo_root(seed: int = 0) -> Path:
    """The cached demo dataset for `seed`, generated on first use."""
    return _cached(f"demo-v{DEMO_FORMAT_VERSION}-seed{seed}", lambda staging: write_demo(staging, seed))


def realistic_demo_root(seed: int = 0) -> Path:
    """The cached realistic demo dataset (`--dataset demo_real`) for `seed`, generated on first use."""
    return _cached(
        f"demo_real-v{REALISTIC_FORMAT_VERSION}-seed{seed}",
        lambda staging: write_realistic_demo(staging, seed),
    )


__all__ = [
    "CACHE_ENV",
    "DEMO_CATEGORIES",
    "DEMO_FORMAT_VERSION",
    "DEMO_TEXTURES",
    "REALISTIC_COUNTS",
    "REALISTIC_FORMAT_VERSION",
    "Counts",
    "cache_dir",
    "demo_root",
    "realistic_demo_root",
    "write_demo",
    "write_realistic_demo",
]
