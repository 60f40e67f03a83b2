"""Training images/s on this CPU: eager against `--compile`, and the trainer of another commit (by default
HEAD, whose steps may read their losses back to the host) beside today's, per profile in one run.

    python bench/compile.py --profiles cpu small --repeats 3 --steps 3
    python bench/compile.py --profiles cpu --old-commit HEAD~1
    python bench/compile.py --profiles cpu small --compile-profiles cpu   # compile only where affordable

Each configuration trains in a fresh subprocess with a fresh TorchInductor cache (so the compile time is a
cold one): a first step (which compiles where `--compile`), one warm-up step, then `--repeats` timings of
`--steps` real `Trainer.train_step` calls on the demo data at the profile's batch size and precision
(`auto`). The compile time is the first step's time less the median step's. "Pays after" is the number of
training images at which the compiled run, compile time included, overtakes the eager one; a run of the
profile trains `epochs` x the demo's training images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def measure(args: argparse.Namespace) -> dict:
    """One configuration, in this process (the child)."""
    from tfsearch.data.datasets import DEMO_CATEGORIES
    from tfsearch.transfusion.job import TrainJob
    from tfsearch.transfusion.profiles import get_profile
    from tfsearch.transfusion.runtime import Runtime
    from tfsearch.transfusion.trainer import Trainer, to_signed

    profile = get_profile(args.profile)
    job = TrainJob(dataset="demo", category=DEMO_CATEGORIES[0], profile=profile)
    options = {"compile": True} if args.compile else {}  # an older Runtime may lack the field
    trainer = Trainer(job, Path(args.scratch), Runtime(device="cpu", progress=False, **options))
    data = trainer._ensure_data()
    count, batch = data.train_images.shape[0], profile.batch_size

    def steps(first: int, number: int) -> float:
        started = time.perf_counter()
        for i in range(first, first + number):
            index = torch.arange(i * batch, (i + 1) * batch) % count
            trainer.train_step(to_signed(data.train_images[index]), data.foreground[index])
        return time.perf_counter() - started

    first_step = steps(0, 1)
    steps(1, 1)
    rates = [args.steps * batch / steps(2 + r * args.steps, args.steps) for r in range(args.repeats)]
    step_seconds = batch / statistics.median(rates)
    return {
        "rates": rates,
        "compile_seconds": max(first_step - step_seconds, 0.0),
        "run_images": profile.epochs * count,
        "precision": trainer.precision,
        "image_size": profile.image_size,
        "batch": batch,
    }


def child(profile: str, source: Path, compile_: bool, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "PYTHONPATH": str(source), "TORCHINDUCTOR_CACHE_DIR": str(Path(scratch) / "ind")}
        command = [sys.executable, __file__, "--child", "--profile", profile, "--scratch", scratch]
        command += ["--repeats", str(args.repeats), "--steps", str(args.steps)]
        command += ["--compile"] if compile_ else []
        done = subprocess.run(command, check=True, capture_output=True, text=True, env=env, cwd=scratch)
    return json.loads(done.stdout.strip().splitlines()[-1])


def old_tree(commit: str, into: Path) -> Path:
    """The `tfsearch` package of `commit`, unpacked into `into`."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, "tfsearch"], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def report(name: str, result: dict, eager: dict | None) -> str:
    rates = result["rates"]
    line = f"  {name:<22} min {min(rates):6.2f}  median {statistics.median(rates):6.2f} images/s"
    if eager is not None:
        ratio = statistics.median(rates) / statistics.median(eager["rates"])
        line += f"  x{ratio:.2f} of eager"
    if result["compile_seconds"] and name.startswith("compile"):
        line += f"  compile {result['compile_seconds']:.0f} s"
        saved = 1 / statistics.median(eager["rates"]) - 1 / statistics.median(rates)
        pays = f"pays after {result['compile_seconds'] / saved:.0f} images" if saved > 0 else "never pays"
        line += f", {pays} (a run trains {result['run_images']})"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="+", default=["cpu", "small"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="training steps per timing")
    parser.add_argument("--old-commit", default="HEAD", help="the commit whose trainer is measured beside")
    parser.add_argument(
        "--compile-profiles", nargs="*", help="profiles also measured with --compile (default: all)"
    )
    parser.add_argument("--profile", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    print(f"machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as folder:
        old = old_tree(args.old_commit, Path(folder))
        for profile in args.profiles:
            results = {"eager": child(profile, ROOT, False, args)}
            if args.compile_profiles is None or profile in args.compile_profiles:
                results["compile"] = child(profile, ROOT, True, args)
            results[f"old ({args.old_commit}) eager"] = child(profile, old, False, args)
            first = results["eager"]
            print(
                f"profile {profile}: {first['image_size']} px, batch {first['batch']}, {first['precision']}"
            )
            for name, result in results.items():
                print(report(name, result, None if name == "eager" else first))


if __name__ == "__main__":
    main()
