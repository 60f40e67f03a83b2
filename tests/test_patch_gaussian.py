"""The classical baseline of bench/patch_gaussian.py on hand-made images whose answer is known."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tfsearch.errors import InputError

_SPEC = importlib.util.spec_from_file_location(
    "patch_gaussian", Path(__file__).resolve().parents[1] / "bench" / "patch_gaussian.py"
)
patch_gaussian = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(patch_gaussian)


def _noisy_grey(rng: np.random.Generator, count: int, size: int = 24) -> np.ndarray:
    return np.clip(rng.normal(128.0, 6.0, size=(count, size, size, 3)), 0, 255).astype(np.uint8)


def test_patches_are_every_window_in_row_major_order():
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    windows = patch_gaussian.patches(image, 2)
    assert windows.shape == (3 * 4, 3 * 2 * 2)
    # the window at grid row 1, column 2 holds image rows 1-2 and columns 2-3, channel by channel
    expected = image[1:3, 2:4].transpose(2, 0, 1).ravel() / 255.0
    np.testing.assert_allclose(windows[1 * 4 + 2], expected)


def test_a_patch_unlike_the_training_patches_scores_highest():
    rng = np.random.default_rng(0)
    model = patch_gaussian.PatchGaussian(_noisy_grey(rng, 6), patch=3)
    normal, defective = _noisy_grey(rng, 2)
    defective[14:17, 5:8] = (200, 90, 60)  # a reddish 3x3 spot on grey
    normal_map, defect_map = model.anomaly_map(normal), model.anomaly_map(defective)
    assert normal_map.shape == defect_map.shape == (24, 24) and defect_map.dtype == np.float32
    row, col = np.unravel_index(np.argmax(defect_map), defect_map.shape)
    assert 13 <= row <= 17 and 4 <= col <= 8
    assert defect_map.max() > 3 * normal_map.max()
    # far from the spot the two images look alike
    assert abs(float(defect_map[:6, 16:].mean()) - float(normal_map[:6, 16:].mean())) < 1.0


def test_distance_is_zero_at_the_mean_and_grows_with_the_offset():
    rng = np.random.default_rng(1)
    train = _noisy_grey(rng, 4, size=12)
    model = patch_gaussian.PatchGaussian(train, patch=2)
    mean_colour = np.round(model.mean.reshape(3, 4).mean(axis=1) * 255).astype(np.uint8)
    flat = np.broadcast_to(mean_colour, (12, 12, 3)).copy()
    brighter = np.clip(flat.astype(int) + 20, 0, 255).astype(np.uint8)
    assert model.anomaly_map(flat).max() < 0.5
    assert model.anomaly_map(brighter).min() > 2.0


def test_a_patch_larger_than_the_images_is_rejected():
    with pytest.raises(InputError, match="--patch 13 must be between 1 and the image side 12"):
        patch_gaussian.PatchGaussian(np.zeros((2, 12, 12, 3), dtype=np.uint8), patch=13)
