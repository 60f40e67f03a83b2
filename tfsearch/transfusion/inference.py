"""Inference (method.md §7): the reverse transparency process on batches of test images.

Per image, starting from the image itself and an empty mask, the network runs at t = T−2 … 1 (18 calls for
T = 20). Each step removes the predicted anomaly inside the thresholded mask. The raw maps are
M_disc = Σ σ(ℓ_t) / (T−1), with the original's divisor T−1 although T−2 maps are summed, and
M_recon = the channel mean of (I − R)², both in [0,1], with R the final reconstruction clipped to [0,1].
λ and the mean filter are applied later by `tfsearch.maps.fusion.fuse`, on cached maps.
"""

from __future__ import annotations

import numpy as np
import torch

from tfsearch.transfusion.transparency import TransparencyProcess
from tfsearch.transfusion.unet import TransFusionUNet


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0,255] → float [−1,1], the network's input range."""
    return images.float() / 127.5 - 1.0


@torch.no_grad()
def reverse_process(
    model: TransFusionUNet, process: TransparencyProcess, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """M_disc and M_recon, each (B,H,W), for a batch of images in [−1,1] already on the model's device."""
    batch = images.shape[0]
    x = images
    mask = torch.zeros_like(images[:, :1])
    total = torch.zeros_like(mask)
    for step in process.inference_timesteps():
        t = torch.full((batch,), step, device=images.device, dtype=torch.long)
        output = model(x, mask, t)
        prob = torch.sigmoid(output.mask_logits.float())
        x = process.step(x, prob, output.anomaly.float(), output.normal.float(), t)
        total += prob
        mask = (prob > 0.5).to(images.dtype)
    m_disc = total[:, 0] / (process.steps - 1)
    original = images / 2 + 0.5
    reconstruction = (x / 2 + 0.5).clamp(0, 1)
    m_recon = ((original - reconstruction) ** 2).mean(dim=1)
    return m_disc, m_recon


def anomaly_maps(
    model: TransFusionUNet,
    process: TransparencyProcess,
    images: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> tuple[np.ndarray, np.ndarray]:
    """Raw maps of a whole image set (uint8 (N,3,H,W), any device), computed `batch_size` images at a time."""
    was_training = model.training
    model.eval()
    disc, recon = [], []
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            for begin in range(0, images.shape[0], batch_size):
                chunk = to_signed(images[begin : begin + batch_size].to(device))
                m_disc, m_recon = reverse_process(model, process, chunk)
                disc.append(m_disc.float().cpu().numpy())
                recon.append(m_recon.float().cpu().numpy())
    finally:
        model.train(was_training)
    size = images.shape[-2:]
    empty = np.zeros((0, *size), dtype=np.float32)
    return (np.concatenate(disc) if disc else empty), (np.concatenate(recon) if recon else empty)
