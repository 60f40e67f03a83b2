"""Perlin noise and the masks cut from it (method.md §5.1-5.3): the true anomaly mask M and the simulated
previous mask M_a.

Noise is a function of image-relative position (pixel i of n sits at i·r/n lattice cells), so it works at any
image size; at a size that divides 256 the unrotated map equals point-sampling the 256-pixel map with the same
gradients. The number of cells per axis is capped at size/2 (only matters below 64 px), because at one cell
per pixel every pixel lies on the lattice, where Perlin noise is zero."""

from __future__ import annotations

import math

import torch

from tfsearch.transfusion.augment import rotate, uniform

PERLIN_MAX_OCTAVE = 5  # cells per axis 2^k, k ~ U{0..5}


MASK_THRESHOLD = 0.5  # M = 1[|P| > 0.5]


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (6 * t - 15) + 10)


def perlin_noise(
    batch: int, size: int, *, device: torch.device | str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B,H,W) Perlin noise P, each sample with its own 2^k cells per axis and rotation (method.md §5.1).

    Every sample draws a full (2^5+1)² lattice of random unit gradients and one with fewer cells uses its
    top-left part, so samples of different scales are computed together, with no Python loop.
    """
    octaves = torch.randint(0, PERLIN_MAX_OCTAVE + 1, (batch, 2), device=device, generator=generator)
    cells = torch.clamp(2**octaves, max=max(size // 2, 1))  # (B, 2): cells along rows, along columns
    lattice = 2**PERLIN_MAX_OCTAVE + 1
    angles = 2 * math.pi * torch.rand(batch, lattice * lattice, device=device, generator=generator)
    gradients = torch.stack([torch.cos(angles), torch.sin(angles)], -1)  # (B, L*L, 2): (row, col) parts

    scaled = torch.arange(size, device=device)[None, None, :] * cells[:, :, None]  # (B, 2, size), exact ints
    cell = scaled // size
    offset = (scaled % size).float() / size  # position inside the cell, [0, 1)
    row_cell, col_cell = cell[:, 0, :, None], cell[:, 1, None, :]
    row_offset, col_offset = offset[:, 0, :, None], offset[:, 1, None, :]

    def corner(down: int, right: int) -> torch.Tensor:
        index = ((row_cell + down) * lattice + col_cell + right).reshape(batch, -1, 1).expand(-1, -1, 2)
        gradient = torch.gather(gradients, 1, index).view(batch, size, size, 2)
        return gradient[..., 0] * (row_offset - down) + gradient[..., 1] * (col_offset - right)

    col_weight = _fade(col_offset)
    top = torch.lerp(corner(0, 0), corner(0, 1), col_weight)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), col_weight)
    noise = math.sqrt(2) * torch.lerp(top, bottom, _fade(row_offset))
    degrees = uniform((batch,), -90.0, 90.0, device=device, generator=generator)
    return rotate(noise[:, None], degrees)[:, 0]


def perlin_masks(noise: torch.Tensor) -> torch.Tensor:
    """True anomaly mask M = 1[|P| > 0.5]: both lobes of the noise (method.md §5.2), same shape as `noise`."""
    return (noise.abs() > MASK_THRESHOLD).to(noise.dtype)


def simulated_thresholds(noise: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) thresholds τ of the simulated previous mask, one of four regimes with p = 1/4 each (method.md
    §5.3): max(P) (nearly empty), 0.5 + 0.5·U (eroded), 0.5 (= M), 0.5 − 0.5·U (dilated)."""
    batch = noise.shape[0]
    spread = 0.5 * torch.rand(batch, device=noise.device, generator=generator).to(noise.dtype)
    peak = noise.flatten(1).amax(1)
    half = torch.full_like(peak, MASK_THRESHOLD)
    choices = torch.stack([peak, half + spread, half, half - spread], 1)
    regime = torch.randint(0, 4, (batch, 1), device=noise.device, generator=generator)
    return choices.gather(1, regime)[:, 0]


def simulated_masks(noise: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Simulated previous mask M_a = 1[|P| > τ] with τ from `simulated_thresholds`, same shape as `noise`."""
    threshold = simulated_thresholds(noise, generator).view(-1, *([1] * (noise.dim() - 1)))
    return (noise.abs() > threshold).to(noise.dtype)
