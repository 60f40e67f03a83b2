"""Training throughput, peak memory and inference latency of the TransFusion trainer.

    python bench/train.py --profile cpu
    python bench/train.py --profile paper --steps 2 --infer-images 2
    python bench/train.py --profile paper --device cuda --precision bf16 --steps 20   # on a GPU
    python bench/train.py --profile paper --device cuda --precision tf32 --compile --warmup 3

`--precision tf32` is fp32 with TF32 matrix products and convolutions on CUDA; `--compile` trains a
torch.compile'd network, and `first_step_seconds` (the first warm-up step) then includes the compilation.

Each measurement runs in a fresh subprocess so that its peak memory (max RSS on the CPU,
torch.cuda.max_memory_allocated on a GPU) is its own. Training steps are real `Trainer.train_step` calls
(synthesis, forward, loss, backward, AdamW) on the demo dataset resized to the profile's image size.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def measure(args: argparse.Namespace) -> dict:
    from tfsearch.data.datasets import DEMO_CATEGORIES
    from tfsearch.transfusion.inference import anomaly_maps
    from tfsearch.transfusion.job import TrainJob
    from tfsearch.transfusion.profiles import get_profile
    from tfsearch.transfusion.runtime import Runtime
    from tfsearch.transfusion.trainer import Trainer, to_signed

    profile = get_profile(args.profile, batch_size=args.batch)
    job = TrainJob(dataset="demo", category=args.category or DEMO_CATEGORIES[0], profile=profile)
    runtime = Runtime(
        device=args.device,
        precision=args.precision,
        progress=False,
        channels_last=args.channels_last,
        compile=args.compile,
    )
    trainer = Trainer(job, Path(args.scratch), runtime)
    data = trainer._ensure_data()
    device = trainer.device
    images = data.train_images
    count = images.shape[0]

    def step(i: int) -> None:
        index = torch.arange(i * args.batch, (i + 1) * args.batch, device=device) % count
        trainer.train_step(to_signed(images[index]), data.foreground[index])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    started = time.perf_counter()
    step(0)
    sync()
    first_step_seconds = time.perf_counter() - started
    for i in range(1, args.warmup):
        step(i)
    sync()
    started = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    sync()
    train_seconds = time.perf_counter() - started

    test = data.eval_sets["test"].images[: args.infer_images]
    timings = {}
    for batch in sorted({1, args.infer_batch}):
        sync()
        started = time.perf_counter()
        anomaly_maps(
            trainer.model, trainer.process, test, batch_size=batch, device=device, precision=args.precision
        )
        sync()
        timings[batch] = (time.perf_counter() - started) / test.shape[0]

    if device.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "profile": args.profile,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "precision": args.precision,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "first_step_seconds": first_step_seconds,
        "batch": args.batch,
        "image_size": profile.image_size,
        "train_images_per_second": args.steps * args.batch / train_seconds,
        "peak_memory_gb": peak_gb,
        "inference_seconds_per_image": {str(k): v for k, v in timings.items()},
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--infer-images", type=int, default=8)
    parser.add_argument("--infer-batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="train a torch.compile'd network")
    parser.add_argument("--category", default=None)
    parser.add_argument("--scratch", default="/tmp/tfsearch-bench")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    child = subprocess.run(
        [sys.executable, __file__, "--child", *sys.argv[1:]], check=True, capture_output=True, text=True
    )
    result = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}")
    for key, value in result.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
