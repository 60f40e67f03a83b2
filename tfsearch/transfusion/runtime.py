"""How a job runs on a device: the device, the network's precision, loader threads. None of it changes the
result on a given device, so none of it is part of the job."""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass

import torch

from tfsearch.errors import InputError
from tfsearch.transfusion.profiles import Profile

# tf32: fp32 weights and activations, matrix products and convolutions in TensorFloat-32 on CUDA (exactly
# fp32 elsewhere: `use_tf32`); bf16: the network autocast to bfloat16
PRECISIONS = ("auto", "fp32", "tf32", "bf16")
# the C++ compilers TorchInductor looks for when $CXX names none
CXX_COMPILERS = ("g++", "c++", "clang++")
# oneDNN's ISA limits (`ONEDNN_MAX_CPU_ISA`) below AVX512_CORE_BF16: no native bfloat16 compute under them
ISAS_WITHOUT_BF16 = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
)


@dataclass(frozen=True)
class Runtime:
    """How a job runs; none of it changes the result on a given device."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (as `Profile.bf16` says) | fp32 | tf32 | bf16 (autocast the network)
    loader_workers: int = 0  # threads that decode images once at start
    progress: bool = True
    channels_last: bool = False  # NHWC convolutions: faster with bf16 on recent CPUs and on GPUs
    compile: bool = False  # torch.compile the network (same losses within a stated tolerance)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"--device {self.device}: CUDA is not available on this machine")
        return device

    def network_precision(self, profile: Profile, device: torch.device) -> str:
        """fp32, tf32 or bf16: as asked, or with `auto` bf16 where the profile asks for it and the device
        computes bfloat16 natively (emulated, it is slower than fp32)."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if profile.bf16 and native_bf16(device) else "fp32"

    def compile_check(self, device: torch.device) -> None:
        """With `compile`, InputError before any training where TorchInductor cannot build kernels: it
        compiles C++ for a CPU and Triton kernels (whose launcher is C) for a GPU."""
        if not self.compile:
            return
        if device.type == "cuda" and importlib.util.find_spec("triton") is None:
            raise InputError("--compile on a GPU needs the triton package, which is not installed")
        named = os.environ.get("CXX")
        candidates = (named,) if named else CXX_COMPILERS
        if not any(shutil.which(name) for name in candidates):
            raise InputError(
                f"--compile needs a C++ compiler ({' or '.join(candidates)}) on the PATH, and there is none: "
                "install one (e.g. apt-get install g++) or train without --compile"
            )


def use_tf32(precision: str, device: torch.device) -> None:
    """TensorFloat-32 matrix products and convolutions on CUDA for `tf32` (process-wide flags, as torch keeps
    them); the other precisions keep torch's defaults, under which cuDNN convolutions may already use TF32."""
    if precision == "tf32" and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively: a CUDA GPU that supports it, a CPU with AVX512-BF16 or
    AMX that oneDNN may use (`ONEDNN_MAX_CPU_ISA` below them makes the CPU compute as one without them, and
    torch's probes read the CPU, not that limit)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() in ISAS_WITHOUT_BF16:
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own probes
    return device.type == "cpu" and any(getattr(torch.cpu, check, lambda: False)() for check in checks)
