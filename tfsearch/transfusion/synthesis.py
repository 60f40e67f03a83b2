"""Synthetic anomalies for training (method.md §5): Perlin masks M, simulated previous masks M_a, the anomaly
appearance A (a texture or the grid-shuffled image itself, augmented) and the foreground masks that keep
anomalies on the object.

The original built one sample at a time with NumPy and imgaug in data-loader workers. Here a whole batch is
made at once with torch on the training device, and every random number comes from one `torch.Generator`
(None = the device's global RNG), so a trainer that checkpoints the generator state resumes bit-identically.

Deliberate departures from the original:
- Perlin noise is a function of image-relative position (pixel i of n sits at i·r/n lattice cells), so it
  works at any image size; at a size that divides 256 the unrotated map equals point-sampling the 256-pixel
  map with the same gradients. The number of cells per axis is capped at size/2 (only matters below 64 px),
  because at one cell per pixel every pixel lies on the lattice, where Perlin noise is zero.
- The ten augmentations are torch re-implementations of the imgaug / PIL ops. They work in float [0,255], each
  keeping that range; only ops defined on integer levels (Posterize, Equalize) round.
- Without a DTD texture bank the texture source is procedural (random two-colour blobs, stripes or checkers).
- Foreground masks can be estimated from the image (median border colour as background) when no mask folder
  is given; the original needs SAM-made mask files.
- A profile may give a share of the anomalies a subtle appearance (`subtle_appearance`: the image itself with
  a mild colour shift, or resampled at another scale and angle), a source the paper never draws. No built-in
  profile does: on the realistic demo it sharpened the quick profile's maps but did not raise its image
  AUROC (bench/README.md, "A subtle anomaly source"); `profile_overrides: {subtle_share: 0.5}` turns it on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from tfsearch.data.datasets import load_image
from tfsearch.errors import InputError

log = logging.getLogger(__name__)

PERLIN_MAX_OCTAVE = 5  # cells per axis 2^k, k ~ U{0..5}
MASK_THRESHOLD = 0.5  # M = 1[|P| > 0.5]
TEXTURE_PROBABILITY = 0.5  # A from a texture, else from the grid-shuffled image itself
GRID_CELLS = 8  # the structure source is cut into GRID_CELLS x GRID_CELLS cells
OPS_PER_IMAGE = 3  # distinct augmentations per image, drawn without replacement
# subtle appearances (a departure, off in every built-in profile): a colour shift of this many 0-255 levels
# (Euclidean RGB length, uniform direction), or the image magnified or shrunk by a factor drawn from
# SUBTLE_ZOOM (either way, with p = 1/2) and turned by SUBTLE_TURN degrees (either way)
SUBTLE_SHIFT = (8.0, 40.0)
SUBTLE_ZOOM = (1.4, 2.5)
SUBTLE_TURN = (20.0, 90.0)
FG_DILATION = np.ones((1, 5, 5), dtype=bool)  # one 5x5 dilation of every foreground mask (per image)
# foreground estimation: colour distance (0-255 RGB, Euclidean) above which a pixel is not background
FG_MIN_DISTANCE = 30.0
FG_BORDER_MARGIN = 1.5  # ... and at least this times the 90th percentile of the border pixels' distances
FG_PLAUSIBLE = (0.05, 0.98)  # an estimate covering less / more of the image falls back to the whole image


@dataclass
class SyntheticBatch:
    noise: torch.Tensor  # eps = M * A, (B,3,H,W) in [-1,1], zero outside M
    mask: torch.Tensor  # M, (B,1,H,W) float {0,1}
    sim_mask: torch.Tensor  # M_a, (B,1,H,W) float {0,1} (the trainer zeroes it where t = steps-1)


# ------------------------------------------------------------------------------------------- Perlin masks


def _uniform(
    shape: tuple[int, ...],
    low: float,
    high: float,
    *,
    device: torch.device | str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, device=device, generator=generator)


def rotate(
    images: torch.Tensor,
    degrees: torch.Tensor,
    mode: str = "bilinear",
    *,
    magnify: torch.Tensor | None = None,
    padding: str = "zeros",
) -> torch.Tensor:
    """Rotate each (square) image about its centre by its own angle; bilinear as imgaug's Affine, nearest as
    torchvision's rotate in the trainer's geometric augmentation. `magnify` (B,) also scales each image about
    its centre (2 doubles it); `padding` is grid_sample's fill outside the image (zeros by default)."""
    radians = torch.deg2rad(degrees.to(images.dtype))
    reach = 1 / magnify.to(images.dtype) if magnify is not None else torch.ones_like(radians)
    cos, sin, zero = reach * torch.cos(radians), reach * torch.sin(radians), torch.zeros_like(radians)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode=padding, align_corners=False)


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
    degrees = _uniform((batch,), -90.0, 90.0, device=device, generator=generator)
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


# ------------------------------------------------------------------------------------------- augmentation
# Every op maps float (n,3,H,W) in [0,255] to the same (clamping where it could overshoot); parameters are
# drawn per image (per channel where the imgaug op is per_channel).


def _per_image(
    images: torch.Tensor, low: float, high: float, generator: torch.Generator | None, channels: int = 1
) -> torch.Tensor:
    shape = (images.shape[0], channels, 1, 1)
    return _uniform(shape, low, high, device=images.device, generator=generator).to(images.dtype)


def gamma_contrast(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """GammaContrast((0.5, 2.0), per_channel=True): 255·(x/255)^γ with γ per channel."""
    gamma = _per_image(images, 0.5, 2.0, generator, channels=3)
    return 255 * (images / 255).clamp(0, 1) ** gamma


def brightness(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """MultiplyAndAddToBrightness(mul (0.8,1.2), add (−30,30)) on the BT.601 luma; chroma stays unchanged."""
    multiplier = _per_image(images, 0.8, 1.2, generator)
    offset = _per_image(images, -30.0, 30.0, generator)
    luma = (images * images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return (images + luma * (multiplier - 1) + offset).clamp(0, 255)


def sharpness(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """PIL EnhanceSharpness, factor U(0,2): blend of the image and its PIL SMOOTH-filtered copy."""
    factor = _per_image(images, 0.0, 2.0, generator)
    kernel = images.new_tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13
    smooth = images.clone()
    smooth[..., 1:-1, 1:-1] = F.conv2d(images, kernel.expand(3, 1, 3, 3), groups=3)
    return (smooth + factor * (images - smooth)).clamp(0, 255)


def _rgb_to_hsv(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n,3,H,W) in [0,1] -> hue in [0,1), saturation, value, each (n,H,W)."""
    value, brightest = rgb.max(1)
    chroma = value - rgb.min(1).values
    safe = chroma.clamp_min(1e-8)
    red, green, blue = rgb.unbind(1)
    sectors = torch.stack([((green - blue) / safe) % 6, (blue - red) / safe + 2, (red - green) / safe + 4], 1)
    hue = torch.where(chroma > 0, sectors.gather(1, brightest[:, None])[:, 0] / 6, torch.zeros_like(value))
    return hue, chroma / value.clamp_min(1e-8), value


def _hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    k = (hue.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1) + 6 * hue[:, None]) % 6
    return value[:, None] * (1 - saturation[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1))


def hue_saturation(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """AddToHueAndSaturation((−50,50), per_channel=True): independent shifts of hue (±50/255 of the colour
    circle, imgaug's projection) and saturation (±50 on 0-255)."""
    hue_shift = _per_image(images, -50.0, 50.0, generator) / 255
    saturation_shift = _per_image(images, -50.0, 50.0, generator) / 255
    hue, saturation, value = _rgb_to_hsv(images / 255)
    shifted = _hsv_to_rgb(
        (hue + hue_shift[:, 0]) % 1, (saturation + saturation_shift[:, 0]).clamp(0, 1), value
    )
    return 255 * shifted


def solarize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Solarize(p=0.5, threshold (32,128)): per image with p = 0.5, invert pixels ≥ threshold."""
    chosen = _per_image(images, 0.0, 1.0, generator) < 0.5
    threshold = _per_image(images, 32.0, 128.0, generator)
    return torch.where(chosen & (images >= threshold), 255 - images, images)


def posterize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Posterize with 1..8 bits per image: clear the low bits of each level (PIL posterize)."""
    bits = torch.randint(1, 9, (images.shape[0], 1, 1, 1), device=images.device, generator=generator)
    step = (2 ** (8 - bits)).to(images.dtype)
    return torch.floor(images.round() / step) * step


def invert(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Invert: 255 − x (no randomness; `generator` is accepted for a uniform op signature)."""
    return 255 - images


def autocontrast(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """PIL Autocontrast with cutoff U{0..20} %: per channel, cut that share of pixels at each end of the
    histogram and stretch the remaining range to 0..255; a flat channel is left unchanged."""
    count, channels = images.shape[0], images.shape[1]
    flat = images.flatten(2)
    pixels = flat.shape[-1]
    cutoff = torch.randint(0, 21, (count, 1, 1), device=images.device, generator=generator)
    cut = (pixels * cutoff // 100).expand(count, channels, 1)
    ordered = flat.sort(-1).values
    low, high = ordered.gather(-1, cut), ordered.gather(-1, pixels - 1 - cut)
    spread = high - low
    stretched = (flat - low) * 255 / spread.clamp_min(1e-6)
    return torch.where(spread > 0, stretched.clamp(0, 255), flat).view_as(images)


def equalize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """PIL Equalize, per channel: lut[i] = (step//2 + #pixels below level i) // step with
    step = (#pixels not at the top level) // 255; a channel with step 0 is left unchanged."""
    levels = images.round().clamp(0, 255).long().flatten(2)  # (n,3,P)
    pixels = levels.shape[-1]
    histogram = torch.zeros(*levels.shape[:2], 256, dtype=torch.long, device=images.device)
    histogram.scatter_add_(-1, levels, torch.ones_like(levels))
    at_top = histogram.gather(-1, levels.amax(-1, keepdim=True))
    step = (pixels - at_top) // 255
    below = histogram.cumsum(-1) - histogram
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp(max=255)
    equalized = lut.gather(-1, levels).to(images.dtype)
    return torch.where(step > 0, equalized, images.flatten(2)).view_as(images)


def affine_rotate(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Affine(rotate (−45°,45°)): bilinear, black fill (clamped: interpolation weights sum to 1 ± ulp)."""
    return rotate(images, _per_image(images, -45.0, 45.0, generator).view(-1)).clamp(0, 255)


AugmentOp = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]
# method.md §5.5, in the original's order
AUGMENTATIONS: tuple[AugmentOp, ...] = (
    gamma_contrast,
    brightness,
    sharpness,
    hue_saturation,
    solarize,
    posterize,
    invert,
    autocontrast,
    equalize,
    affine_rotate,
)


def augment(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per image, 3 distinct ops drawn without replacement from AUGMENTATIONS, applied in the drawn order.

    Each op runs once per position on all images that drew it. Input: (B,3,H,W) in [0,255]; output: float
    (B,3,H,W) in [0,255], as every op keeps that range.
    """
    drawn = torch.rand(images.shape[0], len(AUGMENTATIONS), device=images.device, generator=generator)
    order = drawn.argsort(1)[:, :OPS_PER_IMAGE]
    result = images.float().clone()
    for position in range(OPS_PER_IMAGE):
        for index, op in enumerate(AUGMENTATIONS):
            chosen = order[:, position] == index
            if chosen.any():
                result[chosen] = op(result[chosen], generator)
    return result


def grid_shuffle(
    images: torch.Tensor, cells: int = GRID_CELLS, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Cut each image into cells x cells equal tiles and permute the tiles, a fresh permutation per image."""
    count, channels, height, width = images.shape
    if height % cells or width % cells:
        raise ValueError(f"grid_shuffle needs H and W divisible by {cells}, got {height}x{width}")
    tile_h, tile_w = height // cells, width // cells
    tiles = images.reshape(count, channels, cells, tile_h, cells, tile_w).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(count, cells * cells, channels, tile_h, tile_w)
    order = torch.rand(count, cells * cells, device=images.device, generator=generator).argsort(1)
    shuffled = tiles[torch.arange(count, device=images.device)[:, None], order]
    shuffled = shuffled.reshape(count, cells, cells, channels, tile_h, tile_w).permute(0, 3, 1, 4, 2, 5)
    return shuffled.reshape(count, channels, height, width)


def subtle_appearance(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The images themselves (float (n,3,H,W) in [0,255]), each changed one way at random: a colour shift of
    `SUBTLE_SHIFT` levels in a random RGB direction, or a copy magnified or shrunk (`SUBTLE_ZOOM`) and turned
    (`SUBTLE_TURN`) about the centre, mirrored at the border. Seen through a Perlin mask these are local
    tints and patches of the same material at another scale and angle."""
    count = images.shape[0]
    device, dtype = images.device, images.dtype
    direction = torch.randn(count, 3, device=device, generator=generator)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-8)
    length = _uniform((count, 1), *SUBTLE_SHIFT, device=device, generator=generator)
    shifted = (images + (length * direction).view(count, 3, 1, 1).to(dtype)).clamp(0, 255)

    def signed(low_high: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
        """A magnitude drawn from `low_high` and a sign ±1, per image."""
        sign = torch.randint(0, 2, (count,), device=device, generator=generator) * 2 - 1
        return _uniform((count,), *low_high, device=device, generator=generator), sign

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
    angle = _uniform((batch, 1, 1), 0.0, math.pi, device=device, generator=generator)
    frequency = _uniform((batch, 1, 1), 2.0, 16.0, device=device, generator=generator)
    phase = _uniform((batch, 1, 1), 0.0, 1.0, device=device, generator=generator)
    position = torch.arange(size, device=device, dtype=torch.float32) / size
    rows, cols = position.view(1, -1, 1), position.view(1, 1, -1)
    along = frequency * (cols * torch.cos(angle) + rows * torch.sin(angle)) + phase
    across = frequency * (rows * torch.cos(angle) - cols * torch.sin(angle)) + phase
    stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * along)
    checker = (along.floor() + across.floor()) % 2
    kind = torch.randint(0, 3, (batch,), device=device, generator=generator)
    pattern = torch.stack([blobs, stripes, checker], 1)[torch.arange(batch, device=device), kind][:, None]
    first = _uniform((batch, 3, 1, 1), 0.0, 255.0, device=device, generator=generator)
    second = _uniform((batch, 3, 1, 1), 0.0, 255.0, device=device, generator=generator)
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
    shift = _uniform((batch, 1, 1, 1), 0.2, 0.6, device=device, generator=generator)
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
    opacity = _uniform((batch, 1, 1, 1), *VALIDATION_OPACITY, device=device, generator=generator)
    return x0 + opacity * mask * (source - x0), mask


# ------------------------------------------------------------------------------------------------ foreground


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
