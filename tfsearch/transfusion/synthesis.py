"""Synthetic anomalies for training (method.md §5): the anomaly appearance A (a texture or the
grid-shuffled image itself, augmented) seen through a Perlin mask M, with the simulated previous mask M_a.
The pieces live beside this file: `perlin` (noise and masks), `augment` (the image operations),
`foreground` (where anomalies may go).

The original built one sample at a time with NumPy and imgaug in data-loader workers. Here a whole batch is
made at once with torch on the training device, and every random number comes from one `torch.Generator`
(None = the device's global RNG), so a trainer that checkpoints the generator state resumes bit-identically.

Deliberate departures from the original:
- Perlin noise works at any image size (`tfsearch.transfusion.perlin`).
- The ten augmentations are torch re-implementations of the imgaug / PIL ops (`tfsearch.transfusion.augment`).
- Without a DTD texture bank the texture source is procedural (random two-colour blobs, stripes or checkers).
- Foreground masks can be estimated from the image (median border colour as background) when no mask folder
  is given; the original needs SAM-made mask files.
- A profile may give a share of the anomalies a subtle appearance (`subtle_appearance`: the image itself with
  a mild colour shift, or resampled at another scale and angle), a source the paper never draws. No built-in
  profile does: on the realistic demo it sharpened the quick profile's maps but did not raise its image
  AUROC (bench/results/realistic-demo.md); `profile_overrides: {subtle_share: 0.5}` turns it on.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tfsearch.data.images import load_image
from tfsearch.errors import InputError
from tfsearch.transfusion.augment import GRID_CELLS, augment, grid_shuffle, rotate, uniform
from tfsearch.transfusion.perlin import perlin_masks, perlin_noise, simulated_masks

log = logging.getLogger(__name__)

TEXTURE_PROBABILITY = 0.5  # A from a texture, else from the grid-shuffled image itself
# subtle appearances (a departure, off in every built-in profile): a colour shift of this many 0-255 levels
# (Euclidean RGB length, uniform direction), or the image magnified or shrunk by a factor drawn from
# SUBTLE_ZOOM (either way, with p = 1/2) and turned by SUBTLE_TURN degrees (either way)
SUBTLE_SHIFT = (8.0, 40.0)
SUBTLE_ZOOM = (1.4, 2.5)
SUBTLE_TURN = (20.0, 90.0)


@dataclass
class SyntheticBatch:
    noise: torch.Tensor  # eps = M * A, (B,3,H,W) in [-1,1], zero outside M
    mask: torch.Tensor  # M, (B,1,H,W) float {0,1}
    sim_mask: torch.Tensor  # M_a, (B,1,H,W) float {0,1} (the trainer zeroes it where t = steps-1)


def subtle_appearance(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The images themselves (float (n,3,H,W) in [0,255]), each changed one way at random: a colour shift of
    `SUBTLE_SHIFT` levels in a random RGB direction, or a copy magnified or shrunk (`SUBTLE_ZOOM`) and turned
    (`SUBTLE_TURN`) about the centre, mirrored at the border. Seen through a Perlin mask these are local
    tints and patches of the same material at another scale and angle."""
    count = images.shape[0]
    device, dtype = images.device, images.dtype
    direction = torch.randn(count, 3, device=device, generator=generator)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-8)
    length = uniform((count, 1), *SUBTLE_SHIFT, device=device, generator=generator)
    shifted = (images + (length * direction).view(count, 3, 1, 1).to(dtype)).clamp(0, 255)

    def signed(low_high: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
        """A magnitude drawn from `low_high` and a sign ±1, per image."""
        sign = torch.randint(0, 2, (count,), device=device, generator=generator) * 2 - 1
        return uniform((count,), *low_high, device=device, generator=generator), sign

    zoom, zoom_sign = signed(SUBTLE_ZOOM)
    turn, turn_sign = signed(SUBTLE_TURN)
    resampled = rotate(images, turn * turn_sign, magnify=zoom**zoom_sign, padding="reflection")

    take_shift = torch.rand(count, device=device, generator=generator) < 0.5
    return torch.where(take_shift.view(-1, 1, 1, 1), shifted, resampled.clamp(0, 255))


# ------------------------------------------------------------------------------------------------ textures


def procedural_textures(
    batch: int, size: int, *, device: torch.device | str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """float (B,3,H,W) in [0,255]: two random colours blended by Perlin blobs, stripes or a checkerboard at a
    random angle and frequency. The texture source when no DTD bank is given (tests, offline demos)."""
    blobs = ((perlin_noise(batch, size, device=device, generator=generator) + 1) / 2).clamp(0, 1)
    angle = uniform((batch, 1, 1), 0.0, math.pi, device=device, generator=generator)
    frequency = uniform((batch, 1, 1), 2.0, 16.0, device=device, generator=generator)
    phase = uniform((batch, 1, 1), 0.0, 1.0, device=device, generator=generator)
    position = torch.arange(size, device=device, dtype=torch.float32) / size
    rows, cols = position.view(1, -1, 1), position.view(1, 1, -1)
    along = frequency * (cols * torch.cos(angle) + rows * torch.sin(angle)) + phase
    across = frequency * (rows * torch.cos(angle) - cols * torch.sin(angle)) + phase
    stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * along)
    checker = (along.floor() + across.floor()) % 2
    kind = torch.randint(0, 3, (batch,), device=device, generator=generator)
    pattern = torch.stack([blobs, stripes, checker], 1)[torch.arange(batch, device=device), kind][:, None]
    first = uniform((batch, 3, 1, 1), 0.0, 255.0, device=device, generator=generator)
    second = uniform((batch, 3, 1, 1), 0.0, 255.0, device=device, generator=generator)
    return first + pattern * (second - first)


def load_texture_bank(
    root: Path, size: int, limit: int | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """uint8 (K,3,size,size) of the DTD images `root/<class>/*.jpg` (sorted), PIL-bilinear resized.

    `limit` keeps that many images evenly spread over the sorted list (so every class stays represented);
    the full DTD at 256 px is about 1.1 GB.
    """
    root = Path(root)
    files = sorted(root.glob("*/*.jpg")) if root.is_dir() else []
    if not files:
        raise InputError(
            f"--texture-root {root}: expected a DTD-layout folder of <class>/*.jpg images, found none"
        )
    if limit is not None:
        if limit < 1:
            raise InputError(f"texture bank limit must be at least 1, got {limit}")
        if limit < len(files):
            files = [files[i] for i in np.linspace(0, len(files) - 1, limit).astype(int)]
    images = np.stack([load_image(path, size) for path in files])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)


# ------------------------------------------------------------------------------------------------ synthesis


def _levels(x0: torch.Tensor) -> torch.Tensor:
    """Images in [−1,1] as float 0-255 levels, rounded as the uint8 images they came from."""
    return ((x0.float() + 1) * 127.5).round().clamp(0, 255)


class AnomalySynthesizer:
    """Makes (ε = M⊙A, M, M_a) for a batch of normal images, every sample with an anomaly (method.md §5)."""

    def __init__(
        self, image_size: int, texture_bank: torch.Tensor | None = None, subtle_share: float = 0.0
    ) -> None:
        if not 0.0 <= subtle_share <= 1.0:
            raise ValueError(f"subtle_share={subtle_share}: expected a share between 0 and 1")
        if image_size < GRID_CELLS or image_size % GRID_CELLS:
            raise InputError(
                f"image size {image_size}: anomaly synthesis needs a multiple of {GRID_CELLS} "
                f"(the structure source is cut into a {GRID_CELLS}x{GRID_CELLS} grid)"
            )
        if texture_bank is not None and (
            texture_bank.dtype != torch.uint8
            or texture_bank.dim() != 4
            or texture_bank.shape[1] != 3
            or len(texture_bank) == 0
        ):
            raise ValueError(
                f"texture bank must be a non-empty uint8 (K,3,S,S) tensor, got {texture_bank.dtype} "
                f"{tuple(texture_bank.shape)}"
            )
        self.image_size = image_size
        self.texture_bank = texture_bank
        self.subtle_share = subtle_share

    def _textures(self, batch: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        if self.texture_bank is None:
            return procedural_textures(batch, self.image_size, device=device, generator=generator)
        picks = torch.randint(0, len(self.texture_bank), (batch,), device=device, generator=generator)
        textures = self.texture_bank[picks.to(self.texture_bank.device)].to(device).float()
        if textures.shape[-1] != self.image_size:
            size = (self.image_size, self.image_size)
            textures = F.interpolate(textures, size=size, mode="bilinear", antialias=True).clamp(0, 255)
        return textures

    def draw_sources(
        self, x0: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-augmented appearance sources, float (B,3,H,W) in [0,255], and a (B,) bool of which samples took
        a texture (p = 0.5); the others use their own image as uint8 levels."""
        batch = x0.shape[0]
        from_texture = torch.rand(batch, device=x0.device, generator=generator) < TEXTURE_PROBABILITY
        textures = self._textures(batch, x0.device, generator)
        return torch.where(from_texture.view(-1, 1, 1, 1), textures, _levels(x0)), from_texture

    def appearance(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Anomaly appearance A in [−1,1]: augmented texture, or augmented and grid-shuffled image itself; a
        `subtle_share` of the samples instead take `subtle_appearance` of their own image. With no subtle
        share no random number is drawn for it, so the paper's synthesis stays as it was."""
        sources, from_texture = self.draw_sources(x0, generator)
        augmented = augment(sources, generator)
        shuffled = grid_shuffle(augmented, GRID_CELLS, generator)
        appearance = torch.where(from_texture.view(-1, 1, 1, 1), augmented, shuffled)
        if self.subtle_share > 0:
            subtle = torch.rand(x0.shape[0], device=x0.device, generator=generator) < self.subtle_share
            own = subtle_appearance(_levels(x0), generator)
            appearance = torch.where(subtle.view(-1, 1, 1, 1), own, appearance)
        return appearance / 127.5 - 1

    @torch.no_grad()
    def __call__(
        self, x0: torch.Tensor, foreground: torch.Tensor, generator: torch.Generator | None = None
    ) -> SyntheticBatch:
        """x0: (B,3,H,W) normal images in [−1,1]; foreground: (B,1,H,W) {0,1}, where anomalies may go."""
        batch, size = x0.shape[0], self.image_size
        if tuple(x0.shape) != (batch, 3, size, size) or tuple(foreground.shape) != (batch, 1, size, size):
            raise ValueError(
                f"expected x0 (B,3,{size},{size}) and foreground (B,1,{size},{size}), "
                f"got {tuple(x0.shape)} and {tuple(foreground.shape)}"
            )
        noise = perlin_noise(batch, size, device=x0.device, generator=generator)[:, None]
        foreground = foreground.to(noise.dtype)
        mask = perlin_masks(noise) * foreground
        sim_mask = simulated_masks(noise, generator) * foreground
        anomaly = mask * self.appearance(x0, generator)
        return SyntheticBatch(
            noise=anomaly.to(x0.dtype), mask=mask.to(x0.dtype), sim_mask=sim_mask.to(x0.dtype)
        )


# ------------------------------------------------------------------------------------------------ validation
# Validation anomalies differ from training's on purpose: a model trained on the training generator finds
# its anomalies at every milestone (every candidate then scores 1.0 and nothing can be ranked)
VALIDATION_THRESHOLD = 0.7  # M = 1[|P| > 0.7]: smaller regions than training's 0.5
VALIDATION_OPACITY = (0.15, 0.5)  # fainter: partly transparent, where training's anomalies are opaque
VALIDATION_BLUR = 9  # box size of the blurred-copy source


@torch.no_grad()
def validation_anomalies(
    x0: torch.Tensor, foreground: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(defective images, masks) for held-out normal images x0 (B,3,H,W) in [−1,1], B ≥ 2.

    Smaller (`VALIDATION_THRESHOLD`), fainter (`VALIDATION_OPACITY`) and from sources training never uses,
    one per image at random: the same place of another held-out image, a brightness shift of the image, or
    a blurred copy of it. A mask emptied by the foreground leaves that image normal."""
    batch, size = x0.shape[0], x0.shape[-1]
    device = x0.device
    noise = perlin_noise(batch, size, device=device, generator=generator)[:, None]
    mask = (noise.abs() > VALIDATION_THRESHOLD).to(x0.dtype) * foreground.to(x0.dtype)
    shift = uniform((batch, 1, 1, 1), 0.2, 0.6, device=device, generator=generator)
    sign = torch.randint(0, 2, (batch, 1, 1, 1), device=device, generator=generator) * 2 - 1
    half = VALIDATION_BLUR // 2
    sources = torch.stack(
        [
            x0.roll(1, dims=0),
            (x0 + sign * shift).clamp(-1, 1),
            F.avg_pool2d(x0, VALIDATION_BLUR, stride=1, padding=half, count_include_pad=False),
        ]
    )
    kind = torch.randint(0, len(sources), (batch,), device=device, generator=generator)
    source = sources[kind, torch.arange(batch, device=device)]
    opacity = uniform((batch, 1, 1, 1), *VALIDATION_OPACITY, device=device, generator=generator)
    return x0 + opacity * mask * (source - x0), mask
