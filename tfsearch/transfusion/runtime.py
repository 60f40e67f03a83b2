"""How a job runs on a device: the device, the network's precision, loader threads. None of it changes the
result on a given device, so none of it is part of the job."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tfsearch.errors import InputError
from tfsearch.transfusion.profiles import Profile

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Runtime:
    """How a job runs; none of it changes the result on a given device."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (as `Profile.bf16` says) | fp32 | bf16 (autocast the network)
    loader_workers: int = 0  # threads that decode images once at start
    progress: bool = True
    channels_last: bool = False  # NHWC convolutions: faster with bf16 on recent CPUs and on GPUs

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"--device {self.device}: CUDA is not available on this machine")
        return device

    def network_precision(self, profile: Profile, device: torch.device) -> str:
        """fp32 or bf16: as asked, or with `auto` bf16 where the profile asks for it and the device computes
        bfloat16 natively (emulated, it is slower than fp32)."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if profile.bf16 and native_bf16(device) else "fp32"


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively: a CUDA GPU that supports it, a CPU with AVX512-BF16 or
    AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own probes
    return device.type == "cpu" and any(getattr(torch.cpu, check, lambda: False)() for check in checks)
