"""The realistic demo's images: irregular, photograph-like textures with subtle defects beside an obvious one.

The `demo` dataset is regular (stripes, weave, flat objects) and its defects are bold, so any model reaches
100 on its textures and the demo cannot tell a model that learns from one that does not. These categories
are closer to real photographs of materials:

- `cork`: cellular (Worley / Voronoi) structure with per-cell shading, mottling and grain;
- `fibre`: streaks of anisotropic fractal noise (paper, brushed or grained material) with mottling;
- `marble`: fractal (Perlin-like) noise with domain-warped veins.

Every good image is its own realisation, rotated and scaled within a range (a photograph never frames a
material the same way twice), with colour jitter, an illumination gradient and pixel noise. Defect kinds,
one test folder each:

- `scratch`: a thin (1-2 px at 128 px), slightly curved, lighter line, 30-70 px long;
- `patch`: an irregular region of the same texture realisation at another scale and rotation;
- `discolour`: a faint tint of an irregular region that keeps the texture;
- `stain`: an obvious dark stain.

Everything is a function of continuous coordinates, so rotation and scale are exact and a `patch` shows the
very same material at another scale. `render` draws one sample from a random stream; writing is in
`tfsearch.data.demo`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

REALISTIC_CATEGORIES: tuple[str, ...] = ("cork", "fibre", "marble")
REALISTIC_KINDS: tuple[str, ...] = ("discolour", "patch", "scratch", "stain")
IMAGE_SIZE = 128
# noise lattices repeat every _LATTICE cells, beyond the highest frequency drawn, so nothing visibly repeats
_LATTICE = 64
_NOISE_STD = 0.015
# a scratch this long at least, so that it covers ~30 px even at 1 px width
_SCRATCH_LENGTH = (30.0, 70.0)
# RGB directions of the `discolour` tints (warm, cool, yellow-green), scaled by a strength of 0.04-0.065
TINTS: dict[str, tuple[float, float, float]] = {
    "warm": (1.0, -0.2, -0.8),
    "cool": (-0.6, 0.2, 1.0),
    "yellow-green": (0.3, 1.0, -0.9),
}
_CENTRE = (IMAGE_SIZE - 1) / 2.0
_ROWS, _COLS = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64)


# ------------------------------------------------------------------------------------------ noise


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def _gradient_noise(x: np.ndarray, y: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Perlin gradient noise at (x, y) in lattice units, from a periodic (L, L, 2) field of unit vectors;
    values in about [-0.7, 0.7]."""
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    ix, iy = x0.astype(np.int64) % _LATTICE, y0.astype(np.int64) % _LATTICE
    ix1, iy1 = (ix + 1) % _LATTICE, (iy + 1) % _LATTICE
    along_x, along_y = gradients[..., 0].ravel(), gradients[..., 1].ravel()

    def corner(cx: np.ndarray, cy: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        flat = cy * _LATTICE + cx
        return along_x.take(flat) * dx + along_y.take(flat) * dy

    u, v = _fade(fx), _fade(fy)
    top = corner(ix, iy, fx, fy) * (1 - u) + corner(ix1, iy, fx - 1, fy) * u
    bottom = corner(ix, iy1, fx, fy - 1) * (1 - u) + corner(ix1, iy1, fx - 1, fy - 1) * u
    return top * (1 - v) + bottom * v


@dataclass(frozen=True)
class _Fractal:
    """Fractal Brownian motion: octaves of gradient noise, each from its own lattice and offset."""

    gradients: np.ndarray  # (octaves, L, L, 2)
    offsets: np.ndarray  # (octaves, 2)

    @classmethod
    def draw(cls, rng: np.random.Generator, octaves: int) -> _Fractal:
        angles = rng.uniform(0.0, 2.0 * math.pi, size=(octaves, _LATTICE, _LATTICE))
        return cls(
            np.stack([np.cos(angles), np.sin(angles)], axis=-1), rng.uniform(0, _LATTICE, (octaves, 2))
        )

    def __call__(self, x: np.ndarray, y: np.ndarray, gain: float = 0.5) -> np.ndarray:
        """Sum of the octaves at (x, y) in units of the first octave's cells, scaled to about [-1, 1]."""
        total, amplitude, norm = np.zeros_like(x), 1.0, 0.0
        for octave, (gradients, offset) in enumerate(zip(self.gradients, self.offsets, strict=True)):
            scale = 2.0**octave
            total += amplitude * _gradient_noise(x * scale + offset[0], y * scale + offset[1], gradients)
            norm += amplitude
            amplitude *= gain
        return total / (0.7 * norm)


def _worley(x: np.ndarray, y: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distances to the nearest and second-nearest feature point (one jittered point per periodic cell) and
    the flat index of the nearest point's cell."""
    cx, cy = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    first = np.full(x.shape, np.inf)
    second = np.full(x.shape, np.inf)
    nearest = np.zeros(x.shape, dtype=np.int64)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            wx, wy = (cx + dx) % _LATTICE, (cy + dy) % _LATTICE
            point = points[wy, wx]
            distance = np.hypot(cx + dx + point[..., 0] - x, cy + dy + point[..., 1] - y)
            closer = distance < first
            second = np.where(closer, first, np.minimum(second, distance))
            first = np.where(closer, distance, first)
            nearest = np.where(closer, wy * _LATTICE + wx, nearest)
    return first, second, nearest


# ------------------------------------------------------------------------------------------ materials


def _ramp(t: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return low + (high - low) * np.clip(t, 0.0, 1.0)[..., None]


def _jittered(rng: np.random.Generator, colour: tuple[float, float, float], spread: float) -> np.ndarray:
    return np.clip(np.asarray(colour) + rng.uniform(-spread, spread, size=3), 0.0, 1.0)


# A material: (x, y) in pixels relative to the image centre, already rotated and scaled -> float (H, W, 3).
Material = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _cork(rng: np.random.Generator) -> Material:
    """Cells of 9-14 px with dark walls, each cell its own shade, under a mottled tone."""
    points = rng.uniform(0.1, 0.9, size=(_LATTICE, _LATTICE, 2))
    cell_shade = rng.uniform(-1.0, 1.0, size=_LATTICE * _LATTICE)
    mottle = _Fractal.draw(rng, 4)
    cell = rng.uniform(9.0, 14.0)
    light, dark = _jittered(rng, (0.70, 0.52, 0.34), 0.02), _jittered(rng, (0.36, 0.24, 0.15), 0.02)

    def material(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        first, second, nearest = _worley(x / cell, y / cell, points)
        wall = np.clip(1.0 - (second - first) / 0.18, 0.0, 1.0) ** 2
        tone = 0.55 + 0.18 * cell_shade[nearest] + 0.2 * mottle(x / 40.0, y / 40.0) - 0.15 * first
        return _ramp(tone * (1.0 - 0.75 * wall), dark, light)

    return material


def _fibre(rng: np.random.Generator) -> Material:
    """Streaks 20-30 times longer than wide along the x axis, over a mottled tone."""
    streaks, mottle = _Fractal.draw(rng, 4), _Fractal.draw(rng, 3)
    width = rng.uniform(2.5, 3.5)
    light, dark = _jittered(rng, (0.80, 0.74, 0.62), 0.02), _jittered(rng, (0.50, 0.42, 0.32), 0.02)

    def material(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        fibres = streaks(x / (25.0 * width), y / width, gain=0.6)
        tone = 0.5 + 0.45 * fibres + 0.2 * mottle(x / 48.0, y / 48.0)
        return _ramp(tone, dark, light)

    return material


def _marble(rng: np.random.Generator) -> Material:
    """Cloudy stone crossed by dark veins that wander with a domain-warped fractal."""
    clouds, warp = _Fractal.draw(rng, 5), _Fractal.draw(rng, 5)
    period = rng.uniform(28.0, 40.0)
    light, grey = _jittered(rng, (0.86, 0.84, 0.80), 0.02), _jittered(rng, (0.62, 0.62, 0.60), 0.02)
    vein_colour = _jittered(rng, (0.30, 0.34, 0.33), 0.02)

    def material(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        wander = warp(x / 36.0, y / 36.0)
        veins = np.abs(np.sin(math.pi * (x / period + 1.6 * wander))) ** 0.35
        base = _ramp(0.5 + 0.6 * clouds(x / 32.0 + wander, y / 32.0), grey, light)
        return base + (vein_colour - base) * (0.75 * (1.0 - veins))[..., None]

    return material


# category -> (material, half range of rotation between good images in degrees)
_MATERIALS: dict[str, tuple[Callable[[np.random.Generator], Material], float]] = {
    "cork": (_cork, 180.0),
    "fibre": (_fibre, 12.0),
    "marble": (_marble, 20.0),
}
# scale of good images: this factor or its inverse at most
_SCALE_RANGE = 1.2


def _view(material: Material, angle: float, scale: float) -> np.ndarray:
    """The material seen rotated by `angle` (radians) and magnified by `scale` about the image centre."""
    rows, cols = _ROWS - _CENTRE, _COLS - _CENTRE
    x = (cols * math.cos(angle) + rows * math.sin(angle)) / scale
    y = (-cols * math.sin(angle) + rows * math.cos(angle)) / scale
    return material(x, y)


# ------------------------------------------------------------------------------------------ defects


@dataclass
class _Sample:
    """A defect-free rendering, with what a defect needs to draw the same material again."""

    image: np.ndarray  # float (H, W, 3)
    material: Material
    angle: float
    scale: float


def _blob(rng: np.random.Generator, radius: tuple[float, float], margin: int = 20) -> np.ndarray:
    """An irregular region: a disc whose radius wanders with angle, at a random place away from the border."""
    row, col = rng.uniform(margin, IMAGE_SIZE - margin, size=2)
    base = rng.uniform(*radius)
    harmonics = rng.uniform(-0.18, 0.18, size=(3, 2))
    theta = np.arctan2(_ROWS - row, _COLS - col)
    wobble = sum(
        a * np.cos((k + 2) * theta) + b * np.sin((k + 2) * theta) for k, (a, b) in enumerate(harmonics)
    )
    return np.hypot(_ROWS - row, _COLS - col) <= base * (1.0 + wobble)


def _scratch(sample: _Sample, rng: np.random.Generator) -> np.ndarray:
    """A 1-2 px wide, slightly bent line lighter than the surface (scratches expose lighter material)."""
    length = rng.uniform(*_SCRATCH_LENGTH)
    angle = rng.uniform(0.0, math.pi)
    direction = np.array([math.sin(angle), math.cos(angle)])
    normal = np.array([-direction[1], direction[0]])
    centre = rng.uniform(IMAGE_SIZE / 2 - 30, IMAGE_SIZE / 2 + 30, size=2)
    bend = rng.uniform(-0.12, 0.12) * length
    t = np.linspace(-0.5, 0.5, int(length * 4))[:, None]
    curve = centre + t * length * direction + (1.0 - 4.0 * t**2) * bend * normal
    offsets = (0.0,) if rng.random() < 0.5 else (-0.5, 0.5)
    region = np.zeros(_ROWS.shape, dtype=bool)
    for offset in offsets:
        pixels = np.clip(np.round(curve + offset * normal).astype(int), 0, IMAGE_SIZE - 1)
        region[pixels[:, 0], pixels[:, 1]] = True
    strength = rng.uniform(0.30, 0.45)
    sample.image[region] += strength * (1.0 - sample.image[region])
    return region


def _patch(sample: _Sample, rng: np.random.Generator) -> np.ndarray:
    """The same material, turned by 40-90 degrees and magnified or shrunk about twice, in a 10-16 px blob."""
    region = _blob(rng, (10.0, 16.0))
    turn = math.radians(rng.uniform(40.0, 90.0)) * rng.choice((-1.0, 1.0))
    zoom = rng.uniform(1.8, 2.4) ** rng.choice((-1.0, 1.0))
    other = _view(sample.material, sample.angle + turn, sample.scale * zoom)
    sample.image[region] = other[region]
    return region


def _discolour(sample: _Sample, rng: np.random.Generator) -> np.ndarray:
    """A faint tint in a 12-20 px blob, strongest in its middle; the texture shows through unchanged."""
    region = _blob(rng, (12.0, 20.0))
    depth = np.minimum(ndimage.distance_transform_edt(region) / 6.0, 1.0)
    tint = rng.choice(np.array(list(TINTS.values())))
    strength = rng.uniform(0.04, 0.065)
    weight = (0.4 + 0.6 * depth) * region
    sample.image += strength * weight[..., None] * tint
    return region


def _stain(sample: _Sample, rng: np.random.Generator) -> np.ndarray:
    """An obvious dark brownish stain, 8-13 px across."""
    region = _blob(rng, (8.0, 13.0))
    sample.image[region] = sample.image[region] * 0.4 + 0.6 * np.array([0.16, 0.11, 0.07])
    return region


_DEFECTS: dict[str, Callable[[_Sample, np.random.Generator], np.ndarray]] = {
    "discolour": _discolour,
    "patch": _patch,
    "scratch": _scratch,
    "stain": _stain,
}


# ------------------------------------------------------------------------------------------ rendering


def render(category: str, kind: str | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (128, 128, 3) image and bool defect mask of one sample of `category`; `kind` None is good."""
    make_material, rotation = _MATERIALS[category]
    material = make_material(rng)
    angle = math.radians(rng.uniform(-rotation, rotation))
    scale = _SCALE_RANGE ** rng.uniform(-1.0, 1.0)
    sample = _Sample(_view(material, angle, scale), material, angle, scale)
    region = np.zeros(_ROWS.shape, dtype=bool) if kind is None else _DEFECTS[kind](sample, rng)
    gradient = rng.uniform(-0.06, 0.06, size=2)
    light = 1.0 + (gradient[0] * (_COLS - _CENTRE) + gradient[1] * (_ROWS - _CENTRE)) / _CENTRE
    noisy = sample.image * light[..., None] + rng.normal(0.0, _NOISE_STD, size=sample.image.shape)
    return np.round(np.clip(noisy, 0.0, 1.0) * 255.0).astype(np.uint8), region


__all__ = ["IMAGE_SIZE", "REALISTIC_CATEGORIES", "REALISTIC_KINDS", "render"]
