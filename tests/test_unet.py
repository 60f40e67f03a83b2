"""The ResUNet of method.md §4."""

import torch
import torch.nn.functional as F

from tfsearch.transfusion.profiles import get_profile
from tfsearch.transfusion.unet import Attention, TransFusionUNet, count_parameters, row_sine


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


def test_attention_trains_with_finite_gradients_at_huge_logits_and_infers_as_the_fused_kernel():
    # without a normalisation layer the logits grow with training; past ~10⁹ the fused kernels' backward
    # pass returns NaN gradients (a 500-epoch small-profile run got them at 3·10⁸ in bf16)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    layer = Attention(32)
    tokens = torch.randn(4, 32, 16, 16, generator=generator) * 1e5  # logits up to ~2·10¹⁰
    x = tokens.clone().requires_grad_()
    layer(x).square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    fused = tokens.clone().requires_grad_()
    q, k, v = layer.qkv(fused.flatten(2).transpose(1, 2)).unsqueeze(1).chunk(3, dim=-1)
    F.scaled_dot_product_attention(q, k, v).square().sum().backward()
    assert not torch.isfinite(fused.grad).all()  # what training would have got
    # at ordinary sizes training and inference compute the same attention
    x = torch.randn(2, 32, 8, 8, generator=generator)
    with torch.no_grad():
        inferred = layer(x)
    torch.testing.assert_close(layer(x), inferred, rtol=1e-5, atol=1e-5)
