"""The ResUNet of method.md §4."""

import torch

from tfsearch.config import get_profile
from tfsearch.unet import TransFusionUNet, count_parameters, row_sine


def test_paper_profile_has_the_original_parameter_count():
    with torch.device("meta"):
        model = TransFusionUNet(get_profile("paper"))
    assert count_parameters(model) == 54_559_431


def test_cpu_profile_shapes_and_time_conditioning():
    torch.manual_seed(0)
    profile = get_profile("cpu")
    model = TransFusionUNet(profile).eval()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 1, 32, 32)
    out = model(x, mask, torch.tensor([1, 1]))
    assert out.anomaly.shape == (2, 3, 32, 32)
    assert out.normal.shape == (2, 3, 32, 32)
    assert out.mask_logits.shape == (2, 1, 32, 32)
    other_t = model(x, mask, torch.tensor([18, 18]))
    assert not torch.allclose(out.anomaly, other_t.anomaly)
    other_mask = model(x, torch.ones_like(mask), torch.tensor([1, 1]))
    assert not torch.allclose(out.mask_logits, other_mask.mask_logits)


def test_positional_channel_is_the_sine_of_the_row_index():
    pe = row_sine(1, 5, 3, torch.device("cpu"), torch.float32)
    assert pe.shape == (1, 1, 5, 3)
    assert torch.allclose(pe[0, 0, :, 0], torch.sin(torch.arange(5.0)))
    assert torch.equal(pe[0, 0, :, 0], pe[0, 0, :, 2])
