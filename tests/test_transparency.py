"""Identities of the transparency process and the loss (method.md §2, §3, §6.2)."""

import torch

from tfsearch.transfusion.transparency import TransparencyProcess, sigmoid_focal_loss, ssim, training_loss
from tfsearch.transfusion.unet import UNetOutput


def quantities(seed: int = 0, batch: int = 4, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    appearance = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    mask = (torch.rand(batch, 1, size, size, generator=g) > 0.6).float()
    return x0, appearance * mask, mask


def test_schedule_matches_the_original():
    process = TransparencyProcess(20)
    assert process.betas[0] == 0 and process.betas[-1] == 1
    assert torch.allclose(
        process.betas[1:] - process.betas[:-1], torch.full((19,), 1 / 19, dtype=torch.float64)
    )
    assert list(process.inference_timesteps()) == list(range(18, 0, -1))
    t = process.sample_timesteps(10_000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert int(t.min()) == 1 and int(t.max()) == 19


def test_compose_is_the_paper_equation():
    process = TransparencyProcess(20)
    x0, noise, mask = quantities()
    appearance = noise  # equal to A inside the mask, which is all that matters
    t = torch.tensor([1, 5, 10, 19])
    beta = process.betas[t].float().view(-1, 1, 1, 1)
    paper = (1 - mask) * x0 + beta * (mask * appearance) + (1 - beta) * (mask * x0)
    assert torch.allclose(process.compose(x0, noise, mask, t), paper, atol=1e-6)
    # clean samples (M = 0) are unchanged at any t; the fully opaque state shows the anomaly itself
    assert torch.equal(process.compose(x0, torch.zeros_like(x0), torch.zeros_like(mask), t), x0)
    opaque = process.compose(x0, noise, mask, torch.full((4,), 19))
    assert torch.allclose(opaque * mask, noise, atol=1e-6)


def test_reverse_step_on_true_quantities_gives_previous_state():
    process = TransparencyProcess(20)
    x0, noise, mask = quantities(1)
    for step in range(1, 20):
        t = torch.full((4,), step)
        x_t = process.compose(x0, noise, mask, t)
        previous = process.step(x_t, mask, process.anomaly_target(noise, t), x0, t)
        assert torch.allclose(previous, process.compose(x0, noise, mask, t - 1), atol=1e-6)


def test_all_reverse_steps_with_true_mask_recover_x0():
    process = TransparencyProcess(20)
    x0, noise, mask = quantities(2)
    x = process.compose(x0, noise, mask, torch.full((4,), 19))
    for step in range(19, 0, -1):
        t = torch.full((4,), step)
        x = process.step(x, mask, process.anomaly_target(noise, t), x0, t)
    assert torch.allclose(x, x0, atol=1e-5)
    # outside the mask nothing ever changes
    assert torch.equal(x * (1 - mask), x0 * (1 - mask))


def test_step_thresholds_the_mask_probability():
    process = TransparencyProcess(20)
    x0, noise, mask = quantities(3)
    t = torch.full((4,), 7)
    x_t = process.compose(x0, noise, mask, t)
    soft = mask * 0.9 + 0.05  # above 0.5 inside the mask, below outside
    target = process.anomaly_target(noise, t)
    assert torch.equal(process.step(x_t, soft, target, x0, t), process.step(x_t, mask, target, x0, t))


def test_focal_loss_matches_its_definition():
    logits = torch.tensor([2.0, -1.0, 0.5])
    target = torch.tensor([1.0, 0.0, 0.0])
    p = torch.sigmoid(logits)
    expected = torch.stack(
        [
            -0.25 * (1 - p[0]) ** 2 * torch.log(p[0]),
            -0.75 * p[1] ** 2 * torch.log(1 - p[1]),
            -0.75 * p[2] ** 2 * torch.log(1 - p[2]),
        ]
    )
    assert torch.allclose(sigmoid_focal_loss(logits, target), expected, atol=1e-6)


def test_ssim_is_one_for_identical_images_and_lower_otherwise():
    x0, _, _ = quantities(4, size=16)
    assert abs(float(ssim(x0, x0)) - 1) < 1e-5
    assert float(ssim(x0 + 0.3 * torch.randn_like(x0), x0)) < 0.9


def test_perfect_prediction_leaves_only_the_mask_terms():
    process = TransparencyProcess(20)
    x0, noise, mask = quantities(5, size=16)
    t = torch.tensor([3, 8, 12, 19])
    x_t = process.compose(x0, noise, mask, t)
    confident = (mask * 2 - 1) * 20  # logits far on the right side of the true mask
    perfect = UNetOutput(process.anomaly_target(noise, t), x0.clone(), confident)
    terms = training_loss(process, perfect, x_t, x0, noise, mask, t)
    assert float(terms.anomaly) == 0 and float(terms.step) == 0
    assert float(terms.normal) < 1e-5 and float(terms.mask) < 1e-6
    wrong = UNetOutput(torch.zeros_like(noise), torch.zeros_like(x0), -confident)
    assert float(training_loss(process, wrong, x_t, x0, noise, mask, t).total) > 1.0
