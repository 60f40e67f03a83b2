"""The transparency diffusion process (method.md §2, §3, §6.2): schedule, forward composition, reverse
step, training targets and the training loss.

An image is a normal appearance N with an anomaly appearance A laid over the mask M at opacity β:
x_t = N + β_t·M⊙(A − N). The schedule runs β_0 = 0 (normal) … β_{T−1} = 1 (fully opaque). The network's
anomaly head predicts β_t·(M⊙A); the reverse step divides by β_t to recover the appearance it removes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tfsearch.transfusion.unet import UNetOutput


class TransparencyProcess:
    """β schedule with `steps` values, β_k = k / (steps − 1); training uses t ∈ {1, …, steps − 1}."""

    def __init__(self, steps: int = 20) -> None:
        if steps < 3:
            raise ValueError(f"the transparency process needs at least 3 β values, got steps={steps}")
        self.steps = steps
        self.betas = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
        self._on_device: dict[torch.device, torch.Tensor] = {}

    @property
    def last(self) -> int:
        """The fully opaque timestep, whose simulated mask is always zero during training."""
        return self.steps - 1

    def inference_timesteps(self) -> range:
        """t = T−2 … 1, as in the original: the fully opaque state t = T−1 is never evaluated at test time."""
        return range(self.steps - 2, 0, -1)

    def beta(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """β_t shaped (B,1,1,1) in the dtype and device of `like`; the schedule is copied to a device once (a
        copy from the host each step would wait for the device)."""
        if like.device not in self._on_device:
            self._on_device[like.device] = self.betas.to(like.device)
        return self._on_device[like.device][t].to(like.dtype).view(-1, 1, 1, 1)

    def sample_timesteps(self, batch: int, device: torch.device, generator: torch.Generator | None = None):
        return torch.randint(1, self.steps, (batch,), device=device, generator=generator)

    def compose(
        self, x0: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Forward process: x_t = x0 + β_t·M⊙(A − x0), with `noise` = M⊙A (zero outside the mask)."""
        return x0 + self.beta(t, x0) * (noise - mask * x0)

    def anomaly_target(self, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the anomaly head learns: β_t·(M⊙A)."""
        return self.beta(t, noise) * noise

    def step(
        self,
        x_t: torch.Tensor,
        mask: torch.Tensor,
        anomaly: torch.Tensor,
        normal: torch.Tensor,
        t: torch.Tensor,
    ) -> torch.Tensor:
        """Reverse step x_{t−1} = x_t − (d/β_t)·M̂⊙ê + d·M̂⊙n̂, with M̂ = 1[mask > 0.5], d = β_t − β_{t−1}.

        `mask` is a probability (σ of the logits) or the true binary mask; thresholding stops its gradient.
        """
        beta_t = self.beta(t, x_t)
        d = beta_t - self.beta(t - 1, x_t)
        hard = (mask > 0.5).to(x_t.dtype)
        return x_t - (d / beta_t) * hard * anomaly + d * hard * normal


@dataclass
class LossTerms:
    total: torch.Tensor
    anomaly: torch.Tensor
    mask: torch.Tensor
    normal: torch.Tensor
    step: torch.Tensor

    def detached(self) -> dict[str, torch.Tensor]:
        """The terms as 0-dim tensors outside the graph, left on the device (reading them waits for it)."""
        return {name: getattr(self, name).detach() for name in ("total", "anomaly", "mask", "normal", "step")}


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0):
    """Per-pixel focal loss of Lin et al. on sigmoid outputs (no reduction)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return alpha_t * ce * (1 - p_t) ** gamma


def _gaussian_window(size: int, sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=like.device) - size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).to(like.dtype)


def ssim(
    prediction: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Mean SSIM with a Gaussian window and zero padding; the dynamic range L is read off the prediction
    (1 or 2 in practice), as the original does (method.md §6.2), on the device: the constants are chosen
    with `torch.where`, so no value is read back to the host."""
    low, high = torch.aminmax(prediction.detach())
    dynamic_range = torch.where(high > 128, 255.0, 1.0) - torch.where(low < -0.5, -1.0, 0.0)
    c1, c2 = (((factor * dynamic_range.double()) ** 2).to(prediction.dtype) for factor in (0.01, 0.03))
    channels = prediction.shape[1]
    kernel = _gaussian_window(window, sigma, channels, prediction)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, padding=window // 2, groups=channels)

    mu_p, mu_t = blur(prediction), blur(target)
    var_p = blur(prediction * prediction) - mu_p**2
    var_t = blur(target * target) - mu_t**2
    cov = blur(prediction * target) - mu_p * mu_t
    ssim_map = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return ssim_map.mean()


def training_loss(
    process: TransparencyProcess,
    output: UNetOutput,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    mask: torch.Tensor,
    t: torch.Tensor,
    focal_weight: float = 5.0,
) -> LossTerms:
    """L = MSE(ê, β_t·ε) + 5·Focal(ℓ, M) + SmoothL1(σℓ, M) + (1 − SSIM(n̂, x0)) + L1(n̂, x0) + L_step."""
    output = UNetOutput(output.anomaly.float(), output.normal.float(), output.mask_logits.float())
    anomaly_target = process.anomaly_target(noise, t)
    mask_prob = torch.sigmoid(output.mask_logits)

    loss_anomaly = F.mse_loss(output.anomaly, anomaly_target)
    loss_mask = focal_weight * sigmoid_focal_loss(output.mask_logits, mask).mean() + F.smooth_l1_loss(
        mask_prob, mask
    )
    loss_normal = (1 - ssim(output.normal, x0)) + F.l1_loss(output.normal, x0)
    predicted_step = process.step(x_t, mask_prob, output.anomaly, output.normal, t)
    true_step = process.step(x_t, mask, anomaly_target, x0, t)
    loss_step = F.mse_loss(predicted_step, true_step)
    total = loss_anomaly + loss_mask + loss_normal + loss_step
    return LossTerms(total, loss_anomaly, loss_mask, loss_normal, loss_step)
