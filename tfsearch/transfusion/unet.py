"""The TransFusion network: a time-conditioned ResUNet with three heads (method.md §4).

The network knows nothing of the transparency schedule; it maps (x_t, previous mask, t) to the anomaly
appearance, the normal appearance and the mask logits. `transparency.py` owns everything about β.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tfsearch.transfusion.profiles import Profile


@dataclass
class UNetOutput:
    anomaly: torch.Tensor  # ê: predicted β_t·(M⊙A), (B,3,H,W)
    normal: torch.Tensor  # n̂: predicted normal appearance, (B,3,H,W)
    mask_logits: torch.Tensor  # ℓ: anomaly-mask logits, (B,1,H,W); the sigmoid is applied by the caller


class TimeEmbedding(nn.Module):
    """Sinusoidal features of the timestep index t followed by a two-layer MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        half = dim // 8
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.float()[:, None] * self.freqs[None]
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1))


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, time_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.shortcut(x)


class Attention(nn.Module):
    """Single-head self-attention over all positions, without a normalisation layer (as in the original).

    Inference uses `scaled_dot_product_attention`, which never materialises the (HW)² score matrix on
    backends with a fused kernel: that makes 4096-token attention affordable in memory. Training does not:
    without a normalisation layer the logits grow with training (past 10⁸ after 340 epochs of a 64 px,
    16-channel network at lr 5e-4), and the fused kernels' backward pass, which recomputes the softmax from
    the logits and a saved log-sum-exp, then returns NaN gradients. There the softmax is computed in float32
    from the scores (`attention`), under activation checkpointing, so that only q, k and v are kept for the
    backward pass, as with the fused kernels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(tokens).unsqueeze(1).chunk(3, dim=-1)  # each (B, 1, HW, C)
        if torch.is_grad_enabled():
            attended = checkpoint(attention, q, k, v, use_reentrant=False)
        else:
            attended = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(attended.squeeze(1)).transpose(1, 2).reshape(b, c, h, w)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√C)·v with the softmax in float32: finite gradients at any size of the logits."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores.float().softmax(dim=-1).to(v.dtype) @ v


class Stage(nn.Module):
    """A residual block optionally followed by attention: the unit of both encoder and decoder."""

    def __init__(self, c_in: int, c_out: int, time_dim: int, groups: int, attend: bool) -> None:
        super().__init__()
        self.res = ResidualBlock(c_in, c_out, time_dim, groups)
        self.attn = Attention(c_out) if attend else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, temb)
        return self.attn(x) if self.attn is not None else x


def row_sine(batch: int, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The original's fixed positional channel: sin(row index), constant along each row (method.md §4)."""
    rows = torch.arange(height, device=device, dtype=torch.float32).sin().to(dtype)
    return rows[None, None, :, None].expand(batch, 1, height, width)


class TransFusionUNet(nn.Module):
    """ResUNet with compounding channel multipliers (64/128/256/512 for the paper profile)."""

    def __init__(self, profile: Profile) -> None:
        super().__init__()
        base, tdim, groups = profile.base_channels, profile.time_dim, profile.norm_groups
        levels = len(profile.channel_mults)
        if len(profile.attention) != levels:
            raise ValueError("profile.attention needs one flag per entry of profile.channel_mults")
        self.time_embedding = TimeEmbedding(tdim)
        self.stem = nn.Conv2d(5, base, 3, padding=1)  # x_t (3) + previous mask (1) + positional channel (1)

        self.down = nn.ModuleList()
        widths = [base]  # channel count of every tensor pushed on the skip stack
        width = base
        for level, mult in enumerate(profile.channel_mults):
            out = width * mult
            for _ in range(profile.blocks_per_level):
                self.down.append(Stage(width, out, tdim, groups, profile.attention[level]))
                width = out
                widths.append(width)
            if level < levels - 1:
                self.down.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
                widths.append(width)

        self.middle = nn.ModuleList(
            [
                ResidualBlock(width, width, tdim, groups),
                Attention(width),
                ResidualBlock(width, width, tdim, groups),
            ]
        )

        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            out = width
            for _ in range(profile.blocks_per_level):
                self.up.append(Stage(width + widths.pop(), out, tdim, groups, profile.attention[level]))
            out = width // profile.channel_mults[level]
            self.up.append(Stage(width + widths.pop(), out, tdim, groups, profile.attention[level]))
            width = out
            if level > 0:
                self.up.append(nn.ConvTranspose2d(width, width, 4, stride=2, padding=1))

        head_groups = profile.head_norm_groups
        self.anomaly_head = nn.Sequential(
            nn.GroupNorm(head_groups, width), nn.SiLU(), nn.Conv2d(width, 3, 3, padding=1)
        )
        self.normal_head = nn.Conv2d(width, 3, 3, padding=1)
        self.mask_head = nn.Sequential(nn.BatchNorm2d(width), nn.SiLU(), nn.Conv2d(width, 1, 3, padding=1))

    def forward(self, x_t: torch.Tensor, previous_mask: torch.Tensor, t: torch.Tensor) -> UNetOutput:
        b, _, h, w = x_t.shape
        temb = self.time_embedding(t)
        x = torch.cat([x_t, previous_mask.to(x_t.dtype), row_sine(b, h, w, x_t.device, x_t.dtype)], dim=1)
        x = self.stem(x)
        skips = [x]
        for module in self.down:
            x = module(x, temb) if isinstance(module, Stage) else module(x)
            skips.append(x)
        x = self.middle[2](self.middle[1](self.middle[0](x, temb)), temb)
        for module in self.up:
            x = module(torch.cat([x, skips.pop()], dim=1), temb) if isinstance(module, Stage) else module(x)
        return UNetOutput(self.anomaly_head(x), self.normal_head(x), self.mask_head(x))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
