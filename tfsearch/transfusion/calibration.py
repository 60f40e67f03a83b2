"""What a profile costs on a device: seconds per training image and per evaluated image, measured.

A run's price (`tfsearch.run.cost`) is its images times these figures, so they are measured on the device and
in the precision a trial would use, with the trainer's own `train_step` (anomaly synthesis, rotation, loss,
backward, optimiser) and the full reverse process of `anomaly_maps`, on synthetic normal images: no dataset
is needed. One untimed warm-up step (allocations, kernels chosen, `torch.compile`) comes first; then at most
`TIMED_STEPS` timed ones, and an inference pass on few enough images to take about `INFERENCE_SECONDS`.

Figures are cached per (device, profile, precision, channels_last, compile, threads), the profile without
the fields of its schedule's length (which change no image's cost), in one JSON file, `calibration.json` in
the folder that holds the generated demos ($TFSEARCH_CACHE, else ~/.cache/tfsearch).

    python -m tfsearch.transfusion.calibration --profile paper --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tfsearch.data.demo import cache_dir
from tfsearch.errors import InputError
from tfsearch.store.atomic import atomic_write_json
from tfsearch.transfusion.inference import anomaly_maps, to_signed
from tfsearch.transfusion.job import TrainJob
from tfsearch.transfusion.profiles import PROFILES, Profile
from tfsearch.transfusion.runtime import PRECISIONS, Runtime, native_bf16
from tfsearch.transfusion.synthesis import AnomalySynthesizer
from tfsearch.transfusion.trainer import Trainer

CACHE_FILE = "calibration.json"
CACHE_VERSION = 1
TIMED_STEPS = 3  # timed training steps after the warm-up; 1 when the warm-up step alone took `SLOW_STEP_S`
SLOW_STEP_S = 20.0
INFERENCE_SECONDS = 10.0  # the inference pass is sized to take about this long (at least one image)
FORWARDS_PER_TRAINING_IMAGE = 3.0  # a training step costs about a forward and a backward (twice a forward)
# profile fields that say how long training lasts, not what an image costs: `--epochs` changes them (and
# `Profile.with_epochs` scales them), and a plan priced at other epochs reads the same entry
SCHEDULE_FIELDS = ("epochs", "lr_step_epochs", "milestone_every")


@dataclass(frozen=True)
class Calibration:
    """Seconds per image of one profile on one device, at the precision a trial would use."""

    device: str  # e.g. "cpu: AMD EPYC, 2 threads, avx512_bf16" or "cuda: NVIDIA H100 80GB HBM3"
    profile: str  # the profile's name
    precision: str  # the network precision used: fp32 | bf16
    train_seconds_per_image: float
    infer_seconds_per_image: float  # one full reverse-process pass, per image


def default_cache() -> Path:
    """The calibration cache beside the generated demos: $TFSEARCH_CACHE, else ~/.cache/tfsearch."""
    return cache_dir() / CACHE_FILE


def device_name(device: torch.device, threads: int) -> str:
    """The device as the cache keys it: a GPU's name, or the CPU's model, its threads and its bf16 support."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    bf16 = ", avx512_bf16" if native_bf16(device) else ""
    return f"cpu: {cpu_model()}, {threads} threads{bf16}"


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (`platform.processor()` where /proc has none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_key(device: str, profile: Profile, precision: str, runtime: Runtime, threads: int) -> str:
    """The entry of a measurement in the cache: everything that changes the figures."""
    fields = {k: v for k, v in profile.to_dict().items() if k not in SCHEDULE_FIELDS}
    return json.dumps(
        {
            "device": device,
            "profile": fields,
            "precision": precision,
            "channels_last": runtime.channels_last,
            "compile": runtime.compile,
            "threads": threads,
        },
        sort_keys=True,
    )


def calibrate(
    profile: Profile,
    runtime: Runtime,
    *,
    threads: int | None = None,
    cache: Path | None | Literal["default"] = "default",
) -> Calibration:
    """The profile's figures on `runtime`'s device with `threads` torch threads (default: the current
    count): read from `cache` (default: `default_cache()`) when measured before, else measured (a few
    seconds, more for a big profile on a CPU) and stored there. `cache=None` measures without caching."""
    found = cached(profile, runtime, threads=threads, cache=cache)
    if found is not None:
        return found
    devices = [runtime.torch_device()] if runtime.torch_device().type == "cuda" else []
    with torch_threads(threads) as used, torch.random.fork_rng(devices=devices):  # the caller's RNG kept
        calibration = measure(profile, runtime, used)
    if devices:  # the trials that follow on this GPU get back what the measurement held
        torch.cuda.empty_cache()
    if cache is not None:
        remember(calibration, profile, runtime, threads=used, cache=cache)
    return calibration


def cached(
    profile: Profile,
    runtime: Runtime,
    *,
    threads: int | None = None,
    cache: Path | None | Literal["default"] = "default",
) -> Calibration | None:
    """The figures `calibrate` would return from `cache` without measuring, or None."""
    if cache is None:
        return None
    device = runtime.torch_device()
    used = threads or torch.get_num_threads()
    precision = runtime.network_precision(profile, device)
    key = cache_key(device_name(device, used), profile, precision, runtime, used)
    entry = read_entries(cache_path(cache)).get(key)
    return Calibration(**entry) if entry is not None else None


def remember(
    calibration: Calibration,
    profile: Profile,
    runtime: Runtime,
    *,
    threads: int,
    cache: Path | Literal["default"] = "default",
) -> None:
    """Store `calibration` (measured here or on another node) in `cache`, written atomically."""
    path = cache_path(cache)
    key = cache_key(calibration.device, profile, calibration.precision, runtime, threads)
    entries = {**read_entries(path), key: dataclasses.asdict(calibration)}
    atomic_write_json(path, {"version": CACHE_VERSION, "entries": entries})


def cache_path(cache: Path | Literal["default"]) -> Path:
    return default_cache() if cache == "default" else Path(cache)


def read_entries(path: Path) -> dict[str, dict]:
    """The cache's entries; an unreadable or foreign file counts as empty (it is only a cache, rewritten)."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(payload, dict) or payload.get("version") != CACHE_VERSION:
        return {}
    entries = payload.get("entries")
    fields = {field.name for field in dataclasses.fields(Calibration)}
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items() if isinstance(v, dict) and set(v) == fields}


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """torch's thread count set to `threads` for the measurement (as a trial sets it), restored after."""
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise InputError(f"threads {threads}: expected a positive number of torch threads")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def measure(profile: Profile, runtime: Runtime, threads: int) -> Calibration:
    """Time the trainer's real training step and the full reverse process on synthetic normal images."""
    job = TrainJob(dataset="demo", category="calibration", profile=profile)
    with tempfile.TemporaryDirectory(prefix="tfsearch-calibration-") as folder:
        trainer = Trainer(job, Path(folder), runtime)  # writes nothing: no start(), no fit()
    device = trainer.device
    trainer.synthesizer = AnomalySynthesizer(profile.image_size, None, profile.subtle_share)
    generator = torch.Generator().manual_seed(profile.seed)
    size, batch = profile.image_size, profile.batch_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
    x0 = to_signed(images).to(device)
    foreground = torch.ones(batch, 1, size, size, device=device)
    if runtime.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)

    started = time.perf_counter()
    trainer.train_step(x0, foreground)
    synchronize(device)
    warm_up = time.perf_counter() - started
    steps = 1 if warm_up >= SLOW_STEP_S else TIMED_STEPS
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(x0, foreground)
    synchronize(device)
    train = (time.perf_counter() - started) / (steps * batch)

    forwards = max(1, profile.steps - 2)  # the reverse process calls the network at t = T-2 .. 1
    estimate = train * forwards / FORWARDS_PER_TRAINING_IMAGE
    count = max(1, min(batch, profile.inference_batch, round(INFERENCE_SECONDS / max(estimate, 1e-9))))
    started = time.perf_counter()
    anomaly_maps(
        trainer.model,
        trainer.process,
        images[:count],
        batch_size=profile.inference_batch,
        device=device,
        precision=trainer.precision,
    )
    synchronize(device)
    infer = (time.perf_counter() - started) / count
    return Calibration(device_name(device, threads), profile.name, trainer.precision, train, infer)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tfsearch.transfusion.calibration",
        description="seconds per training image and per evaluated image of a profile on this device",
    )
    parser.add_argument("--profile", required=True, choices=sorted(PROFILES))
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--no-cache", action="store_true", help="measure again, and store nothing")
    args = parser.parse_args(argv)
    runtime = Runtime(
        args.device, args.precision, progress=False, channels_last=args.channels_last, compile=args.compile
    )
    cache = None if args.no_cache else "default"
    hit = cached(PROFILES[args.profile], runtime, threads=args.threads, cache=cache)
    calibration = hit or calibrate(PROFILES[args.profile], runtime, threads=args.threads, cache=cache)
    source = "cached" if hit else "measured now"
    print(f"device: {calibration.device}")
    print(f"profile: {calibration.profile}, precision {calibration.precision} ({source})")
    print(f"train: {calibration.train_seconds_per_image:.6g} s/image")
    print(f"infer: {calibration.infer_seconds_per_image:.6g} s/image (the full reverse process)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
