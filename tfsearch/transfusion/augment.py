"""Random image operations for anomaly synthesis (method.md §5.5): torch re-implementations of the original's
imgaug / PIL augmentations, the grid shuffle, and the rotation they share.

Every op maps float (n,3,H,W) in [0,255] to the same range (clamping where it could overshoot; only ops
defined on integer levels, Posterize and Equalize, round); parameters are drawn per image (per channel where
the imgaug op is per_channel) from one `torch.Generator`, so a resumed trainer draws the same numbers."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

GRID_CELLS = 8  # the structure source is cut into GRID_CELLS x GRID_CELLS cells
OPS_PER_IMAGE = 3  # distinct augmentations per image, drawn without replacement


def uniform(
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


def rotate_where(
    images: torch.Tensor, chosen: torch.Tensor, degrees: torch.Tensor, mode: str = "bilinear"
) -> torch.Tensor:
    """`rotate` for the images where `chosen` (B,) holds; the others keep their own values. All are turned
    and selected with `torch.where`, so nothing waits for the device to say which were chosen."""
    return torch.where(chosen.view(-1, 1, 1, 1), rotate(images, degrees, mode), images)


def _per_image(
    images: torch.Tensor, low: float, high: float, generator: torch.Generator | None, channels: int = 1
) -> torch.Tensor:
    shape = (images.shape[0], channels, 1, 1)
    return uniform(shape, low, high, device=images.device, generator=generator).to(images.dtype)


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

    Input: (B,3,H,W) in [0,255]; output: float (B,3,H,W) in [0,255], as every op keeps that range. On the
    CPU each op runs once per position on the images that drew it (`augment_subsets`); on an accelerator on
    all of them, each keeping its own op's result (`augment_masked`): which images drew an op is known only
    on the device, and reading it back would stall the device 30 times a batch.
    """
    drawn = torch.rand(images.shape[0], len(AUGMENTATIONS), device=images.device, generator=generator)
    order = drawn.argsort(1)[:, :OPS_PER_IMAGE]
    apply = augment_subsets if images.device.type == "cpu" else augment_masked
    return apply(images.float().clone(), order, generator)


def augment_subsets(
    images: torch.Tensor, order: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """`order` (B, OPS_PER_IMAGE) op indices: each op draws and runs for the images that chose it. The number
    of draws depends on the data, which costs nothing where the tensors are in host memory."""
    for position in range(OPS_PER_IMAGE):
        for index, op in enumerate(AUGMENTATIONS):
            chosen = order[:, position] == index
            if chosen.any():
                images[chosen] = op(images[chosen], generator)
    return images


def augment_masked(
    images: torch.Tensor, order: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """`order` as in `augment_subsets`, with no value read back to the host: every op draws its parameters for
    the whole batch and runs on it, and `torch.where` keeps its result for the images that chose it. Ten
    times the arithmetic of the subsets, and another sequence of draws, so another (equally distributed)
    synthesis than on the CPU for the same seed."""
    for position in range(OPS_PER_IMAGE):
        for index, op in enumerate(AUGMENTATIONS):
            chosen = (order[:, position] == index).view(-1, 1, 1, 1)
            images = torch.where(chosen, op(images, generator), images)
    return images


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
