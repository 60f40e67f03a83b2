"""Synthetic anomaly generation (method.md §5): Perlin masks, simulated masks, appearance, augmentation,
texture bank and foreground masks. Small sizes, seeded generators."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tfsearch.errors import InputError
from tfsearch.transfusion.augment import (
    AUGMENTATIONS,
    augment,
    autocontrast,
    brightness,
    equalize,
    gamma_contrast,
    grid_shuffle,
    hue_saturation,
    invert,
    posterize,
    rotate,
    sharpness,
    solarize,
)
from tfsearch.transfusion.foreground import foreground_masks
from tfsearch.transfusion.perlin import perlin_masks, perlin_noise, simulated_masks, simulated_thresholds
from tfsearch.transfusion.synthesis import (
    SUBTLE_SHIFT,
    AnomalySynthesizer,
    load_texture_bank,
    subtle_appearance,
)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def signed_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=seeded(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------------ Perlin


def test_perlin_noise_range_rotation_and_varying_scales():
    noise = perlin_noise(200, 32, device="cpu", generator=seeded(0))
    assert noise.shape == (200, 32, 32)
    # unit gradients with the √2 scaling bound 2-D Perlin noise by 1; the rotation only interpolates
    assert noise.abs().max() <= 1.0 + 1e-5
    # rotated by U(−90°, 90°) with zero fill: the corner pixel is outside the rotated map for most angles
    assert (noise[:, 0, 0] == 0).float().mean() > 0.6
    # per-sample scales 2^0..2^5: roughness (mean neighbour step relative to amplitude) varies widely
    roughness = (noise[:, 1:] - noise[:, :-1]).abs().mean((1, 2)) / noise.abs().mean((1, 2)).clamp_min(1e-6)
    assert roughness.max() > 5 * roughness.min()
    area = perlin_masks(noise).mean((1, 2))
    assert 0.02 < area.mean() < 0.3
    assert area.std() > 0.01
    assert (area > 0).float().mean() > 0.9


@pytest.mark.parametrize("size", [16, 48])
def test_perlin_noise_works_at_sizes_that_are_not_powers_of_two_or_small(size):
    noise = perlin_noise(16, size, device="cpu", generator=seeded(1))
    assert noise.shape == (16, size, size)
    # the cell count is capped so no sample degenerates to lattice points only (where Perlin noise is 0)
    assert (noise.abs().amax((1, 2)) > 0.3).all()


def test_true_mask_is_absolute_value_threshold():
    noise = perlin_noise(32, 32, device="cpu", generator=seeded(2))
    mask = perlin_masks(noise)
    assert torch.equal(mask, (noise.abs() > 0.5).float())
    assert mask[noise < -0.5].eq(1).all() and (noise < -0.5).any()  # the negative lobe is an anomaly too


def test_simulated_masks_cover_the_four_regimes_about_equally():
    noise = perlin_noise(400, 32, device="cpu", generator=seeded(3))
    thresholds = simulated_thresholds(noise, seeded(4))
    simulated = simulated_masks(noise, seeded(4))
    assert torch.equal(simulated, (noise.abs() > thresholds.view(-1, 1, 1)).float())

    true = perlin_masks(noise)
    peak = thresholds == noise.flatten(1).amax(1)
    eroded = (thresholds > 0.5) & ~peak
    identity = (thresholds == 0.5) & ~peak
    dilated = (thresholds < 0.5) & ~peak
    for regime in (peak, eroded, identity, dilated):
        assert 0.17 < regime.float().mean() < 0.33
    assert (thresholds[eroded] < 1.0).all() and (thresholds[dilated] >= 0.0).all()
    assert (simulated[eroded] <= true[eroded]).all()  # subset
    assert torch.equal(simulated[identity], true[identity])
    assert (simulated[dilated] >= true[dilated]).all()  # superset
    assert simulated[dilated].sum() > true[dilated].sum()
    # τ = max(P): only negative-lobe pixels below −max(P) survive, so the mask is nearly empty
    assert simulated[peak].mean() < 0.25 * true.mean()


# ------------------------------------------------------------------------------------------------ synthesizer


def test_synthetic_batch_values_and_foreground_restriction():
    size = 32
    x0 = signed_images(24, size)
    foreground = torch.ones(24, 1, size, size)
    foreground[..., : size // 2] = 0  # left half is background
    batch = AnomalySynthesizer(size)(x0, foreground, generator=seeded(5))

    assert batch.noise.shape == (24, 3, size, size)
    assert batch.mask.shape == batch.sim_mask.shape == (24, 1, size, size)
    for mask in (batch.mask, batch.sim_mask):
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert mask[..., : size // 2].eq(0).all()
    assert batch.noise.abs().max() <= 1.0
    assert batch.noise[(batch.mask == 0).expand_as(batch.noise)].eq(0).all()
    assert batch.mask[..., size // 2 :].sum() > 0
    assert batch.noise.abs().sum() > 0


def test_synthesis_is_deterministic_given_the_generator():
    synthesizer = AnomalySynthesizer(32)
    x0, foreground = signed_images(6, 32), torch.ones(6, 1, 32, 32)
    first = synthesizer(x0, foreground, generator=seeded(7))
    again = synthesizer(x0, foreground, generator=seeded(7))
    other = synthesizer(x0, foreground, generator=seeded(8))
    for name in ("noise", "mask", "sim_mask"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert not torch.equal(first.mask, other.mask)
    assert not torch.equal(first.noise, other.noise)


def test_sources_are_bank_textures_or_the_image_itself_half_each():
    size = 16
    bank = torch.randint(0, 256, (5, 3, size, size), dtype=torch.uint8, generator=seeded(9))
    x0 = signed_images(200, size)
    sources, from_texture = AnomalySynthesizer(size, bank).draw_sources(x0, seeded(10))
    assert 0.4 < from_texture.float().mean() < 0.6
    own = ((x0 + 1) * 127.5).round()
    assert torch.equal(sources[~from_texture], own[~from_texture])
    matches_bank = (sources[from_texture][:, None] == bank.float()[None]).flatten(2).all(-1).any(-1)
    assert matches_bank.all()


def test_bank_of_another_size_is_resized_per_batch():
    bank = torch.full((2, 3, 8, 8), 200, dtype=torch.uint8)
    sources, from_texture = AnomalySynthesizer(16, bank).draw_sources(signed_images(40, 16), seeded(11))
    assert sources.shape == (40, 3, 16, 16)
    assert torch.allclose(sources[from_texture], torch.tensor(200.0), atol=1e-3)


def test_rotate_magnifies_about_the_centre():
    ramp = torch.arange(8.0).expand(2, 3, 8, 8)  # value = column
    magnified = rotate(ramp, torch.zeros(2), magnify=torch.tensor([2.0, 0.5]), padding="reflection")
    centre = 3.5
    assert torch.allclose(magnified[0, 0, 0], centre + (torch.arange(8.0) - centre) / 2, atol=1e-5)
    shrunk = magnified[1, 0, 0]  # twice the slope, mirrored back into the image at the edges
    assert torch.allclose(shrunk[2:6], centre + (torch.arange(2.0, 6.0) - centre) * 2, atol=1e-5)
    assert shrunk.min() >= 0 and shrunk.max() <= 7


def test_subtle_appearance_is_a_bounded_colour_shift_or_a_resampled_copy():
    # a flat grey image: a resampled copy stays flat and the same colour; a shift moves every pixel alike
    grey = torch.full((400, 3, 16, 16), 128.0)
    subtle = subtle_appearance(grey, seeded(20))
    assert subtle.shape == grey.shape
    offsets = (subtle - grey).flatten(2)
    assert torch.allclose(offsets, offsets[..., :1], atol=1e-3)  # one offset per image and channel
    lengths = offsets[..., 0].norm(dim=1)
    resampled = lengths < 1e-3
    assert 0.4 < resampled.float().mean() < 0.6
    low, high = SUBTLE_SHIFT
    assert (lengths[~resampled] > low - 1e-3).all() and (lengths[~resampled] < high + 1e-3).all()
    directions = offsets[~resampled, :, 0] / lengths[~resampled, None]
    assert (directions > 0).any(0).all() and (directions < 0).any(0).all()  # every channel, either way

    # a striped image (levels 60-180, so no shift clips): the resampled copies are not a uniform shift
    stripes = (60 + torch.arange(16.0) % 4 * 40).expand(50, 3, 16, 16).clone()
    subtle = subtle_appearance(stripes, seeded(21))
    assert subtle.min() >= 0 and subtle.max() <= 255
    changed = (subtle - stripes).flatten(2)
    is_shift = torch.isclose(changed, changed[..., :1], atol=1e-3).flatten(1).all(1)
    assert (~is_shift).any() and is_shift.any()
    assert torch.equal(subtle_appearance(stripes, seeded(21)), subtle)


def test_subtle_share_replaces_that_share_of_appearances_and_leaves_the_others_as_drawn():
    size, count = 16, 300
    flat = torch.full((count, 3, size, size), 0.2)
    paper = AnomalySynthesizer(size).appearance(flat, seeded(22))
    mixed = AnomalySynthesizer(size, subtle_share=0.5).appearance(flat, seeded(22))
    # the subtle draws come after the paper's: the samples that changed are the subtle share, and on a flat
    # image a subtle appearance is flat, within SUBTLE_SHIFT levels of the image's colour
    changed = (mixed != paper).flatten(1).any(1)
    assert 0.4 < changed.float().mean() < 0.6
    offsets = ((mixed[changed] - flat[changed]) * 127.5).flatten(2)
    assert torch.allclose(offsets, offsets[..., :1], atol=0.05)
    assert (offsets[..., 0].norm(dim=1) <= SUBTLE_SHIFT[1] + 0.5).all()
    with pytest.raises(ValueError, match="subtle_share=1.5"):
        AnomalySynthesizer(size, subtle_share=1.5)


def test_synthesizer_rejects_bad_sizes():
    with pytest.raises(InputError, match="image size 20"):
        AnomalySynthesizer(20)
    with pytest.raises(ValueError, match="expected x0"):
        AnomalySynthesizer(16)(signed_images(2, 32), torch.ones(2, 1, 32, 32))


# ------------------------------------------------------------------------------------------------ structure


def test_grid_shuffle_permutes_cells():
    images = torch.rand(3, 3, 32, 32, generator=seeded(12))
    shuffled = grid_shuffle(images, cells=8, generator=seeded(13))

    def cells(batch: torch.Tensor) -> torch.Tensor:  # (B, 64, 3*4*4), one row per cell
        return batch.reshape(3, 3, 8, 4, 8, 4).permute(0, 2, 4, 1, 3, 5).reshape(3, 64, -1)

    before, after = cells(images), cells(shuffled)
    for sample in range(3):
        assert torch.equal(torch.sort(before[sample], 0).values, torch.sort(after[sample], 0).values)
        order = torch.cdist(after[sample], before[sample]).argmin(1)  # where each output cell came from
        assert sorted(order.tolist()) == list(range(64))
        assert not torch.equal(order, torch.arange(64))
    same = grid_shuffle(images[:1].expand(2, -1, -1, -1), generator=seeded(13))
    assert not torch.equal(same[0], same[1])  # a fresh permutation per image
    with pytest.raises(ValueError, match="divisible by 8"):
        grid_shuffle(torch.zeros(1, 3, 20, 20))


# ------------------------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("op", AUGMENTATIONS, ids=lambda op: op.__name__)
def test_each_augmentation_keeps_shape_and_range(op):
    images = torch.rand(6, 3, 16, 16, generator=seeded(14)) * 255
    images[0] = 0  # flat channels: black, white
    images[1] = 255
    out = op(images, seeded(15))
    assert out.shape == images.shape
    assert torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 255


def test_augmentation_semantics():
    low_contrast = 100 + torch.rand(4, 3, 32, 32, generator=seeded(16)) * 50  # PIL equalize needs > 255 px
    assert torch.equal(invert(low_contrast), 255 - low_contrast)
    # PIL autocontrast / equalize stretch every channel to the full range
    for stretched in (autocontrast(low_contrast, seeded(17)), equalize(low_contrast, seeded(17))):
        assert torch.allclose(stretched.amin((2, 3)), torch.tensor(0.0), atol=1e-3)
        assert torch.allclose(stretched.amax((2, 3)), torch.tensor(255.0), atol=1.0)
    levels = low_contrast.round()
    posterized = posterize(low_contrast, seeded(18))
    assert torch.equal(posterized, posterized.round())
    assert ((levels - posterized) >= 0).all() and ((levels - posterized) < 128).all()
    solarized = solarize(low_contrast, seeded(19))
    assert ((solarized == low_contrast) | (solarized == 255 - low_contrast)).all()
    # gamma keeps black and white fixed
    extremes = torch.tensor([0.0, 255.0]).view(1, 1, 1, 2).expand(2, 3, 1, 2)
    assert torch.allclose(gamma_contrast(extremes, seeded(20)), extremes)
    # hue/saturation shifts keep the HSV value max(R, G, B)
    shifted = hue_saturation(low_contrast, seeded(21))
    assert torch.allclose(shifted.amax(1), low_contrast.amax(1), atol=1e-3)
    # brightness moves all three channels together (chroma kept) while nothing clips
    brighter = brightness(low_contrast, seeded(22))
    assert torch.allclose(brighter[:, 0] - brighter[:, 1], low_contrast[:, 0] - low_contrast[:, 1], atol=1e-3)
    flat = torch.full((2, 3, 8, 8), 77.0)
    assert torch.allclose(sharpness(flat, seeded(23)), flat)


def test_augment_is_seeded_and_changes_images():
    images = torch.rand(8, 3, 16, 16, generator=seeded(24)) * 255
    out = augment(images, seeded(25))
    assert torch.equal(out, augment(images, seeded(25)))
    assert out.min() >= 0 and out.max() <= 255
    assert not torch.allclose(out, images)


# ------------------------------------------------------------------------------------------- texture bank


def write_jpg(path: Path, colour: tuple[int, int, int], size: int = 24) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, quality=95)


def test_load_texture_bank_reads_dtd_layout_sorted(tmp_path):
    colours = {
        "banded/b_1.jpg": (200, 20, 20),
        "banded/b_2.jpg": (20, 200, 20),
        "dotted/d_1.jpg": (20, 20, 200),
    }
    for name, colour in colours.items():
        write_jpg(tmp_path / name, colour)
    (tmp_path / "dotted" / "notes.txt").write_text("not an image")

    bank = load_texture_bank(tmp_path, 8)
    assert bank.dtype == torch.uint8 and bank.shape == (3, 3, 8, 8)
    expected = torch.tensor(list(colours.values())).view(3, 3, 1, 1).float()
    assert (bank.float() - expected).abs().max() <= 4  # JPEG of a flat colour is nearly exact

    limited = load_texture_bank(tmp_path, 8, limit=2)  # evenly spread: first and last
    assert torch.equal(limited, bank[[0, 2]])


def test_load_texture_bank_errors_name_the_flag_and_path(tmp_path):
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(InputError, match="--texture-root") as error:
        load_texture_bank(tmp_path, 8)
    assert str(tmp_path) in str(error.value)
    with pytest.raises(InputError, match="missing"):
        load_texture_bank(tmp_path / "missing", 8)


# ------------------------------------------------------------------------------------------------ foreground


def test_texture_categories_use_the_whole_image():
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    fg, source = foreground_masks(
        images, is_texture=True, fg_root=None, category="carpet", image_ids=["a", "b"]
    )
    assert source == "whole image"
    assert fg.dtype == bool and fg.shape == (2, 8, 8) and fg.all()


def test_foreground_from_folder_is_matched_by_stem_and_dilated(tmp_path):
    folder = tmp_path / "bottle" / "train" / "good"
    folder.mkdir(parents=True)
    for stem, corner in (("000", 4), ("001", 8)):
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[corner : corner + 4, corner : corner + 4] = 255
        Image.fromarray(mask).save(folder / f"{stem}.png")
    images = np.zeros((2, 16, 16, 3), dtype=np.uint8)  # half the mask files' size
    ids = ["train/good/001", "train/good/000"]
    fg, source = foreground_masks(
        images, is_texture=False, fg_root=tmp_path, category="bottle", image_ids=ids
    )
    assert source == "folder"
    expected = np.zeros((16, 16), dtype=bool)
    expected[2:8, 2:8] = True  # the 2x2 square at (4,4) after resizing, dilated by 2 px on every side
    assert np.array_equal(fg[0], expected)
    assert np.array_equal(fg[1], np.roll(expected, (-2, -2), axis=(0, 1)))

    with pytest.raises(InputError, match="002.png"):
        foreground_masks(
            images,
            is_texture=False,
            fg_root=tmp_path,
            category="bottle",
            image_ids=["train/good/000", "train/good/002"],
        )


def test_estimated_foreground_finds_a_bright_disk_and_falls_back_on_clutter():
    size, radius = 64, 12
    rows, cols = np.mgrid[:size, :size]
    distance = np.hypot(rows - 30, cols - 34)
    rng = np.random.default_rng(0)
    disk = np.where(distance[..., None] <= radius, 210, 25) + rng.integers(-6, 7, (size, size, 3))
    clutter = rng.integers(0, 256, (size, size, 3))  # no plain background to find
    images = np.stack([disk, clutter]).astype(np.uint8)

    fg, source = foreground_masks(images, is_texture=False, fg_root=None, category="x", image_ids=["a", "b"])
    assert source == "estimated"
    assert fg[0][distance <= radius].all()
    assert fg[0][(distance > radius) & (distance <= radius + 1.5)].all()  # dilated
    assert not fg[0][distance > radius + math.hypot(2, 2) + 1].any()
    assert fg[1].all()
