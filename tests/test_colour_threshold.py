"""The colour-shift probe of bench/colour_threshold.py: its directions and the shift it paints."""

from pathlib import Path

import numpy as np
import pytest

from tfsearch.data.demo_real import TINTS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def probe(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # the bench imports its sibling `bench.patch_gaussian`
    from bench import colour_threshold

    return colour_threshold


def test_colour_axes_put_the_direction_of_most_variation_first(probe):
    rng = np.random.default_rng(0)
    along, across = np.array([2.0, 1.0, -1.0]), np.array([1.0, -1.0, 1.0])
    along, across = along / np.linalg.norm(along), across / np.linalg.norm(across)
    pixels = 120 + rng.normal(0, 20, (4000, 1)) * along + rng.normal(0, 2, (4000, 1)) * across
    axes = probe.colour_axes(pixels.reshape(10, 20, 20, 3))
    assert list(axes) == ["axis 1", "axis 2", "axis 3"]
    assert abs(axes["axis 1"] @ along) > 0.999
    assert abs(axes["axis 2"] @ across) > 0.99
    assert all(abs(np.linalg.norm(axis) - 1) < 1e-9 for axis in axes.values())


def test_directions_are_unit_vectors_and_the_realistic_demo_adds_its_tints(probe):
    images = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3)).astype(np.uint8)
    demo = probe.directions("demo_real", images)
    other = probe.directions("mvtec", images)
    assert set(demo) - set(other) == {f"tint {name}" for name in TINTS}
    assert set(other) == {"axis 1", "axis 2", "axis 3", "darker"}
    assert np.allclose(demo["darker"], -np.ones(3) / np.sqrt(3))
    warm = np.array(TINTS["warm"])
    assert np.allclose(demo["tint warm"], warm / np.linalg.norm(warm))
    assert all(abs(np.linalg.norm(vector) - 1) < 1e-12 for vector in demo.values())


def test_shifted_paints_the_disc_only_rounded_and_clipped(probe):
    images = np.full((2, 4, 4, 3), 250, dtype=np.uint8)
    images[1] = 3
    disc = np.zeros((4, 4), dtype=bool)
    disc[1:3, 1:3] = True
    result = probe.shifted(images, disc, np.array([10.0, -10.0, 0.4]))
    assert result.dtype == np.uint8
    assert (result[:, ~disc] == images[:, ~disc]).all()
    assert (result[0][disc] == [255, 240, 250]).all()  # 260 clipped, 240, 250.4 rounded
    assert (result[1][disc] == [13, 0, 3]).all()  # -7 clipped, 3.4 rounded
