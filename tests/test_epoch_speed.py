"""Cheaper training steps with the same mathematics: no value read back to the host inside a step (the
sync-free formulations equal the branchy ones they replace), loss rows read once per epoch, TF32 exactly
fp32 on the CPU, and `--compile` equal to eager training within float rounding, with plain checkpoints."""

import dataclasses
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from test_train import QUIET, tiny_job

from tfsearch.cli import main
from tfsearch.errors import InputError
from tfsearch.transfusion.augment import (
    AUGMENTATIONS,
    OPS_PER_IMAGE,
    augment,
    augment_masked,
    rotate,
    rotate_where,
)
from tfsearch.transfusion.runtime import CXX_COMPILERS, Runtime
from tfsearch.transfusion.trainer import Trainer, to_signed
from tfsearch.transfusion.transparency import _gaussian_window, ssim
from tfsearch.transfusion.unet import TransFusionUNet

COMPILER = os.environ.get("CXX") or next((name for name in CXX_COMPILERS if shutil.which(name)), None)
needs_compiler = pytest.mark.skipif(
    COMPILER is None or shutil.which(COMPILER) is None,
    reason=f"--compile needs a C++ compiler for TorchInductor; none of {CXX_COMPILERS} is on the PATH",
)
# the losses of compiled and eager training agree to this relative tolerance: Inductor fuses and reorders
# float32 arithmetic (convolution epilogues, GroupNorm, the loss means), so the last bits differ from the
# first step on and the difference grows through the optimiser steps; observed on an AMD EPYC (AVX512):
# at most 3.3e-7 over 4 steps of this job, so 1e-5 leaves a margin of 30
COMPILE_RTOL = 1e-5


def branchy_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The formulation `augment` replaced: each op on the boolean-indexed images that drew it."""
    drawn = torch.rand(images.shape[0], len(AUGMENTATIONS), generator=generator)
    order = drawn.argsort(1)[:, :OPS_PER_IMAGE]
    result = images.float().clone()
    for position in range(OPS_PER_IMAGE):
        for index, op in enumerate(AUGMENTATIONS):
            chosen = order[:, position] == index
            if chosen.any():
                result[chosen] = op(result[chosen], generator)
    return result


def batch_images(count: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(count, 3, size, size, generator=generator) * 255).round()


def test_augment_on_the_cpu_equals_the_branchy_formulation_bit_for_bit():
    images = batch_images()
    expected = branchy_augment(images, torch.Generator().manual_seed(5))
    assert torch.equal(augment(images, torch.Generator().manual_seed(5)), expected)


def test_masked_augment_applies_each_image_its_own_ops_with_whole_batch_draws():
    """The accelerator's formulation, run here on the CPU: each op draws for the whole batch and each image
    keeps the results of its own ops, in its drawn order: the same as boolean-indexing each op's output."""
    images = batch_images()
    generator = torch.Generator().manual_seed(7)
    order = torch.rand(images.shape[0], len(AUGMENTATIONS), generator=generator).argsort(1)[:, :OPS_PER_IMAGE]
    state = generator.get_state()
    expected = images.clone()
    for position in range(OPS_PER_IMAGE):
        for index, op in enumerate(AUGMENTATIONS):
            chosen = order[:, position] == index
            expected[chosen] = op(expected, generator)[chosen]
    generator.set_state(state)
    result = augment_masked(images.clone(), order, generator)
    assert torch.equal(result, expected)
    assert not torch.equal(result, images) and result.min() >= 0 and result.max() <= 255


@pytest.mark.parametrize("chosen", [[True, False, True, False, False, True], [False] * 6, [True] * 6])
def test_rotate_where_equals_rotating_the_chosen_images_only(chosen):
    images = batch_images(seed=1)
    chosen = torch.tensor(chosen)
    degrees = torch.tensor([12.0, -7.5, 20.0, 3.0, -19.0, 8.0])
    expected = images.clone()
    if chosen.any():
        expected[chosen] = rotate(images[chosen], degrees[chosen], mode="nearest")
    result = rotate_where(images, chosen, degrees, mode="nearest")
    assert torch.equal(result, expected)
    assert torch.equal(result[~chosen], images[~chosen])  # no rotation by an unchosen image's angle


@pytest.mark.parametrize("scale", [(0.0, 1.0), (-1.0, 1.0), (0.0, 255.0)])
def test_ssim_on_the_device_equals_the_host_formulation(scale):
    """The dynamic range chosen with torch.where gives the SSIM the host-read range gave, bit for bit."""
    generator = torch.Generator().manual_seed(2)
    low, high = scale
    prediction = low + (high - low) * torch.rand(2, 3, 32, 32, generator=generator)
    target = low + (high - low) * torch.rand(2, 3, 32, 32, generator=generator)

    low_value, high_value = (float(v) for v in torch.aminmax(prediction))
    dynamic_range = (255.0 if high_value > 128 else 1.0) - (-1.0 if low_value < -0.5 else 0.0)
    c1, c2 = (0.01 * dynamic_range) ** 2, (0.03 * dynamic_range) ** 2
    kernel = _gaussian_window(11, 1.5, 3, prediction)

    def blur(x):
        return F.conv2d(x, kernel, padding=5, groups=3)

    mu_p, mu_t = blur(prediction), blur(target)
    var_p, var_t = blur(prediction * prediction) - mu_p**2, blur(target * target) - mu_t**2
    cov = blur(prediction * target) - mu_p * mu_t
    expected = (
        ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    ).mean()
    assert torch.equal(ssim(prediction, target), expected)


def test_steps_return_device_tensors_and_the_epoch_row_is_their_mean(demo_dataset_root, tmp_path):
    """A step hands back 0-dim tensors (nothing read to the host); the epoch's row equals the per-step floats
    summed on the host, as the rows were computed before."""
    trainer = Trainer(tiny_job(demo_dataset_root), tmp_path / "run", QUIET)
    steps = []
    train_step = trainer.train_step

    def recording(x0, foreground):
        terms = train_step(x0, foreground)
        steps.append(terms)
        return terms

    trainer.train_step = recording
    row = trainer.train_epoch()
    assert steps and all(
        isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad
        for terms in steps
        for value in terms.values()
    )
    for name in ("total", "anomaly", "mask", "normal", "step"):
        host_sum = 0.0
        for terms in steps:
            host_sum += float(terms[name])
        assert row[f"loss_{name}"] == pytest.approx(host_sum / len(steps), rel=1e-12, abs=0)


def steps_losses(trainer: Trainer, steps: int) -> torch.Tensor:
    data = trainer._ensure_data()
    losses = []
    for step in range(steps):
        index = torch.arange(step * 8, (step + 1) * 8) % data.train_images.shape[0]
        terms = trainer.train_step(to_signed(data.train_images[index]), data.foreground[index])
        losses.append(torch.stack(list(terms.values())))
    return torch.stack(losses)


def test_tf32_is_exactly_fp32_on_the_cpu(demo_dataset_root, tmp_path):
    job = tiny_job(demo_dataset_root)
    fp32 = Trainer(job, tmp_path / "a", Runtime(device="cpu", precision="fp32", progress=False))
    tf32 = Trainer(job, tmp_path / "b", Runtime(device="cpu", precision="tf32", progress=False))
    assert torch.equal(steps_losses(fp32, 2), steps_losses(tf32, 2))


def test_compile_without_a_compiler_is_refused_before_training(
    demo_dataset_root, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(InputError, match=r"--compile needs a C\+\+ compiler \(g\+\+ or c\+\+ or clang\+\+\)"):
        Trainer(tiny_job(demo_dataset_root), tmp_path / "run", Runtime(device="cpu", compile=True))
    out = tmp_path / "cli"
    args = ["train", "--dataset", "demo", "--data-root", str(demo_dataset_root), "--category", "stripes"]
    assert main([*args, "--profile", "cpu", "--out", str(out), "--quiet", "--compile"]) == 2
    assert "--compile needs a C++ compiler" in capsys.readouterr().err
    assert not (out / "job.json").exists()
    # `tfsearch run` names it before Ray starts or anything is written, not inside each trial
    runs = tmp_path / "runs"
    argv = ["run", "--dataset", "demo", "--data-root", str(demo_dataset_root), "--profile", "cpu"]
    assert main([*argv, "--runs-root", str(runs), "--compile", "--wandb", "disabled", "--quiet"]) == 2
    assert "--compile needs a C++ compiler" in capsys.readouterr().err
    assert not runs.exists()


@needs_compiler
def test_compiled_training_equals_eager_within_rounding_and_saves_plain_weights(demo_dataset_root, tmp_path):
    # two levels of one block each: Inductor compiles every kernel of the network's forward and backward
    # pass with g++ first, minutes for the tests' usual four levels on 2 cores, far less for these two
    job = tiny_job(demo_dataset_root)
    job = dataclasses.replace(
        job, profile=job.profile.replace(channel_mults=(1, 2), attention=(False, True), blocks_per_level=1)
    )
    eager = Trainer(job, tmp_path / "eager", QUIET)
    compiled = Trainer(job, tmp_path / "compiled", Runtime(device="cpu", progress=False, compile=True))
    expected, losses = steps_losses(eager, 3), steps_losses(compiled, 3)
    torch.testing.assert_close(losses, expected, rtol=COMPILE_RTOL, atol=0)
    assert torch.equal(eager.generator.get_state(), compiled.generator.get_state())  # the same draws

    state = compiled.state()
    assert not [key for key in state["model"] if key.startswith("_orig_mod.")]
    TransFusionUNet(job.profile).load_state_dict(state["model"])  # the plain module's keys
    compiled.load_state(eager.state())  # a checkpoint of eager training loads into compiled training
    for key, value in eager.model.state_dict().items():
        assert torch.equal(compiled.model.state_dict()[key], value), key
